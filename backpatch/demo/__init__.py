"""The Gradio side-by-side demo: plain vs preset answers for one clip and prompt (``backpatch demo``).

One model instance serves every user. The compare action runs the plain and the patched ``generate()`` on the
same processor inputs, under one lock and in a queue with ``concurrency_limit=1``, so two requests never patch
the model at once. It is also the API endpoint ``/compare``: the first two inputs are the audio file and the
prompt, the first two outputs the plain and the patched answer texts (``gradio_client`` can call it).

Everything model-related lives in :class:`Demo`, which the tests drive without a browser; :func:`build_app` lays
the Gradio Blocks over it and :func:`launch` loads the model (default: smol-whisper with its preset).
Gradio is an optional dependency (the ``demo`` extra); it is imported only in this package.

One room per job (STYLE item 8): :mod:`.compare` (:class:`Demo` and the compare action: answers, top-k
probabilities, verdict), :mod:`.controls` (control values and the preset they make, the gate controls),
:mod:`.presets` (which presets are offered, loading and saving preset YAML), :mod:`.clips` (example clips, reading
a user's clip, judging answers), :mod:`.text` (the words naming what a preset does), :mod:`.page` (the Gradio
layout and event wiring, the API endpoints), :mod:`.server` (:func:`launch`, port checks), :mod:`.errors` (the
friendly error).
"""

import os

# No telemetry and no version check from a demo that must run offline (read when gradio builds the Blocks).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from .compare import CompareResult, Demo  # noqa: E402  (after the environment default above)
from .page import build_app  # noqa: E402
from .server import check_port, launch  # noqa: E402
from .text import calibration_note, methods_status  # noqa: E402

__all__ = ["CompareResult", "Demo", "build_app", "launch"]
__all__ += ["calibration_note", "check_port", "methods_status"]  # imported or patched by the tests
