"""`scorer quantize`: a 4-bit GPTQ (or RTN) checkpoint from an fp16/bf16/fp32 model, layer by layer.

    texts -> tokens -> embed                                   (CPU, source dtype; then fp32 on the device)
    for each decoder layer (moved alone to the device in fp32):
        held-out source stream: h_src = layer(h_src) with the original weights (for the final agreement)
        for group in (q,k,v) -> (o) -> (gate,up) -> (down):          # true-sequential
            run the calibration batches (and the held-out ones) up to the group's input, real tokens only,
            into H_fit = 2/n sum x x^T and H_held = sum x x^T (a hook that stops the forward there)
            quantize each linear of the group with GPTQ(H_fit) (or RTN) and put the dequantized weights in
            report ||X dW^T|| / ||X W^T|| on the held-out rows for GPTQ and for RTN (from H_held)
        h = layer(h) with the quantized weights: the next layer's inputs (calibration and held-out)
    final norm + head on both held-out streams -> label agreement, max probability difference

Peak device memory is one fp32 layer, its Hessians and the hidden states of the calibration set.
The output is a GPTQ v1 checkpoint (DESIGN.md): config.json with `quantization_config` (plus the
quantize_config.json older loaders read), model.safetensors with qweight/qzeros/scales/g_idx per linear
and every other tensor copied from the source (fp32 ones cast to fp16), the tokenizer files, and
quantization_report.json. It is written to a staging directory and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scorer.model.gptq import Hessian, QuantSpec, gptq, relative_output_error, rtn

LINEAR_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),  # share one input: one Hessian
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
LINEARS = tuple(name for group in LINEAR_GROUPS for name in group)
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                   "generation_config.json", "chat_template*", "*.tiktoken")
QUANTIZER = "scorer"
DAMP_STEP = 0.0015  # added to damp while the Hessian's Cholesky factorization fails (GPTQModel's default)


class QuantizeError(ValueError):
    """Bad input to `scorer quantize`: the message names the file or option, the field and the fix."""


@dataclass
class _Stream:
    """Token batches (on the device) and their hidden states as they pass through the layers."""

    batches: list  # scorer.batching.Batch
    rope: list  # (cos, sin, mask_4d) per batch
    hidden: list[torch.Tensor] = field(default_factory=list)  # (B, T, H) fp32

    @property
    def tokens(self) -> int:
        return sum(b.real_tokens for b in self.batches)


class _Stop(Exception):
    """Raised by the input hook: the rest of the layer's forward is not needed."""


