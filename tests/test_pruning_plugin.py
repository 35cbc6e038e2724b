"""A pruning method plugged in through the public API only (`register_pruner`) reaches the experiment's every stage:
the registry and `experiment_methods`, the accuracy sweep, the cost table and the figures; then it is unregistered."""
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataclasses import dataclass
from typing import ClassVar

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from mm_research.llava.features import mode_logits, vision_pass
from mm_research.llava.vqa import answer_tokens
from mm_research.pruning.base import PruningMethod, Selection, apply_selection, pruned_logits, select_tokens
from mm_research.pruning.cost import cost_table, frontier_figure, prepare_model, synthetic_batch
from mm_research.pruning.evaluate import (candidate_ids, hit_rates, images_from_pixels, kept_tokens_figure,
                                          pruning_accuracy_figure, sweep_hits)
from mm_research.pruning.harness import PRUNER_NAMES, PRUNERS, experiment_methods, register_pruner
from mm_research.pruning.learned import untrained_scorer
from mm_research.zoo import load_model, load_processor

SCORING_FLOPS = 12_345           # what the plug-in declares its scoring costs, whatever the case
RATIOS = (1.0, 0.25)             # 16 image tokens: all of them, then 4 (the first row of the 4 x 4 patch grid)
QUESTIONS = ["<image> what color is the circle ?", "<image> how many shapes are there ?",
             "<image> is the red square on the left or right ?"]


@dataclass(frozen=True)
class FirstTokens(PruningMethod):
    "A throw-away plug-in: keeps the first k image tokens (top-left first), scoring said to cost a constant."
    name: ClassVar[str] = "first_tokens"

    def scores(self, model, batch, vp, generator=None):
        B, T = vp.embeds.shape[:2]
        return torch.arange(T, 0, -1, dtype=torch.float, device=vp.embeds.device).expand(B, -1)

    def scoring_flops(self, model, n_tokens, n_image, keep_ratio, tokens, batch=1): return SCORING_FLOPS


@pytest.fixture(scope="module")
def plugin():
    "FirstTokens registered for this module's tests, popped from the registry afterwards."
    before = list(PRUNER_NAMES)
    assert "first_tokens" not in before
    yield register_pruner(FirstTokens)
    PRUNERS.pop("first_tokens")
    assert list(PRUNER_NAMES) == before


@pytest.fixture(scope="module")
def tiny():
    "The tiny-llava preset (2 LM layers, 16 image tokens) and a left-padded VQA batch of three with answers."
    m, proc = load_model("tiny-llava", device="cpu").eval(), load_processor("tiny-llava")
    rng = np.random.default_rng(0)
    imgs = [(rng.random((32, 32, 3)) * 255).astype("uint8") for _ in range(3)]
    b = dict(proc(images=imgs, text=QUESTIONS, return_tensors="pt", padding=True))
    toks, mask = answer_tokens(proc.tokenizer, ["red", "two", "left"])
    data = dict(b, answer_ids=toks[:, 0], answer_tokens=toks, answer_mask=mask, types=["color", "count", "side"])
    return m, proc, data


@pytest.fixture(scope="module")
def sweep(plugin, tiny):
    "Sweep hits of every compared method (the plug-in among them, as the experiment builds them)."
    m, proc, data = tiny
    methods = experiment_methods("all", fastv_ks=(1,), scorer=untrained_scorer(m))
    candidates = candidate_ids(proc.tokenizer, {"color": ["red", "blue"], "count": ["one", "two", "three"]})
    return methods, sweep_hits(m, data, methods, RATIOS, candidates=candidates, batch_size=2)


@pytest.fixture(scope="module")
def costs(plugin, tiny):
    "Cost rows of the plug-in alone (the baseline comes itself) on a batch of two."
    m, proc, _ = tiny
    return cost_table(prepare_model(m, "cpu"), [synthetic_batch(proc, 2)], [FirstTokens()], RATIOS, new_tokens=2,
                      reps=1, warmup=0, progress=False)


