"""The routed experts as one autograd node: forward and backward run in the C++ kernel.

Gradients come back the ordinary way: to the hidden states, to the routing weights (the exact
``dL/dw[t,j] = <dL/dy[t], expert_j(x[t])>``, so a trainable router learns) and to the LoRA factor tensors, which
torch's AccumulateGrad adds into ``.grad`` — so micro-batch accumulation, ``zero_grad``, clipping and any optimizer
behave as for any parameter. The kernel accumulates every gradient in fp32 (with bf16 weights, from bf16 operands,
as a bf16 GEMM does).

Activation checkpointing (the phase comes from :mod:`kt_patch.phase`), by ``policy`` (the ``checkpoint_policy``
option):

* ``recompute`` (default): the first forward of a checkpointed region keeps no activation cache; the recompute runs
  the experts again and keeps the cache for the backward. Least host memory; the experts run twice per step.
* ``retain``: the first forward keeps its cache and output in the checkpoint region; the recompute hands them back
  without running the experts. The experts run once per step; the caches of all checkpointed layers are alive
  between the forward and the backward.

Where the cache lives. Every node saves one small *token* tensor through autograd's saved tensors. With non-reentrant
checkpointing the backward runs on the first forward's node but reads the saved tensors of the recompute, so the
recompute's cache rides on its token; saving a token also makes an early-stopping recompute run up to this layer.
Outside checkpointing the cache is also held by the node itself. Either way it dies with the autograd graph (a
forward without backward, an exception mid-step) and is released as soon as the backward has used it.

LoRA dropout on routed experts does not arise: PEFT's ``ParamWrapper`` (the only LoRA PEFT puts on fused experts)
rejects ``lora_dropout != 0`` itself, so there is no mask to repeat across the first forward and the recompute.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from . import peers
from .executor import AcceleratorTier, TierPlan
from .kernel import NO_LORA, ExpertKernel, ExpertLora
from .phase import Phase, current_phase

_CACHE_ATTRIBUTE = "kt_activation_cache"


def _new_token(cache=None) -> torch.Tensor:
    token = torch.empty(0)
    setattr(token, _CACHE_ATTRIBUTE, cache)
    return token


class _ExpertFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel: ExpertKernel, plan: _Plan, lora: ExpertLora, x, topk_ids, topk_weights, gu_A, gu_B,
                dn_A, dn_B):
        peers.check()
        try:
            return _ExpertFunction._forward(ctx, kernel, plan, lora, x, topk_ids, topk_weights, gu_A, gu_B, dn_A,
                                            dn_B)
        except BaseException as error:
            peers.report(error, f"{kernel.name} forward")
            raise

    @staticmethod
    def _forward(ctx, kernel: ExpertKernel, plan: _Plan, lora: ExpertLora, x, topk_ids, topk_weights, gu_A, gu_B,
                 dn_A, dn_B):
        x_meta, w_meta = (x.device, x.dtype), (topk_weights.device, topk_weights.dtype)
        tiers = plan.tiers
        if plan.accelerator is not None:
            plan.accelerator.begin_experts(backward=plan.phase is Phase.RECOMPUTE)
        on_cpu = tiers is None or not tiers.everything  # else the CPU kernel has no expert and is not called
        kept = plan.kept_for_recompute(kernel, x.shape[0])
        if kept is None and on_cpu:
            x_cpu = kernel.host_tokens(x)
            kernel_ids = topk_ids if tiers is None else tiers.cpu_ids(topk_ids)
            pending = kernel.submit_forward(x_cpu, kernel_ids, topk_weights, plan.host_lora(lora),
                                            save_for_backward=plan.keeps_cache(any(ctx.needs_input_grad)))
        # the accelerator's experts run while the CPU kernel computes its own
        accelerated = None if tiers is None else plan.accelerator.forward(
            x, topk_ids, topk_weights, lora, tiers, for_backward=plan.phase is Phase.RECOMPUTE)
        if not on_cpu:
            y = kctx = None
        elif kept is not None:
            y, kctx = kept
        else:
            y, kctx = pending.wait()
            if plan.accelerator is not None:  # also where its plan gives the accelerator no expert
                plan.accelerator.record_cpu_time(pending.run_seconds, backward=plan.phase is Phase.RECOMPUTE)
            plan.ran_kernel()
        out = accelerated.to(x_meta[1]) if y is None else y.to(*x_meta, non_blocking=True)
        if plan.region is not None and plan.phase is Phase.FIRST_FORWARD:
            plan.region.keep(kernel, y, kctx)
            if kctx is not None and out.data_ptr() == y.data_ptr():
                out = out.clone()  # the output the region keeps must not be the tensor the model goes on with
            kctx = None  # owned by the region until the recompute takes it
        if accelerated is not None and y is not None:
            out = (out.float() + accelerated).to(x_meta[1])
        ctx.kernel, ctx.kctx, ctx.tiers, ctx.accelerator, ctx.lora = kernel, kctx, tiers, plan.accelerator, lora
        ctx.on_cpu = on_cpu
        token = _new_token(kctx if plan.phase is Phase.RECOMPUTE else None)
        ctx.save_for_backward(token, *((x, topk_ids, topk_weights) if tiers is not None else ()))
        ctx.x_meta, ctx.w_meta = x_meta, w_meta
        ctx.lora_meta = [None if t is None else (t.device, t.dtype) for t in (gu_A, gu_B, dn_A, dn_B)]
        if plan.accelerator is not None:
            plan.accelerator.end_experts(backward=plan.phase is Phase.RECOMPUTE)
        return out

    @staticmethod
    def backward(ctx, dy):
        peers.check()
        try:
            return _ExpertFunction._backward(ctx, dy)
        except BaseException as error:
            peers.report(error, f"{ctx.kernel.name} backward")
            raise

    @staticmethod
    def _backward(ctx, dy):
        token, *routed = ctx.saved_tensors  # under non-reentrant checkpointing this runs the recompute if not done
        # the activations go now, not when the graph object is collected
        kctx = ctx.kctx if ctx.kctx is not None else getattr(token, _CACHE_ATTRIBUTE, None)
        ctx.kctx = None
        setattr(token, _CACHE_ATTRIBUTE, None)
        if kctx is None and ctx.on_cpu:
            raise RuntimeError(f"{ctx.kernel.name}: no expert activations for this backward: they were already "
                               "used by a backward (kt_patch expert nodes do not support retain_graph=True), or a "
                               "checkpoint recompute did not run this layer")
        if ctx.accelerator is not None:
            ctx.accelerator.begin_experts(backward=True)
        if ctx.on_cpu:
            # written whole by the kernel; AccumulateGrad adds them up (pinned where they go on to a device)
            grads = kctx.new_lora_grads(zeroed=False, pinned=any(
                meta is not None and meta[0].type == "cuda" for meta in ctx.lora_meta))
            pending = ctx.kernel.submit_backward(kctx, ctx.kernel.host_tokens(dy, kctx.dtype), grads,
                                                 accumulate=False)
        accelerated = None
        if ctx.tiers is not None:  # the accelerator's backward runs while the CPU kernel computes its own
            accelerated = ctx.accelerator.backward(*routed, ctx.lora, ctx.tiers, dy)
        if ctx.on_cpu:
            dx, dw = pending.wait()
            dx, dw = dx.to(*ctx.x_meta, non_blocking=True), dw.to(*ctx.w_meta, non_blocking=True)
            if ctx.accelerator is not None:
                ctx.accelerator.record_cpu_time(pending.run_seconds, backward=True)
        if accelerated is not None:
            dx_accelerator, dw_accelerator, lora_grads = accelerated
            if ctx.on_cpu:
                dx = (dx.float() + dx_accelerator.float()).to(ctx.x_meta[1])
                dw = dw + dw_accelerator.to(dw)
                lora_grads(grads)
            else:
                dx, dw = dx_accelerator.to(*ctx.x_meta), dw_accelerator.to(*ctx.w_meta)
                grads = lora_grads()
        lora_out = []
        for key, meta in zip(("gate_up_A", "gate_up_B", "down_A", "down_B"), ctx.lora_meta):
            lora_out.append(None if meta is None else grads[key].to(*meta, non_blocking=meta[0].type == "cuda"))
        if ctx.accelerator is not None:
            ctx.accelerator.end_experts(backward=True)
        return (None, None, None, dx, None, dw, *lora_out)


class _Plan:
    """What one expert call does in its checkpointing phase (decided before autograd turns grad mode off)."""

    def __init__(self, phase: Phase, region, policy: str, on_kernel_run: Callable[[], None] | None,
                 accelerator: AcceleratorTier | None, tiers: TierPlan | None, inference: bool):
        self.phase, self.region, self.policy = phase, region, policy
        self.inference = inference  # a module in eval mode without autograd: no optimizer steps between such calls
        self._on_kernel_run = on_kernel_run
        self.accelerator, self.tiers = accelerator, tiers

    def keeps_cache(self, needs_backward: bool) -> bool:
        if self.phase is Phase.FIRST_FORWARD:
            # Only a region can hand a kept cache to the recompute; the reentrant first forward runs under no_grad,
            # so whether a backward will come is unknown here: the region's lifetime bounds what it keeps.
            return self.policy == "retain" and self.region is not None
        return needs_backward

    def kept_for_recompute(self, kernel, tokens: int):
        if self.phase is Phase.RECOMPUTE and self.region is not None:
            return self.region.take_kept(kernel, tokens)
        return None

    def host_lora(self, lora: ExpertLora) -> ExpertLora:
        """The factors as the CPU kernel reads them (host copies of factors on a device)."""
        return lora.on_host() if self.accelerator is None else self.accelerator.host_lora(lora, self.inference)

    def ran_kernel(self) -> None:
        if self._on_kernel_run is not None:
            self._on_kernel_run()


def expert_forward(kernel: ExpertKernel, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                   lora: ExpertLora = NO_LORA, *, policy: str = "recompute",
                   on_kernel_run: Callable[[], None] | None = None,
                   accelerator: AcceleratorTier | None = None, training: bool = True) -> torch.Tensor:
    """``y[T,H] = sum_j w[t,j] expert_{ids[t,j]}(x[t])`` on the kernel, differentiable in x, topk_weights and the
    LoRA factors of ``lora`` (PEFT's ParamWrapper factors on fused experts).

    ``policy`` is the checkpoint policy (``recompute`` or ``retain``); ``on_kernel_run`` is called each time the
    experts actually run in the kernel (not when a retained output is handed to a recompute). With ``accelerator``,
    the experts its plan chooses for this call run there instead (:mod:`kt_patch.executor`). ``training``: the
    calling module's mode (calls of a module in eval mode without autograd share the host copies of device factors).
    """
    phase, region = current_phase(kernel.name, policy)
    inference = phase is Phase.INFERENCE and not training
    tiers = None
    if accelerator is not None:
        accelerator.pin_factors(lora)
        tiers = accelerator.plan(topk_ids, first_forward=phase is not Phase.RECOMPUTE, inference=inference)
        tiers = tiers if tiers.any else None
    plan = _Plan(phase, region, policy, on_kernel_run, accelerator, tiers, inference=inference)
    factor_tensors = []  # autograd inputs, so that the factors receive their gradients
    for factors in (lora.gate_up, lora.down):
        factor_tensors += (None, None) if factors is None else (factors.A, factors.B)
    return _ExpertFunction.apply(kernel, plan, lora, x, topk_ids, topk_weights, *factor_tensors)
