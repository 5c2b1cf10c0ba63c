"""Toy and labelled worlds, the grid flow and CFG training against closed forms (issue 15,
mutation testing): the presets' documented parameters, sampling by its draws, the uniform
classes' moments and scores, the Wasserstein-1 and entropy of a grid flow, and the functions
that no unit test reached before (grid_w1, grid_world, grad_log_classifier, train_cfg, ...)."""
import math

import pytest
import torch

import dgref
from dgref.gridflow import grid_flow, grid_w1
from dgref.labelled import (UniformIntervals, labelled_ring, three_classes_1d,
                            uniform_classes_1d)

DT = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Presets: documented parameters
# --------------------------------------------------------------------------------------------
def test_ring_grid_and_1d_presets():
    r = dgref.ring()
    ang = torch.arange(8, dtype=DT) * (math.pi / 4)
    torch.testing.assert_close(r.means, 2.0 * torch.stack([ang.cos(), ang.sin()], 1))
    torch.testing.assert_close(r.variances, torch.full((8, 2), 0.15 ** 2, dtype=DT))
    torch.testing.assert_close(r.weights, torch.full((8,), 1 / 8, dtype=DT))
    assert repr(r) == "GaussianMixture(K=8, dim=2)" and r.num_components == 8
    g = dgref.grid_world()
    c = torch.tensor([-2.0, 0.0, 2.0], dtype=DT)
    torch.testing.assert_close(g.means, torch.cartesian_prod(c, c))
    torch.testing.assert_close(g.variances, torch.full((9, 2), 0.04, dtype=DT))
    torch.testing.assert_close(g.weights, torch.full((9,), 1 / 9, dtype=DT))
    g2 = dgref.grid_world(2, 1.0, 0.3, weights=[0.1, 0.2, 0.3, 0.4])
    c = torch.tensor([-0.5, 0.5], dtype=DT)
    torch.testing.assert_close(g2.means, torch.cartesian_prod(c, c))
    torch.testing.assert_close(g2.weights, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=DT))
    torch.testing.assert_close(g2.variances, torch.full((4, 2), 0.09, dtype=DT))
    m = dgref.mixture_1d()
    torch.testing.assert_close(m.means, torch.tensor([[-2.0], [2.0]], dtype=DT))
    torch.testing.assert_close(m.variances, torch.full((2, 1), 0.25, dtype=DT))


def test_mixture_widths_moments_and_reweighting():
    means = torch.tensor([[0.0, 1.0], [3.0, -1.0]], dtype=DT)
    iso = dgref.GaussianMixture(means, [0.3, 0.7], torch.tensor([0.5, 2.0], dtype=DT),
                                labels=[1, 0])
    torch.testing.assert_close(iso.variances, torch.tensor([[0.25, 0.25], [4.0, 4.0]], dtype=DT))
    torch.testing.assert_close(iso.mean(), torch.tensor([2.1, -0.4], dtype=DT))
    # root mean per-coordinate variance: within-component plus between-component
    var = torch.tensor([0.3 * 0.25 + 0.7 * 4.0] * 2, dtype=DT) + 0.21 * (means[0] - means[1]) ** 2
    assert iso.std() == pytest.approx(math.sqrt(float(var.mean())), rel=1e-14)
    w = iso.reweighted(weights=[0.5, 0.5])
    torch.testing.assert_close(w.means, means)
    torch.testing.assert_close(w.variances, iso.variances)
    assert w.labels.tolist() == [1, 0]
    s = iso.reweighted(stds=1.0)
    torch.testing.assert_close(s.weights, iso.weights)
    torch.testing.assert_close(s.variances, torch.ones(2, 2, dtype=DT))


def test_mixture_sampling_by_its_draws():
    mix = dgref.GaussianMixture([[0.0], [10.0]], [0.25, 0.75], [0.5, 2.0])
    x, k = mix.sample(6, sigma=1.5, generator=_g(0), return_components=True, dtype=DT)
    g = _g(0)
    k_ref = torch.multinomial(torch.tensor([0.25, 0.75], dtype=DT), 6, replacement=True,
                              generator=g)
    z = torch.randn((6, 1), generator=g, dtype=DT)
    ref = mix.means[k_ref] + torch.sqrt(mix.variances[k_ref] + 2.25) * z
    assert torch.equal(k, k_ref)
    torch.testing.assert_close(x, ref, rtol=1e-14, atol=0)
    assert mix.sample(3, generator=_g(0)).dtype == torch.float32


def test_labelled_presets():
    gp = dgref.gaussian_pair()
    torch.testing.assert_close(gp.base.means, torch.tensor([[-1.0], [1.0]], dtype=DT))
    torch.testing.assert_close(gp.base.variances, torch.full((2, 1), 0.25, dtype=DT))
    torch.testing.assert_close(gp.prior, torch.tensor([0.5, 0.5], dtype=DT))
    t3 = three_classes_1d()
    torch.testing.assert_close(t3.base.means, torch.tensor([[-2.0], [0.0], [2.0]], dtype=DT))
    torch.testing.assert_close(t3.base.variances, torch.full((3, 1), 0.25, dtype=DT))
    lr = labelled_ring()
    assert lr.num_classes == 3 and lr.base.num_components == 6
    assert lr.base.labels.tolist() == [0, 1, 2, 0, 1, 2]
    torch.testing.assert_close(lr.base.means.norm(dim=1), torch.full((6,), 2.0, dtype=DT))
    torch.testing.assert_close(lr.base.variances, torch.full((6, 2), 0.09, dtype=DT))
    uc = uniform_classes_1d()
    torch.testing.assert_close(uc.base.intervals,
                               torch.tensor([[-2.0, -0.5], [0.5, 2.0]], dtype=DT))
    torch.testing.assert_close(uc.prior, torch.tensor([0.5, 0.5], dtype=DT))
    assert repr(uc) == "LabelledWorld(UniformIntervals(K=2), C=2)"


