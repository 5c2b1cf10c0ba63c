"""The built book as a reader meets it: every page of ``_toc.yml`` in headless Chromium, at
desktop (1280 px) and phone (400 px) width.

One browser and one tab visit every page at both widths (a few seconds a page). A page fails
on any of the problem classes of ``tests/_browser.py`` (raw TeX, pipe-table text, clipped
display math, display math or a table that needs sideways scrolling at desktop width, code that
runs off the edge, clipped tables, a page wider than the phone, broken images, figures without a
caption, untypeset math, tracebacks / warnings / stderr / progress bars in outputs, console
errors, requests that leave localhost, not exactly one search box). At phone width a display
equation or a table may scroll sideways (the book's CSS, book/_static/dgref.css, makes it
scroll instead of being cut), never be clipped.

Every visit saves a full-page screenshot and its findings to ``_build/screenshots/``
(``book__NAME-WIDTH.jpg`` or ``.png`` for very long pages, and ``.json``), which CI keeps.
The same checks run from the command line, for any set of pages::

    .venv/bin/python tests/_browser.py --pages edm cfg

Pages that still fail, pending their chapter's fix, are listed in ``PENDING_PAGES`` as
``"book/NAME@WIDTH"``: they run as strict xfails, so a pending page that starts to pass
fails the suite until it is removed from the set. Empty the set.

Skipped, with the reason, when Chromium, Playwright or the built book is absent, unless the
environment sets ``DGREF_REQUIRE_BROWSER=1`` (``.ci/run`` does when it installed Chromium):
then any of these is a failure. Build the book first (``make book``).
"""
from __future__ import annotations

import json
import os

import pytest

import _browser as B
from _bookfiles import ROOT, toc_files

REQUIRE = os.environ.get("DGREF_REQUIRE_BROWSER") == "1"
PAGES = toc_files()

# Pages that fail today, pending their chapter owner's fix (issue 12). Remove an entry when
# its page passes; a pending page that passes fails the suite (strict xfail).
PENDING_PAGES: set[str] = set()


def _unavailable(reason):
    if REQUIRE:
        pytest.fail(f"DGREF_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def _params():
    out = []
    for page in PAGES:
        for width in B.WIDTHS:
            key = f"{B.page_id(page)}@{width}"
            marks = [pytest.mark.xfail(strict=True, reason=f"{key} is in PENDING_PAGES")] \
                if key in PENDING_PAGES else []
            out.append(pytest.param(page, width, id=key, marks=marks))
    return out


@pytest.fixture(scope="module")
def visitor():
    if not (B.HTML / "index.html").is_file():
        _unavailable(f"the book is not built ({B.HTML / 'index.html'} missing; run `make book`)")
    if B.chromium_executable() is None:
        _unavailable("chromium is not installed (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("the playwright Python package is not installed")
    with B.serve() as server:
        try:
            cm = B.chromium()
            browser = cm.__enter__()
        except Exception as exc:   # noqa: BLE001 -- report why the browser did not start
            _unavailable(f"chromium did not start: {exc}")
        try:
            v = B.Visitor(browser, server)
            yield v
            v.close()
        finally:
            cm.__exit__(None, None, None)


def test_pending_pages_exist():
    """Every PENDING_PAGES entry names a toc page at a tested width (no stale entries)."""
    known = {f"{B.page_id(p)}@{w}" for p in PAGES for w in B.WIDTHS}
    assert PENDING_PAGES <= known, f"unknown entries: {sorted(PENDING_PAGES - known)}"


@pytest.mark.parametrize("page, width", _params())
def test_page_in_browser(page, width, visitor):
    html = B.page_html(page)
    assert html.is_file(), f"{html.relative_to(ROOT)} is not built: rebuild the book (make book)"
    result = visitor.inspect(page, width, B.SCREENSHOTS)
    report = B.SCREENSHOTS / f"{B.page_id(page).replace('/', '__')}-{width}.json"
    report.write_text(json.dumps(result, indent=1))
    assert result["status"] == 200, f"{result['url']}: HTTP {result['status']}"
    fails = B.failures(result)
    msg = "\n".join(f"  {kind} ({len(items)}):\n" + "\n".join(f"    - {i}" for i in items[:8])
                    for kind, items in fails.items())
    assert not fails, f"{B.page_id(page)} at {width} px:\n{msg}"


# ------------------------------------------------------------- the checks' own tests
# Each detector is shown a planted defect on a tiny page: a check that cannot fail is no check.

_PLANTED = """<!doctype html><html><head><meta charset="utf-8"><style>
 article { width: 300px; } .clip { overflow: hidden; } pre { overflow: hidden; }
</style></head><body><div class="search-button__button">search</div><article class="bd-article">
<section><h2>Planted</h2>
<p>The loss $L(d) = \\tfrac12 \\mathbb{E}_p$ is raw.</p>
<p>| a | b |
|---|---|
| 1 | 2 |</p>
<div class="cell_output"><div class="output stream"><pre>Traceback (most recent call last):
  File "x"</pre></div></div>
<div class="cell_output"><div class="output stderr"><pre>UserWarning: something</pre></div></div>
<div class="cell_output"><div class="output stream"><pre> 40%|####      | 4/10 [00:01&lt;00:02]</pre></div></div>
<pre>a_very_long_line_of_code_that_does_not_fit_in_three_hundred_pixels_at_all_really_not</pre>
<div class="clip"><table><tr><td style="white-space: nowrap">wide wide wide wide wide wide wide wide wide wide wide wide wide</td></tr></table></div>
<img src="missing.png" alt="x">
</section></article></body></html>"""


def test_detectors_catch_planted_defects(visitor, tmp_path):
    page = visitor.tab
    page.set_viewport_size({"width": 1280, "height": 900})
    page.set_content(_PLANTED)
    page.evaluate(B._WAIT_FOR_IMAGES)
    state = page.evaluate(B._INSPECT, [B.PROSE_SKIP, B.OUTPUT_SEL])
    found = B.classify(state, {"requests": [], "failed": [], "js": []}, "x", 1280, True)
    p = found["problems"]
    assert p["raw_tex"] and "tfrac" in p["raw_tex"][0]
    assert p["markdown_table"]
    noise = " ".join(p["output_noise"])
    assert "Traceback" in noise and "UserWarning" in noise and "40%|" in noise
    assert p["code_cut"] and p["clipped"]
    assert p["broken_image"] == ["missing.png"]
    assert not p["search"]

    clean = _PLANTED.split("<section>")[0] + "<section><h2>Clean</h2><p>Fine text.</p>" \
        "</section></article></body></html>"
    page.set_content(clean)
    state = page.evaluate(B._INSPECT, [B.PROSE_SKIP, B.OUTPUT_SEL])
    found = B.classify(state, {"requests": [], "failed": [], "js": []}, "x", 1280, True)
    assert not any(found["problems"].values()), found["problems"]
