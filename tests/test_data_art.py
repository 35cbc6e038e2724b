"""The art set and the ArtQuest-layout loader: layout with a test split, disjoint splits, vocabulary, any image size,
a user's folder only read, clear errors."""
import csv
import hashlib

import numpy as np
import pytest
from PIL import Image

from mm_research.gated.art_data import (ART_COLORS, ART_STYLES, ArtQuestDataset, art_fingerprint, art_splits,
                                  make_art_set, paint_art)
from mm_research.llava.vqa_data import read_artquest
from mm_research.zoo import PUNCT, VOCAB_WORDS, load_processor


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return make_art_set(tmp_path_factory.mktemp("art") / "set", n_train=12, n_val=6, n_test=6, size=40, seed=1)


def test_layout_and_columns(art):
    assert {p.name for p in art.iterdir()} >= {"train.csv", "val.csv", "test.csv", "images"}
    with open(art / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"image", "question", "answer"} <= set(rows[0])
    assert len(rows) == 24 and len(read_artquest(art, "val")) == len(read_artquest(art, "test")) == 12
    assert {r["answer"] for r in rows if r["kind"] == "style"} == set(ART_STYLES)   # 12 images: two of each style
    assert {r["answer"] for r in rows if r["kind"] == "color"} <= set(ART_COLORS)


def test_words_are_in_the_vocabulary(art):
    rows = read_artquest(art, "train") + read_artquest(art, "val")
    words = {w for r in rows for w in f"{r['question']} {r['answer']}".split()}
    assert words - set(VOCAB_WORDS) - set(PUNCT) == set()


def test_six_styles_deterministic_and_different():
    imgs = {s: np.asarray(paint_art(s, "blue", 48, seed=5)).astype(int) for s in ART_STYLES}
    assert len(ART_STYLES) >= 6
    assert np.array_equal(imgs["dots"], np.asarray(paint_art("dots", "blue", 48, seed=5)))
    for a in ART_STYLES:
        for b in ART_STYLES:
            if a < b: assert np.abs(imgs[a] - imgs[b]).mean() > 5, (a, b)


@pytest.mark.parametrize("size", [(384, 384), (61, 97), (5, 300)])
def test_any_image_size_is_resized_by_the_processors(tmp_path, size):
    root = make_art_set(tmp_path / "s", n_train=6, n_val=2, size=16)
    for r in read_artquest(root, "train"):
        Image.new("RGB", size, "red").save(root / "images" / r["image"])
    item = ArtQuestDataset(root, "train")[0]
    assert item["image"].size == size
    pv = load_processor("tiny-blip2")(images=[item["image"]], text=["what ?"], return_tensors="pt")["pixel_values"]
    assert tuple(pv.shape) == (1, 3, 32, 32)
    pv = load_processor("tiny-efficientnet")(images=[item["image"]], return_tensors="pt")["pixel_values"]
    assert tuple(pv.shape) == (1, 3, 32, 32)


def test_missing_images_listed(tmp_path):
    root = make_art_set(tmp_path / "s", n_train=6, n_val=7, size=16)
    for i in (2, 3, 5, 6):
        (root / "images" / f"val_0000{i}.png").unlink()
    listed = r"4 image file\(s\) missing from .*first: val_00002.png; val_00003.png; val_00005.png"
    with pytest.raises(FileNotFoundError, match=listed):
        read_artquest(root, "val")


def test_missing_columns_and_files(tmp_path):
    root = make_art_set(tmp_path / "s", n_train=6, n_val=2, size=16)
    (root / "val.csv").write_text("picture,question,reply\nx.png,what ?,red\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['image', 'answer'\]"):
        read_artquest(root, "val")
    with pytest.raises(FileNotFoundError, match="train.csv, val.csv and images/"):
        read_artquest(tmp_path / "nowhere", "train")


def test_cache_refuses_other_settings(tmp_path):
    root = make_art_set(tmp_path / "s", n_train=6, n_val=2, size=16)
    assert make_art_set(root, n_train=6, n_val=2, size=16) == root
    with pytest.raises(ValueError, match="another folder"):
        make_art_set(root, n_train=7, n_val=2, size=16)
    with pytest.raises(ValueError, match="another folder"):
        make_art_set(root, n_train=6, n_val=2, n_test=3, size=16)


def pixel_hashes(root, split):
    return {hashlib.sha256(np.asarray(Image.open(root / "images" / r["image"])).tobytes()).hexdigest()
            for r in read_artquest(root, split)}


def test_no_test_or_val_painting_is_in_train(art):
    h = {s: pixel_hashes(art, s) for s in ("train", "val", "test")}
    assert [len(h[s]) for s in h] == [12, 6, 6]
    assert not h["test"] & (h["train"] | h["val"]) and not h["val"] & h["train"]
    assert {r["answer"] for r in read_artquest(art, "test") if r["kind"] == "style"} == set(ART_STYLES)


def test_artquest_folder_without_test_is_split_and_only_read(tmp_path):
    root = make_art_set(tmp_path / "s", n_train=10, n_val=4, n_test=2, size=16)
    (root / "test.csv").unlink()                                  # ArtQuest's own layout: train.csv and val.csv
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    splits = art_splits(root, val_fraction=0.3, seed=4)
    assert {s: len(d) for s, d in splits.items()} == {"train": 14, "val": 6, "test": 8}
    images = {s: {r["image"] for r in d.rows} for s, d in splits.items()}
    assert not images["val"] & images["train"] and images["val"] | images["train"] == {
        r["image"] for r in read_artquest(root, "train")}
    assert splits["test"].rows == read_artquest(root, "val")
    assert splits["val"][0]["image"].size == (16, 16)
    assert art_fingerprint(splits) == art_fingerprint(art_splits(root, 0.3, seed=4))
    assert art_fingerprint(splits) != art_fingerprint(art_splits(root, 0.3, seed=5))
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
