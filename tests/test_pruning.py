"Vision-token pruning (the method objects, the harness, the sweep, the scorer): keep-all parity, keep sets, FLOPs."
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from mm_research.inspect import get_role
from mm_research.llava.features import (image_token_mask, mode_logits, position_ids_from_mask, use_eager_vision,
                                        vision_pass)
from mm_research.pruning.base import (SETTINGS, apply_selection, keep_count, kept_slots, method_settings, parse_setting,
                                      pruned_logits, pruned_prompt, select_tokens, topk_selection)
from mm_research.pruning.baselines import CLS, KeepAll, Pool, Random, RandomLM, pool_selection
from mm_research.pruning.evaluate import (answer_hits, compare_pruners, format_accuracy, generated_answers, hit_rates,
                                          pruning_accuracy_figure, seed_rates, sweep_accuracy, sweep_hits)
from mm_research.pruning.fastv import FastV, FastVInput
from mm_research.pruning.harness import PRUNERS, experiment_methods
from mm_research.pruning.learned import Learned, ScorerTraining, TokenScorer, train_scorer
from mm_research.pruning.prefill import counted_flops, lm_prefill_flops
from mm_research.pruning.sparsevlm import SparseVLM
from mm_research.pruning.visionzip import VisionZip
import scipy.stats
from mm_research.zoo import build_model, load_config, override_config, tiny_processor

QUESTIONS = ["<image> what color is the circle ?", "<image> how many shapes are there ?",
             "<image> is the red square on the left or right ?"]


def tiny(layer=-2, strategy="default", eager=True, seed=0, lm_layers=2):
    cfg = override_config(load_config("tiny-llava"), {"text_config.num_hidden_layers": lm_layers})
    cfg.vision_feature_layer, cfg.vision_feature_select_strategy = layer, strategy
    m = build_model(cfg, seed=seed).eval()
    return (use_eager_vision(m) if eager else m), tiny_processor("llava", cfg)


def make_batch(proc, n=3, seed=0, questions=QUESTIONS):
    rng = np.random.default_rng(seed)
    imgs = [(rng.random((32, 32, 3)) * 255).astype("uint8") for _ in range(n)]
    b = dict(proc(images=imgs, text=(questions * n)[:n], return_tensors="pt", padding=True))
    assert (b["attention_mask"] == 0).any()          # at least one left-padded row
    return b


def every_method(model, k=1):
    "One config of every registered method for `model` (FastV and its input ablation at layer k, a fresh scorer)."
    own = {"learned": Learned(TokenScorer.for_model(model)), "fastv": FastV(k), "fastv_input": FastVInput(k),
           "random_lm": RandomLM(k)}
    variants = [FastV(k, reprune=True), VisionZip(authors=False), SparseVLM(recycle=False, budget="final")]
    return [own[n] if n in own else cls() for n, cls in PRUNERS.items()] + variants


def runs_in(method, setting):
    "Whether the sweep runs `method` in `setting`: in-LM methods and those with own positions in the headline only."
    return setting in method_settings(method, SETTINGS)


@pytest.fixture(scope="module")
def model_batch():
    m, proc = tiny()
    return m, proc, make_batch(proc)


@pytest.mark.parametrize("setting", SETTINGS)
def test_keep_all_parity_every_pruner(model_batch, setting):
    m, _, b = model_batch
    with torch.no_grad(): ref = mode_logits(m, b, "baseline")
    methods = every_method(m)
    assert {x.name for x in methods} >= {"learned", "fastv", "visionzip", "sparsevlm", "cls", "random", "pool",
                                         "fastv_input", "keep_all"}
    for method in [x for x in methods if runs_in(x, setting)]:
        lg, sel = pruned_logits(m, b, method, 1.0, *parse_setting(setting))
        assert torch.equal(lg, ref), (method.label, setting, (lg - ref).abs().max().item())
        assert torch.equal(sel.slots, torch.arange(16).expand(3, -1)), method.label


@pytest.mark.parametrize("layer,strategy,eager",
                         [([-3, -1], "default", True), (-2, "default", False), (-2, "full", True)])
