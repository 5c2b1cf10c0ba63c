"""Devices, seeds and noise: the small things every chapter needs."""
from __future__ import annotations

import numbers
import random

import numpy as np
import torch

from ._checks import check_positive_int

__all__ = ["resolve_device", "seed_everything", "BatchGenerator", "randn", "make_generator"]


def resolve_device(device=None) -> torch.device:
    """Turn ``None``/``"auto"``/``"cpu"``/``"cuda"``/``"cuda:N"`` into a ``torch.device``.

    Resolves the ``device`` parameter of every book chapter (see the book's introduction).

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


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch's global generators (dgref itself uses explicit ones).

    Applies the ``seed`` parameter of every book chapter (called by
    :func:`dgref.book.setup_chapter`).
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_generator(seed: int, device=None) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``.

    The explicit ``generator=`` that the book's chapters pass wherever randomness enters.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return torch.Generator(device=resolve_device(device) if device is not None else "cpu"
                           ).manual_seed(int(seed))


class BatchGenerator:
    """One generator per sample, so that sample i's noise does not depend on the batch.

    ``BatchGenerator(seeds)`` draws row i of every ``randn`` from its own generator seeded
    with ``seeds[i]``: sampling a batch of 100 in one go or in chunks of 7 gives identical rows.
    """

    def __init__(self, seeds, device=None):
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("seeds must not be empty")
        self.device = resolve_device(device) if device is not None else torch.device("cpu")
        self.generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape, *, dtype=torch.float32, device=None) -> torch.Tensor:
        shape = tuple(shape)
        if shape[0] != len(self.generators):
            raise ValueError(f"shape[0]={shape[0]} does not match the {len(self.generators)} "
                             "per-sample generators")
        rows = [torch.randn(shape[1:], generator=g, dtype=dtype, device=self.device)
                for g in self.generators]
        out = torch.stack(rows)
        return out if device is None else out.to(device)


def randn(shape, generator=None, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard normal noise from a ``torch.Generator`` or a :class:`BatchGenerator`.

    The noise ``n ~ N(0, I)`` of ``x = x0 + sigma n`` (book: Notation page).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        raise ValueError("shape must have at least one dimension (the batch)")
    check_positive_int("shape[0]", shape[0])
    if isinstance(generator, BatchGenerator):
        return generator.randn(shape, dtype=dtype, device=device)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator, a dgref.BatchGenerator or None, "
                        f"got {type(generator).__name__}")
    gen_device = generator.device if generator is not None else (device or "cpu")
    out = torch.randn(shape, generator=generator, dtype=dtype, device=gen_device)
    return out if device is None else out.to(device)
