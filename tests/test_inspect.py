"Tests of role discovery (inspect), scoped LoRA targets vs PEFT (lora) and the structure report (report)."
import gc, json, os, re
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import pytest, torch, transformers
from torch import nn
import mm_research.inspect as inspect_mod
from mm_research.inspect import ROLES, get_role, roles
from mm_research.structure.lora import LoraTargets, expected_lora_params, lora_targets
from mm_research.structure.report import structure_report
from mm_research.zoo import load_config, load_model, reference_config

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def default_meta(cls_name: str) -> nn.Module:
    "A transformers model built from its class's default config on the meta device."
    cls = getattr(transformers, cls_name)
    with torch.device("meta"): return cls._from_config(cls.config_class()).eval()


# Expected paths read off the transformers 5.x modeling sources (attribute names in each __init__).
TOWER_LM = dict(vision_encoder="model.vision_tower", projector="model.multi_modal_projector",
                language_model="model.language_model", lm_head="lm_head")
FAMILIES = {
    "LlavaNextForConditionalGeneration": TOWER_LM,
    "PaliGemmaForConditionalGeneration": TOWER_LM,
    "Qwen2VLForConditionalGeneration": dict(vision_encoder="model.visual", projector="model.visual.merger",
                                            language_model="model.language_model", lm_head="lm_head"),
    "Idefics3ForConditionalGeneration": dict(vision_encoder="model.vision_model", projector="model.connector",
                                             language_model="model.text_model", lm_head="lm_head"),
    "WhisperForConditionalGeneration": dict(audio_encoder="model.encoder", language_model="model.decoder",
                                            lm_head="proj_out"),
    "Blip2ForConditionalGeneration": dict(vision_encoder="vision_model", projector="language_projection",
                                          qformer="qformer", language_model="language_model",
                                          lm_head="language_model.lm_head"),
    "InstructBlipForConditionalGeneration": dict(vision_encoder="vision_model", projector="language_projection",
                                                 qformer="qformer", language_model="language_model",
                                                 lm_head="language_model.lm_head"),
    "Qwen2AudioForConditionalGeneration": dict(audio_encoder="model.audio_tower",
                                               projector="model.multi_modal_projector",
                                               language_model="model.language_model", lm_head="lm_head"),
    "GraniteSpeechForConditionalGeneration": dict(audio_encoder="model.encoder", projector="model.projector",
                                                  language_model="model.language_model", lm_head="lm_head"),
    "Gemma3ForConditionalGeneration": dict(vision_encoder="model.vision_tower", projector="model.multi_modal_projector",
                                           language_model="model.language_model", lm_head="lm_head"),
    "Kosmos2ForConditionalGeneration": dict(vision_encoder="vision_model", projector="image_to_text_projection",
                                            language_model="text_model", lm_head="text_model.lm_head"),
    "LlamaForCausalLM": dict(language_model="model", lm_head="lm_head"),
    "SiglipModel": dict(vision_encoder="vision_model"),  # a contrastive text tower is not a language model
    "ViTForImageClassification": dict(vision_encoder="vit"),
}


@pytest.mark.parametrize("cls_name", list(FAMILIES))
def test_roles_default_configs(cls_name):
    m = default_meta(cls_name)
    found = roles(m)
    assert found == FAMILIES[cls_name]
    for role, path in found.items(): assert get_role(m, role) is m.get_submodule(path)


def test_at_least_six_multimodal_families():
    encoders = {"audio_encoder", "vision_encoder"}
    multimodal = [r for r in FAMILIES.values() if set(r) & encoders and "language_model" in r]
    assert len(multimodal) >= 6


PRESET_ROLES = {
    "tiny-qwen2-audio": dict(audio_encoder="model.audio_tower", projector="model.multi_modal_projector",
                             language_model="model.language_model", lm_head="lm_head"),
    "tiny-llava": dict(vision_encoder="model.vision_tower", projector="model.multi_modal_projector",
                       language_model="model.language_model", lm_head="lm_head"),
    "tiny-blip2": dict(vision_encoder="vision_model", projector="language_projection", qformer="qformer",
                       language_model="language_model", lm_head="language_model.lm_head"),
    "tiny-efficientnet": dict(vision_encoder="efficientnet"),
}


