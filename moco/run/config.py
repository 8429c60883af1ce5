"""``moco run`` configuration: a TOML file (stdlib ``tomllib``) validated into a :class:`RunConfig`.

Schema (unknown keys are errors that list the known ones)::

    seed = 0                          # optional, default 0
    threads = 2                       # optional: torch intra-op threads (default: torch's)
    [model]
    spec = "mynet.py:Net"             # zoo name | file.py:Name | package.module:Name  (alias: class_path)
    weights = "mynet.pt"              # state_dict, moco or Lightning checkpoint
    args = { width = 16 }             # optional constructor arguments             (alias: init_args)
    input_shape = [1, 28, 28]         # optional when the zoo or the data knows it
    [data]
    train = "fashion_mnist:train"     # dataset name | file.npz | image folder
    test = "fashion_mnist:test"
    normalize = [0.286, 0.353]        # optional: true (the dataset's own) or [mean, std]
    train_size = 20000                # optional: a seeded subset of the training data
    test_size = 5000                  # optional: a seeded subset of the test data
    root = "../data"                  # optional data root for dataset names
    [[steps]]
    method = "prune"                  # profile | prune | pfa | exits | rules | export | ...
    drop_threshold = 0.01             # any other key: that method's parameter (see moco.run.steps)

Relative paths are taken from the config file's folder first, then the working directory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from moco.errors import MocoError

__all__ = ["DataConfig", "ModelConfig", "RunConfig", "StepConfig", "config_from_dict", "load_config",
           "parse_set_options"]

_TOP_KEYS = {"seed", "threads", "model", "data", "steps", "measure"}
_MODEL_KEYS = {"spec", "class_path", "weights", "args", "init_args", "input_shape"}
_DATA_KEYS = {"train", "test", "normalize", "train_size", "test_size", "root"}
_MEASURE_KEYS = {"batch_size", "batches", "repeats", "warmup", "timing"}


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the spec, weights (path as written), constructor ``args``, ``input_shape``."""

    spec: str
    weights: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: ``train``/``test`` specs, ``normalize``, subset sizes and the data ``root``."""

    train: str
    test: str | None = None
    normalize: Any = None
    train_size: int | None = None
    test_size: int | None = None
    root: str | None = None


@dataclass(frozen=True)
class StepConfig:
    """One ``[[steps]]`` entry: ``method`` and its parameters."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MeasureConfig:
    """``[measure]``: side-by-side timing settings (``batch_size`` samples per batch, ``batches``,
    ``repeats`` timed rounds, ``warmup`` untimed ones); ``timing = false`` skips timing."""

    batch_size: int = 256
    batches: int = 2
    repeats: int = 5
    warmup: int = 1
    timing: bool = True


