#!/usr/bin/env bash
# Extraction benchmark: mergekit-extract-lora (peer) at rank 16 on the Llama pair and the
# MiniLM pair, each run measured by bench/measure.py (wall, peak RSS, load), then the
# per-module error of every adapter against the true delta (bench/adapter_error.py).
#
#   bench/run_peer_extract.sh [all|llama-j1|llama-default|minilm|errors|surgery]
#
# Long (the Llama runs take minutes each): run it with nohup and poll
#   nohup bench/run_peer_extract.sh all > bench/work/extract.out 2>&1 &
# Results: bench/work/results.jsonl (timings), bench/work/errors/*.json (errors).
#
# Hook for surgery: set SURGERY_EXTRACT_CMD to a template with {base} {ft} {out} {rank}, e.g.
#   SURGERY_EXTRACT_CMD='.venv/bin/surgery extract-lora {base} {ft} --rank {rank} -o {out}' \
#     bench/run_peer_extract.sh surgery
# and the same measurements + error report run for surgery's adapters.
set -euo pipefail
cd "$(dirname "$0")/.."                      # repo root
export HF_HUB_OFFLINE=1
PY=.venv/bin/python
MK=bench/.venv-mergekit/bin/mergekit-extract-lora
W=bench/work
OUT=$W/out
RANK=16
mkdir -p "$OUT" "$W/errors"
[ -d $W/llama/ft ] || $PY bench/make_llama_pair.py --out $W/llama --lora
[ -d $W/minilm-ft ] || $PY bench/make_minilm_pair.py --out $W
[ -x $MK ] || bench/peers/setup_mergekit.sh

mk() {  # label base ft extra-args...
  local label=$1 base=$2 ft=$3; shift 3
  rm -rf "$OUT/$label"
  uptime
  $PY bench/measure.py --label "$label" -- \
    $MK --model "$ft" --base-model "$base" --out-path "$OUT/$label" --max-rank $RANK "$@"
}
err() {  # label base ft [--optimal]
  local label=$1 base=$2 ft=$3; shift 3
  [ -d "$OUT/$label" ] || { echo "skip errors for $label (no adapter)"; return 0; }
  $PY bench/adapter_error.py "$OUT/$label" "$base" "$ft" --json "$W/errors/$label.json" --quiet "$@"
}

what=${1:-all}
on() { [ "$what" = all ] || [ "$what" = "$1" ]; }
case $what in all|llama-j1|llama-default|minilm|errors|surgery) ;; *) echo "unknown: $what" >&2; exit 2 ;; esac
if on llama-j1;      then mk mergekit-llama-r16-j1 $W/llama/base $W/llama/ft --num-threads 1; fi
if on llama-default; then mk mergekit-llama-r16-default $W/llama/base $W/llama/ft; fi
if on minilm; then
  mk mergekit-minilm-r16-j1 $W/minilm-base $W/minilm-ft --num-threads 1
  mk mergekit-minilm-r16-default $W/minilm-base $W/minilm-ft
fi
if on errors; then
  err mergekit-llama-r16-j1 $W/llama/base $W/llama/ft
  err mergekit-minilm-r16-j1 $W/minilm-base $W/minilm-ft --optimal
fi
if [ "$what" = surgery ]; then
  : "${SURGERY_EXTRACT_CMD:?set SURGERY_EXTRACT_CMD, see the header of this script}"
  for pair in "llama $W/llama/base $W/llama/ft" "minilm $W/minilm-base $W/minilm-ft"; do
    set -- $pair
    label=surgery-$1-r$RANK
    rm -rf "$OUT/$label"
    cmd=${SURGERY_EXTRACT_CMD//\{base\}/$2}; cmd=${cmd//\{ft\}/$3}
    cmd=${cmd//\{out\}/$OUT/$label}; cmd=${cmd//\{rank\}/$RANK}
    uptime
    $PY bench/measure.py --label "$label" -- $cmd
    err "$label" "$2" "$3"
  done
fi