@pytest.mark.parametrize("name", list(PRESET_ROLES))
def test_roles_presets_tiny_and_reference(name):
    assert roles(load_model(name, meta=True)) == PRESET_ROLES[name]
    ref = {"tiny-qwen2-audio": "qwen2-audio-7b", "tiny-llava": "llava-1.5-7b", "tiny-blip2": "blip2-opt-2.7b",
           "tiny-efficientnet": "efficientnet-b3-wikiart27"}[name]
    assert roles(load_model(ref)) == PRESET_ROLES[name]


class FlatQwen2Audio(nn.Module):
    "Qwen2-Audio as transformers 4.x laid it out: components at the top, a CausalLM with its head inside."
    def __init__(self, config):
        super().__init__()
        from transformers import AutoModel, AutoModelForCausalLM
        from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioMultiModalProjector
        self.config = config
        self.audio_tower = AutoModel.from_config(config.audio_config)
        self.multi_modal_projector = Qwen2AudioMultiModalProjector(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)


def test_roles_flat_layout():
    with torch.device("meta"): m = FlatQwen2Audio(load_config("tiny-qwen2-audio"))
    assert roles(m) == dict(audio_encoder="audio_tower", projector="multi_modal_projector",
                            language_model="language_model", lm_head="language_model.lm_head")
    t = lora_targets(m, "audio_encoder", ("q", "k", "v"))
    assert t.modules == [f"audio_tower.layers.{i}.self_attn.{n}" for i in range(2)
                         for n in ("k_proj", "v_proj", "q_proj")]


def test_roles_ambiguity_lists_candidates():
    class TwoTowers(nn.Module):
        def __init__(self, config):
            super().__init__()
            from transformers import AutoModel
            self.config = config
            self.left = AutoModel.from_config(config.audio_config)
            self.right = AutoModel.from_config(config.audio_config)
    with torch.device("meta"): m = TwoTowers(load_config("tiny-qwen2-audio"))
    with pytest.raises(ValueError, match=r"Ambiguous role 'audio_encoder'.*left, right"): roles(m)
    assert lora_targets(m, "right", "q").modules == [f"right.layers.{i}.self_attn.q_proj" for i in range(2)]


def test_get_role_errors():
    m = load_model("tiny-llava", meta=True)
    with pytest.raises(ValueError, match="no 'audio_encoder'.*vision_encoder=model.vision_tower"):
        get_role(m, "audio_encoder")
    with pytest.raises(ValueError, match="Unknown role 'vision'.*vision_encoder"): get_role(m, "vision")
    with pytest.raises(TypeError, match="nn.Module"): roles("tiny-llava")
    assert set(roles(m)) <= set(ROLES)


def test_roles_through_peft_wrapper():
    from peft import LoraConfig, get_peft_model
    m = load_model("tiny-qwen2-audio", device="cpu")
    pm = get_peft_model(m, LoraConfig(target_modules=lora_targets(m, "audio_encoder").regex, r=2))
    assert roles(pm)["audio_encoder"] == "base_model.model.model.audio_tower"


@pytest.fixture
def count_walks(monkeypatch):
    "The models `roles` walked (called the discovery `_roles` on) during the test."
    calls, walk = [], inspect_mod._roles
    def counting(model):
        calls.append(model)
        return walk(model)
    monkeypatch.setattr(inspect_mod, "_roles", counting)
    return calls


def test_roles_cached_per_model(count_walks):
    m = load_model("tiny-qwen2-audio", meta=True)
    first = roles(m)
    assert roles(m) == first and get_role(m, "audio_encoder") is m.model.audio_tower
    lora_targets(m, "audio_encoder")
    structure_report(m)
    assert len(count_walks) == 1, "a second call walked the model again"
    roles(m)["audio_encoder"] = "elsewhere"  # callers get a copy, not the cache
    assert roles(m) == first
    other = load_model("tiny-qwen2-audio", meta=True)
    assert roles(other) == first and len(count_walks) == 2  # per model object, not per class or config


