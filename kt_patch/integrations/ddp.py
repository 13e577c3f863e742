"""torch DistributedDataParallel on a patched model: the routed experts' parameters are synchronised here, not by DDP.

Every process holds its own kernel and computes its own tokens. The routed experts' module holds the weight
placeholders (one element expanded to the weights' shape; the values live in the kernel), which DDP's start-up
broadcast cannot write into, and PEFT's expert-LoRA factors, which stay in host memory for the kernel while DDP
wants every parameter it handles on one device type (and NCCL reduces no host memory). So DDP is told to ignore
every host parameter of the routed experts, through its ``_set_params_and_buffers_to_ignore_for_model``, keeping
names the caller gave it (factors on the model's device, where they go unless kept on the host, are DDP's own).
Here, on a gloo group of their own over DDP's ranks, the trainable ones are broadcast from rank 0 once and their
gradients are averaged at the end of every backward, as DDP would do. Averaging the accumulated gradient on every
backward (also under ``no_sync``) gives the same sum, since after the first average every rank holds the same value.

The frozen expert weights are not compared across ranks: every rank must load the same ones (``from_pretrained``
does). Several local ranks map one host copy of them (:mod:`kt_patch.shared_weights`).

No rank waits forever on another's error (:mod:`kt_patch.peers`): a forward that raises under DDP, an expert backward
that raises or an uncaught exception is written to the process group's store, the other ranks raise it at their next
MoE layer or while waiting for the averaging, and the averaging's collectives wait at most the ``peer_timeout``
option.
"""
from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Join, Joinable, JoinHook

from .. import peers
from ..layer import KtMoeLayer



def install(distributed_module, patches) -> None:
    patches.wrap(distributed_module.DistributedDataParallel, "__init__", _take_over_routed_experts)
    patches.wrap(distributed_module.DistributedDataParallel, "forward", _forward_reporting_failures)
    patches.wrap(distributed_module.DistributedDataParallel, "join", _join_with_the_average)


def _join_with_the_average(wrapped, instance, args, kwargs):
    """``DDP.join()`` for uneven inputs: a rank out of batches also shadows the expert-LoRA average's collectives
    (as DDP's join hook shadows its own), so the others do not wait for it."""
    average = getattr(instance, "_kt_patch_average", None)
    if average is None:
        return wrapped(*args, **kwargs)
    arguments = inspect.signature(wrapped).bind(*args, **kwargs)
    arguments.apply_defaults()
    given = arguments.arguments
    if not given["divide_by_initial_world_size"]:
        raise NotImplementedError("kt_patch: DDP.join(divide_by_initial_world_size=False) is not supported with "
                                  "expert LoRA: its average divides by the initial world size")
    average.attach(instance)
    return Join([instance, average], given["enable"], given["throw_on_early_termination"],
                divide_by_initial_world_size=True)


def _forward_reporting_failures(wrapped, instance, args, kwargs):
    peers.check(force=True)
    try:
        return wrapped(*args, **kwargs)
    except BaseException as error:
        peers.report(error, "in the forward")
        raise


def _take_over_routed_experts(wrapped, instance, args, kwargs):
    module = args[0] if args else kwargs.get("module")
    experts = {}  # full name -> parameter, over the routed experts of every KtMoeLayer in the module
    if module is not None:
        for layer_name, layer in module.named_modules():
            if isinstance(layer, KtMoeLayer):
                prefix = ".".join(filter(None, (layer_name, layer.family.experts)))
                experts.update((name, param) for name, param in
                               layer._modules[layer.family.experts].named_parameters(prefix=prefix)
                               if param.device.type == "cpu")  # factors on the model's device are DDP's own
    if experts:
        given = set(vars(module).get("_ddp_params_and_buffers_to_ignore", ()))  # not a wrapped model's
        type(instance)._set_params_and_buffers_to_ignore_for_model(module, sorted(given | set(experts)))
    result = wrapped(*args, **kwargs)
    trainable = [param for param in experts.values() if param.requires_grad]
    if trainable:
        _average_across_ranks(instance, trainable, instance.process_group)
    return result


def _average_across_ranks(instance, params, process_group) -> None:
    new = [param for param in params if getattr(param, "_kt_patch_gradient_average", None) is None]
    if not new:
        return  # DDP built again around the same model: its gradients are already averaged
    group = peers.gloo_group(process_group)
    peers.activate()
    source = dist.get_global_rank(group, 0)
    for param in new:
        dist.broadcast(param.data, src=source, group=group)
    averager = _GradientAverage(new, group)
    instance._kt_patch_average = averager
    for param in new:
        param._kt_patch_gradient_average = param.register_post_accumulate_grad_hook(averager.accumulated)


class _GradientAverage(Joinable):
    """Averages the expert-LoRA gradients across the ranks once a backward has finished, in one fixed order.

    Not in each gradient's own hook: with the model on an accelerator, the host-memory gradients are accumulated on
    the CPU thread of the autograd engine while the accelerator's thread goes on, so their order differs between
    ranks and collectives issued from the hooks would not match. The ranks first agree on which gradients any of them
    accumulated (a layer may be missing from one rank's graph), so every rank issues the same collectives; a rank
    whose backward reached no routed-expert layer at all issues none, and the others then wait for it.
    """

    def __init__(self, params, group):
        super().__init__()
        self.params, self.group, self.size = params, group, dist.get_world_size(group)
        self.ddp = None  # the DDP module whose join() this average takes part in
        self._reduced: set[int] = set()  # the parameters whose gradients the last reduce summed
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
        if self.ddp is not None:
            Join.notify_join_context(self)
        self.reduce(torch.tensor([id(param) in accumulated for param in self.params], dtype=torch.int32),
                    _gradient_of)
        for param in self.params:
            if id(param) in self._reduced:
                param.grad.div_(self.size)

    def reduce(self, used: torch.Tensor, gradient_of) -> None:
        """The average's collectives: which gradients any rank has, then the sum of each of those."""
        peers.check(force=True)  # a rank that failed issues none of these
        peers.wait(dist.all_reduce(used, group=self.group, async_op=True), "which expert-LoRA gradients exist")
        works, self._reduced = [], set()
        for param, anywhere in zip(self.params, used.tolist()):
            if anywhere:
                self._reduced.add(id(param))
                works.append(dist.all_reduce(gradient_of(param), group=self.group, async_op=True))
        for work in works:
            peers.wait(work, "the expert-LoRA gradient average")

    # Joinable: what a rank that has run out of inputs does while the others still train.
    def attach(self, ddp) -> None:
        self.ddp = ddp

    def join_hook(self, **kwargs) -> JoinHook:
        return _ShadowAverage(self)

    @property
    def join_device(self) -> torch.device:
        return self.ddp.join_device

    @property
    def join_process_group(self):
        return self.ddp.join_process_group


def _gradient_of(param: torch.Tensor) -> torch.Tensor:
    """The gradient buffer to sum into (zeros where this rank has none: another rank's layer)."""
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad


class _ShadowAverage(JoinHook):
    """Each iteration the other ranks still run, the average's collectives with no gradient of this rank's."""

    def __init__(self, average: _GradientAverage):
        self.average = average

    def main_hook(self) -> None:
        self.average.reduce(torch.zeros(len(self.average.params), dtype=torch.int32), torch.zeros_like)
