#!/usr/bin/env python
"""The digit-image experiment of the chapter "Images", end to end, without Jupyter.

    python benchmarks/images_full.py                 # full-size setting (16x16, GPU sizes)
    python benchmarks/images_full.py --quick         # the chapter's CPU default
    python benchmarks/images_full.py --smoke         # tiny sizes, CPU, < 1 minute
    torchrun --standalone --nproc_per_node=2 benchmarks/images_full.py --quick --shards 2
                                                     # training across 2 processes (DDP)

Runs both regimes of the chapter (``--regime`` picks one): the well-trained and the
under-trained denoiser, each with both discriminators and DG's published guidance. Prints the
device, the wall time of every phase (and whether it came from the cache), the classifier's
held-out accuracy, the held-out loss gaps and the metrics table; ``--json PATH`` also writes
them. Trained models and samples are cached (default ``_build/cache`` in the repository, or
``$DGREF_CACHE``, or ``--cache-dir``); ``--fresh`` uses an empty temporary cache instead.

Under ``torchrun`` every process trains (DistributedDataParallel over ``--shards`` shards, one
per process: gloo on the CPU, NCCL on GPUs), rank 0 samples, measures, prints and writes the
cache. ``--shards N`` without torchrun computes the same N shards in one process, so it gives
the same models as N processes (up to the order of float sums) and shares their cache entries.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dgref.distributed import init_distributed, shutdown_distributed  # noqa: E402
from dgref.image_experiment import (ImagesExperiment, field_weight,  # noqa: E402
                                    format_loss_gap_table, format_metrics_table, images_config)

SMOKE = {
    "classifier": {"width": 8, "feature_dim": 16, "steps": 30},
    "denoiser": {"channels": [8, 16], "steps": 40, "batch_size": 64},
    "sampler": {"num_steps": 4},
    "samples": {"num_fake": 128, "num_eval": 128},
    "discriminator": {"channels": [8, 16], "steps": 10, "batch_size": 64},
    "loss_gap": {"draws": 2},
    "metrics": {"num_boot": 20},
}


def _overrides(args, regime: str) -> dict:
    out = {"parallel": {"shards": args.shards}}
    if args.smoke:
        out.update({k: dict(v) for k, v in SMOKE.items()})
        if regime == "undertrained":          # keep the regimes apart at smoke size too
            out["denoiser"]["steps"] = SMOKE["denoiser"]["steps"] // 4
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="the chapter's CPU default sizes")
    group.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--regime", default="both", choices=["both", "trained", "undertrained"])
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda[:N]")
    ap.add_argument("--shards", type=int, default=None,
                    help="split each global batch into this many shards (default: the number "
                         "of processes)")
    ap.add_argument("--cache-dir", default=None, help="default: $DGREF_CACHE or _build/cache")
    ap.add_argument("--fresh", action="store_true", help="use an empty temporary cache")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--weights", default="",
                    help="extra guidance weights to sample with (comma-separated)")
    args = ap.parse_args(argv)

    ctx = init_distributed(args.device)
    if args.shards is None:
        args.shards = ctx.world_size
    device = ctx.device
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    os.environ.setdefault("DGREF_PROGRESS", "0")

    def say(*a):
        if ctx.is_main:
            print(*a, flush=True)

    tmp = None
    cache_dir = args.cache_dir
    if args.fresh:
        # every process must use the same folder: rank 0 makes it and tells the others
        from dgref.distributed import broadcast_object
        if ctx.is_main:
            tmp = tempfile.TemporaryDirectory(prefix="dgref-cache-")
        cache_dir = broadcast_object(tmp.name if tmp else None, ctx)

    regimes = ["trained", "undertrained"] if args.regime == "both" else [args.regime]
    info = {"device": str(device), "torch": torch.__version__,
            "python": platform.python_version(),
            "setting": "smoke" if args.smoke else ("quick" if args.quick else "full"),
            "seed": args.seed, "threads": torch.get_num_threads(),
            "processes": ctx.world_size, "backend": ctx.backend, "shards": args.shards}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    say("images benchmark:", json.dumps(info))

    weights = [float(w) for w in args.weights.split(",") if w.strip()]
    out = {"info": info, "regimes": {}}
    t_all = time.perf_counter()
    for regime in regimes:
        cfg = images_config(quick=args.quick or args.smoke, seed=args.seed, regime=regime,
                            overrides=_overrides(args, regime))
        if args.smoke:
            cfg["setting"] = "smoke"      # its own cache entries, never the chapter's
        t0 = time.perf_counter()
        ex = ImagesExperiment(cfg, device=device, cache_dir=cache_dir,
                              log=lambda s: print(s, flush=True), ctx=ctx)
        rows = ex.run(weights=weights)
        total = time.perf_counter() - t0
        if not ctx.is_main:
            continue
        g = cfg["guidance"]
        wf = field_weight(g["weight"], g["slopes"])
        say(f"\n== {regime} denoiser ({cfg['denoiser']['steps']} steps)")
        say(f"classifier held-out accuracy: {ex.classifier_accuracy:.4f} "
            f"(n = {ex.data.x_heldout.shape[0]})")
        say("\nwall time per phase (s):")
        for name, sec in ex.timings.items():
            hit = ex.cache_hits.get(name)
            say(f"  {name:<22} {sec:8.1f}" + ("  (cache)" if hit else ""))
        say(f"  {'total':<22} {total:8.1f}")
        say(f"\nheld-out loss gap (nats, 95% intervals; published setting: field weight {wf:g}):")
        say(format_loss_gap_table(ex.loss_gaps, primary=wf))
        say("\nmetrics against the training split (95% intervals):")
        say(format_metrics_table(rows))
        out["regimes"][regime] = {
            "config": cfg, "timings": ex.timings, "cache_hits": ex.cache_hits,
            "total_s": total, "classifier_accuracy": ex.classifier_accuracy,
            "loss_gap": {k: {"field_weight": wf, "estimate": lg.estimate(wf),
                             "best": lg.best_weight()} for k, lg in ex.loss_gaps.items()},
            "class_changed": {k: int(ex.class_changes(k).numel()) for k in ("ce", "kl")},
            "metrics": {k: {kk: (vv.tolist() if isinstance(vv, torch.Tensor) else vv)
                            for kk, vv in r.items()} for k, r in rows.items()}}
    out["total_s"] = time.perf_counter() - t_all
    say(f"\ntotal wall time: {out['total_s']:.1f} s")
    if args.json and ctx.is_main:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if ctx.world_size > 1:
        from dgref.distributed import barrier
        barrier(ctx)
    if tmp:
        tmp.cleanup()
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
