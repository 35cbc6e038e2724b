"""Shared fixtures: run folders in a temporary place, the hub offline."""
import os
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def runs(tmp_path, monkeypatch):
    "A private runs/ root for the test (mmr writes run folders there)."
    monkeypatch.setenv("MMR_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"
