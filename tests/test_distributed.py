"""Training across processes: two gloo processes on the CPU equal one process with two shards."""
import os
import socket
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

import dgref
from dgref.checkpoint import load_checkpoint
from dgref.digits import ImageDiscriminator, load_digit_images, unet_denoiser
from dgref.distributed import (all_gather_rows, current_context, init_distributed,
                               save_on_main, shard_data, shard_seed, shutdown_distributed,
                               train_denoiser_parallel, train_discriminator_parallel)
from dgref.rng import make_generator

STEPS = 4
BATCH = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _models():
    """A tiny denoiser and two discriminators with fixed initial weights, and their data."""
    den = unet_denoiser(8, channels=(8, 16), generator=make_generator(0))
    disc_ce = ImageDiscriminator(8, channels=(8, 16), generator=make_generator(1))
    disc_kl = ImageDiscriminator(8, channels=(8, 16), generator=make_generator(2))
    x = load_digit_images(8, seed=0).x_train[:200]
    fake = torch.randn(100, 1, 8, 8, generator=make_generator(3)).clamp(-1, 1)
    return den, disc_ce, disc_kl, x, fake


def _sgd(module):
    return torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)


def _train_all(num_shards, ctx=None):
    """Denoiser with the default (Adam, cosine); discriminators with SGD and momentum.

    With Adam, a parameter whose gradient is zero in exact arithmetic (a conv bias before a
    one-channel-per-group GroupNorm) gets float noise whose sign Adam normalises to a full
    step; the order of the sums differs between one process and two when a network is called
    twice per shard (the real and fake sides of the cross-entropy), so the weights would agree
    to ~1e-3 only. SGD keeps the comparison at the precision of the gradients themselves.
    """
    den, disc_ce, disc_kl, x, fake = _models()
    losses = {"den": train_denoiser_parallel(den, x, steps=STEPS, batch_size=BATCH, lr=1e-2,
                                             seed=5, num_shards=num_shards, ctx=ctx)}
    den.requires_grad_(False)
    losses["ce"] = train_discriminator_parallel(
        disc_ce, objective="ce", x_real=x, x_fake=fake, steps=STEPS, batch_size=BATCH, seed=6,
        num_shards=num_shards, ctx=ctx, optimizer=_sgd(disc_ce), weighting="loguniform",
        sigma_min=0.002, sigma_max=20.0)
    losses["kl"] = train_discriminator_parallel(
        disc_kl, objective="kl", x_real=x, denoiser=den, steps=STEPS, batch_size=BATCH, seed=7,
        num_shards=num_shards, ctx=ctx, optimizer=_sgd(disc_kl), sigma_min=0.002,
        sigma_max=20.0)
    return {"den": den, "ce": disc_ce, "kl": disc_kl}, losses


def _worker(rank, world, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        assert ctx.backend == "gloo" and ctx.world_size == world and ctx.rank == rank
        models, losses = _train_all(None, ctx)
        for name, module in models.items():
            save_on_main(os.path.join(folder, f"{name}.pt"), module, {"losses": losses[name]},
                         ctx)
        # rows computed per rank are reassembled in order on every rank
        full = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3)
        got = all_gather_rows(shard_data(full, rank, world), 7, ctx)
        if rank == 0:
            torch.save({"gathered": got}, os.path.join(folder, "gathered.pt"))
    finally:
        shutdown_distributed()


def _max_diff(a, b):
    return max(float((u - v).abs().max()) for u, v in zip(a.state_dict().values(),
                                                          b.state_dict().values()))


def test_two_processes_equal_one_process_with_two_shards():
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(2, _free_port(), folder), nprocs=2, join=True)
        single, single_losses = _train_all(2)
        _, one_shard_losses = _train_all(1)
        fresh = _models()
        for k, name in enumerate(("den", "ce", "kl")):
            ddp = fresh[k]
            info = load_checkpoint(os.path.join(folder, f"{name}.pt"), ddp)
            # the same run: weights and every recorded (global mean) loss
            assert _max_diff(ddp, single[name]) < 1e-6, name
            assert info["config"]["losses"] == pytest.approx(single_losses[name], abs=1e-6)
            # training moved the weights a thousand times farther than that
            assert _max_diff(ddp, _models()[k]) > 1e-3, name
            # and the comparison can fail: one shard of the same global batch size (another
            # random stream, the whole data) gives losses a hundred times farther apart
            assert max(abs(a - b) for a, b in zip(single_losses[name],
                                                  one_shard_losses[name])) > 1e-4, name
        gathered = torch.load(os.path.join(folder, "gathered.pt"))["gathered"]
        assert torch.equal(gathered, torch.arange(21, dtype=torch.float32).reshape(7, 3))


def test_one_shard_is_the_plain_trainer():
    """One shard with ``seed`` is bit for bit the single-process trainer with that generator."""
    den_a, ce_a, kl_a, x, fake = _models()
    den_b, ce_b, kl_b, _, _ = _models()
    la = train_denoiser_parallel(den_a, x, steps=3, batch_size=8, lr=1e-2, seed=11,
                                 num_shards=1)
    lb = dgref.train_denoiser(den_b, x, steps=3, batch_size=8, lr=1e-2,
                              generator=make_generator(11))
    assert la == lb and _max_diff(den_a, den_b) == 0.0
    den_a.requires_grad_(False)
    for obj, a, b, kw in (("ce", ce_a, ce_b, {"x_fake": fake}),
                          ("kl", kl_a, kl_b, {"denoiser": den_a})):
        la = train_discriminator_parallel(a, objective=obj, x_real=x, steps=3, batch_size=8,
                                          seed=12, num_shards=1, sigma_max=20.0, **kw)
        lb = dgref.train_discriminator(b, objective=obj, x_real=x, steps=3, batch_size=8,
                                       generator=make_generator(12), sigma_max=20.0, **kw)
        assert la == lb and _max_diff(a, b) == 0.0, obj


def test_shards_partition_the_data_and_have_their_own_streams():
    x = torch.arange(10)[:, None]
    parts = [shard_data(x, r, 3) for r in range(3)]
    assert sorted(torch.cat(parts)[:, 0].tolist()) == list(range(10))
    assert parts[1][:, 0].tolist() == [1, 4, 7]
    assert shard_seed(5, 0) == 5
    seeds = {shard_seed(5, r) for r in range(4)}
    assert len(seeds) == 4 and all(0 <= s < 2 ** 63 for s in seeds)


def test_single_process_context_and_bad_input(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main) == (0, 1, None, True)
    assert current_context().world_size == 1
    den, _, _, x, _ = _models()
    with pytest.raises(ValueError, match="batch_size"):
        train_denoiser_parallel(den, x, steps=1, batch_size=10, num_shards=3)
    with pytest.raises(ValueError, match="num_shards"):
        train_denoiser_parallel(den, x, steps=1, batch_size=8, num_shards=0)
    with pytest.raises(ValueError, match="shard"):
        shard_data(x, 3, 3)
    with pytest.raises(ValueError, match="objective"):
        train_discriminator_parallel(den, objective="bce", x_real=x, steps=1)
    monkeypatch.setenv("RANK", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK"):
        init_distributed("cpu")
