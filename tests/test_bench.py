"""The benchmark suite (benchmarks/bench.py) and the performance changes it led to.

Performance changes must not change results: the training loop's deferred loss read-back gives
the same losses and the same error, the batched divergence equals the loop, and the RK4 solver
of the ODE likelihood is more accurate than Heun at half the evaluations.
"""
import math
import sys
from pathlib import Path

import pytest
import torch

import dgref
from dgref.likelihood import divergence
from dgref.training import edm_training_loop

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench  # noqa: E402  (benchmarks/bench.py: the suite lives outside the package)


def _losses(check_every, data, steps=40):
    torch.manual_seed(0)
    net = dgref.mlp_denoiser(2, 1.0, hidden=16, depth=1)
    recs = list(edm_training_loop(net, data, steps=steps, batch_size=32, check_every=check_every,
                                  generator=torch.Generator().manual_seed(1)))
    return recs, net


def test_deferred_readback_gives_identical_training():
    data = dgref.ring().sample(256, generator=torch.Generator().manual_seed(0))
    a, net_a = _losses(1, data)
    b, net_b = _losses(7, data)       # 40 steps: blocks of 7 and a last, shorter one
    assert [r["step"] for r in b] == list(range(40))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    for p, q in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(p, q)


class _GoesBad:
    """A data stream (``.sample(n, generator=)``) whose batches turn NaN from call ``after`` on
    (a tensor with a NaN is rejected before the first step, so the stream plants it later)."""

    def __init__(self, after):
        self.calls, self.after = 0, after

    def sample(self, n, generator=None):
        x = torch.randn(n, 2, generator=generator)
        if self.calls >= self.after:
            x[0] = float("nan")
        self.calls += 1
        return x


@pytest.mark.parametrize("check_every", [1, 8])
def test_deferred_readback_names_first_nonfinite_step(check_every):
    data = _GoesBad(after=13)
    seen = []
    with pytest.raises(dgref.NonFiniteError,
                       match=r"non-finite loss nan at step (\d+); last finite loss") as info:
        for rec in edm_training_loop(dgref.mlp_denoiser(2, 1.0, hidden=8, depth=1), data,
                                     steps=200, batch_size=32, check_every=check_every,
                                     generator=torch.Generator().manual_seed(0)):
            seen.append(rec)
    bad = int(str(info.value).split("at step ")[1].split(";")[0])
    assert bad == 13
    # every step before the bad one was yielded, with a finite loss, and the message quotes it
    assert [r["step"] for r in seen] == list(range(bad))
    if seen:
        assert f"last finite loss {seen[-1]['loss']:.6g}" in str(info.value)


def test_check_every_validated():
    with pytest.raises(ValueError, match="check_every"):
        next(edm_training_loop(dgref.mlp_denoiser(2, 1.0, hidden=8, depth=1),
                               torch.randn(8, 2), steps=3, check_every=0))


def test_batched_divergence_equals_loop():
    torch.manual_seed(0)
    den = dgref.mlp_denoiser(3, 1.0, hidden=32, depth=2)
    x, s = torch.randn(50, 3), torch.rand(50) + 0.1
    out_a, div_a = divergence(den, x, s)
    out_b, div_b = divergence(den, x, s, batched=True)
    assert torch.equal(out_a, out_b)
    torch.testing.assert_close(div_a, div_b, rtol=1e-5, atol=1e-5)


def test_rk4_beats_heun_at_half_the_evaluations():
    """Exact ring denoiser: the ODE density is the ring, so mean(log p - ll) is pure bias.
    Measured on 2000 points: Heun 128 steps 0.0083, RK4 32 steps 0.0012 (nats)."""
    data = dgref.ring()
    x = data.sample(500, generator=torch.Generator().manual_seed(0))
    lp = data.log_prob(x.double())
    heun = float((lp - dgref.ode_log_likelihood(data, x, num_steps=128).double()).mean())
    rk4 = float((lp - dgref.ode_log_likelihood(data, x, num_steps=32, solver="rk4").double()
                 ).mean())
    assert abs(rk4) < 0.5 * abs(heun) and abs(rk4) < 0.003
    with pytest.raises(ValueError, match="solver"):
        dgref.ode_log_likelihood(data, x, solver="euler")


