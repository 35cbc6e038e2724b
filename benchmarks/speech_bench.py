"""Speech encoder benchmarks -> metrics.json.

1. Encoding throughput, `audio_tower` vs `full_forward` (clips/s and their ratio).
2. Peak memory of tower-only loading vs whole-model loading from a sharded checkpoint (and the ratio),
   each measured in a fresh subprocess (CUDA: allocator peak; CPU: resident memory, weights paged in).
3. One training step, LoRA vs full fine-tuning of the tower: time and memory.

Models: the `tiny-qwen2-audio` preset and `medium` (the same tiny tower with a 6-layer, 512-wide language
model, so the language model dominates the parameters as it does in Qwen2-Audio-7B), or any
`--model` preset / checkpoint directory / hub id.

    python benchmarks/speech_bench.py [--device auto] [--out runs/speech_bench/NAME] [--model PATH ...]
"""
from __future__ import annotations
import argparse, json, os, statistics, subprocess, sys, tempfile, textwrap, time
from pathlib import Path
import numpy as np
import torch


def medium_config():
    "The tiny Qwen2-Audio with a 6 x 512 language model (the LM is ~95% of the parameters)."
    from mm_research.zoo import load_config, config_from_dict
    d = load_config("tiny-qwen2-audio").to_dict()
    d["text_config"] = {k: v for k, v in d["text_config"].items() if k != "layer_types"} | dict(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4)
    return config_from_dict(d)


def checkpoint(name: str, folder: Path) -> Path:
    "A sharded local checkpoint (with processor) for `name` ('medium', a preset), or `name` itself if it is a path."
    from mm_research.zoo import build_model, load_model, load_processor, PRESETS
    if Path(name).is_dir(): return Path(name)
    out = folder / name
    if not (out / "config.json").exists():
        m = build_model(medium_config()) if name == "medium" else load_model(name, device="cpu")
        m.save_pretrained(out, max_shard_size="20MB")
        load_processor("tiny-qwen2-audio").save_pretrained(out)
    return out


def clips(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(int(rng.uniform(0.4, 1.6) * 16000)).astype(np.float32) * 0.1 for _ in range(n)]


def sync(device):
    if device.type == "cuda": torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> float:
    "Median seconds of `fn()` over `repeats` runs after one warm-up."
    fn()
    sync(device)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def throughput(ckpt: Path, device, dtype, batch: int, repeats: int) -> dict:
    "Clips per second encoded by each strategy (features made once, outside the timing)."
    from mm_research.zoo import load_model, load_processor
    from mm_research.speech.encoder import SpeechEncoder
    model, proc = load_model(str(ckpt), device=str(device), dtype=dtype), load_processor(str(ckpt))
    out = {}
    for strategy in ("audio_tower", "full_forward"):
        enc = SpeechEncoder(model, proc, strategy)
        inputs = {k: v.to(device) for k, v in enc.featurize(clips(batch)).items()}
        with torch.no_grad(): s = timed(lambda: enc(**inputs), device, repeats)
        out[strategy] = {"clips_per_s": batch / s, "batch_s": s}
    out["tower_over_full_throughput"] = out["audio_tower"]["clips_per_s"] / out["full_forward"]["clips_per_s"]
    return out


LOAD = """
import json, torch
from mm_research.memory.profiler import MemoryProfiler
from mm_research.speech.encoder import load_audio_tower
from mm_research.zoo import load_model
path, device, how = {path!r}, {device!r}, {how!r}
load_model(path, meta=True)   # imports and lazy initialisation outside the measured phase
prof = MemoryProfiler(device)
with prof.phase("load"):
    m = (load_audio_tower if how == "tower" else load_model)(path, device=device, dtype="fp32")
    touched = [p.sum() for p in m.parameters() if not p.is_meta]   # CPU: page in mmapped weights, as a forward would
r = prof.records["load"]
print(json.dumps({{"peak_bytes": r.peak_above_start_bytes, "seconds": r.seconds,
                  "materialized_params": sum(p.numel() for p in m.parameters() if not p.is_meta)}}))
"""


