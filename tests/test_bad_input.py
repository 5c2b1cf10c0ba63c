"""Bad input gets a clear error naming the argument (issue 13's list), checked once, at the
public entry point, without device read-backs in hot paths."""
from __future__ import annotations

import pytest
import torch

import dgref
from dgref import _checks
from dgref.cfg import cfg_training_loop
from dgref.labelled import uniform_classes_1d
from dgref.metrics import DigitClassifier, train_classifier
from dgref.training import edm_training_loop

NAN = float("nan")


def _nan_x(n=4, dim=2):
    x = torch.zeros(n, dim)
    x[1, 0] = NAN
    return x


# ------------------------------------------------------------ NaN in x
@pytest.mark.parametrize("call", [
    lambda x: dgref.ring().denoise(x, 0.5),
    lambda x: dgref.ring().log_prob(x, 0.5),
    lambda x: dgref.ring().score(x, 0.5),
    lambda x: dgref.ring().posterior(x),
    lambda x: dgref.labelled.labelled_ring().denoise(x, 0.5),
    lambda x: dgref.labelled.labelled_ring().log_prob(x),
    lambda x: uniform_classes_1d().denoise(x[:, :1], 0.5),
    lambda x: dgref.ode_log_likelihood(dgref.ring(), x, num_steps=2),
    lambda x: dgref.kl_divergence(dgref.ring(), dgref.ring(), x=x, num_steps=2),
], ids=["mixture.denoise", "mixture.log_prob", "mixture.score", "mixture.posterior",
        "labelled.denoise", "labelled.log_prob", "uniform.denoise", "ode_log_likelihood",
        "kl_divergence"])
def test_nan_in_x_is_named(call):
    with pytest.raises(ValueError, match=r"x must be finite, got 1 non-finite"):
        call(_nan_x())


# ------------------------------------------------------------ a denoiser of the wrong shape
def _flat(x, sigma):
    return x[:, :1]                       # (B, 1) for x (B, 2): would broadcast silently


@pytest.mark.parametrize("call", [
    lambda D: dgref.edm_sampler(D, torch.randn(5, 2), num_steps=3),
    lambda D: dgref.edm_sampler(dgref.ring(), torch.randn(5, 2), num_steps=3, heun_denoiser=D),
    lambda D: dgref.edm_sde_sampler(D, torch.randn(5, 2), num_steps=3),
    lambda D: dgref.ode_log_likelihood(D, torch.randn(5, 2), num_steps=2),
    lambda D: dgref.edm_loss(D, torch.randn(5, 2)),
    lambda D: dgref.ScoreCorrectedDenoiser(D, lambda x, s: x)(torch.randn(5, 2), 1.0),
], ids=["edm_sampler", "heun_denoiser", "edm_sde_sampler", "ode_log_likelihood", "edm_loss",
        "ScoreCorrectedDenoiser"])
def test_denoiser_of_wrong_shape_is_named(call):
    with pytest.raises(ValueError, match=r"denoiser returned shape \(5, 1\), expected "):
        call(_flat)


def test_correction_of_wrong_shape_is_named():
    G = dgref.ScoreCorrectedDenoiser(dgref.ring(), lambda x, s: x[:, :1], 1.0)
    with pytest.raises(ValueError, match=r"correction returned shape \(5, 1\)"):
        G(torch.randn(5, 2), 1.0)


# ------------------------------------------------------------ NaN in a custom schedule
@pytest.mark.parametrize("call", [
    lambda s: dgref.edm_sampler(dgref.ring(), torch.randn(3, 2), sigmas=s),
    lambda s: dgref.edm_sde_sampler(dgref.ring(), torch.randn(3, 2), sigmas=s),
    lambda s: dgref.gridflow.grid_flow(dgref.mixture_1d(), dgref.mixture_1d(), sigmas=s,
                                       num_points=11),
], ids=["edm_sampler", "edm_sde_sampler", "grid_flow"])
def test_nan_in_sampler_schedule_is_named(call):
    with pytest.raises(ValueError, match="sigmas must be finite, got 1 non-finite"):
        call(torch.tensor([80.0, NAN, 1.0, 0.0], dtype=torch.float64))


def test_nan_in_likelihood_grid_is_named():
    with pytest.raises(ValueError, match="sigmas must be finite"):
        dgref.ode_log_likelihood(dgref.ring(), torch.zeros(3, 2),
                                 sigmas=torch.tensor([0.01, NAN, 80.0], dtype=torch.float64))


