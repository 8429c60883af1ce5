"""The ``moco`` command: ``demo``, ``run``, the one-step method commands (``profile``, ``prune``, ``pfa``,
``exits``, ``rules``, ``export``), ``bench`` and ``data check``.

Errors a user can cause end with exit code 2 and one line on stderr (``moco: error: ...``), never a
traceback; ``MOCO_DEBUG=1`` shows the traceback for bug reports.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Sequence

from moco.errors import MocoError

__all__ = ["METHOD_COMMANDS", "PLUGIN_COMMANDS", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2) that points at ``--help``."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _add_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the config's, else 0)")
    p.add_argument("--no-progress", action="store_true",
                   help="hide progress bars (they are shown only when stderr is a terminal)")


def _add_tracking(p: argparse.ArgumentParser, experiment: str) -> None:
    p.add_argument("--track", action="store_true",
                   help="log to MLflow: params, metrics, artifacts (default store sqlite:///mlflow.db here)")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help="MLflow store: sqlite:///file.db, postgresql://..., http://host:port, databricks "
                        "(default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db); implies --track")
    p.add_argument("--experiment", default=None, metavar="NAME",
                   help=f"MLflow experiment (default {experiment}); implies --track")


def _tracking(args) -> dict:
    """The tracking keywords of run_config / run_benchmark from --track, --tracking-uri, --experiment."""
    on = bool(args.track or args.tracking_uri or args.experiment)
    return {"track": on, "tracking_uri": args.tracking_uri, "experiment": args.experiment}


#: the one-step commands: method -> help line
METHOD_COMMANDS = {
    "profile": "per-module params, MACs, FLOPs, activation bytes and latency",
    "prune": "L1 filter pruning with retraining to a smaller dense model (seed 003)",
    "pfa": "Principal Filter Analysis, accuracy-targeted, to a smaller dense model (seed 001)",
    "exits": "learned early exits with a certified accuracy-drop bound (seed 004)",
    "rules": "certified linear rules for early exit at one layer (seed 000)",
    "export": "ONNX Runtime deployment (FP32, or int8 with --set int8=true), checked against PyTorch",
}


#: commands that live beside the methods they drive: name -> (module, help line). Each module has
#: ``add_arguments(parser)`` and ``main(args) -> int``; imported only when the parser is built.
PLUGIN_COMMANDS = {
    "sweep": ("moco.track.sweep_cli", "Optuna sweep over training or compression settings (seed 003); resumable"),
    "report": ("moco.track.report_cli", "HTML report of a sweep or an MLflow experiment: table, Pareto plots, errors"),
}


def _progress(args) -> bool:
    """Bars only on a terminal: a log file or a pipe gets no carriage-return noise."""
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


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

    run = sub.add_parser("run", help="run the steps of a TOML config on your model and data; one report",
                         description="Run the [[steps]] of CONFIG (a TOML file: [model], [data], [[steps]]; see "
                         "examples/) in order, each on the previous step's model. Writes DIR/NN-method/ per step, "
                         "DIR/report.md and DIR/report.json; the last stdout line is JSON.")
    run.add_argument("config", help="the TOML file")
    run.add_argument("--out", default=None, help="output folder (default moco-out/<config name>)")
    run.add_argument("--set", action="append", default=[], metavar="[N.]KEY=VALUE",
                     help="override a step parameter (N: step number, default every step that has KEY), "
                          "e.g. --set 1.epochs=2 (repeatable)")
    run.add_argument("--no-timing", action="store_true", help="skip the side-by-side timing (faster)")
    run.add_argument("--train-size", type=int, default=None, help="override [data] train_size (a seeded subset)")
    run.add_argument("--test-size", type=int, default=None, help="override [data] test_size (a seeded subset)")
    _add_tracking(run, "moco")
    _add_common(run)

    for method, summary in METHOD_COMMANDS.items():
        extra = (" Without --data and --out it only measures the model: the table on stdout (--json FILE writes "
                 "it as JSON)." if method == "profile" else "")
        m = sub.add_parser(method, help=summary,
                           description=f"{summary}. One step of 'moco run' without a config file; same outputs "
                                       f"(a run folder, its last stdout line JSON).{extra}")
        m.add_argument("model", nargs="?" if method == "profile" else None,
                       help="model spec: a zoo name, path/to/file.py:Name or package.module:Name"
                            + (" (or a moco checkpoint file)" if method == "profile" else ""))
        m.add_argument("--weights", default=None, help="state_dict, moco or Lightning checkpoint file")
        m.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                       help="model constructor argument, e.g. --arg width=16 (repeatable)")
        m.add_argument("--input-shape", default=None, help="one sample's shape C,H,W (default: the model's or the data's)")
        m.add_argument("--data", default=None, help="training data: dataset name[:train], file.npz or image folder")
        m.add_argument("--test", default=None, help="test data (default: the dataset's test split)")
        m.add_argument("--normalize", default=None, help="'true' (the dataset's mean/std) or MEAN,STD")
        m.add_argument("--train-size", type=int, default=None, help="use a seeded subset of the training data")
        m.add_argument("--test-size", type=int, default=None, help="use a seeded subset of the test data")
        m.add_argument("--out", default=None, help=f"output folder (default moco-out/{method})")
        m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help=f"a {method} parameter (see 'moco run --help' and the README), repeatable")
        m.add_argument("--no-timing", action="store_true", help="skip the side-by-side timing")
        if method == "profile":
            m.add_argument("--list", action="store_true", help="list the zoo models and exit")
            m.add_argument("--batch", type=int, default=1, help="batch size of the example input (default 1)")
            m.add_argument("--no-latency", action="store_true", help="count only; skip the latency measurement")
            m.add_argument("--repeats", type=int, default=3, help="timed forward passes for latency (default 3)")
            m.add_argument("--plot", default=None, metavar="PNG", help="save a bar chart of MACs and latency per layer")
            m.add_argument("--json", default=None, metavar="FILE", help="write the profile as JSON")
        _add_tracking(m, "moco")
        _add_common(m)

    bench = sub.add_parser("bench", help="run a registered benchmark; last stdout line is JSON")
    bench.add_argument("name", nargs="?", help="benchmark name (omit, or --list, to list them)")
    bench.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    bench.add_argument("--quick", action="store_true", help="smaller, faster run for a smoke test")
    bench.add_argument("--json", default=None, metavar="FILE", help="also write the JSON result to FILE")
    _add_tracking(bench, "moco-bench")
    _add_seed(bench)

    import importlib

    for name, (module, summary) in PLUGIN_COMMANDS.items():
        mod = importlib.import_module(module)
        plugin = sub.add_parser(name, help=summary, description=(mod.__doc__ or summary).strip().split("\n\n")[0])
        mod.add_arguments(plugin)
        plugin.set_defaults(_plugin=mod)

    data = sub.add_parser("data", help="datasets: check the data root")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    check = data_sub.add_parser("check", help="which datasets are present under the data root, md5 ok")
    check.add_argument("--root", default=None, help="data root (default: $MOCO_DATA, ../shared/data, cache)")
    check.add_argument("--no-md5", action="store_true", help="only look for the files, skip the checksums")
    return parser


def _kwargs(items: Sequence[str], flag: str) -> dict:
    from moco.run import parse_set_options

    return parse_set_options(items, flag=flag)


def _shape(text: str | None):
    if not text:
        return None
    try:
        shape = [int(s) for s in text.split(",")]
    except ValueError:
        raise MocoError(f"--input-shape expects integers like 1,28,28, got {text!r}") from None
    if any(s < 1 for s in shape):
        raise MocoError(f"--input-shape expects positive integers C,H,W like 1,28,28, got {text!r}")
    return shape


def _check_output_file(path: str | None, flag: str) -> None:
    """Fail before the work, not after it, for an output path that cannot be a file."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise MocoError(f"{flag} {path} is a folder; give a file name")
    if p.parent.exists() and not p.parent.is_dir():
        raise MocoError(f"{flag} {path}: {p.parent} is not a folder")


