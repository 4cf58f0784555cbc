#!/usr/bin/env bash
# test_cli.sh — the epmoe CLI as a user meets it: help, clear errors on bad flags (exit 2), and the
# check and bench commands end to end on the CPU backend with the tiny model (JSON parsed back).
set -u
EPMOE=${1:-build/epmoe}
fail=0
expect() { # want_rc, description, command...
    local want=$1 what=$2; shift 2
    out=$("$@" 2>&1); rc=$?
    if [ "$rc" != "$want" ]; then echo "  FAIL $what: exit $rc, want $want"; echo "$out" | tail -3; fail=1; fi
}
expect 0 "--help" "$EPMOE" --help
for c in demo check bench; do expect 0 "$c --help" "$EPMOE" $c --help; expect 0 "$c -h" "$EPMOE" $c -h; done
msg=$("$EPMOE" check --help 2>&1)
case "$msg" in *"usage: epmoe"*) ;; *) echo "  FAIL: check --help prints no usage: $msg"; fail=1 ;; esac
expect 2 "no command" "$EPMOE"
expect 2 "unknown command" "$EPMOE" frobnicate
expect 2 "unknown model" "$EPMOE" bench --model gpt5
expect 2 "bad --tokens" "$EPMOE" bench --tokens -3
expect 2 "bad --wire" "$EPMOE" check --wire fp16
expect 2 "unknown scheme" "$EPMOE" bench --scheme fp4
expect 2 "bf16 scheme on the FP8 wire" "$EPMOE" bench --scheme bf16 --wire fp8
expect 2 "bad --group" "$EPMOE" bench --scheme w4a16 --group 64
expect 2 "--group with trailing junk" "$EPMOE" bench --scheme w4a16 --group 32x
expect 2 "--group without w4a16" "$EPMOE" bench --group 32
expect 2 "check: bf16 scheme on the FP8 wire" "$EPMOE" check --model tiny --cpu --scheme bf16 --wire fp8
expect 2 "check: w4a16 scheme on both wires" "$EPMOE" check --model tiny --cpu --scheme w4a16 --wire both
expect 2 "check: --group without w4a16" "$EPMOE" check --model tiny --cpu --scheme w8a8_fp8_block --group 128
expect 2 "experts not a multiple of ranks" "$EPMOE" check --model tiny --cpu --experts 3
msg=$("$EPMOE" bench --model gpt5 2>&1)
case "$msg" in *"unknown model 'gpt5'"*) ;; *) echo "  FAIL: the error does not name the bad value: $msg"; fail=1 ;; esac
msg=$("$EPMOE" check --scheme bf16 --wire fp8 2>&1)
case "$msg" in *"BF16 wire only"*) ;; *) echo "  FAIL: the wire error does not say which wire the scheme takes: $msg"; fail=1 ;; esac
# `make demo` is the README's first command: without a GPU it must take the CPU path all the way
# (it once benched the full DeepSeek-R1 layer on the scalar references: hours) and finish in seconds
if ! nvidia-smi -L >/dev/null 2>&1; then
    out=$(timeout 300 "$EPMOE" demo 2>&1); rc=$?
    if [ "$rc" != 0 ]; then echo "  FAIL demo without a GPU: exit $rc"; echo "$out" | tail -3; fail=1; fi
    case "$out" in *"tiny MoE layer"*"on the CPU backend"*) ;; *) echo "  FAIL demo without a GPU: the layer bench did not take the tiny model on the CPU backend"; fail=1 ;; esac
fi
tmp=$(mktemp -d)
# without --model the CPU backend takes the tiny model (the full one ran the scalar references for
# minutes), and an explicit --model still wins there
out=$(timeout 120 "$EPMOE" bench --cpu --iters 1 --json "$tmp/bench_default.json" 2>&1); rc=$?
if [ "$rc" != 0 ]; then echo "  FAIL bench --cpu without --model: exit $rc"; echo "$out" | tail -3; fail=1; fi
case "$out" in *"tiny MoE layer"*"16 tokens/rank"*"on the CPU backend"*) ;; *) echo "  FAIL bench --cpu without --model: not the tiny model at 16 tokens: $out" | head -3; fail=1 ;; esac
out=$(timeout 120 "$EPMOE" bench --cpu --model kimi-k2 --experts 2 --tokens 1 --iters 1 --scheme bf16 2>&1); rc=$?
case "$rc:$out" in 0:*"kimi-k2 MoE layer"*) ;; *) echo "  FAIL bench --cpu --model kimi-k2: exit $rc, the model not honoured"; echo "$out" | tail -3; fail=1 ;; esac
expect 0 "check --model tiny --cpu" "$EPMOE" check --model tiny --cpu --json "$tmp/check.json"
for s in bf16 w8a8_fp8_block "w4a16 --group 128" "w4a16 --group 32"; do
    expect 0 "check --scheme $s" "$EPMOE" check --model tiny --cpu --scheme $s --json "$tmp/check_$(echo $s | tr -d ' -').json"
