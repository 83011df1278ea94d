#!/usr/bin/env bash
# Install Debian's headless-capable Chromium (used by tests/test_report_html.py to render the HTML report).
# Idempotent: does nothing when `chromium` is already on PATH. Needs root (or sudo) and apt.
# Exit status: 0 when chromium is available afterwards, 1 otherwise (with a message on stderr).
set -u

if command -v chromium >/dev/null 2>&1; then
    echo "chromium already installed: $(chromium --version 2>/dev/null || command -v chromium)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_chromium.sh: chromium is missing and this is not root (no sudo); install the Debian" \
             "package 'chromium' by hand" >&2
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium.sh: chromium is missing and apt-get is not available; install Chromium by hand" >&2
    exit 1
fi

start=$(date +%s)
echo "installing Debian package 'chromium' ..."
if $SUDO apt-get update -qq && \
   $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; then
    echo "chromium installed in $(( $(date +%s) - start )) s: $(chromium --version 2>/dev/null)"
    exit 0
fi
echo "install_chromium.sh: 'apt-get install chromium' failed (no network / no apt mirror?); the HTML" \
     "report test needs it. Install the Debian package 'chromium' by hand." >&2
exit 1
