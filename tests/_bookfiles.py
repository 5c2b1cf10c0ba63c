"""What the book is made of, discovered from ``_toc.yml`` (shared by the book tests).

Nothing here names a chapter: every test that uses it works for whatever ``_toc.yml`` lists.
"""
from __future__ import annotations

import ast
import hashlib
import json
import numbers
import re
import time
from datetime import timezone
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
TOC = ROOT / "_toc.yml"
PARAMETERS_PREFIX = "dgref-parameters:"


def toc_entries(toc_path: Path = TOC) -> list[str]:
    """Every ``file``/``root`` entry of a Jupyter Book 1 ``_toc.yml``, in reading order."""
    toc = yaml.safe_load(toc_path.read_text())
    out: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            for key in ("root", "file"):
                if isinstance(node.get(key), str):
                    out.append(node[key])
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key) or []:
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(toc)
    return out


def resolve_entry(entry: str, root: Path = ROOT) -> Path | None:
    """The file a toc entry names (Jupyter Book allows leaving the suffix off), or None."""
    p = root / entry
    if p.suffix in (".md", ".ipynb") and p.is_file():
        return p
    for suffix in (".ipynb", ".md"):
        q = p.with_name(p.name + suffix)
        if q.is_file():
            return q
    return None


def toc_files(root: Path = ROOT) -> list[Path]:
    """The existing files of the toc, in reading order."""
    files = [resolve_entry(e, root) for e in toc_entries(root / "_toc.yml")]
    return [f for f in files if f is not None]


def toc_notebooks(root: Path = ROOT) -> list[Path]:
    """The executable chapters: the toc's ``.ipynb`` files."""
    return [f for f in toc_files(root) if f.suffix == ".ipynb"]


def book_sources() -> list[Path]:
    """Every ``.md`` and ``.ipynb`` file under ``book/`` (listed in the toc or not)."""
    return sorted(p for p in BOOK.rglob("*") if p.suffix in (".md", ".ipynb")
                  and ".ipynb_checkpoints" not in p.parts and p.is_file())


def read_notebook(path: Path):
    return nbformat.read(path, as_version=4)


def cell_tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def markdown_text(path: Path) -> str:
    """All the MyST text of a page: the file itself, or a notebook's markdown cells."""
    if path.suffix == ".md":
        return path.read_text()
    nb = read_notebook(path)
    return "\n\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


def parameters_cell(nb):
    """``(index, cell)`` of the cell tagged ``parameters``, or ``(None, None)``."""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "parameters" in cell_tags(cell):
            return i, cell
    return None, None


def _strip_magics(source: str) -> str:
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line
                     for line in source.splitlines())


def parse_parameters(source: str) -> dict:
    """``{name: value}`` for every ``name = <literal>`` of a parameters cell.

    A right-hand side that is not a literal is recorded as the ``...`` (Ellipsis) object.
    """
    out = {}
    for node in ast.parse(_strip_magics(source)).body:
        targets, value = [], None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        for t in targets:
            if isinstance(t, ast.Name):
                try:
                    out[t.id] = ast.literal_eval(value)
                except ValueError:
                    out[t.id] = ...
    return out


def setup_call(nb):
    """``(index, sizes)`` for the first code cell calling ``setup_chapter``.

    ``sizes`` maps a size name to ``(parameter_name, quick_default, full_default)`` as written
    in the call's ``sizes={...}`` (defaults that are not literals come back as ``...``); it is
    ``{}`` when the call has no literal ``sizes`` dict. ``(None, {})`` when no cell calls it.
    """
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or "setup_chapter" not in cell.source:
            continue
        sizes = {}
        try:
            tree = ast.parse(_strip_magics(cell.source))
        except SyntaxError:
            return i, sizes
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and getattr(node.func, "attr",
                                                           getattr(node.func, "id", None))
                    == "setup_chapter"):
                continue
            for kw in node.keywords:
                if kw.arg == "sizes" and isinstance(kw.value, ast.Dict):
                    for k, v in zip(kw.value.keys, kw.value.values):
                        if not (isinstance(k, ast.Constant) and isinstance(v, ast.Tuple)
                                and len(v.elts) == 3):
                            continue
                        par = v.elts[0].id if isinstance(v.elts[0], ast.Name) else None
                        defaults = []
                        for e in v.elts[1:]:
                            try:
                                defaults.append(ast.literal_eval(e))
                            except ValueError:
                                defaults.append(...)
                        sizes[k.value] = (par, *defaults)
        return i, sizes
    return None, {}


