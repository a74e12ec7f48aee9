"""``report.json`` and ``report.md`` of ``backpatch diagnose``: the per-layer rows, a summary of the curves, the
suggestion sweep and the suggested preset, assembled into one dict and written out in Markdown."""

from __future__ import annotations

import time
from typing import Any

from ..evaluate import truncation_line
from ..preset import Preset
from .analysis import KINDS, METHODS, _round
from .probes import chance_rate, text_ahead_ranges, text_takeover_layer


def _assemble(model, data, items, preset, layers, first_token, sweep_rows, suggested, batch_size, limit,
              started) -> dict[str, Any]:
    counts = {k: sum(1 for it in items if it.kind == k) for k in KINDS}
    audio_labels = [it.audio_answer for it in items if it.kind == "conflict"]
    last = layers[-1]
    best = max(((r["probe_audio_conflict"], r["layer"]) for r in layers if r["probe_audio_conflict"] is not None),
               default=(None, None))
    summary = {
        "chance_audio_conflict": _round(chance_rate(audio_labels)) if audio_labels else None,
        "probe_audio_conflict_last_layer": last["probe_audio_conflict"],
        "probe_text_conflict_last_layer": last["probe_text_conflict"],
        "best_probe_audio_conflict": best[0],
        "best_probe_audio_conflict_layer": best[1],
        "lens_audio_prob_last_layer": last["lens_audio_prob"],
        "lens_text_prob_last_layer": last["lens_text_prob"],
        "lens_audio_rank_last_layer": last["lens_audio_rank"],
        "text_takeover_layer": text_takeover_layer([r["lens_audio_prob"] for r in layers],
                                                   [r["lens_text_prob"] for r in layers]),
        "text_ahead_layers": text_ahead_ranges([r["lens_audio_prob"] for r in layers],
                                               [r["lens_text_prob"] for r in layers]),
        "convergence_first_layer": layers[0]["convergence"],
        "convergence_last_layer": last["convergence"],
        "convergence_nc_acc_first_layer": layers[0]["convergence_nc_acc"],
        "convergence_nc_acc_last_layer": last["convergence_nc_acc"],
        "convergence_answer_first_layer": layers[0]["convergence_answer"],
        "convergence_answer_last_layer": last["convergence_answer"],
    }
    if preset is not None:
        summary["text_takeover_layer_patched"] = text_takeover_layer(
            [r["lens_audio_prob_patched"] for r in layers], [r["lens_text_prob_patched"] for r in layers])
        summary["text_ahead_layers_patched"] = text_ahead_ranges(
            [r["lens_audio_prob_patched"] for r in layers], [r["lens_text_prob_patched"] for r in layers])
    return {
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "data": str(data),
        "preset": preset.to_dict() if preset is not None else None,
        "n_items": len(items),
        "counts": counts,
        "settings": {"batch_size": batch_size, "limit": limit, **METHODS},
        "num_layers": len(layers),
        "first_token": first_token,
        "summary": summary,
        "layers": layers,
        "sweep": [{"setting": r["setting"], "no_harm": r["no_harm"],
                   **{k: r["metrics"][k] for k in ("tdr", "afr", "audio_only_acc", "consistent_acc")}}
                  for r in sweep_rows],
        "suggested_preset": suggested.to_dict(),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def ranges_text(ranges: list[list[int]] | None) -> str:
    if not ranges:
        return "in no layer where either answer is readable (p >= 0.01)"
    return "in layers " + ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges)


def _takeover_text(layer: int | None, ranges: list[list[int]] | None = None) -> str:
    if layer is None:
        ahead = f" (it is ahead {ranges_text(ranges)})" if ranges else ""
        return f"the text answer is not ahead of the audio answer at the last layer{ahead}."
    return f"the text answer is ahead of the audio answer from layer {layer} on."


