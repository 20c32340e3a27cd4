"""ModelConfig: parsing HF config.json, defaults, validation, weight shapes."""
from __future__ import annotations

import dataclasses
import json

import pytest

from runtime.config import ModelConfig
from runtime.errors import ConfigError

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
REQUIRED = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads"]


def write_cfg(tmp_path, d):
    (tmp_path / "config.json").write_text(json.dumps(d), encoding="utf-8")
    return tmp_path


def test_defaults():
    c = ModelConfig.from_dict(dict(BASE))
    assert c.arch == "llama"
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads) == \
        (64, 32, 48, 2, 4)
    assert c.num_kv_heads == 4
    assert c.head_dim == 8
    assert c.max_position_embeddings == 2048
    assert c.rms_norm_eps == 1e-6
    assert c.rope_theta == 10000.0
    assert c.rope_scaling_factor == 1.0
    assert c.rope_interleaved is False
    assert c.tie_word_embeddings is False
    assert c.attention_bias is False and c.mlp_bias is False
    assert c.bos_token_id is None and c.eos_token_id is None
    assert c.torch_dtype is None and c.quantization_config is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.vocab_size = 3  # type: ignore[misc]


def test_from_dir_reads_all_fields(tmp_path):
    d = dict(BASE, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
             rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0},
             tie_word_embeddings=True, attention_bias=True, mlp_bias=True, bos_token_id=1,
             eos_token_id=[2, 7], torch_dtype="bfloat16",
             quantization_config={"format": "int4", "group_size": 64, "nested": {"a": [1]}})
    c = ModelConfig.from_dir(write_cfg(tmp_path, d))
    assert c.num_kv_heads == 2 and c.head_dim == 8
    assert c.max_position_embeddings == 4096
    assert c.rms_norm_eps == 1e-5 and c.rope_theta == 500000.0
    assert c.rope_scaling_factor == 2.0
    assert c.tie_word_embeddings and c.attention_bias and c.mlp_bias
    assert c.bos_token_id == 1 and c.eos_token_id == [2, 7]
    assert c.torch_dtype == "bfloat16"
    assert c.quantization_config == d["quantization_config"]
    # from_dir also accepts the config.json path itself
    assert ModelConfig.from_dir(tmp_path / "config.json") == c
    hash(c)  # usable as a dict key despite the list / dict fields


def test_gqa_head_dim_derivation():
    c = ModelConfig.from_dict(dict(BASE, hidden_size=64, num_attention_heads=8,
                                   num_key_value_heads=2))
    assert c.head_dim == 8 and c.num_kv_heads == 2
    s = c.weight_shapes()
    assert s["model.layers.0.self_attn.q_proj.weight"] == (64, 64)
    assert s["model.layers.0.self_attn.k_proj.weight"] == (16, 64)
    assert s["model.layers.0.self_attn.v_proj.weight"] == (16, 64)
    assert s["model.layers.0.self_attn.o_proj.weight"] == (64, 64)


def test_explicit_head_dim_wins():
    # An explicit head_dim overrides hidden_size // num_heads (and a hidden
    # size not divisible by the head count is then fine).
    c = ModelConfig.from_dict(dict(BASE, hidden_size=30, head_dim=16))
    assert c.head_dim == 16
    s = c.weight_shapes()
    assert s["model.layers.1.self_attn.q_proj.weight"] == (64, 30)
    assert s["model.layers.1.self_attn.o_proj.weight"] == (30, 64)
    # head_dim: null is treated as absent
    assert ModelConfig.from_dict(dict(BASE, head_dim=None)).head_dim == 8


def test_head_dim_not_divisible():
    with pytest.raises(ConfigError, match="hidden_size.*num_attention_heads.*head_dim"):
        ModelConfig.from_dict(dict(BASE, hidden_size=30))


def test_kv_heads_must_divide_heads():
    with pytest.raises(ConfigError, match="num_key_value_heads") as e:
        ModelConfig.from_dict(dict(BASE, num_key_value_heads=3), source="my/config.json")
    assert "my/config.json" in str(e.value)


def test_direct_construction_defaults_and_checks():
    c = ModelConfig(arch="llama", vocab_size=10, hidden_size=8, intermediate_size=12,
                    num_layers=1, num_heads=2)
    assert c.num_kv_heads == 2 and c.head_dim == 4
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        ModelConfig(arch="llama", vocab_size=10, hidden_size=8, intermediate_size=12,
                    num_layers=1, num_heads=4, num_kv_heads=3)
    with pytest.raises(ConfigError, match="vocab_size"):
        ModelConfig(arch="llama", vocab_size=0, hidden_size=8, intermediate_size=12,
                    num_layers=1, num_heads=2)


