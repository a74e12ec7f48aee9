"""Issue 28: smol-whisper's first-token logits with a back-patch (20 -> 18 add @audio, the best patch of the coarse
stage in docs/stress/calibrate_families.sh), on the same validation items and in the same order as
scripts/agreement_probe.py, so that scripts/agreement_frontier.py --patched can score back-patching combined with
guarded contrastive decoding under the per-family rule.

For each scale: the patched logits at full strength on every item, and under each audio_gap gate of the frontier's
grid the logits of the items whose gate strength is strictly between 0 and 1 (the others are the plain or the full
strength logits), with the strength measured on the stored plain logits as the engine does. About 25 min per
scale on 2 cores.

    python scripts/patch_probe.py /work/probe/logits.pt \
        --data /work/data/smol/perturbed-families/validation/conflicts.jsonl \
        --clean /work/data/smol/conflicts/validation/conflicts.jsonl --out /work/probe/patched.pt
"""

from __future__ import annotations

import argparse

import torch
from tqdm.auto import tqdm

from backpatch.calibrate.sweep import _first_token_logits
from backpatch.engine import generation_session, resolve
from backpatch.evaluate import encode_items
from backpatch.items import load_conflict_set
from backpatch.loading import load_model_and_processor
from backpatch.methods import Gate, Patch
from backpatch.methods.gate import gate_strength
from backpatch.wrapper import BackpatchedModel

GATES = ((0.1, 0.3), (0.2, 0.4))


def patch_preset(base, source: int, target: int, scale: float, positions: str):
    patch = Patch(source=source, target=target, scale=scale, mode="add", positions=positions)
    return base.with_sections({"contrastive": None, "gate": None, "patches": [patch]})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("logits", help="the plain logits of scripts/agreement_probe.py (its items fix the order)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--clean", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--source", type=int, default=20)
    ap.add_argument("--target", type=int, default=18)
    ap.add_argument("--positions", default="audio")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--batch-size", type=int, default=48)
    args = ap.parse_args()
    saved = torch.load(args.logits)
    plain_main, plain_null = saved["main"].float(), saved["null"].float()
    model, processor = load_model_and_processor("organism:smol-whisper")
    wrapped = BackpatchedModel(model, "smol-whisper", processor)
    by_id = {item.id: item for path in (args.clean, args.data) for item in load_conflict_set(path)}
    items = [by_id[row["id"]] for row in saved["items"]]
    strengths = {gate: gate_strength(Gate("audio_gap", *gate), plain_main, plain_null) for gate in GATES}
    fractional = {gate: ((s > 0) & (s < 1)).nonzero(as_tuple=True)[0] for gate, s in strengths.items()}
    out = {"items": saved["items"], "patch": {"source": args.source, "target": args.target,
                                              "positions": args.positions, "mode": "add"}, "scales": {}}
    for scale in args.scales:
        resolved = resolve(model, patch_preset(wrapped.preset, args.source, args.target, scale, args.positions),
                           processor)
        full = []
        for start in tqdm(range(0, len(items), args.batch_size), desc=f"scale {scale} full", mininterval=30):
            inputs = encode_items(processor, items[start : start + args.batch_size])
            with generation_session(resolved):
                full.append(_first_token_logits(resolved.generator, inputs).half())
        gated = {}
        for gate, rows in fractional.items():
            part = []
            for start in tqdm(range(0, len(rows), args.batch_size), desc=f"scale {scale} gate {gate}",
                              mininterval=30):
                chunk = rows[start : start + args.batch_size]
                inputs = encode_items(processor, [items[i] for i in chunk.tolist()])
                with generation_session(resolved, gate_values=strengths[gate][chunk]):
                    part.append(_first_token_logits(resolved.generator, inputs).half())
            gated[f"{gate[0]}-{gate[1]}"] = {"rows": rows, "logits": torch.cat(part)}
        out["scales"][scale] = {"full": torch.cat(full), "gated": gated}
        torch.save(out, args.out)  # after each scale: a later failure keeps what was measured


if __name__ == "__main__":
    main()
