"""Load a Hugging Face model directory: config.json, safetensors weights, tokenizer.json.

Weights: `model.safetensors` or the shards listed by `model.safetensors.index.json`; never a pickle
(`pytorch_model.bin` is refused), never remote code. The model is built on the meta device and the
checkpoint tensors are assigned into it (`load_state_dict(assign=True)`), so no random init runs and no
second copy of the weights exists.

The name table (checkpoint -> ScoringModel):
    model.X                  -> model.X     (*ForSequenceClassification, *ForCausalLM)
    X                        -> model.X     (bare *Model embedders, saved without a prefix)
    score.weight             -> score.weight
    *rotary_emb.inv_freq     -> dropped     (old checkpoints saved the RoPE table; scorer recomputes it)
    lm_head.*                -> dropped     (a causal-LM head, tied, untied or quantized, is unused for scoring)
GPTQ tensors (`qweight`, `qzeros`, `scales`, `g_idx`) keep their names: Int4Linear registers the same.

After assignment: floating tensors are cast to the run dtype, except a quantized layer's `scales`, and
integer tensors stay as stored; then every module with a `prepare(dtype)` method (Int4Linear) prepares
itself once on its device.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from scorer.model.config import ConfigError, LlamaConfig
from scorer.model.heads import ScoringModel

DROPPED_SUFFIXES = ("rotary_emb.inv_freq",)
DROPPED_PREFIXES = ("lm_head.",)  # the LM head, unused: its weight, or a quantized one's qweight, scales, ...


class WeightsError(ValueError):
    """Checkpoint tensors that do not fit the model; the message lists the names and the files."""


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a model directory, in index order."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: not a safetensors index with a 'weight_map' ({e}).") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise WeightsError(f"{index}: 'weight_map' must map tensor names to shard file names, as "
                               "transformers writes it.")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"{index}: lists shards that are not there: {', '.join(missing)}.")
        return files
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    hint = (
        f" Found {', '.join(pickles)}: scorer never unpickles weights; convert them to safetensors "
        "(e.g. `model.save_pretrained(dir, safe_serialization=True)`)."
        if pickles else ""
    )
    raise WeightsError(f"{path}: no model.safetensors or model.safetensors.index.json.{hint}")


def checkpoint_name_map(cfg: LlamaConfig, names: list[str]) -> tuple[dict[str, str], list[str]]:
    """({checkpoint name: model name}, dropped names) for the tensors in a checkpoint."""
    prefix = cfg.weight_prefix
    table: dict[str, str] = {}
    dropped: list[str] = []
    for name in names:
        if name.startswith(DROPPED_PREFIXES) or name.endswith(DROPPED_SUFFIXES):
            dropped.append(name)
        elif name == "score.weight":
            table[name] = name
        elif prefix and name.startswith(prefix):
            table[name] = "model." + name[len(prefix):]
        elif not prefix:
            table[name] = "model." + name
        else:  # a name outside the prefix: keep it as is, so it is reported as unexpected
            table[name] = name
    return table, dropped


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of float32, bfloat16, float16, not {dtype!r}")
    return names[dtype]


def load_model(
    path: str | Path, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"
) -> tuple[ScoringModel, LlamaConfig]:
    """Build the model for `path` on `device` in `dtype`, in eval mode; returns (model, cfg)."""
    from safetensors import safe_open

    dtype = _parse_dtype(dtype)
    device = torch.device(device)
    cfg = LlamaConfig.from_hf_dir(path)
    files = weight_files(path)

    with torch.device("meta"):
        model = ScoringModel(cfg, dtype)
    keep_dtype = _keep_dtype_names(model)
    expected = set(model.state_dict().keys())

    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}  # model name -> "checkpoint name (file)"
    unexpected: list[str] = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                table, _ = checkpoint_name_map(cfg, list(f.keys()))
                for ck_name, name in table.items():
                    if name not in expected:
                        unexpected.append(f"{ck_name} ({file.name})")
                        continue
                    t = f.get_tensor(ck_name)
                    if t.is_floating_point() and name not in keep_dtype:
                        t = t.to(dtype)
                    state[name] = t
                    origin[name] = f"{ck_name} ({file.name})"
        except WeightsError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types; name the file
            raise WeightsError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e}).") from e

    missing = sorted(expected - state.keys())
    if missing or unexpected:
        inv_prefix = cfg.weight_prefix
        want = [("score.weight" if n == "score.weight" else inv_prefix + n.removeprefix("model.")) for n in missing]
        lines = [f"{path}: checkpoint tensors do not match {cfg.architecture} (files: {', '.join(f.name for f in files)})."]
        if want:
            lines.append(f"  missing ({len(want)}): {', '.join(want)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {', '.join(sorted(unexpected))}")
        lines.append("  Is config.json's 'architectures' (and quantization_config) the one these weights were saved with?")
        raise WeightsError("\n".join(lines))

    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise WeightsError(f"{path}: checkpoint tensors do not fit config.json: {e}") from e
    del state

    _check_on_device(model, device, origin)
    for module in model.modules():
        prepare = getattr(module, "prepare", None)
        if callable(prepare) and module is not model:
            prepare(dtype)
    model.eval()
    model.requires_grad_(False)
    return model, cfg


def _keep_dtype_names(model: nn.Module) -> set[str]:
    """Floating tensors the loader must not cast: the `scales` of modules that prepare themselves."""
    keep = set()
    for mname, module in model.named_modules():
        if callable(getattr(module, "prepare", None)):
            for bname, _ in module.named_buffers(recurse=False):
                if bname == "scales":
                    keep.add(f"{mname}.{bname}")
            for pname, _ in module.named_parameters(recurse=False):
                if pname == "scales":
                    keep.add(f"{mname}.{pname}")
    return keep


def _check_on_device(model: nn.Module, device: torch.device, origin: dict[str, str]) -> None:
    """Every tensor came from the checkpoint; none may be left on the meta device."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise WeightsError(f"{name} was not loaded from the checkpoint (still on the meta device).")
        if t.device.type != device.type:
            raise WeightsError(f"{origin.get(name, name)} landed on {t.device}, expected {device}.")


