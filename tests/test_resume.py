"""Killed work continues: a cache entry's partial build, and `mmr run --resume` after SIGKILL, which ends with
the metrics and weights of a run that was never stopped. Concurrent builds of one cache entry both succeed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from mm_research.cache import cached_training
from mm_research.core import save_safetensors
from mm_research.train import fit

MMR = [sys.executable, "-c", "import sys; from mm_research.cli import main; sys.exit(main())"]

BUILD = """
import json, os, sys, time
from mm_research.cache import cached_training
def build(folder):
    time.sleep(1.0)
    (folder / "weights.txt").write_text(str(os.getpid()))
    return {"builder": os.getpid()}
f, r = cached_training("race", {"x": 1}, build, cache_dir=sys.argv[1])
w = (f / "weights.txt").read_text()
print(json.dumps({"folder": str(f), "builder": r["builder"], "cached": r["cached"], "w": w}))
"""


def test_two_processes_building_one_cache_entry_both_succeed(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0]["folder"] == outs[1]["folder"] and outs[0]["builder"] == outs[1]["builder"]
    assert outs[0]["w"] == outs[1]["w"] == str(outs[0]["builder"])
    assert sorted(o["cached"] for o in outs) == [False, True]  # built once, the other waited and found it
    assert not list((tmp_path / "race").glob(".*.partial"))


class Crash(Exception): pass


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))


def _train_into(folder, crash_at=None, calls=None):
    "Fit a small regression with its run_dir inside the cache entry's folder; optionally crash in epoch `crash_at`."
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g)
    ds = TensorDataset(x, x.sum(-1, keepdim=True))
    coll = lambda b: {"x": torch.stack([i[0] for i in b]), "y": torch.stack([i[1] for i in b])}
    loss = lambda m, b: torch.nn.functional.mse_loss(m(b["x"]), b["y"])
    def eval_fn(m, dl):
        calls.append(1)
        if len(calls) == crash_at: raise Crash()
        return {}
    net = _net()
    res = fit(net, DataLoader(ds, 8, shuffle=True, collate_fn=coll), DataLoader(ds, 20, collate_fn=coll), loss_fn=loss,
              eval_fn=eval_fn, epochs=3, lr=0.05, scheduler="linear", run_dir=folder / "fit", keep_last=False,
              progress=False)
    save_safetensors(dict(net.state_dict()), folder / "model.safetensors")
    return {"history": [{k: v for k, v in h.items() if "time" not in k} for h in res.history]}


def test_a_killed_cache_build_continues_from_its_last_checkpoint(tmp_path):
    state = {"crash_at": None, "calls": []}
    build = lambda folder: _train_into(folder, state["crash_at"], state["calls"])
    straight, rec = cached_training("fit", {"v": 1}, build, cache_dir=tmp_path / "a")
    assert len(state["calls"]) == 3
    state.update(crash_at=2, calls=[])
    with pytest.raises(Crash): cached_training("fit", {"v": 1}, build, cache_dir=tmp_path / "b")
    (partial,) = (tmp_path / "b" / "fit").glob(".*.partial")
    assert json.loads((partial / "fit/checkpoints/last/trainer_state.json").read_text())["epoch"] == 1
    state.update(crash_at=None, calls=[])
    continued, rec2 = cached_training("fit", {"v": 1}, build, cache_dir=tmp_path / "b")
    assert len(state["calls"]) == 2  # epochs 2 and 3 only: continued, not restarted
    assert rec2["history"] == rec["history"] and not partial.exists()
    a, b = load_file(straight / "model.safetensors"), load_file(continued / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _descendants(pid: int) -> list[int]:
    "Every process below `pid` (Linux /proc)."
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try: kids = [int(c) for c in (task / "children").read_text().split()]
        except OSError: continue
        for k in kids: out += [k, *_descendants(k)]
    return out


def _kill_all(proc: subprocess.Popen) -> None:
    "SIGKILL `mmr` and its kernel (jupyter starts kernels in their own session), as a crash of the machine would."
    kids = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for k in kids:
        try: os.killpg(os.getpgid(k), signal.SIGKILL)
        except ProcessLookupError: pass
    proc.wait(timeout=30)
    for k in kids:  # wait until the kernel is gone (or a zombie): nothing writes into the run folder any more
        while True:
            try: state = Path(f"/proc/{k}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError): break
            if state in "ZX": break
            time.sleep(0.05)


GATED = ["-p", "n_train", "4", "-p", "n_val", "2", "-p", "n_test", "2", "-p", "epochs", "2", "-p", "base_epochs", "0",
         "-p", "batch_size", "4", "--device", "cpu"]


def _weights(run: Path) -> dict[str, dict]:
    return {str(p.relative_to(run)): load_file(p) for p in sorted(run.rglob("*.safetensors"))}


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the kernel process through /proc")
def test_mmr_run_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "MMR_CACHE": str(tmp_path / "cache"), "MMR_RUNS": str(tmp_path / "runs")}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    out = subprocess.run([*MMR, "run", "30_gated", *GATED, "--run-dir", str(straight)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    proc = subprocess.Popen([*MMR, "run", "30_gated", *GATED, "--run-dir", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not list(killed.glob("seed_*/*/checkpoints/last/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before a `last` checkpoint appeared"
        time.sleep(0.05)
    _kill_all(proc)
    assert "summary" not in json.loads((killed / "metrics.json").read_text() if (killed / "metrics.json").exists()
                                       else "{}")
    again = subprocess.run([*MMR, "run", "30_gated", "--resume", str(killed), "--device", "cpu"], env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert json.loads((killed / "params.json").read_text()) | {"run_dir": ""} == \
        json.loads((straight / "params.json").read_text()) | {"run_dir": ""}
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight, killed))
    assert a["summary"] == b["summary"]
    models = lambda m: {n: {k: v for k, v in r.items() if "time" not in k}
                        for n, r in m["per_seed"]["0"]["models"].items()}
    assert models(a) == models(b)
    wa, wb = _weights(straight), _weights(killed)
    assert {p for p in wb if "/checkpoints/best/" in p} == {f"seed_0/{n}/checkpoints/best/model.safetensors"
                                                           for n in ("gated", "ungated", "control")}
    assert set(wb) <= set(wa)  # the style encoder was cached by the first run
    for p in wb:
        assert wa[p].keys() == wb[p].keys() and all(torch.equal(wa[p][k], wb[p][k]) for k in wa[p]), p
    assert not list(killed.glob("seed_*/*/checkpoints/last"))  # keep_last=False: removed once training ended
