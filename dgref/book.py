"""Chapter set-up shared by every notebook of the book (papermill parameters, device, seed).

Each chapter has a cell tagged ``parameters`` and then calls :func:`setup_chapter`, which
validates every parameter (a bad value fails in the first cells, naming the parameter),
resolves the device, seeds, switches progress bars off, and prints the effective parameters
on one line that starts with ``dgref-parameters:`` (tests read that line back).
"""
from __future__ import annotations

import json
import math
import numbers
import os
from types import SimpleNamespace

import torch

from ._progress import set_progress
from ._util import resolve_device
from .rng import seed_everything

__all__ = ["setup_chapter", "PARAMETERS_PREFIX"]

PARAMETERS_PREFIX = "dgref-parameters:"


def _check_size(name, value, default):
    """A size takes the type of its default: int >= 1, float > 0 (finite), or bool."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError(f"parameter {name!r} must be True or False, got {value!r}")
        return value
    if isinstance(default, numbers.Integral):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"parameter {name!r} must be an int, got {type(value).__name__} "
                            f"{value!r}")
        if value < 1:
            raise ValueError(f"parameter {name!r} must be >= 1, got {value}")
        return int(value)
    if isinstance(default, numbers.Real):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"parameter {name!r} must be a number, got {type(value).__name__} "
                            f"{value!r}")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"parameter {name!r} must be finite and > 0, got {value}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise TypeError(f"parameter {name!r} must be a str, got {value!r}")
        return value
    raise TypeError(f"parameter {name!r}: unsupported default type {type(default).__name__}")


def setup_chapter(chapter: str, *, seed, device, quick, sizes: dict | None = None,
                  **fixed) -> SimpleNamespace:
    """Validate a chapter's parameters and return them, resolved, as a namespace.

    Args:
        chapter: the chapter's short name (recorded with the parameters).
        seed: int >= 0.
        device: ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        quick: True for the CPU default, False for the full-size (GPU) setting.
        sizes: ``{name: (value, quick_default, full_default)}``; a value of ``None`` takes the
            default for the chosen setting, any other value must have the default's type
            (int >= 1, float > 0, bool or str).
        **fixed: further parameters recorded as they are.

    Prints ``dgref-parameters: {json}`` and returns a namespace with ``seed``, ``device`` (a
    ``torch.device``), ``quick`` and every size.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"parameter 'seed' must be an int >= 0, got {seed!r}")
    if not isinstance(quick, bool):
        raise TypeError(f"parameter 'quick' must be True or False, got {quick!r}")
    try:
        dev = resolve_device(device)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"parameter 'device': {exc}") from None
    resolved = {}
    for name, spec in (sizes or {}).items():
        if not (isinstance(spec, tuple) and len(spec) == 3):
            raise TypeError(f"sizes[{name!r}] must be (value, quick_default, full_default)")
        value, q, f = spec
        default = q if quick else f
        resolved[name] = default if value is None else _check_size(name, value, default)
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and dev.type == "cpu":
        torch.set_num_threads(int(threads))
    set_progress(False)
    seed_everything(int(seed))
    record = {"chapter": chapter, "seed": int(seed), "device": str(dev), "quick": quick,
              **resolved, **fixed}
    print(PARAMETERS_PREFIX, json.dumps(record, sort_keys=True, default=str))
    return SimpleNamespace(**{**record, "device": dev})
