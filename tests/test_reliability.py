"""Issue 7: bad input gets a named error, non-finite numbers stop loudly, checkpoints are safe,
runs are reproducible, and the package never touches the network."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dgref
from dgref import (CheckpointError, NonFiniteError, edm_sampler, load_checkpoint,
                   mlp_denoiser, save_checkpoint)
from dgref.rng import BatchGenerator
from dgref.training import edm_training_loop

HYP = settings(max_examples=25, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------- bad input, named errors
@pytest.mark.parametrize("call, match", [
    (lambda p: p.log_prob(torch.zeros(4, 3)), "x must have last dimension 2"),
    (lambda p: p.log_prob(torch.zeros(4)), "x must have 2 dimension"),
    (lambda p: p.log_prob(torch.zeros(0, 2)), "x must not be empty"),
    (lambda p: p.score(torch.zeros(4, 2), -1.0), "sigma must be finite and >= 0"),
    (lambda p: p.score(torch.zeros(4, 2), float("nan")), "sigma must be finite"),
    (lambda p: p.denoise(torch.zeros(4, 2), torch.ones(3)), r"sigma must have shape \(4,\)"),
    (lambda p: p.sample(0), "num_samples must be an int >= 1"),
    (lambda p: p.sample(2.5), "num_samples must be an int"),
    (lambda p: p.log_prob(torch.zeros(4, 2, dtype=torch.long)), "floating-point"),
    (lambda p: p.log_prob([[0.0, 0.0]]), "x must be a torch.Tensor"),
])
def test_toy_world_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(dgref.ring())


@pytest.mark.parametrize("kwargs, match", [
    (dict(means=[[0.0, 0.0], [1.0, 1.0]], weights=[0.5, 0.6]), "weights must sum to 1"),
    (dict(means=[[0.0, 0.0], [1.0, 1.0]], weights=[1.5, -0.5]), "weights must be finite and >= 0"),
    (dict(means=[[0.0, 0.0], [1.0, 1.0]], weights=[1.0]), r"weights must have shape \(2,\)"),
    (dict(means=[[0.0, 0.0]], stds=0.0), "stds must be finite and > 0"),
    (dict(means=[[0.0, 0.0]], stds=[1.0, 2.0, 3.0]), "stds of shape"),
    (dict(means=[[float("nan"), 0.0]]), "means must be finite"),
])
def test_mixture_bad_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        dgref.GaussianMixture(**kwargs)


def test_sampler_and_schedule_bad_input():
    p = dgref.ring()
    lat = torch.randn(8, 2)
    with pytest.raises(ValueError, match="num_steps must be an int >= 1"):
        edm_sampler(p, lat, num_steps=0)
    with pytest.raises(TypeError, match="num_steps must be an int"):
        edm_sampler(p, lat, num_steps=2.0)
    with pytest.raises(ValueError, match="sigma_min must be > 0"):
        dgref.edm_sigma_steps(10, sigma_min=0.0)
    with pytest.raises(ValueError, match="sigma_min must be < sigma_max"):
        dgref.edm_sigma_steps(10, sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="S_churn must be >= 0"):
        edm_sampler(p, lat, S_churn=-1.0)
    with pytest.raises(ValueError, match="latents must not be empty"):
        edm_sampler(p, torch.zeros(0, 2))
    with pytest.raises(ValueError, match="sigmas must be a strictly decreasing"):
        edm_sampler(p, lat, sigmas=[1.0, 2.0, 0.0])


def test_guidance_window_and_weight():
    p = dgref.ring()
    with pytest.raises(ValueError, match=r"window must have min <= max, got \(2.0, 1.0\)"):
        dgref.ScoreCorrectedDenoiser(p, lambda x, s: 0 * x, 1.0, window=(2.0, 1.0))
    with pytest.raises(ValueError, match="weight must be finite"):
        dgref.ScoreCorrectedDenoiser(p, lambda x, s: 0 * x, float("inf"))
    with pytest.raises(TypeError, match="window must be a pair"):
        dgref.ScoreCorrectedDenoiser(p, lambda x, s: 0 * x, 1.0, window=3.0)


def test_denoiser_dtype_and_device_mismatch():
    net = mlp_denoiser(2, 1.0, hidden=16, depth=1)
    with pytest.raises(ValueError, match="x is torch.float64 .* network's parameters are torch.float32"):
        net(torch.zeros(3, 2, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        net(torch.zeros(3, 2), torch.zeros(3))


def test_precond_and_loss_bad_input():
    with pytest.raises(ValueError, match="sigma_data must be > 0"):
        dgref.edm_precond_coeffs(torch.ones(2), sigma_data=0.0)
    with pytest.raises(ValueError, match="reduction must be"):
        dgref.edm_loss(dgref.ring(), torch.zeros(4, 2), reduction="sum")


def test_device_argument():
    with pytest.raises(ValueError, match="device must be"):
        dgref.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            dgref.resolve_device("cuda")
    assert dgref.resolve_device("cpu").type == "cpu"


def test_likelihood_bad_input():
    p = dgref.ring()
    with pytest.raises(ValueError, match="sigma_min must be < sigma_max"):
        dgref.ode_log_likelihood(p, torch.zeros(3, 2), sigma_min=2.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="method must be"):
        dgref.ode_log_likelihood(p, torch.zeros(3, 2), method="magic")


# ---------------------------------------------------------------- property-based
@HYP
@given(K=st.integers(1, 5), dim=st.integers(1, 4), B=st.integers(1, 7),
       sigma=st.floats(0.0, 50.0), seed=st.integers(0, 2**16))
def test_toy_world_properties(K, dim, B, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(K, dim, generator=g, dtype=torch.float64) * 3
    w = torch.rand(K, generator=g, dtype=torch.float64) + 0.05
    stds = torch.rand(K, dim, generator=g, dtype=torch.float64) + 0.1
    p = dgref.GaussianMixture(means, w / w.sum(), stds)
    x = torch.randn(B, dim, generator=g, dtype=torch.float64) * 4
    post = p.posterior(x, sigma)
    assert post.shape == (B, K)
    assert torch.allclose(post.sum(1), torch.ones(B, dtype=torch.float64), atol=1e-12)
    lp, sc, den = p.log_prob(x, sigma), p.score(x, sigma), p.denoise(x, sigma)
    assert lp.shape == (B,) and sc.shape == (B, dim) and den.shape == (B, dim)
    assert torch.isfinite(lp).all() and torch.isfinite(sc).all()
    # Tweedie: D = x + sigma^2 score, exactly.
    assert torch.allclose(den, x + sigma ** 2 * sc, atol=1e-8, rtol=1e-8)


@HYP
@given(B=st.integers(1, 6), dim=st.integers(1, 3), num_steps=st.integers(1, 6),
       churn=st.sampled_from([0.0, 5.0]), seed=st.integers(0, 2**16))
def test_sampler_properties(B, dim, num_steps, churn, seed):
    p = dgref.GaussianMixture(torch.zeros(1, dim), None, 1.0)
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(B, dim, generator=g)
    x = edm_sampler(p, lat, num_steps=num_steps, S_churn=churn, generator=g)
    assert x.shape == (B, dim) and torch.isfinite(x).all()


@HYP
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       bad_sigma=st.sampled_from([0.0, -1.0, float("nan"), float("inf")]))
def test_loss_rejects_bad_sigma_for_any_shape(shape, bad_sigma):
    x0 = torch.zeros(3, *shape)
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        dgref.edm_loss(lambda x, s: x, x0, sigma=torch.full((3,), bad_sigma))


# ---------------------------------------------------------------- non-finite numbers
def test_training_stops_at_first_nonfinite_loss():
    torch.manual_seed(0)
    net = mlp_denoiser(2, 1.0, hidden=16, depth=1)
    class GoesBad:                        # a stream whose batches turn NaN at step 7
        calls = 0

        def sample(self, n, generator=None):
            x = torch.randn(n, 2, generator=generator)
            if self.calls >= 7:
                x[0] = float("nan")
            self.calls += 1
            return x
    g = torch.Generator().manual_seed(0)
    with pytest.raises(NonFiniteError, match=r"non-finite loss .* at step 7; last finite loss"):
        for _ in edm_training_loop(net, GoesBad(), steps=200, batch_size=32, generator=g):
            pass


def test_sampler_reports_nonfinite_samples():
    def broken(x, sigma):
        out = x.clone()
        out[0] = float("nan")
        return out
    with pytest.raises(NonFiniteError, match="1 non-finite sample"):
        edm_sampler(broken, torch.randn(4, 2), num_steps=3)
    x = edm_sampler(broken, torch.randn(4, 2), num_steps=3, check_finite=False)
    assert torch.isnan(x[0]).all()


# ---------------------------------------------------------------- checkpoints
def _train(net, data, steps, stop=None, optimizer=None, generator=None, start_step=0):
    losses = []
    for rec in edm_training_loop(net, data, steps=steps, batch_size=16, lr=3e-3,
                                 generator=generator, optimizer=optimizer,
                                 start_step=start_step):
        losses.append(rec["loss"])
        if stop is not None and rec["step"] + 1 == stop:
            break
    return losses


def test_resume_reaches_same_weights(tmp_path):
    data = dgref.ring().sample(256, generator=torch.Generator().manual_seed(1))
    config = {"hidden": 16, "depth": 2, "steps": 30, "lr": 3e-3}

    torch.manual_seed(0)
    ref = mlp_denoiser(2, 1.4, hidden=16, depth=2)
    ref_losses = _train(ref, data, 30, generator=torch.Generator().manual_seed(5))

    torch.manual_seed(0)
    a = mlp_denoiser(2, 1.4, hidden=16, depth=2)
    opt = torch.optim.Adam(a.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(5)
    first = _train(a, data, 30, stop=12, optimizer=opt, generator=g)
    path = save_checkpoint(tmp_path / "ckpt.pt", a, config, optimizer=opt, step=12, generator=g)

    torch.manual_seed(123)                         # a different init: everything must come back
    b = mlp_denoiser(2, 1.4, hidden=16, depth=2)
    opt_b = torch.optim.Adam(b.parameters(), lr=3e-3)
    g_b = torch.Generator()
    info = load_checkpoint(path, b, config, optimizer=opt_b, generator=g_b)
    assert info["step"] == 12
    rest = _train(b, data, 30, optimizer=opt_b, generator=g_b, start_step=info["step"])
    assert first + rest == ref_losses
    for (k, v1), v2 in zip(ref.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v1, v2), k


def test_checkpoint_rejects_corruption_and_mismatch(tmp_path):
    net = mlp_denoiser(2, 1.0, hidden=8, depth=1)
    path = save_checkpoint(tmp_path / "m.pt", net, {"hidden": 8})
    assert not list(tmp_path.glob("*.tmp"))        # the temporary file was renamed away
    other = mlp_denoiser(2, 1.0, hidden=8, depth=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}

    with pytest.raises(CheckpointError, match=r"hidden \(checkpoint 8, expected 16\)"):
        load_checkpoint(path, other, {"hidden": 16})
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(truncated, other)
    garbage = tmp_path / "g.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(garbage, other)
    wide = mlp_denoiser(2, 1.0, hidden=9, depth=1)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_checkpoint(path, wide)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt", other)
    # None of the failed loads touched the model.
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k]), k
    load_checkpoint(path, other, {"hidden": 8})
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                  other.state_dict().values()))


# ---------------------------------------------------------------- reproducibility
def test_same_seed_same_losses_and_samples():
    def run():
        torch.manual_seed(0)
        net = mlp_denoiser(2, 1.4, hidden=16, depth=2)
        losses = dgref.train_denoiser(net, dgref.ring(), steps=10, batch_size=32,
                                      generator=torch.Generator().manual_seed(3))
        lat = dgref.randn((16, 2), torch.Generator().manual_seed(4))
        x = edm_sampler(net, lat, num_steps=5, S_churn=10.0,
                        generator=torch.Generator().manual_seed(5))
        return losses, x
    (l1, x1), (l2, x2) = run(), run()
    assert l1 == l2 and torch.equal(x1, x2)


@pytest.mark.parametrize("churn", [0.0, 20.0])
def test_sampling_independent_of_batch_size(churn):
    p = dgref.ring()
    seeds = list(range(100, 112))
    full_gen = BatchGenerator(seeds)
    full = edm_sampler(p, dgref.randn((12, 2), full_gen), num_steps=8, S_churn=churn,
                       generator=full_gen)
    parts = []
    for chunk in (seeds[:5], seeds[5:]):
        gen = BatchGenerator(chunk)
        parts.append(edm_sampler(p, dgref.randn((len(chunk), 2), gen), num_steps=8,
                                 S_churn=churn, generator=gen))
    assert torch.equal(full, torch.cat(parts))


# ---------------------------------------------------------------- no network
def test_no_network_access():
    code = textwrap.dedent("""
        import socket
        def refuse(*a, **k):
            raise RuntimeError("network access attempted")
        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        import torch, dgref
        torch.set_num_threads(1)
        p = dgref.ring()
        net = dgref.mlp_denoiser(2, p.std(), hidden=16, depth=1)
        dgref.train_denoiser(net, p, steps=5, batch_size=16, progress=False,
                             generator=torch.Generator().manual_seed(0))
        x = dgref.edm_sampler(net, torch.randn(8, 2), num_steps=4, progress=False)
        kl, se = dgref.kl_divergence(p, p, num_points=50, num_steps=8,
                                     generator=torch.Generator().manual_seed(1))
        print("ok", x.shape, kl)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DGREF_PROGRESS": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


