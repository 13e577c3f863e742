"""Which sparse-MoE blocks kt_patch knows how to replace: one declarative entry per family.

Every transformers 5.x family listed here has the same skeleton: a block whose router module returns
``(router_logits, routing_weights[T,k], expert_ids[T,k])`` for flattened tokens, an experts module holding the fused
``gate_up_proj`` / ``down_proj`` parameters, and optionally shared experts added to the routed output. An entry says
where those pieces live and what the block does around them; adding a family is adding one ``MoeFamily(...)``.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a model is looked at: the option check reads names() without it
    from torch import nn

SWIGLU = "swiglu"  # act(gate) * up with act = silu, gate rows first in gate_up_proj
GPT_OSS_SWIGLU = "gpt_oss_swiglu"  # interleaved gate/up, clamped, (up + 1) * gate * sigmoid(alpha * gate), biases
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")  # the fused routed-expert parameters of every family


@dataclasses.dataclass(frozen=True)
class MoeFamily:
    name: str  # the model_type of the reference model; also the name used by the `architectures` option
    block_class: str  # class name of the sparse-MoE block that is replaced
    router: str = "gate"  # attribute of the router module (called as a module: aux-loss hooks and PEFT see it)
    experts: str = "experts"  # attribute of the experts module holding gate_up_proj / down_proj
    shared_expert: str | None = None  # attribute of a dense MLP added to every token's output
    shared_expert_gate: str | None = None  # Linear(H, 1) whose sigmoid scales the shared expert output
    jitter_noise: bool = False  # the block multiplies its input by U(1-j, 1+j) in training (block.jitter_noise)
    returns_router_scores: bool = False  # the block returns (hidden_states, routing_weights)
    activation: str = SWIGLU
    # The oldest transformers release whose block is the one described here; older releases have a block of the same
    # class that computes otherwise (router outputs in another order, routing inside the block), left unpatched.
    min_transformers: str | None = None

    @property
    def expert_biases(self) -> tuple[str, ...]:
        """The experts module's bias parameters that the kernel computes with (copies of them)."""
        return ("gate_up_proj_bias", "down_proj_bias") if self.activation == GPT_OSS_SWIGLU else ()


FAMILIES: list[MoeFamily] = [
    MoeFamily("qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    MoeFamily("qwen2_moe", "Qwen2MoeSparseMoeBlock", shared_expert="shared_expert",
              shared_expert_gate="shared_expert_gate"),
    MoeFamily("qwen3_next", "Qwen3NextSparseMoeBlock", shared_expert="shared_expert",
              shared_expert_gate="shared_expert_gate"),
    MoeFamily("mixtral", "MixtralSparseMoeBlock", jitter_noise=True),
    MoeFamily("minimax", "MiniMaxSparseMoeBlock", jitter_noise=True),
    MoeFamily("deepseek_v2", "DeepseekV2Moe", shared_expert="shared_experts", min_transformers="5.13.0"),
    MoeFamily("deepseek_v3", "DeepseekV3MoE", shared_expert="shared_experts", min_transformers="5.13.0"),
    MoeFamily("glm4_moe", "Glm4MoeMoE", shared_expert="shared_experts", min_transformers="5.13.0"),
    MoeFamily("olmoe", "OlmoeSparseMoeBlock"),
    MoeFamily("gpt_oss", "GptOssMLP", router="router", returns_router_scores=True, activation=GPT_OSS_SWIGLU),
    MoeFamily("granitemoe", "GraniteMoeMoE", router="router", min_transformers="5.21.0"),
    MoeFamily("ernie4_5_moe", "Ernie4_5_MoeSparseMoeBlock", shared_expert="shared_experts",
              min_transformers="5.13.0"),
    MoeFamily("hunyuan_v1_moe", "HunYuanMoEV1Moe", shared_expert="shared_mlp", min_transformers="5.13.0"),
    MoeFamily("dots1", "Dots1MoE", shared_expert="shared_experts", min_transformers="5.13.0"),
    MoeFamily("glm4_moe_lite", "Glm4MoeLiteMoE", shared_expert="shared_experts", min_transformers="5.13.0"),
    MoeFamily("exaone_moe", "ExaoneMoeSparseMoEBlock", shared_expert="shared_experts", min_transformers="5.13.0"),
    MoeFamily("solar_open", "SolarOpenMoE", shared_expert="shared_experts", min_transformers="5.13.0"),
    MoeFamily("qwen3_5_moe", "Qwen3_5MoeSparseMoeBlock", shared_expert="shared_expert",
              shared_expert_gate="shared_expert_gate"),
    MoeFamily("flex_olmo", "FlexOlmoSparseMoeBlock"),
    MoeFamily("mellum", "MellumSparseMoeBlock"),
    MoeFamily("jamba", "JambaSparseMoeBlock", router="router", min_transformers="5.21.0"),
]

