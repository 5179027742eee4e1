#!/usr/bin/env bash
# Make .venv ready for local runs and tests: create it with Python 3.12 (the
# Cloud Functions runtime) or else 3.11+, and install requirements-dev.txt into it
# whenever that file (or requirements.txt, which it includes) has changed.
# Safe to run any number of times; quiet unless something is installed or fails.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
STAMP="$VENV/.requirements-dev.sha256"

# Runs, and is 3.11 or newer. A pyenv shim for a version that is not selected
# exists on PATH but fails, so existing is not enough.
usable() {
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

candidates() {
    echo python3.12
    if command -v pyenv >/dev/null 2>&1; then
        local root
        root=$(pyenv root 2>/dev/null) || root=
        if [ -n "$root" ]; then
            # Newest 3.12.x first.
            ls -d "$root"/versions/3.12*/bin/python3.12 2>/dev/null | sort -rV || true
        fi
    fi
    echo python3.11
    echo python3
}

find_python() {
    local candidate
    while read -r candidate; do
        if usable "$candidate"; then
            echo "$candidate"
            return 0
        fi
    done < <(candidates)
    return 1
}

if ! usable "$VENV/bin/python"; then
    if ! python=$(find_python); then
        echo "bootstrap: no Python 3.11 or newer found (tried python3.12, pyenv's" \
            "3.12, python3.11, python3). Install Python 3.12." >&2
        exit 1
    fi
    rm -rf "$VENV"
    if ! "$python" -m venv "$VENV" >/dev/null; then
        echo "bootstrap: '$python -m venv' failed; on Debian install the venv" \
            "module: apt-get install -y python3-venv" >&2
        exit 1
    fi
    echo "bootstrap: created $VENV with $("$VENV/bin/python" --version) ($python)"
fi

wanted=$(cat requirements-dev.txt requirements.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$wanted" ]; then
    echo "bootstrap: installing requirements-dev.txt into $VENV"
    # -qq: errors only. A machine-wide pip config may list extra local indexes,
    # and pip warns once per package about each that lacks it.
    "$VENV/bin/python" -m pip install -qq --disable-pip-version-check \
        --requirement requirements-dev.txt
    echo "$wanted" >"$STAMP"
fi
