"""Tiny models of every supported MoE family, built from configs (no downloads).

Shared shape: hidden 64, 2 decoder layers, 4 heads / 2 kv heads of 16, 8 routed experts, top-2, expert
intermediate 32, vocab 128. Families with a dense first layer (DeepSeek, GLM4-MoE, Ernie) get 3 layers so two
are MoE. `build(name)` returns a randomly initialised model; `save(name, dir)` writes it with
`save_pretrained` so tests exercise the real `from_pretrained` path (checkpoint key conversion included).
"""
from __future__ import annotations

import os

import torch

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# model_type -> config overrides on top of COMMON. Expert count 8, top-2, expert intermediate 32 everywhere.
FAMILIES: dict[str, dict] = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    "qwen3_next": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48,
                       linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                       linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"]),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "minimax": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, block_size=16,
                    layer_types=["linear_attention", "full_attention"]),
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
                        topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=1.5),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8, n_group=2, topk_group=1,
                        routed_scaling_factor=2.5),
    "glm4_moe": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                     num_hidden_layers=3, first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=1.5),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"]),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "ernie4_5_moe": dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1,
                         num_hidden_layers=3, moe_layer_start_index=1),
    "hunyuan_v1_moe": dict(num_experts=8, moe_topk=2, moe_intermediate_size=32, num_shared_expert=1,
                           use_mixed_mlp_moe=True),
    # DeepSeek-V3 look-alikes and other families sharing the skeleton
    "dots1": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                  num_hidden_layers=3, first_k_dense_replace=1, n_group=2, topk_group=1),
    "glm4_moe_lite": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                          num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
                          qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8, n_group=2, topk_group=1),
    "exaone_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, num_shared_experts=1,
                       num_hidden_layers=3, first_k_dense_replace=1, n_group=2, topk_group=1),
    "solar_open": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                       n_group=2, topk_group=1),
    "qwen3_5_moe_text": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                             shared_expert_intermediate_size=48, linear_num_key_heads=2, linear_num_value_heads=4,
                             linear_key_head_dim=16, linear_value_head_dim=16,
                             layer_types=["linear_attention", "full_attention"]),
    "flex_olmo": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "mellum": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32),
    "jamba": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32, expert_layer_period=1,
                  expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_dt_rank=8,
                  use_mamba_kernels=False),
}


def family_name(model_type: str) -> str:
    """The registry name of a model_type (text halves of multimodal models share their parent's name)."""
    return model_type.removesuffix("_text")


def available(model_type: str) -> bool:
    """Whether the installed transformers has this model type (older releases lack the newer families)."""
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def too_old(model_type: str) -> str | None:
    """Why kt_patch leaves this family unpatched with the installed transformers (the registry's min_transformers),
    or None when it takes it over."""
    from kt_patch import registry

    return registry.transformers_too_old(next(f for f in registry.FAMILIES if f.name == family_name(model_type)))


def patchable() -> list[str]:
    """The model types that the installed transformers has and kt_patch takes over there."""
    return [model_type for model_type in FAMILIES if available(model_type) and too_old(model_type) is None]


