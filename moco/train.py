"""Training and evaluation helpers: a small, seeded loop with a progress bar, early stop on a target
train accuracy (seed 003 trains "until 90% train accuracy"), resumable checkpoints loaded with
``weights_only=True``, and ``pretrained(name, dataset)`` which trains once and caches the result.

A plain loop is used instead of Lightning: it is a few dozen lines, has no extra dependency, and keeps
every step (and its cost) visible.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from moco.batches import check_labels, iter_batches, num_samples
from moco.errors import CheckpointError, MocoError
from moco.io import atomic_path, cache_dir

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "EpochLog", "Evaluation", "FitResult", "check_distillation",
    "distillation_loss", "evaluate", "fit", "load_checkpoint", "predict", "pretrained", "save_checkpoint",
]

CHECKPOINT_FORMAT = "moco.checkpoint"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class EpochLog:
    """One epoch of training: mean loss, running train accuracy, optional validation accuracy, seconds."""

    epoch: int
    loss: float
    train_accuracy: float
    val_accuracy: float | None
    seconds: float


@dataclass(frozen=True)
class FitResult:
    """What ``fit`` did: the per-epoch history and why it stopped (``"epochs"``, ``"target"``, ``"resumed-done"``)."""

    history: tuple[EpochLog, ...]
    stopped: str
    seconds: float

    @property
    def final_train_accuracy(self) -> float:
        return self.history[-1].train_accuracy if self.history else float("nan")


@dataclass(frozen=True)
class Evaluation:
    """Accuracy (fraction in [0, 1]) and mean cross-entropy loss over ``n`` samples."""

    accuracy: float
    loss: float
    n: int


def _make_optimizer(model: nn.Module, optimizer: str, lr: float, momentum: float, weight_decay: float):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise MocoError("the model has no trainable parameters; unfreeze some before calling fit")
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise MocoError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")


def _check_batch(x: torch.Tensor, y: torch.Tensor | None, num_classes: int | None = None,
                 what: str = "labels") -> torch.Tensor:
    if y is None:
        raise MocoError("training and evaluation need labels: pass (x, y), a labelled Dataset or a DataLoader")
    if not torch.isfinite(x).all():
        raise MocoError("the inputs contain NaN or inf; clean or normalise the data first")
    return check_labels(y, num_classes, what=what)


def check_distillation(distillation: float, temperature: float) -> None:
    """Raise MocoError unless ``distillation`` is a weight in [0, 1] and ``temperature`` a number > 0."""
    for name, value in (("distillation", distillation), ("temperature", temperature)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MocoError(f"{name} must be a number, got {value!r}")
    if not 0.0 <= distillation <= 1.0:
        raise MocoError(f"distillation is a weight in [0, 1], got {distillation!r}")
    if temperature <= 0:
        raise MocoError(f"temperature must be > 0, got {temperature!r}")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Knowledge-distillation term (Hinton et al. 2015): ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``.

    ``student`` and ``teacher`` are logits ``[B, C]``; the teacher's are detached (no gradient flows to
    them); averaged over the batch. The ``T^2`` keeps its gradient scale comparable to cross-entropy's.
    """
    soft = F.log_softmax(teacher.detach() / temperature, dim=1)
    kl = F.kl_div(F.log_softmax(student / temperature, dim=1), soft, reduction="batchmean", log_target=True)
    return temperature**2 * kl


