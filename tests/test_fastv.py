"""In-LLM FastV, SparseVLM and VisionZip on the tiny-llava-deep preset (8 LM layers, 144 image tokens): argument
errors, batch-2 generation, the method objects' in-LM contexts."""
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from mm_research.pruning.fastv import FastV, fastv, fastv_keep_count, fastv_prefill_flops
from mm_research.pruning.visionzip import visionzip_embeds, visionzip_selection, visionzip_split
from mm_research.zoo import load_model, load_processor

QUESTIONS = ["<image> what color is the circle ?", "<image> how many shapes are there in the picture ?"]
GEN = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def tiny():
    m, proc = load_model("tiny-llava-deep", device="cpu", seed=1).eval(), load_processor("tiny-llava-deep")
    rng = np.random.default_rng(1)
    imgs = [(rng.random((96, 96, 3)) * 255).astype("uint8") for _ in range(2)]
    batch = proc(images=imgs, text=QUESTIONS, return_tensors="pt", padding=True)
    return m, proc, imgs, batch


@pytest.mark.parametrize("k,r,msg", [(0, 0.5, "in [1, 7]"), (8, 0.5, "in [1, 7]"), (2.0, 0.5, "in [1, 7]"),
                                     (2, 1.0, "[0, 1)"), (2, -0.1, "[0, 1)"), (2, True, "[0, 1)")])
def test_fastv_bad_arguments(tiny, k, r, msg):
    m = tiny[0]
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")) as e:
        with fastv(m, k, r):
            pass
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("k", [0, 8])
def test_fastv_method_refuses_k_outside_the_lm(tiny, k):
    m, _, _, batch = tiny
    with pytest.raises(ValueError, match=r"in \[1, 7\]") as e:
        with FastV(k).lm_context(m, batch, 0.5):
            pass
    assert "\n" not in str(e.value)


def test_fastv_hooks_removed(tiny):
    m, _, _, batch = tiny
    with torch.no_grad():
        ref = m(**batch).logits
        with fastv(m, 2, 0.75):
            assert m(**batch).logits.shape[1] == 153 - 144 + 36
        assert torch.equal(m(**batch).logits, ref)


def test_fastv_generate_batch2(tiny):
    m, proc, imgs, batch = tiny
    n = batch["input_ids"].shape[1]
    with torch.no_grad(), fastv(m, 3, 0.5) as st:
        out = m.generate(**batch, **GEN)
    assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [n + 2] * 3 + [n - 72 + 2] * 5
    assert st.keep.shape == (2, n - 72)
    for i in range(2):
        one = proc(images=imgs[i:i + 1], text=QUESTIONS[i:i + 1], return_tensors="pt")
        with torch.no_grad(), fastv(m, 3, 0.5):
            alone = m.generate(**one, **GEN)
        assert torch.equal(alone.sequences[0, -3:], out.sequences[i, -3:])
    with torch.no_grad(), FastV(3).lm_context(m, batch, 0.5):            # the method object: the same block
        again = m.generate(**batch, **GEN)
    assert torch.equal(again.sequences, out.sequences)
    assert FastV(3).layer_tokens(n, 144, 0.5, 8) == [n] * 3 + [n - 72] * 5


def test_fastv_flops_and_counts():
    assert fastv_keep_count(144, 0.5) == 72
    # LLaVA-1.5-7B: 611 tokens (576 image), K=2, R=50%: the paper's ~45% FLOPs reduction
    full = fastv_prefill_flops(611, 576, 4096, 11008, 32)
    assert 0.44 < 1 - fastv_prefill_flops(611, 576, 4096, 11008, 32, k=2, r=0.5) / full < 0.46


def test_visionzip(tiny):
    m, _, _, batch = tiny
    assert visionzip_split(64, 576) == (54, 10)
    with torch.no_grad():
        z = visionzip_embeds(m, batch["pixel_values"], 32)
        sel = visionzip_selection(m, batch["pixel_values"], 32)
        own = torch.stack(list(m.get_image_features(pixel_values=batch["pixel_values"]).pooler_output))
        assert torch.equal(visionzip_embeds(m, batch["pixel_values"], 144).embeds, own)
    assert (z.n_dominant, z.n_contextual) == (27, 5)
    assert z.embeds.shape == (2, 32, 64) and sel.slots.shape == (2, 32)
    with pytest.raises(ValueError, match="budget must be an int"):
        visionzip_embeds(m, batch["pixel_values"], 0)


def test_sparsevlm(tiny):
    from mm_research.pruning.sparsevlm import sparsevlm
    m, _, _, batch = tiny
    n = batch["input_ids"].shape[1]
    with pytest.raises(ValueError, match="must increase") as e:
        with sparsevlm(m, [4, 2], [72, 36]):
            pass
    assert "\n" not in str(e.value)
    with torch.no_grad(), sparsevlm(m, [2, 5], [72, 18]) as st:
        out = m.generate(**batch, **GEN)
    assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == \
        [n + 2] * 2 + [n - 72 + 2] * 3 + [n - 126 + 2] * 3
    assert [k.shape[1] for k in st.keeps] == [n, n - 72, n - 126]
