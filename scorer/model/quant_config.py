"""The GPTQ quantization config of a model directory.

Read from `config.json["quantization_config"]` or a `quantize_config.json` beside it. Both field
spellings in the wild are accepted: `checkpoint_format` / `format` and `quant_method` / `method`.
Anything scorer cannot run (other bit widths, AWQ, EXL2, marlin-packed weights) fails here, at load,
with a message that names the file, the field and what is supported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED = "4-bit GPTQ (quant_method 'gptq', bits 4, group_size 32/64/128/-1, checkpoint_format 'gptq' or 'gptq_v2')"


class QuantConfigError(ValueError):
    """A quantization config that scorer cannot run; the message names the file and the field."""


@dataclass(frozen=True)
class QuantConfig:
    bits: int
    group_size: int  # -1: one group spanning all of K
    desc_act: bool  # act-order: g_idx is a permutation-derived, non-monotonic map
    sym: bool
    checkpoint_format: str  # "gptq" (v1: qzeros store z-1) or "gptq_v2" (qzeros store z)
    static_groups: bool = False
    source: str = ""  # the file this came from, for messages

    @property
    def v1(self) -> bool:
        return self.checkpoint_format == "gptq"

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else -(-in_features // self.group_size)

    def bits_per_weight(self, in_features: int, out_features: int) -> float:
        """Storage bits per weight: the codes plus the fp16 scales and packed zeros of each group."""
        g = self.n_groups(in_features)
        extra = g * out_features * (16 + self.bits) + in_features * 32  # scales, zeros, g_idx
        return self.bits + extra / (in_features * out_features)

    def to_dict(self) -> dict[str, Any]:
        """The fields GPTQModel and transformers read (v1 files also carry the legacy spellings)."""
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "static_groups": self.static_groups,
            "checkpoint_format": self.checkpoint_format,
            "format": self.checkpoint_format,
            "true_sequential": True,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> "QuantConfig":
        def where(key: str) -> str:
            return f"{source}: quantization field '{key}'"

        if not isinstance(d, dict):
            raise QuantConfigError(f"{source}: the quantization config must be a JSON object (bits, group_size, "
                                   f"desc_act, ...), not {type(d).__name__} {d!r:.80}.")
        method = str(d.get("quant_method", d.get("method", "gptq"))).lower()
        if method != "gptq":
            raise QuantConfigError(
                f"{where('quant_method')} is {method!r}; scorer runs {SUPPORTED}. "
                "Re-quantize the model with `scorer quantize` or use its fp16/bf16 weights."
            )
        fmt = str(d.get("checkpoint_format", d.get("format", "gptq"))).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise QuantConfigError(
                f"{where('checkpoint_format')} is {fmt!r} (e.g. marlin- or bitblas-packed); scorer runs "
                f"{SUPPORTED}. Convert the checkpoint back to the GPTQ format or re-quantize it."
            )
        if d.get("is_marlin_format"):
            raise QuantConfigError(
                f"{where('is_marlin_format')} is true (marlin-packed weights); scorer runs {SUPPORTED}. "
                "Convert the checkpoint back to the GPTQ format or re-quantize it."
            )
        bits = d.get("bits", d.get("w_bit"))
        if bits != 4:
            raise QuantConfigError(f"{where('bits')} is {bits!r}; scorer runs {SUPPORTED}.")
        group_size = d.get("group_size", d.get("q_group_size", 128))
        if group_size not in (32, 64, 128, -1):
            raise QuantConfigError(f"{where('group_size')} is {group_size!r}; scorer runs {SUPPORTED}.")
        for key in ("desc_act", "sym", "static_groups"):
            if key in d and not isinstance(d[key], bool):
                raise QuantConfigError(f"{where(key)} must be true or false, not {d[key]!r}.")
        return cls(
            bits=4,
            group_size=int(group_size),
            desc_act=bool(d.get("desc_act", False)),
            sym=bool(d.get("sym", True)),
            checkpoint_format=fmt,
            static_groups=bool(d.get("static_groups", False)),
            source=source,
        )

    @classmethod
    def from_model_dir(cls, path: str | Path, config: dict[str, Any]) -> "QuantConfig | None":
        """The quantization of a model directory, or None for an unquantized one."""
        path = Path(path)
        qc = config.get("quantization_config")
        if qc is not None:
            return cls.from_dict(qc, str(path / "config.json"))
        side = path / "quantize_config.json"
        if side.exists():
            try:
                d = json.loads(side.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise QuantConfigError(f"{side}: not readable JSON ({e}); fix the file or remove it for an "
                                       "unquantized model.") from e
            return cls.from_dict(d, str(side))
        return None