# --------------------------------------------------------------------------------------------
# Uniform classes: moments, posterior, score, subsets, sampling
# --------------------------------------------------------------------------------------------
def test_uniform_intervals_moments_posterior_and_score():
    u = UniformIntervals([[-2.0, -0.5], [0.5, 3.0]], [0.25, 0.75])
    # mean and std of a mixture of uniforms
    m = 0.25 * (-1.25) + 0.75 * 1.75
    second = 0.25 * (4 + 1 + 0.25) / 3 + 0.75 * (0.25 + 1.5 + 9) / 3
    torch.testing.assert_close(u.mean(), torch.tensor([m], dtype=DT))
    assert u.std() == pytest.approx(math.sqrt(second - m ** 2), rel=1e-14)
    x = torch.linspace(-4, 4, 17, dtype=DT)[:, None]
    s = 0.6
    post = u.posterior(x, s)
    t, _ = u.component_terms(x, s)
    torch.testing.assert_close(post, torch.softmax(t, 1))
    torch.testing.assert_close(post.sum(1), torch.ones(17, dtype=DT))
    # score = grad log p by autograd (Tweedie)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(u.log_prob(xg, s).sum(), xg)
    torch.testing.assert_close(u.score(x, s), g, rtol=1e-8, atol=1e-10)
    # a subset renormalises its weights and keeps its labels
    lab = UniformIntervals([[0.0, 1.0], [2.0, 4.0], [5.0, 6.0]], [0.2, 0.3, 0.5], labels=[0, 1, 0])
    sub = lab.subset(torch.tensor([True, False, True]))
    torch.testing.assert_close(sub.weights, torch.tensor([2 / 7, 5 / 7], dtype=DT))
    torch.testing.assert_close(sub.intervals, torch.tensor([[0.0, 1.0], [5.0, 6.0]], dtype=DT))
    assert sub.labels.tolist() == [0, 0]
    default = UniformIntervals([[0.0, 1.0], [2.0, 3.0]])
    torch.testing.assert_close(default.weights, torch.tensor([0.5, 0.5], dtype=DT))


def test_uniform_intervals_sampling_by_its_draws():
    u = UniformIntervals([[-2.0, -0.5], [0.5, 3.0]], [0.25, 0.75])
    x, k = u.sample(7, sigma=0.3, generator=_g(1), return_components=True, dtype=DT)
    g = _g(1)
    k_ref = torch.multinomial(u.weights, 7, replacement=True, generator=g)
    v = torch.rand((7, 1), generator=g, dtype=DT)
    z = torch.randn((7, 1), generator=g, dtype=DT)
    a, b = u.intervals[k_ref, :1], u.intervals[k_ref, 1:]
    assert torch.equal(k, k_ref)
    torch.testing.assert_close(x, a + v * (b - a) + 0.3 * z, rtol=1e-14, atol=0)
    x32 = u.sample(5, generator=_g(1))
    assert x32.dtype == torch.float32 and x32.shape == (5, 1)
    x0 = u.sample(2000, generator=_g(2), dtype=DT)                # sigma = 0: inside the support
    inside = ((x0 >= -2) & (x0 <= -0.5)) | ((x0 >= 0.5) & (x0 <= 3.0))
    assert bool(inside.all())


# --------------------------------------------------------------------------------------------
# Labelled worlds: scores and the classifier gradient by autograd; sampling
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [dgref.gaussian_pair(2.0, 0.5, weights=[0.3, 0.7]),
                                   labelled_ring(), uniform_classes_1d()], ids=repr)
def test_scores_and_classifier_gradient_by_autograd(world):
    x = 2.5 * torch.randn(12, world.dim, generator=_g(3), dtype=DT)
    s = 0.7
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(world.log_prob(xg, s).sum(), xg)
    torch.testing.assert_close(world.score(x, s), g, rtol=1e-8, atol=1e-10)
    lab = torch.arange(12) % world.num_classes
    lc = world.class_log_prob(xg, s).gather(1, lab[:, None]).sum()
    (gc,) = torch.autograd.grad(lc, xg)
    torch.testing.assert_close(world.score(x, s, lab), gc, rtol=1e-8, atol=1e-10)
    lcl = world.log_classifier(xg, s).gather(1, lab[:, None]).sum()
    (gl,) = torch.autograd.grad(lcl, xg)
    torch.testing.assert_close(world.grad_log_classifier(x, s, lab), gl, rtol=1e-7, atol=1e-9)


def test_tilted_density_and_joint_sampling():
    world = dgref.gaussian_pair(2.0, 0.5, weights=[0.3, 0.7])
    y = torch.linspace(-3, 3, 13, dtype=DT)[:, None]
    for w in (0.0, 1.5):
        ref = world.class_log_prob(y, 0.0)[:, 1] + w * world.log_classifier(y, 0.0)[:, 1]
        torch.testing.assert_close(world.tilted_log_density(y, 1, w), ref)
    x, lab = world.sample(4000, generator=_g(4), dtype=DT)
    # labels are the components' classes: class 1 sits at +1
    assert abs(float(x[lab == 1].mean()) - 1.0) < 0.05
    assert abs(float(x[lab == 0].mean()) + 1.0) < 0.05
    assert abs(float((lab == 1).double().mean()) - 0.7) < 4 * math.sqrt(0.21 / 4000)
    xc = world.class_sample(0, 5, generator=_g(5), dtype=DT)
    torch.testing.assert_close(xc, world.class_world(0).sample(5, generator=_g(5), dtype=DT))


# --------------------------------------------------------------------------------------------
# Grid flow: entropy and Wasserstein-1 against closed forms
# --------------------------------------------------------------------------------------------
def test_grid_flow_entropy_and_w1():
    """The exact sampler's law is N(1, 0.25) up to 256 steps of discretisation: its entropy is
    0.5 log(2 pi e 0.25); W1 to N(1 + d, 0.25) is |d| (a shift)."""
    world = dgref.gaussian_pair()
    f = grid_flow(dgref.CFGDenoiser(world, 1, 0.0), world.class_world(1), num_steps=256)
    assert f.x.shape == (4001,) and f.monotone
    h = 0.5 * math.log(2 * math.pi * math.e * 0.25)
    assert f.entropy() == pytest.approx(h, abs=2e-3)             # measured 2e-4

    def normal(m):
        return lambda y: -0.5 * ((y[:, 0] - m) / 0.5) ** 2

    assert grid_w1(f, normal(1.0), -6.0, 8.0) < 4e-3               # measured 7.5e-4
    # measured 8e-7 from |d| for a shift (the grid's step CDF errors cancel in one sign)
    assert grid_w1(f, normal(1.3), -6.0, 8.0) == pytest.approx(0.3, abs=1e-5)
    assert grid_w1(f, normal(0.5), -6.0, 8.0) == pytest.approx(0.5, abs=1e-5)
    bent = f._replace(monotone=False)
    with pytest.raises(ValueError, match="monotone"):
        bent.entropy()


