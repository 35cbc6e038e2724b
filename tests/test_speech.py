"""The speech encoder: strategies, padding-free pooling, tower-only loading (memory), scoped LoRA, and
`mmr run 10_speech` on a local checkpoint."""
import json, os, subprocess, sys, textwrap
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from pathlib import Path
import numpy as np, pytest, torch
from mm_research.zoo import load_model, load_processor, load_config, param_count
from mm_research.inspect import get_role, roles
from mm_research.structure.lora import expected_lora_params, lora_targets
from mm_research.speech.encoder import (SpeechEncoder, KeywordClassifier, add_lora, freeze_for_mode, load_audio_tower,
                                checkpoint_weight_map, choose_strategy, encode_tower, tower_features, masked_mean,
                                audio_processor, classifier_for_mode, speech_setup)

CLIPS = [np.random.default_rng(i).standard_normal(n).astype(np.float32) * .1
         for i, n in enumerate([6000, 13000, 30000])]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-qwen2-audio", device="cpu"), load_processor("tiny-qwen2-audio")


def test_strategies_one_interface(tiny):
    model, proc = tiny
    assert choose_strategy(model) == "audio_tower"
    for strategy, hidden in [("audio_tower", 64), ("full_forward", 64)]:
        enc = SpeechEncoder(model, proc, strategy)
        with torch.no_grad():
            batch, single = enc(**enc.featurize(CLIPS)), enc(**enc.featurize(CLIPS[:1]))
        assert batch.shape == (3, hidden)
        torch.testing.assert_close(single, batch[:1], atol=1e-4, rtol=1e-4)   # alone == padded in a batch


def test_tower_rejects_wrong_length_and_pooling_masks_padding(tiny):
    model, proc = tiny
    tower = get_role(model, "audio_encoder")
    f = tower_features(proc.feature_extractor, CLIPS[:1], 200)
    with pytest.raises(ValueError, match="expects the mel input features to be of length 200"):
        tower(f["input_features"][..., :150])
    with torch.no_grad():
        h, m = encode_tower(tower, **f)
        clean = masked_mean(h, m)
        # garbage in the padded hidden positions must not move the pooled embedding
        h2 = h.clone()
        h2[~m] = 1e3
        torch.testing.assert_close(masked_mean(h2, m), clean)
    assert m.sum().item() == 9                      # 6000 samples -> 37 frames -> 19 after conv -> 9 after pooling


def _shard(model, proc, folder, size="150KB"):
    model.save_pretrained(folder, max_shard_size=size)
    proc.save_pretrained(folder)
    return folder


def test_tower_only_loading_reads_only_tower_shards(tiny, tmp_path):
    model, proc = tiny
    d = _shard(model, proc, tmp_path / "ckpt")
    wm = checkpoint_weight_map(d)
    tower_files = {f for k, f in wm.items() if k.startswith("audio_tower.")}
    for f in set(wm.values()) - tower_files: (d / f).unlink()
    shell = load_audio_tower(str(d), device="cpu")
    tower = get_role(shell, "audio_encoder")
    for k, v in get_role(model, "audio_encoder").state_dict().items(): assert torch.equal(tower.state_dict()[k], v)
    assert sum(p.numel() for p in shell.parameters() if not p.is_meta) == param_count(tower)


def test_tower_only_peak_memory_is_tower_size(tmp_path):
    "A checkpoint whose language model is ~80x the tower: tower-only loading peaks near the tower, not the model."
    from mm_research.zoo import build_model, config_from_dict
    d = load_config("tiny-qwen2-audio").to_dict()
    d["text_config"] = {k: v for k, v in d["text_config"].items() if k != "layer_types"} | dict(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=6)
    m = build_model(config_from_dict(d))
    m.save_pretrained(tmp_path / "ckpt", max_shard_size="20MB")
    tower_bytes = param_count(get_role(m, "audio_encoder")) * 4
    model_bytes = param_count(m) * 4
    def peak(call):
        code = textwrap.dedent(f"""
            import torch
            from mm_research.memory.profiler import MemoryProfiler
            from mm_research.speech.encoder import load_audio_tower
            from mm_research.zoo import load_model
            load_model('{tmp_path / 'ckpt'}', meta=True)   # imports and lazy initialisation, outside the measured phase
            prof = MemoryProfiler('cpu')
            with prof.phase('load'):
                m = {call}('{tmp_path / 'ckpt'}', device='cpu')
                touched = [p.sum() for p in m.parameters() if not p.is_meta]  # page in mmapped weights
            print(prof.records['load'].peak_above_start_bytes)""")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.strip().splitlines()[-1])
    tower_peak, model_peak = peak("load_audio_tower"), peak("load_model")
    assert model_peak > 0.9 * model_bytes, (model_peak, model_bytes)
    assert tower_peak < 0.1 * model_peak, (tower_peak, model_peak, tower_bytes)


