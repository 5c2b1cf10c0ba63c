"""The ODE likelihood and the score-error integral against closed forms (issue 15, mutation
testing): the divergence of a linear denoiser, each solver's order of convergence on a Gaussian
whose probability-flow map is exact, the grid / batching / field options, and Simpson's rule on
an integrand that it integrates exactly."""
import math

import pytest
import torch

import dgref
from dgref.likelihood import divergence
from dgref.rng import BatchGenerator

DT = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


A = torch.tensor([[0.5, 0.3, 0.0], [-0.2, 1.5, 0.4], [0.1, 0.0, -0.7]], dtype=DT)


def _linear(x, sigma, *extra):
    """D(x) = A x + sigma (so D depends on sigma too); Jacobian A, divergence tr A = 1.3."""
    shift = extra[0] if extra else 0.0
    return x @ A.T + sigma[:, None] + shift


def test_divergence_exact_batched_and_hutchinson():
    x = torch.randn(5, 3, generator=_g(0), dtype=DT)
    s = torch.full((5,), 0.3, dtype=DT)
    for batched in (False, True):
        out, div = divergence(_linear, x, s, batched=batched)
        torch.testing.assert_close(out, _linear(x, s), rtol=0, atol=1e-15)
        torch.testing.assert_close(div, torch.full((5,), 1.3, dtype=DT), rtol=0, atol=1e-14)
    out, _ = divergence(_linear, x, s, extra_args=(2.0,))
    torch.testing.assert_close(out, _linear(x, s) + 2.0, rtol=0, atol=1e-15)
    probes = torch.randn(4, 5, 3, generator=_g(1), dtype=DT)
    _, hut = divergence(_linear, x, s, method="hutchinson", probes=probes)
    ref = torch.einsum("pbi,ij,pbj->pb", probes, A, probes).mean(0)
    torch.testing.assert_close(hut, ref, rtol=1e-13, atol=1e-14)


S0, SMIN, SMAX = 0.7, 0.01, 20.0
X = torch.tensor([[0.3, -1.2], [1.5, 0.4], [-0.8, 0.9]], dtype=DT)


def _gauss():
    return dgref.GaussianMixture(torch.zeros(1, 2, dtype=DT), None, S0)


def _exact_ode_loglik(x):
    """Gaussian N(0, S0^2 I): the flow from SMIN to SMAX scales x by f (linear map), so the
    ODE log-likelihood is log N(f x; 0, SMAX^2 I) + dim log f exactly."""
    f = math.sqrt((S0 ** 2 + SMAX ** 2) / (S0 ** 2 + SMIN ** 2))
    return (-0.5 * ((f * x) ** 2).sum(1) / SMAX ** 2 - 2 * math.log(SMAX) - math.log(2 * math.pi)
            + 2 * math.log(f))


@pytest.mark.parametrize("solver,order,bound", [("heun", 2, 0.022), ("rk4", 4, 3.5e-6),
                                                ("exp-heun", 2, 0.0066)])
def test_solver_orders_of_convergence(solver, order, bound):
    """Error ratio at 64 -> 128 steps: 2^order (measured 3.84, 15.4 and 4.06); error at 128
    steps within 3x of the measured 7.3e-3, 1.1e-6 and 2.2e-3."""
    errs = []
    for n in (64, 128):
        ll = dgref.ode_log_likelihood(_gauss(), X, sigma_min=SMIN, sigma_max=SMAX, num_steps=n,
                                      solver=solver)
        errs.append(float((ll - _exact_ode_loglik(X)).abs().max()))
    ratio = errs[0] / errs[1]
    assert 0.85 * 2 ** order < ratio < 1.15 * 2 ** order, (errs, ratio)
    assert errs[1] < bound


