"""``fed-job``: a data scientist's jobs on a standing network (see :mod:`fedcore.jobs.client`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedcore.cli_support import run_cli
from fedcore.errors import ConfigError
from fedcore.scientist import TOKEN_ENV, open_channel, read_token
from fedcore.toml_fields import read_toml
from fedcore.units import format_bytes

from .client import JobsClient, JobStatus

__all__ = ["build_parser", "main"]

_EPILOG = f"""\
examples:
  fed-job --server 127.0.0.1:50051 --token-file alice.token submit --study cardio \\
      --rounds 5 --min-workers 3 --set learning_rate=0.05 --set require_tags='["mnist"]'
  fed-job ... submit --study cardio --config job.toml
  fed-job ... submit --study cardio --query "mean(bmi) where age > 60" --epsilon 0.5
  fed-job ... list
  fed-job ... logs JOB --follow
  fed-job ... stop JOB
  fed-job ... pull JOB --out model.safetensors

  # job.toml: settings named like fed-server's flags
  study = "cardio"
  rounds = 5
  model = "mnist-cnn"
  min_workers = 3
  learning_rate = 0.05
  require_tags = ["mnist"]

The token comes from --token-file or ${TOKEN_ENV} (fed-certs add-scientist --study).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fed-job",
        description="Submit, follow, stop and pull jobs on a standing network "
        "(fed-server --serve); you see the jobs of your own studies only.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--server", required=True, help="the coordinator's HOST:PORT")
    p.add_argument("--token-file", type=Path, help="this data scientist's token")
    p.add_argument("--tls-ca", type=Path, help="CA that signed the coordinator's certificate")
    p.add_argument("--tls-server-name", help="name expected in the coordinator's certificate")
    p.add_argument("--insecure", action="store_true", help="allow plaintext to another machine")
    p.add_argument("--json", action="store_true", help="print JSON")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="queue a training job or an analytics query")
    s.add_argument("--study", help="the study the job belongs to (or `study` in --config)")
    s.add_argument("--config", type=Path, help="a job TOML: settings named like fed-server's flags")
    s.add_argument("--rounds", type=int)
    s.add_argument("--model")
    s.add_argument("--min-workers", type=int)
    s.add_argument("--strategy")
    s.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other setting (VALUE as JSON, or a plain string): learning_rate=0.05",
    )
    s.add_argument("--plan", type=Path, help="train a plan file (fed-plan export) instead")
    s.add_argument("--query", help="submit an analytics query instead of training")
    s.add_argument("--epsilon", type=float, help="the query's epsilon")
    s.add_argument("--tag", action="append", default=[], help="the query's silos' tag")
    sub.add_parser("list", help="your studies' jobs")
    for name, text in (("status", "a job's state"), ("stop", "stop a job at a round boundary")):
        sub.add_parser(name, help=text).add_argument("job")
    lg = sub.add_parser("logs", help="a job's log")
    lg.add_argument("job")
    lg.add_argument("--follow", "-f", action="store_true", help="until the job ends")
    pl = sub.add_parser("pull", help="the final model and metrics (if every silo allows)")
    pl.add_argument("job")
    pl.add_argument("--out", type=Path, required=True, help="where to write the model")
    pl.add_argument("--metrics-out", type=Path, help="every round's metrics, as JSON")
    return p


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _settings(args: argparse.Namespace) -> tuple[str, str, dict[str, Any]]:
    """The study, kind and settings a submit asks for."""
    settings: dict[str, Any] = {}
    if args.config is not None:
        settings.update(read_toml(args.config, ConfigError, "job file"))
    study = args.study or settings.pop("study", None)
    settings.pop("study", None)
    if not study:
        raise ConfigError("a job needs its study: --study NAME (or study = ... in --config)")
    if args.query is not None:
        if args.epsilon is None:
            raise ConfigError("a query job needs --epsilon")
        return study, "query", {"query": args.query, "epsilon": args.epsilon, "tags": args.tag}
    for key in ("rounds", "model", "min_workers", "strategy"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: use KEY=VALUE")
        settings[key.strip().replace("-", "_")] = _value(value)
    return study, "train", settings


def _line(status: JobStatus) -> str:
    rounds = f" {status.rounds_done}/{status.rounds}" if status.kind == "train" else ""
    traffic = (
        f"  [{format_bytes(status.bytes_sent)} sent, {format_bytes(status.bytes_received)} "
        "received]"
        if status.bytes_sent or status.bytes_received
        else ""
    )
    return (
        f"{status.job_id}  {status.study:<12} {status.scientist:<12} {status.kind:<5} "
        f"{status.state:<17}{rounds}  {status.message}{traffic}"
    )


def _run(args: argparse.Namespace) -> None:
    token = read_token(None, args.token_file)
    with open_channel(
        args.server,
        tls_ca=args.tls_ca,
        tls_server_name=args.tls_server_name,
        insecure=args.insecure,
    ) as channel:
        jobs = JobsClient(channel, token, timeout=300.0)
        if args.command == "submit":
            study, kind, settings = _settings(args)
            handle = jobs.submit(study, settings, kind=kind, plan_file=args.plan)
            _show(jobs.status(handle.job_id), args.json)
        elif args.command == "list":
            for status in jobs.list():
                _show(status, args.json)
        elif args.command == "status":
            _show(jobs.status(args.job), args.json)
        elif args.command == "stop":
            _show(jobs.stop(args.job), args.json)
        elif args.command == "logs":
            for event in jobs.logs(args.job, follow=args.follow):
                stamp = time.strftime("%H:%M:%S", time.localtime(event.time))
                print(f"{stamp}  {event.text}", flush=True)
        elif args.command == "pull":
            data, rows = jobs.pull(args.job)
            args.out.write_bytes(data)
            if args.metrics_out is not None:
                args.metrics_out.write_text(json.dumps(rows, indent=2))
            print(f"wrote {args.out} ({len(data):,} bytes, {len(rows)} round(s))")


def _show(status: JobStatus, as_json: bool) -> None:
    if as_json:
        print(json.dumps(status.__dict__), flush=True)
    else:
        print(_line(status), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return run_cli("fed-job", lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
