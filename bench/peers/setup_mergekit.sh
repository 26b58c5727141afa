#!/usr/bin/env bash
# Creates bench/.venv-mergekit with mergekit==0.1.5 (the peer we benchmark against).
# torch is pinned to 2.13.0 (the CPU wheel in /opt/wheels when present) so the peer
# and surgery run on the same torch build. We never vendor mergekit's code.
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"          # bench/
VENV="$HERE/.venv-mergekit"
PY="${PYTHON:-python3.11}"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==2.13.0" > "$CONSTRAINTS"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
# CPU torch first (from the local wheel cache if available), then mergekit on top of it.
"$VENV/bin/pip" install -c "$CONSTRAINTS" "torch==2.13.0"
"$VENV/bin/pip" install -c "$CONSTRAINTS" "mergekit==0.1.5"
"$VENV/bin/python" -c "import torch, mergekit, importlib.metadata as m; print('torch', torch.__version__, '| mergekit', m.version('mergekit'))"
"$VENV/bin/mergekit-extract-lora" --help > /dev/null
echo "ok: $VENV/bin/mergekit-extract-lora"
