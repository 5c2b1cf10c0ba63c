"""Two small tensor helpers every layer shares: device resolution and per-row broadcasting."""
from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["resolve_device", "optional_device", "bcast", "split_extra_args"]


def resolve_device(device=None) -> torch.device:
    """Turn ``None``/``"auto"``/``"cpu"``/``"cuda"``/``"cuda:N"`` into a ``torch.device``.

    Resolves the ``device`` parameter of every book chapter (see the book's introduction) and
    every ``device=`` argument of the package.

    ``None`` and ``"auto"`` pick CUDA when it is present, else the CPU. Asking for CUDA on a
    machine without it raises a ``ValueError`` naming the argument.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
                             ) from exc
    else:
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available here; "
                         "use device='cpu' or 'auto'")
    return dev


def optional_device(device):
    """``None`` stays ``None`` (follow the generator or the input); anything else goes through
    :func:`resolve_device`, so ``device="cuda"`` without CUDA fails with a clear error."""
    if device is None or (isinstance(device, torch.device) and device.type == "cpu"):
        return device
    return resolve_device(device)


def split_extra_args(extra_args) -> tuple[tuple, dict]:
    """``extra_args`` of a sampler or the likelihood as ``(args, kwargs)`` for
    ``D(x, sigma, *args, **kwargs)``: a tuple or list is positional (``D(x, sigma, labels)``),
    a dict is keyword conditioning as in k-diffusion (``extra_args={"class_labels": c}``),
    ``None`` is nothing."""
    if extra_args is None:
        return (), {}
    if isinstance(extra_args, Mapping):
        for k in extra_args:
            if not isinstance(k, str):
                raise TypeError(f"extra_args keys must be str (keyword names), got {k!r}")
        return (), dict(extra_args)
    if isinstance(extra_args, (tuple, list)):
        return tuple(extra_args), {}
    raise TypeError("extra_args must be a tuple (positional) or a dict (keyword conditioning), "
                    f"got {type(extra_args).__name__}")


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-row ``(B,)`` tensor to ``(B, 1, ..., 1)`` so it broadcasts against ``x``."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))
