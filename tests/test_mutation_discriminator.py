"""Discriminator objectives and guidance against by-hand references (issue 15, mutation
testing): the training-level distributions and their densities, both objectives' per-example
values with the same random draws, the defaults, and the guided denoiser's plumbing."""
import math

import pytest
import torch

import dgref
from dgref.discriminator import (dg_sampler_kwargs, discriminator_correction,
                                 sample_training_sigmas)

DT = torch.float64
SP = torch.nn.functional.softplus


class _Quad(torch.nn.Module):
    """d(x, sigma) = a . x + b |x|^2 / (1 + sigma^2): closed-form input gradient."""

    def __init__(self, dim=2):
        super().__init__()
        self.a = torch.nn.Parameter(torch.linspace(0.7, -0.4, dim, dtype=DT))
        self.b = torch.nn.Parameter(torch.tensor(-0.3, dtype=DT))
        self.sigma_data = 0.9

    def forward(self, x, sigma):
        return x @ self.a + self.b * (x ** 2).sum(1) / (1 + sigma ** 2)

    def grad(self, x, sigma):
        return self.a.detach() + 2 * self.b.detach() * x / (1 + sigma[:, None] ** 2)


def _g(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Training levels and their densities
# --------------------------------------------------------------------------------------------
def test_lognormal_levels_and_density():
    s, dens = sample_training_sigmas(6, generator=_g(0), dtype=DT)
    z = dgref.randn((6,), _g(0), dtype=DT)
    torch.testing.assert_close(s, (-1.2 + 1.2 * z).exp(), rtol=1e-14, atol=0)
    # density of sigma: N(ln s; -1.2, 1.2^2) / s
    ref = torch.exp(-0.5 * ((s.log() + 1.2) / 1.2) ** 2) / (s * 1.2 * math.sqrt(2 * math.pi))
    torch.testing.assert_close(dens, ref, rtol=1e-12, atol=0)
    s2, d2 = sample_training_sigmas(4, P_mean=0.3, P_std=0.5, generator=_g(0), dtype=DT)
    z = dgref.randn((4,), _g(0), dtype=DT)
    torch.testing.assert_close(s2, (0.3 + 0.5 * z).exp(), rtol=1e-14, atol=0)
    ref = torch.exp(-0.5 * ((s2.log() - 0.3) / 0.5) ** 2) / (s2 * 0.5 * math.sqrt(2 * math.pi))
    torch.testing.assert_close(d2, ref, rtol=1e-12, atol=0)
    # the density integrates to one (quadrature in ln sigma)
    u = torch.linspace(-12, 10, 20001, dtype=DT)
    from dgref.discriminator import _sigma_density
    mass = torch.trapezoid(_sigma_density(u.exp(), "lognormal", -1.2, 1.2, 0.002, 80.0)
                           * u.exp(), u)
    assert float(mass) == pytest.approx(1.0, abs=1e-10)


def test_loguniform_levels_and_density():
    s, dens = sample_training_sigmas(6, sigma_dist="loguniform", generator=_g(1), dtype=DT)
    u = torch.rand((6,), generator=_g(1), dtype=DT)
    torch.testing.assert_close(s, (math.log(0.002) + u * math.log(80 / 0.002)).exp(),
                               rtol=1e-14, atol=0)
    torch.testing.assert_close(dens, 1 / (s * math.log(80 / 0.002)), rtol=1e-14, atol=0)
    s, dens = sample_training_sigmas(6, sigma_dist="loguniform", sigma_min=0.5, sigma_max=2.0,
                                     generator=_g(1), dtype=DT)
    torch.testing.assert_close(s, (math.log(0.5) + u * math.log(4.0)).exp(), rtol=1e-14,
                               atol=0)
    torch.testing.assert_close(dens, 1 / (s * math.log(4.0)), rtol=1e-14, atol=0)
    # density of given levels: the edges (within 1e-6 relative) are inside, beyond is 0
    from dgref.discriminator import _sigma_density
    lv = torch.tensor([0.5, 0.5 * (1 - 0.5e-6), 0.5 * (1 - 2e-6), 2.0 * (1 + 0.5e-6),
                       2.0 * (1 + 2e-6), 1.0], dtype=DT)
    d = _sigma_density(lv, "loguniform", -1.2, 1.2, 0.5, 2.0)
    inside = torch.tensor([1, 1, 0, 1, 0, 1], dtype=DT)
    torch.testing.assert_close(d, inside / (lv * math.log(4.0)), rtol=1e-14, atol=0)


# --------------------------------------------------------------------------------------------
# The objectives, per example, with the same draws
# --------------------------------------------------------------------------------------------
def _data(n=8, seed=0):
    p = dgref.ring()
    return (p.sample(n, generator=_g(seed), dtype=DT),
            p.reweighted(stds=0.3).sample(n, generator=_g(seed + 1), dtype=DT))


@pytest.mark.parametrize("sigma_dist", ["lognormal", "loguniform"])
def test_ce_loss_draws_levels_then_noise(sigma_dist):
    xr, xf = _data()
    disc = _Quad()
    got = dgref.ce_loss(disc, xr, xf, generator=_g(3), sigma_dist=sigma_dist, reduction="none",
                        sigma_min=0.01, sigma_max=20.0)
    g = _g(3)
    if sigma_dist == "lognormal":
        s = (-1.2 + 1.2 * dgref.randn((8,), g, dtype=DT)).exp()
    else:
        s = (math.log(0.01) + torch.rand((8,), generator=g, dtype=DT) * math.log(2000)).exp()
    nr, nf = dgref.randn(xr.shape, g, dtype=DT), dgref.randn(xf.shape, g, dtype=DT)
    ref = SP(-disc(xr + s[:, None] * nr, s)) + SP(disc(xf + s[:, None] * nf, s))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    mean = dgref.ce_loss(disc, xr, xf, generator=_g(3), sigma_dist=sigma_dist, sigma_min=0.01,
                         sigma_max=20.0)
    torch.testing.assert_close(mean, ref.mean(), rtol=1e-12, atol=0)


def test_ce_loss_default_range_and_p_std():
    xr, xf = _data()
    disc = _Quad()
    a = dgref.ce_loss(disc, xr, xf, generator=_g(4), weighting="loguniform", reduction="none")
    b = dgref.ce_loss(disc, xr, xf, generator=_g(4), weighting="loguniform", reduction="none",
                      sigma_min=0.002, sigma_max=80.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    a = dgref.ce_loss(disc, xr, xf, generator=_g(4), reduction="none", P_mean=0.5, P_std=0.1)
    g = _g(4)
    s = (0.5 + 0.1 * dgref.randn((8,), g, dtype=DT)).exp()
    nr, nf = dgref.randn(xr.shape, g, dtype=DT), dgref.randn(xf.shape, g, dtype=DT)
    ref = SP(-disc(xr + s[:, None] * nr, s)) + SP(disc(xf + s[:, None] * nf, s))
    torch.testing.assert_close(a, ref, rtol=1e-12, atol=0)


def _kl_reference(disc, D, x0, s, lam, n):
    x = x0 + s[:, None] * n
    err = D(x, s) + s[:, None] ** 2 * disc.grad(x, s) - x0
    return lam * (err ** 2).sum(1)


@pytest.mark.parametrize("sigma_dist", [None, "lognormal"])
def test_kl_loss_kl_weighting_by_hand(sigma_dist):
    """``lambda = 1/(sigma^3 p_train(sigma))``: ``ln(hi/lo)/sigma^2`` for the default
    log-uniform levels on [0.002, 80]; the log-normal density otherwise."""
    x0, _ = _data()
    disc, q = _Quad(), dgref.ring().reweighted(stds=0.3)
    got = dgref.kl_loss(disc, q, x0, generator=_g(5), sigma_dist=sigma_dist, reduction="none")
    g = _g(5)
    if sigma_dist is None:
        s = (math.log(0.002) + torch.rand((8,), generator=g, dtype=DT) * math.log(40000)).exp()
        lam = math.log(40000) / s ** 2
    else:
        s = (-1.2 + 1.2 * dgref.randn((8,), g, dtype=DT)).exp()
        dens = torch.exp(-0.5 * ((s.log() + 1.2) / 1.2) ** 2) / (s * 1.2 * math.sqrt(2 * math.pi))
        lam = 1 / (s ** 3 * dens)
    n = dgref.randn(x0.shape, g, dtype=DT)
    torch.testing.assert_close(got, _kl_reference(disc, q, x0, s, lam, n), rtol=1e-10, atol=0)


def test_kl_loss_edm_weighting_and_sigma_data_resolution():
    x0, _ = _data()
    disc, q = _Quad(), dgref.ring().reweighted(stds=0.3)
    s = torch.exp(torch.linspace(-2, 1.5, 8, dtype=DT))

    def ref(sd, seed):
        n = dgref.randn(x0.shape, _g(seed), dtype=DT)
        return _kl_reference(disc, q, x0, s, (s ** 2 + sd ** 2) / (s * sd) ** 2, n)

    # sigma_data: given > the denoiser's > the discriminator's (0.9 here) > 0.5
    got = dgref.kl_loss(disc, q, x0, sigma=s, weighting="edm", generator=_g(6),
                        reduction="none")
    torch.testing.assert_close(got, ref(0.9, 6), rtol=1e-10, atol=0)
    got = dgref.kl_loss(disc, q, x0, sigma=s, weighting="edm", generator=_g(6), sigma_data=1.7,
                        reduction="none")
    torch.testing.assert_close(got, ref(1.7, 6), rtol=1e-10, atol=0)

    def D(x, sg):
        return q(x, sg)
    D.sigma_data = 0.4
    got = dgref.kl_loss(disc, D, x0, sigma=s, weighting="edm", generator=_g(6),
                        reduction="none")
    torch.testing.assert_close(got, ref(0.4, 6), rtol=1e-10, atol=0)
    got = dgref.kl_loss(lambda x, sg: disc(x, sg), q, x0, sigma=s, weighting="edm",
                        generator=_g(6), reduction="none")
    torch.testing.assert_close(got, ref(0.5, 6), rtol=1e-10, atol=0)
    # given levels with the KL weighting use the log-uniform density at those levels
    got = dgref.kl_loss(disc, q, x0, sigma=s, generator=_g(6), reduction="none")
    n = dgref.randn(x0.shape, _g(6), dtype=DT)
    torch.testing.assert_close(got, _kl_reference(disc, q, x0, s, math.log(40000) / s ** 2, n),
                               rtol=1e-10, atol=0)


def test_kl_loss_model_is_frozen_and_discriminator_trained():
    x0, _ = _data()
    disc = _Quad()
    net = dgref.mlp_denoiser(2, 0.5, hidden=8, depth=1).double()
    loss = dgref.kl_loss(disc, net, x0, generator=_g(7))
    loss.backward()
    assert all(p.grad is None for p in net.parameters())
    assert disc.a.grad is not None and float(disc.a.grad.abs().sum()) > 0
    assert disc.b.grad is not None and float(disc.b.grad.abs()) > 0


# --------------------------------------------------------------------------------------------
# The discriminator network and the guided denoiser
# --------------------------------------------------------------------------------------------
def test_discriminator_inputs_and_defaults():
    """``d = F([c_in x, c_noise])`` with c_in = 1/sqrt(s^2 + sd^2), c_noise = ln(s)/4;
    hidden 128, depth 3 by default; Fourier features of c_noise with num_freqs > 0."""
    disc = dgref.Discriminator(2, 0.7, generator=_g(0)).double()
    widths = [m.out_features for m in disc.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [128, 128, 128, 1]
    first = next(m for m in disc.modules() if isinstance(m, torch.nn.Linear))
    assert first.in_features == 3
    x = torch.randn(5, 2, generator=_g(1), dtype=DT)
    s = torch.tensor([0.1, 0.5, 1.0, 3.0, 30.0], dtype=DT)
    c_in = 1 / (s ** 2 + 0.49).sqrt()
    ref = disc.net(torch.cat([c_in[:, None] * x, s.log()[:, None] / 4], 1))[:, 0]
    torch.testing.assert_close(disc(x, s), ref, rtol=1e-12, atol=0)
    four = dgref.Discriminator(2, 0.7, hidden=16, depth=2, num_freqs=4, generator=_g(0)).double()
    ref = four.net(c_in[:, None] * x, s.log() / 4).reshape(5)
    torch.testing.assert_close(four(x, s), ref, rtol=1e-12, atol=0)


def test_correction_keeps_the_graph_only_under_autograd():
    disc = _Quad()
    c = discriminator_correction(disc)
    x = torch.randn(4, 2, generator=_g(2), dtype=DT)
    s = torch.full((4,), 0.8, dtype=DT)
    with torch.no_grad():
        g = c(x, s)
    assert not g.requires_grad
    torch.testing.assert_close(g, disc.grad(x, s), rtol=1e-12, atol=0)
    xg = x.clone().requires_grad_(True)
    g2 = c(xg, s)
    assert g2.requires_grad
    # the divergence of the correction: 2 b dim / (1 + s^2) per row
    div = sum(torch.autograd.grad(g2[:, i].sum(), xg, retain_graph=True)[0][:, i]
              for i in range(2))
    torch.testing.assert_close(div, 4 * disc.b.detach() / (1 + s ** 2), rtol=1e-12, atol=0)
    g3 = c(x.clone(), s)                              # x without grad: a detached result
    assert not g3.requires_grad


def test_guidance_defaults_and_sampler_kwargs():
    q = dgref.ring().reweighted(stds=0.3)
    disc = _Quad()
    x = torch.randn(6, 2, generator=_g(3), dtype=DT)
    s = torch.full((6,), 2.0, dtype=DT)
    G = dgref.discriminator_guidance(q, disc)                 # w = 1, everywhere
    torch.testing.assert_close(G(x, s), q(x, s) + 4.0 * disc.grad(x, s), rtol=1e-12, atol=0)
    G = dgref.discriminator_guidance(q, disc, 3.0, window=(0.5, 1.5))
    torch.testing.assert_close(G(x, s), q(x, s), rtol=0, atol=0)
    torch.testing.assert_close(G(x, s / 2), q(x, s / 2) + 3.0 * disc.grad(x, s / 2),
                               rtol=1e-12, atol=0)
    kw = dg_sampler_kwargs(q, disc, 2.0, (0.5, 1.5))          # default: Euler slope only
    assert kw["heun_denoiser"] is q
    torch.testing.assert_close(kw["denoiser"](x, s / 2),
                               q(x, s / 2) + 2.0 * disc.grad(x, s / 2), rtol=1e-12, atol=0)
    d = dgref.oracle_logit(dgref.ring(), q)
    assert d.sigma_data == pytest.approx(dgref.ring().std(), rel=1e-15)


# --------------------------------------------------------------------------------------------
# Ranges, band edges, numbers for sigma, and bad input named exactly
# --------------------------------------------------------------------------------------------
def test_level_range_and_density_band_edges():
    from dgref.discriminator import _sigma_density
    with pytest.raises(ValueError, match=r"^sigma_min must be < sigma_max"):
        sample_training_sigmas(4, sigma_dist="loguniform", sigma_min=1.0, sigma_max=1.0)
    with pytest.raises(ValueError, match=r"^sigma_min must be"):
        sample_training_sigmas(4, sigma_dist="loguniform", sigma_min=-1.0)
    with pytest.raises(ValueError, match=r"^sigma_max must be"):
        sample_training_sigmas(4, sigma_dist="loguniform", sigma_max=-1.0)
    with pytest.raises(ValueError, match=r"^batch must be"):
        sample_training_sigmas(0)
    # the tolerance band's edges themselves are inside
    lo, hi = 0.5, 2.0
    lv = torch.tensor([lo * (1 - 1e-6), hi * (1 + 1e-6)], dtype=DT)
    d = _sigma_density(lv, "loguniform", -1.2, 1.2, lo, hi)
    torch.testing.assert_close(d, 1 / (lv * math.log(4.0)), rtol=1e-14, atol=0)
    s, _ = sample_training_sigmas(3)
    assert s.dtype == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            sample_training_sigmas(3, device="cuda")


def test_objectives_take_sigma_as_a_number_and_check_levels():
    x0, xf = _data()
    disc, q = _Quad(), dgref.ring().reweighted(stds=0.3)
    full = torch.full((8,), 0.37, dtype=DT)
    for fn in (lambda s: dgref.ce_loss(disc, x0, xf, sigma=s, generator=_g(1), reduction="none"),
               lambda s: dgref.kl_loss(disc, q, x0, sigma=s, generator=_g(1), gamma=0.5,
                                       x_fake=xf, reduction="none")):
        torch.testing.assert_close(fn(0.37), fn(full), rtol=0, atol=0)
    with pytest.raises(ValueError, match="outside"):
        dgref.kl_loss(disc, q, x0, sigma=torch.full((8,), 100.0, dtype=DT))
    # the EDM weighting has no range
    dgref.kl_loss(disc, q, x0, sigma=torch.full((8,), 100.0, dtype=DT), weighting="edm")


def test_objectives_bad_input_named_exactly():
    x0, xf = _data()
    disc, q = _Quad(), dgref.ring().reweighted(stds=0.3)
    one = torch.zeros(8, dtype=DT)
    with pytest.raises(ValueError, match=r"^x_real must have at least 2"):
        dgref.ce_loss(disc, one, one)
    with pytest.raises(ValueError, match=r"^x_fake must have at least 2"):
        dgref.ce_loss(disc, x0, one)
    with pytest.raises(ValueError, match=r"^x0 must have at least 2"):
        dgref.kl_loss(disc, q, one)
    with pytest.raises(ValueError, match=r"^x_fake must have at least 2"):
        dgref.kl_loss(disc, q, x0, gamma=1.0, x_fake=one)
    with pytest.raises(ValueError, match=r"^sigma must have shape \(8,\)"):
        dgref.ce_loss(disc, x0, xf, sigma=torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match=r"^sigma must have shape \(8,\)"):
        dgref.kl_loss(disc, q, x0, sigma=torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match=r"^gamma must be"):
        dgref.kl_loss(disc, q, x0, gamma=-1.0, x_fake=xf)
    with pytest.raises(ValueError, match=r"^sigma_data must be"):
        dgref.kl_loss(disc, q, x0, weighting="edm", sigma_data=-1.0)
    with pytest.raises(ValueError, match=r"^denoiser returned shape \(8, 1\), expected x0's"):
        dgref.kl_loss(disc, lambda x, s: x[:, :1], x0)
    # every documented option is accepted
    dgref.ce_loss(disc, x0, xf, weighting="loguniform", generator=_g(0))
    dgref.kl_loss(disc, q, x0, weighting="edm", generator=_g(0))


def test_sampler_kwargs_keep_the_window():
    q = dgref.ring().reweighted(stds=0.3)
    disc = _Quad()
    x = torch.randn(6, 2, generator=_g(3), dtype=DT)
    s = torch.full((6,), 2.0, dtype=DT)
    for slopes in ("euler", "both"):
        kw = dg_sampler_kwargs(q, disc, 2.0, (0.5, 1.5), slopes=slopes)
        torch.testing.assert_close(kw["denoiser"](x, s), q(x, s), rtol=0, atol=0)
        torch.testing.assert_close(kw["denoiser"](x, s / 2),
                                   q(x, s / 2) + 2.0 * disc.grad(x, s / 2), rtol=1e-12, atol=0)


def test_drawn_levels_follow_every_range_argument():
    """kl_loss draws its levels with the given P_mean / P_std (log-normal) or sigma_min /
    sigma_max (log-uniform); the EDM weighting draws log-normal levels by default; given
    levels use the density of the given sigma_dist."""
    x0, _ = _data()
    disc, q = _Quad(), dgref.ring().reweighted(stds=0.3)

    def ref(s, lam, seed_gen):
        return _kl_reference(disc, q, x0, s, lam, dgref.randn(x0.shape, seed_gen, dtype=DT))

    got = dgref.kl_loss(disc, q, x0, generator=_g(8), sigma_dist="lognormal", P_mean=0.3,
                        P_std=0.5, reduction="none")
    g = _g(8)
    s = (0.3 + 0.5 * dgref.randn((8,), g, dtype=DT)).exp()
    dens = torch.exp(-0.5 * ((s.log() - 0.3) / 0.5) ** 2) / (s * 0.5 * math.sqrt(2 * math.pi))
    torch.testing.assert_close(got, ref(s, 1 / (s ** 3 * dens), g), rtol=1e-10, atol=0)
    got = dgref.kl_loss(disc, q, x0, generator=_g(9), sigma_min=0.1, sigma_max=3.0,
                        reduction="none")
    g = _g(9)
    s = (math.log(0.1) + torch.rand((8,), generator=g, dtype=DT) * math.log(30.0)).exp()
    torch.testing.assert_close(got, ref(s, math.log(30.0) / s ** 2, g), rtol=1e-10, atol=0)
    got = dgref.kl_loss(disc, q, x0, generator=_g(10), weighting="edm", reduction="none")
    g = _g(10)
    s = (-1.2 + 1.2 * dgref.randn((8,), g, dtype=DT)).exp()
    torch.testing.assert_close(got, ref(s, (s ** 2 + 0.81) / (s * 0.9) ** 2, g), rtol=1e-10,
                               atol=0)
    s = torch.exp(torch.linspace(-2, 1.5, 8, dtype=DT))
    got = dgref.kl_loss(disc, q, x0, sigma=s, sigma_dist="lognormal", generator=_g(11),
                        reduction="none")
    dens = torch.exp(-0.5 * ((s.log() + 1.2) / 1.2) ** 2) / (s * 1.2 * math.sqrt(2 * math.pi))
    torch.testing.assert_close(got, ref(s, 1 / (s ** 3 * dens), _g(11)), rtol=1e-10, atol=0)


def test_disc_output_shape_named_and_default_guidance_weight():
    x0, xf = _data()
    with pytest.raises(ValueError, match=r"^disc returned shape \(8, 1\), expected a logit per "
                                         r"row, \(B,\)'s shape \(8,\)"):
        dgref.ce_loss(lambda x, s: x[:, :1], x0, xf)
    q = dgref.ring().reweighted(stds=0.3)
    disc = _Quad()
    x = torch.randn(6, 2, generator=_g(3), dtype=DT)
    s = torch.full((6,), 1.5, dtype=DT)
    kw = dg_sampler_kwargs(q, disc)                           # w = 1, everywhere, Euler only
    assert kw["heun_denoiser"] is q
    torch.testing.assert_close(kw["denoiser"](x, s), q(x, s) + 2.25 * disc.grad(x, s),
                               rtol=1e-12, atol=0)


def test_loguniform_levels_without_a_generator():
    torch.manual_seed(0)
    s, dens = sample_training_sigmas(50, sigma_dist="loguniform", sigma_min=0.1, sigma_max=3.0)
    assert s.dtype == torch.float32 and s.device.type == "cpu"
    assert bool(((s >= 0.1 * (1 - 1e-6)) & (s <= 3.0 * (1 + 1e-6))).all())
    torch.testing.assert_close(dens, 1 / (s * math.log(30.0)), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------
# Session 3 (stratified sample of the rest of the module): the trainer's defaults and checks
# --------------------------------------------------------------------------------------------
def test_discriminator_trainer_default_lr_and_bad_input_before_any_draw():
    x0, xf = _data(32)
    a, b = _Quad(), _Quad()
    la = train_discriminator(a, x_real=x0, x_fake=xf, steps=2, batch_size=8,
                                   generator=_g(1))
    lb = train_discriminator(b, x_real=x0, x_fake=xf, steps=2, batch_size=8, lr=1e-3,
                                   generator=_g(1))
    assert la == lb
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    # a bad level distribution fails before anything is drawn: the generator is untouched
    for kw in (dict(sigma_dist="uniform"), dict(sigma_dist="lognormal", weighting="loguniform")):
        g = _g(2)
        with pytest.raises(ValueError, match="sigma_dist"):
            train_discriminator(_Quad(), x_real=x0, x_fake=xf, steps=1, batch_size=8,
                                      generator=g, **kw)
        assert torch.equal(g.get_state(), _g(2).get_state())
    with pytest.raises(ValueError, match=r"^x_fake must have at least 2"):
        train_discriminator(_Quad(), x_real=x0, x_fake=xf[:, 0], steps=1)
    with pytest.raises(ValueError, match=r"^x_real must be finite"):
        train_discriminator(_Quad(), x_real=x0 * math.nan, x_fake=xf, steps=1)


def test_trainer_passes_weight_decay_and_check_every():
    x0, xf = _data(32)

    def run(**kw):
        d = _Quad()
        train_discriminator(d, x_real=x0, x_fake=xf, steps=2, batch_size=8,
                                  generator=_g(1), lr=0.1, **kw)
        return torch.cat([p.detach().reshape(-1) for p in d.parameters()])
    assert not torch.equal(run(weight_decay=0.5), run(weight_decay=0.01))
    full = run()
    part = _Quad()
    it = dgref.discriminator.discriminator_training_loop(
        part, x_real=x0, x_fake=xf, steps=3, batch_size=8, generator=_g(1), lr=0.1,
        check_every=3)
    next(it)                                  # the first record comes after three steps
    three = _Quad()
    train_discriminator(three, x_real=x0, x_fake=xf, steps=3, batch_size=8,
                              generator=_g(1), lr=0.1)
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in part.parameters()]),
                               torch.cat([p.detach().reshape(-1) for p in three.parameters()]),
                               rtol=0, atol=0)
    assert not torch.equal(full, torch.cat([p.detach().reshape(-1) for p in three.parameters()]))


def test_relative_kl_loss_is_zero_for_the_zero_discriminator():
    """relative=True subtracts the loss at d = 0, CE term included (2 log 2 per example):
    a discriminator that is identically 0 gives exactly 0."""
    x0, xf = _data()
    d = _Quad()
    with torch.no_grad():
        d.a.zero_()
        d.b.zero_()
    q = dgref.ring().reweighted(stds=0.3)
    for gamma in (0.0, 0.7):
        rel = dgref.kl_loss(d, q, x0, gamma=gamma, x_fake=xf, relative=True, generator=_g(2),
                            reduction="none")
        torch.testing.assert_close(rel, torch.zeros(8, dtype=DT), rtol=0, atol=1e-12)


def test_trainer_accepts_the_cosine_schedule():
    x0, xf = _data(32)

    def run(schedule):
        d = _Quad()
        train_discriminator(d, x_real=x0, x_fake=xf, steps=3, batch_size=8, lr=0.1,
                                  generator=_g(1), lr_schedule=schedule)
        return torch.cat([p.detach().reshape(-1) for p in d.parameters()])
    assert not torch.equal(run("cosine"), run("constant"))


def test_trainer_casts_fake_batches_to_the_real_dtype():
    x0, xf = _data(32)

    def run(fake):
        d = _Quad()
        return train_discriminator(d, x_real=x0, x_fake=fake, steps=2, batch_size=8,
                                         generator=_g(1))
    assert run(xf.float()) == run(xf.float().double())


# --------------------------------------------------------------------------------------------
# Session 3, the full run of dgref/discriminator.py (all 1018 mutants)
# --------------------------------------------------------------------------------------------
from dgref.discriminator import discriminator_training_loop, train_discriminator  # noqa: E402

class _Fixed:
    """Data whose sample() returns fixed points and draws nothing from the generator; records
    the batch sizes asked for."""
    def __init__(self, x):
        self.x, self.sizes = x, []

    def sample(self, n, generator=None, **kw):
        self.sizes.append(n)
        return self.x[torch.arange(n) % self.x.shape[0]]


def _first_record(**kw):
    disc = dgref.Discriminator(2, 0.7, hidden=8, depth=2, generator=_g(0)).double()
    rec = next(iter(discriminator_training_loop(disc, steps=1, batch_size=4,
                                                      generator=_g(5), **kw)))
    return rec["loss"], disc


def test_training_loop_passes_every_loss_option_on():
    """The first record is the loss of the first batch before any step: with data that draw
    nothing, the same as the loss function called directly with the same generator."""
    xr = _Fixed(torch.tensor([[0.5, -1.0], [1.5, 0.2]], dtype=DT))
    xf = _Fixed(torch.tensor([[-0.3, 0.8], [0.9, 0.9]], dtype=DT))
    g = dgref.ring()
    fresh = dgref.Discriminator(2, 0.7, hidden=8, depth=2, generator=_g(0)).double()
    cases = [
        (dict(objective="ce", x_real=xr, x_fake=xf, weighting="loguniform"),
         lambda: dgref.ce_loss(fresh, xr.sample(4), xf.sample(4), generator=_g(5),
                               sigma_dist="loguniform")),
        (dict(objective="kl", x_real=xr, x_fake=xf, denoiser=g, weighting="edm", gamma=0.5),
         lambda: dgref.kl_loss(fresh, g, xr.sample(4), generator=_g(5), weighting="edm",
                               gamma=0.5, x_fake=xf.sample(4), relative=True)),
    ]
    for kw, direct in cases:
        got, _ = _first_record(**kw)
        assert got == pytest.approx(float(direct().detach()), rel=1e-6), kw["objective"]  # float32 record


def test_training_loop_default_batch_and_lr_with_weight_decay():
    xr = _Fixed(torch.tensor([[0.5, -1.0], [1.5, 0.2]], dtype=DT))
    xf = _Fixed(torch.tensor([[-0.3, 0.8], [0.9, 0.9]], dtype=DT))
    disc = dgref.Discriminator(2, 0.7, hidden=8, depth=2, generator=_g(0)).double()
    next(iter(discriminator_training_loop(disc, x_real=xr, x_fake=xf, steps=1,
                                                generator=_g(5))))
    assert xr.sizes == [256]

    def trained(lr):
        d = dgref.Discriminator(2, 0.7, hidden=8, depth=2, generator=_g(0)).double()
        train_discriminator(d, x_real=xr, x_fake=xf, steps=1, batch_size=4, lr=lr,
                                  weight_decay=0.1, generator=_g(5))
        return torch.cat([p.detach().flatten() for p in d.parameters()])
    assert not torch.allclose(trained(0.05), trained(1e-3))


def test_training_loop_names_the_discriminator_loss_when_it_is_not_finite():
    xr = torch.tensor([[0.5, -1.0], [1.5, 0.2]], dtype=DT)
    disc = dgref.Discriminator(2, 0.7, hidden=8, depth=2, generator=_g(0)).double()
    with torch.no_grad():
        next(disc.parameters()).fill_(math.nan)
    with pytest.raises(dgref.NonFiniteError, match=r"^non-finite discriminator loss"):
        train_discriminator(disc, x_real=xr, x_fake=xr, steps=2, batch_size=2, generator=_g(5))


def test_ce_old_loguniform_spelling_agrees_with_sigma_dist():
    disc = dgref.Discriminator(2, 0.7, hidden=8, depth=2, generator=_g(0)).double()
    x = torch.tensor([[0.5, -1.0], [1.5, 0.2]], dtype=DT)
    a = dgref.ce_loss(disc, x, x.flip(0), generator=_g(1), weighting="loguniform",
                      sigma_dist="loguniform")
    b = dgref.ce_loss(disc, x, x.flip(0), generator=_g(1), sigma_dist="loguniform")
    assert float(a.detach()) == float(b.detach())


def test_discriminator_with_one_fourier_frequency():
    d = dgref.Discriminator(2, 0.7, hidden=8, depth=2, num_freqs=1, generator=_g(0)).double()
    assert d(torch.zeros(3, 2, dtype=DT), torch.ones(3, dtype=DT)).shape == (3,)


def test_logit_and_grad_checks_sigma_batch_and_names_what_disc_returned():
    from dgref.discriminator import logit_and_grad
    x = torch.zeros(3, 2, dtype=DT)
    disc = dgref.Discriminator(2, 0.7, hidden=8, depth=2, generator=_g(0)).double()
    with pytest.raises(ValueError, match=r"^sigma must have shape \(3,\) to match x, got shape \(4,\)"):
        logit_and_grad(lambda x, s: x.sum(1), x, torch.ones(4, dtype=DT))
    with pytest.raises(ValueError, match=r"^disc must return a logit of shape \(3,\), got \(3, 1\)$"):
        logit_and_grad(lambda x, s: x[:, :1], x, 1.0)
    with pytest.raises(ValueError, match=r"^disc must return a logit of shape \(3,\), got float$"):
        logit_and_grad(lambda x, s: 0.5, x, 1.0)


def test_discriminator_num_freqs_checked_and_net_options_passed_on():
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match=r"^num_freqs must be an int >= 0"):
            dgref.Discriminator(2, 0.7, num_freqs=bad)

    def n(**kw):
        d = dgref.Discriminator(2, 0.7, **{"hidden": 8, "depth": 2, "num_freqs": 4, **kw})
        return sum(p.numel() for p in d.parameters())
    base = n()
    assert n(hidden=16) > base and n(depth=3) > base and n(num_freqs=2) < base
