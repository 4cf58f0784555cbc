set -u
tar -xzf build/carry.tgz
export EPMOE_SEED=777
R=$OUT; mkdir -p /tmp/a
build/tests/gpu/test_experts_gpu > /tmp/te_main.log 2>&1; echo "main experts rc $?"; grep -E "checks|FAIL|limit" /tmp/te_main.log | head -5
build/ab/prom/test_experts_gpu > /tmp/te_prom.log 2>&1; echo "prom experts rc $?"; grep -E "checks|FAIL" /tmp/te_prom.log | head -5
grep -E "fp8-block" /tmp/te_prom.log | sort -k9 -n | tail -3
OUT=/tmp/a ROWS=1,32,128,256,1024 scripts/ab_run.sh -r 2 w4a8 main prom > /dev/null 2>&1
for f in /tmp/a/ab/w4a8*.log; do echo "== $(basename $f)"; grep -E "(fp8-block|FP8 batched) W13\+W2 " $f | tr -s ' ' | cut -d' ' -f2-13; done > $R/ab.txt
for s in w8a8_fp8_block w4a16; do for b in main old; do
  bin=build/epmoe; [ $b = old ] && bin=build/ab/old/epmoe
  timeout 200 $bin bench --scheme $s --iters 20 > $R/layer-$s-$b.log 2>&1; echo "layer $s $b rc $?"
done; done
