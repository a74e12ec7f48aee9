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


def mata_eager(original, targets, audio, alpha, form):
    """A reference eager attention for MATA, written from the paper's formula on the raw scores: for the attention
    modules in ``targets`` (ids), the last query row's scores toward the audio keys (``audio``: [B, T] bool of the
    prefill; generated positions are not audio) become ``(1 + alpha) A`` or ``A + alpha``; every other module runs
    ``original`` unchanged. It shares no code with backpatch (no mask bias, no registry)."""

    calls = {}

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        if id(module) not in targets:
            return original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        # tokens so far: the prompt at the first call, one more per decode step; a sliding-window cache keeps the
        # latest positions only, so key j is position (total - K + j)
        calls[id(module)] = calls.get(id(module), 0) + 1
        total = audio.shape[1] + calls[id(module)] - 1
        groups = query.shape[1] // key.shape[1]
        key_states = torch.repeat_interleave(key, groups, dim=1)
        value_states = torch.repeat_interleave(value, groups, dim=1)
        scores = torch.matmul(query, key_states.transpose(2, 3)) * scaling
        rows = scores.shape[0]
        full = torch.zeros(rows, total, dtype=torch.bool)
        full[:, : audio.shape[1]] = audio.repeat(rows // audio.shape[0], 1)
        columns = full[:, total - scores.shape[-1]:]
        last = scores[:, :, -1, :]
        changed = (1 + alpha) * last if form == "scale" else last + alpha
        scores[:, :, -1, :] = torch.where(columns[:, None, :], changed, last)
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, : key_states.shape[-2]]
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(weights, value_states).transpose(1, 2).contiguous(), weights

    return eager


def steering_vector(layers, forward, batch, null_batch, first, last):
    """Audio-silence steering's s, written from the method: two separate forward passes (audio, null audio), the
    last position's output of layers first..last, audio minus null, averaged over the layers."""
    outputs = {}

    def run(which, inputs):
        handles = [layers[i].register_forward_hook(
            lambda m, a, o, i=i: outputs.__setitem__((which, i), _out(o)[..., -1, :].detach().float().clone()))
            for i in range(first, last + 1)]
        try:
            forward(inputs)
        finally:
            for h in handles:
                h.remove()

    run("audio", batch)
    run("null", null_batch)
    return torch.stack([outputs[("audio", i)] - outputs[("null", i)] for i in range(first, last + 1)]).mean(0)


def steered(layers, vector, beta):
    """A forward hook for the last layer adding ``beta * vector`` at the last position (the method's step 2)."""

    def hook(module, args, output):
        hidden = _out(output).clone()
        hidden[..., -1, :] += (beta * vector).to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return layers[-1].register_forward_hook(hook)
