"Shape VQA: the on-disk layout, no leakage between splits, its loader's errors, determinism, vocabulary, encoding."
import csv
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from mm_research.llava.vqa_data import (HELD_OUT_PAIRS, SHAPE_COLORS, VQA_ANSWERS, VQA_TYPES, load_vqa, make_shape_vqa,
                                  render_scene, scene_questions, split_overlap)
from mm_research.zoo import PUNCT, VOCAB_WORDS, load_processor


@pytest.fixture(scope="module")
def vqa_root(tmp_path_factory):
    return make_shape_vqa(tmp_path_factory.mktemp("vqa"), n_train=120, n_test=40, seed=3, n_val=24)


def test_layout_and_splits(vqa_root):
    for split, n in (("train", 120), ("val", 24), ("test", 40)):
        with open(vqa_root/f"{split}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == n and set(rows[0]) >= {"image", "question", "answer"}
        assert all((vqa_root/"images"/r["image"]).is_file() for r in rows)
    train, val, test = ({r["image"] for r in load_vqa(vqa_root, s)} for s in ("train", "val", "test"))
    assert train.isdisjoint(test) and train.isdisjoint(val) and val.isdisjoint(test)


def _pixels_sha(path):
    "sha256 of the decoded RGB pixels: hashed here independently of the library's image_hash."
    return hashlib.sha256(np.asarray(Image.open(path).convert("RGB")).tobytes()).hexdigest()


@pytest.mark.parametrize("seed", [0, 1])
def test_no_test_or_val_picture_occurs_in_training(tmp_path, seed):
    root = make_shape_vqa(tmp_path, n_train=2000, n_test=200, seed=seed)
    rows = {s: load_vqa(root, s) for s in ("train", "val", "test")}
    pics = {s: [_pixels_sha(r["image"]) for r in rows[s]] for s in rows}
    train_pics, train_pairs = set(pics["train"]), set(zip(pics["train"], (r["question"] for r in rows["train"])))
    for s in ("val", "test"):
        assert not train_pics & set(pics[s])                                       # no val/test image in training
        assert len(set(pics[s])) == len(pics[s])                                   # no picture twice in val/test
        assert not train_pairs & set(zip(pics[s], (r["question"] for r in rows[s])))
    assert not set(pics["val"]) & set(pics["test"])
    assert split_overlap(root, "test", "train") == dict(images=0, pairs=0, n=200)
    assert split_overlap(root, "val", "train") == dict(images=0, pairs=0, n=200)


def test_held_out_pairs_only_in_val_and_test(vqa_root):
    held = {f"{c} {k}" for c, k in HELD_OUT_PAIRS}
    rows = {s: load_vqa(vqa_root, s) for s in ("train", "val", "test")}
    assert {r["held_out"] for r in rows["train"]} == {"no"}
    assert not any(h in r["question"] for r in rows["train"] for h in held)      # never named in training
    assert {r["held_out"] for r in rows["test"]} == {"yes", "no"}
    train_words = {w for r in rows["train"] for w in r["question"].split() + [r["answer"]]}
    assert {c for c, _ in HELD_OUT_PAIRS} | {k for _, k in HELD_OUT_PAIRS} <= train_words  # each part seen apart


def test_overlap_is_counted_when_there_is_some(vqa_root, tmp_path):
    import shutil
    root = tmp_path/"copy"
    shutil.copytree(vqa_root, root)
    (root/"leaky.csv").write_text((root/"train.csv").read_text())
    assert split_overlap(root, "leaky", "train") == dict(images=120, pairs=120, n=120)


def test_balanced_types_and_valid_answers(vqa_root):
    rows = load_vqa(vqa_root, "train")
    counts = {t: sum(r["type"] == t for r in rows) for t in VQA_TYPES}
    assert counts == {t: 24 for t in VQA_TYPES}
    assert all(r["answer"] in VQA_ANSWERS[r["type"]] for r in rows)
    assert len({r["answer"] for r in rows if r["type"] == "color"}) >= 4       # not a constant answer


def test_every_word_is_in_the_vocabulary(vqa_root):
    rows = load_vqa(vqa_root, "train") + load_vqa(vqa_root, "val") + load_vqa(vqa_root, "test")
    words = {w for r in rows for w in (r["question"] + " " + r["answer"]).split()}
    assert words - set(VOCAB_WORDS) - set(PUNCT) == set()
    assert {w for ans in VQA_ANSWERS.values() for a in ans for w in a.split()} <= set(VOCAB_WORDS)
    assert set(VQA_ANSWERS["corner"]) == {"top left", "top right", "bottom left", "bottom right"}


def test_answers_are_true_to_the_picture():
    scene = [(0, 1, "green", "triangle"), (1, 0, "green", "circle"), (1, 1, "yellow", "circle")]
    qs = scene_questions(scene)
    assert ("what color is the triangle ?", "green") in qs["color"]
    assert ("what shape is the yellow object ?", "circle") in qs["shape"]
    assert ("how many circles are there ?", "two") in qs["count"]
    assert ("how many shapes are there ?", "three") in qs["count"]
    assert ("is the green triangle on the left or right ?", "right") in qs["position"]
    assert ("is the yellow circle at the top or bottom ?", "bottom") in qs["position"]
    assert not any("green object" in q for q, _ in qs["shape"])                  # ambiguous: two green objects
    px = np.asarray(render_scene(scene, size=64))
    assert np.abs(px[48, 16].astype(int) - SHAPE_COLORS["green"]).max() < 10     # centre of the bottom-left circle
    assert np.abs(px[48, 48].astype(int) - SHAPE_COLORS["yellow"]).max() < 10


def test_deterministic(tmp_path):
    a = make_shape_vqa(tmp_path/"a", n_train=30, n_test=10, seed=7)
    b = make_shape_vqa(tmp_path/"b", n_train=30, n_test=10, seed=7)
    c = make_shape_vqa(tmp_path/"c", n_train=30, n_test=10, seed=8)
    assert (a/"train.csv").read_bytes() == (b/"train.csv").read_bytes() != (c/"train.csv").read_bytes()
    assert (a/"images/test_00004.png").read_bytes() == (b/"images/test_00004.png").read_bytes()


def test_reuse_and_conflicting_settings(tmp_path):
    root = make_shape_vqa(tmp_path, n_train=20, n_test=8, seed=0)
    stamp = (root/"train.csv").stat().st_mtime_ns
    assert make_shape_vqa(tmp_path, n_train=20, n_test=8, seed=0) == root
    assert (root/"train.csv").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="use another folder"):
        make_shape_vqa(tmp_path, n_train=21, n_test=8, seed=0)
    with pytest.raises(ValueError, match="use another folder"):
        make_shape_vqa(tmp_path, n_train=20, n_test=8, seed=0, n_val=4)


