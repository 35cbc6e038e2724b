"""Train the 20_llava base (a LLaVA trained whole on VQA) in one process or many, and save it as a checkpoint.

The same training as the notebook (`mm_research.llava.vqa.train_vqa_base`: `fit` on Accelerate, best epoch on
validation, cached), run by `accelerate launch` on as many processes as you have GPUs:

    .venv/bin/python tools/train_vqa_base.py --out bases/tiny                  # one process, the tiny preset
    .venv/bin/accelerate launch --multi_gpu --num_processes 8 tools/train_vqa_base.py \\
        --model llava-hf/llava-1.5-7b-hf --data-dir my_vqa --batch-size 4 --out bases/llava7b
    .venv/bin/mmr run 20_llava -p model bases/llava7b -p epochs 0 -p data_dir my_vqa   # evaluate it

`--batch-size` is per process: N processes with B each train on the global batch N*B, which is what one
process with N*B computes. bf16 mixed precision on CUDA, fp32 on CPU. `--data-dir` is a VQA folder (csv,
LLaVA json or jsonl per split, images/) that is only read; without it, shape VQA is synthesized into the cache.
`--out` must be new or empty; only the main process writes it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import PartialState

from mm_research.core import atomic_write, to_jsonable
from mm_research.llava.vqa import encode_vqa, train_vqa_base
from mm_research.llava.vqa_data import load_vqa, make_shape_vqa, shape_vqa_root
from mm_research.zoo import load_processor, save_checkpoint


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-llava", help="preset, checkpoint folder or hub id")
    p.add_argument("--out", required=True, help="new or empty folder for the trained checkpoint")
    p.add_argument("--data-dir", default=None, help="a VQA folder, only read (default: shape VQA in the cache)")
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=None, help="trained-base cache (default: $MMR_CACHE/trained)")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse(argv)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"train_vqa_base: {out} exists and is not empty: give a new --out.")
    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)  # before any other Accelerate object: CPU processes form a gloo group
    with state.main_process_first():  # the main process synthesizes the data; the others then read it
        root = Path(args.data_dir) if args.data_dir else make_shape_vqa(
            shape_vqa_root(args.n_train, args.n_val, args.seed, n_val=args.n_val), args.n_train, args.n_val,
            args.seed, n_val=args.n_val)
    proc = load_processor(args.model)
    train, val = (encode_vqa(load_vqa(root, s), proc) for s in ("train", "val"))
    model, record = train_vqa_base(args.model, train, val, proc, epochs=args.epochs, lr=args.lr,
                                   batch_size=args.batch_size, seed=args.seed, device=args.device,
                                   cache_dir=args.cache_dir, progress=state.is_main_process)
    if state.is_main_process:
        save_checkpoint(model, proc, out)
        record = {**record, "processes": state.num_processes, "distributed_type": str(state.distributed_type)}
        atomic_write(out/"training.json", json.dumps(to_jsonable(record), indent=2) + "\n")
        print(f"train_vqa_base: best val accuracy {record['best']['eval_acc']:.3f} "
              f"on {state.num_processes} process(es); checkpoint in {out}")
    state.wait_for_everyone()
    return out


if __name__ == "__main__":
    main()
