"""Digit images, the U-Net, the image discriminator, sample metrics and the on-disk cache."""
import math

import pytest
import torch

import dgref
from dgref.cache import (CacheConfigError, cache_path, cached, default_cache_dir, load_cached,
                         save_cached)
from dgref.digits import (ImageDiscriminator, UNet, generate_images, image_grid,
                          load_digit_images, unet_denoiser)
from dgref.metrics import (DigitClassifier, bootstrap_interval, class_histogram,
                           classifier_accuracy, evaluate_samples, frechet_distance,
                           gaussian_frechet_distance, kernel_distance,
                           precision_recall, total_variation, train_classifier,
                           wilson_interval)


# ------------------------------------------------------------------------------------ data

def test_digits_shape_range_and_split():
    d = load_digit_images(8, heldout_fraction=0.2, seed=0)
    assert d.x_train.shape == (1438, 1, 8, 8) and d.x_heldout.shape == (359, 1, 8, 8)
    assert d.y_train.shape == (1438,) and d.y_heldout.dtype == torch.long
    both = torch.cat([d.x_train, d.x_heldout])
    assert float(both.min()) == -1.0 and float(both.max()) == 1.0
    # pixel values 0..16 map to v/8 - 1: a grid of multiples of 1/8
    assert torch.allclose(both * 8, (both * 8).round())
    assert set(torch.cat([d.y_train, d.y_heldout]).tolist()) == set(range(10))


def test_digits_split_is_deterministic_and_disjoint():
    a, b = load_digit_images(8, seed=3), load_digit_images(8, seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_heldout, b.y_heldout)
    c = load_digit_images(8, seed=4)
    assert not torch.equal(a.x_train, c.x_train)
    # no held-out image equals a training image row-for-row by index: the split is a partition
    flat_tr = a.x_train.flatten(1)
    flat_he = a.x_heldout.flatten(1)
    assert flat_tr.shape[0] + flat_he.shape[0] == 1797


def test_digits_upsampled_16():
    d8, d16 = load_digit_images(8, seed=0), load_digit_images(16, seed=0)
    assert d16.x_train.shape == (1438, 1, 16, 16)
    assert float(d16.x_train.min()) >= -1.0 and float(d16.x_train.max()) <= 1.0
    assert torch.equal(d8.y_train, d16.y_train)
    # bilinear 2x upsampling (align_corners=False) averages, over each 2x2 output block, to
    # the separable kernel [1/8, 3/4, 1/8] applied to the 8x8 image with replicated borders
    pooled = torch.nn.functional.avg_pool2d(d16.x_train, 2)
    k = torch.tensor([0.125, 0.75, 0.125])
    padded = torch.nn.functional.pad(d8.x_train, (1, 1, 1, 1), mode="replicate")
    expect = torch.nn.functional.conv2d(padded, (k[:, None] * k[None, :])[None, None])
    assert torch.allclose(pooled, expect, atol=1e-6)


@pytest.mark.parametrize("bad, match", [({"image_size": 4}, "image_size"),
                                        ({"heldout_fraction": 1.5}, "heldout_fraction"),
                                        ({"seed": -1}, "seed")])