def test_keep_all_parity_variants(layer, strategy, eager):
    m, proc = tiny(layer, strategy, eager)
    b = make_batch(proc)
    with torch.no_grad(): ref = mode_logits(m, b, "baseline")
    skip = {"pool", "visionzip"} if strategy == "full" else set()       # 17 tokens: no square grid, CLS kept
    if not isinstance(layer, int): skip.add("visionzip")                # VisionZip merges one feature layer
    for method in [x for x in every_method(m) if x.name not in skip]:
        for mode in (("hard",) if method.cut == "lm" or method.positions else ("soft", "hard")):
            lg, _ = pruned_logits(m, b, method, 1.0, mode)
            assert torch.equal(lg, ref), (layer, strategy, eager, method.label, mode)


def test_keep_all_keeps_everything_at_any_ratio(model_batch):
    m, _, b = model_batch
    with torch.no_grad(): ref = mode_logits(m, b, "baseline")
    for r in (0.5, 0.11):
        assert torch.equal(select_tokens(m, b, KeepAll(), r).slots, torch.arange(16).expand(3, -1))
        for mode in ("soft", "hard"):
            assert torch.equal(pruned_logits(m, b, KeepAll(), r, mode)[0], ref)


def test_one_tower_pass_when_eager(model_batch):
    m, _, b = model_batch
    calls = []
    h = get_role(m, "vision_encoder").register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad(): vp = vision_pass(m, b["pixel_values"], cls_attention=True)
    finally:
        h.remove()
    assert len(calls) == 1 and vp.cls_attention.shape == (3, 16)


def test_hard_pruning_shapes_and_positions(model_batch):
    m, _, b = model_batch
    L = b["input_ids"].shape[1]
    sel = select_tokens(m, b, Random(), 0.25, generator=torch.Generator().manual_seed(0))
    orig = apply_selection(m, b, sel, "hard", "original")
    ren = apply_selection(m, b, sel, "hard", "renumber")
    assert orig["inputs_embeds"].shape == (3, L - 12, 64)
    assert torch.equal(orig["attention_mask"].sum(1), b["attention_mask"].sum(1) - 12)
    assert (orig["attention_mask"].diff(dim=1) >= 0).all()                     # padding still in front
    full_pos = position_ids_from_mask(b["attention_mask"])
    for i in range(3):
        real = orig["attention_mask"][i].bool()
        assert ren["position_ids"][i][real].tolist() == list(range(int(real.sum())))
        assert orig["position_ids"][i][real][-1] == full_pos[i][-1]            # last token keeps its position
        assert orig["position_ids"][i][real].diff().min() >= 1                 # increasing, with gaps


def test_soft_pruning_zeroes_dropped_image_tokens(model_batch):
    m, _, b = model_batch
    sel = select_tokens(m, b, CLS(), 0.5)
    soft = apply_selection(m, b, sel, "soft")
    zero = soft["inputs_embeds"].abs().sum(-1) == 0
    assert int(zero[image_token_mask(m, b["input_ids"])].sum()) == 3 * 8
    assert torch.equal(soft["attention_mask"], b["attention_mask"])


def test_selection_helpers():
    assert [keep_count(16, r) for r in (1.0, 0.5, 0.25, 0.11)] == [16, 8, 4, 2]
    assert [keep_count(576, r) for r in (0.25, 0.1, 0.05)] == [144, 58, 29]
    e = torch.arange(16, dtype=torch.float).reshape(1, 16, 1)
    s = topk_selection(e, e[..., 0], 2)
    assert s.slots.tolist() == [[14, 15]]
    p = pool_selection(e, 4)
    assert p.embeds[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5] and p.slots.tolist() == [[0, 2, 8, 10]]
    for bad in (0, 1.2, True, "0.5"):
        with pytest.raises(ValueError, match=r"\(0, 1\]"): keep_count(16, bad)


