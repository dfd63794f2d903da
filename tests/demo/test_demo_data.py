"""The committed demo data (examples/data/debian) and fp16 model (examples/models/debian-section-fp16).

Everything here is committed, so nothing skips: the shards read back as one hive-partitioned table, ids are
unique, labels are the model's id2label, the splits are disjoint, and the fp16 model scored through
transformers (fp32 compute) reproduces the held-out accuracy that scripts/train_demo_model.py wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as ds
import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples/data/debian"
FP16 = REPO / "examples/models/debian-section-fp16"
COLUMNS = ["id", "title", "body", "text", "section", "split"]


@pytest.fixture(scope="module")
def table():
    return ds.dataset(DATA, format="parquet", partitioning="hive").to_table()


@pytest.fixture(scope="module")
def config():
    return json.loads((FP16 / "config.json").read_text())


@pytest.fixture(scope="module")
def metrics():
    return json.loads((FP16 / "metrics.json").read_text())


def test_shards_are_a_hive_partition(table):
    shards = sorted(DATA.glob("dt=*/part-*.parquet"))
    assert len(shards) >= 2, shards
    assert [p.parent.name for p in shards] == ["dt=2026-11-22"] * len(shards)
    assert table.column_names[: len(COLUMNS)] == COLUMNS and "dt" in table.column_names
    assert sum(p.stat().st_size for p in DATA.rglob("*.parquet")) < 2_000_000
    assert 3000 <= table.num_rows <= 6000


def test_rows_are_clean(table):
    rows = table.select(COLUMNS).to_pylist()
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    for r in rows:
        assert all(isinstance(r[c], str) and r[c] for c in COLUMNS), r["id"]
        assert r["text"] == f"{r['title']}\n\n{r['body']}", r["id"]
        assert "\n.\n" not in r["body"] and not r["body"].startswith(" "), r["id"]


def test_labels_and_splits(table, config):
    rows = table.select(["id", "section", "split"]).to_pylist()
    labels = set(config["id2label"].values())
    assert len(labels) == len(config["id2label"]) == 10
    assert {r["section"] for r in rows} == labels
    train = {r["id"] for r in rows if r["split"] == "train"}
    test = {r["id"] for r in rows if r["split"] == "test"}
    assert train and test and not train & test and len(train) + len(test) == len(rows)
    assert 0.1 < len(test) / len(rows) < 0.3
    for label in labels:  # every class is on both sides
        assert any(r["section"] == label and r["split"] == "test" for r in rows), label
        assert any(r["section"] == label and r["split"] == "train" for r in rows), label


def test_model_directory(config, metrics):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "metrics.json"):
        assert (FP16 / name).is_file(), name
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["problem_type"] == "single_label_classification"
    assert config["dtype"] == "float16" and config["pad_token_id"] == 3
    assert (FP16 / "model.safetensors").stat().st_size < 4_000_000
    assert metrics["heldout_accuracy"] >= 0.75 > 3 * metrics["majority_class_baseline"]


@pytest.fixture(scope="module")
def fp16_predictions(table, config, metrics):
    """Held-out rows and the fp16 model's labels through transformers (fp32 compute, ~860 rows, seconds)."""
    import torch
    import transformers

    torch.set_num_threads(2)
    test = [r for r in table.select(["id", "text", "section", "split"]).to_pylist() if r["split"] == "test"]
    tok = transformers.AutoTokenizer.from_pretrained(FP16)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(FP16, dtype=torch.float32).eval()
    assert tok.pad_token_id == config["pad_token_id"]
    enc = tok([r["text"] for r in test], truncation=True, max_length=metrics["max_length"])["input_ids"]
    assert all(ids[0] == tok.bos_token_id for ids in enc)

    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))  # length-sorted batches, right padding
    pred = [""] * len(enc)
    with torch.no_grad():
        for s in range(0, len(order), 64):
            idx = order[s : s + 64]
            batch = tok.pad({"input_ids": [enc[i] for i in idx]}, return_tensors="pt")
            logits = model(**batch).logits
            for i, p in zip(idx, logits.argmax(-1).tolist()):
                pred[i] = config["id2label"][str(p)]
    return test, pred