# ---------------------------------------------------------------- both objectives, property-based
class _QuadLogit(torch.nn.Module):
    """d(x, sigma) = a . x + b |x|^2 / (1 + sigma^2): any data shape, closed-form input gradient."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3))
        self.b = torch.nn.Parameter(torch.tensor(-0.2))

    def forward(self, x, sigma):
        flat = x.flatten(1)
        return self.a * flat.sum(1) + self.b * (flat ** 2).sum(1) / (1 + sigma ** 2)


@HYP
@given(shape=st.lists(st.integers(1, 3), min_size=1, max_size=3), B=st.integers(1, 5),
       weighting=st.sampled_from(["kl", "edm"]), gamma=st.sampled_from([0.0, 0.5]),
       seed=st.integers(0, 2**16))
def test_objectives_finite_and_differentiable_for_any_shape(shape, B, weighting, gamma, seed):
    from dgref import ce_loss, kl_loss
    g = torch.Generator().manual_seed(seed)
    x_real = torch.randn(B, *shape, generator=g, dtype=torch.float64)
    x_fake = torch.randn(B, *shape, generator=g, dtype=torch.float64) + 1.0
    disc = _QuadLogit().double()

    def denoiser(x, sigma):                         # the exact denoiser of N(0, I) data
        return x / (1 + sigma.reshape(-1, *[1] * (x.ndim - 1)) ** 2)

    ce = ce_loss(disc, x_real, x_fake, generator=g)
    kl = kl_loss(disc, denoiser, x_real, generator=g, weighting=weighting, gamma=gamma,
                 x_fake=x_fake if gamma > 0 else None)
    for loss in (ce, kl):
        assert loss.ndim == 0 and torch.isfinite(loss)
        grads = torch.autograd.grad(loss, list(disc.parameters()))
        assert all(torch.isfinite(gr).all() for gr in grads)
    # Cross-entropy is a sum of two softplus terms: positive, and exactly 2 log 2 at d = 0.
    assert ce > 0
    zero = _QuadLogit().double()
    with torch.no_grad():
        zero.a.zero_()
        zero.b.zero_()
    assert torch.allclose(ce_loss(zero, x_real, x_fake, generator=g),
                          torch.tensor(2 * math.log(2), dtype=torch.float64))


@HYP
@given(B=st.integers(1, 4), bad=st.sampled_from(["shape", "empty", "sigma", "gamma"]))
def test_objectives_reject_bad_input(B, bad):
    from dgref import ce_loss, kl_loss
    disc = _QuadLogit()
    x = torch.randn(B, 2)
    D = dgref.ring()
    if bad == "shape":
        with pytest.raises((ValueError, TypeError), match="x_fake"):
            ce_loss(disc, x, torch.randn(B, 3))
    elif bad == "empty":
        with pytest.raises(ValueError, match="must not be empty"):
            kl_loss(disc, D, torch.zeros(0, 2))
    elif bad == "sigma":
        with pytest.raises(ValueError, match="sigma must be finite and > 0"):
            kl_loss(disc, D, x, sigma=torch.zeros(B))
    else:
        with pytest.raises(ValueError, match="gamma"):
            kl_loss(disc, D, x, gamma=-1.0)
