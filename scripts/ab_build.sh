#!/usr/bin/env bash
# Builds another revision's GPU binaries next to this tree's, for A/B runs in one device call (the
# device machine is leased by the minute, and two builds measured in the same call are the only
# fair comparison). Usage, here (nvcc, no GPU needed):
#   scripts/ab_build.sh REV NAME [TARGET...]      e.g. scripts/ab_build.sh main base bench_ep bench_w4a8
# TARGETs are names under build/bench/ or build/tests/gpu/ (default: bench_ep bench_w4a8), epmoe (the CLI), or
# "trace" for bench_ep and bench_w4a8 with the kernels' time stamps (make dev-trace). The binaries land in
# build/ab/NAME/ (statically linked to that revision's libepmoe.a); carry build/ab/NAME to the
# device and run them beside this tree's build/.
set -eu
[ $# -ge 2 ] || { sed -n 2,9p "$0"; exit 2; }
rev=$1 name=$2
shift 2
targets=${*:-bench_ep bench_w4a8}
root=$(cd "$(dirname "$0")/.." && pwd)
wt=/tmp/epmoe-ab-$name
git -C "$root" worktree remove --force "$wt" 2>/dev/null || true
git -C "$root" worktree add --detach "$wt" "$rev" >/dev/null
mkdir -p "$root/build/ab/$name"
for t in $targets; do
    case $t in
    trace) make -C "$wt" -j"$(nproc)" dev-trace >/dev/null && cp "$wt/build/trace/bench/bench_ep" "$root/build/ab/$name/bench_ep_trace" &&
           cp "$wt/build/trace/bench/bench_w4a8" "$root/build/ab/$name/bench_w4a8_trace" ;;
    epmoe) make -C "$wt" -j"$(nproc)" build/epmoe >/dev/null && cp "$wt/build/epmoe" "$root/build/ab/$name/" ;;
    test_*|fp8_exhaustive) make -C "$wt" -j"$(nproc)" "build/tests/gpu/$t" >/dev/null && cp "$wt/build/tests/gpu/$t" "$root/build/ab/$name/" ;;
    *) make -C "$wt" -j"$(nproc)" "build/bench/$t" >/dev/null && cp "$wt/build/bench/$t" "$root/build/ab/$name/" ;;
    esac
done
git -C "$root" worktree remove --force "$wt"
echo "built $(git -C "$root" rev-parse --short "$rev") ($rev) into build/ab/$name: $(ls "$root/build/ab/$name" | tr '\n' ' ')"
