"""Small networks for low-dimensional data and the EDM training loop (book chapter "EDM")."""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from ._checks import (NonFiniteError, check_positive_float, check_positive_int, check_tensor)
from ._progress import progress_bar
from .edm import EDMPrecond, edm_loss

__all__ = ["FourierEmbedding", "MLP", "mlp_denoiser", "edm_training_loop", "train_denoiser",
           "batch_sampler", "optimisation_loop"]


class FourierEmbedding(nn.Module):
    """Fixed sinusoidal features of a scalar (the noise level): ``(B,) -> (B, 2 * num_freqs)``."""

    def __init__(self, num_freqs: int = 16, max_freq: float = 8.0):
        super().__init__()
        check_positive_int("num_freqs", num_freqs)
        self.register_buffer("freqs", torch.logspace(0, math.log10(max_freq), num_freqs)
                             * math.pi, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = t[:, None] * self.freqs[None].to(t.dtype)
        return torch.cat([arg.sin(), arg.cos()], dim=1)


class MLP(nn.Module):
    """``F(x_in, c_noise)``: a SiLU MLP on ``[x_in, embed(c_noise)]`` returning ``dim`` numbers.

    With ``out_dim=1`` it returns ``(B,)`` (a scalar field, e.g. a discriminator logit).
    SiLU keeps the input gradient smooth, which guidance needs.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, out_dim: int | None = None,
                 num_freqs: int = 16):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        check_positive_int("hidden", hidden)
        check_positive_int("depth", depth)
        self.out_dim = dim if out_dim is None else check_positive_int("out_dim", out_dim)
        self.embed = FourierEmbedding(num_freqs)
        layers, width = [], dim + 2 * num_freqs
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, self.out_dim))
        self.body = nn.Sequential(*layers)
        # Initialise the first layer as if x_in and the noise embedding had separate layers
        # (uniform +-1/sqrt(fan_in) for each group). With one shared fan-in of dim + 2 num_freqs
        # the few x columns start so small that the net is nearly linear in x and does not
        # learn a multi-modal denoiser in thousands of steps (measured on the ring).
        first = self.body[0]
        with torch.no_grad():
            first.weight[:, :dim].uniform_(-dim ** -0.5, dim ** -0.5)
            first.weight[:, dim:].uniform_(-(2 * num_freqs) ** -0.5, (2 * num_freqs) ** -0.5)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x_in, self.embed(c_noise).to(x_in.dtype)], dim=1)
        out = self.body(h)
        return out[:, 0] if self.out_dim == 1 and self.dim != 1 else out


def mlp_denoiser(dim: int, sigma_data: float, hidden: int = 256, depth: int = 3) -> EDMPrecond:
    """An MLP inside the EDM preconditioning (book eq. edm-precond): a denoiser ``D(x, sigma)``
    for ``dim``-dimensional data."""
    return EDMPrecond(MLP(dim, hidden, depth), sigma_data)


def batch_sampler(data, batch_size: int, generator=None, device=None):
    """Return ``draw() -> (batch_size, ...)`` batches from a tensor (with replacement) or from
    an object with ``sample(n, generator=...)`` (e.g. a :class:`~dgref.GaussianMixture`)."""
    check_positive_int("batch_size", batch_size)
    if isinstance(data, torch.Tensor):
        check_tensor("data", data, min_ndim=2)
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
    """The training loop every dgref objective shares (book: chapters edm and kl_objective).

    For each step: set the learning rate (``"cosine"`` decay over ``steps``, a pure function of
    the step, or ``"constant"``), compute ``step_loss(step)``, backpropagate, take the
    optimiser step, and yield ``{"step", "loss"}``. The losses and gradient norms of
    ``check_every`` steps (default 1 on the CPU, 32 on a GPU: a read-back stalls a GPU) are read
    back at once; the first non-finite loss or gradient raises :class:`dgref.NonFiniteError`
    naming the step and the last finite loss, before that step's update when
    ``check_every = 1``.
    """
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    if check_every is None:
        check_every = 1 if params[0].device.type == "cpu" else 32
    check_every = check_positive_int("check_every", check_every)
    last = float("nan")
    pending = []                          # (step, [loss, grad norm]) not yet read back
    for step in progress_bar(range(start_step, steps), desc=desc, progress=progress):
        if lr_schedule == "cosine":
            for g in optimizer.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        pending.append((step, torch.stack([loss.detach().float(), gnorm.detach().float()])))
        if len(pending) < check_every and step < steps - 1:
            optimizer.step()              # no read-back: a GPU keeps its queue full
            continue
        values = torch.stack([v for _, v in pending]).tolist()     # one synchronisation
        records, error = [], None
        for (st, _), (value, gn) in zip(pending, values):
            if not math.isfinite(value):
                error = NonFiniteError(f"non-finite {what} {value} at step {st}; last finite "
                                       f"loss {last:.6g}")
            elif not math.isfinite(gn):
                error = NonFiniteError(f"non-finite {what.replace('loss', 'gradient')} at step "
                                       f"{st}; last finite loss {last:.6g}")
            if error is not None:
                break
            last = value
            records.append({"step": st, "loss": value})
        pending.clear()
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
    after every step.

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
    """Minimise the EDM loss (book eq. edm-loss) with :func:`edm_training_loop`; return the
    per-step losses."""
    return [rec["loss"] for rec in edm_training_loop(denoiser, data, steps=steps, **kwargs)]
