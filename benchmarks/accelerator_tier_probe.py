"""One MoE layer of the Qwen3-30B-A3B shape (128 experts, top-8, bf16, LoRA r=8 on every expert matrix) on the
accelerator tier beside the CPU kernel (needs a CUDA GPU):

    python benchmarks/accelerator_tier_probe.py [--tokens 2048] [--profile]

Prints milliseconds per call: fetching the layer's experts over the link, the accelerator's forward (plain, and
recorded for a backward) and backward, resident and streamed, and the CPU kernel's forward and backward on the same
tokens; ``--profile`` adds torch.profiler's table of one streamed forward + backward.
"""
import argparse
import time

import torch

from kt_patch.executor import _GROUPED_MM_WORKS, AcceleratorTier, GpuExpertBudget, TierPlan, layer_bytes
from kt_patch.kernel import ExpertKernel, ExpertLora, LoraFactors


def timed(name, fn, repeat=3):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    print(f"{name:44s} {(time.perf_counter() - start) / repeat * 1e3:8.2f} ms", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    E, H, I, T, k, r = 128, 2048, 768, args.tokens, 8, 8
    g = torch.Generator().manual_seed(0)
    kernel = ExpertKernel((torch.randn(E, 2 * I, H, generator=g) * 0.02).bfloat16(),
                          (torch.randn(E, H, I, generator=g) * 0.02).bfloat16(), threads=15)
    factors = [torch.randn(E * r, H) * 0.01, torch.randn(2 * I, E * r) * 0.01,
               torch.randn(E * r, I) * 0.01, torch.randn(H, E * r) * 0.01]
    lora = ExpertLora(LoraFactors(factors[0], factors[1], 2.0), LoraFactors(factors[2], factors[3], 2.0))
    device = torch.device("cuda")
    layer_gib = layer_bytes(kernel) / 2**30
    x = torch.randn(T, H, device=device).bfloat16()
    ids = torch.stack([torch.randperm(E, device=device)[:k] for _ in range(T)])
    w = torch.rand(T, k, device=device)
    dy = torch.randn(T, H, device=device).bfloat16()
    plan = TierPlan(tuple(range(E)), E)
    grads = {"gate_up_A": torch.zeros_like(factors[0]), "gate_up_B": torch.zeros_like(factors[1]),
             "down_A": torch.zeros_like(factors[2]), "down_B": torch.zeros_like(factors[3])}
    for resident in (False, True):
        tier = AcceleratorTier(kernel, device, executor="accelerator", accelerator_fraction=None,
                               budget=GpuExpertBudget((4.5 if resident else 3.5) * layer_gib))
        tier.pin_factors(lora)  # as a model's forward does
        name = tier.tier_name
        if not resident:
            timed(f"{name}: fetch {layer_gib:.2f} GiB", lambda: tier.fetch(plan, backward=False).ready.synchronize())
        timed(f"{name}: forward", lambda: tier.forward(x, ids, w, lora, plan))
        timed(f"{name}: forward for a backward + backward",
              lambda: (tier.forward(x, ids, w, lora, plan, for_backward=True),
                       tier.backward(x, ids, w, lora, plan, dy)[2](grads)))
        print("  grouped GEMM used:", dict(_GROUPED_MM_WORKS))
        if args.profile and not resident:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                tier.forward(x, ids, w, lora, plan, for_backward=True)
                tier.backward(x, ids, w, lora, plan, dy)[2](grads)
                torch.cuda.synchronize()
            for key in ("self_cuda_time_total", "cpu_time_total"):
                print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=50))
        del tier
    x_cpu, ids_cpu, w_cpu, dy_cpu = x.cpu(), ids.cpu(), w.cpu(), dy.cpu()
    timed("cpu kernel: forward", lambda: kernel.forward(x_cpu, ids_cpu, w_cpu, lora))

    def cpu_forward_backward():
        _, ctx = kernel.forward(x_cpu, ids_cpu, w_cpu, lora, save_for_backward=True)
        kernel.backward(ctx, dy_cpu, ctx.new_lora_grads())

    timed("cpu kernel: forward for a backward + backward", cpu_forward_backward)


if __name__ == "__main__":
    main()
