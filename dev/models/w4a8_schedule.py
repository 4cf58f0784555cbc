# dev/models/w4a8_schedule.py — the W4A8 GEMM's work schedule (whole waves, then stream-K ranges) over
# small sizes: every (item, K step) done once, producer and consumer agree on (item, group), every
# item finished once from the right partials. python3 dev/models/w4a8_schedule.py (seconds; "ok N").
# Model of the DP + stream-K mapping (w4a8_gemm.cu: the kernel's setup of Range, step_item / step_off,
# Producer::advance, and the step loop's item ends and fixup)
import itertools, sys
def cta(items, grid, P, G, kG, r, DP):
    waves = items//grid - 1 if DP and items//grid > 1 else 0
    total = (items - waves*grid)*P; s0 = total*r//grid
    rg = dict(total=total, tail0=waves*grid, first=waves*grid + s0//P, off=s0%P,
              dp=waves*P, steps=waves*P + total*(r+1)//grid - s0)
    return rg
def step_item(rg, r, grid, P, j, DP):
    if DP and j < rg['dp']: return (j//P)*grid + r
    return rg['first'] + (rg['off'] + j - (rg['dp'] if DP else 0))//P
def step_off(rg, j, DP): return rg['off'] if j == (rg['dp'] if DP else 0) else 0
def run(items, grid, G, kG, DP):
    P = (G + kG - 1)//kG
    done = {}          # (item, step-in-item) -> cta
    finished = {}      # item -> list of partial sources summed (in order)
    contrib = {}       # cta -> (item, set of steps)
    waits = {}
    rgs = [cta(items, grid, P, G, kG, r, DP) for r in range(grid)]
    for r in range(grid):
        rg = rgs[r]; steps = rg['steps']
        if steps <= 0: continue
        dp = rg['dp'] if DP else 0
        # producer walk
        prod = []
        it = step_item(rg, r, grid, P, 0, DP); g = kG*step_off(rg, 0, DP)
        for nxt in range(1, steps+1):
            prod.append((it, g)); g += kG
            if g >= G:
                it = step_item(rg, r, grid, P, nxt, DP); g = kG*step_off(rg, nxt, DP)
        # consumer walk
        cg = kG*step_off(rg, 0, DP); acc = set()
        is_head = lambda j: rg['off'] != 0 and j >= dp and rg['off'] + j - dp < P
        for j in range(steps):
            item = step_item(rg, r, grid, P, j, DP)
            assert prod[j] == (item, cg), (r, j, prod[j], item, cg)
            assert 0 <= item < items
            k = (item, cg//kG); assert k not in done, (k, r); done[k] = r; acc.add(k)
            cg += kG
            if cg >= G:
                if is_head(j):
                    assert r not in contrib; contrib[r] = (item, acc); acc = set()
                else:
                    assert item not in finished; finished[item] = [acc]; acc = set()
                cg = kG*step_off(rg, j+1, DP)
        if cg != 0:
            if is_head(steps-1):
                assert r not in contrib; contrib[r] = (step_item(rg, r, grid, P, steps-1, DP), acc)
            else:
                item = step_item(rg, r, grid, P, steps-1, DP); end = (item - rg['tail0'] + 1)*P; total = rg['total']
                parts = [acc]; ws = []
                q = r+1
                while q < grid and total*q//grid < end:
                    if total*(q+1)//grid != total*q//grid: ws.append(q)
                    q += 1
                waits[r] = (item, ws); finished[item] = parts
    # resolve waits
    for r, (item, ws) in waits.items():
        for q in ws:
            assert q in contrib, ('waits on non-contributor', r, q)
            assert contrib[q][0] == item, ('wrong item', r, q, contrib[q][0], item)
            finished[item].append(contrib[q][1])
    used = [q for r,(it,ws) in waits.items() for q in ws]
    assert sorted(used) == sorted(contrib), ('contribs unused or used twice', used, contrib.keys())
    assert len(done) == items*P
    for it in range(items):
        assert it in finished, ('item never finished', it)
        s = set().union(*finished[it]); assert s == {(it, k) for k in range(P)}
    return True
n = 0
for DP in (False, True):
  for kG in (1, 2):
    for G in range(1, 9):
      for grid in range(1, 14):
        for items in range(0, 5*grid + 3):
          run(items, grid, G, kG, DP); n += 1
print('ok', n)
