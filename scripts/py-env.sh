#!/usr/bin/env bash
# The project's Python environment for model tools (bundle generators, the Python references the
# tests compare against, checks): a venv in .tools/py with the pinned packages of
# models/requirements.txt.
#
#   scripts/py-env.sh            # idempotent; quiet when already up to date
#   .tools/py/bin/python models/reference/check.py
#
# The venv is rebuilt when models/requirements.txt changes (its sha256 is kept beside it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.tools/py"
REQ="$ROOT/models/requirements.txt"
STAMP="$VENV/requirements.sha256"
PYTHON="${PYTHON:-python3}"

want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    exit 0
fi

echo "    creating the model tools' Python environment in .tools/py (models/requirements.txt)"
if [[ ! -x "$VENV/bin/python" ]]; then
    if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
        if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null \
                || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
            "$PYTHON" -m venv "$VENV"
        else
            echo "py-env: '$PYTHON -m venv' failed (on Debian: apt-get install python3-venv)" >&2
            exit 1
        fi
    fi
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ"
echo "$want" >"$STAMP"
