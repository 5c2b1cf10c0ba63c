"""README.md stays true: its code runs, its commands and paths exist."""
from __future__ import annotations

import re
import shlex

import pytest

from _bookfiles import ROOT, toc_files

README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert m, f"README.md has no section '## {title}'"
    return m.group(1)


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def test_python_example_runs(capsys):
    blocks = _blocks(_section("Use dgref in your own code"), "python")
    assert len(blocks) == 1
    code = blocks[0]
    assert 5 <= len(code.strip().splitlines()) <= 20, "keep the example short"
    ns = {"__name__": "__readme__"}
    exec(compile(code, "README.md", "exec"), ns)
    out = capsys.readouterr().out
    # What the README says it prints: KL about 0.15, shares about 0.36 (model), 0.12 (guided).
    assert 0.12 < ns["kl"] < 0.18 and ns["se"] < 0.01, out
    assert ns["name"] == "guided" and abs(ns["share"] - 0.125) < 0.025, out   # 4.8 SE at n=4000
    assert "model : share" in out and "guided: share" in out


def test_quick_start_commands_are_make_targets():
    makefile = (ROOT / "Makefile").read_text()
    cmds = [ln.split("#")[0].split() for b in _blocks(_section("Quick start"), "bash")
            for ln in b.splitlines() if ln.strip()]
    assert [c[:2] for c in cmds] == [["make", "book"], ["make", "test"]]
    assert re.search(r"^book:.*\n\t.*jupyter-book build \. -W", makefile, re.M)
    assert re.search(r"^test:.*\n\t.*pytest", makefile, re.M)


def test_papermill_example_parses_and_names_a_chapter():
    block = _blocks(_section("Run one chapter with other parameters (papermill)"), "bash")[0]
    argv = shlex.split(block.replace("\\\n", " "))
    env = [a for a in argv if re.match(r"^[A-Z_]+=", a)]
    assert env == ["JUPYTER_PATH=.venv/share/jupyter"]
    argv = argv[len(env):]
    assert argv[0] == ".venv/bin/papermill" and (ROOT / argv[0]).exists()
    assert (ROOT / ".venv/share/jupyter/kernels/python3/kernel.json").is_file()
    from papermill.cli import papermill as cli
    ctx = cli.make_context("papermill", argv[1:])     # click parses the flags, runs nothing
    assert ctx.params["kernel"] == "python3" and ctx.params["language"] == "python"
    chapter = ROOT / ctx.params["notebook_path"]
    chapters = [p for p in toc_files() if p.suffix == ".ipynb"]
    if not chapters:
        pytest.skip("no chapter in _toc.yml yet")
    assert chapter in chapters, f"README's papermill example names {chapter}, not a chapter"
    assert dict(ctx.params["parameters"]).keys() <= {"seed", "quick", "device"}


def test_layout_paths_exist():
    block = _section("Layout").split("```")[1]
    names = [ln.split()[0] for ln in block.splitlines()[1:] if ln.strip() and not ln[0].isspace()]
    missing = []
    for first in names:
        for part in re.split(r",\s*", first):
            if part and not (ROOT / part.rstrip("/")).exists():
                missing.append(part)
    assert names and not missing, f"README Layout names missing paths: {missing}"
