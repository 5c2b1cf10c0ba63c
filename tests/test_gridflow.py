"""Tests of dgref.gridflow.grid_flow: the exact 1-D law of the deterministic sampler.

The two-mode tests catch the start-grid Riemann sum of the first version (its value changed by
orders of magnitude between 4000 and 4001 points while ``monotone`` said True): each is checked
against direct quadrature of the true law, an independent refined start grid, or Monte Carlo.
"""
import math

import pytest
import torch

from dgref import CFGDenoiser, GaussianMixture, LabelledWorld, edm_sampler, gaussian_pair
from dgref.gridflow import grid_density, grid_flow, grid_kl
from dgref.labelled import three_classes_1d, uniform_classes_1d


def two_mode_world(std=0.5, weights=(0.25, 0.25, 0.5), stds=None):
    """Class 0: modes at -2 and +2 (its mean 0 is the flow's unstable point); class 1 at 0."""
    means = torch.tensor([[-2.0], [2.0], [0.0]], dtype=torch.float64)
    return LabelledWorld(GaussianMixture(means, list(weights), std if stds is None else stds,
                                         labels=[0, 0, 1]))


def inv_p(world, c):
    return lambda y: 1.0 / world.classifier(y, 0.0)[:, c]


def true_expect(world, c, f, lo=-12.0, hi=12.0):
    """E[f(X)] under the class law p(x | c) itself, by quadrature (the sampler's target)."""
    y, lq, _, _ = grid_density(lambda y: world.class_log_prob(y, 0.0)[:, c], lo, hi, 400001)
    return float(torch.trapezoid(lq.exp() * f(y[:, None]).reshape(-1), y))


def reference_flow(denoiser, start, num_points, num_steps, sigma_max=80.0, width=12.0):
    """The old start-grid Riemann sum, correct where the map is resolved by the start grid."""
    t0 = sigma_max
    m = float(torch.as_tensor(start.mean()).reshape(-1)[0])
    half = width * math.sqrt(start.std() ** 2 + t0 ** 2)
    x = torch.linspace(m - half, m + half, num_points, dtype=torch.float64)
    w = torch.softmax(start.log_prob(x[:, None], t0), 0)
    y = edm_sampler(denoiser, x[:, None], num_steps=num_steps, sigma_max=sigma_max,
                    latents_scaled=True)[:, 0]
    return x, y, w


# -- the bug: a class with two modes ------------------------------------------------------------
def test_two_mode_class_reproduces_its_law():
    """Exact class denoiser => the flow samples p(x|c) up to sampler error; E[1/p(c|X)] -> 2."""
    world, c = two_mode_world(0.5), 0
    truth = true_expect(world, c, inv_p(world, c))
    assert abs(truth - 2.0) < 1e-6                      # 1 / p(c), eq. guidance-theory-baseline
    errs = {}
    for N in (128, 256):
        f = grid_flow(world.class_world(c), world.class_world(c), num_points=2001, num_steps=N)
        errs[N] = f.expect(inv_p(world, c)) - truth
        assert f.monotone
        assert abs(f.var() - 4.25) < 3e-3 and abs(f.mean()) < 1e-8
        assert grid_kl(f, lambda y: world.class_log_prob(y, 0.0)[:, c], -12, 12) < 5e-6
    assert 0 < errs[256] < 0.01 * truth                  # 0.35 % at 256 Heun steps
    assert 3.0 < errs[128] / errs[256] < 5.0             # second-order sampler error


def test_two_mode_grid_size_invariance():
    """4000 and 4001 points (the centre point on the unstable point or not) agree tightly."""
    world, c = two_mode_world(0.35), 0
    vals = []
    for M in (4000, 4001):
        f = grid_flow(CFGDenoiser(world, c, 0.0), world.class_world(c), num_points=M,
                      num_steps=32)
        vals.append((f.expect(inv_p(world, c)), f.var(), f.entropy()))
    for a, b in zip(*vals):
        assert abs(a - b) < 1e-5 * abs(a)


