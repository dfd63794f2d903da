"""`scorer run` end to end on one GPU through Ray, against model-only throughput on the same texts.

1. writes a random-weight Llama-3-8B-shaped classifier as a real GPTQ checkpoint directory (g128,
   act-order, sym, v1; config.json, model.safetensors, a small BPE tokenizer.json) on local disk;
2. writes `--texts` synthetic texts (log-normal token lengths, median ~220) as `--shards` Parquet shards;
3. model only: Scorer.from_pretrained(...).score_encoded on the tokenized texts, after a warm-up;
4. pipeline: `scorer run` (run_cli, a local Ray cluster with this GPU) on the shards, then the job's
   _report.json: rows, tokens and wall seconds from the first shard dispatched to the last committed.

The pipeline figure is reported raw (job wall time, which includes the workers' model load and warm-up)
and from the moment every worker was ready to the last commit (the report's scoring_tokens_per_s): a
nightly job loads once and then scores for hours.

Scaling (the multi-GPU issue): `--workers 1,2,4` runs the same job once per worker count, each into its
own output, in the same process: on CUDA one actor per GPU (`runtime.workers`), and it checks that output
rows equal input rows, that every worker saw its own GPU (CUDA_VISIBLE_DEVICES from Ray, all distinct) and
scored shards, and reports tokens/s against `count x` the one-worker figure. NVLink multicast stays off
(scorer needs no collectives: each worker holds a whole model). Shards default to 4 x the most workers.

    python benchmarks/pipeline_gpu.py --texts 4096 --shards 8      # figures go to benchmarks/RESULTS.md
    python benchmarks/pipeline_gpu.py --texts 8192 --workers 1,2,4 # scaling on a 4-GPU machine
    python benchmarks/pipeline_gpu.py --shape tiny --texts 96 --workers 1,2   # CPU smoke run (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from scorer.bench import SHAPES, hf_config, synthetic_lengths, weight_gib  # noqa: E402

WORDS = 3000


def write_tokenizer(path: Path, words: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator([" ".join(words[i : i + 50]) for i in range(0, len(words), 50)] * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path / "tokenizer.json"))


def write_checkpoint(path: Path, shape: str, words: list[str]) -> None:
    """Random GPTQ linears (W std ~0.02) and bf16 embeddings, norms and head, saved with safetensors."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(shape)
    cfg["quantization_config"] = dict(quant_method="gptq", bits=4, group_size=128, desc_act=True, sym=True,
                                      checkpoint_format="gptq", static_groups=False)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    write_tokenizer(path, words)
    s = SHAPES[shape]
    h, m, nh, nkv = s["hidden_size"], s["intermediate_size"], s["num_attention_heads"], s["num_key_value_heads"]
    d = h // nh
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    t: dict[str, torch.Tensor] = {}

    def bf16(*shape_: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape_, device=dev, generator=g) * std).to(torch.bfloat16).cpu()

    def gptq(name: str, k: int, n: int) -> None:
        groups = k // 128
        perm = torch.randperm(k, device=dev, generator=g)
        g_idx = torch.empty(k, dtype=torch.int32, device=dev)
        g_idx[perm] = (torch.arange(k, device=dev) // 128).to(torch.int32)
        t[name + ".qweight"] = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), device=dev, generator=g,
                                             dtype=torch.int64).to(torch.int32).cpu()
        t[name + ".qzeros"] = torch.full((groups, n // 8), 0x77777777, dtype=torch.int32)  # sym, v1: z - 1 = 7
        t[name + ".scales"] = (0.004 + 0.002 * torch.rand(groups, n, device=dev, generator=g)).half().cpu()
        t[name + ".g_idx"] = g_idx.cpu()

    t["model.embed_tokens.weight"] = bf16(s["vocab_size"], h)
    for i in range(s["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        for name, k, n in (("self_attn.q_proj", h, nh * d), ("self_attn.k_proj", h, nkv * d),
                           ("self_attn.v_proj", h, nkv * d), ("self_attn.o_proj", nh * d, h),
                           ("mlp.gate_proj", h, m), ("mlp.up_proj", h, m), ("mlp.down_proj", m, h)):
            gptq(p + name, k, n)
    t["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    t["score.weight"] = bf16(cfg["num_labels"], h)
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})


def write_shards(root: Path, n_texts: int, n_shards: int, words: list[str]) -> list[str]:
    rng = np.random.default_rng(2)
    n_words = np.maximum(1, (synthetic_lengths(n_texts) * 0.75).astype(int))  # ~1.3 tokens a word
    texts = [" ".join(rng.choice(words, int(k))) for k in n_words]
    root.mkdir(parents=True, exist_ok=True)
    per = -(-n_texts // n_shards)
    for s in range(n_shards):
        part = texts[s * per : (s + 1) * per]
        ids = list(range(s * per, s * per + len(part)))
        pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "text": part}), root / f"part-{s:03d}.parquet",
                       row_group_size=256)
    return texts


