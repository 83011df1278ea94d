#!/usr/bin/env bash
# Install the Debian packages the tests need, when missing: 'chromium' (tests/test_report_html.py renders the
# HTML report headless) and 'jq' (the README's curl flow, run by tests/test_e2e.py::test_readme_curl_flow).
# Idempotent: does nothing when both commands are on PATH. Needs root (or sudo) and apt.
# Exit status: 0 when both are available afterwards, 1 otherwise (with a message on stderr).
set -u

missing=()
for pkg in chromium jq; do
    command -v "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_debian.sh: ${missing[*]} missing and this is not root (no sudo); install the Debian" \
             "package(s) by hand" >&2
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_debian.sh: ${missing[*]} missing and apt-get is not available; install by hand" >&2
    exit 1
fi

start=$(date +%s)
echo "installing Debian package(s): ${missing[*]} ..."
if $SUDO apt-get update -qq && \
   $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
    echo "installed ${missing[*]} in $(( $(date +%s) - start )) s"
    exit 0
fi
echo "install_debian.sh: 'apt-get install ${missing[*]}' failed (no network / no apt mirror?); the tests" \
     "need them. Install the Debian package(s) by hand." >&2
exit 1
