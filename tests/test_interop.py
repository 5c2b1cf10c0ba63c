"""k-diffusion habits: keyword conditioning (``extra_args`` as a dict), latents scaled by the
sampler, and a KL-objective loss reported relative to d = 0 (in nats)."""
from __future__ import annotations

import math

import pytest
import torch

import dgref


def _g(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def world():
    return dgref.gaussian_pair()


# ------------------------------------------------------------ keyword conditioning
def test_sampler_keyword_conditioning_equals_bound_labels(world):
    c = torch.tensor([0, 1, 1, 0, 1])
    lat = torch.randn(5, 1, generator=_g(0))
    bound = dgref.edm_sampler(dgref.CFGDenoiser(world, c, 2.0), lat, num_steps=8)
    for key in ("labels", "class_labels"):
        kw = dgref.edm_sampler(dgref.CFGDenoiser(world, None, 2.0), lat, num_steps=8,
                               extra_args={key: c})
        assert torch.equal(bound, kw), key
    sde_a = dgref.edm_sde_sampler(dgref.CFGDenoiser(world, c, 2.0), lat, num_steps=8,
                                  generator=_g(1))
    sde_b = dgref.edm_sde_sampler(dgref.CFGDenoiser(world, None, 2.0), lat, num_steps=8,
                                  generator=_g(1), extra_args={"labels": c})
    assert torch.equal(sde_a, sde_b)


def test_conditional_denoisers_take_labels_by_keyword(world):
    torch.manual_seed(0)
    net = dgref.conditional_mlp_denoiser(1, 2, world.std(), hidden=16, depth=1)
    x, s, lab = torch.randn(6, 1), torch.full((6,), 0.7), torch.tensor([0, 1, 2, 0, 1, 2])
    pos = net(x, s, lab)
    assert torch.equal(net(x, s, labels=lab), pos)
    assert torch.equal(net(x, s, class_labels=lab), pos)      # NVlabs EDM's keyword
    assert torch.equal(world(x, s, class_labels=lab), world(x, s, lab))
    with pytest.raises(TypeError, match="labels or class_labels, not both"):
        net(x, s, lab, class_labels=lab)
    # the samplers, the likelihood and the loss pass a dict as keywords
    lat = torch.randn(6, 1, generator=_g(2))
    a = dgref.edm_sampler(net, lat, num_steps=4, extra_args=(lab,))
    b = dgref.edm_sampler(net, lat, num_steps=4, extra_args={"class_labels": lab})
    assert torch.equal(a, b)
    la = dgref.ode_log_likelihood(net, x, num_steps=4, extra_args=(lab,))
    lb = dgref.ode_log_likelihood(net, x, num_steps=4, extra_args={"labels": lab})
    assert torch.equal(la, lb)
    ea = dgref.edm_loss(net, x, generator=_g(3), extra_args=(lab,))
    eb = dgref.edm_loss(net, x, generator=_g(3), extra_args={"labels": lab})
    assert torch.equal(ea, eb)


def test_guidance_wrapper_forwards_keywords(world):
    lab = torch.tensor([0, 1, 1])
    G = dgref.ScoreCorrectedDenoiser(world, lambda x, s: torch.zeros_like(x), 1.0)
    x = torch.randn(3, 1)
    assert torch.equal(G(x, 0.5, labels=lab), world(x, 0.5, lab))


def test_bad_extra_args_named():
    with pytest.raises(TypeError, match="extra_args must be a tuple .* or a dict"):
        dgref.edm_sampler(dgref.ring(), torch.randn(3, 2), extra_args="labels")
    with pytest.raises(TypeError, match="extra_args keys must be str"):
        dgref.ode_log_likelihood(dgref.ring(), torch.randn(3, 2), extra_args={0: 1})


def test_cfg_without_labels_says_how_to_pass_them(world):
    with pytest.raises(TypeError, match="pass labels at each call"):
        dgref.CFGDenoiser(world, None, 1.0)(torch.zeros(2, 1), 1.0)


# ------------------------------------------------------------ latents
def test_prescaled_latents_are_rejected_with_the_remedy():
    lat = torch.randn(64, 2, generator=_g(4))
    with pytest.raises(ValueError, match=r"latents must be unit-normal .*latents_scaled=True"):
        dgref.edm_sampler(dgref.ring(), lat * 80.0, num_steps=4)
    with pytest.raises(ValueError, match=r"latents_scaled=True"):
        dgref.edm_sde_sampler(dgref.ring(), lat * 80.0, num_steps=4)
    # latents already at sigma_max, declared as such, give the same chain as unit-normal ones
    a = dgref.edm_sampler(dgref.ring(), lat, num_steps=4)
    b = dgref.edm_sampler(dgref.ring(), lat * 80.0, num_steps=4, latents_scaled=True)
    torch.testing.assert_close(a, b)
    steps = list(dgref.edm_sampler_iter(dgref.ring(), lat * 80.0, num_steps=4,
                                        latents_scaled=True))
    assert torch.equal(steps[0].x_hat, lat * 80.0)           # the chain starts at the latents


# ------------------------------------------------------------ KL objective relative to d = 0
@pytest.fixture(scope="module")
def pair():
    p = dgref.ring()
    q = p.reweighted(weights=torch.tensor([2.0, 2, 2, 2, 1, 1, 1, 1]) / 12, stds=0.22)
    return p, q


def test_relative_kl_loss_is_zero_at_zero_logit_with_the_same_gradient(pair):
    p, q = pair
    x0 = p.sample(256, generator=_g(5))
    torch.manual_seed(0)
    disc = dgref.Discriminator(2, p.std(), hidden=16, depth=1)
    zero = lambda x, s: (x * 0.0).sum(1)                                  # noqa: E731
    assert float(dgref.kl_loss(zero, q, x0, generator=_g(6), relative=True).abs()) == 0.0
    grads = []
    for relative in (False, True):
        disc.zero_grad()
        dgref.kl_loss(disc, q, x0, generator=_g(6), relative=relative, gamma=0.5,
                      x_fake=q.sample(256, generator=_g(7))).backward()
        grads.append([p_.grad.clone() for p_ in disc.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_relative_kl_loss_estimates_the_change_of_the_score_error_integral(pair):
    """With the oracle logit the guided denoiser is exact, so loss(d*) - loss(0) should be
    -I(q): minus the score-error integral of the base model, in nats."""
    p, q = pair
    x0 = p.sample(20_000, generator=_g(8), dtype=torch.float64)
    rel = dgref.kl_loss(dgref.oracle_logit(p, q), q, x0, generator=_g(9), reduction="none",
                        relative=True).detach()
    est, se = float(rel.mean()), float(rel.std() / math.sqrt(rel.numel()))
    integral, ise = dgref.score_error_kl(p, q, num_points=4000, generator=_g(10),
                                         dtype=torch.float64)
    assert est < 0
    assert abs(est + integral) < 4 * math.hypot(se, ise), (est, se, integral, ise)


def test_kl_training_reports_the_relative_loss(pair):
    p, q = pair
    torch.manual_seed(0)
    disc = dgref.Discriminator(2, p.std(), hidden=32, depth=2)
    losses = dgref.train_discriminator(disc, objective="kl", x_real=p, denoiser=q, steps=150,
                                       batch_size=256, lr=3e-3, generator=_g(11))
    # it starts near 0 (d ~ 0 at initialisation) and falls below 0 as the KL improves
    assert abs(sum(losses[:5]) / 5) < 0.2
    assert sum(losses[-30:]) / 30 < -0.01
