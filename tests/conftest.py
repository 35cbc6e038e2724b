"""Shared fixtures: run folders in a temporary place, the hub offline, the checkout's results untouched."""
import contextlib
import hashlib
import os
import stat
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def tree_digest(folder: Path) -> dict[str, str]:
    "Every file under `folder` with a hash of its bytes (empty when the folder does not exist)."
    if not folder.exists(): return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session", autouse=True)
def checkout_results_untouched(tmp_path_factory):
    "Run folders default to a scratch place; at the end, the checkout's runs/ and results/ are byte-identical."
    before = {name: tree_digest(ROOT / name) for name in ("runs", "results")}
    saved = os.environ.get("MMR_RUNS")
    os.environ["MMR_RUNS"] = str(tmp_path_factory.mktemp("session-runs"))
    yield
    if saved is None: os.environ.pop("MMR_RUNS", None)
    else: os.environ["MMR_RUNS"] = saved
    after = {name: tree_digest(ROOT / name) for name in ("runs", "results")}
    assert after == before, "the test session wrote into the checkout's runs/ or results/"


@pytest.fixture
def runs(tmp_path, monkeypatch):
    "A private runs/ root for the test (mmr writes run folders there)."
    monkeypatch.setenv("MMR_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    "Run folders and the cache of trained things in `tmp_path`."
    monkeypatch.setenv("MMR_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MMR_CACHE", str(tmp_path / "cache"))
    return tmp_path


def set_writable(folder: Path, writable: bool) -> None:
    "Every file and folder under `folder` made read-only (or writable again)."
    for p in sorted(folder.rglob("*"), reverse=True) + [folder]:
        mode = stat.S_IMODE(p.stat().st_mode)
        p.chmod(mode | 0o200 if writable else mode & ~0o222)


@contextlib.contextmanager
def read_only(folder: Path):
    "`folder` read-only inside the block, writable again after it (so that pytest can remove it)."
    set_writable(folder, False)
    try: yield folder
    finally: set_writable(folder, True)
