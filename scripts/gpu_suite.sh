#!/usr/bin/env bash
# The whole GPU suite in one call (the device machine is leased by the minute): GPU tests, the
# same under compute-sanitizer memcheck, the benchmarks; a short table last, then one PASS/FAIL
# line (and the exit status). Logs and JSON go to $OUT (or build/gpu-out). Build first here
# (make gpu-build) and carry build/ along; set EPMOE_SUITE="tests memcheck bench" to pick steps.
# "tests" is "kernels python ep" (ep: the EP transports and the launch helpers); "memcheck-w4a8"
# is the wgmma GEMM's part of "memcheck" alone (W4A8, and the expert GEMMs with fp8-block's).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-out}
mkdir -p "$OUT"
: >"$OUT/summary.txt"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export EPMOE_LIB=$PWD/build/libepmoe.so PYTHONUNBUFFERED=1
# NCCL's device API must run against the libnccl it was compiled with (2.28.9, the CUDA toolkit's
# headers): on the H200 image that is torch's wheel, not the system 2.28.3.
for d in /opt/torch/.venv/lib/python3.*/site-packages/nvidia/nccl/lib; do
    [ -d "$d" ] && export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
done
steps=${EPMOE_SUITE:-"tests memcheck bench"}
summary=()
failed=0
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')

run() { # name, command...
    local name=$1; shift
    local t0=$(date +%s.%N)
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local dt=$(awk "BEGIN{print $(date +%s.%N) - $t0}")
    tail -n 4 "$OUT/$name.log" | sed "s/^/  [$name] /"
    # a failed check's own line and the run's seed (EPMOE_SEED=n repeats it), which the tail may miss
    [ $rc = 0 ] || grep -E 'FAIL|seed' "$OUT/$name.log" | head -n 6 | sed "s/^/  [$name] /"
    summary+=("$(printf '%-26s %-5s %6.1fs  %s' "$name" "$([ $rc = 0 ] && echo PASS || echo FAIL)" "$dt" "$(grep -E 'checks|mismatches|ERROR SUMMARY' "$OUT/$name.log" | tail -n 1 | cut -c1-70)")")
    # also as each step ends: a call cut by the device's time limit keeps the steps that finished
    printf '%s\n' "${summary[-1]}" >>"$OUT/summary.txt"
    [ $rc = 0 ] || failed=$((failed + 1))
    return $rc
}

# EP: the whole matrix (R = 1 and every GPU, one process) on the device API and on the padded
# all-to-all fallback, the launch helpers in one process, and a launch of one process per GPU
# (at most 2) through tools/epmoe-launch, once as creation chooses and once on the fallback.
ep_tests() {
    if ! [ -x build/tests/gpu/test_ep_gpu ]; then
        summary+=("$(printf '%-26s %-5s' test_ep_gpu FAIL)  not built (make gpu-build with NCCL)")
        failed=$((failed + 1))
        return 1
    fi
    local np=$((ngpu < 2 ? 1 : 2))
    run test_ep_gpu timeout 300 ./build/tests/gpu/test_ep_gpu
    run test_ep_gpu_alltoall timeout 300 ./build/tests/gpu/test_ep_gpu --transport alltoall
    # GIN's put/signal protocol, emulated over NVLink (the NIC path itself needs a NIC)
    run test_ep_gpu_gin_emulated timeout 300 ./build/tests/gpu/test_ep_gpu --transport gin-emulated
    # a few scenarios each (seconds when healthy): shorter limits bound a hang's cost in device time
    run test_ep_gpu_local timeout 180 ./build/tests/gpu/test_ep_gpu --local --expect auto
    run ep_launch_auto timeout 150 tools/epmoe-launch -n $np ./build/tests/gpu/test_ep_gpu --launched --expect auto
    run ep_launch_alltoall env EPMOE_EP_TRANSPORT=alltoall timeout 150 \
        tools/epmoe-launch -n $np ./build/tests/gpu/test_ep_gpu --launched --expect a2a
    # the system libnccl is older than our headers (2.28.3 on the H200 image): AUTO must take the
    # fallback by itself and never call the device API
    local sys_nccl=/usr/lib/x86_64-linux-gnu
    [ -e $sys_nccl/libnccl.so.2 ] && run ep_local_system_nccl env LD_LIBRARY_PATH=$sys_nccl:$LD_LIBRARY_PATH \
        timeout 180 ./build/tests/gpu/test_ep_gpu --local --expect auto
}

