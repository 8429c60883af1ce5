"""``run_config(config, out)``: resolve the model and data, run the steps in order, measure every step,
write ``out/NN-method/`` per step and ``out/report.md`` + ``out/report.json``.

Measurement after every step (and of the original first), on the ``test`` data:

* ``params`` (of the plain model under the stage), ``macs`` per sample (profiler count; for exits and
  rules the mean over the test samples of the path each took), accuracy, agreement of predicted
  classes with the original model, where samples left (exits / rules);
* time side by side (:func:`moco.bench.harness.compare`: warm-up, interleaved rounds, median) against
  the original run eagerly in PyTorch and in ONNX Runtime (the fastest way a user already has), on the
  same test batches, same threads: ``ratio_vs_eager`` and ``ratio_vs_onnxruntime`` (below 1: faster).

The run folder also holds ``config.json`` (the resolved configuration, seed, versions and threads), so
the same command reproduces the run.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moco.errors import MocoError
from moco.io import prepare_out_dir, write_bytes_atomic, write_json_atomic
from moco.results import ResultProtocol, frame_text, json_safe
from moco.run.config import RunConfig
from moco.run.stage import RunContext, Stage
from moco.run.steps import StepOutcome, run_step

__all__ = ["RunResult", "StepRecord", "run_config"]

_HOLDOUT_FRACTION = 0.15
_HOLDOUT_MAX = 10_000


@dataclass(frozen=True)
class StepRecord(ResultProtocol):
    """One step of a run, as measured: ``index``, ``method``, ``folder``, ``changed`` (one line), the
    measurement (``params``, ``macs``, ``accuracy``, ``agreement``, ``ratio_vs_eager``,
    ``ratio_vs_onnxruntime``, ``exit_fractions``), the ``certified`` bound or None, the step's ``summary``,
    ``seconds`` it took and the ``artifacts`` it wrote."""

    index: int
    method: str
    folder: str
    changed: str
    params: int | None
    macs: float
    accuracy: float
    agreement: float
    ratio_vs_eager: float | None
    ratio_vs_onnxruntime: float | None
    exit_fractions: tuple[float, ...] | None
    certified: dict[str, Any] | None
    summary: dict[str, Any]
    seconds: float
    artifacts: tuple[str, ...]
    text: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("index", "method", "folder", "changed", "params", "macs", "accuracy",
                                          "agreement", "ratio_vs_eager", "ratio_vs_onnxruntime", "exit_fractions",
                                          "certified", "summary", "seconds", "artifacts")}
        return json_safe(d)


@dataclass(frozen=True)
class RunResult(ResultProtocol):
    """A finished run: the ``base`` measurement of the original, one :class:`StepRecord` per step, the
    ``out`` folder, and the ``environment`` (versions, threads, seed)."""

    base: dict[str, Any]
    steps: tuple[StepRecord, ...]
    out: str
    environment: dict[str, Any]
    config: dict[str, Any]

    @property
    def final(self) -> dict[str, Any]:
        return self.steps[-1].to_dict() if self.steps else self.base

    def summary(self) -> dict[str, Any]:
        """The one-line JSON of ``moco run``."""
        last = self.final
        base_macs = self.base["macs"]
        return json_safe({
            "accuracy_base": self.base["accuracy"], "accuracy_final": last["accuracy"],
            "agreement": last["agreement"],
            "macs_base": base_macs, "macs_final": last["macs"],
            "macs_reduction": base_macs / last["macs"] if last["macs"] else None,
            "ratio_vs_eager": last.get("ratio_vs_eager"), "ratio_vs_onnxruntime": last.get("ratio_vs_onnxruntime"),
            "certified": [s.certified for s in self.steps if s.certified],
            "steps": [s.method for s in self.steps], "out": self.out,
        })

    def to_dict(self) -> dict[str, Any]:
        return json_safe({"summary": self.summary(), "base": self.base, "steps": [s.to_dict() for s in self.steps],
                          "environment": self.environment, "config": self.config})

    def to_frame(self):
        import pandas as pd

        rows = [{"step": "original", "params": self.base["params"], "MACs/sample": self.base["macs"],
                 "accuracy": self.base["accuracy"], "agreement": 1.0, "vs eager": 1.0,
                 "vs ORT": self.base.get("ratio_vs_onnxruntime"), "certified": ""}]
        for s in self.steps:
            cert = f"{s.certified['bound']:.4g}" if s.certified and s.certified.get("bound") is not None else ""
            rows.append({"step": f"{s.index:02d}-{s.method}", "params": s.params, "MACs/sample": s.macs,
                         "accuracy": s.accuracy, "agreement": s.agreement, "vs eager": s.ratio_vs_eager,
                         "vs ORT": s.ratio_vs_onnxruntime, "certified": cert})
        return pd.DataFrame(rows)

    def to_text(self) -> str:
        s = self.summary()
        red = f"{s['macs_reduction']:.2f}x" if s["macs_reduction"] else "n/a"
        return "\n".join([
            frame_text(self.to_frame()),
            f"accuracy {s['accuracy_base']:.4f} -> {s['accuracy_final']:.4f}, agreement {s['agreement']:.4f}, "
            f"MACs {red} fewer, time vs eager {_fmt(s['ratio_vs_eager'])}, vs ONNX Runtime "
            f"{_fmt(s['ratio_vs_onnxruntime'])}; report {Path(self.out) / 'report.md'}",
        ])

    def to_markdown(self) -> str:
        env = self.environment
        lines = [f"# moco run report", "",
                 f"model `{self.config['model']['spec']}` ({self.base['label']}), data train `{self.config['data']['train']}`"
                 f" ({self.base['n_train']} samples), test `{self.base['test_spec']}` ({self.base['n_test']} samples); "
                 f"seed {env['seed']}; torch {env['torch']}, onnxruntime {env.get('onnxruntime')}, "
                 f"{env['threads']} threads, {env['cpu_count']} cores; moco {env['moco']}", "",
                 "Times are medians of interleaved side-by-side runs on the same test batches; ratios below 1 are "
                 "faster than the original (eager PyTorch / ONNX Runtime). MACs are multiply-accumulates per sample.",
                 "", _markdown_table(self.to_frame()), ""]
        for s in self.steps:
            lines += [f"## {s.index:02d} {s.method}", "", f"**Changed:** {s.changed}", ""]
            if s.certified:
                c = s.certified
                lines += [f"**Certified:** {c.get('what')}: bound {_fmt(c.get('bound'))}, measured "
                          f"{_fmt(c.get('measured'))} on {c.get('n')} held-out samples", ""]
            lines += [f"accuracy {s.accuracy:.4f}, agreement with the original {s.agreement:.4f}, "
                      f"{s.macs / 1e6:.4g} M MACs per sample, {s.seconds:.1f} s", ""]
            if s.exit_fractions:
                lines += [f"exit fractions on test: {', '.join(f'{f:.3f}' for f in s.exit_fractions)}", ""]
            lines += ["```text", s.text.strip(), "```", "", "Files: " + ", ".join(
                f"`{Path(a).relative_to(self.out) if Path(a).is_relative_to(self.out) else a}`" for a in s.artifacts), ""]
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.4g}"


def _markdown_table(frame) -> str:
    cols = list(frame.columns)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in frame.iterrows():
        cells = [_fmt(float(v)) if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
                 else ("" if v is None else str(v)) for v in (row[c] for c in cols)]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ context

def _environment(cfg: RunConfig) -> dict[str, Any]:
    import moco

    env = {"moco": moco.__version__, "torch": str(torch.__version__), "numpy": np.__version__,
           "python": platform.python_version(), "platform": platform.platform(), "threads": torch.get_num_threads(),
           "cpu_count": __import__("os").cpu_count(), "seed": cfg.seed, "config_digest": cfg.digest(),
           "argv": sys.argv}
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # pragma: no cover - a dependency
        env["onnxruntime"] = None
    return env


def build_context(cfg: RunConfig, *, out: Path | None = None, progress: bool = False) -> RunContext:
    """Resolve the model and data of ``cfg`` into a :class:`RunContext` (no step runs)."""
    from moco.specs import absolute_spec, align_classes, resolve_data, resolve_model

    d = cfg.data
    train = resolve_data(d.train, split="train", normalize=d.normalize, root=d.root, base_dir=cfg.base_dir)
    from moco.data.loaders import canonical_name
    from moco.specs import parse_data_spec

    try:
        dataset = canonical_name(parse_data_spec(d.train)[0])
    except MocoError:
        dataset = None  # the user's own data
    resolved = resolve_model(cfg.model.spec, weights=cfg.model.weights, args=cfg.model.args,
                             input_shape=cfg.model.input_shape, dataset=dataset, base_dir=cfg.base_dir,
                             seed=cfg.seed, progress=progress)
    normalize = d.normalize
    if normalize is None and resolved.normalize is not None:
        normalize = [list(resolved.normalize[0]), list(resolved.normalize[1])]  # moco trained it so
        train = train.normalized(normalize)
    test_spec = d.test or (f"{dataset}:test" if dataset else None)
    if test_spec is None:
        raise MocoError("[data] test is required for your own data (an .npz or folder of held-out images)")
    test = resolve_data(test_spec, split="test", normalize=normalize, root=d.root, base_dir=cfg.base_dir)
    train = train.subset(d.train_size, cfg.seed)
    test = align_classes(train, test.subset(d.test_size, cfg.seed + 1))
    if test.input_shape != train.input_shape:
        raise MocoError(f"train images are {train.input_shape} but test images are {test.input_shape}; they must match")
    if resolved.input_shape is not None and tuple(resolved.input_shape) != train.input_shape:
        raise MocoError(f"the model takes input_shape {list(resolved.input_shape)} but the data is "
                        f"{list(train.input_shape)}; fix [model] input_shape or the data")
    model = resolved.model
    example = train.x[:1].clone()
    try:
        with torch.inference_mode():
            logits = model(example)
    except Exception as exc:
        raise MocoError(f"the model fails on one data sample {tuple(example.shape)}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise MocoError(f"the model must return logits [N, classes]; it returns "
                        f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    k = int(logits.shape[1])
    for name, data in (("train", train), ("test", test)):
        top = int(data.y.max())
        if top >= k:
            raise MocoError(f"{name} labels reach {top} but the model has {k} outputs; the data does not fit the model")
    n_hold = min(_HOLDOUT_MAX, max(1, int(round(len(train) * _HOLDOUT_FRACTION))))
    perm = torch.from_numpy(np.random.default_rng(cfg.seed).permutation(len(train)))
    hold_idx, fit_idx = perm[:n_hold].sort().values, perm[n_hold:].sort().values
    from moco.specs import Data

    holdout = Data(train.x[hold_idx], train.y[hold_idx], train.classes, train.spec + " (holdout)", train.source,
                   train.normalize)
    fit = Data(train.x[fit_idx], train.y[fit_idx], train.classes, train.spec + " (fit)", train.source, train.normalize)
    arch = {"name": resolved.zoo, "kwargs": dict(resolved.args)} if resolved.zoo else None
    model_spec = None if arch else {"model": absolute_spec(cfg.model.spec, cfg.base_dir), "args": dict(resolved.args)}
    return RunContext(resolved, model, train, fit, holdout, test, example, cfg.seed, progress, arch, out,
                      timing=bool(cfg.measure.timing), model_spec=model_spec)


# ---------------------------------------------------------------------------------------- measuring

class _Timer:
    """The original's eager and ONNX Runtime variants, built once, timed beside each stage."""

    def __init__(self, ctx: RunContext, cfg: RunConfig):
        from moco.bench import baseline_variants

        m = cfg.measure
        self.enabled = m.timing
        self.batches = [ctx.test.x[i * m.batch_size:(i + 1) * m.batch_size] for i in range(m.batches)]
        self.batches = [b for b in self.batches if len(b)]
        self.repeats, self.warmup = m.repeats, m.warmup
        self.variants: dict[str, Any] = {}
        self.notes: list[str] = []
        if not self.enabled:
            return
        base = baseline_variants(ctx.original, self.batches[0], include=("eager", "onnxruntime"),
                                 check_inputs=self.batches[:1])
        self.variants = {f"original/{k}": v for k, v in base.variants.items()}
        for name, why in getattr(base, "unavailable", {}).items():
            self.notes.append(f"original/{name} unavailable: {why}")

    def time(self, stage: Stage | None) -> tuple[float | None, float | None]:
        if not self.enabled or "original/eager" not in self.variants:
            return None, None
        from moco.bench import compare

        variants = dict(self.variants)
        if stage is not None:
            variants["current"] = stage
        res = compare(variants, self.batches, baseline="original/eager", warmup=self.warmup, repeats=self.repeats)
        name = "current" if stage is not None else "original/eager"
        ort = res.timing("original/onnxruntime").median_s if "original/onnxruntime" in variants else None
        own = res.timing(name).median_s
        return res.ratio(name), (own / ort if ort else None)