def quantize_model(
    model_dir: str | Path,
    out_dir: str | Path,
    texts: list[str],
    heldout: list[str],
    *,
    spec: QuantSpec,
    method: str = "gptq",
    max_length: int = 512,
    device: str | torch.device = "auto",
    max_batch_tokens: int = 8192,
    progress: bool = True,
    calib_source: str = "",
) -> dict[str, Any]:
    """Quantize `model_dir` into `out_dir`, calibrated on `texts`, reported on `heldout`; returns the report."""
    from scorer.api import resolve_device
    from scorer.model.heads import activate
    from scorer.model.load import load_model, load_tokenizer, pad_token_id
    from scorer.model.llama import attention_mask_4d, rope_cos_sin, rope_inv_freq

    t0 = time.time()
    if method not in ("gptq", "rtn"):
        raise QuantizeError(f"--method is {method!r}; use gptq or rtn.")
    if not heldout:
        raise QuantizeError("no held-out texts: give --samples of at least 2 with as many rows in --calib.")
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model_dir, out_dir = Path(model_dir), Path(out_dir).resolve()
    try:  # before the weights: a tokenizer that does not load fails in a second, not after the whole model
        tok = load_tokenizer(model_dir, max_length)
    except ValueError as e:  # ConfigError is one
        raise QuantizeError(str(e)) from e
    model, cfg = _load_source(model_dir, load_model)
    _check_shapes(cfg)
    pad_id = pad_token_id(cfg, tok)  # the rule Scorer pads with

    inv_freq = rope_inv_freq(cfg).to(dev)
    embed = model.model.embed_tokens

    def stream(batch_texts: list[str]) -> _Stream:
        from scorer.batching import collate, plan_batches

        ids = [e.ids for e in tok.encode_batch(batch_texts, add_special_tokens=True)]
        ids = [x for x in ids if x]
        s = _Stream([], [])
        for rows in plan_batches([len(x) for x in ids], max_batch_tokens, max_rows=256):
            b = collate(ids, rows, pad_id).to(dev)
            s.batches.append(b)
            s.rope.append((*rope_cos_sin(cfg, inv_freq, b.position_ids, torch.float32), attention_mask_4d(b.attention_mask)))
            s.hidden.append(embed(b.input_ids.cpu()).to(dev, torch.float32))
        return s

    fit = stream(texts) if method == "gptq" else _Stream([], [])
    held = stream(heldout)
    src = _Stream(held.batches, held.rope, [h.clone() for h in held.hidden])  # the unquantized model's stream
    if (method == "gptq" and fit.tokens == 0) or held.tokens == 0:
        raise QuantizeError(f"{calib_source}: the calibration texts tokenize to nothing; check --text-column.")

    prefix = cfg.weight_prefix
    tensors: dict[str, torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    layers = model.model.layers
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   disable=not progress, transient=False)
    with bar, torch.no_grad():
        for i in range(len(layers)):
            task = bar.add_task(f"layer {i + 1}/{len(layers)}", total=len(LINEARS) + 1)
            layer = layers[i].to(dev, torch.float32)
            src.hidden = [_run(layer, h, r, b) for h, r, b in zip(src.hidden, src.rope, src.batches)]
            for group in LINEAR_GROUPS:
                bar.update(task, description=f"layer {i + 1}/{len(layers)} {'/'.join(n.split('.')[1] for n in group)}")
                rows += _quantize_linears(layer, i, group, fit, held, spec, method, prefix, tensors, dev)
                bar.update(task, advance=len(group))
            bar.update(task, description=f"layer {i + 1}/{len(layers)} outputs")
            fit.hidden = [_run(layer, h, r, b) for h, r, b in zip(fit.hidden, fit.rope, fit.batches)]
            held.hidden = [_run(layer, h, r, b) for h, r, b in zip(held.hidden, held.rope, held.batches)]
            layers[i] = torch.nn.Module()  # free the layer (host and device) before the next one moves in
            del layer
            bar.update(task, advance=1, description=f"layer {i + 1}/{len(layers)}")

        agreement = _agreement(model, cfg, src, held, dev, activate)

    warnings = []
    k_max = max(cfg.hidden_size, cfg.intermediate_size)
    if method == "gptq" and fit.tokens < 2 * k_max:
        warnings.append(f"only {fit.tokens} calibration tokens for linears with up to {k_max} inputs: GPTQ fits "
                        f"the calibration set and can do worse than RTN on new text; use at least {4 * k_max} "
                        "tokens (--samples x --max-length)")
    report = {
        "model": str(model_dir),
        "out_dir": str(out_dir),
        "method": method,
        "quantization": {"bits": spec.bits, "group_size": spec.group_size, "desc_act": _desc_act(spec, method),
                         "sym": spec.sym, "static_groups": spec.static_groups, "damp": spec.damp,
                         "checkpoint_format": "gptq", "dtype": None},  # set by _write_checkpoint
        "calibration": {"source": calib_source, "texts": len(texts) if method == "gptq" else 0,
                        "tokens": fit.tokens, "heldout_texts": len(heldout), "heldout_tokens": held.tokens,
                        "max_length": max_length},
        "layers": rows,
        "summary": _summary(rows),
        "agreement": agreement,
        "warnings": warnings,
        "device": str(dev),
        "peak_memory_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        "wall_s": round(time.time() - t0, 3),  # before the checkpoint is written
    }
    try:
        _write_checkpoint(model_dir, out_dir, cfg, tensors, spec, method, report)
    except OSError as e:  # a full disk, a directory that went away: the stage is gone, OUT_DIR untouched
        raise QuantizeError(f"OUT_DIR {out_dir}: the checkpoint could not be written ({e}).") from e
    return report


