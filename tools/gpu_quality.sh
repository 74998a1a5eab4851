#!/usr/bin/env bash
# The quality curve (tools/bench_quality.py --steps 250,1000,2500) in one call on a lent GPU machine: one H200,
# 16 cores, torch but not open_clip_torch, webdataset, pydantic or ftfy, no network, at most 10 minutes a call,
# at most 8 files back from $OUT.
#
#   bash tools/gpu_quality.sh prepare      # here: wheels -> .whl/, the CIFAR-10 tarball -> .device-data/ (ignored)
#   device run: command "bash tools/gpu_quality.sh run", carry [".whl", ".device-data"], timeout_s 600
#   bash tools/gpu_quality.sh run --quick --steps 4,8 --runs clip,supervised,mixed,mixed-curriculum --seeds 0 \
#       --one-seed ""                      # the same path on the CPU (smoke, ~1.5 min)
#
# `run` installs the carried wheels with --target when a package is missing, trains the curve (defaults below; any
# argument replaces them), stops the training at $LIMIT seconds (default 510) so the call ends inside its 10 minutes,
# and leaves in $OUT (default bench_out/gpu-quality): bench.log, curve.txt (every budget's tables and the gap per
# budget, from the results that finished), gap_vs_budget.png, results.tar.gz (the results JSONs, curve.json and
# every training's log and metrics).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
shift || true
source tools/device_env.sh  # the wheels, their download here and install there (shared with tools/gpu_bench.sh)

case "$mode" in
prepare)
  device_prepare
  ;;
run)
  OUT=${OUT:-bench_out/gpu-quality}
  mkdir -p "$OUT"
  OUT=$(cd "$OUT" && pwd)
  repo=$PWD
  device_install
  work=${WORK:-/tmp/vlp-gpu-quality}
  (python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"; nproc) > "$OUT/bench.log" 2>&1
  # 3 seeds for the headline pair (clip, mixed), 1 for supervised; both at lr 5e-4 (the sweeps' choice at 250 steps
  # and the issue's GPU runs); 4 trainings side by side, 4 cores and 3 data workers each.
  defaults=(--steps 250,1000,2500 --runs clip,supervised,mixed --one-seed supervised --seeds 0,1,2 --lrs 5e-4
            --parallel 4 --workers 3)
  [ $# -gt 0 ] && defaults=("$@")
  set +e
  timeout --signal=TERM --kill-after=20 "${LIMIT:-510}" python3 tools/bench_quality.py --cache-dir "$work" \
    --out-dir "$work/curve" "${defaults[@]}" >> "$OUT/bench.log" 2>&1
  echo "bench_quality exit $?" >> "$OUT/bench.log"
  set -e
  results=$(cd "$work/curve" && ls steps-*/results.json 2>/dev/null || true)
  if [ -n "$results" ]; then
    (cd "$work/curve" && python3 "$repo/tools/bench_quality.py" --report-only $results \
      --plot "$OUT/gap_vs_budget.png") > "$OUT/curve.txt" 2>&1 || true
    (cd "$work/curve" && tar czf - $results $(ls curve.json 2>/dev/null) \
      $(ls -d steps-*/runs/*/train.log steps-*/runs/*/metrics.jsonl 2>/dev/null)) > "$OUT/results.tar.gz"
  fi
  ls -la "$OUT"
  tail -5 "$OUT/bench.log"
  ;;
*)
  echo "usage: $0 prepare | run [bench_quality arguments]" >&2
  exit 2
  ;;
esac