@pytest.mark.parametrize("field", REQUIRED)
def test_missing_required_field(tmp_path, field):
    d = dict(BASE)
    del d[field]
    write_cfg(tmp_path, d)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dir(tmp_path)
    msg = str(e.value)
    assert field in msg and "missing" in msg
    assert str(tmp_path / "config.json") in msg


@pytest.mark.parametrize("field,value", [
    ("hidden_size", "32"), ("hidden_size", 32.0), ("vocab_size", True),
    ("num_hidden_layers", None), ("intermediate_size", [48]),
])
def test_wrong_type(field, value):
    d = dict(BASE, **{field: value})
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(d, source="cfg.json")
    assert field in str(e.value) and "cfg.json" in str(e.value)


@pytest.mark.parametrize("field,value", [
    ("hidden_size", 0), ("vocab_size", -5), ("num_attention_heads", 0),
    ("num_key_value_heads", 0), ("max_position_embeddings", -1),
    ("rms_norm_eps", 0.0), ("rope_theta", -1.0), ("head_dim", 0),
])
def test_non_positive(field, value):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(dict(BASE, **{field: value}))
    assert field in str(e.value) and "config.json" in str(e.value)


@pytest.mark.parametrize("field,value", [
    ("tie_word_embeddings", "yes"), ("attention_bias", 1), ("rope_theta", "1e4"),
    ("eos_token_id", "</s>"), ("bos_token_id", [1]), ("torch_dtype", 16),
    ("quantization_config", "int4"), ("rms_norm_eps", float("nan")),
])
def test_other_bad_values(field, value):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(dict(BASE, **{field: value}))


