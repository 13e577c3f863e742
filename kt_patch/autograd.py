"""The routed experts as one autograd node: forward and backward run in the C++ kernel.

Gradients come back the ordinary way: to the hidden states, to the routing weights (the exact
``dL/dw[t,j] = <dL/dy[t], expert_j(x[t])>``, so a trainable router learns) and to the LoRA factor tensors, which
torch's AccumulateGrad adds into ``.grad`` — so micro-batch accumulation, ``zero_grad``, clipping and any optimizer
behave as for any parameter. The kernel computes every gradient in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch

from .kernel import ExpertKernel

LoraTuple = Optional[tuple]  # (A, B, scaling) in PEFT ParamWrapper layout


class _ExpertFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel: ExpertKernel, x, topk_ids, topk_weights, gu_scaling, dn_scaling, gu_A, gu_B, dn_A, dn_B):
        kernel.set_lora(None if gu_A is None else (gu_A.detach(), gu_B.detach(), gu_scaling),
                        None if dn_A is None else (dn_A.detach(), dn_B.detach(), dn_scaling))
        needs_backward = any(ctx.needs_input_grad)
        x_cpu = x.detach().to("cpu", kernel.dtype if x.dtype not in (torch.float32, torch.bfloat16) else x.dtype)
        y, kctx = kernel.forward(x_cpu.contiguous(), topk_ids, topk_weights, save_for_backward=needs_backward)
        ctx.kernel, ctx.kctx = kernel, kctx
        ctx.x_meta = (x.device, x.dtype)
        ctx.w_meta = (topk_weights.device, topk_weights.dtype)
        ctx.lora_meta = [None if t is None else t.dtype for t in (gu_A, gu_B, dn_A, dn_B)]
        return y.to(x.device, x.dtype)

    @staticmethod
    def backward(ctx, dy):
        kctx, ctx.kctx = ctx.kctx, None  # the activations go now, not when the graph object is collected
        if kctx is None:
            raise RuntimeError(f"{ctx.kernel.name}: the expert activations were already used by a backward; "
                               "kt_patch expert nodes do not support retain_graph=True")
        grads = kctx.new_lora_grads()
        dx, dw = ctx.kernel.backward(kctx, dy.detach().to("cpu", kctx.dtype).contiguous(), grads)
        lora_out = []
        for key, dtype in zip(("gate_up_A", "gate_up_B", "down_A", "down_B"), ctx.lora_meta):
            lora_out.append(None if dtype is None else grads[key].to(dtype))
        return (None, dx.to(*ctx.x_meta), None, dw.to(*ctx.w_meta), None, None, *lora_out)


def expert_forward(kernel: ExpertKernel, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                   gate_up: LoraTuple = None, down: LoraTuple = None) -> torch.Tensor:
    """``y[T,H] = sum_j w[t,j] expert_{ids[t,j]}(x[t])`` on the kernel, differentiable in x, topk_weights and the
    LoRA factors. ``gate_up`` / ``down`` are ``(A, B, scaling)`` of PEFT's ParamWrapper on fused experts."""
    gu = gate_up or (None, None, 0.0)
    dn = down or (None, None, 0.0)
    return _ExpertFunction.apply(kernel, x, topk_ids, topk_weights, float(gu[2]), float(dn[2]), gu[0], gu[1], dn[0],
                                 dn[1])