def test_asymmetric_two_mode_class():
    """Unequal modes: the unstable point is neither 0 nor the class mean; still exact."""
    world = two_mode_world(weights=(0.15, 0.35, 0.5), stds=torch.tensor([0.4, 0.6, 0.4]))
    c = 0
    f = grid_flow(world.class_world(c), world.class_world(c), num_points=2001, num_steps=256)
    truth = true_expect(world, c, inv_p(world, c))
    assert abs(f.expect(inv_p(world, c)) / truth - 1) < 0.01
    g = grid_flow(world.class_world(c), world.class_world(c), num_points=2000, num_steps=256)
    assert abs(g.expect(inv_p(world, c)) / f.expect(inv_p(world, c)) - 1) < 1e-5


def test_gap_density_against_refined_start_grid():
    """Independent check of the backward integration: a start grid refined geometrically
    around the unstable point 0 (resolvable in float64 there), trapezoid in x."""
    world, c = two_mode_world(0.35), 0
    D, start, N = CFGDenoiser(world, c, 0.0), world.class_world(c), 24
    f = grid_flow(D, start, num_points=2001, num_steps=N)
    u = torch.logspace(-25, math.log10(1000.0), 60001, dtype=torch.float64)
    x = torch.cat([-u.flip(0), torch.zeros(1, dtype=torch.float64), u])
    y = edm_sampler(D, x[:, None], num_steps=N, latents_scaled=True)[:, 0]
    integrand = start.log_prob(x[:, None], 80.0).exp() * inv_p(world, c)(y[:, None])
    ref = float(torch.trapezoid(integrand, x))
    assert abs(f.expect(inv_p(world, c)) / ref - 1) < 1e-3


def test_guided_two_mode_matches_monte_carlo():
    """Guided (w = 1) two-mode flow against the same sampler on Monte Carlo latents."""
    world, c = two_mode_world(0.5), 0
    D = CFGDenoiser(world, c, 1.0)
    f = grid_flow(D, world.class_world(c), num_points=2001, num_steps=32)
    g = torch.Generator().manual_seed(0)
    lat = world.class_sample(c, 40000, 80.0, generator=g, dtype=torch.float64) / 80.0
    xs = edm_sampler(D, lat, num_steps=32)
    n = xs.shape[0]
    for fun in (lambda y: y[:, 0], lambda y: y[:, 0] ** 2, lambda y: (y[:, 0] > 1.0).double(),
                lambda y: world.classifier(y, 0.0)[:, c]):
        v = fun(xs)
        assert abs(f.expect(fun) - float(v.mean())) < 4 * float(v.std()) / math.sqrt(n) + 1e-4


# -- where the bug does not bite: same numbers as the start-grid sum ------------------------------
@pytest.mark.parametrize("world,c,w", [(gaussian_pair(2.0, 0.6), 1, 0.0),
                                       (gaussian_pair(2.0, 0.6), 1, 4.0),
                                       (three_classes_1d(2.0, 0.6), 1, 1.0),
                                       (gaussian_pair(2.0, 0.6, weights=[0.3, 0.7]), 0, 2.0)],
                         ids=["pair-w0", "pair-w4", "three-w1", "unequal-w2"])
def test_agrees_with_start_grid_sum_on_unimodal_classes(world, c, w):
    D = CFGDenoiser(world, c, w)
    f = grid_flow(D, world.class_world(c), num_points=2001, num_steps=64)
    x, y, wt = reference_flow(D, world.class_world(c), 2001, 64)
    for fun in (lambda y: y[:, 0], lambda y: y[:, 0] ** 2, inv_p(world, c),
                lambda y: world.classifier(y, 0.0)[:, c]):
        ref = float((wt * fun(y[:, None])).sum())
        assert abs(f.expect(fun) - ref) < 1e-6 * max(1.0, abs(ref))
    assert f.monotone and abs(f.mass - 1) < 1e-5


def test_forward_images_are_the_sampler_outputs():
    """The output grid contains the sampler's own outputs of the start grid (with a Heun
    denoiser different from the Euler one, i.e. guidance in the Euler slope only)."""
    world, c = gaussian_pair(2.0, 0.6), 1
    D, H = CFGDenoiser(world, c, 2.0), CFGDenoiser(world, c, 0.0)
    f = grid_flow(D, world.class_world(c), num_points=501, num_steps=16, heun_denoiser=H)
    x = torch.linspace(float(f.x.min()), float(f.x.max()), 501, dtype=torch.float64)
    y = edm_sampler(D, x[:, None], num_steps=16, heun_denoiser=H, latents_scaled=True)[:, 0]
    idx = torch.searchsorted(f.x, x).clamp(max=f.x.numel() - 1)
    assert torch.allclose(f.x[idx], x, rtol=0, atol=1e-9)
    assert torch.allclose(f.y[idx], y, rtol=1e-12, atol=1e-12)