def _cmd_profile(args) -> int:
    import torch

    from moco.models import create, get_spec, input_shape, list_models
    from moco.profile import profile

    if args.list:
        for name in list_models():
            spec = get_spec(name)
            print(f"{name:14s} input {'x'.join(map(str, spec.input_shape)):9s} {spec.summary}")
        return 0
    if not args.model:
        raise MocoError("give a model spec (zoo name, file.py:Name, package.module:Name) or a checkpoint file")
    _check_output_file(args.plot, "--plot")
    _check_output_file(args.json, "--json")
    if args.batch < 1:
        raise MocoError(f"--batch must be >= 1, got {args.batch}")
    kwargs = _kwargs(args.arg, "--arg")
    shape = _shape(args.input_shape)
    if Path(args.model).is_file() and not args.model.endswith(".py"):
        from moco.train import load_checkpoint

        model, meta = load_checkpoint(args.model)
        arch = meta.get("arch") or {}
        shape = shape or input_shape(arch["name"], **arch.get("kwargs", {}))
        label = f"{args.model} ({arch['name']})"
    elif args.model in list_models() and not args.weights:
        try:
            model = create(args.model, **kwargs).eval()
        except TypeError as exc:
            raise MocoError(str(exc)) from None
        shape = shape or input_shape(args.model, **kwargs)
        label = args.model
    else:
        from moco.specs import resolve_model

        resolved = resolve_model(args.model, weights=args.weights, args=kwargs, input_shape=shape,
                                 require_weights=False, seed=args.seed or 0)
        model, label, shape = resolved.model, resolved.label, shape or resolved.input_shape
    seed = args.seed or 0
    if args.data:
        from moco.specs import resolve_data

        data = resolve_data(args.data, split="train", normalize=_normalize_arg(args.normalize))
        x = data.x[: args.batch]
    else:
        if shape is None:
            raise MocoError(f"the input shape of {label} is unknown; give --input-shape C,H,W or --data")
        torch.manual_seed(seed)
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


