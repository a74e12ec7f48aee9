"""The README's peer-methods table rows from a ``scripts/peer_comparison.py`` report (no hand-copied numbers).

README "Peer methods as preset blocks", the "Side by side, measured" table: prints its rows.

    python scripts/peer_table.py docs/peers/smol-whisper.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from backpatch import Preset
from backpatch.methods import gate_label, patch_label
from backpatch.registry import get_method


def setting(preset: dict | None, instruction: str | None) -> str:
    if preset is None:
        return f'"{instruction}"' if instruction else ""
    p = Preset.from_dict(preset)
    parts = [patch_label(patch) for patch in p.patches]
    if p.contrastive is not None and p.contrastive.alpha:
        parts.append(f"contrastive alpha {p.contrastive.alpha:g}")
    parts += [line for key in ("attention", "steering") if getattr(p, key) is not None
              for line in get_method(key).details(getattr(p, key))]
    text = " + ".join(parts)
    return f"{text} | {gate_label(p.gate)}" if p.gate is not None else text


def main() -> None:
    report = json.loads(Path(sys.argv[1]).read_text())
    first = next(m for m in report["methods"].values() if "plain" in m)
    p = first["plain"]
    ci = p.get("ci95", {}).get("tdr") or [None, None]
    print(f"| plain | {p['tdr']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}] | {p['afr']:.3f} | {p['audio_only_acc']:.3f} | "
          f"{p['consistent_acc']:.3f} | | x1.00 |")
    for name, m in report["methods"].items():
        if "null" in m:
            print(f"| {name} | {m['null']} | | | | | |")
            continue
        r, paired = m["method"], m["paired"]
        ci = r.get("ci95", {}).get("tdr") or [None, None]
        print(f"| {name} ({setting(m['preset'], m['instruction'])}) | {r['tdr']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}] | "
              f"{r['afr']:.3f} | {r['audio_only_acc']:.3f} | {r['consistent_acc']:.3f} | "
              f"{paired['tdr_reduction']:+.3f} ({paired['tdr_reduction_lower']:+.3f}) / {paired['harm_upper']:.3f} | "
              f"x{m['time_ratio']:.2f} |")


if __name__ == "__main__":
    main()
