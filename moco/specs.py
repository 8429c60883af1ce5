"""Model and data specs: one resolver for the command line and ``moco run`` config files.

A **model spec** names where the architecture comes from, plus optional constructor arguments and weights:

* a zoo name, ``"seed_cnn"`` (see ``moco.models.list_models()``);
* a Python file and a name in it, ``"path/to/mynet.py:Net"`` (relative paths are taken from the config
  file's folder, then the working directory);
* an importable name, ``"package.module:make_net"`` (or LightningCLI's dotted ``class_path``
  ``"package.module.Net"`` with ``init_args``).

The name is a class or a function; it is called with ``args`` and must return a ``torch.nn.Module``.
``weights`` is a plain ``state_dict`` file, a moco checkpoint, or a Lightning checkpoint (its
``state_dict``; a prefix such as ``model.`` that every key shares is removed when that makes the keys
fit). Files are always read with ``torch.load(..., weights_only=True)``: nothing is unpickled. A zoo
model without weights is moco's own trained copy (:func:`moco.train.pretrained`) when the data names
a dataset moco has a recipe for.

A **data spec** names labelled images:

* a dataset name, ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"`` or ``"digits"``, optionally with
  ``":train"`` or ``":test"``;
* an ``.npz`` file holding ``x`` (N, C, H, W) or (N, H, W), float or uint8, and ``y`` (N,) integers;
* an image folder with one sub-folder per class (read with Pillow; sub-folder names sorted are the
  classes).

uint8 pixels are scaled to [0, 1]; nothing else is applied unless asked: ``normalize = true`` uses the
named dataset's standard per-channel mean and std, ``normalize = [mean, std]`` (numbers or per-channel
lists) uses those. The model must see what it was trained on.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from moco.errors import MocoError

__all__ = [
    "Data",
    "absolute_spec",
    "align_classes",
    "ResolvedModel",
    "load_weights",
    "parse_data_spec",
    "resolve_data",
    "resolve_model",
]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


# ------------------------------------------------------------------------------------------- models

@dataclass(frozen=True, eq=False)
class ResolvedModel:
    """A model built from a spec: ``model`` (eval mode), ``input_shape`` (C, H, W) or None if unknown,
    ``label`` (for reports), ``spec``/``args``/``weights`` as resolved (absolute paths), ``zoo`` name or
    None, and ``normalize`` (the mean/std moco's own training used, for a pretrained zoo model)."""

    model: nn.Module
    input_shape: tuple[int, ...] | None
    label: str
    spec: str
    args: dict[str, Any]
    weights: str | None
    zoo: str | None = None
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec, JSON-safe (what a config needs to rebuild the same model)."""
        return {"spec": self.spec, "args": dict(self.args), "weights": self.weights,
                "input_shape": list(self.input_shape) if self.input_shape else None, "label": self.label,
                "zoo": self.zoo, "normalize": [list(v) for v in self.normalize] if self.normalize else None}


def _find_file(text: str, base_dir: Path | None, what: str) -> Path:
    path = Path(text).expanduser()
    candidates = [path] if path.is_absolute() else [*([base_dir / path] if base_dir else []), Path.cwd() / path]
    for cand in candidates:
        if cand.exists():
            return cand.resolve()
    where = " or ".join(dict.fromkeys(str(c.parent) for c in candidates))
    raise MocoError(f"{what} {text!r} not found (looked in {where}); give an existing path")


def absolute_spec(spec: str, base_dir: str | Path | None = None) -> str:
    """``spec`` with its model file made absolute (found as :func:`resolve_model` finds it: ``base_dir``
    first, then the working directory), so it builds from any folder; zoo and module specs, and files not
    found, are returned as they are."""
    if ":" not in spec:
        return spec
    where, name = spec.rsplit(":", 1)
    if not (where.endswith(".py") or "/" in where or "\\" in where) or Path(where).is_absolute():
        return spec
    try:
        return f"{_find_file(where, Path(base_dir) if base_dir is not None else None, 'model file')}:{name}"
    except MocoError:
        return spec


def _import_file(path: Path, spec: str) -> Any:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    mod_name = f"moco_user_{path.stem}_{digest}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise MocoError(f"model spec {spec!r}: {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    # the file's own folder first, so it can import its sibling modules
    sys.path.insert(0, str(path.parent))
    try:
        module_spec.loader.exec_module(module)
    except MocoError:
        raise
    except Exception as exc:
        del sys.modules[mod_name]
        raise MocoError(f"model spec {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from None
    finally:
        try:
            sys.path.remove(str(path.parent))
        except ValueError:
            pass
    return module


def _builder(spec: str, base_dir: Path | None) -> tuple[Any, str]:
    """The callable a spec names and a short label."""
    if ":" in spec:
        where, name = spec.rsplit(":", 1)
    elif "." in spec and not spec.endswith(".py"):
        where, name = spec.rsplit(".", 1)  # LightningCLI's class_path "pkg.mod.Class"
    else:
        from moco.models import list_models

        raise MocoError(f"model spec {spec!r} is neither a zoo model ({', '.join(list_models())}) nor "
                        "'file.py:Name' nor 'package.module:Name'")
    if not name.isidentifier():
        raise MocoError(f"model spec {spec!r}: {name!r} is not a Python name; write 'file.py:Name'")
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _import_file(_find_file(where, base_dir, f"model file of spec {spec!r}"), spec)
        label = f"{Path(where).name}:{name}"
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise MocoError(f"model spec {spec!r}: cannot import module {where!r} ({exc}); is it installed "
                            "or on PYTHONPATH? A file is written 'path/to/file.py:Name'") from None
        label = f"{where}:{name}"
    try:
        return getattr(module, name), label
    except AttributeError:
        public = [k for k, v in vars(module).items() if not k.startswith("_") and callable(v)]
        raise MocoError(f"model spec {spec!r}: {where} has no {name!r}; it defines: "
                        f"{', '.join(sorted(public)[:20]) or 'nothing callable'}") from None


def _call_builder(builder: Any, args: Mapping[str, Any], spec: str) -> nn.Module:
    if isinstance(builder, nn.Module):
        if args:
            raise MocoError(f"model spec {spec!r} names a model instance; it takes no args")
        return builder
    if not callable(builder):
        raise MocoError(f"model spec {spec!r} names a {type(builder).__name__}, not a class or function")
    try:
        inspect.signature(builder).bind(**args)
    except TypeError as exc:
        raise MocoError(f"model spec {spec!r}: the arguments {dict(args)} do not fit: {exc}") from None
    except ValueError:
        pass  # no signature (a builtin): let the call speak
    try:
        model = builder(**args)
    except MocoError:
        raise
    except Exception as exc:
        raise MocoError(f"model spec {spec!r}: building the model failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise MocoError(f"model spec {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _read_weights(path: Path) -> Any:
    from moco.io import read_torch_file

    return read_torch_file(path, what="weights")


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj.get("format") == "moco.checkpoint":
        obj = obj.get("state_dict")
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # a Lightning checkpoint
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items()):
        raise MocoError(f"{path} holds no state_dict (a dict of name -> tensor); save model.state_dict() "
                        "or a moco checkpoint")
    return obj


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state_dict, moco checkpoint or Lightning checkpoint at ``path`` into ``model`` (strictly).

    A prefix shared by every key (``model.`` of a Lightning wrapper) is removed when the keys then fit.
    Raises MocoError naming the file for an unreadable file or keys/shapes that do not fit the model.
    """
    path = Path(path)
    state = _state_dict_of(_read_weights(path), path)
    expected = set(model.state_dict())
    if set(state) != expected:
        for prefix in {k.split(".", 1)[0] + "." for k in state if "." in k}:
            stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if set(stripped) == expected:
                state = stripped
                break
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        detail = "; ".join(lines[1:3]) or lines[0]
        raise MocoError(f"weights {path} do not fit the model: {detail}") from None
    return model


def resolve_model(
    spec: str,
    *,
    weights: str | Path | None = None,
    args: Mapping[str, Any] | None = None,
    input_shape: Sequence[int] | None = None,
    dataset: str | None = None,
    base_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    require_weights: bool = True,
) -> ResolvedModel:
    """Build the model a spec names (see the module docstring); returns a :class:`ResolvedModel`.

    ``dataset`` (a dataset name) lets a zoo model without weights be moco's trained copy. ``base_dir``
    is where relative paths are looked up first (a config file's folder). ``require_weights=False``
    (counting MACs needs no training) builds an untrained model when no weights are given.
    """
    from moco.models import get_spec, list_models

    if not isinstance(spec, str) or not spec.strip():
        raise MocoError(f"model spec must be a non-empty string like 'seed_cnn' or 'mynet.py:Net', got {spec!r}")
    spec = spec.strip()
    args = dict(args or {})
    base = Path(base_dir) if base_dir is not None else None
    weights_path = _find_file(str(weights), base, "weights file") if weights is not None else None
    shape = _check_shape(input_shape) if input_shape is not None else None
    zoo, normalize, meta = None, None, {}
    if spec in list_models():
        zoo = spec
        from moco.models import create, input_shape as zoo_shape

        if weights_path is None and dataset is not None:
            from moco.data.loaders import canonical_name
            from moco.train import pretrained

            try:
                name = canonical_name(dataset)
            except MocoError:
                name = None
            if name is not None:
                model, meta = pretrained(spec, name, seed=seed, progress=progress, model_kwargs=args)
                ds = _standard_stats(name)
                normalize = ds
                label = f"{spec} (moco-trained on {name})"
            else:
                raise MocoError(f"model {spec!r} has no weights; give weights = 'file.pt' (a state_dict) or a "
                                f"dataset moco can train it on")
        elif weights_path is None and require_weights:
            raise MocoError(f"model {spec!r} has no weights; give weights = 'file.pt' (a state_dict or checkpoint)")
        else:
            try:
                model = create(spec, **args)
            except TypeError as exc:
                raise MocoError(str(exc)) from None
            label = spec
        shape = shape or zoo_shape(spec, **args)
        get_spec(spec)
    else:
        builder, label = _builder(spec, base)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = _call_builder(builder, args, spec)
        if weights_path is None and require_weights:
            raise MocoError(f"model spec {spec!r} has no weights; give weights = 'file.pt' (its state_dict): "
                            "moco compresses a trained model")
    if weights_path is not None:
        load_weights(model, weights_path)
    return ResolvedModel(model.eval(), shape, label, spec, args, str(weights_path) if weights_path else None,
                         zoo, normalize, dict(meta))


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise MocoError(f"input_shape must be integers like [1, 28, 28], got {shape!r}") from None
    if not out or any(s < 1 for s in out) or any(float(s) != float(o) for s, o in zip(shape, out)):
        raise MocoError(f"input_shape must be positive integers like [1, 28, 28], got {list(shape)!r}")
    return out


def _standard_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from moco.data.catalog import DATASETS

    if name == "digits":
        from moco.data import load_digits

        ds = load_digits(train=False)
        return tuple(ds.mean), tuple(ds.std)
    spec = DATASETS[name]
    return tuple(spec.mean), tuple(spec.std)


# --------------------------------------------------------------------------------------------- data


def align_classes(train: "Data", test: "Data") -> "Data":
    """``test`` with its labels renumbered onto ``train``'s class names, or MocoError.

    Image folders number their classes by their sorted sub-folder names, each folder on its own: a test
    folder without one class shifted every later label. Test names that are all among the train names are
    mapped by name; when one side has only indices (``"0"``, ``"1"``, ...: an ``.npz`` without ``classes``)
    the labels are taken as they are; names that differ otherwise are refused.
    """
    import dataclasses

    if train.classes == test.classes:
        return test
    if set(test.classes) <= set(train.classes):
        index = torch.tensor([train.classes.index(c) for c in test.classes], dtype=torch.int64)
        return dataclasses.replace(test, y=index[test.y], classes=train.classes)

    def indices_only(names) -> bool:
        return tuple(names) == tuple(str(i) for i in range(len(names)))

    if indices_only(train.classes) or indices_only(test.classes):
        return test
    extra = [c for c in test.classes if c not in train.classes]
    raise MocoError(f"test classes {extra[:5]} are not among the train classes {list(train.classes)[:10]}; give both "
                    "the same class names (folder names, or an .npz 'classes' array)")


@dataclass(frozen=True, eq=False)
class Data:
    """Labelled images resolved from a data spec: ``x`` float32 (N, C, H, W), ``y`` int64 (N,), the
    ``classes`` names, the ``spec`` text, ``source`` (file or folder read) and ``normalize`` applied
    (``(mean, std)`` per channel, or None)."""

    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]
    spec: str
    source: str
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    default_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample (C, H, W)."""
        return tuple(int(s) for s in self.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``: the tensors themselves (not copies)."""
        return self.x, self.y

    def subset(self, n: int | None, seed: int = 0) -> "Data":
        """At most ``n`` samples drawn without replacement (seeded); all of them when n is None or >= N."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise MocoError(f"a subset size must be >= 1, got {n}")
        idx = torch.from_numpy(np.sort(np.random.default_rng(seed).permutation(len(self))[:n]))
        return Data(self.x[idx], self.y[idx], self.classes, self.spec, self.source, self.normalize, self.default_stats)

    def normalized(self, normalize: Any) -> "Data":
        """These images standardised with ``normalize`` (True: the named dataset's mean/std, or ``[mean, std]``);
        only for data resolved without normalisation."""
        if self.normalize is not None:
            raise MocoError(f"data {self.spec!r} is already normalised; resolve it once with normalize=")
        stats = _normalize_stats(normalize, self.x.shape[1], self.default_stats, self.spec)
        if stats is None:
            return self
        return Data(_standardise(self.x, stats), self.y, self.classes, self.spec, self.source, stats, self.default_stats)

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "source": self.source, "n": len(self), "input_shape": list(self.input_shape),
                "classes": list(self.classes),
                "normalize": [list(v) for v in self.normalize] if self.normalize else None}


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """``"fashion_mnist:test"`` -> ``("fashion_mnist", "test")``; a path or a bare name -> ``(spec, None)``."""
    if not isinstance(spec, str) or not spec.strip():
        raise MocoError(f"data spec must be a non-empty string like 'mnist:train' or 'data.npz', got {spec!r}")
    spec = spec.strip()
    head, sep, tail = spec.rpartition(":")
    if sep and tail in ("train", "test") and head:
        return head, tail
    return spec, None


def _scale(x: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    if t.dtype == torch.uint8:
        return t.to(torch.float32).div_(255.0)
    if not t.is_floating_point():
        raise MocoError(f"{what}: x must be float or uint8 pixels, got {t.dtype}")
    t = t.to(torch.float32)
    if not torch.isfinite(t).all():
        raise MocoError(f"{what}: x contains NaN or inf; clean the data")
    return t


def _labels(y: Any, n: int, what: str) -> torch.Tensor:
    arr = np.asarray(y)
    if arr.ndim != 1 or len(arr) != n:
        raise MocoError(f"{what}: y must have shape ({n},) (one label per image), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise MocoError(f"{what}: y must hold integer class indices, got {arr.dtype}")
    if n and arr.min() < 0:
        raise MocoError(f"{what}: y has negative labels ({int(arr.min())}); labels are class indices 0..K-1")
    return torch.from_numpy(arr.astype(np.int64))


def _load_npz(path: Path, spec: str) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            if not {"x", "y"} <= keys:
                raise MocoError(f"data spec {spec!r}: {path} must hold arrays 'x' (N, C, H, W) and 'y' (N,); "
                                f"it holds {sorted(keys)}")
            x, y = npz["x"], npz["y"]
            classes = tuple(str(c) for c in npz["classes"]) if "classes" in keys else None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        if isinstance(exc, MocoError):
            raise
        raise MocoError(f"data spec {spec!r}: {path} is not a readable .npz ({type(exc).__name__}: {exc}); "
                        "write it with numpy.savez(path, x=..., y=...)") from None
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise MocoError(f"data spec {spec!r}: x must be (N, C, H, W) or (N, H, W), got shape {x.shape}")
    if x.shape[3] in (1, 3, 4) and x.shape[1] > 4:  # (N, 32, 32, 3): channels last, as PIL / TensorFlow store them
        raise MocoError(f"data spec {spec!r}: x has shape {x.shape}, channels last (N, H, W, C); moco takes "
                        f"(N, C, H, W): save x.transpose(0, 3, 1, 2) instead")
    if not len(x):
        raise MocoError(f"data spec {spec!r}: {path} holds no images")
    xt = _scale(x, f"data spec {spec!r}")
    yt = _labels(y, len(x), f"data spec {spec!r}")
    k = int(yt.max()) + 1
    if classes is not None and len(classes) < k:
        raise MocoError(f"data spec {spec!r}: 'classes' names {len(classes)} classes but labels reach {k - 1}")
    return xt, yt, classes or tuple(str(i) for i in range(k))


def _load_folder(path: Path, spec: str) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        raise MocoError("reading an image folder needs Pillow: pip install pillow") from None
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise MocoError(f"data spec {spec!r}: {path} has no class sub-folders; put each class's images "
                        "in its own sub-folder (path/cat/1.png, path/dog/2.png)")
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        files += [(f, label) for f in sorted((path / name).iterdir()) if f.suffix.lower() in _IMAGE_SUFFIXES]
    if not files:
        raise MocoError(f"data spec {spec!r}: no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {path}")
    images = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                images.append(im.convert("L") if im.mode in ("1", "L", "I", "I;16", "F", "P") and
                              _is_gray(im) else im.convert("RGB"))
        except OSError as exc:
            raise MocoError(f"data spec {spec!r}: cannot read image {f}: {exc}") from None
    modes = {im.mode for im in images}
    if len(modes) > 1:
        images = [im.convert("RGB") for im in images]
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise MocoError(f"data spec {spec!r}: images under {path} have different sizes {sorted(sizes)[:4]}; "
                        "resize them to one size first")
    arr = np.stack([np.asarray(im) for im in images])
    arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
    y = torch.tensor([label for _, label in files], dtype=torch.int64)
    return _scale(np.ascontiguousarray(arr), f"data spec {spec!r}"), y, tuple(classes)


def _is_gray(im) -> bool:
    return im.mode != "P" or im.convert("RGB").split()[0].tobytes() == im.convert("L").tobytes()


def _normalize_stats(normalize: Any, channels: int, default: tuple | None, spec: str):
    if normalize is None or normalize is False:
        return None
    if normalize is True:
        if default is None:
            raise MocoError(f"data spec {spec!r}: normalize = true needs a named dataset; give "
                            "normalize = [mean, std] for your own data")
        return default
    if not isinstance(normalize, (list, tuple)) or len(normalize) != 2:
        raise MocoError(f"normalize must be true, false or [mean, std], got {normalize!r}")
    stats = []
    for part in normalize:
        vals = [part] * channels if isinstance(part, (int, float)) else list(part)
        try:
            vals = [float(v) for v in vals]
        except (TypeError, ValueError):
            raise MocoError(f"normalize must be [mean, std] of numbers, got {normalize!r}") from None
        if len(vals) == 1:
            vals = vals * channels
        if len(vals) != channels:
            raise MocoError(f"normalize gives {len(vals)} values but the images have {channels} channels")
        stats.append(tuple(vals))
    if any(not s > 0 for s in stats[1]):
        raise MocoError(f"normalize std values must be > 0, got {list(stats[1])}")
    return stats[0], stats[1]


def resolve_data(
    spec: str,
    *,
    split: str | None = None,
    normalize: Any = None,
    root: str | Path | None = None,
    base_dir: str | Path | None = None,
) -> Data:
    """Load the labelled images a data spec names (see the module docstring); returns :class:`Data`.

    ``split`` (``"train"``/``"test"``) is the default for a dataset name without ``:train``/``:test``.
    ``normalize``: None/False (pixels in [0, 1] only), True (the named dataset's mean/std) or
    ``[mean, std]``. ``root`` is the data root for named datasets.
    """
    from moco.data.loaders import DATASET_NAMES, canonical_name, load_dataset

    name, part = parse_data_spec(spec)
    base = Path(base_dir) if base_dir is not None else None
    key = None
    try:
        key = canonical_name(name)
    except MocoError:
        pass
    if key is not None:
        part = part or split or "train"
        ds = load_dataset(key, root, train=part == "train", normalize=False)
        x, y = ds.tensors(normalize=False)
        classes, source, default = ds.classes, ds.source, (tuple(ds.mean), tuple(ds.std))
        label = f"{key}:{part}"
    else:
        if part is not None:
            name = spec  # a path that happens to end in ':train' is still a path
        looks_like_path = name.endswith(".npz") or "/" in name or "\\" in name or Path(name).exists()
        if not looks_like_path:
            raise MocoError(f"data spec {spec!r} is not a dataset ({', '.join(DATASET_NAMES)}, with :train or "
                            ":test), an .npz file or an image folder")
        path = _find_file(name, base, f"data of spec {spec!r}")
        if path.is_dir():
            x, y, classes = _load_folder(path, spec)
        elif path.suffix == ".npz":
            x, y, classes = _load_npz(path, spec)
        else:
            raise MocoError(f"data spec {spec!r}: {path} is neither an .npz file nor an image folder")
        source, default, label = str(path), None, spec
    stats = _normalize_stats(normalize, x.shape[1], default, spec)
    if stats is not None:
        x = _standardise(x, stats)
    return Data(x.contiguous(), y, tuple(classes), label, source, stats, default)


def _standardise(x: torch.Tensor, stats) -> torch.Tensor:
    mean = torch.tensor(stats[0]).view(1, -1, 1, 1)
    std = torch.tensor(stats[1]).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()
