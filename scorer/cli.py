"""The `scorer` command line: run, validate, quantize, bench, inspect.

Each command is a thin shell over a function of the package; heavy imports happen inside the command so
`scorer --help` stays fast and a GPU worker never imports what only the driver needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help="Score Parquet shards with Llama-family classifiers and embedders (fp16/bf16 or 4-bit GPTQ).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def run(
    jobs_file: Path = typer.Argument(..., help="jobs.yaml"),
    job: list[str] = typer.Option([], "--job", "-j", help="Run only these jobs (repeatable)."),
    set_: list[str] = typer.Option([], "--set", help="Override a field, e.g. --set batching.max_rows=64."),
    date: Optional[str] = typer.Option(None, help="The {date} of output partitions (default: today, UTC)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan without scoring."),
    force: bool = typer.Option(False, "--force", help="Redo shards already committed with the same fingerprint."),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join (ray://host:port or auto)."),
) -> None:
    """Score every shard of the jobs in JOBS_FILE; exit 0 all done, 3 some shards failed, 2 invalid job."""
    from scorer.jobs.runner import run_cli

    raise typer.Exit(run_cli(jobs_file, jobs=job, sets=set_, date=date, dry_run=dry_run, force=force, address=address))


@app.command()
def validate(
    jobs_file: Path = typer.Argument(..., help="jobs.yaml"),
    job: list[str] = typer.Option([], "--job", "-j", help="Validate only these jobs (repeatable)."),
    set_: list[str] = typer.Option([], "--set", help="Override a field, e.g. --set batching.max_rows=64."),
    date: Optional[str] = typer.Option(None, help="The {date} of output partitions (default: today, UTC)."),
) -> None:
    """Check JOBS_FILE, its models and its input schemas without scoring; exit 2 on the first problem."""
    from scorer.jobs.spec import validate_cli

    raise typer.Exit(validate_cli(jobs_file, jobs=job, sets=set_, date=date))


@app.command()
def inspect(model_dir: Path = typer.Argument(..., help="A Hugging Face model directory.")) -> None:
    """Print a model directory's architecture, sizes, dtype, quantization, labels and tokenizer."""
    from scorer.model.inspect import print_report

    raise typer.Exit(print_report(model_dir))


@app.command()
def quantize(
    model_dir: Path = typer.Argument(..., help="The fp16/bf16 model directory to quantize."),
    out_dir: Path = typer.Argument(..., help="Where to write the GPTQ checkpoint."),
    bits: int = typer.Option(4, help="Bits per weight (4)."),
    group_size: int = typer.Option(128, help="Group size: 32, 64, 128 or -1 (one group per column)."),
    act_order: bool = typer.Option(True, "--act-order/--no-act-order", help="Quantize columns by decreasing Hessian diagonal."),
    sym: bool = typer.Option(True, "--sym/--asym", help="Symmetric (zero 8) or asymmetric zeros."),
    static_groups: bool = typer.Option(False, "--static-groups", help="Fix groups before act-order (g_idx stays monotonic)."),
    calib: Optional[str] = typer.Option(None, help="Calibration Parquet (file, folder, glob or s3://...)."),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint of an s3:// --calib, e.g. http://127.0.0.1:8333 (default: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL)."),
    region: Optional[str] = typer.Option(None, help="S3 region of an s3:// --calib (default: AWS_REGION)."),
    calib_job: Optional[str] = typer.Option(None, help="Take input and text from a job: jobs.yaml:NAME."),
    text_column: str = typer.Option("text", help="Text column of --calib."),
    samples: int = typer.Option(128, help="Calibration texts."),
    max_length: int = typer.Option(512, help="Tokens per calibration text."),
    method: str = typer.Option("gptq", help="gptq or rtn."),
    damp: float = typer.Option(0.01, help="Dampening, as a fraction of the mean Hessian diagonal."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    seed: int = typer.Option(0, help="Seed for the choice of calibration rows."),
) -> None:
    """Quantize MODEL_DIR to a 4-bit GPTQ checkpoint in OUT_DIR, calibrated on your own texts."""
    from scorer.model.quantize import quantize_cli

    raise typer.Exit(
        quantize_cli(
            model_dir, out_dir, bits=bits, group_size=group_size, act_order=act_order, sym=sym,
            static_groups=static_groups, calib=calib, calib_job=calib_job, text_column=text_column,
            samples=samples, max_length=max_length, method=method, damp=damp, device=device, seed=seed,
            endpoint_url=endpoint_url, region=region,
        )
    )


@app.command()
def bench(
    model_shape: str = typer.Option("8b", help="8b or 70b (70b: scorer 4-bit only)."),
    texts: int = typer.Option(2048, help="Number of synthetic texts."),
    max_batch_tokens: int = typer.Option(16384, help="Token budget of a batch."),
    peers: str = typer.Option("both", help="transformers runs: both (arrival, sorted), sorted or none."),
    variants: Optional[str] = typer.Option(None, help="scorer runs, e.g. bf16+compile,int4+compile."),
    peers_last: bool = typer.Option(False, help="Time transformers after scorer's runs instead of before."),
) -> None:
    """Model-only throughput against transformers and the GEMM ceiling (needs a GPU)."""
    from scorer.bench import DEFAULT_VARIANTS, main

    raise typer.Exit(main(model_shape=model_shape, n_texts=texts, max_batch_tokens=max_batch_tokens, peers=peers,
                          variants=variants or DEFAULT_VARIANTS, peers_last=peers_last))


if __name__ == "__main__":
    app()
