"""Calibration: find the back-patching / contrastive settings that lower text dominance without harm.

One room per job (STYLE item 8): :mod:`.grid` (what is searched), :mod:`.sweep` (scoring machinery shared with
``backpatch diagnose``), :mod:`.search` (the staged coarse-to-fine search and the no-harm rule), :mod:`.run`
(``calibrate()``: the steps in order), :mod:`.data` (the calibration items and the warnings about them),
:mod:`.run_search` (captures and scoring of the chosen search on the model), :mod:`.resume` (reusing an earlier
run's scores), :mod:`.budget` (the time budget), :mod:`.verify` (the ``generate()`` verification of the
finalists), :mod:`.report` (the sweep rows and what was searched), :mod:`.writing` (the preset it writes),
:mod:`.plots` (heatmap and band figure).
"""

from .grid import Candidate, Setting, _settings, band_grid, default_grid, refinements
from .run import calibrate
from .search import passes_no_harm, staged_search
from .sweep import Scorer, _first_token_answers, prepare_batches

__all__ = ["Candidate", "Scorer", "Setting", "band_grid", "calibrate", "default_grid", "passes_no_harm",
           "prepare_batches", "refinements", "staged_search"]
__all__ += ["_first_token_answers", "_settings"]  # used by the tests