def test_lora_scoped_counted_and_all_get_gradients(tiny):
    _, proc = tiny
    enc = SpeechEncoder(load_model("tiny-qwen2-audio", device="cpu"), proc)
    shell = enc.source_model
    expected = expected_lora_params(shell, lora_targets(shell, "audio_encoder", ("q", "k", "v")), 16)
    info = add_lora(enc, r=16, alpha=32, kinds="q,k,v")
    assert info["lora_params"] == expected == 2 * 3 * 16 * (64 + 64)
    lm = roles(shell)["language_model"]
    lora_names = [n for n, _ in shell.named_parameters() if "lora_" in n]
    assert lora_names and not [n for n in lora_names if n.startswith(lm + ".")]
    assert all(".self_attn." in n and "out_proj" not in n for n in lora_names)
    clf = KeywordClassifier(enc, 10)
    freeze_for_mode(clf, "lora")
    batch = {**enc.featurize(CLIPS), "labels": torch.tensor([0, 1, 2])}
    opt = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=1e-2)
    clf.train()
    clf(**batch).loss.backward()
    opt.step()
    opt.zero_grad()
    clf(**batch).loss.backward()
    grads = {n: p.grad for n, p in clf.named_parameters() if "lora_" in n}
    assert len(grads) == 12 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_mmr_run_with_local_checkpoint(tiny, tmp_path, runs):
    """`mmr run 10_speech -p model <dir>` over two seeds and a learning-rate grid: the notebook runs on a saved
    checkpoint, loading the tower from its shards; learning rates are chosen on validation; the summary has
    intervals."""
    from mm_research.runner import run_notebook
    model, proc = tiny
    ckpt = _shard(model, proc, tmp_path / "tiny-qwen2-audio-ckpt")
    params = {"model": str(ckpt), "epochs": 1, "max_train": 100, "modes": "frozen,lora", "device": "cpu",
              "seeds": [0, 1], "lrs": [3e-3, 1e-2]}
    out = run_notebook("10_speech", params=params, run_dir=tmp_path / "run", progress=False)
    m = json.loads((out / "metrics.json").read_text())
    assert m["strategy"] == "audio_tower" and set(m["results"]) == {"frozen", "lora"}
    trials = m["trials"]
    assert len(trials) == 2 * 2 * 2
    for seed in (0, 1):
        for mode in ("frozen", "lora"):
            group = [t for t in trials if t["seed"] == seed and t["mode"] == mode]
            assert sorted(t["lr"] for t in group) == [3e-3, 1e-2]
            chosen = [t for t in group if t["chosen"]]
            assert len(chosen) == 1 and chosen[0]["val_acc"] == max(t["val_acc"] for t in group)  # chosen on validation
            assert "test_acc" not in chosen[0]
            hits = m["test_hits"][mode][seed]
            assert len(hits) == m["data"]["test"]
            assert m["results"][mode]["test_acc_per_seed"][seed] == pytest.approx(np.mean(hits))
            assert m["results"][mode]["lr_per_seed"][seed] == chosen[0]["lr"]
    lora = [t for t in trials if t["mode"] == "lora"][0]
    assert lora["lora_params"] == lora["expected_lora_params"]
    acc = m["summary"]["lora test accuracy"]
    assert acc["n"] == 2 and acc["lo"] <= acc["mean"] <= acc["hi"] and 0 <= acc["mean"] <= 1
    cmp = m["comparisons"]["lora vs frozen"]
    assert cmp["n"] == 2 * m["data"]["test"] and cmp["lo"] <= cmp["diff"] <= cmp["hi"]
    assert {"per_seed", "p_holm", "test"} <= set(cmp) and cmp["test"] in ("seeds", "items")
    assert cmp["verdict"] in ("beats", "loses to", "equivalent", "inconclusive")
    assert m["summary"]["lora - frozen test accuracy"]["mean"] == cmp["diff"]
    assert (out / "speech_modes.png").stat().st_size > 1000
    assert json.loads((out / "params.json").read_text())["model"] == str(ckpt)


def test_empty_clip_is_an_error_and_a_long_clip_warns_before_encoding(tiny):
    model, proc = tiny
    enc = SpeechEncoder(model, proc, "audio_tower")
    with pytest.raises(ValueError, match=r"Clip\(s\) \[1\] of 2 are empty"):
        enc.featurize([CLIPS[0], np.zeros(0, np.float32)])
    long_clip = np.full(16000 * 3, 0.1, np.float32)  # 3 s against the tiny tower's 2 s window
    with pytest.warns(UserWarning, match="longer than the tower's 2 s window and are cut to it"):
        f = enc.featurize([long_clip])
    assert f["feature_attention_mask"].sum().item() == 200  # cut to the window, not dropped


def test_speech_setup_is_the_lora_mode_the_experiment_trains(tiny):
    "The module the memory estimates count for 10_speech trains what the experiment's 'lora' mode trains."
    model, proc = tiny
    setup = speech_setup("tiny-qwen2-audio")
    enc = SpeechEncoder(load_audio_tower("tiny-qwen2-audio", device="cpu"), proc)
    _, n_lora_mode, lora = classifier_for_mode(enc, "lora", 10, seed=0)
    trainable = {n: p.numel() for n, p in setup.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == n_lora_mode == lora["lora_params"] + 2 * 64 + 64 * 10 + 10
    assert all("lora_" in n or n.startswith("head.") for n in trainable)
    real = speech_setup()                                   # Qwen2-Audio-7B on meta: only the tower is a sub-module
    assert all(p.is_meta for p in real.parameters())
    assert sum(p.numel() for n, p in real.named_parameters() if "lora_" not in n and not n.startswith("head.")) \
        == 636_968_960
    fe = audio_processor("qwen2-audio-7b", load_model("qwen2-audio-7b"))
    assert (fe.feature_size, fe.nb_max_frames) == (128, 3000)