def test_roles_cache_invalidated_by_structure_change(count_walks):
    m = load_model("tiny-qwen2-audio", meta=True)
    assert "audio_encoder" in roles(m)
    del m.model.audio_tower
    assert roles(m) == dict(language_model="model.language_model", lm_head="lm_head")
    assert len(count_walks) == 2
    assert roles(m) == dict(language_model="model.language_model", lm_head="lm_head") and len(count_walks) == 2


def test_roles_cache_holds_models_weakly():
    m = load_model("tiny-llava", meta=True)
    roles(m)
    n = len(inspect_mod._ROLE_CACHE)
    del m
    gc.collect()
    assert len(inspect_mod._ROLE_CACHE) == n - 1


# ---------- scoped LoRA targets ----------

def _lora_params(pm):
    return sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)


def _lora_paths(pm):
    from peft.tuners.tuners_utils import BaseTunerLayer
    return sorted(n.removeprefix("base_model.model.") for n, mod in pm.named_modules()
                  if isinstance(mod, BaseTunerLayer))


@pytest.mark.parametrize("role,kinds,r", [("audio_encoder", ("q", "k", "v"), 4),
                                          ("audio_encoder", ("q", "k", "v", "o"), 8),
                                          ("language_model", ("q", "k", "v", "o"), 4), ("audio_encoder", ("fc1",), 2)])
def test_peft_agrees_with_expected_lora_params(role, kinds, r):
    from peft import LoraConfig, get_peft_model
    m = load_model("tiny-qwen2-audio", device="cpu")
    t = lora_targets(m, role, kinds)
    pm = get_peft_model(m, LoraConfig(target_modules=t.regex, r=r))
    assert _lora_params(pm) == expected_lora_params(pm.get_base_model(), t, r)
    root = roles(pm.get_base_model())[role]
    assert _lora_paths(pm) == sorted(t.modules)
    assert all(p.startswith(root + ".") for p in _lora_paths(pm)), "a LoRA module sits outside the role"


def test_tiny_qwen2_audio_counts_by_hand():
    m = load_model("tiny-qwen2-audio", meta=True)
    # tower: d_model 64, 2 layers; LM: hidden 64, 4 heads of 16, 2 KV heads -> k/v project 64->32
    assert expected_lora_params(m, lora_targets(m, "audio_encoder", ("q", "k", "v")), 4) == 2 * 3 * 4 * (64 + 64)
    assert expected_lora_params(m, lora_targets(m, "audio_encoder"), 4) == 2 * 4 * 4 * (64 + 64)
    lm_qkv = lora_targets(m, "language_model", ("q", "k", "v"))
    assert expected_lora_params(m, lm_qkv, 4) == 2 * 4 * ((64 + 64) + 2 * (64 + 32))
    assert expected_lora_params(m, ["lm_head"], 2) == 2 * (64 + 247)  # an explicit module list works too


def test_plain_list_leaks_into_language_model():
    from peft import LoraConfig, get_peft_model
    plain_list = LoraConfig(target_modules=["q_proj", "k_proj", "v_proj"], r=4)
    pm = get_peft_model(load_model("tiny-qwen2-audio", device="cpu"), plain_list)
    assert any(p.startswith("model.language_model.") for p in _lora_paths(pm))
    assert _lora_params(pm) == 2 * 3 * 4 * 128 + 2 * 4 * (128 + 96 + 96)


