"""One trial of a sweep: build, train (or run the pipeline), measure, write the artifacts, tell Optuna.

Training sweep, per trial: the model is built from ``[model]`` with the point's arguments (seeded),
trained with :func:`moco.train.fit` (seeded; stops at ``target_train_accuracy`` or ``epochs``), evaluated on
the test data after every epoch (``history``; the pruner judges the per-epoch value of the objective),
then profiled for MACs and parameters (and latency when an objective or ``[measure] latency`` asks).
Pipeline sweep, per trial: the ``moco run`` steps of the point's config run in order on the same base
model (the steps' own seed: every point sees the same random numbers), and the final stage is measured
as ``moco run`` measures it (accuracy, agreement with the original, MACs per sample, time side by side).

Artifacts (the sweep contract): ``OUT/trials/NNNN/`` holds ``config.toml`` (reproduces the trial alone),
the model (``state_dict.pt`` + ``arch.json``; a pipeline's step folders hold its compressed model),
``history.json`` and ``predictions.npz``. They are written into a temporary folder beside it and renamed
into place in one step, so a reader (or a killed sweep) never sees half a trial.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from moco.errors import MocoError
from moco.results import json_safe
from moco.track.sweep.config import PER_EPOCH, SweepConfig, dumps_toml

__all__ = ["SAMPLES_PER_CELL", "TrialRunner", "prediction_samples", "trial_folder"]

#: images kept per (true, predicted) cell in predictions.npz, and at most this many in all
SAMPLES_PER_CELL = 12
MAX_SAMPLES = 3000


def trial_folder(out: Path, number: int) -> Path:
    """``OUT/trials/NNNN`` of trial ``number``."""
    return Path(out) / "trials" / f"{number:04d}"


def prediction_samples(y_true: np.ndarray, y_pred: np.ndarray, *, per_cell: int = SAMPLES_PER_CELL,
                       cap: int = MAX_SAMPLES, seed: int = 0) -> np.ndarray:
    """Positions of test samples whose images go into ``predictions.npz``: up to ``per_cell`` of every
    (true, predicted) cell that occurs (a seeded choice), at most ``cap`` in all, sorted."""
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    cells = {}
    for i, key in enumerate(zip(y_true.tolist(), y_pred.tolist())):
        cells.setdefault(key, []).append(i)
    per = per_cell
    while per >= 1:
        chosen = [rng.permutation(np.asarray(v))[:per] for _, v in sorted(cells.items())]
        if sum(len(c) for c in chosen) <= cap or per == 1:
            break
        per //= 2
    out = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    return out[:cap].astype(np.int64)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _unnormalise(x, stats):
    import torch

    if stats is None:
        return x
    mean = torch.tensor(stats[0]).view(1, -1, 1, 1)
    std = torch.tensor(stats[1]).view(1, -1, 1, 1)
    return (x * std + mean).clamp_(0.0, 1.0)


class TrialRunner:
    """Runs the trials of one sweep in one process (data loaded once, reused by every trial).

    ``tracking``: None, or ``{"tracking_uri", "experiment", "parent_run_id"}``: each trial then becomes an
    MLflow run nested under the sweep's run (params, per-epoch and final metrics, artifacts, model).
    """

    def __init__(self, cfg: SweepConfig, out: Path, *, tracking: dict[str, Any] | None = None,
                 echo: Callable[[str], None] | None = None):
        self.cfg, self.out = cfg, Path(out)
        self.tracking = tracking
        self.echo = echo
        self._data = None

    # ------------------------------------------------------------------ data

    def load_data(self):
        """``(train, test, raw test images)`` of a training sweep, loaded once (seeded subsets of the sweep's
        seed, as ``moco run`` takes them: every trial sees the same images)."""
        if self._data is not None:
            return self._data
        from moco.data.loaders import canonical_name
        from moco.specs import align_classes, parse_data_spec, resolve_data

        d, cfg = self.cfg.data, self.cfg
        train = resolve_data(d["train"], split="train", root=d.get("root"), base_dir=cfg.base_dir)
        try:
            dataset = canonical_name(parse_data_spec(d["train"])[0])
        except MocoError:
            dataset = None
        test_spec = d.get("test") or (f"{dataset}:test" if dataset else None)
        if test_spec is None:
            raise MocoError("[data] test is required for your own data (an .npz or folder of held-out images)")
        test = resolve_data(test_spec, split="test", root=d.get("root"), base_dir=cfg.base_dir)
        train = train.subset(d.get("train_size"), cfg.data_seed)
        test = align_classes(train, test.subset(d.get("test_size"), cfg.data_seed + 1))
        raw_test = test.x
        if d.get("normalize") not in (None, False):
            train = train.normalized(d["normalize"])
            test = test.normalized(d["normalize"])
        if train.input_shape != test.input_shape:
            raise MocoError(f"train images are {train.input_shape} but test images are {test.input_shape}; they must match")
        self._data = (train, test, raw_test)
        return self._data

    # ------------------------------------------------------------------ one trial

    def trial_seed(self, trial) -> int:
        """The sweep seed + the grid point's index (grid) or the trial's number (a re-run of an interrupted
        trial: the original's number), so a point gets the same seed whoever runs it."""
        from moco.track.sweep.storage import POINT_ATTR

        attrs = trial.study._storage.get_trial_system_attrs(trial._trial_id)  # noqa: SLF001
        if POINT_ATTR in attrs:
            return self.cfg.seed + int(attrs[POINT_ATTR])
        return self.cfg.seed + int(attrs.get("failed_trial", trial.number))

    def run(self, study, trial) -> str:
        """Run ``trial`` and tell ``study`` how it ended; returns the state name.

        An exception in the trial (a bad point, a diverged training) records the trial FAIL with ``error``
        (one line; the traceback in ``trials/NNNN/error.txt``) and returns; Ctrl-C marks it interrupted
        (re-run once by the next sweep) and re-raises.
        """
        import optuna
        from optuna.trial import TrialState

        from moco.track.sweep.storage import mark_interrupted, start_heartbeat

        params = dict(trial.params)
        seed = self.trial_seed(trial)
        number = trial.number
        final = trial_folder(self.out, number)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        t0 = time.perf_counter()
        state, values, attrs, error = TrialState.COMPLETE, None, {}, None
        tracker = None
        try:
            with start_heartbeat(study, trial._trial_id):
                self._write_config(tmp, params, seed)
                if self.tracking is not None:
                    tracker = self._tracker(trial, params, seed)
                try:
                    if self.cfg.mode == "pipeline":
                        attrs = self._pipeline_trial(params, tmp, tracker)
                    else:
                        attrs = self._train_trial(trial, params, seed, tmp, tracker)
                except optuna.TrialPruned as pruned:
                    state = TrialState.PRUNED
                    attrs = getattr(pruned, "attrs", {}) or {}
                values = [float(attrs[o]) if attrs.get(o) is not None else math.nan for o in self.cfg.objectives]
                if state == TrialState.COMPLETE and not all(math.isfinite(v) for v in values):
                    missing = [o for o, v in zip(self.cfg.objectives, values) if not math.isfinite(v)]
                    raise MocoError(f"objective(s) {', '.join(missing)} not measured (NaN) for this point")
        except KeyboardInterrupt:
            shutil.rmtree(tmp, ignore_errors=True)
            if tracker is not None:
                tracker.finish("KILLED", error="interrupted")
            mark_interrupted(study, trial._trial_id, f"pid {os.getpid()} was stopped by Ctrl-C")
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of one point is recorded and the sweep goes on
            state, error = TrialState.FAIL, _one_line(exc)
            (tmp / "error.txt").write_text(traceback.format_exc())
        attrs = {**attrs, "seed": seed, "seconds": time.perf_counter() - t0,
                 "artifacts": str(final.relative_to(self.out))}
        if error is not None:
            attrs["error"] = error
        if tracker is not None:
            attrs["mlflow_run_id"] = tracker.run_id
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if tracker is not None:
            self._finish_tracker(tracker, state, attrs, final)
        try:
            for key, value in json_safe(attrs).items():
                trial.set_user_attr(key, value)
            with _quiet_optuna():
                if state == TrialState.COMPLETE:
                    study.tell(trial, values)
                else:
                    study.tell(trial, state=state)
        except optuna.exceptions.UpdateFinishedTrialError:
            # another process judged this trial interrupted (no heartbeat for --stale-after seconds) and queued
            # a re-run; that one is the record, this result is dropped
            if self.echo is not None:
                self.echo(f"trial {number}: finished after another process had marked it interrupted; its re-run "
                          "is the record")
            return "FAIL"
        if self.echo is not None:
            shown = ", ".join(f"{o} {_fmt(attrs.get(o))}" for o in self.cfg.objectives)
            self.echo(f"trial {number} {state.name.lower()}: {self.cfg.label_of(params)} {shown}"
                      + (f" ({error})" if error else "") + f" [{attrs['seconds']:.1f} s, pid {os.getpid()}]")
        return state.name

    def _write_config(self, folder: Path, params: dict, seed: int) -> None:
        from moco.io import write_bytes_atomic

        if self.cfg.mode == "pipeline":
            doc = self.cfg.pipeline_doc(params)
            from moco.track.sweep.config import _absolute_paths

            _absolute_paths(doc, Path(self.cfg.pipeline["base_dir"]))
            head = (f"# moco run config of sweep {self.cfg.name!r}, point {self.cfg.label_of(params)}:\n"
                    f"#   moco run config.toml\n")
        else:
            doc = self.cfg.single_point_doc(params, seed)
            head = (f"# sweep {self.cfg.name!r}, point {self.cfg.label_of(params)} alone (seed {seed}):\n"
                    f"#   moco sweep config.toml\n")
        write_bytes_atomic(folder / "config.toml", (head + dumps_toml(doc)).encode())

    # ------------------------------------------------------------------ training sweep

    def _train_trial(self, trial, params: dict, seed: int, folder: Path, tracker) -> dict[str, Any]:
        import optuna
        import torch

        from moco.io import write_json_atomic
        from moco.specs import absolute_spec, resolve_model
        from moco.train import evaluate, fit, predict

        cfg = self.cfg
        args, settings = cfg.trial_settings(params)
        train, test, raw_test = self.load_data()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            resolved = resolve_model(cfg.model["spec"], args=args, input_shape=cfg.model.get("input_shape"),
                                     base_dir=cfg.base_dir, require_weights=False, seed=seed)
        model = resolved.model
        history: list[dict[str, Any]] = []
        prune_key = PER_EPOCH.get(cfg.objectives[0]) if cfg.pruner != "none" else None
        x_test, y_test = test.tensors()
        epoch_log = tracker.epoch_callback() if tracker is not None else None

        def on_epoch(log) -> None:
            ev = evaluate(model, (x_test, y_test))
            rec = {"epoch": int(log.epoch), "loss": float(log.loss), "train_accuracy": float(log.train_accuracy),
                   "val_accuracy": None if log.val_accuracy is None else float(log.val_accuracy),
                   "test_accuracy": float(ev.accuracy), "test_loss": float(ev.loss), "seconds": float(log.seconds)}
            history.append(rec)
            if epoch_log is not None:
                epoch_log(log)
                tracker.log_metrics({"test_accuracy": ev.accuracy, "test_loss": ev.loss}, step=int(log.epoch))
            if prune_key is not None:
                trial.report(rec[prune_key], int(log.epoch))
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {log.epoch}: {prune_key} {rec[prune_key]:.4g}")

        stopped = "epochs"
        pruned: optuna.TrialPruned | None = None
        try:
            result = fit(model, train.tensors(), epochs=int(settings["epochs"]), batch_size=int(settings["batch_size"]),
                         lr=float(settings["lr"]), optimizer=settings["optimizer"], momentum=float(settings["momentum"]),
                         weight_decay=float(settings["weight_decay"]), schedule=settings["schedule"], seed=seed,
                         target_train_accuracy=settings["target_train_accuracy"], progress=False, on_epoch=on_epoch)
            stopped = "target" if result.stopped == "target" else "epochs"
        except optuna.TrialPruned as exc:
            pruned, stopped = exc, "pruned"
        model.eval()
        logits = predict(model, (x_test, y_test))
        y_pred = logits.argmax(1).numpy().astype(np.int64)
        y_true = y_test.numpy().astype(np.int64)
        test_loss = float(torch.nn.functional.cross_entropy(logits, y_test).item())
        from moco.profile import profile

        prof = profile(model, x_test[:1], latency=cfg.measure_latency, repeats=int(cfg.measure["latency_repeats"]))
        last = history[-1] if history else {}
        attrs: dict[str, Any] = {
            "test_accuracy": float((y_pred == y_true).mean()), "test_loss": test_loss,
            "train_accuracy": last.get("train_accuracy"), "train_loss": last.get("loss"),
            "train_seconds": float(sum(h["seconds"] for h in history)), "epochs": len(history), "stopped": stopped,
            "macs": float(prof.per_sample("macs")), "params": int(prof.totals.params), "history": history,
        }
        if cfg.measure_latency and prof.forward_time_s is not None:
            attrs["latency_ms"] = float(prof.forward_time_s) * 1e3
        arch = {"spec": absolute_spec(resolved.spec, cfg.base_dir), "args": dict(args),
                "input_shape": list(resolved.input_shape or train.input_shape)}
        from moco.track.tracking import save_model_files

        save_model_files(model, folder, arch=arch)
        write_json_atomic(folder / "history.json", json_safe(history))
        self._write_predictions(folder, y_true, y_pred, raw_test, test.classes, seed)
        self._model_for_tracking = (model, arch)
        if pruned is not None:
            pruned.attrs = attrs
            raise pruned
        return attrs

    def _write_predictions(self, folder: Path, y_true: np.ndarray, y_pred: np.ndarray, raw_images, classes,
                           seed: int) -> None:
        from moco.io import atomic_path

        index = prediction_samples(y_true, y_pred, seed=seed)
        images = raw_images[torch_index(index)].numpy().astype(np.float32) if len(index) else \
            np.zeros((0, *raw_images.shape[1:]), np.float32)
        with atomic_path(folder / "predictions.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, y_true=y_true, y_pred=y_pred, sample_index=index, sample_images=images,
                                    class_names=np.asarray([str(c) for c in classes], dtype=str))

    # ------------------------------------------------------------------ pipeline sweep

    def _pipeline_trial(self, params: dict, folder: Path, tracker) -> dict[str, Any]:
        import torch

        from moco.io import write_json_atomic
        from moco.run.config import config_from_dict
        from moco.run.runner import _Timer, build_context
        from moco.run.stage import Stage
        from moco.run.steps import run_step

        cfg = self.cfg
        rcfg = config_from_dict(cfg.pipeline_doc(params), base_dir=cfg.pipeline["base_dir"],
                                source=cfg.pipeline["config"])
        old_threads = torch.get_num_threads()
        if rcfg.threads:
            torch.set_num_threads(rcfg.threads)
        try:
            with torch.random.fork_rng():
                torch.manual_seed(rcfg.seed)
                ctx = build_context(rcfg, out=folder, progress=False)
                base = Stage("model", ctx.original, ctx.original)
                base_labels, _ = base.predict(ctx.test.x)
                base_macs = base.expected_macs(None, ctx.example)
                stage, steps = base, []
                for i, step in enumerate(rcfg.steps, 1):
                    ts = time.perf_counter()
                    try:
                        outcome = run_step(ctx, stage, step, folder / f"{i:02d}-{step.method}")
                    except MocoError as exc:
                        raise MocoError(f"step {i} ({step.method}) failed: {exc}") from None
                    stage = outcome.stage
                    steps.append(json_safe({"index": i, "method": step.method, "changed": outcome.changed,
                                            "summary": outcome.summary, "certified": outcome.certified,
                                            "seconds": time.perf_counter() - ts,
                                            "artifacts": [str(Path(a).relative_to(folder)) if Path(a).is_relative_to(folder)
                                                          else a for a in outcome.artifacts]}))
                labels, where = stage.predict(ctx.test.x)
                macs = float(stage.expected_macs(where, ctx.example))
                y_true = ctx.test.y.numpy().astype(np.int64)
                attrs: dict[str, Any] = {
                    "test_accuracy": float((labels == y_true).mean()),
                    "accuracy_base": float((base_labels == y_true).mean()),
                    "agreement": float((labels == base_labels).mean()), "macs": macs, "macs_base": float(base_macs),
                    "macs_reduction": float(base_macs / macs) if macs else None,
                    "params": int(sum(p.numel() for p in stage.model.parameters())) if stage.model is not None else None,
                    "stage": stage.kind, "steps": steps, "history": [],
                }
                if any(o.startswith("ratio_vs") for o in cfg.objectives) and rcfg.measure.timing:
                    timer = _Timer(ctx, rcfg)
                    attrs["ratio_vs_eager"], attrs["ratio_vs_onnxruntime"] = timer.time(stage)
        finally:
            torch.set_num_threads(old_threads)
        write_json_atomic(folder / "steps.json", steps)
        write_json_atomic(folder / "history.json", [])
        saved = [a for s in steps for a in s["artifacts"] if a.endswith("model.json")]
        write_json_atomic(folder / "arch.json", {"format": "moco.sweep.pipeline-model", "kind": stage.kind,
                                                 "model": saved[-1] if saved else None, "config": "config.toml",
                                                 "spec": rcfg.model.spec, "args": dict(rcfg.model.args)})
        raw = _unnormalise(ctx.test.x, ctx.test.normalize)
        self._write_predictions(folder, y_true, labels.astype(np.int64), raw, ctx.test.classes, rcfg.seed)
        self._model_for_tracking = (stage.model, None) if stage.model is not None else None
        return attrs

    # ------------------------------------------------------------------ tracking

    def _tracker(self, trial, params: dict, seed: int):
        from moco.track.tracking import Tracker

        t = self.tracking
        tracker = Tracker(t["experiment"], tracking_uri=t["tracking_uri"], run_name=f"trial-{trial.number:04d}",
                          parent_run_id=t.get("parent_run_id"),
                          tags={"optuna.trial_number": trial.number, "optuna.study": t.get("study", ""),
                                "moco.sweep": self.cfg.name, "moco.label": self.cfg.label_of(params)})
        tracker.log_params({"swept": params, "seed": seed,
                            **({"model": self.cfg.model, "train": self.cfg.train} if self.cfg.mode == "train"
                               else {"pipeline": self.cfg.pipeline["config"]})})
        self._model_for_tracking = None
        return tracker

    def _finish_tracker(self, tracker, state, attrs: dict, folder: Path) -> None:
        from optuna.trial import TrialState

        try:
            metrics = {k: v for k, v in attrs.items() if k not in ("history", "steps", "artifacts", "mlflow_run_id")}
            tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))
                                 and not isinstance(v, bool)})
            tracker.set_tags({"optuna.state": state.name, **({"error": attrs["error"]} if "error" in attrs else {})})
            for name in ("history.json", "predictions.npz", "config.toml"):
                if (folder / name).is_file():
                    tracker.log_artifact(folder / name)
            saved = getattr(self, "_model_for_tracking", None)
            if saved is not None and saved[0] is not None:
                tracker.log_model(saved[0], arch=saved[1])
        finally:
            tracker.finish("FINISHED" if state != TrialState.FAIL else "FAILED", error=attrs.get("error"))


def torch_index(index: np.ndarray):
    import torch

    return torch.from_numpy(np.asarray(index, dtype=np.int64))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


class _quiet_optuna:
    """Optuna's INFO line per told trial off for the block (the sweep prints its own)."""

    def __enter__(self):
        import optuna

        self._level = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)

    def __exit__(self, *exc):
        import optuna

        optuna.logging.set_verbosity(self._level)
