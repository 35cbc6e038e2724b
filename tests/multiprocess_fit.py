"""Run `mm_research.train.fit` on a tiny seeded regression model; launched by tests/test_multiprocess.py.

Run it plainly for one process, or under `accelerate launch --num_processes 2 --cpu` for two: `--batch` is the
per-process batch size, so two processes with `--batch B` see the same global batch as one process with `2B`.
"""
import argparse
import json
from pathlib import Path

import torch
from accelerate import PartialState
from torch.utils.data import DataLoader, TensorDataset

from mm_research.train import fit


class Regressor(torch.nn.Module):
    "A frozen random feature layer and a trainable two-layer head (no dropout: every process computes the same)."

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Linear(4, 16)
        self.features.requires_grad_(False)
        self.head = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def forward(self, x, y):
        pred = self.head(torch.relu(self.features(x))).squeeze(-1)
        return type("Out", (), {"loss": torch.nn.functional.mse_loss(pred, y)})()


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(-1) + 0.1 * torch.randn(n, generator=g))


def collate(items):
    return {"x": torch.stack([i[0] for i in items]), "y": torch.stack([i[1] for i in items])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, required=True, help="per-process batch size")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--shuffle", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Regressor()
    # shuffling matches across process counts only with a seeded generator: without one, the single process draws
    # its permutation from the global RNG when iterating, while Accelerate seeds a shared one when preparing
    order = torch.Generator().manual_seed(1) if args.shuffle else None
    train_dl = DataLoader(data(64, 0), batch_size=args.batch, shuffle=args.shuffle, generator=order, collate_fn=collate)
    eval_dl = DataLoader(data(32, 1), batch_size=args.batch, collate_fn=collate)
    fit(model, train_dl, eval_dl, epochs=args.epochs, lr=1e-2, cpu=True, seed=0, run_dir=args.run_dir,
        progress=False, log_every=1, mixed_precision="no")
    state = PartialState()
    if state.is_main_process:  # how it really ran: `accelerate launch --cpu` alone would start a single process
        launched = {"num_processes": state.num_processes, "distributed_type": str(state.distributed_type),
                    "backend": state.backend}
        (Path(args.run_dir)/"launch.json").write_text(json.dumps(launched))


if __name__ == "__main__":
    main()