# --------------------------------------------------------------------------------------------
# Guidance helpers and CFG training
# --------------------------------------------------------------------------------------------
def test_oracle_correction_and_train_cfg():
    p = dgref.ring()
    q = p.reweighted(stds=0.3)
    c = dgref.oracle_correction(p, q)
    x = torch.randn(9, 2, generator=_g(6), dtype=DT)
    s = torch.full((9,), 0.4, dtype=DT)
    torch.testing.assert_close(c(x, s), p.score(x, s) - q.score(x, s))
    G = dgref.ScoreCorrectedDenoiser(q, c)
    torch.testing.assert_close(G(x, s), p.denoise(x, s), rtol=1e-10, atol=1e-12)
    world = dgref.gaussian_pair(3.0, 0.5)

    def run(fn):
        net = dgref.conditional_mlp_denoiser(1, 2, world.std(), hidden=8, depth=1,
                                             generator=_g(7))
        return fn(net)

    from dgref.cfg import cfg_training_loop
    a = run(lambda n: dgref.train_cfg(n, world, steps=4, batch_size=16, generator=_g(8)))
    b = run(lambda n: [r["loss"] for r in cfg_training_loop(n, world, steps=4, batch_size=16,
                                                             generator=_g(8))])
    assert len(a) == 4 and a == b


# --------------------------------------------------------------------------------------------
# Session 3 (stratified sample of the rest of the modules)
# --------------------------------------------------------------------------------------------
def test_grid_world_coordinates_in_float64():
    g = dgref.grid_world(3, 0.1, 0.2)
    c = torch.tensor([-0.1, 0.0, 0.1], dtype=DT)
    assert torch.equal(g.means, torch.cartesian_prod(c, c))        # exact, no float32 rounding


def test_component_labels_are_long_and_non_negative():
    m = dgref.GaussianMixture([[0.0], [1.0]], labels=[0.0, 1.0])
    assert m.labels.dtype == torch.long and m.labels.tolist() == [0, 1]
    m = dgref.GaussianMixture([[0.0], [1.0]], labels=torch.tensor([1, 0], dtype=torch.int32))
    assert m.labels.dtype == torch.long
    with pytest.raises(ValueError, match=r"^component labels must be >= 0, got \[-1, 0\]"):
        dgref.LabelledWorld(dgref.GaussianMixture([[0.0], [1.0]], labels=[-1, 0]))


def test_grid_flow_method_and_non_monotone_fallback():
    """A monotone map gives the output-coordinate law (method 'output'); a one-step sampler whose
    map y = D(x) folds (slope 1 + 3 sin 2x < 0 in places) but never goes below its first image
    falls back to the start-grid sum."""
    start = dgref.mixture_1d((0.0,), (1.0,))
    flow = grid_flow(lambda x, s: x / (1 + s[:, None] ** 2), start, num_points=33, num_steps=4)
    assert flow.method == "output" and flow.monotone

    def fold(x, s):
        return x + 3 * torch.sin(x) ** 2 * (x > 0)
    sig = torch.tensor([1.0, 0.0], dtype=DT)
    f = grid_flow(fold, start, num_points=201, sigmas=sig, width=4.0)
    x0 = torch.linspace(-4 * math.sqrt(2), 4 * math.sqrt(2), 201, dtype=DT)
    assert f.method == "start" and not f.monotone and bool(f.log_density.isnan().all())
    torch.testing.assert_close(f.x, x0, rtol=0, atol=0)
    torch.testing.assert_close(f.y, fold(x0[:, None], None)[:, 0], rtol=0, atol=1e-15)


def test_toy_presets_in_float64_and_documented_defaults():
    m = dgref.mixture_1d((-1.1, 2.3), (0.3, 0.7), weights=[0.25, 0.75])
    assert torch.equal(m.means, torch.tensor([[-1.1], [2.3]], dtype=DT))
    assert torch.equal(m.variances, torch.tensor([[0.3], [0.7]], dtype=DT) ** 2)
    r = dgref.ring(4, weights=[0.1, 0.2, 0.3, 0.4])
    assert torch.equal(r.weights, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=DT))
    w = r.reweighted(weights=[0.4, 0.3, 0.2, 0.1])
    assert torch.equal(w.weights, torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=DT))
    assert torch.equal(w.variances, r.variances)
    # sigma defaults to 0 (the data law) in log_prob, posterior and score
    x = torch.tensor([[1.9, 0.1], [-0.2, 1.7], [0.3, -0.4]], dtype=DT)
    for f in (r.log_prob, r.posterior, r.score):
        torch.testing.assert_close(f(x), f(x, 0.0), rtol=0, atol=0)
        assert not torch.allclose(f(x), f(x, 1.0))


