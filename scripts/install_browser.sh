#!/usr/bin/env bash
# The web page's browser tests drive Debian's chromium (never a browser download). Installs it where it is
# missing and this user can (root: apt-get); otherwise says how, and fails: `make test` runs every test.
set -euo pipefail
if command -v chromium >/dev/null || [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "== apt-get install chromium (the web page's browser tests)"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
    exit 0
fi
echo "error: the web page's browser tests need Debian's chromium: run 'sudo apt-get install -y chromium'" >&2
exit 1