# -- tokenizer ---------------------------------------------------------------------------------------

def _read_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise ConfigError(f"{file}: not found; scorer reads the fast tokenizer's tokenizer.json.")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception
        raise ConfigError(f"{file}: not a readable tokenizer.json ({e}).") from e
    tok.no_padding()  # scorer pads itself
    tok.no_truncation()
    return tok


def _check_truncation(tok, file: Path, max_length: int, truncation_side: str) -> int:
    """Content tokens that fit beside the special tokens the post-processor adds."""
    if truncation_side not in ("left", "right"):
        raise ValueError(f"truncation_side must be 'left' or 'right', not {truncation_side!r}")
    n_special = tok.num_special_tokens_to_add(is_pair=False)
    if max_length <= n_special:
        raise ValueError(f"max_length {max_length} leaves no room beside the {n_special} special tokens of {file}")
    return max_length - n_special


def load_tokenizer(path: str | Path, max_length: int, truncation_side: str = "right"):
    """`tokenizers.Tokenizer` from tokenizer.json, truncating to `max_length` tokens (special ones included).

    BOS/EOS are whatever the file's post-processor adds (encode with add_special_tokens=True). Truncation
    cuts content tokens from the `truncation_side` ("right": keep the beginning; "left": keep the end) and
    keeps the special tokens, like transformers' `truncation=True, max_length=...`. Padding is off.
    To also learn which rows were truncated, use `TextEncoder` (an Encoding's `overflowing` list is not
    filled reliably across tokenizers versions).
    """
    tok = _read_tokenizer(path)
    _check_truncation(tok, Path(path) / "tokenizer.json", max_length, truncation_side)
    tok.enable_truncation(max_length=max_length, stride=0, strategy="longest_first", direction=truncation_side)
    return tok


def pad_token_id(cfg, tokenizer) -> int:
    """The id padded slots carry (they are masked out: any id in the vocabulary works). The config's
    pad_token_id where it is one; configs that say -1 or an id past the vocabulary get the tokenizer's pad
    token (`tokenizer`: anything with token_to_id, or None), else 0. The classifier-token rule keeps the
    config's own value (heads.classifier_token_index)."""
    if cfg.pad_token_id is not None and 0 <= cfg.pad_token_id < cfg.vocab_size:
        return cfg.pad_token_id
    for tok in ("<pad>", "<|finetune_right_pad_id|>", "[PAD]"):
        tid = tokenizer.token_to_id(tok) if tokenizer is not None else None
        if tid is not None and 0 <= tid < cfg.vocab_size:  # an added token may lie past the table
            return tid
    return 0


class TextEncoder:
    """tokenizer.json -> token ids with the post-processor's BOS/EOS, truncated to `max_length`, and
    whether each row was truncated. Thread-safe (the tokenizer is never changed after construction).

    Same ids as `load_tokenizer` (and transformers): encode without special tokens, cut the content to
    `max_length - n_special` from `truncation_side`, then let the post-processor add the special tokens.
    """

    def __init__(self, path: str | Path, max_length: int, truncation_side: str = "right") -> None:
        self.tokenizer = _read_tokenizer(path)
        self.max_length, self.truncation_side = max_length, truncation_side
        self.room = _check_truncation(self.tokenizer, Path(path) / "tokenizer.json", max_length, truncation_side)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def encode_batch(self, texts: list[str]) -> list[tuple[list[int], bool]]:
        """[(ids, truncated)] per text."""
        tok, out = self.tokenizer, []
        for e in tok.encode_batch(texts, add_special_tokens=False):
            truncated = len(e.ids) > self.room
            if truncated:
                e.truncate(self.room, stride=0, direction=self.truncation_side)
            out.append((tok.post_process(e, add_special_tokens=True).ids, truncated))
        return out