def test_grid_world_warns_nothing():
    """meshgrid is called with its indexing: without it torch warns (and a later release will
    require it)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = dgref.grid_world(2, 1.0)
    assert g.means.tolist() == [[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]]


def test_mixture_construction_edges():
    GM = dgref.GaussianMixture
    m = GM([0.0, 1.0, 3.0])                                   # 1-D means: K components, dim 1
    assert m.means.shape == (3, 1) and m.dim == 1 and m.num_components == 3
    assert torch.equal(m.weights, torch.full((3,), 1 / 3, dtype=DT))
    assert torch.equal(m.variances, torch.ones(3, 1, dtype=DT))
    GM([[0.0], [1.0]], [1.0, 0.0])                            # a zero weight is allowed
    GM([[0.0], [1.0]], [0.5, 0.5 + 5e-7])                     # the sum within 1e-6
    with pytest.raises(ValueError, match=r"^weights must sum to 1, got sum 1.000002"):
        GM([[0.0], [1.0]], [0.5, 0.5 + 2e-6])
    with pytest.raises(ValueError, match=r"^weights must sum to 1, got sum 0.999998"):
        GM([[0.0], [1.0]], [0.5, 0.5 - 2e-6])
    with pytest.raises(ValueError, match=r"^weights must be finite and >= 0"):
        GM([[0.0], [1.0]], [math.nan, 1.0])
    with pytest.raises(ValueError, match=r"^weights must be finite and >= 0"):
        GM([[0.0], [1.0]], [math.inf, 1.0])
    d = GM(torch.zeros(2, 3), None, torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]]))
    assert torch.equal(d.variances, torch.tensor([[1.0, 4.0, 9.0], [0.25, 0.25, 0.25]], dtype=DT))
    iso = GM(torch.zeros(2, 3), None, [2.0, 0.5])
    assert torch.equal(iso.variances, torch.tensor([[4.0] * 3, [0.25] * 3], dtype=DT))
    with pytest.raises(ValueError, match=r"^stds must be a number, \(2,\) or \(2, 3\), got \(2, 2\)"):
        GM(torch.zeros(2, 3), None, torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"^stds of shape \(K,\) must have K=2 entries, got \(3,\)"):
        GM(torch.zeros(2, 3), None, [1.0, 1.0, 1.0])
    for bad in (math.inf, math.nan, -1.0):
        with pytest.raises(ValueError, match=r"^stds must be finite and > 0"):
            GM(torch.zeros(2, 3), None, bad)
    with pytest.raises(ValueError, match=r"^labels must have shape \(2,\), got \(3,\)"):
        GM(torch.zeros(2, 3), labels=[0, 1, 2])
    assert GM(torch.zeros(2, 3)).labels is None


def test_mixture_sample_takes_sigma_as_a_number_or_a_0d_tensor():
    r = dgref.ring()
    a = r.sample(6, 0.5, generator=_g(1))
    b = r.sample(6, torch.tensor(0.5), generator=_g(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"^sigma for sample\(\) must be a single number"):
        r.sample(6, torch.full((1,), 0.5), generator=_g(1))


def test_mixture_computes_in_the_dtype_of_x_after_another_dtype():
    r = dgref.ring()
    x64 = torch.tensor([[1.9, 0.1], [-0.2, 1.7]], dtype=DT)
    for first, second in ((x64, x64.float()), (x64.float(), x64)):
        r = dgref.ring()
        for x in (first, second):
            for f in (r.log_prob, r.posterior, r.score, r.denoise):
                out = f(x, 0.3)
                assert out.dtype == x.dtype
                torch.testing.assert_close(out.double(), f(x64, 0.3), rtol=1e-5, atol=1e-6)


def test_grid_kl_normalises_the_target_and_expect_ignores_zero_weights():
    start = dgref.mixture_1d((0.0,), (1.0,))
    flow = grid_flow(lambda x, s: x / (1 + s[:, None] ** 2), start, num_points=65, num_steps=4)
    from dgref.gridflow import GridFlow, grid_kl

    def lt(y):
        return -0.5 * y[:, 0] ** 2
    a = grid_kl(flow, lt, -12.0, 12.0)
    b = grid_kl(flow, lambda y: lt(y) + 5.0, -12.0, 12.0)      # unnormalised by e^5
    assert a == pytest.approx(b, abs=1e-9)
    f = GridFlow(torch.zeros(3, dtype=DT), torch.tensor([0.0, 1.0, 2.0], dtype=DT),
                 torch.tensor([0.5, 0.5, 0.0], dtype=DT), torch.zeros(3, dtype=DT), True)
    assert f.expect(lambda y: 1 / (2.0 - y[:, 0])) == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)


def test_grid_flow_backward_newton_stops_at_convergence():
    """The backward inversion stops each point once Newton has converged: a two-mode class
    (26 points inserted in the gap) costs 76 denoiser calls; a point that kept iterating to
    max_iter = 60 would cost hundreds."""
    p = dgref.mixture_1d((-2.0, 2.0), (0.5, 0.5))
    calls = []

    def D(x, s):
        calls.append(x.shape[0])
        return p(x, s)
    f = grid_flow(D, p, num_points=201, num_steps=8)
    assert f.method == "output" and f.y.numel() > 201          # points were inserted
    assert len(calls) <= 2 * 76, len(calls)


def test_grid_flow_backward_inversion_cost_is_exact():
    """The same flow costs exactly 76 denoiser calls: a bracket from the wrong trajectories
    (the secant start off the root) or a looser or stricter Newton stop changes the count."""
    p = dgref.mixture_1d((-2.0, 2.0), (0.5, 0.5))
    calls = []

    def D(x, s):
        calls.append(x.shape[0])
        return p(x, s)
    grid_flow(D, p, num_points=201, num_steps=8)
    assert len(calls) == 76


def test_labelled_world_class_labels_alias_subsets_and_dtype():
    pair = dgref.gaussian_pair(2.0, 0.5, weights=[0.3, 0.7])
    x = torch.tensor([[-1.2], [0.1], [0.9]], dtype=DT)
    lab = torch.tensor([1, 0, 2])
    torch.testing.assert_close(pair(x, 0.4, class_labels=lab), pair(x, 0.4, lab), rtol=0, atol=0)
    assert not torch.allclose(pair(x, 0.4, class_labels=lab), pair(x, 0.4))
    assert pair.class_world(1).labels.tolist() == [1]
    for f in (pair.log_prob, lambda x, s: pair.denoise(x, s, lab), pair.log_classifier):
        out = f(x.float(), 0.4)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), f(x, 0.4), rtol=1e-5, atol=1e-6)


def test_grid_flow_ignores_the_start_law_normalisation_and_defaults():
    """The start density is normalised on the grid: a start law known up to a constant gives
    the same flow (inserted points included); the fallback has mass NaN; grid_kl's default
    grid has 20001 points."""
    p = dgref.mixture_1d((-2.0, 2.0), (0.5, 0.5))

    class Shifted:
        dim = 1

        def log_prob(self, x, sigma=0.0):
            return p.log_prob(x, sigma) + 3.0

        def mean(self):
            return p.mean()

        def std(self):
            return p.std()
    a = grid_flow(p, p, num_points=201, num_steps=8)
    b = grid_flow(p, Shifted(), num_points=201, num_steps=8)
    assert a.y.numel() > 201
    torch.testing.assert_close(b.log_density, a.log_density, rtol=0, atol=1e-9)
    torch.testing.assert_close(b.weights, a.weights, rtol=0, atol=1e-12)
    from dgref.gridflow import grid_kl

    def lt(y):
        return p.log_prob(y)
    assert grid_kl(a, lt, -6.0, 6.0) == grid_kl(a, lt, -6.0, 6.0, 20001)
    fold = grid_flow(lambda x, s: x + 3 * torch.sin(x) ** 2 * (x > 0), dgref.mixture_1d((0.0,), (1.0,)),
                     num_points=51, sigmas=torch.tensor([1.0, 0.0], dtype=DT), width=4.0)
    assert fold.method == "start" and math.isnan(fold.mass)


def test_grid_density_trapezoid_weights():
    """Trapezoid weights 1/2 at both ends: with log q = y on [0, 1] and 3 points the
    normaliser is (1/2 + e^(1/2) + e/2) / 2."""
    from dgref.gridflow import grid_density
    y, log_q, mean, var = grid_density(lambda y: y[:, 0], 0.0, 1.0, 3)
    Z = (0.5 + math.exp(0.5) + 0.5 * math.e) / 2
    torch.testing.assert_close(log_q, y - math.log(Z), rtol=0, atol=1e-15)
    w = torch.tensor([0.25, 0.5, 0.25], dtype=DT) * y.exp() / Z
    assert mean == pytest.approx(float((w * y).sum()), rel=1e-14)


def test_grid_w1_counts_no_mass_below_the_lowest_point():
    """W1 between the uniform law on {1, 2, 3} and U(0, 4): F_q is 0 below 1."""
    from dgref.gridflow import GridFlow
    f = GridFlow(torch.zeros(3, dtype=DT), torch.tensor([1.0, 2.0, 3.0], dtype=DT),
                 torch.full((3,), 1 / 3, dtype=DT), torch.zeros(3, dtype=DT), True)
    u = torch.linspace(0.0, 4.0, 400001, dtype=DT)
    F_q = (u[:, None] >= f.y[None]).double().sum(1) / 3
    ref = float(torch.trapezoid((F_q - u / 4).abs(), u))
    got = grid_w1(f, lambda y: torch.zeros(y.shape[0], dtype=DT), 0.0, 4.0, 40001)
    assert got == pytest.approx(ref, abs=1e-4)


# --------------------------------------------------------------------------------------------
# Session 3, the full run of dgref/labelled.py (all 911 mutants)
# --------------------------------------------------------------------------------------------
def test_labelled_ring_angles_and_one_mode_per_class():
    lr = labelled_ring(num_modes=6, num_classes=3, radius=1.5)
    ang = torch.arange(6, dtype=DT) * (2 * math.pi / 6)
    torch.testing.assert_close(lr.base.means, 1.5 * torch.stack([ang.cos(), ang.sin()], 1),
                               rtol=0, atol=1e-15)
    one = labelled_ring(num_modes=3, num_classes=3)       # num_classes == num_modes is allowed
    assert one.num_classes == 3 and one.base.labels.tolist() == [0, 1, 2]


def test_three_classes_spacing_in_float64_and_weights_passed_on():
    t3 = three_classes_1d(spacing=0.1, weights=[0.2, 0.3, 0.5])
    assert t3.base.means.flatten().tolist() == [-0.1, 0.0, 0.1]
    torch.testing.assert_close(t3.prior, torch.tensor([0.2, 0.3, 0.5], dtype=DT), rtol=0,
                               atol=1e-15)


def test_log_prob_and_posterior_default_to_sigma_zero():
    x = torch.tensor([[-1.0], [0.2], [1.4]], dtype=DT)
    w = three_classes_1d()
    torch.testing.assert_close(w.log_prob(x), w.log_prob(x, 0.0), rtol=0, atol=0)
    assert not torch.allclose(w.log_prob(x), w.log_prob(x, 1.0))
    u = UniformIntervals([[0.0, 1.0], [0.5, 3.0]], [0.4, 0.6])
    x = torch.tensor([[0.2], [0.7], [1.4]], dtype=DT)          # in the support: finite at 0
    torch.testing.assert_close(u.posterior(x), u.posterior(x, 0.0), rtol=0, atol=0)
    assert not torch.allclose(u.posterior(x), u.posterior(x, 1.0))


def _uniform_density(iv, w, x, s):
    """Closed form p_sigma(x) = sum_k w_k (Phi((b-x)/s) - Phi((a-x)/s)) / (b - a)."""
    def Phi(z):
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))
    return sum(wk * (Phi((b - x) / s) - Phi((a - x) / s)) / (b - a) for (a, b), wk in zip(iv, w))


def test_uniform_intervals_density_in_closed_form_with_unequal_lengths_and_weights():
    iv, w = [[0.0, 1.0], [0.5, 3.0]], [0.4, 0.6]
    u = UniformIntervals(iv, w)
    # sigma = 0: piecewise constant, both ends of each interval inside
    x0 = torch.tensor([[0.0], [0.2], [0.5], [1.0], [3.0], [3.5]], dtype=DT)
    dens0 = u.log_prob(x0).exp()
    torch.testing.assert_close(dens0, torch.tensor([0.4, 0.4, 0.64, 0.64, 0.24, 0.0], dtype=DT),
                               rtol=1e-14, atol=0)
    for s, xs in ((0.05, [0.3, 0.8, 0.98, 2.0, 3.02]), (0.7, [-1.0, 0.3, 0.8, 2.0, 4.5])):
        got = u.log_prob(torch.tensor(xs, dtype=DT)[:, None], s).exp()
        want = torch.tensor([_uniform_density(iv, w, x, s) for x in xs], dtype=DT)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_uniform_intervals_compute_in_the_dtype_of_x():
    u = UniformIntervals([[0.0, 1.0], [0.5, 3.0]], [0.4, 0.6])
    x = torch.tensor([[0.2], [1.4]])
    for s in (0.0, 0.5):
        assert u.log_prob(x, s).dtype == torch.float32
        assert u.denoise(x, s).dtype == torch.float32
        assert u.posterior(x, s).dtype == torch.float32


def test_uniform_intervals_construction_edges():
    with pytest.raises(ValueError, match=r"^intervals must have a < b in every row"):
        UniformIntervals([[0.0, 1.0], [1.0, 1.0]])
    u3 = UniformIntervals([[0.0, 1.0], [1.0, 2.0], [2.0, 3.0]])
    assert u3.weights.dtype == DT and u3.weights.tolist() == [1 / 3] * 3
    sub = u3.subset(torch.tensor([True, False, True]))
    assert sub.labels is None and sub.intervals.tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert sub.weights.tolist() == [0.5, 0.5]


def test_uniform_classes_intervals_in_float64_one_class_each():
    uc = uniform_classes_1d(((0.1, 0.3), (0.7, 0.9), (1.1, 1.3)))
    assert uc.num_classes == 3 and uc.base.labels.tolist() == [0, 1, 2]
    assert uc.base.intervals.tolist() == [[0.1, 0.3], [0.7, 0.9], [1.1, 1.3]]


def test_labelled_world_sample_passes_sigma_on():
    for w in (three_classes_1d(), uniform_classes_1d()):
        x, c = w.sample(50, 0.5, generator=_g(21), dtype=DT)
        xb, k = w.base.sample(50, 0.5, generator=_g(21), return_components=True, dtype=DT)
        torch.testing.assert_close(x, xb, rtol=0, atol=0)
        assert c.tolist() == w.base.labels[k].tolist()


def test_gaussian_pair_means_in_float64():
    gp = dgref.gaussian_pair(separation=0.2)
    assert gp.base.means.flatten().tolist() == [-0.1, 0.1]


def test_class_sample_dtype_and_classifier_defaults():
    w = three_classes_1d()
    assert w.class_sample(1, 4, generator=_g(22)).dtype == torch.float32
    x = torch.tensor([[-1.0], [0.2], [1.4]], dtype=DT)
    for f in (w.classifier, w.log_classifier, w.class_log_prob):
        torch.testing.assert_close(f(x), f(x, 0.0), rtol=0, atol=0)
        assert not torch.allclose(f(x), f(x, 1.0))


def test_uniform_intervals_weight_and_label_checks():
    iv = [[0.0, 1.0], [2.0, 3.0]]
    with pytest.raises(ValueError, match=r"^weights must be finite and >= 0"):
        UniformIntervals(iv, [1.5, -0.5])
    with pytest.raises(ValueError, match=r"^weights must sum to 1"):
        UniformIntervals(iv, [0.5, 0.6])
    assert UniformIntervals(iv, [1.0, 0.0]).weights.tolist() == [1.0, 0.0]   # a zero weight
    lab = UniformIntervals(iv, labels=torch.tensor([0.0, 1.0])).labels
    assert lab.dtype == torch.long and lab.tolist() == [0, 1]


def test_labelled_gaussian_log_prob_in_closed_form():
    """The Gaussian pair (means -+1, std 0.5, weights 0.3/0.7) noised to sigma: a 1-D mixture
    of N(-+1, 0.25 + sigma^2); and the labelled ring's log-density in 2-D."""
    w = dgref.gaussian_pair(weights=[0.3, 0.7])
    xs = [-1.3, 0.1, 0.9]
    for s in (0.0, 0.6):
        v = 0.25 + s * s
        want = [math.log(sum(wk * math.exp(-(x - m) ** 2 / (2 * v)) / math.sqrt(2 * math.pi * v)
                             for wk, m in ((0.3, -1.0), (0.7, 1.0)))) for x in xs]
        torch.testing.assert_close(w.log_prob(torch.tensor(xs, dtype=DT)[:, None], s),
                                   torch.tensor(want, dtype=DT), rtol=1e-13, atol=0)
    lr = labelled_ring()
    x = torch.tensor([[0.5, -0.3], [1.9, 0.1]], dtype=DT)
    v = 0.09 + 0.4 ** 2
    d2 = ((x[:, None, :] - lr.base.means[None]) ** 2).sum(-1)
    want = torch.logsumexp(-d2 / (2 * v) - math.log(2 * math.pi * v) + math.log(1 / 6), 1)
    torch.testing.assert_close(lr.log_prob(x, 0.4), want, rtol=1e-13, atol=0)