def _markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    layers = report["layers"]
    patched = report["preset"] is not None
    lines = [
        "# backpatch diagnose",
        "",
        f"Model `{report['model']}` ({report['num_layers']} decoder layers), data `{report['data']}`: "
        f"{report['counts']['conflict']} conflict, {report['counts']['consistent']} consistent, "
        f"{report['counts']['audio_only']} audio-only items."
        + (f" Preset `{report['preset']['name']}` (dotted lines in the figures)." if patched else ""),
        "",
    ]
    truncation = truncation_line(report.get("truncated_audio"))
    if truncation:
        lines += [truncation[0].upper() + truncation[1:] + ".", ""]
    ft = report["first_token"]
    if ft:
        lines += ["| first-token answers (argmax at the last prompt position) | TDR | AFR | audio-only acc | "
                  "consistent acc |", "|---|---|---|---|---|"]
        for name, m in ft.items():
            lines.append(f"| {name} | {_fmt(m['tdr'])} | {_fmt(m['afr'])} | {_fmt(m['audio_only_acc'])} | "
                         f"{_fmt(m['consistent_acc'])} |")
        lines.append("")
    plain_lens = _takeover_text(s.get("text_takeover_layer"), s.get("text_ahead_layers"))
    patched_lens = _takeover_text(s.get("text_takeover_layer_patched"), s.get("text_ahead_layers_patched"))
    lines += [
        "## Summary",
        "",
        f"- Audio answer decodable at the last prompt position under conflict, last layer: "
        f"{_fmt(s['probe_audio_conflict_last_layer'])} (chance {_fmt(s['chance_audio_conflict'])}; best "
        f"{_fmt(s['best_probe_audio_conflict'])} at layer {_fmt(s['best_probe_audio_conflict_layer'])}); text answer: "
        f"{_fmt(s['probe_text_conflict_last_layer'])}.",
        f"- Logit lens, last layer (conflict): audio answer p = {_fmt(s['lens_audio_prob_last_layer'])} "
        f"(mean rank {_fmt(s['lens_audio_rank_last_layer'], 2)}), text answer p = "
        f"{_fmt(s['lens_text_prob_last_layer'])}; " + plain_lens + (f" With the preset: {patched_lens}" if patched
                                                                    else ""),
        f"- Convergence (cosine of centred class means, audio vs claim word): layer 0 "
        f"{_fmt(s['convergence_first_layer'])}, last layer {_fmt(s['convergence_last_layer'])}; nearest-class "
        f"accuracy {_fmt(s['convergence_nc_acc_first_layer'])} -> {_fmt(s['convergence_nc_acc_last_layer'])}; at "
        f"the answer position (audio-only vs conflict prompts): {_fmt(s['convergence_answer_first_layer'])} -> "
        f"{_fmt(s['convergence_answer_last_layer'])}.",
        f"- Attention from the last prompt position, layer 0: {_fmt(layers[0]['attn_audio'])} to the audio span, "
        f"{_fmt(layers[0]['attn_text'])} to the claim word; last layer: {_fmt(layers[-1]['attn_audio'])} and "
        f"{_fmt(layers[-1]['attn_text'])}.",
        "",
        "## Figures",
        "",
        "Solid: plain; dotted: with the preset." if patched else "",
        "",
    ]
    lines += [f"![{name[:-4]}]({name})" for name in report["figures"]]
    cols = ["layer", "probe_audio_conflict", "probe_audio_audio_only", "probe_text_conflict", "lens_audio_prob",
            "lens_text_prob", "convergence", "convergence_nc_acc", "attn_audio", "attn_text"]
    if patched:
        cols += ["probe_audio_conflict_patched", "lens_audio_prob_patched", "lens_text_prob_patched"]
    lines += ["", "## Per layer", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in layers:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    if report["sweep"]:
        lines += ["", "## Suggestion sweep (first-token answers)", "",
                  "Scored on the same items as the curves: choose a preset on a validation split, not on test data.",
                  "",
                  "| setting | TDR | AFR | audio-only | consistent | no harm |", "|---|---|---|---|---|---|"]
        for r in report["sweep"]:
            lines.append(f"| {r['setting']} | {_fmt(r['tdr'])} | {_fmt(r['afr'])} | {_fmt(r['audio_only_acc'])} | "
                         f"{_fmt(r['consistent_acc'])} | {'yes' if r['no_harm'] else 'no'} |")
    yaml_text = Preset.from_dict(report["suggested_preset"]).to_yaml()
    lines += ["", "## Suggested preset (`suggested_preset.yaml`)", "", "```yaml", yaml_text.rstrip(), "```", "",
              "Methods: " + "; ".join(f"{k}: {v}" for k, v in report["settings"].items() if isinstance(v, str)) + ".",
              ""]
    return "\n".join(lines)
