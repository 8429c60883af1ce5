"""Capture a model's internal activations over a dataset, streamed batch by batch.

Two entry points:

* :func:`build_embeddings_and_predictions` (seed 000's name; the alias
  ``build_embeddings_from_predictions`` keeps the seed's import line working): the activation after
  one split point (``split_at`` semantics) *and* the model's outputs, in one forward pass per batch
  (head, store, tail on the head's output).
* :func:`capture`: the outputs of several named modules in one pass, via global forward hooks that
  are filtered by module identity and removed afterwards.

Both run the model in eval mode under ``torch.inference_mode()`` and restore every module's
``training`` flag afterwards; nothing else on the model changes (no hooks, no attributes). Results are
float32 NumPy arrays ``[N, ...]`` with N the number of samples, in data order.

Memory
------
In memory, the result array is allocated once (N is known up front) and filled batch by batch. With
``out=`` / ``out_dir=`` the arrays go to ``.npy`` files instead: each batch is written to a temporary
``.npy`` file beside the target (``numpy.lib.format`` header, then the rows in order through the page
cache), the file is synced and renamed onto the target when the pass completes, and the result is
returned as a read-only ``np.memmap`` (``np.load(path, mmap_mode="r")``). The process holds only
one batch at a time, so peak memory is independent of N; an interrupted pass leaves no file at the
target path. Writing through ``write()`` rather than through a writable memmap keeps the written
pages out of the process's resident set.

Sample count
------------
``out=`` needs N before the first row is written: it is taken from the data (tensor length,
``len(dataset)``, or for a DataLoader its sampler's length with ``drop_last`` applied). Data of
unknown length (an ``IterableDataset``) is refused for ``out=`` with a clear error and collected
batch by batch (then concatenated) for in-memory results. Data that yields a different number of
samples than announced raises MocoError.

NaN in the *inputs* raises MocoError (it would silently poison every statistic downstream); NaN or
inf in the captured activations or outputs (e.g. from inf inputs or overflow) is not an error: the
pass completes and a ``RuntimeWarning`` reports how many samples are affected.

Global hooks (``capture``) see every module call in the process: don't run the same model in
another thread while capturing.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader
from tqdm.auto import tqdm

from moco.batches import iter_batches, num_samples
from moco.errors import MocoError
from moco.io import atomic_path
from moco.progress import show_progress
from moco.split import split_at

__all__ = [
    "Flatten",
    "SpatialPool",
    "build_embeddings_and_predictions",
    "build_embeddings_from_predictions",
    "capture",
    "iter_layer_outputs",
]

Processor = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Flatten:
    """Processor: flatten every sample, ``[B, d1, d2, ...] -> [B, d1 * d2 * ...]``."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` as ``[B, -1]`` (a view when possible)."""
        if x.dim() < 1:
            raise MocoError(f"Flatten needs a batch dimension; got a tensor of shape {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1)


@dataclass(frozen=True)
class SpatialPool:
    """Processor: pool feature maps over space, ``[B, C, H, W] -> [B, C]`` (``kind`` "max" or "avg").

    A 2-D ``[B, C]`` input (already pooled, or a linear layer's output) passes through unchanged;
    any other rank raises MocoError.
    """

    kind: str = "max"

    def __post_init__(self) -> None:
        if self.kind not in ("max", "avg"):
            raise MocoError(f"SpatialPool kind must be 'max' or 'avg', got {self.kind!r}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Return the per-channel max or mean over H and W of a ``[B, C, H, W]`` batch."""
        if x.dim() == 2:
            return x
        if x.dim() != 4:
            raise MocoError(
                f"SpatialPool expects [B, C, H, W] or [B, C] activations, got shape {tuple(x.shape)}; "
                f"use Flatten() or no processor for this layer"
            )
        return x.amax(dim=(2, 3)) if self.kind == "max" else x.mean(dim=(2, 3))


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _expected_samples(data: Any) -> int | None:
    """Samples ``data`` will yield, or None when its length is unknown."""
    if isinstance(data, DataLoader):
        try:
            if data.batch_size is None:  # automatic batching disabled: one sample per item
                return len(data.sampler)  # type: ignore[arg-type]
            batch_sampler = data.batch_sampler
            if type(batch_sampler) is BatchSampler:
                n = len(batch_sampler.sampler)  # type: ignore[arg-type]
                return n - n % batch_sampler.batch_size if batch_sampler.drop_last else n
            return None  # a custom batch sampler: unknown batch sizes
        except TypeError:
            return None
    try:
        return num_samples(data)
    except TypeError:
        return None


class _Sink:
    """Collects ``[B, ...]`` batches into one float32 array ``[N, ...]``, in memory or in a ``.npy`` file.

    The row shape comes from the first batch. In memory with known N the array is allocated once;
    with unknown N the batches are kept and concatenated at the end. With a file, the ``.npy``
    header is written on the first batch and each batch is appended (the caller owns the atomic
    rename).
    """

    def __init__(self, label: str, expected: int | None, path: Path | None):
        self.label = label
        self.expected = expected
        self.path = path
        self.count = 0
        self.nonfinite_rows = 0
        self.row_shape: tuple[int, ...] | None = None
        self._array: np.ndarray | None = None
        self._parts: list[np.ndarray] = []
        self._file: Any = None
        if path is not None and expected is None:
            raise MocoError(
                "writing to a .npy file needs the number of samples up front, but the data has no length "
                "(an IterableDataset?); pass a tensor, a Dataset with __len__ or a DataLoader over one, "
                "or capture in memory"
            )

    def write(self, batch: torch.Tensor) -> None:
        if not isinstance(batch, torch.Tensor):
            raise MocoError(f"{self.label} is a {type(batch).__name__}, not a tensor; capture a module that returns one")
        rows = batch.detach().to(device="cpu", dtype=torch.float32).numpy()
        if rows.ndim < 1:
            raise MocoError(f"{self.label} has no batch dimension (shape {tuple(rows.shape)})")
        if self.row_shape is None:
            self.row_shape = tuple(rows.shape[1:])
            self._open()
        elif tuple(rows.shape[1:]) != self.row_shape:
            raise MocoError(
                f"{self.label} changed shape between batches: {self.row_shape} then {tuple(rows.shape[1:])} "
                f"per sample; use inputs of one size"
            )
        b = rows.shape[0]
        if not np.isfinite(rows).all():
            self.nonfinite_rows += int((~np.isfinite(rows.reshape(b, -1))).any(axis=1).sum())
        if self.expected is not None and self.count + b > self.expected:
            raise MocoError(
                f"the data yielded more than the {self.expected} samples it announced; "
                f"its length must match what it yields"
            )
        if self._file is not None:
            self._file.write(memoryview(np.ascontiguousarray(rows)).cast("B"))
            self._file.flush()
        elif self._array is not None:
            self._array[self.count : self.count + b] = rows
        else:
            self._parts.append(rows.copy())
        self.count += b

    def _open(self) -> None:
        assert self.row_shape is not None
        shape = (self.expected, *self.row_shape) if self.expected is not None else None
        if self.path is not None:
            self._file = open(self.path, "wb")  # noqa: SIM115  (closed in finish/close)
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(self._file, header)
        elif shape is not None:
            self._array = np.empty(shape, dtype=np.float32)

    def finish(self) -> np.ndarray | None:
        """Check the count; return the in-memory array (None for a file, which is complete and closed)."""
        if self.row_shape is None:
            raise MocoError("the data yielded no samples; nothing to capture")
        if self.expected is not None and self.count != self.expected:
            raise MocoError(
                f"the data yielded {self.count} samples but announced {self.expected}; "
                f"its length must match what it yields"
            )
        if self.nonfinite_rows:
            warnings.warn(
                f"{self.nonfinite_rows} of {self.count} samples have NaN or inf in {self.label}",
                RuntimeWarning,
                stacklevel=3,
            )
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self.close()
            return None
        if self._array is not None:
            return self._array
        return np.concatenate(self._parts, axis=0)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block; every module's ``training`` flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _device_of(model: nn.Module) -> torch.device | None:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return None


def _checked_input(x: torch.Tensor, start: int, device: torch.device | None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise MocoError(f"a batch of inputs is a {type(x).__name__}, not a tensor")
    if x.is_floating_point() or x.is_complex():
        if torch.isnan(x).any():
            raise MocoError(
                f"the inputs of the batch starting at sample {start} contain NaN; clean or impute the data first"
            )
    return x.to(device) if device is not None and x.device != device else x


def _run(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, shape: tuple[int, ...]) -> Any:
    """Call a model part; its failure becomes a MocoError naming the input shape."""
    try:
        return fn(x)
    except MocoError:
        raise
    except Exception as err:
        raise MocoError(
            f"the model could not run on input shape {shape}: {type(err).__name__}: {_last_line(err)}"
        ) from err


def _progress(total: int | None, progress: bool, desc: str) -> Any:
    return tqdm(total=total, unit="sample", desc=desc, disable=not show_progress(progress), leave=False)


def build_embeddings_and_predictions(
    model: nn.Module,
    data: Any,
    layer: int | str,
    *,
    batch_size: int = 1000,
    processor: Processor | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Activations after ``layer`` and the model's outputs for every sample of ``data``, in one pass.

    Each batch runs the head of ``split_at(model, layer)``, stores its output (after ``processor``)
    and runs the tail on that same output: no work is repeated, and the predictions equal
    ``model(x)``.

    Args:
        model: the classifier; run in eval mode under ``torch.inference_mode()``, flags restored.
        data: a tensor ``[N, ...]``, an ``(x, y)`` pair, a Dataset or a DataLoader (its batch size wins).
        layer: split point, as in :func:`moco.split.split_at`: an int index into an ``nn.Sequential``
            (seed 000: ``2``, conv1 + ReLU, ``[N, 32, 26, 26]``) or a qualified module name.
        batch_size: samples per forward pass for tensors and Datasets.
        processor: optional callable on each activation batch ``[B, ...] -> [B, ...]``, e.g.
            :class:`Flatten` or :class:`SpatialPool`, applied while streaming.
        out: optional ``.npy`` path: embeddings are streamed there (atomically) instead of kept in
            memory and returned as a read-only ``np.memmap``.
        progress: show a tqdm bar over samples.

    Returns:
        ``(embeddings, predictions)``: float32 arrays ``[N, ...]`` (the activation shape after
        ``processor``) and ``[N, classes]`` (the model's raw outputs, e.g. logits).

    Raises:
        MocoError: bad split point, NaN in the inputs, a batch the model rejects (the message gives
            the input shape and the original error), data whose length is unknown with ``out=``, or
            that yields a different number of samples than its length.
    """
    if out is not None:
        _check_out_path(out)
    example = None
    if isinstance(layer, int) and not isinstance(layer, bool):  # a wrapper's Sequential child: check on batch 1
        example = next(iter(iter_batches(data, batch_size)), (None, None))[0]
    split = split_at(model, layer, example_input=example)
    expected = _expected_samples(data)
    with contextlib.ExitStack() as stack:
        target = stack.enter_context(atomic_path(out)) if out is not None else None
        emb_sink = _Sink(f"the output of layer {split.point!r}", expected, target)
        stack.callback(emb_sink.close)
        pred_sink = _Sink("the model output", expected, None)
        stack.enter_context(_eval_mode(model))
        stack.enter_context(torch.inference_mode())
        bar = stack.enter_context(_progress(expected, progress, f"capture {split.point}"))
        device = _device_of(model)
        start = 0
        for x, _ in iter_batches(data, batch_size):
            x = _checked_input(x, start, device)
            shape = tuple(x.shape)
            hidden = _run(split.head, x, shape)
            if not isinstance(hidden, torch.Tensor):
                raise MocoError(f"the head up to {split.point!r} returned a {type(hidden).__name__}, not a tensor")
            emb = processor(hidden) if processor is not None else hidden
            _check_processed(emb, hidden, processor)
            emb_sink.write(emb)
            del emb
            pred_sink.write(_run(split.tail, hidden, shape))
            del hidden, x
            start += shape[0]
            bar.update(shape[0])
        embeddings = emb_sink.finish()
        predictions = pred_sink.finish()
    assert predictions is not None
    if out is not None:
        return np.load(Path(out), mmap_mode="r"), predictions
    assert embeddings is not None
    return embeddings, predictions


build_embeddings_from_predictions = build_embeddings_and_predictions
"""Alias with the name in seed 000's import line."""


def _check_out_path(out: str | os.PathLike) -> None:
    """Fail before the capture, not after it, for an ``out=`` that cannot become the .npy file."""
    path = Path(out)
    if path.is_dir():
        raise MocoError(f"out={str(out)!r} is a folder; give a file name such as {str(path / 'layer.npy')!r}")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise MocoError(f"out={str(out)!r}: {parent} is a file, not a folder")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise MocoError(f"out={str(out)!r}: the folder {parent} is not writable")


def _check_processed(processed: Any, raw: torch.Tensor, processor: Processor | None) -> None:
    if processor is None:
        return
    if not isinstance(processed, torch.Tensor):
        raise MocoError(f"processor {processor!r} returned a {type(processed).__name__}, not a tensor")
    if processed.dim() < 1 or processed.shape[0] != raw.shape[0]:
        raise MocoError(
            f"processor {processor!r} turned a batch of shape {tuple(raw.shape)} into {tuple(processed.shape)}; "
            f"it must keep the batch dimension first"
        )


def _resolve_layers(model: nn.Module, layers: str | list[str] | tuple[str, ...]) -> dict[str, nn.Module]:
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise MocoError("layers is empty; name at least one module to capture")
    modules = dict(model.named_modules())
    resolved: dict[str, nn.Module] = {}
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"layer names must be str, not {type(name).__name__}")
        if name == "" or name not in modules:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
            valid = close or [n for n in modules if n][:6]
            raise MocoError(
                f"{type(model).__name__} has no module named {name!r}; valid names include {valid} "
                f"(see model.named_modules())"
            )
        resolved.setdefault(name, modules[name])
    by_module: dict[int, str] = {}
    for name, module in resolved.items():
        if id(module) in by_module:
            raise MocoError(f"{name!r} and {by_module[id(module)]!r} are the same module; capture it once")
        by_module[id(module)] = name
    return resolved


def iter_layer_outputs(
    model: nn.Module,
    data: Any,
    layers: str | list[str] | tuple[str, ...],
    *,
    batch_size: int = 1000,
    processor: Processor | None = None,
    progress: bool = True,
    desc: str = "capture",
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``{name: output [B, ...]}`` of the named modules for each batch of ``data`` (one forward pass each).

    The streaming core of :func:`capture` (and of PFA's introspection): the model runs in eval mode under
    ``torch.inference_mode()`` with every module's ``training`` flag restored afterwards, a global forward
    hook filtered by module identity records the outputs (``processor`` applied, e.g. ``SpatialPool``) and
    is removed when the iteration ends or is abandoned. Only one batch of outputs is alive at a time.

    Raises MocoError for unknown layer names, a module that runs more than once or not at all per forward
    pass, a module that does not return a tensor, a processor that drops the batch dimension, NaN inputs
    and batches the model rejects.
    """
    targets = _resolve_layers(model, layers)
    by_module = {id(module): name for name, module in targets.items()}
    batch_outputs: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        name = by_module.get(id(module))
        if name is None:
            return
        if name in batch_outputs:
            raise MocoError(f"module {name!r} runs more than once per forward pass; capture a module that runs once")
        if not isinstance(output, torch.Tensor):
            raise MocoError(f"module {name!r} returns a {type(output).__name__}, not a tensor; capture one that does")
        processed = processor(output) if processor is not None else output
        _check_processed(processed, output, processor)
        batch_outputs[name] = processed

    with contextlib.ExitStack() as stack:
        stack.enter_context(_eval_mode(model))
        stack.enter_context(torch.inference_mode())
        bar = stack.enter_context(_progress(_expected_samples(data), progress, desc))
        handle = torch.nn.modules.module.register_module_forward_hook(hook)
        stack.callback(handle.remove)
        device = _device_of(model)
        start = 0
        for x, _ in iter_batches(data, batch_size):
            x = _checked_input(x, start, device)
            batch_outputs.clear()
            _run(model, x, tuple(x.shape))
            missing = [name for name in targets if name not in batch_outputs]
            if missing:
                raise MocoError(f"modules {missing} did not run during the forward pass; capture modules that run")
            outputs = dict(batch_outputs)
            batch_outputs.clear()
            start += x.shape[0]
            bar.update(x.shape[0])
            del x
            yield outputs


def capture(
    model: nn.Module,
    data: Any,
    layers: str | list[str] | tuple[str, ...],
    *,
    batch_size: int = 1000,
    processor: Processor | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Outputs of several named modules for every sample of ``data``, in one forward pass per batch.

    A global forward hook (``torch.nn.modules.module.register_module_forward_hook``) records the
    output of each requested module, identified by object identity; it is removed when the pass
    ends, so nothing is registered on ``model`` itself.

    Args:
        model: the network; run in eval mode under ``torch.inference_mode()``, flags restored.
        data: a tensor ``[N, ...]``, an ``(x, y)`` pair, a Dataset or a DataLoader.
        layers: qualified module names (as in ``model.named_modules()``), e.g.
            ``["layer1", "layer2"]``; a single str is one layer. Each must run exactly once per
            forward pass and return a tensor.
        batch_size: samples per forward pass for tensors and Datasets.
        processor: optional callable applied to every captured batch ``[B, ...] -> [B, ...]``
            (e.g. ``SpatialPool("avg")`` turns ``[B, C, H, W]`` into ``[B, C]``).
        out_dir: optional folder: layer ``name`` streams to ``out_dir/<name>.npy`` (atomically) and
            is returned as a read-only ``np.memmap``.
        progress: show a tqdm bar over samples.

    Returns:
        ``{name: float32 array [N, ...]}`` in the order of ``layers``.

    Raises:
        MocoError: unknown layer names (a few valid ones are listed), a module that runs more than
            once or not at all per forward pass, NaN in the inputs, a batch the model rejects, data
            of unknown length with ``out_dir``.
    """
    targets = _resolve_layers(model, layers)
    expected = _expected_samples(data)
    with contextlib.ExitStack() as stack:
        paths: dict[str, Path | None] = {name: None for name in targets}
        if out_dir is not None:
            folder = Path(out_dir)
            for name in targets:
                paths[name] = stack.enter_context(atomic_path(folder / f"{name}.npy"))
        sinks = {name: _Sink(f"the output of {name!r}", expected, paths[name]) for name in targets}
        for sink in sinks.values():
            stack.callback(sink.close)
        # closing(): the hook goes away at once even when a write fails mid-stream
        batches = stack.enter_context(contextlib.closing(iter_layer_outputs(
            model, data, list(targets), batch_size=batch_size, processor=processor, progress=progress, desc="capture")))
        for outputs in batches:
            for name, sink in sinks.items():
                sink.write(outputs[name])
        results = {name: sink.finish() for name, sink in sinks.items()}
    if out_dir is not None:
        return {name: np.load(Path(out_dir) / f"{name}.npy", mmap_mode="r") for name in targets}
    return {name: array for name, array in results.items() if array is not None}
