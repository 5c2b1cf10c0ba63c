"""The built book as a reader meets it: every page of ``_toc.yml`` in headless Chromium.

Serves ``_build/html`` on an ephemeral localhost port and, for each page, checks that math is
typeset by MathJax (every ``.math`` element holds an ``mjx-container``; no raw ``$$`` in the
visible text), that every ``<img>`` loaded, that no request left localhost and no local file
was missing (HTTP >= 400), that every figure a cell drew is shown with a caption, and that
the page raised no JavaScript error. A screenshot of the
first chapter goes to ``_build/screenshots/`` (a CI artefact): ``NAME.png`` (the first
screen) and ``NAME-full.png`` (the whole page).

Skipped, with the reason, when Chromium or the built book is absent, unless the environment
sets ``DGREF_REQUIRE_BROWSER=1`` (``.ci/run`` does when it installed Chromium): then either is
a failure. Build the book first (``make book``).
"""
from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from urllib.parse import urlsplit

import pytest

from _bookfiles import ROOT, toc_files, toc_notebooks

HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
REQUIRE = os.environ.get("DGREF_REQUIRE_BROWSER") == "1"
# Flags that work as root, offline (TOOLING.md); Playwright adds --headless and its own
# fresh --user-data-dir.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
PAGES = toc_files()
# sphinx-thebe 0.3 (pinned by Jupyter Book 1) adds its inline config script twice under
# Sphinx 7, so the second `const THEBE_JS_URL` throws; harmless (thebe is never loaded offline).
KNOWN_JS_ERRORS = ("Identifier 'THEBE_JS_URL' has already been declared",)
FIRST_CHAPTER = (toc_notebooks() or PAGES or [None])[0]


def _unavailable(reason):
    if REQUIRE:
        pytest.fail(f"DGREF_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def _page_html(page):
    return HTML / page.relative_to(ROOT).with_suffix(".html")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    if not (HTML / "index.html").is_file():
        _unavailable(f"the book is not built ({HTML / 'index.html'} missing; run `make book`)")
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser(server):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        _unavailable("chromium is not installed (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright Python package is not installed")
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
    except Exception as exc:   # noqa: BLE001 -- report why the browser did not start
        pw.stop()
        _unavailable(f"chromium did not start: {exc}")
    yield b
    b.close()
    pw.stop()


_WAIT_FOR_MATHJAX = """async () => {
  if (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) return false;
  await MathJax.startup.promise;
  if (MathJax.typesetPromise) await MathJax.typesetPromise();
  return true;
}"""

_WAIT_FOR_IMAGES = """async () => {
  const imgs = [...document.images];
  imgs.forEach(img => { img.loading = 'eager'; });
  await Promise.all(imgs.map(img => img.complete ? null :
      new Promise(r => { img.addEventListener('load', r); img.addEventListener('error', r); })));
  return imgs.map(img => ({src: img.getAttribute('src'), w: img.naturalWidth,
      output: !!img.closest('.cell_output'),
      caption: !!(img.closest('figure') && img.closest('figure').querySelector('figcaption'))}));
}"""

_MATH_STATE = """() => {
  const math = [...document.querySelectorAll('.math')];
  const untypeset = math.filter(el => !el.querySelector('mjx-container'))
                        .map(el => el.textContent.trim().slice(0, 80));
  const body = document.body.cloneNode(true);
  body.querySelectorAll('pre, code, script, style, mjx-assistive-mml').forEach(e => e.remove());
  return {n_math: math.length, n_mjx: document.querySelectorAll('mjx-container').length,
          untypeset: untypeset, text: body.innerText};
}"""


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_page_in_browser(page, server, browser):
    html = _page_html(page)
    assert html.is_file(), f"{html.relative_to(ROOT)} is not built: rebuild the book (make book)"
    url = f"{server}/{html.relative_to(HTML).as_posix()}"
    host = urlsplit(server).netloc
    requests, failed, js_errors = [], [], []
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    try:
        tab = ctx.new_page()
        tab.on("request", lambda r: requests.append(r.url))
        tab.on("requestfailed", lambda r: failed.append(f"{r.url} ({r.failure})"))
        tab.on("response", lambda r: failed.append(f"{r.url} (HTTP {r.status})")
               if r.status >= 400 else None)
        tab.on("pageerror", lambda e: js_errors.append(str(e))
               if str(e) not in KNOWN_JS_ERRORS else None)
        response = tab.goto(url, wait_until="load", timeout=60_000)
        assert response is not None and response.ok, f"{url}: {response and response.status}"
        has_mathjax = tab.evaluate(_WAIT_FOR_MATHJAX)
        images = tab.evaluate(_WAIT_FOR_IMAGES)
        state = tab.evaluate(_MATH_STATE)
        tab.wait_for_load_state("networkidle", timeout=30_000)
        if page == FIRST_CHAPTER:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            tab.screenshot(path=str(SCREENSHOTS / f"{page.stem}.png"))          # first screen
            tab.screenshot(path=str(SCREENSHOTS / f"{page.stem}-full.png"), full_page=True)
    finally:
        ctx.close()

    outside = [u for u in requests
               if urlsplit(u).scheme not in ("data", "blob", "about")
               and urlsplit(u).netloc != host]
    assert not outside, f"{page.name}: requests left localhost: {outside}"
    assert not failed, f"{page.name}: local requests failed: {failed}"
    broken = [i["src"] for i in images if not i["w"]]
    assert not broken, f"{page.name}: images that did not load: {broken}"
    uncaptioned = [i["src"] for i in images if i["output"] and not i["caption"]]
    assert not uncaptioned, f"{page.name}: figures without a caption: {uncaptioned}"
    if state["n_math"]:
        assert has_mathjax, f"{page.name}: has math but MathJax did not load"
        assert not state["untypeset"], \
            f"{page.name}: math not typeset by MathJax: {state['untypeset'][:5]}"
        assert state["n_mjx"] >= state["n_math"]
    for raw in ("$$", "\\begin{", "\\["):
        assert raw not in state["text"], \
            f"{page.name}: raw {raw!r} in the visible text (math not parsed?)"
    assert not js_errors, f"{page.name}: JavaScript errors: {js_errors}"
