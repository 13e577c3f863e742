"""The executor tiers on a real GPU (skipped without CUDA): resident and streamed experts against the CPU kernel
alone, in bf16; streaming pins the kernel's own buffers (host memory does not grow by the streamed bytes) and keeps
the GPU within its budget."""
import random

import psutil
import pytest
import torch

from kt_patch.executor import AcceleratorTier, GpuExpertBudget
from kt_patch.kernel import ExpertKernel
from moe_reference import random_batch, random_layer, rel_l2
from test_executor import run_layer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
RUN_SEED = random.randrange(1 << 20)


@pytest.mark.parametrize("resident", [False, True], ids=["streamed", "resident"])
@pytest.mark.parametrize("fraction", [0.3, 1.0])
def test_split_on_cuda_equals_the_cpu_kernel_alone(resident, fraction):
    E, H, I, T, k = 64, 512, 256, 700, 6
    weights, lora_gu, lora_dn = random_layer(E, H, I, 8, 8, torch.bfloat16, RUN_SEED)
    x, ids, w, dy = random_batch(T, H, E - 4, k, torch.bfloat16, RUN_SEED + 1)
    kernel = ExpertKernel(*weights, threads=4)
    layer_bytes = sum(t.numel() * t.element_size() for t in kernel.packed_weights().values())
    reference = run_layer(kernel, None, x, ids, w, dy, lora_gu, lora_dn)
    tier = AcceleratorTier(kernel, torch.device("cuda"), executor="hybrid",
                           budget=GpuExpertBudget((4 if resident else 2.5) * layer_bytes / 2**30),
                           accelerator_fraction=fraction)
    assert tier.tier_name == ("resident" if resident else "streamed")
    run_layer(kernel, tier, x.cuda(), ids.cuda(), w.cuda(), dy.cuda(), lora_gu, lora_dn)  # CUDA, cuBLAS loaded
    rss = psutil.Process().memory_info().rss
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = run_layer(kernel, tier, x.cuda(), ids.cuda(), w.cuda(), dy.cuda(), lora_gu, lora_dn)
    errors = {name: rel_l2(got[name].cpu(), reference[name]) for name in reference}
    assert max(errors.values()) <= 1e-2, f"run seed {RUN_SEED}: {errors}"
    if not resident:  # pinned in place: no host copy of the streamed experts
        assert psutil.Process().memory_info().rss - rss < layer_bytes / 2
        # one layer's packed rows and their unpacked copy (the stream buffers the budget reserves), plus activations
        assert torch.cuda.max_memory_allocated() - base < 2.5 * layer_bytes