def test_errors_name_the_fix(model_batch):
    m, _, b = model_batch
    sel = select_tokens(m, b, Pool(), 0.5)
    with pytest.raises(ValueError, match="needs a trained TokenScorer"): select_tokens(m, b, Learned(), 0.5)
    with pytest.raises(ValueError, match="Unknown mode"): apply_selection(m, b, sel, "drop")
    with pytest.raises(ValueError, match="Unknown position_policy"): apply_selection(m, b, sel, "hard", "shift")
    with pytest.raises(ValueError, match="Unknown setting"): parse_setting("soft/renumber")
    for bad in ("fast", "fastv_k0", "fastv_k1", "FastV", "attention", "topk"):     # names of classes only, no K
        with pytest.raises(ValueError, match=f"Unknown pruner '{bad}'"): experiment_methods(bad)
    with pytest.raises(ValueError, match="use setting 'hard/original'"): pruned_prompt(m, b, SparseVLM(), 0.5, "soft")
    for k in (0, 2):                                                        # K=0, and K=2 on a 2-layer LM
        with pytest.raises(ValueError, match=r"in \[1, 1\]"):
            with pruned_prompt(m, b, FastV(k), 0.5)[1]: pass
    with pytest.raises(ValueError, match="add it to settings"): sweep_hits(m, b, [FastV(1)], settings=["soft"])
    m2, proc2 = tiny([-3, -1])
    with pytest.raises(ValueError, match="strategy 'default'"):            # VisionZip merges one feature layer
        select_tokens(m2, make_batch(proc2), VisionZip(), 0.5)


def test_flops_analytic_matches_counter(model_batch):
    m, _, b = model_batch
    cfg = load_config("tiny-llava").text_config
    # hand count, 20 tokens: q,o 327,680; k,v 163,840; attention 102,400; MLP 983,040 per layer; head 31,616
    assert lm_prefill_flops(cfg, 20) == 2 * (327_680 + 163_840 + 102_400 + 983_040) + 31_616
    for r in (1.0, 0.25):
        inputs = apply_selection(m, b, select_tokens(m, b, CLS(), r), "hard")
        B, n = inputs["inputs_embeds"].shape[:2]
        assert counted_flops(m, inputs) == lm_prefill_flops(cfg, n, B)


def test_sweep_keep_all_row_is_baseline(model_batch):
    m, proc, b = model_batch
    from mm_research.llava.vqa import answer_tokens
    toks, mask = answer_tokens(proc.tokenizer, ["red", "two", "top left"])
    data = dict(b, answer_ids=toks[:, 0], answer_tokens=toks, answer_mask=mask, types=["color", "count", "corner"])
    methods = experiment_methods("all", fastv_ks=(1,), scorer=TokenScorer.for_model(m))
    labels = ["learned", "fastv_k1", "fastv_k1_reprune", "visionzip", "sparsevlm", "cls", "random", "pool",
              "random_lm_k1"]
    assert [x.label for x in methods] == labels
    acc = sweep_accuracy(m, data, methods, keep_ratios=(1.0, 0.5), batch_size=2)     # SparseVLM cannot reach 0.5
    ratios = {x.label: [1.0] if x.name == "sparsevlm" else [1.0, 0.5] for x in methods}
    assert sweep_accuracy(m, data, methods, keep_ratios=ratios, batch_size=2) == acc          # the same, per label
    for st in SETTINGS:
        for x in [x for x in methods if runs_in(x, st)]:
            assert acc[st][x.label]["1.0"] == {k: acc["baseline"][k] for k in ("exact", "likelihood")}
        assert set(acc[st]) == {x.label for x in methods if runs_in(x, st)}
    assert set(acc["soft"]) == set(labels) - {"fastv_k1", "fastv_k1_reprune", "sparsevlm", "random_lm_k1", "visionzip"}
    assert set(acc["hard/original"]["sparsevlm"]) == {"1.0"} and "0.5" in acc["hard/original"]["fastv_k1_reprune"]
    hits = sweep_hits(m, data, [KeepAll()], (1.0, 0.25, 0.11), batch_size=2)
    assert all(torch.equal(a, b) for k in hits for a, b in zip(hits[k], hits["baseline"]))


def test_scorer_trains_llava_frozen(tmp_path, model_batch):
    m, proc, b = model_batch
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ans = torch.tensor(proc.tokenizer.convert_tokens_to_ids(["red", "two", "left"]))
    data = {**{k: torch.cat([b[k]] * 4) for k in ("pixel_values", "input_ids", "attention_mask")},
            "answer_ids": ans.repeat(4)}
    scorer, res = train_scorer(m, data, data, epochs=1, batch_size=4, run_dir=tmp_path, device="cpu")
    assert res.history and "eval_acc" in res.history[-1]
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())   # the LLaVA did not move
    w = ScorerTraining(m, TokenScorer.for_model(m)).train()
    assert not m.training                                                      # stays in eval mode while training
    loss = w(b["pixel_values"], b["input_ids"], b["attention_mask"], ans)
    loss.backward()
    assert all(p.grad is None for p in m.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in w.scorer.parameters())


