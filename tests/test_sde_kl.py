"""Tests of dgref.sde_kl (the 2-D KL of the stochastic samplers at a noise level, with an SE):
brute-force kernel sums, exact replay of the package samplers (guided ones too), closed-form
Gaussian laws, the exact 1-D grid laws of dgref.sde_density in a product world, the bias
correction, paired differences of two models on shared noise and points, and bad input."""
import math
import warnings

import pytest
import torch

import dgref
from dgref.constructions import oscillation_correction
from dgref.discriminator import dg_sampler_kwargs
from dgref.sde_density import gaussian_sampler_law, grid_flow_sde, grid_kl_from
from dgref.sde_kl import KLEstimate, _kernel_sums, kernel_state, paired_kl_difference, \
    sde_kl_estimate

f64 = torch.float64
CHURN = dict(S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def levels(N):
    return [float(v) for v in dgref.edm_sigma_steps(N)]


def churned_level(N, target, S_churn=40.0):
    """The churned level t_hat_i = t_i (1 + gamma) nearest ``target`` (all levels churned)."""
    gamma = min(S_churn / N, math.sqrt(2) - 1)
    return min((t * (1 + gamma) for t in levels(N)[:-1]), key=lambda v: abs(v - target))


def nearest_level(N, target):
    return min(levels(N)[1:-1], key=lambda t: abs(t - target))


def ring_pair():
    p = dgref.ring()
    return p, p.reweighted(weights=torch.tensor([3.0, 1.0] * 4) / 16, stds=0.22)


# --- the kernel sums ------------------------------------------------------------------------
def test_kernel_sums_match_brute_force():
    g = gen(0)
    c = torch.randn(300, 2, dtype=f64, generator=g) * 2.0       # wide: the reach cut-off acts
    y = torch.randn(41, 2, dtype=f64, generator=g) * 2.5
    s = 0.35
    ks = _kernel_sums(y, c, s, chunk=7)
    K = torch.exp(-0.5 * ((y[:, None] - c[None]) ** 2).sum(-1) / s ** 2) / (2 * math.pi * s * s)
    q = K.mean(1)
    assert torch.allclose(ks.log_q, q.log(), rtol=0, atol=1e-10)
    assert torch.allclose(ks.log_q_half, K[:, :150].mean(1).log(), rtol=0, atol=1e-10)
    assert torch.allclose(ks.rel_var, K.var(1) / q ** 2, rtol=1e-9)
    assert torch.allclose(ks.ess, K.sum(1) ** 2 / (K ** 2).sum(1), rtol=1e-9)
    assert torch.allclose(ks.g, (K / q[:, None]).mean(0), rtol=1e-9, atol=1e-300)
    assert abs(float(ks.g.mean()) - 1.0) < 1e-12                  # mean_k g_k = 1 exactly


def test_estimate_by_hand_from_the_replayed_states():
    """Every field of the estimate, recomputed from kernel_state and a dense kernel matrix."""
    p, q = ring_pair()
    M, n, N = 400, 150, 24
    e = sde_kl_estimate(p, q, sigma_end=0.4, num_steps=N, num_particles=M, num_eval=n,
                        generator=gen(3), warn=False)
    g = gen(3)
    lat = dgref.randn((M, 2), g, dtype=f64)
    st = kernel_state(q, lat, sigma_end=0.4, num_steps=N, generator=g)
    eval_gen = gen(int(torch.randint(0, 2 ** 62, (1,), generator=g)))
    y = p.sample(n, st.level, generator=eval_gen, dtype=f64)
    K = torch.exp(-0.5 * ((y[:, None] - st.mean[None]) ** 2).sum(-1) / st.s ** 2) / (
        2 * math.pi * st.s ** 2)                                      # (n, M)
    qh = K.mean(1)
    ell = p.log_prob(y, st.level) - qh.log()
    bias = float((K.var(1) / qh ** 2).mean()) / (2 * M)
    se_eval = float(ell.std()) / math.sqrt(n)
    se_part = float((K / qh[:, None]).mean(0).std()) / math.sqrt(M)
    ess = K.sum(1) ** 2 / (K ** 2).sum(1)
    assert (e.level, e.s, e.num_particles, e.num_eval) == (st.level, st.s, M, n)
    assert e.kl_raw == pytest.approx(float(ell.mean()), abs=1e-10)
    assert e.bias == pytest.approx(bias, rel=1e-8)
    assert e.kl == pytest.approx(float(ell.mean()) - bias, abs=1e-10)
    assert e.se_eval == pytest.approx(se_eval, rel=1e-8)
    assert e.se_particles == pytest.approx(se_part, rel=1e-8)
    assert e.se == pytest.approx(math.hypot(se_eval, se_part), rel=1e-8)
    half = float((p.log_prob(y, st.level) - K[:, :M // 2].mean(1).log()).mean())
    assert e.kl_half == pytest.approx(half, abs=1e-10)
    assert e.ess_median == pytest.approx(float(ess.median()), rel=1e-8)
    assert e.ess_q01 == pytest.approx(float(torch.quantile(ess, 0.01)), rel=1e-8)
    assert e.reliable == (e.ess_q01 >= 10)


# --- replay of the package samplers ---------------------------------------------------------
def _finish(denoiser, st, g, B):
    """Draw the last noisy transition, then the samplers' final step to 0 at that level."""
    x = st.mean + st.s * dgref.randn(st.x.shape, g, dtype=f64)
    return denoiser(x, torch.full((B,), st.level, dtype=f64))


@pytest.mark.parametrize("sampler", ["euler_maruyama", "ancestral", "heun_churn"])
def test_kernel_state_replays_the_package_samplers(sampler):
    p, q = ring_pair()
    B, N = 300, 16
    lat = torch.randn(B, 2, dtype=f64, generator=gen(0))
    g1, g2 = gen(5), gen(5)
    if sampler == "heun_churn":
        kw = dict(S_churn=40.0, S_noise=1.003)                # churn at every level
        ref = dgref.edm_sampler(q, lat, num_steps=N, generator=g1, **kw)
        st = kernel_state(q, lat, sigma_end=churned_level(N, 0.002), sampler=sampler,
                          num_steps=N, generator=g2, **kw)
        assert st.step == N - 1
        # EDM's last step from t_hat to 0 is Euler: x + (0 - t_hat) (x - D) / t_hat = D
    else:
        ref = dgref.edm_sde_sampler(q, lat, num_steps=N, method=sampler, generator=g1,
                                    progress=False)
        st = kernel_state(q, lat, sigma_end=levels(N)[-2], sampler=sampler, num_steps=N,
                          generator=g2)
    out = _finish(q, st, g2, B)
    assert float((out - ref).abs().max()) < 1e-12


def test_guided_denoisers_replay_and_estimate():
    """discriminator_guidance and the Euler-slope-only pair of dg_sampler_kwargs."""
    p, q = ring_pair()
    disc = dgref.Discriminator(2, p.std(), hidden=16, depth=2, generator=gen(0)).double()
    B, N = 200, 12
    lat = torch.randn(B, 2, dtype=f64, generator=gen(1))
    kw = dg_sampler_kwargs(q, disc, 2.0, (0.05, 80.0), "euler")
    st = kernel_state(kw["denoiser"], lat, sigma_end=churned_level(N, 0.06), num_steps=N,
                      sampler="heun_churn", heun_denoiser=kw["heun_denoiser"], generator=gen(2),
                      **CHURN)
    t = levels(N)
    assert st.level == pytest.approx(t[st.step] * (1 + min(40.0 / N, math.sqrt(2) - 1)))
    # the replayed state at t_i is the package run's state there (Euler slope guided only)
    seen = {}
    dgref.edm_sampler(kw["denoiser"], lat, heun_denoiser=kw["heun_denoiser"], num_steps=N,
                      generator=gen(2), callback=lambda s: seen.setdefault(s.i, s.x_next),
                      **CHURN)
    assert float((seen[st.step - 1] - st.x).abs().max()) < 1e-12
    # ... and differs from a run that guides both slopes (heun_denoiser is used)
    both = kernel_state(kw["denoiser"], lat, sigma_end=churned_level(N, 0.06), num_steps=N,
                        sampler="heun_churn", generator=gen(2), **CHURN)
    assert float((both.x - st.x).abs().max()) > 1e-6
    guided = dgref.discriminator_guidance(q, disc, 2.0, (0.05, 80.0))
    em_ref = dgref.edm_sde_sampler(guided, lat, num_steps=N, generator=gen(3), progress=False)
    g = gen(3)
    em = kernel_state(guided, lat, sigma_end=t[-2], num_steps=N, generator=g)
    assert float((_finish(guided, em, g, B) - em_ref).abs().max()) < 1e-12
    est = sde_kl_estimate(p, **kw, sigma_end=0.2, sampler="heun_churn", num_steps=N,
                          num_particles=400, num_eval=100, generator=gen(4), warn=False, **CHURN)
    assert isinstance(est, KLEstimate) and math.isfinite(est.kl) and est.se > 0


# --- the level and the kernel ---------------------------------------------------------------
def test_level_is_the_nearest_schedule_level_and_kernel_the_samplers():
    p, q = ring_pair()
    N = 32
    t = levels(N)
    for target in (0.2, 0.5, 1.3):
        i = min(range(1, N), key=lambda k: abs(math.log(t[k] / target)))
        e = sde_kl_estimate(p, q, sigma_end=target, num_steps=N, num_particles=50,
                            num_eval=20, generator=gen(0), warn=False)
        assert e.level == t[i]
        assert e.s == pytest.approx(math.sqrt(2 * t[i - 1] * (t[i - 1] - t[i])), rel=1e-15)
        a = sde_kl_estimate(p, q, sigma_end=target, sampler="ancestral", num_steps=N,
                            num_particles=50, num_eval=20, generator=gen(0), warn=False)
        r = (t[i] / t[i - 1]) ** 2
        assert a.s == pytest.approx(t[i] * math.sqrt(1 - r), rel=1e-15)
    c = sde_kl_estimate(p, q, sigma_end=0.3, sampler="heun_churn", num_steps=N,
                        num_particles=50, num_eval=20, generator=gen(0), warn=False, **CHURN)
    assert c.level == pytest.approx(churned_level(N, 0.3), rel=1e-14)
    ti = c.level / (1 + min(40.0 / N, math.sqrt(2) - 1))
    assert c.s == pytest.approx(math.sqrt(c.level ** 2 - ti ** 2) * 1.003, rel=1e-12)


def test_same_seed_same_numbers():
    p, q = ring_pair()
    kw = dict(sigma_end=0.3, num_steps=24, num_particles=300, num_eval=80, warn=False)
    a = sde_kl_estimate(p, q, generator=gen(7), **kw)
    b = sde_kl_estimate(p, q, generator=gen(7), **kw)
    c = sde_kl_estimate(p, q, generator=gen(7), eval_generator=gen(8), **kw)
    assert a == b and c.kl != a.kl


# --- against exact laws ---------------------------------------------------------------------
def _gauss_kl(m_p, v_p, m_q, v_q, dim):
    """KL(N(m_p, v_p I) || N(m_q, v_q I)) with the same mean in every coordinate."""
    return dim * 0.5 * (math.log(v_q / v_p) + (v_p + (m_p - m_q) ** 2) / v_q - 1.0)


@pytest.mark.parametrize("sampler,kw", [("euler_maruyama", {}), ("ancestral", {}),
                                        ("heun_churn", CHURN)])
def test_gaussian_world_against_the_exact_gaussian_law(sampler, kw):
    """A Gaussian model's exact denoiser is affine: the sampler's law is Gaussian in closed form."""
    mu_p, v_p, mu_q, v_q = 0.3, 0.25, 0.0, 0.5
    p = dgref.GaussianMixture([[mu_p, mu_p]], [1.0], math.sqrt(v_p))
    q = dgref.GaussianMixture([[mu_q, mu_q]], [1.0], math.sqrt(v_q))
    N = 32
    target = 0.25
    est = sde_kl_estimate(p, q, sigma_end=target, sampler=sampler, num_steps=N,
                          num_particles=3000, num_eval=1500, generator=gen(11), **kw)
    step = nearest_level(N, target) if sampler != "heun_churn" else min(
        levels(N)[:-1], key=lambda t: abs(math.log(t * (1 + min(40 / N, math.sqrt(2) - 1))
                                                   / target)))
    m, v = gaussian_sampler_law(mu_q, v_q, sampler=sampler, num_steps=N, sigma_end=step, **kw)
    exact = _gauss_kl(mu_p, v_p + est.level ** 2, m, v, 2)
    assert est.reliable
    assert abs(est.kl - exact) < 4 * est.se, (est, exact)
    assert est.se < 0.25 * exact


# --- paired differences ---------------------------------------------------------------------
def _gauss_model(mu, var):
    return dgref.GaussianMixture([[mu, mu]], [1.0], math.sqrt(var))


def _gauss_exact_kl(mu_p, v_p, mu_q, v_q, sampler, N, level, kw):
    """The exact KL at ``level`` of the sampler run on the Gaussian model N(mu_q, v_q I)."""
    step = level if sampler != "heun_churn" else level / (1 + min(40 / N, math.sqrt(2) - 1))
    m, v = gaussian_sampler_law(mu_q, v_q, sampler=sampler, num_steps=N, sigma_end=step, **kw)
    return _gauss_kl(mu_p, v_p + level ** 2, m, v, 2)


def test_paired_difference_of_an_estimate_with_itself_is_zero():
    p, q = ring_pair()
    kw = dict(sigma_end=0.3, num_steps=24, num_particles=300, num_eval=80, warn=False,
              return_terms=True)
    a = sde_kl_estimate(p, q, generator=gen(7), **kw)
    assert paired_kl_difference(a, a) == (0.0, 0.0)
    b = sde_kl_estimate(p, q, generator=gen(7), **kw)           # the same seed: the same terms
    assert paired_kl_difference(a, b) == (0.0, 0.0)
    assert a.terms.ell.shape == (80,) and a.terms.g.shape == (300,)
    assert a.kl_raw == pytest.approx(float(a.terms.ell.mean()), abs=1e-12)


def test_paired_difference_against_the_exact_gaussian_laws():
    """Two close Gaussian models, Heun with churn (as in the book): the paired difference is
    within 4 paired SE of the exact one, and its SE is far below the unpaired one."""
    mu_p, v_p, N = 0.3, 0.25, 32
    models = [(0.0, 0.5), (0.05, 0.45)]
    a, b = (sde_kl_estimate(dgref.GaussianMixture([[mu_p, mu_p]], [1.0], math.sqrt(v_p)),
                            _gauss_model(m, v), sigma_end=0.25, sampler="heun_churn",
                            num_steps=N, num_particles=3000, num_eval=2000, generator=gen(21),
                            return_terms=True, **CHURN) for m, v in models)
    exact = [_gauss_exact_kl(mu_p, v_p, m, v, "heun_churn", N, a.level, CHURN)
             for m, v in models]
    d, se = paired_kl_difference(a, b)
    assert a.reliable and b.reliable
    assert d == a.kl - b.kl
    assert abs(d - (exact[0] - exact[1])) < 4 * se, (d, se, exact)
    unpaired = math.hypot(a.se, b.se)
    assert se < 0.2 * unpaired, (se, unpaired)              # the shared noise cancels
    assert abs(exact[0] - exact[1]) > 5 * se                  # the difference is resolved


def test_paired_difference_z_scores_have_unit_spread():
    """16 independent replications, Euler-Maruyama, M < n so the particle term dominates the
    paired SE: the z-scores against the exact difference have a standard deviation near 1."""
    mu_p, v_p, N = 0.3, 0.25, 32
    p = _gauss_model(mu_p, v_p)
    models = [(0.0, 0.5), (0.05, 0.45)]
    z = []
    for r in range(16):
        a, b = (sde_kl_estimate(p, _gauss_model(m, v), sigma_end=0.25, num_steps=N,
                                num_particles=1000, num_eval=3000, generator=gen(300 + r),
                                return_terms=True, warn=False) for m, v in models)
        if r == 0:
            exact = [_gauss_exact_kl(mu_p, v_p, m, v, "euler_maruyama", N, a.level, {})
                     for m, v in models]
        d, se = paired_kl_difference(a, b)
        z.append((d - (exact[0] - exact[1])) / se)
    z = torch.tensor(z, dtype=f64)
    assert 0.5 < float(z.std()) < 1.6, z
    assert abs(float(z.mean())) < 3 * 1.6 / math.sqrt(len(z)), z


def test_paired_difference_refuses_unpaired_estimates():
    p, q = ring_pair()
    ok = dict(sigma_end=0.3, num_steps=16, num_particles=40, num_eval=20, warn=False,
              return_terms=True)
    a = sde_kl_estimate(p, q, generator=gen(1), **ok)
    lat = torch.randn(40, 2, dtype=f64, generator=gen(9))
    cases = {
        "num_eval": dict(ok, num_eval=21, generator=gen(1)),
        "num_particles": dict(ok, num_particles=41, generator=gen(1)),
        "sigma_end": dict(ok, sigma_end=0.6, generator=gen(1)),
        "sampler": dict(ok, sampler="ancestral", generator=gen(1)),
        "generator": dict(ok, generator=gen(2), eval_generator=gen(int(torch.randint(
            0, 2 ** 62, (1,), generator=gen(1))))),
        "latents": dict(ok, generator=gen(1), latents=lat),
        "eval_generator": dict(ok, generator=gen(1), eval_generator=gen(5)),
    }
    for arg, kw in cases.items():
        b = sde_kl_estimate(p, q, **kw)
        with pytest.raises(ValueError, match=arg):
            paired_kl_difference(a, b)
        with pytest.raises(ValueError, match=arg):
            paired_kl_difference(b, a)
    # a model from the same seed but another denoiser pairs fine
    paired_kl_difference(a, sde_kl_estimate(p, p, generator=gen(1), **ok))
    no_terms = sde_kl_estimate(p, q, generator=gen(1), **(ok | {"return_terms": False}))
    assert no_terms.terms is None and no_terms.eval_fingerprint == a.eval_fingerprint
    with pytest.raises(TypeError, match="b .*return_terms=True"):
        paired_kl_difference(a, no_terms)
    with pytest.raises(TypeError, match="a must be a KLEstimate"):
        paired_kl_difference((a.kl, a.se), a)
    with pytest.raises(TypeError, match="return_terms"):
        sde_kl_estimate(p, q, generator=gen(1), **(ok | {"return_terms": 1}))


def _product_world():
    """p1 x p2 with a product model: an oscillating refinement in x1, a wrong width in x2."""
    p1 = dgref.mixture_1d((-1.5, 1.5), (0.3, 0.3))
    q1 = dgref.mixture_1d((-1.5, 1.5), (0.4, 0.4), (0.7, 0.3))
    p2 = dgref.mixture_1d((-1.0, 1.0), (0.25, 0.25))
    q2 = dgref.mixture_1d((-1.0, 1.0), (0.35, 0.35))
    D1 = dgref.ScoreCorrectedDenoiser(q1, oscillation_correction(p1, q1, 0.1, 5.0), 1.0)
    D2 = q2

    def D(x, s):
        return torch.cat([D1(x[:, :1], s), D2(x[:, 1:], s)], 1)
    means = [[a, b] for a in (-1.5, 1.5) for b in (-1.0, 1.0)]
    p = dgref.GaussianMixture(means, [0.25] * 4, torch.tensor([[0.3, 0.25]] * 4))
    return p, D, ((p1, D1), (p2, D2))


@pytest.mark.parametrize("sampler,kw", [("euler_maruyama", {}), ("heun_churn", CHURN)])
def test_product_world_agrees_with_the_exact_grid_laws(sampler, kw):
    """The sampler's 2-D law is the product of two exact 1-D grid laws (dgref.sde_density)."""
    N = 48
    p, D, parts = _product_world()
    est = sde_kl_estimate(p, D, sigma_end=0.2, sampler=sampler, num_particles=6000,
                          num_eval=2000, num_steps=N, generator=gen(3), **kw)
    t = levels(N)
    step = t[[abs(v - est.level) < 1e-12 * v for v in t].index(True)] if sampler != \
        "heun_churn" else min(t[:-1], key=lambda v: abs(v * (1 + min(40 / N, math.sqrt(2) - 1))
                                                         - est.level))
    ref = 0.0
    for p_, D_ in parts:
        law = grid_flow_sde(D_, None, sampler=sampler, num_steps=N, data=p_, sigma_end=step,
                            num_points=1200, max_lost=1e-5, **kw)
        assert abs(law.level - est.level) < 1e-12
        ref += grid_kl_from(p_, law)
    assert est.reliable
    assert abs(est.kl - ref) < 4 * est.se, (est, ref)
    assert est.se < 0.3 * ref                      # the check has teeth


def test_bias_correction_is_first_order_and_has_the_right_sign():
    """Few particles behind each point: kl_raw is biased up by about ``bias``, kl is not.

    Identical model (the data's exact denoiser), so the KL at the level is only the sampler's
    discretisation, known in closed form; 32 independent replications, judged by their own
    spread."""
    p = dgref.GaussianMixture([[0.3, 0.3]], [1.0], 0.5)
    N, R = 64, 32
    est = [sde_kl_estimate(p, p, sigma_end=0.2, num_steps=N, num_particles=2000, num_eval=500,
                           generator=gen(100 + k), warn=False) for k in range(R)]
    m, v = gaussian_sampler_law(0.3, 0.25, num_steps=N, sigma_end=est[0].level)
    exact = _gauss_kl(0.3, 0.25 + est[0].level ** 2, m, v, 2)
    for e in est:
        assert e.bias > 0 and e.kl == e.kl_raw - e.bias
    kl = torch.tensor([e.kl for e in est], dtype=f64)
    raw = torch.tensor([e.kl_raw for e in est], dtype=f64)
    bias = sum(e.bias for e in est) / R
    sem = float(kl.std()) / math.sqrt(R)
    assert float(raw.mean()) - exact > 3 * sem            # the bias is real here ...
    assert abs(float(kl.mean()) - exact) < 3 * sem         # ... and the correction removes it
    # halving M doubles the O(1/M) bias: kl_half - kl_raw is about one more bias
    half = sum(e.kl_half - e.kl_raw for e in est) / R
    assert 0.5 * bias < half < 2.5 * bias


def test_unreliable_estimates_are_flagged_and_warned():
    p, q = ring_pair()
    kw = dict(sigma_end=0.01, num_steps=64, num_particles=200, num_eval=200, generator=gen(0))
    with pytest.warns(UserWarning, match="ess_q01"):
        e = sde_kl_estimate(p, q, **kw)
    assert not e.reliable and e.ess_q01 < 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e2 = sde_kl_estimate(p, q, warn=False, **kw)
    assert not e2.reliable


# --- bad input ------------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    p, q = ring_pair()
    ok = dict(num_steps=16, num_particles=20, num_eval=10)
    with pytest.raises(ValueError, match="sigma_end"):
        sde_kl_estimate(p, q, sigma_end=100.0, **ok)
    with pytest.raises(ValueError, match="sigma_end"):
        sde_kl_estimate(p, q, sigma_end=1e-4, **ok)
    with pytest.raises(ValueError, match="sigma_end"):
        sde_kl_estimate(p, q, sigma_end=-0.2, **ok)
    with pytest.raises(ValueError, match="sigma_end.*S_min"):
        sde_kl_estimate(p, q, sigma_end=0.01, sampler="heun_churn", **ok, **CHURN)
    with pytest.raises(ValueError, match="S_churn"):
        sde_kl_estimate(p, q, sigma_end=0.2, sampler="heun_churn", **ok)
    with pytest.raises(ValueError, match="sampler"):
        sde_kl_estimate(p, q, sigma_end=0.2, sampler="euler", **ok)
    with pytest.raises(TypeError, match="S_churn"):
        sde_kl_estimate(p, q, sigma_end=0.2, S_churn=10.0, **ok)
    with pytest.raises(TypeError, match="heun_denoiser"):
        sde_kl_estimate(p, q, sigma_end=0.2, heun_denoiser=q, **ok)
    sde_kl_estimate(p, q, sigma_end=0.2, heun_denoiser=None, warn=False, **ok)   # "none": fine
    for name, bad in (("num_particles", 0), ("num_eval", -3), ("num_steps", 0)):
        with pytest.raises(ValueError, match=name):
            sde_kl_estimate(p, q, sigma_end=0.2, **(ok | {name: bad}))
    with pytest.raises(TypeError, match="num_particles"):
        sde_kl_estimate(p, q, sigma_end=0.2, **(ok | {"num_particles": 100.0}))
    with pytest.raises(TypeError, match="data.*GaussianMixture"):
        sde_kl_estimate(torch.zeros(10, 2), q, sigma_end=0.2, **ok)
    with pytest.raises(ValueError, match="latents"):
        sde_kl_estimate(p, q, sigma_end=0.2, latents=torch.zeros(20, 3, dtype=f64), **ok)
    with pytest.raises(ValueError, match="denoiser"):            # 2-D data, 1-D model
        sde_kl_estimate(p, lambda x, s: x[:, :1], sigma_end=0.2, **ok)
    with pytest.raises(TypeError, match="denoiser"):
        sde_kl_estimate(p, "q", sigma_end=0.2, **ok)
