"""The one place that knows how PEFT lays out LoRA on fused experts.

PEFT puts ``lora.ParamWrapper`` modules around the experts module for ``target_parameters`` (also what it rewrites
``gate_proj``/``up_proj``/``down_proj`` or ``w1``/``w2``/``w3`` into on fused experts, and part of ``all-linear``):
one wrapper per targeted parameter, nested, each holding ``lora_A``/``lora_B`` per adapter and a ``scaling``. The
kernel computes expert LoRA from those factors in place (never ``W + BA``), so saved adapters are exactly what PEFT
writes without kt_patch.
"""
from __future__ import annotations

from torch import nn

from .kernel import NO_LORA, ExpertLora, LoraFactors
from .registry import EXPERT_WEIGHTS


def param_wrappers(experts_slot: nn.Module):
    """PEFT's ParamWrappers around a routed-experts module, outermost first."""
    module = experts_slot
    while hasattr(module, "base_layer") and hasattr(module, "parameter_name"):
        yield module
        module = module.base_layer


def unwrapped_experts(experts_slot: nn.Module) -> nn.Module:
    """The stock experts module under any PEFT wrappers."""
    while hasattr(experts_slot, "base_layer"):
        experts_slot = experts_slot.base_layer
    return experts_slot


def check_expert_wrappers(experts_slot: nn.Module, family: str) -> None:
    """Reject, at injection time, PEFT wrappers on routed experts that the kernel cannot honour."""
    if hasattr(experts_slot, "base_layer") and not hasattr(experts_slot, "parameter_name"):
        raise ValueError(f"kt_patch: PEFT wrapped the routed experts of {family} as a module "
                         f"({type(experts_slot).__name__}); target their parameters "
                         f"(target_parameters=['experts.gate_up_proj', 'experts.down_proj']) instead")
    for wrapper in param_wrappers(experts_slot):
        if wrapper.parameter_name not in EXPERT_WEIGHTS:
            raise ValueError(f"kt_patch: LoRA on experts.{wrapper.parameter_name} of {family} is not supported; "
                             f"the kernel applies LoRA to {' and '.join(EXPERT_WEIGHTS)} only")
        if type(wrapper).__name__ != "ParamWrapper":
            raise ValueError(f"kt_patch: {type(wrapper).__name__} on routed experts of {family} is not supported; "
                             "only LoRA (lora.ParamWrapper) is")


def lora_factor_modules(experts_slot: nn.Module):
    """The modules that hold PEFT's LoRA factors on the routed experts (every adapter's)."""
    for wrapper in param_wrappers(experts_slot):
        yield wrapper.lora_A
        yield wrapper.lora_B


def active_expert_lora(experts_slot: nn.Module) -> ExpertLora:
    """The factors of the active adapter on the routed experts (none where PEFT has none or has them disabled)."""
    found = {}
    for wrapper in param_wrappers(experts_slot):
        if wrapper.disable_adapters:
            continue
        adapters = [name for name in wrapper.active_adapters if name in wrapper.lora_A]
        if len(adapters) > 1:
            raise NotImplementedError(f"kt_patch: several active adapters on routed experts ({adapters}); "
                                      "activate one at a time")
        if adapters:
            name = adapters[0]
            found[wrapper.parameter_name] = LoraFactors(wrapper.lora_A[name].weight, wrapper.lora_B[name].weight,
                                                        float(wrapper.scaling[name]))
    if not found:
        return NO_LORA
    return ExpertLora(gate_up=found.get("gate_up_proj"), down=found.get("down_proj"))
