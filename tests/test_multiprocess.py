"""`fit` under `accelerate launch` with 2 CPU processes (gloo) matches one process with the same global batch.

The runs happen in subprocesses (tests/multiprocess_fit.py), with run folders under pytest's tmp_path.
Note: `accelerate launch --cpu --num_processes 2` starts a *single* process (Accelerate's simple launcher expects
mpirun for several CPU processes); `--multi_gpu --num_processes 2` starts two through torchrun, and `fit(cpu=True)`
makes them a MULTI_CPU group on gloo, which `launch.json` records.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parent / "multiprocess_fit.py"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], processes: int, cwd: Path, env_vars: dict, timeout: int) -> None:
    "Run the script `args` on 1 process, or under `accelerate launch` on 2, one thread each; fail with its output."
    cmd = [*LAUNCH, "--main_process_port", str(free_port()), *args] if processes == 2 else [sys.executable, *args]
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **env_vars)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def run_fit(tmp_path: Path, name: str, batch: int, processes: int, shuffle: bool) -> Path:
    "Run the script with per-process `batch` on 1 or 2 processes; its run folder."
    run_dir = tmp_path / name
    args = [str(SCRIPT), "--batch", str(batch), "--run-dir", str(run_dir), *(["--shuffle"] if shuffle else [])]
    launch(args, processes, tmp_path, dict(MMR_RUNS=str(tmp_path / "runs")), timeout=180)
    return run_dir


def metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    "The per-step and the per-epoch records of metrics.jsonl."
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in recs if "eval_loss" not in r], [r for r in recs if "eval_loss" in r]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / "last" / "model.safetensors")


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_processes_match_one_with_same_global_batch(tmp_path, shuffle):
    two = run_fit(tmp_path, "two", batch=4, processes=2, shuffle=shuffle)
    one = run_fit(tmp_path, "one", batch=8, processes=1, shuffle=shuffle)
    assert json.loads((two / "launch.json").read_text()) == {
        "num_processes": 2, "distributed_type": "DistributedType.MULTI_CPU", "backend": "gloo"}
    assert json.loads((one / "launch.json").read_text())["num_processes"] == 1

    w1, w2 = weights(one), weights(two)
    assert sorted(w2) == sorted(w1) == ["head.0.bias", "head.0.weight", "head.2.bias", "head.2.weight"]
    for k in w1: torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-5, msg=f"{k} differs")

    (steps1, epochs1), (steps2, epochs2) = metrics(one), metrics(two)
    assert [r["step"] for r in steps2] == [r["step"] for r in steps1] == list(range(1, 17))
    assert [(r["epoch"], r["step"]) for r in epochs2] == [(r["epoch"], r["step"]) for r in epochs1] == [(1, 8), (2, 16)]
    for a, b in zip(steps1 + epochs1, steps2 + epochs2):
        for key in ("train_loss", "eval_loss"):
            if key in a: assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a, b)
    assert (two / "checkpoints" / "best" / "model.safetensors").exists()
    if shuffle: return
    # the comparison can fail: one process with the per-process batch (half the global one) ends elsewhere
    half = run_fit(tmp_path, "half", batch=4, processes=1, shuffle=False)
    assert len(metrics(half)[0]) == 2 * len(steps2)
    assert max((weights(half)[k] - w2[k]).abs().max().item() for k in w2) > 1e-3



TRAIN_BASE = Path(__file__).resolve().parents[1] / "tools" / "train_vqa_base.py"


def train_base(tmp_path: Path, name: str, batch: int, processes: int) -> Path:
    "Train the 20_llava base with tools/train_vqa_base.py (per-process `batch`) on 1 or 2 processes; its checkpoint."
    out = tmp_path / name
    args = [str(TRAIN_BASE), "--out", str(out), "--n-train", "48", "--n-val", "16", "--epochs", "2",
            "--batch-size", str(batch), "--device", "cpu", "--cache-dir", str(tmp_path / f"cache-{name}")]
    launch(args, processes, tmp_path, dict(MMR_CACHE=str(tmp_path / "data-cache")), timeout=300)
    return out


def test_20_llava_base_trains_on_two_processes_as_on_one(tmp_path):
    "The experiment's own training (vqa.train_vqa_base) under `accelerate launch` with 2 processes."
    two = train_base(tmp_path, "two", batch=8, processes=2)
    one = train_base(tmp_path, "one", batch=16, processes=1)
    rec1, rec2 = (json.loads((d / "training.json").read_text()) for d in (one, two))
    assert (rec1["processes"], rec2["processes"]) == (1, 2)
    assert rec2["distributed_type"] == "DistributedType.MULTI_CPU"
    assert [h["step"] for h in rec2["history"]] == [h["step"] for h in rec1["history"]] == [3, 6]
    for a, b in zip(rec1["history"], rec2["history"]):
        for key in ("train_loss", "eval_loss", "eval_acc"): assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5)
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert sorted(w1) == sorted(w2) and len(w1) > 50
    for k in w1: torch.testing.assert_close(w2[k], w1[k], atol=1e-4, rtol=1e-4, msg=f"{k} differs")
