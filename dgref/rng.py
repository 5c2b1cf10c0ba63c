"""Random numbers: seeded generators, per-sample generators, noise, and global seeding."""
from __future__ import annotations

import contextlib
import numbers
import random

import numpy as np
import torch

from ._checks import check_positive_int
from ._util import optional_device, resolve_device

__all__ = ["seed_everything", "BatchGenerator", "randn", "make_generator", "init_rng"]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's *global* generators (book: every chapter's ``seed``).

    Applies the ``seed`` parameter of every book chapter (called by
    :func:`dgref.book.setup_chapter`). dgref's functions draw from the global torch generator
    only where no ``generator=`` is passed: data, noise and sampler randomness take an explicit
    ``generator=``, and so does network initialisation (``MLP(..., generator=g)``); with
    ``generator=None`` a network is initialised from the global generator, as torch's own
    layers are. Explicit generators alone reproduce a run; this function makes the rest
    (e.g. a network built without ``generator=``) reproducible too.
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


@contextlib.contextmanager
def init_rng(generator=None):
    """Context for building a network's initial weights from ``generator`` (book: API page).

    With ``generator=None`` nothing changes: layers draw from torch's global generator, as
    usual. With a ``torch.Generator``, one seed is drawn from it and the layers are built under
    a forked global CPU generator seeded with it, so the weights depend on ``generator`` alone
    and the global generator is left as it was.
    """
    if generator is None:
        yield
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    seed = int(torch.randint(2 ** 62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


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
    device = optional_device(device)
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