def _quantize_linears(layer, i: int, group: tuple[str, ...], fit: _Stream, held: _Stream, spec: QuantSpec,
                      method: str, prefix: str, tensors: dict[str, torch.Tensor], dev: torch.device) -> list[dict[str, Any]]:
    """Quantize the linears of `group` (one shared input) of layer i in place; add their packed tensors
    (named `{prefix}layers.{i}.{linear}.qweight`, ...) to `tensors`; return their report rows."""
    mods = [layer.get_submodule(n) for n in group]
    H_fit = _input_hessian(layer, mods[0], fit) if method == "gptq" else None
    H_held = _input_hessian(layer, mods[0], held).H  # held-out Gram matrix, for the errors only
    _sync(dev)  # so `seconds` is the solve alone, not the forwards queued before it
    t1 = time.time()
    results, baselines = _quantize_group([m.weight.detach() for m in mods], H_fit, spec, method)
    _sync(dev)
    secs = round((time.time() - t1) / len(group), 4)
    rows = []
    for name, lin, res, base in zip(group, mods, results, baselines):
        W = lin.weight.detach()
        rows.append({
            "layer": i, "linear": name,
            "gptq": relative_output_error(res.weight - W, W, H_held) if method == "gptq" else None,
            "rtn": relative_output_error(base.weight - W, W, H_held),
            "damp": res.damp if method == "gptq" else None,
            "seconds": secs,
        })
        tensors.update(_packed(f"{prefix}layers.{i}.{name}", res, lin.bias))
        lin.weight.data = res.weight.to(lin.weight.dtype)
    return rows


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _quantize_group(weights: list[torch.Tensor], H_fit: Hessian | None, spec: QuantSpec, method: str):
    """(results, RTN baselines) for linears sharing one input, quantized as one stacked weight."""
    sizes = [w.shape[0] for w in weights]
    W = torch.cat(weights) if len(weights) > 1 else weights[0]
    base = rtn(W, spec)
    res = gptq(W, H_fit.H, spec) if method == "gptq" else base
    return res.split(sizes), base.split(sizes)


def _load_source(model_dir: Path, load_model):
    from scorer.model.config import ConfigError, LlamaConfig

    try:
        cfg = LlamaConfig.from_hf_dir(model_dir)
    except ConfigError as e:
        raise QuantizeError(str(e)) from e
    if cfg.quant is not None:
        raise QuantizeError(
            f"{cfg.quant.source}: says the model is already {cfg.quant.bits}-bit GPTQ; quantize its fp16/bf16 "
            "source instead."
        )
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.torch_dtype, torch.float32)
    try:
        return load_model(model_dir, dtype=dtype, device="cpu")  # layers go to the device one at a time
    except ValueError as e:
        raise QuantizeError(str(e)) from e


def _check_shapes(cfg) -> None:
    """qweight packs 8 rows of K per int32 and qzeros 8 columns of N: every K and N must divide by 8."""
    dims = {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_key_value_heads * head_dim": cfg.num_kv_heads * cfg.head_dim,
            "num_attention_heads * head_dim": cfg.num_heads * cfg.head_dim}
    for key, v in dims.items():
        if v % 8:
            raise QuantizeError(f"{cfg.path}/config.json: {key} = {v} is not a multiple of 8; GPTQ packing needs it.")


def _run(layer, h: torch.Tensor, rope, batch) -> torch.Tensor:
    """One decoder layer on one batch; padding positions are zeroed so they stay finite."""
    cos, sin, mask = rope
    out = layer(h, cos, sin, mask)
    return out.masked_fill_(~batch.attention_mask[..., None], 0.0)


def _input_hessian(layer, linear, s: _Stream) -> Hessian:
    """Hessian of `linear`'s input over the real tokens of stream `s` (the forward stops at the linear)."""
    H = Hessian(linear.in_features, s.hidden[0].device if s.hidden else "cpu")
    state: dict[str, Any] = {}

    def hook(_mod, args):
        x = args[0]
        H.add(x[state["mask"]])  # (tokens, K): real tokens only
        raise _Stop

    handle = linear.register_forward_pre_hook(hook)
    try:
        for h, r, b in zip(s.hidden, s.rope, s.batches):
            state["mask"] = b.attention_mask
            try:
                layer(h, *r)
            except _Stop:
                pass
    finally:
        handle.remove()
    return H


