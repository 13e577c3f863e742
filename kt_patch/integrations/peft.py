"""PEFT hooks: expert LoRA injected by PEFT is checked for what the kernel computes, LoRA Experts are saved with the
adapter and an adapter with them loads only into a model with them (one without them loads into such a model, whose
LoRA Experts then start at zero output), saving reads no expert weights back, and merging into the kernel's experts is
refused.

``KtMoeLayer`` never runs PEFT's ``ParamWrapper`` modules on routed experts (that would materialise ``W + BA`` for
every expert); it hands their factors to the kernel (:mod:`kt_patch.expert_lora`). Everything else (attention, shared
experts, routers) stays plain PEFT.
"""
from __future__ import annotations

import inspect

from packaging.version import Version
from torch import nn

from ..expert_lora import check_expert_wrappers, param_wrappers
from ..layer import LORA_EXPERTS_MODULE, KtMoeLayer, is_placeholder, skip_expert_export
from .transformers import TRANSFORMERS_LOADING_MODULES_TO_SAVE, loading_adapter_without_modules_to_save

# The oldest PEFT with LoRA on fused experts as the kernel reads it (A [E*r, in], B [out, E*r] per parameter): older
# ones lay the factors out otherwise (0.19.0 and before), which the kernel would meet only at the first forward.
PEFT_FOR_EXPERT_LORA = "0.19.1"
MERGE_REFUSED = ("kt_patch: cannot merge LoRA into routed experts that live in the CPU kernel; merge the saved "
                 "adapter into a model loaded without kt_patch")


def install_tuner_hook(tuners_utils, patches) -> None:
    # inject_adapter is reached by get_peft_model, PeftModel.from_pretrained / load_adapter, inject_adapter_in_model
    # and transformers' model.load_adapter, however they were imported.
    patches.wrap(tuners_utils.BaseTuner, "inject_adapter", _inject_adapter)
    # Every merge (merge_and_unload, merge_adapter) asks _check_merge_allowed before it touches a module.
    patches.wrap(tuners_utils.BaseTuner, "_check_merge_allowed", _check_merge_allowed)


def install_peft_model_hook(peft_model, patches) -> None:
    patches.wrap(peft_model.PeftModel, "save_pretrained", _save_adapter)
    # The function PeftModel.load_adapter (so PeftModel.from_pretrained too) loads an adapter's weights with.
    patches.wrap(peft_model, "set_peft_model_state_dict", _set_adapter_state_dict)


def install_merge_hook(lora_layer, patches) -> None:
    patches.wrap(lora_layer.ParamWrapper, "merge", _merge)


def _check_merge_allowed(wrapped, instance, args, kwargs):
    if any(next(param_wrappers(layer._modules[layer.family.experts]), None) for layer in _kt_layers(instance.model)):
        raise ValueError(MERGE_REFUSED)
    return wrapped(*args, **kwargs)


def _merge(wrapped, instance, args, kwargs):
    if is_placeholder(instance.get_param()):  # a wrapper merged on its own, outside the tuner's entry points
        raise ValueError(MERGE_REFUSED)
    return wrapped(*args, **kwargs)


def _kt_layers(model: nn.Module):
    return [module for module in model.modules() if isinstance(module, KtMoeLayer)]