def test_an_old_version_folder_is_not_reused(tmp_path):
    (tmp_path/"shape_vqa.json").write_text('{"n_train": 20, "n_test": 8, "seed": 0, "size": 64, "version": 1}')
    with pytest.raises(ValueError, match="use another folder"):
        make_shape_vqa(tmp_path, n_train=20, n_test=8, seed=0)


def test_loader_errors_list_offenders(tmp_path):
    root = make_shape_vqa(tmp_path, n_train=20, n_test=8, seed=0)
    for name in ("train_00002.png", "train_00005.png", "train_00009.png"):
        (root/"images"/name).unlink()
    with pytest.raises(FileNotFoundError, match=r"3 image file\(s\) missing") as e:
        load_vqa(root, "train")
    assert "train_00002.png" in str(e.value) and "train_00005.png" in str(e.value)
    (root/"val.csv").unlink()
    with pytest.raises(FileNotFoundError, match="matches no VQA layout for split 'val': expected val.csv"):
        load_vqa(root, "val")
    (root/"odd.csv").write_text("picture,question\nx.png,what ?\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['image', 'answer'\]"):
        load_vqa(root, "odd")
    (root/"blank.csv").write_text("image,question,answer\ntest_00000.png,what color is the circle ?,\n")
    with pytest.raises(ValueError, match="empty"):
        load_vqa(root, "blank")


def test_encoded_for_tiny_llava(vqa_root):
    from mm_research.llava.vqa import encode_vqa, vqa_training_batch
    proc = load_processor("tiny-llava")
    rows = load_vqa(vqa_root, "test")
    data = encode_vqa(rows, proc)
    assert data["pixel_values"].shape == (40, 3, 32, 32)
    assert ((data["input_ids"] == 4).sum(1) == 16).all()                         # 16 image tokens per prompt
    assert proc.tokenizer.convert_ids_to_tokens(data["answer_ids"].tolist()) == [r["answer"].split()[0] for r in rows]
    tb = vqa_training_batch({k: v[:5] for k, v in data.items() if torch.is_tensor(v)})
    words = [len(r["answer"].split()) for r in rows[:5]]
    assert 2 in words and 1 in words                                             # a corner among the first five
    assert (tb["labels"] != -100).sum(1).tolist() == [n + 1 for n in words]      # the answer's words and eos
    eos = proc.tokenizer.eos_token_id
    assert [lab[lab != -100][-1].item() for lab in tb["labels"]] == [eos] * 5
    bad = [dict(rows[0], answer="octagon")]
    with pytest.raises(ValueError, match="unknown to this tokenizer"):
        encode_vqa(bad, proc)


def _tree_sha(root):
    "sha256 of every file's path and bytes under `root` (hashed here, not by the library)."
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file(): h.update(p.read_bytes())
    return h.hexdigest()


def test_user_layouts_are_read_and_left_untouched(tmp_path):
    import json
    import stat
    root = tmp_path/"mine"
    (root/"images").mkdir(parents=True)
    Image.new("RGB", (32, 32), (220, 40, 40)).save(root/"images/a.png")
    Image.new("RGB", (32, 32), (50, 90, 240)).save(root/"b.png")                  # next to the json, no images/
    conv = [{"id": 1, "image": "a.png", "conversations": [{"from": "human", "value": "what color ?\n<image>"},
                                                           {"from": "gpt", "value": "Red"}]}]
    (root/"train.json").write_text(json.dumps(conv))
    (root/"test.jsonl").write_text(json.dumps({"question_id": 3, "image": "b.png", "question": "what color ?",
                                               "answer": "blue", "type": "color"}) + "\n")
    before = _tree_sha(root)
    paths = [p for p in root.rglob("*")] + [root]
    for p in paths: p.chmod(stat.S_IREAD | stat.S_IEXEC)
    try:
        train, test = load_vqa(root, "train"), load_vqa(root, "test")
        with pytest.raises(FileNotFoundError, match=r"expected val.csv .*val.json .*val.jsonl"):
            load_vqa(root, "val")
    finally:
        for p in paths: p.chmod(0o700)
    assert _tree_sha(root) == before
    assert [(r["question"], r["answer"], r["image"]) for r in train] == [
        ("what color ?", "Red", str(root/"images/a.png"))]
    assert (test[0]["question"], test[0]["type"], test[0]["image"]) == ("what color ?", "color", str(root/"b.png"))
    from mm_research.llava.vqa import encode_vqa
    enc = encode_vqa(test, load_processor("tiny-llava"))
    assert enc["types"] == ["color"] and enc["answers"] == ["blue"]
