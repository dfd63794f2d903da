"""`scorer inspect` on test-built directories (plain and GPTQ-shaped) and on bad ones."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from scorer.cli import app

runner = CliRunner()


def test_inspect_classifier(make_dir):
    path = make_dir(num_labels=3)
    r = runner.invoke(app, ["inspect", str(path)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    out = r.output
    for want in ("LlamaForSequenceClassification", "4 / 2 / 16", "label_a, label_b, label_c",
                 "single_label_classification", "quantization", "none", "BOS added", "<s>", "float32",
                 "weight memory, bf16"):
        assert want in out, want
    n_params = sum(t.numel() for t in load_file(path / "model.safetensors").values())
    assert f"{n_params:,}" in out


def test_inspect_gptq_checkpoint_counts_logical_weights(make_dir, tmp_path):
    path = shutil.copytree(make_dir(), tmp_path / "q")
    sd = load_file(path / "model.safetensors")
    logical = sum(t.numel() for t in sd.values())
    for name in [n for n in sd if n.endswith("_proj.weight")]:
        out_f, in_f = sd.pop(name).shape
        base = name.removesuffix(".weight")
        sd[base + ".qweight"] = torch.zeros(in_f // 8, out_f, dtype=torch.int32)
        sd[base + ".qzeros"] = torch.zeros(1, out_f // 8, dtype=torch.int32)
        sd[base + ".scales"] = torch.zeros(1, out_f, dtype=torch.float16)
        sd[base + ".g_idx"] = torch.zeros(in_f, dtype=torch.int32)
    save_file(sd, path / "model.safetensors")
    c = json.loads((path / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": True, "sym": True}
    (path / "config.json").write_text(json.dumps(c))
    r = runner.invoke(app, ["inspect", str(path)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert f"{logical:,}" in r.output
    assert "GPTQ 4-bit, group per column, act-order yes" in r.output and "as stored" in r.output
    assert "bits per weight" in r.output


def test_inspect_errors_name_the_file(tmp_path, make_dir):
    r = runner.invoke(app, ["inspect", str(tmp_path)])
    assert r.exit_code == 2 and "config.json: not found" in r.output and "Traceback" not in r.output
    path = shutil.copytree(make_dir(), tmp_path / "bad")
    c = json.loads((path / "config.json").read_text())
    c["architectures"] = ["BertModel"]
    (path / "config.json").write_text(json.dumps(c))
    r = runner.invoke(app, ["inspect", str(path)])
    assert r.exit_code == 2 and "'architectures'" in r.output and len(r.output.strip().splitlines()) == 1
    (path / "model.safetensors").write_bytes(b"\x05")
    c["architectures"] = ["LlamaForSequenceClassification"]
    (path / "config.json").write_text(json.dumps(c))
    r = runner.invoke(app, ["inspect", str(path)])
    assert r.exit_code == 2 and "model.safetensors" in r.output


def _header(path, obj):
    import struct

    raw = json.dumps(obj).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)


BROKEN_WEIGHTS = {  # each was an AttributeError, TypeError or KeyError out of inspect and from_pretrained
    "index-weight_map-list": lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": []}'),
    "index-top-level-list": lambda d: (d / "model.safetensors.index.json").write_text("[]"),
    "index-shard-not-a-string": lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": 1}}'),
    "header-not-an-object": lambda d: _header(d, [1]),
    "header-entry-no-offsets": lambda d: _header(d, {"a": {"dtype": "F32", "shape": [1]}}),
}


@pytest.mark.parametrize("case", sorted(BROKEN_WEIGHTS))
def test_malformed_weights_are_named_not_a_traceback(make_dir, tmp_path, case):
    from scorer import Scorer
    from scorer.model.load import WeightsError

    path = shutil.copytree(make_dir(), tmp_path / case)
    BROKEN_WEIGHTS[case](path)
    r = runner.invoke(app, ["inspect", str(path)])
    assert r.exit_code == 2 and r.output.startswith("error: ") and str(path) in r.output, r.output
    if case.startswith("index"):  # from_pretrained reads headers through safetensors itself
        with pytest.raises(WeightsError, match="model.safetensors.index.json"):
            Scorer.from_pretrained(path, device="cpu")


def test_help_lists_every_command():
    r = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for cmd in ("run", "validate", "inspect", "quantize", "bench"):
        assert f" {cmd} " in r.output, cmd


def test_inspect_committed_demo_gptq_model():
    """The committed 4-bit demo checkpoint: what scorer sees agrees with the training script's metrics."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    metrics = json.loads((repo / "examples/models/debian-section-fp16/metrics.json").read_text())
    r = runner.invoke(app, ["inspect", str(repo / "examples/models/debian-section-gptq-4bit")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for want in (f"{metrics['parameters']:,}", "GPTQ 4-bit, group 128, act-order yes", "4 / 2 / 32",
                 ", ".join(sorted(metrics["per_class"])), "BOS added", "pad id"):
        assert want in r.output, want


def test_inspect_shows_rope_scaling(make_dir):
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    r = runner.invoke(app, ["inspect", str(make_dir(rope_scaling=llama3, rope_theta=500000.0))], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "theta 500000, llama3 x8" in r.output
