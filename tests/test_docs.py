"""The docs site: built offline from every notebook with its outputs, then opened in headless Chromium."""
import shutil
import socket
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urljoin, urlparse

import pytest

import importlib.util

from mm_research.core import project_root
from mm_research.reproduce import reproduce

ROOT = project_root(Path(__file__).parent)
_spec = importlib.util.spec_from_file_location("build_docs", ROOT / "tools" / "build_docs.py")
build_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_docs)
build_site, docs_notebooks = build_docs.build_site, build_docs.docs_notebooks


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    "The whole site, built from a fresh reproduction of every experiment notebook (papermill end to end)."
    tmp = tmp_path_factory.mktemp("docs")
    small = tmp / "small.yaml"  # the two slowest experiments smaller; the others at their notebook defaults
    small.write_text("10_speech: {epochs: 1, lrs: [0.01], max_train: 200}\n"
                     "21_pruning: {model: tiny-llava, scenes: false, tower_epochs: 0, fastv_ks: [1], n_train: 64, "
                     "n_val: 32, n_test: 32, keep_ratios: [1.0, 0.25, 0.05], speed_reps: 1, cost_batch_size: 2, "
                     "new_tokens: 2, n_relevance: 4, n_boot: 200}\n")
    repro, results = reproduce(param_files=[small], root=tmp / "reproduce")
    failed = [r for r in results if r["status"] != "ok"]
    assert not failed, "\n".join(r["error"] for r in failed)
    index = build_site(tmp / "site", executed_dir=repro, progress=False)
    return index.parent


@pytest.fixture(scope="session")
def shots(tmp_path_factory):
    "Where the page screenshots go (a scratch folder: tests never write into the checkout)."
    return tmp_path_factory.mktemp("docs-screenshots")


@pytest.fixture(scope="session")
def server(site):
    "The site served on a free loopback port."
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(site)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@pytest.fixture(scope="session")
def browser():
    "Debian's headless Chromium driven by chromedriver, with no background networking."
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "chromium and chromium-driver are needed: `make test` installs them (apt-get)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1600"]:
        opts.add_argument(flag)
    b = webdriver.Chrome(service=Service(driver), options=opts)
    b.set_page_load_timeout(60)
    yield b
    b.quit()


def test_site_has_a_page_per_notebook_with_api_reference(site):
    pages = {p.name for p in site.glob("*.html")}
    assert "index.html" in pages and "search" in {p.name for p in site.iterdir()}
    assert len(pages - {"index.html", "404.html"}) == len(docs_notebooks()) - 1
    core = (site / "core.html").read_text()
    assert "start_run" in core and "resolve_dtype" in core  # show_doc entries of exported functions
    assert (site / "search" / "search_index.json").stat().st_size > 1000


def test_every_page_loads_images_render_links_resolve(site, server, browser, shots):
    n_images = 0
    for page in sorted(site.glob("*.html")):
        browser.get(urljoin(server, page.name))
        assert browser.execute_script("return document.readyState") == "complete"
        assert browser.title, page.name
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.currentSrc || i.src, i.complete, i.naturalWidth])")
        broken = [src for src, complete, width in images if not (complete and width > 0)]
        assert not broken, f"{page.name}: images that did not render: {broken}"
        n_images += len(images)
        hrefs = browser.execute_script("return Array.from(document.querySelectorAll('a[href]')).map(a => a.href)")
        for href in hrefs:
            url = urlparse(href)
            if url.netloc != urlparse(server).netloc: continue  # outside the site (source links)
            target = site / url.path.lstrip("/")
            if url.path.endswith("/"): target = target / "index.html"
            assert target.exists(), f"{page.name}: broken link {href}"
    assert n_images > 0  # the figures of the notebooks are on the site
    for name in ["index.html", "report.html"]:
        browser.get(urljoin(server, name))
        browser.save_screenshot(str(shots / f"{Path(name).stem}.png"))
        assert (shots / f"{Path(name).stem}.png").stat().st_size > 10_000


def test_docs_list_library_and_experiment_notebooks():
    names = [p.relative_to(ROOT / "nbs").as_posix() for p in docs_notebooks()]
    assert names[0] == "index.ipynb" and "00_core.ipynb" in names
    experiments = [n for n in names if n.startswith("experiments/")]
    assert experiments == sorted(experiments) and "experiments/21_pruning.ipynb" in experiments
    assert names.index("92_cli.ipynb") < names.index(experiments[0])
