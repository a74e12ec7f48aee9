"""Audio-aware contrastive decoding (AAD): ``(1 + a) l(audio) - a l(null audio)`` at every step, KV-cached, the null
stream riding as extra batch rows. Its config, pure math (:mod:`.math`), install (:mod:`.session`) and registry
entry live here. It also brings the null-audio rows that the gate's ``audio_gap`` and the steering read."""

from __future__ import annotations

from typing import Any

from ...controls import Control, ControlError
from ...registry import Method, register_method
from ...validation import PresetError
from .config import NULL_AUDIO, Contrastive
from .math import agreement_signal, contrastive_logits, null_features, silence_frame
from .session import ContrastiveSession

__all__ = ["AGREEMENT_CHOICES", "METHOD", "NULL_AUDIO", "Contrastive", "ContrastiveDecoding", "ContrastiveSession",
           "agreement_signal", "contrastive_logits", "null_features", "silence_frame"]

#: the demo's agreement-guard thresholds (nats; a preset's own value is added to them)
AGREEMENT_CHOICES = ("off", "0", "0.1", "0.2", "0.5")


class ContrastiveDecoding(Method):
    key = "contrastive"
    title = "contrastive decoding"
    section_order = 1
    session_cls = ContrastiveSession
    config_cls = Contrastive
    order = 10  # first: it doubles the batch, and every other method must see the doubled rows
    provides_null_rows = True

    def acts(self, config: Any) -> bool:
        return config.alpha > 0

    def needs_null_rows(self, config: Any) -> bool:
        return config.alpha > 0

    def prepare(self, config: Any, processor: Any, origin: str | None) -> Any:
        """The silent clip's feature frame (``null_audio: silence``), computed once per wrapped model."""
        if config.null_audio != "silence":
            return None
        if processor is None or getattr(processor, "feature_extractor", None) is None:
            where = f"{origin}: " if origin else ""
            raise PresetError(f"{where}contrastive.null_audio: silence needs the processor to compute silent "
                              "features; pass wrap(model, preset, processor=processor), or use null_audio: zeros")
        return silence_frame(processor)

    def controls(self, config: Any, num_layers: int) -> list[Control]:
        return [Control("alpha", "Contrastive alpha (0 = off)", minimum=0.0),
                Control("plausibility", "Plausibility guard (0 = off)", minimum=0.0,
                        info="only tokens with p(audio) >= this x the top token's may win (VCD/AAD's guard)"),
                Control("agreement", "Agreement guard (nats)", kind="choice",
                        choices=tuple(dict.fromkeys((*AGREEMENT_CHOICES, _agreement_text(config)))),
                        info="keep the answer wherever the audio raised its log-probability over the text-only "
                             "stream by at least this")]

    def control_values(self, config: Any, num_layers: int) -> dict[str, Any]:
        return {"alpha": config.alpha if config is not None else 0.0,
                "plausibility": config.plausibility or 0.0 if config is not None else 0.0,
                "agreement": _agreement_text(config)}

    def from_controls(self, values: dict[str, Any], base: Any, num_layers: int) -> Contrastive:
        """Alpha 0 still makes a block: it stays only where another method reads its null-audio rows."""
        template = base or Contrastive()
        if values["plausibility"] > 1:
            raise ControlError(f"The plausibility guard must be in [0, 1] (0 turns it off), got "
                               f"{values['plausibility']:g}.")
        agreement = values.get("agreement", "off")
        return Contrastive(alpha=values["alpha"], null_audio=template.null_audio,
                           plausibility=values["plausibility"] or None,
                           agreement=None if agreement in (None, "off") else float(agreement))

    def label(self, config: Any) -> str:
        return f"contrastive a={config.alpha:g}"

    def details(self, config: Any) -> list[str]:
        guard = "".join(f", {name} {value:g}" for name, value in _guards(config))
        return [f"contrastive alpha {config.alpha:g} ({config.null_audio}{guard})"]

    def summary(self, config: Any) -> str:
        guards = ", ".join(f"{name} guard {value:g}" for name, value in _guards(config))
        return f"contrastive decoding α {config.alpha:g}" + (f" ({guards})" if guards else "")


def _guards(config: Contrastive) -> list[tuple[str, float]]:
    """The guards this setting turns on, by name, in the preset's key order."""
    return [(name, value) for name, value in (("plausibility", config.plausibility), ("agreement", config.agreement))
            if value is not None]


def _agreement_text(config: Any) -> str:
    return "off" if config is None or config.agreement is None else f"{config.agreement:g}"


METHOD = register_method(ContrastiveDecoding())
