"""Exact 1-D expectations by pushing a grid through the deterministic sampler (the grid flow).

Book chapters "Classifier-free guidance and the training discrepancy" and "What guidance
provably does".

Grid flow (book eq. guidance-theory-grid). In 1-D the deterministic sampler is a monotone map
``y = Phi(x)`` of its starting point. Pushing a fine grid ``x_i`` with quadrature weights
``p_start(x_i) dx`` through it gives every expectation ``E[f(Y)] = sum_i w_i f(y_i)`` and the output
density ``q(y_i) = p_start(x_i) / Phi'(x_i)`` without Monte Carlo.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from ._checks import check_finite_float, check_positive_float, check_positive_int
from .edm import _sampler_levels, edm_sampler

__all__ = ["GridFlow", "grid_flow", "grid_density", "grid_kl", "grid_w1"]

class GridFlow(NamedTuple):
    """A 1-D grid pushed through the deterministic sampler (book eq. guidance-theory-grid).

    ``x``: starting grid ``(M,)``; ``y``: where each point lands ``(M,)``; ``weights``:
    quadrature weights ``(M,)`` summing to one; ``log_density``: ``log q(y_i)`` of the output law
    (NaN where the discrete map is not increasing); ``monotone``: whether ``y`` increases.
    """
    x: torch.Tensor
    y: torch.Tensor
    weights: torch.Tensor
    log_density: torch.Tensor
    monotone: bool

    def expect(self, f: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """``E[f(Y)] = sum_i w_i f(y_i)``; ``f`` maps ``(M, 1)`` to ``(M,)``."""
        v = f(self.y[:, None])
        return float((self.weights * v.reshape(-1)).sum())

    def mean(self) -> float:
        return float((self.weights * self.y).sum())

    def var(self) -> float:
        m = self.mean()
        return float((self.weights * (self.y - m) ** 2).sum())

    def entropy(self) -> float:
        """Differential entropy ``-E[log q(Y)]`` (needs a monotone map)."""
        if not self.monotone:
            raise ValueError("the grid map is not monotone: the output density is undefined here")
        return -float((self.weights * self.log_density).sum())


def grid_flow(denoiser, start, *, num_points: int = 4001, width: float = 12.0,
              num_steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 80.0,
              rho: float = 7.0, sigmas=None, heun_denoiser=None, check_finite: bool = True
              ) -> GridFlow:
    """Exact 1-D law of the deterministic EDM sampler (Algorithm edm-sampler, S_churn = 0).

    Args:
        denoiser: ``D(x, sigma)`` accepting float64 ``(M, 1)`` inputs.
        start: the law the sampler starts from at ``t_0`` (normally the class-conditional data
            law, noised to ``sigma_max`` by the method itself): any object with
            ``log_prob(x, sigma)``, ``mean()`` and ``std()`` (a 1-D ``GaussianMixture``,
            ``UniformIntervals`` or ``world.class_world(c)``).
        num_points: grid size ``M``; ``width``: the grid spans ``mean +- width * sqrt(std^2 +
            t_0^2)`` (12 reaches the ``1e-30`` tails that ``E[1/p(c|X)]`` needs).
        check_finite: raise :class:`dgref.NonFiniteError` on non-finite outputs (default);
            with False they are kept (a diverging guidance), and the map is not monotone.

    Starting from the class-conditional noisy marginal instead of ``N(0, t_0^2)`` removes the
    starting-law error; the remaining error is the sampler's own discretisation, which is what
    is being measured. All in float64.
    """
    M = check_positive_int("num_points", num_points)
    if M < 3:
        raise ValueError(f"num_points must be >= 3, got {M}")
    width = check_positive_float("width", width)
    if getattr(start, "dim", 1) != 1:
        raise ValueError(f"grid_flow needs a 1-D start law, got dim={start.dim}")
    for attr in ("log_prob", "mean", "std"):
        if not hasattr(start, attr):
            raise TypeError(f"start must have log_prob(x, sigma), mean() and std(); "
                            f"{type(start).__name__} has no {attr!r}")
    t_steps = _sampler_levels(sigmas, num_steps, sigma_min, sigma_max, rho)
    t0 = t_steps[0]
    m = float(torch.as_tensor(start.mean()).reshape(-1)[0])
    half = width * math.sqrt(start.std() ** 2 + t0 ** 2)
    x = torch.linspace(m - half, m + half, M, dtype=torch.float64)
    logp = start.log_prob(x[:, None], t0)                           # (M,)
    w = torch.softmax(logp, 0)                                      # p dx, normalised
    # the grid starts at t_0 itself: (x / t0) * t0 is what the sampler would form from
    # unit-normal latents x / t0 (bitwise), passed as already scaled.
    y = edm_sampler(denoiser, (x / t0)[:, None] * t0, sigmas=torch.tensor(t_steps),
                    heun_denoiser=heun_denoiser, check_finite=check_finite,
                    latents_scaled=True)[:, 0]
    dy = torch.gradient(y, spacing=(x,))[0]
    monotone = bool((y[1:] > y[:-1]).all()) and bool(torch.isfinite(y).all())
    dx = float(x[1] - x[0])
    log_norm = torch.logsumexp(logp, 0) + math.log(dx)              # Riemann normaliser
    log_q = torch.where(dy > 0, logp - log_norm - torch.log(dy.clamp_min(1e-300)),
                        torch.full_like(y, math.nan))
    return GridFlow(x, y, w, log_q, monotone)


def _trapezoid_log_normaliser(log_density, lo, hi, num_points):
    lo, hi = check_finite_float("lo", lo), check_finite_float("hi", hi)
    if lo >= hi:
        raise ValueError(f"lo must be < hi, got {lo} >= {hi}")
    M = check_positive_int("num_points", num_points)
    if M < 3:
        raise ValueError(f"num_points must be >= 3, got {M}")
    y = torch.linspace(lo, hi, M, dtype=torch.float64)
    lp = log_density(y[:, None]).reshape(-1)
    ww = torch.ones(M, dtype=torch.float64)
    ww[0] = ww[-1] = 0.5
    dy = (hi - lo) / (M - 1)
    log_Z = torch.logsumexp(lp + ww.log(), 0) + math.log(dy)
    return y, lp, ww * dy, float(log_Z)


def grid_density(log_density: Callable[[torch.Tensor], torch.Tensor], lo: float, hi: float,
                 num_points: int = 20001):
    """Normalise a 1-D unnormalised log-density on ``[lo, hi]`` by the trapezoid rule.

    Returns ``(y, log_q, mean, var)`` with ``y`` ``(M,)`` and ``log_q`` the normalised log-density
    (used for the tilted law, book eq. cfg-tilted, by quadrature).
    """
    y, lp, ww, log_Z = _trapezoid_log_normaliser(log_density, lo, hi, num_points)
    log_q = lp - log_Z
    q = log_q.exp() * ww
    mean = float((q * y).sum())
    var = float((q * (y - mean) ** 2).sum())
    return y, log_q, mean, var


def grid_kl(flow: GridFlow, log_target: Callable[[torch.Tensor], torch.Tensor], lo: float,
            hi: float, num_points: int = 20001) -> float:
    """``KL(q || target) = E_q[log q(Y) - log target(Y)]`` (book chapter cfg, eq. cfg-tilted as
    the target) for the grid-flow output ``q`` and an
    unnormalised 1-D target, normalised by quadrature on ``[lo, hi]``; needs a monotone flow."""
    if not isinstance(flow, GridFlow):
        raise TypeError(f"flow must be a dgref.GridFlow, got {type(flow).__name__}")
    if not flow.monotone:
        raise ValueError("the grid map is not monotone: KL needs the output density")
    _, _, _, log_Z = _trapezoid_log_normaliser(log_target, lo, hi, num_points)
    lt = log_target(flow.y[:, None]).reshape(-1) - log_Z
    return float((flow.weights * (flow.log_density - lt)).sum())


def grid_w1(flow: GridFlow, log_target: Callable[[torch.Tensor], torch.Tensor], lo: float,
            hi: float, num_points: int = 20001) -> float:
    """Wasserstein-1 distance ``int |F_q(u) - F_target(u)| du`` (book chapter cfg, trained
    models) on ``[lo, hi]`` between the grid-flow
    output and an unnormalised 1-D target; needs no monotone map (unlike :func:`grid_kl`)."""
    if not isinstance(flow, GridFlow):
        raise TypeError(f"flow must be a dgref.GridFlow, got {type(flow).__name__}")
    u, lp, ww, log_Z = _trapezoid_log_normaliser(log_target, lo, hi, num_points)
    dens = (lp - log_Z).exp()
    du = float(u[1] - u[0])
    F_t = torch.cat([torch.zeros(1, dtype=torch.float64),
                     torch.cumsum(0.5 * (dens[1:] + dens[:-1]) * du, 0)])
    order = torch.argsort(flow.y)
    ys, cw = flow.y[order], torch.cumsum(flow.weights[order], 0)
    idx = torch.searchsorted(ys, u, right=True)                      # points with y <= u
    F_q = torch.where(idx > 0, cw[(idx - 1).clamp_min(0)], torch.zeros_like(u))
    return float(torch.trapezoid((F_q - F_t).abs(), u))