def quick_parameters(path: Path, seed: int) -> dict:
    """``seed``, ``device="cpu"``, ``quick=True`` and each declared size at its quick default
    (read from the chapter's ``setup_chapter(..., sizes={...})`` call)."""
    nb = read_notebook(path)
    _, cell = parameters_cell(nb)
    declared = parse_parameters(cell.source) if cell is not None else {}
    _, sizes = setup_call(nb)
    params = {"seed": seed, "device": "cpu", "quick": True}
    for name, (par, quick_default, _full) in sizes.items():
        if (par is not None and par in declared and declared[par] is None
                and isinstance(quick_default, (numbers.Real, str)) and par == name):
            params[par] = quick_default
    return params


def printed_parameters(nb) -> list[dict]:
    """Every ``dgref-parameters: {json}`` record printed by an executed notebook."""
    records = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stdout":
                text = out.get("text", "")
                for line in text.splitlines():
                    if line.startswith(PARAMETERS_PREFIX):
                        records.append(json.loads(line[len(PARAMETERS_PREFIX):]))
    return records


_LABEL_RES = [
    re.compile(r"^:label:\s*(\S+)\s*$", re.M),          # {math} directive option
    re.compile(r"^:name:\s*(\S+)\s*$", re.M),           # figure/admonition/code names
    re.compile(r"^\(([A-Za-z0-9_.:-]+)\)=\s*$", re.M),  # MyST target
    re.compile(r"\$\$\s*\(([A-Za-z0-9_.:-]+)\)", re.M),  # dollarmath $$ ... $$ (label)
]


def labels_in(text: str) -> list[str]:
    out = []
    for rx in _LABEL_RES:
        out += rx.findall(text)
    return out


def notebook_figure_names(path: Path) -> list[str]:
    """Names given to figures via ``mystnb.figure.name`` cell metadata."""
    if path.suffix != ".ipynb":
        return []
    names = []
    for cell in read_notebook(path).cells:
        fig = cell.get("metadata", {}).get("mystnb", {}).get("figure", {})
        if isinstance(fig, dict) and fig.get("name"):
            names.append(fig["name"])
    return names


# --- The chapter runs `make book` made, and when a test may reuse them ----------------------
#
# `make book` records, before anything runs, a digest of everything a chapter's run depends
# on (``book_inputs()``) in ``_build/book-inputs.json.new``; executes every chapter into the
# jupyter-cache ``_build/.jupyter_cache`` (``execute_book``, two at a time), from which
# jupyter-book renders the pages; and renames the record to ``_build/book-inputs.json`` only
# when the whole build (-W: no failing cell, no warning) passed. A test reuses a cached run
# instead of executing the chapter again only when ``reusable_book_run`` finds it is the
# current chapter run against the current package. (In cache mode MyST-NB writes the
# *unexecuted* notebook to ``_build/jupyter_execute/``, so the runs are read from the cache.)

INPUTS_RECORD = ROOT / "_build" / "book-inputs.json"
BOOK_CACHE = ROOT / "_build" / ".jupyter_cache"
# What a chapter's run reads besides its own notebook: the package, the benchmark code and
# its recorded tables, the book configuration and the pinned requirements.
INPUT_DIRS = ("dgref", "benchmarks")
INPUT_FILES = ("_config.yml", "_toc.yml", "requirements.txt")


