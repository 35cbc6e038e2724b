"""The docs site: built offline from every notebook with its outputs, then opened in headless Chromium."""
import json
import re
import shutil
import socket
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urljoin, urlparse

import pytest
import yaml

import importlib.util

from mm_research.core import project_root
from mm_research.reproduce import reproduce

ROOT = project_root(Path(__file__).parent)
_spec = importlib.util.spec_from_file_location("build_docs", ROOT / "tools" / "build_docs.py")
build_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_docs)
build_site, docs_notebooks, page_file = build_docs.build_site, build_docs.docs_notebooks, build_docs.page_file
NBS = ROOT / "nbs"
# The sidebar: Home, the ground floor, the concerns from the lowest rank to the highest, the top, the experiments.
SECTIONS = ["Home", "Ground floor", "Structure", "Memory", "Speech", "LLaVA", "Pruning", "Gated BLIP-2", "Running",
            "Experiments"]
CONCERN_FOLDERS = {"Structure": "structure", "Memory": "memory", "Speech": "speech", "LLaVA": "llava",
                   "Pruning": "pruning", "Gated BLIP-2": "gated"}


def site_pages(site: Path) -> set[str]:
    "The notebook pages of a built site, as paths from its root (theme, search and published results left out)."
    return {p.relative_to(site).as_posix() for p in site.rglob("*.html") if p.name != "404.html"
            and p.relative_to(site).parts[0] not in ("assets", "search", "results", "results-deep")}


def expected_page(nb: Path) -> str:
    "The sidebar file of notebook `nb`: its folder under nbs/, its name without the number (`01_fastv` -> `fastv`)."
    rel = nb.relative_to(NBS)
    return (rel.parent / re.sub(r"^\d+[a-zA-Z0-9]*_", "", rel.name)).as_posix()


def library_notebooks_by_hand() -> list[Path]:
    "Every notebook under nbs/ that exports a module (`#| default_exp`), found without the docs tool."
    def exports(p: Path) -> bool:
        return any(c["cell_type"] == "code" and "".join(c["source"]).startswith("#| default_exp")
                   for c in json.loads(p.read_text())["cells"])
    return [p for p in sorted(NBS.rglob("*.ipynb")) if not any(d.startswith(("_", ".")) for d in
                                                                p.relative_to(NBS).parts[:-1]) and exports(p)]


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
    pages = site_pages(site)
    assert "index.html" in pages and "search" in {p.name for p in site.iterdir()}
    assert pages == {page_file(nb).removesuffix(".ipynb") + ".html" for nb in docs_notebooks()}
    assert {"pruning/fastv.html", "structure/report.html", "experiments/pruning.html"} <= pages
    core = (site / "core.html").read_text()
    assert "start_run" in core and "resolve_dtype" in core  # show_doc entries of exported functions
    assert (site / "search" / "search_index.json").stat().st_size > 1000


def test_every_page_loads_images_render_links_resolve(site, server, browser, shots):
    n_images = 0
    for page in sorted(site_pages(site)):
        browser.get(urljoin(server, page))
        assert browser.execute_script("return document.readyState") == "complete"
        assert browser.title, page
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.currentSrc || i.src, i.complete, i.naturalWidth])")
        broken = [src for src, complete, width in images if not (complete and width > 0)]
        assert not broken, f"{page}: images that did not render: {broken}"
        n_images += len(images)
        hrefs = browser.execute_script("return Array.from(document.querySelectorAll('a[href]')).map(a => a.href)")
        for href in hrefs:
            url = urlparse(href)
            if url.netloc != urlparse(server).netloc: continue  # outside the site (source links)
            target = site / url.path.lstrip("/")
            if url.path.endswith("/"): target = target / "index.html"
            assert target.exists(), f"{page}: broken link {href}"
    assert n_images > 0  # the figures of the notebooks are on the site
    for name in ["index.html", "structure/report.html"]:
        browser.get(urljoin(server, name))
        browser.save_screenshot(str(shots / f"{Path(name).stem}.png"))
        assert (shots / f"{Path(name).stem}.png").stat().st_size > 10_000


def test_docs_list_library_and_experiment_notebooks():
    names = [p.relative_to(NBS).as_posix() for p in docs_notebooks()]
    assert names[0] == "index.ipynb" and "00_core.ipynb" in names
    assert {"structure/01_lora.ipynb", "pruning/01_fastv.ipynb", "gated/03_model.ipynb"} <= set(names)  # nested
    assert len(names) == len(set(names))
    experiments = [n for n in names if n.startswith("experiments/")]
    assert experiments == sorted(experiments) and "experiments/21_pruning.ipynb" in experiments
    assert names[-len(experiments):] == experiments  # the experiments come last
    # by concern: the ground floor, then each concern folder in rank order, then the top
    assert names.index("06_train.ipynb") < names.index("structure/01_lora.ipynb")
    assert names.index("memory/04_phase_profile.ipynb") < names.index("speech/01_data.ipynb")
    assert names.index("llava/04_tower_pretrain.ipynb") < names.index("pruning/00_base.ipynb")
    assert names.index("pruning/01_fastv.ipynb") < names.index("gated/01_art_data.ipynb")
    assert names.index("gated/04_base_lm.ipynb") < names.index("90_runner.ipynb") < names.index("92_cli.ipynb")


def test_site_nav_groups_notebooks_by_concern_each_library_notebook_once():
    nav = yaml.safe_load(build_docs.mkdocs_config(build_docs.site_nav()))["nav"]
    assert [next(iter(entry)) for entry in nav] == SECTIONS
    assert nav[0] == {"Home": "index.ipynb"}
    sections = {name: pages for entry in nav[1:] for name, pages in entry.items()}
    files = {name: [next(iter(p.values())) for p in pages] for name, pages in sections.items()}
    every = [f for fs in files.values() for f in fs]
    for nb in library_notebooks_by_hand():
        assert every.count(expected_page(nb)) == 1, f"{nb}: {every.count(expected_page(nb))} times in the sidebar"
    assert len(every) == len(library_notebooks_by_hand()) + len(list((NBS / "experiments").glob("*.ipynb")))
    for name, folder in CONCERN_FOLDERS.items():
        assert files[name] and all(f.startswith(f"{folder}/") for f in files[name]), name
    assert "core.ipynb" in files["Ground floor"] and "train.ipynb" in files["Ground floor"]
    assert "pruning/fastv.ipynb" in files["Pruning"] and "gated/model.ipynb" in files["Gated BLIP-2"]
    assert {"runner.ipynb", "reproduce.ipynb", "cli.ipynb"} <= set(files["Running"])
    numbers = {name: [next(iter(p)).split()[0] for p in pages] for name, pages in sections.items()}
    assert all(n < "90" for n in numbers["Ground floor"]) and all(n >= "90" for n in numbers["Running"])
    assert set(files["Experiments"]) == {expected_page(p) for p in (NBS / "experiments").glob("*.ipynb")}
