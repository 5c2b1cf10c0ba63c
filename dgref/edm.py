"""The EDM core (Karras et al. 2022) written from the paper's equations, and both samplers.

Book chapter "Diffusion in the EDM form, step by step": preconditioning (eq. edm-precond),
the training loss and its weight (eq. edm-loss), the time steps (eq. edm-steps), the
deterministic sampler with optional churn (Algorithm 2), and the reverse-SDE sampler (book eq.
guidance-theory-sde). The factories :func:`mlp_denoiser` and :func:`conditional_mlp_denoiser`
put a network of :mod:`dgref.nets` inside the preconditioning.

A *denoiser* is any callable ``D(x, sigma) -> x0_hat`` with ``x`` of shape ``(B, ...)`` and
``sigma`` of shape ``(B,)``. Guidance of every kind is a denoiser wrapping another one, so the
sampler below never changes.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, NamedTuple

import torch
from torch import nn

from ._checks import (NonFiniteError, check_callable, check_finite_float, check_output_shape,
                      check_positive_float, check_positive_int, check_sigma, check_tensor,
                      checked_scope)
from ._progress import progress_bar
from ._util import bcast as _bcast
from ._util import optional_device, split_extra_args
from .nets import MLP, ConditionalMLP
from .rng import randn

__all__ = ["edm_precond_coeffs", "EDMPrecond", "edm_loss_weight", "edm_loss",
           "edm_sample_sigmas", "edm_sigma_steps", "SamplerStep", "edm_sampler_iter",
           "edm_sampler", "edm_sde_sampler", "mlp_denoiser", "conditional_mlp_denoiser"]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def edm_precond_coeffs(sigma: torch.Tensor, sigma_data: float = 0.5):
    """The four preconditioning coefficients of EDM (Karras et al. 2022, Table 1; book eq. edm-precond).

    Returns ``(c_skip, c_out, c_in, c_noise)``, each of ``sigma``'s shape:
    ``c_skip = sd^2/(s^2+sd^2)``, ``c_out = s sd/sqrt(s^2+sd^2)``, ``c_in = 1/sqrt(s^2+sd^2)``,
    ``c_noise = log(s)/4``.
    """
    check_positive_float("sigma_data", sigma_data)
    return _precond_coeffs(check_sigma("sigma", sigma), sigma_data)


def _precond_coeffs(sigma: torch.Tensor, sigma_data: float):
    """:func:`edm_precond_coeffs` without re-checking inputs that the caller has checked."""
    denom = sigma ** 2 + sigma_data ** 2
    c_skip = sigma_data ** 2 / denom
    c_out = sigma * sigma_data / denom.sqrt()
    c_in = 1 / denom.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)`` around a raw network ``F`` (book eq. edm-precond).

    ``F(x_in, c_noise, *args, **kwargs)`` takes the scaled input and ``c_noise`` of shape
    ``(B,)``; extra positional and keyword arguments (e.g. ``labels`` or ``class_labels``) are
    passed through.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = check_positive_float("sigma_data", sigma_data)

    def forward(self, x: torch.Tensor, sigma, *args, **kwargs) -> torch.Tensor:
        check_tensor("x", x, min_ndim=2)
        param = next(self.net.parameters(), None)
        if param is not None and (param.device != x.device or param.dtype != x.dtype):
            raise ValueError(f"x is {x.dtype} on {x.device} but the network's parameters are "
                             f"{param.dtype} on {param.device}; expected the same dtype and "
                             "device (use .to())")
        sigma = check_sigma("sigma", sigma, x.shape[0], like=x)
        c_skip, c_out, c_in, c_noise = _precond_coeffs(sigma, self.sigma_data)
        with checked_scope():
            f = self.net(_bcast(c_in, x) * x, c_noise, *args, **kwargs)
        check_output_shape("the network", f, x.shape)
        return _bcast(c_skip, x) * x + _bcast(c_out, x) * f


def edm_sample_sigmas(batch: int, *, P_mean: float = -1.2, P_std: float = 1.2,
                      generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Training noise levels ``ln sigma ~ N(P_mean, P_std^2)``, shape ``(batch,)``.

    The noise distribution of the EDM loss (Karras et al. 2022, sec. 5; book eq. edm-loss).
    """
    check_positive_int("batch", batch)
    check_finite_float("P_mean", P_mean)
    check_positive_float("P_std", P_std)
    z = randn((batch,), generator, dtype=dtype, device=device)
    return (P_mean + P_std * z).exp()


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """The EDM loss weight ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``
    (book eq. edm-loss), of ``sigma``'s shape: ``1 / c_out^2``, so that the network's own
    target has unit weight. Shared by :func:`edm_loss`, :func:`dgref.cfg_loss` and
    :func:`dgref.kl_loss` (its EDM weighting)."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def edm_loss(denoiser: Denoiser, x0: torch.Tensor, *, sigma_data: float = 0.5,
             P_mean: float = -1.2, P_std: float = 1.2, generator=None,
             sigma: torch.Tensor | None = None, reduction: str = "mean", extra_args=()
             ) -> torch.Tensor:
    """The EDM training loss (book eq. edm-loss).

    ``lambda(sigma) |D(x0 + sigma n; sigma) - x0|^2`` with ``ln sigma ~ N(P_mean, P_std^2)`` and
    ``lambda = (sigma^2 + sigma_data^2)/(sigma sigma_data)^2``; summed over data dimensions,
    averaged over the batch (``reduction="none"`` returns the per-example ``(B,)`` values).
    Pass ``sigma`` to fix the noise levels instead of sampling them. ``extra_args`` go to the
    denoiser after ``sigma``: a tuple (positional) or a dict (keyword conditioning).
    """
    check_callable("denoiser", denoiser)
    check_tensor("x0", x0, min_ndim=2)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    B = x0.shape[0]
    if sigma is None:
        sigma = edm_sample_sigmas(B, P_mean=P_mean, P_std=P_std, generator=generator,
                                  device=x0.device, dtype=x0.dtype)
    else:
        sigma = check_sigma("sigma", sigma, B, like=x0)
    n = randn(x0.shape, generator, dtype=x0.dtype, device=x0.device)
    x = x0 + _bcast(sigma, x0) * n
    weight = edm_loss_weight(sigma, sigma_data)
    args, kwargs = split_extra_args(extra_args)
    with checked_scope():
        out = denoiser(x, sigma, *args, **kwargs)
    err = (check_output_shape("denoiser", out, x0.shape, "x0") - x0) ** 2
    per_example = weight * err.flatten(1).sum(1)
    return per_example.mean() if reduction == "mean" else per_example


def edm_sigma_steps(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
                    rho: float = 7.0, *, device=None, dtype=torch.float64) -> torch.Tensor:
    """EDM time steps (Karras et al. 2022, eq. 5; book eq. edm-steps), with ``t_N = 0`` appended.

    ``t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`` for
    ``i = 0..N-1``; returns ``N + 1`` values, strictly decreasing from ``sigma_max`` to 0.
    With ``num_steps = 1`` the single step goes from ``sigma_max`` straight to 0.
    """
    N = check_positive_int("num_steps", num_steps)
    sigma_min = check_positive_float("sigma_min", sigma_min)
    sigma_max = check_positive_float("sigma_max", sigma_max)
    rho = check_positive_float("rho", rho)
    if sigma_min >= sigma_max and N > 1:
        raise ValueError(f"sigma_min must be < sigma_max, got {sigma_min} >= {sigma_max}")
    i = torch.arange(N, dtype=torch.float64)
    frac = i / (N - 1) if N > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    t = (hi + frac * (lo - hi)) ** rho
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    return t.to(device=optional_device(device), dtype=dtype)


def _sampler_levels(sigmas, num_steps, sigma_min, sigma_max, rho) -> list[float]:
    """The sampler's levels as host floats (no device syncs in the loop): the rho-schedule of
    :func:`edm_sigma_steps`, or ``sigmas`` checked to be strictly decreasing, positive and
    ending in 0."""
    if sigmas is None:
        return [float(t) for t in edm_sigma_steps(num_steps, sigma_min, sigma_max, rho)]
    s = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    if s.ndim == 1 and not bool(torch.isfinite(s).all()):
        raise ValueError(f"sigmas must be finite, got {int((~torch.isfinite(s)).sum())} "
                         "non-finite level(s) (NaN or inf)")
    if s.ndim != 1 or s.numel() < 2 or float(s[-1]) != 0.0 or bool((s[1:] >= s[:-1]).any()) \
            or float(s[-2]) <= 0:
        raise ValueError("sigmas must be a strictly decreasing 1-D sequence of positive levels "
                         "ending in 0")
    return [float(t) for t in s]


_LATENT_MAX = 8.0


def _check_latents(latents, latents_scaled):
    if not isinstance(latents_scaled, bool):
        raise TypeError(f"latents_scaled must be True or False, got {latents_scaled!r}")
    if latents_scaled:
        return
    top = float(latents.detach().abs().max())
    if not top <= _LATENT_MAX:            # NaN fails too
        raise ValueError(
            f"latents must be unit-normal (the sampler multiplies them by sigma_max), but "
            f"max |latents| = {top:.4g} > {_LATENT_MAX:g}: they look pre-scaled (or are not "
            "finite). Pass unit-normal latents, or latents_scaled=True for latents already "
            "at the first level")


class SamplerStep(NamedTuple):
    """One step of the sampler: ``t_cur -> t_hat -> t_next`` and the states it passed through."""
    i: int
    t_cur: float
    t_hat: float
    t_next: float
    x_hat: torch.Tensor      # state after churn, at t_hat
    denoised: torch.Tensor   # D(x_hat; t_hat)
    x_next: torch.Tensor     # state at t_next


def churn_gamma(t: float, num_steps: int, S_churn: float, S_min: float, S_max: float) -> float:
    """EDM Algorithm 2's churn at level ``t``: ``min(S_churn / N, sqrt(2) - 1)`` for ``t`` in
    ``[S_min, S_max]``, else 0; the step then starts at ``t_hat = (1 + gamma) t``. The one place
    the rule lives (:func:`edm_sampler_iter`, and the laws that replay it in
    :mod:`dgref.sde_density` and :mod:`dgref.sde_kl`)."""
    return min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t <= S_max else 0.0


def edm_sampler_iter(denoiser: Denoiser, latents: torch.Tensor, *, num_steps: int = 18,
                     sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                     S_churn: float = 0.0, S_min: float = 0.0, S_max: float = math.inf,
                     S_noise: float = 1.0, generator=None, heun_denoiser: Denoiser | None = None,
                     sigmas: torch.Tensor | None = None, progress: bool | None = None,
                     extra_args=(), latents_scaled: bool = False) -> Iterator[SamplerStep]:
    """EDM Algorithm 2 as a generator of :class:`SamplerStep` (book: Algorithm edm-sampler).

    ``latents`` are unit-normal ``(B, ...)``; the chain starts at ``x = t_0 * latents``
    (``t_0 = sigma_max``, or ``sigmas[0]``): do not scale them yourself. A batch whose largest
    ``|latent|`` exceeds 8 (about ``1e-15`` per entry for a unit normal) is taken for
    pre-scaled latents and rejected (one read-back, here at the start). Latents already at
    ``t_0`` (k-diffusion's convention, ``x = randn * sigmas[0]``) are passed with
    ``latents_scaled=True``: the chain then starts at ``x = latents``. Each
    step optionally adds churn noise (``S_churn > 0``, within ``[S_min, S_max]``), takes an
    Euler step with the slope ``(x - D(x; t))/t``, and, unless the next level is 0, corrects it
    with Heun's second slope. ``heun_denoiser`` (default: ``denoiser``) evaluates that second
    slope: passing the unguided model there applies a guidance at the Euler slope only.
    ``sigmas`` overrides the rho-schedule (a decreasing sequence ending in 0). ``extra_args``
    go to every denoiser call after ``sigma``: a tuple (positional, ``D(x, sigma, labels)``) or
    a dict (keyword conditioning as k-diffusion's ``extra_args``,
    ``D(x, sigma, class_labels=c)``).
    """
    check_callable("denoiser", denoiser)
    if heun_denoiser is not None:
        check_callable("heun_denoiser", heun_denoiser)
    check_tensor("latents", latents, min_ndim=2)
    for name, val in (("S_churn", S_churn), ("S_min", S_min), ("S_noise", S_noise)):
        check_positive_float(name, val, allow_zero=True)
    check_positive_float("S_max", S_max, allow_zero=True, allow_inf=True)
    t_steps = _sampler_levels(sigmas, num_steps, sigma_min, sigma_max, rho)
    _check_latents(latents, latents_scaled)
    args, kwargs = split_extra_args(extra_args)
    N = len(t_steps) - 1
    heun = denoiser if heun_denoiser is None else heun_denoiser
    B = latents.shape[0]
    dtype, device = latents.dtype, latents.device

    def level(t):
        return torch.full((B,), t, dtype=dtype, device=device)

    x_next = latents if latents_scaled else latents * t_steps[0]
    for i in progress_bar(range(N), desc="sampling", progress=progress):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        x_cur = x_next
        # Churn: raise the noise level from t_cur to t_hat by adding fresh noise.
        gamma = churn_gamma(t_cur, N, S_churn, S_min, S_max)
        t_hat = t_cur * (1 + gamma)
        if gamma > 0:
            eps = randn(x_cur.shape, generator, dtype=dtype, device=device)
            x_hat = x_cur + math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise * eps
        else:
            x_hat = x_cur
        # Euler step. The levels were checked once above: the denoiser's own sigma checks
        # are skipped (checked_scope), and its output shape is checked (no broadcasting).
        with checked_scope():
            denoised = denoiser(x_hat, level(t_hat), *args, **kwargs)
        check_output_shape("denoiser", denoised, x_hat.shape, "x")
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        # Heun correction (second order), skipped on the last step to sigma = 0.
        if t_next > 0:
            with checked_scope():
                den2 = heun(x_next, level(t_next), *args, **kwargs)
            check_output_shape("heun_denoiser" if heun_denoiser is not None else "denoiser",
                               den2, x_next.shape, "x")
            d_prime = (x_next - den2) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        yield SamplerStep(i, t_cur, t_hat, t_next, x_hat, denoised, x_next)




def edm_sampler(denoiser: Denoiser, latents: torch.Tensor, *, callback=None,
                check_finite: bool = True, **kwargs) -> torch.Tensor:
    """Run EDM Algorithm 2 to the end and return the samples (book: Algorithm edm-sampler).

    Takes the arguments of :func:`edm_sampler_iter`; ``callback(step)`` sees every
    :class:`SamplerStep`. Gradients are not tracked unless a guidance asks for them itself.
    Raises :class:`dgref.NonFiniteError` when samples come out NaN or infinite
    (``check_finite=False`` returns them anyway).
    """
    x = None
    with torch.no_grad():
        for step in edm_sampler_iter(denoiser, latents, **kwargs):
            if callback is not None:
                callback(step)
            x = step.x_next
    if check_finite:
        bad = ~torch.isfinite(x.flatten(1)).all(1)
        if bool(bad.any()):
            raise NonFiniteError(f"the sampler produced {int(bad.sum())} non-finite sample(s) "
                                 f"out of {x.shape[0]}; check the denoiser and the guidance "
                                 "weight")
    return x


_SDE_METHODS = ("euler_maruyama", "ancestral")


def sde_step_kernel(method: str, x, D, t: float, tn: float):
    """One noisy step ``t -> tn > 0`` of :func:`edm_sde_sampler` as a Gaussian kernel: returns
    ``(mean, std)`` with ``x' = mean + std * z``, ``D = D(x; t)`` (book eq.
    guidance-theory-sde). The one place these formulas live: the sampler, and the laws that
    replay it (:mod:`dgref.sde_density`, :mod:`dgref.sde_kl`), call it.

    - ``"euler_maruyama"``: ``mean = x + 2 (t - tn)/t (D - x)``, ``std = sqrt(2 t (t - tn))``;
    - ``"ancestral"``: ``mean = D + r (x - D)``, ``std = tn sqrt(1 - r)``, ``r = (tn/t)^2``.
    """
    if method == "euler_maruyama":
        return x + 2 * (t - tn) / t * (D - x), math.sqrt(2 * t * (t - tn))
    r = (tn / t) ** 2
    return D + r * (x - D), tn * math.sqrt(1 - r)


def edm_sde_sampler(denoiser, latents: torch.Tensor, *, num_steps: int = 64,
                    sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                    sigmas=None, method: str = "euler_maruyama", generator=None,
                    extra_args=(), progress: bool | None = None, check_finite: bool = True,
                    latents_scaled: bool = False) -> torch.Tensor:
    """Sample the reverse SDE (book eq. guidance-theory-sde) with any denoiser ``D(x, sigma)``.

    With ``x_sigma = x0 + sigma n`` the forward process is ``dx = sqrt(2 sigma) dW`` in the
    "time" sigma; its reverse, run from ``sigma_max`` down to 0, is
    ``dx = -2 sigma grad log p_sigma(x) dsigma + sqrt(2 sigma) dW_bar`` with
    ``grad log p_sigma(x) = (D(x; sigma) - x) / sigma^2``: the same marginals as the
    probability-flow ODE that :func:`edm_sampler` integrates.

    Steps run over the EDM levels ``t_0 > ... > t_{N-1} > t_N = 0`` (``sigmas`` overrides them);
    ``x = t_0 * latents`` at the start (unit-normal latents; ``latents_scaled`` and
    ``extra_args`` as in :func:`edm_sampler_iter`). For each step ``t -> t' > 0``:

    - ``"euler_maruyama"``: ``x += 2 (t - t')/t (D(x; t) - x) + sqrt(2 t (t - t')) z``;
    - ``"ancestral"``: ``x = D + (t'/t)^2 (x - D) + t' sqrt(1 - (t'/t)^2) z`` (the exact
      Gaussian bridge around the point ``D``, a stable discretisation of the same SDE).

    The last step to ``t_N = 0`` returns ``D(x; t_{N-1})`` (no noise). ``generator`` draws all
    the noise. Runs without autograd (a guidance that needs it enables it itself).
    """
    check_callable("denoiser", denoiser)
    check_tensor("latents", latents, min_ndim=2)
    if method not in _SDE_METHODS:
        raise ValueError(f"method must be one of {_SDE_METHODS}, got {method!r}")
    t_steps = _sampler_levels(sigmas, num_steps, sigma_min, sigma_max, rho)
    _check_latents(latents, latents_scaled)
    args, kwargs = split_extra_args(extra_args)
    B, dtype, device = latents.shape[0], latents.dtype, latents.device
    x = latents if latents_scaled else latents * t_steps[0]
    with torch.no_grad():
        for i in progress_bar(range(len(t_steps) - 1), desc="sde", progress=progress):
            t, tn = t_steps[i], t_steps[i + 1]
            with checked_scope():
                D = denoiser(x, torch.full((B,), t, dtype=dtype, device=device), *args, **kwargs)
            check_output_shape("denoiser", D, x.shape, "x")
            if tn == 0.0:
                x = D
                break
            z = randn(x.shape, generator, dtype=dtype, device=device)
            mean, std = sde_step_kernel(method, x, D, t, tn)
            x = mean + std * z
    if check_finite and not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"the SDE sampler produced {int((~torch.isfinite(x)).sum())} "
                             "non-finite values; check the denoiser and the guidance weight")
    return x


# ---------------------------------------------------------------------------------------------
# Factories: a network of dgref.nets inside the preconditioning
# ---------------------------------------------------------------------------------------------
def mlp_denoiser(dim: int, sigma_data: float, hidden: int = 256, depth: int = 3, *,
                 generator=None) -> EDMPrecond:
    """An MLP inside the EDM preconditioning (book eq. edm-precond): a denoiser ``D(x, sigma)``
    for ``dim``-dimensional data. ``generator`` draws the initial weights (default: torch's
    global generator)."""
    return EDMPrecond(MLP(dim, hidden, depth, generator=generator), sigma_data)


def conditional_mlp_denoiser(dim: int, num_classes: int, sigma_data: float, hidden: int = 128,
                             depth: int = 3, *, generator=None) -> EDMPrecond:
    """An EDM-preconditioned :class:`dgref.nets.ConditionalMLP` (book eq. edm-precond with a
    label): ``D(x, sigma, labels)``; the null label is ``num_classes``. ``generator`` draws the
    initial weights (default: torch's global generator)."""
    pre = EDMPrecond(ConditionalMLP(dim, num_classes, hidden, depth, generator=generator),
                     sigma_data)
    pre.null_label = num_classes
    return pre
