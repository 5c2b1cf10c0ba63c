"""Progress bars: every dgref loop goes through dgref._progress, and tests/the book switch it off."""
from __future__ import annotations

import ast
import importlib
import inspect
import os
from pathlib import Path

import pytest
import torch

import dgref
import dgref._progress as progress_mod

PACKAGE = Path(dgref.__file__).parent


@pytest.fixture(autouse=True)
def _restore_progress():
    saved = dict(progress_mod._DEFAULT)
    yield
    progress_mod._DEFAULT.update(saved)


def _sample(progress):
    data = dgref.ring(num_modes=4)
    latents = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    return dgref.edm_sampler(data, latents, num_steps=4, progress=progress)


def _train(progress):
    torch.manual_seed(0)
    net = dgref.mlp_denoiser(2, 1.0, hidden=8, depth=1)
    losses = [r["loss"] for r in dgref.training.edm_training_loop(
        net, dgref.ring(num_modes=4), steps=3, batch_size=8, progress=progress,
        generator=torch.Generator().manual_seed(0))]
    assert len(losses) == 3


def _loglik(progress):
    data = dgref.mixture_1d()
    x = torch.zeros(4, 1)
    dgref.ode_log_likelihood(data, x, num_steps=3, progress=progress)


LOOPS = {"edm_sampler": (_sample, "sampling"), "edm_training_loop": (_train, "training"),
         "ode_log_likelihood": (_loglik, None)}


@pytest.mark.parametrize("name", LOOPS)
def test_progress_false_is_silent_and_true_draws_a_bar(name, capsys):
    run, desc = LOOPS[name]
    run(False)
    out = capsys.readouterr()
    assert out.err == "" and out.out == "", f"{name}(progress=False) printed {out}"
    run(True)
    err = capsys.readouterr().err
    assert "it/s" in err or "s/it" in err or "%|" in err, \
        f"{name}(progress=True) drew no bar on stderr: {err!r}"
    if desc:
        assert desc in err


@pytest.mark.parametrize("name", LOOPS)
def test_default_follows_set_progress(name, capsys):
    run, _ = LOOPS[name]
    dgref.set_progress(False)
    run(None)
    assert capsys.readouterr().err == ""
    dgref.set_progress(True)
    run(None)
    assert capsys.readouterr().err != ""


@pytest.mark.parametrize("value,expected", [("0", False), ("1", True), ("", False)])
def test_environment_switch(value, expected, monkeypatch):
    """DGREF_PROGRESS=0 (set by the Makefile, .ci/run and tests/conftest.py) turns bars off."""
    monkeypatch.setenv("DGREF_PROGRESS", value)
    try:
        importlib.reload(progress_mod)      # the default is read when the module is imported
        assert progress_mod.progress_enabled(None) is expected
    finally:
        monkeypatch.undo()
        importlib.reload(progress_mod)


def test_tests_run_with_progress_off():
    if os.environ.get("DGREF_PROGRESS") not in (None, "0"):
        pytest.skip("DGREF_PROGRESS set explicitly by the caller")
    assert progress_mod.progress_enabled(None) is False


def test_no_module_uses_tqdm_directly():
    """Every bar goes through dgref._progress.progress_bar, so one switch turns all off."""
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "_progress.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            if any(m == "tqdm" or m.startswith("tqdm.") for m in mods):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, f"import tqdm directly (use dgref._progress.progress_bar): {offenders}"


def test_public_progress_arguments_default_to_the_switch():
    """A public loop with a ``progress`` argument defaults it to None (the global switch)."""
    bad = []
    for name in dgref.__all__:
        obj = getattr(dgref, name)
        funcs = [obj] if inspect.isfunction(obj) else (
            [v for v in vars(obj).values() if inspect.isfunction(v)] if inspect.isclass(obj)
            else [])
        for f in funcs:
            p = inspect.signature(f).parameters.get("progress")
            if p is not None and p.default is not None:
                bad.append(f"{name}.{f.__name__}: progress={p.default!r}")
    assert not bad, bad