def fit(
    model: nn.Module,
    train_data: Any,
    *,
    epochs: int = 1,
    batch_size: int = 128,
    lr: float = 1e-3,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    teacher: nn.Module | None = None,
    distillation: float = 0.5,
    temperature: float = 4.0,
    seed: int = 0,
    target_train_accuracy: float | None = None,
    val_data: Any = None,
    checkpoint: str | Path | None = None,
    arch: dict | None = None,
    progress: bool = True,
) -> FitResult:
    """Train ``model`` in place with cross-entropy and return the history.

    ``train_data`` is an ``(x, y)`` pair, a labelled Dataset or a DataLoader. Shuffling and dropout are
    seeded by ``seed`` without touching the caller's global RNG state. Training stops after ``epochs``
    or, when ``target_train_accuracy`` (a fraction, e.g. 0.9) is given, after the first epoch whose
    running train accuracy reaches it. With ``checkpoint=PATH`` the model and optimizer are saved
    atomically after every epoch and an interrupted run resumes from the last finished epoch.
    ``schedule``: ``"constant"`` learning rate, or ``"cosine"`` (annealed from ``lr`` to 0 over all
    ``epochs``, step by step; computed from the step index, so a resumed run continues the same curve).
    ``teacher``: knowledge distillation (Hinton et al. 2015) from another model, run in eval mode
    without gradients (e.g. the original before compression): the loss becomes ``(1 - distillation)
    * CE + distillation * T^2 * KL(softmax(teacher / T) || softmax(model / T))`` with ``T = temperature``.
    """
    if epochs < 1:
        raise MocoError(f"epochs must be >= 1, got {epochs}")
    if schedule not in ("constant", "cosine"):
        raise MocoError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if target_train_accuracy is not None and not 0 < target_train_accuracy <= 1:
        raise MocoError(f"target_train_accuracy is a fraction in (0, 1], got {target_train_accuracy}")
    if teacher is not None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        if teacher is model:
            raise MocoError("teacher is the model being trained; pass a separate model (e.g. the original)")
        check_distillation(distillation, temperature)
    num_samples(train_data)  # fails early with a clear TypeError for unsupported data
    opt = _make_optimizer(model, optimizer, lr, momentum, weight_decay)
    history: list[EpochLog] = []
    start_epoch = 0
    if checkpoint is not None and Path(checkpoint).exists():
        state = _read_checkpoint(checkpoint)
        model.load_state_dict(state["state_dict"])
        if "optimizer" in state:
            opt.load_state_dict(state["optimizer"])
        history = [EpochLog(**h) for h in state.get("meta", {}).get("history", [])]
        start_epoch = len(history)
        if history and target_train_accuracy is not None and history[-1].train_accuracy >= target_train_accuracy:
            return FitResult(tuple(history), "resumed-done", 0.0)
    t0 = time.perf_counter()
    stopped = "epochs"
    was_training = model.training
    teacher_was_training = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.eval()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        for epoch in range(start_epoch, epochs):
            gen.manual_seed(seed * 100_003 + epoch)  # the same shuffle per epoch on resume
            model.train()
            te = time.perf_counter()
            total_loss, correct, seen = 0.0, 0, 0
            n_total = num_samples(train_data)
            steps_per_epoch = -(-n_total // batch_size)
            step = epoch * steps_per_epoch
            bar = tqdm(total=n_total, desc=f"epoch {epoch + 1}/{epochs}", unit="img", disable=not progress, leave=False)
            for x, y in iter_batches(train_data, batch_size, shuffle=True, generator=gen):
                logits = model(x)
                y = _check_batch(x, y, int(logits.shape[-1]), "training labels")
                loss = F.cross_entropy(logits, y)
                if teacher is not None and distillation > 0:
                    with torch.no_grad():
                        target = teacher(x)
                    loss = (1 - distillation) * loss + distillation * distillation_loss(logits, target, temperature)
                if not torch.isfinite(loss):
                    raise MocoError(f"training diverged (loss {loss.item()}) in epoch {epoch + 1}; lower lr={lr}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if schedule == "cosine":
                    for group in opt.param_groups:
                        group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / (epochs * steps_per_epoch)))
                opt.step()
                step += 1
                total_loss += loss.item() * len(x)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(x)
                bar.update(len(x))
                bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}")
            bar.close()
            val_acc = evaluate(model, val_data, batch_size=max(batch_size, 512)).accuracy if val_data is not None else None
            log = EpochLog(epoch + 1, total_loss / max(seen, 1), correct / max(seen, 1), val_acc, time.perf_counter() - te)
            history.append(log)
            if progress:
                val = f", val acc {val_acc:.4f}" if val_acc is not None else ""
                tqdm.write(f"epoch {log.epoch}: loss {log.loss:.4f}, train acc {log.train_accuracy:.4f}{val} ({log.seconds:.1f} s)")
            if checkpoint is not None:
                save_checkpoint(model, checkpoint, arch=arch, meta={"history": [asdict(h) for h in history]}, optimizer=opt)
            if target_train_accuracy is not None and log.train_accuracy >= target_train_accuracy:
                stopped = "target"
                break
    model.train(was_training)
    if teacher is not None:
        teacher.train(teacher_was_training)
    return FitResult(tuple(history), stopped, time.perf_counter() - t0)