def test_kind_names_per_family():
    b = load_model("tiny-blip2", meta=True)
    q = lora_targets(b, "qformer")
    assert q.names == ["query", "key", "value", "dense"]
    assert {p.split(".", 4)[4] for p in q.modules} == {
        f"{a}.{x}" for a in ("attention", "crossattention")
        for x in ("attention.query", "attention.key", "attention.value", "output.dense")}
    assert not any(p.endswith("intermediate.dense") or re.search(r"layer\.\d+\.output\.dense", p) for p in q.modules)
    assert lora_targets(b, "vision_encoder").names == ["qkv", "projection"]
    assert lora_targets(b, "language_model").names == ["q_proj", "k_proj", "v_proj", "out_proj"]  # OPT
    llava = load_model("tiny-llava", meta=True)
    assert lora_targets(llava, "language_model").names == ["q_proj", "k_proj", "v_proj", "o_proj"]
    w = default_meta("WhisperForConditionalGeneration")
    assert lora_targets(w, "audio_encoder").names == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert lora_targets(default_meta("Qwen2VLForConditionalGeneration"), "vision_encoder").names == ["qkv", "proj"]


def test_lora_targets_stays_out_of_nested_roles():
    m = load_model("blip2-opt-2.7b")
    t = lora_targets(m, "language_model", ("q", "k", "v", "o"))
    assert len(t.modules) == 32 * 4 and "language_model.lm_head" not in t.modules
    v = default_meta("Qwen2VLForConditionalGeneration")
    assert not any(".merger." in p for p in lora_targets(v, "vision_encoder", ("q", "k", "v", "o")).modules)


def test_regex_full_matches_exactly_the_modules():
    for name, role in [("qwen2-audio-7b", "audio_encoder"), ("qwen2-audio-7b", "language_model"),
                       ("blip2-opt-2.7b", "qformer"),
                       ("llava-1.5-7b", "vision_encoder"), ("blip2-opt-2.7b", "vision_encoder")]:
        m = load_model(name)
        t = lora_targets(m, role)
        assert isinstance(t, LoraTargets) and len(t) == len(t.modules) > 0
        assert [p for p, _ in m.named_modules() if re.fullmatch(t.regex, p)] == t.modules


def test_missing_name_names_the_nearest():
    m = load_model("qwen2-audio-7b")
    with pytest.raises(ValueError, match=r"no Linear named 'o_proj'\. Nearest real names: out_proj"):
        lora_targets(m, "audio_encoder", ["q_proj", "k_proj", "v_proj", "o_proj"])
    with pytest.raises(ValueError, match="no 'q' projection"): lora_targets(m, "projector")
    with pytest.raises(ValueError, match="has no 'qformer'"): lora_targets(m, "qformer")
    with pytest.raises(ValueError, match="positive int"): expected_lora_params(m, lora_targets(m, "audio_encoder"), 0)


def test_reference_lora_arithmetic():
    m = load_model("qwen2-audio-7b")
    assert expected_lora_params(m, lora_targets(m, "audio_encoder", ("q", "k", "v")), 16) == 3_932_160
    assert expected_lora_params(m, lora_targets(m, "audio_encoder", ("q", "k", "v", "o")), 16) == 5_242_880


def test_peft_plain_list_on_meta_7b():
    from peft import LoraConfig, get_peft_model
    pm = get_peft_model(load_model("qwen2-audio-7b"), LoraConfig(target_modules=["q_proj", "k_proj", "v_proj"], r=16))
    assert _lora_params(pm) == 16_515_072
    assert all(p.is_meta for p in pm.parameters())


# ---------- the structure report ----------

FACTS = {"qwen2-audio-7b": 8_397_094_912, "llava-1.5-7b": 7_063_427_072, "blip2-opt-2.7b": 3_744_679_936,
         "efficientnet-b3-wikiart27": 10_737_731}


@pytest.mark.parametrize("name", list(FACTS))
def test_report_reference_presets(name):
    rep = structure_report(name, depth=3)
    assert rep.total_params == FACTS[name] and rep.param_storage_bytes == 0 and rep.device == "meta"
    d = json.loads(json.dumps(rep.to_dict()))
    assert d == json.loads(rep.to_json())
    assert max(n["depth"] for n in d["param_tree"]) == 3 and d["param_tree"][0]["params"] == FACTS[name]
    text = rep.text()
    for step in range(1, 9): assert f"\n{step}. " in "\n" + text
    assert str(rep) == text and "| path | type | parameters | role |" in rep._repr_markdown_()


