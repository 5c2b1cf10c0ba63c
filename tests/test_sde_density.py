"""Tests of dgref.sde_density (exact 1-D laws of the stochastic samplers), against closed forms,
the package samplers (replay and Kolmogorov-Smirnov) and dgref.gridflow."""
import math

import pytest
import torch

import dgref
import dgref.gridflow
import dgref.likelihood
from dgref.constructions import oscillation_correction, oscillation_score_error

from dgref.sde_density import (GridDensity, bin_masses, gaussian_sampler_law, grid_flow_sde, grid_kl_from,
                     ode_kl_1d, sampler_transitions, score_error_integral_1d, transfer)



# --- worlds and closed-form fields (test fixtures) ---------------------------------------
def gaussian_pair():
    """ce_failure's 1-D pair: data N(1, 1), model N(-1, 1) (KL(p || q) = 2)."""
    return dgref.GaussianMixture([[1.0]], [1.0], 1.0), dgref.GaussianMixture([[-1.0]], [1.0], 1.0)


def three_modes():
    """A 1-D mixture with unequal modes, and a model with wrong weights and widths."""
    p = dgref.mixture_1d((-2.0, 0.5, 2.5), (0.3, 0.6, 0.4), (0.3, 0.5, 0.2))
    q = dgref.mixture_1d((-2.0, 0.5, 2.5), (0.45, 0.5, 0.6), (0.5, 0.3, 0.2))
    return p, q


def oscillating(p, q, eps, omega, scale=1.0):
    """``D_q + sigma^2 grad(d* + eps sin(omega x) exp(-sigma^2/(2 scale^2)))`` (ce_failure eq. osc)."""
    return dgref.ScoreCorrectedDenoiser(q, oscillation_correction(p, q, eps, omega, scale), 1.0)


def oracle_weighted(p, q, w):
    """``D_q + w (D_p - D_q)``: oracle guidance at weight ``w`` (self-consistent only for w = 0, 1)."""
    return dgref.ScoreCorrectedDenoiser(q, dgref.oracle_correction(p, q), w)


def oscillating_field_gauss(eps, omega, scale=1.0, mu=1.0, var=1.0):
    """``(D, div D)`` in closed form for :func:`oscillating` on a single-Gaussian data law.

    ``D = D_p + sigma^2 eps omega cos(omega x) a(sigma)``, ``D_p = mu + var/(var + sigma^2)(x - mu)``.
    """
    def field(x, sigma):
        s2 = sigma[:, None] ** 2
        a = torch.exp(-0.5 * s2 / scale ** 2)
        D = mu + var / (var + s2) * (x - mu) + s2 * eps * omega * torch.cos(omega * x) * a
        div = (var / (var + s2) - s2 * eps * omega ** 2 * torch.sin(omega * x) * a).sum(1)
        return D, div
    return field


