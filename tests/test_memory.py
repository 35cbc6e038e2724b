"Parameter accounting, estimates of the experiments' modules, the phase profiler and the memory report."
import inspect, json, os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from pathlib import Path
import pytest, torch
from torch import nn
from peft import LoraConfig, get_peft_model
from mm_research.memory.accounting import param_summary, param_table, state_bytes
from mm_research.gated.model import gated_setup
from mm_research.memory.estimates import estimate, setup_estimates
from mm_research.pruning.learned import pruning_setup
from mm_research.setups import EXPERIMENT_SETUPS, experiment_setups, trainable_parts
from mm_research.speech.encoder import speech_setup
from mm_research.structure.lora import lora_targets
from mm_research.memory.phase_profile import memory_report, profile, report_text
from mm_research.memory.profiler import MemoryProfiler
from mm_research.zoo import load_model, load_processor

MB = 10**6
TINY = ["tiny-qwen2-audio", "tiny-llava", "tiny-blip2", "tiny-efficientnet"]
EXPERIMENTS = Path(__file__).parents[1] / "nbs" / "experiments"


def test_accounting_matches_peft_on_tower_only_lora():
    base = load_model("tiny-qwen2-audio", device="cpu")
    targets = lora_targets(base, "audio_encoder", kinds=("q", "k", "v"))
    linears = [m for n, m in base.named_modules() if n in set(targets.modules)]
    expected = sum(8 * (m.in_features + m.out_features) for m in linears)   # r * (in + out), r = 8
    pm = get_peft_model(base, LoraConfig(r=8, target_modules=targets.regex))
    trainable, total = pm.get_nb_trainable_parameters()
    s = param_summary(pm)
    assert (s["trainable"], s["total"]) == (trainable, total)
    assert s["trainable"] == expected > 0
    assert s["ratio"] == pytest.approx(trainable / total)
    by_role = {r["role"]: r for r in param_table(pm)}
    assert by_role["audio_encoder"]["trainable"] == expected
    assert by_role["language_model"]["trainable"] == 0
    assert sum(r["total"] for k, r in by_role.items() if k != "total") == total


def test_accounting_on_meta_reference_models_and_by_dtype():
    m = load_model("qwen2-audio-7b", dtype="bf16")
    rows = {r["role"]: r for r in param_table(m)}
    assert rows["audio_encoder"]["total"] == 636_968_960       # shared/reference/facts.md
    assert rows["projector"]["total"] == 5_246_976
    assert rows["total"]["total"] == 8_397_094_912
    assert rows["total"]["bytes"] == 2 * 8_397_094_912
    mixed = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10).to(torch.bfloat16))
    mixed[0].requires_grad_(False)
    by_dtype = {r["dtype"]: r for r in param_table(mixed, by=("dtype",))}
    assert by_dtype["float32"] == {"dtype": "float32", "trainable": 0, "frozen": 110, "total": 110, "ratio": 0.0,
                                   "trainable_bytes": 0, "frozen_bytes": 440, "bytes": 440}
    assert by_dtype["bfloat16"]["trainable_bytes"] == 220
    assert by_dtype["total"]["ratio"] == 0.5


