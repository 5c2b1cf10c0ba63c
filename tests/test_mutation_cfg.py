"""Classifier-free and classifier guidance, and both CFG losses, against by-hand references
(issue 15, mutation testing): the guided denoisers row by row in closed form, and the loss per
example with the same draws (levels, label dropout, noise)."""
import torch

import dgref
from dgref.cfg import cfg_training_loop, guided_optimum_denoiser
from dgref.rng import BatchGenerator

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


# --------------------------------------------------------------------------------------------
# Session 3 (mutation run of the whole of dgref/cfg.py): bad input named exactly, the
# documented defaults, the options passed through, and the calls without a generator.
# --------------------------------------------------------------------------------------------
import math  # noqa: E402

import pytest  # noqa: E402

from dgref.cfg import train_cfg  # noqa: E402


def _plain(x, s, c):
    """A conditional denoiser with no ``null_label`` attribute (it must be passed)."""
    return W(x, s, c)


def _cfg_bad_calls():
    x0, lab = W.sample(8, generator=_g(0), dtype=DT)
    one = torch.zeros(8, dtype=DT)
    data3 = torch.zeros(8, 1, 1)
    net = dgref.conditional_mlp_denoiser(1, 2, 0.5, hidden=4, depth=1, generator=_g(1))
    gw = dgref.classifier_guidance(lambda x, s: W(x, s, 1), W.log_classifier,
                                   torch.tensor([1, 2, 0, 1, 0, 1]))
    return [
        (lambda: dgref.cfg_loss(1, x0, lab), TypeError,
         r"^denoiser must be callable D\(x, sigma, labels\)"),
        (lambda: dgref.cfg_loss(W, one, lab), ValueError, r"^x0 must have at least 2"),
        (lambda: dgref.cfg_loss(W, x0, lab, w_train=math.inf), ValueError,
         r"^w_train must be finite"),
        (lambda: dgref.cfg_loss(W, x0, lab, p_uncond=-0.1), ValueError,
         r"^p_uncond must be >= 0"),
        (lambda: dgref.cfg_loss(W, x0, lab, sigma_data=0.0), ValueError,
         r"^sigma_data must be > 0"),
        (lambda: dgref.cfg_loss(W, x0, lab[:3]), ValueError, r"^labels must have shape \(8,\)"),
        (lambda: dgref.cfg_loss(W, x0, lab, sigma=torch.ones(3, dtype=DT)), ValueError,
         r"^sigma must have shape \(8,\) to match x"),
        (lambda: dgref.cfg_loss(lambda x, s, c: x[:, :0], x0, lab, null_label=2), ValueError,
         r"^denoiser returned shape \(8, 0\), expected x0's shape"),
        (lambda: dgref.CFGDenoiser(W, 1, 1.0)(one, 1.0), ValueError, r"^x must have at least 2"),
        (lambda: dgref.CFGDenoiser(W, 1, 1.0)(X, torch.ones(3, dtype=DT)), ValueError,
         r"^sigma must have shape \(6,\) to match x"),
        (lambda: dgref.classifier_guidance(W, W.log_classifier, 1, math.nan), ValueError,
         r"^weight must be finite"),
        (lambda: dgref.classifier_guidance(W, 1, 1), TypeError,
         r"^log_classifier must be callable \(x, sigma\) -> \(B, C\)"),
        (lambda: dgref.classifier_guidance(lambda x, s: W(x, s, 1),
                                           lambda x, s: W.log_classifier(x, s)[:, 0], 1)(X, S),
         ValueError, r"^log_classifier must return \(B, C\), got \(6,\)"),
        (lambda: gw(X, S), ValueError, r"^labels must be in 0\.\.1 \(no null label here\)"),
        (lambda: dgref.classifier_guidance(lambda x, s: W(x, s, 1), W.log_classifier, 2)(X, S),
         ValueError, r"^labels must be in 0\.\.1 \(no null label here\), got 2"),
        (lambda: guided_optimum_denoiser(W, math.inf), ValueError, r"^w_train must be finite"),
        (lambda: guided_optimum_denoiser(W, 1.0)(X, S, torch.full((6,), 3)), ValueError,
         r"^labels must be in 0\.\.2"),
        (lambda: train_cfg(net, x0.float(), lab, steps=0), ValueError, r"^steps must be an int"),
        (lambda: train_cfg(net, x0.float(), lab, steps=1, batch_size=0), ValueError,
         r"^batch_size must be an int"),
        (lambda: train_cfg(net, x0.float(), lab, steps=1, lr=0.0), ValueError, r"^lr must be > 0"),
        (lambda: train_cfg(net, data3, lab, steps=1), ValueError, r"^data must have 2 dim"),
        (lambda: train_cfg(net, x0.float(), torch.full((8,), 2), steps=1), ValueError,
         r"^labels must be in 0\.\.1 \(no null label here\)"),
        (lambda: train_cfg(net, dgref.mixture_1d(), steps=1), TypeError,
         r"^data must be a tensor \(N, dim\) with labels, or a dgref.LabelledWorld"),
    ]