def test_fp16_heldout_accuracy_matches_metrics(fp16_predictions, metrics):
    test, pred = fp16_predictions
    assert len(test) == metrics["heldout_rows"]
    acc = sum(p == r["section"] for p, r in zip(pred, test)) / len(test)
    assert acc == pytest.approx(metrics["heldout_accuracy"], abs=0.01)
    for name, c in metrics["per_class"].items():
        rows = [(p, r) for p, r in zip(pred, test) if r["section"] == name]
        assert len(rows) == c["test"], name
        assert sum(p == r["section"] for p, r in rows) / len(rows) == pytest.approx(c["test_accuracy"], abs=0.03), name


@pytest.mark.slow
def test_gptq_4bit_heldout_accuracy_matches_metrics(fp16_predictions, metrics):
    """The committed 4-bit model through scorer's own loader and Int4Linear path (CPU, fp32 compute);
    ~10 s on 2 idle cores for the whole held-out split. Accuracy and label agreement with the fp16 model
    (through transformers) equal what the training script reported, within 1%."""
    import torch

    from scorer import Scorer

    torch.set_num_threads(2)
    q = metrics["gptq_4bit"]
    gptq = REPO / "examples/models/debian-section-gptq-4bit"
    assert q["status"] == "evaluated" and json.loads((gptq / "config.json").read_text())["quantization_config"]["bits"] == 4
    test, fp16 = fp16_predictions
    sc = Scorer.from_pretrained(gptq, device="cpu", dtype="float32", max_length=metrics["max_length"])
    labels = sc.score([r["text"] for r in test]).column("label").to_pylist()
    acc = sum(a == r["section"] for a, r in zip(labels, test)) / len(test)
    assert acc == pytest.approx(q["heldout_accuracy"], abs=0.01)
    assert acc >= metrics["heldout_accuracy"] - 0.02
    agree = sum(a == b for a, b in zip(labels, fp16)) / len(test)
    assert agree == pytest.approx(q["agreement_with_fp16"], abs=0.01)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def test_examples_readme_states_the_metrics(table, metrics):
    """examples/README.md's figures are the ones in metrics.json and in the data, not stale copies."""
    import re

    text = (REPO / "examples/README.md").read_text()
    q = metrics["gptq_4bit"]
    assert f"| **fp16** (`debian-section-fp16`) | **{_pct(metrics['heldout_accuracy'])}** |" in text
    assert f"| fp32, in memory after training | {_pct(metrics['heldout_accuracy_fp32_before_save'])} |" in text
    assert (f"| **4-bit GPTQ** (`debian-section-gptq-4bit`) | **{_pct(q['heldout_accuracy'])}** | "
            f"**{_pct(q['agreement_with_fp16'])}**") in text
    assert f"| fp16 through `scorer` | {_pct(q['fp16_heldout_accuracy_through_scorer'])} |" in text
    n_test = metrics["heldout_rows"]
    differ = round((1 - q["agreement_with_fp16"]) * n_test)
    assert f"({differ} of {n_test} labels differ{'s' if differ == 1 else ''})" in text
    assert f"**Held-out accuracy** ({n_test} test rows, 10 classes; the majority class is " \
           f"{100 * metrics['majority_class_baseline']:.1f}%)" in text
    assert f"{metrics['parameters']:,} parameters" in text
    line = re.search(r"Per class \(fp16\): ([^.]*(?:\.\d[^.]*)*)\.", " ".join(text.split())).group(1)
    stated = {k: float(v) / 100 for k, v in re.findall(r"(\w+) ([\d.]+)%", line)}
    assert stated == pytest.approx({k: v["test_accuracy"] for k, v in metrics["per_class"].items()}, abs=5e-4)
    # the section table: train / test / total per section and the totals, from the shards themselves
    rows = table.select(["section", "split"]).to_pylist()
    for name in metrics["per_class"]:
        tr = sum(r["section"] == name and r["split"] == "train" for r in rows)
        te = sum(r["section"] == name and r["split"] == "test" for r in rows)
        assert re.search(rf"^\| {name} +\| +{tr} \| +{te} \| +{tr + te} \|$", text, re.M), name
    tr = sum(r["split"] == "train" for r in rows)
    assert f"| **all**  | **{tr:,}** | **{len(rows) - tr:,}** | **{len(rows):,}** |" in text
