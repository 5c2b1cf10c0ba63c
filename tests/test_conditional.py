"""Labelled toy worlds, classifier-free/classifier guidance, the two CFG losses, the SDE sampler
and the 1-D grid flow, checked against closed forms."""
import math

import pytest
import torch

import dgref
from dgref import (CFGDenoiser, LabelledWorld, cfg_loss, classifier_guidance,
                   conditional_mlp_denoiser, edm_sampler, edm_sde_sampler, gaussian_pair)
from dgref.cfg import cfg_training_loop, guided_optimum_denoiser
from dgref.gridflow import grid_density, grid_flow, grid_kl
from dgref.labelled import (UniformIntervals, labelled_ring, three_classes_1d,
                            uniform_classes_1d)

WORLDS = [gaussian_pair(2.0, 0.5, weights=[0.3, 0.7]), three_classes_1d(2.0, 0.6),
          labelled_ring(), uniform_classes_1d()]


def _points(world, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 3.0 * torch.randn(n, world.dim, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("world", WORLDS, ids=lambda w: repr(w))
@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0])
def test_classifier_is_bayes_ratio(world, sigma):
    x = _points(world)
    lc = world.class_log_prob(x, sigma)                       # (B, C)
    ratio = (lc + world.prior.log()[None] - world.log_prob(x, sigma)[:, None]).exp()
    torch.testing.assert_close(world.classifier(x, sigma), ratio, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(world.classifier(x, sigma).sum(1),
                               torch.ones(x.shape[0], dtype=torch.float64))
    # the unconditional law is the prior-weighted mixture of the class laws
    torch.testing.assert_close(torch.logsumexp(lc + world.prior.log()[None], 1),
                               world.log_prob(x, sigma))


@pytest.mark.parametrize("world", WORLDS, ids=lambda w: repr(w))
def test_denoisers_are_tweedie(world):
    """E[x0|x,c] = x + sigma^2 grad log p_sigma(x|c) with the gradient from autograd."""
    sigma = 0.7
    x = _points(world, 16).requires_grad_(True)
    for c in range(world.num_classes):
        (g,) = torch.autograd.grad(world.class_log_prob(x, sigma)[:, c].sum(), x)
        torch.testing.assert_close(world(x.detach(), sigma, c), x.detach() + sigma ** 2 * g,
                                   rtol=1e-8, atol=1e-10)
    (g,) = torch.autograd.grad(world.log_prob(x, sigma).sum(), x)
    torch.testing.assert_close(world(x.detach(), sigma, world.null_label),
                               x.detach() + sigma ** 2 * g, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(world(x.detach(), sigma), x.detach() + sigma ** 2 * g,
                               rtol=1e-8, atol=1e-10)


def test_uniform_intervals_closed_form():
    u = UniformIntervals([[0.0, 1.0]])
    x = torch.tensor([[-0.3], [0.2], [0.9], [1.4]], dtype=torch.float64)
    s = 0.3
    Phi = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # noqa: E731
    dens = Phi((1 - x) / s) - Phi((0 - x) / s)
    torch.testing.assert_close(u.log_prob(x, s), dens.log()[:, 0])
    # truncated-normal mean by quadrature
    t = torch.linspace(0, 1, 200001, dtype=torch.float64)
    wts = torch.exp(-0.5 * ((t[None] - x) / s) ** 2)
    num = torch.trapezoid(wts * t[None], t, dim=1)
    den = torch.trapezoid(wts, t, dim=1)
    torch.testing.assert_close(u.denoise(x, s)[:, 0], num / den, rtol=1e-8, atol=1e-9)
    # sigma = 0: the identity everywhere (also off the support), density zero off the support
    xs = torch.tensor([[-1.0], [0.5], [3.0]], dtype=torch.float64)
    assert torch.equal(u.denoise(xs, 0.0), xs)
    assert torch.equal(uniform_classes_1d()(xs, 0.0, 1), xs)
    assert u.log_prob(xs, 0.0)[0] == -math.inf and u.log_prob(xs, 0.0)[1] == 0.0
    # far tails (60 / 0.01 = 6000 standard deviations out): the Gaussian tail asymptotics
    # log Phi(-z) = -z^2/2 - log(z sqrt(2 pi)) - 1/z^2 + O(z^-4) and the truncated-normal mean
    # a + s^2/(a - x) (left of [a, b]) or b - s^2/(x - b) (right), both exact to ~1e-12 here
    far = torch.tensor([[60.0], [-60.0]], dtype=torch.float64)
    s = 0.01
    z = torch.tensor([59.0, 60.0], dtype=torch.float64) / s        # nearest edge, in sds
    asym = -0.5 * z ** 2 - torch.log(z * math.sqrt(2 * math.pi)) - 1 / z ** 2
    torch.testing.assert_close(u.log_prob(far, s), asym, rtol=1e-12, atol=0)
    mean = torch.tensor([1 - s ** 2 / 59.0, s ** 2 / 60.0], dtype=torch.float64)
    # measured error 3e-7: the difference of two log-densities of size 1.8e7 in float64
    torch.testing.assert_close(u.denoise(far, s)[:, 0], mean, rtol=0, atol=1e-6)


@pytest.mark.parametrize("world", [gaussian_pair(), labelled_ring()], ids=repr)
def test_cfg_w0_is_conditional_sampler_bitwise(world):
    g = torch.Generator().manual_seed(3)
    lat = torch.randn(256, world.dim, generator=g, dtype=torch.float64)
    a = edm_sampler(CFGDenoiser(world, 1, 0.0), lat, num_steps=12)
    b = edm_sampler(lambda x, s: world(x, s, 1), lat, num_steps=12)
    assert torch.equal(a, b)


def test_cfg_equals_classifier_guidance_with_exact_parts():
    world = labelled_ring()
    g = torch.Generator().manual_seed(4)
    lat = torch.randn(128, 2, generator=g, dtype=torch.float64)
    a = edm_sampler(CFGDenoiser(world, 2, 1.5), lat, num_steps=10)
    b = edm_sampler(classifier_guidance(lambda x, s: world(x, s, 2), world.log_classifier, 2,
                                        1.5), lat, num_steps=10)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("w_train,w_prime", [(1.0, 1.0), (2.0, 5.0), (3.0, 0.0), (0.5, 4.0)])
def test_guided_optimum_identity(w_train, w_prime):
    """Optimum of the guided loss sampled at w' == exact model at (w' - w_tr)/(1 + w_tr)."""
    world = three_classes_1d()
    g = torch.Generator().manual_seed(5)
    lat = torch.randn(512, 1, generator=g, dtype=torch.float64)
    opt = guided_optimum_denoiser(world, w_train)
    w_eff = (w_prime - w_train) / (1 + w_train)
    a = edm_sampler(CFGDenoiser(opt, 1, w_prime), lat, num_steps=16)
    b = edm_sampler(CFGDenoiser(world, 1, w_eff), lat, num_steps=16)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_guided_optimum_minimises_guided_loss_pointwise():
    """At fixed (x, sigma), the exact guided loss in the conditional output a is
    E|x0 - (1+w)a + w D_u|^2, minimised at a = (E[x0|x,c] + w D_u)/(1+w): check by perturbing."""
    world = gaussian_pair()
    w, sigma = 2.0, 0.8
    x = torch.tensor([[0.3]], dtype=torch.float64)
    t = torch.linspace(-6, 6, 40001, dtype=torch.float64)       # quadrature in x0 given x, c=1
    post = (world.class_world(1).log_prob(t[:, None], 0.0)
            - 0.5 * ((x[0, 0] - t) / sigma) ** 2).exp()
    post = post / torch.trapezoid(post, t)
    du = world(x, sigma, world.null_label)[0, 0]
    a_star = guided_optimum_denoiser(world, w)(x, sigma, torch.tensor([1]))[0, 0]

    def loss(a):
        return torch.trapezoid(post * (t - (1 + w) * a + w * du) ** 2, t)
    for eps in (1e-3, -1e-3):
        assert loss(a_star + eps) > loss(a_star)


def test_guided_loss_with_zero_weight_equals_standard():
    torch.manual_seed(0)
    net = conditional_mlp_denoiser(1, 2, 1.0, hidden=16).double()
    x0 = torch.randn(64, 1, dtype=torch.float64)
    lab = torch.randint(2, (64,))
    a = cfg_loss(net, x0, lab, loss="standard", generator=torch.Generator().manual_seed(1),
                 sigma_data=1.0)
    b = cfg_loss(net, x0, lab, loss="guided", w_train=0.0,
                 generator=torch.Generator().manual_seed(1), sigma_data=1.0)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_cfg_training_reduces_loss_and_learns_classes():
    world = gaussian_pair(3.0, 0.5)
    net = conditional_mlp_denoiser(1, 2, world.std(), hidden=32)
    gen = torch.Generator().manual_seed(0)
    losses = [r["loss"] for r in cfg_training_loop(net, world, steps=400, batch_size=128,
                                                   lr=3e-3, generator=gen)]
    assert sum(losses[-50:]) / 50 < 0.9 * sum(losses[:50]) / 50
    with torch.no_grad():
        lat = torch.randn(2000, 1, generator=gen)
        for c, m in ((0, -1.5), (1, 1.5)):
            x = edm_sampler(CFGDenoiser(net, c, 0.0), lat, num_steps=16)
            assert abs(float(x.mean()) - m) < 0.25


@pytest.mark.parametrize("method,steps", [("euler_maruyama", 512), ("ancestral", 1024)])
def test_sde_sampler_gaussian_moments(method, steps):
    """N(1, 0.5^2): mean within 4 SE; variance within 4 SE plus the first-order bias (<= 3%)."""
    world = gaussian_pair(2.0, 0.5)
    g = torch.Generator().manual_seed(7)
    n = 20000
    x = edm_sde_sampler(lambda x, s: world(x, s, 1), torch.randn(n, 1, generator=g,
                        dtype=torch.float64), num_steps=steps, method=method, generator=g)
    se_m, se_v = 0.5 / math.sqrt(n), 0.25 * math.sqrt(2 / n)
    assert abs(float(x.mean()) - 1.0) < 4 * se_m
    assert abs(float(x.var()) - 0.25) < 4 * se_v + 0.03 * 0.25


def test_sde_sampler_reproducible_with_generator():
    world = gaussian_pair()
    lat = torch.randn(10, 1, dtype=torch.float64)
    a = edm_sde_sampler(lambda x, s: world(x, s, 0), lat, num_steps=8,
                        generator=torch.Generator().manual_seed(1))
    b = edm_sde_sampler(lambda x, s: world(x, s, 0), lat, num_steps=8,
                        generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_grid_flow_exact_baseline_and_monte_carlo():
    """Grid flow at w=0 gives E[1/p(c|X)] -> 1/p(c); with guidance it matches Monte Carlo."""
    world = gaussian_pair(2.0, 0.5, weights=[0.3, 0.7])
    f = grid_flow(CFGDenoiser(world, 1, 0.0), world.class_world(1), num_steps=256)
    inv = f.expect(lambda y: 1 / world.classifier(y, 0.0)[:, 1])
    assert abs(inv - 1 / 0.7) < 5e-3
    # measured: mean exact to 2e-16 (the map is linear), variance 1.1e-4 low (256 steps)
    assert abs(f.mean() - 1.0) < 1e-12 and abs(f.var() - 0.25) < 5e-4
    # guided: grid-flow mean/variance against the same sampler on Monte Carlo latents
    D = CFGDenoiser(world, 1, 2.0)
    f = grid_flow(D, world.class_world(1), num_steps=32)
    g = torch.Generator().manual_seed(2)
    lat = (world.class_sample(1, 40000, 80.0, generator=g, dtype=torch.float64) / 80.0)
    x = edm_sampler(D, lat, num_steps=32)
    se = float(x.std()) / math.sqrt(x.shape[0])
    assert abs(f.mean() - float(x.mean())) < 4 * se
    assert abs(f.var() - float(x.var())) < 4 * float(x.var()) * math.sqrt(2 / x.shape[0])
    conf = f.expect(lambda y: world.classifier(y, 0.0)[:, 1])
    conf_mc = world.classifier(x, 0.0)[:, 1]
    assert abs(conf - float(conf_mc.mean())) < 4 * float(conf_mc.std()) / math.sqrt(40000) + 1e-4


def test_grid_kl_zero_for_own_law_and_density_normalised():
    world = gaussian_pair()
    f = grid_flow(CFGDenoiser(world, 0, 0.0), world.class_world(0), num_steps=256)
    kl = grid_kl(f, lambda y: world.class_log_prob(y, 0.0)[:, 0], -6.0, 4.0)
    assert 0 <= kl < 3e-7                     # measured 4.4e-8 (256 steps)
    y, lq, m, v = grid_density(lambda y: world.tilted_log_density(y, 0, 0.0), -6.0, 4.0)
    assert abs(m + 1.0) < 1e-12 and abs(v - 0.25) < 1e-12     # measured 4e-16 and 0


def test_tilted_family_monotone():
    """E_{q_w}[1/p(c|X)] is non-increasing in w (covariance argument), exact by quadrature."""
    world = three_classes_1d(2.0, 0.6)
    vals = []
    for w in (0.0, 0.5, 1.0, 2.0, 4.0):
        y, lq, _, _ = grid_density(lambda y: world.tilted_log_density(y, 1, w), -8, 8)
        vals.append(float(torch.trapezoid(lq.exp() / world.classifier(y[:, None], 0.0)[:, 1], y)))
    assert abs(vals[0] - 3.0) < 1e-12                 # measured 2e-15
    assert all(b <= a + 1e-12 for a, b in zip(vals, vals[1:]))


def test_bad_inputs_raise_named_errors():
    world = gaussian_pair()
    x = torch.zeros(4, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="labels"):
        world(x, 0.5, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(TypeError, match="labels"):
        world(x, 0.5, torch.zeros(4))
    with pytest.raises(ValueError, match="labels"):
        world(x, 0.5, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        CFGDenoiser(world, 2, 1.0)           # the null label is not a class to guide towards
    with pytest.raises(ValueError, match="weight"):
        CFGDenoiser(world, 0, float("nan"))
    with pytest.raises(ValueError, match="null_label"):
        CFGDenoiser(lambda x, s, c: x, 0, 1.0)
    with pytest.raises(ValueError, match="loss"):
        cfg_loss(world, x, torch.zeros(4, dtype=torch.long), loss="other")
    with pytest.raises(ValueError, match="p_uncond"):
        cfg_loss(world, x, torch.zeros(4, dtype=torch.long), p_uncond=1.5)
    with pytest.raises(ValueError, match="w_train"):
        guided_optimum_denoiser(world, -1.0)
    with pytest.raises(ValueError, match="method"):
        edm_sde_sampler(world, x, method="heun")
    with pytest.raises(ValueError, match="sigmas"):
        edm_sde_sampler(world, x, sigmas=[1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="labels"):
        LabelledWorld(dgref.mixture_1d())
    with pytest.raises(ValueError, match="every class"):
        LabelledWorld(dgref.GaussianMixture([[0.0], [1.0]], labels=[0, 2]))
    with pytest.raises(ValueError, match="intervals"):
        UniformIntervals([[1.0, 0.0]])
    with pytest.raises(ValueError, match="c must be"):
        world.class_world(5)
    with pytest.raises(ValueError, match="num_points"):
        grid_flow(world, world.class_world(0), num_points=2)
    with pytest.raises(ValueError, match="1-D"):
        grid_flow(labelled_ring(), labelled_ring().class_world(0))
    with pytest.raises(TypeError, match="data"):
        list(cfg_training_loop(conditional_mlp_denoiser(1, 2, 1.0), [1, 2], steps=1))
