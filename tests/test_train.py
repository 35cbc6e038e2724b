"Tests of mm_research.train.fit on tiny models: a real transformers class, precision, resume, NaN."
import json, os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset
from mm_research.train import fit, load_trainable, NonFiniteLossError


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 8)
        self.body.requires_grad_(False)
        self.drop = torch.nn.Dropout(0.2)
        self.head = torch.nn.Linear(8, 1)
    def forward(self, x, y):
        pred = self.head(self.drop(torch.relu(self.body(x)))).squeeze(-1)
        return type("Out", (), {"loss": torch.nn.functional.mse_loss(pred, y), "pred": pred})()


def data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, x.sum(-1)


def loaders():
    coll = lambda b: {"x": torch.stack([i[0] for i in b]), "y": torch.stack([i[1] for i in b])}
    return (DataLoader(TensorDataset(*data()), batch_size=6, shuffle=True, collate_fn=coll),
            DataLoader(TensorDataset(*data(16, 1)), batch_size=8, collate_fn=coll))


def model(seed=0):
    torch.manual_seed(seed)
    return Net()


def test_real_transformers_class_default_loss(tmp_path):
    from mm_research.zoo import load_model
    m = load_model("tiny-efficientnet", device="cpu")
    m.requires_grad_(False)
    m.classifier.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, 32, 32, generator=g), torch.randint(0, 6, (12,), generator=g)
    dl = DataLoader([{"pixel_values": a, "labels": b} for a, b in zip(x, y)], batch_size=4)
    res = fit(m, dl, dl, epochs=2, lr=1e-2, run_dir=tmp_path, progress=False)
    assert res.history[-1]["eval_loss"] < res.history[0]["eval_loss"]
    assert set(load_file(res.last_checkpoint / "model.safetensors")) == {"classifier.weight", "classifier.bias"}
    assert res.trainable_params == 6 * m.classifier.in_features + 6


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_precisions_on_cpu(tmp_path, precision):
    tr, ev = loaders()
    res = fit(model(), tr, ev, epochs=2, lr=0.05, mixed_precision=precision, run_dir=tmp_path, progress=False)
    assert all(torch.isfinite(torch.tensor(r["eval_loss"])) for r in res.history)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]


def test_resume_matches_uninterrupted(tmp_path):
    kw = dict(epochs=3, lr=0.05, grad_accum=3, scheduler="linear", seed=1, progress=False)
    tr, ev = loaders()
    a = model()
    full = fit(a, tr, ev, run_dir=tmp_path / "a", **kw)
    n = {"calls": 0}
    def crash_in_second_epoch_eval(m, dl):
        n["calls"] += 1
        if n["calls"] == 2: raise KeyboardInterrupt
        return {}
    tr, ev = loaders()
    with pytest.raises(KeyboardInterrupt):
        fit(model(), tr, ev, eval_fn=crash_in_second_epoch_eval, run_dir=tmp_path / "b", **kw)
    tr, ev = loaders()
    b = model()
    resumed = fit(b, tr, ev, run_dir=tmp_path / "b", resume=True, **kw)
    drop_time = lambda h: [{k: v for k, v in r.items() if "time" not in k} for r in h]
    assert drop_time(resumed.history) == drop_time(full.history)
    assert torch.equal(a.head.weight, b.head.weight)
    assert resumed.best["epoch"] == full.best["epoch"]


def test_nan_names_step_and_keeps_checkpoints(tmp_path):
    tr, ev = loaders()
    n = {"steps": 0}
    def loss_fn(m, batch):
        n["steps"] += m.training
        loss = m(**batch).loss
        return loss + float("inf") if n["steps"] == 10 else loss
    with pytest.raises(NonFiniteLossError, match=r"step 10 \(epoch 2, batch 2\)"):
        fit(model(), tr, ev, loss_fn=loss_fn, epochs=3, lr=0.05, run_dir=tmp_path, progress=False)
    state = json.loads((tmp_path / "checkpoints/last/trainer_state.json").read_text())
    assert state["step"] == 8 and len(state["history"]) == 1
    m = load_trainable(model(5), tmp_path / "checkpoints/best")
    assert torch.isfinite(m.head.weight).all()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines if "eval_loss" in l] == [1]


def test_bad_inputs(tmp_path):
    tr, ev = loaders()
    with pytest.raises(ValueError, match="best_mode"): fit(model(), tr, ev, best_mode="up", run_dir=tmp_path)
    with pytest.raises(ValueError, match="mixed_precision"):
        fit(model(), tr, ev, mixed_precision="fp8", run_dir=tmp_path)
    with pytest.raises(ValueError, match="is not among"):
        fit(model(), tr, ev, best_metric="acc", run_dir=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="No checkpoint"): load_trainable(model(), tmp_path / "nope")


def test_resume_with_a_seeded_loader_generator_matches_uninterrupted(tmp_path):
    "A loader shuffled by its own generator (as the experiments build them) resumes with that generator's state."
    from mm_research.core import resuming
    coll = lambda b: {"x": torch.stack([i[0] for i in b]), "y": torch.stack([i[1] for i in b])}
    def run(folder, crash_at=99):
        n = {"calls": 0}
        def eval_fn(m, dl):
            n["calls"] += 1
            if n["calls"] == crash_at: raise KeyboardInterrupt
            return {}
        tr = DataLoader(TensorDataset(*data()), batch_size=6, shuffle=True, collate_fn=coll,
                        generator=torch.Generator().manual_seed(4))
        m = model()
        res = fit(m, tr, DataLoader(TensorDataset(*data(16, 1)), batch_size=8, collate_fn=coll), eval_fn=eval_fn,
                  epochs=3, lr=0.05, run_dir=folder, keep_last=False, seed=1, progress=False)
        return m, [{k: v for k, v in r.items() if "time" not in k} for r in res.history]
    a, full = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt): run(tmp_path / "b", crash_at=2)
    with resuming(): b, resumed = run(tmp_path / "b")
    assert resumed == full and torch.equal(a.head.weight, b.head.weight)
