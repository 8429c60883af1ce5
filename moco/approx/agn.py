"""Noise-tolerance search (seed 002's ``train_gradient``): learnable additive Gaussian noise per layer.

During training only, each target layer's output becomes ``y + N(0, 1) * std(y) * sigma_l``, where
``std(y)`` is the standard deviation of the layer's whole output batch (detached: the noise follows
the signal's scale, the gradient goes to ``sigma_l``) and ``sigma_l`` is one learnable scalar per
layer (:attr:`QuantLayer.sigma`). The loss rewards noise where it costs little accuracy:

``loss = CE - lmbd * sum_l (ops_l / ops_total) * min(|sigma_l|, sigma_max)``

with ``ops_l`` the layer's MACs from :func:`moco.profile.profile`. Seed defaults: ``lmbd = 0.2``,
``initial_noise = 0.025``, ``sigma_max = 0.5``. ``sigma_l`` per layer is logged every epoch (and
printed, as the seed does, with ``progress=True``).

The training runs on moco's training engine on Lightning (:class:`moco.train.engine.NoiseSearchModule`:
seeded, a tqdm bar shown when stderr is a terminal, Lightning's callbacks, loggers, devices and precision).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from moco.approx.quant import QuantLayer, quant_layers
from moco.batches import iter_batches, num_samples
from moco.errors import MocoError

__all__ = ["enable_noise", "disable_noise", "sigmas", "layer_macs", "op_fractions", "noise_penalty", "train_gradient",
           "GradientSearchResult"]


def _check_number(name: str, value: Any, *, lo: float | None = None, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MocoError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise MocoError(f"{name} must be > 0, got {value!r}")
    if lo is not None and value < lo:
        raise MocoError(f"{name} must be >= {lo}, got {value!r}")
    return float(value)


def _layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    layers = quant_layers(model)
    if not layers:
        raise MocoError("the model has no quantised layers; quantise it first (moco.approx.quantize / train_quant)")
    return layers


def enable_noise(model: nn.Module, initial_noise: float = 0.025) -> nn.Module:
    """Give every quantised layer of ``model`` a learnable ``sigma`` (in place); returns ``model``."""
    _check_number("initial_noise", initial_noise, lo=0.0)
    for _, layer in _layers(model):
        layer.sigma = nn.Parameter(torch.tensor(float(initial_noise)))
    return model


def disable_noise(model: nn.Module) -> nn.Module:
    """Remove every layer's ``sigma`` (in place; the values are kept in :func:`sigmas` results); returns ``model``."""
    for _, layer in quant_layers(model):
        layer.sigma = None
    return model


def sigmas(model: nn.Module) -> dict[str, float]:
    """``{layer: |sigma_l|}`` of the layers with noise; raises MocoError if a sigma is NaN or inf."""
    out = {}
    for name, layer in quant_layers(model):
        if layer.sigma is not None:
            v = float(layer.sigma.detach())
            if not math.isfinite(v):
                raise MocoError(f"sigma of layer {name!r} is {v}; the noise search diverged (lower lr or lmbd)")
            out[name] = abs(v)
    return out


def layer_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """``{layer: MACs per sample}`` of the quantised layers, from :func:`moco.profile.profile` (batch of one).

    Profiles a copy whose LUT layers run exact products, so the counts are the layer's own
    multiply-accumulates, not those of the kernel that simulates its multiplier.
    """
    import copy

    from moco.profile import profile

    plain = copy.deepcopy(model)
    for _, layer in quant_layers(plain):
        layer.multiplier = None
    prof = profile(plain, example_input[:1], latency=False)
    macs = {row.name: row.macs for row in prof.rows}
    return {n: int(macs.get(n, 0)) for n, _ in _layers(model)}


def op_fractions(model: nn.Module, example_input: torch.Tensor) -> dict[str, float]:
    """``{layer: MACs_l / total MACs of the quantised layers}`` (see :func:`layer_macs`)."""
    macs = layer_macs(model, example_input)
    total = sum(macs.values())
    if total <= 0:
        raise MocoError("the quantised layers do no multiply-accumulates on this input")
    return {n: v / total for n, v in macs.items()}


def noise_penalty(model: nn.Module, fractions: dict[str, float], sigma_max: float) -> torch.Tensor:
    """``sum_l fractions[l] * min(|sigma_l|, sigma_max)`` (a tensor with gradients to the sigmas)."""
    terms = [fractions[n] * torch.clamp(layer.sigma.abs(), max=sigma_max)
             for n, layer in quant_layers(model) if layer.sigma is not None]
    if not terms:
        raise MocoError("no layer has a noise parameter; call enable_noise(model) first")
    return torch.stack(terms).sum()


