"""The ``moco`` command: ``demo``, ``profile``, ``bench`` and ``data check``.

Errors a user can cause end with exit code 2 and one line on stderr (``moco: error: ...``), never a
traceback; ``MOCO_DEBUG=1`` shows the traceback for bug reports.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from moco.errors import MocoError


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2) that points at ``--help``."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _add_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``moco`` command."""
    from moco import __version__

    parser = _Parser(
        prog="moco",
        description="Make a trained PyTorch classifier cheaper to run while keeping its predictions: "
        "profile -> capture -> analyse -> transform -> verify.",
    )
    parser.add_argument("--version", action="version", version=f"moco {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = sub.add_parser("demo", help="train the seed CNN on bundled or local data, profile it, show the plan")
    demo.add_argument("--dataset", default="auto", choices=["auto", "digits", "mnist"],
                      help="auto: MNIST if found in the data root, else scikit-learn's bundled digits")
    demo.add_argument("--data-root", default=None, help="data root (default: $MOCO_DATA, ../shared/data, cache)")
    demo.add_argument("--train-size", type=int, default=12_000, help="training images used from MNIST (default 12000)")
    demo.add_argument("--epochs", type=int, default=None, help="epochs (default: 1 on MNIST, 8 on digits)")
    demo.add_argument("--out", default="moco-out", help="folder for the checkpoint, chart and report (default moco-out)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_seed(demo)

    prof = sub.add_parser("profile", help="per-module params, MACs, FLOPs, activation bytes and latency")
    prof.add_argument("model", help="a zoo model name (see 'moco profile --list') or a moco checkpoint file")
    prof.add_argument("--list", action="store_true", help="list the zoo models and exit")
    prof.add_argument("--batch", type=int, default=1, help="batch size of the example input (default 1)")
    prof.add_argument("--input-shape", default=None, help="one sample's shape C,H,W (default: the model's)")
    prof.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                      help="model constructor argument, e.g. --arg width_multiplier=0.5 (repeatable)")
    prof.add_argument("--no-latency", action="store_true", help="count only; skip the latency measurement")
    prof.add_argument("--repeats", type=int, default=10, help="timed forward passes for latency (default 10)")
    prof.add_argument("--plot", default=None, metavar="PNG", help="save a bar chart of MACs and latency per layer")
    prof.add_argument("--json", default=None, metavar="FILE", help="write the profile as JSON")
    _add_seed(prof)

    bench = sub.add_parser("bench", help="run a registered benchmark; last stdout line is JSON")
    bench.add_argument("name", nargs="?", help="benchmark name (omit, or --list, to list them)")
    bench.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    bench.add_argument("--quick", action="store_true", help="smaller, faster run for a smoke test")
    bench.add_argument("--json", default=None, metavar="FILE", help="also write the JSON result to FILE")
    _add_seed(bench)

    data = sub.add_parser("data", help="datasets: check the data root")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    check = data_sub.add_parser("check", help="which datasets are present under the data root, md5 ok")
    check.add_argument("--root", default=None, help="data root (default: $MOCO_DATA, ../shared/data, cache)")
    check.add_argument("--no-md5", action="store_true", help="only look for the files, skip the checksums")
    return parser


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _cmd_profile(args) -> int:
    import torch

    from moco.models import create, get_spec, input_shape, list_models
    from moco.profile import profile

    if args.list:
        for name in list_models():
            spec = get_spec(name)
            print(f"{name:14s} input {'x'.join(map(str, spec.input_shape)):9s} {spec.summary}")
        return 0
    kwargs = {}
    for item in args.arg:
        if "=" not in item:
            raise MocoError(f"--arg expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        kwargs[key] = _parse_value(value)
    if Path(args.model).is_file():
        from moco.train import load_checkpoint

        model, meta = load_checkpoint(args.model)
        arch = meta.get("arch") or {}
        shape = input_shape(arch["name"], **arch.get("kwargs", {}))
        label = f"{args.model} ({arch['name']})"
    elif args.model in list_models():
        model = create(args.model, **kwargs).eval()
        shape = input_shape(args.model, **kwargs)
        label = args.model
    else:
        raise MocoError(f"{args.model!r} is neither a file nor a zoo model; zoo models: {', '.join(list_models())}")
    if args.input_shape:
        try:
            shape = tuple(int(s) for s in args.input_shape.split(","))
        except ValueError:
            raise MocoError(f"--input-shape expects integers like 1,28,28, got {args.input_shape!r}") from None
    if args.batch < 1:
        raise MocoError(f"--batch must be >= 1, got {args.batch}")
    torch.manual_seed(args.seed)
    x = torch.randn(args.batch, *shape)
    prof = profile(model, x, latency=not args.no_latency, repeats=args.repeats)
    print(f"profile of {label}, input {tuple(x.shape)}")
    print(prof.to_text())
    if args.plot:
        print(f"chart: {prof.plot(args.plot)}")
    if args.json:
        from moco.io import write_json_atomic

        print(f"json: {write_json_atomic(args.json, prof.to_dict())}")
    return 0


def _cmd_bench(args) -> int:
    from moco.bench import list_benchmarks, run_benchmark

    if args.list or not args.name:
        for name, summary in list_benchmarks():
            print(f"{name:24s} {summary}")
        return 0
    run_benchmark(args.name, quick=args.quick, seed=args.seed, json_path=args.json)
    return 0


def _cmd_data(args, parser) -> int:
    if args.data_command != "check":
        parser.parse_args(["data", "--help"])
        return 2
    from moco.data import check_root

    report = check_root(args.root, verify_md5=not args.no_md5)
    print(report.to_text())
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moco`` command; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed as one line)
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "demo":
            from moco.demo import run_demo

            run_demo(
                dataset=args.dataset, root=args.data_root, train_size=args.train_size, epochs=args.epochs,
                out=args.out, seed=args.seed, progress=not args.no_progress,
            )
            return 0
        if args.command == "profile":
            return _cmd_profile(args)
        if args.command == "bench":
            return _cmd_bench(args)
        if args.command == "data":
            return _cmd_data(args, parser)
    except (MocoError, ValueError, TypeError, FileNotFoundError) as exc:
        if os.environ.get("MOCO_DEBUG"):
            raise
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"moco: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moco: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