def test_missing_config_json(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_dir(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_dir(tmp_path / "nope")


def test_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text('{"vocab_size": 64,,}', encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dir(tmp_path)
    assert "invalid JSON" in str(e.value) and "config.json" in str(e.value)
    assert "line 1" in str(e.value)


def test_json_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_dir(tmp_path)


@pytest.mark.parametrize("rs,factor", [
    (None, 1.0),
    ({"type": "linear", "factor": 4.0}, 4.0),
    ({"rope_type": "linear", "factor": 2}, 2.0),
    ({"rope_type": "default"}, 1.0),
])
def test_rope_scaling_supported(rs, factor):
    c = ModelConfig.from_dict(dict(BASE, rope_scaling=rs))
    assert c.rope_scaling_factor == factor
    assert isinstance(c.rope_scaling_factor, float)


@pytest.mark.parametrize("rs", [
    {"type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    {"rope_type": "llama3", "factor": 8.0},
    {"factor": 2.0},
])
def test_rope_scaling_unsupported(rs):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(dict(BASE, rope_scaling=rs))
    msg = str(e.value)
    assert "rope_scaling" in msg and "unsupported" in msg
    kind = rs.get("rope_type", rs.get("type"))
    if kind:
        assert kind in msg


@pytest.mark.parametrize("rs", [{"type": "linear"}, {"type": "linear", "factor": 0},
                                "linear"])
def test_rope_scaling_bad_factor(rs):
    with pytest.raises(ConfigError, match="rope_scaling"):
        ModelConfig.from_dict(dict(BASE, rope_scaling=rs))


@pytest.mark.parametrize("patch,needle", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "gpt2"),
    ({"model_type": "mistral"}, "mistral"),
    ({"model_type": "bloom", "architectures": ["BloomForCausalLM"]}, "bloom"),
    ({"model_type": None, "architectures": ["FalconForCausalLM"]}, "FalconForCausalLM"),
])
def test_unsupported_arch(patch, needle):
    d = dict(BASE)
    d.update(patch)
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(d)
    assert needle in str(e.value)


def test_arch_from_architectures_only():
    d = {k: v for k, v in BASE.items() if k != "model_type"}
    assert ModelConfig.from_dict(d).arch == "llama"
    d["architectures"] = ["LLaMAForCausalLM"]  # 2023-era conversions
    assert ModelConfig.from_dict(d).arch == "llama"
    del d["architectures"]
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_dict(d)


def test_hidden_act_checked():
    assert ModelConfig.from_dict(dict(BASE, hidden_act="silu")).arch == "llama"
    with pytest.raises(ConfigError, match="gelu"):
        ModelConfig.from_dict(dict(BASE, hidden_act="gelu"))


def test_old_max_sequence_length():
    c = ModelConfig.from_dict(dict(BASE, max_sequence_length=1024))
    assert c.max_position_embeddings == 1024


def test_weight_shapes_full():
    c = ModelConfig.from_dict(dict(BASE, num_key_value_heads=2))
    s = c.weight_shapes()
    V, H, I = 64, 32, 48
    assert s["model.embed_tokens.weight"] == (V, H)
    assert s["model.norm.weight"] == (H,)
    assert s["lm_head.weight"] == (V, H)
    for i in range(2):
        p = f"model.layers.{i}."
        assert s[p + "input_layernorm.weight"] == (H,)
        assert s[p + "post_attention_layernorm.weight"] == (H,)
        assert s[p + "self_attn.q_proj.weight"] == (32, H)
        assert s[p + "self_attn.k_proj.weight"] == (16, H)
        assert s[p + "self_attn.v_proj.weight"] == (16, H)
        assert s[p + "self_attn.o_proj.weight"] == (H, 32)
        assert s[p + "mlp.gate_proj.weight"] == (I, H)
        assert s[p + "mlp.up_proj.weight"] == (I, H)
        assert s[p + "mlp.down_proj.weight"] == (H, I)
    assert len(s) == 1 + 2 * 9 + 2
    assert not any(k.endswith(".bias") for k in s)


def test_weight_shapes_tied_and_biases():
    c = ModelConfig.from_dict(dict(BASE, num_key_value_heads=2, tie_word_embeddings=True,
                                   attention_bias=True, mlp_bias=True))
    s = c.weight_shapes()
    assert "lm_head.weight" not in s
    p = "model.layers.1."
    assert s[p + "self_attn.q_proj.bias"] == (32,)
    assert s[p + "self_attn.k_proj.bias"] == (16,)
    assert s[p + "self_attn.v_proj.bias"] == (16,)
    assert s[p + "self_attn.o_proj.bias"] == (32,)
    assert s[p + "mlp.gate_proj.bias"] == (48,)
    assert s[p + "mlp.up_proj.bias"] == (48,)
    assert s[p + "mlp.down_proj.bias"] == (32,)


@pytest.mark.parametrize("extra", [
    {},
    {"num_key_value_heads": 2, "tie_word_embeddings": True, "bos_token_id": 1,
     "eos_token_id": 2, "rope_scaling": {"type": "linear", "factor": 2.0},
     "torch_dtype": "float16", "quantization_config": {"format": "int8"}},
    {"head_dim": 16, "eos_token_id": [2, 3], "rope_interleaved": True},
])
def test_to_hf_dict_roundtrip(extra):
    c = ModelConfig.from_dict(dict(BASE, **extra))
    d = c.to_hf_dict()
    assert d["model_type"] == "llama" and d["architectures"] == ["LlamaForCausalLM"]
    assert d["num_hidden_layers"] == 2 and d["num_attention_heads"] == 4
    json.dumps(d)  # serializable
    back = ModelConfig.from_dict(json.loads(json.dumps(d)))
    # rope_interleaved is a Lingli-internal flag; HF configs are always rotate-half
    assert back == dataclasses.replace(c, rope_interleaved=False)


def test_weight_shapes_match_transformers():
    """Names and shapes agree with transformers' own LlamaForCausalLM."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for extra in ({"num_key_value_heads": 2},
                  {"num_key_value_heads": 1, "tie_word_embeddings": True, "head_dim": 16},
                  {"attention_bias": True, "mlp_bias": True}):
        c = ModelConfig.from_dict(dict(BASE, **extra))
        hf_cfg = transformers.LlamaConfig(**c.to_hf_dict())
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(hf_cfg)
        sd = {k: tuple(v.shape) for k, v in model.state_dict().items()
              if not k.endswith("inv_freq")}
        if c.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        assert sd == c.weight_shapes(), extra


def test_rope_parameters_transformers5_form():
    """transformers >= 5 writes rope_theta / scaling inside one `rope_parameters` object."""
    from runtime.config import ModelConfig as MC
    from runtime.errors import ConfigError as CE

    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=1, num_attention_heads=2)
    c = MC.from_dict(dict(base, rope_parameters={"rope_theta": 5e5, "rope_type": "default"}))
    assert c.rope_theta == 5e5 and c.rope_scaling_factor == 1.0
    c = MC.from_dict(dict(base, rope_parameters={"rope_theta": 1e4, "rope_type": "linear",
                                                 "factor": 4.0}))
    assert c.rope_scaling_factor == 4.0
    with pytest.raises(CE, match="rope_parameters.*yarn"):
        MC.from_dict(dict(base, rope_parameters={"rope_type": "yarn", "factor": 2.0}))
