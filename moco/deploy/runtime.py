"""The deployed runtime: ONNX Runtime sessions plus numpy gather/scatter, **no torch needed**.

:func:`load` reads what :func:`moco.deploy.export` wrote and returns a runtime with the call contract
of the PyTorch object it came from:

* a plain model (a single ``.onnx`` file, or a folder whose manifest says ``"kind": "model"``):
  :class:`ModelRuntime`, ``runtime(x) -> logits`` float32 ``[B, C]``;
* a :class:`moco.rules.branched.BranchedNetwork` (folder: head graph computing the rule decision,
  tail graph): :class:`BranchedRuntime`, ``runtime(x) -> (predictions, mask)``;
* a :class:`moco.exits.EarlyExitNetwork` (folder: one graph per segment with its exit head and
  criterion score): :class:`ExitsRuntime`, ``runtime(x) -> (logits, exit_index)``.

Samples that leave early stop there; the rest go on as a smaller batch (numpy fancy indexing to
gather, assignment to scatter), as in PyTorch. Inputs are numpy arrays or torch tensors (converted
with ``.detach().cpu().numpy()`` by duck typing, without importing torch); outputs are numpy.

The folder layout: ``manifest.json`` (format ``"moco.deploy"``, version 1) lists per precision
(``"fp32"``, ``"int8"``) the graph files with their sha256, and the kind's settings (exit thresholds,
criterion direction, classes, input shape). A plain model's graph entry may carry ``"lanes"``
(file, sha256, batch): a fixed-batch graph computing the same model with its few-channel convolutions
vectorised over the images (:mod:`moco.deploy.lanes`), which the export measured faster; batches of at
least that size run through it. Everything is checked when loading: a malformed manifest,
a missing or changed graph, a NaN or absurd threshold give a :class:`moco.errors.MocoError` naming the
file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from moco.errors import MocoError
from moco.io import read_json_document

__all__ = ["BranchedRuntime", "ExitsRuntime", "ModelRuntime", "check_normalize", "load", "read_manifest", "MANIFEST",
           "FORMAT", "VERSION", "KINDS", "MICRO_BATCHES", "PRECISIONS", "SESSION_CONFIGS"]

MANIFEST = "manifest.json"
FORMAT = "moco.deploy"
VERSION = 1
KINDS = ("model", "branched", "exits")
PRECISIONS = ("fp32", "int8")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


SESSION_CONFIGS: dict[str, dict[str, Any]] = {
    "all": {"optimization": "all", "disabled_optimizers": []},
    "all-no-nchwc": {"optimization": "all", "disabled_optimizers": ["NchwcTransformer"]},
    "extended": {"optimization": "extended", "disabled_optimizers": []},
}
"""Session settings :func:`moco.deploy.export` times per graph (``tune=True``) and records in the manifest.

