"""Pin tests (issue 15): behaviours that realistic one-line bugs broke without any unit test
noticing. Each test compares against an exact reference; the docstring names the planted bug
it was seen to catch (plant the bug, run the test, see it fail, remove the bug).

Only top-level ``dgref`` names are used, so a module move changes nothing here.
"""
import math

import pytest
import torch

import dgref

DT = torch.float64


# --------------------------------------------------------------------------------------------
# The sigma window of a guided denoiser: inclusive edges, full weight inside, sigma^2 scaling
# --------------------------------------------------------------------------------------------
def _field(x, sigma):
    """A correction with no special structure: depends on x and on sigma."""
    return torch.sin(3 * x) + sigma[:, None] * torch.cos(x) + 0.25


class _Counting:
    """Wrap a correction and record the sigmas it was called at."""

    def __init__(self, fn):
        self.fn, self.sigmas = fn, []

    def __call__(self, x, sigma):
        self.sigmas.append(sigma.detach().clone())
        return self.fn(x, sigma)


def _base(x, sigma):
    """A base denoiser with no special structure (so D and the correction never cancel)."""
    return 0.5 * x / (1 + sigma[:, None] ** 2) + 0.1


def _guided_closed_form(x, sigma, w):
    return _base(x, sigma) + w * sigma[:, None] ** 2 * _field(x, sigma)


def _x(n, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=DT)


LO, HI, W = 0.05, 1.3, 2.5


@pytest.mark.parametrize("edge", [LO, HI])
def test_window_edges_are_inclusive(edge):
    """At sigma exactly equal to either edge the guidance is on at full weight; one float step
    outside it is off (the correction is not even called); one step inside it is on.

    Caught plants: ``(sigma > lo) & (sigma < hi)``; ``(sigma >= lo) & (sigma < hi)``;
    ``(sigma > lo) & (sigma <= hi)``.
    """
    x = _x(6)
    corr = _Counting(_field)
    G = dgref.ScoreCorrectedDenoiser(_base, corr, W, window=(LO, HI))
    at = torch.full((6,), edge, dtype=DT)
    torch.testing.assert_close(G(x, at), _guided_closed_form(x, at, W), rtol=0, atol=1e-14)
    outward = 0.0 if edge == LO else math.inf
    inward = HI if edge == LO else LO
    out = torch.full((6,), math.nextafter(edge, outward), dtype=DT)
    calls = len(corr.sigmas)
    assert torch.equal(G(x, out), _base(x, out))
    assert len(corr.sigmas) == calls                   # outside: no correction call at all
    inside = torch.full((6,), math.nextafter(edge, inward), dtype=DT)
    torch.testing.assert_close(G(x, inside), _guided_closed_form(x, inside, W), rtol=0,
                               atol=1e-14)


def test_window_mixed_batch_is_per_row():
    """One batch with levels below, at, inside, at and above the window: each row gets exactly
    D (outside) or D + w sigma^2 c (inside or on an edge).

    Caught plants: ``* mask`` -> ``/ mask``; the mask dropped (guidance on every row once any
    row is inside); an exclusive edge.
    """
    sig = torch.tensor([0.01, LO, 0.4, HI, 7.0], dtype=DT)
    x = _x(5, seed=1)
    G = dgref.ScoreCorrectedDenoiser(_base, _field, W, window=(LO, HI))
    inside = torch.tensor([False, True, True, True, False])
    expect = torch.where(inside[:, None], _guided_closed_form(x, sig, W), _base(x, sig))
    torch.testing.assert_close(G(x, sig), expect, rtol=0, atol=1e-14)