def _normalize_arg(text: str | None):
    if text is None:
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        mean, std = (float(v) for v in text.split(","))
    except ValueError:
        raise MocoError(f"--normalize expects 'true' or MEAN,STD, got {text!r}") from None
    return [mean, std]


def _set_overrides(items: Sequence[str], n_steps: int) -> dict[int | None, dict]:
    from moco.run import parse_set_options

    out: dict[int | None, dict] = {}
    for key, value in parse_set_options(items).items():
        head, dot, tail = key.partition(".")
        if dot and head.isdigit():
            index = int(head)
            if not 1 <= index <= n_steps:
                raise MocoError(f"--set {key}: there is no step {index} (the config has {n_steps})")
            out.setdefault(index, {})[tail] = value
        else:
            out.setdefault(None, {})[key] = value
    return out


def _finish_run(result) -> int:
    import json

    print(result.to_text())
    print(json.dumps(result.summary(), sort_keys=True))
    return 0


def _cmd_run(args) -> int:
    from moco.run import config_from_dict, load_config, run_config
    from moco.run.steps import STEP_PARAMS

    cfg = load_config(args.config)
    doc = cfg.to_dict()
    overrides = _set_overrides(args.set, len(cfg.steps))
    for i, step in enumerate(doc["steps"], 1):
        for key, value in overrides.get(None, {}).items():
            if key in STEP_PARAMS.get(step["method"], {}):
                step[key] = value
        step.update(overrides.get(i, {}))
    unused = [k for k in overrides.get(None, {}) if not any(k in STEP_PARAMS.get(s["method"], {}) for s in doc["steps"])]
    if unused:
        raise MocoError(f"--set {', '.join(unused)}: no step of {args.config} has such a parameter")
    if args.seed is not None:
        doc["seed"] = args.seed
    if args.no_timing:
        doc.setdefault("measure", {})["timing"] = False
    for key in ("train_size", "test_size"):
        if getattr(args, key) is not None:
            doc["data"][key] = getattr(args, key)
    cfg = config_from_dict(doc, base_dir=cfg.base_dir, source=cfg.source)
    out = args.out or str(Path("moco-out") / Path(args.config).stem)
    return _finish_run(run_config(cfg, out, progress=_progress(args), echo=_echo, **_tracking(args)))