def test_labelled_world_zero_prior_class_and_class_index_bound():
    with pytest.raises(ValueError, match=r"^every class needs positive prior mass"):
        dgref.LabelledWorld(UniformIntervals([[0.0, 1.0], [2.0, 3.0]], [1.0, 0.0], labels=[0, 1]))
    w = three_classes_1d()
    with pytest.raises(ValueError, match=r"^c must be in 0\.\.2, got 3"):
        w.class_world(3)


# --------------------------------------------------------------------------------------------
# Session 3, the full run of dgref/gridflow.py (all 939 mutants)
# --------------------------------------------------------------------------------------------
def _step_map():
    from dgref.gridflow import _Steps
    calls = []

    def D(x, s):                          # a nonlinear, increasing step map
        calls.append(x.shape[0])
        return x / (1 + s[:, None] ** 2) + 0.2 * torch.tanh(x)
    return _Steps(D, None, [2.0, 0.5, 0.0], 1e-5), calls


def test_invert_step_root_slope_and_newton_iterations():
    """S_0(x) = z inside three brackets: the root to rounding (against 200 bisections), in
    three Newton iterations from the secant start (2 denoiser calls each, Heun); with
    max_iter = 1 the slope returned is the one at the returned point."""
    from dgref.gridflow import _invert_step
    st, calls = _step_map()
    lo = torch.tensor([-1.0, 0.1, 0.5], dtype=DT)
    hi = torch.tensor([-0.5, 0.3, 3.0], dtype=DT)
    slo, shi = st(0, lo), st(0, hi)
    z = slo + torch.tensor([0.3, 0.6, 0.9], dtype=DT) * (shi - slo)
    a, b = lo.clone(), hi.clone()
    for _ in range(200):
        m = 0.5 * (a + b)
        r = st(0, m) - z
        a, b = torch.where(r <= 0, m, a), torch.where(r > 0, m, b)
    calls.clear()
    x, slope = _invert_step(st, 0, z, lo.clone(), hi.clone(), slo, shi)
    assert len(calls) == 6
    torch.testing.assert_close(x, 0.5 * (a + b), rtol=0, atol=4.5e-16)
    torch.testing.assert_close(slope, st.with_slope(0, x)[1], rtol=1e-9, atol=0)
    calls.clear()
    x1, s1 = _invert_step(st, 0, z, lo.clone(), hi.clone(), slo, shi, max_iter=1)
    assert len(calls) == 4                                   # one iteration, then the slope
    torch.testing.assert_close(s1, st.with_slope(0, x1)[1], rtol=0, atol=0)


