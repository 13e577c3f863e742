"""Activation checkpointing on patched models: phases, the two policies, and no cache left behind.

Every mode (HF non-reentrant and reentrant, torch.utils.checkpoint called directly, and a checkpoint function bound
before kt_patch was enabled, which only the fallback signal sees) × every policy gives the LoRA gradients of a run
without checkpointing; the layer's ``expert_runs`` counter shows how often the CPU experts ran and
``kt_patch.kernel.live_contexts()`` how many activation caches are alive.
"""
import functools
import gc
import inspect

import psutil
import pytest
import torch
import torch.utils.checkpoint
import transformers

import kt_patch
import tiny_models
from kt_patch.phase import CheckpointPhaseError
from kt_patch.kernel import live_contexts
from kt_patch.layer import KtMoeLayer

FAMILIES = ["qwen3_moe", "deepseek_v3", "gpt_oss"]
POLICIES = ["recompute", "retain"]
MODES = ["hf_non_reentrant", "hf_reentrant", "torch_non_reentrant", "torch_reentrant", "fallback_non_reentrant",
         "fallback_reentrant"]


@pytest.fixture(autouse=True)
def kt_enabled():
    kt_patch.enable(threads=2)
    yield
    kt_patch.disable()
    gc.collect()
    assert live_contexts() == 0


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def patched_peft_model(model_type, lora="parameters", **overrides):
    from peft import get_peft_model

    config = tiny_models.lora_config(model_type, lora)
    config.init_lora_weights = False  # random B too, so that every LoRA factor has a non-zero gradient
    torch.manual_seed(0)
    model = get_peft_model(tiny_models.build(model_type, **overrides), config)
    model.train()
    return model


def moe_layers(model):
    layers = [m for m in model.modules() if isinstance(m, KtMoeLayer)]
    assert layers
    return layers


def set_policy(model, policy):
    for layer in moe_layers(model):
        layer.checkpoint_policy = policy
        layer.expert_runs = 0


def set_checkpointing(model, mode):
    """Checkpoint every decoder layer the way ``mode`` says (``None``: no checkpointing)."""
    base = model.get_base_model()
    # transformers renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn, then go)
    disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    disable()
    if mode is None:
        return
    reentrant = mode.endswith("_reentrant") and not mode.endswith("non_reentrant")
    if mode in ("hf_non_reentrant", "hf_reentrant"):
        enable({"use_reentrant": reentrant})
        return
    if mode.startswith("torch_"):
        def checkpoint(function, *args):  # looks torch.utils.checkpoint.checkpoint up at every call, as users do
            return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=reentrant)
    else:  # bound before kt_patch wrapped it: only the fallback signal sees these regions
        unwrapped = torch.utils.checkpoint.checkpoint.__wrapped__
        checkpoint = functools.partial(unwrapped, use_reentrant=reentrant)
    for module in base.modules():  # what a user hand-rolling checkpointing on the decoder layers does
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = True
            module._gradient_checkpointing_func = checkpoint
    if reentrant:
        base.enable_input_require_grads()


def lora_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    caches_before_backward = live_contexts()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, caches_before_backward


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_mode_and_policy_gives_the_gradients_of_no_checkpointing(model_type):
    model = patched_peft_model(model_type)
    layers = moe_layers(model)
    ids = torch.randint(3, 128, (2, 13), generator=torch.Generator().manual_seed(0))
    reference, caches = lora_grads(model, ids)
    assert caches == len(layers)  # plain training: each layer keeps its cache for the backward
    assert all(layer.expert_runs == 1 for layer in layers)
    assert len([n for n in reference if ".experts." in n]) == 4 * len(layers)
    assert all(g.norm() > 0 for g in reference.values())
    with pytest.raises(ValueError, match="checkpoint_policy"):
        layers[0].checkpoint_policy = "sometimes"
    for mode in MODES:
        set_checkpointing(model, mode)
        for policy in POLICIES:
            set_policy(model, policy)
            grads, caches = lora_grads(model, ids)
            case = f"{model_type} {mode} {policy}"
            assert sorted(grads) == sorted(reference), case
            for name, grad in reference.items():
                assert rel(grads[name], grad) <= 1e-5, f"{case}: {name}"
            retains = policy == "retain" and not mode.startswith("fallback")
            # recompute: the first forward keeps nothing and the experts run again; retain: they run once
            assert caches == (len(layers) if retains else 0), case
            assert [layer.expert_runs for layer in layers] == [1 if retains else 2] * len(layers), case
            assert live_contexts() == 0, case


