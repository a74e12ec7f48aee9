"""An independent reference implementation of back-patching, written with plain forward hooks.

It shares no code with the library: it runs the *whole* model twice (capture, then patched) and recomputes
the positions from ``input_ids`` itself, so agreement with ``backpatch`` checks the engine's semantics
(DESIGN section 1), not a copy of them.
"""

from __future__ import annotations

import torch


def _positions(input_ids, attention_mask, audio_token_id, kind):
    audio = input_ids == audio_token_id
    last = torch.zeros_like(audio)
    for b in range(input_ids.shape[0]):
        real = [p for p in range(input_ids.shape[1]) if attention_mask is None or attention_mask[b, p] == 1]
        if audio[b].any():
            last[b, real[-1]] = True
    return {"audio": audio, "last": last, "audio+last": audio | last}[kind]


def _out(output):
    return output[0] if isinstance(output, tuple) else output


def reference_logits(model, layers, batch, patches, audio_token_id, forward=None, row_gate=None):
    """Last-position logits of one full forward pass with ``patches`` applied.

    ``patches``: list of dicts with absolute ``source``/``target``, ``scale``, ``mode``, ``positions`` and
    optionally ``match_norm`` (captured states rescaled to the norm of the states they are combined with).
    ``forward``: callable(batch) -> logits; defaults to ``model(**batch).logits``.
    ``row_gate``: optional [B] strengths; each row's patched value becomes ``cur + g * (value - cur)``.
    """
    forward = forward or (lambda b: model(**b).logits)
    input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
    states = {}
    handles = [
        layers[s].register_forward_hook(lambda m, a, o, s=s: states.__setitem__(s, _out(o).detach().clone()))
        for s in {p["source"] for p in patches}
    ]
    try:
        with torch.no_grad():
            forward(batch)
    finally:
        for h in handles:
            h.remove()

    def patch_hook(target):
        def hook(module, args, output):
            h = _out(output).clone()
            for p in patches:
                if p["target"] != target:
                    continue
                mask = _positions(input_ids, attention_mask, audio_token_id, p["positions"])
                src = states[p["source"]]
                a = p["scale"]
                if h.dim() == 4:
                    cur, new = h[:, mask], src[:, mask]
                else:
                    cur, new = h[mask], src[mask]
                if p.get("match_norm"):
                    new = new / new.norm(dim=-1, keepdim=True) * cur.norm(dim=-1, keepdim=True)
                val = {"add": cur + a * new, "replace": a * new, "interpolate": (1 - a) * cur + a * new}[p["mode"]]
                if row_gate is not None:
                    g = torch.stack([row_gate[b] for b in range(mask.shape[0]) for _ in range(int(mask[b].sum()))])
                    val = cur + g.to(cur.dtype).unsqueeze(-1) * (val - cur)
                if h.dim() == 4:
                    h[:, mask] = val
                else:
                    h[mask] = val
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return hook

    handles = [layers[t].register_forward_hook(patch_hook(t)) for t in {p["target"] for p in patches}]
    try:
        with torch.no_grad():
            return forward(batch)[:, -1].float()
    finally:
        for h in handles:
            h.remove()
