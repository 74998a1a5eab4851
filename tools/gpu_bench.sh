#!/usr/bin/env bash
# The GPU throughput rows (#29 items 3 and 4) in one call on a lent GPU machine: one H200, 16 cores, torch but not
# open_clip_torch, webdataset, pydantic or ftfy, no network, at most 10 minutes a call, at most 8 files back.
#
#   bash tools/gpu_bench.sh prepare      # here: wheels -> .whl/ (+ .whl/old/), CIFAR-10 -> .device-data/ (ignored)
#   device run: command "bash tools/gpu_bench.sh run", carry [".whl", ".device-data"], timeout_s 600
#   bash tools/gpu_bench.sh run --quick  # the same path on the CPU (smoke): a tiny model, a few steps
#
# `run` installs the carried wheels (tools/device_env.sh), then runs four stages, each under `timeout` so the whole
# stays inside $LIMIT seconds (default 540), in this order (what lands first matters most):
#   1. steps:   tools/bench_gpu.py's in-process, synchronized step rows, ViT-B-16 224 px, batch 256, eager: vlp
#               CLIP-only, FLIP, mixed, and open_clip_train's own step; the loader section
#   2. e2e:     vlp train (mixed, CLIP-only) and open_clip_train end to end on the same CIFAR-10 shards at 224 px,
#               12 data workers each; FLOPs and in-process steps from stage 1
#   3. fsdp:    tools/gpu_fsdp_check.py: accelerate + configs/accelerate/fsdp.yaml on one process: train,
#               checkpoint, resume, export, open_clip load (on a machine without CUDA: --no-fsdp)
#   4. compile: the step rows again with --compile (vlp's train.compile, open_clip_train's --torchcompile), as many
#               as the time left allows (each row is saved as it lands)
# and leaves in $OUT (default bench_out/gpu-bench): bench.log (everything), summary.txt (every table and check, from
# the results that finished), results.tar.gz (the results JSONs, every run's log and metrics).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
shift || true
source tools/device_env.sh

case "$mode" in
prepare)
  device_prepare
  ;;
run)
  quick=0
  [ "${1:-}" = "--quick" ] && quick=1
  OUT=${OUT:-bench_out/gpu-bench}
  mkdir -p "$OUT"
  OUT=$(cd "$OUT" && pwd)
  repo=$PWD
  start=$SECONDS
  LIMIT=${LIMIT:-540}
  work=${WORK:-/tmp/vlp-gpu-bench}
  mkdir -p "$work"
  log=$OUT/bench.log
  device_install
  device_old_webdataset "$work/cache/webdataset-0.2.86" || echo "no webdataset 0.2.86: open_clip_train rows skipped" >> "$log"
  cuda=$(python3 -c "import torch; print(int(torch.cuda.is_available()))")
  {
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    python3 -c "import open_clip, webdataset, accelerate, numpy; print('open_clip', open_clip.__version__, 'webdataset', webdataset.__version__, 'accelerate', accelerate.__version__, 'numpy', numpy.__version__)"
    echo "cores $(nproc), LIMIT $LIMIT s, quick $quick"
  } >> "$log" 2>&1
  if [ $quick = 1 ]; then  # the CPU smoke: every stage, a tiny model
    model=(--model vlp-test-vit --batch-size 16)
    steps=(--steps 3 --warmup 1 --loader-images 50 --loader-batches 1)
    e2e=(--workers 1 --e2e-steps 4 --e2e-warmup 2 --e2e-log-every 1 --e2e-images 200)
    fsdp=(--steps 4 --resume-at 2 --workers 1)
    compile_rows=clip
  else
    model=(--model ViT-B-16 --image-size 224 --batch-size 256)
    steps=(--steps 30 --warmup 10 --loader-batches 2)
    e2e=(--workers 12 --e2e-steps 40 --e2e-warmup 10 --e2e-log-every 5 --e2e-images 3000)
    fsdp=(--model vlp-tiny-vit --steps 8 --resume-at 4 --workers 2)
    compile_rows=open_clip,clip,mixed,flip
  fi
  [ "$cuda" = 1 ] || fsdp+=(--no-fsdp)
  # stage NAME CAP COMMAND...: COMMAND under the smaller of CAP and the time left (less 15 s to pack the results)
  stage() {
    local name=$1 cap=$2
    shift 2
    local left=$(( LIMIT - (SECONDS - start) - 15 ))
    local t=$(( cap < left ? cap : left ))
    if [ $t -lt 20 ]; then
      echo "=== stage $name skipped: ${left}s left of LIMIT $LIMIT" | tee -a "$log"
      return 0
    fi
    echo "=== stage $name (at most ${t}s; $(( SECONDS - start ))s used)" | tee -a "$log"
    set +e
    timeout --signal=TERM --kill-after=10 "$t" "$@" >> "$log" 2>&1
    local rc=$?
    set -e
    echo "=== stage $name exit $rc ($(( SECONDS - start ))s used)" | tee -a "$log"
  }
  bench=(python3 tools/bench_gpu.py --cache-dir "$work" "${model[@]}")
  stage steps 170 "${bench[@]}" "${steps[@]}" --rows clip,flip,mixed,open_clip --e2e "" --out "$work/steps-eager.json"
  from=()
  [ -f "$work/steps-eager.json" ] && from=(--steps-from "$work/steps-eager.json")
  stage e2e 210 "${bench[@]}" --rows "" --no-loader --e2e vlp_mixed,vlp_clip,open_clip_train "${e2e[@]}" \
    "${from[@]}" --out "$work/e2e.json"
  stage fsdp 120 python3 tools/gpu_fsdp_check.py "${fsdp[@]}" --work "$work/fsdp" --out "$work/fsdp.json"
  stage compile 600 "${bench[@]}" "${steps[@]}" --compile --rows "$compile_rows" --e2e "" --no-loader \
    --out "$work/steps-compile.json"

  {
    echo "GPU bench ($(head -1 "$log")), $(( SECONDS - start )) s"
    echo
    steps_json=$(ls "$work"/steps-eager.json 2>/dev/null; ls "$work"/steps-compile.json 2>/dev/null || true)
    [ -n "$steps_json" ] && python3 tools/bench_gpu.py --report-only $steps_json
    [ -f "$work/e2e.json" ] && python3 tools/bench_gpu.py --report-only "$work/e2e.json"
    echo "FSDP check:"
    grep -E '^  (ok  |FAIL) |^gpu_fsdp_check: ' "$log" || echo "  (did not run)"
    echo
    grep -E '^=== stage ' "$log"
  } > "$OUT/summary.txt" 2>&1 || true
  (cd "$work" && tar czf - $(ls *.json 2>/dev/null) \
    $(ls -d gpu/e2e-runs/*/*.log gpu/e2e-runs/*/metrics.jsonl gpu/e2e-runs/*/bench_config.yaml \
      gpu/e2e-runs/*/run/out.log fsdp/*.log fsdp/*.yaml fsdp/ref/metrics.jsonl fsdp/resumed/metrics.jsonl \
      2>/dev/null)) > "$OUT/results.tar.gz"
  ls -la "$OUT"
  cat "$OUT/summary.txt"
  ;;
*)
  echo "usage: $0 prepare | run [--quick]" >&2
  exit 2
  ;;
esac