@pytest.mark.parametrize("i", range(23))
def test_cfg_bad_input_named_exactly(i):
    call, exc, msg = _cfg_bad_calls()[i]
    with pytest.raises(exc, match=msg):
        call()


def test_cfg_loss_defaults_and_options():
    x0, lab = W.sample(16, generator=_g(0), dtype=DT)
    # the guided loss at the default w_train = 0 is the standard loss (same draws)
    torch.testing.assert_close(dgref.cfg_loss(W, x0, lab, loss="guided", generator=_g(1)),
                               dgref.cfg_loss(W, x0, lab, generator=_g(1)), rtol=0, atol=0)
    # the standard loss ignores w_train
    ref, _ = _cfg_reference(W, x0, lab, 1, loss="standard", w=0.0, p=0.1, sd=0.5)
    got = dgref.cfg_loss(W, x0, lab, w_train=1.5, generator=_g(1), reduction="none")
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # the null label is passed to a denoiser without the attribute
    got = dgref.cfg_loss(_plain, x0, lab, null_label=2, loss="guided", w_train=1.5,
                         p_uncond=0.3, sigma_data=0.8, generator=_g(1), reduction="none")
    ref, _ = _cfg_reference(W, x0, lab, 1, loss="guided", w=1.5, p=0.3, sd=0.8)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # sigma is taken in x0's dtype: float32 levels give the float64 loss of the same values
    s32 = torch.linspace(0.1, 3.0, 16)
    torch.testing.assert_close(dgref.cfg_loss(W, x0, lab, sigma=s32, generator=_g(2)),
                               dgref.cfg_loss(W, x0, lab, sigma=s32.double(), generator=_g(2)),
                               rtol=0, atol=0)


def test_cfg_loss_drops_a_label_iff_its_uniform_is_below_p_uncond():
    """Label dropout is ``u < p_uncond`` (probability exactly p): with p equal to a drawn u,
    that row keeps its label."""
    x0, lab = W.sample(16, generator=_g(0), dtype=DT)
    sig = torch.full((16,), 0.7, dtype=DT)
    u = torch.rand((16,), generator=_g(5))              # no levels drawn: sigma is given
    p = float(u[3])
    got = dgref.cfg_loss(W, x0, lab, sigma=sig, p_uncond=p, generator=_g(5), reduction="none")
    g = _g(5)
    drop = torch.rand((16,), generator=g) < p
    assert not bool(drop[3]) and 0 < int(drop.sum()) < 16
    lab_in = torch.where(drop, torch.full_like(lab, 2), lab)
    x = x0 + 0.7 * dgref.randn(x0.shape, g, dtype=DT)
    ref = (0.49 + 0.25) / (0.7 * 0.5) ** 2 * ((W(x, sig, lab_in) - x0) ** 2).sum(1)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_cfg_loss_and_training_without_a_generator_use_the_global_stream():
    x0, lab = W.sample(16, generator=_g(0), dtype=DT)
    torch.manual_seed(11)
    a = dgref.cfg_loss(W, x0, lab, reduction="none")
    torch.manual_seed(11)
    b = dgref.cfg_loss(W, x0, lab, reduction="none", generator=torch.default_generator)
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    def net():
        return dgref.conditional_mlp_denoiser(1, 2, 0.5, hidden=4, depth=1, generator=_g(3))
    torch.manual_seed(12)
    la = train_cfg(net(), x0.float(), lab, steps=2, batch_size=4)
    torch.manual_seed(12)
    lb = train_cfg(net(), x0.float(), lab, steps=2, batch_size=4,
                   generator=torch.default_generator)
    assert la == lb and len(la) == 2


class _NoAttr(torch.nn.Module):
    """A trainable conditional denoiser with neither ``null_label`` nor ``sigma_data``."""

    def __init__(self):
        super().__init__()
        self.inner = dgref.conditional_mlp_denoiser(1, 2, 0.5, hidden=4, depth=1,
                                                    generator=_g(3))

    def forward(self, x, s, c):
        return self.inner(x, s, c)


