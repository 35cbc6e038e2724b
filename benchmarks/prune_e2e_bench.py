"""Benchmark the end-to-end cost of every vision-token pruning method (`mm_research.pruning.cost`, issue 15).

On the tiny LLaVA where the methods are in regime (the `tiny-llava-deep` preset: 8 LM layers, 144 image tokens,
random seeded weights), for each batch size x method x keep ratio, one greedy `generate()` of `--new-tokens`
tokens with the KV cache, the method's whole path inside the clock (vision tower, scoring, selection, prefill,
first token, decode):

- `ttft_s`: time to first token; `decode_s`: seconds per decode token; `latency_s`: the whole call. Each the
  median over `--repeat` rounds (after `--warmup`), with `*_ci` the 95% interval of the mean;
- `ttft_ratio`, `decode_ratio`, `latency_ratio`: per round, the case's time over the unpruned baseline's (`none`,
  same batch, same round), median and `*_ratio_ci`; below 1 is faster. Every case runs once per round, in turn;
- `kv_bytes` (read from the cache after the prefill) and `kv_ratio`; `flops` (analytic: vision, scoring, prefill,
  total, decode_step) and `flops_ratio`; `first_token_agreement` with the baseline (random weights: fidelity only).

Methods: the registry's (`mm_research.pruning.harness`), as the experiment builds them with `experiment_methods`:
'all' is every compared method (learned, fastv_k<K>, visionzip, sparsevlm, cls, random, pool, and any plug-in
registered with `register_pruner`), or name them, e.g. `--methods fastv,cls,keep_all`. The unpruned baseline
`none` is always measured (naming it is allowed). `learned` runs an untrained TokenScorer (`untrained_scorer`: the
same cost as a trained one), fastv prunes in the LM after layer `--fastv-k`, sparsevlm cuts after layers 2, 4, 6.
On CUDA: bfloat16 and SDPA by default (`--dtype`, `--attn`), CUDA-synchronised clocks.

Usage: python benchmarks/prune_e2e_bench.py [--out DIR_OR_JSON] [--repeat N] [--device D] [--keep 1,0.25]
       [--batch 1,32] [--methods all | fastv,cls] [--new-tokens N]
Writes metrics.json (default runs/benchmarks/prune_e2e/metrics.json). Not a test: nothing fails on a slow machine.
"""
from __future__ import annotations
import argparse
from pathlib import Path

import torch

from mm_research.core import environment_record, resolve_device, runs_root, save_metrics
from mm_research.pruning.cost import KEEP_RATIOS, cost_table, prepare_model, synthetic_batch
from mm_research.pruning.harness import PRUNER_NAMES, experiment_methods
from mm_research.pruning.learned import untrained_scorer
from mm_research.zoo import load_model, load_processor

MODEL = "tiny-llava-deep"


def floats(s: str) -> list[float]: return [float(x) for x in s.split(",")]
def ints(s: str) -> list[int]: return [int(x) for x in s.split(",")]


def bench_methods(names: str, model, fastv_k: int = 2) -> list:
    "The method objects of comma-separated registry `names` ('all': every compared one; 'none' is the baseline)."
    scorer = untrained_scorer(model)                  # seed 0 whatever --seed: a fixed cost, as before
    out = [m for n in names.split(",") if n != "none" for m in experiment_methods(n, (fastv_k,), scorer=scorer)]
    return list(dict.fromkeys(out))


def headline(rows: list[dict]) -> dict:
    "Per batch, method and keep ratio: the time ratios to the baseline, KV bytes and their ratio, the FLOP ratio."
    out = {}
    for r in rows:
        out.setdefault(f"batch_{r['batch']}", {}).setdefault(r["method"], {})[f"{r['keep_ratio']:g}"] = dict(
            ttft_ratio=r["ttft_ratio"], decode_ratio=r["decode_ratio"], latency_ratio=r["latency_ratio"],
            ttft_ms=r["ttft_s"] * 1e3, kv_bytes=r["kv_bytes"], kv_ratio=r["kv_ratio"], flops_ratio=r["flops_ratio"])
    return out


def print_table(rows: list[dict]):
    "One line per case: times, ratios to the baseline with their intervals, KV bytes, FLOP ratio."
    print(f"{'batch':>5} {'method':>11} {'keep':>5} {'TTFT ms':>8} {'TTFT ratio [95% CI]':>22} {'decode ms':>9} "
          f"{'dec ratio':>9} {'KV bytes':>10} {'KV ratio':>8} {'FLOPs ratio':>11}")
    for r in rows:
        c = r["ttft_ratio_ci"]
        ci = f"{r['ttft_ratio']:.3f} [{c['lo']:.2f}, {c['hi']:.2f}]" if c["n"] > 1 else f"{r['ttft_ratio']:.3f}"
        print(f"{r['batch']:>5} {r['method']:>11} {r['keep_ratio']:>5g} {r['ttft_s'] * 1e3:>8.2f} {ci:>22} "
              f"{r['decode_s'] * 1e3:>9.2f} {r['decode_ratio']:>9.3f} {r['kv_bytes']:>10,} {r['kv_ratio']:>8.3f} "
              f"{r['flops_ratio']:>11.3f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder or .json file (default runs/benchmarks/prune_e2e/metrics.json)")
    ap.add_argument("--repeat", type=int, default=5, help="timed rounds (every case once per round)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--attn", default="sdpa", help="attention implementation (sdpa or eager)")
    ap.add_argument("--keep", type=floats, default=list(KEEP_RATIOS), help="keep ratios, comma-separated")
    ap.add_argument("--batch", type=ints, default=[1, 32], help="batch sizes, comma-separated")
    ap.add_argument("--methods", default="all",
                    help="'all' or comma-separated names from " + ",".join(["none", *PRUNER_NAMES]))
    ap.add_argument("--new-tokens", type=int, default=8, help="tokens generated per prompt (>= 2)")
    ap.add_argument("--fastv-k", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="model weights and images")
    a = ap.parse_args(argv)
    dev = resolve_device(a.device)
    out = Path(a.out) if a.out else runs_root()/"benchmarks"/"prune_e2e"
    folder, name = (out.parent, out.name) if out.suffix == ".json" else (out, "metrics.json")
    model = prepare_model(load_model(MODEL, device="cpu", seed=a.seed), dev, a.dtype, a.attn)
    proc = load_processor(MODEL)
    try: methods = bench_methods(a.methods, model, a.fastv_k)
    except ValueError as e: ap.error(str(e))
    batches = [synthetic_batch(proc, b, seed=a.seed) for b in a.batch]
    rows = cost_table(model, batches, methods, a.keep, new_tokens=a.new_tokens, reps=a.repeat, warmup=a.warmup,
                      seed=a.seed)
    print_table(rows)
    settings = dict(keep_ratios=a.keep, batches=a.batch, methods=["none", *(m.label for m in methods)],
                    new_tokens=a.new_tokens, repeat=a.repeat, warmup=a.warmup, fastv_k=a.fastv_k, seed=a.seed,
                    dtype=str(model.dtype), attn=a.attn, threads=torch.get_num_threads(),
                    lm_layers=model.config.text_config.num_hidden_layers, image_tokens=rows[0]["image_tokens"])
    save_metrics({"prune_e2e": dict(settings=settings, headline=headline(rows), rows=rows),
                  "environment": environment_record(dev)}, folder, name)
    print(f"wrote {folder/name}")
    return rows


if __name__ == "__main__":
    main()