# the kernels' own tests (and the layer's, which strings them together) against the CPU references
kernel_tests() {
    run fp8_exhaustive ./build/tests/gpu/fp8_exhaustive
    run test_quant_gpu ./build/tests/gpu/test_quant_gpu
    run test_w4a8_gpu ./build/tests/gpu/test_w4a8_gpu
    run test_experts_gpu ./build/tests/gpu/test_experts_gpu
    [ -x build/tests/gpu/test_layer_gpu ] && run test_layer_gpu timeout 300 ./build/tests/gpu/test_layer_gpu
}
# the Python package's GPU paths through torch (DLPack in and out, workspaces, layers)
python_tests() {
    run pytest_gpu python3 -m pytest -q python/tests/test_torch.py python/tests/test_w4a8_torch.py \
        python/tests/test_experts_torch.py
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu --format=csv,noheader | sed 's/^/gpu: /'
for s in $steps; do
    case $s in
    tests) # = kernels python ep
        kernel_tests
        python_tests
        [ -x build/tests/gpu/test_ep_gpu ] && ep_tests ;;
    kernels)
        kernel_tests ;;
    python)
        python_tests ;;
    ep)
        ep_tests ;;
    memcheck-w4a8) # the wgmma GEMM alone under the sanitizers (after a change to it): W4A8, and fp8-block
                   # through test_experts_gpu (which also runs the bf16 and w4a16 kernels)
        EPMOE_TEST_QUICK=1 run memcheck_w4a8 compute-sanitizer --tool memcheck --error-exitcode 3 ./build/tests/gpu/test_w4a8_gpu
        EPMOE_TEST_QUICK=1 run racecheck_w4a8 compute-sanitizer --tool racecheck --error-exitcode 3 ./build/tests/gpu/test_w4a8_gpu
        EPMOE_TEST_QUICK=1 run synccheck_w4a8 compute-sanitizer --tool synccheck --error-exitcode 3 ./build/tests/gpu/test_w4a8_gpu
        EPMOE_TEST_QUICK=1 run memcheck_experts compute-sanitizer --tool memcheck --error-exitcode 3 ./build/tests/gpu/test_experts_gpu
        EPMOE_TEST_QUICK=1 run racecheck_experts compute-sanitizer --tool racecheck --error-exitcode 3 ./build/tests/gpu/test_experts_gpu
        EPMOE_TEST_QUICK=1 run synccheck_experts compute-sanitizer --tool synccheck --error-exitcode 3 ./build/tests/gpu/test_experts_gpu ;;
    memcheck)
        EPMOE_TEST_QUICK=1 run memcheck_quant compute-sanitizer --tool memcheck --error-exitcode 3 ./build/tests/gpu/test_quant_gpu
        EPMOE_TEST_QUICK=1 run racecheck_quant compute-sanitizer --tool racecheck --error-exitcode 3 ./build/tests/gpu/test_quant_gpu
        EPMOE_TEST_QUICK=1 run memcheck_w4a8 compute-sanitizer --tool memcheck --error-exitcode 3 ./build/tests/gpu/test_w4a8_gpu
        EPMOE_TEST_QUICK=1 run racecheck_w4a8 compute-sanitizer --tool racecheck --error-exitcode 3 ./build/tests/gpu/test_w4a8_gpu
        EPMOE_TEST_QUICK=1 run synccheck_w4a8 compute-sanitizer --tool synccheck --error-exitcode 3 ./build/tests/gpu/test_w4a8_gpu
        EPMOE_TEST_QUICK=1 run memcheck_experts compute-sanitizer --tool memcheck --error-exitcode 3 ./build/tests/gpu/test_experts_gpu
        EPMOE_TEST_QUICK=1 run racecheck_experts compute-sanitizer --tool racecheck --error-exitcode 3 ./build/tests/gpu/test_experts_gpu
        EPMOE_TEST_QUICK=1 run synccheck_experts compute-sanitizer --tool synccheck --error-exitcode 3 ./build/tests/gpu/test_experts_gpu ;;
    bench)
        [ -x build/bench/bench_ep ] && run bench_ep timeout 300 ./build/bench/bench_ep --json "$OUT/bench_ep.json"
        run bench_quant python3 bench/bench_quant.py
        # the Python layers' host time over the same kernels (DeepEP's API, EpGroup), one process a GPU
        run bench_deep_ep env PYTHONPATH=$PWD/python timeout 200 python3 -m torch.distributed.run --standalone \
            --nproc_per_node=$((ngpu < 2 ? 1 : 2)) bench/bench_deep_ep.py
        run bench_w4a8 ./build/bench/bench_w4a8 --json "$OUT/bench_w4a8.json"
        run bench_layer timeout 300 ./build/epmoe bench --json "$OUT/bench_layer.json"
        for sc in bf16 w8a8_fp8_block w4a16; do
            run bench_layer_$sc timeout 200 ./build/epmoe bench --scheme $sc --iters 20 --json "$OUT/bench_layer_$sc.json"
        done
        run check_layer timeout 300 ./build/epmoe check --json "$OUT/check_layer.json"
        # the other schemes' layer error on the GPU (a report: test_layer_gpu holds the bounds); 32
        # tokens a rank, since the host's fp64 model is most of the time
        for sc in bf16 w8a8_fp8_block w4a16; do
            run check_layer_$sc timeout 200 ./build/epmoe check --scheme $sc --tokens 32 --json "$OUT/check_layer_$sc.json"
        done
        [ -f "$OUT/bench_ep.log" ] && cat "$OUT/bench_ep.log"
        cat "$OUT/bench_quant.log"
        grep bench_deep_ep "$OUT/bench_deep_ep.log"
        cat "$OUT/bench_w4a8.log"
        cat "$OUT/bench_layer.log" "$OUT"/bench_layer_*.log "$OUT/check_layer.log" "$OUT"/check_layer_*.log ;;
    esac
done
echo
echo "== GPU suite summary ($(date -u +%F), $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1))"
printf '%s\n' "${summary[@]}"
if [ "$failed" = 0 ]; then
    echo "GPU suite ($steps): PASS (${#summary[@]} steps)"
else
    echo "GPU suite ($steps): FAIL ($failed of ${#summary[@]} steps failed; logs in $OUT)"
fi
[ "$failed" = 0 ]
