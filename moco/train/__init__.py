"""Training and evaluation: ``fit`` (seeded, progress bar, early stop on a target train accuracy, seed 003
trains "until 90% train accuracy"; resumable checkpoints loaded with ``weights_only=True``), ``evaluate``,
``predict``, checkpoints, and ``pretrained(name, dataset)``, which trains once and caches the result.

Every training loop of moco runs on one engine, :mod:`moco.train.engine`, built on Lightning's
``Trainer`` (GPU, DDP, precision options, callbacks and loggers come with it; the defaults train on the
CPU). Lightning is imported only when a training starts: ``import moco.train`` stays fast.

Modules: :mod:`~moco.train.fitting` (``fit``, ``EpochLog``, ``FitResult``, distillation),
:mod:`~moco.train.engine` (the Lightning modules and the driver), :mod:`~moco.train.evaluation`,
:mod:`~moco.train.checkpoint`, :mod:`~moco.train.recipes` (``pretrained``).
"""

from moco.train.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, _read_checkpoint, load_checkpoint, save_checkpoint
from moco.train.evaluation import Evaluation, _check_batch, evaluate, predict
from moco.train.fitting import EpochLog, FitResult, _make_optimizer, check_distillation, distillation_loss, fit
from moco.train.recipes import _QUICK_TRAIN_SIZE, _RECIPES, pretrained

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "EpochLog", "Evaluation", "FitResult", "check_distillation",
    "distillation_loss", "evaluate", "fit", "load_checkpoint", "predict", "pretrained", "save_checkpoint",
]
