"""The built site in a real browser: Playwright driving Debian's chromium, the site served on 127.0.0.1.

    make site-check        # KVATLAS_SITE=site KVATLAS_SCREENSHOTS=site-screenshots pytest tests/test_site_browser.py

Skipped unless KVATLAS_SITE names a built site (`make docs` builds one). Each check is a function that
raises AssertionError; the same checks run on the real site and, in `test_checks_catch_breakage`, on copies
broken on purpose (the equation's renderer removed, a BibTeX block removed, a notebook's plots removed, a
script from another host added), each of which the matching check must reject. Every page is opened with
requests to any host but 127.0.0.1 aborted and recorded, and with console errors recorded: both must be
empty. Screenshots of the key pages (light, dark, narrow) go to KVATLAS_SCREENSHOTS when set.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

SITE = os.environ.get("KVATLAS_SITE")
SHOTS = os.environ.get("KVATLAS_SCREENSHOTS")
pytestmark = pytest.mark.skipif(not SITE or not Path(SITE, "index.html").is_file(),
                                reason="set KVATLAS_SITE to a built site (make site-check)")
ENTRY = "snapkv"           # an entry with an implementation, reported and measured results
NOTEBOOK = "full"          # a notebook whose executed copy is checked in
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(directory: Path):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(directory)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is not installed: make browser-deps"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def base():
    with serve(Path(SITE)) as url:
        yield url


class Visit:
    """A page opened in a fresh context: requests off 127.0.0.1 are aborted and recorded, as are console errors."""

    def __init__(self, browser, url: str, *, dark: bool = False, narrow: bool = False):
        self.context = browser.new_context(color_scheme="dark" if dark else "light",
                                           viewport={"width": 390, "height": 844} if narrow else
                                           {"width": 1280, "height": 900})
        origin = f"{urlsplit(url).scheme}://{urlsplit(url).netloc}"
        self.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=origin)
        self.external: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url, wait_until="networkidle")

    def _route(self, route):
        host = urlsplit(route.request.url).hostname
        if route.request.url.startswith(("data:", "blob:")) or host == "127.0.0.1":
            route.continue_()
        else:
            self.external.append(route.request.url)
            route.abort()

    def close(self, shot: str | None = None):
        if SHOTS and shot:
            Path(SHOTS).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(SHOTS) / f"{shot}.png"), full_page=False)
        self.context.close()
        assert not self.external, f"requests left 127.0.0.1: {self.external[:5]}"
        assert not self.errors, f"console errors: {self.errors[:5]}"


# ---------------------------------------------------------------------------------------------------- checks
def check_home(v: Visit):
    page = v.page
    assert "KV-cache compression" in page.locator("h1").first.inner_text()
    assert page.locator("svg.kv-axes").count() == 1, "the home page's diagram is missing"
    for name in ("atlas.json", "atlas.csv", "atlas.bib"):
        href = page.locator(f"a[href$='{name}']").first.evaluate("a => a.href")  # resolved against the page
        status = page.request.get(href).status
        assert status == 200, f"{name} ({href}): HTTP {status}"


def check_fits(v: Visit):
    """Nothing widens the page beyond the viewport (wide tables scroll inside their own box)."""
    over = v.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert over <= 1, f"the page is {over}px wider than the viewport"


def check_search(v: Visit):
    page = v.page
    page.click("input.md-search__input")
    page.keyboard.type("SnapKV", delay=30)
    page.wait_for_selector(".md-search-result__item", timeout=15000)
    hrefs = [a.get_attribute("href") or "" for a in page.locator(".md-search-result__item a").all()]
    assert any(f"taxonomy/{ENTRY}/" in h for h in hrefs), f"search did not find the entry: {hrefs[:5]}"


def check_equation(v: Visit):
    eq = v.page.locator("h2#key-equation ~ .arithmatex").first
    assert eq.count() == 1, "no equation block after the Key equation heading"
    assert eq.locator(".katex").count() >= 1, "the key equation is not rendered (no .katex)"
    assert v.page.locator(".katex-error").count() == 0, "KaTeX reported an error"


def check_bibtex(v: Visit):
    page = v.page
    block = page.locator("h2#cite-this-entry ~ div.highlight").first
    assert block.count() == 1, "no BibTeX block under 'Cite this entry'"
    code = block.locator("code").inner_text()
    assert re.match(r"\s*@\w+\{", code), f"not BibTeX: {code[:80]!r}"
    block.hover()
    block.locator("button[data-md-type='copy'], button.md-clipboard").first.click()
    page.wait_for_timeout(300)
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied.strip() == code.strip(), "the copy button did not copy the BibTeX"


def check_measured(v: Visit):
    text = v.page.locator("article").inner_text()
    assert "Reported by the paper" in text and "Measured by this atlas" in text
    assert "Achieved ratio (×, measured bytes, fp32 unit)" in text or "Achieved ratio (×, 16-bit unit)" in text, \
        "units of the measured results are missing"


def check_taxonomy(v: Visit, n_entries: int):
    page = v.page
    rows = page.locator(".kv-faceted table tbody tr")
    assert rows.count() == n_entries, f"{rows.count()} rows for {n_entries} entries"
    principles = page.eval_on_selector_all(".kv-faceted table tbody tr", "rs => rs.map(r => r.cells[1].textContent.trim())")
    page.select_option(".kv-facets select[data-col='1']", "quantization")
    shown = page.eval_on_selector_all(".kv-faceted table tbody tr", "rs => rs.filter(r => r.style.display !== 'none').length")
    assert shown == principles.count("quantization") > 0, f"filter shows {shown} rows"
    page.select_option(".kv-facets select[data-col='1']", "")
    year = page.locator(".kv-faceted thead th", has_text="Year")
    year.click()
    years = page.eval_on_selector_all(".kv-faceted table tbody tr", "rs => rs.map(r => +r.cells[6].textContent)")
    assert years == sorted(years), "Year does not sort ascending"
    year.click()
    years = page.eval_on_selector_all(".kv-faceted table tbody tr", "rs => rs.map(r => +r.cells[6].textContent)")
    assert years == sorted(years, reverse=True), "Year does not sort descending"


def check_notebook(v: Visit):
    imgs = v.page.locator("img[src^='data:image/png']")
    assert imgs.count() >= 1, "the notebook page shows no plot"
    widths = v.page.eval_on_selector_all("img[src^='data:image/png']", "is => is.map(i => i.naturalWidth)")
    assert min(widths) > 0, "a plot did not load"


def check_leaderboard(v: Visit):
    """The benchmark's leaderboard: its figures, Pareto fronts, heatmaps and filters; or, before any
    results/bench file exists, how to produce one."""
    text = v.page.locator("article").inner_text()
    assert "16-bit" in text, "the leaderboard does not state its unit"
    if "No benchmark results yet" in text:
        assert "kvatlas bench --quick" in text
        return
    assert v.page.locator("svg.kv-chart polyline").count() >= 2, "the leaderboard figure has no lines"
    assert v.page.locator("svg.kv-pareto polyline.kv-front").count() >= 1, "no Pareto front drawn"
    assert v.page.locator("table.kv-heat td").count() >= 1, "no method x task heatmap"
    overall = v.page.locator(".kv-faceted").first  # the overall table; column 1 is the family
    families = overall.locator("tbody tr").evaluate_all("rs => rs.map(r => r.cells[1].textContent.trim())")
    overall.locator(".kv-facets select[data-col='1']").select_option("quantization")
    shown = overall.locator("tbody tr").evaluate_all("rs => rs.filter(r => r.style.display !== 'none').length")
    assert shown == families.count("quantization") > 0, f"the family filter shows {shown} rows"
    broken = v.page.eval_on_selector_all("img", "is => is.filter(i => !i.complete || i.naturalWidth === 0).length")
    assert broken == 0, f"{broken} images did not load"


def check_evidence(v: Visit):
    """The legacy per-method passkey evidence: its figures, in the fp32 unit it says it uses."""
    assert "fp32" in v.page.locator("article").inner_text(), "the legacy evidence does not state its unit"
    assert v.page.locator("svg.kv-chart polyline").count() >= 2, "the evidence figure has no lines"


def check_compare(v: Visit):
    page = v.page
    heads = page.eval_on_selector_all(".kv-compare-table thead th", "hs => hs.map(h => h.textContent)")
    assert len(heads) == 3, f"compare shows {len(heads) - 1} methods, not the 2 asked for"
    page.select_option("#kv-compare select[data-slot='2']", "kivi")
    assert page.locator(".kv-compare-table thead th").count() == 4
    assert page.locator(".kv-compare-table .katex").count() >= 3, "key equations not rendered"
    assert "m=snapkv,h2o,kivi" in page.url


# ---------------------------------------------------------------------------------------------------- tests
def entries_count() -> int:
    return json.loads(Path(SITE, "pages.json").read_text())["entries"]


def test_home(browser, base):
    v = Visit(browser, base + "/")
    check_home(v)
    v.close("home")
    for name, kw in (("home-dark", {"dark": True}), ("home-narrow", {"narrow": True})):
        v = Visit(browser, base + "/", **kw)
        check_home(v)
        check_fits(v)
        v.close(name)


def test_search(browser, base):
    v = Visit(browser, base + "/")
    check_search(v)
    v.close("search")


def test_entry_page(browser, base):
    for name, kw in (("entry", {}), ("entry-dark", {"dark": True}), ("entry-narrow", {"narrow": True})):
        v = Visit(browser, f"{base}/taxonomy/{ENTRY}/", **kw)
        check_equation(v)
        check_bibtex(v)
        check_measured(v)
        check_fits(v)
        v.close(name)


def test_taxonomy_table(browser, base):
    v = Visit(browser, base + "/taxonomy/")
    check_taxonomy(v, entries_count())
    v.close("taxonomy")


def test_notebook_page(browser, base):
    v = Visit(browser, f"{base}/notebooks/{NOTEBOOK}/")
    check_notebook(v)
    v.close("notebook")


def test_leaderboard(browser, base):
    v = Visit(browser, base + "/leaderboard/")
    check_leaderboard(v)
    v.close("leaderboard")


def test_evidence_and_findings(browser, base):
    v = Visit(browser, base + "/evidence/")
    check_evidence(v)
    v.close("evidence")
    v = Visit(browser, base + "/findings/")
    assert v.page.locator("article").inner_text().count("Verdict:") == 5, "a finding without a verdict"
    v.close("findings")


def test_compare(browser, base):
    v = Visit(browser, base + "/compare/?m=snapkv,h2o")
    check_compare(v)
    v.close("compare")


def test_family_page(browser, base):
    v = Visit(browser, base + "/families/token-eviction/")
    text = v.page.locator("article").inner_text()
    assert "Best measured result" in text and "Implemented" in text
    v.close("family")


def _break_equation(site: Path):
    (site / "javascripts" / "katex" / "katex.min.js").write_text("")


def _break_bibtex(site: Path):
    page = site / "taxonomy" / ENTRY / "index.html"
    text = page.read_text()
    broken = re.sub(r'(<h2 id="cite-this-entry">.*?)<div class="[^"]*highlight"><pre.*?</pre></div>', r"\1", text,
                    count=1, flags=re.S)
    assert broken != text
    page.write_text(broken)


def _break_plot(site: Path):
    page = site / "notebooks" / NOTEBOOK / "index.html"
    page.write_text(re.sub(r'src="data:image/png;base64,[^"]*"', 'src=""', page.read_text()))


def _break_offline(site: Path):
    page = site / "index.html"
    page.write_text(page.read_text().replace("</head>", '<script src="https://cdn.example.org/lib.js"></script></head>'))


@pytest.mark.parametrize("breakage, url, check", [
    (_break_equation, f"/taxonomy/{ENTRY}/", check_equation),
    (_break_bibtex, f"/taxonomy/{ENTRY}/", check_bibtex),
    (_break_plot, f"/notebooks/{NOTEBOOK}/", check_notebook),
    (_break_offline, "/", check_home),
], ids=["equation", "bibtex", "plot", "offline"])
def test_checks_catch_breakage(browser, tmp_path, breakage, url, check):
    site = tmp_path / "site"
    shutil.copytree(SITE, site)
    breakage(site)
    with serve(site) as broken:
        with pytest.raises(AssertionError):
            v = Visit(browser, broken + url)
            try:
                check(v)
            finally:
                v.close()
