#!/usr/bin/env bash
# The OVSS GPU path, checked and timed in one run on a machine with one CUDA GPU (about 5-8 minutes of GPU time).
#
#   1. tests/ovss/test_gpu_path.py, which on a GPU adds the CUDA-only test: the per-window and per-image path
#      runs under torch.cuda.set_sync_debug_mode("error"), so any host sync there fails it;
#   2. benchmarks/ovss_throughput.py: naive per-window loop vs the harness's batches (batch 32), GFLOP/s;
#   3. benchmarks/ovss_e2e.py --harness-only: a cold `harness run ovss` on VOC-sized images, with --profile;
#   4. benchmarks/precision_drift.py: bf16 vs fp32 mIoU drift, relabelled pixels and times (VOC20, ADE20K).
#
# Every table names the GPU (torch.cuda.get_device_name). Results go to $OUT (default benchmarks/gpu/); copy the
# tables into benchmarks/RESULTS.md. Each step has its own time limit, so one slow step cannot eat the others'.
#
#   bash benchmarks/gpu_check.sh                      # PYTHON=... to choose the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python}
OUT=${OUT:-$ROOT/benchmarks/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
SUMMARY="$OUT/gpu_check.md"

device=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))") || { echo "no CUDA device" >&2; exit 2; }
{
  echo "## benchmarks/gpu_check.sh on $device ($(date -u '+%Y-%m-%d %H:%M UTC'))"
  echo
  echo "torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)'), $(nproc) CPU cores"
} > "$SUMMARY"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log its output, note its status and time
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "- $name: exit $rc after $((SECONDS - t0)) s (limit $limit s; log $name.log)" >> "$SUMMARY"
  tail -n 5 "$OUT/$name.log"
}

echo >> "$SUMMARY"
step tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/ovss/test_gpu_path.py
step ovss_throughput 150 "$PY" benchmarks/ovss_throughput.py --images 8 --batch-size 32 --device cuda \
  --out "$OUT/ovss_throughput.md"
step ovss_e2e 120 "$PY" benchmarks/ovss_e2e.py --dataset voc21 --images 16 --method naclip --device cuda \
  --harness-only --out "$OUT/ovss_e2e.md"
step precision_drift 180 "$PY" benchmarks/precision_drift.py --datasets voc20,ade20k --images 4 --device cuda \
  --out "$OUT/precision_drift.md"

for f in ovss_throughput ovss_e2e precision_drift; do
  [ -f "$OUT/$f.md" ] && { echo; cat "$OUT/$f.md"; } >> "$SUMMARY"
done
cat "$SUMMARY"
