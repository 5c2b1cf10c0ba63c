"""Explicit generators alone reproduce a run: network initialisation takes ``generator=`` too.

Between the two runs of each test the global generator is seeded differently; a run that drew
anything from it (a network's initial weights, a batch, a noise draw) would differ.
"""
from __future__ import annotations

import pytest
import torch

import dgref
from dgref.digits import ImageDiscriminator, UNet, unet_denoiser
from dgref.metrics import DigitClassifier, train_classifier
from dgref.nets import MLP, ConditionalMLP


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _weights(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


FACTORIES = {
    "MLP": lambda g: MLP(2, hidden=16, depth=2, generator=g),
    "mlp_denoiser": lambda g: dgref.mlp_denoiser(2, 1.0, hidden=16, depth=2, generator=g),
    "ConditionalMLP": lambda g: ConditionalMLP(1, 3, hidden=16, depth=2, generator=g),
    "conditional_mlp_denoiser": lambda g: dgref.conditional_mlp_denoiser(1, 3, 1.0, hidden=16,
                                                                         generator=g),
    "Discriminator": lambda g: dgref.Discriminator(2, 1.0, hidden=16, generator=g),
    "Discriminator(num_freqs)": lambda g: dgref.Discriminator(2, 1.0, hidden=16, num_freqs=4,
                                                              generator=g),
    "UNet": lambda g: UNet(8, channels=(4, 8), generator=g),
    "unet_denoiser": lambda g: unet_denoiser(8, channels=(4, 8), generator=g),
    "ImageDiscriminator": lambda g: ImageDiscriminator(8, channels=(4, 8), generator=g),
    "DigitClassifier": lambda g: DigitClassifier(width=4, feature_dim=8, generator=g),
}


@pytest.mark.parametrize("name", FACTORIES)
def test_generator_alone_sets_initial_weights(name):
    make = FACTORIES[name]
    torch.manual_seed(1)
    a = _weights(make(_g(7)))
    torch.manual_seed(2)
    state = torch.get_rng_state()
    b = _weights(make(_g(7)))
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)        # the global generator untouched
    assert not torch.equal(a, _weights(make(_g(8))))         # and the generator matters


@pytest.mark.parametrize("name", ["MLP", "Discriminator", "UNet", "DigitClassifier"])
def test_without_generator_the_global_seed_decides(name):
    """``generator=None`` keeps torch's convention (the chapters' numbers depend on it)."""
    make = FACTORIES[name]
    torch.manual_seed(3)
    a = _weights(make(None))
    torch.manual_seed(3)
    assert torch.equal(a, _weights(make(None)))


def _edm_run(global_seed):
    torch.manual_seed(global_seed)
    data = dgref.ring().sample(256, generator=_g(0))
    net = dgref.mlp_denoiser(2, data.std().item() if hasattr(data, "std") else 1.0, hidden=16,
                             depth=1, generator=_g(1))
    losses = dgref.train_denoiser(net, data, steps=30, batch_size=32, generator=_g(2))
    x = dgref.edm_sampler(net, dgref.randn((64, 2), _g(3)), num_steps=6, S_churn=5.0,
                          generator=_g(4))
    return losses, _weights(net), x


def _disc_run(global_seed, objective):
    torch.manual_seed(global_seed)
    p, q = dgref.ring(), dgref.ring().reweighted(stds=0.3)
    disc = dgref.Discriminator(2, p.std(), hidden=16, generator=_g(5))
    losses = dgref.train_discriminator(disc, objective=objective, x_real=p, x_fake=q,
                                       denoiser=q, steps=20, batch_size=32, generator=_g(6))
    return losses, _weights(disc)


def _cfg_run(global_seed):
    torch.manual_seed(global_seed)
    world = dgref.gaussian_pair()
    net = dgref.conditional_mlp_denoiser(1, 2, world.std(), hidden=16, generator=_g(7))
    losses = dgref.train_cfg(net, world, steps=20, batch_size=32, generator=_g(8))
    return losses, _weights(net)


def _classifier_run(global_seed):
    torch.manual_seed(global_seed)
    x = torch.randn(64, 1, 8, 8, generator=_g(9))
    y = torch.arange(64) % 10
    clf = DigitClassifier(width=4, feature_dim=8, generator=_g(10))
    return train_classifier(clf, x, y, steps=10, batch_size=16, generator=_g(11)), _weights(clf)


@pytest.mark.parametrize("run", [
    _edm_run, lambda s: _disc_run(s, "ce"), lambda s: _disc_run(s, "kl"), _cfg_run,
    _classifier_run], ids=["edm", "disc-ce", "disc-kl", "cfg", "classifier"])
def test_explicit_generators_alone_give_bit_identical_runs(run):
    a, b = run(11), run(12)            # different global seeds in between
    for u, v in zip(a, b):
        if isinstance(u, list):
            assert u == v
        else:
            assert torch.equal(u, v)