def test_hard_training_loss_is_hard_pruning_loss(model_batch):
    m, proc, b = model_batch
    ans = torch.tensor(proc.tokenizer.convert_tokens_to_ids(["red", "two", "left"]))
    w = ScorerTraining(m, TokenScorer.for_model(m), keep_ratio=0.25, budget_weight=0.0, train_mode="hard").eval()
    with torch.no_grad():
        lg, _ = pruned_logits(m, b, Learned(w.scorer), 0.25, "hard", "original", logits_to_keep=1)
        loss = w(b["pixel_values"], b["input_ids"], b["attention_mask"], ans)
    assert abs(loss.item() - torch.nn.functional.cross_entropy(lg[:, -1], ans).item()) < 1e-4
    with pytest.raises(ValueError, match="Unknown train_mode"):
        ScorerTraining(m, TokenScorer.for_model(m), train_mode="x")


def fake_hits(seed_hits: dict) -> dict:
    "Sweep-shaped hits: 'baseline' and ('hard/original', pruner, 0.5), exact and likelihood the same."
    t = lambda h: (torch.tensor(h, dtype=torch.bool),) * 2
    return {"baseline": t(seed_hits["baseline"]), **{("hard/original", p, 0.5): t(h) for p, h in seed_hits.items()
                                               if p != "baseline"}}


def test_compare_pruners_is_paired_over_seeds_and_items():
    rng = np.random.default_rng(0)
    seeds = []
    for _ in range(3):
        cls = rng.random(200) < 0.6
        learned = cls | (rng.random(200) < 0.3)                      # right wherever cls is, and more
        seeds.append(fake_hits({"baseline": cls.tolist(), "learned": learned.tolist(), "cls": cls.tolist(),
                                "random": learned.tolist()}))
    rows = {r["other"]: r for r in compare_pruners(seeds, "hard/original", "learned", ("cls", "random"), n_boot=500)}
    assert rows["cls"]["verdict"] == "beats" and rows["cls"]["lo"] > 0 and rows["cls"]["seeds"] == 3
    assert rows["random"]["verdict"] == "inconclusive" and rows["random"]["diff"] == 0   # no margin: never "same"
    a = torch.cat([s["hard/original", "learned", 0.5][0] for s in seeds]).float().numpy()
    b = torch.cat([s["hard/original", "cls", 0.5][0] for s in seeds]).float().numpy()
    d = [(a - b)[i * 200:(i + 1) * 200].mean() for i in range(3)]           # by hand: one difference per seed
    t = scipy.stats.ttest_1samp(d, 0)
    assert np.allclose(rows["cls"]["per_seed"], d) and np.isclose(rows["cls"]["p"], t.pvalue)
    ci = t.confidence_interval(0.95)
    assert np.isclose(rows["cls"]["lo"], ci.low) and np.isclose(rows["cls"]["hi"], ci.high)
    assert np.isclose(rows["cls"]["p_holm"], min(1, 2 * min(rows["cls"]["p"], rows["random"]["p"])))
    assert rows["cls"]["n"] == 600


def test_seed_rates_tables_and_figure():
    accs = [hit_rates(fake_hits({"baseline": [1, 1, 0, 0], "learned": h, "cls": [1, 0, 0, 0]}))
            for h in ([1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0])]
    acc = seed_rates(accs)
    learned = acc["hard/original"]["learned"]["0.5"]["exact"]
    assert learned["n"] == 3 and abs(learned["mean"] - 0.5) < 1e-12 and learned["lo"] < 0.5 < learned["hi"]
    assert acc["baseline"]["n"] == 12 and acc["baseline"]["exact"]["mean"] == 0.5
    assert "0.500 [" in format_accuracy(acc, "hard/original", 16)
    fig = pruning_accuracy_figure(acc, "hard/original", 16)
    assert len(fig.axes[0].containers) == 2 and all(c.has_yerr for c in fig.axes[0].containers)


