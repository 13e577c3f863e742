"""PEFT on a patched model: expert LoRA is computed by the kernel from PEFT's own factors.

PEFT puts ``lora.ParamWrapper`` modules around the experts module for ``target_parameters`` (also what it rewrites
``gate_proj``/``up_proj``/``down_proj`` or ``w1``/``w2``/``w3`` into on fused experts, and part of ``all-linear``):
one wrapper per targeted parameter, nested. ``KtMoeLayer`` never runs those wrappers (that would materialise
``W + BA`` for every expert); it hands their ``lora_A``/``lora_B`` weights and scaling to the kernel, which reads
them in place. Everything else (attention, shared experts, routers) stays plain PEFT. Because the wrappers and
factors are PEFT's own, saved adapters are exactly what PEFT writes without kt_patch.
"""
from __future__ import annotations

from torch import nn

EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
LORA_EXPERTS = "lora_experts"


def install_tuner_hook(tuners_utils, patches) -> None:
    # inject_adapter is reached by get_peft_model, PeftModel.from_pretrained / load_adapter, inject_adapter_in_model
    # and transformers' model.load_adapter, however they were imported.
    patches.wrap(tuners_utils.BaseTuner, "inject_adapter", _inject_adapter)


def install_save_hook(peft_model, patches) -> None:
    patches.wrap(peft_model.PeftModel, "save_pretrained", _save_adapter)


def install_merge_hook(lora_layer, patches) -> None:
    patches.wrap(lora_layer.ParamWrapper, "merge", _merge)


def _merge(wrapped, instance, args, kwargs):
    from ..layer import is_placeholder

    if is_placeholder(instance.get_param()):
        raise ValueError("kt_patch: cannot merge LoRA into routed experts that live in the CPU kernel; merge the "
                         "saved adapter into a model loaded without kt_patch")
    return wrapped(*args, **kwargs)


def _kt_layers(model: nn.Module):
    from ..layer import KtMoeLayer

    return [module for module in model.modules() if isinstance(module, KtMoeLayer)]


def _inject_adapter(wrapped, instance, args, kwargs):
    model = kwargs["model"] if "model" in kwargs else args[0]
    adapter_name = kwargs["adapter_name"] if "adapter_name" in kwargs else args[1]
    layers = _kt_layers(model)
    if layers and any(LORA_EXPERTS in layer._modules for layer in layers):
        # LoRA Experts are new modules of the patched model: PEFT trains and saves them as modules_to_save.
        config = instance.peft_config[adapter_name]
        modules_to_save = set(config.modules_to_save or ())
        if LORA_EXPERTS not in modules_to_save:
            config.modules_to_save = sorted(modules_to_save | {LORA_EXPERTS})
    result = wrapped(*args, **kwargs)
    for layer in layers:
        check_expert_wrappers(layer._modules[layer.family.experts], layer.family.name)
    return result


def _save_adapter(wrapped, instance, args, kwargs):
    # PEFT builds the adapter from the full model state_dict(); reading every routed expert back from the kernel for
    # that would copy the whole expert store only to drop it again.
    from ..layer import skip_expert_export

    with skip_expert_export():
        return wrapped(*args, **kwargs)


def _param_wrappers(experts_slot: nn.Module):
    module = experts_slot
    while hasattr(module, "base_layer") and hasattr(module, "parameter_name"):
        yield module
        module = module.base_layer


def check_expert_wrappers(experts_slot: nn.Module, family: str) -> None:
    """Reject, at injection time, PEFT wrappers on routed experts that the kernel cannot honour."""
    if hasattr(experts_slot, "base_layer") and not hasattr(experts_slot, "parameter_name"):
        raise ValueError(f"kt_patch: PEFT wrapped the routed experts of {family} as a module "
                         f"({type(experts_slot).__name__}); target their parameters "
                         f"(target_parameters=['experts.gate_up_proj', 'experts.down_proj']) instead")
    for wrapper in _param_wrappers(experts_slot):
        if wrapper.parameter_name not in EXPERT_PARAMETERS:
            raise ValueError(f"kt_patch: LoRA on experts.{wrapper.parameter_name} of {family} is not supported; "
                             f"the kernel applies LoRA to {' and '.join(EXPERT_PARAMETERS)} only")
        if type(wrapper).__name__ != "ParamWrapper":
            raise ValueError(f"kt_patch: {type(wrapper).__name__} on routed experts of {family} is not supported; "
                             "only LoRA (lora.ParamWrapper) is")


def active_expert_lora(experts_slot: nn.Module):
    """``(gate_up, down)``: each ``(lora_A, lora_B, scaling)`` of the active adapter, or None where there is none."""
    found = {}
    for wrapper in _param_wrappers(experts_slot):
        if wrapper.disable_adapters:
            continue
        adapters = [name for name in wrapper.active_adapters if name in wrapper.lora_A]
        if len(adapters) > 1:
            raise NotImplementedError(f"kt_patch: several active adapters on routed experts ({adapters}); "
                                      "activate one at a time")
        if adapters:
            name = adapters[0]
            found[wrapper.parameter_name] = (wrapper.lora_A[name].weight, wrapper.lora_B[name].weight,
                                             float(wrapper.scaling[name]))
    for factors in found.values():
        if any(t.device.type != "cpu" for t in factors[:2]):
            raise RuntimeError("kt_patch: expert LoRA factors must stay in host memory for the CPU kernel; "
                               "something moved them to " + str(factors[0].device))
    return found.get("gate_up_proj"), found.get("down_proj")

