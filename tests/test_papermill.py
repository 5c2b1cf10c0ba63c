"""Every chapter of ``_toc.yml`` runs headless under papermill with injected parameters.

Users run chapters with ``papermill book/NAME.ipynb out.ipynb -p seed 3 ...`` (README). This
checks, for whatever chapters the toc lists, that

* the chapter runs to the end with ``seed=7`` (not the default 0), ``device="cpu"``,
  ``quick=True`` and every declared size given explicitly (its quick default, read from the
  chapter's ``setup_chapter(..., sizes={...})`` call), so the run costs what the chapter's own
  quick run costs while exercising the "value given" path of every size;
* the values reached the chapter: the ``dgref-parameters: {json}`` line it prints equals what
  was injected;
* every cell that produced an image carries a ``mystnb.figure`` caption, one image per cell,
  every captioned cell drew its image, and no progress bar or warning leaked into the
  outputs (they would be printed in the book);
* a bad value (negative size, wrong type, unknown device) stops the chapter in its set-up
  cell with an error naming the parameter.

The kernel is this interpreter (a kernelspec written to a temp dir and put first on
``JUPYTER_PATH``), so no user-level ``python3`` kernelspec can hijack the run.
"""
from __future__ import annotations

import json
import numbers
import re
import sys
import time

import pytest

from _bookfiles import (cell_tags, parameters_cell, parse_parameters, printed_parameters,
                        read_notebook, setup_call, toc_notebooks)

papermill = pytest.importorskip("papermill")
from papermill.exceptions import PapermillExecutionError  # noqa: E402

NOTEBOOKS = toc_notebooks()
KERNEL = "dgref-test-python"
SEED = 7
PROGRESS_RE = re.compile(r"\d+%\|.*\|")   # a tqdm bar
WARNING_RE = re.compile(r"\w*Warning\b")    # e.g. "UserWarning: ..." on stderr


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory, request):
    """A kernelspec whose argv is ``sys.executable``, first on ``JUPYTER_PATH``."""
    base = tmp_path_factory.mktemp("jupyter")
    spec_dir = base / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "dgref tests", "language": "python"}))
    mp = pytest.MonkeyPatch()
    import os
    mp.setenv("JUPYTER_PATH", os.pathsep.join(
        [str(base)] + [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]))
    mp.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    mp.setenv("DGREF_PROGRESS", "0")
    request.addfinalizer(mp.undo)
    return KERNEL


def run_chapter(path, out_path, parameters, kernel):
    return papermill.execute_notebook(
        str(path), str(out_path), parameters=parameters, kernel_name=kernel,
        cwd=str(path.parent), language="python", progress_bar=False, log_output=False, start_timeout=180,
        execution_timeout=900)


def injected_parameters(path) -> dict:
    """seed=7, device="cpu", quick=True and each declared size at its quick default."""
    nb = read_notebook(path)
    _, cell = parameters_cell(nb)
    declared = parse_parameters(cell.source) if cell is not None else {}
    _, sizes = setup_call(nb)
    params = {"seed": SEED, "device": "cpu", "quick": True}
    for name, (par, quick_default, _full) in sizes.items():
        if (par is not None and par in declared and declared[par] is None
                and isinstance(quick_default, (numbers.Real, str)) and par == name):
            params[par] = quick_default
    return params


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_chapter_runs_with_injected_parameters(path, kernel_name, tmp_path):
    params = injected_parameters(path)
    out = tmp_path / path.name
    t0 = time.perf_counter()
    nb = run_chapter(path, out, params, kernel_name)
    elapsed = time.perf_counter() - t0
    print(f"papermill {path.name}: {elapsed:.1f} s with {params}")

    # papermill placed the values in a cell of their own, after the parameters cell.
    tagged = [i for i, c in enumerate(nb.cells) if "injected-parameters" in cell_tags(c)]
    assert tagged, f"{path.name}: papermill did not inject parameters (no parameters cell?)"

    records = printed_parameters(nb)
    assert len(records) == 1, (f"{path.name}: expected exactly one '{'dgref-parameters:'}' "
                               f"line (dgref.book.setup_chapter), got {len(records)}")
    rec = records[0]
    assert rec["chapter"] == path.stem
    for key, value in params.items():
        assert key in rec, f"{path.name}: parameter {key!r} missing from {rec}"
        assert rec[key] == value and type(rec[key]) is type(value), \
            f"{path.name}: injected {key}={value!r} but the chapter used {rec[key]!r}"

    problems = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        images = [o for o in cell.get("outputs", []) if o.get("output_type") in
                  ("display_data", "execute_result") and any(
                      k.startswith("image/") for k in o.get("data", {}))]
        fig = cell.get("metadata", {}).get("mystnb", {}).get("figure")
        if images and not (isinstance(fig, dict) and str(fig.get("caption", "")).strip()):
            problems.append(f"cell {i} draws a figure without a mystnb.figure caption")
        if len(images) > 1:
            problems.append(f"cell {i} draws {len(images)} figures (one per cell)")
        if fig is not None and not images:
            problems.append(f"cell {i} has a figure caption but drew no image (plt.show() "
                            "under a non-inline backend, or the figure closed before display?)")
        for o in cell.get("outputs", []):
            if o.get("output_type") != "stream":
                continue
            if PROGRESS_RE.search(o.get("text", "")):
                problems.append(f"cell {i} printed a progress bar (set progress off)")
            elif o.get("name") == "stderr" and WARNING_RE.search(o.get("text", "")):
                problems.append(f"cell {i} printed a warning into the book: "
                                f"{o['text'].strip()[:300]}")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def _bad_cases():
    """(parameters, the parameter name the error must contain) for the first chapter."""
    if not NOTEBOOKS:
        return []
    path = NOTEBOOKS[0]
    params = injected_parameters(path)
    int_sizes = [k for k, v in params.items() if k not in ("seed", "device", "quick")
                 and isinstance(v, numbers.Integral) and not isinstance(v, bool)]
    size = int_sizes[0] if int_sizes else None
    cases = [({"device": "tpu"}, "device")]
    if size is not None:
        cases += [({size: -1}, size), ({size: "many"}, size)]
    else:
        cases += [({"seed": -1}, "seed"), ({"quick": "yes"}, "quick")]
    return [pytest.param(path, p, name, id=f"{path.stem}-{name}-{list(p.values())[0]}")
            for p, name in cases]


@pytest.mark.parametrize("path,bad,name", _bad_cases())
def test_bad_parameter_fails_in_setup_cell(path, bad, name, kernel_name, tmp_path):
    with pytest.raises(PapermillExecutionError) as info:
        run_chapter(path, tmp_path / path.name, {"seed": SEED, **bad}, kernel_name)
    err = info.value
    assert err.ename in ("ValueError", "TypeError"), (err.ename, err.evalue)
    assert repr(name) in err.evalue or name in err.evalue, \
        f"the error does not name the parameter {name!r}: {err.evalue}"
    assert "setup_chapter" in err.source, \
        f"expected the failure in the setup_chapter cell, it came in cell {err.cell_index}:\n" \
        f"{err.source}"
    # markdown title, parameters, injected-parameters, set-up: at most cell index 3.
    assert err.cell_index <= 3, f"failed in cell {err.cell_index}, not in the first cells"
