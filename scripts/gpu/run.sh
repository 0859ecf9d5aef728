#!/usr/bin/env bash
# The committed GPU check, in one device call (docs/performance.md, "GPU"): a smoke run of the bench on the GPU
# (tiny models: a failing CUDA-graph capture shows here, before the full-size rows), then the full-size bench
# rows, each row saved as it finishes. Writes under OUTDIR: env.txt (GPU, versions), smoke.json/.md/.log and
# bench.json/.md/.log. Where no CUDA device is present, it runs the smoke part alone, on the CPU (the tests do).
#   scripts/gpu/run.sh OUTDIR [BENCH ARGS ...]
# BENCH ARGS replace the default rows (below). BUDGET_S (default 420) bounds the full-size part: no model's group of
# rows (one batch and mode) starts after BUDGET_S - 150 s, and it is killed at BUDGET_S (what it saved stays).
# OFFICIAL_S (default 0: skipped) > 0 with .official/ present (scripts/gpu/official_export.sh): before the bench rows,
# scripts/gpu/official.py times the official Infinity and HART pipelines beside ours, killed at OFFICIAL_S, writing
# official.json/.md/.log; the bench still gets its BUDGET_S.
# Wheels from scripts/gpu/wheels.sh in .whl/ are installed first where pydantic is missing (the device machine).
set -uo pipefail
if [ $# -lt 1 ] || [ -z "$1" ]; then echo "usage: scripts/gpu/run.sh OUTDIR [BENCH ARGS ...]" >&2; exit 2; fi
out=$(mkdir -p "$1" && cd "$1" && pwd) || exit 2; shift
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
source scripts/gpu/site.sh
cuda=$(python3 -c "import torch; print(int(torch.cuda.is_available()))") || exit 1
{
    date -u +%FT%TZ; nvidia-smi 2>/dev/null
    python3 -c "import platform, torch, transformers, pydantic
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'transformers', transformers.__version__, 'pydantic', pydantic.__version__)"
} >"$out/env.txt" 2>&1
smoke=(--smoke --cuda-graphs --decode-experiment --unpacked --speedups --out "$out/smoke.json")
timeout 300 python3 scripts/gpu/bench.py "${smoke[@]}" 2>&1 | tee "$out/smoke.log"
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then echo "run.sh: smoke run failed (exit $status), full-size rows not run"; exit "$status"; fi
if [ "$cuda" != 1 ]; then echo "run.sh: no CUDA device, smoke run only"; exit 0; fi
official_s=${OFFICIAL_S:-0}
if [ "$official_s" -gt 0 ] && [ -d .official ]; then
    timeout "$official_s" python3 scripts/gpu/official.py --deadline-s $((official_s - 60)) --out "$out/official.json" \
        2>&1 | tee "$out/official.log"
    status=${PIPESTATUS[0]}
    [ "$status" -ne 0 ] && echo "run.sh: official.py exited $status (124: killed at OFFICIAL_S=$official_s s); bench rows follow"
elif [ "$official_s" -gt 0 ]; then
    echo "run.sh: OFFICIAL_S=$official_s but no .official/ (run scripts/gpu/official_export.sh and carry .official)"
fi
budget=${BUDGET_S:-420}
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--cuda-graphs --decode-experiment --unpacked --batches 1 16)
timeout "$budget" python3 scripts/gpu/bench.py "${args[@]}" --deadline-s $((budget - 150)) --out "$out/bench.json" \
    2>&1 | tee "$out/bench.log"
status=${PIPESTATUS[0]}
[ "$status" -eq 124 ] && echo "run.sh: bench killed at BUDGET_S=$budget s; bench.json keeps the rows it saved"
exit "$status"