def test_cfg_training_passes_every_option_to_the_loss():
    """The first step's loss is cfg_loss with the same options and the same stream; the data
    are cast to the network's dtype; the defaults (batch 256, lr 1e-3, sigma_data 0.5)."""
    x0, lab = W.sample(32, generator=_g(4), dtype=DT)          # float64 data, float32 net
    kw = dict(loss="guided", w_train=1.5, p_uncond=0.3, P_mean=0.2, P_std=0.5)
    m = _NoAttr()
    first = [r["loss"] for r in dgref.cfg.cfg_training_loop(
        m, x0, lab, steps=1, batch_size=8, null_label=2, generator=_g(6), **kw)][0]
    ref_net = _NoAttr()
    g = _g(6)
    idx = torch.randint(32, (8,), generator=g)
    ref = dgref.cfg_loss(ref_net, x0[idx].float(), lab[idx], null_label=2, sigma_data=0.5,
                         generator=g, **kw)
    assert first == pytest.approx(float(ref.detach()), rel=1e-6)
    # defaults: batch 256 and lr 1e-3 (the parameters after two steps match explicit ones)
    seen = []

    class Rec(_NoAttr):
        def forward(self, x, s, c):
            seen.append(x.shape[0])
            return super().forward(x, s, c)
    a, b = Rec(), _NoAttr()
    la = train_cfg(a, x0, lab, steps=2, null_label=2, generator=_g(7))
    lb = train_cfg(b, x0, lab, steps=2, null_label=2, batch_size=256, lr=1e-3,
                   sigma_data=0.5, generator=_g(7))
    assert seen == [256, 256] and la == lb
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_cfg_training_check_every_is_passed_on():
    """With check_every = 3 the first record comes after three optimiser steps."""
    x0, lab = W.sample(32, generator=_g(4), dtype=torch.float32)

    def net():
        return dgref.conditional_mlp_denoiser(1, 2, 0.5, hidden=4, depth=1, generator=_g(3))
    full = net()
    train_cfg(full, x0, lab, steps=3, batch_size=8, generator=_g(6))
    part = net()
    it = dgref.cfg.cfg_training_loop(part, x0, lab, steps=3, batch_size=8, generator=_g(6),
                                     check_every=3)
    next(it)
    for pa, pb in zip(part.parameters(), full.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_train_cfg_passes_labels_positionally():
    x0, lab = W.sample(16, generator=_g(4), dtype=torch.float32)
    net = dgref.conditional_mlp_denoiser(1, 2, 0.5, hidden=4, depth=1, generator=_g(3))
    assert len(train_cfg(net, x0, lab, steps=1, batch_size=4, generator=_g(1))) == 1


def test_guided_optimum_calls_the_null_branch_with_null_labels():
    calls = []

    def D(x, s, c):
        calls.append(c.clone())
        return x * (1.0 + c.to(x.dtype))[:, None]
    G = guided_optimum_denoiser(D, 1.0, null_label=2)
    lab = torch.tensor([0, 1, 2, 1, 0, 2])
    out = G(X, S, lab)
    ref = torch.where((lab == 2)[:, None], 3 * X, (X * (1.0 + lab.to(DT))[:, None] + 3 * X) / 2)
    torch.testing.assert_close(out, ref, rtol=1e-15, atol=0)
    assert calls[1].tolist() == [2] * 6


def test_cfg_denoiser_takes_sigma_in_x_dtype():
    x = X.float()
    G = dgref.CFGDenoiser(lambda x, s, c: x * s[:, None], 1, 1.0, null_label=2)
    out = G(x, S)                                   # float64 levels, float32 points
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x * S.float()[:, None], rtol=0, atol=0)


