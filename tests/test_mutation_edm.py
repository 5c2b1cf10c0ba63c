"""EDM core and samplers against references written from the paper's equations (issue 15,
mutation testing): the documented defaults, every step of Algorithm 2 with churn, and both
reverse-SDE steps, with the same random draws. Each test kills mutants that the statistical
tests of test_foundation.py let through (a wrong default, an exclusive churn window, a churn
cap of sqrt(3) - 1, a noise scale dropped, ...)."""
import math

import pytest
import torch

import dgref
from dgref.edm import SamplerStep, edm_sample_sigmas

DT = torch.float64


def _lat(n=16, dim=2, seed=0, dtype=DT):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class _Recorder:
    """A denoiser that records the levels it is called at (the exact ring underneath)."""

    def __init__(self, base):
        self.base, self.levels = base, []

    def __call__(self, x, sigma, *args):
        self.levels.append(float(sigma[0]))
        return self.base(x, sigma)


# --------------------------------------------------------------------------------------------
# Documented defaults (Karras et al. 2022's values)
# --------------------------------------------------------------------------------------------
def test_schedule_and_sampler_defaults():
    t = dgref.edm_sigma_steps()
    assert t.shape == (19,) and t.dtype == DT
    torch.testing.assert_close(t, dgref.edm_sigma_steps(18, 0.002, 80.0, 7.0), rtol=0, atol=0)
    rec = _Recorder(dgref.ring())
    steps = list(dgref.edm_sampler_iter(rec, _lat()))
    assert len(steps) == 18 and [s.i for s in steps] == list(range(18))
    assert [s.t_cur for s in steps] == t[:-1].tolist()
    assert [s.t_next for s in steps] == t[1:].tolist()
    assert all(s.t_hat == s.t_cur for s in steps)            # S_churn = 0: no churn
    # Euler at every t_cur, Heun at every t_next > 0: 18 + 17 evaluations
    assert rec.levels == [v for a, b in zip(t[:-1].tolist(), t[1:].tolist())
                          for v in ((a, b) if b > 0 else (a,))]
    rec2 = _Recorder(dgref.ring())
    dgref.edm_sde_sampler(rec2, _lat(), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.tensor(rec2.levels, dtype=DT),
                               dgref.edm_sigma_steps(64, 0.002, 80.0, 7.0)[:-1], rtol=0, atol=0)