class _BisectOnly:
    """A step map S(x) = x^p whose slope is NaN: every Newton step is rejected, so
    _invert_step bisects; counts its evaluations."""
    def __init__(self, p, t):
        self.p, self.t, self.calls = p, [t], 0

    def with_slope(self, k, x):
        self.calls += 1
        return x ** self.p, torch.full_like(x, math.nan)


def test_invert_step_bisection_stop_rule_and_iteration_cap():
    from dgref.gridflow import _invert_step
    # x^2 = 8 in [0, 4]: secant start 2, then bisection; the iterate 3 has residual exactly 1
    st = _BisectOnly(2, 1.0)
    z = torch.tensor([8.0], dtype=DT)
    x, _ = _invert_step(st, 0, z, torch.tensor([0.0], dtype=DT), torch.tensor([4.0], dtype=DT),
                        torch.tensor([0.0], dtype=DT), torch.tensor([16.0], dtype=DT))
    assert abs(float(x) - math.sqrt(8)) <= 4e-16 * (math.sqrt(8) + 1.0)
    # the bracket stops below 4e-16 (|x| + t_k): 2 / 2^n <= 4e-16 (sqrt(8) + 1), n = 51 halvings
    assert st.calls == 52, st.calls
    # x^3 = 3 in [-1e4, 1e4] with t_k = 1e-3: the bracket cannot reach 4e-16 (|x| + t_k) in 60
    # halvings (2e4 / 2^60 = 1.7e-14), so the iteration stops at max_iter = 60, then evaluates
    # the slope at the last point
    st = _BisectOnly(3, 1e-3)
    x, _ = _invert_step(st, 0, torch.tensor([3.0], dtype=DT), torch.tensor([-1e4], dtype=DT),
                        torch.tensor([1e4], dtype=DT), torch.tensor([-1e12], dtype=DT),
                        torch.tensor([1e12], dtype=DT))
    assert st.calls == 61 and abs(float(x) - 3 ** (1 / 3)) < 1e-13


