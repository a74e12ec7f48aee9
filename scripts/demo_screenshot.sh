#!/usr/bin/env bash
# README "Try it first: the demo": the screenshot docs/demo.png.
# Refresh docs/demo.png: the demo's browser test drives the running app on the default model and saves its
# screenshot there (tests themselves write only to temporary paths). Needs Debian's chromium (see README).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
BACKPATCH_SCREENSHOT="$ROOT/docs/demo.png" python -m pytest -q tests/test_demo.py -k browser_compare
echo "wrote $ROOT/docs/demo.png"
