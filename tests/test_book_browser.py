"""The built book in a real browser: every page of the table of contents opens in headless
Chromium (Debian's ``/usr/bin/chromium`` driven by Playwright) from a local HTTP server.

Checked on every page: no console error and no uncaught exception, no failed request and no
HTTP error, no request outside the local server (the book serves MathJax and the widget
renderer itself, so it reads offline), every ``<img>`` loaded (``naturalWidth > 0``), every
formula typeset by MathJax; the "next" links walk through the chapters in the order of
``_toc.yml``; every saved ipywidget renders as widget DOM (the widget state that nbclient
saved at execution is embedded in the page and ``@jupyter-widgets/html-manager``'s
``embed.js`` draws it).

The test needs the built HTML: ``make test`` builds the book first and then runs this file
with ``MESA_BROWSER_TEST_REQUIRED=1``, which turns every "cannot run" skip into a failure.
Run alone: ``jupyter-book build . -W -n --keep-going && pytest tests/test_book_browser.py``.
"""

from __future__ import annotations

import functools
import html
import http.server
import os
import re
import shutil
import threading
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# the built HTML; MESA_BOOK_HTML points elsewhere (e.g. a build made with --path-output)
HTML = Path(os.environ.get("MESA_BOOK_HTML") or ROOT / "_build" / "html")
CHROMIUM = os.environ.get("MESA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
WIDGET_VIEW = 'script[type="application/vnd.jupyter.widget-view+json"]'
WIDGET_STATE = 'script[type="application/vnd.jupyter.widget-state+json"]'
REQUIRED = os.environ.get("MESA_BROWSER_TEST_REQUIRED", "") not in ("", "0")


def _cannot_run(reason: str) -> None:
    """Skip -- or fail, when ``make test`` says the browser test must run."""
    if REQUIRED:
        pytest.fail(f"browser test required (MESA_BROWSER_TEST_REQUIRED=1) but {reason}", pytrace=False)
    pytest.skip(reason)


def toc_pages(toc_file: Path = ROOT / "_toc.yml") -> list[str]:
    """Document paths (no suffix) of ``_toc.yml`` in reading order: root, then every
    chapter and its sections depth-first."""
    toc = yaml.safe_load(toc_file.read_text())
    pages = [toc["root"]]

    def walk(entries: list[dict]) -> None:
        for entry in entries:
            if "file" in entry:
                pages.append(entry["file"])
            walk(entry.get("sections", []))

    for part in toc.get("parts", []):
        walk(part.get("chapters", []))
    walk(toc.get("chapters", []))
    return [str(Path(p).with_suffix("")) if Path(p).suffix in {".md", ".ipynb"} else p for p in pages]


PAGES = toc_pages()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass


@pytest.fixture(scope="module")
def base_url():
    if not (HTML / "index.html").is_file():
        _cannot_run(f"the book is not built ({HTML / 'index.html'} is missing): "
                    "run `jupyter-book build . -W -n --keep-going` first (`make test` does)")
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: a free port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _cannot_run("the Python package `playwright` is not installed (pip install -e '.[test]')")
    if not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)):
        _cannot_run(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; "
                    "or set MESA_CHROMIUM to a Chromium binary)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _url(base_url: str, page: str) -> str:
    return urljoin(base_url, f"{page}.html")


def _open(browser, url: str):
    """Open ``url`` in a fresh page and record every console error, uncaught exception,
    failed request, HTTP error response and request that leaves the local server (those are
    blocked: the book serves its widget and MathJax JavaScript itself, so it must render
    offline) while it loads."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(url))

    def only_local(route):
        if route.request.url.startswith(origin) or route.request.url.startswith("data:"):
            route.continue_()
        else:
            problems.append(f"request outside the book: {route.request.url}")
            route.abort()

    page.route("**/*", only_local)
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"uncaught exception: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} ({r.failure})")
            if r.url.startswith(origin) else None)  # outside requests are reported above
    page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    page.goto(url, wait_until="load")
    page.wait_for_load_state("networkidle")
    return page, problems


def _wait_for(page, condition: str, what: str, timeout_ms: int = 20_000) -> None:
    """Wait until the JavaScript ``condition`` holds; fail saying ``what`` did not happen."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(condition, timeout=timeout_ms)
    except PlaywrightTimeout:
        pytest.fail(f"{what} (waited {timeout_ms / 1000:.0f} s for `{condition}`)", pytrace=False)


def test_toc_lists_pages_that_were_built():
    assert len(PAGES) >= 2, f"_toc.yml lists only {PAGES}"
    if not HTML.is_dir():
        _cannot_run(f"the book is not built ({HTML} is missing)")
    missing = [p for p in PAGES if not (HTML / f"{p}.html").is_file()]
    assert not missing, f"pages in _toc.yml without built HTML: {missing}"


@pytest.mark.parametrize("doc", PAGES)
def test_page_loads_cleanly(browser, base_url, doc):
    page, problems = _open(browser, _url(base_url, doc))
    try:
        assert page.locator("main h1").count() >= 1, f"{doc}: no <h1> title in the page's main content"
        images = page.eval_on_selector_all(
            "img", "els => els.map(e => ({src: e.currentSrc || e.src, ok: e.complete && e.naturalWidth > 0}))")
        broken = [i["src"] for i in images if not i["ok"]]
        assert not broken, f"{doc}: images that did not load: {broken}"
        # formulas (Sphinx wraps them in span/div.math) are typeset by MathJax
        if page.locator(".math").count():
            _wait_for(page, "document.querySelectorAll('mjx-container').length > 0",
                      f"{doc}: MathJax typeset no formula")
            raw = page.eval_on_selector_all(".math", "els => els.filter(e => !e.querySelector('mjx-container'))"
                                                     ".map(e => e.textContent.slice(0, 60))")
            assert not raw, f"{doc}: formulas left as raw TeX: {raw[:5]}"
        assert not problems, f"{doc}: " + "\n".join(problems)
    finally:
        page.close()


def test_next_links_walk_the_toc(browser, base_url):
    """From the first page, clicking "next" visits every page of the toc in order."""
    page, problems = _open(browser, _url(base_url, PAGES[0]))
    try:
        for doc, following in zip(PAGES, PAGES[1:]):
            link = page.locator("a.right-next").first
            assert link.count() == 1, f"{doc}: no 'next' link (expected one to {following})"
            link.click()
            page.wait_for_load_state("load")
            path = urlsplit(page.url).path.lstrip("/")
            assert path == f"{following}.html", f"'next' on {doc} led to {path}, expected {following}.html"
        assert page.locator("a.right-next").count() == 0, f"{PAGES[-1]} is last in the toc but has a 'next' link"
        assert not problems, "\n".join(problems)
    finally:
        page.close()


def _widget_pages() -> list[str]:
    return [p for p in PAGES if (HTML / f"{p}.html").is_file()
            and "application/vnd.jupyter.widget-view+json" in (HTML / f"{p}.html").read_text(errors="replace")]


def test_book_has_saved_widgets():
    """The book promises widgets (the trigger painter, the alpha/beta explorer): at least one
    page must carry saved widget views, or the notebooks were executed without saving state."""
    if not HTML.is_dir():
        _cannot_run(f"the book is not built ({HTML} is missing)")
    assert _widget_pages(), "no page of the built book contains a saved ipywidget view"


@pytest.mark.parametrize("doc", PAGES)
def test_widgets_render(browser, base_url, doc):
    """Every saved widget view on a page has its model in the embedded widget state and is
    replaced by widget DOM; at least one widget on the page is visible."""
    html_file = HTML / f"{doc}.html"
    if not html_file.is_file() or "application/vnd.jupyter.widget-view+json" not in html_file.read_text(errors="replace"):
        pytest.skip(f"{doc} has no widgets")
    page, problems = _open(browser, _url(base_url, doc))
    try:
        views = page.evaluate(f"""() => {{
            const state = {{}};
            for (const s of document.querySelectorAll('{WIDGET_STATE}'))
                Object.assign(state, JSON.parse(s.textContent).state);
            const ids = [...document.querySelectorAll('{WIDGET_VIEW}')]
                .map(s => JSON.parse(s.textContent).model_id);
            return {{saved: ids.filter(id => id in state).length, missing: ids.filter(id => !(id in state))}};
        }}""")
        assert not views["missing"], f"{doc}: widget views whose state was not saved: {views['missing']}"
        n = views["saved"]
        # html-manager inserts a div.widget-subarea holding the rendered view before each view script
        _wait_for(page, f"document.querySelectorAll('.widget-subarea > .jupyter-widgets').length >= {n}",
                  f"{doc}: {n} saved widget views were not rendered")
        heights = page.eval_on_selector_all(".widget-subarea", "els => els.map(e => e.getBoundingClientRect().height)")
        assert max(heights) > 0, f"{doc}: {n} widgets rendered, none visible (heights {heights})"
        assert not problems, f"{doc}: " + "\n".join(problems)
    finally:
        page.close()


def test_static_trigger_painter_works_without_a_kernel(browser, base_url):
    """Chapter 7's trigger painter runs in the static page: clicking a pixel flips that bit of
    the pattern id and the readout shows the new pattern's precomputed ASR."""
    doc = "book/07_detection"
    page, problems = _open(browser, _url(base_url, doc))
    try:
        _wait_for(page, "document.querySelector('.mesa-painter .readout b') !== null",
                  f"{doc}: the trigger painter did not draw its readout")
        root = page.locator(".mesa-painter").first
        start = int(root.get_attribute("data-pattern"))
        assert f"pattern {start} " in root.locator(".readout").inner_text()
        pressed = [root.locator(f'.px[data-k="{k}"]').get_attribute("aria-pressed") == "true" for k in range(9)]
        assert sum(b << (8 - k) for k, b in enumerate(pressed)) == start  # pixel k is bit 8 - k
        root.locator('.px[data-k="8"]').click()
        assert int(root.get_attribute("data-pattern")) == start ^ 1
        text = root.locator(".readout").inner_text()
        assert f"pattern {start ^ 1} " in text and "%" in text, text
        root.locator('.px[data-k="8"]').click()
        assert int(root.get_attribute("data-pattern")) == start
        assert not problems, f"{doc}: " + "\n".join(problems)
    finally:
        page.close()


def solution_lines(doc: Path) -> set[str]:
    """Lines of a chapter that only its solutions hold: the bodies of ``{solution}`` blocks,
    the cells between ``{solution-start}`` and ``{solution-end}``, and the source of the
    ``remove-input`` cells that run the model solutions through their checkers. Short lines
    and lines that also appear in the rest of the chapter (an import the task shows too) are
    left out."""
    if doc.suffix == ".ipynb":
        import nbformat

        cells = [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nbformat.read(doc, as_version=4).cells]
    else:
        cells = [("markdown", doc.read_text(), [])]
    secret, public = [], []
    gated = False
    fence = re.compile(r"^([`:]{3,})\s*\{solution\}.*?^\1\s*$", re.M | re.S)
    for kind, src, tags in cells:
        if kind == "markdown" and "{solution-start}" in src:
            gated = True
        elif kind == "markdown" and "{solution-end}" in src:
            gated = False
        elif gated or (kind == "code" and "remove-input" in tags):
            secret.append(src)
        elif kind == "markdown":
            secret.extend(m.group(0) for m in fence.finditer(src))
            public.append(fence.sub("", src))
        else:
            public.append(src)
    shown = {ln.strip() for s in public for ln in s.splitlines()}
    return {ln.strip() for s in secret for ln in s.splitlines()
            if len(ln.strip()) >= 30 and ln.strip() not in shown and not ln.strip().startswith(("```", ":::", ":class:"))}


def _page_text(path: Path) -> str:
    """The text of a built page, tags dropped (highlighted code becomes its plain lines again)."""
    text = re.sub(r"<[^>]+>", "", path.read_text())
    return "\n".join(ln.strip() for ln in html.unescape(text).splitlines())


def test_published_book_shows_no_solution():
    """No line of any solution (dropdowns, chapter 10's gated solution cells, the model
    solutions of the checker cells) is in the published HTML."""
    if not (HTML / "index.html").is_file():
        _cannot_run(f"the book is not built ({HTML / 'index.html'} is missing)")
    leaks, checked = [], 0
    for doc in PAGES:
        src = next((ROOT / f"{doc}{ext}" for ext in (".ipynb", ".md") if (ROOT / f"{doc}{ext}").is_file()), None)
        if src is None or not (HTML / f"{doc}.html").is_file():
            continue
        lines = solution_lines(src)
        checked += len(lines)
        text = _page_text(HTML / f"{doc}.html")
        leaks += [f"{doc}: {ln}" for ln in sorted(lines) if ln in text]
    assert checked > 100, f"only {checked} solution lines found to check: is the extraction broken?"
    assert not leaks, f"{len(leaks)} solution lines are in the published HTML:\n" + "\n".join(leaks[:20])
