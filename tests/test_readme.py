"""README.md stays true: its code runs, its commands and paths exist."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from _bookfiles import (ROOT, cell_tags, parameters_cell, parse_parameters, read_notebook,
                        toc_notebooks)

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


def _recipe(makefile: str, target: str) -> str:
    """The recipe lines of a Makefile target."""
    m = re.search(rf"^{target}:.*\n((?:\t.*\n?)*)", makefile, re.M)
    assert m, f"the Makefile has no target {target!r}"
    return m.group(1)


def test_quick_start_commands_are_make_targets():
    makefile = (ROOT / "Makefile").read_text()
    cmds = [ln.split("#")[0].split() for b in _blocks(_section("Quick start"), "bash")
            for ln in b.splitlines() if ln.strip()]
    assert [c[:2] for c in cmds] == [["make", "book"], ["make", "test"]]
    assert re.search(r"^book: setup\b", makefile, re.M) and re.search(r"^test: setup\b",
                                                                      makefile, re.M)
    assert re.search(r"jupyter-book build \. -W", _recipe(makefile, "book"))
    assert re.search(r"-m pytest", _recipe(makefile, "test"))


def test_papermill_example_runs_with_this_interpreter(tmp_path, monkeypatch):
    """The README's papermill command: its shape (this checkout's .venv, the python3 kernel,
    a chapter of the toc, parameters the chapter declares), then the same command run with
    this interpreter's papermill and kernelspecs, --prepare-only (parameters injected, the
    chapter not executed: test_chapters.py runs it)."""
    block = _blocks(_section("Run one chapter with other parameters (papermill)"), "bash")[0]
    argv = shlex.split(block.replace("\\\n", " "))
    env = [a for a in argv if re.match(r"^[A-Z_]+=", a)]
    assert env == ["JUPYTER_PATH=.venv/share/jupyter"], env
    argv = argv[len(env):]
    assert argv[0] == ".venv/bin/papermill", argv[0]
    from papermill.cli import papermill as cli
    ctx = cli.make_context("papermill", argv[1:])     # click parses the flags, runs nothing
    assert ctx.params["kernel"] == "python3" and ctx.params["language"] == "python"
    assert (ROOT / ctx.params["cwd"]).is_dir(), ctx.params["cwd"]
    chapter = ROOT / ctx.params["notebook_path"]
    chapters = toc_notebooks()
    if not chapters:
        pytest.skip("no chapter in _toc.yml yet")
    assert chapter in chapters, f"README's papermill example names {chapter}, not a chapter"
    given = dict(ctx.params["parameters"])
    _, cell = parameters_cell(read_notebook(chapter))
    assert cell is not None and given.keys() <= parse_parameters(cell.source).keys()

    # `.venv` is sys.prefix when this runs in the checkout's venv; any other environment
    # with the requirements (conda, tox, a shared venv) has the same layout under its prefix.
    share = Path(sys.prefix) / "share" / "jupyter"
    monkeypatch.setenv("JUPYTER_PATH", str(share))
    assert (share / "kernels" / "python3" / "kernel.json").is_file(), share
    from jupyter_client.kernelspec import KernelSpecManager
    spec = KernelSpecManager().get_kernel_spec("python3")   # JUPYTER_PATH comes first
    assert Path(spec.resource_dir) == share / "kernels" / "python3", spec.resource_dir

    out = tmp_path / "out.ipynb"
    cmd = [sys.executable, "-m", "papermill", *argv[1:], "--prepare-only"]
    cmd[cmd.index(ctx.params["output_path"])] = str(out)
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JUPYTER_PATH": str(share)})
    assert res.returncode == 0, res.stderr[-2000:]
    nb = read_notebook(out)
    injected = [c for c in nb.cells if "injected-parameters" in cell_tags(c)]
    assert len(injected) == 1, "papermill injected no parameters cell"
    # -p values are typed by papermill (3 -> int, False -> bool); compare as written
    assert {k: str(v) for k, v in parse_parameters(injected[0].source).items()} == given
    assert nb.metadata["kernelspec"]["name"] == "python3"


def test_layout_paths_exist():
    block = _section("Layout").split("```")[1]
    names = [ln.split()[0] for ln in block.splitlines()[1:] if ln.strip() and not ln[0].isspace()]
    missing = []
    for first in names:
        for part in re.split(r",\s*", first):
            if part and not (ROOT / part.rstrip("/")).exists():
                missing.append(part)
    assert names and not missing, f"README Layout names missing paths: {missing}"
