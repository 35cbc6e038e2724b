"""The pruning base: the deep tiny LLaVA preset, scene VQA (leak-free, deterministic), tower pretraining, the base."""
import csv
import hashlib
import json
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from mm_research.inspect import get_role
from mm_research.llava.vqa_data import HELD_OUT_PAIRS, load_vqa, make_scene_vqa, split_overlap
from mm_research.zoo import load_config, load_model, load_processor, save_preset

# Typed here from vqa_data.SHAPE_COLORS's definition, not read from the library.
RGB = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 240), "yellow": (235, 215, 40),
       "purple": (150, 60, 200), "white": (235, 235, 235)}


def _pixels_sha(path):
    "sha256 of the decoded RGB pixels, hashed here independently of the library's image_hash."
    return hashlib.sha256(np.asarray(Image.open(path).convert("RGB")).tobytes()).hexdigest()


def _tree_sha(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file(): h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_scene_vqa(tmp_path_factory.mktemp("scenes"), n_train=150, n_test=40, seed=5, n_val=30)


def test_scene_splits_are_leak_free_by_image_hash(scenes):
    rows = {s: load_vqa(scenes, s) for s in ("train", "val", "test")}
    assert [len(rows[s]) for s in ("train", "val", "test")] == [150, 30, 40]
    pics = {s: [_pixels_sha(r["image"]) for r in rows[s]] for s in rows}
    for s in ("val", "test"):
        assert not set(pics["train"]) & set(pics[s])
        assert len(set(pics[s])) == len(pics[s])
    assert not set(pics["val"]) & set(pics["test"])
    assert split_overlap(scenes, "test", "train") == dict(images=0, pairs=0, n=40)
    held = {tuple(p) for p in HELD_OUT_PAIRS}
    shown = lambda r: {(c, k) for _, _, c, k, _ in json.loads(r["objects"])}
    assert not any(shown(r) & held for r in rows["train"])                         # never shown in training
    assert not any(f"{c} {k}" in r["question"] for r in rows["train"] for c, k in held)  # nor named
    assert any(shown(r) & held for r in rows["test"])


def test_scene_data_is_deterministic(tmp_path, scenes):
    again = make_scene_vqa(tmp_path/"again", n_train=150, n_test=40, seed=5, n_val=30)
    assert _tree_sha(again) == _tree_sha(scenes)
    other = make_scene_vqa(tmp_path/"other", n_train=150, n_test=40, seed=6, n_val=30)
    assert (other/"train.csv").read_bytes() != (scenes/"train.csv").read_bytes()


def test_scene_answers_are_true_to_the_picture(scenes):
    with open(scenes/"test.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["type"] == "color"]
    assert rows
    for r in rows:
        kind = r["question"].split()[-2]                                           # "what color is the <kind> ?"
        (box,) = [b for _, _, _, k, b in json.loads(r["objects"]) if k == kind]
        px = np.asarray(Image.open(scenes/"images"/r["image"]).convert("RGB")).astype(int)
        x, y = int((box[0] + box[2]) / 2 * 96), int((box[1] * 0.3 + box[3] * 0.7) * 96)  # low centre: in a triangle
        assert np.abs(px[y, x] - RGB[r["answer"]]).max() < 40, r


def test_deep_preset_round_trips_through_save_preset(tmp_path):
    cfg = load_config("tiny-llava-deep")
    assert (cfg.text_config.num_hidden_layers, cfg.vision_config.num_hidden_layers, cfg.image_seq_length) == (8, 4, 144)
    folder = save_preset("tiny-llava-deep", tmp_path/"deep", seed=1)
    a, b = load_model("tiny-llava-deep", device="cpu", seed=1), load_model(folder, device="cpu")
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    img = Image.new("RGB", (96, 96), (30, 30, 30))
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle ?"}]}]
    p1, p2 = load_processor("tiny-llava-deep"), load_processor(folder)
    text = p2.apply_chat_template(chat, add_generation_prompt=True)
    assert text == "USER: <image>\nwhat color is the circle ? ASSISTANT:"
    x1, x2 = (p(images=[img], text=[text], return_tensors="pt") for p in (p1, p2))
    assert torch.equal(x1["input_ids"], x2["input_ids"]) and torch.equal(x1["pixel_values"], x2["pixel_values"])
    assert int((x2["input_ids"] == cfg.image_token_id).sum()) == 144
    with torch.no_grad():
        assert torch.equal(a(**x1).logits, b(**x2).logits)


def test_tower_pretraining_lowers_its_val_loss_and_moves_only_the_tower(tmp_path):
    from mm_research.llava.tower_pretrain import pretrain_tower, tower_scenes
    proc = load_processor("tiny-llava-deep")
    model, ref = load_model("tiny-llava-deep", device="cpu"), load_model("tiny-llava-deep", device="cpu")
    rec = pretrain_tower(model, tower_scenes(48, 0, proc), tower_scenes(32, 0, proc, stream=1), epochs=2,
                         batch_size=16, run_dir=tmp_path/"fit")
    assert rec["best"]["eval_loss"] < rec["eval_loss_before"]
    assert all(0 <= rec["best"][k] <= 1 for k in ("eval_label_acc", "eval_patch_color_acc", "eval_patch_kind_acc"))
    moved = lambda role: any(not torch.equal(p, q) for p, q in zip(get_role(model, role).parameters(),
                                                                   get_role(ref, role).parameters()))
    assert moved("vision_encoder") and not moved("language_model") and not moved("projector")


def test_pruning_base_is_cached_and_keeps_the_pretrained_tower_frozen(tmp_path, scenes):
    from mm_research.llava.tower_pretrain import pretrained_tower, pruning_base
    from mm_research.llava.vqa import encode_vqa
    proc = load_processor("tiny-llava-deep")
    train, val = (encode_vqa(load_vqa(scenes, s)[:n], proc) for s, n in (("train", 24), ("val", 8)))
    kw = dict(seed=0, n_tower=32, tower_epochs=1, tower_batch_size=8, base_epochs=1, batch_size=8, device="cpu",
              cache_dir=tmp_path)
    base, record = pruning_base("tiny-llava-deep", train, val, proc, **kw)
    folder, tower = pretrained_tower("tiny-llava-deep", proc, seed=0, n_tower=32, epochs=1, batch_size=8,
                                     device="cpu", cache_dir=tmp_path)
    assert tower["cached"] and not record["cached"] and record["tower"]["key"] == tower["key"]
    pre = load_model(folder, device="cpu")
    same = lambda role: all(torch.equal(p, q) for p, q in zip(get_role(base, role).parameters(),
                                                              get_role(pre, role).parameters()))
    assert same("vision_encoder") and not same("language_model")                 # tower frozen, LM trained
    again, record2 = pruning_base("tiny-llava-deep", train, val, proc, **kw)
    assert record2["cached"] and record2["key"] == record["key"]
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), again.parameters()))
    with pytest.raises(ValueError, match="keeps its tower"):
        pretrained_tower(str(folder), proc, cache_dir=tmp_path)
