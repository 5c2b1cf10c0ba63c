"""The whole-core mutation score from exact and sampled strata (issue 15, tools/MUTATION.md).

Strata run whole count exactly (killed, non-equivalent); sampled strata (population N, sample
size n, equivalent e, killed k, from the fresh samples' first runs) are combined by the ratio
estimator R = sum killed / sum non-equivalent, each sampled stratum scaled by N / n; its
standard error by linearisation (d_i = y_i - R x_i per sampled mutant, y killed, x
non-equivalent) with the finite-population correction 1 - n / N, as in MUTATION.md.

    python tools/mutation_core_estimate.py          # the figures quoted in MUTATION.md
"""
from __future__ import annotations

import math

# Session 3's sampled strata: seeds 16-19 pooled, first runs (population without seed 15's
# 25 mutants): N, n, equivalent, killed.
SAMPLED = {"cfg (rest)": (153, 145, 12, 132), "discriminator": (993, 145, 8, 129),
           "edm (rest)": (551, 145, 10, 125), "gridflow": (914, 145, 5, 129),
           "labelled": (886, 145, 8, 133), "likelihood": (756, 145, 10, 130)}
# Exact strata of sessions 2-3 before the full runs: killed, non-equivalent.
EXACT = {"toy": (405, 405), "cfg (548 of f577230)": (489, 489), "guidance": (118, 118),
         "edm_sampler_iter": (205, 205)}


def estimate(exact: dict, sampled: dict) -> tuple[float, float, float, float]:
    """(R, se, estimated killed, estimated non-equivalent)."""
    Y = sum(k for k, _ in exact.values())
    X = sum(m for _, m in exact.values())
    for N, n, e, k in sampled.values():
        Y += N * k / n
        X += N * (n - e) / n
    R = Y / X
    V = 0.0
    for N, n, e, k in sampled.values():
        m = n - e
        vals = [0.0] * e + [1 - R] * k + [-R] * (m - k)
        mu = sum(vals) / n
        s2 = sum((v - mu) ** 2 for v in vals) / (n - 1)
        V += N ** 2 * (1 - n / N) * s2 / n
    return R, math.sqrt(V) / X, Y, X


def show(title: str, exact: dict, sampled: dict) -> None:
    R, se, Y, X = estimate(exact, sampled)
    print(f"{title}: {100 * R:.2f}% +- {100 * se:.1f}% (est. killed {Y:.0f} of {X:.0f} "
          f"non-equivalent); exact strata: {', '.join(exact) or 'none'}")


# Session 3's full runs (the package at f262618, tests/test_mutation_* of their time): killed
# on the first run, killed after the survivors' tests, non-equivalent (final equivalents list).
FULL = {"likelihood": (691, 739, 739), "labelled": (818, 864, 864),
        "cfg (rest)": (164, 164, 164), "discriminator": (948, 978, 978),
        "edm (rest)": (547, 564, 564), "gridflow": (855, 902, 903)}
# cfg's other 530 mutants, run whole on the current package (cfg_loss changed at f262618),
# replace the 548 of f577230.
CFG_MAIN = (491, 491, 491)
# toy, guidance and edm_sampler_iter run whole again on the current package at the end of the
# session (their first runs already had this session's new tests): replace sessions 2-3's.
LATE = {"toy": (408, 408, 408), "guidance": (123, 123, 123), "edm_sampler_iter": (219, 221, 221)}

if __name__ == "__main__":
    show("before the full runs (MUTATION.md, session 3)", EXACT, SAMPLED)
    for label, col in (("first runs", 0), ("after", 1)):
        full = {k: (v[col], v[2]) for k, v in {**FULL, **LATE}.items()}
        full["cfg (other 530)"] = (CFG_MAIN[col], CFG_MAIN[2])
        show(f"whole core, every module run whole on the current package ({label})", full, {})
        six = {k: v for k, v in full.items() if k not in LATE}
        show(f"  the six strata sampled before ({label})", six, {})
