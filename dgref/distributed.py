"""Training across processes with ``torch.distributed`` (book: API page; README "Training across processes").

A user who outgrows one device launches the same training under ``torchrun``::

    torchrun --standalone --nproc_per_node=2 benchmarks/images_full.py --quick --shards 2

Every process runs the same program; :func:`init_distributed` joins the process group that
torchrun describes in the environment (``gloo`` on the CPU, ``nccl`` on GPUs), and the
trainers below wrap the network in :class:`~torch.nn.parallel.DistributedDataParallel` (DDP).

The design: **the global batch is split into shards, and a shard is the unit of data and of
randomness.** Shard ``r`` of ``S`` owns

- its part of the training data: rows ``r, r + S, r + 2S, ...`` of each data tensor
  (:func:`shard_data`); batches are drawn from that part only;
- its own random stream: a generator seeded with :func:`shard_seed` ``(seed, r)``, which draws
  the shard's batch indices, noise levels and noise (shard 0 keeps ``seed`` itself, so one
  shard is exactly a plain single-process run);
- ``batch_size / S`` examples of the global batch.

Under torchrun with W processes, process ``r`` computes shard ``r`` (``S = W``) and DDP
averages the gradients across processes. In one process, :func:`data_parallel_loop` computes all
``S`` shards and averages their losses. With mean losses over equal shards both give the
gradient of the mean over the global batch, so a run on W processes equals a single-process run
with ``num_shards = W``, up to the order of floating-point sums (``tests/test_distributed.py``
checks it on two CPU processes). Checkpoints and cache entries are written by rank 0
(:func:`save_on_main`); the others wait for it.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from ._checks import check_positive_float, check_positive_int
from ._util import resolve_device
from .checkpoint import save_checkpoint
from .discriminator import ce_loss, kl_loss
from .edm import edm_loss
from .rng import make_generator
from .training import batch_sampler, optimisation_loop

__all__ = ["DistContext", "init_distributed", "current_context", "shutdown_distributed",
           "shard_seed", "shard_data", "data_parallel_loop", "train_denoiser_parallel",
           "train_discriminator_parallel", "save_on_main", "barrier", "broadcast_object",
           "all_gather_rows"]

_GOLDEN = 0x9E3779B97F4A7C15          # 2^64 / golden ratio: spreads shard seeds apart


class DistContext(NamedTuple):
    """Where this process stands: ``rank`` of ``world_size`` processes, its ``device``, and the
    process group's ``backend`` (``None`` for a single process without a group)."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints and prints."""
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    if not value.isdigit():
        raise ValueError(f"environment variable {name} must be an int >= 0 (set by torchrun), "
                         f"got {value!r}")
    return int(value)


def init_distributed(device="auto", backend: str | None = None) -> DistContext:
    """Join the process group that ``torchrun`` describes; a single process without it.

    torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
    Without ``RANK``/``WORLD_SIZE`` this returns a single-process context (rank 0 of 1, no
    group), so the same script runs with and without torchrun. ``device``: ``"auto"`` takes
    GPU ``LOCAL_RANK`` when CUDA is present, else the CPU. ``backend`` defaults to ``"nccl"`` on
    GPUs and ``"gloo"`` on the CPU.
    """
    dev = resolve_device(device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistContext(0, 1, 0, dev, None)
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must lie in [0, WORLD_SIZE={world})")
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPUs "
                             "are visible; use --nproc_per_node <= the number of GPUs")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("backend='nccl' needs CUDA devices; use 'gloo' on the CPU")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    return DistContext(rank, world, local, dev, backend)


def current_context(device=None) -> DistContext:
    """The context of an already initialised group (or a single process); ``device`` is
    recorded as given (default: the CPU)."""
    dev = resolve_device(device) if device is not None else torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return DistContext(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)),
                           dev, dist.get_backend())
    return DistContext(0, 1, 0, dev, None)


def shutdown_distributed() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext | None = None) -> None:
    """Wait for every process (nothing to do in a single process)."""
    ctx = ctx or current_context()
    if ctx.world_size > 1:
        dist.barrier()


def broadcast_object(obj, ctx: DistContext | None = None):
    """Rank 0's ``obj`` on every process (a picklable value)."""
    ctx = ctx or current_context()
    if ctx.world_size == 1:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_rows(part: torch.Tensor, num_rows: int, ctx: DistContext | None = None
                    ) -> torch.Tensor:
    """Reassemble a tensor whose rows ``r, r + W, ...`` were computed by rank ``r``.

    ``part`` holds this rank's rows (as :func:`shard_data` selects them); every rank gets the
    whole ``(num_rows, ...)`` tensor, in the original order.
    """
    ctx = ctx or current_context()
    W = ctx.world_size
    if W == 1:
        return part
    sizes = [len(range(r, num_rows, W)) for r in range(W)]
    if part.shape[0] != sizes[ctx.rank]:
        raise ValueError(f"part has {part.shape[0]} rows, expected {sizes[ctx.rank]} "
                         f"(rows {ctx.rank}::{W} of {num_rows})")
    width = max(sizes)
    pad = torch.zeros((width - part.shape[0], *part.shape[1:]), dtype=part.dtype,
                      device=part.device)
    padded = torch.cat([part, pad]).contiguous()
    gathered = [torch.empty_like(padded) for _ in range(W)]
    dist.all_gather(gathered, padded)
    out = torch.empty((num_rows, *part.shape[1:]), dtype=part.dtype, device=part.device)
    for r in range(W):
        out[r::W] = gathered[r][:sizes[r]]
    return out