def test_precond_and_loss_defaults():
    s = torch.tensor([0.1, 1.0, 10.0], dtype=DT)
    for a, b in zip(dgref.edm_precond_coeffs(s), dgref.edm_precond_coeffs(s, 0.5)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert dgref.EDMPrecond(torch.nn.Identity()).sigma_data == 0.5
    # ln sigma ~ N(-1.2, 1.2^2): the same draws as dgref.randn
    got = edm_sample_sigmas(5, generator=torch.Generator().manual_seed(1))
    z = dgref.randn((5,), torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, (-1.2 + 1.2 * z).exp(), rtol=1e-6, atol=0)
    assert got.dtype == torch.float32
    # edm_loss's defaults: sigma_data = 0.5, P_mean = -1.2, P_std = 1.2, the mean reduction
    ring = dgref.ring()
    x0 = ring.sample(32, generator=torch.Generator().manual_seed(2), dtype=DT)
    a = dgref.edm_loss(ring, x0, generator=torch.Generator().manual_seed(3))
    b = dgref.edm_loss(ring, x0, generator=torch.Generator().manual_seed(3), sigma_data=0.5,
                       P_mean=-1.2, P_std=1.2, reduction="none")
    torch.testing.assert_close(a, b.mean(), rtol=1e-12, atol=0)
    # ... and the per-example value by hand
    g = torch.Generator().manual_seed(3)
    sig = (-1.2 + 1.2 * dgref.randn((32,), g, dtype=DT)).exp()
    n = dgref.randn(x0.shape, g, dtype=DT)
    lam = (sig ** 2 + 0.25) / (sig * 0.5) ** 2
    ref = lam * ((ring(x0 + sig[:, None] * n, sig) - x0) ** 2).sum(1)
    torch.testing.assert_close(b, ref, rtol=1e-12, atol=0)


def test_network_factory_defaults():
    mlp = dgref.mlp_denoiser(3, 0.7)
    assert mlp.sigma_data == 0.7
    widths = [m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [256, 256, 256, 3]
    cond = dgref.conditional_mlp_denoiser(2, 4, 0.6)
    assert cond.sigma_data == 0.6 and cond.null_label == 4
    widths = [m.out_features for m in cond.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [128, 128, 128, 2]
    assert cond(torch.zeros(5, 2), torch.ones(5), torch.full((5,), 4)).shape == (5, 2)


# --------------------------------------------------------------------------------------------
# Algorithm 2 with churn, step by step
# --------------------------------------------------------------------------------------------
def _algorithm2(D, lat, t, S_churn, S_min, S_max, S_noise, generator):
    """Karras et al. 2022, Algorithm 2, written out: returns per step (t_hat, x_hat, D, x_next)."""
    N = len(t) - 1
    x = lat * t[0]
    out = []
    for i in range(N):
        gamma = min(S_churn / N, math.sqrt(2) - 1) if S_min <= t[i] <= S_max else 0.0
        t_hat = t[i] + gamma * t[i]
        if gamma > 0:
            eps = S_noise * dgref.randn(x.shape, generator, dtype=x.dtype)
            x_hat = x + math.sqrt(t_hat ** 2 - t[i] ** 2) * eps
        else:
            x_hat = x
        den = D(x_hat, torch.full((x.shape[0],), t_hat, dtype=x.dtype))
        d = (x_hat - den) / t_hat
        x_next = x_hat + (t[i + 1] - t_hat) * d
        if t[i + 1] != 0:
            d2 = (x_next - D(x_next, torch.full((x.shape[0],), t[i + 1], dtype=x.dtype))) / t[i + 1]
            x_next = x_hat + (t[i + 1] - t_hat) * (d / 2 + d2 / 2)
        out.append((t_hat, x_hat, den, x_next))
        x = x_next
    return out


@pytest.mark.parametrize("S_churn,S_noise", [(2.0, 1.0), (40.0, 1.003)],
                         ids=["uncapped", "capped"])
def test_sampler_with_churn_follows_algorithm_2(S_churn, S_noise):
    """Churn inside [S_min, S_max] with both edges exactly schedule levels (inclusive); gamma
    = S_churn/N below the cap, sqrt(2) - 1 above it; noise scaled by S_noise."""
    ring = dgref.ring()
    N = 6
    t = dgref.edm_sigma_steps(N, 0.002, 80.0, 7.0).tolist()
    S_min, S_max = t[4], t[1]
    lat = _lat()
    ref = _algorithm2(ring, lat, t, S_churn, S_min, S_max, S_noise,
                      torch.Generator().manual_seed(7))
    steps = list(dgref.edm_sampler_iter(ring, lat, num_steps=N, S_churn=S_churn, S_min=S_min,
                                        S_max=S_max, S_noise=S_noise,
                                        generator=torch.Generator().manual_seed(7)))
    gamma = min(S_churn / N, math.sqrt(2) - 1)
    for i, (st, (t_hat, x_hat, den, x_next)) in enumerate(zip(steps, ref)):
        assert isinstance(st, SamplerStep) and st.i == i
        assert st.t_cur == t[i] and st.t_next == t[i + 1]
        churned = 1 <= i <= 4
        assert st.t_hat == pytest.approx(t[i] * (1 + gamma) if churned else t[i], rel=1e-14)
        assert st.t_hat == pytest.approx(t_hat, rel=1e-14)
        torch.testing.assert_close(st.x_hat, x_hat, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st.denoised, den, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st.x_next, x_next, rtol=1e-12, atol=1e-12)
    x = dgref.edm_sampler(ring, lat, num_steps=N, S_churn=S_churn, S_min=S_min, S_max=S_max,
                          S_noise=S_noise, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(x, ref[-1][3], rtol=1e-12, atol=1e-12)


def test_sampler_callback_extra_args_and_non_finite():
    """``callback`` sees every step; ``extra_args`` reach both slopes; NaN samples raise unless
    ``check_finite=False``."""
    world = dgref.gaussian_pair()
    lat = _lat(8, 1)
    seen = []
    x = dgref.edm_sampler(world, lat, num_steps=5, callback=seen.append,
                          extra_args=(torch.ones(8, dtype=torch.long),))
    assert [s.i for s in seen] == list(range(5)) and torch.equal(seen[-1].x_next, x)
    ref = dgref.edm_sampler(lambda y, s: world(y, s, 1), lat, num_steps=5)
    torch.testing.assert_close(x, ref, rtol=0, atol=0)

    def nan_at_last(y, s):
        return y * float("nan") if float(s[0]) < 0.01 else 0.5 * y

    with pytest.raises(dgref.NonFiniteError):
        dgref.edm_sampler(nan_at_last, lat, num_steps=4)
    out = dgref.edm_sampler(nan_at_last, lat, num_steps=4, check_finite=False)
    assert bool(torch.isnan(out).all())


# --------------------------------------------------------------------------------------------
# Reverse SDE: both discretisations, step by step
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["euler_maruyama", "ancestral"])
def test_sde_steps_follow_their_equations(method):
    ring = dgref.ring()
    lat = _lat(12, 2, seed=3)
    t = [5.0, 2.0, 0.7, 0.1, 0.0]
    g = torch.Generator().manual_seed(9)
    x = lat * t[0]
    for a, b in zip(t[:-1], t[1:]):
        D = ring(x, torch.full((12,), a, dtype=DT))
        if b == 0:
            x = D
            break
        z = dgref.randn(x.shape, g, dtype=DT)
        if method == "euler_maruyama":
            x = x - 2 * a * (b - a) * (D - x) / a ** 2 + math.sqrt(2 * a * (a - b)) * z
        else:
            r = (b / a) ** 2
            x = D + r * (x - D) + b * math.sqrt(1 - r) * z
    got = dgref.edm_sde_sampler(ring, lat, sigmas=t, method=method,
                                generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(got, x, rtol=1e-12, atol=1e-12)
    # num_steps / sigma_min / sigma_max / rho reach the schedule
    rec = _Recorder(ring)
    dgref.edm_sde_sampler(rec, lat, num_steps=5, sigma_min=0.01, sigma_max=3.0, rho=2.0,
                          method=method, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(torch.tensor(rec.levels, dtype=DT),
                               dgref.edm_sigma_steps(5, 0.01, 3.0, 2.0)[:-1], rtol=0, atol=0)


def test_sampler_bad_input_named_exactly():
    ring = dgref.ring()
    lat = _lat(4)
    for name in ("S_churn", "S_min", "S_noise", "S_max"):
        with pytest.raises(ValueError, match=rf"^{name} must be"):
            list(dgref.edm_sampler_iter(ring, lat, num_steps=2, **{name: -1.0}))
    # S_max = 0 and S_min = 0 are allowed (no churn anywhere / from the lowest level)
    assert len(list(dgref.edm_sampler_iter(ring, lat, num_steps=2, S_churn=1.0, S_max=0.0))) == 2
    with pytest.raises(TypeError, match=r"^heun_denoiser must be callable"):
        list(dgref.edm_sampler_iter(ring, lat, heun_denoiser="no"))
    with pytest.raises(ValueError, match=r"^latents must have at least 2 dimension"):
        list(dgref.edm_sampler_iter(ring, torch.zeros(4, dtype=DT)))
    with pytest.raises(ValueError, match=r"^denoiser returned shape \(4, 1\), expected x's"):
        list(dgref.edm_sampler_iter(lambda x, s: x[:, :1], lat, num_steps=2))
    with pytest.raises(ValueError, match=r"^heun_denoiser returned shape \(4, 1\), expected "
                                         r"x's"):
        list(dgref.edm_sampler_iter(ring, lat, num_steps=2, heun_denoiser=lambda x, s: x[:, :1]))
    with pytest.raises(ValueError, match=r"^denoiser returned shape \(4, 1\), expected x's"):
        list(dgref.edm_sampler_iter(lambda x, s: x if float(s[0]) > 50 else x[:, :1], lat,
                                    num_steps=2))


def test_churn_window_defaults_to_every_level():
    """S_min = 0 and S_max = inf by default: with S_churn > 0 every step churns."""
    ring = dgref.ring()
    t = dgref.edm_sigma_steps(6, 0.002, 80.0, 7.0).tolist()
    lat = _lat()
    ref = _algorithm2(ring, lat, t, 2.0, 0.0, math.inf, 1.0, torch.Generator().manual_seed(8))
    steps = list(dgref.edm_sampler_iter(ring, lat, num_steps=6, S_churn=2.0,
                                        generator=torch.Generator().manual_seed(8)))
    assert all(st.t_hat > st.t_cur for st in steps)
    torch.testing.assert_close(steps[-1].x_next, ref[-1][3], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Session 3 (stratified sample of the rest of the module)
# --------------------------------------------------------------------------------------------
def test_precond_passes_positional_and_keyword_arguments_to_the_network():
    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.7, dtype=DT))

        def forward(self, x_in, c_noise, scale=1.0, *, shift=0.0):
            return self.w * x_in * scale + c_noise[:, None] + shift

    D = dgref.EDMPrecond(F(), sigma_data=0.6)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    s = torch.tensor([0.01, 0.3, 1.0, 5.0, 80.0], dtype=DT)
    den = s ** 2 + 0.36
    c_skip, c_out, c_in = 0.36 / den, s * 0.6 / den.sqrt(), 1 / den.sqrt()
    for args, kw, scale, shift in (((), {}, 1.0, 0.0), ((2.0,), {}, 2.0, 0.0),
                                   ((), {"shift": 0.5}, 1.0, 0.5), ((3.0,), {"shift": -1.0}, 3.0, -1.0)):
        f = 0.7 * c_in[:, None] * x * scale + (s.log() / 4)[:, None] + shift
        ref = c_skip[:, None] * x + c_out[:, None] * f
        torch.testing.assert_close(D(x, s, *args, **kw), ref, rtol=1e-14, atol=1e-14)


def test_precond_checks_x_and_sigma_and_hands_c_noise_of_shape_batch():
    seen = []

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(1.0, dtype=DT))

        def forward(self, x_in, c_noise):
            seen.append(tuple(c_noise.shape))
            return self.w * x_in
    D = dgref.EDMPrecond(F())
    x = _lat(5)
    D(x, 0.7)
    assert seen == [(5,)]
    with pytest.raises(ValueError, match=r"^sigma must have shape \(5,\) to match x"):
        D(x, torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match=r"^x must have at least 2"):
        D(x[:, 0], 0.7)


def test_edm_loss_passes_extra_args_and_sde_sampler_names_the_shape():
    x0 = _lat(6)
    s = torch.linspace(0.2, 3.0, 6, dtype=DT)
    p = dgref.ring()

    def D(x, sigma, shift=0.0):
        return p(x, sigma) + shift
    for extra in ((0.3,), {"shift": 0.3}):
        torch.testing.assert_close(
            dgref.edm_loss(D, x0, sigma=s, generator=torch.Generator().manual_seed(1),
                           extra_args=extra),
            dgref.edm_loss(lambda x, sg: D(x, sg, 0.3), x0, sigma=s,
                           generator=torch.Generator().manual_seed(1)), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^denoiser returned shape \(6, 1\), expected x's"):
        dgref.edm_sde_sampler(lambda x, sg: x[:, :1], _lat(6), num_steps=2)


def test_precond_takes_sigma_in_x_dtype():
    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.7, dtype=DT))

        def forward(self, x_in, c_noise):
            return self.w * x_in + c_noise[:, None]
    D = dgref.EDMPrecond(F(), 0.6)
    x = _lat(5)
    s = torch.tensor([0.011, 0.3, 1.3, 5.7, 79.9])              # float32 levels
    torch.testing.assert_close(D(x, s), D(x, s.double()), rtol=0, atol=0)


def test_edm_loss_draws_levels_with_p_mean_and_p_std():
    p = dgref.ring()
    x0 = _lat(8)
    got = dgref.edm_loss(p, x0, P_mean=0.3, P_std=0.5, sigma_data=0.7,
                         generator=torch.Generator().manual_seed(3), reduction="none")
    g = torch.Generator().manual_seed(3)
    s = (0.3 + 0.5 * dgref.randn((8,), g, dtype=DT)).exp()
    n = dgref.randn(x0.shape, g, dtype=DT)
    ref = (s ** 2 + 0.49) / (s * 0.7) ** 2 * ((p(x0 + s[:, None] * n, s) - x0) ** 2).sum(1)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------
# Session 3, the full run of the rest of dgref/edm.py (all but edm_sampler_iter)
# --------------------------------------------------------------------------------------------
def test_sampler_levels_checks_every_condition():
    D = dgref.ring()
    lat = torch.zeros(2, 2, dtype=DT)
    msg = r"^sigmas must be a strictly decreasing 1-D sequence of positive levels ending in 0"
    for bad in ([0.0], [[1.0, 0.0]], [1.0, 1.0, 0.0], [2.0, 1.0, 1.0, 0.0]):
        with pytest.raises(ValueError, match=msg):
            dgref.edm_sampler(D, lat, sigmas=torch.tensor(bad, dtype=DT))


def test_latents_at_the_bound_are_accepted():
    lat = torch.tensor([[8.0, 0.0]], dtype=DT)               # max |latents| = 8 exactly
    dgref.edm_sampler(dgref.ring(), lat, num_steps=2)


def test_sigma_steps_equal_ends_only_for_one_step():
    with pytest.raises(ValueError, match=r"^sigma_min must be < sigma_max, got 1.0 >= 1.0"):
        dgref.edm_sigma_steps(2, sigma_min=1.0, sigma_max=1.0)
    assert dgref.edm_sigma_steps(1, sigma_min=1.0, sigma_max=1.0).tolist() == [1.0, 0.0]


def test_mlp_denoisers_pass_depth_on():
    def n(m):
        return sum(p.numel() for p in m.parameters())
    g = torch.Generator().manual_seed(0)
    assert n(dgref.mlp_denoiser(2, 0.5, hidden=8, depth=2, generator=g)) \
        < n(dgref.mlp_denoiser(2, 0.5, hidden=8, depth=3, generator=g))
    assert n(dgref.conditional_mlp_denoiser(2, 3, 0.5, hidden=8, depth=2, generator=g)) \
        < n(dgref.conditional_mlp_denoiser(2, 3, 0.5, hidden=8, depth=3, generator=g))


def test_edm_loss_sigma_in_the_dtype_of_x0():
    x0 = torch.tensor([[0.3, -0.2], [1.1, 0.4]], dtype=DT)
    D = dgref.ring()
    a = dgref.edm_loss(D, x0, sigma=0.1, generator=torch.Generator().manual_seed(1),
                       reduction="none")
    b = dgref.edm_loss(D, x0, sigma=torch.tensor([0.1, 0.1], dtype=DT),
                       generator=torch.Generator().manual_seed(1), reduction="none")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sampler_counts_the_non_finite_rows():
    def D(x, s):
        out = 0.5 * x
        out[:2] = math.nan
        return out
    with pytest.raises(dgref.NonFiniteError, match=r"^the sampler produced 2 non-finite sample\(s\) "
                       r"out of 3"):
        dgref.edm_sampler(D, torch.zeros(3, 2, dtype=DT), num_steps=2)


def test_sde_sampler_extra_args_scaled_latents_and_finite_check():
    g = dgref.ring()

    def D(x, sigma, shift=0.0, *, scale=1.0):
        return scale * g(x, sigma) + shift
    lat = torch.randn(3, 2, generator=torch.Generator().manual_seed(2), dtype=DT)

    def run(fn, **kw):
        return dgref.edm_sde_sampler(fn, lat, num_steps=3, generator=torch.Generator()
                                     .manual_seed(3), **kw)
    base = run(lambda x, s: 0.9 * g(x, s) + 0.1)
    torch.testing.assert_close(run(lambda x, s, sh: D(x, s, sh, scale=0.9), extra_args=(0.1,)),
                               base, rtol=0, atol=0)
    torch.testing.assert_close(run(D, extra_args={"shift": 0.1, "scale": 0.9}), base, rtol=0,
                               atol=0)
    torch.testing.assert_close(run(g, latents_scaled=True, sigma_max=80.0),
                               dgref.edm_sde_sampler(g, lat / 80.0, num_steps=3,
                                                     generator=torch.Generator().manual_seed(3)),
                               rtol=0, atol=1e-12)
    with pytest.raises(dgref.NonFiniteError):
        run(lambda x, s: x / 0.0)


def test_sampler_passes_keyword_extra_args_to_both_slopes():
    g = dgref.ring()

    def D(x, sigma, *, shift=0.0, scale=1.0):
        return scale * g(x, sigma) + shift
    lat = torch.randn(3, 2, generator=torch.Generator().manual_seed(4), dtype=DT)
    base = dgref.edm_sampler(lambda x, s: 0.9 * g(x, s) + 0.1, lat, num_steps=3)
    got = dgref.edm_sampler(D, lat, num_steps=3, extra_args={"shift": 0.1, "scale": 0.9})
    torch.testing.assert_close(got, base, rtol=0, atol=0)
