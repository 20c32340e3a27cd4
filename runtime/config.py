"""Model configuration: one ``ModelConfig`` read from a Hugging Face config.json.

Only LLaMA-family checkpoints are accepted today (``model_type: "llama"``);
BLOOM is planned. Anything else is rejected with a ``ConfigError`` that names
the file, the field and the value, so a user never gets a silent wrong answer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError

__all__ = ["ModelConfig"]

# model_type values / architecture class names we map onto "llama".
_LLAMA_MODEL_TYPES = {"llama"}
_LLAMA_ARCHITECTURES = {"LlamaForCausalLM", "LLaMAForCausalLM", "LlamaModel"}
_PLANNED_MODEL_TYPES = {"bloom"}
_PLANNED_ARCHITECTURES = {"BloomForCausalLM", "BloomModel"}

_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v))


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters of a LLaMA-family model.

    ``num_kv_heads`` defaults to ``num_heads`` and ``head_dim`` to
    ``hidden_size // num_heads`` when left as None.
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0
    rope_interleaved: bool = False
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = field(default=None, hash=False)
    torch_dtype: str | None = None
    quantization_config: dict | None = field(default=None, hash=False)

    # ------------------------------------------------------------------ checks
    def __post_init__(self) -> None:
        src = "ModelConfig"
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if _is_int(self.hidden_size) and _is_int(self.num_heads) and self.num_heads > 0:
                if self.hidden_size % self.num_heads != 0:
                    raise ConfigError(
                        f"{src}: hidden_size={self.hidden_size} is not divisible by "
                        f"num_attention_heads={self.num_heads} and no head_dim is given")
                object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        self._check(src)

    def _check(self, src: str) -> None:
        if self.arch not in ("llama", "bloom"):
            raise ConfigError(f"{src}: unsupported arch {self.arch!r} (Lingli supports 'llama')")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise ConfigError(f"{src}: field {name} must be a positive integer, got {v!r}")
        for name in ("rms_norm_eps", "rope_theta", "rope_scaling_factor"):
            v = getattr(self, name)
            if not _is_num(v) or v <= 0:
                raise ConfigError(f"{src}: field {name} must be a positive number, got {v!r}")
        for name in ("rope_interleaved", "tie_word_embeddings", "attention_bias", "mlp_bias"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ConfigError(f"{src}: field {name} must be true or false, got {v!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ConfigError(
                f"{src}: num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}")

    # ------------------------------------------------------------------ readers
    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        """Read ``config.json`` from a model directory (or the file itself)."""
        p = Path(path)
        cfg_file = p if p.is_file() else p / "config.json"
        if not p.exists():
            raise ConfigError(f"model path {str(p)!r} does not exist")
        if not cfg_file.is_file():
            raise ConfigError(f"{cfg_file}: config.json not found in {str(p)!r}")
        try:
            text = cfg_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{cfg_file}: not valid UTF-8 ({e})") from None
        except OSError as e:
            raise ConfigError(f"{cfg_file}: cannot read ({e})") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{cfg_file}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        return cls.from_dict(d, source=str(cfg_file))

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Build a config from a parsed HF config.json dict; errors name ``source``."""
        src = source
        if not isinstance(d, dict):
            raise ConfigError(f"{src}: expected a JSON object, got {type(d).__name__}")

        arch = _detect_arch(d, src)

        def req_int(key: str) -> int:
            if key not in d:
                raise ConfigError(f"{src}: required field {key!r} is missing")
            v = d[key]
            if not _is_int(v):
                raise ConfigError(f"{src}: field {key!r} must be an integer, got {v!r}")
            if v <= 0:
                raise ConfigError(f"{src}: field {key!r} must be positive, got {v!r}")
            return v

        def opt_int(key: str, default):
            v = d.get(key)
            if v is None:
                return default
            if not _is_int(v):
                raise ConfigError(f"{src}: field {key!r} must be an integer, got {v!r}")
            if v <= 0:
                raise ConfigError(f"{src}: field {key!r} must be positive, got {v!r}")
            return v

        def opt_num(key: str, default: float) -> float:
            v = d.get(key)
            if v is None:
                return default
            if not _is_num(v):
                raise ConfigError(f"{src}: field {key!r} must be a number, got {v!r}")
            if v <= 0:
                raise ConfigError(f"{src}: field {key!r} must be positive, got {v!r}")
            return float(v)

        def opt_bool(key: str, default: bool) -> bool:
            v = d.get(key)
            if v is None:
                return default
            if not isinstance(v, bool):
                raise ConfigError(f"{src}: field {key!r} must be true or false, got {v!r}")
            return v

        def token_id(key: str, allow_list: bool):
            v = d.get(key)
            if v is None:
                return None
            if _is_int(v) and v >= 0:
                return v
            if allow_list and isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v):
                return list(v)
            want = "a non-negative integer or a list of them" if allow_list else "a non-negative integer"
            raise ConfigError(f"{src}: field {key!r} must be {want} or null, got {v!r}")

        vocab_size = req_int("vocab_size")
        hidden_size = req_int("hidden_size")
        intermediate_size = req_int("intermediate_size")
        num_layers = req_int("num_hidden_layers")
        num_heads = req_int("num_attention_heads")
        num_kv_heads = opt_int("num_key_value_heads", num_heads)
        if num_heads % num_kv_heads != 0:
            raise ConfigError(
                f"{src}: field 'num_attention_heads'={num_heads} is not a multiple of "
                f"'num_key_value_heads'={num_kv_heads}")
        head_dim = opt_int("head_dim", None)
        if head_dim is None:
            if hidden_size % num_heads != 0:
                raise ConfigError(
                    f"{src}: field 'hidden_size'={hidden_size} is not divisible by "
                    f"'num_attention_heads'={num_heads} and no 'head_dim' is given")
            head_dim = hidden_size // num_heads

        # Old LLaMA conversions wrote max_sequence_length instead.
        if d.get("max_position_embeddings") is not None:
            max_pos = opt_int("max_position_embeddings", 2048)
        else:
            max_pos = opt_int("max_sequence_length", 2048)

        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish", None):
            raise ConfigError(f"{src}: field 'hidden_act'={act!r} is unsupported "
                              f"(LLaMA models use 'silu')")

        torch_dtype = d.get("torch_dtype")
        if torch_dtype is not None and not isinstance(torch_dtype, str):
            raise ConfigError(f"{src}: field 'torch_dtype' must be a string, got {torch_dtype!r}")
        qc = d.get("quantization_config")
        if qc is not None and not isinstance(qc, dict):
            raise ConfigError(f"{src}: field 'quantization_config' must be an object, got {qc!r}")

        # transformers >= 5 writes RoPE settings as one `rope_parameters` object
        # (rope_theta, rope_type, factor); older configs use rope_theta + rope_scaling.
        rp = d.get("rope_parameters")
        if rp is not None:
            if not isinstance(rp, dict):
                raise ConfigError(f"{src}: field 'rope_parameters' must be an object, got {rp!r}")
            theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
            if not _is_num(theta) or theta <= 0:
                raise ConfigError(f"{src}: field 'rope_parameters.rope_theta' must be a positive "
                                  f"number, got {theta!r}")
            rope_theta = float(theta)
            rope_factor = _rope_scaling_factor(rp, src, field="rope_parameters")
        else:
            rope_theta = opt_num("rope_theta", 10000.0)
            rope_factor = _rope_scaling_factor(d.get("rope_scaling"), src)
        cfg_kwargs = dict(
            arch=arch,
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=max_pos,
            rms_norm_eps=opt_num("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling_factor=rope_factor,
            rope_interleaved=opt_bool("rope_interleaved", False),
            tie_word_embeddings=opt_bool("tie_word_embeddings", False),
            attention_bias=opt_bool("attention_bias", False),
            mlp_bias=opt_bool("mlp_bias", False),
            bos_token_id=token_id("bos_token_id", allow_list=False),
            eos_token_id=token_id("eos_token_id", allow_list=True),
            torch_dtype=torch_dtype,
            quantization_config=qc,
        )
        try:
            return cls(**cfg_kwargs)
        except ConfigError as e:  # re-label with the file name
            msg = str(e)
            if msg.startswith("ModelConfig:"):
                msg = msg[len("ModelConfig:"):].lstrip()
            raise ConfigError(f"{src}: {msg}") from None

    # ------------------------------------------------------------------ writers
    def to_hf_dict(self) -> dict:
        """A Hugging Face LLaMA config.json dict describing this model."""
        if self.arch != "llama":
            raise ConfigError(f"to_hf_dict: arch {self.arch!r} is not supported yet")
        d: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": (None if self.rope_scaling_factor == 1.0 else
                             {"type": "linear", "rope_type": "linear",
                              "factor": self.rope_scaling_factor}),
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple))
                             else self.eos_token_id),
            "initializer_range": 0.02,
            "use_cache": True,
        }
        if self.torch_dtype is not None:
            d["torch_dtype"] = self.torch_dtype
        if self.quantization_config is not None:
            d["quantization_config"] = self.quantization_config
        return d

    # ------------------------------------------------------------------ shapes
    def weight_shapes(self) -> dict[str, tuple]:
        """Expected HF tensor names -> shapes (lm_head omitted when tied)."""
        if self.arch != "llama":
            raise ConfigError(f"weight_shapes: arch {self.arch!r} is not supported yet")
        V, H, I = self.vocab_size, self.hidden_size, self.intermediate_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        s: dict[str, tuple] = {"model.embed_tokens.weight": (V, H)}
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            s[p + "input_layernorm.weight"] = (H,)
            s[p + "self_attn.q_proj.weight"] = (q, H)
            s[p + "self_attn.k_proj.weight"] = (kv, H)
            s[p + "self_attn.v_proj.weight"] = (kv, H)
            s[p + "self_attn.o_proj.weight"] = (H, q)
            if self.attention_bias:
                s[p + "self_attn.q_proj.bias"] = (q,)
                s[p + "self_attn.k_proj.bias"] = (kv,)
                s[p + "self_attn.v_proj.bias"] = (kv,)
                s[p + "self_attn.o_proj.bias"] = (H,)
            s[p + "post_attention_layernorm.weight"] = (H,)
            s[p + "mlp.gate_proj.weight"] = (I, H)
            s[p + "mlp.up_proj.weight"] = (I, H)
            s[p + "mlp.down_proj.weight"] = (H, I)
            if self.mlp_bias:
                s[p + "mlp.gate_proj.bias"] = (I,)
                s[p + "mlp.up_proj.bias"] = (I,)
                s[p + "mlp.down_proj.bias"] = (H,)
        s["model.norm.weight"] = (H,)
        if not self.tie_word_embeddings:
            s["lm_head.weight"] = (V, H)
        return s


