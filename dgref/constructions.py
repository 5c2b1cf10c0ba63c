"""Why cross-entropy can worsen the divergence (book chapter "ce_failure").

Tools for the chapter's two experiments:

- the oscillation construction ``d = d* + eps * sin(omega . x)`` (book eqs. ce_failure-osc,
  ce_failure-bound, ce_failure-grad-error): excess cross-entropy as a Bernoulli KL in
  logit space, its ``eps**2 / 8`` bound, the closed-form gradient error on a Gaussian mixture,
  and the guided (refined) denoiser whose exact KL we measure;
- the finite-data optimum of both objectives (book eq. ce_failure-empirical): the noised
  empirical distribution of ``N`` training points is a Gaussian mixture with ``N`` components
  of width ``sigma``, so its exact score is closed form;
- a non-uniform sigma grid (:func:`sigma_grid`) for :func:`dgref.ode_log_likelihood`'s
  ``sigmas=``, needed where the guided field is stiff (fast oscillations trap the sampler's
  trajectories).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import (check_finite_float, check_positive_float, check_positive_int,
                      check_tensor)
from .toy import GaussianMixture

__all__ = ["bernoulli_kl_logits", "excess_cross_entropy", "oscillation", "oscillation_correction",
           "oscillation_gradient_error", "oscillation_score_error", "empirical_mixture",
           "sigma_grid"]


def bernoulli_kl_logits(d_true: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``KL(Bern(sigmoid(d_true)) || Bern(sigmoid(d)))`` elementwise (book eq. ce_failure-bound).

    Equals the Bregman divergence of ``softplus`` between the logits,
    ``softplus(d) - softplus(d_true) - sigmoid(d_true) (d - d_true)``, hence lies in
    ``[0, (d - d_true)**2 / 8]`` because ``softplus'' <= 1/4``.
    """
    check_tensor("d_true", d_true)
    check_tensor("d", d)
    delta = d - d_true
    return F.softplus(d) - F.softplus(d_true) - torch.sigmoid(d_true) * delta


def excess_cross_entropy(data: GaussianMixture, model: GaussianMixture, logit, sigma=0.0, *,
                         num_points: int = 100_000, generator=None,
                         dtype=torch.float64) -> tuple[float, float]:
    """Excess cross-entropy of a logit ``d(x, sigma)`` over the optimum, ``(value, se)``.

    Cross-entropy with balanced classes, ``L(d) = 1/2 E_p softplus(-d) + 1/2 E_q softplus(d)``
    (book eq. ce_failure-excess): ``L(d) - L(d*) = E_{(p+q)/2} KL_Bern(d* || d)``, estimated by
    Monte Carlo with ``num_points`` draws of each of ``p_sigma`` and ``q_sigma`` (both densities
    exact, so ``d* = log p_sigma - log q_sigma`` is exact). Bounded by ``E (d - d*)**2 / 8``.
    """
    check_positive_int("num_points", num_points)
    sig = check_positive_float("sigma", sigma, allow_zero=True)
    vals = []
    for mix in (data, model):
        x = mix.sample(num_points, sigma=sig, generator=generator, dtype=dtype)
        s = torch.full((num_points,), sig, dtype=dtype)
        d_star = data.log_prob(x, s) - model.log_prob(x, s)
        with torch.no_grad():
            d = logit(x, s).to(dtype)
        vals.append(bernoulli_kl_logits(d_star, d))
    v = 0.5 * (vals[0] + vals[1])                  # paired: one p draw and one q draw per term
    return float(v.mean()), float(v.std(unbiased=True) / math.sqrt(num_points))


def _omega(omega, dim, like):
    w = torch.as_tensor(omega, dtype=like.dtype, device=like.device).reshape(-1)
    if w.numel() != dim:
        raise ValueError(f"omega must have {dim} entries to match x, got {w.numel()}")
    return w


def _taper(sigma, scale):
    return torch.exp(-0.5 * (sigma / scale) ** 2)


def oscillation(eps: float, omega, scale: float = 1.0):
    """The perturbation ``delta(x, sigma) = eps * sin(omega . x) * exp(-sigma^2 / (2 scale^2))``.

    Returns ``delta(x, sigma) -> (B,)`` (book eq. ce_failure-osc). ``omega`` is a number
    (dim = 1) or a vector of length dim. The Gaussian taper in sigma switches the oscillation
    off smoothly at high noise (a hard window would put a jump into the guided ODE); any
    taper ``<= 1`` keeps ``|delta| <= eps``, hence the cross-entropy bound, at every sigma.
    """
    eps = check_finite_float("eps", eps)
    scale = check_positive_float("scale", scale)

    def delta(x, sigma):
        w = _omega(omega, x.shape[1], x)
        return eps * torch.sin(x @ w) * _taper(sigma, scale)
    return delta


def oscillation_correction(data: GaussianMixture, model: GaussianMixture, eps: float, omega,
                           scale: float = 1.0):
    """Score correction ``grad_x (d* + delta)`` of the oscillating discriminator (exact).

    ``grad d* = score_p - score_q`` (the oracle) plus
    ``eps * omega * cos(omega . x) * exp(-sigma^2 / (2 scale^2))``. With
    :class:`~dgref.ScoreCorrectedDenoiser` around ``model`` and ``w = 1`` the guided denoiser
    is ``D_p + sigma^2 grad delta`` (book eq. ce_failure-guided).
    """
    eps = check_finite_float("eps", eps)
    scale = check_positive_float("scale", scale)

    def correction(x, sigma):
        w = _omega(omega, x.shape[1], x)
        osc = (eps * torch.cos(x @ w) * _taper(sigma, scale))[:, None] * w[None]
        return data.score(x, sigma) - model.score(x, sigma) + osc
    return correction