def _packed(name: str, res, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    from scorer.kernels.reference import pack_gptq

    p = pack_gptq(res.q, res.zeros, res.scales, res.g_idx, v1=True)  # on the device, then to the host
    out = {f"{name}.{k}": p[k].cpu().contiguous() for k in ("qweight", "qzeros", "scales", "g_idx")}
    if bias is not None:
        out[f"{name}.bias"] = bias.detach().to("cpu", torch.float16).contiguous()
    return out


def _agreement(model, cfg, src: _Stream, held: _Stream, dev, activate) -> dict[str, Any]:
    """Compare the source model and the quantized one on the held-out rows (final norm + head, fp32)."""
    norm = model.model.norm.to(dev, torch.float32)
    if cfg.is_classifier:
        model.score.to(dev, torch.float32)
        p_src, p_q = [], []
        for hs, hq, b in zip(src.hidden, held.hidden, held.batches):
            p_src.append(activate(model.logits(norm(hs), b.input_ids, b.attention_mask), cfg.problem_type))
            p_q.append(activate(model.logits(norm(hq), b.input_ids, b.attention_mask), cfg.problem_type))
        a, q = torch.cat(p_src), torch.cat(p_q)
        out: dict[str, Any] = {"rows": a.shape[0], "problem_type": cfg.problem_type,
                               "max_prob_diff": float((a - q).abs().max())}
        if cfg.problem_type == "single_label_classification":
            out["label_agreement"] = float((a.argmax(-1) == q.argmax(-1)).float().mean())
        elif cfg.problem_type == "multi_label_classification":
            out["label_agreement"] = float(((a >= 0.5) == (q >= 0.5)).all(-1).float().mean())
        return out
    from scorer.model.heads import finish_embedding, pool

    cos = []
    for hs, hq, b in zip(src.hidden, held.hidden, held.batches):
        es = finish_embedding(pool(norm(hs), b.attention_mask, "last"), True, None)
        eq = finish_embedding(pool(norm(hq), b.attention_mask, "last"), True, None)
        cos.append((es * eq).sum(-1))
    c = torch.cat(cos)
    return {"rows": c.shape[0], "min_cosine": float(c.min()), "mean_cosine": float(c.mean())}


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    r = [x["rtn"] for x in rows]
    out: dict[str, Any] = {"linears": len(rows), "rtn_mean": sum(r) / len(r)}
    if rows and rows[0]["gptq"] is not None:
        g = [x["gptq"] for x in rows]
        out["gptq_mean"] = sum(g) / len(g)
        out["gptq_le_rtn"] = sum(a <= b for a, b in zip(g, r))
    return out


def _desc_act(spec: QuantSpec, method: str) -> bool:
    return spec.act_order and method == "gptq"  # RTN has no Hessian to order by


# -- writing ------------------------------------------------------------------------------------------

def quantization_config(spec: QuantSpec, method: str) -> dict[str, Any]:
    """config.json's `quantization_config` (and quantize_config.json): QuantConfig's fields plus GPTQModel's."""
    from scorer import __version__
    from scorer.model.quant_config import QuantConfig

    static = spec.static_groups and method == "gptq"
    qc = QuantConfig(bits=spec.bits, group_size=spec.group_size, desc_act=_desc_act(spec, method), sym=spec.sym,
                     checkpoint_format="gptq", static_groups=static).to_dict()
    qc.update({
        "damp_percent": spec.damp,
        "damp_auto_increment": DAMP_STEP,
        "lm_head": False,
        "pack_dtype": "int32",
        "method": "gptq",
        "meta": {
            "quantizer": [f"{QUANTIZER}:{__version__}"],
            "uri": "https://github.com/scorer/scorer",
            "damp_percent": spec.damp,
            "damp_auto_increment": DAMP_STEP,
            "static_groups": static,
            "true_sequential": True,
            "mse": 0.0,
            "algorithm": method,
        },
    })
    return qc


def _write_checkpoint(model_dir: Path, out_dir: Path, cfg, tensors: dict[str, torch.Tensor],
                      spec: QuantSpec, method: str, report: dict[str, Any]) -> str:
    """Stage the checkpoint and its report (its dtype set here) next to out_dir and rename it into place,
    so OUT_DIR appears complete or not at all; returns the unquantized dtype."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from scorer.model.load import DROPPED_SUFFIXES, weight_files

    stage = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        quantized = {f"{cfg.weight_prefix}layers.{i}.{n}.{w}" for i in range(cfg.num_layers) for n in LINEARS
                     for w in ("weight", "bias")}
        out: dict[str, torch.Tensor] = {}
        dtypes = set()
        for f in weight_files(model_dir):
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for name in fh.keys():
                    if name in quantized or name.endswith(DROPPED_SUFFIXES):
                        continue
                    t = fh.get_tensor(name)
                    if t.dtype == torch.float32:
                        t = t.half()  # GPTQ kernels run fp16; embeddings, norms and head follow
                    if t.is_floating_point():
                        dtypes.add(t.dtype)
                    out[name] = t.contiguous()
        out.update(tensors)
        save_file(out, str(stage / "model.safetensors"), metadata={"format": "pt"})
        out_dtype = "bfloat16" if torch.bfloat16 in dtypes else "float16"

        conf = json.loads((model_dir / "config.json").read_text())
        conf.pop("quantization_config", None)
        for key in ("dtype", "torch_dtype"):
            if key in conf or (key == "dtype" and "torch_dtype" not in conf):
                conf[key] = out_dtype
        qc = quantization_config(spec, method)
        conf["quantization_config"] = qc
        (stage / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
        (stage / "quantize_config.json").write_text(json.dumps(qc, indent=2) + "\n")
        for pattern in TOKENIZER_FILES:
            for p in model_dir.glob(pattern):
                if p.is_file():
                    shutil.copy2(p, stage / p.name)
        report["quantization"]["dtype"] = out_dtype
        (stage / "quantization_report.json").write_text(json.dumps(report, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # checked empty before any work
        os.replace(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out_dtype


# -- calibration data ---------------------------------------------------------------------------------

def read_calibration(uri: str, text_column: str, n: int, seed: int, endpoint_url: str | None = None,
                     region: str | None = None) -> list[str]:
    """Up to `n` non-empty texts drawn at random (seeded) from Parquet at `uri`: a file, a folder, a glob
    (** spans folders) or a hive dataset, local or s3://, read through scorer.jobs.lake exactly as a job's
    input is. An s3:// endpoint and region come from the arguments, else from AWS_ENDPOINT_URL_S3 or
    AWS_ENDPOINT_URL and AWS_REGION, as the AWS SDKs read them."""
    from scorer.jobs import lake

    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    storage = lake.StorageOptions(endpoint=endpoint, region=region or os.environ.get("AWS_REGION"))
    loc = lake.resolve(uri, storage)
    return _sample_texts(loc, f"--calib {uri}", [text_column], lambda t: t[text_column], None, n, seed,
                         fix="pick a string column with --text-column")


def _sample_texts(loc, what: str, columns: list[str], build, filter_expr, n: int, seed: int, fix: str) -> list[str]:
    """Shuffle the shards (seeded), read them whole until a reservoir of 4n candidate texts is full (it
    holds a uniform sample of the rows read, and no more than 4n texts), draw n of them."""
    import numpy as np

    from scorer.jobs import lake

    try:
        shards = lake.list_shards(loc)
    except OSError as e:
        raise QuantizeError(f"{what}: cannot list it ({e}); check the path, endpoint and credentials.") from e
    if not shards:
        raise QuantizeError(f"{what}: no Parquet files there; give a Parquet file, a folder of them or a glob.")
    rng = np.random.default_rng(seed)
    # a reservoir of 4n texts (Algorithm R) over whole shards, read in random order until one has filled
    # it: uniform over the rows read, so a shard sorted by any column is not sampled from its head, and
    # memory stays 4n texts however large the shard
    cap, seen = 4 * n, 0
    pool: list[str] = []
    for k in rng.permutation(len(shards)):
        shard = shards[int(k)]
        try:
            for table in lake.iter_batches(shard, loc, columns, batch_rows=8192):
                if filter_expr is not None:
                    table = table.filter(filter_expr)
                for t in build(table).to_pylist():
                    if not (isinstance(t, str) and t.strip()):
                        continue
                    seen += 1
                    if len(pool) < cap:
                        pool.append(t)
                    else:
                        j = int(rng.integers(seen))
                        if j < cap:
                            pool[j] = t
        except KeyError as e:
            raise QuantizeError(f"{what}: {e.args[0]}; {fix}.") from e
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise QuantizeError(f"{what}: cannot read {shard.uri} as Parquet ({e}).") from e
        if len(pool) >= cap:
            break
    if not pool:
        raise QuantizeError(f"{what}: no non-empty text in the rows read; {fix}.")
    pick = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    return [pool[int(i)] for i in pick]


def _job_texts(calib_job: str, n: int, seed: int) -> tuple[list[str], str]:
    """Texts of a job's input through its text template and filter: `jobs.yaml:NAME`."""
    from scorer.jobs import spec as jobspec
    from scorer.jobs.expr import compile_filter

    file, sep, name = calib_job.rpartition(":")
    if not sep or not file or not name:
        raise QuantizeError(f"--calib-job {calib_job!r}: write it as jobs.yaml:NAME (the file, a colon, the job).")
    try:
        (job,) = jobspec.load(file, jobs=[name])
        jobspec.check_input(job)
    except jobspec.SpecError as e:
        raise QuantizeError(f"--calib-job {calib_job}: {e}") from e
    expr = compile_filter(job.job.filter)[0] if job.job.filter else None
    columns = list(dict.fromkeys([*job.text.columns, *job.filter_columns]))
    texts = _sample_texts(job.input, f"--calib-job {calib_job} (input {job.input.uri})", columns,
                          job.text.build, expr, n, seed, fix=f"check jobs.{name}.text and jobs.{name}.filter")
    return texts, f"{calib_job} ({job.input.uri}, text {job.job.text!r})"


# -- the command --------------------------------------------------------------------------------------

def quantize_cli(
    model_dir: Path, out_dir: Path, *, bits: int, group_size: int, act_order: bool, sym: bool,
    static_groups: bool, calib: str | None, calib_job: str | None, text_column: str, samples: int,
    max_length: int, method: str, damp: float, device: str, seed: int, endpoint_url: str | None = None,
    region: str | None = None,
) -> int:
    """`scorer quantize`: 0 when the checkpoint is written, 2 with a one-line error on bad input."""
    from rich.console import Console

    err = Console(stderr=True)
    try:
        model_dir, out_dir = Path(model_dir), Path(out_dir).resolve()  # "." stages beside it, not inside
        spec = _validate(model_dir, out_dir, bits=bits, group_size=group_size, act_order=act_order, sym=sym,
                         static_groups=static_groups, calib=calib, calib_job=calib_job, samples=samples,
                         max_length=max_length, method=method, damp=damp, device=device,
                         endpoint_url=endpoint_url, region=region)
        if calib_job is not None:
            texts, source = _job_texts(calib_job, samples + _n_heldout(samples), seed)
        else:
            texts = read_calibration(calib, text_column, samples + _n_heldout(samples), seed, endpoint_url, region)
            source = calib
        if len(texts) < 2:
            raise QuantizeError(f"--calib {source}: only {len(texts)} usable text; need at least 2 "
                                "(calibration and held-out rows).")
        want = _n_heldout(samples)  # held out of what was read; fewer rows than asked: a fifth, at least 1
        n_held = want if len(texts) >= samples + want else min(want, max(1, len(texts) // 5))
        report = quantize_model(model_dir, out_dir, texts[n_held:], texts[:n_held], spec=spec, method=method,
                                max_length=max_length, device=device, calib_source=source)
    except QuantizeError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return 2
    print_report(report)
    return 0


def _n_heldout(samples: int) -> int:
    return max(2, min(64, samples // 4))


def _validate(model_dir: Path, out_dir: Path, *, bits, group_size, act_order, sym, static_groups, calib,
              calib_job, samples, max_length, method, damp, device, endpoint_url=None, region=None) -> QuantSpec:
    if not (model_dir / "config.json").is_file():
        raise QuantizeError(f"{model_dir}: no config.json; MODEL_DIR must be a Hugging Face model directory.")
    if out_dir.resolve() == model_dir.resolve():
        raise QuantizeError(f"OUT_DIR {out_dir} is MODEL_DIR; write the checkpoint to a new directory.")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise QuantizeError(f"OUT_DIR {out_dir} exists and is not empty; remove it or pick another path.")
    up = out_dir.parent
    while not up.exists() and up != up.parent:
        up = up.parent
    if not up.is_dir() or not os.access(up, os.W_OK):  # found now, not after the whole model is quantized
        raise QuantizeError(f"OUT_DIR {out_dir}: {up} is not a writable directory; pick a path under one.")
    if bits != 4:
        raise QuantizeError(f"--bits {bits}: scorer writes and runs 4-bit GPTQ only; use --bits 4.")
    if group_size not in (32, 64, 128, -1):
        raise QuantizeError(f"--group-size {group_size}: use 32, 64, 128 or -1.")
    if method not in ("gptq", "rtn"):
        raise QuantizeError(f"--method {method!r}: use gptq or rtn.")
    if not 0.0 < damp < 1.0:  # GPTQ configs must hold 0 < damp_percent < 1 (transformers' GPTQConfig checks)
        raise QuantizeError(f"--damp {damp}: use a fraction in (0, 1), e.g. 0.01.")
    if samples < 1:
        raise QuantizeError(f"--samples {samples}: use at least 1 (128 is typical).")
    if max_length < 2:
        raise QuantizeError(f"--max-length {max_length}: use at least 2 tokens (512 is typical).")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise QuantizeError(f"--device {device!r}: use auto, cpu or cuda.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QuantizeError(f"--device {device}: torch sees no CUDA GPU; use --device cpu or auto.")
    if (calib is None) == (calib_job is None):
        raise QuantizeError("give exactly one of --calib URI (Parquet file, folder, glob or s3://) or "
                            "--calib-job jobs.yaml:NAME; scorer downloads no calibration data.")
    if (endpoint_url or region) and not (calib or "").startswith("s3://"):
        opt = "--endpoint-url" if endpoint_url else "--region"
        raise QuantizeError(f"{opt} applies to an s3:// --calib only; a --calib-job reads its job's storage "
                            "settings, a local --calib needs none.")
    return QuantSpec(bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                     static_groups=static_groups, damp=damp)


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    gptq_on = report["method"] == "gptq"
    t = Table(title=f"relative output error on {report['calibration']['heldout_texts']} held-out texts "
                    f"({report['calibration']['heldout_tokens']} tokens)")
    t.add_column("layer", justify="right")
    t.add_column("linear")
    if gptq_on:
        t.add_column("GPTQ", justify="right")
    t.add_column("RTN", justify="right")
    if gptq_on:
        t.add_column("GPTQ/RTN", justify="right")
    for r in report["layers"]:
        cells = [str(r["layer"]), r["linear"]]
        if gptq_on:
            ratio = r["gptq"] / r["rtn"] if r["rtn"] else math.nan
            style = "green" if r["gptq"] <= r["rtn"] else "red"
            cells += [f"{r['gptq']:.4f}", f"{r['rtn']:.4f}", f"[{style}]{ratio:.2f}[/{style}]"]
        else:
            cells.append(f"{r['rtn']:.4f}")
        t.add_row(*cells)
    c = Console(file=sys.stdout)
    c.print(t)
    s, a = report["summary"], report["agreement"]
    line = f"mean error: RTN {s['rtn_mean']:.4f}"
    if gptq_on:
        line += f", GPTQ {s['gptq_mean']:.4f} (GPTQ <= RTN on {s['gptq_le_rtn']}/{s['linears']} linears)"
    c.print(line)
    if "label_agreement" in a:
        c.print(f"held-out rows: {a['rows']}, label agreement {a['label_agreement']:.4f}, "
                f"max probability difference {a['max_prob_diff']:.4f}")
    elif "max_prob_diff" in a:
        c.print(f"held-out rows: {a['rows']}, max output difference {a['max_prob_diff']:.4f}")
    else:
        c.print(f"held-out rows: {a['rows']}, min embedding cosine {a['min_cosine']:.5f}")
    for w in report["warnings"]:
        c.print(f"[yellow]warning:[/yellow] {w}")
    mem = report["peak_memory_bytes"]
    c.print(f"wrote {report['out_dir']} in {report['wall_s']:.1f} s on {report['device']}"
            + (f", peak GPU memory {mem / 2**30:.2f} GiB" if mem else ""))
