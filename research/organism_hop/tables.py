"""Print the markdown tables of FINDINGS.md from the JSON outputs of eval_hop.py / train_hop.py.

    python research/organism_hop/tables.py /work/data/organism_hop/run-s0
"""

import json
import sys
from pathlib import Path


def f(x):
    return f"{x:.3f}"


def metric_row(name, m):
    return (f"| {name} | {f(m['tdr'])} ({m['followed_text']}/{m['followed_text'] + m['followed_audio']}) | "
            f"{f(m['afr'])} | {f(m['other_rate'])} | {f(m['audio_only_acc'])} | {f(m['consistent_acc'])} |")


def main(run: Path):
    tr = json.loads((run / "training.json").read_text())
    print(f"selected step {tr['selected_step']} (in band: {tr['selected_in_band']}), wall {tr['wall_s']} s\n")
    print("| step | loss | after TDR | after AFR | after AO | after cons | spoken TDR | spoken AO | parity TDR "
          "| parity AO |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for h in tr["history"]:
        v = h["val"]
        print(f"| {h['step']} | {h['loss']:.4f} | {f(v['after']['tdr'])} | {f(v['after']['afr'])} | "
              f"{f(v['after']['audio_only_acc'])} | {f(v['after']['consistent_acc'])} | {f(v['spoken']['tdr'])} | "
              f"{f(v['spoken']['audio_only_acc'])} | {f(v['parity']['tdr'])} | {f(v['parity']['audio_only_acc'])} |")
    p = run / "eval" / "plain.json"
    if p.exists():
        pl = json.loads(p.read_text())
        print("\n| split / task | TDR (text/(text+audio)) | AFR | other | audio-only | consistent |")
        print("|---|---|---|---|---|---|")
        for split in ("validation", "test"):
            for q, m in pl[split].items():
                print(metric_row(f"{split} / {q} (n {m['n_conflict']}/{m['n_consistent']}/{m['n_audio_only']})", m))
        print("\ngenerate == argmax on test:", pl["test_generate_equals_argmax"])
    for g in sorted((run / "eval").glob("grid-*.json")):
        gr = json.loads(g.read_text())
        pv, pt = gr["plain_validation"], gr["plain_test"]
        print(f"\n### grid {gr['task']} ({g.name})\n")
        print("| positions | mode | s | t | val TDR | val AO | val cons | test TDR | test AFR | test other | test AO "
              "| test cons |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        print(f"| plain | | | | {f(pv['tdr'])} | {f(pv['audio_only_acc'])} | {f(pv['consistent_acc'])} | "
              f"{f(pt['tdr'])} | "
              f"{f(pt['afr'])} | {f(pt['other_rate'])} | {f(pt['audio_only_acc'])} | {f(pt['consistent_acc'])} |")
        for r in gr["settings"]:
            v, t = r["validation"], r["test"]
            print(f"| {r['positions']} | {r['mode']} | {r['source']} | {r['target']} | {f(v['tdr'])} | "
                  f"{f(v['audio_only_acc'])} | {f(v['consistent_acc'])} | {f(t['tdr'])} | {f(t['afr'])} | "
                  f"{f(t['other_rate'])} | {f(t['audio_only_acc'])} | {f(t['consistent_acc'])} |")
        for k in ("selected_on_validation", "selected_test", "selected_test_no_harm", "selected_test_delta_tdr_points",
                  "test_best_no_harm_NOT_A_SELECTION"):
            if k in gr:
                val = gr[k]
                if k == "selected_test":
                    val = {x: val[x] for x in ("tdr", "afr", "other_rate", "audio_only_acc", "consistent_acc")}
                print(f"- {k}: {val}")
    for pr in sorted((run / "eval").glob("probe-*.json")):
        d = json.loads(pr.read_text())
        print(f"\n### probe {d['task']} ({pr.name})\n")
        n = d["n_layers"]
        print("| quantity | " + " | ".join(f"L{i}" for i in range(n)) + " |")
        print("|---|" + "---|" * n)
        for kind in ("audio_only", "conflict"):
            r = d[kind]
            for key in ("last_audio_digit", "audio_mean_audio_digit", "last_claim_digit"):
                if key in r:
                    print(f"| {kind} {key} (n {r['n']}) | " + " | ".join(f"{x:.2f}" for x in r[key]) + " |")
            for key in ("audio_digit", "successor"):
                values = " | ".join(f"{x[key]:.2f}" for x in r["logit_lens_last"])
                print(f"| {kind} lens top = {key} | {values} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
