"""With the model on a CUDA device (skipped elsewhere): attention, routers and shared experts on the GPU, routed
experts in the CPU kernel. Same training as stock on the GPU (fp32, 1e-4), and no CUDA tensor ever holds a routed
expert weight."""
import os

import pytest
import torch

import kt_patch
import tiny_models
from kt_patch.layer import KtMoeLayer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
checkpoints = tiny_models.checkpoints_fixture()
FAMILIES = ["qwen3_moe", "qwen2_moe", "deepseek_v3", "mixtral"]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def load(checkpoints, model_type, patched, **kwargs):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    if patched:
        kt_patch.enable()
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(os.path.join(checkpoints, model_type), **kwargs)
        return get_peft_model(model, tiny_models.lora_config(model_type)).to("cuda")
    finally:
        kt_patch.disable()


def train(model, steps=5):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        ids = torch.randint(3, 128, (2, 16), generator=data).cuda()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, optimizer


def expert_shapes(model):
    shapes = set()
    for layer in (m for m in model.modules() if isinstance(m, KtMoeLayer)):
        k = layer.kernel
        shapes |= {(k.num_experts, 2 * k.intermediate_size, k.hidden_size),
                   (k.num_experts, k.hidden_size, k.intermediate_size)}
    return shapes


@pytest.mark.parametrize("model_type", FAMILIES)
def test_gpu_training_matches_stock(checkpoints, model_type):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    stock_losses, _ = train(load(checkpoints, model_type, patched=False))
    patched = load(checkpoints, model_type, patched=True)
    assert sum(isinstance(m, KtMoeLayer) for m in patched.modules()) == 2
    losses, optimizer = train(patched)
    for a, b in zip(stock_losses, losses):
        assert abs(a - b) <= 1e-4 * abs(a)
    shapes = expert_shapes(patched)
    tensors = [*patched.parameters(), *patched.buffers()]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    assert not [t for t in tensors if t.is_cuda and tuple(t.shape) in shapes]
    assert any(t.is_cuda for t in tensors)


@pytest.mark.parametrize("device_map", ["cuda", 0, {"": "cuda:0"}])
def test_single_device_map_never_puts_experts_on_gpu(checkpoints, device_map):
    """device_map naming one accelerator: the model lands there, except the routed experts, which never do."""
    from transformers import AutoModelForCausalLM

    path = os.path.join(checkpoints, "qwen3_moe")
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    stock = AutoModelForCausalLM.from_pretrained(path, device_map=device_map)
    stock_bytes = torch.cuda.memory_allocated() - base
    del stock
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    kt_patch.enable()
    try:
        patched = AutoModelForCausalLM.from_pretrained(path, device_map=device_map)
    finally:
        kt_patch.disable()
    expert_bytes = sum(3 * k.num_experts * k.hidden_size * k.intermediate_size * k.dtype.itemsize
                       for k in (m.kernel for m in patched.modules() if isinstance(m, KtMoeLayer)))
    assert expert_bytes > 0 and patched.device.type == "cuda"
    assert torch.cuda.max_memory_allocated() - base <= stock_bytes - expert_bytes
    ids = torch.randint(3, 128, (2, 7), device="cuda")
    assert patched(input_ids=ids, labels=ids).loss.isfinite()