def test_digits_validation(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        load_digit_images(**bad)


# ------------------------------------------------------------------------------------ nets

@pytest.mark.parametrize("size, channels", [(8, (8, 16)), (16, (8, 16, 16))])
def test_unet_shape_and_precond(size, channels):
    torch.manual_seed(0)
    net = UNet(size, channels=channels)
    assert len(net.down) == len(channels)
    x = torch.randn(3, 1, size, size)
    c_noise = torch.log(torch.tensor([0.1, 1.0, 10.0])) / 4
    assert net(x, c_noise).shape == x.shape
    # the output layer starts at zero, so the preconditioned denoiser starts as c_skip x
    den = dgref.EDMPrecond(net, 0.5)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    assert torch.allclose(den(x, sigma), c_skip[:, None, None, None] * x, atol=1e-6)
    # after a perturbation of the output layer, D = c_skip x + c_out F(c_in x, c_noise)
    torch.nn.init.normal_(net.out.weight, std=0.1)
    c_out = sigma * 0.5 / (sigma ** 2 + 0.25).sqrt()
    c_in = 1 / (sigma ** 2 + 0.25).sqrt()
    expect = (c_skip[:, None, None, None] * x
              + c_out[:, None, None, None] * net(c_in[:, None, None, None] * x, c_noise))
    assert torch.allclose(den(x, sigma), expect, atol=1e-5)


def test_unet_rejects_bad_size():
    with pytest.raises(ValueError, match="image_size"):
        UNet(6, channels=(8, 16, 16))


def test_image_discriminator_logits_and_smooth_gradient():
    torch.manual_seed(0)
    disc = ImageDiscriminator(8, channels=(8, 16))
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    sigma = torch.full((4,), 0.7)
    logits = disc(x, sigma)
    assert logits.shape == (4,)
    (g,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    assert g.shape == x.shape
    # double backprop works (the KL objective needs it) and gives a nonzero parameter gradient
    g.pow(2).sum().backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in disc.parameters())
    with pytest.raises(ValueError, match="sigma"):
        disc(x, torch.full((3,), 0.7))


def test_generate_images_independent_of_batch_size():
    torch.manual_seed(0)
    den = unet_denoiser(8, channels=(8, 16))
    torch.nn.init.normal_(den.net.out.weight, std=0.05)
    kw = dict(num_steps=4, sigma_max=5.0)
    a = generate_images(den, 7, generator=torch.Generator().manual_seed(1), batch_size=7, **kw)
    b = generate_images(den, 7, generator=torch.Generator().manual_seed(1), batch_size=3, **kw)
    assert a.shape == (7, 1, 8, 8) and float(a.abs().max()) <= 1.0
    assert torch.allclose(a, b, atol=1e-5)


def test_image_grid_shape():
    g = image_grid(torch.zeros(12, 1, 8, 8), nrow=5, pad=1)
    assert g.shape == (3 * 9 + 1, 5 * 9 + 1)
    assert float(g[1, 1]) == 0.5 and float(g[0, 0]) == 1.0


# ------------------------------------------------------------------------------------ metrics

def _gaussian(n, mu, L, gen):
    return mu + torch.randn(n, mu.shape[0], generator=gen, dtype=torch.float64) @ L.T


def test_gaussian_frechet_closed_forms(gen):
    d = 5
    A = torch.randn(d, d, generator=gen, dtype=torch.float64)
    C = A @ A.T + 0.1 * torch.eye(d, dtype=torch.float64)
    mu = torch.randn(d, generator=gen, dtype=torch.float64)
    shift = torch.randn(d, generator=gen, dtype=torch.float64)
    # identical Gaussians: 0; equal covariances: |mu diff|^2 exactly
    assert abs(gaussian_frechet_distance(mu, C, mu, C)) < 1e-9
    assert math.isclose(gaussian_frechet_distance(mu, C, mu + shift, C),
                        float(shift.pow(2).sum()), rel_tol=1e-9, abs_tol=1e-9)
    # commuting covariances: sum (sqrt(a) - sqrt(b))^2 over eigenvalues
    a, b = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64), torch.tensor(
        [4.0, 1.0, 9.0], dtype=torch.float64)
    z = torch.zeros(3, dtype=torch.float64)
    assert math.isclose(gaussian_frechet_distance(z, torch.diag(a), z, torch.diag(b)),
                        float((a.sqrt() - b.sqrt()).pow(2).sum()), rel_tol=1e-9)


