"""``export(obj, path, example_input, *, int8=None)``: every moco result as ONNX graphs, checked before it is returned.

What is exported:

* a plain model (the original, a pruned or PFA model): one graph ``input -> logits`` with a dynamic
  batch axis. A path ending in ``.onnx`` is that one file; any other path is a folder with the graph
  and ``manifest.json`` (and the int8 graph beside the FP32 one);
* a :class:`moco.rules.branched.BranchedNetwork`: a folder with ``head.onnx`` (``input -> hidden,
  mask, classes``: the head, the network's pooling and the rule's decision in one graph) and
  ``tail.onnx`` (``hidden -> logits``);
* a :class:`moco.exits.EarlyExitNetwork`: a folder with ``segment{i}.onnx`` per segment
  (``h -> h_next, logits, score``: the backbone segment, its exit head and the criterion's score;
  only ``h_next`` for a disabled exit; the last one ``h -> logits``) and the thresholds, criterion
  direction and order in the manifest.

Check: the runtime (:func:`moco.deploy.load`) is run on ``example_input`` and on ``check`` (real data)
and compared with the PyTorch object: argmax agreement must be 100% on FP32, and exit decisions must be
identical except where the PyTorch score lies within ``tolerance`` of the threshold (such flips are
counted and reported). Anything else raises :class:`moco.errors.MocoError` and leaves no artifact.

int8: ``int8=`` calibration inputs (``x`` or ``(x, y)``) turn on post-training static quantization
with ONNX Runtime's own tools (``onnxruntime.quantization.quantize_static``: QDQ format, per-channel
int8 weights, uint8 activations, MinMax calibration on those inputs) for every graph; each graph is
calibrated on the inputs it really sees (the FP32 upstream graphs run on the calibration inputs).
The rule decision of a branched network stays FP32 (its thresholds were certified on FP32 scores).
The int8 agreement with FP32 and PyTorch and, with labels, the accuracy are reported. For exits, where
int8 changes exit decisions on labelled calibration inputs, the certified bound is checked again there.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from moco.deploy.runtime import (FORMAT, MANIFEST, SESSION_CONFIGS, VERSION, check_normalize, file_sha256, load,
                                 read_manifest)
from moco.errors import MocoError
from moco.io import write_json_atomic

__all__ = ["Check", "ExportResult", "export", "export_onnx"]

TOLERANCE = 1e-4
"""Default relative tolerance of a score near its threshold: ``|score - t| <= tol * (1 + |t|)``."""

#: fixed batches of the lane graphs (:mod:`moco.deploy.lanes`) a plain model's export times: on seed 003's
#: pruned fashion_cnn (2026-12-03, AVX-512, 2 threads, 1,000 images) chunks of 64, 128 and 256 ran within
#: noise of each other, 1.7x faster than the best plain setting; a whole-batch lane graph of 1,000, 1.2x.
LANE_BATCHES = (64, 256)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = next((t.strip() for t in str(exc).splitlines() if t.strip()), "")
    out = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return out if len(out) <= limit else out[: limit - 3] + "..."


def export_onnx(module: nn.Module, example: torch.Tensor, path: str | Path, *,
                output_names: Sequence[str] = ("output",), dynamic_batch: bool = True) -> str:
    """Export ``module`` (one input, batch axis dynamic on the input and every output unless
    ``dynamic_batch=False``: then the graph takes batches of ``len(example)`` only); returns the exporter used.

    The TorchScript exporter (``dynamo=False``) is tried first: it handles plain CNNs in a fraction of a
    second, needs no onnxscript and prints nothing. When it fails (or is gone in a later torch), the
    ``torch.export``-based exporter (needs onnxscript) is used. RuntimeError with both reasons when
    neither works.
    """
    path = str(path)
    names = list(output_names)
    errors = []
    # torch.export specialises a dim of size 1: a one-sample example would fix the batch at 1
    traced = torch.cat([example, example]) if dynamic_batch and len(example) == 1 else example
    with warnings.catch_warnings(), _no_mha_fastpath():
        warnings.simplefilter("ignore")
        try:
            axes = {n: {0: "batch"} for n in ["input", *names]} if dynamic_batch else None
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                torch.onnx.export(module, (example,), path, dynamo=False, input_names=["input"], output_names=names,
                                  dynamic_axes=axes, opset_version=17)
            return "torchscript (dynamo=False)"
        except Exception as exc:  # noqa: BLE001 - any exporter failure means: try the other one
            errors.append(f"torchscript exporter: {_one_line(exc)}")
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                program = torch.onnx.export(module, (traced,), dynamo=True, input_names=["input"],
                                            output_names=names,
                                            dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic_batch else None,
                                            verbose=False)
                program.optimize()
            # one self-contained file (weights inside, no external-data side file to lose on the way)
            program.save(path, external_data=False)
            if dynamic_batch:
                _check_dynamic_batch(path)
            return "torch.export (dynamo=True)"
        except Exception as exc:  # noqa: BLE001
            errors.append(f"dynamo exporter: {_one_line(exc)}")
    raise RuntimeError("; ".join(errors))


@contextlib.contextmanager
def _no_mha_fastpath():
    """nn.MultiheadAttention / TransformerEncoderLayer off their fused inference kernels while exporting: under
    no_grad in eval mode they call ``aten::_native_multi_head_attention``, which the TorchScript exporter
    cannot convert (their plain path exports, and computes the same). The flag is torch's own switch for
    this, set back afterwards."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def _check_dynamic_batch(path: str) -> None:
    """RuntimeError when the exported graph's input has a fixed batch size (it would fail on other batches)."""
    import onnx

    dim = onnx.load(path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    if dim.HasField("dim_value"):
        raise RuntimeError(f"the graph takes batches of {dim.dim_value} only (its batch size was specialised)")


# ----------------------------------------------------------------------------------------- graphs


class _HeadWithRule(nn.Module):
    """``x -> (hidden, mask, classes)``: the branched network's head, pooling and rule decision."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        hidden = self.net.head(x)
        mask, classes = self.net.decide(hidden)
        return hidden, mask, classes


class _SegmentExit(nn.Module):
    """``h -> (h_next, logits, score)``: a backbone segment, its exit head and the criterion's score."""

    def __init__(self, segment: nn.Module, head: nn.Module, criterion):
        super().__init__()
        self.segment, self.head, self.criterion = segment, head, criterion

    def forward(self, h):
        h = self.segment(h)
        logits = self.head(h)
        return h, logits, self.criterion.score(logits).float()


def _graphs(obj: nn.Module, kind: str) -> list[tuple[str, nn.Module, tuple[str, ...]]]:
    """``(file name, module, output names)`` per graph, in execution order."""
    if kind == "model":
        return [("model.onnx", obj, ("logits",))]
    if kind == "branched":
        return [("head.onnx", _HeadWithRule(obj).eval(), ("hidden", "mask", "classes")),
                ("tail.onnx", obj.tail, ("logits",))]
    out = []
    last = obj.num_exits - 1
    for i, segment in enumerate(obj.segments):
        if i == last:
            out.append((f"segment{i}.onnx", segment, ("logits",)))
        elif obj.thresholds[i] is None:
            out.append((f"segment{i}.onnx", segment, ("hidden",)))
        else:
            out.append((f"segment{i}.onnx", _SegmentExit(segment, obj.heads[i], obj.criterion).eval(),
                        ("hidden", "logits", "score")))
    return out


def _kind(obj: Any) -> str:
    from moco.exits.network import EarlyExitNetwork
    from moco.rules.branched import BranchedNetwork

    if isinstance(obj, BranchedNetwork):
        return "branched"
    if isinstance(obj, EarlyExitNetwork):
        return "exits"
    if isinstance(obj, nn.Module):
        return "model"
    raise TypeError(f"export needs a torch.nn.Module, a BranchedNetwork or an EarlyExitNetwork, not {type(obj).__name__}")


# ----------------------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class Check:
    """How a deployed runtime compares with a reference on ``n_samples`` inputs (fractions in [0, 1]).

    ``agreement``: same predicted class (argmax); ``max_abs_diff``: largest logit difference on
    samples that took the same exit (NaN when not comparable); ``decisions``: same exit decision
    (mask or exit index; 1.0 for a plain model); ``near_threshold``: decision flips where the
    reference's score lies within the tolerance of its threshold (allowed, counted);
    ``near_ties``: class flips where the reference's two top logits are within the tolerance;
    ``accuracy`` / ``reference_accuracy``: against labels when given, else None.
    """

    reference: str
    n_samples: int
    agreement: float
    max_abs_diff: float
    decisions: float = 1.0
    near_threshold: int = 0
    near_ties: int = 0
    accuracy: float | None = None
    reference_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote and how well it reproduces the PyTorch object.

    ``path``: the ``.onnx`` file or the folder; ``kind``: ``"model"``, ``"branched"`` or ``"exits"``;
    ``precision``: the precision :func:`moco.deploy.load` picks by default (``"int8"`` when
    quantized); ``graphs``: file name -> bytes per precision; ``exporter``: which torch exporter
    worked; ``fp32``: :class:`Check` of the FP32 runtime against PyTorch (on the example and
    ``check`` inputs); ``int8``: int8 against PyTorch, ``int8_vs_fp32``: int8 against the FP32
    runtime (both None without ``int8=``); ``recheck``: for exits with int8 and labelled calibration
    inputs, the certified bound recomputed for the int8 runtime (dict, or None); ``seconds``: wall
    time of export + checks; ``notes``: anything worth knowing; ``sessions``: per precision, graph file
    -> the session settings the tuning chose (a name of :data:`moco.deploy.runtime.SESSION_CONFIGS`).
    """

    path: Path
    kind: str
    precision: str
    graphs: dict[str, dict[str, int]]
    exporter: str
    fp32: Check
    int8: Check | None = None
    int8_vs_fp32: Check | None = None
    recheck: dict[str, Any] | None = None
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default=())
    sessions: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def size_bytes(self) -> dict[str, int]:
        """Total graph bytes per precision."""
        return {p: sum(files.values()) for p, files in self.graphs.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of the fields."""
        return {
            "path": str(self.path), "kind": self.kind, "precision": self.precision, "graphs": self.graphs,
            "size_bytes": self.size_bytes, "exporter": self.exporter, "fp32": self.fp32.to_dict(),
            "int8": self.int8.to_dict() if self.int8 else None,
            "int8_vs_fp32": self.int8_vs_fp32.to_dict() if self.int8_vs_fp32 else None,
            "recheck": self.recheck, "seconds": self.seconds, "notes": list(self.notes), "sessions": self.sessions,
        }

    def to_text(self) -> str:
        """A readable summary: files, sizes, agreement per precision."""
        sizes = ", ".join(f"{p} {b / 1e6:.2f} MB" for p, b in self.size_bytes.items())
        lines = [f"exported {self.kind} to {self.path} ({sizes}; {self.exporter}; {self.seconds:.1f} s)"]
        if self.sessions:
            lines.append("  session settings (tuned per graph): " + "; ".join(
                f"{p}: " + ", ".join(f"{f} {n}" for f, n in files.items()) for p, files in self.sessions.items()))
        for label, c in (("fp32 vs torch", self.fp32), ("int8 vs torch", self.int8), ("int8 vs fp32", self.int8_vs_fp32)):
            if c is None:
                continue
            acc = f", accuracy {c.accuracy:.4f} (reference {c.reference_accuracy:.4f})" if c.accuracy is not None else ""
            lines.append(f"  {label}: agreement {c.agreement:.4%} of {c.n_samples:,}, decisions {c.decisions:.4%} "
                         f"({c.near_threshold} flip(s) at a threshold, {c.near_ties} near tie(s)), "
                         f"max |logit diff| {c.max_abs_diff:.2e}{acc}")
        if self.recheck:
            r = self.recheck
            lines.append(f"  int8 exit decisions re-certified on {r['n']:,} labelled calibration samples: "
                         f"{r['metric']} bound {r['bound']:.4f} at {r['confidence']:.0%} "
                         + ("(no target given)" if r["target"] is None else
                            f"({'within' if r['holds'] else 'ABOVE'} the target {r['target']})"))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def _split_data(data: Any, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if data is None:
        return None, None
    labels = None
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        data, labels = data
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if not isinstance(data, torch.Tensor) or data.dim() < 1 or len(data) == 0:
        raise MocoError(f"{what} must be a non-empty batch tensor [N, ...] or an (x, y) pair, got {type(data).__name__}")
    if labels is not None:
        labels = torch.as_tensor(labels).long()
        if labels.shape != (len(data),):
            raise MocoError(f"{what}: labels must be [N] = [{len(data)}], got {tuple(labels.shape)}")
    return data.float(), labels


def _batches(x: torch.Tensor, size: int = 1024):
    return x.split(size) if len(x) else [x]


@torch.no_grad()
def _scores(obj: nn.Module, kind: str, x: torch.Tensor) -> np.ndarray | None:
    """PyTorch's decision scores for ``x``: a branched network's relative rule margin ``[n]`` (None for a
    duck-typed rule), or every early exit's criterion score ``[n, K - 1]``."""
    parts = []
    for xb in _batches(x):
        if kind == "branched":
            margin = obj.decision_margin(obj.head(xb))
            if margin is None:
                return None
            parts.append(margin)
        else:
            all_logits = obj.forward_all(xb)[:-1]
            parts.append(torch.stack([obj.criterion.score(z).float() for z in all_logits], 1)
                         if all_logits else torch.zeros(len(xb), 0))
    return torch.cat(parts).numpy()


@torch.no_grad()
def _reference(obj: nn.Module, kind: str, x: torch.Tensor) -> dict[str, Any]:
    """PyTorch's outputs on ``x``: logits/predictions, decisions, and ``scores(rows)`` computing the
    decision scores of some rows (only needed where a decision differs, so computed on demand)."""
    logits, decisions = [], []
    for xb in _batches(x):
        if kind == "model":
            logits.append(obj(xb).float())
        elif kind == "branched":
            pred, mask = obj(xb)
            logits.append(pred.float() if pred.dim() == 2 else pred)
            decisions.append(mask)
        else:
            out, idx = obj(xb)
            logits.append(out.float())
            decisions.append(idx)
    out: dict[str, Any] = {"logits": torch.cat(logits).numpy()}
    if decisions:
        out["decisions"] = torch.cat(decisions).numpy()
        out["scores"] = lambda rows: _scores(obj, kind, x[torch.as_tensor(rows, dtype=torch.long)])
    return out


def _run(runtime, kind: str, x: torch.Tensor) -> dict[str, np.ndarray]:
    logits, decisions = [], []
    for xb in _batches(x):
        out = runtime(xb.numpy())
        if kind == "model":
            logits.append(out)
        else:
            logits.append(out[0])
            decisions.append(out[1])
    res = {"logits": np.concatenate(logits)}
    if decisions:
        res["decisions"] = np.concatenate(decisions)
    return res


def _near(values: np.ndarray, threshold: np.ndarray, tol: float) -> np.ndarray:
    return np.abs(values - threshold) <= tol * (1.0 + np.abs(threshold))


def _compare(ref: dict, got: dict, kind: str, thresholds: Sequence[float | None], tol: float,
             labels: torch.Tensor | None, reference: str, *, strict: bool) -> Check:
    """Compare runtime outputs with the reference's (see :class:`Check`).

    ``strict`` (FP32): a decision flip whose reference score is not within ``tol`` of the threshold,
    or a class flip that is not a near tie, raises MocoError. Otherwise (int8) flips are counted.
    ``labels``: int64 ``[n]``, -1 for unlabelled rows (accuracy on the labelled ones), or None.
    """
    r_logits, g_logits = ref["logits"], got["logits"]
    r_pred = r_logits.argmax(1) if r_logits.ndim == 2 else r_logits
    g_pred = g_logits.argmax(1) if g_logits.ndim == 2 else g_logits
    n = len(r_pred)
    same_decision = np.ones(n, dtype=bool)
    near_threshold = 0
    if kind != "model":
        same_decision = ref["decisions"] == got["decisions"]
        flips = np.flatnonzero(~same_decision)
        scores = ref["scores"](flips) if flips.size and "scores" in ref else None
        if scores is not None:
            if kind == "branched":  # scores: relative distance of each sample's rule scores to the thresholds
                near = scores <= tol
            else:
                first = np.minimum(ref["decisions"][flips], got["decisions"][flips])
                t = np.array([np.nan if thresholds[j] is None else thresholds[j] for j in first], dtype=np.float64)
                near = _near(scores[np.arange(flips.size), first].astype(np.float64), t, tol)
            near_threshold = int(near.sum())
        if strict and near_threshold < flips.size:
            raise MocoError(
                f"the deployed {kind} takes other exit decisions than PyTorch on {flips.size - near_threshold} of "
                f"{n} samples whose scores are not near a threshold; the export is wrong, please report it")
    two_d = r_logits.ndim == 2
    diffs = np.abs(r_logits - g_logits)[same_decision] if two_d else np.zeros(0)
    max_diff = float(diffs.max()) if diffs.size else (0.0 if two_d else float("nan"))
    differ = (r_pred != g_pred) & same_decision
    near_ties = 0
    if differ.any() and two_d:
        top2 = np.sort(r_logits[differ], axis=1)[:, -2:]
        near_ties = int(_near(top2[:, 1], top2[:, 0], tol).sum())
    if strict and int(differ.sum()) > near_ties:
        raise MocoError(f"the FP32 ONNX {kind} predicts another class than PyTorch on {int(differ.sum()) - near_ties} "
                        f"of {n} samples (not near ties); the export is wrong, please report it")
    accuracy = reference_accuracy = None
    if labels is not None:
        y = labels.numpy()
        rows = y >= 0
        if rows.any():
            accuracy = float((g_pred[rows] == y[rows]).mean())
            reference_accuracy = float((r_pred[rows] == y[rows]).mean())
    return Check(reference=reference, n_samples=n, agreement=float((r_pred == g_pred).mean()) if n else 1.0,
                 max_abs_diff=max_diff, decisions=float(same_decision.mean()) if n else 1.0,
                 near_threshold=near_threshold, near_ties=near_ties, accuracy=accuracy,
                 reference_accuracy=reference_accuracy)


# ----------------------------------------------------------------------------------------- int8


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over one graph's input batches."""

    def __init__(self, name: str, arrays: list[np.ndarray]):
        self.name, self.arrays, self.i = name, arrays, 0

    def get_next(self):
        if self.i >= len(self.arrays):
            return None
        self.i += 1
        return {self.name: self.arrays[self.i - 1]}

    def rewind(self):
        self.i = 0


def _graph_inputs(runtime, kind: str, x: np.ndarray, batch: int = 256) -> list[list[np.ndarray]]:
    """Per graph, the batches it sees when the FP32 graphs run every calibration sample."""
    per_graph: list[list[np.ndarray]] = [[] for _ in runtime.graphs]
    for start in range(0, len(x), batch):
        h = np.ascontiguousarray(x[start:start + batch])
        for g, graph in enumerate(runtime.graphs):
            per_graph[g].append(h)
            if g < len(runtime.graphs) - 1:
                h = np.ascontiguousarray(graph(h)[0])
    return per_graph


def _rule_nodes(model_path: Path) -> list[str]:
    """Names of the nodes that compute from the ``hidden`` output onwards (the rule decision)."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    tainted, names = {"hidden"}, []
    for node in graph.node:  # nodes are topologically sorted in a valid ONNX graph
        if any(i in tainted for i in node.input):
            tainted.update(node.output)
            names.append(node.name)
    return names


def _float_equivalent(net: nn.Module) -> nn.Module | None:
    """For a model with quantisation-aware layers (modules with a ``float_module()`` method, such as
    moco.approx's QAT layers), a copy with each replaced by its plain float layer (weights on their int8
    grid); None when there is none. Its int8 graph is ONNX Runtime's static quantisation of that copy.

    Why not the QAT graph itself: its fake-quant arithmetic exports as float ops (Round, Div, Clip) that
    ONNX Runtime then quantises a second time (a CIFAR ResNet: 95.4% agreement with the QAT model, slower
    than FP32), and its own QuantizeLinear/DequantizeLinear form has no quantised conv outputs, so ONNX
    Runtime runs float kernels (84 ms against 35.6 ms for this path and 48 ms FP32, batch 256, 1 thread;
    measured 2026-12-04). Here the weights are the QAT weights exactly and the activations get ONNX
    Runtime's calibrated int8 ranges; the export's int8 check reports the agreement with the QAT model."""
    names = [n for n, m in net.named_modules() if n and callable(getattr(m, "float_module", None))]
    if not names:
        return None
    plain = copy.deepcopy(net).eval()
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent) if parent else plain, child, plain.get_submodule(name).float_module())
    return plain


def _quantize(src: Path, dst: Path, reader: _Reader, exclude: list[str]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        source = pre
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantize the raw graph then
        source = src
    root = logging.getLogger()  # onnxruntime's quantizer logs advice ("consider pre-processing") on the root logger
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(str(source), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude or None,
                            op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    finally:
        root.setLevel(level)
        pre.unlink(missing_ok=True)


def _recheck(obj, runtime, x: torch.Tensor, y: torch.Tensor, calibration) -> dict[str, Any]:
    """Certified bound of the int8 exits on labelled calibration data (Clopper-Pearson, as ``calibrate``)."""
    from moco.stats import clopper_pearson_upper

    metric = getattr(calibration, "metric", "accuracy_drop")
    target = getattr(calibration, "target", None)
    confidence = getattr(calibration, "confidence", 0.95)
    got = _run(runtime, "exits", x)
    with torch.no_grad():
        final = torch.cat([obj.forward_final(xb).argmax(1) for xb in _batches(x)]).numpy()
    pred = got["logits"].argmax(1)
    early = got["decisions"] < obj.num_exits - 1
    yy = y.numpy()
    bad = early & ((pred != yy) & (final == yy) if metric == "accuracy_drop" else pred != final)
    k, n = int(bad.sum()), len(yy)
    bound = float(clopper_pearson_upper(k, n, confidence))
    return {"metric": metric, "n": n, "bad_events": k, "bound": bound, "confidence": confidence,
            "target": target, "holds": bool(target is None or bound <= target)}


# ----------------------------------------------------------------------------------------- tuning


def _tune(work: Path, items: list[dict], inputs: list[np.ndarray], threads: int, repeats: int = 3,
          max_batch: int = 64, micro_samples: int = 1024, budget_s: float = 0.1, rounds: int = 3,
          lanes: Sequence[dict[int, dict] | Callable[[], dict[int, dict]]] = (), settle_s: float = 0.03) -> None:
    """Set ``item["session"]`` of each graph to the fastest pair of :data:`SESSION_CONFIGS` and
    :data:`MICRO_BATCHES`, timed on its example input; with ``lanes`` (per item: ``{batch: lane graph
    item}``, or a function writing the lane graphs and returning that, called only for a graph cheap
    enough to try them; see :mod:`moco.deploy.lanes`) the lane graphs compete too and the winner, if
    any, becomes ``item["lanes"]``.

    The example is tiled to ``micro_samples`` samples (a throughput batch: the settings that win at 64
    samples can lose at 1,000, e.g. fashion_cnn chose ``"extended"`` at 64 samples, 2 threads, and ran
    1.5x slower with it at 1,024; on 512 samples the lane graphs of seed 003's pruned model ran within
    noise of the plain ones, on 1,024 and more 1.5-2x faster). When one call on that batch takes longer
    than ``budget_s`` seconds (a compute-bound graph, where neither choice moves much; the export stays
    quick) the settings are timed on at most ``max_batch`` samples instead and no micro-batch or lane
    graph is tried; still in ``rounds`` rounds unless one call on those samples also takes longer than
    ``budget_s`` (then once each). One round was not enough: compose-fashion's compressed vgg_bn timed
    4.8-9.3 ms per 64 samples with ``"all"`` in three exports and 13-14 ms with the others, and a single
    slow block made the tuner choose ``"all-no-nchwc"``, 3.5x slower at batch 256 (423 ms against 122 ms
    for 1,536 images; 0.617 of the original in ORT instead of 0.262).
    Otherwise every pair (session settings, micro-batch) is timed, jointly because they interact (seed
    003's pruned fashion_cnn: NCHWc loses on the whole batch and wins in chunks of 256, its padded
    activations leave the cache), in ``rounds`` rounds that visit the pairs in a rotated order, and
    scored by the median of all its runs: one round's blocks on a shared 2-core machine scatter by
    30%, enough for a single block to pick a slower pair (it once chose one 1.25x slower than the
    best). onnxruntime's default (``"all"``, whole batch) is kept unless another pair is at least 5%
    faster, so noise does not flip the choice. A lane graph is first checked against the plain graph on
    the tiled batch (same argmax, logits within float tolerance; else it is dropped and the reason
    recorded in ``item["lanes_refused"]``). Each candidate is timed in a block of its own, after
    ``settle_s`` seconds of sleep and one warm-up run (then at least ``repeats`` runs and 0.05 s):
    interleaving different sessions call by call lets the spin-waiting threads of one slow down the next
    (see :func:`moco.bench.harness.compare`), and they spin for some 10-30 ms after a session's last
    call: without the pause the lane graph of seed 003's pruned model (35 small parallel nodes) timed
    7.5 ms per 1,024 images right after another session's block, 3.3-4.2 ms after 0.03-0.05 s (the
    plain graphs 7.5-8.5 ms either way), and the tuner kept the slower plain graph. The measured medians
    (seconds) are recorded beside the choice: ``measured_s`` per session setting on the whole batch,
    ``micro_batch_measured_s`` per micro-batch with the chosen setting, ``lanes_measured_s`` per lane batch.
    """
    from moco.deploy.runtime import MICRO_BATCHES, _Graph

    def graph(config: dict) -> "_Graph":
        return _Graph(work / item["file"], threads, config["optimization"], config["disabled_optimizers"])

    for k, (item, x) in enumerate(zip(items, inputs)):
        big = np.ascontiguousarray(np.resize(x, (micro_samples, *x.shape[1:])))  # the example repeated
        small_s, big_s, out = _probe_costs(graph(SESSION_CONFIGS["all"]), big, max_batch)
        reference, cheap = out[0], big_s <= budget_s
        n_rounds = rounds if small_s <= budget_s else 1  # one round only where a single call is slow
        timed = big if cheap else np.ascontiguousarray(big[:max_batch])  # the example repeated to max_batch
        graphs = {name: graph(c) for name, c in SESSION_CONFIGS.items()}
        pairs: list[tuple] = [(name, m) for name in SESSION_CONFIGS for m in (MICRO_BATCHES if cheap else (None,))]
        spec = lanes[k] if k < len(lanes) and cheap else {}  # a slow graph gets no lane graphs written at all
        lane_items = dict(spec() if callable(spec) else spec)
        for n, lane in list(lane_items.items()):
            runner = graph(SESSION_CONFIGS["all"]).attach_lanes(work / lane["file"], n)
            problem = _lanes_problem(reference, runner(big)[0])
            if problem:
                item.setdefault("lanes_refused", {})[str(n)] = problem
                del lane_items[n]
                continue
            graphs[f"lanes{n}"] = runner
            pairs.append((f"lanes{n}", None))
        def call(pair):
            graphs[pair[0]].micro_batch = pair[1]
            return graphs[pair[0]]

        medians = _rotated_medians(pairs, call, timed, n_rounds, repeats, settle_s)
        del graphs
        plain = {pair: t for pair, t in medians.items() if pair[0] in SESSION_CONFIGS}
        choice, micro = _default_unless_faster(plain, ("all", None))
        micro_s = {str(m): plain[(c, m)] for c, m in plain if c == choice} if cheap else {}
        item["session"] = {**SESSION_CONFIGS[choice], "name": choice,
                           "measured_s": {name: plain[(name, None)] for name in SESSION_CONFIGS},
                           "batch": int(len(timed)), "micro_batch": micro, "micro_batch_measured_s": micro_s}
        if lane_items:
            lane_s = {n: medians[(f"lanes{n}", None)] for n in lane_items}
            item["session"]["lanes_measured_s"] = {str(n): t for n, t in lane_s.items()}
            n = min(lane_s, key=lane_s.get)
            if lane_s[n] < 0.95 * plain[(choice, micro)]:
                item["lanes"] = {**lane_items[n], "batch": int(n)}


def _timed_block(fn: Callable, x: np.ndarray, repeats: int, settle_s: float) -> list[float]:
    """Seconds per call of ``fn(x)``, timed in one block: ``settle_s`` seconds of sleep (the threads of the
    session timed before stop spinning), one warm-up call, then at least ``repeats`` calls and 0.05 s."""
    time.sleep(settle_s)
    fn(x)
    times: list[float] = []
    while len(times) < repeats or sum(times) < 0.05:  # sub-millisecond runs need many to be stable
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return times


def _probe_costs(fn: Callable, big: np.ndarray, max_batch: int) -> tuple[float, float, Any]:
    """``(seconds of one call on max_batch samples, seconds of one call on big, that call's output)``, after
    a warm-up call."""
    fn(big[:max_batch])
    t0 = time.perf_counter()
    fn(big[:max_batch])
    small_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = fn(big)
    return small_s, time.perf_counter() - t0, out


def _rotated_medians(candidates: list, call: Callable[[Any], Callable], x: np.ndarray, rounds: int, repeats: int,
                     settle_s: float) -> dict[Any, float]:
    """Median seconds per call of ``call(c)(x)`` for each candidate: ``rounds`` rounds that visit the
    candidates in a rotated order, one :func:`_timed_block` each, the median over all of a candidate's runs."""
    times: dict[Any, list[float]] = {c: [] for c in candidates}
    for r in range(rounds):
        shift = r * len(candidates) // max(rounds, 1)
        for c in candidates[shift:] + candidates[:shift]:
            times[c] += _timed_block(call(c), x, repeats, settle_s)
    return {c: float(np.median(t)) for c, t in times.items()}


def _default_unless_faster(medians: dict, default: Any, margin: float = 0.95) -> Any:
    """The fastest candidate if it takes under ``margin`` of ``default``'s time, else ``default`` (noise does
    not flip the choice)."""
    best = min(medians, key=medians.get)
    return best if medians[best] < margin * medians[default] else default


def _tune_fused(work: Path, manifest: dict, precision: str, x: np.ndarray, threads: int, *, samples: int = 1024,
                budget_s: float = 0.1, max_batch: int = 64, repeats: int = 3, rounds: int = 3,
                settle_s: float = 0.03) -> None:
    """Time the fused graph of ``precision`` (``manifest["fused"]``) with each of :data:`SESSION_CONFIGS`,
    end to end through the runtime on the example ``x`` tiled to ``samples`` samples (its own exit mix),
    and record the fastest in its ``session`` (``"all"`` unless another is at least 5% faster).

    Why not the first graph's settings: the fused graph runs every segment in one session, and the first
    segment's choice can be wrong for the rest. Measured 2026-12-03 (compose-fashion, vgg_bn exits, 2
    threads): with segment0 tuned to ``"extended"`` the fused exits ran at 0.392 of the original in ORT at
    batch 256, in the run before with ``"all"`` at 0.180. Like :func:`_tune`: rotated rounds, one block
    per candidate after a pause, the median of all runs; a call slower than ``budget_s`` on the tiled batch
    is timed on ``max_batch`` samples instead (in one round only if a call on those is slow too).
    """
    from moco.deploy.runtime import _Graph

    entry = (manifest.get("fused") or {}).get(precision)
    if entry is None:
        return
    write_json_atomic(work / MANIFEST, manifest)  # the runtime below reads this precision's graphs from it
    runtime = load(work, precision=precision, intra_op_num_threads=threads)
    big = np.ascontiguousarray(np.resize(x, (samples, *x.shape[1:])))
    graphs = {name: _Graph(work / entry["file"], threads, c["optimization"], c["disabled_optimizers"])
              for name, c in SESSION_CONFIGS.items()}

    def call(name):
        runtime.fused = graphs[name]
        return runtime

    small_s, big_s, _ = _probe_costs(call("all"), big, max_batch)
    timed = big if big_s <= budget_s else np.ascontiguousarray(big[:max_batch])
    medians = _rotated_medians(list(graphs), call, timed, rounds if small_s <= budget_s else 1, repeats, settle_s)
    del graphs, runtime
    choice = _default_unless_faster(medians, "all")
    entry["session"] = {**SESSION_CONFIGS[choice], "name": choice, "measured_s": medians, "batch": int(len(timed))}


def _lanes_problem(reference: np.ndarray, got: np.ndarray) -> str | None:
    """Why a lane graph's logits cannot stand in for the plain graph's (None: they can)."""
    if got.shape != reference.shape:
        return f"output shape {got.shape}, the plain graph's is {reference.shape}"
    scale = float(np.abs(reference).max()) or 1.0
    worst = float(np.abs(got - reference).max())
    if worst > 1e-4 * scale + 1e-5:
        return f"logits differ by up to {worst:.3g} (scale {scale:.3g})"
    if not np.array_equal(got.argmax(1), reference.argmax(1)):
        return "argmax differs from the plain graph's"
    return None


def _lane_graphs(net: nn.Module, example: torch.Tensor, work: Path, stem: str) -> dict[int, dict]:
    """The fixed-batch lane graphs of a plain model (:func:`moco.deploy.lanes.lane_model`) for each of
    :data:`LANE_BATCHES`, written to ``work``: ``{batch: {"file", "sha256"}}`` (empty when the model has
    no few-channel convolution chain to rewrite, or a lane graph fails to export)."""
    from moco.deploy.lanes import lane_model

    out: dict[int, dict] = {}
    for n in LANE_BATCHES:
        module = lane_model(net, n, example)
        if module is None:
            break
        tiled = example[torch.arange(n) % len(example)]
        name = f"{stem}.lanes{n}.onnx"
        try:
            export_onnx(module, tiled, work / name, output_names=("logits",), dynamic_batch=False)
        except RuntimeError:  # the plain graph still runs; the lanes are only an optimisation
            break
        out[n] = {"file": name, "sha256": file_sha256(work / name)}
    return out


def _session_name(item: dict) -> str:
    """``"all"``, ``"all-no-nchwc, micro-batch 256"``, ``"lanes 64 (rest: all)"``: one graph's tuned settings in words."""
    session = item.get("session") or {}
    name = session.get("name", "all")
    name += f", micro-batch {session['micro_batch']}" if session.get("micro_batch") else ""
    return f"lanes {item['lanes']['batch']} (rest: {name})" if item.get("lanes") else name


def _check_tolerance(tolerance: Any) -> float:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise MocoError(f"tolerance must be a number in [0, 1), got {tolerance!r}")
    return float(tolerance)


def export(obj: nn.Module, path: str | Path, example_input: torch.Tensor, *, int8: Any = None, check: Any = None,
           calibration: Any = None, tolerance: float = TOLERANCE, intra_op_num_threads: int = 1,
           tune: bool = True, normalize: Any = None) -> ExportResult:
    """Export ``obj`` to ONNX at ``path``, check the runtime against PyTorch and return an :class:`ExportResult`.

    Args:
        obj: a plain classifier (``x -> logits``), a ``BranchedNetwork`` or an ``EarlyExitNetwork``;
            never modified (a deep copy in eval mode is exported).
        path: ``*.onnx`` for a single-graph plain model, else a folder (created; an existing
            ``manifest.json`` there is replaced, other files are left alone).
        example_input: a batch ``[B, ...]`` (float) used to trace the graphs and for the first check.
        int8: calibration inputs ``x`` or ``(x, y)`` (tensors; a few hundred to a few thousand samples
            of the user's data): adds int8 graphs (see the module docstring). With labels and an
            exits network, the exit bound is re-checked for int8 on them.
        check: more inputs ``x`` or ``(x, y)`` to check on (real data); with labels, accuracies.
        calibration: the :class:`moco.exits.CalibrationResult` whose promise (metric, target,
            confidence) the int8 re-check uses (default: accuracy drop, 95%, no target).
        tolerance: relative tolerance of a decision score near its threshold, or of two top logits.
        intra_op_num_threads: onnxruntime threads used for the checks and the tuning.
        tune: time each graph on ``example_input`` under the session settings of
            :data:`moco.deploy.runtime.SESSION_CONFIGS` and record the fastest (the manifest, or the
            ``moco.session`` metadata of a single ``.onnx`` file); ``load`` then uses it.
        normalize: the standardisation the model's inputs had in training, ``(mean, std)`` (a number or one
            per channel; :func:`moco.deploy.runtime.check_normalize`), recorded in the manifest (a single
            ``.onnx``: its ``moco.normalize`` metadata) so that a deployment feeds the graph what it was
            trained on: ``runtime.preprocess(images)``. None: the inputs are the images as they are.

    Raises:
        TypeError for an unsupported object; MocoError for bad inputs, an exporter failure, or a
        runtime that disagrees with PyTorch on FP32 (then nothing is left at ``path``).
    """
    t_start = time.perf_counter()
    kind = _kind(obj)
    tol = _check_tolerance(tolerance)
    example, _ = _split_data(example_input, "example_input")
    normalize = check_normalize(normalize, int(example.shape[1]) if example.dim() > 2 else None)
    x_check, y_check = _split_data(check, "check")
    x_cal, y_cal = _split_data(int8, "int8")
    path = Path(path)
    single = path.suffix == ".onnx"
    if single and kind != "model":
        raise MocoError(f"a {kind} network exports to several graphs: pass a folder path, not {path.name}")
    net = copy.deepcopy(obj).eval()
    plain = _float_equivalent(net) if kind == "model" else None  # a QAT model: what its int8 graph quantises
    thresholds = list(net.thresholds) if kind == "exits" else []
    if x_check is not None and tuple(x_check.shape[1:]) != tuple(example.shape[1:]):
        raise MocoError(f"check inputs are {tuple(x_check.shape[1:])} per sample but example_input is "
                        f"{tuple(example.shape[1:])}; pass inputs of the shape the model takes to both")
    xs = example if x_check is None else torch.cat([example, x_check])
    labels = None if y_check is None else torch.cat([torch.full((len(example),), -1), y_check])
    try:
        ref = _reference(net, kind, xs)
    except RuntimeError as exc:  # a wrong input shape or dtype: PyTorch's own message, in one line
        last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise MocoError(f"the {kind} could not run on example_input of shape {tuple(example.shape)}: {last}; pass "
                        "an input batch of the shape the model takes") from None

    with tempfile.TemporaryDirectory(prefix="moco-deploy-") as tmp:
        work = Path(tmp)
        files: list[dict[str, Any]] = []
        exporters: list[str] = []
        h = example
        with torch.no_grad():
            for name, module, outputs in _graphs(net, kind):
                try:
                    used = export_onnx(module, h, work / name, output_names=outputs)
                except RuntimeError as exc:
                    raise MocoError(f"cannot export {name} of the {kind}: {exc}") from None
                exporters.append(f"{name}: {used}")
                files.append({"file": name, "outputs": list(outputs)})
                if kind != "model":
                    h = module(h)[0] if len(outputs) > 1 else module(h)
        manifest = _manifest(net, kind, example, {"fp32": files})
        manifest["normalize"] = normalize
        for item in files:
            item["sha256"] = file_sha256(work / item["file"])
        write_json_atomic(work / MANIFEST, manifest)
        fp32 = load(work, precision="fp32", intra_op_num_threads=intra_op_num_threads)
        tune_inputs = _graph_inputs(fp32, kind, example.numpy(), batch=len(example))
        if tune:
            stem = Path(files[0]["file"]).stem
            lanes = [lambda: _lane_graphs(net, example, work, stem)] if kind == "model" and not single else []
            _tune(work, files, [g[0] for g in tune_inputs], intra_op_num_threads, lanes=lanes)
        if kind != "model":
            _add_fused(work, manifest, "fp32", net)
            if tune:
                _tune_fused(work, manifest, "fp32", example.numpy(), intra_op_num_threads)
        if tune or kind != "model":
            write_json_atomic(work / MANIFEST, manifest)
            fp32 = load(work, precision="fp32", intra_op_num_threads=intra_op_num_threads)
        got32 = _run(fp32, kind, xs)
        check32 = _compare(ref, got32, kind, thresholds, tol, labels, "torch", strict=True)
        check8 = check8_32 = recheck = None
        notes: list[str] = []
        if x_cal is not None:
            per_graph = _graph_inputs(fp32, kind, x_cal.numpy())
            items8 = []
            if plain is not None:
                notes.append("int8: ONNX Runtime's quantization of the QAT weights (on their int8 grid), activation "
                             "ranges calibrated on the calibration inputs (the exact QAT graph, with float kernels: "
                             "moco.approx.quant.export_qdq)")
            for g, item in enumerate(files):
                name8 = item["file"].replace(".onnx", ".int8.onnx")
                exclude = _rule_nodes(work / item["file"]) if kind == "branched" and g == 0 else []
                source = work / item["file"]
                if plain is not None:
                    source = work / "float-equivalent.onnx"
                    with torch.no_grad():
                        export_onnx(plain, example, source, output_names=item["outputs"])
                _quantize(source, work / name8, _Reader(fp32.graphs[g].input, per_graph[g]), exclude)
                items8.append({"file": name8, "outputs": item["outputs"], "sha256": file_sha256(work / name8)})
            if tune:
                _tune(work, items8, [g[0] for g in tune_inputs], intra_op_num_threads)
            manifest["graphs"]["int8"] = items8
            if kind != "model":
                _add_fused(work, manifest, "int8", net)
                if tune:
                    _tune_fused(work, manifest, "int8", example.numpy(), intra_op_num_threads)
            write_json_atomic(work / MANIFEST, manifest)
            rt8 = load(work, precision="int8", intra_op_num_threads=intra_op_num_threads)
            got8 = _run(rt8, kind, xs)
            check8 = _compare(ref, got8, kind, thresholds, tol, labels, "torch", strict=False)
            check8_32 = _compare(got32, got8, kind, thresholds, tol, None, "fp32", strict=False)
            if kind == "exits" and y_cal is not None:
                recheck = _recheck(net, rt8, x_cal, y_cal, calibration)
                if recheck["target"] is not None and not recheck["holds"]:
                    notes.append("int8 changes exit decisions enough that the certified bound no longer holds on "
                                 "the calibration inputs; deploy the FP32 graphs (load(path, precision='fp32'))")
            if kind == "exits" and check8.decisions < 1.0 and y_cal is None:
                notes.append("int8 changes some exit decisions; pass int8=(x, y) to re-check the certified bound")
        manifest["verification"] = {"fp32": check32.to_dict(), "int8": check8.to_dict() if check8 else None,
                                    "int8_vs_fp32": check8_32.to_dict() if check8_32 else None, "recheck": recheck}
        write_json_atomic(work / MANIFEST, manifest)
        graphs = {p: {i["file"]: (work / i["file"]).stat().st_size for i in items}
                  for p, items in manifest["graphs"].items()}
        precision = "int8" if "int8" in manifest["graphs"] else "fp32"
        sessions = {p: {i["file"]: _session_name(i) for i in items}
                    for p, items in manifest["graphs"].items()}
        _install(work, path, single, manifest)
    return ExportResult(path=path, kind=kind, precision=precision, graphs=graphs, exporter="; ".join(exporters), fp32=check32,
                        int8=check8, int8_vs_fp32=check8_32, recheck=recheck,
                        seconds=time.perf_counter() - t_start, notes=tuple(notes), sessions=sessions)


def _manifest(net, kind: str, example: torch.Tensor, graphs: dict) -> dict[str, Any]:
    import moco

    doc: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "kind": kind, "input_shape": [int(s) for s in example.shape[1:]],
        "input_dtype": "float32", "graphs": graphs, "order": [g["file"] for g in graphs["fp32"]],
        "moco": getattr(moco, "__version__", "unknown"), "torch": str(torch.__version__),
    }
    if kind == "model":
        with torch.no_grad():
            doc["num_classes"] = int(net(example[:1]).shape[1])
    elif kind == "branched":
        doc.update(num_classes=int(net.rule.num_classes), output=net.output, layer=net.layer,
                   rule=type(net.rule).__name__)
    else:
        doc.update(num_classes=net.num_classes, thresholds=list(net.thresholds), points=list(net.points),
                   criterion={**net.criterion.spec(), "higher_is_confident": bool(net.criterion.higher_is_confident)},
                   segment_macs=list(net.costs.segment_macs), head_macs=list(net.costs.head_macs))
    return doc


def _add_fused(work: Path, manifest: dict, precision: str, net) -> None:
    """Fuse the graphs of ``precision`` of an exits or branched network into one (:mod:`moco.deploy.fuse`)
    and record it in ``manifest["fused"]``; its session settings start as the first graph's (the bulk of the
    work) and, with ``tune=True``, are timed for the fused graph itself (:func:`_tune_fused`)."""
    from moco.deploy.fuse import fuse_branched, fuse_exits

    items = manifest["graphs"][precision]
    stem = "exits" if manifest["kind"] == "exits" else "branched"
    name = f"{stem}.onnx" if precision == "fp32" else f"{stem}.{precision}.onnx"
    try:
        if manifest["kind"] == "exits":
            fuse_exits([work / i["file"] for i in items], work / name,
                       higher_is_confident=bool(net.criterion.higher_is_confident),
                       num_classes=int(manifest["num_classes"]))
        else:
            fuse_branched(work / items[0]["file"], work / items[1]["file"], work / name, output=manifest["output"],
                          num_classes=int(manifest["num_classes"]))
    except Exception as exc:  # noqa: BLE001 - onnx raises its own types; the separate graphs still run
        manifest.setdefault("notes", []).append(f"no fused {precision} graph ({type(exc).__name__}: {exc}); "
                                                "the graphs run one after the other")
        return
    session = {k: v for k, v in (items[0].get("session") or {}).items() if k != "micro_batch"}
    manifest.setdefault("fused", {})[precision] = {"file": name, "sha256": file_sha256(work / name),
                                                  **({"session": session} if session else {})}


def _install(work: Path, path: Path, single: bool, manifest: dict) -> None:
    """Move the checked artifact from the work folder to ``path`` (file replaced atomically; folder: graphs then manifest)."""
    if single:
        import onnx

        precision = "int8" if "int8" in manifest["graphs"] else "fp32"
        item = manifest["graphs"][precision][0]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        model = onnx.load(str(work / item["file"]))
        if item.get("session"):
            session = {k: item["session"][k] for k in ("optimization", "disabled_optimizers", "micro_batch")
                       if k in item["session"]}
            model.metadata_props.add(key="moco.session", value=json.dumps(session))
        if manifest.get("normalize"):
            model.metadata_props.add(key="moco.normalize", value=json.dumps(manifest["normalize"]))
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
        return
    if path.exists() and not path.is_dir():
        raise MocoError(f"{path} exists and is not a folder; pass a folder path (or *.onnx for a plain model)")
    path.mkdir(parents=True, exist_ok=True)
    try:  # the graphs an earlier export left here (a folder of another kind of files: none)
        previous = {i["file"] for i in _graph_items(read_manifest(path))} if (path / MANIFEST).is_file() else set()
    except MocoError:
        previous = set()
    (path / MANIFEST).unlink(missing_ok=True)  # a reader never sees a manifest naming half-copied graphs
    current = _graph_items(manifest)
    for item in current:
        tmp = path / f".{item['file']}.tmp"
        shutil.copyfile(work / item["file"], tmp)
        os.replace(tmp, path / item["file"])
    shutil.copyfile(work / MANIFEST, path / f".{MANIFEST}.tmp")
    os.replace(path / f".{MANIFEST}.tmp", path / MANIFEST)
    for name in previous - {i["file"] for i in current}:  # graphs of the earlier export the new one does not have
        (path / name).unlink(missing_ok=True)


def _graph_items(manifest: dict) -> list[dict]:
    """Every graph entry of a deploy manifest: per precision, the fused graphs and the lane graphs."""
    items = [i for group in manifest["graphs"].values() for i in group]
    return [*items, *(manifest.get("fused") or {}).values(), *(i["lanes"] for i in items if i.get("lanes"))]

