"""Exact 1-D laws of the deterministic sampler on a grid (the grid flow).

Book chapters "Classifier-free guidance and the training discrepancy" and "What guidance
provably does" (book eq. guidance-theory-grid). In 1-D the deterministic sampler is a map
``y = Phi(x)`` of its starting point; for a monotone map the output density is
``q(y) = p_start(Phi^{-1}(y)) / Phi'(Phi^{-1}(y))`` and every expectation
``E[f(Y)] = int f(y) q(y) dy`` is computed by quadrature, without Monte Carlo.

Why the output coordinate. The first version of this function pushed a uniform grid of
*starting* points through the sampler and estimated ``E[f(Y)] = sum_i p_start(x_i) dx
f(Phi(x_i))`` (a Riemann sum in the starting coordinate). That sum is accurate only where
``f(Phi(x))`` varies slowly on the scale ``dx`` of the start grid. Near an *unstable* point of
the flow (the separatrix between two modes of a class: for a symmetric two-mode class it is the
class mean, the centre of the start grid) the map ``Phi`` expands by a factor ``Phi' ~ 1e10``
or more: the whole gap between the modes is the image of a start interval far smaller than
``dx``. The Riemann sum then either misses the gap entirely (even ``M``), or puts the full
weight ``p_start(0) dx`` of one grid point on the unstable point itself (odd ``M``; that point
never moves), where ``1 / p(c | y)`` is huge. The result changes by orders of magnitude between
4000 and 4001 points while the map is monotone on the grid.

The fix. Quadrature in the *output* coordinate wherever the start grid does not resolve the
map. For a monotone map the output density is ``q(y) = p_start(Phi^{-1}(y)) / Phi'(Phi^{-1}(y))``
and ``E[f(Y)] = int f(y) q(y) dy``; the integrand ``f q`` is smooth where ``f`` is huge (at
w = 0 it is ``p(y) / p(c)``), so a trapezoid rule on a grid in ``y`` is accurate there. The
output grid is the union of

- the images ``Phi(x_i)`` of the start grid (they resolve the bulk of the output);
- uniformly spaced points (spacing ``h = (max y - min y) / (M - 1)``) inserted into every gap
  between consecutive images wider than ``gap_factor * h``. Each inserted point ``y`` is
  integrated *backwards* through the sampler, one discrete step at a time: step ``k`` is
  inverted by safeguarded Newton inside the bracket given by the two forward trajectories
  whose images enclose ``y`` (monotonicity keeps it there at every level), and
  ``log Phi'`` is the sum of the log-slopes of the step maps along that backward trajectory
  (each slope a central difference of the step map, step ``fd_rel * t_k``). Backwards, the
  unstable point is attracting, so the backward trajectories are well conditioned even where
  the starting points they reach are closer together than float64 can resolve.

Weights: between two adjacent images (a resolved gap) the trapezoid rule in the start
coordinate, ``p_start dx / 2`` to each end, exactly the old weights; across a split gap the
trapezoid rule in ``y`` with ``q``, whose values at the gap's two images use the exact summed
step slopes. Where no gap is split the result is the old one (to ~1e-9).

The result is the exact law of the *discrete* sampler (Euler/Heun steps, as run), not of the
continuous ODE, so coarse-step effects are kept. Diagnostics: ``monotone`` is True only if
every output is finite, the images of the start grid increase strictly, and every step slope
evaluated (at the ends of split gaps, along every backward trajectory, and with
``exact_jacobian=True`` along every forward trajectory) is positive; ``mass`` is the
quadrature of the unnormalised ``q`` (1 up to quadrature error for a monotone, resolved map;
the weights are normalised by it). When the map is not monotone (a diverging guidance with
``check_finite=False``, a fold from coarse steps at large w, or step slopes below the
denoiser's numerical resolution) the output density is undefined: the flow falls back to the
start-grid Riemann sum, with ``monotone=False``, ``method="start"`` and ``log_density`` NaN.
Expectations of bounded ``f`` are still fine there; heavy ones like ``1 / p(c | X)`` are not
to be trusted.

Caveat on the range: the start grid spans ``width`` start standard deviations; the output
range is roughly ``width`` standard deviations of the class law. ``E[1/p(c|X)]`` at w = 0 gets
a contribution ``p(k)/p(c)`` from the region of every other class ``k``, however far away,
so ``width`` must reach all classes (e.g. 20 for five classes 2 apart with std 0.6; 12, the
default, loses 0.9 of the value 5 there).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from ._checks import (NonFiniteError, check_callable, check_finite_float, check_output_shape,
                      check_positive_float, check_positive_int, checked_scope)
from .edm import _sampler_levels

__all__ = ["GridFlow", "grid_flow", "grid_density", "grid_kl", "grid_w1"]


class GridFlow(NamedTuple):
    """The law of the deterministic sampler on a 1-D grid (book eq. guidance-theory-grid).

    ``y``: increasing output grid ``(M',)``; ``x``: the starting point (at ``t_0``) of each
    output point, ``Phi^{-1}(y)``; ``weights``: quadrature weights ``(M',)`` summing to one, so
    ``E[f(Y)] = sum_j weights_j f(y_j)``; ``log_density``: ``log q(y_j)`` of the output law;
    ``monotone``: see the module docstring; ``mass``: ``int q dy`` before normalisation;
    ``method``: ``"output"`` (trapezoid in the output coordinate) or ``"start"`` (fallback
    Riemann sum on the start grid, used only when the map is not monotone; then ``y`` is the
    image of the start grid, unsorted, and ``log_density`` is NaN).
    """
    x: torch.Tensor
    y: torch.Tensor
    weights: torch.Tensor
    log_density: torch.Tensor
    monotone: bool
    mass: float = math.nan
    method: str = "output"

    def expect(self, f: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """``E[f(Y)] = sum_j w_j f(y_j)``; ``f`` maps ``(M', 1)`` to ``(M',)``."""
        v = f(self.y[:, None]).reshape(-1)
        # zero weight times an infinite value is zero mass, not NaN
        return float(torch.where(self.weights > 0, self.weights * v,
                                 torch.zeros_like(v)).sum())

    def mean(self) -> float:
        return float((self.weights * self.y).sum())

    def var(self) -> float:
        m = self.mean()
        return float((self.weights * (self.y - m) ** 2).sum())

    def entropy(self) -> float:
        """Differential entropy ``-E[log q(Y)]`` (needs a monotone map)."""
        if not self.monotone:
            raise ValueError("the grid map is not monotone: the output density is undefined here")
        lq = torch.where(self.weights > 0, self.log_density, torch.zeros_like(self.log_density))
        return -float((self.weights * lq).sum())


class _Steps:
    """The discrete sampler as a list of 1-D step maps ``S_k`` with their slopes."""

    def __init__(self, denoiser, heun_denoiser, t_steps, fd_rel):
        self.D = denoiser
        self.H = denoiser if heun_denoiser is None else heun_denoiser
        self.t = t_steps
        self.fd_rel = fd_rel

    def __call__(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """One step of EDM Algorithm 2 with S_churn = 0 (as :func:`dgref.edm_sampler_iter`)."""
        t, tn = self.t[k], self.t[k + 1]
        xb = x[:, None]
        def level(v):
            return torch.full((x.shape[0],), v, dtype=x.dtype, device=x.device)
        # the levels were checked once (_sampler_levels): skip the denoiser's own sigma checks
        with checked_scope():
            den = self.D(xb, level(t))
        check_output_shape("denoiser", den, xb.shape, "x")
        d = (xb - den) / t
        xe = xb + (tn - t) * d
        if tn > 0:
            with checked_scope():
                den2 = self.H(xe, level(tn))
            check_output_shape("heun_denoiser", den2, xe.shape, "x")
            d2 = (xe - den2) / tn
            xe = xb + (tn - t) * (0.5 * d + 0.5 * d2)
        return xe[:, 0]

    def with_slope(self, k: int, x: torch.Tensor):
        """``S_k(x)`` and ``S_k'(x)`` (central difference of the step map, step fd_rel * t_k)."""
        h = self.fd_rel * self.t[k]
        n = x.shape[0]
        out = self(k, torch.cat([x, x - h, x + h]))
        return out[:n], (out[2 * n:] - out[n:2 * n]) / (2 * h)


def _invert_step(steps: _Steps, k: int, z, lo, hi, s_lo, s_hi, *, max_iter: int = 60):
    """Solve ``S_k(x) = z`` in ``[lo, hi]`` with ``S_k(lo) = s_lo <= z <= s_hi = S_k(hi)``.

    Safeguarded Newton (bisection when a Newton step leaves the bracket). Returns the solution
    and the slope ``S_k'`` there.
    """
    den = s_hi - s_lo
    frac = torch.where(den > 0, (z - s_lo) / torch.where(den > 0, den, torch.ones_like(den)),
                       torch.full_like(z, 0.5)).clamp(0, 1)
    x = lo + frac * (hi - lo)
    slope = torch.full_like(z, math.nan)
    active = torch.ones_like(z, dtype=torch.bool)
    scale = z.abs() + steps.t[k]
    for _ in range(max_iter):
        idx = active.nonzero().flatten()
        if idx.numel() == 0:
            break
        xa = x[idx]
        s, ds = steps.with_slope(k, xa)
        r = s - z[idx]
        slope[idx] = ds
        lo_a = torch.where(r <= 0, xa, lo[idx])
        hi_a = torch.where(r >= 0, xa, hi[idx])
        lo[idx], hi[idx] = lo_a, hi_a
        newton = xa - r / ds
        ok = torch.isfinite(newton) & (newton >= lo_a) & (newton <= hi_a)
        # a Newton step below 1e-7 of the scale leaves an error ~1e-14 (quadratic
        # convergence): accept it without another evaluation
        small = ok & ((newton - xa).abs() <= 1e-7 * scale[idx])
        done = small | (r == 0) | ((hi_a - lo_a) <= 4e-16 * (xa.abs() + steps.t[k]))
        x_new = torch.where(ok, newton, 0.5 * (lo_a + hi_a))
        x[idx] = torch.where(done & ~small, xa, x_new)
        active[idx[done]] = False
    if bool(active.any()):                       # not converged: slope at the final point
        idx = active.nonzero().flatten()
        slope[idx] = steps.with_slope(k, x[idx])[1]
    return x, slope


def check_start_law(start, caller: str, *, optional: bool = False) -> None:
    """``start`` must be a 1-D law with ``log_prob(x, sigma)``, ``mean()`` and ``std()`` (the
    start of :func:`grid_flow` and of :func:`dgref.sde_density.grid_flow_sde`)."""
    if getattr(start, "dim", 1) != 1:
        raise ValueError(f"{caller} needs a 1-D start law, got dim={start.dim}")
    for attr in ("log_prob", "mean", "std"):
        if not hasattr(start, attr):
            what = "be None or have" if optional else "have"
            raise TypeError(f"start must {what} log_prob(x, sigma), mean() and std(); "
                            f"{type(start).__name__} has no {attr!r}")


def grid_flow(denoiser, start, *, num_points: int = 4001, width: float = 12.0,
              num_steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 80.0,
              rho: float = 7.0, sigmas=None, heun_denoiser=None, check_finite: bool = True,
              fd_rel: float = 1e-5, gap_factor: float = 4.0,
              exact_jacobian: bool = False) -> GridFlow:
    """Exact 1-D law of the deterministic EDM sampler (Algorithm edm-sampler, S_churn = 0).

    Args:
        denoiser: ``D(x, sigma)`` accepting float64 ``(B, 1)`` inputs; it must act on each row
            independently (true of every denoiser in dgref).
        start: the law the sampler starts from at ``t_0`` (normally the class-conditional data
            law, noised to ``t_0`` by the method itself): any object with ``log_prob(x, sigma)``,
            ``mean()`` and ``std()`` (a 1-D ``GaussianMixture``, ``UniformIntervals`` or
            ``world.class_world(c)``).
        num_points: start grid size ``M``; the output grid has about ``M`` to ``2M`` points.
        width: the start grid spans ``mean +- width * sqrt(std^2 + t_0^2)`` (12 reaches the
            ``1e-30`` tails that ``E[1/p(c|X)]`` needs).
        heun_denoiser: evaluates Heun's second slope (default ``denoiser``).
        check_finite: raise :class:`dgref.NonFiniteError` on non-finite outputs (default);
            with False they are kept (a diverging guidance) and the flow falls back to the
            start-grid sum with ``monotone=False``.
        fd_rel: relative step (times ``t_k``) of the central difference giving each step's
            slope.
        gap_factor: a gap between consecutive images of the start grid wider than
            ``gap_factor * h`` (``h = (max y - min y) / (M - 1)``) is filled with points
            ``<= h`` apart, integrated backwards. Larger is faster and coarser: 4 keeps
            the result within ~1e-6 of the fully resolved one on the book's worlds.
        exact_jacobian: also evaluate every step's slope along every start-grid trajectory
            (about 3x the forward cost): ``log_density`` is then exact at every point (by
            default it is the grid derivative between resolved images, as before) and
            ``monotone`` certifies every step map along every trajectory.

    See the module docstring for the method. All in float64. Returns a :class:`GridFlow`.
    """
    check_callable("denoiser", denoiser)
    if heun_denoiser is not None:
        check_callable("heun_denoiser", heun_denoiser)
    M = check_positive_int("num_points", num_points)
    if M < 3:
        raise ValueError(f"num_points must be >= 3, got {M}")
    width = check_positive_float("width", width)
    fd_rel = check_positive_float("fd_rel", fd_rel)
    gap_factor = check_positive_float("gap_factor", gap_factor)
    if gap_factor < 1:
        raise ValueError(f"gap_factor must be >= 1, got {gap_factor}")
    check_start_law(start, "grid_flow")
    t_steps = _sampler_levels(sigmas, num_steps, sigma_min, sigma_max, rho)
    t0, N = t_steps[0], len(t_steps) - 1
    m = float(torch.as_tensor(start.mean()).reshape(-1)[0])
    half = width * math.sqrt(start.std() ** 2 + t0 ** 2)
    x0 = torch.linspace(m - half, m + half, M, dtype=torch.float64)
    logp0 = start.log_prob(x0[:, None], t0).reshape(-1)
    steps = _Steps(denoiser, heun_denoiser, t_steps, fd_rel)
    dx = float(x0[1] - x0[0])
    log_norm = torch.logsumexp(logp0, 0) + math.log(dx)            # Riemann normaliser
    logp0 = logp0 - log_norm

    # forward: the trajectories X[k] of the start grid
    X = torch.empty(N + 1, M, dtype=torch.float64)
    X[0] = x0
    with torch.no_grad():
        for k in range(N):
            X[k + 1] = steps(k, X[k])
    y_fwd = X[N]
    finite = bool(torch.isfinite(y_fwd).all())
    if check_finite and not finite:
        raise NonFiniteError(f"the sampler produced {int((~torch.isfinite(y_fwd)).sum())} "
                             "non-finite sample(s); check the denoiser and the guidance weight")
    fallback = GridFlow(x0, y_fwd, torch.softmax(logp0, 0), torch.full_like(y_fwd, math.nan),
                        False, math.nan, "start")
    if not (finite and bool((y_fwd[1:] > y_fwd[:-1]).all())):
        # not monotone: no output density; fall back to the start-grid Riemann sum
        return fallback

    # gaps between consecutive images wider than gap_factor * h are split (spacing <= h)
    h = float(y_fwd[-1] - y_fwd[0]) / (M - 1)
    gaps = y_fwd[1:] - y_fwd[:-1]
    split = gaps > gap_factor * h
    n_ins = torch.where(split, torch.ceil(gaps / h).long() - 1, torch.zeros_like(gaps).long())
    seg = torch.repeat_interleave(torch.arange(M - 1), n_ins)     # gap index of each new point
    first = torch.cumsum(n_ins, 0) - n_ins
    j = torch.arange(seg.numel()) - first[seg] + 1                # 1..n_ins within its gap
    y_new = y_fwd[seg] + gaps[seg] * j / (n_ins[seg] + 1)

    # log Phi' at the images: grid derivative where resolved, exact where a gap is split
    log_jac = torch.log(torch.gradient(y_fwd, spacing=(x0,))[0])
    ends = (torch.arange(M) if exact_jacobian else
            torch.unique(torch.cat([split.nonzero().flatten(), split.nonzero().flatten() + 1])))
    min_slope = math.inf
    with torch.no_grad():
        if ends.numel():
            lj = torch.zeros(ends.numel(), dtype=torch.float64)
            for k in range(N):
                ds = steps.with_slope(k, X[k, ends])[1]
                min_slope = min(min_slope, float(ds.min()))
                lj += torch.log(ds.clamp_min(1e-300))
            log_jac[ends] = lj
        # inserted points: integrate backwards, one discrete step at a time
        z = y_new.clone()
        ljac_new = torch.zeros_like(z)
        if seg.numel() and min_slope > 0:
            for k in range(N - 1, -1, -1):
                z, ds = _invert_step(steps, k, z, X[k, seg].clone(), X[k, seg + 1].clone(),
                                     X[k + 1, seg], X[k + 1, seg + 1])
                min_slope = min(min_slope, float(ds.min()))
                if not min_slope > 0:
                    break
                ljac_new += torch.log(ds)
    if not min_slope > 0:
        # a step map is not increasing (or its slope is not resolved, e.g. a float32 network
        # with too small fd_rel): the output density cannot be certified
        return fallback
    log_q_new = (start.log_prob(z[:, None], t0).reshape(-1) - log_norm - ljac_new
                 if z.numel() else z)

    # merge: image i, then the points inserted in gap i
    key = torch.cat([torch.arange(M, dtype=torch.float64),
                     seg.double() + j.double() / (n_ins[seg].double() + 1)])
    order = torch.argsort(key)
    y = torch.cat([y_fwd, y_new])[order]
    xs = torch.cat([x0, z])[order]
    log_q = torch.cat([logp0 - log_jac, log_q_new])[order]
    p_start = torch.cat([logp0.exp(), torch.zeros_like(z)])[order]
    is_fwd = torch.cat([torch.ones(M, dtype=torch.bool),
                        torch.zeros_like(z, dtype=torch.bool)])[order]
    # quadrature: trapezoid in x between two adjacent images (resolved), in y elsewhere
    q = log_q.exp()
    both = is_fwd[1:] & is_fwd[:-1]
    dy = y[1:] - y[:-1]
    left = torch.where(both, 0.5 * dx * p_start[:-1], 0.5 * dy * q[:-1])
    right = torch.where(both, 0.5 * dx * p_start[1:], 0.5 * dy * q[1:])
    wq = torch.zeros_like(y)
    wq[:-1] += left
    wq[1:] += right
    mass = float(wq.sum())
    monotone = (bool((y[1:] > y[:-1]).all())
                and not bool(torch.isnan(log_q).any()))
    return GridFlow(xs, y, wq / mass, log_q, monotone, mass, "output")


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
    """``KL(q || target) = E_q[log q(Y) - log target(Y)]`` for the grid-flow output ``q`` and an
    unnormalised 1-D target normalised by quadrature on ``[lo, hi]``; needs a monotone flow."""
    if not isinstance(flow, GridFlow):
        raise TypeError(f"flow must be a dgref.gridflow.GridFlow, got {type(flow).__name__}")
    if not flow.monotone:
        raise ValueError("the grid map is not monotone: KL needs the output density")
    _, _, _, log_Z = _trapezoid_log_normaliser(log_target, lo, hi, num_points)
    lt = log_target(flow.y[:, None]).reshape(-1) - log_Z
    return flow.expect(lambda yy: (flow.log_density - lt))


def grid_w1(flow: GridFlow, log_target: Callable[[torch.Tensor], torch.Tensor], lo: float,
            hi: float, num_points: int = 20001) -> float:
    """Wasserstein-1 distance ``int |F_q(u) - F_target(u)| du`` on ``[lo, hi]`` between the
    grid-flow output and an unnormalised 1-D target; needs no monotone map."""
    if not isinstance(flow, GridFlow):
        raise TypeError(f"flow must be a dgref.gridflow.GridFlow, got {type(flow).__name__}")
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