@dataclass(frozen=True)
class GradientSearchResult:
    """Learned noise tolerance: final ``sigma`` per layer, per-epoch ``history`` of sigmas, loss and accuracy.

    ``op_fractions``: each layer's share of MACs; ``lmbd``, ``sigma_max``; ``seconds`` of training.
    """

    sigma: dict[str, float]
    history: tuple[dict, ...]
    op_fractions: dict[str, float]
    lmbd: float
    sigma_max: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"sigma": dict(self.sigma), "history": [dict(h) for h in self.history],
                "op_fractions": dict(self.op_fractions), "lmbd": self.lmbd, "sigma_max": self.sigma_max,
                "seconds": self.seconds}

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([{"epoch": h["epoch"], **h["sigma"]} for h in self.history]).set_index("epoch")

    def to_text(self) -> str:
        lines = [f"noise search: lmbd {self.lmbd}, sigma_max {self.sigma_max}, {len(self.history)} epochs, "
                 f"{self.seconds:.1f} s"]
        w = max([12, *(len(n) for h in self.history for n in h["sigma"])])
        for h in self.history:
            lines.append(f"epoch {h['epoch']}: loss {h['loss']:.4f}, acc {h['train_accuracy']:.4f}")
            lines += [f"  layer {n:<{w}} ops {self.op_fractions[n]:6.1%}  sigma_l {s:+.3f}" for n, s in h["sigma"].items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def train_gradient(
    model: nn.Module,
    train_data: Any,
    *,
    lmbd: float = 0.2,
    initial_noise: float = 0.025,
    sigma_max: float = 0.5,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
    log=None,
    on_epoch: Callable[[dict], Any] | None = None,
    callbacks: Sequence[Any] | None = None,
    logger: Any = None,
    accelerator: str = "cpu",
    devices: int | str | Sequence[int] = 1,
    precision: str | int = "32-true",
    trainer_kwargs: dict | None = None,
) -> GradientSearchResult:
    """Seed 002's gradient search, in place on a quantised ``model``: learn one ``sigma_l`` per layer.

    Adds the noise parameters (:func:`enable_noise`), trains weights and sigmas together with Adam
    (``lr``) on ``loss = CE - lmbd * sum_l ops_l / ops * min(|sigma_l|, sigma_max)`` for ``epochs``
    passes over ``train_data`` (shuffled, seeded; the caller's RNG state is untouched), and logs
    ``sigma_l`` per layer per epoch through ``log`` (default: ``tqdm.write`` when ``progress``).
    The sigmas stay on the model (inactive in eval mode) for :func:`moco.approx.select_multipliers`.
    The loop is moco's training engine on Lightning; ``on_epoch`` (a callable receiving each epoch's
    history dict), ``callbacks``, ``logger``, ``accelerator``, ``devices``, ``precision`` and
    ``trainer_kwargs`` work as in :func:`moco.train.fit` (logged metrics: ``loss``, ``train_accuracy``,
    ``sigma/<layer>``).
    """
    lmbd = _check_number("lmbd", lmbd, lo=0.0)
    sigma_max = _check_number("sigma_max", sigma_max, positive=True)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise MocoError(f"epochs must be an int >= 1, got {epochs!r}")
    n = num_samples(train_data)
    if n == 0:
        raise MocoError("train_data is empty")
    from moco.train.engine import NoiseSearchModule, check_options, run_training  # imports Lightning (seconds)

    check_options(on_epoch=on_epoch, callbacks=callbacks, logger=logger, trainer_kwargs=trainer_kwargs)
    first = next(iter_batches(train_data, 1))[0]
    fractions = op_fractions(model, first)
    enable_noise(model, initial_noise)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    write = log or (tqdm.write if progress else None)
    module = NoiseSearchModule(model, opt, lmbd=lmbd, sigma_max=sigma_max, fractions=fractions, epochs=epochs, lr=lr)
    hparams = dict(lmbd=lmbd, initial_noise=initial_noise, sigma_max=sigma_max, epochs=epochs, lr=lr,
                   batch_size=batch_size, seed=seed)
    t0 = time.perf_counter()
    was = model.training
    try:
        # one generator seeded once and continued over the epochs: the search's shuffles have always been so
        run_training(module, train_data, epochs=epochs, batch_size=batch_size, seed=seed, reseed_each_epoch=False,
                     progress=progress, write=write, on_epoch=on_epoch, callbacks=callbacks,
                     logger=logger, accelerator=accelerator, devices=devices, precision=precision,
                     trainer_kwargs=trainer_kwargs, hparams=hparams)
    finally:
        model.train(was)
    return GradientSearchResult(sigmas(model), tuple(module.history), fractions, lmbd, sigma_max,
                                time.perf_counter() - t0)
