# dev/models/w4a8_barriers.py — exhaustive interleavings of one W4A8 GEMM CTA's synchronization (src/cuda/w4a8_gemm.cu:
# the full mbarriers, the per-stage named barriers, the T = 128 ping-pong, the stream-K __syncthreads).
# Checks: no deadlock, no barrier left half-arrived, no stage overwritten before every warp read it.
# Run after changing the kernel's step loop: python3 dev/models/w4a8_barriers.py (minutes; prints "ok").
# Written in review, 2026-11-30; line references in the comments are to that day's file.
# Exhaustive interleaving model of one CTA's synchronization (w4a8_gemm.cu, w4a8_gemm_kernel: release,
# refill, the ping-pong turns and the stream-K fixup barriers):
# warps 0 (producer) and 1 in warpgroup 0, warps 2,3 in warpgroup 1 (symmetric warps collapsed).
# Named barriers: count in warps (4 = all). mbarrier full[s]: phase count, parity waits.
import sys, itertools
NW = 4
def programs(steps, S, pp, sync_steps, end_syncs):
    progs = []
    for w in range(NW):
        wg = 0 if w < 2 else 1; prod = w == 0; P = []
        if prod:
            for i in range(min(S-1, steps)): P.append(('issue', i))
        for j in range(steps):
            P.append(('wait', j)); P.append(('readbeg', j))
            if pp and (wg == 1 or j > 0): P.append(('sync', 'pp%d' % (1+wg), j))
            if pp and (wg == 0 or j+1 < steps): P.append(('arrive', 'pp%d' % (2-wg), j if wg == 0 else j+1))
            if prod:
                i = j + S - 1
                if i < steps:
                    if i >= S: P.append(('sync', 'st%d' % (i % S), i - S))
                    P.append(('issue', i))
            P.append(('readend', j))
            if not prod and j + S < steps: P.append(('arrive', 'st%d' % (j % S), j))
            if j in sync_steps: P.append(('sync', 'cta', ('c', j)))
        for k in range(end_syncs): P.append(('sync', 'cta', ('e', k)))
        P.append(('sync', 'cta', 'final'))
        progs.append(P)
    return progs
def explore(steps, S, pp, sync_steps, end_syncs):
    progs = programs(steps, S, pp, sync_steps, end_syncs)
    # state: pcs, blocked(set of warps waiting at a sync), bars: dict id->(count, tag), full phases, readdone per warp
    init = (tuple([0]*NW), frozenset(), (), tuple([0]*S))
    seen = set([init]); stack = [init]; errs = set()
    while stack:
        pcs, blocked, bars, full = stack.pop()
        bars_d = dict((k, v) for k, v in bars)
        moved = False
        for w in range(NW):
            if w in blocked or pcs[w] >= len(progs[w]): continue
            op = progs[w][pcs[w]]
            npcs = list(pcs); nbl = set(blocked); nb = dict(bars_d); nf = list(full)
            kind = op[0]
            if kind == 'wait':
                j = op[1]; s = j % S; c = full[s]
                if c % 2 == (j // S) % 2:
                    if c != j // S: errs.add(('parity: phase ran ahead', w, j, c))
                    continue
                if c != j // S + 1: errs.add(('parity passed wrongly', w, j, c))
                npcs[w] += 1
            elif kind == 'issue':
                i = op[1]; s = i % S
                # data hazard: every warp must be done reading step i - S
                if i >= S:
                    for v in range(NW):
                        # warp v done reading i-S if its pc passed ('readend', i-S)
                        idx = progs[v].index(('readend', i - S))
                        if pcs[v] <= idx: errs.add(('overwrite before read done', i, v))
                if nf[s] != i // S: errs.add(('issue phase mismatch', i, nf[s]))
                nf[s] += 1; npcs[w] += 1
            elif kind in ('readbeg', 'readend'):
                npcs[w] += 1
            else:
                _, bid, tag = op
                cnt, t0, waiters = nb.get(bid, (0, None, frozenset()))
                if cnt and t0 != tag: errs.add(('barrier instance mixes uses', bid, t0, tag, w))
                cnt += 1
                if kind == 'sync': waiters = waiters | {w}; nbl.add(w)
                npcs[w] += 1
                if cnt == NW:
                    for v in waiters: nbl.discard(v)
                    nb.pop(bid, None)
                else:
                    nb[bid] = (cnt, tag, frozenset(waiters))
            st = (tuple(npcs), frozenset(nbl), tuple(sorted(nb.items(), key=lambda x: x[0])), tuple(nf))
            moved = True
            if st not in seen: seen.add(st); stack.append(st)
        if not moved:
            if any(pcs[w] < len(progs[w]) for w in range(NW)) or blocked:
                errs.add(('deadlock', pcs, tuple(sorted(blocked)), bars))
            elif bars: errs.add(('dangling barrier state', bars))
    return errs, len(seen)
tot = 0
for S in (3, 4, 5):
    for pp in (False, True):
        for steps in range(1, 9):
            for sync_steps in [(), (0,), (steps-1,), (1, 3), tuple(range(steps))]:
                for end_syncs in (0, 2):
                    errs, n = explore(steps, S, pp, set(sync_steps), end_syncs); tot += n
                    if errs: print(S, pp, steps, sync_steps, end_syncs, sorted(errs, key=str)[:3]); sys.exit(1)
print('ok, states', tot)