def test_report_qwen2_audio_facts():
    rep = structure_report("qwen2-audio-7b")
    parts = {c["role"]: c["params"] for c in rep.components if c["role"]}
    assert parts["audio_encoder"] == 636_968_960 and parts["projector"] == 5_246_976
    assert parts["language_model"] + parts["lm_head"] == 7_754_878_976
    enc = rep.encoders["audio_encoder"]
    assert (enc["hidden_size"], enc["num_layers"], enc["layers_path"]) == (1280, 32, "model.audio_tower.layers")
    assert enc["layer_modules"]["self_attn.k_proj"] == "Linear(1280, 1280, bias=False)"
    assert enc["layer_modules"]["self_attn.out_proj"] == "Linear(1280, 1280, bias=True)"
    lm = rep.language_model
    assert (lm["hidden_size"], lm["num_layers"], lm["vocab_size"]) == (4096, 32, 156032)
    audio = rep.config["audio_config"]
    assert audio["num_mel_bins"] == 128 and audio["max_source_positions"] == 1500
    lc = rep.lora_candidates
    assert set(lc["audio_encoder"]) == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert lc["audio_encoder"]["q_proj"] == dict(count=32, shapes=["1280->1280"],
                                                 where=["model.audio_tower.layers.*.self_attn"])
    assert lc["language_model"]["gate_proj"]["count"] == 32 and "o_proj" not in lc["audio_encoder"]
    assert rep.encoding_strategy == "audio_tower" and "model.audio_tower" in rep.encoding_reason


def test_report_encoding_strategy_without_audio():
    rep = structure_report("llava-1.5-7b")
    assert rep.encoding_strategy == "full_forward" and "no audio encoder" in rep.encoding_reason
    v = rep.encoders["vision_encoder"]
    assert (v["num_layers"], v["hidden_size"], v["layers_path"]) == (24, 1024, "model.vision_tower.encoder.layers")
    b = structure_report("blip2-opt-2.7b")
    assert (b.encoders["qformer"]["num_layers"], b.encoders["vision_encoder"]["num_layers"]) == (12, 39)
    head = next(c for c in b.components if c["role"] == "lm_head")  # OPT ties its head to the input embedding
    assert head["params"] == 2560 * 50272 and head["tied_to"] == ["language_model.model.decoder.embed_tokens.weight"]
    assert "(tied to language_model.model.decoder.embed_tokens.weight)" in b.text()


def test_report_real_weights_storage():
    m = load_model("tiny-llava", device="cpu")
    rep = structure_report(m, depth=1)
    assert rep.param_storage_bytes == 4 * rep.total_params > 0 and rep.device == "cpu"
    assert max(n["depth"] for n in rep.param_tree) == 1
    with pytest.raises(ValueError, match="depth"): structure_report(m, depth=-1)
    with pytest.raises(TypeError, match="model or a preset"): structure_report(3)


def report_output(name_or_path, as_json: bool = False, depth: int = 2) -> str:
    "What `mmr inspect NAME_OR_PATH [--json] [--depth N]` prints."
    rep = structure_report(name_or_path, depth=depth)
    return rep.to_json() if as_json else rep.text()


def test_report_from_presets_configs_and_dirs(tmp_path):
    d = json.loads(report_output("qwen2-audio-7b", as_json=True, depth=1))
    assert d["total_params"] == 8_397_094_912 and d["param_storage_bytes"] == 0
    assert max(n["depth"] for n in d["param_tree"]) == 1
    cfg = reference_config("llava-1.5-7b")
    cfg.architectures = ["LlavaForConditionalGeneration"]
    cfg.save_pretrained(tmp_path/"ckpt")  # a local checkpoint dir (config only: the report needs no weights)
    assert "LlavaForConditionalGeneration" in report_output(tmp_path/"ckpt")
    assert json.loads(report_output(tmp_path/"ckpt"/"config.json", as_json=True))["total_params"] == 7_063_427_072
    with pytest.raises(ValueError, match="Did you mean 'tiny-llava'"): report_output("tiny-lava")