def _measure(stage: Stage, ctx: RunContext, base_labels: np.ndarray | None) -> dict[str, Any]:
    labels, where = stage.predict(ctx.test.x)
    y = ctx.test.y.numpy()
    out: dict[str, Any] = {"accuracy": float((labels == y).mean()),
                           "agreement": float((labels == base_labels).mean()) if base_labels is not None else 1.0,
                           "macs": stage.expected_macs(where, ctx.example), "labels": labels}
    model = stage.model
    out["params"] = int(sum(p.numel() for p in model.parameters())) if model is not None else None
    if stage.kind == "exits" or (stage.kind == "deployed" and stage.info.get("path_macs") and where is not None):
        k = len(stage.info.get("path_macs", []))
        out["exit_fractions"] = tuple(float(v) for v in np.bincount(where, minlength=k)[:k] / max(len(where), 1))
    elif stage.kind == "rules" and where is not None:
        out["exit_fractions"] = (float((where == 0).mean()), float((where == 1).mean()))
    return out


# -------------------------------------------------------------------------------------------- run

def run_config(cfg: RunConfig, out: str | Path, *, progress: bool = False, echo=None, track: bool = False,
               tracking_uri: str | None = None, experiment: str | None = None) -> RunResult:
    """Run every step of ``cfg`` in order, each on the previous step's result; write the run folder.

    ``echo`` (e.g. ``print``) receives a line as each step starts and ends. Returns the
    :class:`RunResult`; ``out/report.md`` and ``out/report.json`` hold the same. A step that fails raises
    MocoError naming the step (the folders of the steps before it are kept).

    ``track=True`` logs the run to MLflow (:class:`moco.track.RunTracking`: a parent run with the config,
    the report's figures, the report files and the final model; a nested run per step) in experiment
    ``experiment`` (default ``moco``) at ``tracking_uri`` (default ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///mlflow.db`` in the working directory); a bad URI fails before any work.
    """
    out = Path(out).resolve()
    tracking = None
    if track:
        from moco.track.tracking import RunTracking

        tracking = RunTracking(cfg, out, tracking_uri=tracking_uri, experiment=experiment)
    say = echo or (lambda *_: None)
    old_threads = torch.get_num_threads()
    try:
        prepare_out_dir(out)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            return _run(cfg, out, progress, say, tracking)
    except BaseException as exc:
        if tracking is not None:
            tracking.failed(exc)  # the open step run and the pipeline run end FAILED with the error
        raise
    finally:
        torch.set_num_threads(old_threads)


