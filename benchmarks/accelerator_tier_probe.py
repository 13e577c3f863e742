"""One MoE layer of the Qwen3-30B-A3B shape on the accelerator tier: link copy, weight fetch, LoRA copy, forward and
backward times beside the CPU kernel forward (needs a CUDA GPU): python benchmarks/accelerator_tier_probe.py"""
import time
import torch
from kt_patch.kernel import ExpertKernel, ExpertLora, LoraFactors
from kt_patch.executor import AcceleratorTier, GpuExpertBudget, TierPlan
E, H, I, T, k = 128, 2048, 768, 2048, 8
g = torch.Generator().manual_seed(0)
gu = (torch.randn(E, 2 * I, H, generator=g) * 0.02).bfloat16(); dn = (torch.randn(E, H, I, generator=g) * 0.02).bfloat16()
kernel = ExpertKernel(gu, dn, threads=15)
del gu, dn
A1 = torch.randn(E * 16, H) * 0.01; B1 = torch.randn(2 * I, E * 16) * 0.01; A2 = torch.randn(E * 8, I) * 0.01; B2 = torch.randn(H, E * 8) * 0.01
lora = ExpertLora(LoraFactors(A1, B1, 1.0), LoraFactors(A2, B2, 2.0))
dev = torch.device("cuda")
tier = AcceleratorTier(kernel, dev, executor="accelerator", budget=GpuExpertBudget(3.0), accelerator_fraction=None)
print("tier", tier.tier_name, "pinned?", tier.packed["gate"].is_pinned())
x = torch.randn(T, H, device=dev).bfloat16(); ids = torch.randint(0, E, (T, k), device=dev); w = torch.rand(T, k, device=dev)
dy = torch.randn(T, H, device=dev).bfloat16()
plan = TierPlan(torch.ones(E, dtype=torch.bool, device=dev))
experts = torch.arange(E, device=dev)
def timeit(name, f, n=3):
    f(); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): f()
    torch.cuda.synchronize(); print(f"{name}: {(time.perf_counter() - t) / n * 1e3:.1f} ms")
src = tier.packed["gate"]
timeit("copy gate matrix (402 MB)", lambda: src.to(dev, non_blocking=True))
timeit("weights fetch (3 matrices + unpack)", lambda: tier._weights(experts))
timeit("lora slices", lambda: tier._lora_slices(lora, experts))
timeit("forward no lora", lambda: tier.forward(x, ids, w, ExpertLora(), plan))
timeit("forward lora", lambda: tier.forward(x, ids, w, lora, plan))
timeit("backward lora", lambda: tier.backward(x, ids, w, lora, plan, dy)[2]({"gate_up_A": torch.zeros_like(A1), "gate_up_B": torch.zeros_like(B1), "down_A": torch.zeros_like(A2), "down_B": torch.zeros_like(B2)}))
xc, idc, wc = x.cpu(), ids.cpu(), w.cpu()
timeit("cpu kernel fwd", lambda: kernel.forward(xc, idc, wc, lora))