def load_memory(ckpt: Path, device) -> dict:
    "Peak memory of loading the tower only vs the whole model, each in a fresh process."
    out = {}
    for how in ("tower", "whole"):
        p = subprocess.run([sys.executable, "-c", LOAD.format(path=str(ckpt), device=str(device), how=how)],
                           capture_output=True, text=True, timeout=600)
        if p.returncode: raise RuntimeError(p.stderr[-3000:])
        out[how] = json.loads(p.stdout.strip().splitlines()[-1])
    out["tower_over_whole_peak"] = out["tower"]["peak_bytes"] / max(out["whole"]["peak_bytes"], 1)
    return out


def train_step(ckpt: Path, device, batch: int, repeats: int, rank: int) -> dict:
    "One optimizer step of the keyword classifier: LoRA (q,k,v,o) vs full fine-tuning of the tower."
    from mm_research.zoo import load_processor
    from mm_research.speech.encoder import SpeechEncoder, KeywordClassifier, add_lora, freeze_for_mode, load_audio_tower
    from mm_research.memory.estimates import estimate
    from mm_research.memory.profiler import MemoryProfiler
    proc, out = load_processor(str(ckpt)), {}
    for mode in ("lora", "full"):
        enc = SpeechEncoder(load_audio_tower(str(ckpt), device=str(device), dtype="fp32"), proc, "audio_tower")
        if mode == "lora": add_lora(enc, r=rank, alpha=2 * rank)
        clf = KeywordClassifier(enc, 10).to(device)
        n = freeze_for_mode(clf, mode)
        b = {k: v.to(device) for k, v in {**enc.featurize(clips(batch)), "labels": torch.arange(batch) % 10}.items()}
        opt = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=1e-4)
        clf.train()
        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = clf(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        s = timed(step, device, repeats)
        prof = MemoryProfiler(device)
        with prof.phase("step"): step()
        out[mode] = {"step_s": s, "trainable_params": n, "peak_bytes": prof.records["step"].peak_above_start_bytes,
                     "train_state_bytes": estimate(clf, dtype=None, optimizer="adamw")["total_bytes"]}
    out["lora_over_full_step_time"] = out["lora"]["step_s"] / out["full"]["step_s"]
    out["lora_over_full_train_state"] = out["lora"]["train_state_bytes"] / out["full"]["train_state_bytes"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="*", default=["tiny-qwen2-audio", "medium"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for torch (0: torch's default); small shared CPUs run faster with 1")
    a = ap.parse_args(argv)
    from mm_research.core import resolve_device, make_run_dir, save_metrics, environment_record, seed_everything
    device = resolve_device(a.device)
    seed_everything(0)
    if device.type == "cpu" and a.threads: torch.set_num_threads(a.threads)
    run = make_run_dir("speech_bench", a.out)
    metrics = {"environment": environment_record(device), "args": vars(a)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.model:
            ckpt = checkpoint(name, Path(tmp))
            key = Path(name).name
            r = {"throughput": throughput(ckpt, device, "auto", a.batch, a.repeats),
                 "load_memory": load_memory(ckpt, device),
                 "train_step": train_step(ckpt, device, a.batch, a.repeats, a.rank)}
            metrics[key] = r
            save_metrics(metrics, run)
            t, l, s = r["throughput"], r["load_memory"], r["train_step"]
            print(f"{key}: audio_tower {t['audio_tower']['clips_per_s']:.0f} clips/s vs full_forward "
                  f"{t['full_forward']['clips_per_s']:.0f} ({t['tower_over_full_throughput']:.2f}x); load peak tower "
                  f"{l['tower']['peak_bytes']/2**20:.1f} MiB vs whole {l['whole']['peak_bytes']/2**20:.1f} MiB "
                  f"({l['tower_over_whole_peak']:.3f}); step LoRA {s['lora']['step_s']*1e3:.1f} ms vs full "
                  f"{s['full']['step_s']*1e3:.1f} ms ({s['lora_over_full_step_time']:.2f}x), train state "
                  f"{s['lora']['train_state_bytes']/2**20:.2f} vs {s['full']['train_state_bytes']/2**20:.2f} MiB",
                  flush=True)
    print(f"wrote {run/'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main()