def run_job(work: Path, name: str, workers: int, device: str, max_batch_tokens: int) -> tuple[int, float, dict]:
    """`scorer run` of the shards in work/input with `workers` actors into work/name; (rc, wall s, report)."""
    from scorer.jobs.runner import run_cli

    jobs = work / f"{name}.yaml"
    jobs.write_text(json.dumps({"jobs": {"bench": {
        "model": str(work / "model"), "task": "classify", "input": str(work / "input"), "text": "text",
        "id": "id", "output": {"uri": str(work / name), "partition": "dt={date}"},
        "batching": {"max_batch_tokens": max_batch_tokens, "max_length": 2048},
        "runtime": {"device": device, "workers": workers}}}}))
    t0 = time.perf_counter()
    rc = run_cli(jobs, date="2026-11-23")
    wall = time.perf_counter() - t0
    report = json.loads((work / name / "dt=2026-11-23" / "_report.json").read_text())["this_run"]
    return rc, wall, report


def check_workers(report: dict, workers: int, device: str) -> list[str]:
    """What is wrong with the run's workers: count, distinct GPUs, each one scoring."""
    problems = []
    ws = report.get("workers", [])
    if len(ws) != workers:
        problems.append(f"{len(ws)} workers reported, {workers} asked for")
    if device == "cuda":
        gpus = [w.get("gpus", "") for w in ws]
        if any(not g or "," in g for g in gpus) or len(set(gpus)) != len(gpus):
            problems.append(f"workers' CUDA_VISIBLE_DEVICES are not one distinct GPU each: {gpus}")
    idle = [w.get("worker") for w in ws if not w.get("shards")]
    if idle:
        problems.append(f"workers that scored no shard: {idle}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=4096)
    ap.add_argument("--shards", type=int, default=None, help="default: 8, or 4 x the most --workers")
    ap.add_argument("--workers", default="1", help="comma list of worker (GPU) counts, one job run each")
    ap.add_argument("--max-batch-tokens", type=int, default=16384)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--shape", default="8b", choices=sorted(SHAPES), help="tiny: a CPU smoke run of this script")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and a.shape != "tiny":
        print("needs a CUDA GPU (or --shape tiny for a CPU smoke run)")
        return 2
    counts = [int(c) for c in a.workers.split(",")]
    if device == "cuda" and max(counts) > torch.cuda.device_count():
        print(f"--workers {a.workers}: this machine has {torch.cuda.device_count()} GPU(s)")
        return 2
    for k, v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(k, v)  # inherited by the Ray workers of the local cluster run_cli starts
    n_shards = a.shards or max(8, 4 * max(counts))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    work = Path(a.work or tempfile.mkdtemp(prefix="scorer-pipeline-"))
    rng = np.random.default_rng(1)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(WORDS)]
    t0 = time.perf_counter()
    write_checkpoint(work / "model", a.shape, words)
    texts = write_shards(work / "input", a.texts, n_shards, words)
    print(f"checkpoint + {n_shards} shards written in {time.perf_counter() - t0:.0f} s to {work}", flush=True)

    from scorer.api import Scorer

    sync()
    t0 = time.perf_counter()
    sc = Scorer.from_pretrained(work / "model", device=device, max_length=2048, max_batch_tokens=a.max_batch_tokens)
    sync()
    load_s = time.perf_counter() - t0
    weights = weight_gib(sc.model, device)
    enc = sc.encode(texts)
    sc.warmup()  # what the job's workers do before their first shard
    sync()
    t0 = time.perf_counter()
    model_table = sc.score_encoded(enc)
    sync()
    model_s = time.perf_counter() - t0
    tokens = int(enc.n_tokens.sum())
    model_tps = tokens / model_s
    print(f"model only: {tokens:,} tokens in {model_s:.1f} s = {model_tps:,.0f} tok/s; load {load_s:.1f} s; "
          f"{'GPU ' if device == 'cuda' else ''}weights {weights:.2f} GiB; padding eff. "
          f"{sc.last_stats.padding_efficiency:.2f}", flush=True)
    del sc
    if device == "cuda":
        torch.cuda.empty_cache()

    want = np.array(model_table["probs"].to_pylist())  # texts are in id order
    runs, ok = [], True
    for n in counts:
        rc, wall, report = run_job(work, f"out-w{n}", n, device, a.max_batch_tokens)
        out = pq.read_table(work / f"out-w{n}" / "dt=2026-11-23")
        got = np.array(out.sort_by("id")["probs"].to_pylist())
        diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("nan")  # batch mates move bf16
        problems = check_workers(report, n, device)
        if report["rows"] != len(texts) or out.num_rows != len(texts):
            problems.append(f"{out.num_rows} output rows for {len(texts)} input rows")
        ok = ok and rc == 0 and not problems
        runs.append(dict(workers=n, rc=rc, wall=wall, report=report, max_prob_diff=diff, problems=problems))
        print(f"\n{n} worker(s): rc={rc}; run_cli wall {wall:.1f} s (Ray start included); job {report['seconds']:.1f} s; "
              f"rows {report['rows']:,} of {len(texts):,}; max |prob - model only| {diff:.2e}; GPUs "
              f"{[w.get('gpus') for w in report.get('workers', [])]}; {'; '.join(problems) or 'workers OK'}", flush=True)

    base = runs[0]["report"].get("scoring_tokens_per_s", 0.0) / runs[0]["workers"]
    print(f"\n| {'Llama-3-8B shape' if a.shape == '8b' else a.shape}, 4-bit GPTQ g128 act-order | workers | tokens/s "
          "| x model only | x linear from the first count |\n|---|---:|---:|---:|---:|")
    print(f"| model only (Scorer.score_encoded, warm) | 1 | {model_tps:,.0f} | 1.00 | |")
    for r in runs:
        rep, n = r["report"], r["workers"]
        pipe_tps = rep["tokens"] / rep["seconds"]
        net_tps = rep.get("scoring_tokens_per_s", 0.0)  # from workers ready (loaded, warm) to the last commit
        print(f"| scorer run, job wall time (incl. model load) | {n} | {pipe_tps:,.0f} | {pipe_tps / model_tps:.2f} | |")
        lin = f"{net_tps / (n * base):.2f}" if base else "-"
        print(f"| scorer run, workers ready to last commit | {n} | {net_tps:,.0f} | {net_tps / model_tps:.2f} | {lin} |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "pipeline_gpu.json").write_text(json.dumps(dict(
            device=torch.cuda.get_device_name() if device == "cuda" else "cpu", texts=len(texts), tokens=tokens,
            model_tps=model_tps, load_s=load_s, weights_gib=weights, runs=runs), indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
