import os, sys, time, json
import torch, triton
sys.path.insert(0, os.getcwd())
import fastkd
import torch.nn.functional as F
from triton.testing import do_bench
dev = "cuda"
print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
out = {}
def rel(a, b): return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
def check(name, fn, args, **kw):
    res = {}
    for be in ("torch", "triton"):
        fastkd.set_backend(be)
        xs = [[x.detach().clone().requires_grad_(i == 0) for x in a] if isinstance(a, list) else a.detach().clone().requires_grad_(i == 0) for i, a in enumerate(args)]
        l = fn(*xs, **kw); (l * 1.3).backward()
        g = [x.grad for x in xs[0]] if isinstance(xs[0], list) else [xs[0].grad]
        res[be] = (l.detach(), g)
    e = max(rel(a, b) for a, b in zip(res["triton"][1], res["torch"][1]))
    print(f"{name}: loss torch={res['torch'][0].item():.6g} triton={res['triton'][0].item():.6g} grad rel={e:.2e}", flush=True)
torch.manual_seed(0)
s = torch.randn(37, 5003, device=dev) * 4; t = torch.randn(37, 5003, device=dev) * 4; m = torch.rand(37, device=dev) > 0.3
check("logit fp32", fastkd.logit_kl, [s, t], temperature=2.0, mask=m)
check("logit bf16", fastkd.logit_kl, [s.bfloat16(), t.bfloat16()], temperature=0.5)
h = [torch.randn(3, 11, 257, device=dev), torch.randn(3, 11, 96, device=dev)]; ht = [x + torch.randn_like(x) for x in h]
check("hidden", fastkd.hidden_mse, [h, ht], mask=torch.rand(3, 11, device=dev) > 0.5)
a = [torch.randn(2, 4, 33, 33, device=dev).softmax(-1) for _ in range(2)]; b = [torch.randn(2, 4, 33, 33, device=dev).softmax(-1) for _ in range(2)]
check("att probs", fastkd.attention_kl, [a, b], mask=torch.rand(2, 33, device=dev) > 0.3)
causal = torch.full((33, 33), float("-inf"), device=dev).triu(1)
check("att scores", fastkd.attention_kl, [[x.log() + causal for x in a], [x.log() + causal for x in b]], kind="scores")
fastkd.set_backend("triton")
# sync debug + graph capture
torch.cuda.set_sync_debug_mode("error")
x = s.clone().requires_grad_(); l = fastkd.logit_kl(x, t, mask=m); l.backward()
xs_ = [y.clone().requires_grad_() for y in h]; fastkd.hidden_mse(xs_, ht).backward()
torch.cuda.set_sync_debug_mode(0)
print("sync debug ok", flush=True)
static_s = s.clone().requires_grad_(); static_t = t.clone()
st = torch.cuda.Stream(); st.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(st):
    for _ in range(2):
        static_s.grad = None; fastkd.logit_kl(static_s, static_t, mask=m).backward()
torch.cuda.current_stream().wait_stream(st)
g = torch.cuda.CUDAGraph(); static_s.grad = None
with torch.cuda.graph(g):
    sl = fastkd.logit_kl(static_s, static_t, mask=m); sl.backward()
for _ in range(2):
    with torch.no_grad(): static_s.copy_(torch.randn_like(s)); static_t.copy_(torch.randn_like(t))
    g.replay(); fastkd.set_backend("torch"); rl = fastkd.logit_kl(static_s.detach(), static_t, mask=m); fastkd.set_backend("triton")
    print("graph replay loss", sl.item(), rl.item(), flush=True)
# bandwidth
big = torch.empty(2 * 1024**3, dtype=torch.uint8, device=dev); big2 = torch.empty_like(big)
ms = do_bench(lambda: big2.copy_(big), return_mode="median"); bw = 2 * big.numel() / ms / 1e6
print(f"copy bandwidth {bw:.0f} GB/s (read+write)", flush=True); del big, big2
import fastkd.backends.triton as ftr
def bench(name, fn_fast, fn_eager, nbytes_min):
    for tile in (1024, 2048, 8192, 16384):
        ftr.TILE_ELEMENTS = tile
        ms = do_bench(fn_fast, warmup=50, rep=200, return_mode="median")
        print(f"  {name} tile {tile}: {ms:.3f} ms", flush=True)
    ftr.TILE_ELEMENTS = 4096
    r = {}
    for impl, fn in (("fastkd", fn_fast), ("eager", fn_eager)):
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        r[impl] = (ms, peak)
    floor = nbytes_min / bw / 1e6
    print(f"{name}: tile 4096 fastkd {r['fastkd'][0]:.3f} ms ({r['fastkd'][1]:.0f} MB) eager {r['eager'][0]:.3f} ms ({r['eager'][1]:.0f} MB) speedup {r['eager'][0]/r['fastkd'][0]:.2f}x; 3-pass floor {floor:.3f} ms -> {floor/r['fastkd'][0]*100:.0f}%, 5-pass {floor*5/3/r['fastkd'][0]*100:.0f}%", flush=True)
    out[name] = r
N, V, T = 8192, 128256, 2.0
s = torch.randn(N, V, device=dev, dtype=torch.bfloat16).requires_grad_(); t = torch.randn(N, V, device=dev, dtype=torch.bfloat16)
def eager_logit():
    l = F.kl_div(F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1), log_target=True, reduction="none").sum(-1).mean() * T * T
    l.backward(); s.grad = None
def fast_logit():
    fastkd.logit_kl(s, t, temperature=T).backward(); s.grad = None
bench("logit_kl", fast_logit, eager_logit, 3 * N * V * 2)
del s, t
hs = [torch.randn(8192, 2048, device=dev, dtype=torch.bfloat16).requires_grad_() for _ in range(24)]; ht = [torch.randn(8192, 2048, device=dev, dtype=torch.bfloat16) for _ in range(24)]
def eager_hidden():
    l = sum(F.mse_loss(a, b) for a, b in zip(hs, ht)) / 24; l.backward()
    for a in hs: a.grad = None
def fast_hidden():
    fastkd.hidden_mse(hs, ht).backward()
    for a in hs: a.grad = None
bench("hidden_mse", fast_hidden, eager_hidden, 3 * 24 * 8192 * 2048 * 2)
del hs, ht
sa = [torch.randn(4, 16, 1024, 1024, device=dev).softmax(-1).bfloat16().requires_grad_() for _ in range(6)]; ta = [torch.randn(4, 16, 1024, 1024, device=dev).softmax(-1).bfloat16() for _ in range(6)]
def eager_att():
    l = sum((b.float() * (b.float().clamp_min(1e-38).log() - a.float().clamp_min(1e-38).log())).sum(-1).mean() for a, b in zip(sa, ta)) / 6; l.backward()
    for a in sa: a.grad = None
def fast_att():
    fastkd.attention_kl(sa, ta).backward()
    for a in sa: a.grad = None
bench("attention_kl", fast_att, eager_att, 3 * 6 * 4 * 16 * 1024 * 1024 * 2)