def test_cfg_denoiser_per_call_labels_and_construction():
    """Labels at each call (k-diffusion's extra_args), positionally or as class_labels=, override
    the bound ones; bad labels are named at construction and at the call."""
    lab = torch.tensor([0, 1, 1, 0, 1, 0])
    ref = dgref.CFGDenoiser(W, lab, 1.5)(X, S)
    torch.testing.assert_close(ref, 2.5 * W(X, S, lab) - 1.5 * W(X, S, 2), rtol=1e-12,
                               atol=1e-14)
    for bound in (None, 0, torch.ones(6, dtype=torch.long)):
        G = dgref.CFGDenoiser(W, bound, 1.5)
        torch.testing.assert_close(G(X, S, lab), ref, rtol=0, atol=0)
        torch.testing.assert_close(G(X, S, class_labels=lab), ref, rtol=0, atol=0)
        with pytest.raises(ValueError, match=r"^labels must have shape \(6,\), got \(3,\)"):
            G(X, S, lab[:3])
        with pytest.raises(ValueError, match=r"^labels must be in 0\.\.1 \(no null label here\)"):
            G(X, S, torch.full((6,), 2))
    G = dgref.CFGDenoiser(W, 1, 1.5)
    torch.testing.assert_close(G(X, S, 0), dgref.CFGDenoiser(W, 0, 1.5)(X, S), rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"^pass labels or class_labels, not both"):
        G(X, S, lab, class_labels=lab)
    with pytest.raises(TypeError, match=r"^CFGDenoiser was built with labels=None"):
        dgref.CFGDenoiser(W, None, 1.5)(X, S)
    # construction: the names, the bound labels' range, the null label
    with pytest.raises(TypeError, match=r"^denoiser must be callable D\(x, sigma, labels\)"):
        dgref.CFGDenoiser(1, 1, 1.0)
    with pytest.raises(ValueError, match=r"^weight must be finite"):
        dgref.CFGDenoiser(W, 1, math.nan)
    with pytest.raises(ValueError, match=r"^labels must be in 0\.\.1 \(no null label here\), got e"):
        dgref.CFGDenoiser(W, torch.tensor([0, 2, 1]), 1.0)
    with pytest.raises(ValueError, match=r"^labels must have shape \(3,\)"):
        dgref.CFGDenoiser(W, torch.zeros(3, 1, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match=r"^labels must be in 0\.\.1 \(no null label here\), got 2"):
        dgref.CFGDenoiser(W, 2, 1.0)
    with pytest.raises(ValueError, match=r"^null_label must be an int >= 1"):
        dgref.CFGDenoiser(_plain, 0, 1.0, null_label=0)
    with pytest.raises(ValueError, match=r"^null_label was not given and the denoiser has no"):
        dgref.CFGDenoiser(_plain, 0, 1.0)
    G = dgref.CFGDenoiser(_plain, lab, 1.5, null_label=2)
    assert G.null_label == 2 and type(G.null_label) is int and G.weight == 1.5
    assert G.labels is lab
    torch.testing.assert_close(G(X, S), ref, rtol=0, atol=0)

    class Net(torch.nn.Module):           # the null label on .net, as a tensor
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Module()
            self.net.null_label = torch.tensor(2)

        def forward(self, x, s, c):
            return W(x, s, c)
    G = dgref.CFGDenoiser(Net(), lab, 1.5)
    assert G.null_label == 2 and type(G.null_label) is int


def test_cfg_denoiser_names_a_wrong_output_shape():
    G = dgref.CFGDenoiser(lambda x, s, c: x[:, :0], 1, 1.0, null_label=2)
    with pytest.raises(ValueError, match=r"^denoiser returned shape \(6, 0\), expected x's"):
        G(X, S)


def test_cfg_denoiser_hands_the_denoiser_sigma_of_shape_batch():
    seen = []

    def D(x, s, c):
        seen.append(tuple(s.shape))
        return x * s[:, None]
    G = dgref.CFGDenoiser(D, 1, 1.0, null_label=2)
    torch.testing.assert_close(G(X, 0.5), 0.5 * X, rtol=0, atol=0)
    assert seen == [(6,), (6,)]
    with pytest.raises(ValueError, match=r"^sigma must have shape \(6,\) to match x"):
        G(X, torch.ones(3, dtype=DT))


def test_cfg_training_default_w_train_is_zero():
    x0, lab = W.sample(32, generator=_g(4), dtype=torch.float32)

    def run(**kw):
        net = dgref.conditional_mlp_denoiser(1, 2, 0.5, hidden=4, depth=1, generator=_g(3))
        return train_cfg(net, x0, lab, steps=2, batch_size=8, generator=_g(6), **kw)
    assert run(loss="guided") == run(loss="standard") == run(loss="guided", w_train=0.0)


def test_cfg_loss_takes_a_batch_generator_row_by_row():
    """With a dgref.BatchGenerator (one stream per row) every draw of a row (its sigma, its
    label dropout, its noise) comes from that row's stream, as in edm_loss: a batch of 8 and
    the same rows in chunks of 3 give the same per-example losses. Any other generator type
    is named."""
    x0, lab = W.sample(8, generator=_g(0), dtype=DT)
    seeds = list(range(100, 108))
    whole = dgref.cfg_loss(W, x0, lab, p_uncond=0.5, reduction="none",
                           generator=BatchGenerator(seeds))
    parts = torch.cat([dgref.cfg_loss(W, x0[i:i + 3], lab[i:i + 3], p_uncond=0.5,
                                      reduction="none",
                                      generator=BatchGenerator(seeds[i:i + 3]))
                       for i in range(0, 8, 3)])
    torch.testing.assert_close(whole, parts, rtol=0, atol=0)
    # the dropout is drawn: p_uncond = 1 and 0 differ on the same streams
    nulls = dgref.cfg_loss(W, x0, lab, p_uncond=1.0, reduction="none",
                           generator=BatchGenerator(seeds))
    keeps = dgref.cfg_loss(W, x0, lab, p_uncond=0.0, reduction="none",
                           generator=BatchGenerator(seeds))
    assert not torch.equal(nulls, keeps)
    with pytest.raises(TypeError, match="generator"):
        dgref.cfg_loss(W, x0, lab, generator=123)