def oscillation_gradient_error(data: GaussianMixture, eps: float, omega, sigma=0.0,
                               scale: float | None = None) -> float:
    """Closed form of ``E_{p_sigma} |grad delta|^2 = eps^2 |omega|^2 a(sigma)^2 E cos^2(omega . x)``.

    For a mixture ``sum_k pi_k N(mu_k, diag(v_k + sigma^2))``,
    ``E cos^2(omega . x) = (1 + sum_k pi_k exp(-2 omega^T V_k omega) cos(2 omega . mu_k)) / 2``,
    which tends to ``1/2``: at sigma = 0 the gradient error tends to ``eps^2 |omega|^2 / 2``
    (book eq. ce_failure-grad-error). ``a(sigma)`` is the taper of :func:`oscillation`
    (``scale=None``: no taper).
    """
    eps = check_finite_float("eps", eps)
    sig = check_positive_float("sigma", sigma, allow_zero=True)
    w = _omega(omega, data.dim, data.means)
    v = data.variances + sig ** 2                                   # (K, dim)
    damp = torch.exp(-2 * (v * w[None] ** 2).sum(1))                # (K,)
    cos2 = 0.5 * (1 + (data.weights * damp * torch.cos(2 * data.means @ w)).sum())
    a2 = 1.0 if scale is None else math.exp(-(sig / check_positive_float("scale", scale)) ** 2)
    return float(eps ** 2 * (w ** 2).sum() * cos2 * a2)


def oscillation_score_error(data: GaussianMixture, eps: float, omega, scale: float = 1.0, *,
                            sigma_min: float = 0.002, sigma_max: float = 80.0,
                            num_sigmas: int = 4001) -> float:
    """The score-error integral of the oscillation, ``int sigma E_{p_sigma}|grad delta|^2 dsigma``.

    With the guided denoiser ``D_p + sigma^2 grad delta`` the integrand of the KL identity
    (book eq. ce_failure-kl-grad, the KL identity in EDM form: ``E|D_p - D_tilde|^2 / sigma^3``) is
    ``sigma E|grad delta|^2``; trapezoid rule on ``num_sigmas`` uniform nodes in sigma over
    ``[sigma_min, min(sigma_max, 10 scale)]`` (the taper is below ``e^-50`` beyond). For
    large ``|omega|`` it tends to ``eps^2 |omega|^2 scale^2 / 4``. This is what the KL would be
    if the refined model were self-consistent (and it bounds the reverse-SDE sampler's KL).
    """
    hi = min(check_positive_float("sigma_max", sigma_max), 10 * scale)
    s = torch.linspace(check_positive_float("sigma_min", sigma_min), hi,
                       check_positive_int("num_sigmas", num_sigmas), dtype=torch.float64)
    vals = torch.tensor([float(si) * oscillation_gradient_error(data, eps, omega, float(si),
                                                                 scale) for si in s],
                        dtype=torch.float64)
    return float(torch.trapezoid(vals, s))


def empirical_mixture(x: torch.Tensor, width: float = 1e-6) -> GaussianMixture:
    """The empirical distribution of ``x`` ``(N, dim)`` as an ``N``-component mixture.

    Noised at level sigma it is ``1/N sum_i N(x_i, (width^2 + sigma^2) I)`` (book eq.
    ce_failure-empirical), so its exact score and denoiser are those of
    :class:`~dgref.GaussianMixture`; ``width`` only keeps the sigma = 0 case defined.
    """
    check_tensor("x", x, ndim=2, finite=True)
    check_positive_float("width", width)
    n = x.shape[0]
    return GaussianMixture(x.detach().double().cpu(), torch.full((n,), 1.0 / n,
                           dtype=torch.float64), width)


def sigma_grid(sigma_min: float = 0.002, sigma_max: float = 80.0, num_steps: int = 64, *,
               dense=None) -> torch.Tensor:
    """An increasing sigma grid for the ODE likelihood (book chapter ce_failure, eq. ce_failure-osc).

    ``num_steps`` log-uniform steps, merged with extra points.

    ``dense = (lo, hi, n)`` adds ``n`` uniform steps in sigma on ``[lo, hi]`` (for a stiff
    stretch such as an oscillating guidance window); the window ends are always grid points.
    """
    sigma_min = check_positive_float("sigma_min", sigma_min)
    sigma_max = check_positive_float("sigma_max", sigma_max)
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min must be < sigma_max, got {sigma_min} >= {sigma_max}")
    check_positive_int("num_steps", num_steps)
    g = torch.logspace(math.log10(sigma_min), math.log10(sigma_max), num_steps + 1,
                       dtype=torch.float64)
    if dense is not None:
        lo, hi, n = dense
        lo, hi = max(float(lo), sigma_min), min(float(hi), sigma_max)
        if hi > lo:
            g = torch.cat([g, torch.linspace(lo, hi, check_positive_int("dense[2]", n) + 1,
                                             dtype=torch.float64)])
    g = torch.unique(g)                                              # sorted
    keep = torch.cat([torch.tensor([True]), (g[1:] / g[:-1]) > 1 + 1e-12])
    return g[keep]
