"""Honest baselines for any model: the standard ways to run it faster without changing it.

:func:`baseline_variants` builds, for a model and an example batch, callables ``batch -> logits`` for

* ``eager``: the model as it is, in eval mode, under ``torch.inference_mode()``;
* ``channels_last``: the model and each input batch in the NHWC memory format (4-D inputs only; the
  input conversion is part of the variant, so its cost is timed);
* ``compile``: ``torch.compile(model, dynamic=False)`` with the default Inductor backend (needs a C++
  compiler); it is compiled for the example batch's shape at build time, and every other batch shape
  compiles again on first use (in :func:`~moco.bench.harness.compare`'s warm-up). Dynamo keeps a
  limited number of compiled versions per code object (``torch._dynamo.config.recompile_limit``,
  8 by default); beyond it the model runs eagerly, so keep the number of distinct batch shapes small;
* ``onnxruntime``: the model exported to ONNX with a dynamic batch axis, run by an onnxruntime
  ``InferenceSession`` on the CPU with ``intra_op_num_threads = torch.get_num_threads()``; the callable
  converts tensor -> numpy -> tensor (that cost is timed too).

Each variant works on its own ``copy.deepcopy`` of the model: the caller's model (parameters, mode,
memory format) is never touched. Before a variant is offered for timing it must give the same
predictions as eager on the check inputs: identical argmax on every sample and logits within
``atol``. A variant that cannot be built, fails, or disagrees is left out and the reason recorded in
:attr:`BaselineSet.unavailable`; nothing is timed silently wrong.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from moco.bench.harness import Comparison
from moco.errors import MocoError

__all__ = ["Agreement", "BASELINE_NAMES", "BaselineSet", "RuntimeVariant", "baseline_variants", "best_baseline",
           "compare_deployed", "deploy_variants", "stage_table"]

BASELINE_NAMES: tuple[str, ...] = ("eager", "channels_last", "compile", "onnxruntime")


@dataclass(frozen=True)
class Agreement:
    """How closely a variant reproduces eager on the check inputs.

    ``fraction``: share of samples whose argmax prediction equals eager's (1.0 = all identical);
    ``max_abs_diff``: largest absolute difference of any output (logit) from eager's;
    ``n_samples``: samples checked.
    """

    fraction: float
    max_abs_diff: float
    n_samples: int

    @property
    def identical_predictions(self) -> bool:
        """True when every checked sample has the same argmax as eager."""
        return self.fraction == 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields."""
        return {"fraction": self.fraction, "max_abs_diff": self.max_abs_diff, "n_samples": self.n_samples}


@dataclass(frozen=True)
class BaselineSet:
    """What :func:`baseline_variants` built.

    ``variants``: name -> callable(batch) -> logits, only the ones that were built and agree with eager,
    in the order eager, channels_last, compile, onnxruntime, then the extras (pass it to
    :func:`~moco.bench.harness.compare`); ``unavailable``: name -> one-line reason for every requested
    variant left out (could not be built, failed on the check inputs, or disagreed with eager);
    ``agreement``: name -> :class:`Agreement` with eager for every variant that produced outputs
    (excluded ones too); ``notes``: name -> how the variant was built (exporter, compile seconds, ...).
    """

    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]]
    unavailable: dict[str, str]
    agreement: dict[str, Agreement]
    notes: dict[str, str]

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the available variants, in order."""
        return tuple(self.variants)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: available names, unavailable reasons, agreement and notes (no callables)."""
        return {
            "available": list(self.variants),
            "unavailable": dict(self.unavailable),
            "agreement": {name: a.to_dict() for name, a in self.agreement.items()},
            "notes": dict(self.notes),
        }

    def to_text(self) -> str:
        """A readable table: each variant's status, argmax agreement with eager and max logit difference."""
        names = list(dict.fromkeys([*self.variants, *self.agreement, *self.unavailable]))
        header = ("variant", "status", "same argmax", "max |diff|")
        rows = []
        for name in names:
            a = self.agreement.get(name)
            status = "ok" if name in self.variants else "excluded"
            same = f"{a.fraction:.2%} of {a.n_samples:,}" if a else "-"
            diff = f"{a.max_abs_diff:.2e}" if a else "-"
            rows.append((name, status, same, diff))
        widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in (header, *rows)]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines += [f"{name}: excluded, {reason}" for name, reason in self.unavailable.items()]
        lines += [f"{name}: {note}" for name, note in self.notes.items()]
        return "\n".join(lines)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first non-empty line of the message``, shortened to ``limit`` characters."""
    text = next((t.strip() for t in str(exc).splitlines() if t.strip()), "")
    out = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _as_batches(inputs: Any, what: str) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        batches = [inputs]
    elif isinstance(inputs, (list, tuple)):
        batches = list(inputs)
    else:
        raise MocoError(f"{what} must be a batch tensor or a list/tuple of them, got {type(inputs).__name__}")
    if not batches:
        raise MocoError(f"{what} is empty; pass at least one batch tensor")
    for batch in batches:
        if not isinstance(batch, torch.Tensor) or batch.dim() == 0:
            raise MocoError(f"{what} must hold batch tensors with a leading batch dimension, got {type(batch).__name__}")
    return batches


class _Eager:
    """``model(x)`` under inference mode (the model already in eval mode)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(x)


