"""Layer-wise diagnostics: where a model keeps, loses and overrides the audio evidence (``backpatch diagnose``).

Back-patching only helps if the audio answer is still *present* in late layers while the model answers the text
(the "suppressed, not erased" finding), and choosing source and target layers for a new model needs to see
where that is true. One pass over a conflict set (README: "Evaluation") records, for every decoder layer (the
*output* of block ``i``, the residual stream after it):

a. **probes**: cross-validated linear probes (multinomial logistic regression, L2, LBFGS, standardized
   features; folds grouped by clip, so one clip is never in train and test) predicting the audio answer from the
   last prompt position and from the mean of the audio positions, under conflict / audio-only / consistent
   prompts (and the text answer under conflict, for contrast);
b. **logit lens** at the last prompt position (final norm + LM head on each layer's output): probability and
   rank of the first token of the audio answer and of the text answer;
c. **convergence**: cosine of centred class means between a digit heard (mean audio-position state of its clips)
   and the same digit read (the claim word's state in conflict prompts), with a mismatched-class baseline,
   linear CKA of the class-mean geometry and a cross-modal nearest-class-mean accuracy; and the same cosine at the
   answer position (last prompt token: audio-only prompts by audio answer vs conflict prompts by text answer);
d. **attention share** from the last prompt position to the audio span and to the claim word (eager attention);
e. all of the above again **with the preset applied** (the back-patched forward, states recorded by our own
   hooks so the patch is visible);
f. a **suggested preset** (source: the latest layer where the audio answer stays decodable under conflict;
   targets: early layers), checked with a small first-token sweep under the no-harm rule of calibration.

Outputs: ``DIR/report.json`` (a ``layers`` list, one object per layer, and ``suggested_preset`` in preset
schema), ``DIR/suggested_preset.yaml``, PNG figures and ``DIR/report.md`` embedding them.

One room per job (STYLE item 8): :mod:`.passes` (the recording passes: hooks, claim and answer tokens, eager
attention, logit lens), :mod:`.probes` (pure read-outs: linear probes, convergence, takeover layer),
:mod:`.analysis` (per-layer rows of a recorded pass), :mod:`.suggest` (the suggestion sweep, on calibration's
shared machinery in :mod:`backpatch.calibrate.sweep`, and the suggested preset), :mod:`.plots` (figures),
:mod:`.report` (``report.json`` assembly and ``report.md``), :mod:`.run` (``diagnose()``).
"""

from .passes import _lens_fn, _Recorder
from .probes import class_mean_convergence, linear_probe, probe_layers, text_takeover_layer
from .run import diagnose

__all__ = ["diagnose", "linear_probe", "probe_layers", "class_mean_convergence", "text_takeover_layer"]
__all__ += ["_Recorder", "_lens_fn"]  # used by the tests