def test_frechet_from_samples(gen):
    d, n = 4, 20000
    L = torch.tril(torch.rand(d, d, generator=gen, dtype=torch.float64)) + torch.eye(d)
    mu = torch.zeros(d, dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    a, b = _gaussian(n, mu, L, gen), _gaussian(n, mu, L, gen)
    c = _gaussian(n, mu + shift, L, gen)
    # same Gaussian: the estimate's bias is about tr(C)(1/n_a + 1/n_b)-sized; tolerance 0.02
    assert frechet_distance(a, b) < 0.02
    # shifted by `shift`: |shift|^2 = 5.25; sampling error of the mean difference ~ 0.05
    assert abs(frechet_distance(a, c) - 5.25) < 0.15


def test_kernel_distance_unbiased_and_positive(gen):
    d = 3
    L = torch.eye(d, dtype=torch.float64)
    mu = torch.zeros(d, dtype=torch.float64)
    # same distribution: mean over 30 replicates ~ 0 (the estimator is unbiased)
    vals = torch.tensor([kernel_distance(_gaussian(200, mu, L, gen), _gaussian(200, mu, L, gen))
                         for _ in range(30)])
    assert abs(float(vals.mean())) < 3 * float(vals.std()) / math.sqrt(30)
    assert float(vals.min()) < 0 < float(vals.max())           # it is unbiased, not clipped
    shifted = kernel_distance(_gaussian(200, mu, L, gen),
                              _gaussian(200, mu + 1.0, L, gen))
    assert shifted > 10 * float(vals.std())
    lo, hi = bootstrap_interval(kernel_distance, _gaussian(200, mu, L, gen),
                                _gaussian(200, mu + 1.0, L, gen), num_boot=50, generator=gen)
    assert 0 < lo < shifted * 2 and lo < hi


def test_precision_recall_limits(gen):
    d = 2
    L = torch.eye(d, dtype=torch.float64)
    mu = torch.zeros(d, dtype=torch.float64)
    real = _gaussian(500, mu, L, gen)
    p, r = precision_recall(real, real.clone(), k=3)
    assert p == 1.0 and r == 1.0
    far = _gaussian(500, mu + 100.0, L, gen)
    assert precision_recall(real, far, k=3) == (0.0, 0.0)
    # fakes collapsed onto one real point: precision 1, recall small
    collapsed = real[:1].repeat(500, 1) + 1e-6 * _gaussian(500, mu, L, gen)
    p, r = precision_recall(real, collapsed, k=3)
    assert p == 1.0 and r < 0.05


def test_class_histogram_and_tv():
    h = class_histogram(torch.tensor([0, 0, 1, 3]), 4)
    assert torch.allclose(h, torch.tensor([0.5, 0.25, 0.0, 0.25], dtype=torch.float64))
    logits = torch.eye(4)[[0, 0, 1, 3]]
    assert torch.equal(class_histogram(logits, 4), h)
    assert math.isclose(total_variation(h, torch.full((4,), 0.25, dtype=torch.float64)), 0.25)


def test_intervals(gen):
    x = torch.randn(400, generator=gen, dtype=torch.float64)[:, None]
    se = 1 / math.sqrt(400)
    for method in ("normal", "percentile"):
        lo, hi = bootstrap_interval(lambda s: float(s.mean()), x, num_boot=300, generator=gen,
                                    method=method)
        assert lo < float(x.mean()) < hi and 3.0 * se < hi - lo < 5.0 * se    # ~ 3.92 se
    # the normal interval is centred on the full-sample estimate
    lo, hi = bootstrap_interval(lambda s: float(s.mean()), x, num_boot=50, generator=gen)
    assert math.isclose((lo + hi) / 2, float(x.mean()), abs_tol=1e-12)
    lo, hi = wilson_interval(50, 100)
    assert lo < 0.5 < hi and math.isclose(0.5 - lo, hi - 0.5, rel_tol=1e-9)
    for k, n in ((0, 10), (10, 10), (0, 359), (359, 359), (1, 3)):
        lo, hi = wilson_interval(k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0 and lo < hi


def test_classifier_trains_and_evaluate_samples(gen):
    d = load_digit_images(8, seed=0)
    torch.manual_seed(0)
    clf = DigitClassifier(width=8, feature_dim=16)
    train_classifier(clf, d.x_train, d.y_train, steps=150, batch_size=64, lr=5e-3, generator=gen)
    acc = classifier_accuracy(clf, d.x_heldout, d.y_heldout)
    assert acc > 0.8                                              # chance is 0.1
    with torch.no_grad():
        fr, fh = clf.features(d.x_train).double(), clf.features(d.x_heldout).double()
        fn = clf.features(torch.rand(359, 1, 8, 8, generator=gen) * 2 - 1).double()
        lh = clf(d.x_heldout)
    freqs = class_histogram(d.y_train)
    real = evaluate_samples(fr, fh, lh, freqs, num_boot=50, generator=gen)
    noise = evaluate_samples(fr, fn, num_boot=50, generator=gen)
    assert real["n"] == 359 and "class_tv" in real and "class_tv" not in noise
    assert real["frechet_ci"][0] < real["frechet_ci"][1]
    assert noise["frechet_ci"][0] > 5 * real["frechet_ci"][1]
    assert real["precision"] > 0.8 and noise["precision"] < 0.2


# ------------------------------------------------------------------------------------ cache

def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("DGREF_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    assert default_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("DGREF_CACHE")
    assert default_cache_dir().parts[-2:] == ("_build", "cache")
    with pytest.raises(ValueError, match="name"):
        cache_path("../escape", tmp_path)


def test_cache_roundtrip_and_mismatch(tmp_path):
    net = torch.nn.Linear(3, 2)
    config = {"steps": 10, "channels": (8, 16), "lr": 1e-3, "nested": {"a": 1}}
    path = save_cached("model", config, {"state": net.state_dict(), "samples": torch.ones(2, 3),
                                         "note": "hi"}, tmp_path)
    assert path.exists() and not list(tmp_path.glob("*.tmp"))
    back = load_cached("model", {"steps": 10, "channels": [8, 16], "lr": 1e-3,
                                 "nested": {"a": 1}}, tmp_path)
    net2 = torch.nn.Linear(3, 2)
    net2.load_state_dict(back["state"])
    assert torch.equal(net2.weight, net.weight) and back["note"] == "hi"
    with pytest.raises(CacheConfigError, match=r"steps \(cached 10, requested 11\)") as err:
        load_cached("model", {**config, "steps": 11, "extra": True}, tmp_path)
    assert "extra" in str(err.value) and "nested" not in str(err.value)
    with pytest.raises(CacheConfigError, match=r"nested\.a"):
        load_cached("model", {**config, "nested": {"a": 2}}, tmp_path)
    with pytest.raises(FileNotFoundError, match="absent"):
        load_cached("absent", config, tmp_path)


def test_cache_survives_rerun_and_rebuilds_on_change(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"x": torch.full((2,), float(len(calls)))}

    a, hit_a = cached("entry", {"k": 1}, build, tmp_path)
    b, hit_b = cached("entry", {"k": 1}, build, tmp_path)           # a "rerun": loads
    assert (hit_a, hit_b) == (False, True) and len(calls) == 1
    assert torch.equal(a["x"], b["x"])
    messages = []
    c, hit_c = cached("entry", {"k": 2}, build, tmp_path, log=messages.append)
    assert not hit_c and len(calls) == 2 and float(c["x"][0]) == 2.0
    assert "k (cached 1, requested 2)" in messages[0]
    # a truncated file is rebuilt, not a crash
    cache_path("entry", tmp_path).write_bytes(b"garbage")
    _, hit_d = cached("entry", {"k": 2}, build, tmp_path, log=messages.append)
    assert not hit_d and len(calls) == 3


def test_cache_rejects_non_json_config(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        save_cached("bad", {"t": torch.ones(1)}, {}, tmp_path)


# ------------------------------------------------------------------------------------ pipeline

_TINY = {"classifier": {"width": 4, "feature_dim": 8, "steps": 3, "batch_size": 16},
         "denoiser": {"channels": [4, 8], "steps": 3, "batch_size": 16},
         "sampler": {"num_steps": 2},
         "samples": {"num_fake": 24, "num_eval": 24},
         "discriminator": {"channels": [4, 8], "steps": 2, "batch_size": 16},
         "metrics": {"num_boot": 4}}


def test_experiment_cache_survives_rerun(tmp_path):
    from dgref.image_experiment import (ImagesExperiment, format_loss_gap_table,
                                        format_metrics_table, images_config)
    cfg = images_config(True, seed=0, overrides=_TINY)
    first = ImagesExperiment(cfg, device="cpu", cache_dir=tmp_path, log=None)
    rows = first.run()
    assert not any(first.cache_hits.values())
    assert set(rows) == {"heldout", "base", "ce", "kl", "noise", "shuffled"}
    assert rows["base"]["n"] == 24 and "frechet_diff_ci" in rows["kl"]
    assert "KL-objective" in format_metrics_table(rows)
    # loss gaps of both discriminators on the same held-out digits and draws
    assert set(first.loss_gaps) == {"ce", "kl"}
    assert first.loss_gaps["ce"].A.shape == (first.data.x_heldout.shape[0],)
    assert "best w_f" in format_loss_gap_table(first.loss_gaps)
    assert first.class_changes("ce").ndim == 1
    second = ImagesExperiment(cfg, device="cpu", cache_dir=tmp_path, log=None)
    second.run()
    assert all(second.cache_hits.values()) and len(second.cache_hits) == 7
    for name in ("base", "ce", "kl"):
        assert torch.equal(first.samples[name], second.samples[name])
    # a changed discriminator size rebuilds the discriminators and guided samples only
    cfg2 = images_config(True, seed=0, overrides={**_TINY, "discriminator": {
        **_TINY["discriminator"], "steps": 3}})
    third = ImagesExperiment(cfg2, device="cpu", cache_dir=tmp_path, log=None)
    third.run()
    assert third.cache_hits == {"classifier": True, "denoiser": True, "samples-base": True,
                                "disc-ce": False, "disc-kl": False, "samples-ce": False,
                                "samples-kl": False}
    with pytest.raises(ValueError, match="unknown key"):
        images_config(True, overrides={"denoiser": {"stepz": 1}})


def test_kernel_bootstrap_matches_resampling(gen):
    """The quadratic-form bootstrap gives the replicates that recomputing on resampled rows does."""
    from dgref.metrics import kernel_distance_bootstrap
    a = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(30, 3, generator=gen, dtype=torch.float64) + 0.5
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    fast = kernel_distance_bootstrap(a, b, num_boot=30, generator=g1)
    # same draws, in the same order: all a-resamplings first, then all b-resamplings
    ia = [torch.randint(40, (40,), generator=g2) for _ in range(30)]
    ib = [torch.randint(30, (30,), generator=g2) for _ in range(30)]
    reps = torch.tensor([kernel_distance(a[i], b[j]) for i, j in zip(ia, ib)])
    centre, half = kernel_distance(a, b), 1.959963984540054 * float(reps.std())
    assert math.isclose(fast[0], centre - half, rel_tol=1e-6)
    assert math.isclose(fast[1], centre + half, rel_tol=1e-6)


def test_digits_fallback_without_sklearn(tmp_path, monkeypatch):
    """Without scikit-learn, the same digits come from DGREF_DIGITS_CSV."""
    import gzip
    import sys

    import numpy as np
    from sklearn.datasets import load_digits
    d = load_digits()
    path = tmp_path / "digits.csv.gz"
    with gzip.open(path, "wt") as fh:
        np.savetxt(fh, np.column_stack([d.data, d.target]), delimiter=",", fmt="%d")
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)       # import now fails
    monkeypatch.delenv("DGREF_DIGITS_CSV", raising=False)
    with pytest.raises(ImportError, match="DGREF_DIGITS_CSV"):
        load_digit_images(8)
    monkeypatch.setenv("DGREF_DIGITS_CSV", str(path))
    a = load_digit_images(8, seed=2)
    monkeypatch.undo()
    b = load_digit_images(8, seed=2)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_heldout, b.y_heldout)


def test_experiment_does_not_depend_on_global_seed(tmp_path):
    from dgref.image_experiment import ImagesExperiment, images_config
    cfg = images_config(True, seed=3, overrides=_TINY)
    states = []
    for global_seed, sub in ((0, "a"), (99, "b")):
        torch.manual_seed(global_seed)
        ex = ImagesExperiment(cfg, device="cpu", cache_dir=tmp_path / sub, log=None)
        ex.load_data()
        ex.train_denoiser()
        states.append(ex.denoiser.net.out.weight.clone())
    assert torch.equal(states[0], states[1])


# ------------------------------------------------------------------------------------ loss gap

class _LinearLogit(torch.nn.Module):
    """``d(x, sigma) = c <v, x>``: its input gradient is ``c v`` everywhere."""

    def __init__(self, v, c):
        super().__init__()
        self.v, self.c = v, c

    def forward(self, x, sigma):
        return self.c * (x * self.v).flatten(1).sum(1)


def test_loss_gap_terms_match_closed_form(gen):
    """With ``D(x) = a x`` and ``grad d = c v`` the gap has a closed form:
    ``w^2 c^2 |v|^2 (hi^2 - lo^2)/2 + 2 w c (a - 1) mean<v, x0> ln(hi/lo)``."""
    from dgref.image_experiment import LossGap, loss_gap_terms
    x0 = torch.randn(400, 1, 3, 3, generator=gen)
    v = torch.randn(1, 1, 3, 3, generator=gen)
    a, c, lo, hi = 0.7, 0.3, 0.1, 2.0
    A, B, C = loss_gap_terms(lambda x, s: a * x, _LinearLogit(v, c), x0, window=(lo, hi),
                             draws=64, generator=torch.Generator().manual_seed(1))
    vx = float((x0 * v).flatten(1).sum(1).mean())
    L = math.log(hi / lo)
    assert math.isclose(float(A.mean()), c * c * float(v.pow(2).sum()) * (hi ** 2 - lo ** 2) / 2,
                        rel_tol=0.02)
    assert math.isclose(float(B.mean()), c * (a - 1) * vx * L, rel_tol=0.05, abs_tol=0.01)
    # with a constant denoiser D = b, B_i = c ln(hi/lo) <v, b - x0_i> for every example exactly
    b = 0.2
    _, B2, C2 = loss_gap_terms(lambda x, s: torch.full_like(x, b), _LinearLogit(v, c), x0,
                               window=(lo, hi), draws=3, generator=torch.Generator().manual_seed(2))
    per = c * L * ((b - x0) * v).flatten(1).sum(1).double()
    assert torch.allclose(B2, per, rtol=1e-5, atol=1e-6)
    gap = LossGap(A, B, C, (lo, hi))
    m, lo_ci, hi_ci = gap.estimate(2.0)
    assert lo_ci < m < hi_ci and math.isclose(m, float((4 * A + 4 * B).mean()), rel_tol=1e-12)
    # the best weight minimises the mean gap, and its gap is -B^2/A
    best = gap.best_weight(num_boot=50)
    for w in (best["weight"] - 0.1, best["weight"] + 0.1):
        assert gap.estimate(w)[0] > best["gap"]
    assert math.isclose(best["gap"], gap.estimate(best["weight"])[0], rel_tol=1e-9)
    # paired difference against itself is exactly zero
    assert gap.difference(gap, 1.0) == (0.0, 0.0, 0.0)


def test_loss_gap_is_the_kl_objective_difference():
    """``C + 2 w B + w^2 A`` is the KL objective of ``D + w sigma^2 grad d`` on the window,
    draw by draw: checked against :func:`dgref.kl_loss` at the same levels and noise."""
    from dgref.image_experiment import loss_gap_terms
    disc = ImageDiscriminator(8, channels=(4, 8), generator=dgref.make_generator(0))
    den = unet_denoiser(8, channels=(4, 8), generator=dgref.make_generator(1))
    torch.nn.init.normal_(den.net.out.weight, std=0.05)
    x0 = load_digit_images(8, seed=0).x_heldout[:6]
    lo, hi = 0.045, 20.0
    A, B, C = loss_gap_terms(den, disc, x0, window=(lo, hi), draws=1,
                             generator=torch.Generator().manual_seed(3))

    def kl(d):
        # replay the draws: one stratum, so ln sigma = ln lo + U ln(hi/lo); then the noise,
        # which kl_loss draws from the same generator
        g = torch.Generator().manual_seed(3)
        u = torch.rand((6, 1), generator=g, dtype=torch.float64)[:, 0]
        sigma = (math.log(lo) + u * math.log(hi / lo)).exp().float()
        return dgref.kl_loss(d, den, x0, sigma=sigma, sigma_min=lo, sigma_max=hi, generator=g,
                             reduction="none").double()
    with_d = kl(disc)
    without = kl(_LinearLogit(torch.zeros(1, 1, 8, 8), 0.0))
    assert torch.allclose(without, C, rtol=1e-4)
    assert torch.allclose(with_d - without, A + 2 * B, rtol=1e-3, atol=1e-3 * float(C.mean()))
    assert float((A + 2 * B).abs().max()) > 1e-3        # the check has something to check


def test_field_weight_and_regimes(tmp_path):
    from dgref.image_experiment import ImagesExperiment, field_weight, images_config
    assert field_weight(2.0, "euler") == 1.0 and field_weight(2.0, "both") == 2.0
    with pytest.raises(ValueError, match="slopes"):
        field_weight(2.0, "heun")
    with pytest.raises(ValueError, match="regime"):
        images_config(True, regime="overtrained")
    trained = images_config(True, seed=0, overrides=_TINY)
    under = images_config(True, seed=0, regime="undertrained",
                          overrides={k: v for k, v in _TINY.items() if k != "denoiser"})
    assert under["denoiser"]["steps"] == 150 and under["regime"] == "undertrained"
    assert trained["guidance"] == {"weight": 2.0, "window": [0.045, 20.0], "slopes": "euler"}
    assert trained["discriminator"]["ce_sigma_dist"] == "loguniform"
    # the regimes share the classifier's cache entry (it does not depend on the denoiser)
    a = ImagesExperiment(trained, device="cpu", cache_dir=tmp_path, log=None)
    a.load_data()
    a.train_classifier()
    b = ImagesExperiment(under, device="cpu", cache_dir=tmp_path, log=None)
    b.load_data()
    b.train_classifier()
    assert a.cache_hits == {"classifier": False} and b.cache_hits == {"classifier": True}
