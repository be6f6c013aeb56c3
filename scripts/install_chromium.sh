#!/usr/bin/env bash
# Debian's Chromium for the browser test of the Gradio UI (tests/test_serve.py drives it with
# Playwright; Playwright's own browser download needs a host this machine cannot reach).
# Installs it where apt-get and root are available; elsewhere says so, and that test skips.
set -uo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "note: /usr/bin/chromium is missing and cannot be installed here (needs root + apt-get); the browser test will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
  || echo "note: apt-get could not install chromium; the browser test will skip" >&2
exit 0
