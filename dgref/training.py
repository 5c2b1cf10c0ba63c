"""The one optimisation loop behind every dgref trainer, and the EDM trainer (book chapter "EDM").

:func:`optimisation_loop` sets the learning rate (cosine or constant), takes the optimiser
steps, reads the losses back in blocks (a read-back stalls a GPU) and stops at the first
non-finite loss or gradient. Every trainer is a thin ``*_loop`` generator around it plus a
``train_*`` function that runs the loop to the end and returns the losses:

- EDM: :func:`edm_training_loop` / :func:`train_denoiser` (here);
- discriminators: :func:`dgref.discriminator.discriminator_training_loop` /
  :func:`dgref.train_discriminator`;
- classifier-free guidance: :func:`dgref.cfg.cfg_training_loop` / :func:`dgref.train_cfg`;
- the digit classifier: :func:`dgref.metrics.classifier_training_loop` /
  :func:`dgref.metrics.train_classifier`.

A ``*_loop`` is a generator: calling it does nothing until it is iterated.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from ._checks import NonFiniteError, check_positive_float, check_positive_int, check_tensor
from ._progress import progress_bar
from .edm import edm_loss

__all__ = ["batch_sampler", "optimisation_loop", "edm_training_loop", "train_denoiser"]


def batch_sampler(data, batch_size: int, generator=None, device=None):
    """Return ``draw() -> (batch_size, ...)`` batches from a tensor (with replacement) or from
    an object with ``sample(n, generator=...)`` (e.g. a :class:`~dgref.GaussianMixture`)."""
    check_positive_int("batch_size", batch_size)
    if isinstance(data, torch.Tensor):
        check_tensor("data", data, min_ndim=2, finite=True)   # before the first step
        n = data.shape[0]

        def draw():
            idx = torch.randint(n, (batch_size,), generator=generator,
                                device=generator.device if generator is not None else "cpu")
            return data[idx.to(data.device)].to(device if device is not None else data.device)
        return draw
    if hasattr(data, "sample"):
        def draw():
            return data.sample(batch_size, generator=generator).to(device or "cpu")
        return draw
    raise TypeError("data must be a tensor of shape (N, ...) or have a .sample(n, generator=) "
                    f"method, got {type(data).__name__}")


def optimisation_loop(step_loss, params, optimizer, *, steps: int, lr: float,
                      lr_schedule: str = "cosine", start_step: int = 0,
                      check_every: int | None = None, progress: bool | None = None,
                      desc: str = "training", what: str = "loss") -> Iterator[dict]:
    """The training loop every dgref trainer shares (book: chapters edm and kl_objective).

    For each step: set the learning rate (``"cosine"`` decay over ``steps``, a pure function of
    the step, or ``"constant"``), compute ``step_loss(step)``, backpropagate, take the
    optimiser step, and yield ``{"step", "loss"}``. ``step_loss`` returns the loss tensor, or a
    pair ``(loss, reported)`` whose second value is recorded (and shown) instead of the loss
    (e.g. the KL objective relative to ``d = 0``). The losses and gradient norms of
    ``check_every`` steps (default 1 on the CPU, 32 on a GPU: a read-back stalls a GPU) are read
    back at once; the first non-finite loss or gradient raises :class:`dgref.NonFiniteError`
    naming the step and the last finite loss, before that step's update when
    ``check_every = 1``. The progress bar shows the last loss read back.

    A generator: nothing is trained until it is iterated (``for rec in ...`` or ``list(...)``).
    """
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    if check_every is None:
        check_every = 1 if params[0].device.type == "cpu" else 32
    check_every = check_positive_int("check_every", check_every)
    last = float("nan")
    pending = []                          # (step, [loss, grad norm]) not yet read back
    bar = progress_bar(range(start_step, steps), desc=desc, progress=progress)
    for step in bar:
        if lr_schedule == "cosine":
            for g in optimizer.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = step_loss(step)
        reported = None
        if isinstance(loss, tuple):
            loss, reported = loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        reported = loss if reported is None else reported
        pending.append((step, torch.stack([loss.detach().float(), gnorm.detach().float(),
                                           reported.detach().float()])))
        if len(pending) < check_every and step < steps - 1:
            optimizer.step()              # no read-back: a GPU keeps its queue full
            continue
        values = torch.stack([v for _, v in pending]).tolist()     # one synchronisation
        records, error = [], None
        for (st, _), (value, gn, rep) in zip(pending, values):
            if not math.isfinite(value):
                error = NonFiniteError(f"non-finite {what} {value} at step {st}; last finite "
                                       f"loss {last:.6g}")
            elif not math.isfinite(gn):
                error = NonFiniteError(f"non-finite {what.replace('loss', 'gradient')} at step "
                                       f"{st}; last finite loss {last:.6g}")
            if error is not None:
                break
            last = rep
            records.append({"step": st, "loss": rep})
        pending.clear()
        if records:
            bar.set_postfix(loss=f"{records[-1]['loss']:.4g}", refresh=False)
        if error is None:
            optimizer.step()
        yield from records
        if error is not None:
            raise error


def edm_training_loop(denoiser: nn.Module, data, *, steps: int, batch_size: int = 256,
                      lr: float = 1e-3, sigma_data: float | None = None, P_mean: float = -1.2,
                      P_std: float = 1.2, generator=None, optimizer=None,
                      progress: bool | None = None, start_step: int = 0,
                      check_every: int | None = None) -> Iterator[dict]:
    """Train ``denoiser`` with the EDM loss (book eq. edm-loss); yields ``{"step", "loss"}``
    after every step. A generator: nothing is trained until it is iterated (or use
    :func:`train_denoiser`).

    Adam with a cosine learning-rate decay over ``steps``. Stops with
    :class:`dgref.NonFiniteError` at the first non-finite loss or gradient, naming the step and
    the last finite loss. ``sigma_data`` defaults to the denoiser's own.

    ``check_every`` (default: 1 on the CPU, 32 on a GPU) is how many steps run between two
    read-backs of the losses: reading a loss is a host-device synchronisation that stalls a GPU,
    so on a GPU the losses of ``check_every`` steps are read at once and their records yielded
    together (every step still gets its record, in order). With ``check_every = 1`` a
    non-finite step raises before its optimiser step; with more, the steps after it in the same
    block have already run (the error still names the first bad step and the last finite loss).
    Likewise a consumer that stops after the record of step ``s`` gets a model trained to the
    end of that block: pass ``check_every=1`` to stop (and checkpoint) at an exact step.
    """
    steps = check_positive_int("steps", steps)
    check_positive_float("lr", lr)
    if sigma_data is None:
        sigma_data = getattr(denoiser, "sigma_data", 0.5)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    if not params:
        raise ValueError("denoiser has no trainable parameters")
    opt = optimizer or torch.optim.Adam(params, lr=lr)
    draw = batch_sampler(data, batch_size, generator, params[0].device)

    def step_loss(step):
        return edm_loss(denoiser, draw(), sigma_data=sigma_data, P_mean=P_mean, P_std=P_std,
                        generator=generator)

    denoiser.train()
    yield from optimisation_loop(step_loss, params, opt, steps=steps, lr=lr,
                                 start_step=start_step, check_every=check_every,
                                 progress=progress, desc="training")
    denoiser.eval()


def train_denoiser(denoiser: nn.Module, data, *, steps: int, **kwargs) -> list[float]:
    """Minimise the EDM loss (book eq. edm-loss): run :func:`edm_training_loop` to the end and
    return the per-step losses."""
    return [rec["loss"] for rec in edm_training_loop(denoiser, data, steps=steps, **kwargs)]
