"""Benchmark the one-pass LLaVA vision features (`mm_research.llava.features.encode_images`).

Per model, on one batch of images, interleaved so that machine load hits every path alike:

- `get_image_features_s`: transformers' own `model.get_image_features(pixel_values)` (projected features only);
- `encode_images_s`: ours, raw selected features + projected embeddings from one tower pass;
  `ratio_encode_vs_get_image_features` = encode / get_image_features (target <= 1.1: no second pass);
- `two_call_s`: the prior notes' path, `vision_tower(pv).last_hidden_state` plus `get_image_features(pv)`;
  `ratio_two_call_vs_encode` = two_call / encode (about 2: the tower runs twice);
- `tower_s`: the vision tower alone, for scale.

Times are the median (and min) over `--repeat` rounds after warm-up, in seconds. Models: the tiny-llava
preset and `clip-mid`, the same classes with a CLIP of 6 layers x 256 at 64 px (64 patches), where the tower
dominates the cost as in a real LLaVA.

Usage: python benchmarks/llava_bench.py [--out DIR_OR_JSON] [--repeat N] [--batch B] [--device D]
Writes metrics.json (default runs/benchmarks/llava/metrics.json). Not a test: nothing fails on a slow machine.
"""
from __future__ import annotations
import argparse, statistics, time
from pathlib import Path

import torch

from mm_research.core import environment_record, resolve_device, runs_root, save_metrics
from mm_research.inspect import get_role
from mm_research.llava.features import encode_images
from mm_research.zoo import build_model, load_config


def model_for(name: str):
    "The tiny-llava preset, or `clip-mid`: tiny-llava with a 6-layer, 256-wide CLIP at 64 px."
    cfg = load_config("tiny-llava")
    if name == "clip-mid":
        cfg.vision_config.update(dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                                      num_attention_heads=8, image_size=64, patch_size=8))
        cfg.image_seq_length = 64
    elif name != "tiny-llava": raise ValueError(f"Unknown benchmark model {name!r}: use 'tiny-llava' or 'clip-mid'.")
    return build_model(cfg).eval()


def time_paths(model, pv, repeat: int) -> dict:
    "Median and min seconds of each feature path, measured in interleaved rounds."
    tower = get_role(model, "vision_encoder")
    sync = torch.cuda.synchronize if pv.is_cuda else (lambda: None)
    paths = {"get_image_features": lambda: model.get_image_features(pixel_values=pv),
             "encode_images": lambda: encode_images(model, pv),
             "two_call": lambda: (tower(pv).last_hidden_state, model.get_image_features(pixel_values=pv)),
             "tower": lambda: tower(pv)}
    times = {k: [] for k in paths}
    with torch.no_grad():
        for fn in [*paths.values()] * 2: fn()                   # warm-up
        for _ in range(repeat):
            for k, fn in paths.items():
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times[k].append(time.perf_counter() - t)
    out = {}
    for k, ts in times.items(): out[f"{k}_s"], out[f"{k}_min_s"] = statistics.median(ts), min(ts)
    out["ratio_encode_vs_get_image_features"] = out["encode_images_s"] / out["get_image_features_s"]
    out["ratio_two_call_vs_encode"] = out["two_call_s"] / out["encode_images_s"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder or .json file (default runs/benchmarks/llava/metrics.json)")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="tiny-llava,clip-mid")
    a = ap.parse_args(argv)
    dev = resolve_device(a.device)
    out = Path(a.out) if a.out else runs_root()/"benchmarks"/"llava"
    folder, name = (out.parent, out.name) if out.suffix == ".json" else (out, "metrics.json")
    results = {}
    for m in a.models.split(","):
        model = model_for(m).to(dev)
        size = model.config.vision_config.image_size
        pv = torch.randn(a.batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dev)
        with torch.no_grad():                                   # the benchmark is only meaningful if the paths agree
            ref = torch.stack(list(model.get_image_features(pixel_values=pv).pooler_output))
            assert torch.equal(encode_images(model, pv).embeds, ref)
        r = time_paths(model, pv, a.repeat)
        results[m] = dict(r, batch=a.batch, image_size=size, repeat=a.repeat, threads=torch.get_num_threads())
        print(f"{m:11s} get_image_features {r['get_image_features_s']*1e3:8.2f} ms  "
              f"encode_images {r['encode_images_s']*1e3:8.2f} ms "
              f"(ratio {r['ratio_encode_vs_get_image_features']:.3f})  two-call {r['two_call_s']*1e3:8.2f} ms "
              f"(x{r['ratio_two_call_vs_encode']:.2f})  tower {r['tower_s']*1e3:8.2f} ms")
    save_metrics({"llava_features": results, "environment": environment_record(dev)}, folder, name)
    print(f"wrote {folder/name}")
    return results


if __name__ == "__main__":
    main()
