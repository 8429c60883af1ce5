"""Sweep files: a TOML file (stdlib ``tomllib``) validated completely into a :class:`SweepConfig` before any work.

Two kinds of sweep. **Training** (seed 003's workflow: train a model per point, compare)::

    name = "fashion-arch"              # required: names the study and the default output folder
    seed = 0                           # trial seed = seed + grid point index (grid) or + trial number
    [model]
    spec = "fashion_cnn"               # zoo name | file.py:Name | package.module:Name (as in moco run)
    args = { init = "xavier" }         # fixed constructor arguments
    [data]                             # as in moco run: train, test, normalize, train_size, test_size, root
    train = "fashion_mnist:train"      # seed = the subsets' seed (default: the sweep's seed; every trial the same)
    [train]                            # fixed training settings (moco.train.fit)
    epochs = 50                        # the maximum
    target_train_accuracy = 0.9        # stop at the first epoch whose running train accuracy reaches it
    batch_size = 256
    lr = 0.01
    optimizer = "sgd"                  # sgd | adam
    momentum = 0.9
    [search]
    sampler = "grid"                   # grid (every point once) | tpe | nsga2 | random
    n_trials = 40                      # tpe / nsga2 / random only
    pruner = "none"                    # median | none (one per-epoch objective only)
    objectives = ["test_accuracy"]     # or ["test_accuracy", "macs"]; directions = [...] to override
    label = "Params1"                  # the best is printed as Params1(3, 3, 8, 32, 50)
    [search.params]
    "model.c1_kernel" = [3, 5]                       # a list: the grid / a categorical choice
    "train.lr" = { low = 1e-4, high = 1e-2, log = true }   # a range (tpe / nsga2 / random)
    [quick]                            # overrides applied with --quick, same layout
    data = { train_size = 2000, test_size = 500 }
    train = { epochs = 2 }

**Pipeline** (compression as a search space): ``[pipeline] config = "chain.toml"`` names a ``moco run``
config; the parameters address its values (``"steps.1.drop_threshold"``, ``"steps.2.energy_threshold"``,
``"data.train_size"``, ``"model.args.width"``; steps are numbered from 1 as in ``moco run --set``) and
``[pipeline] set = {...}`` fixes others; ``[model]``, ``[data]`` and ``[train]`` come from that config.

Unknown keys, an unknown model, an empty grid, parameter names that address nothing and bad
distributions are :class:`~moco.errors.MocoError` naming the key and the fix.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import itertools
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from moco.errors import MocoError
from moco.run.config import _unknown  # the same one-line "unknown key(s) ...; known keys" error as moco run

__all__ = [
    "OBJECTIVES", "PIPELINE_OBJECTIVES", "SAMPLERS", "TRAIN_DEFAULTS", "ParamSpec", "SweepConfig",
    "dumps_toml", "load_sweep", "sweep_from_dict",
]

SAMPLERS = ("grid", "tpe", "nsga2", "random")
PRUNERS = ("none", "median")

#: training-sweep objectives -> default direction
OBJECTIVES = {
    "test_accuracy": "maximize", "test_loss": "minimize", "train_accuracy": "maximize", "train_loss": "minimize",
    "train_seconds": "minimize", "epochs": "minimize", "macs": "minimize", "params": "minimize",
    "latency_ms": "minimize",
}
#: pipeline-sweep objectives (the final step's measurement) -> default direction
PIPELINE_OBJECTIVES = {
    "test_accuracy": "maximize", "agreement": "maximize", "macs": "minimize", "params": "minimize",
    "macs_reduction": "maximize", "ratio_vs_eager": "minimize", "ratio_vs_onnxruntime": "minimize",
}
#: objectives measured after every epoch (what a pruner can judge): objective -> key in the epoch record
PER_EPOCH = {"test_accuracy": "test_accuracy", "test_loss": "test_loss", "train_accuracy": "train_accuracy",
             "train_loss": "loss"}

#: ``[train]`` keys and defaults (the arguments of :func:`moco.train.fit` a sweep sets)
TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 10, "target_train_accuracy": None, "batch_size": 128, "lr": 1e-3, "optimizer": "adam",
    "momentum": 0.9, "weight_decay": 0.0, "schedule": "constant",
}
_TRAIN_CHOICES = {"optimizer": ("adam", "sgd"), "schedule": ("constant", "cosine")}

_TOP_KEYS = {"name", "description", "seed", "model", "data", "train", "search", "measure", "track", "quick",
             "pipeline"}
_MODEL_KEYS = {"spec", "class_path", "args", "init_args", "input_shape"}
_DATA_KEYS = {"train", "test", "normalize", "train_size", "test_size", "root", "seed"}
_SEARCH_KEYS = {"sampler", "n_trials", "pruner", "pruner_startup_trials", "pruner_warmup_epochs", "objectives",
                "directions", "label", "population_size", "params"}
_MEASURE_KEYS = {"latency", "latency_repeats"}
_TRACK_KEYS = {"experiment", "tracking_uri"}
_PIPELINE_KEYS = {"config", "set"}
_QUICK_KEYS = {"data", "train", "search", "measure", "pipeline", "model"}
_DIST_KEYS = {"low", "high", "log", "step", "type", "choices"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


# ------------------------------------------------------------------------------------------- params

@dataclass(frozen=True)
class ParamSpec:
    """One swept parameter: its sweep-file ``name`` (``"model.c1_kernel"``), ``kind`` (``"categorical"``,
    ``"int"`` or ``"float"``), the ``choices`` of a categorical one, or ``low``/``high``/``log``/``step``."""

    name: str
    kind: str
    choices: tuple[Any, ...] = ()
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None

    def distribution(self):
        """The Optuna distribution of this parameter."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "categorical":
            return CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(float(self.low), float(self.high), log=self.log,
                                 step=float(self.step) if self.step is not None else None)

    def representative(self) -> Any:
        """A value of the space (the first choice, or ``low``): what validation builds once."""
        return self.choices[0] if self.kind == "categorical" else self.low

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"choices": list(self.choices)}
        d = {"low": self.low, "high": self.high, "log": self.log, "type": self.kind}
        if self.step is not None:
            d["step"] = self.step
        return d


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _parse_param(name: str, spec: Any, where: str) -> ParamSpec:
    key = f"{where} [search.params] {name!r}"
    if isinstance(spec, list):
        choices = spec
    elif isinstance(spec, dict):
        unknown = sorted(set(spec) - _DIST_KEYS)
        if unknown:
            raise MocoError(f"{key}: unknown key(s) {', '.join(unknown)}; a range is {{ low = ..., high = ..., "
                            "log = false, step = ... }} and a choice {{ choices = [...] }}")
        if "choices" in spec:
            if set(spec) - {"choices"}:
                raise MocoError(f"{key}: give either choices = [...] or low/high, not both")
            choices = spec["choices"]
            if not isinstance(choices, list):
                raise MocoError(f"{key}: choices must be a list of values, got {choices!r}")
        else:
            return _parse_range(name, spec, key)
    else:
        raise MocoError(f"{key} must be a list of values ([3, 5]) or a range ({{ low = 1e-4, high = 1e-2, log = true }}), "
                        f"got {spec!r}")
    if not choices:
        raise MocoError(f"{key} is an empty list: the grid would be empty; give at least one value")
    bad = [c for c in choices if not _scalar(c)]
    if bad:
        raise MocoError(f"{key}: values must be numbers, strings or booleans (Optuna stores them), got {bad[0]!r}")
    seen = []
    for c in choices:
        if any(type(c) is type(s) and c == s for s in seen):
            raise MocoError(f"{key}: the value {c!r} is listed twice; list each value once")
        seen.append(c)
    return ParamSpec(name, "categorical", tuple(choices))