``"all"`` is onnxruntime's default (every graph optimisation, including the NCHWc layout transformer
that blocks channels by the vector width: a 3-channel convolution is padded to 8 on AVX2 and pays
for 8, plus the reorders in and out); ``"all-no-nchwc"`` keeps the other optimisations but leaves
convolutions in NCHW (for convolutions with few channels the plain kernels win); ``"extended"`` also
skips the layout optimisations."""

#: micro-batch sizes :func:`moco.deploy.export` times per graph (None: the whole batch in one call).
#: Measured 2026-12-02 (AVX-512 EPYC, 2 threads, batches of 1000): seed 003's pruned fashion_cnn
#: (3 and 5 channels on 26x26 / 24x24 maps) ran 8.7 ms per 1000 in one call and 6.1 ms in chunks of 256;
#: the original 32.8 and 29.2 ms.
MICRO_BATCHES: tuple[int | None, ...] = (None, 256, 64)


def _session(path: Path, threads: int, optimization: str, disabled_optimizers: Sequence[str] = (),
             profile_prefix: str | None = None):
    """An onnxruntime CPU session with these settings; ``profile_prefix``: onnxruntime's per-node
    profiling on, its JSON written under this path prefix (see :mod:`moco.deploy.opprofile`)."""
    import onnxruntime as ort

    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    if optimization not in levels:
        raise MocoError(f"optimization must be one of {', '.join(levels)}, got {optimization!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = levels[optimization]
    options.log_severity_level = 3
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    extra = {"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], **extra)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = next((t for t in str(exc).splitlines() if t.strip()), type(exc).__name__)
        raise MocoError(f"{path} is not a loadable ONNX graph ({first.strip()[:200]}); export it again "
                        "with moco.deploy.export") from None


def as_array(x: Any, input_shape: tuple[int, ...] | None, what: str = "input") -> np.ndarray:
    """``x`` (numpy array or torch tensor) as a C-contiguous float32 batch, checked.

    TypeError for a non-numeric or integer/bool input (normalise images to float first), MocoError
    for a wrong rank or per-sample shape (``input_shape``) and for NaN or inf values.
    """
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # a torch tensor, recognised without importing torch
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{what} must be a numpy array or a torch tensor batch [B, ...], not {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(f"{what} has dtype {x.dtype}; pass floating-point (float32) inputs, normalised as in training")
    if x.ndim == 0:
        raise MocoError(f"{what} is 0-d; pass a batch with a leading batch dimension")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise MocoError(f"{what} has per-sample shape {tuple(x.shape[1:])}, the deployed model expects "
                        f"{tuple(input_shape)} (batch shape [B, {', '.join(map(str, input_shape))}])")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.size and not np.isfinite(x).all():
        raise MocoError(f"{what} contains NaN or inf; clean or normalise the data first")
    return x


def check_normalize(value: Any, channels: int | None = None) -> dict[str, list[float]] | None:
    """The input standardisation a deployed model expects, as ``{"mean": [...], "std": [...]}`` (or None).

    ``value``: None, a ``(mean, std)`` pair or a ``{"mean", "std"}`` dict, each a number or one number per
    channel (``channels``: the input's channel count, checked when given); std > 0. The model's input is
    ``(x - mean[c]) / std[c]`` for images ``x`` scaled to [0, 1] (:meth:`ModelRuntime.preprocess`).
    MocoError naming the problem otherwise.
    """
    if value is None:
        return None
    if isinstance(value, dict):
        if set(value) != {"mean", "std"}:
            raise MocoError(f"normalize must have the keys 'mean' and 'std', got {sorted(value)}")
        value = (value["mean"], value["std"])
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or len(value) != 2:
        raise MocoError(f"normalize must be (mean, std), got {value!r}")
    out = {}
    for key, v in zip(("mean", "std"), value):
        items = list(v) if isinstance(v, (list, tuple)) else [v]
        ok = items and all(isinstance(i, (int, float)) and not isinstance(i, bool) and math.isfinite(i) for i in items)
        if not ok or (key == "std" and min(items) <= 0):
            raise MocoError(f"normalize {key} must be a finite number or one per channel{' (> 0)' if key == 'std' else ''}, "
                            f"got {v!r}")
        if channels is not None and len(items) not in (1, channels):
            raise MocoError(f"normalize {key} has {len(items)} values for {channels} input channels; give one or "
                            f"{channels}")
        out[key] = [float(i) for i in items]
    return out


def _require(cond: bool, manifest: Path, what: str) -> None:
    if not cond:
        raise MocoError(f"{manifest} is malformed: {what}; export the model again with moco.deploy.export")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The validated manifest of an exported folder (MocoError naming the file for anything wrong)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise MocoError(f"{folder} has no {MANIFEST}; it is not a folder written by moco.deploy.export")
    doc = read_json_document(path, format=FORMAT, version=VERSION, what="moco deploy manifest (export again with "
                             "moco.deploy.export)")
    kind = doc.get("kind")
    _require(kind in KINDS, path, f"kind {kind!r} is not one of {KINDS}")
    shape = doc.get("input_shape")
    _require(isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape),
             path, "input_shape must be a list of positive ints")
    nc = doc.get("num_classes")
    _require(isinstance(nc, int) and not isinstance(nc, bool) and nc > 0, path, "num_classes must be a positive int")
    graphs = doc.get("graphs")
    _require(isinstance(graphs, dict) and graphs and set(graphs) <= set(PRECISIONS), path,
             f"graphs must map a precision ({', '.join(PRECISIONS)}) to a list of graphs")
    n_graphs = {"model": 1, "branched": 2}.get(kind)
    for precision, items in graphs.items():
        _require(isinstance(items, list) and items, path, f"graphs[{precision!r}] must be a non-empty list")
        if n_graphs is not None:
            _require(len(items) == n_graphs, path, f"a {kind} needs {n_graphs} graph(s), graphs[{precision!r}] has {len(items)}")
        for item in items:
            _require(isinstance(item, dict) and isinstance(item.get("file"), str) and isinstance(item.get("sha256"), str),
                     path, f"every graph entry needs 'file' and 'sha256' strings, got {item!r}")
            _require(Path(item["file"]).name == item["file"], path, f"graph file {item['file']!r} must be a plain name")
            lanes = item.get("lanes")
            if lanes is not None:
                _require(kind == "model" and isinstance(lanes, dict) and isinstance(lanes.get("file"), str)
                         and isinstance(lanes.get("sha256"), str) and Path(lanes["file"]).name == lanes["file"]
                         and isinstance(lanes.get("batch"), int) and not isinstance(lanes["batch"], bool)
                         and lanes["batch"] >= 1, path,
                         f"a lanes entry needs 'file' (a plain name), 'sha256' and a positive int 'batch' (plain "
                         f"models only), got {lanes!r}")
    fused = doc.get("fused")
    if fused is not None:
        _require(kind in ("exits", "branched") and isinstance(fused, dict) and set(fused) <= set(graphs), path,
                 "fused must map a precision of graphs to the fused graph (exits and branched only)")
        for item in fused.values():
            _require(isinstance(item, dict) and isinstance(item.get("file"), str) and isinstance(item.get("sha256"), str)
                     and Path(item["file"]).name == item["file"], path,
                     f"a fused graph entry needs 'file' (a plain name) and 'sha256' strings, got {item!r}")
    try:
        doc["normalize"] = check_normalize(doc.get("normalize"), shape[0] if shape else None)
    except MocoError as exc:
        raise MocoError(f"{path} is malformed: {exc}; export the model again with moco.deploy.export") from None
    if kind == "branched":
        _require(doc.get("output") in ("onehot", "classes"), path, "output must be 'onehot' or 'classes'")
    if kind == "exits":
        thresholds = doc.get("thresholds")
        _require(isinstance(thresholds, list), path, "thresholds must be a list (one per early exit)")
        for items in graphs.values():
            _require(len(items) == len(thresholds) + 1, path,
                     f"{len(thresholds)} thresholds need {len(thresholds) + 1} segment graphs, found {len(items)}")
        crit = doc.get("criterion")
        _require(isinstance(crit, dict) and isinstance(crit.get("higher_is_confident"), bool), path,
                 "criterion must be an object with a boolean 'higher_is_confident'")
        for i, t in enumerate(thresholds):
            if t is None:
                continue
            ok = isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(float(t)) and abs(t) < 1e6
            if not ok:
                raise MocoError(f"{path}: threshold {i} is {t!r}; a threshold must be a finite number (or null "
                                "to disable the exit): the manifest was edited or damaged, calibrate and export again")
    return doc


class _Graph:
    """One ONNX Runtime session and its input/output names; ``config`` the session settings used.

    ``micro_batch``: a larger batch runs as consecutive chunks of at most this many samples (the outputs
    concatenated, so the result is the same): a model with few channels but large feature maps is bound
    by memory traffic once a batch's activations leave the cache (see :data:`MICRO_BATCHES`).
    """

    def __init__(self, path: Path, threads: int, optimization: str, disabled_optimizers: Sequence[str] = (),
                 micro_batch: int | None = None):
        self.path, self.threads = path, threads
        self.optimization, self.disabled_optimizers = optimization, list(disabled_optimizers)
        self.micro_batch = micro_batch
        self.session = _session(path, threads, optimization, disabled_optimizers)
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.lanes: _Graph | None = None  # the fixed-batch lane graph (moco.deploy.lanes), when attached
        self.lanes_batch = 0

    def attach_lanes(self, path: Path, batch: int) -> "_Graph":
        """Run batches of at least ``batch`` samples through the fixed-batch lane graph at ``path``, in chunks of
        ``batch`` (the last one zero-padded), with onnxruntime's default settings (its depthwise NCHWc
        kernels are the point); smaller batches stay on this graph."""
        self.lanes, self.lanes_batch = _Graph(path, self.threads, "all"), int(batch)
        return self

    @property
    def config(self) -> dict[str, Any]:
        """The session settings in use (as the manifest records them)."""
        return {"optimization": self.optimization, "disabled_optimizers": list(self.disabled_optimizers),
                "micro_batch": self.micro_batch, "lanes_batch": self.lanes_batch or None}

    def __call__(self, x: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
        """The outputs on batch ``x``; ``extra``: further inputs, the same for every micro-batch."""
        extra = extra or {}
        if self.lanes is not None and len(x) >= self.lanes_batch:
            # the tail is zero-padded to a full lane batch (every sample is computed on its own, so the padding
            # changes nothing else) rather than sent to the plain graph: two sessions called in turn make the
            # idle one's spin-waiting threads compete with the busy one's (prune-fashion: 0.08-0.16 s per
            # 10,000 images, bimodal, against 0.03-0.04 s with one session), worth more than <= n-1 padded rows
            n, run = self.lanes_batch, self.lanes.session.run
            parts = [run(None, {self.lanes.input: x[i:i + n], **extra}) for i in range(0, len(x) - n + 1, n)]
            rest = len(x) % n
            if rest:
                tail = np.zeros((n, *x.shape[1:]), dtype=x.dtype)
                tail[:rest] = x[len(x) - rest:]
                parts.append([o[:rest] for o in run(None, {self.lanes.input: tail, **extra})])
            return [np.concatenate(outs) for outs in zip(*parts)]
        return self._plain(x, extra)

    def _plain(self, x: np.ndarray, extra: dict[str, np.ndarray]) -> list[np.ndarray]:
        m = self.micro_batch
        if not m or len(x) <= m:
            return self.session.run(None, {self.input: x, **extra})
        parts = [self.session.run(None, {self.input: x[i:i + m], **extra}) for i in range(0, len(x), m)]
        return [np.concatenate(outs) for outs in zip(*parts)]


def _check_threads(threads: Any) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise MocoError(f"intra_op_num_threads must be an int >= 0 (0: onnxruntime's default), got {threads!r}")
    return threads


class _Runtime:
    """Shared parts: the manifest, the graphs of one precision, the input check."""

    kind = "model"

    def __init__(self, graphs: list[_Graph], manifest: dict[str, Any], precision: str, threads: int, path: Path,
                 fused: _Graph | None = None):
        self.graphs = graphs
        self.fused = fused  # branched / exits: the one-graph form (moco.deploy.fuse), run when present
        self.manifest = manifest
        self.precision = precision
        self.intra_op_num_threads = threads
        self.path = path
        shape = manifest.get("input_shape")
        self.input_shape = tuple(shape) if shape else None
        self.num_classes = manifest.get("num_classes")
        self.normalize = manifest.get("normalize")  # {"mean", "std"} the model's inputs were standardised with

    def _input(self, x: Any) -> np.ndarray:
        return as_array(x, self.input_shape)

    def preprocess(self, images: Any) -> np.ndarray:
        """``images`` as the model's input: uint8 pixels scaled to [0, 1], then ``(x - mean[c]) / std[c]``
        per channel (dimension 1) when the export recorded a ``normalize`` (moco run's ``[data] normalize``);
        float images are taken as already in [0, 1]. Returns float32 ``[B, ...]``."""
        if hasattr(images, "detach") and hasattr(images, "numpy"):
            images = images.detach().cpu().numpy()
        x = np.asarray(images)
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / 255.0
        x = as_array(x, self.input_shape, "images")
        if self.normalize:
            view = (1, -1) + (1,) * (x.ndim - 2)
            mean = np.asarray(self.normalize["mean"], dtype=np.float32).reshape(view)
            std = np.asarray(self.normalize["std"], dtype=np.float32).reshape(view)
            x = np.ascontiguousarray((x - mean) / std, dtype=np.float32)
        return x

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={str(self.path)!r}, precision={self.precision!r}, "
                f"graphs={len(self.graphs)}, intra_op_num_threads={self.intra_op_num_threads})")


class ModelRuntime(_Runtime):
    """A plain model: ``runtime(x) -> logits`` float32 ``[B, C]``."""

    kind = "model"

    def __call__(self, x: Any) -> np.ndarray:
        return self.graphs[0](self._input(x))[0]


class BranchedRuntime(_Runtime):
    """A rule-based early exit: ``runtime(x) -> (predictions, mask)`` as ``BranchedNetwork`` returns them.

    The head graph returns the head activation, the rule's exit mask (bool ``[B]``) and class (int64
    ``[B]``); only the rows where the mask is False run the tail graph. ``predictions`` are float32
    one-hot rows for exited samples and the tail's logits for the others (``output="onehot"``), or
    int64 classes (``output="classes"``). When the folder has the fused graph (:mod:`moco.deploy.fuse`:
    head, decision and tail in one session) it runs that, with the same results (``fused``).
    """

    kind = "branched"

    def __call__(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        x = self._input(x)
        if x.shape[0] == 0:  # nothing to run (a flattening Reshape cannot take an empty batch)
            empty = (np.zeros(0, dtype=np.int64) if self.manifest["output"] == "classes"
                     else np.zeros((0, self.num_classes), dtype=np.float32))
            return empty, np.zeros(0, dtype=bool)
        if self.fused is not None:
            predictions, mask = self.fused(x)
            return predictions, mask.astype(bool, copy=False)
        hidden, mask, classes = self.graphs[0](x)
        mask = mask.astype(bool, copy=False)
        b = x.shape[0]
        keep = np.flatnonzero(~mask)
        rest = None
        if keep.size:
            rest = self.graphs[1](hidden if keep.size == b else np.ascontiguousarray(hidden[keep]))[0]
        exit_rows = np.flatnonzero(mask)
        if self.manifest["output"] == "classes":
            predictions = np.empty(b, dtype=np.int64)
            predictions[exit_rows] = classes[exit_rows]
            if rest is not None:
                predictions[keep] = rest.argmax(axis=1)
            return predictions, mask
        width = rest.shape[1] if rest is not None else self.num_classes
        predictions = np.zeros((b, width), dtype=np.float32)
        predictions[exit_rows, classes[exit_rows]] = 1.0
        if rest is not None:
            predictions[keep] = rest
        return predictions, mask


class ExitsRuntime(_Runtime):
    """Learned early exits: ``runtime(x) -> (logits float32 [B, C], exit_index int64 [B])``.

    Graph ``i < K - 1`` returns the backbone activation and, when exit ``i`` is enabled, the exit's
    logits and criterion score; a sample leaves where ``score >= t`` (``higher_is_confident``) or
    ``score <= t``. ``thresholds`` may be replaced (a list of finite numbers or None, one per early
    exit; an exit exported disabled cannot be enabled).
    """

    kind = "exits"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.higher_is_confident = bool(self.manifest["criterion"]["higher_is_confident"])
        self._has_head = [len(g.outputs) == 3 for g in self.graphs[:-1]]
        self.thresholds = self.manifest["thresholds"]

    @property
    def thresholds(self) -> tuple[float | None, ...]:
        """Per early exit: the threshold, or None (disabled)."""
        return self._thresholds

    @thresholds.setter
    def thresholds(self, values) -> None:
        values = list(values)
        if len(values) != len(self.graphs) - 1:
            raise MocoError(f"thresholds needs {len(self.graphs) - 1} values (one per early exit), got {len(values)}")
        out = []
        for i, t in enumerate(values):
            if t is not None:
                if isinstance(t, bool) or not isinstance(t, (int, float, np.floating)) or not math.isfinite(float(t)):
                    raise MocoError(f"threshold {i} is {t!r}; use a finite number, or None to disable the exit")
                if not self._has_head[i]:
                    raise MocoError(f"exit {i} was exported disabled (no head in {self.graphs[i].path.name}); "
                                    "export the network again with this exit enabled")
                t = float(t)
            out.append(t)
        self._thresholds = tuple(out)

    def __call__(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        h = self._input(x)
        b = h.shape[0]
        last = len(self.graphs) - 1
        exit_index = np.full(b, last, dtype=np.int64)
        if b == 0:
            return np.zeros((0, self.num_classes), dtype=np.float32), exit_index
        if self.fused is not None:
            never = np.inf if self.higher_is_confident else -np.inf  # a disabled exit: no score reaches it
            t = np.array([never if v is None else v for v in self._thresholds] or [never], dtype=np.float32)
            logits, exit_index = self.fused(h, {"thresholds": t})
            return logits, exit_index
        return self._segments(h, b, last, exit_index)

    def _segments(self, h: np.ndarray, b: int, last: int, exit_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The multi-graph path: one session per segment, gather/scatter in numpy."""
        out = None
        idx = None  # original rows of the samples still active; None = all, in order
        for i, graph in enumerate(self.graphs):
            results = graph(h)
            if i == last:
                if out is None:
                    return results[0], exit_index
                out[idx] = results[0]
                return out, exit_index
            t = self._thresholds[i]
            h = results[0]
            if t is None:
                continue
            logits, score = results[1], results[2]
            mask = score >= t if self.higher_is_confident else score <= t
            n_exit = int(mask.sum())
            if n_exit == 0:
                continue
            if out is None:
                out = np.empty((b, logits.shape[1]), dtype=np.float32)
                idx = np.arange(b)
            if n_exit == h.shape[0]:
                out[idx] = logits
                exit_index[idx] = i
                return out, exit_index
            leave = np.flatnonzero(mask)
            stay = np.flatnonzero(~mask)
            rows = idx[leave]
            out[rows] = logits[leave]
            exit_index[rows] = i
            idx = idx[stay]
            h = np.ascontiguousarray(h[stay])
        raise AssertionError("unreachable")  # pragma: no cover