def test_grid_batches_field_and_probes_give_the_same_numbers():
    g = _gauss()
    base = dgref.ode_log_likelihood(g, X, sigma_min=SMIN, sigma_max=SMAX, num_steps=16)
    grid = torch.logspace(math.log10(SMIN), math.log10(SMAX), 17, dtype=DT)
    torch.testing.assert_close(dgref.ode_log_likelihood(g, X, sigmas=grid), base, rtol=0,
                               atol=1e-10)
    torch.testing.assert_close(dgref.ode_log_likelihood(g, X, sigma_min=SMIN, sigma_max=SMAX,
                                                        num_steps=16, batch_size=2),
                               base, rtol=0, atol=1e-12)

    def field(x, sigma):
        return divergence(g, x, sigma)
    torch.testing.assert_close(dgref.ode_log_likelihood(None, X, sigma_min=SMIN, sigma_max=SMAX,
                                                        num_steps=16, field=field),
                               base, rtol=0, atol=1e-12)
    # Rademacher probes are exact for a diagonal Jacobian: Hutchinson = exact here
    hut = dgref.ode_log_likelihood(g, X, sigma_min=SMIN, sigma_max=SMAX, num_steps=16,
                                   method="hutchinson", num_probes=2, generator=_g(2))
    torch.testing.assert_close(hut, base, rtol=0, atol=1e-12)
    # defaults: sigma in [0.002, 80], 128 Heun steps
    torch.testing.assert_close(dgref.ode_log_likelihood(g, X),
                               dgref.ode_log_likelihood(g, X, sigma_min=0.002, sigma_max=80.0,
                                                        num_steps=128, solver="heun"),
                               rtol=0, atol=0)


def test_kl_divergence_and_mixture_kl_defaults():
    p = dgref.ring()
    x5 = p.sample(5, generator=_g(3), dtype=DT)
    kl, se = dgref.kl_divergence(p, p, x=x5, num_steps=8, solver="rk4")
    diff = p.log_prob(x5) - dgref.ode_log_likelihood(p, x5, num_steps=8, solver="rk4")
    assert kl == pytest.approx(float(diff.mean()), abs=1e-12)
    assert se == pytest.approx(float(diff.std() / math.sqrt(5)), rel=1e-9)
    # default: 2000 points drawn from the data with the generator, float32
    calls = []

    def D(x, sigma):
        calls.append(x.shape)
        return p(x, sigma)
    dgref.kl_divergence(p, D, num_steps=1, generator=_g(4))
    assert calls[0] == (2000, 2)
    q = p.reweighted(stds=0.3)
    kl, se = dgref.mixture_kl(p, q, generator=_g(5))
    x = p.sample(100_000, generator=_g(5), dtype=DT)
    d = p.log_prob(x) - q.log_prob(x)
    assert kl == pytest.approx(float(d.mean()), rel=1e-12)
    assert se == pytest.approx(float(d.std() / math.sqrt(100_000)), rel=1e-9)


def test_score_error_integral_by_simpson():
    """A denoiser off by ``sigma ln(sigma) a``: the integrand in u = ln sigma is |a|^2 u^2,
    which Simpson's rule integrates exactly: ``|a|^2 (u_hi^3 - u_lo^3) / 3``, the same for
    every point (standard error 0)."""
    p = dgref.ring()
    a = torch.tensor([0.3, -0.4], dtype=DT)

    def D(x, sigma):
        return p.denoise(x, sigma) + (sigma * sigma.log())[:, None] * a

    for lo, hi, n in ((0.002, 80.0, 64), (0.1, 3.0, 8)):
        kw = {} if (lo, hi, n) == (0.002, 80.0, 64) else dict(sigma_min=lo, sigma_max=hi,
                                                              num_sigmas=n)
        val, se = dgref.score_error_kl(p, D, num_points=7, dtype=DT, generator=_g(6), **kw)
        ul, uh = math.log(lo), math.log(hi)
        assert val == pytest.approx(0.25 * (uh ** 3 - ul ** 3) / 3, rel=1e-10)
        assert se < 1e-10
    # the reference defaults to the data's exact denoiser; batches change nothing
    v1, _ = dgref.score_error_kl(p, D, reference=p.denoise, num_points=7, dtype=DT,
                                 generator=_g(6), batch_size=3)
    v2, _ = dgref.score_error_kl(p, D, num_points=7, dtype=DT, generator=_g(6))
    assert v1 == pytest.approx(v2, rel=1e-12)


