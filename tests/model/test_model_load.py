"""load_model: the name table, sharded checkpoints, mismatches listed by name, no pickles, dtype rules."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from scorer.model import llama
from scorer.model.load import WeightsError, load_model


def _copy(path, tmp_path):
    return shutil.copytree(path, tmp_path / "m")


def test_loads_classifier_in_dtype(make_dir):
    model, cfg = load_model(make_dir(), "bfloat16", "cpu")
    assert cfg.is_classifier and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta or p.requires_grad for p in model.parameters())
    assert model.model.layers[1].self_attn.k_proj.weight.shape == (2 * 16, 64)


def test_sharded_index_and_dropped_names(make_dir, tmp_path, hf):
    path = _copy(make_dir(), tmp_path)
    sd = load_file(path / "model.safetensors")
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old checkpoints carry this
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for file, keys in shards.items():
        save_file({k: sd[k] for k in keys}, path / file, metadata={"format": "pt"})
    (path / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    model, _ = load_model(path, torch.float32, "cpu")
    ref, _ = load_model(make_dir(), torch.float32, "cpu")
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n
    (path / "model-00002-of-00002.safetensors").unlink()  # an index whose shard is gone: named
    with pytest.raises(WeightsError, match="lists shards that are not there: .*model-00002-of-00002.safetensors"):
        load_model(path, torch.float32, "cpu")


def test_missing_and_unexpected_tensors_are_listed(make_dir, tmp_path):
    path = _copy(make_dir(), tmp_path)
    sd = load_file(path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.1.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(sd, path / "model.safetensors")
    with pytest.raises(WeightsError) as e:
        load_model(path, torch.float32, "cpu")
    msg = str(e.value)
    assert "missing (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected (1): model.layers.1.mlp.extra_proj.weight (model.safetensors)" in msg


def test_embedder_names_have_no_prefix(make_dir, tmp_path):
    path = _copy(make_dir(task="embed"), tmp_path)
    sd = load_file(path / "model.safetensors")
    assert "embed_tokens.weight" in sd
    model, cfg = load_model(path, torch.float32, "cpu")
    assert model.score is None and torch.equal(model.model.embed_tokens.weight, sd["embed_tokens.weight"])
    # a classifier config over embedder weights: every name is reported
    c = json.loads((path / "config.json").read_text())
    c["architectures"] = ["LlamaForSequenceClassification"]
    (path / "config.json").write_text(json.dumps(c))
    with pytest.raises(WeightsError, match=r"missing \(\d+\): model\.embed_tokens\.weight.*score\.weight"):
        load_model(path, torch.float32, "cpu")


def test_a_quantized_lm_head_is_dropped_with_the_rest_of_the_head(make_dir, tmp_path):
    """GPTQModel with lm_head=True writes the causal head as qweight, qzeros, scales, g_idx: unused for
    scoring, like a plain lm_head.weight, so an embedder loads over such a checkpoint."""
    path = _copy(make_dir(task="causal"), tmp_path)
    sd = load_file(path / "model.safetensors")
    sd.pop("lm_head.weight", None)
    sd.update({"lm_head.qweight": torch.zeros(8, 384, dtype=torch.int32),
               "lm_head.qzeros": torch.zeros(1, 48, dtype=torch.int32),
               "lm_head.scales": torch.ones(1, 384, dtype=torch.float16),
               "lm_head.g_idx": torch.zeros(64, dtype=torch.int32)})
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    model, _ = load_model(path, torch.float32, "cpu")
    ref, _ = load_model(make_dir(task="causal"), torch.float32, "cpu")
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n


def test_shape_mismatch_and_pickles_refused(make_dir, tmp_path):
    path = _copy(make_dir(), tmp_path)
    c = json.loads((path / "config.json").read_text())
    c["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(c))
    with pytest.raises(WeightsError, match="do not fit config.json"):
        load_model(path, torch.float32, "cpu")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="pytorch_model.bin: scorer never unpickles"):
        load_model(path, torch.float32, "cpu")


class FakeInt4(nn.Module):
    """Stands in for Int4Linear: integer codes, fp16 scales, and a prepare(dtype) hook."""

    def __init__(self, in_f, out_f, bias, quant, dtype):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(in_f // 8, out_f, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(1, out_f, dtype=torch.float16))
        self.prepared = []

    def prepare(self, dtype):
        self.prepared.append((dtype, self.qweight.dtype, self.scales.dtype))


def test_quantized_tensors_keep_their_dtype_and_prepare_runs_once(make_dir, tmp_path, monkeypatch):
    path = _copy(make_dir(), tmp_path)
    sd = load_file(path / "model.safetensors")
    for name in [n for n in sd if n.endswith("_proj.weight")]:
        out_f, in_f = sd.pop(name).shape
        base = name.removesuffix(".weight")
        sd[base + ".qweight"] = torch.full((in_f // 8, out_f), 0x12345678, dtype=torch.int32)
        sd[base + ".scales"] = torch.full((1, out_f), 0.5, dtype=torch.float16)
    save_file(sd, path / "model.safetensors")
    c = json.loads((path / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": False}
    (path / "config.json").write_text(json.dumps(c))
    monkeypatch.setattr(llama, "make_linear", FakeInt4)
    model, cfg = load_model(path, torch.bfloat16, "cpu")
    fakes = [m for m in model.modules() if isinstance(m, FakeInt4)]
    assert len(fakes) == 7 * cfg.num_layers
    for m in fakes:
        assert m.prepared == [(torch.bfloat16, torch.int32, torch.float16)]
        assert int(m.qweight[0, 0]) == 0x12345678
    assert model.model.norm.weight.dtype == torch.bfloat16 and model.score.weight.dtype == torch.bfloat16
