#!/usr/bin/env python
"""GPU-only checks behind the benchmark table (run once on a GPU machine; prints a table).

1. Host synchronisations: a guided and an unguided sampler step with the sigma value checks on
   GPU tensors switched on (``DGREF_DEVICE_CHECKS=1``, one sync per check) and off (default).
2. The EDM training loop with a loss read-back every step (``check_every=1``) and every 32.
3. The exact 2-D divergence of the ODE likelihood as a loop of vector-Jacobian products vs one
   batched (vmapped) backward pass, and RK4 (32 steps) vs Heun (128 steps).
4. Optional: ``torch.compile`` of the MLP inside the denoiser, for the unguided sampler.

Usage: python benchmarks/gpu_extras.py [--json PATH] [--no-compile]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DGREF_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import dgref  # noqa: E402
import bench  # noqa: E402  (benchmarks/bench.py, next to this script)
from dgref import _checks  # noqa: E402
from dgref.discriminator import Discriminator, dg_sampler_kwargs  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry", action="store_true", help="tiny sizes (a CPU dry run of the script)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    rows = []
    big, train_steps = (256, 10) if args.dry else (65536, 300)

    def add(section, name, value, unit, note=""):
        rows.append(bench._row(section, name, value, unit, note=note))
        print(f"{section:<34} {name:<46} {value:>12.4g} {unit} {note}", flush=True)

    data = dgref.ring()
    den = dgref.mlp_denoiser(2, data.std()).to(dev).eval()
    for p in den.parameters():
        p.requires_grad_(False)

    # 1. sigma value checks on GPU tensors: sync vs none -----------------------------------
    for batch in ((64, big) if args.dry else (4096, big)):
        lat = torch.randn(batch, 2, device=dev)
        disc = Discriminator(2, data.std(), hidden=256).to(dev).eval()
        kw = dg_sampler_kwargs(den, disc, 1.0, None)
        steps = 18

        def run(checks, guided):
            def f():
                _checks.DEVICE_VALUE_CHECKS["enabled"] = checks
                try:
                    if guided:
                        dgref.edm_sampler(latents=lat, num_steps=steps, check_finite=False, **kw)
                    else:
                        dgref.edm_sampler(den, lat, num_steps=steps, check_finite=False)
                finally:
                    _checks.DEVICE_VALUE_CHECKS["enabled"] = False
            return f
        t = bench.time_interleaved({"u_sync": run(True, False), "u_nosync": run(False, False),
                                    "g_sync": run(True, True), "g_nosync": run(False, True)},
                                   device=dev, reps=7, warmup=2)
        for k in ("u_sync", "u_nosync", "g_sync", "g_nosync"):
            add(f"sampler step, batch {batch}", {"u": "unguided", "g": "guided"}[k[0]]
                + (" with sigma checks (syncs)" if k.endswith("_sync") else " no syncs"),
                t[k] / steps * 1e3, "ms")

    # 1b. a guidance window: the correction reads back whether any level is inside -----------
    lat = torch.randn(big, 2, device=dev)
    disc = Discriminator(2, data.std(), hidden=256).to(dev).eval()
    fns = {f"window {w}": (lambda kw=dg_sampler_kwargs(den, disc, 1.0, w): dgref.edm_sampler(
        latents=lat, num_steps=18, check_finite=False, **kw)) for w in (None, (0.05, 80.0))}
    t = bench.time_interleaved(fns, device=dev, reps=7, warmup=2)
    for k in fns:
        add(f"guided sampler step, batch {big}", k, t[k] / 18 * 1e3, "ms",
            "window check reads back (sync)" if "0.05" in k else "")

    # 1c. discriminator training loop (reads loss and grad norm back every step) vs bare steps
    from dgref.discriminator import ce_loss, discriminator_training_loop
    from dgref.training import batch_sampler
    model = data.reweighted(stds=0.22)
    dsteps = train_steps

    def dloop():
        d = Discriminator(2, data.std()).to(dev)
        g = torch.Generator(device=dev).manual_seed(0)
        for _ in discriminator_training_loop(d, objective="ce", x_real=data, x_fake=model,
                                             steps=dsteps, generator=g,
                                             batch_size=256 if args.dry else 4096):
            pass

    def dbare():
        d = Discriminator(2, data.std()).to(dev)
        g = torch.Generator(device=dev).manual_seed(0)
        opt = torch.optim.Adam(d.parameters(), lr=1e-3)
        bs = 256 if args.dry else 4096
        dr, df = batch_sampler(data, bs, g, dev), batch_sampler(model, bs, g, dev)
        for _ in range(dsteps):
            loss = ce_loss(d, dr(), df(), generator=g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(d.parameters(), float("inf"))
            opt.step()
    t = bench.time_interleaved({"loop": dloop, "bare": dbare}, device=dev, reps=3, warmup=1)
    add("discriminator CE training, batch 4096", "discriminator_training_loop step",
        t["loop"] / dsteps * 1e3, "ms", "float(loss) + bool(isfinite(gnorm)) each step")
    add("discriminator CE training, batch 4096", "same step without read-backs",
        t["bare"] / dsteps * 1e3, "ms")

    # 2. training loop read-back -----------------------------------------------------------
    def train(check_every, steps=train_steps):
        def f():
            torch.manual_seed(0)
            net = dgref.mlp_denoiser(2, data.std()).to(dev)
            g = torch.Generator(device=dev).manual_seed(0)
            for _ in dgref.training.edm_training_loop(net, data, steps=steps, generator=g,
                                             batch_size=256 if args.dry else 4096,
                                             check_every=check_every):
                pass
        return f
    t = bench.time_interleaved({"every1": train(1), "every32": train(32)}, device=dev, reps=3,
                               warmup=1)
    add("EDM training loop, batch 4096", "step, loss read back every step",
        t["every1"] / train_steps * 1e3, "ms")
    add("EDM training loop, batch 4096", "step, read back every 32 steps",
        t["every32"] / train_steps * 1e3, "ms")

    # 3. divergence: loop vs batched; Heun vs RK4 ------------------------------------------
    for n in (2000, big):
        x = data.sample(n, generator=torch.Generator().manual_seed(0)).to(dev)
        fns = {"loop": lambda: dgref.ode_log_likelihood(den, x, num_steps=16),
               "batched": lambda: dgref.ode_log_likelihood(den, x, num_steps=16, batched=True)}
        t = bench.time_interleaved(fns, device=dev, reps=5, warmup=1)
        add(f"ODE likelihood, {n} points", "Heun step, divergence loop", t["loop"] / 16 * 1e3,
            "ms")
        add(f"ODE likelihood, {n} points", "Heun step, batched divergence",
            t["batched"] / 16 * 1e3, "ms")
    x = data.sample(2000, generator=torch.Generator().manual_seed(0)).to(dev)
    for name, kw in (("Heun 128 steps (default)", dict(num_steps=128)),
                     ("RK4 32 steps", dict(num_steps=32, solver="rk4")),
                     ("RK4 32 steps, batched", dict(num_steps=32, solver="rk4", batched=True))):
        bench._sync(dev)
        t0 = time.perf_counter()
        dgref.kl_divergence(data, den, x=x, **kw)
        bench._sync(dev)
        add("exact KL, 2000 points", name, time.perf_counter() - t0, "s")

    # 4. torch.compile (optional) ----------------------------------------------------------
    if not args.no_compile:
        try:
            lat = torch.randn(big, 2, device=dev)
            cden = dgref.mlp_denoiser(2, data.std()).to(dev).eval()
            cden.load_state_dict(den.state_dict())
            t0 = time.perf_counter()
            cden.net = torch.compile(cden.net)
            with torch.no_grad():
                cden(lat, torch.ones(big, device=dev))
                dgref.edm_sampler(cden, lat, num_steps=18, check_finite=False)
            bench._sync(dev)
            add("torch.compile (MLP of the denoiser)", "compile + first sampler run",
                time.perf_counter() - t0, "s")
            t = bench.time_interleaved(
                {"eager": lambda: dgref.edm_sampler(den, lat, num_steps=18, check_finite=False),
                 "compiled": lambda: dgref.edm_sampler(cden, lat, num_steps=18,
                                                       check_finite=False)},
                device=dev, reps=7, warmup=1)
            add("torch.compile (MLP of the denoiser)", f"sampler step eager, batch {big}",
                t["eager"] / 18 * 1e3, "ms")
            add("torch.compile (MLP of the denoiser)", f"sampler step compiled, batch {big}",
                t["compiled"] / 18 * 1e3, "ms")
        except Exception as exc:  # noqa: BLE001 - optional
            add("torch.compile", f"failed: {type(exc).__name__}", float("nan"), "",
                str(exc)[:200])
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": bench.machine_info(dev),
                                               "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