# --------------------------------------------------------------------------------------------
# Session 3 (stratified sample of the rest of the module)
# --------------------------------------------------------------------------------------------
def test_ode_likelihood_passes_extra_args_to_the_denoiser():
    """extra_args reach the denoiser: positional (tuple or list) or keyword (dict)."""
    g = _gauss()

    def D(x, sigma, shift=0.0, *, scale=1.0):
        return scale * g(x, sigma) + shift

    def D_pos(x, sigma, shift):
        return D(x, sigma, shift, scale=0.9)
    base = dgref.ode_log_likelihood(lambda x, s: 0.9 * g(x, s) + 0.1, X, num_steps=4)
    for fn, extra in ((D_pos, (0.1,)), (D_pos, [0.1]), (D, {"shift": 0.1, "scale": 0.9})):
        got = dgref.ode_log_likelihood(fn, X, num_steps=4, extra_args=extra)
        torch.testing.assert_close(got, base, rtol=0, atol=0)


def test_divergence_in_the_dtype_of_x():
    x = torch.randn(4, 2, generator=_g(0)).to(torch.bfloat16)
    out, div = divergence(lambda x, s: 0.5 * x, x, torch.ones(4, dtype=torch.bfloat16))
    assert div.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    assert div.tolist() == [1.0] * 4


def test_hutchinson_divergence_in_the_dtype_of_x():
    x = torch.randn(4, 2, generator=_g(0)).to(torch.bfloat16)
    probes = torch.ones(3, 4, 2, dtype=torch.bfloat16)
    _, div = divergence(lambda x, s: 0.5 * x, x, torch.ones(4, dtype=torch.bfloat16),
                        method="hutchinson", probes=probes)
    assert div.dtype == torch.bfloat16 and div.tolist() == [1.0] * 4


# --------------------------------------------------------------------------------------------
# Session 3, the full run of dgref/likelihood.py (all 781 mutants)
# --------------------------------------------------------------------------------------------
def _hooked(calls):
    """0.5 x, recording each backward pass through its output (one per vector-Jacobian
    product in the loop; one for the vmapped batch)."""
    def D(x, sigma):
        out = 0.5 * x
        out.register_hook(lambda g: calls.append(tuple(g.shape)))
        return out
    return D


def test_ode_likelihood_batched_is_passed_on_and_off_by_default():
    x = X[:2]
    for kw, per_eval in (({}, 2), ({"batched": False}, 2), ({"batched": True}, 1)):
        calls = []
        dgref.ode_log_likelihood(_hooked(calls), x, num_steps=1, **kw)
        assert len(calls) == 2 * per_eval, (kw, calls)      # Heun: two evaluations


def test_ode_likelihood_sigma_in_the_dtype_of_x():
    seen = []

    def field(x, sigma):
        seen.append((x.dtype, sigma.dtype, tuple(sigma.shape)))
        return 0.5 * x, torch.full((x.shape[0],), 1.0, dtype=x.dtype)
    dgref.ode_log_likelihood(None, X, num_steps=1, field=field)
    assert seen == [(DT, DT, (3,))] * 2


def test_ode_likelihood_hutchinson_probes_are_the_generators_rademacher_signs():
    """The probes are the signs of the generator's normal draws (P, B, dim) in x's dtype, fixed
    along each path: the same numbers as the exact field with those probes given."""
    B = torch.tensor([[0.4, 0.3, -0.2], [0.1, -0.6, 0.5], [0.3, 0.2, 0.7]], dtype=DT)
    x = torch.randn(6, 3, generator=_g(8), dtype=DT)

    def D(x, sigma):
        return x @ B.T / (1 + sigma[:, None] ** 2)
    probes = dgref.rng.randn((2, 6, 3), _g(9), dtype=DT).sign()
    want = dgref.ode_log_likelihood(
        None, x, num_steps=3, field=lambda xx, s: divergence(D, xx, s, method="hutchinson",
                                                              probes=probes))
    got = dgref.ode_log_likelihood(D, x, num_steps=3, method="hutchinson", num_probes=2,
                                   generator=_g(9))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


