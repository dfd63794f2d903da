"""`scorer inspect MODEL_DIR`: what a model directory holds, read from config.json, the safetensors headers
and tokenizer.json only (no tensor data is read, so it is instant even for a 70B checkpoint).

Parameter count: a GPTQ `qweight` [K/8, N] counts as its K*N weights; `qzeros`, `scales` and `g_idx` are
storage overhead, not parameters. "bf16 memory" is that count at 2 bytes; "as stored" is the bytes of
the tensors in the files (for a 4-bit checkpoint: codes + scales + zeros + fp16 embeddings and head).
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from scorer.model.config import ConfigError, LlamaConfig
from scorer.model.load import WeightsError, weight_files

SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
                      "I32": "int32", "I64": "int64", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3", "F8_E5M2": "float8_e5m2"}
GPTQ_OVERHEAD = ("qzeros", "scales", "g_idx")


@dataclass
class WeightFacts:
    files: list[str]
    n_tensors: int
    parameters: int  # logical weights (a 4-bit qweight counts K*N)
    stored_bytes: int
    float_dtype: str  # the dominant floating dtype of the stored tensors


def read_header(file: Path) -> dict:
    """The JSON header of a safetensors file (the tensor data is not read)."""
    with open(file, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise WeightsError(f"{file}: too short to be a safetensors file.")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise WeightsError(f"{file}: header length {n} is not plausible; not a safetensors file?")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{file}: unreadable safetensors header ({e}).") from e
    if not isinstance(header, dict):
        raise WeightsError(f"{file}: not a safetensors header (a JSON object of tensors).")
    header.pop("__metadata__", None)
    for name, t in header.items():
        if not (isinstance(t, dict) and isinstance(t.get("dtype"), str) and isinstance(t.get("shape"), list)
                and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2):
            raise WeightsError(f"{file}: tensor {name!r} has no dtype, shape and data_offsets; not a safetensors file?")
    return header


def weight_facts(path: Path) -> WeightFacts:
    files = weight_files(path)
    params = stored = n = 0
    float_bytes: Counter[str] = Counter()
    for f in files:
        for name, t in read_header(f).items():
            n += 1
            size = t["data_offsets"][1] - t["data_offsets"][0]
            stored += size
            shape = t["shape"]
            count = 1
            for s in shape:
                count *= s
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "qweight":
                params += shape[0] * 8 * shape[1]
            elif leaf not in GPTQ_OVERHEAD:
                params += count
            dt = SAFETENSORS_DTYPES.get(t["dtype"], t["dtype"])
            if dt.startswith(("float", "bfloat")) and leaf not in GPTQ_OVERHEAD:
                float_bytes[dt] += size
    dominant = float_bytes.most_common(1)[0][0] if float_bytes else "none"
    return WeightFacts([f.name for f in files], n, params, stored, dominant)


def layer_bits_per_weight(cfg: LlamaConfig) -> float | None:
    """Storage bits per weight of the quantized linears, averaged over one decoder layer by size."""
    if cfg.quant is None:
        return None
    h, m, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = [(h, cfg.num_heads * d), (h, cfg.num_kv_heads * d), (h, cfg.num_kv_heads * d),
              (cfg.num_heads * d, h), (h, m), (h, m), (m, h)]
    total = sum(k * n for k, n in shapes)
    return sum(cfg.quant.bits_per_weight(k, n) * k * n for k, n in shapes) / total


def tokenizer_facts(path: Path) -> dict[str, str]:
    from tokenizers import Tokenizer

    file = path / "tokenizer.json"
    if not file.is_file():
        return {"tokenizer": "tokenizer.json missing (scorer needs it to score texts)"}
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
        raise ConfigError(f"{file}: not a readable tokenizer.json ({e}).") from e
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    start = full.index(plain[0]) if plain and plain[0] in full else 0
    bos = [tok.id_to_token(i) for i in full[:start]]
    eos = [tok.id_to_token(i) for i in full[start + len(plain):]]
    return {
        "vocabulary": f"{tok.get_vocab_size(with_added_tokens=True):,}",
        "BOS added": ", ".join(bos) if bos else "no",
        "EOS added": ", ".join(eos) if eos else "no",
    }


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB"


def print_report(model_dir: str | Path, console: Console | None = None) -> int:
    """Print the report for `model_dir`; 0 when readable, 2 (with a one-line error) when not."""
    console = console or Console()
    path = Path(model_dir)
    try:
        if not path.is_dir():
            raise ConfigError(f"{path}: not a directory.")
        cfg = LlamaConfig.from_hf_dir(path)
        w = weight_facts(path)
        tok = tokenizer_facts(path)
    except (ConfigError, WeightsError, OSError) as e:
        Console(stderr=True, highlight=False).print(f"[red]error:[/red] {str(e).splitlines()[0]}", soft_wrap=True)
        return 2

    t = Table(title=f"{path}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    rows: list[tuple[str, str]] = [
        ("architecture", f"{cfg.architecture} ({cfg.model_type})"),
        ("layers / hidden", f"{cfg.num_layers} / {cfg.hidden_size}"),
        ("heads / kv heads / head_dim", f"{cfg.num_heads} / {cfg.num_kv_heads} / {cfg.head_dim}"),
        ("MLP", f"{cfg.intermediate_size}"),
        ("vocab", f"{cfg.vocab_size:,}"),
        ("max positions", f"{cfg.max_position_embeddings:,}"),
        ("rope", f"theta {cfg.rope_theta:g}" + (f", {cfg.rope_scaling.kind} x{cfg.rope_scaling.factor:g}" if cfg.rope_scaling else "")),
        ("parameters", f"{w.parameters:,} ({_count(w.parameters)})"),
        ("checkpoint dtype", f"{w.float_dtype} (config.json: {cfg.torch_dtype})"),
        ("weight files", f"{len(w.files)} ({w.n_tensors} tensors)"),
    ]
    q = cfg.quant
    if q is None:
        rows.append(("quantization", "none"))
    else:
        group = "per column" if q.group_size == -1 else str(q.group_size)
        rows.append(("quantization", f"GPTQ {q.bits}-bit, group {group}, act-order {'yes' if q.desc_act else 'no'}, "
                                     f"{'sym' if q.sym else 'asym'}, format {q.checkpoint_format}"))
        rows.append(("bits per weight", f"{layer_bits_per_weight(cfg):.3f} (decoder linears)"))
    if cfg.is_classifier:
        labels = ", ".join(cfg.id2label) if cfg.num_labels <= 12 else ", ".join(cfg.id2label[:12]) + ", ..."
        rows.append(("head", f"score -> {cfg.num_labels} labels, {cfg.problem_type}"))
        rows.append(("labels", labels))
    else:
        rows.append(("head", "none (embedder: pool last/mean/cls)"))
    rows += [(k, v) for k, v in tok.items()]
    rows.append(("pad id", str(cfg.pad_token_id) if cfg.pad_token_id is not None else "none (scorer pads with a mask)"))
    rows.append(("weight memory, bf16", _gib(2 * w.parameters)))
    if q is not None:
        rows.append(("weight memory, as stored", _gib(w.stored_bytes)))
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    return 0
