#!/usr/bin/env bash
# Issue 28: a generalization set from another synthesizer (flite, `apt-get install flite`), never used to choose
# anything: the ten digit words spoken by flite's five voices at three speaking rates (150 clips), turned into a
# conflict set with the organism's own framing (3 conflicts, 1 consistent and 1 audio-only item per clip).
set -e
out=${1:-/work/data/flite}
rm -rf "$out" && mkdir -p "$out/clips"
for digit in zero one two three four five six seven eight nine; do
  mkdir -p "$out/clips/$digit"
  for voice in kal kal16 awb rms slt; do
    for stretch in 0.8 1.0 1.25; do
      flite -voice "$voice" --setf duration_stretch=$stretch -t "$digit" -o "$out/clips/$digit/${voice}_${stretch}.wav"
    done
  done
done
cd /work/main
.venv/bin/backpatch conflicts --from "$out/clips" --out "$out/conflicts.jsonl" \
  --question "Which digit is spoken?" --claim 'quote=The speaker says "{claim}".' \
  --filename-pattern '(?P<speaker>[^_]+)_' --seed 0
