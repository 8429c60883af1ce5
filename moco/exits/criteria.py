"""Exit criteria: how an exit decides, from its logits, that a sample may stop there.

A criterion maps logits ``[B, C]`` to one score per sample (``score``) and compares it with the
exit's threshold: with ``higher_is_confident`` a sample exits when ``score >= threshold`` (max
softmax probability), otherwise when ``score <= threshold`` (entropy). Plug in your own by
subclassing :class:`Criterion` (set ``name``, ``higher_is_confident`` and ``score``); give it a
``params()`` dict of plain values so it can be saved, and pass an instance to ``load_exits`` when
its name is not built in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F

from moco.errors import MocoError

__all__ = ["Criterion", "Entropy", "MaxProb", "get_criterion", "CRITERIA"]


class Criterion(ABC):
    """Base class: ``score(logits) -> [B]`` and the direction in which a score means "confident"."""

    name: str = "criterion"
    higher_is_confident: bool = True

    @abstractmethod
    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """One float score per row of ``logits`` ``[B, C]``."""

    def exits(self, scores, threshold: float):
        """Bool mask (tensor or numpy, like ``scores``): True where the sample may exit at ``threshold``."""
        return scores >= threshold if self.higher_is_confident else scores <= threshold

    def params(self) -> dict[str, Any]:
        """Constructor keyword arguments as plain JSON values (saved with the exits)."""
        return {}

    def spec(self) -> dict[str, Any]:
        """``{"name": ..., "params": {...}}``: what :func:`get_criterion` rebuilds it from."""
        return {"name": self.name, "params": self.params()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class Entropy(Criterion):
    """Softmax entropy in nats (seed 004): exit when ``entropy <= threshold`` (0 = certain, ln C = uniform)."""

    name = "entropy"
    higher_is_confident = False

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=1)
        return -(logp.exp() * logp).sum(dim=1)


class MaxProb(Criterion):
    """Largest softmax probability (a fraction in (0, 1]): exit when ``max_prob >= threshold``."""

    name = "max_prob"
    higher_is_confident = True

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return (logits.max(dim=1).values - torch.logsumexp(logits, dim=1)).exp()


CRITERIA: dict[str, type[Criterion]] = {"entropy": Entropy, "max_prob": MaxProb}
"""Built-in criteria by name."""


def get_criterion(criterion: str | Criterion | dict) -> Criterion:
    """A :class:`Criterion` from an instance, a name (``"entropy"``, ``"max_prob"``) or a saved spec dict."""
    if isinstance(criterion, Criterion):
        return criterion
    if isinstance(criterion, dict):
        name, params = criterion.get("name"), dict(criterion.get("params") or {})
    elif isinstance(criterion, str):
        name, params = criterion, {}
    else:
        raise TypeError(f"criterion must be a name, a Criterion or a spec dict, not {type(criterion).__name__}")
    if name not in CRITERIA:
        raise MocoError(
            f"unknown criterion {name!r}; built in: {', '.join(CRITERIA)} (pass an instance of your own "
            f"Criterion subclass for anything else)"
        )
    return CRITERIA[name](**params)
