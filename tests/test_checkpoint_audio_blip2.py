"""Speech, gated BLIP-2 and memory on a saved local checkpoint (`zoo.save_preset`): the hub code path gives the
preset's numbers; `epochs 0` scores the loaded weights; a user's data folder is only read."""
import json, os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from pathlib import Path

import numpy as np
import pytest

from conftest import read_only, tree_digest
from mm_research.gated.art_data import make_art_set
from mm_research.runner import run_notebook
from mm_research.speech.data import write_wav
from mm_research.zoo import save_preset


def speech_commands_folder(root: Path) -> Path:
    "Speech Commands v2 layout: 3 words x 5 speakers (tones of a word-specific pitch), speaker 'dd' val, 'ee' test."
    rng = np.random.default_rng(0)
    t = np.arange(8000) / 16000
    for w, f0 in (("go", 300), ("stop", 700), ("up", 1500)):
        for spk in ("aa", "bb", "cc", "dd", "ee"):
            for k in range(2):
                f = f0 * (1 + 0.05 * rng.standard_normal())
                x = 0.3 * np.sin(2 * np.pi * f * t) + 0.02 * rng.standard_normal(8000)
                write_wav(root / w / f"{spk}_nohash_{k}.wav", x.astype(np.float32))
    write_wav(root / "_background_noise_" / "white.wav", rng.standard_normal(16000).astype(np.float32) * .1)
    for name, spk in (("validation_list.txt", "dd"), ("testing_list.txt", "ee")):
        (root / name).write_text("".join(f"{w}/{spk}_nohash_{k}.wav\n" for w in ("go", "stop", "up") for k in range(2)))
    return root


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def shown(out: Path) -> str:
    "Every text and markdown output of the executed notebook in run folder `out`."
    nb = json.loads(next(out.glob("*.ipynb")).read_text())
    return "".join("".join(o.get("data", {}).get("text/markdown", "")) + "".join(o.get("text", ""))
                   for c in nb["cells"] for o in c.get("outputs", []))


def run(nb: str, where: Path, **params) -> dict:
    return metrics(run_notebook(nb, params={"device": "cpu", **params}, run_dir=where, progress=False))


def test_speech_checkpoint_equals_preset_on_a_read_only_speech_commands_folder(isolated):
    data = speech_commands_folder(isolated / "sc")
    before = tree_digest(data)
    ckpt = save_preset("tiny-qwen2-audio", isolated / "qwen", seed=0)
    with read_only(data):
        common = dict(data_dir=str(data), epochs=2, modes="frozen,lora", lrs=[1e-2], seeds=[0], batch_size=6)
        a = run("10_speech", isolated / "a", model="tiny-qwen2-audio", **common)
        b = run("10_speech", isolated / "b", model=str(ckpt), **common)
        e0 = run("10_speech", isolated / "e0", model=str(ckpt), **{**common, "epochs": 0})
        after = tree_digest(data)
    assert after == before and len(before) == 3 * 5 * 2 + 3          # the user's folder is byte-identical
    assert a["data"] == {"train": 18, "val": 6, "test": 6} and a["labels"] == ["go", "stop", "up"]
    assert a["speakers_shared_with_train"] == {"val": 0, "test": 0}
    keys = ("mode", "lr", "val_acc", "val_loss", "best_epoch", "val_curve", "trainable_params")
    assert [{k: t[k] for k in keys} for t in a["trials"]] == [{k: t[k] for k in keys} for t in b["trials"]]
    assert a["test_hits"] == b["test_hits"] and a["summary"] == b["summary"]
    assert a["trials"][0]["best_epoch"] in (1, 2) and len(a["test_hits"]["lora"][0]) == 6
    # epochs 0: nothing trains; LoRA starts as the identity, so both modes are the same untrained classifier
    untrained = [(t["best_epoch"], t["val_curve"], t["step_time_s"], t["lr"]) for t in e0["trials"]]
    assert untrained == [(0, [], None, 0.0)] * 2
    assert e0["test_hits"]["lora"] == e0["test_hits"]["frozen"]
    assert not (isolated / "e0" / "seed0").exists()                    # no training run folder, no checkpoint
    assert "Nothing was trained (epochs 0)" in shown(isolated / "e0")