class _ZeroDraws(BatchGenerator):
    """A per-row generator whose normal draws are all exactly 0."""
    def randn(self, shape, *, dtype=torch.float32, device=None):
        return torch.zeros(shape, dtype=dtype, device=device)


def test_hutchinson_zero_draw_becomes_a_plus_one_probe():
    B = torch.tensor([[0.4, 0.3], [0.1, -0.6]], dtype=DT)

    def D(x, sigma):
        return x @ B.T
    x = X[:2]
    ones = torch.ones(1, 2, 2, dtype=DT)
    want = dgref.ode_log_likelihood(
        None, x, num_steps=2, field=lambda xx, s: divergence(D, xx, s, method="hutchinson",
                                                              probes=ones))
    got = dgref.ode_log_likelihood(D, x, num_steps=2, method="hutchinson",
                                   generator=_ZeroDraws([0, 1]))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_auto_method_is_exact_up_to_dimension_8_then_hutchinson():
    for dim in (8, 9):
        A9 = torch.randn(dim, dim, generator=_g(dim), dtype=DT) * 0.3
        x = torch.randn(2, dim, generator=_g(10), dtype=DT)

        def D(x, sigma):
            return x @ A9.T

        def ll(**kw):
            return dgref.ode_log_likelihood(D, x, num_steps=1, generator=_g(11), **kw)
        exact, hut = ll(method="exact"), ll(method="hutchinson")
        assert not torch.allclose(exact, hut)
        torch.testing.assert_close(ll(), exact if dim <= 8 else hut, rtol=0, atol=0)


def test_ode_likelihood_grid_of_two_points_and_non_increasing_grids():
    g = _gauss()
    two = dgref.ode_log_likelihood(g, X, sigmas=torch.tensor([0.1, 2.0], dtype=DT))
    torch.testing.assert_close(two, dgref.ode_log_likelihood(g, X, sigma_min=0.1, sigma_max=2.0,
                                                             num_steps=1), rtol=0, atol=1e-14)
    for bad in ([0.1, 0.5, 0.5, 1.0], [0.1, 0.5, 0.3, 1.0]):
        with pytest.raises(ValueError, match=r"^sigmas must be a positive, strictly increasing"):
            dgref.ode_log_likelihood(g, X, sigmas=torch.tensor(bad, dtype=DT))


def test_ode_likelihood_checks_extra_args_before_any_step_with_a_field_too():
    calls = []

    def field(x, sigma):
        calls.append(1)
        return 0.5 * x, torch.ones(x.shape[0], dtype=x.dtype)
    with pytest.raises(TypeError, match=r"^extra_args must be a tuple"):
        dgref.ode_log_likelihood(None, X, num_steps=1, field=field, extra_args=5)
    assert calls == []


def test_kl_divergence_draws_with_the_generator_in_the_given_dtype():
    p = dgref.ring()
    seen = []

    def D(x, sigma):
        seen.append(x.dtype)
        return p(x, sigma)
    for dtype in (torch.float32, DT):
        seen.clear()
        kl = dgref.kl_divergence(p, D, num_points=6, generator=_g(12), dtype=dtype,
                                 num_steps=2)
        x = p.sample(6, generator=_g(12), dtype=dtype)
        assert seen[0] == dtype
        assert kl == dgref.kl_divergence(p, p, x=x, num_steps=2)


def test_kl_divergence_in_the_dtype_of_x():
    """log p of the data is rounded to x's dtype before the difference (float32 here)."""
    p = dgref.ring()
    x = p.sample(5, generator=_g(13))
    ll = dgref.ode_log_likelihood(p, x, num_steps=2)
    d = (p.log_prob(x.double()).float() - ll).double()
    kl, se = dgref.kl_divergence(p, p, x=x, num_steps=2)
    assert kl == float(d.mean()) and se == float(d.std() / math.sqrt(5))