def shard_seed(seed: int, shard: int) -> int:
    """The seed of shard ``shard``'s random stream. Shard 0 keeps ``seed`` itself (one shard is
    a plain single-process run); the others are spread apart by a large odd constant."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if isinstance(shard, bool) or not isinstance(shard, int) or shard < 0:
        raise ValueError(f"shard must be an int >= 0, got {shard!r}")
    return seed if shard == 0 else (seed + shard * _GOLDEN) % (2 ** 63)


def shard_data(data, shard: int, num_shards: int):
    """Shard ``shard`` of ``num_shards`` of a dataset: rows ``shard::num_shards`` of a tensor.

    An object with ``sample(n, generator=)`` (a distribution) is returned as it is: each shard
    draws fresh samples from its own stream. ``None`` stays ``None``.
    """
    num_shards = check_positive_int("num_shards", num_shards)
    if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < num_shards:
        raise ValueError(f"shard must be an int in [0, num_shards={num_shards}), got {shard!r}")
    if isinstance(data, torch.Tensor):
        if data.ndim < 1 or data.shape[0] < num_shards:
            raise ValueError(f"data has {data.shape[0] if data.ndim else 0} rows, fewer than "
                             f"num_shards={num_shards}")
        return data[shard::num_shards]
    return data


def _resolve_shards(num_shards, ctx: DistContext) -> int:
    S = ctx.world_size if num_shards is None else check_positive_int("num_shards", num_shards)
    if ctx.world_size > 1 and S != ctx.world_size:
        raise ValueError(f"num_shards={S} must equal the number of processes "
                         f"({ctx.world_size}) when training across processes")
    return S


def _shard_batch(batch_size, S: int) -> int:
    batch_size = check_positive_int("batch_size", batch_size)
    if batch_size % S:
        raise ValueError(f"batch_size={batch_size} (the global batch) must be divisible by "
                         f"num_shards={S}")
    return batch_size // S


def data_parallel_loop(module: nn.Module, make_shard_loss: Callable, *, steps: int, lr: float,
                       num_shards: int | None = None, ctx: DistContext | None = None,
                       lr_schedule: str = "cosine", optimizer=None, start_step: int = 0,
                       check_every: int | None = None, progress: bool | None = None,
                       desc: str = "training", what: str = "loss") -> Iterator[dict]:
    """:func:`dgref.training.optimisation_loop` over a global batch split into shards.

    ``make_shard_loss(model, shard) -> step_loss(step)`` builds the loss of one shard (its data
    part and random stream); ``model`` is what that loss must call: the DDP wrapper of
    ``module`` in a process group, ``module`` itself otherwise. With W processes, this process
    computes shard ``rank`` (``num_shards`` defaults to, and must equal, W) and DDP averages
    the gradients; in one process every shard is computed and the losses are averaged. The
    recorded loss is the mean over all shards (the same on every process, so a non-finite
    loss stops every process at the same step). Adam at ``lr`` unless ``optimizer`` is given.
    A generator, like every ``*_loop``.
    """
    ctx = ctx or current_context()
    S = _resolve_shards(num_shards, ctx)
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("module has no trainable parameters")
    W = ctx.world_size
    if W > 1:
        from torch.nn.parallel import DistributedDataParallel
        dev = params[0].device
        model = DistributedDataParallel(module, device_ids=[dev.index]
                                        if dev.type == "cuda" else None)
        local = [ctx.rank]
    else:
        model, local = module, list(range(S))
    shard_losses = [make_shard_loss(model, r) for r in local]

    def step_loss(step):
        loss = sum(f(step) for f in shard_losses) / len(shard_losses)
        if W == 1:
            return loss
        # DDP waits for a gradient of every parameter; one that the loss does not reach (the
        # last bias of a discriminator under the KL objective, which sees only grad_x d) joins
        # with weight 0.
        loss = loss + 0.0 * sum(p.sum() for p in params)
        reported = loss.detach().clone()
        dist.all_reduce(reported)         # the global mean, identical on every process
        return loss, reported / W

    if optimizer is None:
        optimizer = torch.optim.Adam(params, lr=check_positive_float("lr", lr))
    module.train()
    yield from optimisation_loop(step_loss, params, optimizer, steps=steps, lr=lr,
                                 lr_schedule=lr_schedule, start_step=start_step,
                                 check_every=check_every, progress=progress and ctx.is_main,
                                 desc=desc, what=what)
    module.eval()


def train_denoiser_parallel(denoiser: nn.Module, data, *, steps: int, batch_size: int = 256,
                            lr: float = 1e-3, seed: int = 0, num_shards: int | None = None,
                            ctx: DistContext | None = None, sigma_data: float | None = None,
                            P_mean: float = -1.2, P_std: float = 1.2, **loop_kwargs
                            ) -> list[float]:
    """Train an EDM denoiser (book eq. edm-loss) on a sharded global batch; return the losses.

    The same loss and cosine schedule as :func:`dgref.train_denoiser`; with one shard and
    ``seed`` it is exactly ``train_denoiser(..., generator=make_generator(seed))``. ``data``: a
    tensor ``(N, ...)`` (sharded by rows) or a distribution with ``sample``.
    """
    ctx = ctx or current_context()
    S = _resolve_shards(num_shards, ctx)
    b = _shard_batch(batch_size, S)
    if sigma_data is None:
        sigma_data = getattr(denoiser, "sigma_data", 0.5)
    device = next(denoiser.parameters()).device

    def make(model, r):
        gen = make_generator(shard_seed(seed, r), device)
        draw = batch_sampler(shard_data(data, r, S), b, gen, device)
        return lambda step: edm_loss(model, draw(), sigma_data=sigma_data, P_mean=P_mean,
                                     P_std=P_std, generator=gen)
    loop = data_parallel_loop(denoiser, make, steps=steps, lr=lr, num_shards=S, ctx=ctx,
                              **loop_kwargs)
    return [rec["loss"] for rec in loop]


def train_discriminator_parallel(disc: nn.Module, *, objective: str, x_real, x_fake=None,
                                 denoiser=None, steps: int, batch_size: int = 256,
                                 lr: float = 1e-3, seed: int = 0, num_shards: int | None = None,
                                 ctx: DistContext | None = None, gamma: float = 0.0,
                                 lr_schedule: str = "constant", optimizer=None,
                                 check_every: int | None = None, progress: bool | None = None,
                                 **loss_kwargs) -> list[float]:
    """Train a discriminator with :func:`dgref.ce_loss` or :func:`dgref.kl_loss` on a sharded
    global batch; return the losses (for ``"kl"``, relative to ``d = 0``).

    The same losses as :func:`dgref.train_discriminator` (constant learning rate by default);
    with one shard and ``seed`` it is exactly ``train_discriminator(...,
    generator=make_generator(seed))``. Further keywords go to the loss (``weighting``,
    ``sigma_min``, ``sigma_max``, ...).
    """
    if objective not in ("ce", "kl"):
        raise ValueError(f"objective must be 'ce' or 'kl', got {objective!r}")
    ctx = ctx or current_context()
    S = _resolve_shards(num_shards, ctx)
    b = _shard_batch(batch_size, S)
    need_fake = objective == "ce" or gamma > 0
    if need_fake and x_fake is None:
        raise ValueError(f"objective={objective!r} with gamma={gamma} needs x_fake")
    if objective == "kl" and denoiser is None:
        raise ValueError("objective='kl' needs the frozen model's denoiser")
    device = next(disc.parameters()).device

    def make(model, r):
        gen = make_generator(shard_seed(seed, r), device)
        draw_real = batch_sampler(shard_data(x_real, r, S), b, gen, device)
        draw_fake = batch_sampler(shard_data(x_fake, r, S), b, gen, device) if need_fake else None

        def shard_loss(step):
            xr = draw_real()
            xf = draw_fake().to(xr.dtype) if need_fake else None
            if objective == "ce":
                return ce_loss(model, xr, xf, generator=gen, **loss_kwargs)
            return kl_loss(model, denoiser, xr, generator=gen, gamma=gamma, x_fake=xf,
                           relative=True, **loss_kwargs)
        return shard_loss
    loop = data_parallel_loop(disc, make, steps=steps, lr=lr, num_shards=S, ctx=ctx,
                              lr_schedule=lr_schedule, optimizer=optimizer,
                              check_every=check_every, progress=progress,
                              desc="discriminator", what="discriminator loss")
    return [rec["loss"] for rec in loop]


def save_on_main(path, module: nn.Module, config: dict | None = None,
                 ctx: DistContext | None = None, **kwargs):
    """:func:`dgref.save_checkpoint` on rank 0 only; every process waits until it is written.
    Returns the path on rank 0 and ``None`` elsewhere."""
    ctx = ctx or current_context()
    out = save_checkpoint(path, module, config, **kwargs) if ctx.is_main else None
    barrier(ctx)
    return out
