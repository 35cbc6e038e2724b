"""Outside interfaces of mm_research.llava.features (one-pass features, padded batches, exact parity of the
evaluation modes) and of mm_research.llava.vqa's cached base training."""
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from mm_research.inspect import get_role
from mm_research.llava.features import (EVAL_MODES, build_inputs_embeds, encode_images, mode_generate, mode_inputs,
                               mode_logits, parity_report, position_ids_from_mask, select_image_features, soft_prune)
from mm_research.zoo import build_model, load_config, tiny_processor

VARIANTS = [(-2, "default"), (-2, "full"), ([-3, -1], "default"), ([-1, -2, -3], "full")]
PROMPTS = ["<image> what color is the circle ?", "<image> how many shapes are there ?",
           "<image> is the red square on the left or right ?"]


def variant(layer, strategy, seed=0):
    cfg = load_config("tiny-llava")
    cfg.vision_feature_layer, cfg.vision_feature_select_strategy = layer, strategy
    return build_model(cfg, seed=seed), tiny_processor("llava", cfg)


def images(n=3):
    rng = np.random.default_rng(1)
    return [(rng.random((40, 48, 3)) * 255).astype("uint8") for _ in range(n)]


def padded_batch(proc, n=3):
    imgs = images(n)
    b = proc(images=imgs, text=PROMPTS[:n], return_tensors="pt", padding=True)
    assert (b["attention_mask"] == 0).any(1).sum() >= 1, "the batch must contain left padding"
    return b


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: f"{v[0]}-{v[1]}")
def model_and_batch(request):
    m, proc = variant(*request.param)
    return request.param, m, padded_batch(proc)


def test_one_tower_call(model_and_batch):
    _, m, b = model_and_batch
    calls = []
    h = get_role(m, "vision_encoder").register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad(): encode_images(m, b["pixel_values"])
    finally: h.remove()
    assert len(calls) == 1


def test_features_match_transformers(model_and_batch):
    (layer, strategy), m, b = model_and_batch
    with torch.no_grad():
        f = encode_images(m, b["pixel_values"])
        ref = torch.stack(list(m.get_image_features(pixel_values=b["pixel_values"]).pooler_output))
        hs = get_role(m, "vision_encoder")(b["pixel_values"], output_hidden_states=True).hidden_states
    n_layers = 1 if isinstance(layer, int) else len(layer)
    assert f.raw.shape == (3, 16 if strategy == "default" else 17, 32 * n_layers)
    assert torch.equal(f.embeds, ref)
    assert torch.equal(f.embeds, get_role(m, "projector")(f.raw))   # raw and projected come from the same tensors
    first = layer if isinstance(layer, int) else layer[0]            # the features' first block is that layer's state
    expect = hs[first][:, 1:] if strategy == "default" else hs[first]
    assert torch.equal(f.raw[..., :32], expect)


def test_parity_all_modes(model_and_batch):
    _, m, b = model_and_batch
    ref_l, ref_t = mode_logits(m, b, "baseline"), mode_generate(m, b, "baseline", 3)
    assert ref_t.shape == (3, 3)
    for mode in EVAL_MODES:
        assert torch.equal(mode_logits(m, b, mode), ref_l), mode
        assert torch.equal(mode_generate(m, b, mode, 3), ref_t), mode
    rep = parity_report(m, b)
    assert all(r["logits_equal"] and r["tokens_equal"] and r["max_abs_diff"] == 0 for r in rep.values())


def test_baseline_logits_are_the_models_own(model_and_batch):
    _, m, b = model_and_batch
    with torch.no_grad():
        own = m(**b, position_ids=position_ids_from_mask(b["attention_mask"])).logits
    assert torch.equal(mode_logits(m, b, "emb_direct"), own)


def test_generated_first_token_matches_forward(model_and_batch):
    "generate's positions (from the mask) are the ones mode_logits uses: its first token is the forward's argmax."
    _, m, b = model_and_batch
    assert torch.equal(mode_generate(m, b, "emb_direct", 1)[:, 0], mode_logits(m, b, "emb_direct")[:, -1].argmax(-1))


def test_padded_rows_equal_unpadded():
    m, proc = variant(-2, "default")
    b = padded_batch(proc)
    padded_row = int((b["attention_mask"] == 0).any(1).nonzero()[0])
    single = proc(images=[images()[padded_row]], text=[PROMPTS[padded_row]], return_tensors="pt")
    assert torch.equal(single["pixel_values"][0], b["pixel_values"][padded_row])
    n = single["input_ids"].shape[1]
    padded = mode_logits(m, b, "emb_direct")[padded_row, -n:]
    assert torch.allclose(padded, mode_logits(m, single, "emb_direct")[0], atol=1e-5)