def config(model_type: str, **overrides):
    from transformers import AutoConfig

    kwargs = {**COMMON, **FAMILIES[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def build(model_type: str, seed: int = 0, **overrides):
    """A randomly initialised causal-LM of the family; non-zero router correction biases where the family has them."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(model_type, **overrides))
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.rand_like(buffer) * 0.1)
    return model


def expert_layer_bytes() -> int:
    """Bytes of one tiny MoE layer's experts packed in the CPU kernel (the unit of the tests' GPU expert budgets)."""
    from kt_patch.executor import layer_bytes
    from kt_patch.kernel import ExpertKernel

    qwen3 = FAMILIES["qwen3_moe"]
    E, H, I = qwen3["num_experts"], COMMON["hidden_size"], qwen3["moe_intermediate_size"]
    return layer_bytes(ExpertKernel(torch.randn(E, 2 * I, H), torch.randn(E, H, I), threads=1))


def save(model_type: str, directory: str, seed: int = 0, **overrides) -> str:
    path = os.path.join(directory, model_type)
    build(model_type, seed=seed, **overrides).save_pretrained(path)
    return path


def checkpoints_fixture():
    """Session-scoped pytest fixture: a directory with the save_pretrained checkpoint of every family that the installed
    transformers has."""
    import pytest

    @pytest.fixture(scope="session")
    def checkpoints(tmp_path_factory):
        directory = str(tmp_path_factory.mktemp("tiny_checkpoints"))
        for model_type in filter(available, FAMILIES):
            save(model_type, directory)
        return directory

    return checkpoints


def lora_config(model_type: str, variant: str = "parameters"):
    """LoRA on attention output and on the routed experts, in the form a user of that family would write it.

    ``parameters``: explicit ``target_parameters``; ``names``: the per-expert names PEFT rewrites to fused parameters
    (gate/up/down or w1/w2/w3); ``all-linear``: PEFT's shorthand (also puts LoRA on the router); ``attention``: no
    LoRA on the routed experts (what a PEFT older than ``kt_patch.integrations.peft.PEFT_FOR_EXPERT_LORA`` can train
    under kt_patch).
    """
    from peft import LoraConfig

    if variant == "attention":
        return LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"])
    if variant == "all-linear":
        return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    if variant == "names":
        names = ["w1", "w2", "w3"] if model_type in ("mixtral", "minimax") else ["gate_proj", "up_proj", "down_proj"]
        return LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", *names])
    return LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"],
                      target_parameters=["experts.gate_up_proj", "experts.down_proj"])


def expert_lora_variant() -> str:
    """The ``lora_config`` variant that kt_patch trains with the installed PEFT: ``parameters`` (attention and routed
    experts), or ``attention`` where PEFT is older than the one kt_patch needs for expert LoRA (which it refuses)."""
    import peft
    from packaging.version import Version

    from kt_patch.integrations.peft import PEFT_FOR_EXPERT_LORA

    return "parameters" if Version(peft.__version__) >= Version(PEFT_FOR_EXPERT_LORA) else "attention"


def train(checkpoint: str, model_type: str, out_dir: str, *, dtype=torch.float32, steps: int = 10,
          variant: str = "parameters"):
    """Fine-tune LoRA with AdamW on fixed random tokens; saves the adapter and returns losses, the first step's LoRA
    gradients, the trained model's logits on fixed evaluation tokens and its number of kt_patch MoE layers.

    LoRA starts random (``init_lora_weights=False``) so that every factor, A included, has a gradient at the first
    step; later steps' gradients are not compared, since AdamW's first update moves elements whose gradient is near
    zero by about lr * sign(grad), which amplifies float rounding differences into visible ones."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = lora_config(model_type, variant)
    config.init_lora_weights = False
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = torch.Generator().manual_seed(1)
    losses, grads = [], {}
    for step in range(steps):
        ids = torch.randint(3, COMMON["vocab_size"], (2, 16), generator=data)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(out_dir)
    with torch.no_grad():
        logits = model(input_ids=evaluation_tokens()).logits.float()
    kt_layers = sum(type(module).__name__ == "KtMoeLayer" for module in model.modules())
    return {"losses": losses, "grads": grads, "logits": logits, "kt_layers": kt_layers}


def evaluation_tokens():
    return torch.randint(3, COMMON["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(2))


def main(argv=None):
    """``python tests/tiny_models.py OUT_DIR [--patched] [--bf16] [--variant V] TYPE...``: one process per run, so that
    patched and stock runs share nothing; writes OUT_DIR/<type>/{adapter files, result.pt}."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("model_types", nargs="+")
    parser.add_argument("--patched", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--variant", default="parameters")
    parser.add_argument("--checkpoints", required=True)
    args = parser.parse_args(argv)
    if args.patched:
        import kt_patch

        kt_patch.enable()
    for model_type in args.model_types:
        out = os.path.join(args.out_dir, model_type)
        result = train(os.path.join(args.checkpoints, model_type), model_type, out,
                       dtype=torch.bfloat16 if args.bf16 else torch.float32, variant=args.variant)
        torch.save(result, os.path.join(out, "result.pt"))


if __name__ == "__main__":
    main()
