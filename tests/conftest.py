"""Shared fixtures: run folders in a temporary place, the hub offline, the checkout's results untouched."""
import hashlib
import os
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