@dataclass(frozen=True)
class RunConfig:
    """A validated ``moco run`` configuration; ``base_dir`` is where relative paths start."""

    model: ModelConfig
    data: DataConfig
    steps: tuple[StepConfig, ...]
    seed: int = 0
    threads: int | None = None
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    base_dir: str | None = None
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The configuration as TOML-like plain data (what ``config.json`` of a run records)."""
        out: dict[str, Any] = {"seed": self.seed}
        if self.threads is not None:
            out["threads"] = self.threads
        out["model"] = {k: v for k, v in {"spec": self.model.spec, "weights": self.model.weights,
                                          "args": self.model.args,
                                          "input_shape": list(self.model.input_shape) if self.model.input_shape
                                          else None}.items() if v not in (None, {})}
        out["data"] = {k: v for k, v in vars(self.data).items() if v is not None}
        out["measure"] = dict(vars(self.measure))
        out["steps"] = [{"method": s.method, **s.params} for s in self.steps]
        return out

    def digest(self) -> str:
        """A short hash of the configuration (records which config produced a run folder)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _table(doc: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = doc.get(key)
    if value is None:
        raise MocoError(f"{where}: the [{key}] table is missing; see 'moco run --help' for the schema")
    if not isinstance(value, dict):
        raise MocoError(f"{where}: {key} must be a table ([{key}]), got {type(value).__name__}")
    return value


def _unknown(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise MocoError(f"{where}: unknown key(s) {', '.join(extra)}; known keys: {', '.join(sorted(allowed))}")


def _int_or_none(value: Any, name: str, where: str, minimum: int = 1) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MocoError(f"{where}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def config_from_dict(doc: Mapping[str, Any], *, base_dir: str | Path | None = None,
                     source: str | None = None) -> RunConfig:
    """Validate a configuration given as a dict (as ``tomllib`` reads it); returns a :class:`RunConfig`."""
    where = source or "config"
    if not isinstance(doc, Mapping):
        raise MocoError(f"{where}: a configuration is a table of keys, got {type(doc).__name__}")
    doc = copy.deepcopy(dict(doc))
    _unknown(doc, _TOP_KEYS, where)
    seed = doc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MocoError(f"{where}: seed must be an integer >= 0, got {seed!r}")
    threads = _int_or_none(doc.get("threads"), "threads", where)

    m = _table(doc, "model", where)
    _unknown(m, _MODEL_KEYS, f"{where} [model]")
    spec = m.get("spec", m.get("class_path"))
    if not isinstance(spec, str) or not spec.strip():
        raise MocoError(f"{where} [model]: spec is required, e.g. spec = \"mynet.py:Net\" or \"seed_cnn\"")
    args = m.get("args", m.get("init_args", {}))
    if not isinstance(args, dict):
        raise MocoError(f"{where} [model]: args must be a table like {{ width = 16 }}, got {args!r}")
    weights = m.get("weights")
    if weights is not None and not isinstance(weights, str):
        raise MocoError(f"{where} [model]: weights must be a file path string, got {weights!r}")
    shape = m.get("input_shape")
    if shape is not None:
        if (not isinstance(shape, list) or not shape
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape)):
            raise MocoError(f"{where} [model]: input_shape must be positive integers like [1, 28, 28], got {shape!r}")
        shape = tuple(shape)
    model = ModelConfig(spec.strip(), weights, args, shape)

    d = _table(doc, "data", where)
    _unknown(d, _DATA_KEYS, f"{where} [data]")
    for key in ("train", "test", "root"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise MocoError(f"{where} [data]: {key} must be a string (a dataset name, .npz file or folder), "
                            f"got {d[key]!r}")
    if not d.get("train"):
        raise MocoError(f"{where} [data]: train is required, e.g. train = \"fashion_mnist:train\"")
    data = DataConfig(d["train"], d.get("test"), d.get("normalize"),
                      _int_or_none(d.get("train_size"), "train_size", f"{where} [data]"),
                      _int_or_none(d.get("test_size"), "test_size", f"{where} [data]"), d.get("root"))

    ms = doc.get("measure", {})
    if not isinstance(ms, dict):
        raise MocoError(f"{where}: measure must be a table ([measure])")
    _unknown(ms, _MEASURE_KEYS, f"{where} [measure]")
    measure = MeasureConfig(
        **{k: _int_or_none(v, k, f"{where} [measure]", 0 if k == "warmup" else 1) for k, v in ms.items()
           if k != "timing"},
        **({"timing": bool(ms["timing"])} if "timing" in ms else {}))

    raw_steps = doc.get("steps", [])
    if not isinstance(raw_steps, list) or not all(isinstance(s, dict) for s in raw_steps):
        raise MocoError(f"{where}: steps must be an array of tables ([[steps]] with method = ...)")
    if not raw_steps:
        raise MocoError(f"{where}: no [[steps]]; add at least one, e.g. [[steps]] method = \"profile\"")
    from moco.run.steps import check_step, check_step_order

    steps = []
    for i, s in enumerate(raw_steps, 1):
        params = dict(s)
        method = params.pop("method", None)
        steps.append(check_step(method, params, f"{where} step {i}"))
    check_step_order(steps, where)
    return RunConfig(model, data, tuple(steps), seed, threads, measure,
                     str(Path(base_dir).resolve()) if base_dir is not None else None, source)


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a ``moco run`` TOML file; MocoError names the file and the problem."""
    path = Path(path)
    if path.is_dir():
        raise MocoError(f"config {path} is a folder; give the TOML file")
    if not path.is_file():
        raise MocoError(f"config file {path} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MocoError(f"{path} is not valid TOML: {exc}") from None
    return config_from_dict(doc, base_dir=path.parent, source=str(path))


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string


def parse_set_options(items: Sequence[str], *, flag: str = "--set") -> dict[str, Any]:
    """``["epochs=2", "layers=['conv1']", "mode=joint"]`` -> a dict; values are TOML (bare words are strings).
    ``flag`` names the option in the error for an item without ``=``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise MocoError(f"{flag} expects KEY=VALUE (a TOML value, e.g. max_drop=0.01), got {item!r}")
        out[key.strip()] = _parse_value(value.strip())
    return out
