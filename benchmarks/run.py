#!/usr/bin/env python
"""Run dgref's benchmark suite and print the table of budgets (see dgref/bench.py).

    python benchmarks/run.py                 # CPU, and the GPU too when one is present
    python benchmarks/run.py --small         # CI size: under 3 minutes, never fails on timing
    python benchmarks/run.py --chapters      # also time every chapter of the book
    python benchmarks/run.py --device cuda --markdown benchmarks/results/h100.md --json out.json

Exit status: 0 unless a budget is missed outside ``--small`` and ``--strict`` is given.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DGREF_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import bench  # noqa: E402  (benchmarks/bench.py, next to this script)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true",
                    help="CI size: whole run < 3 min; reports, never fails on timing")
    ap.add_argument("--device", default="all",
                    help="cpu, cuda, cuda:N, or all (CPU, plus CUDA when present; default)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--chapters", action="store_true",
                    help="also execute every chapter in _toc.yml (off in --small mode)")
    ap.add_argument("--ode-accuracy", action="store_true",
                    help="also tabulate the ODE likelihood's bias against the exact density")
    ap.add_argument("--only", nargs="*", default=None,
                    help="subset: guidance training likelihood ode_accuracy chapters")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--markdown", metavar="PATH", help="write a markdown table naming the machine")
    ap.add_argument("--wall", action="store_true",
                    help="time CPU runs by the wall clock (default: process CPU time, steadier "
                         "on a shared machine)")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 when a budget is missed (never in --small mode)")
    args = ap.parse_args(argv)

    if args.wall:
        bench.CLOCK["cpu"] = "wall"
    if args.device == "all":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    t0 = time.perf_counter()
    all_results = []
    for dev in devices:
        res = bench.run_benchmarks(device=dev, small=args.small,
                                   chapters=(args.chapters or "chapters" in (args.only or ()))
                                   and not args.small,
                                   ode_accuracy=args.ode_accuracy, threads=args.threads,
                                   only=args.only,
                                   log=lambda m: print(m, file=sys.stderr, flush=True))
        all_results.append(res)
        print(bench.format_table(res), flush=True)
        print(flush=True)
    print(f"[bench] total {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    if args.json:
        import json
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(all_results if len(all_results) > 1
                                              else all_results[0], indent=1, default=str))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text("\n".join(
            bench.format_markdown(r, title=f"dgref benchmarks on {r['machine']['device']}")
            for r in all_results))
    missed = [r for res in all_results for r in res["rows"] if r["ok"] is False]
    for r in missed:
        print(f"[bench] budget missed: {r['section']}: {r['name']} = {r['value']:.3g} "
              f"{r['unit']} (budget {r['budget']})", file=sys.stderr)
    return 1 if (missed and args.strict and not args.small) else 0


if __name__ == "__main__":
    sys.exit(main())