def _clear_previous_run(out: Path) -> None:
    """Remove what an earlier run left in ``out``: its report files and its step folders (``NN-method``). A run
    that fails must not leave a previous run's successful report (or deployment) beside its own config."""
    from moco.run.steps import STEP_METHODS

    for name in ("report.json", "report.md"):
        (out / name).unlink(missing_ok=True)
    for folder in out.iterdir():
        head, _, method = folder.name.partition("-")
        if folder.is_dir() and len(head) == 2 and head.isdigit() and method in STEP_METHODS:
            shutil.rmtree(folder)


def _run(cfg: RunConfig, out: Path, progress: bool, say, tracking=None) -> RunResult:
    env = _environment(cfg)
    config = cfg.to_dict()
    _clear_previous_run(out)
    write_json_atomic(out / "config.json", json_safe({"config": config, "environment": env,
                                                      "source": cfg.source, "base_dir": cfg.base_dir}))
    if tracking is not None:
        tracking.started(config, env)
    t0 = time.perf_counter()
    ctx = build_context(cfg, out=out, progress=progress)
    say(f"model {ctx.resolved.label}: train {len(ctx.train)} ({len(ctx.fit)} fit + {len(ctx.holdout)} holdout), "
        f"test {len(ctx.test)} samples, input {list(ctx.train.input_shape)} ({time.perf_counter() - t0:.1f} s)")
    timer = _Timer(ctx, cfg)
    stage = Stage("model", ctx.original, ctx.original)
    base = _measure(stage, ctx, None)
    base_labels = base.pop("labels")
    base["ratio_vs_eager"], base["ratio_vs_onnxruntime"] = timer.time(None)
    base.update({"label": ctx.resolved.label, "n_train": len(ctx.train), "n_test": len(ctx.test),
                 "test_spec": ctx.test.spec, "timing_notes": timer.notes})
    say(f"original: accuracy {base['accuracy']:.4f}, {base['macs'] / 1e6:.4g} M MACs per sample")
    if tracking is not None:
        tracking.measured(0, base)
    records: list[StepRecord] = []
    for i, step in enumerate(cfg.steps, 1):
        folder = out / f"{i:02d}-{step.method}"
        if folder.exists():
            shutil.rmtree(folder)  # a re-run replaces the step's outputs whole
        say(f"step {i}/{len(cfg.steps)}: {step.method} ...")
        if tracking is not None:
            tracking.step_started(i, step)  # a nested run; epochs the step trains are logged to it
        ts = time.perf_counter()
        try:
            outcome: StepOutcome = run_step(ctx, stage, step, folder)
        except MocoError as exc:
            raise MocoError(f"step {i} ({step.method}) failed: {exc}") from None
        seconds = time.perf_counter() - ts
        stage = outcome.stage
        m = _measure(stage, ctx, base_labels)
        m.pop("labels")
        r_eager, r_ort = timer.time(stage) if outcome.changed != "nothing (measurement only)" else (
            base["ratio_vs_eager"], base["ratio_vs_onnxruntime"])
        rec = StepRecord(i, step.method, str(folder), outcome.changed, m["params"], m["macs"], m["accuracy"],
                         m["agreement"], r_eager, r_ort, m.get("exit_fractions"), json_safe(outcome.certified),
                         json_safe(outcome.summary), seconds, tuple(outcome.artifacts), outcome.text)
        write_json_atomic(folder / "step.json", rec.to_dict())
        if tracking is not None:
            tracking.step_done(rec)
        records.append(rec)
        say(f"step {i} {step.method}: {outcome.changed}; accuracy {m['accuracy']:.4f}, agreement "
            f"{m['agreement']:.4f}, {m['macs'] / 1e6:.4g} M MACs, time vs eager {_fmt(r_eager)}, vs ORT "
            f"{_fmt(r_ort)} ({seconds:.1f} s)")
    result = RunResult(json_safe(base), tuple(records), str(out), env, config)
    write_bytes_atomic(out / "report.md", (result.to_markdown() + "\n").encode())
    write_json_atomic(out / "report.json", result.to_dict())
    if tracking is not None:
        tracking.finished(result, stage, {"spec": cfg.model.spec, "args": dict(cfg.model.args or {}),
                                          "weights": cfg.model.weights, "zoo": ctx.arch})
        say(tracking.summary_line())
    return result
