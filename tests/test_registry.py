"""Each registry family, patched, computes what its stock block computes (fp32): same expert ids, outputs and
gradients (input, router weight through the routing weights, shared experts) to 1e-4 relative L2."""
import logging

import pytest
import torch
from packaging.version import Version

import tiny_models
from kt_patch import registry
from kt_patch.layer import KtMoeLayer, is_placeholder
from kt_patch.options import resolve
from kt_patch.patcher import patch_model

SUPPORTED = list(tiny_models.FAMILIES)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def record_router_ids(model, store):
    for module in model.modules():
        if type(module).__name__.endswith(("Router", "Gate")) and hasattr(module, "top_k"):
            module.register_forward_hook(lambda m, i, out: store.append(out[2].clone()))


def test_every_tiny_family_has_one_entry():
    by_name = {f.name: f for f in registry.FAMILIES}
    assert sorted(by_name) == sorted(map(tiny_models.family_name, tiny_models.FAMILIES))
    for model_type in filter(tiny_models.available, tiny_models.FAMILIES):
        model = tiny_models.build(model_type)
        found = {registry.family_of(m) for m in model.modules()} - {None}
        assert found == {by_name[tiny_models.family_name(model_type)]}


def assert_left_untouched_naming_the_version(model_type, caplog):
    import transformers

    model = tiny_models.build(model_type)
    with caplog.at_level(logging.WARNING, logger="kt_patch"):
        assert patch_model(model, resolve({})) is None
    assert not any(isinstance(m, KtMoeLayer) for m in model.modules())
    family = registry.family_of(next(m for m in model.modules() if registry.family_of(m) is not None))
    assert f"left untouched: {family.name} needs transformers >= {family.min_transformers} " \
           f"(installed: {transformers.__version__}, whose {family.block_class} computes otherwise)" in caplog.text


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_patched_block_matches_stock(model_type, caplog):
    import transformers

    if not tiny_models.available(model_type):
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    if tiny_models.too_old(model_type):  # the oldest-versions run: what kt_patch does instead
        assert_left_untouched_naming_the_version(model_type, caplog)
        return
    stock, patched = tiny_models.build(model_type, seed=3), tiny_models.build(model_type, seed=3)
    summary = patch_model(patched, resolve({}))
    assert summary is not None and summary.layers == 2 and summary.experts == 16
    assert sum(isinstance(m, KtMoeLayer) for m in patched.modules()) == 2
    for name, param in patched.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            assert is_placeholder(param) and param.untyped_storage().nbytes() <= 4, name

    ids_stock, ids_patched = [], []
    record_router_ids(stock, ids_stock)
    record_router_ids(patched, ids_patched)
    torch.manual_seed(7)
    embeds = torch.randn(3, 10, 64)
    outs = []
    for model in (stock, patched):
        x = embeds.clone().requires_grad_()
        out = model(inputs_embeds=x).logits
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        outs.append((out, x.grad))
    assert len(ids_stock) == len(ids_patched) == 2
    for a, b in zip(ids_stock, ids_patched):
        assert torch.equal(a, b)
    assert rel(outs[1][0], outs[0][0]) < 1e-4
    assert rel(outs[1][1], outs[0][1]) < 1e-4
    stock_grads = {n: p.grad for n, p in stock.named_parameters() if p.grad is not None}
    patched_grads = {n: p.grad for n, p in patched.named_parameters() if p.grad is not None}
    routed = {n for n in stock_grads if n.endswith(("experts.gate_up_proj", "experts.down_proj",
                                                     "experts.gate_up_proj_bias", "experts.down_proj_bias"))}
    assert set(patched_grads) == set(stock_grads) - routed  # base expert weights are frozen in the kernel
    router_grads = [n for n in patched_grads if ".gate." in n or ".router." in n or n.endswith((".gate.weight",
                                                                                                ".router.weight"))]
    assert router_grads, "routing weights must carry gradient into the router"
    for name, grad in patched_grads.items():
        assert rel(grad, stock_grads[name]) < 1e-4, name


def test_a_family_newer_than_the_installed_transformers_is_left_untouched(monkeypatch, caplog):
    import transformers

    family = next(f for f in registry.FAMILIES if f.name == "granitemoe")
    monkeypatch.setattr(transformers, "__version__", "5.6.0")  # below granitemoe's min_transformers
    assert Version(family.min_transformers) > Version("5.6.0")
    assert_left_untouched_naming_the_version("granitemoe", caplog)


def test_unsupported_experts_leave_model_untouched(caplog):
    model = tiny_models.build("qwen3_moe")
    model.config.hidden_act = "gelu"  # experts the kernel does not compute
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="kt_patch"):
        assert patch_model(model, resolve({})) is None
    assert not any(isinstance(m, KtMoeLayer) for m in model.modules())
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert [r.getMessage() for r in caplog.records if "left untouched" in r.getMessage()] != []
    assert "uses activation 'gelu'" in caplog.text


def test_half_precision_experts_are_refused(caplog):
    model = tiny_models.build("qwen3_moe").half()
    with caplog.at_level(logging.INFO, logger="kt_patch"):
        assert patch_model(model, resolve({})) is None
    assert "torch.float16" in caplog.text
    assert not any(isinstance(m, KtMoeLayer) for m in model.modules())


def test_architectures_option_filters_families(caplog):
    model = tiny_models.build("mixtral")
    with caplog.at_level(logging.INFO, logger="kt_patch"):
        assert patch_model(model, resolve({"architectures": "qwen3_moe"})) is None
    assert "mixtral" in caplog.text and not any(isinstance(m, KtMoeLayer) for m in model.modules())


def test_register_adds_a_family():
    family = registry.MoeFamily("my_moe", "MyMoeBlock")
    try:
        registry.register(family)
        assert registry.family_of(type("MyMoeBlock", (torch.nn.Module,), {})()) is family
    finally:
        registry.FAMILIES.remove(family)
        registry._BY_BLOCK_CLASS.pop("MyMoeBlock")


def test_failure_midway_restores_every_block(monkeypatch):
    """Never half-patched: when the second kernel cannot be built, the first block gets its weights back."""
    import kt_patch.patcher

    real = kt_patch.patcher.ExpertKernel
    built = []

    def second_fails(*args, **kwargs):
        if built:
            raise MemoryError("no room for the second layer")
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(kt_patch.patcher, "ExpertKernel", second_fails)
    model = tiny_models.build("qwen2_moe", seed=5)  # a family that every supported transformers patches
    before = {n: t.clone() for n, t in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    with pytest.raises(MemoryError):
        patch_model(model, resolve({}))
    assert [type(m) for m in model.modules()] == classes
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]) and not is_placeholder(tensor), name