def test_uniform_class_and_edge():
    """Compact class: w = 0 reproduces U[0.5, 2]; P(X > 1.9) = 1/15."""
    U = uniform_classes_1d(((-2.0, -0.5), (0.5, 2.0)))
    f = grid_flow(CFGDenoiser(U, 1, 0.0), U.class_world(1), num_points=2001, num_steps=64,
                  sigma_max=10.0)
    assert f.monotone
    assert abs(f.mean() - 1.25) < 1e-4 and abs(f.var() - 1.5 ** 2 / 12) < 1e-3
    assert abs(f.expect(lambda y: (y > 1.9)[:, 0].double()) - 1 / 15) < 1e-3


# -- honest diagnostics ----------------------------------------------------------------------------
def test_folding_map_is_not_monotone():
    """A decreasing step map (D(x) = -x at the last step) is flagged; no density is made up."""
    def D(x, sigma):
        return -x
    start = GaussianMixture(torch.zeros(1, 1, dtype=torch.float64), None, 1.0)
    f = grid_flow(D, start, num_points=101, sigmas=[1.0, 0.0])
    assert not f.monotone and f.method == "start"
    with pytest.raises(ValueError, match="monotone"):
        f.entropy()
    assert abs(f.mean()) < 1e-12 and abs(f.weights.sum() - 1) < 1e-12


def test_diverging_guidance_keeps_non_finite_mass():
    """check_finite=False: non-finite outputs are kept and flagged (old contract)."""
    def D(x, sigma):
        return x * 0 + torch.where(x.abs() > 1, x * 1e308, x)
    start = GaussianMixture(torch.zeros(1, 1, dtype=torch.float64), None, 1.0)
    f = grid_flow(D, start, num_points=101, sigmas=[1.0, 0.5, 0.0], check_finite=False)
    assert not f.monotone
    assert float(f.weights[~torch.isfinite(f.y)].sum()) > 0.01


def test_bad_arguments_raise_named_errors():
    world = gaussian_pair()
    for kw, name in ((dict(num_points=2), "num_points"), (dict(width=-1.0), "width"),
                     (dict(fd_rel=0.0), "fd_rel"), (dict(gap_factor=0.5), "gap_factor")):
        with pytest.raises(ValueError, match=name):
            grid_flow(world.class_world(0), world.class_world(0), **kw)


def test_exact_jacobian_option():
    """exact_jacobian=True: same expectations; the density matches the grid derivative in the
    resolved bulk; on the far-off-support trajectories of a diverging guidance the step slopes
    are not positive and the map is honestly reported as not monotone."""
    world, c = gaussian_pair(2.0, 0.6), 1
    D = CFGDenoiser(world, c, 2.0)
    a = grid_flow(D, world.class_world(c), num_points=1001, num_steps=32)
    b = grid_flow(D, world.class_world(c), num_points=1001, num_steps=32, exact_jacobian=True)
    assert abs(a.expect(inv_p(world, c)) - b.expect(inv_p(world, c))) < 1e-12
    bulk = b.weights > 1e-4
    assert float((a.log_density - b.log_density)[bulk].abs().max()) < 1e-4
    U, cu, eps = uniform_classes_1d(((-2.0, -0.5), (0.5, 2.0))), 1, 0.02

    def blurred(x, sigma, labels):
        s_eps = torch.sqrt(sigma ** 2 + eps ** 2)
        out = x + (sigma ** 2 / s_eps ** 2)[:, None] * (U(x, s_eps, labels) - x)
        return torch.where((labels == U.null_label)[:, None], U(x, sigma, labels), out)
    blurred.null_label = U.null_label
    f = grid_flow(CFGDenoiser(blurred, cu, 4.0), U.class_world(cu), num_points=1001,
                  num_steps=64, sigma_max=10.0, exact_jacobian=True, check_finite=False)
    assert not f.monotone and f.method == "start"