def _parse_range(name: str, spec: dict, key: str) -> ParamSpec:
    if "low" not in spec or "high" not in spec:
        raise MocoError(f"{key}: a range needs low and high, e.g. {{ low = 1e-4, high = 1e-2, log = true }}")
    low, high = spec["low"], spec["high"]
    for what, v in (("low", low), ("high", high)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise MocoError(f"{key}: {what} must be a finite number, got {v!r}")
    kind = spec.get("type")
    if kind is None:
        kind = "int" if isinstance(low, int) and isinstance(high, int) and isinstance(spec.get("step", 1), int) else "float"
    if kind not in ("int", "float"):
        raise MocoError(f"{key}: type must be 'int' or 'float', got {kind!r}")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise MocoError(f"{key}: an int range needs integer low and high, got {low!r} and {high!r}")
    if not low < high:
        raise MocoError(f"{key}: low ({low}) must be below high ({high}); a single value is a list [{low}]")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise MocoError(f"{key}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise MocoError(f"{key}: a log range needs low > 0, got low = {low}")
    step = spec.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0:
            raise MocoError(f"{key}: step must be a number > 0, got {step!r}")
        if log:
            raise MocoError(f"{key}: Optuna cannot combine log = true with a step; drop one of them")
        if kind == "int" and not float(step).is_integer():
            raise MocoError(f"{key}: an int range needs an integer step, got {step!r}")
    if kind == "int":
        low, high = int(low), int(high)
        step = int(step) if step is not None else None
    else:
        low, high = float(low), float(high)
        step = float(step) if step is not None else None
    return ParamSpec(name, kind, (), low, high, log, step)


# ------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep file (see the module docstring). ``doc`` is the effective file (after ``--quick``
    and overrides: what ``OUT/sweep.toml`` holds); ``base_dir`` is where relative paths start."""

    name: str
    seed: int
    mode: str                                    # "train" or "pipeline"
    sampler: str
    n_trials: int | None
    pruner: str
    pruner_startup_trials: int
    pruner_warmup_epochs: int
    objectives: tuple[str, ...]
    directions: tuple[str, ...]
    params: tuple[ParamSpec, ...]
    label: str
    population_size: int | None
    model: dict[str, Any] = field(default_factory=dict)      # {"spec", "args", "input_shape"}
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    measure: dict[str, Any] = field(default_factory=dict)
    track: dict[str, Any] = field(default_factory=dict)
    pipeline: dict[str, Any] | None = None                   # {"config": path, "set": {...}, "doc": {...}}
    quick: bool = False
    doc: dict[str, Any] = field(default_factory=dict)
    base_dir: str | None = None
    source: str | None = None

    # ------------------------------------------------------------------ the space

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def distributions(self) -> dict[str, Any]:
        """Parameter name -> Optuna distribution (what every trial asks for)."""
        return {p.name: p.distribution() for p in self.params}

    def grid(self) -> list[dict[str, Any]]:
        """Every grid point in order (the last parameter varies fastest); only for ``sampler = "grid"``."""
        names = self.param_names
        return [dict(zip(names, values)) for values in itertools.product(*(p.choices for p in self.params))]

    @property
    def data_seed(self) -> int:
        """The seed of the training and test subsets: ``[data] seed``, else the sweep's seed (every trial and a
        trial's own ``config.toml`` see the same images)."""
        seed = self.data.get("seed")
        return self.seed if seed is None else int(seed)

    @property
    def grid_size(self) -> int:
        return math.prod(len(p.choices) for p in self.params) if self.sampler == "grid" else 0

    @property
    def total_trials(self) -> int:
        """Trials the sweep runs: the grid size, or ``n_trials``."""
        return self.grid_size if self.sampler == "grid" else int(self.n_trials or 0)

    @property
    def measure_latency(self) -> bool:
        return bool(self.measure.get("latency")) or "latency_ms" in self.objectives

    def digest(self) -> str:
        """A short hash of what the trials compute (the study records it; another file cannot join it)."""
        keep = {k: v for k, v in self.doc.items() if k not in ("track", "description", "quick")}
        keep["search"] = {k: v for k, v in keep.get("search", {}).items() if k != "n_trials"}  # more trials may follow
        if self.pipeline is not None:
            keep["pipeline_doc"] = self.pipeline["doc"]
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def label_of(self, params: Mapping[str, Any]) -> str:
        """The seed's style: ``Params1(3, 3, 8, 32, 50)`` (values in the order of ``[search.params]``)."""
        return f"{self.label}({', '.join(_label_value(params.get(n)) for n in self.param_names)})"

    # ------------------------------------------------------------------ a trial's settings

    def trial_settings(self, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Training sweep: ``(model args, fit settings)`` of one point (fixed values with the swept ones)."""
        args = dict(self.model.get("args", {}))
        train = dict(self.train)
        for name, value in params.items():
            section, key = name.split(".", 1)
            (args if section == "model" else train)[key] = value
        return args, train

    def pipeline_doc(self, params: Mapping[str, Any], seed: int | None = None) -> dict[str, Any]:
        """Pipeline sweep: the ``moco run`` config of one point (a dict as ``tomllib`` reads it)."""
        if self.pipeline is None:
            raise MocoError("pipeline_doc is only for a sweep with a [pipeline] table")
        doc = copy.deepcopy(self.pipeline["doc"])
        for name, value in {**self.pipeline.get("set", {}), **params}.items():
            _assign(doc, name, value, "pipeline")
        if seed is not None:
            doc["seed"] = seed
        return doc

    def single_point_doc(self, params: Mapping[str, Any], seed: int) -> dict[str, Any]:
        """A sweep file that runs this one point alone with the same seed (a trial's ``config.toml``)."""
        doc = copy.deepcopy(self.doc)
        doc.pop("quick", None)
        doc["name"] = f"{self.name}-point"
        doc["seed"] = seed
        if self.mode != "pipeline":
            # the trial seed drives the training; the images are the sweep's subsets, drawn with its data seed
            doc.setdefault("data", {})["seed"] = self.data_seed
        search = doc.setdefault("search", {})
        for k in ("n_trials", "population_size", "pruner", "pruner_startup_trials", "pruner_warmup_epochs"):
            search.pop(k, None)
        search["sampler"] = "grid"
        search["params"] = {k: [params[k]] for k in self.param_names}
        if self.base_dir:
            _absolute_paths(doc, Path(self.base_dir))
        return doc

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "mode": self.mode, "sampler": self.sampler,
                "n_trials": self.n_trials, "total_trials": self.total_trials, "pruner": self.pruner,
                "objectives": list(self.objectives), "directions": list(self.directions),
                "params": {p.name: p.to_dict() for p in self.params}, "label": self.label, "quick": self.quick,
                "model": self.model, "data": self.data, "train": self.train, "measure": self.measure,
                "pipeline": ({k: v for k, v in self.pipeline.items() if k != "doc"} if self.pipeline else None),
                "source": self.source, "base_dir": self.base_dir, "digest": self.digest()}


def _label_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _assign(doc: dict, name: str, value: Any, where: str) -> None:
    parts = name.split(".")
    if parts[0] == "steps":
        if len(parts) != 3 or not parts[1].isdigit():
            raise MocoError(f"{where}: {name!r} must be steps.N.KEY (N from 1), e.g. 'steps.1.drop_threshold'")
        steps = doc.get("steps") or []
        i = int(parts[1])
        if not 1 <= i <= len(steps):
            raise MocoError(f"{where}: {name!r} addresses step {i} but the pipeline has {len(steps)} step(s)")
        steps[i - 1][parts[2]] = value
        return
    if parts[0] in ("data", "measure") and len(parts) == 2:
        doc.setdefault(parts[0], {})[parts[1]] = value
        return
    if parts[:2] == ["model", "args"] and len(parts) == 3:
        model = doc.setdefault("model", {})
        model.setdefault("args", model.pop("init_args", {}))[parts[2]] = value
        return
    if parts == ["seed"]:
        doc["seed"] = value
        return
    raise MocoError(f"{where}: {name!r} addresses nothing a pipeline has; use steps.N.KEY, data.KEY, measure.KEY "
                    "or model.args.KEY")


def _absolute_paths(doc: dict, base: Path) -> None:
    """Relative file paths of a config made absolute (a trial's config runs from anywhere)."""
    model = doc.get("model") or {}
    spec = model.get("spec")
    if isinstance(spec, str) and ":" in spec:
        where, name = spec.rsplit(":", 1)
        if (where.endswith(".py") or "/" in where) and not Path(where).is_absolute() and (base / where).exists():
            model["spec"] = f"{(base / where).resolve()}:{name}"
    if isinstance(model.get("weights"), str) and (base / model["weights"]).exists():
        model["weights"] = str((base / model["weights"]).resolve())
    data = doc.get("data") or {}
    for key in ("train", "test", "root"):
        v = data.get(key)
        if isinstance(v, str) and not Path(v).is_absolute() and ("/" in v or v.endswith(".npz")) and (base / v).exists():
            data[key] = str((base / v).resolve())
    pipe = doc.get("pipeline") or {}
    if isinstance(pipe.get("config"), str) and (base / pipe["config"]).exists():
        pipe["config"] = str((base / pipe["config"]).resolve())


def _table(doc: Mapping[str, Any], key: str, where: str, required: bool = True) -> dict[str, Any]:
    value = doc.get(key)
    if value is None:
        if required:
            raise MocoError(f"{where}: the [{key}] table is missing; see 'moco sweep --help' and examples/sweeps/")
        return {}
    if not isinstance(value, dict):
        raise MocoError(f"{where}: {key} must be a table ([{key}]), got {type(value).__name__}")
    return value


def _int(value: Any, name: str, where: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MocoError(f"{where}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _merge(base: dict, over: Mapping[str, Any]) -> dict:
    """``over`` merged into ``base`` table by table (``search.params`` entries replace one by one)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def sweep_from_dict(doc: Mapping[str, Any], *, base_dir: str | Path | None = None, source: str | None = None,
                    quick: bool = False, seed: int | None = None, n_trials: int | None = None) -> SweepConfig:
    """Validate a sweep given as a dict (as ``tomllib`` reads it); ``quick`` applies its ``[quick]`` table,
    ``seed`` / ``n_trials`` override the file's. Returns a :class:`SweepConfig`."""
    where = source or "sweep"
    if not isinstance(doc, Mapping):
        raise MocoError(f"{where}: a sweep file is a table of keys, got {type(doc).__name__}")
    doc = copy.deepcopy(dict(doc))
    _unknown(doc, _TOP_KEYS, where)
    quick_table = _table(doc, "quick", where, required=False)
    _unknown(quick_table, _QUICK_KEYS, f"{where} [quick]")
    for key, value in quick_table.items():
        if not isinstance(value, dict):
            raise MocoError(f"{where} [quick]: {key} must be a table of overrides like {key} = {{ ... }}, got {value!r}")
    if quick:
        doc = _merge(doc, quick_table)
    elif quick_table:  # the --quick variant is checked too: a typo there should not wait for the first quick run
        try:
            sweep_from_dict(doc, base_dir=base_dir, source=source, quick=True, seed=seed, n_trials=n_trials)
        except MocoError as exc:
            raise MocoError(f"with --quick: {exc}") from None
    if seed is not None:
        doc["seed"] = seed
    if n_trials is not None:
        doc.setdefault("search", {})["n_trials"] = n_trials

    name = doc.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise MocoError(f"{where}: name is required: letters, digits, '_', '.', '-' (it names the study and the "
                        f"output folder), got {name!r}")
    seed_v = doc.get("seed", 0)
    if isinstance(seed_v, bool) or not isinstance(seed_v, int) or seed_v < 0:
        raise MocoError(f"{where}: seed must be an integer >= 0, got {seed_v!r}")
    if "description" in doc and not isinstance(doc["description"], str):
        raise MocoError(f"{where}: description must be a string")

    base = Path(base_dir).resolve() if base_dir is not None else None
    mode = "pipeline" if "pipeline" in doc else "train"
    pipeline = None
    model: dict[str, Any] = {}
    data: dict[str, Any] = {}
    train: dict[str, Any] = {}
    if mode == "pipeline":
        for key in ("model", "data", "train"):
            if key in doc:
                raise MocoError(f"{where}: a [pipeline] sweep takes [{key}] from the pipeline config; remove [{key}] "
                                f"(or address it as a parameter, e.g. 'data.train_size')")
        pipeline = _pipeline(doc, base, where)
    else:
        model = _model(doc, where)
        data = _data(doc, where)
        train = _train(doc, where)

    search = _table(doc, "search", where)
    _unknown(search, _SEARCH_KEYS, f"{where} [search]")
    sampler = search.get("sampler", "grid")
    if sampler not in SAMPLERS:
        raise MocoError(f"{where} [search]: sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    n = search.get("n_trials")
    if sampler == "grid":
        if n is not None:
            raise MocoError(f"{where} [search]: sampler 'grid' runs every grid point once; remove n_trials "
                            "(it is for tpe, nsga2 and random)")
    else:
        if n is None:
            raise MocoError(f"{where} [search]: sampler {sampler!r} needs n_trials (how many trials to run)")
        n = _int(n, "n_trials", f"{where} [search]")
    pop = search.get("population_size")
    if pop is not None:
        if sampler != "nsga2":
            raise MocoError(f"{where} [search]: population_size is for sampler 'nsga2' only")
        pop = _int(pop, "population_size", f"{where} [search]", 2)

    table = PIPELINE_OBJECTIVES if mode == "pipeline" else OBJECTIVES
    objectives = search.get("objectives", ["test_accuracy"])
    if isinstance(objectives, str):
        objectives = [objectives]
    if not isinstance(objectives, list) or not objectives or not all(isinstance(o, str) for o in objectives):
        raise MocoError(f"{where} [search]: objectives must be a non-empty list like [\"test_accuracy\", \"macs\"]")
    for o in objectives:
        if o not in table:
            raise MocoError(f"{where} [search]: unknown objective {o!r}; a {mode} sweep can optimise "
                            f"{', '.join(table)}")
    if len(set(objectives)) != len(objectives):
        raise MocoError(f"{where} [search]: objectives lists one twice: {objectives}")
    directions = search.get("directions")
    if directions is None:
        directions = [table[o] for o in objectives]
    if (not isinstance(directions, list) or len(directions) != len(objectives)
            or any(d not in ("maximize", "minimize") for d in directions)):
        raise MocoError(f"{where} [search]: directions must list 'maximize' or 'minimize' once per objective "
                        f"({len(objectives)}), got {directions!r}")
    # (TPE handles several objectives too: no check needed for it)
    pruner = search.get("pruner", "none")
    if pruner not in PRUNERS:
        raise MocoError(f"{where} [search]: pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    if pruner != "none":
        if len(objectives) > 1:
            raise MocoError(f"{where} [search]: pruning needs a single objective (Optuna cannot prune a "
                            f"multi-objective trial); set pruner = \"none\"")
        if mode == "pipeline" or objectives[0] not in PER_EPOCH:
            raise MocoError(f"{where} [search]: pruner {pruner!r} judges a per-epoch value; objective "
                            f"{objectives[0]!r} of a {mode} sweep has none (use one of {', '.join(PER_EPOCH)} "
                            "or pruner = \"none\")")
    startup = _int(search.get("pruner_startup_trials", 5), "pruner_startup_trials", f"{where} [search]", 0)
    warmup = _int(search.get("pruner_warmup_epochs", 0), "pruner_warmup_epochs", f"{where} [search]", 0)
    label = search.get("label", "Params")
    if not isinstance(label, str) or not label.isidentifier():
        raise MocoError(f"{where} [search]: label must be a name like \"Params1\", got {label!r}")

    raw_params = search.get("params")
    if raw_params is None:
        raise MocoError(f"{where}: [search.params] is missing; list what to sweep, e.g. \"model.c1_kernel\" = [3, 5]")
    if not isinstance(raw_params, dict):
        raise MocoError(f"{where}: search.params must be a table of name = values")
    if not raw_params:
        raise MocoError(f"{where}: [search.params] is empty: the grid would be empty; give at least one parameter, "
                        "e.g. \"model.c1_kernel\" = [3, 5]")
    params = tuple(_parse_param(k, v, where) for k, v in raw_params.items())
    if sampler == "grid":
        ranges = [p.name for p in params if p.kind != "categorical"]
        if ranges:
            raise MocoError(f"{where} [search.params] {ranges[0]!r}: sampler 'grid' needs a list of values; a range "
                            "{ low, high } is for tpe, nsga2 or random")

    measure = _table(doc, "measure", where, required=False)
    _unknown(measure, _MEASURE_KEYS, f"{where} [measure]")
    if "latency" in measure and not isinstance(measure["latency"], bool):
        raise MocoError(f"{where} [measure]: latency must be true or false")
    measure = {"latency": bool(measure.get("latency", False)),
               "latency_repeats": _int(measure.get("latency_repeats", 5), "latency_repeats", f"{where} [measure]")}
    if mode == "pipeline" and measure["latency"]:
        raise MocoError(f"{where} [measure]: a pipeline sweep measures time through the pipeline's own [measure] "
                        "(objective ratio_vs_eager); remove latency here")
    track = _table(doc, "track", where, required=False)
    _unknown(track, _TRACK_KEYS, f"{where} [track]")
    for k, v in track.items():
        if not isinstance(v, str) or not v.strip():
            raise MocoError(f"{where} [track]: {k} must be a non-empty string, got {v!r}")

    cfg = SweepConfig(
        name=name, seed=seed_v, mode=mode, sampler=sampler, n_trials=n, pruner=pruner,
        pruner_startup_trials=startup, pruner_warmup_epochs=warmup, objectives=tuple(objectives),
        directions=tuple(directions), params=params, label=label, population_size=pop, model=model, data=data,
        train=train, measure=measure, track=dict(track), pipeline=pipeline, quick=bool(quick), doc=doc,
        base_dir=str(base) if base is not None else None, source=source)
    _check_addresses(cfg, where)
    return cfg


def _model(doc: dict, where: str) -> dict[str, Any]:
    m = _table(doc, "model", where)
    _unknown(m, _MODEL_KEYS, f"{where} [model]")
    spec = m.get("spec", m.get("class_path"))
    if not isinstance(spec, str) or not spec.strip():
        raise MocoError(f"{where} [model]: spec is required, e.g. spec = \"fashion_cnn\" or \"mynet.py:Net\"")
    args = m.get("args", m.get("init_args", {}))
    if not isinstance(args, dict):
        raise MocoError(f"{where} [model]: args must be a table like {{ init = \"xavier\" }}, got {args!r}")
    shape = m.get("input_shape")
    if shape is not None and (not isinstance(shape, list) or not shape
                              or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape)):
        raise MocoError(f"{where} [model]: input_shape must be positive integers like [1, 28, 28], got {shape!r}")
    return {"spec": spec.strip(), "args": dict(args), "input_shape": list(shape) if shape else None}


def _data(doc: dict, where: str) -> dict[str, Any]:
    d = _table(doc, "data", where)
    _unknown(d, _DATA_KEYS, f"{where} [data]")
    for key in ("train", "test", "root"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise MocoError(f"{where} [data]: {key} must be a string (a dataset name, .npz file or folder), got {d[key]!r}")
    if not d.get("train"):
        raise MocoError(f"{where} [data]: train is required, e.g. train = \"fashion_mnist:train\"")
    out = {"train": d["train"], "test": d.get("test"), "normalize": d.get("normalize"), "root": d.get("root")}
    for key in ("train_size", "test_size"):
        out[key] = _int(d[key], key, f"{where} [data]") if d.get(key) is not None else None
    if d.get("seed") is not None:  # only when given: the digest of a sweep that started without it stays the same
        out["seed"] = _int(d["seed"], "seed", f"{where} [data]", 0)
    return out


def _train(doc: dict, where: str) -> dict[str, Any]:
    t = _table(doc, "train", where, required=False)
    _unknown(t, set(TRAIN_DEFAULTS), f"{where} [train]")
    out = {**TRAIN_DEFAULTS, **t}
    _check_train(out, f"{where} [train]")
    return out


def _check_train(t: Mapping[str, Any], where: str) -> None:
    _int(t["epochs"], "epochs", where)
    _int(t["batch_size"], "batch_size", where)
    for key in ("lr", "momentum", "weight_decay"):
        v = t[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (key == "lr" and v == 0):
            raise MocoError(f"{where}: {key} must be a number {'> 0' if key == 'lr' else '>= 0'}, got {v!r}")
    tta = t["target_train_accuracy"]
    if tta is not None and (isinstance(tta, bool) or not isinstance(tta, (int, float)) or not 0 < tta <= 1):
        raise MocoError(f"{where}: target_train_accuracy is a fraction in (0, 1] like 0.9, got {tta!r}")
    for key, choices in _TRAIN_CHOICES.items():
        if t[key] not in choices:
            raise MocoError(f"{where}: {key} must be one of {', '.join(choices)}, got {t[key]!r}")


def _pipeline(doc: dict, base: Path | None, where: str) -> dict[str, Any]:
    p = _table(doc, "pipeline", where)
    _unknown(p, _PIPELINE_KEYS, f"{where} [pipeline]")
    path = p.get("config")
    if not isinstance(path, str) or not path.strip():
        raise MocoError(f"{where} [pipeline]: config is required: the moco run TOML file to sweep over")
    cand = Path(path).expanduser()
    full = cand if cand.is_absolute() else (base / cand if base is not None else Path.cwd() / cand)
    if not full.is_file():
        raise MocoError(f"{where} [pipeline]: config {path!r} not found (looked at {full}); give the moco run TOML file")
    try:
        pdoc = tomllib.loads(full.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MocoError(f"{where} [pipeline]: {full} is not valid TOML: {exc}") from None
    fixed = p.get("set", {})
    if not isinstance(fixed, dict):
        raise MocoError(f"{where} [pipeline]: set must be a table of address = value, e.g. {{ \"steps.1.max_steps\" = 4 }}")
    return {"config": str(full.resolve()), "set": dict(fixed), "doc": pdoc, "base_dir": str(full.resolve().parent)}


def _check_addresses(cfg: SweepConfig, where: str) -> None:
    """Every parameter addresses something, and one point of the space (each value's first choice or low)
    builds: the model for a training sweep, the moco run config for a pipeline sweep."""
    rep = {p.name: p.representative() for p in cfg.params}
    if cfg.mode == "pipeline":
        from moco.run.config import config_from_dict
        from moco.run.steps import STEP_PARAMS

        pdoc = cfg.pipeline["doc"]
        steps = pdoc.get("steps") or []
        for name in [*cfg.pipeline.get("set", {}), *cfg.param_names]:
            parts = name.split(".")
            if parts[0] == "steps" and len(parts) == 3 and parts[1].isdigit() and 1 <= int(parts[1]) <= len(steps):
                method = steps[int(parts[1]) - 1].get("method")
                if method in STEP_PARAMS and parts[2] not in STEP_PARAMS[method]:
                    raise MocoError(f"{where}: {name!r} addresses nothing: step {parts[1]} ({method}) takes "
                                    f"{', '.join(sorted(STEP_PARAMS[method]))}")
        try:
            config_from_dict(cfg.pipeline_doc(rep), base_dir=cfg.pipeline["base_dir"], source=cfg.pipeline["config"])
        except MocoError as exc:
            raise MocoError(f"{where} [pipeline]: with the first value of every parameter the pipeline config is "
                            f"invalid: {exc}") from None
        return
    train_keys = set(TRAIN_DEFAULTS)
    for name in cfg.param_names:
        section, _, key = name.partition(".")
        if section not in ("model", "train") or not key or "." in key:
            raise MocoError(f"{where} [search.params] {name!r} addresses nothing; a training sweep sweeps "
                            "'model.ARG' (a constructor argument) or 'train.KEY' "
                            f"({', '.join(sorted(train_keys))})")
        if section == "train" and key not in train_keys:
            raise MocoError(f"{where} [search.params] {name!r} addresses nothing; [train] keys are "
                            f"{', '.join(sorted(train_keys))}")
        if section == "model" and key in cfg.model.get("args", {}):
            raise MocoError(f"{where} [search.params] {name!r} is also fixed in [model] args; remove one of them")
        if section == "train" and key in (cfg.doc.get("train") or {}):
            raise MocoError(f"{where} [search.params] {name!r} is also fixed in [train]; remove one of them")
    args, train = cfg.trial_settings(rep)
    _check_train(train, f"{where} (first point of [search.params])")
    accepted = _constructor_args(cfg.model["spec"], cfg.base_dir)
    if accepted is not None:
        for name in cfg.param_names:
            section, _, key = name.partition(".")
            if section == "model" and key not in accepted:
                raise MocoError(f"{where} [search.params] {name!r} addresses nothing: model {cfg.model['spec']!r} "
                                f"takes {', '.join(accepted) or 'no arguments'}")
    from moco.specs import resolve_model

    try:
        resolve_model(cfg.model["spec"], args=args, input_shape=cfg.model.get("input_shape"), base_dir=cfg.base_dir,
                      require_weights=False)
    except MocoError as exc:
        raise MocoError(f"{where} [model]: {exc}") from None


def _constructor_args(spec: str, base_dir: str | None) -> list[str] | None:
    """Names a model builder accepts, or None when it takes ``**kwargs`` (anything) or has no signature."""
    from moco.models import list_models

    try:
        if spec in list_models():
            from moco.models import get_spec

            fn = get_spec(spec).factory
        else:
            from moco.specs import _builder

            fn, _ = _builder(spec, Path(base_dir) if base_dir else None)
        sig = inspect.signature(fn)
    except MocoError:
        raise
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return [n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def load_sweep(path: str | Path, *, quick: bool = False, seed: int | None = None,
               n_trials: int | None = None) -> SweepConfig:
    """Read and validate a sweep TOML file (see the module docstring); MocoError names the file and the problem."""
    path = Path(path)
    if path.is_dir():
        raise MocoError(f"sweep file {path} is a folder; give the TOML file (see examples/sweeps/)")
    if not path.is_file():
        raise MocoError(f"sweep file {path} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MocoError(f"{path} is not valid TOML: {exc}") from None
    return sweep_from_dict(doc, base_dir=path.parent, source=str(path), quick=quick, seed=seed, n_trials=n_trials)


# ------------------------------------------------------------------------------------- TOML output

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE.match(k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(str(k))} = {_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    raise MocoError(f"cannot write {type(v).__name__} {v!r} to TOML")


def dumps_toml(doc: Mapping[str, Any]) -> str:
    """``doc`` as TOML text (tables, arrays of tables, inline values); checked to read back equal."""
    lines: list[str] = []

    def emit(table: Mapping[str, Any], path: list[str]) -> None:
        scalars = {k: v for k, v in table.items() if v is not None and not _is_table(v) and not _is_table_array(v)}
        for k, v in scalars.items():
            lines.append(f"{_key(str(k))} = {_value(v)}")
        for k, v in table.items():
            if _is_table(v):
                lines.append("")
                lines.append(f"[{'.'.join(_key(p) for p in [*path, str(k)])}]")
                emit(v, [*path, str(k)])
            elif _is_table_array(v):
                for item in v:
                    lines.append("")
                    lines.append(f"[[{'.'.join(_key(p) for p in [*path, str(k)])}]]")
                    emit(item, [*path, str(k)])

    emit(doc, [])
    text = "\n".join(lines).strip() + "\n"
    if tomllib.loads(text) != _drop_none(doc):
        raise MocoError("internal: the TOML writer did not round-trip this document")
    return text


def _is_table(v: Any) -> bool:
    return isinstance(v, dict) and bool(v)


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _drop_none(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _drop_none(x) for k, x in v.items() if x is not None}
    if isinstance(v, (list, tuple)):
        return [_drop_none(x) for x in v]
    return v