def _detect_arch(d: dict, src: str) -> str:
    mt = d.get("model_type")
    archs = d.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ConfigError(f"{src}: field 'architectures' must be a list of strings, got {archs!r}")
    if mt is not None:
        if not isinstance(mt, str):
            raise ConfigError(f"{src}: field 'model_type' must be a string, got {mt!r}")
        if mt in _LLAMA_MODEL_TYPES:
            return "llama"
        if mt in _PLANNED_MODEL_TYPES:
            raise ConfigError(f"{src}: model_type {mt!r} is not supported yet (only 'llama')")
        raise ConfigError(f"{src}: unsupported model_type {mt!r} (Lingli supports 'llama')")
    if archs:
        for a in archs:
            if a in _LLAMA_ARCHITECTURES:
                return "llama"
        for a in archs:
            if a in _PLANNED_ARCHITECTURES:
                raise ConfigError(f"{src}: architecture {a!r} is not supported yet (only LLaMA)")
        raise ConfigError(f"{src}: unsupported architectures {archs!r} "
                          f"(Lingli supports LlamaForCausalLM)")
    raise ConfigError(f"{src}: neither 'model_type' nor 'architectures' is given; "
                      f"cannot tell which model this is")


def _rope_scaling_factor(rs: Any, src: str, field: str = "rope_scaling") -> float:
    if rs is None:
        return 1.0
    if not isinstance(rs, dict):
        raise ConfigError(f"{src}: field '{field}' must be an object or null, got {rs!r}")
    kind = rs.get("rope_type", rs.get("type"))
    if kind in ("default", None) and field == "rope_parameters":
        return 1.0
    if kind == "default":
        return 1.0
    if kind != "linear":
        raise ConfigError(f"{src}: field '{field}' type {kind!r} is unsupported "
                          f"(Lingli supports only 'linear' RoPE scaling)")
    f = rs.get("factor")
    if not _is_num(f) or f <= 0:
        raise ConfigError(f"{src}: field '{field}.factor' must be a positive number, got {f!r}")
    return float(f)
