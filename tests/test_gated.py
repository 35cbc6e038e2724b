"""Style-gated BLIP-2: zero-gate parity, the freeze plan and its gradients, the projections found, checkpoint safety."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mm_research.gated import (ArtVQACollator, GatedLinear, StyleGatedBlip2, apply_freeze_plan, build_style_encoder,
                               cast_language_model, cross_attention_kv, generate_answer_ids, load_blip2, load_style_encoder,
                               parameter_groups, parameter_table, save_style_encoder, vqa_loss)
from mm_research.inspect import get_role
from mm_research.zoo import load_model, load_processor


class Payload:  # any custom object a pickle-based checkpoint could carry
    def __init__(self): self.code = "would run on unpickling"


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray((rng.random((48, 40, 3)) * 255).astype("uint8")) for _ in range(2)]
    items = [{"image": imgs[0], "question": "what style is this painting ?", "answer": "dots", "kind": "style"},
             {"image": imgs[1], "question": "what color ?", "answer": "red", "kind": "color"}]
    return ArtVQACollator(load_processor("tiny-blip2"), load_processor("tiny-efficientnet"))(items)


def model_inputs(b):
    return {k: b[k] for k in ("pixel_values", "input_ids", "attention_mask")}


def test_zero_gates_equal_plain_blip2(batch):
    blip = load_blip2("tiny-blip2")
    with torch.no_grad():
        plain = blip(**model_inputs(batch)).logits
        gated = StyleGatedBlip2(blip, build_style_encoder())
        out = gated(**model_inputs(batch), style_pixel_values=batch["style_pixel_values"]).logits
    assert torch.equal(out, plain)
    assert len(gated.gates) == 4 and all(isinstance(g, GatedLinear) for g in gated.gates.values())


def test_projections_found_by_structure_on_real_architecture():
    big = load_model("blip2-opt-2.7b")
    qf = get_role(big, "qformer")
    kv = cross_attention_kv(qf)
    assert len(kv) == 12                                            # cross-attention in every 2nd of 12 layers, K and V
    assert {qf.get_submodule(n).in_features for n in kv} == {1408}  # they read the 1408-wide EVA features
    assert {n.rsplit(".", 1)[1] for n in kv} == {"key", "value"}


def test_freeze_plan_and_step0_gradients(batch):
    m = StyleGatedBlip2(load_blip2("tiny-blip2"), build_style_encoder())
    with torch.no_grad():
        for p in parameter_groups(m)["other"]: p.normal_(0, 0.5)   # query tokens, as pretrained
    apply_freeze_plan(m)
    m.train()
    vqa_loss(m, batch).backward()
    groups = parameter_groups(m)
    for frozen in ("vision_encoder", "language_model", "style_encoder", "qformer", "projector"):
        assert all(p.grad is None for p in groups[frozen]), frozen
    for g in m.gates.values():
        assert g.gate.grad.abs().sum() > 0                      # the gates learn first
        assert g.film.weight.grad.abs().sum() == 0              # tanh(0) = 0: the adapters wait (Flamingo)
    assert not m.style_encoder.training                         # frozen BatchNorm stats stay put


def test_parameter_table_ratio(batch):
    m = apply_freeze_plan(StyleGatedBlip2(load_blip2("tiny-blip2"), build_style_encoder()), "qformer,projector")
    rows = {r["role"].strip(): r for r in parameter_table(m)}
    assert rows["language_model"]["trainable"] == rows["vision_encoder"]["trainable"] == rows["style_encoder"]["trainable"] == 0
    assert rows["total"]["trainable"] == sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert abs(rows["total"]["ratio"] - rows["total"]["trainable"] / rows["total"]["total"]) < 1e-12
    with pytest.raises(ValueError, match="not allowed"):
        apply_freeze_plan(m, "vision_encoder")


def test_generation_mixed_precision_batch2(batch):
    m = StyleGatedBlip2(load_blip2("tiny-blip2"), build_style_encoder())
    with torch.no_grad():
        for g in m.gates.values(): g.gate.fill_(0.5)
    cast_language_model(m, torch.bfloat16)
    new = generate_answer_ids(m, batch, max_new_tokens=2)
    assert new.shape == (2, 2)


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
    assert torch.equal(load_style_encoder(tmp_path / "ok.pt", config=enc.config).classifier.weight, enc.classifier.weight)
    torch.save({"state_dict": enc.state_dict(), "meta": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="Refusing to load .*unpickling runs arbitrary code"):
        load_style_encoder(tmp_path / "evil.pt", config=enc.config)


def test_python_m_help():
    out = subprocess.run([sys.executable, "-m", "mm_research.gated", "--help"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0 and "-p NAME VALUE" in out.stdout
