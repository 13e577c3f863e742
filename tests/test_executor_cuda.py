"""The executor tiers on a real GPU (skipped without CUDA): resident and streamed experts against the CPU kernel
alone, in bf16; streaming pins the kernel's own buffers (host memory does not grow by the streamed bytes) and keeps
the GPU within its budget."""
import random

import psutil
import pytest
import torch

from kt_patch import executor
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
    layer_bytes = executor.layer_bytes(kernel)
    reference = run_layer(kernel, None, x, ids, w, dy, lora_gu, lora_dn)
    tier = AcceleratorTier(kernel, torch.device("cuda"), executor="hybrid",
                           budget=GpuExpertBudget((4.5 if resident else 3.5) * layer_bytes / 2**30),
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


@pytest.mark.parametrize("resident", [False, True], ids=["streamed", "resident"])
def test_every_expert_on_the_gpu_queues_a_step_without_waiting_for_it(resident):
    """executor='accelerator': a layer's forward and backward after the first step never wait for the GPU (torch's
    sync debug mode raises on an op that reads device memory back, such as bincount, item or a pageable copy); the
    CPU kernel is not called."""
    E, H, I, T, k = 32, 256, 128, 300, 4
    weights, lora_gu, lora_dn = random_layer(E, H, I, 8, 8, torch.bfloat16, RUN_SEED + 2)
    kernel = ExpertKernel(*weights, threads=2)
    layer_bytes = executor.layer_bytes(kernel)
    tier = AcceleratorTier(kernel, torch.device("cuda"), executor="accelerator",
                           budget=GpuExpertBudget((4.5 if resident else 3.5) * layer_bytes / 2**30),
                           accelerator_fraction=None)
    runs = []
    for step in range(3):
        x, ids, w, dy = (t.cuda() for t in random_batch(T, H, E, k, torch.bfloat16, RUN_SEED + 3 + step))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if step == 2 else "default")
        try:
            run_layer(kernel, tier, x, ids, w, dy, lora_gu, lora_dn, kernel_runs=runs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert not runs


def test_host_copies_of_device_factors_are_made_per_step_and_shared_by_eval_forwards(monkeypatch):
    """A split with CPU experts and the expert-LoRA factors on the GPU: forwards of a module in eval mode without
    autograd (evaluation, generation) share one host copy of the factors while they are the same; a factor changed in
    place, a new scaling or a forward in train mode (where an optimizer may have written the factors without bumping
    their versions, as fused AdamW and ``.data`` writes do) makes a new copy, whose values the CPU kernel then uses
    (y as the CPU kernel alone with the factors as they are, bf16: 1e-2)."""
    from kt_patch.autograd import expert_forward
    from kt_patch.kernel import ExpertLora, LoraFactors

    E, H, I, T, k = 32, 256, 128, 200, 4
    weights, lora_gu, lora_dn = random_layer(E, H, I, 8, 8, torch.bfloat16, RUN_SEED + 20)
    kernel = ExpertKernel(*weights, threads=2)
    tier = AcceleratorTier(kernel, torch.device("cuda"), executor="hybrid",
                           budget=GpuExpertBudget(4.5 * executor.layer_bytes(kernel) / 2**30), accelerator_fraction=0.5)
    factors = [torch.nn.Parameter(t.clone().cuda()) for t in (*lora_gu[:2], *lora_dn[:2])]
    copies = []  # one entry per call of ExpertLora.on_host that made copies (not the kernel's own check)
    on_host = ExpertLora.on_host

    def counted(self, **kwargs):
        result = on_host(self, **kwargs)
        if result is not self:
            copies.append(1)
        return result

    monkeypatch.setattr(ExpertLora, "on_host", counted)
    scaling = lora_gu[2]
    # (training, what changes before the forward, host copies made so far after it)
    calls = [(False, None, 1), (False, None, 1), (False, "in place", 2), (True, None, 3), (True, ".data", 4),
             (False, None, 5), (False, "scaling", 6), (False, None, 6)]
    for step, (training, change, expected) in enumerate(calls):
        with torch.no_grad():
            if change == "in place":
                factors[1].mul_(1.5)  # a new version, as an adapter loaded in place
            elif change == ".data":
                factors[1].data.mul_(0.5)  # no new version, as fused AdamW
            elif change == "scaling":
                scaling *= 2
        lora = ExpertLora(LoraFactors(factors[0], factors[1], scaling), LoraFactors(factors[2], factors[3], lora_dn[2]))
        x, ids, w, _ = random_batch(T, H, E, k, torch.bfloat16, RUN_SEED + 21 + step)
        with torch.set_grad_enabled(training):
            y = expert_forward(kernel, x.cuda(), ids.cuda(), w.cuda(), lora, accelerator=tier,
                               training=training).detach().cpu()
        with torch.no_grad():
            reference = expert_forward(kernel, x, ids, w, lora.on_host(), accelerator=None)
        copies.pop()  # the reference's own
        assert rel_l2(y, reference) <= 1e-2, f"run seed {RUN_SEED}: call {step}"
        assert len(copies) == expected, step


def test_an_adapter_added_on_the_gpu_keeps_its_expert_factors_there(tmp_path):
    """executor='accelerator': an adapter injected into a model already on the GPU, or loaded into it (also with
    low_cpu_mem_usage, which makes the factors on the meta device first), has its expert-LoRA factors on the GPU,
    with the values saved."""
    import kt_patch
    import tiny_models
    from peft import PeftModel, get_peft_model

    kt_patch.enable(threads=2, executor="accelerator")
    try:
        config = tiny_models.lora_config("qwen3_moe")
        config.init_lora_weights = False
        trained = get_peft_model(tiny_models.build("qwen3_moe", seed=2).cuda(), config)
        names = [name for name, _ in trained.named_parameters() if ".experts." in name and "lora_" in name]
        assert names and all(trained.get_parameter(name).device.type == "cuda" for name in names)
        trained.save_pretrained(str(tmp_path))
        for low_cpu_mem_usage in (False, True):
            loaded = PeftModel.from_pretrained(tiny_models.build("qwen3_moe", seed=2).cuda(), str(tmp_path),
                                               low_cpu_mem_usage=low_cpu_mem_usage)
            for name in names:
                assert loaded.get_parameter(name).device.type == "cuda", (low_cpu_mem_usage, name)
                assert torch.equal(loaded.get_parameter(name), trained.get_parameter(name)), (low_cpu_mem_usage, name)
    finally:
        kt_patch.disable()


@pytest.mark.parametrize("executor, placement", [("hybrid", "model"), ("accelerator", "model"), ("accelerator", "host")])
def test_streamed_model_on_cuda_trains_as_stock_and_fetches_ahead(monkeypatch, executor, placement):
    """A whole model of four MoE layers, every one streamed (a budget of 3.5 layers' packed experts: the stream
    buffers, no room for a resident layer) under non-reentrant checkpointing, with a split that changes between steps
    (hybrid: some, none or every expert on the GPU) or every expert on the GPU: the same losses as stock on the GPU
    (fp32, 1e-4); the next two layers' weights are fetched ahead and used, within the stream buffers; the expert-LoRA
    factors are on the GPU with the model, where the optimizer steps them (fused AdamW, which writes them without
    bumping their versions: the CPU kernel reads host copies made each step), or in host memory (placement 'host':
    copied to the GPU with the weights, never from before an optimizer step)."""
    import tiny_models
    from peft import get_peft_model

    from kt_patch.executor import _Prefetcher
    from kt_patch.layer import KtMoeLayer
    from kt_patch.options import resolve
    from kt_patch.patcher import patch_model

    torch.backends.cuda.matmul.allow_tf32 = False
    # whether each take found rows ahead, and whether the next layer's were still ahead after it; each fetch's tier
    hits, still_ahead, fetches = [], [], []
    take, fetch = _Prefetcher.take, AcceleratorTier.fetch

    def counted_take(self, tier, plan):
        rows = take(self, tier, plan)
        hits.append(rows is not None)
        still_ahead.append(bool(self._ahead))
        return rows

    monkeypatch.setattr(_Prefetcher, "take", counted_take)
    monkeypatch.setattr(AcceleratorTier, "fetch", lambda self, *a: fetches.append(id(self)) or fetch(self, *a))

    def train(patched):
        torch.manual_seed(0)
        model = tiny_models.build("qwen3_moe", seed=2, num_hidden_layers=4)
        if patched:
            patch_model(model, resolve({"threads": 2, "executor": executor, "expert_lora_placement": placement,
                                        "gpu_expert_budget": 3.5 * layer_bytes / 2**30}))
        config = tiny_models.lora_config("qwen3_moe")
        config.init_lora_weights = False
        model = get_peft_model(model, config).cuda()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
        data = torch.Generator().manual_seed(RUN_SEED)
        losses = []
        for step in range(5):
            if step == 1:  # the optimizer's state is made: from here on, only the step's own memory comes and goes
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            for layer in model.modules():
                if isinstance(layer, KtMoeLayer) and layer.accelerator is not None:
                    assert layer.accelerator.tier_name == "streamed"
                    layer.accelerator.fraction = (0.5, 0.25, 1.0, 0.0, 0.5)[step]
            ids = torch.randint(3, tiny_models.COMMON["vocab_size"], (2, 24), generator=data).cuda()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        step_bytes = torch.cuda.max_memory_allocated() - base
        if patched:
            factors = [p for name, p in model.named_parameters() if ".experts." in name and "lora_" in name]
            layers = [layer for layer in model.modules() if isinstance(layer, KtMoeLayer)]
            where = "cuda" if placement == "model" else "cpu"
            assert factors and all(p.device.type == where for p in factors)
            assert all(optimizer.state[p]["exp_avg"].device.type == where for p in factors)
            # hybrid: the CPU kernel computed its experts from host copies of the factors
            assert all((layer.expert_runs > 0) == (executor == "hybrid") for layer in layers)
        return losses, step_bytes

    layer_bytes = tiny_models.expert_layer_bytes()
    stock, stock_bytes = train(patched=False)
    hits.clear()
    losses, step_bytes = train(patched=True)
    for a, b in zip(stock, losses):
        assert abs(a - b) <= 1e-4 * abs(a), f"run seed {RUN_SEED}: {stock} vs {losses}"
    # the stream buffers: the layer computing and two fetched ahead, one of them (the rows kept at the end of the step
    # before) already counted in the base (activations and gradients are tiny beside them)
    assert step_bytes - stock_bytes <= 2.5 * layer_bytes, (step_bytes, stock_bytes, layer_bytes)
    assert sum(hits) >= 2 * 3  # from the second step: the forward's and the backward's
    if executor == "accelerator":  # the same plan every step: the rows at either end of the order are kept
        layers = len(set(fetches))
        # the forward's last layer's rows stay for its recompute, the backward's last two for the next forward
        first_step = layers + layers - 1
        assert len(fetches) == first_step + 4 * (2 * layers - 3), (len(fetches), layers)
        # two ahead: each layer but a pass's last finds the next one's rows already there, fetched or kept (but in the
        # first step's forward, whose next plans are not known yet)
        assert sum(still_ahead) == (layers - 1) + 4 * 2 * (layers - 1), still_ahead
