#!/usr/bin/env bash
# Set up a fresh machine and run the whole test suite (the README's test command; .ci/run calls it).
# System packages: PortAudio (to build PyAudio) and a PulseAudio daemon + ALSA plugin for the
# virtual sound card the audio tests create; systemd for `systemd-analyze verify` of the unit
# files. Skipped when already present.
set -euo pipefail
cd "$(dirname "$0")/.."
APT_PACKAGES="pulseaudio pulseaudio-utils portaudio19-dev libasound2-plugins espeak-ng systemd"
missing=$(for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e '.[test]'
python3 -m pytest -q "$@"