def ks_test(samples: torch.Tensor, cdf) -> tuple[float, float]:
    """Kolmogorov-Smirnov statistic of 1-D ``samples`` against a CDF callable, and its p-value."""
    x, _ = torch.sort(samples.reshape(-1).double())
    n = x.numel()
    F = cdf(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = float(torch.maximum(i / n - F, F - (i - 1) / n).max())
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    pval = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return d, min(max(pval, 0.0), 1.0)


def mixture_field(mix):
    """``(D, div D)`` of a 1-D mixture's exact denoiser: ``D' = Var(x0 | x) / sigma^2`` (Tweedie)."""
    def field(x, sigma):
        s2 = sigma[:, None] ** 2                                        # (B, 1)
        mu, v = mix.means[:, 0][None], mix.variances[:, 0][None]         # (1, K)
        r = mix.posterior(x, sigma)                                      # (B, K)
        m = mu + v / (v + s2) * (x - mu)                                 # E[x0 | x, k]
        D = (r * m).sum(1, keepdim=True)
        second = (r * (v * s2 / (v + s2) + m * m)).sum(1)
        return D, (second - D[:, 0] ** 2) / s2[:, 0]
    return field


def oracle_weighted_field(p, q, w):
    """``(D, div D)`` of :func:`oracle_weighted` (``D_q + w (D_p - D_q)``) in closed form."""
    fp, fq = mixture_field(p), mixture_field(q)

    def field(x, sigma):
        Dp, dp = fp(x, sigma)
        Dq, dq = fq(x, sigma)
        return Dq + w * (Dp - Dq), dq + w * (dp - dq)
    return field


f64 = torch.float64
SAMPLERS = [
    ("euler_maruyama", {}),
    ("ancestral", {}),
    ("heun_churn", dict(S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003)),
    ("heun_churn", {}),                                   # the deterministic sampler
]


def normal(mean, var):
    return dgref.GaussianMixture([[mean]], [1.0], math.sqrt(var))


# --- closed form: Gaussian data, exact denoiser -> every sampler's law is Gaussian -----------
@pytest.mark.parametrize("sampler,kw", SAMPLERS)
@pytest.mark.parametrize("from_data", [False, True])
def test_gaussian_world_matches_exact_discrete_law(sampler, kw, from_data):
    mu0, var0 = 1.0, 0.49
    p = normal(mu0, var0)
    start = p if from_data else None
    g = grid_flow_sde(p, start, sampler=sampler, num_steps=24, num_points=600, data=p, **kw)
    sv = (var0 + 80.0 ** 2) if from_data else None
    m, v = gaussian_sampler_law(mu0, var0, sampler=sampler, num_steps=24, start_var=sv,
                                start_mean=mu0 if from_data else 0.0, **kw)
    assert abs(g.lost) < 1e-10
    assert abs(g.mean() - m) < 1e-7
    # a deterministic last step leaves exact cell probabilities, whose variance at the cell
    # centres is the law's plus h^2/12 (Sheppard); a noisy one leaves point values
    # (from point values the last map works on S >= 4 sub-cells per cell: +- (h/S)^2/12)
    sheppard = 0.0 if g.points else g.h ** 2 / 12
    sub = 0.0 if g.points else (g.h / 4) ** 2 / 12
    assert abs(g.var() - sheppard - v) < sub + 1e-6 * v
    assert grid_kl_from(normal(m, v), g) < 1e-7


def test_closed_form_reference_is_not_the_data_law():
    # the sampler's discretisation error is real: with 8 EM steps the law is far from the data
    m, v = gaussian_sampler_law(1.0, 0.49, num_steps=8)
    assert abs(v - 0.49) > 0.05
    g = grid_flow_sde(normal(1.0, 0.49), None, num_steps=8, num_points=400,
                      data=normal(1.0, 0.49))
    assert abs(g.var() - g.h ** 2 / 12 - v) < (g.h / 4) ** 2 / 12 + 1e-6 * v


# --- the transitions are the package's samplers, step for step -------------------------------
def _replay(denoiser, latents, gen, **kw):
    t0, trans = sampler_transitions(denoiser, **kw)
    x = latents[:, 0] * t0
    for tr in trans:
        x = tr.m(x)
        if tr.s > 0:
            x = x + tr.s * dgref.randn((x.numel(), 1), gen, dtype=f64)[:, 0]
    return x


@pytest.mark.parametrize("sampler,kw", SAMPLERS + [
    ("heun_churn", dict(S_churn=10.0, S_min=0.5, S_max=5.0))])
def test_transitions_replay_the_package_samplers(sampler, kw):
    p, q = three_modes()
    D = oracle_weighted(p, q, 2.0)
    lat = torch.randn(500, 1, dtype=f64, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    if sampler == "heun_churn":
        ref = dgref.edm_sampler(D, lat, num_steps=20, generator=g1, **kw)[:, 0]
    else:
        ref = dgref.edm_sde_sampler(D, lat, num_steps=20, method=sampler, generator=g1,
                                    progress=False)[:, 0]
    out = _replay(D, lat, g2, sampler=sampler, num_steps=20, **kw)
    assert float((out - ref).abs().max()) < 1e-12


def test_heun_denoiser_is_used_for_the_corrector_only():
    p, q = three_modes()
    guided = oracle_weighted(p, q, 2.0)
    lat = torch.randn(300, 1, dtype=f64, generator=torch.Generator().manual_seed(1))
    ref = dgref.edm_sampler(guided, lat, num_steps=12, heun_denoiser=q)[:, 0]
    out = _replay(guided, lat, None, sampler="heun_churn", num_steps=12, heun_denoiser=q)
    both = _replay(guided, lat, None, sampler="heun_churn", num_steps=12)
    assert float((out - ref).abs().max()) < 1e-12
    assert float((both - ref).abs().max()) > 1e-3


# --- one transition ---------------------------------------------------------------------------
@pytest.mark.parametrize("s", [0.3, 0.05, 0.01, 1e-3])
@pytest.mark.parametrize("shift", [0.0, 0.37])
def test_transfer_gaussian_convolution_is_exact(s, shift):
    edges = torch.linspace(-8.0, 10.0, 401, dtype=f64)         # h = 0.045, so s < h at the end
    c = 0.5 * (edges[1:] + edges[:-1])
    h = float(edges[1] - edges[0])
    mass = torch.exp(-0.5 * (c - 1) ** 2) * h / math.sqrt(2 * math.pi)
    out = transfer(mass, edges, lambda x: x + shift, s, edges)
    var = 1 + s * s
    exact = torch.exp(-0.5 * (c - 1 - shift) ** 2 / var) * h / math.sqrt(2 * math.pi * var)
    on = exact > 1e-12
    assert float((out[on] / exact[on] - 1).abs().max()) < 1e-9
    assert abs(float(out.sum()) - float(mass.sum())) < 1e-12


def test_transfer_deterministic_map_with_a_fold():
    # N(0, 1) pushed through x -> x^2 (two branches, a fold at 0) is chi-square with 1 dof
    edges = torch.linspace(-6.0, 6.0, 4001, dtype=f64)
    mass = bin_masses(normal(0.0, 1.0), edges)
    out_edges = torch.linspace(0.0, 36.0, 3601, dtype=f64)
    for points in (False, True):                  # exact cell masses, or h p(x_i)
        src = mass if not points else bin_masses(normal(0.0, 1.0), edges, midpoint=True)
        out = transfer(src, edges, lambda x: x * x, 0.0, out_edges, points=points)
        assert abs(float(out.sum()) - float(src.sum())) < 1e-12
    g = GridDensity(out_edges, out, 0.0, 0.0, 1)
    y = torch.tensor([0.05, 0.5, 1.0, 3.0], dtype=f64)
    assert float((g.cdf(y) - torch.erf(torch.sqrt(y / 2))).abs().max()) < 2e-3


# --- against Monte Carlo runs of the actual samplers ---------------------------------------
@pytest.mark.parametrize("sampler,kw", [SAMPLERS[0], SAMPLERS[2]])
def test_grid_law_agrees_with_the_sampler_by_ks(sampler, kw):
    p, q = three_modes()
    D = oracle_weighted(p, q, 2.0)
    g = grid_flow_sde(D, None, sampler=sampler, num_steps=32, data=p, num_points=800, **kw)
    n = 20000
    gen = torch.Generator().manual_seed(11)
    lat = torch.randn(n, 1, dtype=f64, generator=gen)
    if sampler == "heun_churn":
        x = dgref.edm_sampler(D, lat, num_steps=32, generator=gen, **kw)
    else:
        x = dgref.edm_sde_sampler(D, lat, num_steps=32, generator=gen, progress=False)
    _, pval = ks_test(x, g.cdf)
    assert pval > 1e-3
    # negative control: the grid law of a slightly different model is rejected
    g_other = grid_flow_sde(oracle_weighted(p, q, 1.8), None, sampler=sampler, num_steps=32,
                            data=p, num_points=800, **kw)
    assert ks_test(x, g_other.cdf)[1] < 1e-3


def test_deterministic_path_agrees_with_grid_flow():
    p, q = three_modes()
    g = grid_flow_sde(q, p, sampler="heun_churn", num_steps=32, num_points=2000)
    flow = dgref.gridflow.grid_flow(q, p, num_points=4001, num_steps=32)
    y = torch.linspace(-3, 4, 15, dtype=f64)
    F_flow = torch.stack([flow.weights[flow.y <= v].sum() for v in y])
    assert float((g.cdf(y) - F_flow).abs().max()) < 2e-3


# --- mass check and KL helper ----------------------------------------------------------------
def test_mass_check_raises_when_the_grid_cannot_resolve_the_law():
    p, q = gaussian_pair()
    with pytest.raises(ValueError, match="mass check"):
        grid_flow_sde(oscillating(p, q, 0.1, 20.0), None, num_steps=256, data=p,
                      num_points=300, max_lost=1e-8)


def test_grid_kl_from_closed_form_and_guards():
    edges = torch.linspace(-10, 10, 4001, dtype=f64)
    g = GridDensity(edges, bin_masses(normal(0.0, 1.0), edges), 0.0, 0.0, 0)
    assert abs(grid_kl_from(normal(0.5, 1.0), g) - 0.125) < 1e-5
    assert abs(grid_kl_from(normal(0.0, 1.0), g)) < 1e-12
    with pytest.raises(ValueError, match="outside"):
        grid_kl_from(normal(9.0, 1.0), g)
    empty = g.mass.clone()
    empty[2100] = 0.0
    assert grid_kl_from(normal(0.0, 1.0), GridDensity(edges, empty, 0.0, 0.0, 0)) == math.inf
    gf = g.as_gridflow()                                 # works with dgref.grid_kl (other way)
    kl_rev = dgref.gridflow.grid_kl(gf, lambda y: normal(0.5, 1.0).log_prob(y), -10, 10)
    assert abs(kl_rev - 0.125) < 1e-4


# --- the score-error integral (normalisation) and the ODE's KL -------------------------------
def test_score_error_integral_normalisation():
    p, q = gaussian_pair()
    I = score_error_integral_1d(p, q, sigma_min=0.002, sigma_max=80.0)
    # self-consistent model: I = KL(p_min || q_min) - KL(p_max || q_max) = 2/(1+s^2) | ends
    assert abs(I - (2 / (1 + 0.002 ** 2) - 2 / (1 + 80.0 ** 2))) < 1e-6
    I_osc = score_error_integral_1d(p, oscillating(p, q, 0.1, 5.0), num_points=4001)
    assert abs(I_osc / oscillation_score_error(p, 0.1, 5.0, 1.0) - 1) < 1e-4
    mc, se = dgref.score_error_kl(p, q, num_points=4000, dtype=f64,
                                  generator=torch.Generator().manual_seed(0))
    assert abs(mc - I) < 4 * se + 1e-3


def test_ode_kl_self_consistent_equals_closed_form():
    p, q = gaussian_pair()
    from dgref.constructions import sigma_grid
    # started from the model's own q_T the ODE carries q_T to q: KL = KL(p || q) = 2
    kl = ode_kl_1d(p, q, sigma_grid(0.002, 80.0, 256), num_points=800, start=q)
    assert abs(kl - 2.0) < 2e-3
    # from N(0, 80^2) (the samplers' start) it lands 1/80 off: KL(N(1,1) || N(-1 + 1/80, ~1))
    kl_pi = ode_kl_1d(p, q, sigma_grid(0.002, 80.0, 256), num_points=800)
    assert abs(kl_pi - (2 - 1 / 80.0) ** 2 / 2) < 3e-3


def test_bound_holds_for_the_sde_and_fails_for_the_ode():
    """The claim of the bound check, in its cheapest form (omega = 5)."""
    from dgref.constructions import sigma_grid
    p, q = gaussian_pair()
    D = oscillating(p, q, 0.1, 5.0)
    I = oscillation_score_error(p, 0.1, 5.0, 1.0)
    sde = grid_kl_from(p, grid_flow_sde(D, None, num_steps=128, data=p, num_points=800))
    ode = ode_kl_1d(p, D, sigma_grid(0.002, 80.0, 128, dense=(0.002, 5.0, 256)),
                    field=oscillating_field_gauss(0.1, 5.0), num_points=800)
    assert 0 < sde < I < ode


# --- bad input ---------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    p, q = gaussian_pair()
    with pytest.raises(ValueError, match="sampler"):
        grid_flow_sde(q, p, sampler="euler")
    with pytest.raises(ValueError, match="num_points"):
        grid_flow_sde(q, p, num_points=4)
    with pytest.raises(ValueError, match="sigma_end"):
        grid_flow_sde(q, p, sigma_end=0.123456)
    with pytest.raises(ValueError, match="S_churn"):
        grid_flow_sde(q, p, S_churn=10.0)
    with pytest.raises(ValueError, match="1-D"):
        grid_flow_sde(q, dgref.ring())
    with pytest.raises(TypeError, match="start"):
        grid_flow_sde(q, object())
    with pytest.raises(ValueError, match="sigmas"):
        grid_flow_sde(q, p, sigmas=[80.0, 1.0, 2.0, 0.0])


def test_closed_form_fields_match_autograd():
    """The (D, div D) fields used by the ODE column equal the denoisers and their autograd divergence."""

    p, q = gaussian_pair()
    p3, q3 = three_modes()
    x = torch.linspace(-4, 5, 37, dtype=f64)[:, None]
    for s in (0.01, 0.3, 3.0):
        sig = torch.full((37,), s, dtype=f64)
        for D, field in ((oscillating(p, q, 0.1, 7.0), oscillating_field_gauss(0.1, 7.0)),
                         (oracle_weighted(p3, q3, 2.0), oracle_weighted_field(p3, q3, 2.0))):
            d_ref, div_ref = dgref.likelihood.divergence(D, x, sig)
            d, div = field(x, sig)
            assert float((d - d_ref).abs().max()) < 1e-12
            assert float((div - div_ref).abs().max()) < 1e-8
