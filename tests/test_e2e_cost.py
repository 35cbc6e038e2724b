"""End-to-end pruning cost (mm_research.pruning.cost) on the tiny-llava-deep preset (8 LM layers, 144 image tokens):
KV bytes by hand, every method end to end at batch 2, one-line errors, and the benchmark script with tiny settings."""
import importlib.util
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from mm_research.pruning.baselines import CLS, Pool
from mm_research.pruning.cost import cost_table, method_cost, prepare_model, run_once, synthetic_batch
from mm_research.pruning.fastv import FastV
from mm_research.pruning.harness import experiment_methods
from mm_research.pruning.learned import untrained_scorer
from mm_research.zoo import load_model, load_processor

ROOT = Path(__file__).resolve().parents[1]
# prompt of the padded batch of two: 153 positions, 144 of them image tokens, so 9 text/padding positions
N, T, TEXT = 153, 144, 9
# per token per layer per sample: 2 kv heads x head_dim 16 x 4 bytes (float32) x 2 (key and value)
BYTES_PER_TOKEN = 2 * 16 * 4 * 2
# the compared methods' labels, the experiment's order (FastV at K = 2), and the unpruned model's
LABELS = ["learned", "fastv_k2", "fastv_k2_reprune", "visionzip", "sparsevlm", "cls", "random", "pool", "random_lm_k2"]
AT_025 = [x for x in LABELS if x != "sparsevlm"]     # SparseVLM's layer average cannot reach 0.25 here


@pytest.fixture(scope="module")
def tiny():
    m = prepare_model(load_model("tiny-llava-deep", device="cpu", seed=0), "cpu")
    batch = synthetic_batch(load_processor("tiny-llava-deep"), 2)
    tc = m.config.text_config
    assert (tc.num_hidden_layers, tc.num_key_value_heads, tc.head_dim, m.dtype) == (8, 2, 16, torch.float32)
    assert tuple(batch["input_ids"].shape) == (2, N)
    assert (batch["input_ids"] == m.config.image_token_id).sum(1).tolist() == [T, T]
    methods = {x.label: x for x in experiment_methods("all", (2,), scorer=untrained_scorer(m))}
    assert list(methods) == LABELS
    return m, batch, {"none": None, **methods}


def test_kv_bytes_by_hand_fastv_and_none(tiny):
    m, batch, _ = tiny
    # FastV K=2, R=0.5: layers 1-2 hold all 153 positions, layers 3-8 the 9 text/padding ones + 72 kept image tokens
    fast = run_once(m, batch, FastV(2), 0.5, new_tokens=2)
    assert fast.kv_tokens == [153, 153, 81, 81, 81, 81, 81, 81]
    assert fast.kv_bytes == 2 * (2 * 153 + 6 * 81) * BYTES_PER_TOKEN == 405_504
    full = run_once(m, batch, None, 1.0, new_tokens=2)
    assert full.kv_bytes == 2 * 8 * 153 * BYTES_PER_TOKEN == 626_688


# image tokens kept at 0.25: round(0.25 * 144) = 36 (pool: a 6 x 6 grid); FastV, its re-pruning original and its
# random control: all 153 in layers 1-2, then 36 image tokens; SparseVLM at 0.5 (its layers average 72 image tokens)
FASTV = [N] * 2 + [TEXT + 36] * 6
EXPECTED_TOKENS = {"none": [N] * 8, "random": [TEXT + 36] * 8, "cls": [TEXT + 36] * 8, "pool": [TEXT + 36] * 8,
                   "learned": [TEXT + 36] * 8, "visionzip": [TEXT + 36] * 8, "fastv_k2": FASTV,
                   "fastv_k2_reprune": FASTV, "random_lm_k2": FASTV}
FIELDS = {"method", "keep_ratio", "batch", "prompt_tokens", "image_tokens", "kept_image_tokens", "layer_tokens",
          "flops", "new_tokens", "reps", "kv_bytes", "kv_tokens", "ttft_s", "ttft_ci", "ttft_times_s", "decode_s",
          "decode_ci", "decode_times_s", "latency_s", "latency_ci", "latency_times_s"}


