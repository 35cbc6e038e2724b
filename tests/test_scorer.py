"The learned pruner's trainer (mm_research.pruning.learned): argument checks, and a kept set that follows the question."
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from mm_research.llava.features import use_eager_vision
from mm_research.pruning.base import select_tokens
from mm_research.pruning.baselines import CLS
from mm_research.pruning.evaluate import question_groups, question_relevance, shape_relevance_set
from mm_research.pruning.learned import (DEFAULT_KEEP_RATIOS, OBJECTIVES, Learned, ScorerTraining, TokenScorer,
                                         train_scorer)
from mm_research.zoo import build_model, load_config, tiny_processor


@pytest.fixture(scope="module")
def model_data():
    cfg = load_config("tiny-llava")
    m, proc = use_eager_vision(build_model(cfg, seed=0).eval()), tiny_processor("llava", cfg)
    return m, shape_relevance_set(proc, n_images=8, n_questions=3, seed=0, size=32)


@pytest.mark.parametrize("kw,msg", [(dict(objective="kl"), "Unknown objective 'kl'"),
                                    (dict(keep_ratios=[0.25, 1.5]), "keep_ratios must be"),
                                    (dict(keep_ratios=[]), "keep_ratios must be"),
                                    (dict(keep_ratios=0.25), "keep_ratios must be"),
                                    (dict(train_mode="drop"), "Unknown train_mode"),
                                    (dict(distill_weight=-0.5), "distill_weight must be")])
def test_bad_arguments_are_one_line_errors(model_data, tmp_path, kw, msg):
    m, data = model_data
    with pytest.raises(ValueError, match=msg) as e:
        train_scorer(m, data, data, epochs=1, run_dir=tmp_path, device="cpu", **kw)
    assert "\n" not in str(e.value)
    assert not any(tmp_path.iterdir())                      # refused before any work
    assert "logmask" in OBJECTIVES and DEFAULT_KEEP_RATIOS == (0.5, 0.25, 0.11, 0.05)


def test_trained_keep_set_follows_the_question(model_data, tmp_path):
    m, data = model_data
    test_eq = lambda a, b: (a == b) or pytest.fail(f"{a!r} != {b!r}")
    test_eq(len(question_groups(data)), 8)
    scorer, res = train_scorer(m, data, data, keep_ratios=[0.25, 0.11], epochs=1, batch_size=8, run_dir=tmp_path,
                               device="cpu")
    assert {"eval_acc@0.25", "eval_acc@0.11"} <= set(res.history[-1])
    rel = question_relevance(m, data, 0.25, [Learned(scorer), CLS()])
    assert rel["n_images"] == 8 and rel["n_pairs"] == 8 * 3
    assert rel["cls"] == 0.0 and rel["learned"] > 0, rel
    b = {k: data[k] for k in ("pixel_values", "input_ids", "attention_mask")}    # rows 3i..3i+2: image i
    slots = select_tokens(m, b, Learned(scorer), 0.25).slots.view(8, 3, -1)
    moved = [i for i in range(8) if any(not torch.equal(slots[i, 0], slots[i, j]) for j in (1, 2))]
    assert moved, slots                                  # some image keeps different tokens for different questions


def test_legacy_single_ratio_api(model_data):
    m, _ = model_data
    w = ScorerTraining(m, TokenScorer.for_model(m), keep_ratio=0.25, budget_weight=0.0, train_mode="hard")
    assert (w.objective, w.keep_ratios) == ("hard", (0.25,))