@torch.inference_mode()
def evaluate(model: nn.Module, data: Any, *, batch_size: int = 1000) -> Evaluation:
    """Accuracy and mean cross-entropy of ``model`` (in eval mode, restored afterwards) on labelled ``data``."""
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    try:
        for x, y in iter_batches(data, batch_size):
            y = _check_batch(x, y)
            logits = model(x)
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            seen += len(x)
    finally:
        model.train(was_training)
    if seen == 0:
        raise MocoError("evaluation data is empty")
    return Evaluation(correct / seen, total_loss / seen, seen)


@torch.inference_mode()
def predict(model: nn.Module, data: Any, *, batch_size: int = 1000) -> torch.Tensor:
    """Model outputs (logits ``[N, classes]``) for all of ``data``, in eval mode, batched."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x) for x, _ in iter_batches(data, batch_size)])
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    arch: dict | None = None,
    meta: dict | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Save ``model``'s weights atomically to ``path`` as a moco checkpoint.

    ``arch = {"name": <zoo name>, "kwargs": {...}}`` lets :func:`load_checkpoint` rebuild the model
    without the caller's code. Everything stored is tensors and plain Python values, so it loads with
    ``torch.load(..., weights_only=True)`` (no pickle of user objects).
    """
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": json.loads(json.dumps(dict(arch), default=str)) if arch else None,
        # plain JSON types only, so the file loads with weights_only=True (e.g. torch.__version__ is a
        # TorchVersion object that the safe unpickler refuses)
        "meta": json.loads(json.dumps(dict(meta or {}), default=str)),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def _read_checkpoint(path: str | Path) -> dict:
    from moco.io import read_torch_file

    path = Path(path)
    state = read_torch_file(path, what="checkpoint", error=CheckpointError)
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        if state.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"checkpoint {path} has version {state.get('version')}; this moco reads {CHECKPOINT_VERSION}")
        return state
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "arch": None, "meta": {}, "state_dict": state}
    raise CheckpointError(f"{path} is neither a moco checkpoint nor a state_dict")