@pytest.mark.parametrize("policy", POLICIES)
def test_twenty_steps_leave_no_cache_and_host_memory_flat(policy):
    # 8 x 64 tokens and wider experts, so that one step's expert caches are large next to allocator noise:
    # per layer the kernel keeps about T*k*3*I fp32 values (gate, up, product) plus x, i.e. ~3.4 MB here.
    model = patched_peft_model("qwen3_moe", moe_intermediate_size=256)
    set_checkpointing(model, "hf_non_reentrant")
    set_policy(model, policy)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    data = torch.Generator().manual_seed(3)
    process = psutil.Process()
    rss = []
    for step in range(20):
        ids = torch.randint(3, 128, (8, 64), generator=data)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert live_contexts() == 0, step
        rss.append(process.memory_info().rss)
    # From step 5 on (optimizer state and allocator pools exist), RSS stays flat: a leak of one step's caches would
    # add ~7 MB a step, ~100 MB over these 15 steps; 16 MB leaves room for glibc arena trimming jitter.
    assert rss[-1] - rss[4] < 16 * 2**20, [r >> 20 for r in rss]
    assert all(layer.expert_runs == 20 * (1 if policy == "retain" else 2) for layer in moe_layers(model))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("mode", ["hf_non_reentrant", "hf_reentrant"])
def test_evaluation_and_generation_between_steps_leave_nothing_behind(policy, mode):
    model = patched_peft_model("qwen3_moe")
    set_checkpointing(model, mode)
    set_policy(model, policy)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(4))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert live_contexts() == 0
        # evaluation inside the training loop: a forward with autograd recording and no backward
        loss = model(input_ids=ids, labels=ids).loss
        assert loss.requires_grad
        del loss
        assert live_contexts() == 0
        with torch.no_grad():
            model.eval()
            assert model(input_ids=ids).logits.shape == (2, 16, 128)
            model.generate(input_ids=ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
            model.train()
        assert live_contexts() == 0
        # in training mode under no_grad, as some evaluation loops do (HF does not checkpoint then)
        with torch.no_grad():
            model(input_ids=ids)
        assert live_contexts() == 0


class Boom(Exception):
    pass


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("mode", ["hf_non_reentrant", "hf_reentrant"])
def test_exception_mid_step_leaves_nothing_behind(policy, mode):
    model = patched_peft_model("qwen3_moe")
    set_checkpointing(model, mode)
    set_policy(model, policy)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    last_layer = model.get_base_model().model.layers[-1]

    def fail(module, args):
        raise Boom

    hook = last_layer.register_forward_pre_hook(fail)  # in the forward, after the first layer ran its experts
    with pytest.raises(Boom):
        model(input_ids=ids, labels=ids)
    hook.remove()
    assert live_contexts() == 0

    # in the backward, once the last layer's experts have run theirs and before the first layer's
    first_attention_lora = next(p for n, p in model.named_parameters() if "layers.0.self_attn.o_proj.lora_B" in n)
    hook = first_attention_lora.register_hook(lambda grad: (_ for _ in ()).throw(Boom()))
    loss = model(input_ids=ids, labels=ids).loss
    with pytest.raises(Boom):
        loss.backward()
    hook.remove()
    del loss
    gc.collect()
    assert live_contexts() == 0
    model(input_ids=ids, labels=ids).loss.backward()  # and the next step trains normally
    assert live_contexts() == 0


def foreign_hooks():
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)


def test_a_foreign_saved_tensors_hook_is_a_clear_error():
    model = patched_peft_model("qwen3_moe")
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(6))
    with foreign_hooks(), pytest.raises(CheckpointPhaseError, match="saved-tensors hook"):
        model(input_ids=ids, labels=ids)
    assert live_contexts() == 0


@pytest.mark.parametrize("mode", ["hf_non_reentrant", "fallback_non_reentrant"])
def test_a_foreign_hook_inside_a_checkpointed_region_is_a_clear_error(mode):
    model = patched_peft_model("qwen3_moe")
    set_checkpointing(model, mode)
    moe = moe_layers(model)[0]
    forward = moe.forward

    def forward_under_foreign_hook(*args, **kwargs):
        with foreign_hooks():
            return forward(*args, **kwargs)

    moe.forward = forward_under_foreign_hook
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(7))
    with pytest.raises(CheckpointPhaseError, match="saved-tensors hook"):
        model(input_ids=ids, labels=ids)
    assert live_contexts() == 0


def test_lora_dropout_on_routed_experts_is_refused_by_peft():
    # So there is no dropout mask to repeat in the recompute: PEFT's ParamWrapper (LoRA on fused experts) refuses it.
    from peft import LoraConfig, get_peft_model

    for targets in (dict(target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
                    dict(target_modules=["gate_proj", "up_proj", "down_proj"])):
        with pytest.raises(ValueError, match="lora_dropout"):
            get_peft_model(tiny_models.build("qwen3_moe"), LoraConfig(r=4, lora_dropout=0.1, **targets))


def test_a_checkpoint_function_that_does_not_checkpoint_is_a_plain_forward():
    model = patched_peft_model("qwen3_moe")
    layers = moe_layers(model)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(8))
    reference, _ = lora_grads(model, ids)
    # HF hands kt_patch's signal to whatever function the user gives; this one just runs the layer
    model.get_base_model()._set_gradient_checkpointing(enable=True,
                                                       gradient_checkpointing_func=lambda fn, *args: fn(*args))
    set_policy(model, "recompute")
    grads, caches = lora_grads(model, ids)
    assert caches == len(layers) and [layer.expert_runs for layer in layers] == [1] * len(layers)
    assert all(rel(grads[name], grad) <= 1e-5 for name, grad in reference.items())


