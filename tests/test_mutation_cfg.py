"""Classifier-free and classifier guidance, and both CFG losses, against by-hand references
(issue 15, mutation testing): the guided denoisers row by row in closed form, and the loss per
example with the same draws (levels, label dropout, noise)."""
import torch

import dgref
from dgref.cfg import cfg_training_loop, guided_optimum_denoiser

DT = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


W = dgref.gaussian_pair(2.0, 0.5, weights=[0.3, 0.7])
X = torch.linspace(-2.5, 2.5, 6, dtype=DT)[:, None]
S = torch.tensor([0.05, 0.3, 0.7, 1.5, 4.0, 9.0], dtype=DT)


def test_cfg_denoiser_closed_form_per_row():
    lab = torch.tensor([0, 1, 1, 0, 1, 0])
    for w in (0.0, 1.7, -1.0):
        got = dgref.CFGDenoiser(W, lab, w)(X, S)
        ref = (1 + w) * W(X, S, lab) - w * W(X, S, torch.full((6,), 2))
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    # w = -1 is the unconditional model; the default weight is 0 (the conditional branch)
    torch.testing.assert_close(dgref.CFGDenoiser(W, 1, -1.0)(X, S), W(X, S), rtol=1e-12,
                               atol=1e-14)
    torch.testing.assert_close(dgref.CFGDenoiser(W, 1)(X, S), W(X, S, 1), rtol=0, atol=0)

    class Wrapped(torch.nn.Module):        # null label found on .net
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Module()
            self.net.null_label = 2

        def forward(self, x, sigma, labels):
            return W(x, sigma, labels)

    torch.testing.assert_close(dgref.CFGDenoiser(Wrapped(), 1, 2.0)(X, S),
                               dgref.CFGDenoiser(W, 1, 2.0)(X, S), rtol=0, atol=0)
    torch.testing.assert_close(dgref.CFGDenoiser(lambda x, s, c: W(x, s, c), 1, 2.0,
                                                 null_label=2)(X, S),
                               dgref.CFGDenoiser(W, 1, 2.0)(X, S), rtol=0, atol=0)


def test_classifier_guidance_closed_form_and_window():
    """``D + w sigma^2 grad log p(c|x)`` with the exact classifier gradient in closed form."""
    lab = torch.tensor([1, 0, 1, 1, 0, 0])
    G = dgref.classifier_guidance(lambda x, s: W(x, s, lab), W.log_classifier, lab, 2.5)
    ref = W(X, S, lab) + 2.5 * S[:, None] ** 2 * W.grad_log_classifier(X, S, lab)
    torch.testing.assert_close(G(X, S), ref, rtol=1e-9, atol=1e-12)
    G1 = dgref.classifier_guidance(lambda x, s: W(x, s, 1), W.log_classifier, 1)   # w = 1
    ref1 = W(X, S, 1) + S[:, None] ** 2 * W.grad_log_classifier(X, S, 1)
    torch.testing.assert_close(G1(X, S), ref1, rtol=1e-9, atol=1e-12)
    Gw = dgref.classifier_guidance(lambda x, s: W(x, s, 1), W.log_classifier, 1, 2.0,
                                   window=(0.5, 2.0))
    inside = (S >= 0.5) & (S <= 2.0)
    refw = torch.where(inside[:, None], W(X, S, 1) + 2.0 * S[:, None] ** 2
                       * W.grad_log_classifier(X, S, 1), W(X, S, 1))
    torch.testing.assert_close(Gw(X, S), refw, rtol=1e-9, atol=1e-12)


def test_guided_optimum_rows():
    D = guided_optimum_denoiser(W, 1.5)
    assert D.null_label == 2
    lab = torch.tensor([0, 1, 2, 1, 2, 0])
    ref = (W(X, S, lab) + 1.5 * W(X, S, 2)) / 2.5
    ref = torch.where((lab == 2)[:, None], W(X, S, 2), ref)
    torch.testing.assert_close(D(X, S, lab), ref, rtol=1e-12, atol=1e-14)


def _cfg_reference(D, x0, lab, seed, *, loss, w, p, sd, P_mean=-1.2, P_std=1.2):
    g = _g(seed)
    s = (P_mean + P_std * dgref.randn((x0.shape[0],), g, dtype=DT)).exp()
    drop = torch.rand((x0.shape[0],), generator=g) < p
    lab_in = torch.where(drop, torch.full_like(lab, 2), lab)
    x = x0 + s[:, None] * dgref.randn(x0.shape, g, dtype=DT)
    if loss == "standard":
        pred = D(x, s, lab_in)
    else:
        pred = (1 + w) * D(x, s, lab_in) - w * D(x, s, torch.full_like(lab, 2))
    return (s ** 2 + sd ** 2) / (s * sd) ** 2 * ((pred - x0) ** 2).sum(1), drop


def test_cfg_loss_per_example_by_hand():
    x0, lab = W.sample(64, generator=_g(0), dtype=DT)
    for loss, w, p, sd in (("standard", 0.0, 0.1, 0.5), ("guided", 1.5, 0.3, 0.8)):
        kw = {} if (loss, p, sd) == ("standard", 0.1, 0.5) else dict(loss=loss, w_train=w,
                                                                    p_uncond=p, sigma_data=sd)
        got = dgref.cfg_loss(W, x0, lab, generator=_g(1), reduction="none", **kw)
        ref, drop = _cfg_reference(W, x0, lab, 1, loss=loss, w=w, p=p, sd=sd)
        assert 0 < int(drop.sum()) < 64                   # some labels dropped, not all
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        mean = dgref.cfg_loss(W, x0, lab, generator=_g(1), **kw)
        torch.testing.assert_close(mean, ref.mean(), rtol=1e-12, atol=1e-12)
    got = dgref.cfg_loss(W, x0, lab, generator=_g(2), reduction="none", P_mean=0.4, P_std=0.3)
    ref, _ = _cfg_reference(W, x0, lab, 2, loss="standard", w=0.0, p=0.1, sd=0.5, P_mean=0.4,
                            P_std=0.3)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # p_uncond = 1 drops every label: the unconditional loss
    sig = torch.full((64,), 0.6, dtype=DT)
    all_null = dgref.cfg_loss(W, x0, lab, p_uncond=1.0, sigma=sig, generator=_g(3),
                              reduction="none")
    none_null = dgref.cfg_loss(W, x0, torch.full_like(lab, 2), p_uncond=0.0, sigma=sig,
                               generator=_g(3), reduction="none")
    torch.testing.assert_close(all_null, none_null, rtol=0, atol=0)


def test_cfg_training_on_a_tensor_draws_batches_with_replacement():
    x0, lab = W.sample(32, generator=_g(4), dtype=torch.float32)

    def run(**kw):
        net = dgref.conditional_mlp_denoiser(1, 2, W.std(), hidden=8, depth=1, generator=_g(5))
        return [r["loss"] for r in cfg_training_loop(net, x0, lab, steps=3, batch_size=8,
                                                     generator=_g(6), **kw)], net

    a, net_a = run()
    b, _ = run()
    assert a == b and len(a) == 3
    # the first step's loss is cfg_loss on the first drawn batch with the same generator
    net = dgref.conditional_mlp_denoiser(1, 2, W.std(), hidden=8, depth=1, generator=_g(5))
    g = _g(6)
    idx = torch.randint(32, (8,), generator=g)
    first = dgref.cfg_loss(net, x0[idx], lab[idx], generator=g, sigma_data=W.std())
    assert a[0] == float(first.detach())
    assert not net_a.training
