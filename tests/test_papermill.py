"""Every chapter of ``_toc.yml`` takes its parameters from papermill (README: ``papermill
book/NAME.ipynb out.ipynb -p seed 3 ...``).

Only a chapter's first cells run here, up to and including its set-up cell (the one calling
``setup_chapter``): that is where parameters are read, checked and printed, so this costs a
kernel start per chapter, not a chapter run. Each chapter runs to the end once, in
test_chapters.py (or in ``make book``). This checks, for whatever chapters the toc lists, that

* papermill injects ``seed=7`` (not the default 0), ``device="cpu"``, ``quick=True`` and every
  declared size at its quick default, in a cell of its own after the ``parameters`` cell,
  and the values reach the chapter: the ``dgref-parameters: {json}`` line it prints equals
  what was injected, types included;
* a bad value (negative size, wrong type, unknown device) stops the chapter in its set-up
  cell with an error naming the parameter.

The kernel is this interpreter (conftest.py's ``kernel_name``), so no user-level ``python3``
kernelspec can hijack the run.
"""
from __future__ import annotations

import numbers

import nbformat
import pytest

from _bookfiles import (KERNEL_START_RETRIES, cell_tags, kernel_start_failed,
                        printed_parameters, quick_parameters, read_notebook, setup_call,
                        toc_notebooks)

papermill = pytest.importorskip("papermill")
from papermill.exceptions import PapermillExecutionError  # noqa: E402

NOTEBOOKS = toc_notebooks()
SEED = 7


def first_cells(path, tmp_path):
    """A copy of the chapter cut after its set-up cell, in ``tmp_path``."""
    nb = read_notebook(path)
    index, _ = setup_call(nb)
    assert index is not None, f"{path.name}: no cell calls setup_chapter"
    nb.cells = nb.cells[:index + 1]
    out = tmp_path / f"{path.stem}-setup.ipynb"
    nbformat.write(nb, out)
    return out


def run_first_cells(path, tmp_path, parameters, kernel):
    source = str(first_cells(path, tmp_path))
    for attempt in range(1 + KERNEL_START_RETRIES):
        try:
            return papermill.execute_notebook(
                source, str(tmp_path / path.name), parameters=parameters, kernel_name=kernel,
                cwd=str(path.parent), language="python", progress_bar=False,
                log_output=False, start_timeout=180, execution_timeout=600)
        except RuntimeError as exc:    # a kernel that never started ran no cell: start another
            if not (kernel_start_failed(exc) and attempt < KERNEL_START_RETRIES):
                raise


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_injected_parameters_reach_the_chapter(path, kernel_name, tmp_path):
    params = quick_parameters(path, SEED)
    nb = run_first_cells(path, tmp_path, params, kernel_name)

    tagged = [i for i, c in enumerate(nb.cells) if "injected-parameters" in cell_tags(c)]
    assert tagged, f"{path.name}: papermill did not inject parameters (no parameters cell?)"
    params_cell = [i for i, c in enumerate(nb.cells) if "parameters" in cell_tags(c)]
    assert params_cell and tagged[0] == params_cell[0] + 1, \
        f"{path.name}: the injected cell is not right after the parameters cell"

    records = printed_parameters(nb)
    assert len(records) == 1, (f"{path.name}: expected exactly one 'dgref-parameters:' "
                               f"line (dgref's setup_chapter), got {len(records)}")
    rec = records[0]
    assert rec["chapter"] == path.stem
    for key, value in params.items():
        assert key in rec, f"{path.name}: parameter {key!r} missing from {rec}"
        assert rec[key] == value and type(rec[key]) is type(value), \
            f"{path.name}: injected {key}={value!r} but the chapter used {rec[key]!r}"


def _bad_cases():
    """(parameters, the parameter name the error must contain) for the first chapter."""
    if not NOTEBOOKS:
        return []
    path = NOTEBOOKS[0]
    params = quick_parameters(path, SEED)
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
        run_first_cells(path, tmp_path, {"seed": SEED, **bad}, kernel_name)
    err = info.value
    assert err.ename in ("ValueError", "TypeError"), (err.ename, err.evalue)
    assert repr(name) in err.evalue or name in err.evalue, \
        f"the error does not name the parameter {name!r}: {err.evalue}"
    assert "setup_chapter" in err.source, \
        f"expected the failure in the setup_chapter cell, it came in cell {err.cell_index}:\n" \
        f"{err.source}"
    # markdown title, parameters, injected-parameters, set-up: at most cell index 3.
    assert err.cell_index <= 3, f"failed in cell {err.cell_index}, not in the first cells"