def load_checkpoint(path: str | Path, model: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Load a checkpoint with ``weights_only=True``; returns ``(model in eval mode, meta)``.

    Pass ``model`` to load a plain state_dict (or a moco checkpoint) into your own architecture;
    otherwise the checkpoint must name a zoo architecture (``arch``), which is rebuilt.
    """
    from moco.models import create

    state = _read_checkpoint(path)
    if model is None:
        arch = state.get("arch")
        if not arch:
            raise CheckpointError(f"checkpoint {path} does not name its architecture; pass model= to load it into yours")
        if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
            raise CheckpointError(f"checkpoint {path} has an arch that is not {{'name': <zoo model>, 'kwargs': {{...}}}} "
                                  f"(got {type(arch).__name__}); pass model= to load it into your architecture")
        kwargs = arch.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise CheckpointError(f"checkpoint {path}: arch kwargs must be a dict, got {type(kwargs).__name__}")
        try:
            model = create(arch["name"], **kwargs)
        except (TypeError, MocoError) as exc:
            raise CheckpointError(f"checkpoint {path} names an architecture moco cannot build: {exc}") from None
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit the model: {first}") from None
    meta = dict(state.get("meta", {}))
    meta["arch"] = state.get("arch")
    return model.eval(), meta


# ----------------------------------------------------------------------------------------- pretrained

# Training recipes of ``pretrained``: enough to reach the seeds' accuracies on 2 CPU cores in minutes.
_RECIPES: dict[tuple[str, str], dict[str, Any]] = {
    ("seed_cnn", "mnist"): dict(epochs=2, batch_size=128, lr=1e-3, optimizer="adam"),
    ("seed_cnn", "digits"): dict(epochs=8, batch_size=64, lr=1e-3, optimizer="adam"),
    ("seed_cnn", "fashion_mnist"): dict(epochs=2, batch_size=128, lr=1e-3, optimizer="adam"),
    ("fashion_cnn", "fashion_mnist"): dict(epochs=5, batch_size=64, lr=1e-2, optimizer="sgd"),
    ("lenet5", "mnist"): dict(epochs=3, batch_size=128, lr=1e-3, optimizer="adam"),
    # 2 constant-lr epochs left vgg_bn at 84.8 % (BatchNorm statistics of a still-moving net);
    # a cosine-annealed schedule ends on a settled net
    ("vgg_bn", "fashion_mnist"): dict(epochs=4, batch_size=128, lr=2e-3, optimizer="adam", schedule="cosine"),
}
_QUICK_TRAIN_SIZE = 10_000


def pretrained(
    name: str,
    dataset: str,
    *,
    root: str | Path | None = None,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    model_kwargs: dict | None = None,
) -> tuple[nn.Module, dict]:
    """A zoo model trained on ``dataset``, trained once and cached under ``cache_dir()/models``.

    Returns ``(model in eval mode, meta)`` with meta keys ``accuracy_test``, ``dataset``,
    ``data_source``, ``checkpoint``, ``recipe``, ``seed``, ``train_seconds``. ``quick=True`` trains one
    epoch on the first 10,000 training images (a separate cache entry) for fast smoke runs.
    """
    from moco.data import load_dataset
    from moco.models import create, get_spec

    get_spec(name)
    recipe = dict(_RECIPES.get((name, dataset), dict(epochs=2, batch_size=128, lr=1e-3, optimizer="adam")))
    if quick:
        recipe["epochs"] = 1
    kwargs = dict(model_kwargs or {})
    tag = "-".join(f"{k}{v}" for k, v in sorted(kwargs.items()))
    fname = f"{name}{'-' + tag if tag else ''}-{dataset}-seed{seed}{'-quick' if quick else ''}.pt"
    path = cache_dir() / "models" / fname
    arch = {"name": name, "kwargs": kwargs}
    if path.exists():
        try:
            model, meta = load_checkpoint(path)
            if meta.get("complete") and meta.get("recipe") == recipe:  # a stale entry (older recipe) retrains
                meta["checkpoint"] = str(path)
                return model, meta
        except CheckpointError:
            path.unlink()  # a cache entry we wrote but cannot read: rebuild it
    train = load_dataset(dataset, root, train=True)
    test = load_dataset(dataset, root, train=False)
    if quick and len(train) > _QUICK_TRAIN_SIZE:
        train = train.subset(range(_QUICK_TRAIN_SIZE))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = create(name, **kwargs)
    partial = path.with_name(path.stem + ".partial.pt")  # resumable: an interrupted training continues here
    result = fit(model, train.tensors(), seed=seed, checkpoint=partial, arch=arch, progress=progress, **recipe)
    acc = evaluate(model, test.tensors())
    meta = {
        "complete": True,
        "accuracy_test": acc.accuracy,
        "loss_test": acc.loss,
        "train_accuracy": result.final_train_accuracy,
        "dataset": dataset,
        "data_source": train.source,
        "n_train": len(train),
        "recipe": recipe,
        "seed": seed,
        "train_seconds": result.seconds,
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
    }
    save_checkpoint(model, path, arch=arch, meta=meta)
    partial.unlink(missing_ok=True)
    meta["checkpoint"] = str(path)
    meta["arch"] = arch
    return model.eval(), meta