done
expect 0 "bench --model tiny --cpu" "$EPMOE" bench --model tiny --cpu --tokens 8 --iters 2 --json "$tmp/bench.json"
for s in bf16 w8a8_fp8_block "w4a16 --group 128"; do
    expect 0 "bench --scheme $s" "$EPMOE" bench --model tiny --cpu --tokens 4 --iters 1 --scheme $s --json "$tmp/bench_${s%% *}.json"
done
python3 - "$tmp" <<'PY' || fail=1
import json, sys, math
d = sys.argv[1]
c = json.load(open(f"{d}/check.json"))
r = {(x["tokens"], x["wire"], x["act_scales"]): x["nmse"] for x in c["results"]}
assert len(r) == 8, r
for k, v in r.items():
    assert math.isfinite(v) and 0 < v < 0.05, (k, v)  # fp8 noise: ~1e-3, never garbage
# 1x128 group scales never lose to the per-tensor path on the same tokens
for t in ("gaussian", "outliers"):
    for w in ("fp8", "bf16"):
        assert r[(t, w, "group")] <= r[(t, w, "per_tensor")] * 1.05, (t, w, r)
assert c["scheme"] == "w4afp8", c["scheme"]
# the other schemes: fp8-block on both wires (1x128 group scales only), bf16 and w4a16 on the BF16
# wire (bf16 activations, no scales); the fp64 model uses their dequantized weights exactly, so
# what is left is activation rounding: fp8 ~2e-3, bf16 ~2e-5 (a wrong weight scale shows far above)
for f, scheme, wires, acts, bound in (("bf16", "bf16", ("bf16",), "none", 1e-3),
                                      ("w8a8_fp8_block", "w8a8_fp8_block", ("fp8", "bf16"), "group", 1e-2),
                                      ("w4a16group128", "w4a16 g128", ("bf16",), "none", 1e-3),
                                      ("w4a16group32", "w4a16 g32", ("bf16",), "none", 1e-3)):
    c = json.load(open(f"{d}/check_{f}.json"))
    assert c["scheme"] == scheme and c["model"] == "tiny", (f, c["scheme"], c["model"])
    r = {(x["tokens"], x["wire"]): x for x in c["results"]}
    assert len(r) == len(c["results"]) and set(r) == {(t, w) for t in ("gaussian", "outliers") for w in wires}, (f, set(r))
    for k, x in r.items():
        assert x["act_scales"] == acts, (f, k, x)
        assert math.isfinite(x["nmse"]) and 0 < x["nmse"] < 0.05 and x["nmse"] < bound, (f, k, x["nmse"])
b = json.load(open(f"{d}/bench.json"))
st = {(x["wire"], x["stage"]) for x in b["results"]}
assert st == {(w, s) for w in ("fp8", "bf16") for s in ("layer", "dispatch", "expert MLP", "combine")}, st
assert all(x["us"] > 0 for x in b["results"])
# GB/s and TFLOP/s are the GPU kernels': on the CPU backend (the scalar references) they are null,
# as for the stages that read no weights ("-" in the table)
assert all(x["gbs"] is None and x["tflops"] is None for x in b["results"]), b["results"]
b = json.load(open(f"{d}/bench_default.json"))
assert (b["model"], b["tokens"], b["gpu"]) == ("tiny", 16, 0), b
for s, wires in (("bf16", ("bf16",)), ("w8a8_fp8_block", ("fp8", "bf16")), ("w4a16", ("bf16",))):
    b = json.load(open(f"{d}/bench_{s}.json"))
    assert b["scheme"].startswith(s), b["scheme"]
    st = {(x["wire"], x["stage"]) for x in b["results"]}
    assert st == {(w, t) for w in wires for t in ("layer", "dispatch", "expert MLP", "combine")}, (s, st)
    assert all(x["us"] > 0 for x in b["results"]), s
PY
rm -rf "$tmp"
[ $fail = 0 ] && echo "test_cli: all passed" || { echo "test_cli: FAILED"; exit 1; }
