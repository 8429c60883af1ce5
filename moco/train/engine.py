"""moco's one training engine, on Lightning's ``Trainer``.

Every training loop of moco runs here: :func:`moco.train.fit` (plain and distilled classification, so
also ``compress.finetune`` and the approximate-computing stages that train with cross-entropy),
:func:`moco.exits.train_exits` (joint and retrofit exits) and :func:`moco.approx.train_gradient` (the
noise-tolerance search). Each is a :class:`TrainingModule` (a ``LightningModule`` with automatic
optimisation) and one driver, :func:`run_training`, builds the ``Trainer`` and adds what they share:

* the data: :class:`SeededBatches` yields exactly the batches moco's hand-written loops did
  (``iter_batches(data, batch_size, shuffle=True, generator=g)``, ``g`` reseeded
  ``seed * 100_003 + epoch`` each epoch, so a resumed run sees the same shuffle); on the CPU with one
  device a seeded run gives bit-identical weights to the old loop. A DataLoader is handed to
  Lightning as it is. Under DDP each process takes its shard of the same seeded permutation;
* seeding without touching the caller's RNG (``torch.random.fork_rng``, then ``torch.manual_seed``);
* a tqdm bar per epoch (in images) and one line per finished epoch, both optional;
* per epoch (moco's own callbacks, before the user's): the epoch log appended to ``module.history``
  and logged (``trainer.callback_metrics`` and any Lightning logger), ``on_epoch(log)`` and
  :func:`moco.track.notify_epoch` (the trackers of ``observe_epochs`` blocks), a moco-format
  checkpoint written atomically (read back with ``weights_only=True``), and the early stop on a target;
* quiet: no Lightning progress bar, model summary, "GPU available" banners, info logs or warnings, no
  ``lightning_logs/`` folder (``logger=False`` unless one is passed, ``enable_checkpointing=False``);
* Ctrl+C stays a ``KeyboardInterrupt`` for the caller (Lightning's own handler exits the process).

Lightning is imported by this module; ``moco.train`` imports it only when a training starts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
import warnings
from typing import Any, Callable, Iterator, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from moco.batches import as_tensors, check_labels, iter_batches, num_samples
from moco.errors import MocoError, input_error
from moco.progress import show_progress
from moco.track.tracking import notify_epoch

__all__ = ["EPOCH_SEED_STRIDE", "ClassifierModule", "ExitModule", "NoiseSearchModule", "SeededBatches",
           "TrainingModule", "check_options", "run_training"]

#: the shuffle of epoch ``e`` is seeded ``seed * EPOCH_SEED_STRIDE + e`` (moco's loops always did so)
EPOCH_SEED_STRIDE = 100_003

# Trainer arguments that fit / finetune / train_exits set themselves
_RESERVED = ("max_epochs", "min_epochs", "callbacks", "logger", "accelerator", "devices", "precision",
             "enable_checkpointing", "enable_progress_bar", "enable_model_summary")


class SeededBatches:
    """The training batches of every epoch, as an iterable with a length (what Lightning is fed).

    ``iter_batches(data, batch_size, shuffle=True, generator=g)`` over ``(x, y)`` tensors or a
    Dataset, ``g`` seeded ``seed * EPOCH_SEED_STRIDE + epoch`` when the epoch starts
    (``reseed_each_epoch=False``: one generator seeded ``seed`` and continued from epoch to epoch, as
    the noise search always did). ``epoch`` is set by the module before the epoch's first batch is
    drawn (the batches are produced lazily). With ``world > 1`` processes (DDP) the epoch's
    permutation is padded to a multiple of ``world`` (repeating its start, as ``DistributedSampler``
    does) and process ``rank`` takes every ``world``-th index from ``rank`` on.
    """

    def __init__(self, data: Any, batch_size: int, seed: int, *, reseed_each_epoch: bool = True):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise MocoError(f"batch_size must be >= 1, got {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.reseed_each_epoch = reseed_each_epoch
        self.epoch = 0
        self.rank, self.world = 0, 1
        self.n = num_samples(data)
        #: the ``(x, y)`` tensors of in-memory data (None for a Dataset without ``tensors()``); the module
        #: may replace it by a checked pair (labels as int64) before training
        self.pair = as_tensors(data)
        self._generator = torch.Generator().manual_seed(seed)

    def shard(self, rank: int, world: int) -> None:
        """Train process ``rank`` of ``world`` (DDP); ``(0, 1)`` is a single process."""
        self.rank, self.world = int(rank), int(world)

    @property
    def samples_per_process(self) -> int:
        """Samples one process sees per epoch (all of them in a single process)."""
        return self.n if self.world == 1 else -(-self.n // self.world)

    def __len__(self) -> int:
        return -(-self.samples_per_process // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        gen = self._generator
        if self.reseed_each_epoch:
            gen.manual_seed(self.seed * EPOCH_SEED_STRIDE + self.epoch)
        if self.world == 1:  # the pair (not a Dataset's tensors() again each epoch): the same batches
            source = self.pair if self.pair is not None else self.data
            yield from iter_batches(source, self.batch_size, shuffle=True, generator=gen)
            return
        order = torch.randperm(self.n, generator=gen)
        total = self.samples_per_process * self.world
        if total > self.n:
            order = torch.cat([order, order.repeat(-(-total // self.n))[: total - self.n]])
        mine = order[self.rank : total : self.world]
        if self.pair is not None:
            x, y = self.pair
            for start in range(0, len(mine), self.batch_size):
                idx = mine[start : start + self.batch_size]
                yield x[idx], (y[idx] if y is not None else None)
        else:
            yield from iter_batches(Subset(self.data, mine.tolist()), self.batch_size)


def _as_pair(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, y)`` of a batch (``y`` None when unlabelled), as :func:`moco.batches.iter_batches` yields them."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) >= 1:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(f"a batch from the DataLoader is {type(batch).__name__}; expected a tensor or (x, y)")


class _Sums:
    """An epoch's running sums on the training device: ``loss`` (sum of per-sample losses, float64, which
    gives exactly the Python-float sums of the old loops; float32 on MPS, which has no float64),
    ``correct`` (per output) and ``seen`` (an int). A plain object, not module attributes: setting an
    attribute of an ``nn.Module`` costs microseconds, on every step."""

    __slots__ = ("loss", "correct", "seen")

    def __init__(self, device: torch.device, outputs: int | None = None):
        self.loss = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
        self.correct = torch.zeros(() if outputs is None else (outputs,), dtype=torch.long, device=device)
        self.seen = 0


class TrainingModule(pl.LightningModule):
    """What moco's training modules share: the epoch bookkeeping around a subclass's ``training_step``.

    A subclass sets the training flags of an epoch (:meth:`train_modes`), checks in-memory training
    data once before training (:meth:`check_data`) or else each batch on the host before it moves to the
    device (:meth:`check_batch`), defines ``reset_sums()`` (zero its running
    sums at the start of an epoch), ``training_step`` (the loss, adding to the sums) and
    ``finish_epoch()`` (the sums, reduced over the processes, as the epoch's log), and optionally
    :meth:`epoch_metrics`, :meth:`epoch_lines`, :meth:`postfix` and :meth:`restore`. ``history`` holds the logs of every finished epoch
    (resumed ones first); ``stopped`` is ``"epochs"`` or ``"target"``; ``epoch`` is the 0-based index
    of the epoch being trained, counting resumed epochs.
    """

    label = "epoch"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, epochs: int,
                 scheduler: Callable[[torch.optim.Optimizer, "TrainingModule"], Any] | None = None):
        super().__init__()
        self.model = model
        self._optimizer = optimizer
        self._make_scheduler = scheduler
        self.epochs = epochs
        self.epoch_offset = 0
        self.epoch = 0
        self.history: list = []
        self.stopped = "epochs"
        self.batches: SeededBatches | None = None
        self.steps_per_epoch = 0
        self.sums: _Sums | None = None
        self._t_epoch = 0.0
        self._checked_data = False

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets ``_current_fx_name`` around every hook call, some 45 times a training step, and
        # nn.Module.__setattr__ checks parameters, buffers and submodules each time (about a tenth of the
        # engine's per-step overhead): this plain string attribute goes straight into the instance dict
        if name == "_current_fx_name":
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    # -- Lightning hooks ------------------------------------------------------------------------
    def configure_optimizers(self):
        if self._make_scheduler is None:
            return self._optimizer
        return {"optimizer": self._optimizer,
                "lr_scheduler": {"scheduler": self._make_scheduler(self._optimizer, self), "interval": "step"}}

    def setup(self, stage: str) -> None:
        if self.batches is not None:
            self.batches.shard(self.trainer.global_rank, self.trainer.world_size)

    def on_train_epoch_start(self) -> None:
        self.epoch = self.epoch_offset + self.current_epoch
        if self.batches is not None:
            self.batches.epoch = self.epoch  # before the epoch's first batch is drawn
        self.steps_per_epoch = int(self.trainer.num_training_batches)
        self.train_modes()
        self.reset_sums()
        self._t_epoch = time.perf_counter()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self._checked_data:  # in-memory data checked once before training: nothing to do per batch
            return batch
        x, y = _as_pair(batch)
        return self.check_batch(x, y)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if device.type == "cpu" and all(t is None or t.device.type == "cpu" for t in batch):
            return batch  # already there (Lightning's generic move walks the batch as a collection)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def check_data(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Check all in-memory training data once, before training (the per-batch checks then stop);
        returns the pair to train on. The base module checks nothing (per batch either)."""
        return x, y

    # -- what subclasses provide ----------------------------------------------------------------
    def train_modes(self) -> None:
        self.model.train()

    def check_batch(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def epoch_metrics(self, log: Any) -> dict[str, float]:
        return {}

    def epoch_lines(self, log: Any) -> list[str]:
        return []

    def postfix(self) -> dict[str, str]:
        return {}

    def bar_label(self) -> str:
        return f"{self.label} {self.epoch + 1}/{self.epochs}"

    def restore(self) -> None:
        """Undo what the module changed for training (called when the training ends, also on error)."""

    # -- helpers --------------------------------------------------------------------------------
    def _reduced(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """``values`` summed over the DDP processes (unchanged in a single process)."""
        if self.trainer.world_size == 1:
            return list(values)
        return [self.trainer.strategy.reduce(v.to(self.device), reduce_op="sum") for v in values]

    def _seconds(self) -> float:
        return time.perf_counter() - self._t_epoch


class ClassifierModule(TrainingModule):
    """:func:`moco.train.fit`'s step: cross-entropy, optionally distilled from a ``teacher``.

    The teacher is not a submodule (Lightning neither converts, wraps nor optimises it): it runs in
    eval mode under ``no_grad`` on the training device, in its own dtype, and goes back where it was.
    ``schedule="cosine"``: before every optimizer step the rate is ``lr * 0.5 * (1 + cos(pi * s / S))``
    with ``s`` the step index counting resumed epochs and ``S = epochs * steps_per_epoch``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, lr: float, schedule: str, epochs: int,
                 teacher: nn.Module | None = None, distillation: float = 0.5, temperature: float = 4.0,
                 val_data: Any = None, val_batch_size: int = 512):
        super().__init__(model, optimizer, epochs=epochs)
        self._teacher = (teacher,) if teacher is not None else ()
        self._teacher_device: torch.device | None = None
        self.lr = lr
        self.schedule = schedule
        self.distillation = distillation
        self.temperature = temperature
        self.val_data = val_data
        self.val_batch_size = val_batch_size
        self._num_classes: int | None = None
        self._all_labels: torch.Tensor | None = None
        self._batch_idx = [0]  # the step's batch index, for the schedule (a list: no module attribute set per step)

    def on_fit_start(self) -> None:
        if self._teacher:
            from moco.train.evaluation import _device

            teacher = self._teacher[0]
            self._teacher_device = _device(teacher)
            if self._teacher_device != self.device:
                teacher.to(self.device)

    def restore(self) -> None:
        if self._teacher and self._teacher_device is not None:
            self._teacher[0].to(self._teacher_device)

    def train_modes(self) -> None:
        self.model.train()
        if self._teacher:
            self._teacher[0].eval()

    def check_batch(self, x, y):
        from moco.train.evaluation import _check_batch

        return x, _check_batch(x, y, self._num_classes, "training labels")

    def check_data(self, x, y):
        # what the per-batch checks did, once over all samples (every sample is in every epoch); a bad
        # sample now stops the training before its first step. The label range is checked against the
        # model's outputs at the first step.
        if y is None:
            raise MocoError("training and evaluation need labels: pass (x, y), a labelled Dataset or a DataLoader")
        for start in range(0, len(x), 8192):
            if not torch.isfinite(x[start : start + 8192]).all():
                raise MocoError("the inputs contain NaN or inf; clean or normalise the data first")
        y = check_labels(y, None, what="training labels")
        self._all_labels = y
        self._checked_data = True
        return x, y

    def reset_sums(self) -> None:
        self.sums = _Sums(self.device)

    def training_step(self, batch, batch_idx):
        from moco.train.fitting import distillation_loss

        x, y = batch
        logits = self.model(x)
        if self._num_classes is None:  # the first batch: now the model's outputs are known
            self._num_classes = int(logits.shape[-1])
            check_labels(self._all_labels if self._all_labels is not None else y, self._num_classes,
                         what="training labels")
        loss = F.cross_entropy(logits, y)
        if self._teacher and self.distillation > 0:
            teacher = self._teacher[0]
            with torch.no_grad():
                target = teacher(x.to(_dtype(teacher, x.dtype))).to(logits.dtype)
            loss = (1 - self.distillation) * loss + self.distillation * distillation_loss(logits, target, self.temperature)
        if not torch.isfinite(loss):
            raise MocoError(f"training diverged (loss {loss.item()}) in epoch {self.epoch + 1}; lower lr={self.lr}")
        sums = self.sums
        sums.loss += loss.detach().to(sums.loss.dtype) * len(x)
        sums.correct += (logits.detach().argmax(1) == y).sum()
        sums.seen += len(x)
        self._batch_idx[0] = batch_idx
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.schedule == "cosine":
            step = self.epoch * self.steps_per_epoch + self._batch_idx[0]
            total = self.epochs * self.steps_per_epoch
            for group in optimizer.param_groups:
                group["lr"] = self.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))

    def postfix(self) -> dict[str, str]:
        seen = max(self.sums.seen, 1)
        return {"loss": f"{float(self.sums.loss) / seen:.4f}", "acc": f"{int(self.sums.correct) / seen:.4f}"}

    def finish_epoch(self):
        from moco.train.evaluation import evaluate
        from moco.train.fitting import EpochLog

        loss_sum, correct, seen = self._reduced(self.sums.loss, self.sums.correct, torch.tensor(self.sums.seen))
        seen = max(int(seen), 1)
        val = evaluate(self.model, self.val_data, batch_size=self.val_batch_size).accuracy if self.val_data is not None else None
        return EpochLog(self.epoch + 1, float(loss_sum) / seen, int(correct) / seen, val, self._seconds())

    def epoch_metrics(self, log) -> dict[str, float]:
        out = {"loss": log.loss, "train_accuracy": log.train_accuracy, "epoch_seconds": log.seconds}
        if log.val_accuracy is not None:
            out["val_accuracy"] = log.val_accuracy
        return out

    def epoch_lines(self, log) -> list[str]:
        val = f", val acc {log.val_accuracy:.4f}" if log.val_accuracy is not None else ""
        return [f"epoch {log.epoch}: loss {log.loss:.4f}, train acc {log.train_accuracy:.4f}{val} ({log.seconds:.1f} s)"]


def _dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    """The floating dtype of ``module``'s first floating parameter (``default`` without one)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return default


class ExitModule(TrainingModule):
    """:func:`moco.exits.train_exits`'s step on an ``EarlyExitNetwork``: ``sum_i w_i * CE_i`` over the exits.

    ``mode="joint"`` trains backbone and heads. ``mode="retrofit"`` runs the frozen backbone in eval
    mode under ``no_grad`` (its parameters are marked ``requires_grad=False`` while training, so DDP
    does not wait for their gradients; restored afterwards), only up to the last exit point unless
    self-distillation needs the final exit, and trains the heads. ``distillation > 0``: exit ``i``'s
    term is ``(1 - d) * CE_i + d * T^2 * KL(final || exit_i)`` with the final exit detached.
    ``schedule="cosine"``: ``CosineAnnealingLR`` over all optimizer steps, stepped after each.
    """

    label = "exits"

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer, *, mode: str, weights: Sequence[float],
                 epochs: int, lr: float, schedule: str = "constant", distillation: float = 0.0,
                 temperature: float = 3.0, val_data: Any = None):
        scheduler = None
        if schedule == "cosine":
            def scheduler(opt, module):
                return torch.optim.lr_scheduler.CosineAnnealingLR(opt, int(module.trainer.estimated_stepping_batches))
        super().__init__(net, optimizer, epochs=epochs, scheduler=scheduler)
        self.mode = mode
        self.weights = tuple(weights)
        self.lr = lr
        self.distillation = distillation
        self.temperature = temperature
        self.val_data = val_data
        self.k = net.num_exits
        self._n_outs = self.k if mode == "joint" else self.k - 1
        self._frozen: list[tuple[nn.Parameter, bool]] = []

    def on_fit_start(self) -> None:
        if self.mode == "retrofit":
            self._frozen = [(p, p.requires_grad) for p in self.model.segments.parameters()]
            for p, _ in self._frozen:
                p.requires_grad_(False)

    def restore(self) -> None:
        for p, flag in self._frozen:
            p.requires_grad_(flag)
        self._frozen = []

    def bar_label(self) -> str:
        return f"exits {self.mode} {self.epoch + 1}/{self.epochs}"

    def train_modes(self) -> None:
        if self.mode == "joint":
            self.model.train()
        else:
            self.model.segments.eval()
            self.model.heads.train()

    def check_batch(self, x, y):
        if y is None:
            raise MocoError("training needs labels: pass (x, y), a labelled Dataset or a DataLoader")
        return x, check_labels(y, self.model.num_classes, what="training labels")

    def check_data(self, x, y):
        x, y = self.check_batch(x, y)  # all labels at once
        self._checked_data = True
        return x, y

    def reset_sums(self) -> None:
        self.sums = _Sums(self.device, self.k)

    def training_step(self, batch, batch_idx):
        from moco.train.fitting import distillation_loss

        x, y = batch
        net = self.model
        if self.mode == "joint":
            outs = net.forward_all(x)
        else:  # the frozen backbone runs only up to the last exit point: the final exit cannot change
            with torch.no_grad():
                h, acts = x, []
                for segment in net.segments[:-1]:
                    h = segment(h)
                    acts.append(h)
                teacher = net.segments[-1](h) if self.distillation > 0 else None
            outs = [head(a) for head, a in zip(net.heads, acts)]
        losses = [F.cross_entropy(o, y) for o in outs]
        if self.distillation > 0:
            final = outs[-1] if self.mode == "joint" else teacher
            for i in range(self.k - 1):
                losses[i] = ((1 - self.distillation) * losses[i]
                             + self.distillation * distillation_loss(outs[i], final, self.temperature))
        loss = sum(wi * li for wi, li in zip(self.weights, losses) if wi > 0)
        if not torch.isfinite(loss):
            raise MocoError(f"training diverged (loss {float(loss)}) in epoch {self.epoch + 1}; lower lr={self.lr}")
        sums = self.sums
        sums.loss += loss.detach().to(sums.loss.dtype) * len(x)
        for i, o in enumerate(outs):
            sums.correct[i] += (o.detach().argmax(1) == y).sum()
        sums.seen += len(x)
        return loss

    def postfix(self) -> dict[str, str]:
        seen = max(self.sums.seen, 1)
        return {"loss": f"{float(self.sums.loss) / seen:.4f}", "acc0": f"{int(self.sums.correct[0]) / seen:.3f}"}

    def finish_epoch(self):
        from moco.exits.training import ExitEpochLog, exit_accuracies

        loss_sum, correct, seen = self._reduced(self.sums.loss, self.sums.correct, torch.tensor(self.sums.seen))
        seen = max(int(seen), 1)
        counts = correct.tolist()
        train_acc = tuple(c / seen if i < self._n_outs else math.nan for i, c in enumerate(counts))
        val = exit_accuracies(self.model, self.val_data) if self.val_data is not None else None
        return ExitEpochLog(self.epoch + 1, float(loss_sum) / seen, train_acc, val, self._seconds())

    def epoch_metrics(self, log) -> dict[str, float]:
        out = {"loss": log.loss, "epoch_seconds": log.seconds}
        out.update({f"train_accuracy_{i}": a for i, a in enumerate(log.train_accuracy) if not math.isnan(a)})
        if log.val_accuracy:
            out.update({f"val_accuracy_{i}": a for i, a in enumerate(log.val_accuracy)})
        return out

    def epoch_lines(self, log) -> list[str]:
        accs = " ".join(f"{a:.4f}" for a in log.train_accuracy)
        val = f", val acc per exit {' '.join(f'{a:.4f}' for a in log.val_accuracy)}" if log.val_accuracy else ""
        return [f"exits {self.mode} epoch {log.epoch}: loss {log.loss:.4f}, train acc per exit {accs}{val} "
                f"({log.seconds:.1f} s)"]


class NoiseSearchModule(TrainingModule):
    """:func:`moco.approx.train_gradient`'s step: ``CE - lmbd * sum_l (ops_l / ops) * min(|sigma_l|, sigma_max)``.

    The epoch log is a dict ``{"epoch" (0-based), "loss" (mean CE), "train_accuracy", "sigma": {layer: |sigma_l|}}``.
    """

    label = "noise search"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, lmbd: float, sigma_max: float,
                 fractions: dict[str, float], epochs: int, lr: float):
        super().__init__(model, optimizer, epochs=epochs)
        self.lmbd = lmbd
        self.sigma_max = sigma_max
        self.fractions = dict(fractions)
        self.lr = lr

    def check_batch(self, x, y):
        if y is None:
            raise MocoError("train_gradient needs labels: pass (x, y) or a labelled dataset")
        return x, y.long()

    def check_data(self, x, y):
        x, y = self.check_batch(x, y)
        self._checked_data = True
        return x, y

    def reset_sums(self) -> None:
        self.sums = _Sums(self.device)

    def training_step(self, batch, batch_idx):
        from moco.approx.agn import noise_penalty

        x, y = batch
        logits = self.model(x)
        ce = F.cross_entropy(logits, y)
        loss = ce - self.lmbd * noise_penalty(self.model, self.fractions, self.sigma_max)
        if not torch.isfinite(loss):
            raise MocoError(f"noise search diverged (loss {float(loss)}) in epoch {self.epoch + 1}; lower lr={self.lr}")
        sums = self.sums
        sums.loss += ce.detach().to(sums.loss.dtype) * len(x)
        sums.correct += (logits.detach().argmax(1) == y).sum()
        sums.seen += len(x)
        return loss

    def finish_epoch(self):
        from moco.approx.agn import sigmas

        loss_sum, correct, seen = self._reduced(self.sums.loss, self.sums.correct, torch.tensor(self.sums.seen))
        seen = max(int(seen), 1)
        return {"epoch": self.epoch, "loss": float(loss_sum) / seen, "train_accuracy": int(correct) / seen,
                "sigma": sigmas(self.model)}

    def epoch_metrics(self, log) -> dict[str, float]:
        return {"loss": log["loss"], "train_accuracy": log["train_accuracy"],
                **{f"sigma/{name}": v for name, v in log["sigma"].items()}}

    def epoch_lines(self, log) -> list[str]:
        return [f"Epoch: {log['epoch']}", *(f"Layer: {name} | sigma_l: {v:+.3f}" for name, v in log["sigma"].items())]


# ----------------------------------------------------------------------------------------- callbacks


class _ProgressBar(pl.Callback):
    """A tqdm bar per epoch counting images, with the running loss and accuracy (rank 0 only).

    The postfix is computed only when the bar is about to redraw (it reads the running sums, which on a
    GPU waits for the device)."""

    def __init__(self) -> None:
        self.bar = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        batches = pl_module.batches
        total = batches.samples_per_process if batches is not None else None
        if total is None:
            total = -(-num_samples(trainer.train_dataloader) // trainer.world_size) if trainer.world_size > 1 \
                else num_samples(trainer.train_dataloader)
        self.bar = tqdm(total=total, desc=pl_module.bar_label(), unit="img", leave=False,
                        disable=not trainer.is_global_zero)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.bar
        if bar is None or bar.disable:
            return
        if bar.n == 0 or time.time() - bar.last_print_t >= bar.mininterval:
            bar.set_postfix(pl_module.postfix(), refresh=False)
        bar.update(len(batch[0]))

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close()


class _EpochEnd(pl.Callback):
    """The end of every epoch: the log into ``history`` and the metrics, the epoch line, ``on_epoch`` and
    :func:`moco.track.notify_epoch`, the checkpoint (rank 0 writes it) and the early stop on the target."""

    def __init__(self, *, write, on_epoch, save, target, hparams) -> None:
        self.write, self.on_epoch, self.save, self.target, self.hparams = write, on_epoch, save, target, hparams

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.hparams:
            for lg in trainer.loggers:
                lg.log_hyperparams(self.hparams)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        log = pl_module.finish_epoch()
        pl_module.history.append(log)
        metrics = {k: float(v) for k, v in pl_module.epoch_metrics(log).items() if v is not None and math.isfinite(v)}
        if metrics:
            pl_module.log_dict(metrics, on_step=False, on_epoch=True)
        if trainer.is_global_zero:
            if self.write is not None:
                for line in pl_module.epoch_lines(log):
                    self.write(line)
            if self.on_epoch is not None:
                self.on_epoch(log)
            notify_epoch(log)  # to the trackers of enclosing moco.track.observe_epochs blocks (none: a no-op)
            if self.save is not None:
                self.save(pl_module.history)
        if self.target is not None and self.target(log):
            pl_module.stopped = "target"
            trainer.should_stop = True


# ----------------------------------------------------------------------------------------- the driver


def check_options(*, on_epoch: Any = None, callbacks: Any = None, logger: Any = None,
                  trainer_kwargs: Any = None) -> None:
    """TypeError / MocoError for engine options of the wrong kind (before any training starts)."""
    from lightning.pytorch.loggers import Logger

    if on_epoch is not None and not callable(on_epoch):
        raise TypeError(f"on_epoch must be a callable taking each epoch's log, got {type(on_epoch).__name__}")
    items = [callbacks] if isinstance(callbacks, pl.Callback) else list(callbacks or [])
    for i, cb in enumerate(items):
        if not isinstance(cb, pl.Callback):
            raise TypeError(f"callbacks must be lightning.pytorch.Callback objects; item {i} is a {type(cb).__name__}")
    loggers = [] if logger is None or logger is False else (list(logger) if isinstance(logger, (list, tuple)) else [logger])
    for lg in loggers:
        if not isinstance(lg, Logger):
            raise TypeError(f"logger must be a Lightning logger (lightning.pytorch.loggers.Logger, e.g. MLFlowLogger), "
                            f"got {type(lg).__name__}")
    if trainer_kwargs is not None:
        if not isinstance(trainer_kwargs, dict):
            raise TypeError(f"trainer_kwargs must be a dict of Trainer arguments, got {type(trainer_kwargs).__name__}")
        taken = sorted(set(trainer_kwargs) & set(_RESERVED))
        if taken:
            raise MocoError(f"trainer_kwargs may not set {', '.join(taken)}: moco sets them (epochs=, callbacks=, "
                            "logger=, accelerator=, devices=, precision= are arguments of their own)")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No Lightning info logs ("GPU available", tips, "Trainer.fit stopped") and no Lightning warnings."""
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"lightning(\.|$)")
            warnings.filterwarnings("ignore", category=PossibleUserWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _keep_sigint() -> Iterator[None]:
    """Restore the SIGINT handler afterwards (Lightning ignores SIGINT after a KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def run_training(
    module: TrainingModule,
    data: Any,
    *,
    epochs: int,
    start_epoch: int = 0,
    batch_size: int = 128,
    seed: int = 0,
    reseed_each_epoch: bool = True,
    progress: bool = False,
    write: Callable[[str], Any] | None = None,
    save: Callable[[list], Any] | None = None,
    target: Callable[[Any], bool] | None = None,
    on_epoch: Callable[[Any], Any] | None = None,
    callbacks: Sequence[pl.Callback] | pl.Callback | None = None,
    logger: Any = None,
    accelerator: str = "cpu",
    devices: int | str | Sequence[int] = 1,
    precision: str | int = "32-true",
    trainer_kwargs: dict | None = None,
    hparams: dict | None = None,
) -> str:
    """Train ``module`` on ``data`` for epochs ``start_epoch .. epochs - 1`` with Lightning; returns why it
    stopped (``"epochs"`` or ``"target"``). The epoch logs are in ``module.history``.

    ``data``: ``(x, y)`` tensors or a Dataset (batched by :class:`SeededBatches`: ``batch_size`` per
    device, shuffled from ``seed``), or a DataLoader (used as it is). ``progress``: a tqdm bar per epoch;
    ``write``: where the epoch's lines go (None: nowhere). After each epoch: ``on_epoch(log)``,
    ``save(history)`` (a checkpoint) and the stop when ``target(log)`` is true. ``callbacks``, ``logger``,
    ``accelerator``, ``devices``, ``precision`` and ``trainer_kwargs`` go to ``lightning.pytorch.Trainer``
    (see :func:`moco.train.fit`); ``hparams`` are logged to the logger. Spawn-based strategies
    (``ddp_spawn``, notebooks) are refused: the calling process must be rank 0, which trains the model
    in place and keeps the history. Lightning's set-up errors become MocoError.
    """
    try:
        return _run(module, data, epochs=epochs, start_epoch=start_epoch, batch_size=batch_size, seed=seed,
                    reseed_each_epoch=reseed_each_epoch, progress=progress, write=write, save=save, target=target,
                    on_epoch=on_epoch, callbacks=callbacks, logger=logger, accelerator=accelerator, devices=devices,
                    precision=precision, trainer_kwargs=trainer_kwargs, hparams=hparams)
    finally:
        module.restore()


def _run(module: TrainingModule, data: Any, *, epochs, start_epoch, batch_size, seed, reseed_each_epoch, progress,
         write, save, target, on_epoch, callbacks, logger, accelerator, devices, precision, trainer_kwargs,
         hparams) -> str:
    check_options(on_epoch=on_epoch, callbacks=callbacks, logger=logger, trainer_kwargs=trainer_kwargs)
    if isinstance(data, DataLoader):
        loader: Any = data
        module.batches = None
    else:
        loader = SeededBatches(data, batch_size, seed, reseed_each_epoch=reseed_each_epoch)
        if loader.pair is not None:
            loader.pair = module.check_data(*loader.pair)
        module.batches = loader
    module.epoch_offset = start_epoch
    own: list[pl.Callback] = [_ProgressBar()] if show_progress(progress) else []
    own.append(_EpochEnd(write=write, on_epoch=on_epoch, save=save, target=target, hparams=hparams))
    extra = [callbacks] if isinstance(callbacks, pl.Callback) else list(callbacks or [])
    has_logger = logger is not None and logger is not False
    kwargs: dict[str, Any] = dict(
        max_epochs=epochs - start_epoch, accelerator=accelerator, devices=devices, precision=precision,
        logger=logger if has_logger else False, callbacks=own + extra, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        # nothing is logged per step: with no logger, never look for step metrics
        log_every_n_steps=50 if has_logger else 1_000_000_000,
    )
    kwargs.update(trainer_kwargs or {})
    setting = f"accelerator={accelerator!r}, devices={devices!r}, precision={precision!r}"
    with _quiet(), _keep_sigint(), torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            trainer = pl.Trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError, RuntimeError) as exc:
            raise MocoError(f"cannot set up training ({setting}): {exc}") from None
        from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

        if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            raise MocoError(f"strategy {type(trainer.strategy).__name__} trains in spawned processes; moco trains the "
                            "model in place in the calling process: use strategy='ddp' (one process per device)")
        try:
            trainer.fit(module, train_dataloaders=loader)
        except RuntimeError as exc:
            # after a step (or out of memory) it is not the inputs: PyTorch's error as it is
            if trainer.global_step or start_epoch or isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            pair = getattr(loader, "pair", None)
            raise input_error(exc, tuple(pair[0].shape) if pair is not None else None, "train") from None
        except SystemExit as exc:
            # Lightning turns Ctrl+C into a graceful shutdown and sys.exit(1); the caller gets the interrupt
            if isinstance(exc.__context__, KeyboardInterrupt):
                raise exc.__context__ from None
            raise
        except MisconfigurationException as exc:
            raise MocoError(f"Lightning refused the training ({setting}): {exc}") from None
    return module.stopped
