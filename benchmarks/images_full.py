#!/usr/bin/env python
"""The digit-image experiment of the chapter "Images", end to end, without Jupyter.

    python benchmarks/images_full.py                 # full-size setting (16x16, GPU sizes)
    python benchmarks/images_full.py --quick         # the chapter's CPU default
    python benchmarks/images_full.py --smoke         # tiny sizes, CPU, < 1 minute

Prints the device, the wall time of every phase (and whether it came from the cache), the
classifier's held-out accuracy and the metrics table; ``--json PATH`` also writes them.
Trained models and samples are cached (default ``_build/cache`` in the repository, or
``$DGREF_CACHE``, or ``--cache-dir``); ``--fresh`` uses an empty temporary cache instead.
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

from dgref.image_experiment import (ImagesExperiment, format_metrics_table,  # noqa: E402
                                    images_config)
from dgref import resolve_device  # noqa: E402

SMOKE = {
    "classifier": {"width": 8, "feature_dim": 16, "steps": 30},
    "denoiser": {"channels": [8, 16], "steps": 40, "batch_size": 64},
    "sampler": {"num_steps": 4},
    "samples": {"num_fake": 128, "num_eval": 128},
    "discriminator": {"channels": [8, 16], "steps": 10, "batch_size": 64},
    "metrics": {"num_boot": 20},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="the chapter's CPU default sizes")
    group.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda[:N]")
    ap.add_argument("--cache-dir", default=None, help="default: $DGREF_CACHE or _build/cache")
    ap.add_argument("--fresh", action="store_true", help="use an empty temporary cache")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--weights", default="0.5,2",
                    help="extra guidance weights to sample with (comma-separated; '' for none)")
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    os.environ.setdefault("DGREF_PROGRESS", "0")
    cfg = images_config(quick=args.quick or args.smoke, seed=args.seed,
                        overrides=SMOKE if args.smoke else None)
    if args.smoke:
        cfg["setting"] = "smoke"      # its own cache entries, never the chapter's
    tmp = tempfile.TemporaryDirectory(prefix="dgref-cache-") if args.fresh else None
    cache_dir = tmp.name if tmp else args.cache_dir

    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "setting": cfg["setting"], "seed": args.seed,
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    print("images benchmark:", json.dumps(info), flush=True)

    t0 = time.perf_counter()
    ex = ImagesExperiment(cfg, device=device, cache_dir=cache_dir,
                          log=lambda s: print(s, flush=True))
    weights = [float(w) for w in args.weights.split(",") if w.strip()]
    rows = ex.run(weights=weights)
    total = time.perf_counter() - t0

    print(f"\nclassifier held-out accuracy: {ex.classifier_accuracy:.4f} "
          f"(n = {ex.data.x_heldout.shape[0]})")
    print("\nwall time per phase (s):")
    for name, sec in ex.timings.items():
        hit = ex.cache_hits.get(name)
        print(f"  {name:<14} {sec:8.1f}" + ("  (cache)" if hit else ""))
    print(f"  {'total':<14} {total:8.1f}")
    print("\nmetrics against the training split (95% intervals):")
    print(format_metrics_table(rows))
    if args.json:
        out = {"info": info, "config": cfg, "timings": ex.timings, "cache_hits": ex.cache_hits,
               "total_s": total, "classifier_accuracy": ex.classifier_accuracy,
               "metrics": {k: {kk: (vv.tolist() if isinstance(vv, torch.Tensor) else vv)
                               for kk, vv in r.items()} for k, r in rows.items()}}
        Path(args.json).write_text(json.dumps(out, indent=1))
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