class _SampleOnly:
    dim = 2

    def sample(self, *a, **k):
        return torch.zeros(4, 2)


def test_mixture_arguments_without_log_prob_are_named():
    p = dgref.ring()
    with pytest.raises(TypeError, match=r"^data must be a GaussianMixture"):
        dgref.kl_divergence(_SampleOnly(), p, num_points=4)
    with pytest.raises(TypeError, match=r"^p must be a mixture with log_prob and sample"):
        dgref.mixture_kl(_SampleOnly(), p)
    with pytest.raises(TypeError, match=r"^q must be a mixture with log_prob and sample"):
        dgref.mixture_kl(p, _SampleOnly())


@pytest.mark.parametrize("K,weights", [(3, [1, 4, 1]), (9, [1, 4, 2, 4, 2, 4, 2, 4, 1])])
def test_score_error_per_pair_by_simpson_written_out(K, weights):
    """Reference 0 and D = sigma x: the integrand in u = ln sigma is |x0 + sigma n|^2 for each
    pair (x0 drawn from p, then n, with the one generator); Simpson's weights h/3 (1, 4, 2, ...,
    4, 1) written out; the standard error is the pairs' (unbiased) std / sqrt(N)."""
    p = dgref.ring()
    lo, hi, N = 0.1, 3.0, 7
    g = _g(14)
    x0 = p.sample(N, generator=g, dtype=DT)
    n = dgref.rng.randn(x0.shape, g, dtype=DT)
    u = torch.linspace(math.log(lo), math.log(hi), K, dtype=DT)
    w = torch.tensor(weights, dtype=DT) * float(u[1] - u[0]) / 3
    s = u.exp()
    per = (w[:, None] * ((x0[None] + s[:, None, None] * n[None]) ** 2).sum(-1)).sum(0)
    val, se = dgref.score_error_kl(p, lambda x, sig: sig[:, None] * x,
                                   reference=lambda x, sig: torch.zeros_like(x), sigma_min=lo,
                                   sigma_max=hi, num_sigmas=K, num_points=N, dtype=DT,
                                   generator=_g(14))
    assert val == pytest.approx(float(per.mean()), rel=1e-12)
    assert se == pytest.approx(float(per.std() / math.sqrt(N)), rel=1e-10)


def test_score_error_defaults_2000_points_in_float32():
    p = dgref.ring()
    seen = []

    def D(x, sigma):
        seen.append((tuple(x.shape), x.dtype, sigma.dtype))
        return p.denoise(x, sigma)
    dgref.score_error_kl(p, D, num_sigmas=3, generator=_g(15))
    assert seen == [((2000, 2), torch.float32, torch.float32)] * 3


def test_divergence_batched_is_one_vmapped_pass_and_off_by_default():
    x = X[:2]
    s = torch.ones(2, dtype=DT)
    for kw, passes in (({}, 2), ({"batched": True}, 1), ({"method": "hutchinson",
                                                          "probes": torch.ones(3, 2, 2, dtype=DT),
                                                          "batched": True}, 3)):
        calls = []
        _, div = divergence(_hooked(calls), x, s, **kw)
        assert len(calls) == passes, (kw, calls)
        assert div.tolist() == [1.0, 1.0]


def test_hutchinson_keeps_the_graph_for_more_probes_than_rows():
    x = X[:1]
    probes = torch.tensor([[[1.0, 1.0]], [[1.0, -1.0]], [[-1.0, 1.0]]], dtype=DT)
    _, div = divergence(lambda x, s: x @ A[:2, :2].T, x, torch.ones(1, dtype=DT),
                        method="hutchinson", probes=probes)
    ref = torch.einsum("pbi,ij,pbj->pb", probes, A[:2, :2], probes).mean(0)
    torch.testing.assert_close(div, ref, rtol=0, atol=1e-15)


def test_ode_likelihood_returns_the_dtype_of_x():
    p = dgref.ring()
    x = X.float()
    assert dgref.ode_log_likelihood(p, x, num_steps=1).dtype == torch.float32