def test_scorer_best_epoch_is_chosen_on_validation(tmp_path, model_batch):
    m, proc, b = model_batch
    ans = torch.tensor(proc.tokenizer.convert_tokens_to_ids(["red", "two", "left"]))
    data = {**{k: torch.cat([b[k]] * 4) for k in ("pixel_values", "input_ids", "attention_mask")},
            "answer_ids": ans.repeat(4)}
    val = {k: v[:6] for k, v in data.items()}
    runs = [train_scorer(m, data, val, epochs=2, batch_size=4, run_dir=tmp_path/str(i), device="cpu", seed=3)
            for i in range(2)]
    (scorer, res), (again, _) = runs
    accs = [h["eval_acc"] for h in res.history]
    assert res.best["eval_acc"] == max(accs) and len(accs) == 2
    assert all(torch.equal(x, y) for x, y in zip(scorer.state_dict().values(), again.state_dict().values()))


@pytest.fixture(scope="module")
def deep_batch():
    "A 4-layer LM (FastV at K=2 has layers before and after its cut) and a left-padded batch of two."
    m, proc = tiny(lm_layers=4)
    b = make_batch(proc, n=2, seed=1, questions=QUESTIONS[::2])
    from mm_research.llava.vqa import answer_tokens
    toks, mask = answer_tokens(proc.tokenizer, ["red", "top left"])
    return m, dict(b, answer_ids=toks[:, 0], answer_tokens=toks, answer_mask=mask, types=["color", "corner"])


def test_in_llm_pruners_at_batch_two_through_the_scoring_path(deep_batch):
    m, data = deep_batch
    base = answer_hits(m, pruned_prompt(m, data, KeepAll(), 1.0)[0], data, data["types"], {})
    with torch.no_grad(): ref = m(**pruned_prompt(m, data, FastV(), 1.0)[0]).logits
    for p in (FastV(), FastV(3), SparseVLM(recycle=False, budget="final"), RandomLM()):
        inputs, ctx = pruned_prompt(m, data, p, 1.0)
        with torch.no_grad(), ctx: assert torch.equal(m(**inputs).logits, ref), p        # keep 1.0: R = 0, exact
        inputs, ctx = pruned_prompt(m, data, p, 1.0)
        assert all(torch.equal(a, b) for a, b in zip(answer_hits(m, inputs, data, data["types"], {}, ctx), base))
        # teacher-forced hit == greedy generate hit: the tokens generate gives in the context are exact hits
        inputs, ctx = pruned_prompt(m, data, p, 0.25)
        toks, mask = generated_answers(m, inputs, ctx, max_new_tokens=3)
        inputs, ctx = pruned_prompt(m, data, p, 0.25)
        forced = dict(data, answer_tokens=toks, answer_mask=mask)
        assert answer_hits(m, inputs, forced, data["types"], {}, ctx)[0].tolist() == [True, True], p
        toks2 = toks.clone()
        toks2[1, 0] = (toks[1, 0] + 1) % 200
        inputs, ctx = pruned_prompt(m, data, p, 0.25)
        hits = answer_hits(m, inputs, dict(forced, answer_tokens=toks2), data["types"], {}, ctx)[0]
        assert hits.tolist() == [True, False], p.label


def test_fastv_cache_and_keep_sets_through_pruned_prompt(deep_batch):
    m, data = deep_batch
    L = data["input_ids"].shape[1]                        # 16 image tokens; keep 0.5: 8 of them after layer 2
    inputs, ctx = pruned_prompt(m, data, FastV(), 0.5)
    with torch.no_grad(), ctx as st: out = m(**inputs, use_cache=True)
    assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [L, L, L - 8, L - 8]
    sel = select_tokens(m, data, FastV(), 0.5)            # FastV's keep set = the top 8 of its layer-2 signal
    assert torch.equal(sel.slots, kept_slots(st))
    inputs, ctx = pruned_prompt(m, data, SparseVLM(layers=(2, 3), recycle=False, budget="final"), 0.25)   # 8, then 4
    with torch.no_grad(), ctx as st: out = m(**inputs, use_cache=True)
    assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [L, L, L - 8, L - 12]
