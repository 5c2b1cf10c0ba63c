"""Tests for dgref.constructions (book chapter ce_failure): closed forms against direct computation."""
import math

import pytest
import torch

import dgref
from dgref.constructions import (bernoulli_kl_logits, empirical_mixture, excess_cross_entropy,
                                 oscillation, oscillation_correction, oscillation_gradient_error,
                                 oscillation_score_error, sigma_grid)


def _pair_1d():
    return (dgref.GaussianMixture([[1.0]], [1.0], 1.0), dgref.GaussianMixture([[-1.0]], [1.0], 1.0))


def test_bernoulli_kl_between_zero_and_quadratic_bound(gen):
    d_true = 6 * torch.randn(10_000, generator=gen, dtype=torch.float64)
    d = d_true + 3 * torch.randn(10_000, generator=gen, dtype=torch.float64)
    kl = bernoulli_kl_logits(d_true, d)
    assert bool((kl >= -1e-12).all())
    assert bool((kl <= (d - d_true) ** 2 / 8 + 1e-12).all())
    # direct formula with probabilities
    p, r = torch.sigmoid(d_true), torch.sigmoid(d)
    direct = p * (p / r).log() + (1 - p) * ((1 - p) / (1 - r)).log()
    mask = (d_true.abs() < 8) & (d.abs() < 8)        # where the direct formula is accurate
    torch.testing.assert_close(kl[mask], direct[mask], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("omega", [0.5, 3.0, 100.0])
def test_excess_ce_of_oscillation_below_eps2_over_8(gen, omega):
    p, q = _pair_1d()
    eps = 0.1
    delta = oscillation(eps, omega)
    dstar = dgref.discriminator.oracle_logit(p, q)
    val, se = excess_cross_entropy(p, q, lambda x, s: dstar(x, s) + delta(x, s),
                                   num_points=50_000, generator=gen)
    assert 0 < val < eps ** 2 / 8
    assert se < 0.05 * val


def test_excess_ce_worked_number(gen):
    # SPEC 4.3: p = N(1,1), q = N(-1,1), eps = 0.1, omega = 100 -> 2.8e-4 (balanced CE)
    p, q = _pair_1d()
    delta = oscillation(0.1, 100.0)
    val, se = excess_cross_entropy(p, q, lambda x, s: p.log_prob(x, s) - q.log_prob(x, s)
                                   + delta(x, s), num_points=100_000, generator=gen)
    # quadrature of the same integral
    x = torch.linspace(-12, 12, 400_001, dtype=torch.float64)[:, None]
    d_star = p.log_prob(x) - q.log_prob(x)
    w = 0.5 * (p.log_prob(x).exp() + q.log_prob(x).exp())
    quad = float(torch.trapezoid(w * bernoulli_kl_logits(d_star, d_star + delta(x, 0.0 * x[:, 0]
                                                                                    + 0.0)),
                                 x[:, 0]))
    assert abs(val - quad) < 4 * se
    assert abs(quad - 2.8e-4) < 0.1e-4


def test_gradient_error_closed_form_matches_monte_carlo(gen):
    p = dgref.ring(num_modes=4, radius=1.0, std=0.3)
    eps, omega, sigma = 0.2, [1.3, -0.7], 0.4
    x = p.sample(200_000, sigma=sigma, generator=gen, dtype=torch.float64)
    x.requires_grad_(True)
    delta = oscillation(eps, omega, scale=2.0)
    s = torch.full((x.shape[0],), sigma, dtype=torch.float64)
    g, = torch.autograd.grad(delta(x, s).sum(), x)
    mc = g.pow(2).sum(1)
    closed = oscillation_gradient_error(p, eps, omega, sigma, scale=2.0)
    assert abs(float(mc.mean()) - closed) < 4 * float(mc.std() / math.sqrt(mc.numel()))
    # and the large-omega limit eps^2 |omega|^2 / 2
    assert oscillation_gradient_error(p, 0.1, [60.0, 80.0]) == pytest.approx(50.0, rel=1e-3)


def test_oscillation_correction_is_gradient_of_perturbed_logit(gen):
    p, q = dgref.ring(4, 1.0, 0.3), dgref.ring(4, 1.0, 0.45)
    x = torch.randn(64, 2, generator=gen, dtype=torch.float64).requires_grad_(True)
    s = torch.full((64,), 0.7, dtype=torch.float64)
    logit = p.log_prob(x, s) - q.log_prob(x, s) + oscillation(0.1, [3.0, 4.0])(x, s)
    g, = torch.autograd.grad(logit.sum(), x)
    c = oscillation_correction(p, q, 0.1, [3.0, 4.0])(x.detach(), s)
    torch.testing.assert_close(c, g, atol=1e-10, rtol=1e-8)


def test_score_error_integral_limit():
    p, _ = _pair_1d()
    # large omega: eps^2 omega^2 scale^2 / 4
    assert oscillation_score_error(p, 0.1, 50.0, 1.0) == pytest.approx(6.25, rel=2e-3)


def test_empirical_mixture_score_formula(gen):
    xs = torch.randn(7, 2, generator=gen, dtype=torch.float64)
    m = empirical_mixture(xs)
    x = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    sigma = 0.3
    logw = -((x[:, None] - xs[None]) ** 2).sum(-1) / (2 * sigma ** 2)     # (5, 7)
    r = torch.softmax(logw, 1)
    score = (r[:, :, None] * (xs[None] - x[:, None])).sum(1) / sigma ** 2
    torch.testing.assert_close(m.score(x, sigma), score, atol=1e-8, rtol=1e-6)
    # its denoiser is the posterior mean of the training points
    torch.testing.assert_close(m.denoise(x, sigma), r @ xs, atol=1e-8, rtol=1e-6)


def test_ode_loglik_on_grid_matches_closed_form(gen):
    p, q = _pair_1d()
    x = q.sample(400, generator=gen, dtype=torch.float64)      # in the bulk of q
    grid = sigma_grid(0.002, 80.0, 128)
    for method, tol in (("exp-heun", 0.003), ("heun", 0.01)):
        ll = dgref.ode_log_likelihood(q, x, sigmas=grid, solver=method)
        # the flow of q's exact denoiser started at N(0, 80^2) is q_{sigma_min} up to a prior
        # error of about x_T / 80^2 per point (zero mean): compare the mean (the KL's bias)
        err = (ll - q.log_prob(x, 0.002)).mean()
        assert abs(float(err)) < tol, method


def test_sigma_grid_contains_dense_window():
    g = sigma_grid(0.002, 80.0, 16, dense=(0.002, 5.0, 100))
    assert float(g[0]) == pytest.approx(0.002) and float(g[-1]) == pytest.approx(80.0)
    assert bool((g[1:] > g[:-1]).all())
    assert int(((g >= 0.05) & (g <= 5.0)).sum()) >= 99


def test_bad_arguments_raise():
    p, q = _pair_1d()
    with pytest.raises(ValueError, match="solver"):
        dgref.ode_log_likelihood(q, torch.zeros(3, 1), sigmas=sigma_grid(), solver="rk5")
    with pytest.raises(ValueError, match="sigmas"):
        dgref.ode_log_likelihood(q, torch.zeros(3, 1), sigmas=torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="scale"):
        oscillation(0.1, 1.0, scale=0.0)
    with pytest.raises(ValueError, match="omega"):
        oscillation(0.1, [1.0, 2.0])(torch.zeros(3, 1), torch.ones(3))


def test_oscillation_and_its_correction_share_one_gaussian_taper(gen):
    # kl_argument and ce_failure use the same construction: delta = eps sin(omega.x) a(sigma),
    # a(sigma) = exp(-sigma^2 / (2 s^2)), and the correction adds exactly grad delta.
    p = dgref.ring()
    q = p.reweighted(weights=torch.tensor([3.0, 1.0] * 4) / 16, stds=0.22)
    eps, omega, s = 0.1, [5.0, 0.0], 0.7
    x = 2 * torch.randn(64, 2, generator=gen, dtype=torch.float64)
    w = torch.tensor(omega, dtype=torch.float64)
    oracle = dgref.oracle_correction(p, q)
    for sig in (0.0, 0.3, 1.0, 3.0):
        sigma = torch.full((64,), sig, dtype=torch.float64)
        taper = math.exp(-sig ** 2 / (2 * s ** 2))
        torch.testing.assert_close(oscillation(eps, omega, s)(x, sigma),
                                   eps * torch.sin(x @ w) * taper, rtol=1e-12, atol=1e-15)
        corr = oscillation_correction(p, q, eps, omega, s)(x, sigma) - oracle(x, sigma)
        torch.testing.assert_close(corr, (eps * torch.cos(x @ w) * taper)[:, None] * w[None],
                                   rtol=1e-9, atol=1e-12)