def test_grid_w1_counts_points_at_a_grid_node_and_default_nodes():
    """A point mass at 0.25 against the uniform law on [0, 1], 5 nodes (0, 0.25, ..., 1): the
    output CDF counts points y <= u, so F_q = (0, 1, 1, 1, 1) against F_t = u and the trapezoid
    of |F_q - F_t| is 0.25 (0.75 + 0.5 + 0.25) = 0.375."""
    from dgref.gridflow import GridFlow
    one = torch.ones(1, dtype=DT)
    flow = GridFlow(0.25 * one, 0.25 * one, one, 0 * one, True)
    flat = lambda y: torch.zeros(y.shape[0], dtype=DT)        # noqa: E731
    assert grid_w1(flow, flat, 0.0, 1.0, num_points=5) == pytest.approx(0.375, abs=1e-15)
    assert grid_w1(flow, flat, 0.0, 1.0) == grid_w1(flow, flat, 0.0, 1.0, num_points=20001)


def test_grid_flow_entropy_ignores_zero_weight_points():
    from dgref.gridflow import GridFlow
    y = torch.tensor([0.0, 1.0, 2.0], dtype=DT)
    flow = GridFlow(y, y, torch.tensor([0.5, 0.5, 0.0], dtype=DT),
                    torch.tensor([math.log(0.5), math.log(0.5), -math.inf], dtype=DT), True)
    assert flow.entropy() == pytest.approx(math.log(2), rel=1e-15)


def test_grid_flow_defaults_and_smallest_arguments():
    p = dgref.mixture_1d((-2.0, 2.0), (0.5, 0.5))
    f = grid_flow(p, p, num_points=41)
    same = grid_flow(p, p, num_points=41, num_steps=32, exact_jacobian=False,
                     check_finite=True, gap_factor=4.0)
    torch.testing.assert_close(f.log_density, same.log_density, rtol=0, atol=0)
    torch.testing.assert_close(f.y, same.y, rtol=0, atol=0)
    for other in (dict(num_steps=33), dict(exact_jacobian=True)):
        g = grid_flow(p, p, num_points=41, **other)
        assert g.y.shape != f.y.shape or not torch.equal(g.log_density, f.log_density), other
    # the smallest start grid (3 points) and gap_factor = 1 are allowed
    assert grid_flow(p, p, num_points=3, num_steps=2).y.numel() >= 3
    assert grid_flow(p, p, num_points=41, num_steps=2, gap_factor=1.0).monotone
    # a diverging denoiser is an error by default
    with pytest.raises(dgref.NonFiniteError, match=r"^the sampler produced"):
        grid_flow(lambda x, s: x / 0.0, p, num_points=5, num_steps=2)


def test_step_slope_central_difference_step_is_fd_rel_times_t():
    """Step maps' slopes by a central difference with step fd_rel * t_k: at t_k = 0.01 the
    step is 1e-7 and the slope of S(x) = D(x; 0.01) is within 2e-8 of the exact derivative."""
    from dgref.gridflow import _Steps
    st = _Steps(lambda x, s: x / (1 + s[:, None] ** 2) + 0.2 * torch.tanh(x), None,
                [0.01, 0.0], 1e-5)
    x = torch.tensor([-0.7, 0.1, 1.3], dtype=DT)
    exact = 1 / (1 + 0.01 ** 2) + 0.2 * (1 - torch.tanh(x) ** 2)
    torch.testing.assert_close(st.with_slope(0, x)[1], exact, rtol=0, atol=2e-8)


