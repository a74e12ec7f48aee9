"""What a vLLM worker process holds for backpatch: the runtimes of the models it loaded, and the runner each step
runs on (the hooks read the step's requests from it)."""

from __future__ import annotations

from typing import Any

from .runtime import PatchRuntime

#: every backpatch model this process built (one per worker in practice)
runtimes: list[PatchRuntime] = []


def wrap_execute_model(original: Any) -> Any:
    """The model runner's ``execute_model``, telling this process's runtimes which runner (and so which requests)
    the coming forward serves."""

    def execute_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        for runtime in runtimes:
            runtime.runner = self
        return original(self, *args, **kwargs)

    execute_model.__backpatch__ = True
    return execute_model