def test_registered_like_a_builtin(plugin):
    assert plugin is FirstTokens and PRUNERS["first_tokens"] is FirstTokens
    assert "first_tokens" in PRUNER_NAMES and list(PRUNER_NAMES)[-1] == "first_tokens"   # the live view
    methods = experiment_methods("all")
    assert FirstTokens() in methods and methods[-1].label == "first_tokens"
    assert experiment_methods("first_tokens") == [FirstTokens()]
    with pytest.raises(ValueError, match="no PruningMethod subclass with a name"): register_pruner(PruningMethod)


def test_keeps_the_first_tokens(plugin, tiny):
    m, _, data = tiny
    sel = select_tokens(m, data, FirstTokens(), 0.25)
    assert torch.equal(sel.slots, torch.arange(4).expand(3, -1))
    vp = vision_pass(m, data["pixel_values"])
    by_hand = Selection(vp.embeds[:, :4], torch.arange(4).expand(3, -1), None)
    with torch.no_grad():
        ref = m(**apply_selection(m, data, by_hand, "hard", "original")).logits
        assert torch.equal(pruned_logits(m, data, FirstTokens(), 0.25, "hard", "original")[0], ref)


def test_in_the_accuracy_sweep(sweep, tiny):
    methods, hits = sweep
    assert methods[-1] == FirstTokens()
    for st in ("soft", "hard/original", "hard/renumber"):
        for r in RATIOS: assert (st, "first_tokens", r) in hits
        for a, b in zip(hits[st, "first_tokens", 1.0], hits["baseline"]):      # keep-all parity, exact and likelihood
            assert torch.equal(a, b), st
    m, _, data = tiny
    with torch.no_grad():                           # the sweep's baseline is the unpruned model's
        assert torch.equal(pruned_logits(m, data, FirstTokens(), 1.0, "soft")[0], mode_logits(m, data, "baseline"))


def test_in_the_cost_table(costs, tiny):
    rows = {(r["method"], r["keep_ratio"]): r for r in costs}
    assert set(rows) == {("none", 1.0), ("first_tokens", 1.0), ("first_tokens", 0.25)}
    n = rows["none", 1.0]["prompt_tokens"]
    assert rows["none", 1.0]["image_tokens"] == 16
    r = rows["first_tokens", 0.25]
    assert r["layer_tokens"] == r["kv_tokens"] == [n - 16 + 4] * 2        # text + padding, then 4 of 16 image tokens
    assert r["kv_ratio"] == (n - 12) / n and rows["first_tokens", 1.0]["kv_ratio"] == 1.0
    assert r["flops"]["scoring"] == rows["first_tokens", 1.0]["flops"]["scoring"] == SCORING_FLOPS
    assert rows["none", 1.0]["flops"]["scoring"] == 0
    assert r["flops"]["total"] == r["flops"]["vision"] + SCORING_FLOPS + r["flops"]["prefill"]


def test_in_the_figures(sweep, costs, tiny):
    m, proc, data = tiny
    acc = hit_rates(sweep[1])
    fig = pruning_accuracy_figure(acc, "hard/original", 16)
    assert "first_tokens" in [c.get_label() for c in fig.axes[0].containers]
    plt.close(fig)

    ip = proc.image_processor
    images = images_from_pixels(data["pixel_values"], ip.image_mean, ip.image_std)
    fig = kept_tokens_figure(m, data, images, [FirstTokens()], keep_ratio=0.25, questions=QUESTIONS)
    col = fig.axes[1]                                   # row 0: the image, then the plug-in's column
    assert col.get_title() == "first_tokens"
    shown = np.asarray(col.images[0].get_array())
    assert np.allclose(shown[:8], images[0][:8]) and np.allclose(shown[8:], 0.25 * images[0][8:])  # 1st patch row
    plt.close(fig)

    accuracies = {("none", 1.0): acc["baseline"]["exact"],
                  **{("first_tokens", r): acc["hard/original"]["first_tokens"][str(r)]["exact"] for r in RATIOS}}
    fig = frontier_figure(costs, accuracies)
    assert [c.get_label() for c in fig.axes[0].containers] == ["none", "first_tokens"]
    plt.close(fig)
