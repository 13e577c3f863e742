"""torch DistributedDataParallel on a patched model: the routed experts' parameters are synchronised here, not by DDP.

Every process holds its own kernel and computes its own tokens. The routed experts' module holds the weight
placeholders (one element expanded to the weights' shape; the values live in the kernel), which DDP's start-up
broadcast cannot write into, and PEFT's expert-LoRA factors, which stay in host memory for the kernel while DDP wants
every parameter it handles on one device type (and NCCL reduces no host memory). So DDP is told to ignore every
parameter of the routed experts (through its ``_set_params_and_buffers_to_ignore_for_model``, keeping names the caller
gave it), and here, on a gloo group of DDP's ranks, the trainable ones are broadcast from rank 0 once and their
gradients are averaged as each is accumulated, as DDP would do. Averaging the accumulated gradient on every backward
(also under ``no_sync``) gives the same sum, since after the first average every rank holds the same value.

The frozen expert weights are not compared across ranks: every rank must load the same ones (``from_pretrained``
does).
"""
from __future__ import annotations

import torch.distributed as dist

_GLOO_GROUPS: dict = {}


def install(distributed_module, patches) -> None:
    patches.wrap(distributed_module.DistributedDataParallel, "__init__", _take_over_routed_experts)


def _take_over_routed_experts(wrapped, instance, args, kwargs):
    from ..layer import KtMoeLayer

    module = args[0] if args else kwargs.get("module")
    experts = {}  # full name -> parameter, over the routed experts of every KtMoeLayer in the module
    if module is not None:
        for layer_name, layer in module.named_modules():
            if isinstance(layer, KtMoeLayer):
                prefix = ".".join(filter(None, (layer_name, layer.family.experts)))
                experts.update(layer._modules[layer.family.experts].named_parameters(prefix=prefix))
    if experts:
        given = set(vars(module).get("_ddp_params_and_buffers_to_ignore", ()))  # not a wrapped model's
        type(instance)._set_params_and_buffers_to_ignore_for_model(module, sorted(given | set(experts)))
    result = wrapped(*args, **kwargs)
    trainable = [param for param in experts.values() if param.requires_grad]
    if trainable:
        _average_across_ranks(trainable, instance.process_group)
    return result


def _average_across_ranks(params, process_group) -> None:
    group = _gloo_group(process_group)
    source = dist.get_global_rank(group, 0)
    size = dist.get_world_size(group)
    for param in params:
        dist.broadcast(param.data, src=source, group=group)
        if getattr(param, "_kt_patch_grad_average", None) is None:  # one hook, however often DDP is built
            def average(param, group=group, size=size):
                dist.all_reduce(param.grad, group=group)
                param.grad.div_(size)

            param._kt_patch_grad_average = param.register_post_accumulate_grad_hook(average)


def _gloo_group(process_group):
    """``process_group`` if its backend reduces host memory, else a gloo group of the same ranks (made once)."""
    if "gloo" in str(dist.get_backend(process_group)):
        return process_group
    key = tuple(dist.get_process_group_ranks(process_group))
    if key not in _GLOO_GROUPS:
        _GLOO_GROUPS[key] = dist.new_group(ranks=list(key), backend="gloo")
    return _GLOO_GROUPS[key]
