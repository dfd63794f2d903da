"""`scorer quantize` end to end on tiny models: report, checkpoint tensors, config, round trip, CLI."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scorer.kernels.reference import dequantize, unpack_qweight, unpack_qzeros
from scorer.model import quantize as qmod
from scorer.model.gptq import QuantSpec

CONFIGS = {  # name -> (spec, method)
    "g128-actorder-sym": (QuantSpec(group_size=128, act_order=True), "gptq"),
    "g32-asym": (QuantSpec(group_size=32, sym=False), "gptq"),
    "g64-actorder-static-asym": (QuantSpec(group_size=64, act_order=True, static_groups=True, sym=False), "gptq"),
    "g32-actorder-asym": (QuantSpec(group_size=32, act_order=True, sym=False), "gptq"),
}


def run(model_dir: Path, out: Path, texts: list[str], spec: QuantSpec, method: str = "gptq"):
    return qmod.quantize_model(model_dir, out, texts[:96], texts[96:128], spec=spec, method=method,
                               max_length=48, device="cpu", progress=False, calib_source="test")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, model_dir, texts):
    """name -> (out_dir, report, [QuantResult per linear, in quantization order])."""
    out = {}
    mp = pytest.MonkeyPatch()
    try:
        for name, (spec, method) in CONFIGS.items():
            results = []

            def recording(fn):
                def wrapped(*a, **k):
                    r = fn(*a, **k)
                    results.extend(r[0])
                    return r
                return wrapped

            mp.setattr(qmod, "_quantize_group", recording(qmod._quantize_group))
            d = tmp_path_factory.mktemp("q") / name
            report = run(model_dir, d, texts, spec, method)
            mp.undo()
            out[name] = (d, report, results)
    finally:
        mp.undo()
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gptq_error_at_most_rtn_on_every_linear(quantized, name):
    _, report, _ = quantized[name]
    rows = report["layers"]
    assert len(rows) == 3 * 7
    for r in rows:
        assert r["gptq"] <= r["rtn"], r
        assert 0 < r["gptq"] < 0.5
    assert report["summary"]["gptq_le_rtn"] == 21
    assert report["summary"]["gptq_mean"] < 0.9 * report["summary"]["rtn_mean"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_checkpoint_tensors_read_back_bit_exactly(quantized, name):
    d, _, results = quantized[name]
    spec, _ = CONFIGS[name]
    sd = load_file(str(d / "model.safetensors"))
    names = [f"model.layers.{i}.{lin}" for i in range(3) for lin in qmod.LINEARS]
    assert len(results) == len(names)
    for prefix, res in zip(names, results):
        qw, qz, sc, gi = (sd[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
        assert f"{prefix}.weight" not in sd
        assert qw.dtype == qz.dtype == gi.dtype == torch.int32 and sc.dtype == torch.float16
        assert torch.equal(gi, res.g_idx)
        assert torch.equal(unpack_qweight(qw), res.q)
        assert torch.equal(unpack_qzeros(qz, v1=True), res.zeros)
        assert torch.equal(sc, res.scales)
        w = dequantize(qw, qz, sc, gi, v1=True)  # (K, N) fp16
        assert torch.equal(w.float().T, res.weight)  # what GPTQ compensated for is what the loader sees
        k = qw.shape[0] * 8
        if spec.act_order and not spec.static_groups and sc.shape[0] > 1:
            assert not bool((gi[1:] >= gi[:-1]).all()), prefix  # permutation-derived
        else:
            gs = k if spec.group_size == -1 else spec.group_size
            assert torch.equal(gi, (torch.arange(k) // gs).to(torch.int32))
        if spec.sym:
            assert (res.zeros == 8).all() and (qz == 0x77777777).all()
        assert torch.equal(gptqmodel_dequant(qw, qz, sc, gi).float().T, res.weight), prefix
    # scorer's own loader (v1 zeros -> true zeros, act-order rows made sequential) gives back the same W
    from scorer.model.load import load_model

    model, _ = load_model(d, dtype=torch.float32, device="cpu")
    for prefix, res in zip(names, results):
        assert torch.equal(model.get_submodule(prefix).dequantized_weight(), res.weight), prefix


def gptqmodel_dequant(qweight, qzeros, scales, g_idx) -> torch.Tensor:
    """GPTQModel's reading of a v1 checkpoint, written out independently of scorer.kernels.reference:
    convert_gptq_v1_to_v2_format adds 0x11111111 to each int32 qzeros word, then TorchQuantLinear's
    dequantize_weight shifts by wf = [0, 4, ..., 28], masks 0xF and computes scales[g_idx] * (q - z[g_idx])."""
    wf = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (qzeros.to(torch.int64) + 0x11111111) & 0xFFFFFFFF
    zeros = ((words[:, :, None] >> wf[None, None, :]) & 0xF).reshape(qzeros.shape[0], -1)
    codes = (((qweight.to(torch.int64) & 0xFFFFFFFF)[:, None, :] >> wf[None, :, None]) & 0xF).reshape(-1, qweight.shape[1])
    g = g_idx.long()
    return scales[g] * (codes - zeros[g]).to(torch.float16)


def exllama_dequant(qweight, qzeros, scales, g_idx) -> torch.Tensor:
    """The other reading of v1 zeros: exllama-style kernels (AutoGPTQ, vLLM's GPTQ path) take each nibble
    of qzeros and add 1 to it, with no carry between nibbles (a stored 15 reads 16; some torch fallbacks
    mask after the +1 and read 0: both agree on stored 0..14, which is all the quantizer writes)."""
    wf = torch.arange(0, 32, 4, dtype=torch.int64)
    nib = ((qzeros.to(torch.int64) & 0xFFFFFFFF)[:, :, None] >> wf[None, None, :]) & 0xF
    zeros = (nib + 1).reshape(qzeros.shape[0], -1)
    codes = (((qweight.to(torch.int64) & 0xFFFFFFFF)[:, None, :] >> wf[None, :, None]) & 0xF).reshape(-1, qweight.shape[1])
    g = g_idx.long()
    return scales[g] * (codes - zeros[g]).to(torch.float16)


def test_asym_v1_files_read_alike_by_both_zero_conventions(tmp_path, model_dir, texts):
    """A group whose weights are all >= 0 would get zero point 0, stored in v1 as -1, which readers take
    apart differently (whole word or per nibble). The quantizer gives it zero 1 instead, so GPTQModel's,
    exllama's and scorer's readings of the file are one W, the one GPTQ compensated for."""
    from safetensors.torch import save_file

    src = tmp_path / "pos"
    src.mkdir()
    for f in model_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(src / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    sd[name][:3] = sd[name][:3].abs()  # output rows 0..2: every group non-negative
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    run(src, out, texts, QuantSpec(group_size=32, sym=False, act_order=True))
    q = load_file(str(out / "model.safetensors"))
    p = "model.layers.0.mlp.down_proj"
    qz = q[f"{p}.qzeros"]
    z = unpack_qzeros(qz, v1=True)
    assert (z[0, :3] == 1).all()  # group 0 is fitted first, on the untouched (non-negative) weights
    assert int(unpack_qzeros(qz, v1=False).max()) <= 14  # stored z - 1: no nibble of 15, no borrow
    parts = [q[f"{p}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")]
    w = dequantize(*parts, v1=True)
    g0 = q[f"{p}.g_idx"] == 0
    assert (w[g0, :3] >= -q[f"{p}.scales"][0, :3].float()).all()  # one step below 0 at most
    assert torch.equal(gptqmodel_dequant(*parts), w) and torch.equal(exllama_dequant(*parts), w)
    for lp in (k[: -len(".qzeros")] for k in q if k.endswith(".qzeros")):  # every layer, not only that one
        ps = [q[f"{lp}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")]
        assert torch.equal(gptqmodel_dequant(*ps), exllama_dequant(*ps)), lp
    from scorer.model.load import load_model

    model, _ = load_model(out, dtype=torch.float32, device="cpu")  # and scorer's loader
    assert torch.equal(model.get_submodule(p).dequantized_weight(), w.float().T)


def test_written_config_and_files(quantized, model_dir):
    from scorer.model.config import LlamaConfig
    from scorer.model.quant_config import QuantConfig

    d, report, _ = quantized["g128-actorder-sym"]
    conf = json.loads((d / "config.json").read_text())
    qc = conf["quantization_config"]
    for key, value in {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True,
                       "static_groups": False, "checkpoint_format": "gptq", "format": "gptq",
                       "true_sequential": True, "lm_head": False, "pack_dtype": "int32", "damp_percent": 0.01}.items():
        assert qc[key] == value, key
    assert qc["meta"]["quantizer"][0].startswith("scorer:")
    assert json.loads((d / "quantize_config.json").read_text()) == qc
    assert (conf.get("dtype") or conf.get("torch_dtype")) == "float16"
    src = json.loads((model_dir / "config.json").read_text())
    assert {k: v for k, v in conf.items() if k not in ("quantization_config", "dtype", "torch_dtype")} == \
        {k: v for k, v in src.items() if k not in ("dtype", "torch_dtype")}
    assert QuantConfig.from_model_dir(d, conf) == QuantConfig.from_dict(qc, str(d / "config.json"))
    cfg = LlamaConfig.from_hf_dir(d)
    assert cfg.quant.desc_act and cfg.quant.v1 and cfg.quant.group_size == 128
    for f in ("tokenizer.json", "tokenizer_config.json", "quantization_report.json"):
        assert (d / f).is_file()
    sd = load_file(str(d / "model.safetensors"))
    ref = load_file(str(model_dir / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "model.norm.weight", "score.weight", "model.layers.1.input_layernorm.weight"):
        assert sd[name].dtype == torch.float16 and torch.equal(sd[name], ref[name])
    assert json.loads((d / "quantization_report.json").read_text())["layers"] == report["layers"]
    import transformers

    hf = transformers.GPTQConfig.from_dict(qc)
    assert (hf.bits, hf.group_size, hf.desc_act, hf.sym) == (4, 128, True, True)
    assert hf.to_dict()["checkpoint_format"] == "gptq"


def test_report_agreement_and_rtn(quantized, tmp_path, model_dir, texts):
    _, report, _ = quantized["g128-actorder-sym"]
    a = report["agreement"]
    assert a["rows"] == 32 and a["label_agreement"] >= 0.9 and a["max_prob_diff"] < 0.2
    rep = run(model_dir, tmp_path / "rtn", texts, QuantSpec(group_size=32), method="rtn")
    assert all(r["gptq"] is None and r["rtn"] > 0 for r in rep["layers"])
    qc = json.loads((tmp_path / "rtn" / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is False and qc["meta"]["algorithm"] == "rtn"


def test_round_trip_scores_on_cpu(quantized, model_dir, texts):
    import scorer

    d, _, _ = quantized["g32-actorder-asym"]
    held = texts[300:364]
    src = scorer.Scorer.from_pretrained(model_dir, device="cpu", dtype="float32").score(held)
    qs = scorer.Scorer.from_pretrained(d, device="cpu", dtype="float32")
    q = qs.score(held)
    assert q.column("error").null_count == len(held)
    # q/k/v (and gate/up) were quantized from one Hessian, so they share one act-order order and load fused
    from scorer.model.linear import Int4Linear

    attn = [m for m in qs.model.modules() if type(m).__name__ == "Attention"]
    mlp = [m for m in qs.model.modules() if type(m).__name__ == "MLP"]
    assert attn and all(isinstance(a.qkv_proj, Int4Linear) and a.qkv_proj.perm is not None for a in attn)
    assert mlp and all(isinstance(m.gate_up_proj, Int4Linear) and m.down_proj.perm is None for m in mlp)
    labels_src, labels_q = src.column("label").to_pylist(), q.column("label").to_pylist()
    agree = sum(a == b for a, b in zip(labels_src, labels_q)) / len(held)
    diff = (torch.tensor(src.column("probs").to_pylist()) - torch.tensor(q.column("probs").to_pylist())).abs().max()
    assert agree >= 0.9 and float(diff) < 0.2, (agree, float(diff))


# -- the command ---------------------------------------------------------------------------------------

def cli(*args: str):
    from typer.testing import CliRunner

    from scorer.cli import app

    return CliRunner().invoke(app, ["quantize", *map(str, args)])


def test_cli_writes_checkpoint_and_report(tmp_path, model_dir, calib_dir):
    out = tmp_path / "out"
    res = cli(model_dir, out, "--calib", calib_dir, "--samples", "48", "--max-length", "32", "--group-size", "64",
              "--device", "cpu", "--seed", "3")
    assert res.exit_code == 0, res.output
    printed = res.output
    for i in (1, 2, 3):  # a progress bar per layer: its 7 linears in 4 groups, then the layer's outputs
        assert re.search(rf"layer {i}/3 .* 8/8", printed), printed
    assert re.search(r"layer\s*┃\s*linear\s*┃\s*GPTQ\s*┃\s*RTN\s*┃\s*GPTQ/RTN", printed), printed  # the printed table
    assert len(re.findall(r"│\s+[012] │ (self_attn|mlp)\.\w+_proj\s+│ 0\.\d{4} │ 0\.\d{4} │\s+0\.\d\d │", printed)) == 21, printed
    assert "GPTQ <= RTN on 21/21 linears" in printed
    assert re.search(r"held-out rows: 12, label agreement [01]\.\d{4}, max probability difference 0\.\d{4}", printed), printed
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["calibration"]["texts"] == 48 and report["calibration"]["heldout_texts"] == 12
    assert report["calibration"]["source"] == str(calib_dir)


@pytest.mark.parametrize("args, needle", [
    ((), "give exactly one of --calib"),
    (("--calib", "{calib}", "--text-column", "body"), "no column(s) body"),
    (("--calib", "{tmp}/nothing/*.parquet"), "no Parquet files"),
    (("--calib", "{calib}", "--bits", "3"), "--bits 3"),
    (("--calib", "{calib}", "--group-size", "100"), "--group-size 100"),
    (("--calib", "{calib}", "--method", "awq"), "--method 'awq'"),
    (("--calib", "{calib}", "--damp", "1.5"), "--damp 1.5"),
    (("--calib", "{calib}", "--damp", "0"), "--damp 0.0: use a fraction in (0, 1)"),  # GPTQConfig refuses 0
    (("--calib-job", "nothere.yaml"), "jobs.yaml:NAME"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, model_dir, calib_dir, args, needle):
    args = [a.format(calib=calib_dir, tmp=tmp_path) for a in args]
    res = cli(model_dir, tmp_path / "out", *args)
    assert res.exit_code == 2, res.output
    assert needle in res.output and res.output.strip().count("\n") == 0, res.output
    assert not (tmp_path / "out").exists()


def test_cli_refuses_nonempty_out_dir_and_quantized_source(tmp_path, model_dir, calib_dir, quantized):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    res = cli(model_dir, out, "--calib", calib_dir)
    assert res.exit_code == 2 and "not empty" in res.output
    d, _, _ = quantized["g32-asym"]
    res = cli(d, tmp_path / "again", "--calib", calib_dir)
    assert res.exit_code == 2 and "already 4-bit GPTQ" in res.output, res.output
    side = shutil.copytree(d, tmp_path / "side")  # the GPTQ fields only in quantize_config.json: that file is named
    conf = json.loads((side / "config.json").read_text())
    conf.pop("quantization_config")
    (side / "config.json").write_text(json.dumps(conf))
    res = cli(side, tmp_path / "again2", "--calib", calib_dir)
    assert res.exit_code == 2 and f"{side / 'quantize_config.json'}: says the model is already 4-bit" in res.output


def test_an_out_dir_that_cannot_be_created_is_refused_before_any_work(tmp_path, model_dir, calib_dir, monkeypatch):
    """OUT_DIR under a regular file passed validation; the whole run happened, then the stage's mkdir died
    with a bare NotADirectoryError (exit 1)."""
    (tmp_path / "afile").write_text("x")
    ran = []
    monkeypatch.setattr(qmod, "quantize_model", lambda *a, **k: ran.append(1))
    res = cli(model_dir, tmp_path / "afile" / "q", "--calib", calib_dir, "--samples", "8", "--max-length", "16",
              "--device", "cpu", "--method", "rtn")
    assert res.exit_code == 2 and not ran, (res.exit_code, res.output)
    assert f"{tmp_path / 'afile'} is not a writable directory" in res.output and res.output.strip().count("\n") == 0


def test_small_samples_calibrate_on_exactly_samples_texts(tmp_path, model_dir, calib_dir):
    """--samples 4 read 4 + 2 texts, then held out 6 // 5 = 1 and calibrated on 5."""
    res = cli(model_dir, tmp_path / "out", "--calib", calib_dir, "--samples", "4", "--max-length", "16",
              "--device", "cpu")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "quantization_report.json").read_text())
    assert report["calibration"]["texts"] == 4 and report["calibration"]["heldout_texts"] == 2