def test_cpu_peak_grows_with_a_known_allocation():
    prof = MemoryProfiler("cpu", interval=0.001)
    with prof.phase("nothing"): pass
    with prof.phase("transient"):
        x = torch.ones(200 * MB // 4)
        del x
    with prof.phase("kept"):
        y = torch.ones(200 * MB // 4)
    r = prof.records
    assert r["transient"].peak_bytes - r["transient"].start_bytes >= 0.8 * 200 * MB
    assert r["transient"].end_bytes - r["transient"].start_bytes < 0.2 * 200 * MB
    assert r["kept"].end_bytes - r["kept"].start_bytes >= 0.8 * 200 * MB
    assert r["nothing"].peak_bytes - r["nothing"].start_bytes < 0.2 * 200 * MB
    del y


def test_state_bytes_counts_storages():
    lin = nn.Linear(20, 30)                      # 630 parameters
    opt = torch.optim.AdamW(lin.parameters())
    lin(torch.randn(2, 20)).sum().backward()
    opt.step()
    got = state_bytes(lin, opt)
    assert got["weights_bytes"] == 630 * 4 and got["gradients_bytes"] == 630 * 4
    assert got["optimizer_bytes"] == 2 * 630 * 4 + 2 * 4   # exp_avg, exp_avg_sq, and a fp32 `step` per tensor


@pytest.mark.parametrize("name", TINY)
def test_estimate_within_10_percent_of_measured(name):
    p = profile(name, device="cpu", phases=("load", "train_step"))
    meas = sum(p.measured[k] for k in ("weights_bytes", "gradients_bytes", "optimizer_bytes"))
    est = sum(p.estimate[k] for k in ("weights_bytes", "gradients_bytes", "optimizer_bytes"))
    assert meas > 0 and abs(est - meas) <= 0.10 * meas, (name, est, meas)
    n_params = sum(q.numel() for q in load_model(name, meta=True).parameters())
    assert p.measured["weights_bytes"] == 4 * n_params        # fp32 on CPU


def test_estimate_arithmetic():
    lin = nn.Linear(100, 50)                     # 5,050 parameters, 2 tensors
    assert estimate(lin, dtype="fp32")["total_bytes"] == 5050 * 16 + 8
    assert estimate(lin, dtype="bf16", trainable_dtype="fp32")["total_bytes"] == 5050 * 16 + 8
    assert estimate(lin, dtype="bf16", master_weights=True)["total_bytes"] == 5050 * 16 + 8
    assert estimate(lin, dtype="bf16", optimizer=None)["total_bytes"] == 5050 * 4
    assert estimate(lin, trainable="none", dtype="bf16")["total_bytes"] == 5050 * 2


def trainable_count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def test_real_size_estimates_count_the_modules_the_experiments_train():
    setups = experiment_setups()
    rows = {r["setup"]: r for r in setup_estimates(setups)}
    for name, m in setups.items():
        assert all(p.is_meta for p in m.parameters()), name
        assert rows[name]["trainable"] == trainable_count(m) > 0, name
        assert rows[name]["total"] == sum(p.numel() for p in m.parameters()), name
    assert rows["10_speech"]["trainable"] == 32 * 4 * 16 * (1280 + 1280) + 2 * 1280 + 1280 * 10 + 10
    assert rows["21_pruning"]["total"] - rows["21_pruning"]["trainable"] == 7_063_427_072
    assert rows["30_gated"]["trainable"] > 100_000_000          # FiLM gates + Q-Former + projector, not gate vectors


def test_setups_are_the_experiments_own():
    "Each experiment's setup is the one beside its code; the parts of each tiny module add up to what it trains."
    assert EXPERIMENT_SETUPS == {"10_speech": speech_setup, "21_pruning": pruning_setup, "30_gated": gated_setup}
    for name, m in experiment_setups(tiny=True, meta=False).items():
        assert sum(trainable_parts(name, m).values()) == trainable_count(m) > 0, name
    assert trainable_parts("10_speech", speech_setup("tiny-qwen2-audio")) == {"LoRA": 2 * 4 * 16 * (64 + 64),
                                                                              "head": 2 * 64 + 64 * 10 + 10}


def test_tiny_estimates_equal_what_the_experiments_train():
    "Each tiny module built as its experiment builds it, with weights, against the estimate of the meta setup."
    from mm_research.gated.model import build_gated_model
    from mm_research.pruning.learned import ScorerTraining, TokenScorer
    from mm_research.speech.encoder import KeywordClassifier, SpeechEncoder, add_lora, freeze_for_mode, load_audio_tower
    from mm_research.speech.data import COMMAND_WORDS
    from mm_research.gated.style import build_style_encoder
    enc = SpeechEncoder(load_audio_tower("tiny-qwen2-audio", device="cpu"), load_processor("tiny-qwen2-audio"))
    add_lora(enc, r=16, alpha=32, kinds="q,k,v,o")
    n_speech = freeze_for_mode(KeywordClassifier(enc, len(COMMAND_WORDS)), "lora")
    llava = load_model("tiny-llava", device="cpu")
    n_pruning = trainable_count(ScorerTraining(llava, TokenScorer.for_model(llava, 64, "attention")))
    n_gated = trainable_count(build_gated_model("tiny-blip2", build_style_encoder("tiny-efficientnet"), True))
    assert estimate(speech_setup("tiny-qwen2-audio", meta=True))["trainable"] == n_speech
    assert estimate(pruning_setup("tiny-llava", meta=True))["trainable"] == n_pruning
    assert estimate(gated_setup("tiny-blip2", "tiny-efficientnet", meta=True))["trainable"] == n_gated


def test_setup_defaults_are_the_experiments_defaults():
    from mm_research.runner import notebook_parameters
    from mm_research.gated.model import DEFAULT_TRAIN_PARTS
    from mm_research.pruning.learned import train_scorer
    default = lambda nb, k: notebook_parameters(EXPERIMENTS / f"{nb}.ipynb")[k]["default"]
    sig = lambda f: {k: v.default for k, v in inspect.signature(f).parameters.items()}
    speech = sig(speech_setup)
    for k in ("lora_rank", "lora_alpha", "targets", "strategy"): assert speech[k] == default("10_speech", k), k
    assert sig(pruning_setup)["question_pool"] == default("21_pruning", "question_pool")
    assert sig(pruning_setup)["hidden"] == sig(train_scorer)["hidden"]
    assert DEFAULT_TRAIN_PARTS == default("30_gated", "train_parts")


def test_bad_inputs():
    prof = MemoryProfiler("cpu")
    with prof.phase("forward"): pass
    with pytest.raises(ValueError, match="already recorded"):
        with prof.phase("forward"): pass
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"): MemoryProfiler("cuda")
    with pytest.raises(ValueError, match="meta device"): MemoryProfiler("meta")
    with pytest.raises(ValueError, match="cannot run a forward pass"): profile(load_model("tiny-llava", meta=True))
    with pytest.raises(ValueError, match="reference preset"): profile("blip2-opt-2.7b")
    with pytest.raises(ValueError, match="Unknown optimizer"): estimate(nn.Linear(2, 2), optimizer="lion")
    with pytest.raises(ValueError, match="Did you mean 'tiny-blip2'"): memory_report("tiny-blip")


def test_memory_report():
    text = report_text(memory_report("llava-1.5-7b"))
    assert "7,063,427,072" in text and "estimate only" in text
    js = json.loads(json.dumps(memory_report("tiny-llava", device="cpu")))
    assert [r["phase"] for r in js["phases"]] == ["load", "forward", "generate", "train_step"]
    assert js["params"]["total"] == sum(p.numel() for p in load_model("tiny-llava", meta=True).parameters())
    assert "by role:" in report_text(js)