def test_time_interleaved_rotates_and_reports_medians():
    calls = []
    out = bench.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                 reps=4, warmup=1)
    assert set(out) == {"a", "b", "_samples"} and len(out["_samples"]["a"]) == 4
    assert calls[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]   # after the warm-up
    assert all(v >= 0 for v in (out["a"], out["b"]))


def test_tables_name_the_machine():
    rows = [bench._row("s", "ratio", 1.5, "x", 2.0, True), bench._row("s", "t", 3.0, "ms")]
    res = {"machine": bench.machine_info("cpu"), "settings": {"setting": "small"}, "rows": rows}
    md = bench.format_markdown(res)
    assert bench.machine_info()["cpu"] in md and "torch" in md and "| met |" in md
    assert "ratio" in bench.format_table(res)


def test_small_training_benchmark_runs():
    rows = bench.bench_training("cpu", train_batch=32, reps=2, train_inner=1, hidden=16)
    ratio = [r for r in rows if r["name"] == "KL step / CE step"][0]
    assert math.isfinite(ratio["value"]) and ratio["value"] > 0 and ratio["budget"] == 2.0


@pytest.mark.parametrize("objective", ["ce", "kl"])
def test_discriminator_loop_deferred_readback_identical(objective):
    from dgref.discriminator import Discriminator, discriminator_training_loop
    data = dgref.ring()
    x_real = data.sample(128, generator=torch.Generator().manual_seed(0))
    x_fake = data.reweighted(stds=0.3).sample(128, generator=torch.Generator().manual_seed(1))
    den = dgref.mlp_denoiser(2, data.std(), hidden=16, depth=1)
    out = []
    for check_every in (1, 4):
        torch.manual_seed(0)
        disc = Discriminator(2, data.std(), hidden=16, depth=2)
        recs = list(discriminator_training_loop(
            disc, objective=objective, x_real=x_real, x_fake=x_fake, denoiser=den, steps=10,
            batch_size=32, generator=torch.Generator().manual_seed(2), check_every=check_every))
        out.append(([r["step"] for r in recs], [r["loss"] for r in recs],
                    [p.detach().clone() for p in disc.parameters()]))
    assert out[0][0] == out[1][0] == list(range(10)) and out[0][1] == out[1][1]
    assert all(torch.equal(p, q) for p, q in zip(out[0][2], out[1][2]))


@pytest.mark.parametrize("check_every", [1, 8])
def test_discriminator_loop_names_first_nonfinite_step(check_every):
    from dgref.discriminator import Discriminator, discriminator_training_loop
    class Broken:                         # real data that turns NaN at its 6th batch
        calls = 0

        def sample(self, n, generator=None):
            Broken.calls += 1
            x = torch.randn(n, 2, generator=generator)
            return x * float("nan") if Broken.calls == 6 else x
    x_real = Broken()
    seen = []
    with pytest.raises(dgref.NonFiniteError,
                       match=r"non-finite discriminator loss nan at step \d+; last finite"
                       ) as info:
        for rec in discriminator_training_loop(
                Discriminator(2, 1.0, hidden=8, depth=1), objective="ce", x_real=x_real,
                x_fake=torch.randn(64, 2), steps=100, batch_size=16, check_every=check_every,
                generator=torch.Generator().manual_seed(0)):
            seen.append(rec)
    bad = int(str(info.value).split("at step ")[1].split(";")[0])
    assert bad == 5 and [r["step"] for r in seen] == list(range(bad))
    assert f"last finite loss {seen[-1]['loss']:.6g}" in str(info.value)
