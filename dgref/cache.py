"""An on-disk cache for trained models and generated samples (book chapter "Images").

One cache directory holds one file per entry, ``<name>.pt``. Each file stores the *config*
the entry was built with (a JSON-like dict: str, int, float, bool, None, lists, dicts) next to
its payload (a dict of tensors, state dicts and JSON-like values). :func:`cached` rebuilds an
entry whose stored config differs from the requested one; :func:`load_cached` raises a
:class:`CacheConfigError` naming the differing keys instead. Files are written atomically
(a temporary file in the same directory, then ``os.replace``) and read with
``torch.load(weights_only=True)``, which never runs code from the file.

The directory is, in order of precedence: the ``cache_dir`` argument, the environment
variable ``DGREF_CACHE``, or ``_build/cache/`` at the repository root (ignored by git).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import atomic_torch_save, canonical_config, config_diff

__all__ = ["CacheError", "CacheConfigError", "default_cache_dir", "cache_path", "save_cached", "load_cached",
           "cached"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_FORMAT = 1


class CacheError(ValueError):
    """A cached entry cannot be used (unreadable or of an unknown format)."""


class CacheConfigError(CacheError):
    """A cached entry was built with a different config than the one requested."""


def default_cache_dir(cache_dir=None) -> Path:
    """The cache directory: ``cache_dir`` if given, else ``$DGREF_CACHE``, else ``<repo>/_build/cache``.
    (book chapter images)"""
    if cache_dir is None:
        cache_dir = os.environ.get("DGREF_CACHE") or None
    if cache_dir is None:
        return Path(__file__).resolve().parent.parent / "_build" / "cache"
    if not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be a path or None, got {type(cache_dir).__name__}")
    return Path(cache_dir)


def cache_path(name: str, cache_dir=None) -> Path:
    """The file holding entry ``name`` (letters, digits, ``_ . -``; no separators).
    (book chapter images)"""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError("name must be a non-empty string of letters, digits, '_', '.' or '-' "
                         f"(no path separators), got {name!r}")
    return default_cache_dir(cache_dir) / f"{name}.pt"


def _normalise(config) -> dict:
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    return canonical_config(config)


def _diff(stored: dict, wanted: dict) -> list[str]:
    return config_diff(stored, wanted, stored_name="cached", expected_name="requested")


def save_cached(name: str, config: dict, payload: dict, cache_dir=None) -> Path:
    """Write ``payload`` with its ``config`` to ``<cache_dir>/<name>.pt`` atomically; return the path.
    (book chapter images)"""
    path = cache_path(name, cache_dir)
    config = _normalise(config)
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    payload = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
               for k, v in payload.items()}
    return atomic_torch_save({"format": _FORMAT, "config": config, "payload": payload}, path)


def load_cached(name: str, config: dict | None = None, cache_dir=None, *, map_location="cpu"
                ) -> dict:
    """Load entry ``name``; with ``config``, check it equals the stored one (book chapter images).

    Raises ``FileNotFoundError`` when the entry is absent and :class:`CacheConfigError` (a
    ``ValueError``) naming every differing key when the stored config differs.
    """
    path = cache_path(name, cache_dir)
    if not path.exists():
        raise FileNotFoundError(f"no cached entry {name!r} at {path}")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated file, foreign pickle, ...
        raise CacheError(f"cached entry {name!r} at {path} cannot be read ({exc}); delete it "
                         "to rebuild") from None
    if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
        raise CacheError(f"cached entry {name!r} at {path} has an unknown format; "
                               "delete it to rebuild")
    if config is not None:
        diff = _diff(blob["config"], _normalise(config))
        if diff:
            raise CacheConfigError(f"cached entry {name!r} at {path} was built with a different "
                                   "config; differing keys: " + "; ".join(diff))
    return blob["payload"]


def cached(name: str, config: dict, build: Callable[[], dict], cache_dir=None, *,
           map_location="cpu", log: Callable[[str], None] | None = None) -> tuple[dict, bool]:
    """Return ``(payload, hit)``: the cached payload if its config matches, else ``build()``'s, saved.
    (book chapter images)

    ``build()`` returns the payload dict. A stored entry with another config is rebuilt and
    overwritten (``log`` is told which keys differ); an unreadable one too.
    """
    try:
        return load_cached(name, config, cache_dir, map_location=map_location), True
    except FileNotFoundError:
        pass
    except CacheError as exc:
        if log is not None:
            log(f"rebuilding: {exc}")
    payload = build()
    save_cached(name, config, payload, cache_dir)
    return payload, False