# ------------------------------------------------------------ dtype and device
def test_float64_batch_to_discriminator_is_named():
    disc = dgref.Discriminator(2, 1.0, hidden=8, depth=1)
    with pytest.raises(ValueError, match=r"x is torch.float64 .* discriminator's parameters "
                                         r"are torch.float32"):
        disc(torch.zeros(3, 2, dtype=torch.float64), 1.0)
    # the remedy the message names works
    assert disc.double()(torch.zeros(3, 2, dtype=torch.float64), 1.0).shape == (3,)


def test_float64_batch_to_image_discriminator_is_named():
    disc = dgref.digits.ImageDiscriminator(8, channels=(4, 8))
    with pytest.raises(ValueError, match=r"x is torch.float64"):
        disc(torch.zeros(2, 1, 8, 8, dtype=torch.float64), 1.0)


CUDA_CALLS = {
    "resolve_device": lambda: dgref.resolve_device("cuda"),
    "make_generator": lambda: dgref.make_generator(0, "cuda"),
    "randn": lambda: dgref.randn((3, 2), device="cuda"),
    "BatchGenerator": lambda: dgref.rng.BatchGenerator([0, 1], device="cuda"),
    "mixture.sample": lambda: dgref.ring().sample(4, device="cuda"),
    "labelled.sample": lambda: dgref.gaussian_pair().sample(4, device="cuda"),
    "uniform.sample": lambda: uniform_classes_1d().base.sample(4, device="cuda"),
    "edm_sigma_steps": lambda: dgref.edm_sigma_steps(4, device="cuda"),
    "edm_sample_sigmas": lambda: dgref.edm.edm_sample_sigmas(4, device="cuda"),
    "sample_training_sigmas": lambda: dgref.discriminator.sample_training_sigmas(
        4, sigma_dist="loguniform", device="cuda"),
    "kl_divergence": lambda: dgref.kl_divergence(dgref.ring(), dgref.ring(), num_points=8,
                                                 num_steps=2, device="cuda"),
    "score_error_kl": lambda: dgref.score_error_kl(dgref.ring(), dgref.ring(), num_points=8,
                                                   device="cuda"),
    "load_digit_images": lambda: dgref.digits.load_digit_images(device="cuda"),
    "generate_images": lambda: dgref.digits.generate_images(dgref.ring(), 2, image_shape=(2,),
                                                            device="cuda"),
    "setup_chapter": lambda: dgref.book.setup_chapter("x", seed=0, device="cuda", quick=True),
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", CUDA_CALLS)
def test_cuda_without_cuda_is_a_clear_error(name):
    with pytest.raises(ValueError, match=r"device='cuda' was requested but CUDA is not "
                                         r"available"):
        CUDA_CALLS[name]()


# ------------------------------------------------------------ not a denoiser
@pytest.mark.parametrize("call", [
    lambda: dgref.edm_sampler(None, torch.randn(3, 2)),
    lambda: dgref.edm_sde_sampler(None, torch.randn(3, 2)),
    lambda: dgref.ode_log_likelihood(None, torch.randn(3, 2)),
    lambda: dgref.edm_loss(None, torch.randn(3, 2)),
    lambda: dgref.ScoreCorrectedDenoiser(None, lambda x, s: x),
    lambda: dgref.discriminator_guidance(None, lambda x, s: x.sum(1)),
    lambda: dgref.CFGDenoiser(None, 0, 1.0, null_label=2),
], ids=["edm_sampler", "edm_sde_sampler", "ode_log_likelihood", "edm_loss",
        "ScoreCorrectedDenoiser", "discriminator_guidance", "CFGDenoiser"])
def test_none_denoiser_is_named(call):
    with pytest.raises(TypeError, match=r"denoiser must be callable .*, got NoneType"):
        call()


def test_edm_sampler_iter_none_fails_at_first_step():
    with pytest.raises(TypeError, match="denoiser must be callable"):
        next(dgref.edm_sampler_iter(None, torch.randn(3, 2)))


# ------------------------------------------------------------ mixture_kl dimensions
def test_mixture_kl_dimension_mismatch_names_the_arguments():
    with pytest.raises(ValueError, match=r"p and q must have the same dimension, got "
                                         r"p.dim=2 and q.dim=1"):
        dgref.mixture_kl(dgref.ring(), dgref.mixture_1d(), num_points=10)


def test_kl_divergence_x_of_wrong_dimension_is_named():
    with pytest.raises(ValueError, match=r"x must have last dimension 2"):
        dgref.kl_divergence(dgref.ring(), dgref.ring(), x=torch.zeros(4, 3), num_steps=2)


# ------------------------------------------------------------ NaN in training data
def _params(m):
    return [p.detach().clone() for p in m.parameters()]


def test_nan_training_data_caught_before_the_first_step():
    torch.manual_seed(0)
    net = dgref.mlp_denoiser(2, 1.0, hidden=8, depth=1)
    before = _params(net)
    seen = []
    with pytest.raises(ValueError, match=r"data must be finite, got 1 non-finite"):
        for rec in edm_training_loop(net, _nan_x(64), steps=5, batch_size=8):
            seen.append(rec)
    assert seen == []                     # no step ran, no weight moved
    assert all(torch.equal(a, b) for a, b in zip(before, _params(net)))


def test_nan_training_data_caught_by_every_trainer():
    world = dgref.gaussian_pair()
    net = dgref.conditional_mlp_denoiser(1, 2, 1.0, hidden=8, depth=1)
    with pytest.raises(ValueError, match="data must be finite"):
        next(cfg_training_loop(net, _nan_x(8, 1), torch.zeros(8, dtype=torch.long), steps=2))
    with pytest.raises(ValueError, match="x_real must be finite"):
        dgref.train_discriminator(dgref.Discriminator(2, 1.0, hidden=8, depth=1),
                                  objective="ce", x_real=_nan_x(8), x_fake=torch.zeros(8, 2),
                                  steps=2)
    x = torch.zeros(8, 1, 8, 8)
    x[3, 0, 2, 2] = NAN
    with pytest.raises(ValueError, match="x must be finite"):
        train_classifier(DigitClassifier(width=4, feature_dim=8), x,
                         torch.zeros(8, dtype=torch.long), steps=2)
    assert world.num_classes == 2


# ------------------------------------------------------------ one check per evaluation
def _guided():
    torch.manual_seed(0)
    D = dgref.mlp_denoiser(2, 1.0, hidden=8, depth=1).eval()
    disc = dgref.Discriminator(2, 1.0, hidden=8, depth=1)
    return dgref.discriminator_guidance(D, disc, 1.0)


def test_sigma_checked_once_per_guided_evaluation():
    G = _guided()
    x = torch.randn(6, 2)
    start = _checks.SIGMA_VALUE_CHECKS["count"]
    G(x, torch.full((6,), 0.7))
    assert _checks.SIGMA_VALUE_CHECKS["count"] - start == 1
    # the wrapper still rejects a bad sigma itself
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        G(x, -1.0)


def test_sampler_checks_its_levels_once_not_per_step():
    G = _guided()
    start = _checks.SIGMA_VALUE_CHECKS["count"]
    dgref.edm_sampler(G, torch.randn(6, 2), num_steps=4)
    assert _checks.SIGMA_VALUE_CHECKS["count"] == start       # levels validated as floats
    # and a bad sigma outside any sampler is still caught by the inner networks
    with pytest.raises(ValueError, match="sigma must be finite"):
        G.denoiser(torch.randn(6, 2), NAN)


def test_checks_of_device_tensors_read_nothing_back():
    """Tensors off the CPU (here on the 'meta' device, which has no data: any read-back
    raises) go through check_labels, check_sigma and check_tensor without a read-back."""
    lab = torch.tensor([0, 1, 5], device="meta")
    assert _checks.check_labels("labels", lab, 3, 2).device.type == "meta"
    sig = torch.ones(3, device="meta")
    assert _checks.check_sigma("sigma", sig, 3).shape == (3,)
    _checks.check_tensor("x", torch.ones(3, 2, device="meta"), finite=True)
    with pytest.raises(ValueError, match=r"labels must be in 0..2"):     # on the CPU: checked
        _checks.check_labels("labels", torch.tensor([0, 1, 5]), 3, 2)


def test_cfg_labels_checked_at_construction_not_per_call():
    world = dgref.gaussian_pair()
    with pytest.raises(ValueError, match=r"labels must be in 0..1"):
        dgref.CFGDenoiser(world, torch.tensor([0, 2]), 1.0)
    D = dgref.CFGDenoiser(world, torch.tensor([0, 1, 1]), 1.0)
    calls = []
    orig = _checks.check_labels

    def spy(*a, **k):
        calls.append(_checks._in_scope())
        return orig(*a, **k)
    import dgref.cfg as cfg_mod
    cfg_mod.check_labels = spy
    try:
        D(torch.zeros(3, 1), 0.5)
    finally:
        cfg_mod.check_labels = orig
    assert calls and all(calls)           # inside the checked scope: no value check
