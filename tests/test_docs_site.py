"""The documentation site: Sphinx builds it with warnings as errors, every internal link resolves,
and headless Chromium renders the home page, the API page of SCVI and each guide with its figures.

The site is built once per session into a temporary folder. Without the docs extra
(``pip install -e ".[docs]"``) the tests skip and say so; without Debian's ``chromium`` only the
browser test skips. ``.ci/run`` installs both where it can.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOCS_DEPS = ("sphinx", "myst_parser", "sphinx_book_theme")
CHROMIUM = os.environ.get("CELLVI_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
SCVI_PAGE = "api/generated/cellvi.SCVI.html"


def pages() -> dict[str, Path]:
    """Built page -> its Markdown source: the home page (README) and every top-level page of docs/."""
    out = {"index.html": ROOT / "README.md"}
    for md in sorted(DOCS.glob("*.md")):
        if md.name not in ("index.md", "README.md"):
            out[md.with_suffix(".html").name] = md
    return out


def n_figures(md: Path) -> int:
    """Images a Markdown page shows (``![alt](path)``), following a page that only includes another."""
    text = md.read_text()
    included = re.findall(r"```\{include\}\s+(\S+)", text)
    return sum(n_figures((md.parent / p).resolve()) for p in included) + len(re.findall(r"!\[[^\]]*\]\(", text))


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    missing = [m for m in DOCS_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"docs dependencies missing ({', '.join(missing)}): pip install -e '.[docs]' to build the site")
    out = tmp_path_factory.mktemp("docs")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-d", str(out / "doctrees"),
           str(DOCS), str(out / "html")]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, f"sphinx -W failed:\n{run.stderr[-5000:]}"
    return out / "html"


class _Refs(HTMLParser):
    """The ids of a page, and the targets of its links and images."""

    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.refs: list[tuple[str, str]] = []  # (tag, target)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        for key in ("href", "src"):
            if a.get(key) and tag in ("a", "img", "link", "script"):
                self.refs.append((tag, a[key]))


def _parse(path: Path) -> _Refs:
    p = _Refs()
    p.feed(path.read_text(errors="replace"))
    return p


def test_site_has_the_expected_pages(site):
    for page, md in pages().items():
        assert (site / page).is_file(), f"{md.name} did not become {page}"
    assert (site / SCVI_PAGE).is_file()
    html = (site / SCVI_PAGE).read_text()
    for method in ("setup_anndata", "train", "get_latent_representation", "get_normalized_expression",
                   "differential_expression", "save", "load"):
        assert f'id="cellvi.SCVI.{method}"' in html, f"SCVI.{method} is missing from the API page"


def test_internal_links_and_anchors_resolve(site):
    """Every local link, image, stylesheet and script of every page points to a file (and an id) that exists."""
    parsed = {p: _parse(p) for p in site.rglob("*.html") if "_static" not in p.relative_to(site).parts}  # not theme templates
    broken = []
    for path, refs in parsed.items():
        for tag, ref in refs.refs:
            parts = urlsplit(ref)
            if parts.scheme or parts.netloc or ref.startswith(("mailto:", "javascript:")):
                continue
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{path.relative_to(site)}: <{tag}> {ref}")
            elif parts.fragment and target.suffix == ".html" and target in parsed:
                if unquote(parts.fragment) not in parsed[target].ids:
                    broken.append(f"{path.relative_to(site)}: <{tag}> {ref} (no such anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken[:40])


@pytest.fixture(scope="session")
def server(site):
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium): browser test of the docs skipped")
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("playwright missing (pip install -e '.[docs]'): browser test of the docs skipped")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


def test_pages_render_with_figures_and_no_broken_links(site, server, browser):
    """Served over HTTP, each page loads, shows all its figures (decoded: naturalWidth > 0) and links
    only to pages and files that answer 200."""
    targets = {page: n_figures(md) for page, md in pages().items()}
    targets[SCVI_PAGE] = 0
    assert sum(targets.values()) >= 3, "the guides should show figures"
    context = browser.new_context()
    page = context.new_page()
    errors, bad_responses, checked = [], [], {}
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("response", lambda r: bad_responses.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    for name, expected_figures in targets.items():
        response = page.goto(server + name, wait_until="load")
        assert response is not None and response.status == 200, f"{name}: {response and response.status}"
        title = page.locator("article h1").first.inner_text()
        assert title.strip(), f"{name}: no heading rendered"
        images = page.evaluate("""() => Array.from(document.querySelectorAll('article img')).map(
            i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0}))""")
        assert len(images) >= expected_figures, f"{name}: {len(images)} figures shown, {expected_figures} in its source"
        assert all(i["ok"] for i in images), f"{name}: figures that did not load: {[i['src'] for i in images if not i['ok']]}"
        links = page.evaluate("() => Array.from(document.querySelectorAll('a[href]')).map(a => a.href)")
        for link in links:
            url = urljoin(server + name, link).split("#")[0]
            if url.startswith(server) and url not in checked:
                checked[url] = context.request.get(url).status
    context.close()
    assert not errors, f"JavaScript errors: {errors}"
    assert not bad_responses, f"failed requests while rendering: {bad_responses}"
    broken = sorted(u for u, status in checked.items() if status != 200)
    assert not broken, f"links that do not answer 200: {broken}"
    assert len(checked) > len(targets), "too few internal links found: is the navigation rendered?"
