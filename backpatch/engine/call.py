"""One back-patched call: the per-call context every method installs into, and the loop that installs them.

The engine does not know any method. :func:`generation_session` takes the resolved settings of a preset (preset
key -> setting), asks the registry (:mod:`backpatch.registry`) for each key's method, opens the ones that act, in
their install order, with one :class:`Call` they all share, and closes everything when the call ends, whatever
happens. What methods tell each other goes through the :class:`Call`: whether the batch carries null-audio rows,
whether a capture pass is running, the sessions opened so far, the gate values a caller measured.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

from ..registry import Method, get_method
from .architectures import Resolved
from .hooks import BackpatchRuntimeError, CallHooks, current_call, model_lock

__all__ = ["Call", "generation_session", "running_methods"]


class Call:
    """What one call's methods share. Built by :func:`generation_session`; methods read it in ``Method.open``."""

    def __init__(self, resolved: Resolved, settings: Mapping[str, Any], hooks: CallHooks, *, null_rows: bool,
                 resources: Mapping[str, Any], precaptured: Any = None, gate_values: Any = None,
                 agreement_values: Any = None) -> None:
        #: the model's modules and facts (layers, generator, audio token)
        self.resolved = resolved
        #: preset key -> resolved setting of every method the preset sets (acting or not)
        self.settings = dict(settings)
        #: the hooks this call owns: they act for it only and are removed when it ends
        self.hooks = hooks
        #: the batch carries a null-audio copy of every row: rows ``B..2B-1`` mirror rows ``0..B-1`` (a method with
        #: ``provides_null_rows`` appends them; the others act on the main rows only)
        self.null_rows = null_rows
        #: preset key -> what that method prepared once per wrapper (``Method.prepare``: e.g. silent features)
        self.resources = dict(resources)
        #: source states already captured for this exact batch (calibration's sweep), keyed by (layer, positions)
        self.precaptured = precaptured
        #: gate strength per main row measured by the caller (goes with ``precaptured``)
        self.gate_values = gate_values
        #: the agreement signal per main row measured by the caller (goes with ``precaptured`` when a patch has an
        #: agreement guard)
        self.agreement_values = agreement_values
        #: True while a capture pass runs: its states are not the answer's, and steering-like methods skip it
        self.capturing = False
        #: preset key -> the session its method opened in this call
        self.sessions: dict[str, Any] = {}

    def setting(self, key: str) -> Any:
        return self.settings.get(key)

    def session(self, key: str) -> Any:
        return self.sessions.get(key)


def running_methods(settings: Mapping[str, Any]) -> tuple[list[tuple[Method, Any]], bool]:
    """The methods of ``settings`` (preset key -> setting) that run in a call, in install order, and whether the
    null-audio rows ride along: those that act, and the one that brings the rows when any method needs them."""
    present = [(get_method(key), config) for key, config in settings.items()]
    present = [(method, config) for method, config in present if method.present(config)]
    null_rows = any(method.needs_null_rows(config) for method, config in present)
    running = [(method, config) for method, config in present
               if method.acts(config) or (null_rows and method.provides_null_rows)]
    if null_rows and not any(method.provides_null_rows for method, _ in running):
        wanting = ", ".join(m.key for m, c in present if m.needs_null_rows(c))
        raise BackpatchRuntimeError(f"{wanting} needs the null-audio rows that a contrastive block brings; add "
                                    "`contrastive: {alpha: 0.0}` to the preset")
    running.sort(key=lambda pair: pair[0].order)
    return running, null_rows


@contextmanager
def generation_session(resolved: Resolved, settings: Mapping[str, Any] | None = None, *,
                       resources: Mapping[str, Any] | None = None, precaptured: Any = None,
                       gate_values: Any = None, agreement_values: Any = None) -> Iterator[Call]:
    """Open every method of ``settings`` (default: the preset's, ``resolved.methods``) for one call on the model,
    under the model's lock; yield the :class:`Call`. Everything is removed on exit, whatever happens, each
    session even if an earlier one fails to close."""
    settings = resolved.methods if settings is None else settings
    running, null_rows = running_methods(settings)
    with model_lock(resolved.generator).hold(), ExitStack() as stack:
        hooks = CallHooks()
        stack.callback(hooks.close)  # last: whatever a session may have missed
        call = Call(resolved, settings, hooks, null_rows=null_rows, resources=resources or {},
                    precaptured=precaptured, gate_values=gate_values, agreement_values=agreement_values)
        stack.enter_context(current_call(hooks))
        for method, config in running:
            session = method.open(call, config)
            if session is not None:
                call.sessions[method.key] = session
                stack.callback(session.remove)
        yield call
