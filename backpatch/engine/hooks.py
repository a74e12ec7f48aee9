"""Hook ownership and locking: every hook of a call acts for that call only, and is always removed.

Module hooks are global to the module, so every hook is owned by one call (:class:`CallHooks`, the
steering-vectors handle pattern): it acts only while that call is the current one of the running thread, and passes
through untouched for any other call, be it a plain ``generate()`` in another thread, a raw forward from a thread
that never used backpatch, or a ``disabled()`` call nested in a patched one (:func:`plain_call`). A per-model lock
still runs one patched call per model at a time (:func:`model_lock`); it also serializes ``apply()`` blocks and
``unwrap()`` with the calls in flight.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["BackpatchRuntimeError", "CallHooks", "current_call", "model_lock", "plain_call"]


class BackpatchRuntimeError(RuntimeError):
    """A call that back-patching cannot serve as asked (e.g. no ``input_ids``, a pre-filled cache)."""


# ------------------------------------------------------------------------------------------- call ownership
class _CurrentCall(threading.local):
    #: the :class:`CallHooks` of the back-patched call running in this thread (None: no call, or a plain one)
    hooks: CallHooks | None = None


_CURRENT = _CurrentCall()


@contextmanager
def current_call(hooks: CallHooks | None) -> Iterator[None]:
    previous = _CURRENT.hooks
    _CURRENT.hooks = hooks
    try:
        yield
    finally:
        _CURRENT.hooks = previous


@contextmanager
def plain_call() -> Iterator[None]:
    """Inside, no backpatch hook acts in this thread: a plain call nested in a back-patched one stays plain."""
    with current_call(None):
        yield


class CallHooks:
    """Every hook of one back-patched call, owned by it (the steering-vectors handle pattern).

    A hook registered here runs its function only while this call is the current call of the running thread
    and is not closed; for every other call (other threads, plain calls nested in this one) it returns None
    and changes nothing. :meth:`close` removes every hook registered here and nothing else; it is idempotent.
    """

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.closed = False

    def acting(self) -> bool:
        """True in the thread and call that own these hooks, while they are installed."""
        return _CURRENT.hooks is self and not self.closed

    def forward_hook(self, module: nn.Module, fn: Any) -> torch.utils.hooks.RemovableHandle:
        return self._register(module.register_forward_hook, fn, {})

    def forward_pre_hook(
        self, module: nn.Module, fn: Any, with_kwargs: bool = False
    ) -> torch.utils.hooks.RemovableHandle:
        return self._register(module.register_forward_pre_hook, fn, {"with_kwargs": with_kwargs})

    def _register(self, register: Any, fn: Any, options: dict) -> torch.utils.hooks.RemovableHandle:
        if self.closed:
            raise BackpatchRuntimeError("backpatch: a hook was registered after its call ended; please report this")

        def owned(module: nn.Module, *rest: Any) -> Any:
            # *rest: another thread may see this hook while it is being removed, when torch has already
            # forgotten that it takes kwargs; the check comes first, so that call just passes through.
            if not self.acting():
                return None
            return fn(module, *rest)

        handle = register(owned, **options)
        self._handles.append(handle)
        return handle

    def close(self) -> None:
        self.closed = True
        while self._handles:
            self._handles.pop().remove()


# ------------------------------------------------------------------------------------------------ locking
class _ModelLock:
    """A lock per model that also refuses same-thread re-entry (which would stack two sessions' hooks).

    ``blocks`` is a second, reentrant lock for ``apply()`` blocks, which replace ``generate`` on the module
    itself: two blocks on one model in different threads run one after the other, not interleaved."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self.blocks = threading.RLock()

    @contextmanager
    def hold(self, nested: str = "") -> Iterator[None]:
        """Wait for the model's patched call in flight (if any) to end, then hold the model."""
        if self._owner == threading.get_ident():
            raise BackpatchRuntimeError(
                nested or "a back-patched call on this model is already running in this thread (nested "
                "generate()); nested back-patched calls on one model are not supported"
            )
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None


_LOCKS: weakref.WeakKeyDictionary[nn.Module, _ModelLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(module: nn.Module) -> _ModelLock:
    """The lock shared by every wrapper and ``apply()`` of this module: one patched call at a time."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = _ModelLock()
        return lock
