"""Safe checkpoints: atomic writes, the training config stored alongside, strict loading.

A checkpoint is one file holding a model's ``state_dict``, the config it was trained with
(a JSON-able dict), and optionally the optimizer state, the step and a generator state, so a
training run can resume and reach the same weights as an uninterrupted one.

- Written atomically: to a temporary file in the same folder, flushed and fsync'ed, then
  renamed over the target (``os.replace``), so a crash never leaves a half-written file.
- Loaded with ``torch.load(weights_only=True)``: no arbitrary code runs on load.
- A truncated or corrupted file, a missing key, a shape mismatch or a config mismatch raises
  :class:`CheckpointError` naming what is wrong; the model is only touched after every check
  passed, so it is never half-loaded.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "config_diff",
           "canonical_config", "atomic_torch_save"]

_FORMAT = "dgref-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint could not be read, or does not match the model or config asked for."""


def canonical_config(config) -> dict:
    """A config as stored: a JSON round trip (tuples become lists, keys strings) (book: API page, Checkpoints).

    Rejects anything JSON cannot hold with a ``TypeError`` naming the problem.
    """
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    try:
        return json.loads(json.dumps(config, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise TypeError("config must hold only JSON values (str, int, float, bool, None, lists, "
                        f"dicts): {exc}") from None


def config_diff(stored: dict, expected: dict, *, stored_name: str = "checkpoint",
                expected_name: str = "expected", _prefix: str = "") -> list[str]:
    """Human-readable differences between two configs, nested keys as ``a.b``; empty when they
    agree (book: API page, Checkpoints)."""
    if not _prefix:
        stored, expected = canonical_config(stored), canonical_config(expected)
    out = []
    for key in sorted(set(stored) | set(expected)):
        path = f"{_prefix}{key}"
        if key not in stored:
            out.append(f"{path} (missing in the {stored_name}; {expected_name} "
                       f"{expected[key]!r})")
        elif key not in expected:
            out.append(f"{path} ({stored_name} {stored[key]!r}; not in the {expected_name} "
                       "config)")
        elif isinstance(stored[key], dict) and isinstance(expected[key], dict):
            out += config_diff(stored[key], expected[key], stored_name=stored_name,
                               expected_name=expected_name, _prefix=path + ".")
        elif stored[key] != expected[key]:
            out.append(f"{path} ({stored_name} {stored[key]!r}, {expected_name} "
                       f"{expected[key]!r})")
    return out


def atomic_torch_save(obj, path) -> Path:
    """``torch.save`` to a temporary file in the target's folder, fsync, then ``os.replace``.

    A crash mid-write leaves the old file (or none), never a truncated one (book: API page,
    Checkpoints).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_checkpoint(path, model: nn.Module, config: dict | None = None, *, optimizer=None,
                    step: int | None = None, generator: torch.Generator | None = None,
                    extra: dict | None = None) -> Path:
    """Write ``model`` (and optionally optimizer, step, generator state) to ``path`` atomically.

    The safe-checkpoint contract of the book's API page (section Checkpoints): temporary file,
    fsync, then ``os.replace``; the training config is stored with the weights.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    payload = {
        "format": _FORMAT,
        "config_json": json.dumps(canonical_config(config), sort_keys=True),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if step is not None:
        payload["step"] = int(step)
    if generator is not None:
        payload["generator"] = generator.get_state()
    if extra is not None:
        payload["extra"] = extra
    return atomic_torch_save(payload, path)


def load_checkpoint(path, model: nn.Module, config: dict | None = None, *, optimizer=None,
                    generator: torch.Generator | None = None, map_location="cpu") -> dict:
    """Load a checkpoint into ``model`` (and ``optimizer``/``generator``) after checking it (book: API page, Checkpoints).

    ``config``, when given, must equal the stored config, else :class:`CheckpointError` lists
    the differing keys. Returns ``{"config", "step", "extra"}``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, wrong file type ...
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupted?): "
                              f"{type(exc).__name__}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not a dgref checkpoint (format "
                              f"{payload.get('format') if isinstance(payload, dict) else None!r})")
    stored_config = json.loads(payload["config_json"])
    if config is not None:
        diff = config_diff(stored_config, config)
        if diff:
            raise CheckpointError(f"checkpoint {path} was trained with another config: "
                                  + "; ".join(diff))
    state = payload["model"]
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"checkpoint {path} does not fit the model: missing {missing}, "
                              f"unexpected {unexpected}, shape mismatches {shapes}")
    if optimizer is not None and "optimizer" not in payload:
        raise CheckpointError(f"checkpoint {path} holds no optimizer state")
    if generator is not None and "generator" not in payload:
        raise CheckpointError(f"checkpoint {path} holds no generator state")
    model.load_state_dict(state, strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if generator is not None:
        generator.set_state(payload["generator"])
    return {"config": stored_config, "step": payload.get("step"), "extra": payload.get("extra")}