@pytest.mark.parametrize("window", [None, (0.1, 10.0)], ids=["everywhere", "windowed"])
@pytest.mark.parametrize("sigma", [0.3, 2.0, 7.0])
def test_correction_scales_with_sigma_squared_inside_the_window(window, sigma):
    """Inside the window ``D_tilde = D + w sigma^2 c`` exactly, at sigmas away from 1 (where
    sigma, sigma^2 and sigma^3 differ), on both code paths (no window / a window).

    Caught plants: ``sigma ** 2`` -> ``sigma`` in the windowed branch; the weight dropped.
    """
    x = _x(4, seed=2)
    s = torch.full((4,), sigma, dtype=DT)
    G = dgref.ScoreCorrectedDenoiser(_base, _field, W, window=window)
    torch.testing.assert_close(G(x, s), _guided_closed_form(x, s, W), rtol=0, atol=1e-12)
    # The default weight is 1 and the default window is everywhere.
    G1 = dgref.ScoreCorrectedDenoiser(_base, _field)
    torch.testing.assert_close(G1(x, s), _guided_closed_form(x, s, 1.0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_first_sampler_level_sigma_max_is_guided_when_window_ends_there(dtype):
    """The EDM schedule's first level is exactly sigma_max = 80, so a window ending at 80
    guides the first step (and the correction sees the levels of the schedule, Heun's
    included).

    Caught plants: an exclusive upper edge (the first step silently unguided).
    """
    corr = _Counting(lambda x, s: torch.zeros_like(x))
    G = dgref.ScoreCorrectedDenoiser(dgref.ring(), corr, 1.0, window=(0.5, 80.0))
    lat = torch.randn(8, 2, generator=torch.Generator().manual_seed(3), dtype=dtype)
    steps = dgref.edm_sigma_steps(6, 0.002, 80.0, 7.0)
    assert float(steps[0]) == 80.0
    dgref.edm_sampler(G, lat, num_steps=6)
    called = [float(s[0]) for s in corr.sigmas]
    assert called[0] == 80.0
    # every schedule level in [0.5, 80] (Euler and Heun evaluations) and none outside
    levels = [float(t) for t in steps[:-1]]
    expect = [t for t in levels if 0.5 <= t <= 80.0]
    got = sorted(set(called), reverse=True)
    assert got == pytest.approx(expect, rel=1e-6)


# --------------------------------------------------------------------------------------------
# Cross-entropy label convention, checked with the oracle logit
# --------------------------------------------------------------------------------------------
def _gauss_pair_1d():
    """p = N(1, 1) (data, real), q = N(-1, 1) (model, fake)."""
    return (dgref.GaussianMixture([[1.0]], [1.0], 1.0),
            dgref.GaussianMixture([[-1.0]], [1.0], 1.0))


def test_ce_label_convention_with_the_oracle_logit():
    """Real (data) has label 1: ``softplus(-d)`` on real, ``softplus(d)`` on fake.

    Exact per pair (same noise draws): ``ce(-d) - ce(d) = d(x_real) - d(x_fake)`` because
    ``softplus(z) - softplus(-z) = z``. With the oracle ``d* = log p_s/q_s`` its mean is the
    Jeffreys divergence ``J = E_p d* - E_q d* = 4/(1 + s^2)`` here (> 0: the oracle beats its
    negation), and ``ce(d*)`` itself is the population minimum ``2 log 2 - 2 JS(p_s, q_s)``
    (quadrature), both within 4 standard errors.

    Caught plants: real and fake swapped in the softplus terms; ``x_real`` and ``x_fake``
    swapped; ``softplus(d_real) + softplus(-d_fake)``.
    """
    p, q = _gauss_pair_1d()
    n, s = 40_000, 0.5
    xr = p.sample(n, generator=torch.Generator().manual_seed(0), dtype=DT)
    xf = q.sample(n, generator=torch.Generator().manual_seed(1), dtype=DT)
    sig = torch.full((n,), s, dtype=DT)
    d = dgref.oracle_logit(p, q)

    def neg(x, sg):
        return -d(x, sg)

    def ce(logit):
        return dgref.ce_loss(logit, xr, xf, sigma=sig, reduction="none",
                             generator=torch.Generator().manual_seed(2))

    good, bad = ce(d), ce(neg)
    diff = bad - good
    J = 4 / (1 + s ** 2)
    se = float(diff.std()) / math.sqrt(n)
    assert abs(float(diff.mean()) - J) < 4 * se, (float(diff.mean()), J, se)
    # population minimum by quadrature: 2 log 2 - 2 JS(p_s || q_s)
    t = torch.linspace(-15, 15, 200_001, dtype=DT)[:, None]
    lp, lq = p.log_prob(t, s), q.log_prob(t, s)
    lm = torch.logaddexp(lp, lq) - math.log(2)
    js = 0.5 * torch.trapezoid(lp.exp() * (lp - lm) + lq.exp() * (lq - lm), t[:, 0])
    floor = 2 * math.log(2) - 2 * float(js)
    se_g = float(good.std()) / math.sqrt(n)
    assert abs(float(good.mean()) - floor) < 4 * se_g, (float(good.mean()), floor, se_g)


def test_ce_per_pair_values_on_separated_data():
    """Exact per-pair value with a known logit on data that cannot be confused: real points
    near +3, fake near -3, ``d(x) = x``, tiny sigma. Each pair's loss is
    ``softplus(-d(x_real + s n_r)) + softplus(d(x_fake + s n_f))`` with the noise drawn
    real first, fake second from the generator.

    Caught plants: labels swapped (loss ~6 instead of ~0.1); noise drawn for fake first.
    """
    B, s = 5, 1e-3
    xr = torch.full((B, 1), 3.0, dtype=DT) + torch.linspace(0, 0.4, B, dtype=DT)[:, None]
    xf = -xr
    sig = torch.full((B,), s, dtype=DT)

    def d(x, sg):
        return x[:, 0]

    got = dgref.ce_loss(d, xr, xf, sigma=sig, reduction="none",
                        generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    nr = dgref.randn(xr.shape, g, dtype=DT)
    nf = dgref.randn(xf.shape, g, dtype=DT)
    sp = torch.nn.functional.softplus
    expect = sp(-(xr + s * nr)[:, 0]) + sp((xf + s * nf)[:, 0])
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-14)
    assert float(got.max()) < 0.1
    mean = dgref.ce_loss(d, xr, xf, sigma=sig, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(mean, expect.mean(), rtol=0, atol=1e-14)


# --------------------------------------------------------------------------------------------
# gamma * CE is added, per example, to the KL objective
# --------------------------------------------------------------------------------------------
class _Quad(torch.nn.Module):
    """d(x, sigma) = a . x + b |x|^2 / (1 + sigma^2): closed-form gradient, nonzero CE."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([0.7, -0.4], dtype=DT))
        self.b = torch.nn.Parameter(torch.tensor(-0.3, dtype=DT))

    def forward(self, x, sigma):
        return x @ self.a + self.b * (x ** 2).sum(1) / (1 + sigma ** 2)


@pytest.mark.parametrize("weighting", ["kl", "edm"])
def test_gamma_ce_is_added_per_example(weighting):
    """``kl_loss(gamma) = kl_loss(0) + gamma * ce_loss`` for every example, with the same
    draws: ``kl_loss`` draws its noise first, then the CE term draws real then fake noise at
    the same levels. Checked at two gammas (linear in gamma, positive slope).

    Caught plants: ``per - gamma * ce``; ``gamma`` dropped (``per + ce``); the CE term's
    mean added to every example; the CE term at other noise levels than the KL term.
    """
    p = dgref.ring()
    q = p.reweighted(stds=0.3)
    n = 64
    x0 = p.sample(n, generator=torch.Generator().manual_seed(0), dtype=DT)
    xf = q.sample(n, generator=torch.Generator().manual_seed(1), dtype=DT)
    sig = torch.exp(torch.linspace(-3, 2, n, dtype=DT))
    disc = _Quad()
    kw = dict(sigma=sig, weighting=weighting, reduction="none")
    g = torch.Generator().manual_seed(5)
    base = dgref.kl_loss(disc, q, x0, generator=g, **kw)
    ce = dgref.ce_loss(disc, x0, xf, generator=g, sigma=sig, reduction="none")
    assert bool((ce > 0).all()) and float(ce.detach().mean()) > 1   # a real, not negligible, CE term
    for gamma in (0.5, 2.0):
        got = dgref.kl_loss(disc, q, x0, generator=torch.Generator().manual_seed(5),
                            gamma=gamma, x_fake=xf, **kw)
        torch.testing.assert_close(got, base + gamma * ce, rtol=1e-12, atol=1e-12)
    # The mean reduction is the mean of the per-example values.
    mean = dgref.kl_loss(disc, q, x0, generator=torch.Generator().manual_seed(5), gamma=2.0,
                         x_fake=xf, sigma=sig, weighting=weighting)
    torch.testing.assert_close(mean, (base + 2.0 * ce).mean(), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Heun's corrector is second order
# --------------------------------------------------------------------------------------------
S0 = 1.0


def _heun_error(num_steps, smax=20.0, smin=0.1):
    """Max error at sigma = smin of the deterministic sampler on Gaussian data N(0, S0^2).

    The probability-flow ODE ``dx/dsigma = (x - D)/sigma = sigma x / (S0^2 + sigma^2)`` has the
    exact solution ``x(s) = x(smax) sqrt((S0^2 + s^2)/(S0^2 + smax^2))``. The levels are
    geometric from smax to smin, then 0; the state at smin is read before the last (Euler)
    step to 0.
    """
    gauss = dgref.GaussianMixture(torch.zeros(1, 1, dtype=DT), None, S0)
    lat = torch.linspace(-2, 2, 9, dtype=DT)[:, None]
    levels = torch.cat([torch.logspace(math.log10(smax), math.log10(smin), num_steps + 1,
                                       dtype=DT), torch.zeros(1, dtype=DT)])
    steps = list(dgref.edm_sampler_iter(gauss, lat, sigmas=levels))
    assert len(steps) == num_steps + 1
    at_min = steps[-2]
    assert at_min.t_next == pytest.approx(smin, rel=1e-12)
    exact = lat * smax * math.sqrt((S0 ** 2 + smin ** 2) / (S0 ** 2 + smax ** 2))
    # The last step to 0 is one Euler step, which returns D(x; smin) exactly.
    torch.testing.assert_close(steps[-1].x_next, gauss(at_min.x_next, smin), rtol=0,
                               atol=1e-14)
    return float((at_min.x_next - exact).abs().max())


def test_heun_is_second_order():
    """Doubling the steps divides the error by 4 (measured 4.18 and 4.09 at 16 -> 32 -> 64
    steps); a first-order corrector gives 2.

    Caught plants: weights 0.6/0.4 instead of 0.5/0.5 (ratios ~2); the second slope at the
    start point instead of the Euler predictor; Heun's correction skipped.
    """
    e16, e32, e64 = (_heun_error(n) for n in (16, 32, 64))
    assert 3.6 < e16 / e32 < 4.6, (e16, e32)
    assert 3.6 < e32 / e64 < 4.4, (e32, e64)
    assert e64 < 3e-3                      # measured 1.75e-3: the constant is right, too
