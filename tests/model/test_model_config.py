"""LlamaConfig.from_hf_dir: both RoPE spellings, Mistral, labels, derived fields, errors that name the key."""

from __future__ import annotations

import json

import pytest

from scorer.model.config import ConfigError, LlamaConfig, QuantConfig, RopeScaling

BASE = {
    "architectures": ["LlamaForSequenceClassification"], "model_type": "llama", "vocab_size": 100,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "hidden_act": "silu",
}


def load(tmp_path, **changes) -> LlamaConfig:
    d = {**BASE, **changes}
    d = {k: v for k, v in d.items() if v is not ...}  # `key=...` deletes a key
    (tmp_path / "config.json").write_text(json.dumps(d))
    return LlamaConfig.from_hf_dir(tmp_path)


def test_defaults_and_derived(tmp_path):
    c = load(tmp_path, torch_dtype="bfloat16", pad_token_id=0, eos_token_id=[128001, 128009])
    assert (c.head_dim, c.n_rep, c.num_layers, c.rope_theta, c.rope_scaling) == (16, 2, 2, 10000.0, None)
    assert (c.num_labels, c.id2label, c.problem_type) == (2, ("LABEL_0", "LABEL_1"), "single_label_classification")
    assert (c.torch_dtype, c.pad_token_id, c.eos_token_id, c.quant) == ("bfloat16", 0, 128001, None)
    assert c.is_classifier and c.weight_prefix == "model." and c.path == str(tmp_path)
    assert QuantConfig is not None  # re-exported for the other modules


def test_rope_both_spellings(tmp_path):
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    v5 = load(tmp_path, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **llama3})
    v4 = load(tmp_path, rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **llama3})
    assert v5.rope_theta == v4.rope_theta == 500000.0
    assert v5.rope_scaling == v4.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    old = load(tmp_path, rope_scaling={"type": "linear", "factor": 2.0})
    assert old.rope_scaling == RopeScaling("linear", 2.0) and old.rope_theta == 10000.0
    assert load(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 1e6}).rope_scaling is None
    assert load(tmp_path, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}).rope_scaling.kind == "dynamic"


def test_labels_and_problem_type(tmp_path):
    c = load(tmp_path, id2label={"1": "pos", "0": "neg"}, label2id={"neg": 0, "pos": 1})
    assert c.id2label == ("neg", "pos") and c.label2id == {"neg": 0, "pos": 1}
    assert load(tmp_path, num_labels=1, id2label=...).problem_type == "regression"
    assert load(tmp_path, id2label={"0": "score"}).problem_type == "regression"
    ml = load(tmp_path, num_labels=3, problem_type="multi_label_classification")
    assert ml.problem_type == "multi_label_classification" and ml.num_labels == 3


def test_mistral_and_bare_models(tmp_path):
    m = load(tmp_path, architectures=["MistralForSequenceClassification"], model_type="mistral", sliding_window=None,
             head_dim=32)
    assert m.model_type == "mistral" and m.head_dim == 32
    assert load(tmp_path, architectures=["MistralModel"], model_type="mistral", sliding_window=4096).weight_prefix == ""
    emb = load(tmp_path, architectures=["LlamaModel"])
    assert not emb.is_classifier and emb.weight_prefix == ""
    assert load(tmp_path, architectures=..., model_type="llama").architecture == "LlamaModel"


@pytest.mark.parametrize(
    "changes,key",
    [
        (dict(architectures=["GPT2LMHeadModel"]), "architectures"),
        (dict(architectures=["LlamaForQuestionAnswering"]), "architectures"),
        (dict(model_type="qwen2"), "model_type"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling.rope_type"),
        (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "rope_parameters.rope_type"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling.low_freq_factor"),
        (dict(architectures=["MistralModel"], model_type="mistral", sliding_window=64), "sliding_window"),
        (dict(hidden_size=...), "hidden_size"),
        (dict(num_hidden_layers="2"), "num_hidden_layers"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(problem_type="ranking"), "problem_type"),
        (dict(id2label={"0": "a", "2": "b"}), "id2label"),
        (dict(quantization_config={"quant_method": "awq", "bits": 4}), "quant_method"),
        (dict(num_key_value_heads=0), "num_key_value_heads"),  # was a ZeroDivisionError
        (dict(num_hidden_layers=-1), "num_hidden_layers"),
        (dict(rope_theta="1e4x"), "rope_theta"),  # was float()'s ValueError, naming neither
        (dict(rope_scaling={"rope_type": "linear", "factor": "two"}), "rope_scaling.factor"),
    ],
)
def test_errors_name_the_key_and_file(tmp_path, changes, key):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, **changes)
    assert key in str(e.value) and "config.json" in str(e.value)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json: not found"):
        LlamaConfig.from_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="JSON"):
        LlamaConfig.from_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="config.json: the top level must be a JSON object"):
        LlamaConfig.from_hf_dir(tmp_path)
    (tmp_path / "config.json").write_bytes(b'{"model_type": "llama\xff"}')  # not UTF-8
    with pytest.raises(ConfigError, match="config.json: not readable JSON"):
        LlamaConfig.from_hf_dir(tmp_path)


def test_broken_quantization_configs_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="config.json: the quantization config must be a JSON object"):
        load(tmp_path, quantization_config="gptq")
    load(tmp_path)  # an unquantized config.json; the side file below makes it a GPTQ model
    for text, words in (("{bits: 4", "quantize_config.json: not readable JSON"),
                        ("[4]", "quantize_config.json: the quantization config must be a JSON object")):
        (tmp_path / "quantize_config.json").write_text(text)
        with pytest.raises(ValueError, match=words):
            LlamaConfig.from_hf_dir(tmp_path)


def test_gptq_config_is_read(tmp_path):
    c = load(tmp_path, quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True})
    assert c.quant.group_size == 128 and c.quant.desc_act
