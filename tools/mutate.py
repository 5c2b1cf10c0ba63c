"""Mutation testing of dgref's core with mutmut (issue 15): ``make mutate``.

Too slow for CI (tens of minutes to hours on two cores), so it is not part of ``make test``
and mutmut is not in requirements.txt: this script installs it into the running venv when it
is missing.

What it does:

1. Copies the package and the unit-test files (no notebooks, no browser or papermill tests)
   into a scratch folder (default ``.mutation/``, git-ignored) with a ``setup.cfg`` that tells
   mutmut which modules to mutate and which tests to run. The repository itself is never
   touched.
2. Runs ``mutmut run`` there, one worker, niced. mutmut first records which tests reach which
   function, then runs, for each mutant, only those tests, fastest first, stopping at the
   first failure.
3. Classifies the result: killed (a test failed or the mutant timed out), survived, no tests
   (no unit test reaches the function), and *equivalent*: survivors that cannot change any
   specified behaviour, each with its reason, either by a rule below or listed in
   ``tools/mutation_equivalents.txt``.
4. Prints the score ``killed / (all - equivalent)`` and writes a Markdown report (default
   ``.mutation/report.md``) with every survivor's diff.

Not mutated, by configuration: ``raise`` statements (their messages are checked by name in
the bad-input tests; the conditions that lead to them are mutated).

Usage::

    python tools/mutate.py                      # every mutant of the core, all unit tests
    python tools/mutate.py --sample 300         # a seeded uniform sample of the mutants
    python tools/mutate.py --modules dgref/guidance.py --tests tests/test_pins.py
    python tools/mutate.py --rerun              # re-run the last run's survivors only
                                                #  (after adding tests), same scratch folder

A full run is long: every surviving mutant runs all the tests that reach its function (tens
of seconds each). ``--sample N --seed S`` runs a reproducible uniform sample instead; the
report then gives the score on the sample with its binomial standard error, and counts the
mutants that no unit test reaches over the whole population (free: no test runs).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT_VERSION = "3.8.1"

#: The core: EDM core and samplers, toy worlds, labelled worlds, guidance, discriminator
#: objectives, CFG, likelihood, grid flow.
MODULES = ["dgref/edm.py", "dgref/toy.py", "dgref/labelled.py", "dgref/guidance.py",
           "dgref/discriminator.py", "dgref/cfg.py", "dgref/likelihood.py",
           "dgref/gridflow.py"]

#: Unit tests only: no notebooks (nbval), no browser, no papermill, no book build.
TESTS = ["tests/test_foundation.py", "tests/test_discriminator.py",
         "tests/test_conditional.py", "tests/test_ce_failure.py", "tests/test_bad_input.py",
         "tests/test_reliability.py", "tests/test_seeding.py", "tests/test_gridflow.py",
         "tests/test_sde_density.py", "tests/test_pins.py",
         "tests/test_mutation_*.py"]

#: Deselected in the mutation run. The first runs dgref in a subprocess, which cannot see a
#: mutant. The others are the slowest statistical or training tests (2-12 s each, paid again
#: by every surviving mutant of every function they reach); without them the score is a
#: lower bound of the unit tests' score.
DESELECT = ["tests/test_reliability.py::test_no_network_access",
            "tests/test_reliability.py::test_training_stops_at_first_nonfinite_loss",
            "tests/test_conditional.py::test_sde_sampler_gaussian_moments",
            "tests/test_foundation.py::test_mlp_trains_on_ring",
            "tests/test_foundation.py::test_log_prob_integrates_to_one_2d_ring",
            "tests/test_bad_input.py::test_nan_training_data_caught_before_the_first_step",
            "tests/test_bad_input.py::test_cuda_without_cuda_is_a_clear_error"]

EQUIVALENTS = ROOT / "tools" / "mutation_equivalents.txt"

#: Lines never mutated (regular expressions; a match covers the whole statement).
DO_NOT_MUTATE = [r"^\s*raise\b"]

# A pytest plugin copied into the scratch folder: runs the selected tests fastest first (by
# the durations mutmut recorded), so that a mutant dies at its cheapest failing test.
ORDER_PLUGIN = '''
import json, os

def _durations():
    try:
        from mutmut.state import state
        d = dict(state().duration_by_test)
        if d:
            return d
    except Exception:
        pass
    for path in ("mutmut-stats.json", os.path.join("mutants", "mutmut-stats.json")):
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f).get("duration_by_test", {})
    return {}

def pytest_collection_modifyitems(session, config, items):
    d = _durations()
    if d:
        items.sort(key=lambda it: d.get(it.nodeid, d.get("mutants/" + it.nodeid, 1e9)))
'''


def log(msg: str) -> None:
    print(f"[mutate] {msg}", flush=True)


def bin_dir() -> Path:
    return Path(sys.executable).parent


def ensure_mutmut() -> Path:
    exe = bin_dir() / "mutmut"
    try:
        import mutmut  # noqa: F401
        if exe.exists():
            return exe
    except ImportError:
        pass
    log(f"installing mutmut=={MUTMUT_VERSION} into {sys.prefix} (not a project requirement)")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"mutmut=={MUTMUT_VERSION}"],
                   check=True)
    if not exe.exists():
        sys.exit(f"mutmut was installed but {exe} is missing")
    return exe


def expand_tests(patterns: list[str]) -> list[str]:
    out = []
    for pat in patterns:
        hits = sorted(glob.glob(str(ROOT / pat)))
        out += [str(Path(h).relative_to(ROOT)) for h in hits]
    return list(dict.fromkeys(out))


def prepare(work: Path, modules: list[str], tests: list[str], fresh: bool) -> None:
    """Lay out the scratch folder; ``fresh=False`` (a re-run) keeps the package copy and
    mutmut's mutants and results, and refreshes only the tests."""
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if fresh:
        shutil.copytree(ROOT / "dgref", work / "dgref",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if (work / "tests").exists():
        shutil.rmtree(work / "tests")
    (work / "tests").mkdir()
    helpers = [p for p in (ROOT / "tests").glob("*.py")
               if p.name == "conftest.py" or p.name.startswith("_")]
    for p in helpers + [ROOT / t for t in tests]:
        shutil.copy2(p, work / "tests" / p.name)
    (work / "_mutate_order.py").write_text(ORDER_PLUGIN)
    # The test selection is the folder, whatever it holds: a re-run with more test files
    # keeps mutmut's configuration (and so its recorded results) unchanged.
    cfg = ["[mutmut]",
           "source_paths = dgref",
           "only_mutate =", *[f"    {m}" for m in modules],
           "pytest_add_cli_args_test_selection =", "    tests",
           *[f"    --deselect={d}" for d in DESELECT],
           "pytest_add_cli_args =",
           *[f"    {a}" for a in ("-p", "no:cacheprovider", "-p", "no:nbval", "-p", "no:xdist",
                                  "-p", "_mutate_order", "-W", "ignore")],
           "also_copy =", "    _mutate_order.py",
           "do_not_mutate_patterns =", *[f"    {p}" for p in DO_NOT_MUTATE],
           "process_isolation = fork",
           "",
           "[tool:pytest]",
           "markers =", "    slow: takes more than a few seconds", ""]
    (work / "setup.cfg").write_text("\n".join(cfg))


def run_mutmut(exe: Path, work: Path, names: list[str], max_children: int, nice: int,
               expect_fail: bool = False) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DGREF_PROGRESS": "0", "MPLBACKEND": "Agg",
           "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    cmd = ["nice", "-n", str(nice), str(exe), "run", "--max-children", str(max_children), *names]
    t0 = time.time()
    with open(work / "run.log", "ab") as out:
        proc = subprocess.run(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    took = time.time() - t0
    if proc.returncode != 0 and not expect_fail:
        tail = (work / "run.log").read_bytes()[-3000:].decode("utf-8", "replace")
        sys.exit(f"mutmut run failed (exit {proc.returncode}); end of {work / 'run.log'}:\n{tail}")
    return took


def all_mutants(work: Path) -> list[str]:
    names = []
    for meta in sorted((work / "mutants").rglob("*.py.meta")):
        names += sorted(json.loads(meta.read_text()).get("exit_code_by_key", {}))
    return names


def covered_functions(work: Path) -> set[str]:
    stats = json.loads((work / "mutants" / "mutmut-stats.json").read_text())
    return {f for f, tests in stats["tests_by_mangled_function_name"].items() if tests}


def generate(exe: Path, work: Path, nice: int) -> float:
    """Generate the mutants and record which tests reach which function, running none:
    mutmut stops (by design) when asked for a mutant name that does not exist."""
    return run_mutmut(exe, work, ["__no_such_mutant__"], 1, nice, expect_fail=True)


# -- results ---------------------------------------------------------------------------------
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests",
          36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout",
          34: "skipped", 37: "killed"}


def load_results(work: Path) -> dict[str, str]:
    res = {}
    for meta in (work / "mutants").rglob("*.py.meta"):
        data = json.loads(meta.read_text())
        for key, code in data.get("exit_code_by_key", {}).items():
            res[key] = STATUS.get(code, "suspicious" if code is not None else "not checked")
    return res


_FUNCS: dict[Path, dict[str, str]] = {}


def _functions(path: Path) -> dict[str, str]:
    """Every function's source in a mutmut-generated file (original and mutants), by name."""
    if path not in _FUNCS:
        import ast
        src = path.read_text()
        lines = src.splitlines()
        _FUNCS[path] = {node.name: "\n".join(lines[node.lineno - 1:node.end_lineno])
                        for node in ast.walk(ast.parse(src))
                        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return _FUNCS[path]


def diff_of(exe: Path, work: Path, name: str) -> list[str]:
    """The changed lines of a mutant against the original function (``-`` then ``+``),
    read from mutmut's generated file (as ``mutmut show`` prints them, without a process
    per mutant)."""
    import difflib
    module = name.rsplit("__mutmut_", 1)[0].rsplit(".", 1)[0]
    funcs = _functions(work / "mutants" / (module.replace(".", "/") + ".py"))
    fname = name.rsplit(".", 1)[1]
    mutant, orig = funcs.get(fname), funcs.get(fname.rsplit("__mutmut_", 1)[0] + "__mutmut_orig")
    if mutant is None or orig is None:
        return [f"? no source for {name}"]
    body_m = re.sub(r"__mutmut_\d+", "", mutant).splitlines()     # the def line too: a
    body_o = re.sub(r"__mutmut_orig", "", orig).splitlines()       # default's mutant is there
    return [ln for ln in difflib.unified_diff(body_o, body_m, lineterm="", n=0)
            if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]


def function_of(name: str) -> str:
    """``dgref.mod.xǁClassǁmethod__mutmut_3`` -> ``dgref.mod.Class.method``."""
    base = name.rsplit("__mutmut_", 1)[0]
    mod, _, fn = base.rpartition(".")
    fn = fn[2:] if fn.startswith("x_") else fn[1:] if fn.startswith("x") else fn
    return mod + "." + fn.strip("ǁ").replace("ǁ", ".")


_STRING = re.compile(r"""("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')""")


def rule_equivalent(diff: list[str]) -> str | None:
    """Survivors that are equivalent by a general rule (reason), else None."""
    minus = [ln[1:] for ln in diff if ln.startswith("-")]
    plus = [ln[1:] for ln in diff if ln.startswith("+")]
    if len(minus) != 1 or len(plus) != 1:
        return None
    old, new = minus[0], plus[0]
    if _STRING.sub('""', old) != _STRING.sub('""', new):
        return None                         # more than string literals changed
    pairs = [(a[1:-1], b[1:-1]) for a, b in zip(_STRING.findall(old), _STRING.findall(new))
             if a != b]
    wrapped = pairs and all(b == "XX" + a + "XX" for a, b in pairs)
    if wrapped and re.search(r"\bcheck_\w+\(|\bdesc=|\bwhat=", old):
        return ("message text only: 'XX' around an argument name in an error message or "
                "around a progress label (the message still contains the name)")
    return None


def load_listed_equivalents() -> list[tuple[str, str, str]]:
    """``function | mutated line (stripped) | reason`` per line of mutation_equivalents.txt."""
    out = []
    if EQUIVALENTS.exists():
        for ln in EQUIVALENTS.read_text().splitlines():
            if not ln.strip() or ln.lstrip().startswith("#"):
                continue
            # the function is before the first " | ", the reason after the last one: the
            # mutated line between them may itself contain " | " (a bitwise or)
            parts = ln.split(" | ")
            if len(parts) < 3:
                sys.exit(f"{EQUIVALENTS}: expected 'function | mutated line | reason', got {ln!r}")
            out.append((parts[0].strip(), " | ".join(parts[1:-1]).strip(), parts[-1].strip()))
    return out


def listed_equivalent(listed, func: str, diff: list[str]) -> str | None:
    plus = " ".join(ln[1:].strip() for ln in diff if ln.startswith("+"))
    for f, line, reason in listed:
        if f == func and line == plus:
            return reason
    return None


def report(exe: Path, work: Path, out: Path, modules, tests, took: float | None,
           population: list[str] | None = None) -> dict:
    res = {k: v for k, v in load_results(work).items() if v != "not checked"}
    listed = load_listed_equivalents()
    survivors, equivalent, no_tests = [], [], []
    for name in sorted(res):
        st = res[name]
        if st not in ("survived", "no tests", "suspicious", "not checked"):
            continue
        diff = diff_of(exe, work, name)
        func = function_of(name)
        why = rule_equivalent(diff) or listed_equivalent(listed, func, diff)
        entry = (name, func, diff, why, st)
        if why:
            equivalent.append(entry)
        elif st == "no tests":
            no_tests.append(entry)
        else:
            survivors.append(entry)
    total = len(res)
    killed = sum(1 for s in res.values() if s in ("killed", "timeout"))
    denom = total - len(equivalent)
    score = killed / denom if denom else float("nan")
    se = (score * (1 - score) / denom) ** 0.5 if denom else float("nan")
    pop_line = ""
    if population:
        cov = covered_functions(work)
        reach = sum(1 for n in population if n.rsplit("__mutmut_", 1)[0] in cov)
        pop_line = (f"- population: {len(population)} mutants, of which "
                    f"{len(population) - reach} in functions that no unit test reaches; this "
                    f"run checked {total} of them (a seeded uniform sample)")
    per_module = {}
    for name, st in res.items():
        mod = name.split(".")[1]
        d = per_module.setdefault(mod, {"total": 0, "killed": 0})
        d["total"] += 1
        d["killed"] += st in ("killed", "timeout")
    summary = {"tool": f"mutmut {MUTMUT_VERSION}", "modules": modules, "tests": tests,
               "mutants": total, "killed": killed, "equivalent": len(equivalent),
               "survived": len(survivors), "no_tests": len(no_tests),
               "score": score, "score_se": se, "seconds": took,
               "population": len(population) if population else total}
    lines = ["# Mutation testing report", "",
             f"Tool: mutmut {MUTMUT_VERSION}, one worker. Modules: "
             + ", ".join(f"`{m}`" for m in modules) + ".",
             "Tests: " + ", ".join(f"`{t}`" for t in tests) + " (unit tests only).", "",
             f"- mutants: {total}", f"- killed (incl. timeouts): {killed}",
             f"- equivalent: {len(equivalent)}", f"- survived: {len(survivors)}",
             f"- reached by no unit test: {len(no_tests)}",
             f"- **score: {killed} / {denom} = {100 * score:.1f}%** "
             f"(killed / non-equivalent mutants; binomial se {100 * se:.1f}% if a sample)",
             pop_line,
             f"- run time: {took:.0f} s" if took else "", "",
             "| module | mutants | killed |", "| --- | --- | --- |"]
    for mod, d in sorted(per_module.items()):
        lines.append(f"| {mod} | {d['total']} | {d['killed']} |")
    for title, group in (("Survivors", survivors), ("Reached by no unit test", no_tests),
                         ("Equivalent", equivalent)):
        lines += ["", f"## {title} ({len(group)})", ""]
        for name, func, diff, why, st in group:
            lines.append(f"- `{name}` ({func})" + (f": {why}" if why else ""))
            lines += [f"      {ln}" for ln in diff]
    out.write_text("\n".join(lines) + "\n")
    (out.with_suffix(".json")).write_text(json.dumps(
        {**summary, "survivors": [s[0] for s in survivors],
         "no_tests_list": [s[0] for s in no_tests]}, indent=1))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modules", help="comma-separated module paths (default: the core)")
    ap.add_argument("--tests", help="comma-separated test files or globs (default: unit tests)")
    ap.add_argument("--workdir", default=str(ROOT / ".mutation"))
    ap.add_argument("--report", help="Markdown report path (default WORKDIR/report.md)")
    ap.add_argument("--max-children", type=int, default=1)
    ap.add_argument("--nice", type=int, default=15)
    ap.add_argument("--sample", type=int, default=None,
                    help="run a seeded uniform sample of this many mutants")
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--only", help="comma-separated globs of mutant names to run, e.g. "
                    "'dgref.edm.x_edm_sampler_iter*' (the report then covers those)")
    ap.add_argument("--exclude", help="comma-separated globs of mutant names left out of the "
                    "population (e.g. what an earlier run covered)")
    ap.add_argument("--per-module", action="store_true",
                    help="with --sample N: a stratified sample, N mutants of each module "
                    "(uniform within the module)")
    ap.add_argument("--rerun", action="store_true",
                    help="re-run only the last run's survivors, with the current tests")
    ap.add_argument("--report-only", action="store_true", help="no run: report the last one")
    ap.add_argument("--min-score", type=float, default=None,
                    help="exit 1 when the score is below this fraction (e.g. 0.95)")
    args = ap.parse_args(argv)
    modules = args.modules.split(",") if args.modules else MODULES
    for m in modules:
        if not (ROOT / m).is_file():
            sys.exit(f"--modules: {m} does not exist under {ROOT}")
    tests = expand_tests(args.tests.split(",") if args.tests else TESTS)
    if not tests:
        sys.exit("--tests: no test file matched")
    work = Path(args.workdir).resolve()
    exe = ensure_mutmut()
    out = Path(args.report) if args.report else work / "report.md"
    took = None
    if not args.report_only:
        if args.rerun:
            last = json.loads((work / "report.json").read_text())
            names = last["survivors"] + last["no_tests_list"]
            if not names:
                log("no survivors to re-run")
            else:
                prepare(work, modules, tests, fresh=False)
                log(f"re-running {len(names)} survivors with {len(tests)} test files")
                took = run_mutmut(exe, work, names, args.max_children, args.nice)
        else:
            prepare(work, modules, tests, fresh=True)
            log(f"mutating {len(modules)} modules against {len(tests)} test files in {work}")
            t0 = time.time()
            if args.sample or args.only or args.exclude:
                generate(exe, work, args.nice)
                population = all_mutants(work)
                import fnmatch
                if args.only:
                    pats = args.only.split(",")
                    population = [n for n in population
                                  if any(fnmatch.fnmatch(n, p) for p in pats)]
                if args.exclude:
                    pats = args.exclude.split(",")
                    population = [n for n in population
                                  if not any(fnmatch.fnmatch(n, p) for p in pats)]
                import random
                rng = random.Random(args.seed)
                if args.per_module and args.sample:
                    strata: dict[str, list[str]] = {}
                    for n in population:
                        strata.setdefault(n.split(".")[1], []).append(n)
                    names = sorted(n for mod in sorted(strata) for n in rng.sample(
                        strata[mod], min(args.sample, len(strata[mod]))))
                else:
                    names = sorted(rng.sample(
                        population, min(args.sample or len(population), len(population))))
                (work / "sample.json").write_text(json.dumps(
                    {"seed": args.seed, "population": population, "sample": names}, indent=0))
                log(f"{len(population)} mutants; running {len(names)} of them "
                    f"(seed {args.seed})")
                run_mutmut(exe, work, names, args.max_children, args.nice)
            else:
                run_mutmut(exe, work, [], args.max_children, args.nice)
            took = time.time() - t0
    sample = work / "sample.json"
    population = json.loads(sample.read_text())["population"] if sample.exists() else None
    s = report(exe, work, out, modules, tests, took, population)
    log(f"{s['mutants']} mutants: {s['killed']} killed, {s['equivalent']} equivalent, "
        f"{s['survived']} survived, {s['no_tests']} reached by no unit test")
    log(f"score {100 * s['score']:.1f}% (killed / non-equivalent); report {out}")
    if took:
        log(f"run time {took:.0f} s")
    if args.min_score is not None and s["score"] < args.min_score:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
