"""dgref.book.setup_chapter: the parameters every chapter starts with (papermill-injectable)."""
from __future__ import annotations

import json
import math

import pytest
import torch

import dgref._progress as progress_mod
from dgref.book import PARAMETERS_PREFIX, setup_chapter

SIZES = {"num_points": (None, 200, 2000), "lr": (None, 0.1, 0.01), "exact": (None, True, False),
         "world": (None, "ring", "grid")}


@pytest.fixture(autouse=True)
def _restore_progress():
    saved = dict(progress_mod._DEFAULT)
    yield
    progress_mod._DEFAULT.update(saved)


def _printed(capsys) -> dict:
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(PARAMETERS_PREFIX)]
    assert len(lines) == 1, lines
    return json.loads(lines[0][len(PARAMETERS_PREFIX):])


def _call(**kw):
    args = dict(seed=0, device="cpu", quick=True, sizes=None)
    args.update(kw)
    return setup_chapter("demo", **args)


@pytest.mark.parametrize("quick,expected", [(True, (200, 0.1, True, "ring")),
                                            (False, (2000, 0.01, False, "grid"))])
def test_none_takes_the_default_of_the_setting(quick, expected, capsys):
    P = _call(quick=quick, sizes=dict(SIZES))
    assert (P.num_points, P.lr, P.exact, P.world) == expected
    rec = _printed(capsys)
    assert (rec["num_points"], rec["lr"], rec["exact"], rec["world"]) == expected
    assert rec["quick"] is quick and rec["chapter"] == "demo"


def test_given_values_win_and_keep_their_type(capsys):
    sizes = {"num_points": (5, 200, 2000), "lr": (1, 0.1, 0.01), "exact": (False, True, False),
             "world": ("grid", "ring", "grid")}
    P = _call(seed=7, sizes=sizes, note="x")
    assert P.num_points == 5 and type(P.num_points) is int
    assert P.lr == 1.0 and type(P.lr) is float            # an int given for a float size
    assert P.exact is False and P.world == "grid" and P.seed == 7
    assert P.device == torch.device("cpu")
    rec = _printed(capsys)
    assert rec == {"chapter": "demo", "seed": 7, "device": "cpu", "quick": True,
                   "num_points": 5, "lr": 1.0, "exact": False, "world": "grid", "note": "x"}


def test_printed_line_matches_the_namespace(capsys):
    P = _call(seed=3, sizes=dict(SIZES))
    rec = _printed(capsys)
    ns = {k: (str(v) if k == "device" else v) for k, v in vars(P).items()}
    assert rec == ns


def test_seeds_global_generators_and_switches_progress_off(capsys):
    progress_mod.set_progress(True)
    _call(seed=11)
    a = torch.rand(3)
    torch.manual_seed(11)
    assert torch.equal(a, torch.rand(3))
    assert progress_mod.progress_enabled(None) is False


def test_auto_device_resolves(capsys):
    P = _call(device="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert P.device.type == expected and _printed(capsys)["device"].startswith(expected)


@pytest.mark.parametrize("kw,exc,name", [
    ({"seed": -1}, ValueError, "seed"),
    ({"seed": 1.5}, (ValueError, TypeError), "seed"),
    ({"seed": True}, (ValueError, TypeError), "seed"),
    ({"seed": "3"}, (ValueError, TypeError), "seed"),
    ({"quick": "yes"}, TypeError, "quick"),
    ({"quick": 1}, TypeError, "quick"),
    ({"device": "tpu"}, ValueError, "device"),
    ({"device": 3}, (ValueError, TypeError), "device"),
    ({"sizes": {"num_points": (-1, 200, 2000)}}, ValueError, "num_points"),
    ({"sizes": {"num_points": (0, 200, 2000)}}, ValueError, "num_points"),
    ({"sizes": {"num_points": (2.5, 200, 2000)}}, TypeError, "num_points"),
    ({"sizes": {"num_points": ("many", 200, 2000)}}, TypeError, "num_points"),
    ({"sizes": {"num_points": (True, 200, 2000)}}, TypeError, "num_points"),
    ({"sizes": {"lr": (-0.5, 0.1, 0.01)}}, ValueError, "lr"),
    ({"sizes": {"lr": (math.nan, 0.1, 0.01)}}, ValueError, "lr"),
    ({"sizes": {"lr": (math.inf, 0.1, 0.01)}}, ValueError, "lr"),
    ({"sizes": {"lr": ("fast", 0.1, 0.01)}}, TypeError, "lr"),
    ({"sizes": {"exact": (1, True, False)}}, TypeError, "exact"),
    ({"sizes": {"world": (3, "ring", "grid")}}, TypeError, "world"),
    ({"sizes": {"num_points": (None, 200)}}, TypeError, "num_points"),
])
def test_bad_values_fail_naming_the_parameter(kw, exc, name, capsys):
    with pytest.raises(exc) as info:
        _call(**kw)
    assert name in str(info.value), str(info.value)
    assert PARAMETERS_PREFIX not in capsys.readouterr().out   # nothing printed before failing


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_without_cuda_names_device():
    with pytest.raises(ValueError, match="device"):
        _call(device="cuda")
