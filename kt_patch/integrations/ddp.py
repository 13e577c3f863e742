"""torch DistributedDataParallel on a patched model: the routed experts' parameters are synchronised here, not by DDP.

Every process holds its own kernel and computes its own tokens. The routed experts' module holds the weight
placeholders (one element expanded to the weights' shape; the values live in the kernel), which DDP's start-up
broadcast cannot write into, and PEFT's expert-LoRA factors, which stay in host memory for the kernel while DDP wants
every parameter it handles on one device type (and NCCL reduces no host memory). So DDP is told to ignore every
parameter of the routed experts (through its ``_set_params_and_buffers_to_ignore_for_model``, keeping names the caller
gave it). Here, on a gloo group of their own over DDP's ranks, the trainable ones are broadcast from rank 0 once and
their gradients are averaged at the end of every backward, as DDP would do. Averaging the accumulated gradient on
every backward (also under ``no_sync``) gives the same sum, since after the first average every rank holds the same
value.

The frozen expert weights are not compared across ranks: every rank must load the same ones (``from_pretrained``
does).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..layer import KtMoeLayer

_GLOO_GROUPS: dict = {}


def install(distributed_module, patches) -> None:
    patches.wrap(distributed_module.DistributedDataParallel, "__init__", _take_over_routed_experts)


def _take_over_routed_experts(wrapped, instance, args, kwargs):
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
    new = [param for param in params if getattr(param, "_kt_patch_gradient_average", None) is None]
    if not new:
        return  # DDP built again around the same model: its gradients are already averaged
    group = _gloo_group(process_group)
    source = dist.get_global_rank(group, 0)
    for param in new:
        dist.broadcast(param.data, src=source, group=group)
    averager = _GradientAverage(new, group)
    for param in new:
        param._kt_patch_gradient_average = param.register_post_accumulate_grad_hook(averager.accumulated)


class _GradientAverage:
    """Averages the expert-LoRA gradients across the ranks once a backward has finished, in one fixed order.

    Not in each gradient's own hook: with the model on an accelerator, the host-memory gradients are accumulated on
    the CPU thread of the autograd engine while the accelerator's thread goes on, so their order differs between
    ranks and collectives issued from the hooks would not match. The ranks first agree on which gradients any of them
    accumulated (a layer may be missing from one rank's graph), so every rank issues the same collectives; a rank
    whose backward reached no routed-expert layer at all issues none, and the others then wait for it.
    """

    def __init__(self, params, group):
        self.params, self.group, self.size = params, group, dist.get_world_size(group)
        self.accumulated_ids: set[int] = set()
        self.queued_for = None  # the backward (graph task) whose end runs `average`

    def accumulated(self, param) -> None:
        backward = torch._C._current_graph_task_id()
        if self.queued_for != backward:  # also after a backward that failed before its end
            self.queued_for, self.accumulated_ids = backward, set()
            torch.autograd.Variable._execution_engine.queue_callback(self.average)
        self.accumulated_ids.add(id(param))

    def average(self) -> None:
        accumulated, self.accumulated_ids, self.queued_for = self.accumulated_ids, set(), None
        used = torch.tensor([id(param) in accumulated for param in self.params], dtype=torch.int32)
        dist.all_reduce(used, group=self.group)
        for param, anywhere in zip(self.params, used.tolist()):
            if anywhere:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                dist.all_reduce(param.grad, group=self.group)
                param.grad.div_(self.size)


def _gloo_group(process_group):
    """A gloo group of ``process_group``'s ranks, made once, for the expert-LoRA gradients alone: DDP's reducer
    issues its own collectives from the accelerator's autograd thread, and sharing a group with it would interleave
    theirs and ours in a different order on each rank."""
    key = tuple(dist.get_process_group_ranks(process_group))
    if key not in _GLOO_GROUPS:
        # only these ranks take part, so DDP on a subgroup (several data-parallel groups) makes no world-wide call
        _GLOO_GROUPS[key] = dist.new_group(ranks=list(key), backend="gloo", use_local_synchronization=True)
    return _GLOO_GROUPS[key]
