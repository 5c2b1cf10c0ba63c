"""Per-module counts and scores of one or more mutate.py scratch folders (issue 15).

    python tools/mutation_summary.py .mutation/sample [.mutation/cfg ...]

For each folder and module: mutants checked, killed, equivalent (by the rules and the list in
tools/mutation_equivalents.txt), survived, and the score killed / non-equivalent with its
binomial standard error (meaningful when the folder holds a seeded sample: see
``sample.json``; then the module's population size is printed too).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mutate  # noqa: E402


def summary(work: Path) -> dict[str, dict]:
    res = {k: v for k, v in mutate.load_results(work).items() if v != "not checked"}
    listed = mutate.load_listed_equivalents()
    sample = work / "sample.json"
    pop = json.loads(sample.read_text())["population"] if sample.exists() else list(res)
    out: dict[str, dict] = {}
    for name in pop:
        m = out.setdefault(name.split(".")[1], {"population": 0, "checked": 0, "killed": 0,
                                                 "equivalent": 0, "survived": 0, "survivors": []})
        m["population"] += 1
    for name, st in res.items():
        m = out.setdefault(name.split(".")[1], {"population": 0, "checked": 0, "killed": 0,
                                                 "equivalent": 0, "survived": 0, "survivors": []})
        m["checked"] += 1
        if st in ("killed", "timeout"):
            m["killed"] += 1
            continue
        diff = mutate.diff_of(None, work, name)
        if mutate.rule_equivalent(diff) or mutate.listed_equivalent(
                listed, mutate.function_of(name), diff):
            m["equivalent"] += 1
        else:
            m["survived"] += 1
            m["survivors"].append(name)
    for m in out.values():
        d = m["checked"] - m["equivalent"]
        m["score"] = m["killed"] / d if d else float("nan")
        m["se"] = (m["score"] * (1 - m["score"]) / d) ** 0.5 if d else float("nan")
    return out


def main(argv: list[str]) -> None:
    for w in argv:
        work = Path(w)
        print(f"## {work}")
        print("| module | population | checked | equivalent | killed | survived | score (se) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for mod, m in sorted(summary(work).items()):
            print(f"| {mod} | {m['population']} | {m['checked']} | {m['equivalent']} | "
                  f"{m['killed']} | {m['survived']} | {100 * m['score']:.1f}% "
                  f"({100 * m['se']:.1f}%) |")


if __name__ == "__main__":
    main(sys.argv[1:])
