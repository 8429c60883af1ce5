"""Which module of a model is executing right now, via *global* module hooks.

:class:`CallTracker` registers ``torch.nn.modules.module.register_module_forward_pre_hook`` and
``register_module_forward_hook`` for the duration of a ``with`` block and removes them on exit, so
the model object is never touched (no hooks on its modules, no attributes, no buffers). Modules that
are not part of the model (say, one built inside a ``forward``) are ignored: their work goes to the
innermost model module around them. A submodule whose ``forward`` is called directly instead of
through ``module(...)`` is invisible to hooks, so its work goes to its caller.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

__all__ = ["CallTracker", "module_names"]


def module_names(model: nn.Module) -> dict[int, str]:
    """``id(module) -> qualified name`` as in ``model.named_modules()`` (the root is ``""``)."""
    return {id(module): name for name, module in model.named_modules()}


class CallTracker:
    """Context manager keeping the stack of the model's modules currently inside ``forward``.

    ``current()`` is the innermost one's qualified name (``""``, the root, outside any), ``calls``
    counts calls per name. ``on_enter(name)`` runs at the end of a module's pre-hook and
    ``on_exit(name, output)`` at the start of its forward hook; both are optional.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        on_enter: Callable[[str], None] | None = None,
        on_exit: Callable[[str, Any], None] | None = None,
    ):
        self._names = module_names(model)
        self._on_enter = on_enter
        self._on_exit = on_exit
        self._stack: list[tuple[int, str]] = []
        self._handles: list[Any] = []
        self.calls: Counter = Counter()

    def current(self) -> str:
        """Qualified name of the innermost model module now executing (``""`` when none is)."""
        return self._stack[-1][1] if self._stack else ""

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        name = self._names.get(id(module))
        if name is None:
            return
        self._stack.append((id(module), name))
        self.calls[name] += 1
        if self._on_enter is not None:
            self._on_enter(name)

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._stack or self._stack[-1][0] != id(module):
            return
        _, name = self._stack[-1]
        if self._on_exit is not None:
            self._on_exit(name, output)
        self._stack.pop()

    def __enter__(self) -> "CallTracker":
        self._handles = [
            register_module_forward_pre_hook(self._pre_hook),
            register_module_forward_hook(self._post_hook, always_call=True),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._stack.clear()
