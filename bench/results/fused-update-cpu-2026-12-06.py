# time the cpu backend's fused noise + AdamW over BERT-like's parameter sizes, one thread, vs foreach AdamW
import sys, time, torch
torch.set_num_threads(1)
from anadp.backends import cpu as C
from anadp import update_table as U
sizes = [7813632, 131072] + [65536*4, 65536*4*2]*4 + [256]*40
n = len(sizes)
ps = [torch.randn(s) for s in sizes]; gs = [torch.randn(s) for s in sizes]
ms = [torch.zeros(s) for s in sizes]; vs = [torch.zeros(s) for s in sizes]
keys = list(range(1, n + 1))
rows = torch.rand(n, 16) * 0.01
rows[:, 7] = 1.0  # FLAG adamw
rows[:, 14] = 0.0  # NOISE_VAR
print("elements", sum(sizes))
for stat in ("abs_p_grad",):
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        out = C.multi_tensor_update(ps, gs, ms, vs, keys, rows, kind=1, has_noise=True, stat=stat, store_grad=True)
        ts.append(time.perf_counter() - t)
    print("fused", stat, "min %.1f ms med %.1f" % (min(ts) * 1e3, sorted(ts)[3] * 1e3))
opt = torch.optim.AdamW(ps, foreach=True)
for p, g in zip(ps, gs): p.grad = g
ts = []
for _ in range(7):
    t = time.perf_counter(); opt.step(); ts.append(time.perf_counter() - t)
print("foreach adamw min %.1f ms med %.1f" % (min(ts) * 1e3, sorted(ts)[3] * 1e3))
x = torch.zeros(sum(sizes))
ts = []
for _ in range(5):
    t = time.perf_counter(); C.add_gaussian_(x, 3, 1.0); ts.append(time.perf_counter() - t)
print("noise alone min %.1f ms" % (min(ts) * 1e3))
ts = []
for _ in range(7):
    t = time.perf_counter()
    C.multi_tensor_update(ps, gs, ms, vs, keys, rows, kind=1, has_noise=False, stat="abs_p_grad", store_grad=True)
    ts.append(time.perf_counter() - t)
print("fused no noise min %.1f ms" % (min(ts) * 1e3))
a = torch.randn(sum(sizes)); b = torch.empty_like(a)
ts = []
for _ in range(7):
    t = time.perf_counter(); b.copy_(a); ts.append(time.perf_counter() - t)
print("copy 44MB->44MB min %.1f ms  (%.1f GB/s r+w)" % (min(ts) * 1e3, 2*a.numel()*4/min(ts)/1e9))
