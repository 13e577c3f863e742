"""Replace every known sparse-MoE block of a built model by a KtMoeLayer, or leave the model untouched."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging

from torch import nn

from . import registry, shared_weights
from .executor import GpuExpertBudget, SharedRates
from .kernel import ACTIVATIONS, ExpertKernel
from .layer import KtMoeLayer, LoraExperts
from .options import Options
from .registry import EXPERT_WEIGHTS

logger = logging.getLogger("kt_patch")


@dataclasses.dataclass
class PatchSummary:
    families: list[str]
    layers: int
    experts: int
    host_bytes: int
    isa: str
    threads: int
    split: str = ""
    shared: str = ""

    def __str__(self) -> str:
        return (f"{', '.join(self.families)}: {self.layers} MoE layers, {self.experts} routed experts moved to the CPU "
                f"kernel ({self.host_bytes / 2**30:.3f} GiB of host memory{self.shared}), ISA {self.isa}, "
                f"{self.threads} threads; {self.split}")


def patch_model(model: nn.Module, options: Options) -> PatchSummary | None:
    """Patch ``model`` in place; returns the summary, or None when the model was left as it is (with a log line)."""
    model_name = type(model).__name__
    if isinstance(getattr(model, "kt_patch_summary", None), PatchSummary):
        return model.kt_patch_summary
    blocks = registry.moe_blocks(model)
    if not blocks:
        logger.info("kt_patch: %s has no known sparse-MoE block; left untouched (known families: %s)",
                    model_name, ", ".join(registry.names()))
        return None
    if "all" not in options.architectures:
        skipped = sorted({family.name for _, _, family in blocks} - set(options.architectures))
        if skipped:
            logger.info("kt_patch: %s left untouched: family %s not in the 'architectures' option %s",
                        model_name, ", ".join(skipped), list(options.architectures))
            return None

    for name, block, family in blocks:
        # ZeRO-3: the check reads the whole shapes; a block without the experts module is the check's to report
        with _gathered(getattr(block, family.experts, None)):
            reason = registry.unsupported_reason(block, family, ACTIVATIONS)
        if reason is not None:
            logger.warning("kt_patch: %s left untouched: %s (at %s)", model_name, reason, name)
            return None

    zero3 = any(hasattr(param, "ds_id") for _, block, family in blocks
                for param in getattr(block, family.experts).parameters(recurse=False))
    summary = _replace_blocks(model, blocks, options)
    if zero3:
        # ZeRO-3 parameters are reference cycles (DeepSpeed's closures over them): the experts' partitions, no longer
        # referenced, go now rather than at some later collection (measured: 1/world of the experts per rank)
        gc.collect()
    model.kt_patch_summary = summary
    logger.info("kt_patch: patched %s - %s", model_name, summary)
    return summary


def _replace_blocks(model, blocks, options: Options) -> PatchSummary:
    """Move each block's experts into a kernel and swap in its KtMoeLayer; on any failure undo all swaps."""
    from transformers.utils.logging import tqdm

    swapped = []
    # the model's layers share one budget and their measured rates
    gpu_budget, shared_rates = GpuExpertBudget(options.gpu_expert_budget), SharedRates()
    summary = PatchSummary(sorted({family.name for _, _, family in blocks}), 0, 0, 0, "", options.threads,
                           _split_description(options))
    try:
        for name, block, family in tqdm(blocks, desc="kt_patch: moving experts to the CPU kernel", leave=False,
                                        disable=not logger.isEnabledFor(logging.INFO)):  # log_level hides it too
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            experts = getattr(block, family.experts)
            with _gathered(experts):  # ZeRO-3 partitioned (zero.Init): whole for the copy into the kernel
                kernel = ExpertKernel(*(getattr(experts, w).detach().to("cpu") for w in EXPERT_WEIGHTS), name=name,
                                      isa=options.isa, threads=options.threads,
                                      backward_weights=options.backward_weights,
                                      **shared_weights.kernel_arguments(name, options),
                                      **registry.kernel_arguments(experts, family))
                layer = KtMoeLayer(block, family, kernel, checkpoint_policy=options.checkpoint_policy,
                                   executor=options.executor, gpu_budget=gpu_budget, shared_rates=shared_rates,
                                   accelerator_fraction=options.accelerator_fraction,
                                   expert_lora_on_host=options.expert_lora_placement == "host",
                                   lora_experts=_lora_experts(block, family, kernel, options))
            frozen = [p for p in experts.parameters() if p.requires_grad]
            swapped.append((parent, child_name, block, layer, frozen))
            for param in frozen:  # the kernel computes with frozen copies (GPT-OSS biases too)
                param.requires_grad_(False)
            setattr(parent, child_name, layer)
            summary.layers += 1
            summary.experts += kernel.num_experts
            summary.host_bytes += kernel.weight_bytes
            summary.isa, summary.threads = kernel.isa, kernel.threads
            if kernel.shared_name:
                rank, size = kernel.spec.local_rank, kernel.spec.local_world_size
                summary.shared = (f", one copy for the host's {size} local ranks in /dev/shm, "
                                  f"{'packed by' if rank == 0 else 'mapped read-only from'} local rank 0")
    except BaseException:
        for parent, child_name, block, layer, frozen in reversed(swapped):
            layer.release_expert_weights()
            for param in frozen:
                param.requires_grad_(True)
            setattr(parent, child_name, block)
        raise
    return summary


def _gathered(experts: nn.Module | None):
    """DeepSpeed ZeRO-3 parameters of a routed-experts module (built under ``zero.Init``) gathered for the block's
    take-over; they are replaced by placeholders inside, so no partitioned parameter is left for them."""
    if experts is None or not any(hasattr(param, "ds_id") for param in experts.parameters(recurse=False)):
        return contextlib.nullcontext()
    import deepspeed  # only for DeepSpeed's parameters

    # modifier_rank=None: every rank reads the whole weights (one layer at a time), none writes them back
    return deepspeed.zero.GatheredParameters(list(experts.parameters(recurse=False)), modifier_rank=None)


def _lora_experts(block, family, kernel, options: Options) -> LoraExperts | None:
    if not options.lora_experts:
        return None
    router_weight = next(getattr(block, family.router).parameters())
    return LoraExperts(options.lora_experts, kernel.hidden_size, options.lora_expert_intermediate_size,
                       device=router_weight.device)


def _split_description(options: Options) -> str:
    """How the routed experts are split between the tiers, for the summary line."""
    forced = (f"{options.accelerator_fraction:.0%} of each layer's busiest experts forced onto the accelerator"
              if options.accelerator_fraction is not None else "split per call so that both sides finish together")
    budget = options.gpu_expert_budget
    budget = "auto" if budget == "auto" else f"{budget:g} GiB"
    if options.executor == "cpu":
        return "executor cpu: every expert in the CPU kernel"
    if options.executor == "accelerator":
        return f"executor accelerator: every expert on the model's device (resident within {budget}, else streamed)"
    where = "when the model is on an accelerator, " if options.executor == "auto" else ""
    return (f"executor {options.executor}: {where}experts on the accelerator (resident within {budget}, else "
            f"streamed) and in the CPU kernel, {forced}")
