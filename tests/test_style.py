"""The style encoder: class count read from the checkpoint, legacy files read without unpickling, training saves
what it reports."""
import warnings

import pytest
import torch

from mm_research.gated.art_data import ART_STYLES, art_splits, make_art_set
from mm_research.gated.style import (build_style_encoder, load_style_encoder, save_style_encoder, style_images,
                               train_style_encoder)


class Payload:  # any custom object a pickle-based checkpoint could carry
    def __init__(self): self.code = "would run on unpickling"


def test_style_checkpoint_class_count(tmp_path):
    enc = build_style_encoder("tiny-efficientnet", labels=[f"s{i}" for i in range(27)])
    save_style_encoder(enc, tmp_path / "w27")
    assert load_style_encoder(tmp_path / "w27").classifier.out_features == 27
    with pytest.raises(ValueError, match="has 27 classes"):
        load_style_encoder(tmp_path / "w27", num_labels=28)
    assert load_style_encoder(tmp_path / "w27", num_labels=28, on_mismatch="checkpoint").classifier.out_features == 27
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load_style_encoder(tmp_path / "w27", num_labels=28, on_mismatch="reinit").classifier.out_features == 28


def test_legacy_pt_weights_only(tmp_path):
    enc = build_style_encoder()
    torch.save({"state_dict": enc.state_dict()}, tmp_path / "ok.pt")
    back = load_style_encoder(tmp_path / "ok.pt", config=enc.config)
    assert torch.equal(back.classifier.weight, enc.classifier.weight)
    torch.save({"state_dict": enc.state_dict(), "meta": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="Refusing to load .*unpickling runs arbitrary code"):
        load_style_encoder(tmp_path / "evil.pt", config=enc.config)


def test_reference_encoder_on_meta():
    b3 = build_style_encoder("efficientnet-b3-wikiart27")
    assert all(p.is_meta for p in b3.parameters())
    assert (b3.config.hidden_dim, b3.classifier.out_features) == (1536, len(ART_STYLES))


def test_trained_encoder_reloads_with_reported_accuracy(tmp_path):
    art = make_art_set(tmp_path / "art", n_train=12, n_val=6, size=32)
    folder, best = train_style_encoder(art, tmp_path / "style", epochs=1, batch_size=6, device="cpu", image_size=32)
    enc = load_style_encoder(folder)
    assert enc.config.id2label == dict(enumerate(ART_STYLES))
    assert 0 <= best["style_acc"] <= 1 and "style_acc_in_training" in best
    assert not (folder / "model.pt").exists() and (folder / "model.safetensors").exists()


def test_encoder_is_chosen_on_the_held_out_split_not_on_test(tmp_path):
    art = make_art_set(tmp_path / "art", n_train=12, n_val=6, n_test=2, size=32)
    (art / "test.csv").unlink()                                      # ArtQuest layout: val.csv becomes the test split
    splits = art_splits(art, val_fraction=0.25, seed=0)
    held = {p.name for p, _ in style_images(splits, "val")}
    assert held and held <= {p.name for p, _ in style_images(art, "train")}
    assert not held & {p.name for p, _ in style_images(splits, "test")}
    folder, best = train_style_encoder(splits, tmp_path / "style", epochs=1, batch_size=6, device="cpu", image_size=32)
    assert best["epoch"] == 1 and (folder / "model.safetensors").exists()
