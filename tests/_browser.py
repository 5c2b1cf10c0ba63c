"""The built book in headless Chromium: serve, visit, inspect, screenshot.

Shared by ``tests/test_browser.py`` and by the command line, which takes screenshots and
prints what a reader would meet, page by page::

    .venv/bin/python tests/_browser.py                      # every toc page, 1280 and 400 px
    .venv/bin/python tests/_browser.py --pages edm cfg --widths 1280 --out /tmp/shots
    .venv/bin/python tests/_browser.py --json report.json   # the findings, machine-readable

``inspect`` returns, for one page at one width, a dict of *problem classes* (each a list of
human-readable findings; empty lists mean clean) plus a few counts. The classes:

``raw_tex``           TeX source in the visible text (``$$``, ``\\frac``, ``\\begin{``...):
                      math that MathJax never saw, e.g. a ``$$`` block broken by a Markdown list.
``markdown_table``    pipe-table text (``|---|``, ``| a | b |``) shown instead of a table.
``math_clipped``      a display equation wider than its box whose overflow is cut off.
``math_scrolls``      a display equation wider than its box that the reader must scroll
                      (allowed at phone width; at desktop width the equation must be split).
``code_cut``          code or a text output wider than its box (it must wrap: a sideways
                      scroll without a visible scrollbar reads as cut-off code).
``table_scrolls``     a table or output wider than the column, which scrolls sideways
                      (allowed at phone width; at desktop width it must fit).
``clipped``           a table, image or output whose overflow is cut off or spills over the
                      page.
``page_overflow``     the page itself is wider than the window (sideways scrolling).
``broken_image``      an ``<img>`` that did not load (``naturalWidth == 0``).
``uncaptioned``       a figure drawn by a cell shown without a caption.
``untypeset``         a ``.math`` element MathJax did not typeset, or no MathJax on a math page.
``output_noise``      a traceback, warning, stderr stream or progress bar in a cell output.
``console``           a JavaScript error or console error (failed resources included).
``offline``           a request that left localhost, or a local request that failed.
``search``            not exactly one visible search box.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import json
import re
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bookfiles import ROOT, toc_files  # noqa: E402

HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
WIDTHS = (1280, 400)
DESKTOP = 1280
HEIGHT = {1280: 900, 400: 860}
# Flags that work as root, offline (TOOLING.md); Playwright adds --headless and its own
# fresh --user-data-dir.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
# sphinx-thebe 0.3 (pinned by Jupyter Book 1) adds its inline config script twice under
# Sphinx 7, so the second `const THEBE_JS_URL` throws; harmless (thebe is never loaded offline).
KNOWN_JS_ERRORS = ("Identifier 'THEBE_JS_URL' has already been declared",)

PROBLEMS = ("raw_tex", "markdown_table", "math_clipped", "math_scrolls", "code_cut",
            "table_scrolls", "clipped",
            "page_overflow", "broken_image", "uncaptioned", "untypeset", "output_noise",
            "console", "offline", "search")

# TeX a reader must never see in prose (outside code): delimiters and common commands.
RAW_TEX_PROSE = re.compile(
    r"\$\$|\\\[|\\\]|\\\(|\\\)|\\begin\{|\\end\{|"
    r"\\(?:frac|tfrac|dfrac|sqrt|mathbb|mathcal|mathrm|mathbf|operatorname|text|left|right|"
    r"nabla|sigma|epsilon|varepsilon|theta|lambda|alpha|beta|gamma|mu|pi|sum|int|log|exp|"
    r"partial|cdot|top|quad|qquad|le|ge|leq|geq|approx|propto|infty|hat|tilde|bar|"
    r"widehat|underbrace|overbrace|label|tag|eqref|ref)(?![A-Za-z])|"
    r"(?<![\w$])\$[^\s$][^$\n]{0,120}?[^\s$\\]\$(?![\w$])")
# In cell outputs (preformatted text) only the unmistakable ones.
RAW_TEX_OUTPUT = re.compile(r"\$\$|\\begin\{|\\frac\{")
# A pipe table's separator row; Sphinx's smartquotes turn "---" into an em dash in prose.
PIPE_TABLE = re.compile(r"\|[ \t]*:?(?:-{3,}|[\u2014\u2013]+):?[ \t]*\|")
OUTPUT_NOISE = re.compile(
    r"Traceback \(most recent call last\)|(?<![A-Za-z])(?:\w*Warning|Warning):|"
    r"\d{1,3}%\|[^\n]{0,80}\||\d+/\d+ \[\d+:\d+<|\bit/s\]")

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
      new Promise(r => { img.addEventListener('load', r); img.addEventListener('error', r);
                         setTimeout(r, 10000); })));
}"""