def _sha(parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()


def package_digest(root: Path = ROOT) -> str:
    """sha256 over the path and bytes of every file the chapters' runs read (INPUT_DIRS,
    INPUT_FILES), ``__pycache__`` and ``*.pyc`` left out."""
    files = []
    for d in INPUT_DIRS:
        files += [p for p in (root / d).rglob("*") if p.is_file()
                  and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    files += [root / f for f in INPUT_FILES if (root / f).is_file()]
    parts = []
    for p in sorted(files):
        parts += [p.relative_to(root).as_posix(), p.read_bytes()]
    return _sha(parts)


def code_sources(nb) -> list[str]:
    """The sources of a notebook's code cells, papermill's injected-parameters cell left out."""
    return [c.source for c in nb.cells
            if c.cell_type == "code" and "injected-parameters" not in cell_tags(c)]


def chapter_digest(nb) -> str:
    """sha256 of what executing a chapter runs: its kernel, its code cells and their tags."""
    kernel = nb.metadata.get("kernelspec", {}).get("name", "")
    return _sha([kernel] + [f"{sorted(cell_tags(c))}\n{c.source}" for c in nb.cells
                            if c.cell_type == "code"])


def book_inputs(root: Path = ROOT) -> dict:
    """The record `make book` writes before building (see INPUTS_RECORD)."""
    return {"started": time.time(), "package": package_digest(root),
            "chapters": {p.relative_to(root).as_posix(): chapter_digest(read_notebook(p))
                         for p in toc_notebooks(root)}}


def reusable_book_run(path: Path, root: Path = ROOT):
    """``(notebook, None)`` when the last `make book` executed this chapter as it is now
    (the notebook as the book rendered it: the chapter with the cached run's outputs), else
    ``(None, reason)``.

    Reusable means: `make book` completed (the record exists); the package and the other
    inputs are byte-identical to what it ran against; the chapter's code is what it ran; the
    cache holds a run of exactly this code (jupyter-cache matches on the code cells and their
    metadata) made during that `make book`.
    """
    rel = path.relative_to(root).as_posix()
    record_path = root / "_build" / INPUTS_RECORD.name
    cache_dir = root / "_build" / BOOK_CACHE.name
    if not record_path.is_file():
        return None, f"no completed `make book` ({record_path.relative_to(root)} missing)"
    record = json.loads(record_path.read_text())
    if record.get("package") != package_digest(root):
        return None, f"{', '.join(INPUT_DIRS + INPUT_FILES)} changed since `make book`"
    source = read_notebook(path)
    if record.get("chapters", {}).get(rel) != chapter_digest(source):
        return None, f"{rel} changed since `make book`"
    if not (cache_dir / "global.db").is_file():
        return None, f"{cache_dir.relative_to(root)} missing"
    from jupyter_cache import get_cache
    cache = get_cache(str(cache_dir))
    try:
        cached = cache.match_cache_notebook(source)
    except KeyError:
        return None, f"{cache_dir.relative_to(root)} holds no run of {rel}"
    created = cached.created       # stored in UTC; SQLite gives it back without a zone
    if created.tzinfo is None:
        created = created.replace(tzinfo=timezone.utc)
    if created.timestamp() < record.get("started", float("inf")):
        return None, f"the cached run of {rel} is older than the last `make book`"
    _, nb = cache.merge_match_into_notebook(source)    # matched on code and cell metadata
    return nb, None


def execute_settings(root: Path = ROOT) -> dict:
    """``timeout`` and ``allow_errors`` from ``_config.yml``'s ``execute`` section."""
    cfg = yaml.safe_load((root / "_config.yml").read_text()) or {}
    ex = cfg.get("execute") or {}
    return {"timeout": ex.get("timeout", 30), "allow_errors": bool(ex.get("allow_errors", False))}


def execute_notebook(nb, cwd: Path, *, timeout: int, allow_errors: bool = False,
                     kernel_name: str | None = None) -> tuple[float, str | None]:
    """Execute ``nb`` in place the way MyST-NB does (jupyter-cache's ``single_nb_execution``:
    nbclient, working directory ``cwd``, ``raises-exception`` and ``skip-execution`` tags
    honoured). Returns ``(seconds, None)``, or ``(seconds, traceback)`` when a cell failed
    or the kernel died; ``nb`` then holds the outputs up to the failure."""
    from jupyter_cache.executors.utils import single_nb_execution
    t0 = time.perf_counter()
    kwargs = {"kernel_name": kernel_name} if kernel_name else {}
    for attempt in range(1 + KERNEL_START_RETRIES):
        try:
            res = single_nb_execution(nb, cwd=str(cwd), timeout=timeout,
                                      allow_errors=allow_errors, meta_override=True,
                                      startup_timeout=180, **kwargs)
            error = res.exc_string if res.err is not None else None
        except Exception as exc:      # the kernel died or did not start
            import traceback
            error = "".join(traceback.format_exception(exc))
        if not (kernel_start_failed(error) and attempt < KERNEL_START_RETRIES):
            return time.perf_counter() - t0, error
        print(f"book: the kernel did not start (attempt {attempt + 1}); starting another",
              flush=True)


#: A kernel that dies before it answers ``kernel_info`` has run no cell. On a busy machine
#: this happens when another process takes one of the ports jupyter_client picked for it
#: before the kernel binds it (ZMQError: Address already in use). Such a start is retried;
#: any failure after the kernel answered is reported as it is.
KERNEL_START_RETRIES = 2
KERNEL_START_FAILURE = "Kernel died before replying to kernel_info"


def kernel_start_failed(error) -> bool:
    """Whether ``error`` (a traceback text or an exception) is a failed kernel start."""
    return error is not None and KERNEL_START_FAILURE in str(error)


def _execute_chapter(path: Path, settings: dict) -> tuple[str, float, str | None]:
    nb = read_notebook(path)
    seconds, error = execute_notebook(nb, path.parent, **settings)
    return nbformat.writes(nb), seconds, error


def execute_book(cache_dir: Path, config_out: Path, workers: int, root: Path = ROOT) -> int:
    """Execute every chapter of the toc, ``workers`` at a time, into a jupyter-cache at
    ``cache_dir``, and write ``config_out``: ``_config.yml`` with ``execute_notebooks: cache``
    on that cache, so that ``jupyter-book build --config config_out`` renders these runs
    instead of executing the chapters again one after another. A chapter that failed is left
    out of the cache: the build then executes it itself and reports it as it always does.
    Returns the number of chapters that failed."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    settings = execute_settings(root)
    cache = get_cache(str(cache_dir))
    failed = 0
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        jobs = {pool.submit(_execute_chapter, p, settings): p for p in toc_notebooks(root)}
        for job in as_completed(jobs):
            path = jobs[job]
            text, seconds, error = job.result()
            rel = path.relative_to(root).as_posix()
            if error is not None:
                failed += 1
                print(f"book: {rel} FAILED after {seconds:.1f} s; jupyter-book will run it again "
                      f"and report it:\n{error[-3000:]}", flush=True)
                continue
            nb = nbformat.reads(text, as_version=4)
            cache.cache_notebook_bundle(CacheBundleIn(nb, str(path),
                                                      data={"execution_seconds": seconds}),
                                        check_validity=False, overwrite=True)
            print(f"book: {rel} executed in {seconds:.1f} s", flush=True)
    print(f"book: {len(jobs)} chapters executed, {workers} at a time, in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)

    write_book_config(cache_dir, config_out, root)
    return failed


def write_book_config(cache_dir: Path, config_out: Path, root: Path = ROOT) -> None:
    """``_config.yml`` with ``execute_notebooks: cache`` on ``cache_dir``, written to
    ``config_out`` (paths that jupyter-book reads relative to the config file made absolute)."""
    cfg = yaml.safe_load((root / "_config.yml").read_text()) or {}
    ex = cfg.get("execute") or {}
    cfg["execute"] = {**ex, "execute_notebooks": "cache", "cache": str(Path(cache_dir).resolve())}
    local = (cfg.get("sphinx") or {}).get("local_extensions") or {}
    for name, where in local.items():     # sys.path entries, relative to the config file
        local[name] = str((root / where).resolve())
    config_out.parent.mkdir(parents=True, exist_ok=True)
    config_out.write_text(yaml.safe_dump(cfg, sort_keys=False))


if __name__ == "__main__":
    # What `make book` runs before `jupyter-book build` (see the Makefile):
    #   python tests/_bookfiles.py --record-inputs PATH [--execute-into DIR --config-out PATH]
    import argparse
    ap = argparse.ArgumentParser(description="Record the book's inputs (see book_inputs); "
                                 "optionally execute its chapters in parallel (execute_book).")
    ap.add_argument("--record-inputs", metavar="PATH", required=True, type=Path)
    ap.add_argument("--execute-into", metavar="CACHE_DIR", type=Path)
    ap.add_argument("--config-out", metavar="PATH", type=Path)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    args.record_inputs.parent.mkdir(parents=True, exist_ok=True)
    args.record_inputs.write_text(json.dumps(book_inputs(), indent=1) + "\n")
    if args.execute_into is not None:
        if args.config_out is None:
            ap.error("--execute-into needs --config-out")
        execute_book(args.execute_into, args.config_out, args.workers)