@pytest.mark.parametrize("label", ["none", *LABELS])
def test_every_method_end_to_end_batch2(tiny, label):
    m, batch, methods = tiny
    r = 0.5 if label == "sparsevlm" else 0.25
    c = method_cost(m, batch, methods[label], r, new_tokens=3, reps=2, warmup=0)
    assert FIELDS <= set(c) and c["method"] == label
    if label == "sparsevlm":                     # the paper's budget: image tokens averaged over the 8 layers
        assert c["kv_tokens"] == c["layer_tokens"] and abs(sum(x - TEXT for x in c["layer_tokens"]) / 8 - 72) <= 0.5
    elif label == "fastv_k2_reprune":            # re-prunes at every forward: no cache held at all
        assert c["layer_tokens"] == EXPECTED_TOKENS[label] and c["kv_bytes"] == 0
    else:
        assert c["kv_tokens"] == c["layer_tokens"] == EXPECTED_TOKENS[label]
        assert c["kv_bytes"] == 2 * sum(EXPECTED_TOKENS[label]) * BYTES_PER_TOKEN
        assert c["kept_image_tokens"] == (T if label == "none" else 36)
    assert (c["batch"], c["prompt_tokens"], c["image_tokens"], c["reps"]) == (2, N, T, 2)
    assert len(c["ttft_times_s"]) == len(c["decode_times_s"]) == 2
    assert all(x > 0 for x in c["ttft_times_s"] + c["decode_times_s"] + c["latency_times_s"])
    f = c["flops"]
    assert f["total"] == f["vision"] + f["scoring"] + f["prefill"] and f["decode_step"] > 0
    assert (f["scoring"] == 0) == (label in ("none", "random", "pool", "random_lm_k2"))


@pytest.mark.parametrize("call,msg", [
    (lambda m, b: experiment_methods("fastvv"), "Unknown pruner 'fastvv'"),
    (lambda m, b: method_cost(m, b, CLS(), 0.0), "keep_ratio must be a number in (0, 1]"),
    (lambda m, b: method_cost(m, b, CLS(), 1.5), "keep_ratio must be a number in (0, 1]"),
    (lambda m, b: cost_table(m, [b], [Pool()], (0.5, 2.0)), "keep_ratio must be a number in (0, 1]"),
    (lambda m, b: cost_table(m, [b], ["sparse"]), "'sparse' is no PruningMethod"),
    (lambda m, b: cost_table(m, [b], [None, Pool()]), "None is no PruningMethod"),    # the baseline comes itself
    (lambda m, b: run_once(m, b, None, 1.0, new_tokens=1), "new_tokens must be an int >= 2")])
def test_bad_arguments_one_line(tiny, call, msg):
    m, batch, _ = tiny
    with pytest.raises(ValueError) as e: call(m, batch)
    assert msg in str(e.value) and "\n" not in str(e.value)


def load_bench():
    spec = importlib.util.spec_from_file_location("prune_e2e_bench", ROOT/"benchmarks"/"prune_e2e_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_script_tiny(tmp_path):
    bench = load_bench()
    bench.main(["--repeat", "1", "--warmup", "0", "--keep", "0.25", "--batch", "2", "--new-tokens", "2",
                "--device", "cpu", "--out", str(tmp_path)])
    d = json.loads((tmp_path/"metrics.json").read_text())
    assert set(d) == {"prune_e2e", "environment"}
    p = d["prune_e2e"]
    assert set(p) == {"settings", "headline", "rows"}
    assert p["settings"]["keep_ratios"] == [0.25] and p["settings"]["batches"] == [2]
    assert p["settings"]["methods"] == ["none", *LABELS]
    assert len(p["rows"]) == 1 + len(AT_025)                      # the baseline + each method reaching keep 0.25
    assert set(p["headline"]["batch_2"]) == {"none", *AT_025}
    h = p["headline"]["batch_2"]
    assert h["none"]["1"]["ttft_ratio"] == 1.0 and h["none"]["1"]["kv_bytes"] == 626_688
    assert h["fastv_k2"]["0.25"]["kv_bytes"] == 2 * (2 * N + 6 * (TEXT + 36)) * BYTES_PER_TOKEN
    keys = {"ttft_ratio", "decode_ratio", "latency_ratio", "kv_bytes", "kv_ratio", "flops_ratio"}
    assert keys <= set(h["cls"]["0.25"])
    assert d["environment"]["device"] == "cpu"


def test_benchmark_methods_from_the_registry(tmp_path, capsys):
    bench = load_bench()
    m = load_model("tiny-llava-deep", device="cpu")
    assert [x.label for x in bench.bench_methods("none,fastv,cls,keep_all", m, fastv_k=3)] == \
        ["fastv_k3", "fastv_k3_reprune", "cls", "keep_all"]
    assert [x.label for x in bench.bench_methods("all,cls", m)] == LABELS             # no case twice
    assert bench.bench_methods("learned", m)[0].scorer is not None                      # an untrained TokenScorer
    with pytest.raises(SystemExit):
        bench.main(["--methods", "fastvv", "--device", "cpu", "--out", str(tmp_path)])
    assert "Unknown pruner 'fastvv'" in capsys.readouterr().err and not any(tmp_path.iterdir())
