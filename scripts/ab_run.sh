#!/usr/bin/env bash
# On the GPU machine: builds side by side in one call, interleaved (the only fair A/B: clocks and
# the machine itself change between calls). "main" is this tree's build/, any other NAME is
# build/ab/NAME/ from scripts/ab_build.sh (carry them with scripts/pack_build.sh). Logs go to
# $OUT/ab (or build/gpu-out/ab); the headline lines of every run are printed last, by run.
# Usage:  scripts/ab_run.sh [-r ROUNDS] KIND NAME...
#   ep          bench_ep (EPMOE_BENCH_CASES, default 6: R = 2 and R = 1 rows)
#   ep-trace    bench_ep's trace build, first case at R = 2 (make dev-trace; ab_build.sh NAME trace)
#   w4a8-trace  bench_w4a8's trace build: when the GEMM's CTAs ran, $MODEL, $ROWS, on GPU 0
#   w4a8        bench_w4a8 --model $MODEL (deepseek-r1) --rows $ROWS (1,8,16,32) $W4A8_ARGS, on GPU 0
#   layer       epmoe bench $LAYER_ARGS: the MoE layer and its stages alone on every GPU (128 experts
#               a GPU at R = 2: the expert MLP in the layer's own shape)
#   tests-ep    test_ep_gpu on the device API, all-to-all and gin-emulated transports
#   tests-w4a8  test_w4a8_gpu
# e.g.  scripts/ab_run.sh -r 2 ep main words64 msgready
set -u
cd "$(dirname "$0")/.."
rounds=1
[ "${1:-}" = -r ] && { rounds=$2; shift 2; }
[ $# -ge 2 ] || { sed -n 2,16p "$0"; exit 2; }
kind=$1
shift
OUT=${OUT:-build/gpu-out}
mkdir -p "$OUT/ab"
export NCCL_NVLS_ENABLE=0
for d in /opt/torch/.venv/lib/python3.*/site-packages/nvidia/nccl/lib; do
    [ -d "$d" ] && export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
done

bin() { # name, binary under build/ for main, under build/ab/NAME otherwise
    case $1 in
    main) case $2 in
          bench_ep_trace) echo build/trace/bench/bench_ep ;;
          bench_w4a8_trace) echo build/trace/bench/bench_w4a8 ;;
          bench_*) echo build/bench/$2 ;;
          epmoe) echo build/epmoe ;;
          *) echo build/tests/gpu/$2 ;;
          esac ;;
    *) echo build/ab/$1/$2 ;;
    esac
}

failed=0
runs=()
for round in $(seq 1 "$rounds"); do
    for name in "$@"; do
        log=$OUT/ab/$kind-$name-$round.log
        case $kind in
        ep) EPMOE_BENCH_CASES=${EPMOE_BENCH_CASES:-6} timeout 300 "$(bin "$name" bench_ep)" >"$log" 2>&1 ;;
        ep-trace) EPMOE_BENCH_CASES=1 EPMOE_BENCH_R=2 timeout 120 "$(bin "$name" bench_ep_trace)" >"$log" 2>&1 ;;
        w4a8) CUDA_VISIBLE_DEVICES=0 timeout 300 "$(bin "$name" bench_w4a8)" --model "${MODEL:-deepseek-r1}" \
                  --rows "${ROWS:-1,8,16,32}" ${W4A8_ARGS:-} >"$log" 2>&1 ;;
        w4a8-trace) CUDA_VISIBLE_DEVICES=0 timeout 300 "$(bin "$name" bench_w4a8_trace)" --model "${MODEL:-deepseek-r1}" \
                  --rows "${ROWS:-1,8,16,32}" ${W4A8_ARGS:-} >"$log" 2>&1 ;;
        layer) timeout 300 "$(bin "$name" epmoe)" bench ${LAYER_ARGS:-} >"$log" 2>&1 ;;
        tests-ep) for tr in device alltoall gin-emulated; do
                      if [ $tr = device ]; then timeout 300 "$(bin "$name" test_ep_gpu)"
                      else timeout 300 "$(bin "$name" test_ep_gpu)" --transport $tr; fi || echo "FAIL: $tr (rc $?)"
                  done >"$log" 2>&1 ;;
        tests-w4a8) timeout 300 "$(bin "$name" test_w4a8_gpu)" >"$log" 2>&1 ;;
        *) echo "unknown kind $kind"; exit 2 ;;
        esac
        rc=$?
        [ $rc = 0 ] || echo "FAIL: rc $rc" >>"$log"
        grep -q FAIL "$log" && failed=$((failed + 1))
        runs+=("$log")
    done
done

for log in "${runs[@]}"; do
    echo "== $(basename "$log" .log)"
    case $kind in
    ep) grep -E '^[12] ' "$log" | cut -c1-110 ;;
    ep-trace) grep -E '^  (dispatch|combine) ' "$log" | cut -c1-320 ;;
    w4a8) grep -E 'w4a8 W13\+W2 |w4a8 MLP' "$log" ;;
    w4a8-trace) grep -E ' trace ' "$log" ;;
    layer) grep -E '  (FP8|BF16)  ' "$log" ;;
    *) grep -E 'checks|FAIL' "$log" ;;
    esac
    case $kind in tests-*) ;; *) grep -m 3 FAIL "$log" ;; esac
done
echo "ab_run $kind ($rounds round(s), $*): $([ $failed = 0 ] && echo PASS || echo "FAIL ($failed runs)")"
[ $failed = 0 ]
