#!/usr/bin/env bash
# The demo model's GPU training in one device call (docs/demo-model.md, "Next: the GPU run"): tokenizer, a timed
# transformer run, then the extended yardstick's figures and the sample prompts, all written under OUTDIR.
#   scripts/gpu/train_demo.sh OUTDIR [--transformer-s SECONDS] [--smoke]
set -uo pipefail
if [ $# -lt 1 ] || [ -z "$1" ]; then echo "usage: scripts/gpu/train_demo.sh OUTDIR [ARGS ...]" >&2; exit 2; fi
out=$(mkdir -p "$1" && cd "$1" && pwd) || exit 2; shift
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
source scripts/gpu/site.sh
{ date -u +%FT%TZ; nvidia-smi 2>/dev/null; } >"$out/env.txt" 2>&1
python3 scripts/gpu/train_demo.py "$out" "$@" 2>&1 | tee "$out/train.log"
exit "${PIPESTATUS[0]}"