def llamafactory_checkpoint_function(use_reentrant):
    """LLaMA-Factory 0.9.5's ``get_custom_gradient_checkpointing_func`` around ``partial(checkpoint, ...)``
    (model_utils/checkpointing.py): it finds the decoder layer through ``func.__self__`` or ``func.func.__self__`` to
    checkpoint only layers with trainable parameters, and makes the hidden states require grad itself."""
    gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=use_reentrant)

    @functools.wraps(gradient_checkpointing_func, assigned=functools.WRAPPER_ASSIGNMENTS + ("__self__",))
    def custom_gradient_checkpointing_func(func, *args, **kwargs):
        module = func.func.__self__ if isinstance(func, functools.partial) else func.__self__
        if any(param.requires_grad for param in module.parameters()):
            for arg in args:
                if torch.is_tensor(arg) and torch.is_floating_point(arg):
                    arg.requires_grad_(True)
                    break
            return gradient_checkpointing_func(func, *args, **kwargs)
        return func(*args, **kwargs)

    return custom_gradient_checkpointing_func


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_llamafactory_checkpoint_function_trains_as_unpatched(use_reentrant):
    # the oldest-versions run (transformers and peft that LLaMA-Factory 0.9.5 takes): LoRA on attention only
    lora = tiny_models.expert_lora_variant()
    with kt_patch.options.suspended():
        models = {"stock": patched_peft_model("qwen3_moe", lora)}
    models["patched"] = patched_peft_model("qwen3_moe", lora)
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(10))
    grads = {}
    for name, model in models.items():
        model.get_base_model()._set_gradient_checkpointing(
            enable=True, gradient_checkpointing_func=llamafactory_checkpoint_function(use_reentrant))
        try:
            grads[name], _ = lora_grads(model, ids)
        except AttributeError as error:
            if name == "stock" and "__self__" in str(error):
                pytest.skip("this transformers hands checkpoint functions partial(forward, layer) (5.0-5.6 handed "
                            "partial(layer.__call__)): LLaMA-Factory 0.9.5's function finds no layer even unpatched")
            raise
    assert [layer.expert_runs for layer in moe_layers(models["patched"])] == [2, 2]  # checkpointed: recomputed
    assert sorted(grads["patched"]) == sorted(grads["stock"])
    assert any(".experts." in n for n in grads["stock"]) == (lora == "parameters")
    for name, grad in grads["stock"].items():
        assert rel(grads["patched"][name], grad) <= 1e-4, name


@pytest.mark.skipif("offload" not in inspect.signature(
    getattr(transformers.PreTrainedModel, "activation_checkpointing_enable", lambda: None)).parameters,
    reason="this transformers has no every_n_layers / offload for activation checkpointing")
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_every_nth_layer_checkpointed_and_offloaded_gives_the_gradients_of_no_checkpointing(monkeypatch,
                                                                                            use_reentrant):
    """transformers' ``activation_checkpointing_enable(every_n_layers=2, offload=True)``: the second layer keeps its
    activations, the first is checkpointed with its inputs saved in host memory by ``save_on_cpu`` hooks around the
    checkpoint (pinned only where an accelerator allocates pinned memory: without one, transformers' own call fails)."""
    import transformers.modeling_utils

    on_cpu = transformers.modeling_utils.save_on_cpu
    monkeypatch.setattr(transformers.modeling_utils, "save_on_cpu",
                        lambda pin_memory, device_type: on_cpu(torch.cuda.is_available() and pin_memory, device_type))
    model = patched_peft_model("qwen3_moe")
    layers = moe_layers(model)
    ids = torch.randint(3, 128, (2, 13), generator=torch.Generator().manual_seed(10))
    reference, _ = lora_grads(model, ids)
    model.get_base_model().activation_checkpointing_enable({"use_reentrant": use_reentrant}, every_n_layers=2,
                                                           offload=True)
    for policy in POLICIES:
        set_policy(model, policy)
        grads, caches = lora_grads(model, ids)
        assert sorted(grads) == sorted(reference)
        assert all(rel(grads[n], g) <= 1e-5 for n, g in reference.items()), policy
        assert [layer.expert_runs for layer in layers] == [1 if policy == "retain" else 2, 1], policy
        assert live_contexts() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_checkpointing_with_the_model_on_the_gpu():
    # The backward, and so the recompute, runs on the autograd engine's device thread there.
    model = patched_peft_model("qwen3_moe").to("cuda")
    layers = moe_layers(model)
    ids = torch.randint(3, 128, (2, 13), generator=torch.Generator().manual_seed(9)).cuda()
    reference, _ = lora_grads(model, ids)
    for mode in ("hf_non_reentrant", "hf_reentrant"):
        set_checkpointing(model, mode)
        for policy in POLICIES:
            set_policy(model, policy)
            grads, caches = lora_grads(model, ids)
            assert caches == (len(layers) if policy == "retain" else 0), (mode, policy)
            assert [layer.expert_runs for layer in layers] == [1 if policy == "retain" else 2] * len(layers)
            assert all(rel(grads[n], g) <= 1e-5 for n, g in reference.items()), (mode, policy)
            assert live_contexts() == 0
