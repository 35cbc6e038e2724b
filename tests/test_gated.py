"""Style-gated BLIP-2: zero-gate parity, the PEFT adapter contract, the freeze plan and its gradients, the projections
found, the full-size model on the meta device, the control that sees the style without gates, the pretrained base."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mm_research.runner import notebook_parameters
from mm_research.gated.model import (DEFAULT_TRAIN_PARTS, GATING_VARIANTS, ArtVQACollator, GatedLinear, StyleGatedBlip2,
                               apply_freeze_plan, build_gated_model, cast_language_model, cross_attention_kv,
                               gate_parameters, generate_answer_ids, load_blip2, parameter_groups, parameter_table,
                               style_query_parameters, vqa_loss)
from mm_research.gated.base_lm import AttributeCollator, AttributePrefixLM, prefix_lm_loss
from mm_research.core import save_safetensors
from mm_research.inspect import get_role, roles
from mm_research.gated.style import build_style_encoder
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
    import mm_research.gated.model as gated
    assert not hasattr(gated, "main") and not hasattr(gated, "run_gated_experiment")


def logits(m, b):
    with torch.no_grad():
        return m(**model_inputs(b), style_pixel_values=b["style_pixel_values"]).logits


def test_three_methods_start_as_one_function(batch):
    enc = build_style_encoder()
    models = {name: build_gated_model("tiny-blip2", enc, **kw) for name, kw in GATING_VARIANTS.items()}
    ref = logits(models["ungated"], batch)
    for name, m in models.items():
        assert torch.equal(logits(m, batch), ref), name
        for a, z in zip(gate_parameters(models["gated"]), gate_parameters(m)):
            assert torch.equal(a, z), name
    n = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in models.items()}
    shift = sum(p.numel() for p in style_query_parameters(models["control"]))
    assert n["gated"] == n["ungated"] and n["control"] == n["ungated"] + shift > n["gated"]
    assert {g for g, ps in parameter_groups(models["control"]).items() if any(p.requires_grad for p in ps)} == {
        "gates", "style_query", "qformer", "projector", "other"}


def test_control_sees_the_style_without_gates(batch):
    enc = build_style_encoder()
    with torch.no_grad():   # a fresh encoder's pooled features are ~0 for every image: give it weights that differ
        for m in enc.modules():
            if isinstance(m, torch.nn.Conv2d): torch.nn.init.kaiming_normal_(m.weight)
    ctl = build_gated_model("tiny-blip2", enc, **GATING_VARIANTS["control"])
    with torch.no_grad():
        for p in ctl.style_query.parameters(): p.normal_(0, 0.1)
    other = {**batch, "style_pixel_values": batch["style_pixel_values"].flip(0)}
    assert not torch.equal(logits(ctl, batch), logits(ctl, other))          # the style reaches the answer
    assert all(torch.equal(g.gate, torch.zeros_like(g.gate)) for g in ctl.gates.values())
    twin = build_gated_model("tiny-blip2", enc, **GATING_VARIANTS["ungated"])
    with torch.no_grad():
        for g in twin.gates.values(): g.gate.fill_(0.5)
    assert torch.equal(logits(twin, batch), logits(twin, other))            # the ungated twin's does not depend on it
    assert ctl.generate(batch["pixel_values"], batch["prompt_input_ids"], batch["style_pixel_values"],
                        attention_mask=batch["prompt_attention_mask"], max_new_tokens=2).shape == (2, 2)


def test_control_copy_shifts_with_its_own_weights(batch):
    ctl = build_gated_model("tiny-blip2", build_style_encoder(), **GATING_VARIANTS["control"])
    before = logits(ctl, batch)
    twin = copy.deepcopy(ctl)
    with torch.no_grad():
        for p in twin.style_query.parameters(): p.normal_(0, 0.1)
    assert not torch.equal(logits(twin, batch), before)
    assert torch.equal(logits(ctl, batch), before)                          # the original's hook is its own


def test_control_budget_on_the_real_architecture():
    b3 = build_style_encoder("efficientnet-b3-wikiart27")
    m = build_gated_model("blip2-opt-2.7b", b3, device="meta", **GATING_VARIANTS["control"])
    shift = sum(p.numel() for p in style_query_parameters(m))
    assert shift == (1536 + 1) * 32 * 768                                  # style dim -> 32 query tokens x 768
    rows = {r["role"].strip(): r for r in parameter_table(m)}
    assert rows["style_query"]["trainable"] == shift


def test_pretrained_base_loads_into_every_method(tmp_path, batch):
    blip = load_blip2("tiny-blip2", seed=3)
    plm = AttributePrefixLM(blip, {"color": ["red"], "style": ["dots"]})
    items = [{"image": Image.new("RGB", (20, 20), "red"), "image_file": "a.png", "question": "what color ?",
              "answer": "red", "kind": "color", "style": "dots"}]
    pb = AttributeCollator(ArtVQACollator(load_processor("tiny-blip2"), load_processor("tiny-efficientnet")), plm,
                           {"a.png": {"color": "red", "style": "dots"}})(items)
    prefix_lm_loss(plm, pb).backward()
    assert plm.tables["color"].weight.grad.abs().sum() > 0                 # the prefix is read
    lm = roles(blip)["language_model"]
    path = save_safetensors({k: v.detach() for k, v in blip.named_parameters() if k.startswith(lm + ".")},
                            tmp_path / "lm.safetensors")                   # tied weights once
    for name, kw in GATING_VARIANTS.items():
        m = build_gated_model("tiny-blip2", build_style_encoder(), base_lm=path, **kw)
        for k, v in get_role(m.blip2, "language_model").state_dict().items():
            assert torch.equal(v, get_role(blip, "language_model").state_dict()[k]), (name, k)