def _echo(line: str) -> None:
    print(line, file=sys.stderr if sys.stderr.isatty() else sys.stdout, flush=True)


def _cmd_method(args) -> int:
    from moco.run import config_from_dict, parse_set_options, run_config

    if not args.data:
        raise MocoError(f"moco {args.command} needs --data (a dataset name, an .npz file or an image folder)")
    model = {"spec": args.model, "args": _kwargs(args.arg, "--arg")}
    if args.weights:
        model["weights"] = args.weights
    if args.input_shape:
        model["input_shape"] = _shape(args.input_shape)
    data = {"train": args.data}
    for key in ("test", "train_size", "test_size"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    if args.normalize is not None:
        data["normalize"] = _normalize_arg(args.normalize)
    doc = {"seed": args.seed or 0, "model": model, "data": data,
           "steps": [{"method": args.command, **parse_set_options(args.set)}]}
    if args.no_timing:
        doc["measure"] = {"timing": False}
    cfg = config_from_dict(doc, base_dir=Path.cwd(), source=f"moco {args.command}")
    out = args.out or str(Path("moco-out") / args.command)
    return _finish_run(run_config(cfg, out, progress=_progress(args), echo=_echo, **_tracking(args)))


def _cmd_bench(args) -> int:
    from moco.bench import list_benchmarks, run_benchmark

    if args.list or not args.name:
        for name, summary in list_benchmarks():
            print(f"{name:24s} {summary}")
        return 0
    run_benchmark(args.name, quick=args.quick, seed=args.seed, json_path=args.json, **_tracking(args))
    return 0


def _cmd_data(args, parser) -> int:
    if args.data_command != "check":
        parser.parse_args(["data", "--help"])
        return 2
    from moco.data import check_root

    report = check_root(args.root, verify_md5=not args.no_md5)
    print(report.to_text())
    return 0 if report.ok else 1


def _join_negative_shape(argv: list[str]) -> list[str]:
    """``--input-shape -1,28,28`` as ``--input-shape=-1,28,28``: argparse would read the value as an option
    and say only "expected one argument"; joined, the shape check names the bad size."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--input-shape" and i + 1 < len(argv) and argv[i + 1][:1] == "-" and argv[i + 1][1:2].isdigit():
            out.append(f"--input-shape={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moco`` command; returns the exit code."""
    parser = build_parser()
    argv = _join_negative_shape(list(sys.argv[1:] if argv is None else argv))
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
                out=args.out, seed=args.seed, progress=not args.no_progress and sys.stderr.isatty(),
            )
            return 0
        if args.command == "profile" and (args.list or not (args.out and args.data)):
            if _tracking(args)["track"] and not args.list:
                raise MocoError("moco profile --track needs --data and --out (the run form of the step); "
                                "or use 'moco run examples/profile.toml --track'")
            return _cmd_profile(args)
        if args.command == "run":
            with _sigterm_as_interrupt():
                return _cmd_run(args)
        if args.command in METHOD_COMMANDS:
            with _sigterm_as_interrupt():
                return _cmd_method(args)
        if args.command == "bench":
            _check_output_file(args.json, "--json")
            return _cmd_bench(args)
        if args.command == "data":
            return _cmd_data(args, parser)
        if args.command in PLUGIN_COMMANDS:
            return int(args._plugin.main(args))
    except (MocoError, ValueError, TypeError, FileNotFoundError) as exc:
        if os.environ.get("MOCO_DEBUG"):
            raise
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"moco: error: {msg}", file=sys.stderr)
        return 2
    except _Terminated:
        print("moco: terminated (SIGTERM); the step's temporary files were removed", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("moco: interrupted", file=sys.stderr)
        return 130
    return 0


class _Terminated(BaseException):
    """SIGTERM raised in the main thread, so that with-blocks and finally clauses clean up (temporary folders)."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While a run works, SIGTERM (a CI timeout, ``kill``) unwinds like Ctrl+C instead of ending the process
    on the spot, which left the export's temporary folder in /tmp. Outside the main thread: nothing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