def test_grid_flow_inserts_the_fewest_uniform_points_into_wide_gaps():
    """h = (max y - min y) / (M - 1) over the images of the start grid; a gap wider than
    gap_factor * h gets ceil(gap / h) - 1 equally spaced points (spacing <= h), others none."""
    p = dgref.mixture_1d((-2.0, 2.0), (0.5, 0.5))
    M = 41
    f = grid_flow(p, p, num_points=M, num_steps=8)
    m, half = 0.0, 12.0 * math.sqrt(p.std() ** 2 + 80.0 ** 2)
    x0 = torch.linspace(m - half, m + half, M, dtype=DT)
    img = torch.isin(f.x, x0)
    assert int(img.sum()) == M
    pos = img.nonzero().flatten()
    yf = f.y[pos]
    h = float(yf[-1] - yf[0]) / (M - 1)
    inserted = 0
    for i in range(M - 1):
        gap = float(yf[i + 1] - yf[i])
        n = int(pos[i + 1] - pos[i]) - 1
        want = math.ceil(gap / h) - 1 if gap > 4.0 * h else 0
        assert n == want, (i, gap / h, n)
        if n:
            inner = f.y[pos[i]:pos[i + 1] + 1]
            torch.testing.assert_close(inner[1:] - inner[:-1],
                                       torch.full((n + 1,), gap / (n + 1), dtype=DT),
                                       rtol=1e-9, atol=0)
        inserted += n
    assert inserted > 0


def test_grid_flow_falls_back_when_images_tie():
    """D = 0: the last Euler step sends every start point to 0, so the images tie: no output
    density, the start-grid fallback with monotone False."""
    p = dgref.mixture_1d((0.0,), (1.0,))
    f = grid_flow(lambda x, s: torch.zeros_like(x), p, num_points=9, num_steps=2)
    assert f.method == "start" and f.monotone is False


def test_grid_flow_backward_points_map_forward_and_weights_sum_to_one():
    """Every output point's start x maps forward through the discrete sampler to its y (the
    inserted points were integrated backwards through every step); the weights sum to 1; at
    the ends of split gaps log_density uses the exact step slopes, as exact_jacobian does."""
    from dgref.edm import _sampler_levels
    from dgref.gridflow import _Steps
    p = dgref.mixture_1d((-2.0, 2.0), (0.5, 0.5))
    f = grid_flow(p, p, num_points=41, num_steps=8)
    fe = grid_flow(p, p, num_points=41, num_steps=8, exact_jacobian=True)
    assert float(f.weights.sum()) == pytest.approx(1.0, abs=1e-13)
    st = _Steps(p, None, _sampler_levels(None, 8, 0.002, 80.0, 7.0), 1e-5)
    x = f.x.clone()
    for k in range(8):
        x = st(k, x)
    torch.testing.assert_close(x, f.y, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(f.y, fe.y, rtol=0, atol=0)
    m, half = 0.0, 12.0 * math.sqrt(p.std() ** 2 + 80.0 ** 2)
    pos = torch.isin(f.x, torch.linspace(m - half, m + half, 41, dtype=DT)).nonzero().flatten()
    wide = (pos[1:] - pos[:-1] > 1).nonzero().flatten()          # gaps with inserted points
    ends = torch.unique(torch.cat([pos[wide], pos[wide + 1]]))
    assert ends.numel() > 0
    torch.testing.assert_close(f.log_density[ends], fe.log_density[ends], rtol=0, atol=1e-12)
    # the images just outside the split gaps' ends keep the grid derivative (0.08 off here)
    for i in (pos[wide[0] - 1], pos[wide[-1] + 2]):
        assert abs(float(f.log_density[i] - fe.log_density[i])) > 1e-3


def _check_inserted(f, M, gap_factor):
    x0 = torch.linspace(f.x.min().item(), f.x.max().item(), M, dtype=DT)
    pos = torch.isin(f.x, x0).nonzero().flatten()
    assert pos.numel() == M
    yf = f.y[pos]
    h = float(yf[-1] - yf[0]) / (M - 1)
    ratios = (yf[1:] - yf[:-1]) / h
    n = pos[1:] - pos[:-1] - 1
    want = torch.where(ratios > gap_factor, torch.ceil(ratios).long() - 1, 0)
    assert torch.equal(n, want), (ratios, n)
    return ratios


def test_grid_flow_gap_threshold_uses_h_over_the_whole_image_range():
    """Three modes, 61 points: the gap nearest the threshold is split with gap_factor just
    below its ratio gap / h and not just above (h = (y_max - y_min) / (M - 1))."""
    p = dgref.mixture_1d((-3.0, 0.0, 3.0), (0.4, 0.4, 0.4))
    ratios = _check_inserted(grid_flow(p, p, num_points=61, num_steps=8), 61, 4.0)
    r = float(ratios[(ratios > 1.5) & (ratios < 4.0)].min())
    below = _check_inserted(grid_flow(p, p, num_points=61, num_steps=8,
                                      gap_factor=r * (1 - 1e-6)), 61, r * (1 - 1e-6))
    above = _check_inserted(grid_flow(p, p, num_points=61, num_steps=8,
                                      gap_factor=r * (1 + 1e-6)), 61, r * (1 + 1e-6))
    assert (below > r * (1 - 1e-6)).sum() > (above > r * (1 + 1e-6)).sum()


class _NanTail:
    """A 1-D start law whose log-density is NaN far in the right tail (a broken user law)."""
    def __init__(self, p):
        self.p = p

    def log_prob(self, x, sigma=0.0):
        lp = self.p.log_prob(x, sigma)
        return torch.where(x[:, 0] > 300.0, torch.full_like(lp, math.nan), lp)

    def mean(self):
        return self.p.mean()

    def std(self):
        return self.p.std()


def test_grid_flow_with_a_nan_density_is_not_monotone():
    p = dgref.mixture_1d((-2.0, 2.0), (0.5, 0.5))
    f = grid_flow(p, _NanTail(p), num_points=41, num_steps=4)
    assert f.method == "output" and f.monotone is False
