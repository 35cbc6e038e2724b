"""LLaVA experiments on a saved local checkpoint (`zoo.save_preset`): the hub code path gives the preset's numbers;
20_llava's saved trained base, given back with `epochs 0`, reproduces its test accuracy; a user's VQA folder is
only read."""
import json
import os
import shutil
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from pathlib import Path

from conftest import read_only, tree_digest
from mm_research.runner import run_notebook
from mm_research.zoo import save_preset

LLAVA = dict(n_train=256, n_val=32, n_test=32, epochs=3, batch_size=16, n_look=8, eval_batch_size=32)
PRUNING = dict(model="tiny-llava", fastv_ks=[1], scenes=False, tower_epochs=0, n_train=64, n_val=32, n_test=32,
               epochs=0, base_epochs=1, keep_ratios=[1.0, 0.25], speed_reps=1, n_boot=200, cost_batch_size=2,
               new_tokens=2, n_relevance=4)   # tower_epochs 0: a preset's tower pretraining has no checkpoint twin


def metrics(out: Path) -> dict:
    return json.loads((out/"metrics.json").read_text())


def test_20_llava_checkpoint_equals_preset_and_saved_base_reevaluates(isolated):
    ckpt = save_preset("tiny-llava", isolated/"tiny-llava-ckpt", seed=0)
    preset = run_notebook("20_llava", dict(LLAVA, seeds=[0]), progress=False)
    local = run_notebook("20_llava", dict(LLAVA, seeds=[0], model=str(ckpt)), progress=False)
    p, c = metrics(preset), metrics(local)
    assert p["per_seed"]["0"]["accuracy"]["baseline"]["exact"] > 0                  # it learned something to compare
    assert c["summary"] == p["summary"] and c["per_seed"]["0"]["accuracy"] == p["per_seed"]["0"]["accuracy"]
    assert c["per_seed"]["0"]["base_model"]["key"] != p["per_seed"]["0"]["base_model"]["key"]   # no reuse
    assert p["per_seed"]["0"]["base_model"]["cached"] is False and c["per_seed"]["0"]["base_model"]["cached"] is False
    # the trained base saved in the run folder, with the preset's synthesized data in a read-only user folder:
    # `epochs 0` evaluates exactly that base on the same test questions, and the folder is left as it was
    base = preset/"base"
    assert (base/"model.safetensors").is_file() and (base/"tokenizer_config.json").is_file()
    data = isolated/"my_vqa"
    shutil.copytree(Path(p["per_seed"]["0"]["data"]["root"]), data)
    before = tree_digest(data)
    with read_only(data):
        again = run_notebook("20_llava", dict(LLAVA, model=str(base), epochs=0, data_dir=str(data)), progress=False)
        after = tree_digest(data)
    assert after == before
    a = metrics(again)
    assert a["per_seed"]["0"]["accuracy"] == p["per_seed"]["0"]["accuracy"]
    assert a["per_seed"]["0"]["base_model"]["trained"] is False and a["base_checkpoint"] is None


def test_21_pruning_checkpoint_equals_preset_with_an_untrained_scorer(isolated):
    ckpt = save_preset("tiny-llava", isolated/"tiny-llava-ckpt", seed=0)
    preset = metrics(run_notebook("21_pruning", dict(PRUNING, seeds=[0]), progress=False))
    local = metrics(run_notebook("21_pruning", dict(PRUNING, seeds=[0], model=str(ckpt)), progress=False))
    unmeasured = lambda m: {k: v for k, v in m["summary"].items() if "measured" not in k}   # wall times differ
    assert unmeasured(local) == unmeasured(preset) and len(unmeasured(preset)) < len(preset["summary"])
    assert local["accuracy"] == preset["accuracy"]
    records = [m["per_seed"]["0"]["base_record"] for m in (preset, local)]
    assert records[0]["key"] != records[1]["key"] and records[0]["trained"] and records[1]["trained"]
    scorer = local["per_seed"]["0"]["scorer_record"]                # epochs 0: the scorer as initialised, said so
    assert scorer["trained"] is False and "not trained" in scorer["evaluated"]


def test_01_presets_checkpoint_equals_preset(isolated):
    ckpt = save_preset("tiny-llava", isolated/"tiny-llava-ckpt", seed=0)
    preset = metrics(run_notebook("01_presets", dict(model="tiny-llava", repeats=1), progress=False))
    local = metrics(run_notebook("01_presets", dict(model=str(ckpt), repeats=1), progress=False))
    p, c = preset["tiny"]["tiny-llava"], local["tiny"][str(ckpt)]
    assert (c["parameters"], c["logits_sum"], c["generated"]) == (p["parameters"], p["logits_sum"], p["generated"])
    assert len(p["generated"]) == 2 and len(p["generated"][0]) == 3
