"""Seed 002's whole workflow on any model with Conv2d/Linear layers, and one entry point for a run step.

FP32 baseline (:func:`train_baseline`) -> 8-bit QAT (:func:`train_quant`) -> noise-tolerance search
(:func:`moco.approx.agn.train_gradient`) -> per-layer selection (:func:`moco.approx.select.select_multipliers`)
-> deployment (:func:`moco.approx.select.deploy_multipliers`, simulated LUT layers) -> approximate
retraining (:func:`train_approx`) -> the uniform comparison (one multiplier everywhere, the one whose
energy is closest to the heterogeneous result). :func:`run_approx` runs it all and returns an
:class:`ApproxResult`.

Training uses :func:`moco.train.fit` (seeded, progress bar) for the stages whose loss is plain
cross-entropy; the noise search has its own small loop (:mod:`moco.approx.agn`). Both plug into moco's
training engine when it exists. Every stage works on a copy: the caller's model is never modified.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

from moco.approx.agn import GradientSearchResult, train_gradient
from moco.approx.multipliers import ApproximateMultiplier, library
from moco.approx.quant import quantize
from moco.approx.select import SelectionResult, deploy_multipliers, select_multipliers, uniform_assignment
from moco.errors import MocoError

__all__ = ["train_baseline", "train_quant", "train_gradient", "train_approx", "run_approx", "ApproxResult",
           "DEFAULTS", "closest_multiplier"]

#: run_approx's configuration keys and defaults (epochs per stage follow seed 002's LeNet5 wrapper where it has them)
DEFAULTS: dict[str, Any] = {
    "baseline_epochs": 0,         # 0: the model is already trained
    "quant_epochs": 1,
    "gradient_epochs": 3,
    "approx_epochs": 2,
    "lr": 1e-3,
    "approx_lr": 5e-4,
    "batch_size": 128,
    "lmbd": 0.2,
    "initial_noise": 0.025,
    "sigma_max": 0.5,
    "per_channel": False,
    "observer": "frozen",
    "calibration_samples": 2048,
    "selection_samples": 512,
    "multipliers": None,          # None: moco.approx.library(); else a list of names or ApproximateMultiplier
    "uniform": "closest",         # or a multiplier name
    "seed": 0,
    "progress": True,
}


def train_baseline(model: nn.Module, train_data: Any, *, epochs: int = 8, lr: float = 1e-3, batch_size: int = 128,
                   seed: int = 0, progress: bool = True, **fit_kwargs):
    """Train the FP32 ``model`` in place with :func:`moco.train.fit`; returns its FitResult."""
    from moco.train import fit

    return fit(model, train_data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
               progress=progress, **fit_kwargs)


def train_quant(model: nn.Module, train_data: Any, *, epochs: int = 1, lr: float = 1e-3, batch_size: int = 128,
                per_channel: bool = False, observer: str = "frozen", calibration_samples: int = 2048,
                seed: int = 0, progress: bool = True, **fit_kwargs) -> nn.Module:
    """8-bit QAT: quantise a copy of ``model`` (calibrated on ``train_data``) and train it; returns the copy."""
    from moco.train import fit

    q = quantize(model, train_data, per_channel=per_channel, observer=observer, max_samples=calibration_samples)
    if epochs > 0:
        fit(q, train_data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress,
            **fit_kwargs)
    return q.eval()


def train_approx(model: nn.Module, train_data: Any, *, epochs: int = 2, lr: float = 5e-4, batch_size: int = 128,
                 seed: int = 0, progress: bool = True, **fit_kwargs):
    """Approximate retraining, in place: train a model with deployed LUT layers (exact-product gradients)."""
    from moco.train import fit

    return fit(model, train_data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
               progress=progress, **fit_kwargs)


def closest_multiplier(multipliers: list[ApproximateMultiplier], energy: float) -> ApproximateMultiplier:
    """The multiplier whose ``performance_metric`` is closest to ``energy`` (ties: the cheaper one)."""
    return min(multipliers, key=lambda m: (abs(m.performance_metric - energy), m.performance_metric))


@dataclass(frozen=True)
class ApproxResult:
    """What :func:`run_approx` measured: accuracies (fractions, on ``evaluated_on`` data) of every stage, the energy ratios
    (op-weighted multiplier energy relative to the exact 8-bit multiplier), the learned ``sigma`` and the
    ``selected`` multiplier per layer, the uniform comparison, seconds per stage; the models are kept
    (``quant_model``, ``approx_model``, ``uniform_model``) but not serialised."""

    accuracy_base: float
    accuracy_quant: float
    accuracy_noise: float
    accuracy_deployed: float
    accuracy_approx: float
    accuracy_uniform: float
    energy_ratio: float
    energy_ratio_uniform: float
    uniform_multiplier: str
    sigma: dict
    selected: dict
    selection: SelectionResult
    search: GradientSearchResult
    seconds: dict
    epoch_seconds: dict
    config: dict
    quant_model: nn.Module = field(repr=False, compare=False, default=None)
    approx_model: nn.Module = field(repr=False, compare=False, default=None)
    uniform_model: nn.Module = field(repr=False, compare=False, default=None)
    evaluated_on: str = "test"

    def to_dict(self) -> dict[str, Any]:
        cfg = {k: (v if k != "multipliers" or v is None else [getattr(m, "name", m) for m in v])
               for k, v in self.config.items()}
        return {
            "accuracy_base": self.accuracy_base, "accuracy_quant": self.accuracy_quant,
            "accuracy_noise": self.accuracy_noise, "accuracy_deployed": self.accuracy_deployed,
            "accuracy_approx": self.accuracy_approx, "accuracy_uniform": self.accuracy_uniform,
            "energy_ratio": self.energy_ratio, "energy_ratio_uniform": self.energy_ratio_uniform,
            "uniform_multiplier": self.uniform_multiplier, "sigma": dict(self.sigma), "selected": dict(self.selected),
            "selection": self.selection.to_dict(), "search": self.search.to_dict(), "seconds": dict(self.seconds),
            "epoch_seconds": dict(self.epoch_seconds), "config": cfg, "evaluated_on": self.evaluated_on,
        }

    def to_frame(self):
        return self.selection.to_frame()

    def to_text(self) -> str:
        pts = lambda a: f"{100 * a:6.2f}%"  # noqa: E731
        rows = [("FP32 baseline", pts(self.accuracy_base), "-"),
                ("int8 QAT", pts(self.accuracy_quant), "1.000"),
                ("after noise search", pts(self.accuracy_noise), "1.000"),
                ("heterogeneous, deployed", pts(self.accuracy_deployed), f"{self.energy_ratio:.3f}"),
                ("heterogeneous, retrained", pts(self.accuracy_approx), f"{self.energy_ratio:.3f}"),
                (f"uniform {self.uniform_multiplier}, retrained", pts(self.accuracy_uniform),
                 f"{self.energy_ratio_uniform:.3f}")]
        w = max(len(r[0]) for r in rows)
        lines = [f"accuracy on the {self.evaluated_on} data", f"{'stage':<{w}}  {'accuracy':>8}  {'energy':>7}"]
        lines += [f"{a:<{w}}  {b:>8}  {c:>7}" for a, b, c in rows]
        return "\n".join(lines + ["", self.selection.to_text()])

    def __str__(self) -> str:
        return self.to_text()


def _resolve_multipliers(spec: Any) -> list[ApproximateMultiplier]:
    if spec is None:
        return library()
    lib = {m.name: m for m in library()}
    out = []
    for item in spec:
        if isinstance(item, ApproximateMultiplier):
            out.append(item)
        elif isinstance(item, str) and item in lib:
            out.append(lib[item])
        else:
            raise MocoError(f"unknown multiplier {item!r}; built-ins are: {', '.join(lib)}")
    if not out:
        raise MocoError("multipliers is empty; give at least the exact multiplier")
    return out


def run_approx(model: nn.Module, train: Any, test: Any, config: Mapping[str, Any] | None = None,
               *, log=print, eval_name: str = "test") -> ApproxResult:
    """Seed 002's workflow on a copy of ``model``: QAT, noise search, selection, deployment, approximate
    retraining and the uniform comparison, with test accuracy after every stage.

    ``train`` and ``test`` are labelled data (``(x, y)``, Dataset, DataLoader). ``config`` overrides
    :data:`DEFAULTS` (unknown keys are refused). ``log`` receives one line per stage. This is the one
    entry point a ``moco run`` step calls; ``result.to_dict()`` is JSON-safe. ``eval_name``: what ``test`` is,
    for the log and the table (``moco run`` evaluates on its validation holdout and says so).
    """
    from moco.train import evaluate

    cfg = dict(DEFAULTS)
    unknown = set(config or {}) - set(DEFAULTS)
    if unknown:
        raise MocoError(f"unknown approx config keys {sorted(unknown)}; known: {', '.join(DEFAULTS)}")
    cfg.update(config or {})
    mults = _resolve_multipliers(cfg["multipliers"])
    seed, prog, bs = cfg["seed"], cfg["progress"], cfg["batch_size"]
    seconds, epoch_seconds = {}, {}

    def acc(m):
        return evaluate(m, test).accuracy

    t = time.perf_counter()
    base = copy.deepcopy(model)
    if cfg["baseline_epochs"] > 0:
        train_baseline(base, train, epochs=cfg["baseline_epochs"], lr=cfg["lr"], batch_size=bs, seed=seed,
                       progress=prog)
    base.eval()
    accuracy_base = acc(base)
    seconds["baseline"] = time.perf_counter() - t
    log(f"FP32 baseline: {eval_name} accuracy {accuracy_base:.4f}")

    t = time.perf_counter()
    q = train_quant(base, train, epochs=cfg["quant_epochs"], lr=cfg["lr"], batch_size=bs,
                    per_channel=cfg["per_channel"], observer=cfg["observer"],
                    calibration_samples=cfg["calibration_samples"], seed=seed, progress=prog)
    seconds["quant"] = time.perf_counter() - t
    epoch_seconds["quant"] = seconds["quant"] / max(cfg["quant_epochs"], 1)
    accuracy_quant = acc(q)
    log(f"int8 QAT: {eval_name} accuracy {accuracy_quant:.4f}")

    t = time.perf_counter()
    noisy = copy.deepcopy(q)
    search = train_gradient(noisy, train, lmbd=cfg["lmbd"], initial_noise=cfg["initial_noise"],
                            sigma_max=cfg["sigma_max"], epochs=cfg["gradient_epochs"], lr=cfg["lr"], batch_size=bs,
                            seed=seed, progress=prog, log=log)
    seconds["gradient"] = time.perf_counter() - t
    accuracy_noise = acc(noisy)
    log(f"after noise search: {eval_name} accuracy {accuracy_noise:.4f}")

    t = time.perf_counter()
    selection = select_multipliers(noisy, train, mults, max_samples=cfg["selection_samples"])
    seconds["select"] = time.perf_counter() - t
    log(selection.to_text())

    approx = deploy_multipliers(noisy, selection, mults)
    accuracy_deployed = acc(approx)
    t = time.perf_counter()
    if cfg["approx_epochs"] > 0:
        train_approx(approx, train, epochs=cfg["approx_epochs"], lr=cfg["approx_lr"], batch_size=bs, seed=seed,
                     progress=prog)
    seconds["approx"] = time.perf_counter() - t
    epoch_seconds["approx"] = seconds["approx"] / max(cfg["approx_epochs"], 1)
    approx.eval()
    accuracy_approx = acc(approx)
    log(f"heterogeneous multipliers, deployed {accuracy_deployed:.4f}, retrained {accuracy_approx:.4f}, "
        f"energy ratio {selection.relative_energy_consumption:.3f}")

    by_name = {m.name: m for m in mults}
    if cfg["uniform"] == "closest":
        uni = closest_multiplier(mults, selection.relative_energy_consumption)
    elif cfg["uniform"] in by_name:
        uni = by_name[cfg["uniform"]]
    else:
        raise MocoError(f"uniform must be 'closest' or a multiplier name, got {cfg['uniform']!r}")
    t = time.perf_counter()
    uniform = deploy_multipliers(noisy, uniform_assignment(noisy, uni))
    if cfg["approx_epochs"] > 0:
        train_approx(uniform, train, epochs=cfg["approx_epochs"], lr=cfg["approx_lr"], batch_size=bs, seed=seed,
                     progress=prog)
    seconds["uniform"] = time.perf_counter() - t
    uniform.eval()
    accuracy_uniform = acc(uniform)
    energy_uniform = uni.performance_metric / selection.metric_max
    log(f"uniform {uni.name}: retrained {accuracy_uniform:.4f}, energy ratio {energy_uniform:.3f}")

    return ApproxResult(accuracy_base, accuracy_quant, accuracy_noise, accuracy_deployed, accuracy_approx,
                        accuracy_uniform, selection.relative_energy_consumption, energy_uniform, uni.name,
                        dict(search.sigma), selection.assignment, selection, search, seconds, epoch_seconds, cfg,
                        q, approx, uniform, eval_name)
