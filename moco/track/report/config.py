"""The best configuration, as seed 003 prints it and as a config file that reproduces it.

Seed 003 names an architecture ``Params1(3,3,8,32,50)`` and a training setting ``Params2(orthogonal, 64,
0.01, 0.9)``. :func:`params_text` prints swept parameters the same way with their names: ``"model.*"`` ->
``Params1(c1_kernel=5, ...)``, ``"train.*"`` -> ``Params2(lr=0.01, ...)``; any other group gets its own name
(``"data.train_size"`` -> ``Data(train_size=...)``, ``"steps.1.ratio"`` -> ``Steps(1.ratio=...)``).

:func:`fixed_sweep_config` turns the effective sweep file into one that reproduces a single trial: the same
file with every swept parameter fixed to the trial's value (a grid of one point), used when the trial's own
``config.toml`` is not there. :func:`toml_dumps` writes it.
"""

from __future__ import annotations

import tomllib
from typing import Any, Mapping

from moco.errors import MocoError

__all__ = ["fixed_sweep_config", "group_params", "params_text", "toml_dumps"]

_GROUP_NAMES = {"model": "Params1", "train": "Params2"}


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return repr(value)


def group_params(params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"model.c1_kernel": 5, "train.lr": 0.01}`` -> ``{"Params1": {"c1_kernel": 5}, "Params2": {"lr": 0.01}}``
    (groups in the order Params1, Params2, then the others as they come; names without a group go to ``Params``)."""
    groups: dict[str, dict[str, Any]] = {"Params1": {}, "Params2": {}}
    for name, value in params.items():
        head, _, rest = str(name).partition(".")
        if not rest:
            head, rest = "", head
        label = _GROUP_NAMES.get(head) or (head[:1].upper() + head[1:] if head else "Params")
        groups.setdefault(label, {})[rest] = value
    return {k: v for k, v in groups.items() if v}


def params_text(params: Mapping[str, Any]) -> str:
    """Seed 003's ``Params1(...)`` / ``Params2(...)`` lines for a trial's swept parameters (one per group)."""
    lines = [f"{label}({', '.join(f'{k}={_value_text(v)}' for k, v in group.items())})"
             for label, group in group_params(params).items()]
    return "\n".join(lines) if lines else "(no swept parameters)"


# -------------------------------------------------------------------------------------------------- TOML


def toml_dumps(doc: Mapping[str, Any], *, header: str = "") -> str:
    """``doc`` as TOML text (``header`` lines become ``#`` comments): the sweep's own writer
    (:func:`moco.track.sweep.dumps_toml`, checked by reading it back) under the comment lines."""
    from moco.track.sweep.config import dumps_toml

    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    return "\n".join([*lines, dumps_toml(doc)]) if lines else dumps_toml(doc)


def fixed_sweep_config(sweep_toml: str, params: Mapping[str, Any], *, trial: int | None = None,
                       seed: int | None = None) -> dict[str, Any]:
    """The sweep file ``sweep_toml`` with every swept parameter fixed to ``params`` (a grid of one point).

    The ``[quick]`` table is dropped (the effective sweep file already has it applied), the sampler becomes
    ``"grid"``, the trial-count and pruner settings are removed, ``seed`` (the trial's own seed, when
    recorded) replaces the sweep's, and the name gets ``-trial-NNNN``.
    """
    try:
        doc = tomllib.loads(sweep_toml)
    except tomllib.TOMLDecodeError as exc:
        raise MocoError(f"the sweep's sweep.toml is not valid TOML ({exc})") from None
    doc.pop("quick", None)
    search = dict(doc.get("search") or {})
    search["sampler"] = "grid"
    for key in ("n_trials", "population_size", "pruner", "pruner_startup_trials", "pruner_warmup_epochs"):
        search.pop(key, None)
    if seed is not None:
        doc["seed"] = seed
    search["params"] = {name: [value] for name, value in params.items()}
    doc["search"] = search
    if trial is not None and isinstance(doc.get("name"), str):
        doc["name"] = f"{doc['name']}-trial-{trial:04d}"
    return doc
