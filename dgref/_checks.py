"""Input validation shared by every public function.

Each check raises ``TypeError`` or ``ValueError`` whose message names the argument, what was
given and what was expected, so a wrong call fails at its first line, not deep inside torch.

Checks run at public entry points. Value checks of tensors (finite entries, sigma > 0, labels
in range) read numbers back to the host: on a GPU that is a synchronisation, so they run only
for CPU tensors unless ``DGREF_DEVICE_CHECKS=1``. Inside :func:`checked_scope` (entered by a
sampler whose levels were validated once, or by a wrapper that has checked ``sigma`` itself)
nested calls skip the value check of ``sigma`` and labels: one check per evaluation.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
import threading

import torch

__all__ = [
    "NonFiniteError",
    "check_tensor",
    "check_positive_int",
    "check_nonneg_int",
    "check_positive_float",
    "check_finite_float",
    "check_sigma",
    "check_window",
    "check_labels",
    "check_callable",
    "check_output_shape",
    "checked_scope",
]


class NonFiniteError(FloatingPointError):
    """A loss, gradient or sample became NaN or infinite."""


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}"


def check_tensor(name: str, value, *, ndim: int | None = None, min_ndim: int | None = None,
                 last_dim: int | None = None, floating: bool = True, nonempty: bool = True,
                 finite: bool = False) -> torch.Tensor:
    """Check that ``value`` is a tensor of the expected rank and trailing size."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_describe(value)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(value.shape)}")
    if min_ndim is not None and value.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(value.shape)}")
    if last_dim is not None and (value.ndim == 0 or value.shape[-1] != last_dim):
        raise ValueError(
            f"{name} must have last dimension {last_dim}, got shape {tuple(value.shape)}")
    if nonempty and value.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(value.shape)}")
    if finite and _values_checked(value) and not _in_scope() \
            and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite, got {int((~torch.isfinite(value)).sum())} "
                         "non-finite entries (NaN or inf)")
    return value


def check_callable(name: str, value, signature: str = "D(x, sigma)"):
    """``value`` must be callable (a denoiser, a discriminator, a correction...)."""
    if not callable(value):
        raise TypeError(f"{name} must be callable {signature}, got {_describe(value)}")
    return value


def check_output_shape(name: str, out, expected: tuple, what: str = "x") -> torch.Tensor:
    """What a user callable returned must be a tensor of ``expected`` shape (no silent
    broadcasting); a shape comparison, no device read-back."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must return a tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(expected):
        raise ValueError(f"{name} returned shape {tuple(out.shape)}, expected {what}'s shape "
                         f"{tuple(expected)}")
    return out


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1, got {_describe(value)}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value}")
    return int(value)


def check_nonneg_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 0, got {_describe(value)}")
    if value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value}")
    return int(value)


def check_finite_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_positive_float(name: str, value, *, allow_zero: bool = False,
                         allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < 0 or (value == 0 and not allow_zero):
        expected = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


# Value checks of GPU tensors read numbers back to the host: a synchronisation per call that
# stalls the GPU in sampling and training loops. Off unless DGREF_DEVICE_CHECKS=1.
DEVICE_VALUE_CHECKS = {"enabled": os.environ.get("DGREF_DEVICE_CHECKS", "0") == "1"}
# How many value checks of sigma ran (tests count them per guided evaluation).
SIGMA_VALUE_CHECKS = {"count": 0}
_SCOPE = threading.local()


def _values_checked(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" or DEVICE_VALUE_CHECKS["enabled"]


def _in_scope() -> bool:
    return getattr(_SCOPE, "depth", 0) > 0


@contextlib.contextmanager
def checked_scope():
    """Nested calls inside skip the value checks of ``sigma`` and labels (already checked)."""
    _SCOPE.depth = getattr(_SCOPE, "depth", 0) + 1
    try:
        yield
    finally:
        _SCOPE.depth -= 1


def check_sigma(name: str, sigma, batch: int | None = None, *, allow_zero: bool = False,
                like: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``sigma`` as a tensor of shape ``(batch,)`` (or a 0-d tensor when ``batch`` is None).

    Accepts a Python number, a 0-d tensor, or a tensor of shape ``(batch,)``. Rejects
    non-finite values and sigma <= 0 (sigma < 0 when ``allow_zero``). The value check of a
    tensor on a GPU is skipped (it would synchronise the device at every denoiser call) unless
    ``DGREF_DEVICE_CHECKS=1`` is set; numbers and CPU tensors are always checked.
    """
    if isinstance(sigma, bool):
        raise TypeError(f"{name} must be a number or a tensor, got {_describe(sigma)}")
    if isinstance(sigma, numbers.Real):
        value = float(sigma)
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            expected = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"{name} must be finite and {expected}, got {value}")
        kwargs = {} if like is None else {"dtype": like.dtype, "device": like.device}
        t = torch.tensor(value, **kwargs)
        return t if batch is None else t.expand(batch)
    if not isinstance(sigma, torch.Tensor):
        raise TypeError(f"{name} must be a number or a tensor, got {_describe(sigma)}")
    if like is not None:
        if sigma.device != like.device:
            raise ValueError(f"{name} is on device {sigma.device} but x is on {like.device}")
        sigma = sigma.to(like.dtype)
    if sigma.ndim > 1:
        raise ValueError(f"{name} must be a scalar or of shape (batch,), got shape "
                         f"{tuple(sigma.shape)}")
    if batch is not None:
        if sigma.ndim == 0:
            sigma = sigma.expand(batch)
        elif sigma.shape[0] != batch:
            raise ValueError(f"{name} must have shape ({batch},) to match x, got shape "
                             f"{tuple(sigma.shape)}")
    if not _values_checked(sigma) or _in_scope():
        return sigma                      # a GPU read-back would stall it; or checked already
    if sigma.numel() == 0:
        return sigma
    SIGMA_VALUE_CHECKS["count"] += 1
    # One reduction and two reads (a NaN makes both NaN, failing the comparisons): several
    # times cheaper than building the mask, and this check runs at every denoiser call.
    lo, hi = torch.aminmax(sigma.detach())
    lo, hi = float(lo), float(hi)
    if (lo >= 0 if allow_zero else lo > 0) and hi < math.inf:
        return sigma
    bad = ~torch.isfinite(sigma) | (sigma < 0 if allow_zero else sigma <= 0)
    if bool(bad.any()):
        expected = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {expected}; got {int(bad.sum())} bad "
                         f"value(s), e.g. {float(sigma[bad].flatten()[0])}")
    return sigma