def _inject_adapter(wrapped, instance, args, kwargs):
    model = kwargs["model"] if "model" in kwargs else args[0]
    adapter_name = kwargs["adapter_name"] if "adapter_name" in kwargs else args[1]
    layers = _kt_layers(model)
    config = instance.peft_config[adapter_name]
    modules_to_save = set(getattr(config, "modules_to_save", None) or ())
    if any(LORA_EXPERTS_MODULE in layer._modules for layer in layers):
        # LoRA Experts are new modules of the patched model: PEFT trains and saves them as modules_to_save.
        if LORA_EXPERTS_MODULE not in modules_to_save:
            config.modules_to_save = sorted(modules_to_save | {LORA_EXPERTS_MODULE})
    elif LORA_EXPERTS_MODULE in modules_to_save:
        # An adapter saved with LoRA Experts (every such adapter lists them): PEFT finds no module of that name here,
        # wraps nothing and drops their weights on loading, without an error. Refused before anything is injected.
        raise ValueError(f"kt_patch: adapter {adapter_name!r} was trained with LoRA Experts (its modules_to_save lists "
                         f"{LORA_EXPERTS_MODULE!r}) and this model has none: PEFT would drop them and the model would "
                         "not be the one trained. Load the base model with kt_patch enabled with the lora_experts and "
                         "lora_expert_intermediate_size options the adapter was trained with (kt_patch.enable(...) or "
                         "KT_LORA_EXPERTS and KT_LORA_EXPERT_INTERMEDIATE_SIZE)")
    if LORA_EXPERTS_MODULE in modules_to_save and loading_adapter_without_modules_to_save():
        # transformers' own load_adapter would leave their weights out, with only a line in its load report.
        raise ValueError(f"kt_patch: adapter {adapter_name!r} has LoRA Experts, which model.load_adapter does not load "
                         f"before transformers {TRANSFORMERS_LOADING_MODULES_TO_SAVE} (it leaves out PEFT's "
                         "modules_to_save weights): load the adapter with peft.PeftModel.from_pretrained(model, path), "
                         "or upgrade transformers")
    result = wrapped(*args, **kwargs)
    import peft  # imported already (this is its own method); at module level it would import it for every user

    for layer in layers:
        experts_slot = layer._modules[layer.family.experts]
        if next(param_wrappers(experts_slot), None) is not None and \
                Version(peft.__version__) < Version(PEFT_FOR_EXPERT_LORA):
            raise ValueError(f"kt_patch: LoRA on routed experts needs peft >= {PEFT_FOR_EXPERT_LORA} (installed: "
                             f"{peft.__version__}); upgrade peft, or leave the experts out of the LoRA targets")
        check_expert_wrappers(experts_slot, layer.family.name)
        layer.place_expert_lora(adapter_name)
    return result


def _set_adapter_state_dict(wrapped, instance, args, kwargs):
    from peft.utils import ModulesToSaveWrapper  # imported already (this is its own function)

    arguments = inspect.signature(wrapped).bind(*args, **kwargs)
    arguments.apply_defaults()
    model, state_dict = arguments.arguments["model"], arguments.arguments["peft_model_state_dict"]
    lora_experts = {f"{name}.{LORA_EXPERTS_MODULE}": layer._modules[LORA_EXPERTS_MODULE]
                    for name, layer in model.named_modules()
                    if isinstance(layer, KtMoeLayer)
                    and isinstance(layer._modules.get(LORA_EXPERTS_MODULE), ModulesToSaveWrapper)}
    if lora_experts and not any(f".{LORA_EXPERTS_MODULE}." in key for key in state_dict):
        # An adapter saved without LoRA Experts, loaded into a model that has them (injection made them one of its
        # modules_to_save): PEFT looks each of their weights up in the adapter (KeyError). They keep the weights they
        # were made with, so they start at zero output like new ones, and train when the adapter is loaded trainable.
        state_dict = dict(state_dict)
        for prefix, wrapper in lora_experts.items():
            for key, target in wrapper.adapter_state_dict_load_map(arguments.arguments["adapter_name"]).items():
                state_dict[f"{prefix}.{key}"] = wrapper.get_parameter(target)
        arguments.arguments["peft_model_state_dict"] = state_dict
    result = wrapped(*arguments.args, **arguments.kwargs)
    for layer in _kt_layers(model):  # loading may have (re)made the factors beside the host placeholders
        layer.place_expert_lora(arguments.arguments["adapter_name"])
    return result


def _save_adapter(wrapped, instance, args, kwargs):
    # PEFT builds the adapter from the full model state_dict(); reading every routed expert back from the kernel for
    # that would copy the whole expert store only to drop it again.
    with skip_expert_export():
        return wrapped(*args, **kwargs)