def test_a_failure_before_the_report_leaves_no_out_dir(tmp_path, model_dir, texts, monkeypatch):
    """The report was built and written after the checkpoint was renamed into OUT_DIR: a failure or kill
    between the two left a loadable checkpoint without its report, from a command that failed, and a rerun
    refused the directory. The report is now staged with the checkpoint."""
    def boom(rows):
        raise RuntimeError("injected failure while building the report")

    monkeypatch.setattr(qmod, "_summary", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="injected"):
        qmod.quantize_model(model_dir, out, texts[:16], texts[16:24], spec=QuantSpec(group_size=32),
                            method="rtn", max_length=16, device="cpu", progress=False, calib_source="t")
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    monkeypatch.undo()
    report = qmod.quantize_model(model_dir, out, texts[:16], texts[16:24], spec=QuantSpec(group_size=32),
                                 method="rtn", max_length=16, device="cpu", progress=False, calib_source="t")
    assert json.loads((out / "quantization_report.json").read_text()) == report
    assert report["quantization"]["dtype"] in ("float16", "bfloat16")


def test_cli_without_tokenizer_and_into_the_current_directory(tmp_path, model_dir, calib_dir, monkeypatch):
    notok = shutil.copytree(model_dir, tmp_path / "notok")
    (notok / "tokenizer.json").unlink()
    res = cli(notok, tmp_path / "out", "--calib", calib_dir, "--samples", "8", "--max-length", "16")
    assert res.exit_code == 2 and "tokenizer.json" in res.output and res.output.strip().count("\n") == 0, res.output
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)  # OUT_DIR "." (empty): the checkpoint lands in it
    res = cli(model_dir, Path("."), "--calib", calib_dir, "--samples", "8", "--max-length", "16", "--device", "cpu",
              "--method", "rtn")
    assert res.exit_code == 0, res.output
    assert (here / "model.safetensors").is_file() and (here / "quantize_config.json").is_file()
    assert not [p for p in here.iterdir() if p.name.startswith(".")]  # no stage left inside