def check_window(name: str, window) -> tuple[float, float]:
    """A sigma window ``(lo, hi)`` with 0 <= lo <= hi (hi may be inf)."""
    if window is None:
        return (0.0, math.inf)
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"{name} must be a pair (sigma_lo, sigma_hi), got {_describe(window)}")
    lo = check_positive_float(f"{name}[0]", window[0], allow_zero=True)
    hi = check_positive_float(f"{name}[1]", window[1], allow_zero=True, allow_inf=True)
    if lo > hi:
        raise ValueError(f"{name} must have min <= max, got ({lo}, {hi})")
    return (lo, hi)


def check_labels(name: str, labels, batch: int, num_classes: int, *, allow_null: bool = True,
                 device=None, force: bool = False) -> torch.Tensor:
    """Class labels as a long tensor of shape ``(batch,)`` with entries in ``0..num_classes-1``
    (or ``num_classes``, the null label, when ``allow_null``). An int is broadcast.

    The range of a tensor's entries is checked on the CPU (on a GPU only with
    ``DGREF_DEVICE_CHECKS=1`` or ``force=True``: a read-back), and not inside
    :func:`checked_scope`."""
    top = num_classes if allow_null else num_classes - 1
    rule = "the last is the null label" if allow_null else "no null label here"
    if isinstance(labels, bool):
        raise TypeError(f"{name} must be an int or an integer tensor, got {_describe(labels)}")
    if isinstance(labels, numbers.Integral):
        if not 0 <= int(labels) <= top:
            raise ValueError(f"{name} must be in 0..{top} ({rule}), got {int(labels)}")
        return torch.full((batch,), int(labels), dtype=torch.long, device=device)
    elif isinstance(labels, torch.Tensor):
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
        if labels.ndim == 0:
            labels = labels.expand(batch)
        if labels.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},), got {tuple(labels.shape)}")
        labels = labels.long() if device is None else labels.to(device=device, dtype=torch.long)
    else:
        raise TypeError(f"{name} must be an int or an integer tensor, got {_describe(labels)}")
    if not labels.numel() or not (force or (_values_checked(labels) and not _in_scope())):
        return labels                     # a GPU read-back per call would stall it
    if bool((labels < 0).any()) or bool((labels > top).any()):
        bad = labels[(labels < 0) | (labels > top)]
        raise ValueError(f"{name} must be in 0..{top} ({rule}), got e.g. {int(bad[0])}")
    return labels