# Everything measured in one round trip.
_INSPECT = r"""(args) => {
  const [proseSkip, outputSel] = args;
  const out = {};
  const snippet = (s, n) => s.replace(/\s+/g, ' ').trim().slice(0, n || 160);
  const visible = el => el.checkVisibility ? el.checkVisibility() : !!el.offsetParent;
  const article = document.querySelector('article.bd-article') || document.body;

  // The heading (section) an element sits under, to locate findings for the authors.
  const where = el => {
    let sec = el.closest('section');
    const h = sec && sec.querySelector(':scope > h1, :scope > h2, :scope > h3, :scope > h4');
    return h ? snippet(h.textContent.replace(/#$/, ''), 60) : '';
  };

  // Visible text nodes outside the skipped elements.
  const texts = (root, skip) => {
    const acc = [];
    const w = document.createTreeWalker(root, NodeFilter.SHOW_TEXT, {acceptNode(n) {
      const p = n.parentElement;
      if (!p || (skip && p.closest(skip)) || !visible(p)) return NodeFilter.FILTER_REJECT;
      return NodeFilter.FILTER_ACCEPT; }});
    let n; while ((n = w.nextNode())) acc.push(n);
    return acc;
  };
  // Per block element: the concatenated visible text (so a table split over text nodes
  // and a `$$` split by emphasis are still seen), with the element for locating it.
  const blocks = (root, skip) => {
    const map = new Map();
    for (const n of texts(root, skip)) {
      const b = n.parentElement.closest('p, li, td, th, dd, dt, h1, h2, h3, h4, h5, h6, pre, '
                                        + 'div, figcaption, caption, blockquote') || root;
      map.set(b, (map.get(b) || '') + n.textContent);
    }
    return [...map.entries()];
  };
  out.prose = blocks(article, proseSkip).map(([el, t]) => ({text: t, where: where(el)}));
  out.outputs = [...article.querySelectorAll(outputSel)].filter(visible).map(el => ({
      text: el.innerText, where: where(el),
      stderr: !!el.closest('.stderr, .output.stderr, .traceback, .output.error'),
      expected: !!el.closest('.tag_raises-exception')}));

  // Overflow: is an element's content wider than the room it has, and what happens then?
  // Returns null (fits), or {how: 'scrolls' | 'clipped' | 'spills', need, have} in px.
  const classify = el => {
    const r = el.getBoundingClientRect();
    let right = r.left + Math.max(el.scrollWidth, r.width);
    for (const c of el.querySelectorAll('mjx-math, mjx-mtable, table, pre, img, svg')) {
      // Content inside a box that scrolls sideways (a wide table with math in its cells) is
      // reached by scrolling that box: it does not make el itself wider.
      let scrolled = false;
      for (let a = c.parentElement; a && a !== el; a = a.parentElement) {
        const ox = getComputedStyle(a).overflowX;
        if (ox === 'auto' || ox === 'scroll') { scrolled = true; break; }
      }
      if (scrolled) continue;
      const cr = c.getBoundingClientRect();
      if (cr.width) right = Math.max(right, cr.right);
    }
    const cs = getComputedStyle(el);
    if (el.scrollWidth > el.clientWidth + 2) {       // wider than its own box
      if (cs.overflowX === 'auto' || cs.overflowX === 'scroll')
        return {how: 'scrolls', need: el.scrollWidth, have: el.clientWidth};
      if (cs.overflowX !== 'visible')
        return {how: 'clipped', need: el.scrollWidth, have: el.clientWidth};
    }
    // Laid out at full width: the first ancestor that does not let it spill decides.
    for (let a = el.parentElement; a && a !== document.documentElement; a = a.parentElement) {
      const acs = getComputedStyle(a);
      const ar = a.getBoundingClientRect();
      const aright = ar.left + a.clientWidth;
      if (acs.overflowX !== 'visible') {
        if (right <= aright + 2) break;
        const how = (acs.overflowX === 'auto' || acs.overflowX === 'scroll') ? 'scrolls' : 'clipped';
        return {how, need: right - ar.left, have: a.clientWidth};
      }
      if (a === article) {
        if (right > aright + 2) return {how: 'spills', need: right - ar.left, have: a.clientWidth};
        break;
      }
    }
    if (cs.overflowX === 'visible' && el.scrollWidth > el.clientWidth + 2)
      return {how: 'spills', need: el.scrollWidth, have: el.clientWidth};
    return null;
  };

  out.math = [...article.querySelectorAll('mjx-container[display="true"]')].filter(visible)
    .map(el => {
      const c = classify(el);
      let tex = '';
      try { tex = MathJax.startup.document.getMathItemsWithin(el)[0].math; } catch (e) {}
      const mathDiv = el.closest('div.math');
      const eqno = mathDiv && mathDiv.querySelector('.eqno');
      return c && Object.assign(c, {
        eq: eqno ? snippet(eqno.textContent.replace(/#$/, ''), 12) : '',
        id: mathDiv ? (mathDiv.id || '') : '', tex: tex,
        text: snippet(el.querySelector('mjx-assistive-mml') ?
                      el.querySelector('mjx-assistive-mml').textContent : el.textContent, 120),
        where: where(el)});
    }).filter(Boolean);

  out.blocks = [...article.querySelectorAll('pre, table, .cell_output img, .cell_output > *')]
    .filter(visible).map(el => {
      const c = classify(el);
      return c && Object.assign(c, {
        tag: el.tagName.toLowerCase(), code: el.tagName === 'PRE',
        text: snippet(el.innerText || el.getAttribute('src') || '', 80), where: where(el)});
    }).filter(Boolean);
  out.search = [...document.querySelectorAll('.search-button__button')].filter(el => {
      const r = el.getBoundingClientRect();
      return visible(el) && r.width > 0 && r.height > 0; }).length;

  out.page_width = document.documentElement.scrollWidth;
  out.window_width = window.innerWidth;

  const math = [...document.querySelectorAll('.math')];
  out.n_math = math.length;
  out.untypeset = math.filter(el => !el.querySelector('mjx-container'))
                      .map(el => snippet(el.textContent, 80));
  out.images = [...document.images].map(img => ({src: img.getAttribute('src'),
      w: img.naturalWidth, output: !!img.closest('.cell_output'),
      caption: !!(img.closest('figure') && img.closest('figure').querySelector('figcaption'))}));
  out.n_display_math = document.querySelectorAll('mjx-container[display="true"]').length;
  return out;
}"""