def test_calibration_sampling_is_seeded_and_skips_empty(calib_dir, texts):
    a = qmod.read_calibration(str(calib_dir), "text", 50, seed=1)
    b = qmod.read_calibration(str(calib_dir), "text", 50, seed=1)
    c = qmod.read_calibration(str(calib_dir / "*.parquet"), "text", 50, seed=2)
    assert a == b and a != c and len(a) == len(c) == 50
    assert set(a) <= set(texts) and all(t.strip() for t in a)
    assert len(qmod.read_calibration(str(calib_dir / "part-0.parquet"), "text", 10_000, seed=0)) == 200


def test_calibration_samples_a_whole_shard_in_bounded_memory(tmp_path):
    """One large shard sorted by a column: the draw spans the whole file (a reservoir, not its head)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"text {i}" for i in range(100_000)]}), tmp_path / "big.parquet",
                   row_group_size=8192)
    got = qmod.read_calibration(str(tmp_path / "big.parquet"), "text", 40, seed=0)
    rows = sorted(int(t.split()[1]) for t in got)
    assert len(set(rows)) == 40 and rows[-1] > 50_000 and sum(r > 8192 for r in rows) > 20, rows


def test_calib_job_takes_input_template_and_filter(tmp_path, model_dir, calib_dir):
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        "jobs:\n"
        "  nightly:\n"
        f"    model: {model_dir}\n"
        f"    input: {calib_dir}/*.parquet\n"
        '    text: "#{n}: {text}"\n'
        "    id: n\n"
        "    filter: n < 20\n"
        f"    output: {tmp_path}/scored\n"
    )
    texts, source = qmod._job_texts(f"{jobs}:nightly", 1000, seed=0)
    assert "nightly" in source and len(texts) == 40  # rows 0..19 of both shards (the template is never empty)
    assert all(t.startswith("#") and int(t[1:].split(":")[0]) < 20 for t in texts)
    res = cli(model_dir, tmp_path / "out", "--calib-job", f"{jobs}:nightly", "--samples", "24", "--max-length", "24",
              "--device", "cpu")
    assert res.exit_code == 0, res.output
    res = cli(model_dir, tmp_path / "out2", "--calib-job", f"{jobs}:daily")
    assert res.exit_code == 2 and "no job named 'daily'" in res.output, res.output


def test_true_sequential_layer_by_layer(tmp_path, model_dir, texts, monkeypatch):
    """Each group's Hessians are taken with the earlier groups of its layer already quantized (q/k/v, then o,
    then gate/up, then down), and only the layer being quantized is held in fp32: earlier ones are freed,
    later ones are still the source's fp16 tensors."""
    import gc
    import weakref

    src = {k: v.float() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    state: dict = {"i": None, "refs": []}
    hessians: list[tuple[int, str, list[str]]] = []  # (layer, linear, linears of the layer already quantized)
    real_load, real_linears, real_hessian = qmod._load_source, qmod._quantize_linears, qmod._input_hessian

    def load_source(*a, **k):
        state["model"], cfg = real_load(*a, **k)
        return state["model"], cfg

    def quantize_linears(layer, i, *a, **k):
        if state["i"] != i:  # the first group of a new layer
            state["refs"].append(weakref.ref(layer))
            gc.collect()
            layers = state["model"].model.layers
            assert [r() is None for r in state["refs"][:-1]] == [True] * i  # layers before i: freed
            assert all(not list(layers[j].parameters()) for j in range(i))
            assert {p.dtype for p in layer.parameters()} == {torch.float32}
            assert all(p.dtype == torch.float16 for j in range(i + 1, len(layers)) for p in layers[j].parameters())
            state["i"] = i
        return real_linears(layer, i, *a, **k)

    def input_hessian(layer, linear, s):
        i = state["i"]
        name = next(n for n, m in layer.named_modules() if m is linear)
        done = [n for n in qmod.LINEARS if not torch.equal(layer.get_submodule(n).weight, src[f"model.layers.{i}.{n}.weight"])]
        hessians.append((i, name, done))
        return real_hessian(layer, linear, s)

    monkeypatch.setattr(qmod, "_load_source", load_source)
    monkeypatch.setattr(qmod, "_quantize_linears", quantize_linears)
    monkeypatch.setattr(qmod, "_input_hessian", input_hessian)
    run(model_dir, tmp_path / "q", texts, QuantSpec(group_size=32, act_order=True))
    want = []
    for i in range(3):
        want += [(i, "self_attn.q_proj", []), (i, "self_attn.o_proj", list(qmod.LINEARS[:3])),
                 (i, "mlp.gate_proj", list(qmod.LINEARS[:4])), (i, "mlp.down_proj", list(qmod.LINEARS[:6]))]
    assert hessians[::2] == want and hessians[1::2] == want  # calibration rows, then the held-out ones