class _ChannelsLast:
    """A channels-last model; each input is converted to channels-last first (the conversion is timed)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(x.contiguous(memory_format=torch.channels_last))


class RuntimeVariant:
    """A :func:`moco.deploy.load` runtime as a :func:`~moco.bench.harness.compare` variant.

    Called with a batch tensor, it returns the runtime's first output (logits, or a branched
    network's predictions) as a tensor; the tensor -> numpy -> tensor conversion is part of the timed
    call, as for the ``onnxruntime`` baseline. ``last`` keeps the runtime's latest full output
    (e.g. ``(logits, exit_index)``) for agreement checks.
    """

    def __init__(self, runtime):
        self.runtime = runtime
        self.last: Any = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.last = self.runtime(x)
        return torch.from_numpy(out[0] if isinstance(out, tuple) else out)


def deploy_variants(obj: nn.Module, example: torch.Tensor, *, int8: Any = None, check: Any = None,
                    calibration: Any = None, threads: int | None = None, warmup: Sequence[torch.Tensor] = (),
                    path: str | Path | None = None):
    """Export ``obj`` with :func:`moco.deploy.export` and load every precision as a :class:`RuntimeVariant`.

    ``int8``, ``check`` and ``calibration`` go to ``export``; ``threads``: onnxruntime intra-op threads
    (default ``torch.get_num_threads()``, the baselines' setting); ``warmup``: batches each runtime runs
    once before it is returned. Returns ``({"fp32": variant, "int8": variant?}, ExportResult)``; the
    graphs are written to the folder ``path`` (kept: the deployable result), or with None to a
    temporary folder that lives only while the sessions are created.
    """
    from moco.deploy import export, load

    threads = torch.get_num_threads() if threads is None else threads
    with tempfile.TemporaryDirectory(prefix="moco-deploy-") as tmp:
        path = Path(tmp) / "deployed" if path is None else Path(path)
        result = export(obj, path, example, int8=int8, check=check, calibration=calibration,
                        intra_op_num_threads=threads)
        variants = {p: RuntimeVariant(load(path, precision=p, intra_op_num_threads=threads)) for p in result.graphs}
    for fn in variants.values():
        for batch in warmup:
            fn(batch)
    return variants, result


def compare_deployed(original: nn.Module, small: nn.Module, batches: Sequence[torch.Tensor], test: tuple, *,
                     int8: Any, repeats: int = 5, max_drop_points: float = 1.0, prefix: str = "small",
                     baselines: Iterable[str] = ("eager", "channels_last", "onnxruntime"),
                     deploy_dir: str | Path | None = None) -> tuple[dict, Any]:
    """A smaller model deployed (FP32 and int8) against the original's honest baselines, side by side.

    ``batches``: the timed batches (one run = all of them); ``test``: ``(x, y)`` the deployed runtimes
    are checked on (accuracy, agreement with the original); ``int8``: calibration inputs. The deployed
    choice is the fastest precision whose test accuracy is within ``max_drop_points`` of the original's
    (FP32 when none is). Returns ``(summary dict, Comparison)``; the summary holds per precision the
    ratios against the best baseline, the original in ONNX Runtime FP32 and eager, accuracy and
    agreement, plus ``deployed_ratio_vs_best_baseline``, ``deployed_precision``, ``best_baseline``,
    the export result, ``threads`` and ``stages`` (each with ``macs_ratio``: the small model's MACs per
    sample over the original's, from :func:`moco.profile.profile`). ``deploy_dir``: keep the exported
    folder there (else temporary).
    """
    from moco.bench.harness import compare

    x_test, y_test = test
    base = baseline_variants(original, batches[0], include=baselines, check_inputs=list(batches[:2]))
    deployed, exported = deploy_variants(small, batches[0], int8=int8, check=test, warmup=batches[:2],
                                         path=deploy_dir)
    small_eager = _Eager(copy.deepcopy(small).eval())
    variants = {**base.variants, f"{prefix}/eager": small_eager,
                **{f"{prefix}/deployed-{p}": fn for p, fn in deployed.items()}}
    cmp = compare(variants, list(batches), warmup=1, repeats=repeats)
    best = best_baseline(cmp, base.names)
    with torch.inference_mode():
        original_pred = torch.cat([original(x).argmax(1) for x in x_test.split(1000)]).numpy()
    y = y_test.numpy()
    acc_original = float((original_pred == y).mean())
    ort = cmp.timing("onnxruntime").median_s if "onnxruntime" in cmp.names else float("nan")
    per = {}
    for p, fn in deployed.items():
        pred = np.concatenate([fn.runtime(x).argmax(1) for x in x_test.split(1000)])
        median = cmp.timing(f"{prefix}/deployed-{p}").median_s
        per[p] = {"ratio_vs_best_baseline": median / cmp.timing(best).median_s, "ratio_vs_onnxruntime_fp32": median / ort,
                  "ratio_vs_eager": cmp.ratio(f"{prefix}/deployed-{p}"), "median_s": median,
                  "accuracy_test": float((pred == y).mean()), "agreement_test": float((pred == original_pred).mean())}
        per[p]["accuracy_drop_points"] = (acc_original - per[p]["accuracy_test"]) * 100
    ok = [p for p, d in per.items() if d["accuracy_drop_points"] <= max_drop_points] or ["fp32"]
    choice = min(ok, key=lambda p: per[p]["median_s"])
    from moco.profile import profile

    one = batches[0][:1]
    macs_ratio = profile(small, one, latency=False).totals.macs / profile(original, one, latency=False).totals.macs
    stages = [{"stage": "original, ONNX Runtime FP32", "ratio": 1.0, "agreement": 1.0, "accuracy": acc_original,
               "macs_ratio": 1.0},
              {"stage": f"{prefix} model, PyTorch eager", "ratio": cmp.timing(f"{prefix}/eager").median_s / ort,
               "macs_ratio": macs_ratio},
              *({"stage": f"{prefix} model, deployed {p}", "ratio": d["ratio_vs_onnxruntime_fp32"],
                 "agreement": d["agreement_test"], "accuracy": d["accuracy_test"], "macs_ratio": macs_ratio}
                for p, d in per.items())]
    summary = {"deployed_ratio_vs_best_baseline": per[choice]["ratio_vs_best_baseline"],
               "deployed_ratio_vs_onnxruntime_fp32": per[choice]["ratio_vs_onnxruntime_fp32"],
               "deployed_precision": choice, "deployed_accuracy_test": per[choice]["accuracy_test"],
               "best_baseline": best, "accuracy_original_test": acc_original, "deployed": per, "stages": stages,
               "export": exported.to_dict(), "threads": torch.get_num_threads(), "comparison": cmp.to_dict(),
               "unavailable": dict(base.unavailable)}
    return summary, cmp


def stage_table(stages: Sequence[Mapping[str, Any]]) -> str:
    """A readable table of what each step of a pipeline bought: one row per stage.

    Each stage is a mapping with ``stage`` (name), ``ratio`` (median time / the original in ONNX
    Runtime FP32, same threads and batches) and optional ``agreement`` (fraction of test samples
    predicted as the original does), ``accuracy`` and ``macs_ratio``; ``x faster`` is
    the previous row's ratio divided by this one's (the step's own contribution).
    """
    header = ("stage", "time / ORT fp32", "step speed-up", "agreement", "accuracy", "MACs ratio")
    rows, prev = [], None
    for st in stages:
        ratio = float(st["ratio"])
        step = "-" if prev is None or not ratio > 0 else f"{prev / ratio:.2f}x"
        fmt = lambda key, spec: "-" if st.get(key) is None else format(st[key], spec)  # noqa: E731
        rows.append((str(st["stage"]), f"{ratio:.3f}", step, fmt("agreement", ".4%"), fmt("accuracy", ".4f"),
                     fmt("macs_ratio", ".3f")))
        prev = ratio
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _onnxruntime_variant(model: nn.Module, example: torch.Tensor, workdir: str | Path | None) -> tuple[RuntimeVariant, str]:
    """The model exported by :func:`moco.deploy.export` (one graph, dynamic batch) and loaded by :func:`moco.deploy.load`."""
    import onnxruntime as ort

    from moco.deploy import export, load

    with contextlib.ExitStack() as stack:
        if workdir is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="moco-onnx-")))
        else:
            folder = Path(workdir)
            folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{type(model).__name__.lower()}-baseline.onnx"
        result = export(model, path, example)
        threads = torch.get_num_threads()
        runtime = load(path, intra_op_num_threads=threads)
        where = f"kept at {path}" if workdir is not None else "in a temporary folder, removed after loading"
    note = (
        f"exported by moco.deploy.export ({result.exporter}) in {result.seconds:.1f} s ({where}); onnxruntime "
        f"{ort.__version__}, CPUExecutionProvider, {threads} intra-op thread(s)"
    )
    return RuntimeVariant(runtime), note


def _agreement(fn: Callable[[torch.Tensor], Any], batches: list[torch.Tensor],
               reference: list[torch.Tensor]) -> Agreement:
    """Run ``fn`` on every batch and compare with eager's ``reference`` outputs (raises on bad outputs)."""
    same = total = 0
    max_diff, has_nan = 0.0, False
    for batch, ref in zip(batches, reference):
        with torch.inference_mode():
            out = fn(batch)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"returned a {type(out).__name__}, not a logits tensor")
        if tuple(out.shape) != tuple(ref.shape):
            raise ValueError(f"returned shape {tuple(out.shape)}, eager returns {tuple(ref.shape)}")
        out = out.detach().to(device=ref.device, dtype=torch.float32)
        pred, ref_pred = out.argmax(dim=-1), ref.argmax(dim=-1)
        same += int((pred == ref_pred).sum())
        total += pred.numel()
        diff = (out - ref).abs()
        if diff.numel():
            has_nan = has_nan or bool(torch.isnan(diff).any())
            max_diff = max(max_diff, float(diff.nan_to_num(nan=0.0).max()))
    return Agreement(fraction=same / total if total else 1.0, max_abs_diff=float("nan") if has_nan else max_diff,
                     n_samples=total)


def baseline_variants(
    model: nn.Module,
    example_batch: torch.Tensor,
    *,
    include: Iterable[str] = BASELINE_NAMES,
    extra: Mapping[str, Callable[[torch.Tensor], Any]] | None = None,
    check_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    atol: float | None = 1e-3,
    workdir: str | Path | None = None,
) -> BaselineSet:
    """Build the standard ways to run ``model`` faster, each checked against eager before it is timed.

    ``model``: a classifier returning logits (N, classes); it is never modified (every variant works
    on a deep copy, in eval mode). ``example_batch``: a representative input batch; ``compile`` is
    compiled for its shape and ONNX is exported with it (batch axis dynamic). ``include``: which of
    ``"eager", "channels_last", "compile", "onnxruntime"`` to build. ``extra``: more name -> callable
    (batch -> logits) variants, e.g. your own optimised model, checked exactly like the built-in ones.
    ``check_inputs``: a batch or list of batches the agreement is checked on (default: example_batch;
    use batches of the shape you will time, so that ``compile`` compiles for them here).
    ``atol``: largest absolute logit difference from eager accepted (None: check argmax only).
    ``workdir``: folder for the ONNX file (default: a temporary folder, removed once loaded).

    A variant is kept only if it gives the same argmax as eager on every checked sample and logits
    within ``atol``; otherwise, or when building or running it fails (e.g. no C++ compiler for
    ``compile``), it goes to ``unavailable`` with a one-line reason. Raises MocoError for an unknown
    name in ``include``, an ``extra`` name that clashes with a built-in, or a model that fails or does
    not return a logits tensor on the inputs.
    """
    if not isinstance(model, nn.Module):
        raise MocoError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_batch, torch.Tensor) or example_batch.dim() == 0:
        raise MocoError("example_batch must be a batch tensor with a leading batch dimension")
    include = [include] if isinstance(include, str) else list(include)
    unknown = [name for name in include if name not in BASELINE_NAMES]
    if unknown:
        raise MocoError(f"unknown baseline(s) {unknown}; choose from: {', '.join(BASELINE_NAMES)}")
    extra = dict(extra or {})
    for name, fn in extra.items():
        if name in BASELINE_NAMES or not isinstance(name, str) or not name:
            raise MocoError(f"extra variant name {name!r} is invalid or clashes with a built-in baseline; rename it")
        if not callable(fn):
            raise MocoError(f"extra variant {name!r} is a {type(fn).__name__}, not a callable taking one batch")
    if atol is not None and not atol >= 0:
        raise MocoError(f"atol must be >= 0 or None, got {atol!r}")
    batches = _as_batches(example_batch if check_inputs is None else check_inputs, "check_inputs")

    def private_copy() -> nn.Module:
        try:
            return copy.deepcopy(model).eval()
        except Exception as exc:  # noqa: BLE001
            raise MocoError(f"cannot deep-copy the model ({_one_line(exc)}); baselines never modify the "
                            "caller's model, so it must support copy.deepcopy") from None

    eager = _Eager(private_copy())
    reference = []
    for batch in batches:
        try:
            out = eager(batch)
        except Exception as exc:  # noqa: BLE001
            raise MocoError(f"the model fails on a check batch of shape {tuple(batch.shape)}: {_one_line(exc)}") from None
        if not isinstance(out, torch.Tensor) or out.dim() < 2:
            raise MocoError("the model must return a logits tensor (N, classes) for baselines to compare predictions; "
                            f"got {type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}")
        reference.append(out.detach().to(torch.float32))

    candidates: dict[str, Callable[[torch.Tensor], Any]] = {}
    unavailable: dict[str, str] = {}
    notes: dict[str, str] = {}
    for name in BASELINE_NAMES:
        if name not in include:
            continue
        try:
            if name == "eager":
                candidates[name] = eager
            elif name == "channels_last":
                if example_batch.dim() != 4 or any(b.dim() != 4 for b in batches):
                    unavailable[name] = f"needs 4-D (N, C, H, W) inputs, got {example_batch.dim()}-D"
                    continue
                candidates[name] = _ChannelsLast(private_copy().to(memory_format=torch.channels_last))
                notes[name] = "model and inputs in torch.channels_last; the input conversion is timed"
            elif name == "compile":
                compiled = _Eager(torch.compile(private_copy(), dynamic=False))
                t0 = time.perf_counter()
                compiled(example_batch)  # compilation is lazy: do it now, so a failure is caught here
                notes[name] = (f"torch.compile(dynamic=False), Inductor; first compile {time.perf_counter() - t0:.1f} s; "
                               "each new batch shape recompiles (in compare's warm-up)")
                candidates[name] = compiled
            elif name == "onnxruntime":
                candidates[name], notes[name] = _onnxruntime_variant(private_copy(), example_batch, workdir)
        except Exception as exc:  # noqa: BLE001 - a baseline that cannot be built is reported, not fatal
            unavailable[name] = f"could not be built: {_one_line(exc)}"
    candidates.update(extra)

    variants: dict[str, Callable[[torch.Tensor], Any]] = {}
    agreement: dict[str, Agreement] = {}
    for name, fn in candidates.items():
        if fn is eager:  # the reference itself
            n = sum(ref.argmax(dim=-1).numel() for ref in reference)
            agreement[name], variants[name] = Agreement(1.0, 0.0, n), fn
            continue
        try:
            a = _agreement(fn, batches, reference)
        except Exception as exc:  # noqa: BLE001
            unavailable[name] = f"failed on the check inputs: {_one_line(exc)}"
            continue
        agreement[name] = a
        if not a.identical_predictions:
            unavailable[name] = (f"disagrees with eager: same argmax on only {a.fraction:.2%} of {a.n_samples:,} "
                                 f"samples (max |logit diff| {a.max_abs_diff:.3g})")
        elif atol is not None and not a.max_abs_diff <= atol:
            unavailable[name] = (f"logits differ from eager by up to {a.max_abs_diff:.3g} > atol {atol:g} "
                                 "(same argmax, but not the same function)")
        else:
            variants[name] = fn
    order = [*BASELINE_NAMES, *extra]
    unavailable = {name: unavailable[name] for name in order if name in unavailable}
    return BaselineSet(variants=variants, unavailable=unavailable, agreement=agreement, notes=notes)


def best_baseline(comparison: Comparison, names: Iterable[str] = BASELINE_NAMES) -> str:
    """Name of the fastest (smallest median seconds) variant of ``comparison`` among ``names``.

    Names absent from the comparison (e.g. unavailable baselines) are ignored; MocoError when none of
    ``names`` is in it.
    """
    wanted = {names} if isinstance(names, str) else set(names)
    rows = [row for row in comparison.rows if row.name in wanted]
    if not rows:
        raise MocoError(f"none of {sorted(wanted)} is in the comparison; it has: {', '.join(comparison.names)}")
    return min(rows, key=lambda row: row.median_s).name
