#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv.
#   ./scripts/setup.sh         runtime dependencies (requirements.txt)
#   ./scripts/setup.sh --dev   plus test extras (requirements-dev.txt) and Debian's chromium for browser tests
# Safe to run again: an existing .venv is reused and pip skips what is already installed.
set -euo pipefail

cd "$(dirname "$0")/.."

dev=0
for arg in "$@"; do
    case "$arg" in
        --dev) dev=1 ;;
        -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown option $arg (use --dev or nothing)" >&2; exit 2 ;;
    esac
done

if [ ! -x .venv/bin/python ]; then
    python3.11 -m venv .venv
fi

requirements=requirements.txt
[ "$dev" = 1 ] && requirements=requirements-dev.txt
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements"

# Browser tests drive Debian's chromium; `playwright install` would try to download a browser, so never run it.
if [ "$dev" = 1 ] && [ ! -x /usr/bin/chromium ]; then
    sudo=""
    [ "$(id -u)" != 0 ] && sudo="sudo"
    $sudo apt-get update
    $sudo apt-get install -y chromium
fi
