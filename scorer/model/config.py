"""One frozen config for every module: `LlamaConfig.from_hf_dir(path)` reads a Hugging Face config.json.

Accepted: Llama 2 / 3 / 3.1 / 3.2 and Mistral-style configs that are Llama math (no sliding window inside
the context), saved as `*ForSequenceClassification`, `*Model` (embedders) or `*ForCausalLM` (embedders;
the LM head is ignored). RoPE scaling `llama3`, `linear` and `dynamic`, in both spellings in the wild:
transformers 5 writes `rope_parameters: {rope_theta, rope_type, ...}`, older files write a top-level
`rope_theta` plus `rope_scaling: {type | rope_type, ...}`. Anything scorer would compute differently from
transformers fails here with a `ConfigError` naming the file and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scorer.model.quant_config import QuantConfig, QuantConfigError

__all__ = ["ConfigError", "LlamaConfig", "QuantConfig", "QuantConfigError", "RopeScaling", "ARCHITECTURES"]

# architecture -> (model_type, weight-name prefix of the backbone in the checkpoint, has a `score` head)
ARCHITECTURES: dict[str, tuple[str, str, bool]] = {
    "LlamaForSequenceClassification": ("llama", "model.", True),
    "LlamaModel": ("llama", "", False),
    "LlamaForCausalLM": ("llama", "model.", False),
    "MistralForSequenceClassification": ("mistral", "model.", True),
    "MistralModel": ("mistral", "", False),
    "MistralForCausalLM": ("mistral", "model.", False),
}
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
ROPE_KINDS = ("llama3", "linear", "dynamic")


class ConfigError(ValueError):
    """A config.json scorer cannot run; the message names the file, the key and what is supported."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as transformers' modeling_rope_utils computes it (attention factor 1)."""

    kind: str  # "llama3" | "linear" | "dynamic"
    factor: float
    low_freq_factor: float | None = None  # llama3 only
    high_freq_factor: float | None = None  # llama3 only
    original_max_position_embeddings: int | None = None  # llama3 only


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    attention_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    num_labels: int
    id2label: tuple[str, ...]  # label names in id order
    problem_type: str  # one of PROBLEM_TYPES
    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_id: int | None
    torch_dtype: str  # the checkpoint's dtype as config.json states it ("bfloat16", ...)
    architecture: str  # a key of ARCHITECTURES
    model_type: str
    quant: QuantConfig | None
    path: str  # the model directory

    # derived ----------------------------------------------------------------------------------------
    @property
    def is_classifier(self) -> bool:
        """The checkpoint carries a `score` head (a *ForSequenceClassification)."""
        return ARCHITECTURES[self.architecture][2]

    @property
    def weight_prefix(self) -> str:
        """The prefix of backbone tensor names in the checkpoint ("model." or "" for bare *Model)."""
        return ARCHITECTURES[self.architecture][1]

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.id2label)}

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (1 for MHA)."""
        return self.num_heads // self.num_kv_heads

    # reading ----------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        file = path / "config.json"
        if not file.is_file():
            raise ConfigError(f"{file}: not found; a model directory needs the Hugging Face config.json.")
        try:
            d = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file}: not readable JSON ({e}).") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{file}: the top level must be a JSON object of the model's fields, not "
                              f"{type(d).__name__}; use the config.json transformers writes.")
        return cls.from_dict(d, path)

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: str | Path) -> "LlamaConfig":
        path = Path(path)
        src = str(path / "config.json")
        r = _Reader(d, src)

        arch = _architecture(d, src)
        model_type = r.get("model_type", str, ARCHITECTURES[arch][0])
        if model_type not in ("llama", "mistral"):
            raise ConfigError(f"{src}: key 'model_type' is {model_type!r}; scorer runs 'llama' and 'mistral'.")
        act = r.get("hidden_act", str, "silu")
        if act != "silu":
            raise ConfigError(f"{src}: key 'hidden_act' is {act!r}; Llama math needs 'silu'.")
        if r.get("partial_rotary_factor", float, 1.0) != 1.0:
            raise ConfigError(f"{src}: key 'partial_rotary_factor' must be 1.0 for Llama math.")

        hidden = r.req("hidden_size", int)
        heads = r.req("num_attention_heads", int)
        kv_heads = r.get("num_key_value_heads", int, heads)
        for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "vocab_size",
                    "intermediate_size", "max_position_embeddings", "head_dim"):
            v = d.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v < 1:
                raise ConfigError(f"{src}: key {key!r} is {v}; it must be a positive integer.")
        if heads % kv_heads:
            raise ConfigError(f"{src}: key 'num_key_value_heads' ({kv_heads}) must divide num_attention_heads ({heads}).")
        head_dim = r.get("head_dim", int, None) or hidden // heads
        max_pos = r.req("max_position_embeddings", int)

        window = d.get("sliding_window")
        if window is not None and (not isinstance(window, int) or window < max_pos):
            raise ConfigError(
                f"{src}: key 'sliding_window' is {window!r}, smaller than max_position_embeddings ({max_pos}); "
                "scorer runs full causal attention only (Llama math). Set it to null if the model allows."
            )

        rope_theta, rope_scaling = _rope(d, src)
        num_labels, id2label = _labels(d, src)
        problem_type = d.get("problem_type")
        if problem_type is None:  # transformers' inference, without training labels to look at
            problem_type = "regression" if num_labels == 1 else "single_label_classification"
        if problem_type not in PROBLEM_TYPES:
            raise ConfigError(f"{src}: key 'problem_type' is {problem_type!r}; supported: {', '.join(PROBLEM_TYPES)}.")

        try:
            quant = QuantConfig.from_model_dir(path, d)
        except QuantConfigError as e:
            raise ConfigError(str(e)) from e

        return cls(
            vocab_size=r.req("vocab_size", int),
            hidden_size=hidden,
            intermediate_size=r.req("intermediate_size", int),
            num_layers=r.req("num_hidden_layers", int),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=r.get("rms_norm_eps", float, 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            attention_bias=r.get("attention_bias", bool, False),
            mlp_bias=r.get("mlp_bias", bool, False),
            tie_word_embeddings=r.get("tie_word_embeddings", bool, False),
            num_labels=num_labels,
            id2label=id2label,
            problem_type=problem_type,
            pad_token_id=_token_id(d, "pad_token_id", src),
            bos_token_id=_token_id(d, "bos_token_id", src),
            eos_token_id=_token_id(d, "eos_token_id", src),
            torch_dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"),
            architecture=arch,
            model_type=model_type,
            quant=quant,
            path=str(path),
        )


class _Reader:
    """Typed look-ups into config.json; a missing or mistyped key names itself and the file."""

    def __init__(self, d: dict[str, Any], src: str) -> None:
        self.d, self.src = d, src

    def _cast(self, key: str, value: Any, typ: type) -> Any:
        if typ is bool:
            if isinstance(value, bool):
                return value
        elif typ is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif typ is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        elif isinstance(value, typ):
            return value
        raise ConfigError(f"{self.src}: key {key!r} must be {typ.__name__}, not {value!r}.")

    def req(self, key: str, typ: type) -> Any:
        if self.d.get(key) is None:
            raise ConfigError(f"{self.src}: key {key!r} is missing; a Llama config.json needs it.")
        return self._cast(key, self.d[key], typ)

    def get(self, key: str, typ: type, default: Any) -> Any:
        value = self.d.get(key)
        return default if value is None else self._cast(key, value, typ)


def _architecture(d: dict[str, Any], src: str) -> str:
    archs = d.get("architectures")
    if not archs:
        mt = d.get("model_type")
        if mt in ("llama", "mistral"):  # no architectures: a bare backbone (what AutoModel would build)
            return "LlamaModel" if mt == "llama" else "MistralModel"
        raise ConfigError(f"{src}: key 'architectures' is missing and 'model_type' is {mt!r}; expected a Llama model.")
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ConfigError(
            f"{src}: key 'architectures' is {archs!r}; scorer runs one of {', '.join(ARCHITECTURES)}."
        )
    return archs[0]


def _rope(d: dict[str, Any], src: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    params = d.get("rope_parameters")
    key = "rope_parameters"
    if params is None:
        params = d.get("rope_scaling")
        key = "rope_scaling"
    theta = d.get("rope_theta")
    if params is not None:
        if not isinstance(params, dict):
            raise ConfigError(f"{src}: key {key!r} must be an object, not {params!r}.")
        if "full_attention" in params and isinstance(params["full_attention"], dict):  # per-layer-type form
            params = params["full_attention"]
        theta = params.get("rope_theta", theta)
    theta = 10000.0 if theta is None else _number(theta, "rope_theta", src)
    if not params:
        return theta, None
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ROPE_KINDS:
        raise ConfigError(f"{src}: key '{key}.rope_type' is {kind!r}; scorer supports default, {', '.join(ROPE_KINDS)}.")

    def need(name: str) -> float:
        if params.get(name) is None:
            raise ConfigError(f"{src}: key '{key}.{name}' is missing; rope type {kind!r} needs it.")
        return _number(params[name], f"{key}.{name}", src)

    factor = need("factor")
    if kind != "llama3":
        return theta, RopeScaling(kind=kind, factor=factor)
    return theta, RopeScaling(
        kind="llama3",
        factor=factor,
        low_freq_factor=need("low_freq_factor"),
        high_freq_factor=need("high_freq_factor"),
        original_max_position_embeddings=int(need("original_max_position_embeddings")),
    )


def _number(value: Any, key: str, src: str) -> float:
    """A config.json number (an int or a float, or a string of one, as some exporters write)."""
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{src}: key {key!r} is {value!r}; it must be a number.") from None


def _labels(d: dict[str, Any], src: str) -> tuple[int, tuple[str, ...]]:
    id2label = d.get("id2label")
    if id2label:
        try:
            pairs = sorted((int(k), str(v)) for k, v in id2label.items())
        except (AttributeError, ValueError) as e:
            raise ConfigError(f"{src}: key 'id2label' must map integer ids to names.") from e
        if [i for i, _ in pairs] != list(range(len(pairs))):
            raise ConfigError(f"{src}: key 'id2label' must have ids 0..n-1, has {[i for i, _ in pairs]}.")
        n = d.get("num_labels", len(pairs))
        if n != len(pairs):
            raise ConfigError(f"{src}: key 'num_labels' ({n}) disagrees with id2label ({len(pairs)} names).")
        return len(pairs), tuple(v for _, v in pairs)
    n = d.get("num_labels", 2)  # transformers' default
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"{src}: key 'num_labels' must be a positive integer, not {n!r}.")
    return n, tuple(f"LABEL_{i}" for i in range(n))


def _token_id(d: dict[str, Any], key: str, src: str) -> int | None:
    v = d.get(key)
    if isinstance(v, list):  # Llama 3 instruct lists several eos ids; the first is the tokenizer's eos
        v = v[0] if v else None
    if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
        raise ConfigError(f"{src}: key {key!r} must be an integer or null, not {v!r}.")
    return v