def test_image_embeds_land_at_image_tokens():
    m, proc = variant(-2, "default")
    b = padded_batch(proc)
    img = torch.randn(3, 16, 64)
    emb = build_inputs_embeds(m, b["input_ids"], img)
    mask = b["input_ids"] == m.config.image_token_id
    for r in range(3):
        assert torch.equal(emb[r][mask[r]], img[r])
        assert torch.equal(emb[r][~mask[r]], m.get_input_embeddings()(b["input_ids"][r][~mask[r]]))


def test_soft_pruning_scores_apply():
    m, proc = variant(-2, "default")
    b = padded_batch(proc)
    half = torch.ones(3, 16)
    half[:, 8:] = 0
    with torch.no_grad():
        embeds = mode_inputs(m, b, "soft_pruning", scores=half)["inputs_embeds"]
    mask = b["input_ids"] == m.config.image_token_id
    assert (embeds[mask].view(3, 16, -1)[:, 8:] == 0).all() and (embeds[mask].view(3, 16, -1)[:, :8] != 0).any()
    assert not torch.equal(mode_logits(m, b, "soft_pruning", scores=half), mode_logits(m, b, "baseline"))
    x = torch.randn(2, 16, 64)
    assert torch.equal(soft_prune(x, torch.ones(2, 16)), x)


def test_bad_inputs_have_clear_errors():
    m, proc = variant(-2, "default")
    b = padded_batch(proc)
    with pytest.raises(ValueError, match="one too many"):
        build_inputs_embeds(m, b["input_ids"], torch.zeros(3, 17, 64))
    with pytest.raises(ValueError, match="CLS token"):
        soft_prune(torch.zeros(3, 16, 64), torch.ones(3, 17))
    with pytest.raises(ValueError, match="use 'default'"):
        encode_images(m, b["pixel_values"], vision_feature_select_strategy="patch")
    with pytest.raises(ValueError, match="out of range"):
        encode_images(m, b["pixel_values"], vision_feature_layer=[-2, 9])
    with pytest.raises(ValueError, match="Unknown mode 'hard'"):
        mode_inputs(m, b, "hard")
    with pytest.raises(ValueError, match="empty list"):
        select_image_features((torch.zeros(1, 17, 32),), [], "default")


def test_two_tower_calls_are_bitwise_identical_in_eval():
    m, proc = variant(-2, "default")
    pv = padded_batch(proc)["pixel_values"]
    tower = get_role(m, "vision_encoder")
    with torch.no_grad():
        a, b = tower(pv, output_hidden_states=True).hidden_states, tower(pv, output_hidden_states=True).hidden_states
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[-1], a[-2])        # last_hidden_state is not the feature layer


def test_trained_base_is_cached_by_hash_and_selected_on_val(tmp_path):
    from mm_research.llava.vqa import encode_vqa, train_vqa_base
    from mm_research.llava.vqa_data import load_vqa, make_shape_vqa
    from mm_research.zoo import load_processor
    root = make_shape_vqa(tmp_path/"vqa", n_train=64, n_test=16, seed=0)
    proc = load_processor("tiny-llava")
    tr, va, te = (encode_vqa(load_vqa(root, s), proc) for s in ("train", "val", "test"))
    kw = dict(epochs=1, batch_size=32, device="cpu", cache_dir=tmp_path/"cache")
    m1, r1 = train_vqa_base("tiny-llava", tr, va, proc, **kw)
    m2, r2 = train_vqa_base("tiny-llava", tr, va, proc, **kw)
    assert r1["cached"] is False and r2["cached"] is True and r1["key"] == r2["key"]
    assert (tmp_path/"cache"/"llava_vqa_base"/r1["key"]/"model.safetensors").is_file()
    assert r1["selected_on"] == "val"
    assert {k: r1["spec"][k] for k in ("device", "dtype", "mixed_precision", "seed")} == dict(
        device="cpu", dtype="float32", mixed_precision="no", seed=0)
    b = {k: v[:4] for k, v in te.items() if torch.is_tensor(v)}
    assert torch.equal(mode_logits(m1.cpu(), b), mode_logits(m2, b))
    untrained = build_model(load_config("tiny-llava"))
    assert not torch.equal(mode_logits(untrained, b), mode_logits(m2, b))
    # the selection split is part of the key: selecting on test instead would be another (cached) base
    assert train_vqa_base("tiny-llava", tr, te, proc, **kw)[1]["key"] != r1["key"]
    assert train_vqa_base("tiny-llava", tr, va, proc, **dict(kw, seed=1))[1]["key"] != r1["key"]
    _, r3 = train_vqa_base("tiny-llava", tr, va, proc, **dict(kw, epochs=0))
    assert r3["trained"] is False and r3["trainable_params"] == 0 and r3["parameters"] == r1["parameters"]
    with pytest.raises(ValueError, match="has no 'hidden_sizes'"):
        train_vqa_base("tiny-llava", tr, va, proc, **dict(kw, config_overrides={"text_config.hidden_sizes": 3}))