_BY_BLOCK_CLASS = {family.block_class: family for family in FAMILIES}


def kernel_arguments(experts: nn.Module, family: MoeFamily) -> dict:
    """What ExpertKernel needs beyond the two weights to compute this family's experts."""
    if family.activation == GPT_OSS_SWIGLU:
        return dict(activation=GPT_OSS_SWIGLU, alpha=experts.alpha, limit=experts.limit, transposed=True,
                    interleaved=True, gate_up_bias=experts.gate_up_proj_bias.detach(),
                    down_bias=experts.down_proj_bias.detach())
    return {}


def register(family: MoeFamily) -> None:
    """Add (or replace) a family; takes effect for models loaded afterwards."""
    FAMILIES[:] = [f for f in FAMILIES if f.block_class != family.block_class] + [family]
    _BY_BLOCK_CLASS[family.block_class] = family


def family_of(module: nn.Module) -> MoeFamily | None:
    return _BY_BLOCK_CLASS.get(type(module).__name__)


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module, MoeFamily]]:
    """``(name, block, family)`` of every known sparse-MoE block in ``model``, in module order."""
    return [(name, module, family) for name, module in model.named_modules()
            if (family := family_of(module)) is not None]


def names() -> list[str]:
    return [family.name for family in FAMILIES]


def transformers_too_old(family: MoeFamily) -> str | None:
    """Why the installed transformers is too old for this family's entry, or None when it is not."""
    import transformers
    from packaging.version import Version

    if family.min_transformers is None or Version(transformers.__version__) >= Version(family.min_transformers):
        return None
    return (f"{family.name} needs transformers >= {family.min_transformers} (installed: {transformers.__version__}, "
            f"whose {family.block_class} computes otherwise)")


def unsupported_reason(block: nn.Module, family: MoeFamily, activations: tuple[str, ...]) -> str | None:
    """Why the kernel cannot take this block's experts, or None when it can.

    ``activations`` are the activation variants the kernel implements. Checked for every block before anything is
    moved, so that a model is patched completely or not at all.
    """
    from torch import nn

    if (too_old := transformers_too_old(family)) is not None:
        return too_old
    if family.activation not in activations:
        return f"the kernel does not implement the {family.activation} expert activation of {family.name}"
    for attr in (family.router, family.experts, family.shared_expert, family.shared_expert_gate):
        if attr is not None and not isinstance(getattr(block, attr, None), nn.Module):
            return f"{type(block).__name__}.{attr} is missing"
    if next(block.parameters(recurse=False), None) is not None or next(block.buffers(recurse=False), None) is not None:
        return f"{type(block).__name__} holds its own parameters, which kt_patch does not know how to use"
    experts = getattr(block, family.experts)
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gate_up, nn.Parameter) or not isinstance(down, nn.Parameter):
        return f"{type(experts).__name__} has no fused gate_up_proj / down_proj parameters"
    if family.activation == GPT_OSS_SWIGLU:
        E, H, two_i = gate_up.shape if gate_up.dim() == 3 else (0, 0, 0)
        if not (getattr(experts, "is_transposed", False) and getattr(experts, "has_bias", False)):
            return f"{type(experts).__name__} is not stored transposed with biases, as GPT-OSS experts are"
        if down.shape != (E, two_i // 2, H) or getattr(experts, "gate_up_proj_bias", None) is None \
                or getattr(experts, "down_proj_bias", None) is None:
            return (f"{type(experts).__name__} has gate_up_proj {tuple(gate_up.shape)} and down_proj "
                    f"{tuple(down.shape)} (with biases), not [E, H, 2I] and [E, I, H]")
    if family.activation == SWIGLU:
        if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False):
            return f"{type(experts).__name__} stores transposed or biased experts"
        act = getattr(getattr(experts, "config", None), "hidden_act", "silu")
        if act not in ("silu", "swish"):
            return f"{type(experts).__name__} uses activation {act!r}; the kernel computes SwiGLU (silu)"
        if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != down.shape[0] \
                or gate_up.shape[1] != 2 * down.shape[2] or gate_up.shape[2] != down.shape[1]:
            return (f"{type(experts).__name__} has gate_up_proj {tuple(gate_up.shape)} and down_proj "
                    f"{tuple(down.shape)}, not [E, 2I, H] and [E, H, I]")
    if gate_up.dtype != down.dtype or str(gate_up.dtype) not in ("torch.bfloat16", "torch.float32"):
        return f"expert weights are {gate_up.dtype}; the kernel takes bfloat16 or float32"
    if gate_up.device.type == "meta":
        return "expert weights are on the meta device (not loaded yet)"
    return None