def assert_close_tree(got, want, where="") -> None:
    "`got` equals `want`, floats to 1e-6 relative: the weights load bitwise, a reduction may sum in another order."
    assert type(got) is type(want), (where, got, want)
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), (where, sorted(got), sorted(want))
        for k in want: assert_close_tree(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), (where, got, want)
        for i, (g, w) in enumerate(zip(got, want)): assert_close_tree(g, w, f"{where}[{i}]")
    elif isinstance(want, float): assert got == pytest.approx(want, rel=1e-6, abs=1e-9), (where, got, want)
    else: assert got == want, (where, got, want)


def art_folder(root: Path) -> Path:
    "An ArtQuest-layout folder (train.csv, val.csv, images/; no test.csv)."
    root = make_art_set(root, n_train=12, n_val=6, n_test=2, size=32, seed=3)
    (root / "test.csv").unlink()
    return root


def test_gated_checkpoints_equal_presets_and_their_cache_entries_differ(isolated):
    blip, eff = save_preset("tiny-blip2", isolated / "blip"), save_preset("tiny-efficientnet", isolated / "eff")
    common = dict(n_train=6, n_val=6, n_test=6, seeds=[0], epochs=1, base_epochs=1, style_epochs=1, batch_size=6)
    a = run("30_gated", isolated / "a", **common)
    b = run("30_gated", isolated / "b", model=str(blip), style_model=str(eff), **common)
    assert a["summary"] == b["summary"]
    ma, mb = a["per_seed"]["0"], b["per_seed"]["0"]
    assert ma["base"]["best_eval_loss"] == mb["base"]["best_eval_loss"]
    assert ma["style_encoder"]["val_acc"] == mb["style_encoder"]["val_acc"]
    strip = lambda ms: {n: {k: v for k, v in m.items() if k not in ("step_time_s",)} for n, m in ms.items()}
    assert_close_tree(strip(mb["models"]), strip(ma["models"]))
    assert not mb["base"]["cached"] and not mb["style_encoder"]["cached"]   # the preset's entries are not reused
    trained = isolated / "cache" / "trained"
    for kind in ("gated_base", "style_encoder"):
        specs = [json.loads((d / "record.json").read_text())["spec"]["model"] for d in (trained / kind).iterdir()
                 if not d.name.startswith(".")]
        assert len(specs) == 2 and any(s.startswith("checkpoint:") for s in specs), (kind, specs)


def test_gated_epochs_0_on_a_read_only_artquest_folder(isolated):
    data = art_folder(isolated / "art")
    before = tree_digest(data)
    with read_only(data):
        m = run("30_gated", isolated / "e0", data_dir=str(data), seeds=[0], epochs=0, base_epochs=0, style_epochs=0,
                batch_size=6)
        after = tree_digest(data)
    assert after == before and len(before) == 23        # art_set.json, train.csv, val.csv, 20 images
    models = m["per_seed"]["0"]["models"]
    assert {n: (r["best_epoch"], r["val_by_epoch"], r["step_time_s"]) for n, r in models.items()} == {
        n: (0, [], None) for n in ("ungated", "gated", "control")}
    assert m["per_seed"]["0"]["base"] == {} and m["per_seed"]["0"]["style_encoder"]["path"] is None
    assert m["per_seed"]["0"]["data"]["sizes"]["test"] == 12          # val.csv is the test split: 6 images x 2
    assert not list((isolated / "cache").rglob("record.json"))         # nothing trained, nothing cached
    assert "no model trained (epochs 0)" in shown(isolated / "e0")


def test_memory_profiles_a_checkpoint_as_its_preset(isolated):
    ckpt = save_preset("tiny-blip2", isolated / "blip")
    m = run("03_memory", isolated / "m", model=str(ckpt), tiny_presets=["tiny-blip2"])
    pre, loc = m["profiles"]["tiny-blip2"], m["profiles"][str(ckpt)]
    assert loc["outputs"] == pre["outputs"] and set(pre["outputs"]) == {"forward_logits_sum", "train_loss"}
    assert loc["params"] == pre["params"] and loc["estimate"] == pre["estimate"]
    assert loc["comparison"] == pre["comparison"]
