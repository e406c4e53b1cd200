#!/usr/bin/env bash
# System tools some tests use when present: headless Chromium (the report is opened in a real
# browser) and dicom3tools' dciodvfy (DICOM outputs of `duplus segment` are validated with it). Best effort: on a machine that is not Debian, or without root, the tests that need
# them skip with a message instead.
set -uo pipefail
if [[ $(id -u) -ne 0 || ! -f /etc/debian_version ]]; then
    echo "install_test_tools: not root on Debian; browser and DICOM validation tests will skip" >&2
    exit 0
fi
if ! command -v chromium >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update -qq >/dev/null 2>&1
    timeout 900 apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
        || echo "install_test_tools: chromium could not be installed; browser tests will skip" >&2
fi
if ! command -v dciodvfy >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update -qq >/dev/null 2>&1
    timeout 900 apt-get install -y -qq --no-install-recommends dicom3tools >/dev/null 2>&1 \
        || echo "install_test_tools: dicom3tools could not be installed; DICOM validation tests will skip" >&2
fi
exit 0
