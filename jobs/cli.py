"""`ziya-batch`: run, demo, submit and inspect Ziya-Visual batch jobs.

    ziya-batch demo                                 # tiny model + real photographs, local Ray
    ziya-batch run jobs/caption_dataset.yaml --set resources.actors=4
    ziya-batch submit jobs/caption_dataset.yaml --address http://HEAD:8265 [--wait]
    ziya-batch status|logs|stop SUBMISSION_ID --address http://HEAD:8265
    ziya-batch report OUTPUT_URI --out report.html [--job job.yaml]
    ziya-batch merge OUTPUT_URI DEST [--job job.yaml]   # incremental runs -> one Parquet dataset
    ziya-batch playground [--visual DIR --llm DIR]    # web chat + prompt trial (gradio)

Each subcommand lives in its own module under `jobs/`; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import sys


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a job file on the current Ray cluster (or a local one)")
    p.add_argument("job", help="job YAML file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a job field, e.g. --set resources.actors=4 (repeatable)",
    )
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or local)")
    p.add_argument("--quiet", action="store_true", help="no progress line, summary only")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from jobs.run import run_job_file

    return run_job_file(args.job, args.overrides, address=args.address, quiet=args.quiet)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="caption + VQA demo on the tiny model and real photographs")
    p.add_argument("--dir", default="ziya-demo", help="where checkpoint, manifest and output go")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from jobs.demo import run_demo

    return run_demo(args.dir)


def _storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--job",
        default=None,
        help="job YAML file: its storage: section (endpoint, region, anon, ...) reaches the "
        "output; its output.uri is the output when none is given",
    )
    p.add_argument(
        "--endpoint-url",
        default=None,
        help="S3-compatible endpoint for s3:// output (replaces the job's storage.endpoint_url)",
    )


def _storage_and_output(args: argparse.Namespace, output: str | None) -> tuple[object, str]:
    """The job's StorageConfig (with --endpoint-url applied) and the output URI."""
    from pipeline.config import StorageConfig, load_job

    job = load_job(args.job) if args.job else None
    storage = job.storage if job else StorageConfig()
    if args.endpoint_url:
        storage = storage.model_copy(update={"endpoint_url": args.endpoint_url})
    output = output or (job.output.uri if job else None)
    if not output:
        raise SystemExit(f"ziya-batch {args.command}: give the output URI, or --job FILE")
    return storage, output


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write a self-contained HTML report of a run's output")
    p.add_argument(
        "output",
        nargs="?",
        default=None,
        help="the job's output URI (local path, s3://, gs://); default: --job's output.uri",
    )
    p.add_argument("--out", default="report.html", help="HTML file to write")
    p.add_argument("--sample", type=int, default=200, help="rows shown in the gallery")
    _storage_args(p)
    p.add_argument(
        "--least-confident",
        type=int,
        default=24,
        help="also list this many ok answers of lowest confidence in the whole run (0 = none)",
    )
    p.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from pipeline.output.layout import LegacyOutputError
    from pipeline.output.report import write_report

    storage, output = _storage_and_output(args, args.output)
    try:
        path = write_report(
            output,
            args.out,
            sample=args.sample,
            least_confident=args.least_confident,
            storage=storage,
        )
    except LegacyOutputError as err:
        raise SystemExit(f"ziya-batch report: {err}") from None
    print(f"report written to {path}")
    return 0


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="write an output's newest answer per (id, question) as a plain Parquet dataset "
        "(incremental outputs: one row per key over every run)",
    )
    p.add_argument("output", help="the job's output URI (OUT, holding runs/ when incremental)")
    p.add_argument("dest", help="where the dataset goes (local path, s3://, gs://): outside OUT")
    _storage_args(p)
    p.add_argument(
        "--rows-per-file",
        type=int,
        default=500_000,
        help="about this many rows per output file (each is built in memory on its own)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DEST")
    p.add_argument("--tmp-dir", default=None, help="local spill directory (default: system temp)")
    p.set_defaults(func=_merge)


def _merge(args: argparse.Namespace) -> int:
    from pipeline.output.layout import LegacyOutputError
    from pipeline.output.merge import MergeError, merge

    storage, output = _storage_and_output(args, args.output)
    try:
        result = merge(
            output,
            args.dest,
            storage=storage,
            rows_per_file=args.rows_per_file,
            overwrite=args.overwrite,
            tmp_dir=args.tmp_dir,
        )
    except (MergeError, LegacyOutputError) as err:
        raise SystemExit(f"ziya-batch merge: {err}") from None
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    what = (
        f"newest answers of {len(result.runs)} runs ({result.rows_read:,} rows read)"
        if result.incremental
        else "a plain output: its committed shards copied"
    )
    print(f"{result.rows:,} rows in {len(result.files)} files at {result.dest}: {what}")
    return 0


def _add_playground(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "playground",
        help="web app: chat about an image, try a job's prompt on sample rows (needs gradio)",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny random-weight checkpoint (default without --visual: the tiny oracle where "
        "ziya_model.oracle exists, which knows a few questions about the demo photographs)",
    )
    p.add_argument("--visual", default=None, help="visual checkpoint dir (real weights)")
    p.add_argument("--llm", default=None, help="merged Ziya-LLaMA-13B dir (with --visual)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    p.add_argument(
        "--engine",
        default="transformers",
        choices=["transformers", "vllm"],
        help="transformers (the reference) or vllm (as ziya-chat --engine; no beam search); "
        "the Job tab's answers come from this engine whatever the job names",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth-file", default=None, help="basic auth: a file of user:password lines")
    p.add_argument(
        "--job", action="append", default=[], help="a job file offered in the Job tab (repeatable)"
    )
    p.set_defaults(func=_playground)


def _playground(args: argparse.Namespace) -> int:
    if (args.visual is None) != (args.llm is None) or (args.tiny and args.visual):
        raise SystemExit("give --visual with --llm (real weights), or neither (--tiny)")
    if args.engine == "vllm":
        from ziya_model import vllm

        if not vllm.installed():
            raise SystemExit(f"--engine vllm: {vllm.NOT_INSTALLED}")
    from jobs.playground import serve

    return serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ziya-batch", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_demo(sub)
    _add_report(sub)
    _add_merge(sub)
    _add_playground(sub)
    from jobs import submit

    submit.add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
