"""The presets: exact sizes of the real architectures on meta, and working tiny twins."""
import numpy as np
import pytest
import torch

from mm_research.zoo import PRESETS, load_config, load_model, load_processor, param_count

# Published figures (shared/reference/facts.md), typed from the source, not computed by this code.
REFERENCE_COUNTS = {"qwen2-audio-7b": 8_397_094_912, "llava-1.5-7b": 7_063_427_072,
                    "blip2-opt-2.7b": 3_744_679_936, "efficientnet-b3-wikiart27": 10_737_731}


@pytest.mark.parametrize("name", list(REFERENCE_COUNTS))
def test_reference_preset_builds_on_meta_with_exact_count(name):
    model = load_model(name)
    assert param_count(model) == REFERENCE_COUNTS[name]
    assert all(p.device.type == "meta" for p in model.parameters())
    assert type(model).__name__ == PRESETS[name].model_class


def _inputs(name, proc):
    rng = np.random.default_rng(0)
    img = (rng.random((48, 40, 3)) * 255).astype("uint8")
    if name == "tiny-qwen2-audio":
        wavs = [rng.standard_normal(n).astype("float32") * 0.1 for n in (16000, 8000)]
        return proc(text=["<|audio_bos|><|AUDIO|><|audio_eos|> say"] * 2, audio=wavs, sampling_rate=16000,
                    return_tensors="pt", padding=True)
    if name.startswith("tiny-llava"):
        return proc(images=[img, img], text=["<image> what color ?", "<image> where is the red circle ?"],
                    return_tensors="pt", padding=True)
    if name == "tiny-blip2":
        return proc(images=[img, img], text=["what style ?", "what color is it ?"], return_tensors="pt", padding=True)
    return proc(images=[img, img], return_tensors="pt")


@pytest.mark.parametrize("name", ["tiny-qwen2-audio", "tiny-llava", "tiny-llava-deep", "tiny-blip2",
                                  "tiny-efficientnet"])
def test_tiny_preset_forward_and_generate(name):
    model, proc = load_model(name, device="cpu"), load_processor(name)
    assert type(model).__name__ == PRESETS[name].model_class
    inputs = _inputs(name, proc)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[0] == 2 and torch.isfinite(logits).all()
    if name != "tiny-efficientnet":
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert out.shape == (2, inputs["input_ids"].shape[1] + 4)


def test_preset_builds_are_seeded():
    a, b = load_model("tiny-llava", device="cpu"), load_model("tiny-llava", device="cpu")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    c = load_model("tiny-llava", device="cpu", seed=1)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_local_checkpoint_goes_through_from_pretrained(tmp_path):
    model = load_model("tiny-qwen2-audio", device="cpu")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    again = load_model(str(tmp_path), device="cpu")
    for (n, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), n


def test_dtype_and_meta_options():
    assert next(load_model("tiny-efficientnet", device="cpu", dtype="bf16").parameters()).dtype == torch.bfloat16
    assert all(p.is_meta for p in load_model("tiny-llava", meta=True).parameters())


@pytest.mark.parametrize("bad, message", [
    ("tiny-lava", "Did you mean 'tiny-llava'"),
    ("no-such-model", "Presets: qwen2-audio-7b"),
    ("someorg/not-cached-anywhere", "hub could not be reached"),
])
def test_unknown_model_is_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_model(bad, device="cpu")


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        load_config(tmp_path)


def test_bad_device_and_dtype_are_clear_errors():
    with pytest.raises(ValueError, match="Unknown dtype"):
        load_model("tiny-efficientnet", device="cpu", dtype="float8")
    with pytest.raises(ValueError, match="Unknown device"):
        load_model("tiny-efficientnet", device="tpu")


def test_deep_llava_preset_is_in_pruning_regime():
    "tiny-llava-deep: the tiny-llava classes and widths, an 8-layer LM and 144 image tokens per image."
    cfg, small = load_config("tiny-llava-deep"), load_config("tiny-llava")
    assert type(cfg) is type(small) and PRESETS["tiny-llava-deep"].model_class == PRESETS["tiny-llava"].model_class
    assert (cfg.text_config.num_hidden_layers, cfg.text_config.hidden_size) == (8, 64)
    vc = cfg.vision_config
    assert (vc.image_size, vc.patch_size, vc.num_hidden_layers) == (96, 8, 4)
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-2, "default")
    proc = load_processor("tiny-llava-deep")
    x = proc(images=[np.zeros((96, 96, 3), "uint8")], text=["<image> what color ?"], return_tensors="pt")
    assert int((x["input_ids"] == cfg.image_token_id).sum()) == 144 and x["pixel_values"].shape[-1] == 96
