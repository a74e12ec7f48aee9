"""The words on the page that name what a preset does: the title and intro, the methods line (what is on and off),
the calibration note (control accuracies before -> after, eval's ``!`` beyond the no-harm bound), the gate's sentence
and the note on further patches. Pure functions of a preset (or a gate report): no Gradio, no model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..preset import Preset, methods_details, methods_label
from ..registry import registered_methods

if TYPE_CHECKING:
    from .compare import Demo


def methods_status(preset: Preset) -> str:
    """Which methods ``preset`` turns on and which it leaves off, gate included, as one Markdown line beside the
    controls: a user sees at a glance that, say, smol-whisper's preset decodes contrastively behind a gate and does
    no back-patching, whatever the patch controls hold."""
    on, off = [], []
    for method in registered_methods():  # every method the registry knows, built in or registered from outside
        config = preset.section(method.key)
        if method.present(config) and method.acts(config):
            on.append(method.summary(config))
        else:
            off.append(method.title)
    return f"**On:** {', '.join(on) or 'nothing'}. **Off:** {', '.join(off) or 'nothing'}."


#: control accuracies a calibrated preset records, as the demo names them
_CONTROLS = (("audio_only_acc", "audio-only"), ("consistent_acc", "consistent"))


def calibration_note(preset: Preset, max_harm: float = 0.02) -> str | None:
    """The preset's calibrated control accuracies, before -> after, with eval's ``!`` on each one whose paired 95%
    upper bound on the loss exceeds ``max_harm`` (or, for a preset that recorded no bound, whose loss does);
    None for a preset without calibration numbers."""
    metrics = preset.calibration.metrics if preset.calibration is not None else {}
    parts, marked = [], []
    for prefix, split in (("", "validation"), ("perturbed_", "perturbed validation")):
        cells = []
        for key, name in _CONTROLS:
            before, after = metrics.get(f"{prefix}{key}_before"), metrics.get(f"{prefix}{key}_after")
            if before is None or after is None:
                continue
            bound = metrics.get(f"{prefix}{key}_harm_upper")
            beyond = bound > max_harm + 1e-9 if bound is not None else before - after > max_harm + 1e-9
            cells.append(f"{name} {before:.3f} → {after:.3f}{' !' if beyond else ''}")
            if beyond:
                marked.append(f"{name} ({split})")
        if cells:
            parts.append(f"{split}: " + ", ".join(cells))
    if not parts:
        return None
    text = "Calibrated control accuracy, " + "; ".join(parts) + "."
    if marked:
        text += (f" ! beyond the no-harm bound ({max_harm:g}) for {', '.join(marked)}: this preset costs accuracy "
                 "there.")
    return text


def gate_note(report: dict | None) -> str | None:
    """One sentence on what the audio-confidence gate did to the mitigation for this answer (None: no gate)."""
    if report is None:
        return None
    patch, steps = report["patch"], report["contrastive"]
    parts = []
    if patch:
        parts.append(f"patches at {100 * patch[0]:.0f}% strength")
    if steps:
        parts.append(f"contrastive α at {100 * steps[0][0]:.0f}% on the first token")
    strengths = ([patch[0]] if patch else []) + ([steps[0][0]] if steps else [])
    if not strengths:
        return None
    if max(strengths) == 0.0:
        verdict = "gate closed: the audio did not clearly support an answer, so this is the plain model's answer"
    elif min(strengths) < 1.0:
        verdict = "gate weakened the mitigation: the audio support was partial"
    else:
        verdict = "gate open: full mitigation"
    return f"{verdict} ({', '.join(parts)})"


_INTRO = """# backpatch: plain vs {methods}, side by side
**Model:** `{model}` · audio up to {limit} · **preset** `{preset}`: {details}.
Pick or upload a clip, write a prompt (a misleading one shows text dominance), press **Compare**.
The left answer is the plain model; the right one has the preset applied ({methods}). Bars: the top-5
probabilities of the first answer token."""


def _intro(demo: Demo, preset: Preset) -> str:
    """The page title and its lines, naming what ``preset`` does (a preset without patches is not "back-patched")."""
    limit = f"{demo.max_seconds:g} s" if demo.max_seconds else "the model's limit"
    return _INTRO.format(methods=methods_label(preset), model=demo.model_name, limit=limit, preset=preset.name,
                         details=methods_details(preset))


def _extra_patches_note(preset: Preset) -> str:
    more = len(preset.patches) - 1
    if more <= 0:
        return ""
    rest = "; ".join(f"{p.source}→{p.target} {p.mode} ×{p.scale:g} @{p.positions}" for p in preset.patches[1:])
    return f"The preset has {more} more patch{'es' if more > 1 else ''}, applied unchanged: {rest}"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
