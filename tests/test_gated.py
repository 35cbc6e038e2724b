"""Style-gated BLIP-2: zero-gate parity, the PEFT adapter contract, the freeze plan and its gradients, the projections
found, the full-size model on the meta device."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mm_research.runner import notebook_parameters
from mm_research.gated import (DEFAULT_TRAIN_PARTS, ArtVQACollator, GatedLinear, StyleGatedBlip2, apply_freeze_plan,
                               build_gated_model, cast_language_model, cross_attention_kv, generate_answer_ids,
                               load_blip2, parameter_groups, parameter_table, vqa_loss)
from mm_research.inspect import get_role, roles
from mm_research.style import build_style_encoder
from mm_research.zoo import load_processor

ROOT = Path(__file__).resolve().parents[1]


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


def test_gate_follows_peft_adapter_contract():
    blip = load_blip2("tiny-blip2")
    qformer, path = get_role(blip, "qformer"), roles(blip)["qformer"]
    originals = {n: qformer.get_submodule(n) for n in cross_attention_kv(qformer)}
    gated = StyleGatedBlip2(blip, build_style_encoder())
    keys = set(gated.state_dict())
    for name, base in originals.items():
        gate = qformer.get_submodule(name)
        assert gate.base_layer is base and gate.get_base_layer() is base
        assert {f"blip2.{path}.{name}.base_layer.{w}" for w in ("weight", "bias")} <= keys
    assert not [k for k in keys if ".base." in k]


def test_projections_found_by_structure_on_real_architecture():
    big = load_blip2("blip2-opt-2.7b")
    qf = get_role(big, "qformer")
    kv = cross_attention_kv(qf)
    assert len(kv) == 12                                            # cross-attention in every 2nd of 12 layers, K and V
    assert {qf.get_submodule(n).in_features for n in kv} == {1408}  # they read the 1408-wide EVA features
    assert {n.rsplit(".", 1)[1] for n in kv} == {"key", "value"}


def test_full_size_model_on_meta_device():
    with torch.device("meta"):
        m = apply_freeze_plan(StyleGatedBlip2(load_blip2("blip2-opt-2.7b"),
                                              build_style_encoder("efficientnet-b3-wikiart27")), DEFAULT_TRAIN_PARTS)
    assert all(p.is_meta for p in m.parameters())
    groups = parameter_groups(m)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for g in ("gates", "qformer", "projector", "other") for p in groups[g])
    film = [g.film for g in m.gates.values()]
    assert len(film) == 12 and {(f.in_features, f.out_features) for f in film} == {(1536, 1536)}
    built = build_gated_model("blip2-opt-2.7b", build_style_encoder("efficientnet-b3-wikiart27"), True, device="meta")
    assert sum(p.numel() for p in built.parameters() if p.requires_grad) == trainable


def test_experiment_default_trains_default_parts():
    params = notebook_parameters(ROOT / "nbs" / "experiments" / "30_gated.ipynb")
    assert params["train_parts"]["default"] == DEFAULT_TRAIN_PARTS


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
    m = apply_freeze_plan(StyleGatedBlip2(load_blip2("tiny-blip2"), build_style_encoder()), DEFAULT_TRAIN_PARTS)
    rows = {r["role"].strip(): r for r in parameter_table(m)}
    assert rows["language_model"]["trainable"] == rows["vision_encoder"]["trainable"] == 0
    assert rows["style_encoder"]["trainable"] == 0
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


def test_no_module_entry_point():
    import mm_research.gated as gated
    assert not hasattr(gated, "main") and not hasattr(gated, "run_gated_experiment")
