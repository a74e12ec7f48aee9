#!/usr/bin/env bash
# README "Tests" (and CI, .ci/run): regenerates no number; the system packages every other step needs.
# The Debian packages the tests need (run as root, or with sudo): espeak-ng + sox synthesize the organisms'
# speech corpus, libsndfile reads audio files, chromium is the browser the demo's browser test drives
# (Debian's own; no test tool downloads a browser).
set -euo pipefail
PACKAGES="espeak-ng sox libsndfile1 chromium"
missing=0
for tool in espeak-ng sox chromium; do command -v "$tool" >/dev/null || missing=1; done
ldconfig -p | grep -q libsndfile || missing=1
if [ "$missing" = 1 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
fi
echo "system packages present: $PACKAGES"