PROSE_SKIP = ("script, style, pre, code, kbd, samp, .cell_input, .cell_output, .output, "
              "mjx-container, .MathJax, textarea, .highlight, nav, .bd-toc, .headerlink, "
              "#pst-search-dialog")
OUTPUT_SEL = ".cell_output > *"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextmanager
def serve(html: Path | None = None):
    """``http://127.0.0.1:PORT`` serving the built book, for the duration of the block."""
    handler = functools.partial(_QuietHandler, directory=str(html or HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def chromium_executable():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def page_html(page: Path) -> Path:
    return HTML / page.relative_to(ROOT).with_suffix(".html")


def page_id(page: Path) -> str:
    return page.relative_to(ROOT).with_suffix("").as_posix()


class Visitor:
    """One Chromium tab, reused for every page and width (logs reset per visit)."""

    def __init__(self, browser, server: str):
        self.server = server
        self.host = urlsplit(server).netloc
        self.ctx = browser.new_context(viewport={"width": DESKTOP, "height": HEIGHT[DESKTOP]})
        self.tab = self.ctx.new_page()
        self.log = {"requests": [], "failed": [], "js": []}
        self.tab.on("request", lambda r: self.log["requests"].append(r.url))
        self.tab.on("requestfailed",
                    lambda r: self.log["failed"].append(f"{r.url} ({r.failure})"))
        self.tab.on("response", lambda r: self.log["failed"].append(f"{r.url} (HTTP {r.status})")
                    if r.status >= 400 else None)
        self.tab.on("pageerror", lambda e: self.log["js"].append(f"page error: {e}"))
        self.tab.on("console", lambda m: self.log["js"].append(f"console.{m.type}: {m.text}")
                    if m.type == "error" else None)

    def close(self):
        self.ctx.close()

    def inspect(self, page: Path, width: int, screenshot_dir: Path | None = None,
                png: bool = False) -> dict:
        """Visit ``page`` at ``width`` px; return the problems found (see the module doc)."""
        for v in self.log.values():
            v.clear()
        t0 = time.perf_counter()
        self.tab.set_viewport_size({"width": width, "height": HEIGHT.get(width, 900)})
        url = f"{self.server}/{page_html(page).relative_to(HTML).as_posix()}"
        response = self.tab.goto(url, wait_until="load", timeout=60_000)
        status = response.status if response is not None else None
        has_mathjax = self.tab.evaluate(_WAIT_FOR_MATHJAX)
        self.tab.evaluate(_WAIT_FOR_IMAGES)
        state = self.tab.evaluate(_INSPECT, [PROSE_SKIP, OUTPUT_SEL])
        shot = None
        if screenshot_dir is not None:
            screenshot_dir.mkdir(parents=True, exist_ok=True)
            # JPEG is several times faster to encode than PNG, but limited to 65535 px.
            tall = self.tab.evaluate("() => document.documentElement.scrollHeight") > 65000
            shot = screenshot_dir / (f"{page_id(page).replace('/', '__')}-{width}"
                                     + (".png" if tall or png else ".jpg"))
            if shot.suffix == ".png":
                self.tab.screenshot(path=str(shot), full_page=True)
            else:
                self.tab.screenshot(path=str(shot), full_page=True, type="jpeg", quality=85)
        result = classify(state, self.log, self.host, width, has_mathjax)
        result.update(page=page_id(page), width=width, url=url, status=status,
                      seconds=round(time.perf_counter() - t0, 2),
                      screenshot=str(shot) if shot else None,
                      n_display_math=state["n_display_math"])
        return result


def classify(state: dict, log: dict, host: str, width: int, has_mathjax: bool) -> dict:
    p = {k: [] for k in PROBLEMS}
    for block in state["prose"]:
        for m in RAW_TEX_PROSE.finditer(block["text"]):
            s = max(0, m.start() - 40)
            p["raw_tex"].append(f"[{block['where']}] ...{block['text'][s:m.end() + 40]}..."
                                .replace("\n", " "))
            break
        if PIPE_TABLE.search(block["text"]):
            p["markdown_table"].append(f"[{block['where']}] "
                                       + block["text"][:120].replace("\n", " / "))
    for o in state["outputs"]:
        if o["expected"]:
            continue
        text = o["text"]
        if PIPE_TABLE.search(text):
            p["markdown_table"].append(f"[{o['where']}] output: "
                                       + text[:120].replace("\n", " / "))
        m = RAW_TEX_OUTPUT.search(text)
        if m:
            p["raw_tex"].append(f"[{o['where']}] output: ...{text[max(0, m.start() - 40):m.end() + 40]}")
        m = OUTPUT_NOISE.search(text)
        if m:
            line = text[text.rfind("\n", 0, m.start()) + 1:].split("\n", 1)[0]
            p["output_noise"].append(f"[{o['where']}] {line[:160]}")
        elif o["stderr"] and text.strip():
            p["output_noise"].append(f"[{o['where']}] stderr: {text.strip()[:160]}")
    for m in state["math"]:
        label = f"eq. {m['eq']}" if m["eq"] else "unnumbered equation"
        desc = (f"[{m['where']}] {label} needs {m['need']:.0f} px, has {m['have']:.0f} px: "
                f"{m['text']}")
        if m["how"] == "scrolls":
            p["math_scrolls"].append(desc)
        else:
            p["math_clipped"].append(desc + f" ({m['how']})")
    for b in state["blocks"]:
        desc = (f"[{b['where']}] <{b['tag']}> needs {b['need']:.0f} px, has {b['have']:.0f} px "
                f"({b['how']}): {b['text']}")
        if b["code"]:
            p["code_cut"].append(desc)          # code and text outputs wrap: never sideways
        elif b["how"] == "scrolls":
            p["table_scrolls"].append(desc)     # fine on a phone; at desktop, too wide
        else:
            p["clipped"].append(desc)           # never cut, never spilling over the page
    if state["search"] != 1:
        p["search"].append(f"{state['search']} visible search boxes (want exactly one)")
    if state["page_width"] > state["window_width"] + 1:
        p["page_overflow"].append(f"page is {state['page_width']} px wide in a "
                                  f"{state['window_width']} px window")
    p["broken_image"] = [i["src"] for i in state["images"] if not i["w"]]
    p["uncaptioned"] = [i["src"] for i in state["images"] if i["output"] and not i["caption"]]
    if state["n_math"] and not has_mathjax:
        p["untypeset"].append("the page has math but MathJax did not load")
    p["untypeset"] += state["untypeset"]
    # "Failed to load resource" repeats a failed request, which "offline" reports with its URL.
    p["console"] = [e for e in log["js"] if not any(k in e for k in KNOWN_JS_ERRORS)
                    and "Failed to load resource" not in e]
    outside = [u for u in log["requests"]
               if urlsplit(u).scheme not in ("data", "blob", "about") and urlsplit(u).netloc != host]
    p["offline"] = [f"left localhost: {u}" for u in outside] + list(log["failed"])
    return {"problems": p}


def failures(result: dict) -> dict:
    """The problem classes that fail a page at its width (phone-width scrolling is allowed)."""
    fails = {k: v for k, v in result["problems"].items() if v}
    if result["width"] != DESKTOP:
        fails.pop("math_scrolls", None)
        fails.pop("table_scrolls", None)
    return fails


@contextmanager
def chromium():
    """A headless Chromium (Debian's binary, driven by Playwright)."""
    from playwright.sync_api import sync_playwright
    exe = chromium_executable()
    if exe is None:
        raise RuntimeError("chromium is not installed (apt-get install -y chromium)")
    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
    finally:
        pw.stop()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", nargs="*", help="page stems (default: every toc page)")
    ap.add_argument("--widths", nargs="*", type=int, default=list(WIDTHS))
    ap.add_argument("--out", type=Path, default=SCREENSHOTS, help="screenshot folder")
    ap.add_argument("--json", type=Path, help="write the findings here")
    ap.add_argument("--png", action="store_true", help="PNG screenshots (default JPEG)")
    ap.add_argument("--html", type=Path, default=HTML, help="the built book (default _build/html)")
    args = ap.parse_args(argv)
    pages = toc_files()
    if args.pages:
        pages = [p for p in pages if p.stem in args.pages]
    results = []
    t0 = time.perf_counter()
    globals()["HTML"] = args.html.resolve()   # page_html() and serve() read it
    with serve(args.html.resolve()) as server, chromium() as browser:
        visitor = Visitor(browser, server)
        for page in pages:
            for width in args.widths:
                r = visitor.inspect(page, width, args.out, png=args.png)
                results.append(r)
                fails = failures(r)
                print(f"{r['page']:28s} {width:5d}px {r['seconds']:5.1f}s  "
                      + (", ".join(f"{k}={len(v)}" for k, v in fails.items()) or "ok"))
        visitor.close()
    print(f"{len(results)} visits in {time.perf_counter() - t0:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