_RUNTIMES = {"model": ModelRuntime, "branched": BranchedRuntime, "exits": ExitsRuntime}


def _graph_config(item: dict, optimization: str | None, where: Path) -> tuple[str, list[str], int | None]:
    """The session settings of one graph, ``(level, disabled optimizers, micro_batch)``: ``optimization``
    when given (no micro-batching), else the manifest's tuned ones."""
    if optimization is not None:
        return optimization, [], None
    session = item.get("session") or SESSION_CONFIGS["all"]
    level, disabled = session.get("optimization"), session.get("disabled_optimizers", [])
    micro = session.get("micro_batch")
    if (level not in ("all", "extended", "basic", "none") or not isinstance(disabled, list)
            or not all(isinstance(d, str) for d in disabled)
            or not (micro is None or (isinstance(micro, int) and not isinstance(micro, bool) and micro >= 1))):
        raise MocoError(f"{where} is malformed: graph {item.get('file')!r} has session settings {session!r}; "
                        "export the model again with moco.deploy.export")
    return level, disabled, micro


def load(path: str | Path, *, precision: str | None = None, intra_op_num_threads: int = 1,
         optimization: str | None = None) -> ModelRuntime | BranchedRuntime | ExitsRuntime:
    """Load an exported model: a ``.onnx`` file (plain model) or a folder with ``manifest.json``.

    ``precision``: ``"fp32"`` or ``"int8"`` (default: int8 when the folder has it, else fp32);
    ``intra_op_num_threads``: onnxruntime's intra-op threads per session (0: its default, all cores);
    ``optimization``: onnxruntime's graph optimisation level for every graph (``"all"``, ``"extended"``,
    ``"basic"``, ``"none"``); default: the settings the export measured fastest for each graph (see
    :data:`SESSION_CONFIGS`; a single ``.onnx`` file reads them from its metadata, else ``"all"``). Every graph's sha256 is checked against the manifest. Raises MocoError for a missing
    path, a malformed manifest, a missing or changed graph, or a precision the folder lacks.
    """
    threads = _check_threads(intra_op_num_threads)
    path = Path(path)
    if path.is_file():
        if path.suffix != ".onnx":
            raise MocoError(f"{path} is neither an .onnx file nor a folder written by moco.deploy.export")
        graph = _Graph(path, threads, optimization or "all")
        tuned = graph.session.get_modelmeta().custom_metadata_map.get("moco.session")
        if optimization is None and tuned:
            try:
                level, disabled, micro = _graph_config({"session": json.loads(tuned), "file": path.name}, None, path)
            except json.JSONDecodeError:
                raise MocoError(f"{path} has malformed moco.session metadata {tuned!r}; export it again") from None
            if (level, disabled, micro) != ("all", [], None):
                graph = _Graph(path, threads, level, disabled, micro)
        shape = graph.session.get_inputs()[0].shape[1:]
        meta = graph.session.get_modelmeta().custom_metadata_map
        try:
            normalize = check_normalize(json.loads(meta["moco.normalize"])) if "moco.normalize" in meta else None
        except (json.JSONDecodeError, MocoError) as exc:
            raise MocoError(f"{path} has malformed moco.normalize metadata ({exc}); export it again") from None
        manifest = {"kind": "model", "input_shape": shape if all(isinstance(s, int) for s in shape) else None,
                    "num_classes": None, "normalize": normalize}
        return ModelRuntime([graph], manifest, precision or "unknown", threads, path)
    if not path.exists():
        raise MocoError(f"{path} does not exist; export a model there with moco.deploy.export(obj, path, example_input)")
    manifest = read_manifest(path)
    available = [p for p in PRECISIONS if p in manifest["graphs"]]
    if precision is None:
        precision = "int8" if "int8" in available else available[0]
    if precision not in available:
        raise MocoError(f"{path} has no {precision!r} graphs (it has: {', '.join(available)}); "
                        f"export with int8=<calibration inputs> for int8")
    def checked(item: dict) -> Path:
        file = path / item["file"]
        if not file.is_file():
            raise MocoError(f"graph {file} named by {path / MANIFEST} is missing; copy the whole folder or export again")
        if file_sha256(file) != item["sha256"]:
            raise MocoError(f"graph {file} does not match its sha256 in {path / MANIFEST}; it was changed or mixed up")
        return file

    def graph(item: dict) -> _Graph:
        g = _Graph(checked(item), threads, *_graph_config(item, optimization, path / MANIFEST))
        if item.get("lanes") and optimization is None:  # an explicit optimization level means: the plain graphs
            g.attach_lanes(checked(item["lanes"]), item["lanes"]["batch"])
        return g

    graphs = [graph(item) for item in manifest["graphs"][precision]]
    fused = (manifest.get("fused") or {}).get(precision)  # read_manifest allows it for branched / exits only
    return _RUNTIMES[manifest["kind"]](graphs, manifest, precision, threads, path,
                                       fused=graph(fused) if fused else None)
