"""The methods a ``moco run`` step can name, each a function over the previous step's :class:`Stage`.

Every method has a table of parameters with defaults chosen to give a sensible result on a small CNN
(:data:`STEP_PARAMS`); a config or ``--set`` overrides any of them, and an unknown key is an error that
lists the known ones. A step writes its artifacts (models, tables, plots) into its own folder and
returns a :class:`StepOutcome`: the next stage, a JSON-safe summary, the text for the report, the
certified bound where the method has one, and the files it wrote.

Methods: ``profile`` (nothing changes), ``prune`` (seed 003's L1 prune-retrain loop with real
surgery), ``pfa`` (Principal Filter Analysis, accuracy-targeted), ``exits`` (learned early exits with a
certified accuracy-drop bound), ``rules`` (seed 000's certified linear rules), ``export`` (ONNX Runtime,
FP32 or int8, one deployable folder).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from moco.errors import MocoError
from moco.io import atomic_path, write_bytes_atomic, write_json_atomic
from moco.results import frame_text, json_safe
from moco.run.config import StepConfig
from moco.run.stage import RunContext, Stage

__all__ = ["STEP_METHODS", "STEP_PARAMS", "StepOutcome", "check_step", "check_step_order", "run_step"]

#: method -> parameter defaults (None: "choose for me", documented per method below). Retraining a trained
#: BatchNorm model after a cut uses Adam at 2e-4: at 1e-3 the first steps undid more than the cut (measured on
#: examples/mynet.py: every prune step rolled back, retrained accuracy below the pruned one)
STEP_PARAMS: dict[str, dict[str, Any]] = {
    "profile": {"batch": 1, "latency": True, "repeats": 3},
    "prune": {"layers": None, "drop_threshold": 0.01, "step": 0.25, "retrain_samples": 4000, "retrain_epochs": 1,
              "lr": 2e-4, "optimizer": "adam", "batch_size": 128, "max_steps": 40, "finetune_epochs": 1,
              "finetune_lr": 5e-4, "distill": True, "round_to": None},
    "pfa": {"layers": None, "recipe": "kl", "energy_threshold": 0.99, "relative_size": 0.5, "unit_strategy": "l1max",
            "targeted": True, "max_drop": 0.01, "fractions": [0.25, 0.5, 0.75, 1.0], "finetune_epochs": 1,
            "finetune_samples": 10000, "lr": 2e-4, "distill": True, "introspect_samples": 2000, "batch_size": 128,
            "round_to": None},
    "exits": {"points": None, "head": "auto", "mode": "retrofit", "epochs": 2, "lr": 2e-3,
              "batch_size": 128, "distillation": 0.0, "target": 0.01, "metric": "accuracy_drop", "confidence": 0.95,
              "criterion": "entropy", "train_samples": None},
    "rules": {"layer": None, "max_error": 0.002, "confidence": 0.95, "samples": 20000, "pooling": None,
              "kind": "margin"},
    "export": {"int8": False, "calibration_samples": 512, "threads": 1},
    "quantize": {"epochs": 1, "lr": 1e-4, "per_channel": True, "observer": "frozen", "calibration_samples": 2048,
                 "batch_size": 128},
    "approx": {"quant_epochs": 1, "gradient_epochs": 3, "approx_epochs": 2, "lr": 1e-3, "approx_lr": 5e-4,
               "batch_size": 128, "lmbd": 0.2, "initial_noise": 0.025, "sigma_max": 0.5, "per_channel": False,
               "observer": "frozen", "calibration_samples": 2048, "selection_samples": 512, "multipliers": None,
               "uniform": "closest"},
}

_PROTECTED = {"method"}

# Ranges checked when the config is read, so a bad value of step 3 fails before steps 1 and 2 have run
# (the methods check again, with the same bounds). (low, high, low_open, high_open); None: unbounded.
_COUNT, _EPOCHS, _RATE = (1, None, False, False), (0, None, False, False), (0, None, True, False)
_RANGES: dict[str, tuple] = {
    **dict.fromkeys(("batch", "repeats", "retrain_samples", "retrain_epochs", "batch_size", "max_steps",
                     "calibration_samples", "finetune_samples", "introspect_samples", "samples", "selection_samples",
                     "train_samples"), _COUNT),
    **dict.fromkeys(("finetune_epochs", "epochs", "quant_epochs", "gradient_epochs", "approx_epochs", "threads"),
                    _EPOCHS),
    **dict.fromkeys(("lr", "finetune_lr", "approx_lr"), _RATE),
    **dict.fromkeys(("drop_threshold", "max_drop"), (0, 1, False, True)),
    **dict.fromkeys(("confidence", "max_error", "target"), (0, 1, True, True)),
    **dict.fromkeys(("energy_threshold", "relative_size"), (0, 1, True, False)),
}


def _choices(method: str, key: str) -> tuple[str, ...] | None:
    """The values a string parameter takes (checked with the config, like the ranges), or None when free."""
    if method == "exits" and key == "mode":
        return ("retrofit", "joint")
    if method == "exits" and key == "metric":
        from moco.exits.outputs import METRICS

        return tuple(METRICS)
    if method == "exits" and key == "criterion":
        from moco.exits.criteria import CRITERIA

        return tuple(CRITERIA)
    if method == "prune" and key == "optimizer":
        return ("adam", "sgd")
    if method == "pfa" and key == "recipe":
        return ("kl", "energy", "size")
    if method == "pfa" and key == "unit_strategy":
        return ("l1max", "absmax", "l1min", "absmin")
    if method == "rules" and key == "kind":
        from moco.rules.rule import KINDS

        return tuple(KINDS)
    if method == "rules" and key == "pooling":
        return ("max", "avg")
    if method in ("quantize", "approx") and key == "observer":
        return ("frozen", "ema")
    return None


def _check_range(key: str, value: Any, where: str) -> None:
    bounds = _RANGES.get(key)
    if bounds is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, high, low_open, high_open = bounds
    bad = (not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low))
           or (high is not None and (value >= high if high_open else value > high)))
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        raise MocoError(f"{where}: {key} must be {' and '.join(x for x in (lo, hi) if x)}, got {value!r}")


@dataclass
class StepOutcome:
    """What a step returns: the next ``stage``, a JSON-safe ``summary``, the ``text`` for the report, the
    ``certified`` bound ``{"what": ..., "bound": ..., ...}`` (or None) and the ``artifacts`` written."""

    stage: Stage
    summary: dict[str, Any]
    text: str
    certified: dict[str, Any] | None = None
    artifacts: list[str] = field(default_factory=list)
    changed: str = ""


def check_step(method: Any, params: dict[str, Any], where: str) -> StepConfig:
    """Validate one step: a known ``method`` and parameters it has (types like the defaults')."""
    known = STEP_PARAMS
    if not isinstance(method, str) or method not in known:
        raise MocoError(f"{where}: method must be one of {', '.join(sorted(known))}, got {method!r}")
    defaults = known[method]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise MocoError(f"{where} ({method}): unknown parameter(s) {', '.join(unknown)}; "
                        f"{method} takes: {', '.join(sorted(defaults))}")
    for key, value in params.items():
        default = defaults[key]
        if value is None:
            continue
        _check_range(key, value, f"{where} ({method})")
        allowed = _choices(method, key) if isinstance(value, str) else None
        if allowed is not None and (value.lower() if method == "pfa" else value) not in allowed:
            raise MocoError(f"{where} ({method}): {key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        if default is None:
            continue
        ok = (isinstance(value, bool) if isinstance(default, bool)
              else isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(default, float)
              else isinstance(value, int) and not isinstance(value, bool) if isinstance(default, int)
              else isinstance(value, type(default)))
        if not ok:
            raise MocoError(f"{where} ({method}): {key} must be a {type(default).__name__} like {default!r}, "
                            f"got {value!r}")
    return StepConfig(method, dict(params))


# What each method leaves for the next step, and what it can start from (checked before anything runs:
# a wrong order used to fail only when its step started, some with a deep trace error blaming the user's model).
_PRODUCES = {"prune": "model", "pfa": "model", "quantize": "quantized", "approx": "approx", "exits": "exits",
             "rules": "rules", "export": "deployed"}  # profile leaves the stage as it was
_ACCEPTS = {"prune": {"model"}, "pfa": {"model"}, "quantize": {"model"}, "approx": {"model"}, "exits": {"model"},
            "rules": {"model"}, "export": {"model", "quantized", "exits", "rules"}}
_WHY = {
    "quantized": "its model simulates int8 with fake-quant modules, which {method} cannot trace or resize",
    "approx": "its model simulates approximate multipliers with lookup tables: it is measured, not transformed "
              "further or exported",
    "exits": "{method} works on a plain model, not on the early-exit network",
    "rules": "{method} works on a plain model, not on the rule-branched network",
    "deployed": "export hands over the ONNX Runtime graphs and is the last transformation",
}


def check_step_order(steps: Sequence[StepConfig], where: str = "config") -> None:
    """MocoError naming the two steps when a step cannot follow the one before it (e.g. prune after
    quantize, export after approx), before any step runs."""
    state, made_by = "model", None
    for i, step in enumerate(steps, 1):
        method = step.method
        if method in _ACCEPTS and state not in _ACCEPTS[method]:
            j, prev = made_by
            why = _WHY[state].format(method=method)
            fix = ("make 'approx' the last step (only profile may follow it)" if state == "approx"
                   else f"put {method!r} before {prev!r}")
            raise MocoError(f"{where}: step {i} ({method}) cannot follow step {j} ({prev}): {why}; {fix}")
        if method in _PRODUCES:
            state, made_by = _PRODUCES[method], (i, method)


def _params(method: str, given: dict[str, Any]) -> dict[str, Any]:
    defaults = STEP_PARAMS[method]
    return {**copy.deepcopy(defaults), **given}


def _write_text(path: Path, text: str) -> str:
    write_bytes_atomic(path, (text.rstrip() + "\n").encode())
    return str(path)


def _save_model(model: torch.nn.Module, folder: Path, ctx: RunContext) -> list[str]:
    """The model as JSON architecture + tensor-only weights (``model.json`` + ``model.pt``)."""
    from moco.compress.surgery import save

    save(model, folder / "model", arch=ctx.arch, spec=None if ctx.arch else ctx.model_spec)
    return [str(folder / "model.json"), str(folder / "model.pt")]


# ------------------------------------------------------------------------------------------ profile

def _profile(ctx: RunContext, stage: Stage, p: dict, out: Path) -> StepOutcome:
    from moco.profile import profile

    model = stage.model if stage.model is not None else stage.require_model("profile")
    x = ctx.train.x[: max(1, int(p["batch"]))]
    prof = profile(model, x, latency=bool(p["latency"]) and ctx.timing, repeats=int(p["repeats"]))
    files = [_write_text(out / "profile.txt", prof.to_text()),
             str(write_json_atomic(out / "profile.json", json_safe(prof.to_dict())))]
    try:
        files.append(str(prof.plot(out / "profile.png")))
    except MocoError:
        pass  # nothing to plot (no counted module)
    macs = prof.per_sample("macs")
    summary = {"macs": macs, "params": prof.totals.params, "bottleneck": prof.bottleneck,
               "forward_time_s": prof.forward_time_s}
    text = (f"bottleneck {prof.bottleneck!r}; {macs / 1e6:.3f} M MACs per sample; "
            f"{prof.totals.params:,} parameters\n\n{prof.to_text()}")
    return StepOutcome(stage, summary, text, None, files, "nothing (measurement only)")


# -------------------------------------------------------------------------------------------- prune

def default_prune_layers(model: torch.nn.Module, example: torch.Tensor) -> list[str]:
    """One layer per prunable dependency group (tied layers are pruned together), in forward order."""
    from moco.compress.surgery import dependency_groups

    layers = [g.layers[0] for g in dependency_groups(model, example) if g.prunable and g.units > 1]
    if not layers:
        raise MocoError("the model has no prunable Conv2d/Linear layer (every unit is tied to the output or input)")
    return layers


def _prune(ctx: RunContext, stage: Stage, p: dict, out: Path) -> StepOutcome:
    from moco.compress.finetune import finetune
    from moco.compress.prune import IterativePruner

    model = stage.require_model("prune")
    layers = p["layers"] or default_prune_layers(model, ctx.example)
    pruner = IterativePruner(
        layers, drop_threshold=float(p["drop_threshold"]), step=p["step"], retrain_samples=p["retrain_samples"],
        retrain_epochs=int(p["retrain_epochs"]), lr=float(p["lr"]), optimizer=p["optimizer"],
        batch_size=int(p["batch_size"]), seed=ctx.seed, example_input=ctx.example, max_steps=int(p["max_steps"]),
        # None: no rounding. Unlike pfa (one rounding of the final counts), here every step must leave a multiple,
        # so steps are coarse: on examples/mynet.py with "auto" (16 on AVX-512) every prune step was rolled back
        round_to=p["round_to"],
        progress=ctx.progress,
    ).fit(model, ctx.fit.tensors(), ctx.holdout.tensors())
    small = pruner.small_
    pruned = {k: pruner.units_[k] - len(v) for k, v in pruner.keep_.items() if len(v) < pruner.units_[k]}
    if not pruned:  # every step rolled back: hand on the model as it was (fine-tuning would only move it)
        small = copy.deepcopy(model)
    elif p["finetune_epochs"]:
        finetune(small, ctx.fit.tensors(), epochs=int(p["finetune_epochs"]), lr=float(p["finetune_lr"]),
                 schedule="cosine", seed=ctx.seed, teacher=model if p["distill"] else None, progress=ctx.progress)
    small.eval()
    frame = pruner.to_dataframe()
    files = _save_model(small, out, ctx)
    with atomic_path(out / "pruning_log.csv") as tmp:
        frame.to_csv(tmp, index=False)
    files.append(str(out / "pruning_log.csv"))
    kept = {k: len(v) for k, v in pruner.keep_.items()}
    summary = {"layers": list(layers), "kept_units": kept, "units": dict(pruner.units_),
               "accepted_steps": int(sum(1 for s in pruner.log_ if s.accepted)),
               "val_accuracy_base": pruner.base_accuracy_, "val_accuracy_pruned": pruner.accuracy_}
    units = ", ".join(f"{k} {pruner.units_[k]}->{n}" for k, n in kept.items() if k in pruned)
    changed = (f"pruned: {units}" if pruned else
               f"nothing: every step lost more than drop_threshold {p['drop_threshold']} and was rolled back")
    text = f"{changed}\n\n{frame_text(frame)}"
    return StepOutcome(Stage("model", small, small), summary, text, None, files, changed)


# ---------------------------------------------------------------------------------------------- pfa

def _pfa_strategy(p: dict):
    from moco.compress.pfa import PFA

    recipe = str(p["recipe"]).lower()
    if recipe == "kl":
        strategy = PFA.Strategy.KL()
    elif recipe == "energy":
        strategy = PFA.Strategy.Energy(energy_threshold=float(p["energy_threshold"]), min_kept_count=1)
    elif recipe == "size":
        strategy = PFA.Strategy.Size(relative_size=float(p["relative_size"]))
    else:
        raise MocoError(f"pfa recipe must be 'kl', 'energy' or 'size', got {p['recipe']!r}")
    units = {"l1max": PFA.UnitSelectionStrategy.L1Max, "absmax": PFA.UnitSelectionStrategy.AbsMax,
             "l1min": PFA.UnitSelectionStrategy.L1Min, "absmin": PFA.UnitSelectionStrategy.AbsMin}
    key = str(p["unit_strategy"]).lower()
    if key not in units:
        raise MocoError(f"pfa unit_strategy must be one of {', '.join(units)}, got {p['unit_strategy']!r}")
    return strategy, units[key]()


def _pfa(ctx: RunContext, stage: Stage, p: dict, out: Path) -> StepOutcome:
    from moco.compress.pfa import PFA, PFALoop

    model = stage.require_model("pfa")
    strategy, unit = _pfa_strategy(p)
    fractions = p["fractions"] if p["targeted"] else [1.0]
    loop = PFALoop(strategy=strategy, unit_strategy=unit, layers=p["layers"], fractions=fractions,
                   max_drop=float(p["max_drop"]) if p["targeted"] else math.inf,
                   finetune_epochs=int(p["finetune_epochs"]), finetune_samples=p["finetune_samples"], lr=float(p["lr"]),
                   distill=bool(p["distill"]), introspect_samples=int(p["introspect_samples"]),
                   batch_size=int(p["batch_size"]), seed=ctx.seed, example_input=ctx.example,
                   # None: kept counts rounded to this CPU's ONNX Runtime channel block ("auto": 8 on AVX2, 16 on
                   # AVX-512), since odd widths ran slower than the original there; round_to = 1 keeps PFA's counts
                   round_to="auto" if p["round_to"] is None else p["round_to"],
                   progress=ctx.progress)
    loop.fit(model, ctx.fit.tensors(), ctx.holdout.tensors())
    small = loop.small_.eval()
    files = _save_model(small, out, ctx)
    frame = loop.to_dataframe()
    with atomic_path(out / "pfa_log.csv") as tmp:
        frame.to_csv(tmp, index=False)
    files.append(str(out / "pfa_log.csv"))
    try:
        table = PFA.show(loop.recipes_)
        files.append(_write_text(out / "recipe.txt", frame_text(table)))
        PFA.show(loop.recipes_, kind="chart", path=out / "recipe.png")
        files.append(str(out / "recipe.png"))
    except (MocoError, TypeError, AttributeError):
        table = None
    summary = {"fraction": loop.fraction_, "kept_units": {k: len(v) for k, v in loop.keep_.items()},
               "val_accuracy_base": loop.base_accuracy_, "val_accuracy_pfa": loop.accuracy_,
               "recipe": p["recipe"], "unit_strategy": p["unit_strategy"]}
    if loop.skipped_fractions_ and not loop.log_:
        from moco.compress.pfa.loop import check_round_to

        changed = (f"nothing: rounding the kept counts to multiples of {check_round_to(loop.round_to)} (round_to; "
                   "default this CPU's ONNX Runtime channel block) keeps every layer whole; set round_to = 1 to keep "
                   "PFA's own counts")
    elif loop.fraction_ == 0:
        skipped = (f" (smaller ones {', '.join(f'{f:g}' for f in loop.skipped_fractions_)} removed no unit after "
                   "rounding)" if loop.skipped_fractions_ else "")
        changed = (f"nothing: the smallest fraction tried, {loop.log_[0].fraction:g} of the recipe's reduction{skipped}, "
                   f"lost more than max_drop")
    else:
        changed = f"PFA {p['recipe']} applied at {loop.fraction_:.2f} of its reduction"
    text = f"{changed}\n\n{frame_text(frame)}" + (f"\n\nrecipe:\n{frame_text(table)}" if table is not None else "")
    return StepOutcome(Stage("model", small, small), summary, text, None, files, changed)


# -------------------------------------------------------------------------------------------- exits

def _exits(ctx: RunContext, stage: Stage, p: dict, out: Path) -> StepOutcome:
    from moco.exits import attach_exits, auto_points, calibrate, save_exits, train_exits, tradeoff_curve
    from moco.exits import collect_outputs

    model = stage.require_model("exits")
    if p["mode"] == "joint":
        model = copy.deepcopy(model)  # joint training changes the backbone: never the previous stage's model
    points = p["points"] or auto_points(model, ctx.example)
    head = p["head"]  # "auto": each head within 5% of the model's MACs (moco.exits.heads.choose_head)
    net = attach_exits(model, points, example_input=ctx.example, head=head, criterion=p["criterion"], seed=ctx.seed)
    train = ctx.fit.subset(p["train_samples"], ctx.seed)
    train_exits(net, train.tensors(), mode=p["mode"], epochs=int(p["epochs"]), lr=float(p["lr"]),
                batch_size=int(p["batch_size"]), distillation=float(p["distillation"]), seed=ctx.seed,
                progress=ctx.progress)
    cal = calibrate(net, ctx.holdout.tensors(), target=float(p["target"]), metric=p["metric"],
                    confidence=float(p["confidence"]), seed=ctx.seed, progress=ctx.progress)
    net.eval()
    save_exits(net, out / "exits")
    files = [str(out / "exits.json"), str(out / "exits.npz")]
    if p["mode"] == "joint":
        files += _save_model(model, out, ctx)  # the jointly trained backbone (the network shares its parameters)
    files.append(_write_text(out / "calibration.txt", cal.to_text()))
    try:
        curve = tradeoff_curve(net, collect_outputs(net, ctx.holdout.tensors()))
        files.append(str(curve.plot(out / "accuracy_vs_macs.png")))
    except (MocoError, ValueError):
        pass
    enabled = [t is not None for t in net.thresholds]
    info = {"path_macs": list(net.costs.exit_macs(enabled)), "calibration_result": cal}
    summary = {"points": list(points), "thresholds": list(cal.thresholds), "exit_fractions": list(cal.exit_fractions),
               "calibration": cal.to_dict()}
    certified = {"what": f"{cal.metric} <= {cal.target:g} at {cal.confidence:.0%} confidence",
                 "bound": cal.certified_bound, "measured": cal.measured_risk, "n": cal.n_test}
    changed = f"exits after {', '.join(map(str, points))} ({p['mode']})"
    if not any(enabled):
        # every sample runs the whole model: there is nothing to certify (the all-off vector holds trivially)
        certified = None
        changed = (f"nothing: calibration turned every exit off ({changed}): no exit that lets samples leave keeps "
                   f"{cal.metric} <= {cal.target:g} at {cal.confidence:.0%} confidence; try a looser target, later "
                   "points or more training epochs")
    return StepOutcome(Stage("exits", net, model, info), summary, f"{changed}\n\n{cal.to_text()}", certified, files,
                       changed)


# -------------------------------------------------------------------------------------------- rules

def _rules(ctx: RunContext, stage: Stage, p: dict, out: Path) -> StepOutcome:
    from moco import AnalyticsEngine, BranchedNetwork, build_embeddings_and_predictions
    from moco.capture import SpatialPool
    from moco.rules.branched import expected_macs, suggest_layer

    model = stage.require_model("rules")
    x = ctx.fit.subset(int(p["samples"]), ctx.seed).x
    pooling = p["pooling"]
    processor = SpatialPool(pooling) if pooling else None
    layer = p["layer"]
    if layer is None:
        suggestion = suggest_layer(model, x, max_error=float(p["max_error"]), confidence=float(p["confidence"]),
                                   seed=ctx.seed, progress=ctx.progress)
        layer = suggestion.best.layer
    feats, preds = build_embeddings_and_predictions(model, x, layer, processor=processor, progress=ctx.progress)
    ae = AnalyticsEngine(feats.reshape(len(feats), -1), {"predictions": preds.argmax(1)}, layer=layer, seed=ctx.seed,
                         progress=ctx.progress)
    import warnings

    from moco.rules.report import UncertifiedRuleWarning

    with warnings.catch_warnings():  # an uncertified set fails the step below, with the same advice
        warnings.simplefilter("ignore", UncertifiedRuleWarning)
        rules, report = ae.compute_linear_sufficient_rules("predictions", max_error=float(p["max_error"]),
                                                          confidence=float(p["confidence"]), kind=p["kind"])
    coverage = report["coverage_val"]
    if not report["certified"] or not coverage:
        more = (f", or more samples (samples = {min(2 * int(p['samples']), len(ctx.fit))})"
                if int(p["samples"]) < len(ctx.fit) else f", or more training data (all {len(ctx.fit)} were used)")
        raise MocoError(f"rules at layer {layer!r} certified nothing (held-out coverage {coverage:.1%} at "
                        f"max_error {p['max_error']}); try a later layer (layer = ...), a looser max_error{more}")
    rules.save(out / "rules")
    files = [str(out / "rules.json"), str(out / "rules.npz")]
    net = BranchedNetwork(model, layer=layer, rule=rules, pooling=pooling)
    cost = expected_macs(model, layer, 0.0, example_input=ctx.example, n_features=int(feats[0].size))
    info = {"path_macs": [cost.head_macs + cost.rule_macs, cost.full_macs + cost.rule_macs]}
    certified = {"what": f"precision of samples that exit >= {1 - float(p['max_error']):g} "
                         f"at {float(p['confidence']):.0%} confidence",
                 "bound": report["certified_precision"], "measured": report["precision_val"], "n": report["n_val"]}
    summary = {"layer": layer, "coverage_val": coverage, "certified_precision": report["certified_precision"],
               "pooling": pooling}
    text = report.to_text() if hasattr(report, "to_text") else json.dumps(json_safe(report), indent=2)
    changed = f"rules at layer {layer!r}, {coverage:.1%} of held-out samples exit"
    return StepOutcome(Stage("rules", net, model, info), summary, f"{changed}\n\n{text}", certified, files, changed)


# ------------------------------------------------------------------------------------------- export

def _export(ctx: RunContext, stage: Stage, p: dict, out: Path) -> StepOutcome:
    from moco.deploy import export, load, op_profile

    if stage.kind == "deployed":
        raise MocoError("step 'export' follows another export; export once, at the end")
    calib = ctx.holdout.subset(int(p["calibration_samples"]), ctx.seed)
    calibration = stage.info.get("calibration_result")
    check = ctx.test.subset(2000, ctx.seed).tensors()
    target = out / "deployed"
    res = export(stage.obj, target, ctx.example, int8=calib.tensors() if p["int8"] else None, check=check,
                 calibration=calibration, intra_op_num_threads=int(p["threads"]), normalize=ctx.test.normalize)
    precision = "int8" if p["int8"] else "fp32"
    runtime = load(target, intra_op_num_threads=int(p["threads"]), precision=precision)
    info = dict(stage.info)
    summary = res.to_dict() if hasattr(res, "to_dict") else {"path": str(target)}
    changed = f"deployed to ONNX Runtime ({'int8' if p['int8'] else 'FP32'}): {target}"
    text = res.to_text() if hasattr(res, "to_text") else changed
    # where the deployed model's time goes (onnxruntime's per-node kernel times on up to 256 test samples)
    prof = op_profile(target, check[0][:256], precision=precision, runs=5, intra_op_num_threads=int(p["threads"]))
    profile_file = write_json_atomic(out / "op_profile.json", prof.to_dict())
    return StepOutcome(Stage("deployed", runtime, stage.model, info), json_safe(summary),
                       f"{changed}\n\n{text}\n\n{prof.to_text()}", None, [str(target), str(profile_file)], changed)


# ------------------------------------------------------------------------------------ quantize/approx

def _quantize(ctx: RunContext, stage: Stage, p: dict, out: Path) -> StepOutcome:
    from moco.approx import train_quant

    model = stage.require_model("quantize")
    q = train_quant(model, ctx.fit.tensors(), epochs=int(p["epochs"]), lr=float(p["lr"]),
                    batch_size=int(p["batch_size"]), per_channel=bool(p["per_channel"]), observer=p["observer"],
                    calibration_samples=int(p["calibration_samples"]), seed=ctx.seed, progress=ctx.progress).eval()
    files = []
    try:
        from moco.approx.quant import export_qdq

        res = export_qdq(q, out / "model_qdq.onnx", ctx.example)
        files.append(str(out / "model_qdq.onnx"))
        text = res.to_text() if hasattr(res, "to_text") else ""
    except MocoError as exc:
        text = f"QDQ export skipped: {exc}"
    changed = f"8-bit quantization-aware training ({p['epochs']} epoch(s), fake-quant int8 weights and activations)"
    return StepOutcome(Stage("model", q, q), {"per_channel": p["per_channel"]}, f"{changed}\n\n{text}", None, files,
                       changed)


def _approx(ctx: RunContext, stage: Stage, p: dict, out: Path) -> StepOutcome:
    from moco.approx import run_approx
    from moco.profile import profile

    model = stage.require_model("approx")
    config = {**p, "seed": ctx.seed, "progress": ctx.progress, "baseline_epochs": 0}
    lines: list[str] = []
    res = run_approx(model, ctx.fit.tensors(), ctx.holdout.tensors(), config, log=lines.append,
                     eval_name="validation (holdout)")
    summary = json_safe(res.to_dict())
    files = [str(write_json_atomic(out / "approx.json", summary))]
    res.selection.plot(out / "selection.png")  # the seed's two bar charts: energy and ops per layer
    files.append(str(out / "selection.png"))
    changed = (f"approximate multipliers per layer (simulated): relative multiplication energy "
               f"{res.energy_ratio:.3f} of exact int8 (one multiplier everywhere: {res.energy_ratio_uniform:.3f})")
    text = "\n".join(lines) + ("\n\n" + res.to_text() if hasattr(res, "to_text") else "")
    # the LUT layers simulate the hardware: their CPU time is not the deployed time, the energy ratio is the gain
    # MACs stay the model's own: the LUT layers' extra exact convolutions simulate one approximate product each
    info = {"macs": float(profile(model, ctx.example, latency=False).totals.macs)}
    return StepOutcome(Stage("model", res.approx_model.eval(), res.approx_model, info), summary,
                       f"{changed}\n\n{text}", None, files, changed)


STEP_METHODS: dict[str, Callable[[RunContext, Stage, dict, Path], StepOutcome]] = {
    "profile": _profile, "prune": _prune, "pfa": _pfa, "exits": _exits, "rules": _rules, "export": _export,
    "quantize": _quantize, "approx": _approx,
}


def run_step(ctx: RunContext, stage: Stage, step: StepConfig, out: Path) -> StepOutcome:
    """Run one step on ``stage`` and write its artifacts into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    return STEP_METHODS[step.method](ctx, stage, _params(step.method, step.params), out)
