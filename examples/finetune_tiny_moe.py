"""Fine-tune a tiny Qwen3-MoE with HF Trainer + PEFT under kt_patch, then reload the adapter with plain PEFT.

Everything is built locally (no downloads). The training part is an ordinary HF/PEFT script plus the two kt_patch
lines; the routed experts and their LoRA run in the CPU kernel. At the end a separate interpreter, kt_patch not
enabled, loads the saved adapter into the stock model and must reproduce the patched model's logits.

    python examples/finetune_tiny_moe.py [--steps 30] [--output-dir DIR]
"""
import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time

import torch

RELOAD_WITHOUT_KT_PATCH = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, tokens, out = sys.argv[1:5]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
assert not any(type(m).__module__.startswith("kt_patch") for m in model.modules())  # the stock model
with torch.no_grad():
    torch.save(model(input_ids=torch.load(tokens)).logits, out)
"""


def build_base_model(path: str) -> None:
    """A small random Qwen3-MoE checkpoint: 4 layers, 16 experts of which 4 are active, hidden 256."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3_moe", vocab_size=512, hidden_size=256, intermediate_size=512,
                                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                                  num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128,
                                  norm_topk_prob=True, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


def training_rows(count: int, length: int, vocab: int):
    """Sequences that repeat a random 8-token motif, so the loss has something to learn."""
    data = torch.Generator().manual_seed(1)
    motifs = torch.randint(3, vocab, (count, 8), generator=data)
    ids = motifs.repeat(1, length // 8)
    return [{"input_ids": row, "labels": row} for row in ids]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--output-dir", help="where the checkpoint and the adapter go (default: a new temporary "
                                                 "folder, so that runs at the same time never share one)")
    args = parser.parse_args()
    out = args.output_dir or tempfile.mkdtemp(prefix="kt_patch_example_")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"writing to {out}")
    base_path, adapter_path = os.path.join(out, "base"), os.path.join(out, "adapter")
    build_base_model(base_path)

    import kt_patch

    kt_patch.enable()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    use_gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16 if use_gpu else torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.print_trainable_parameters()

    rows = training_rows(64, 128, model.config.vocab_size)
    training_args = TrainingArguments(output_dir=os.path.join(out, "trainer"), max_steps=args.steps,
                                      per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                      learning_rate=2e-3, logging_steps=10, report_to=[], save_strategy="no",
                                      use_cpu=not use_gpu, bf16=use_gpu, disable_tqdm=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=rows)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = args.steps * training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * 128
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {args.steps} steps; {tokens / seconds:.0f} tokens/s "
          f"({'GPU + ' if use_gpu else ''}CPU experts)")
    if use_gpu:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    model.save_pretrained(adapter_path)

    eval_tokens = torch.randint(3, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    tokens_file, logits_file = os.path.join(out, "eval_tokens.pt"), os.path.join(out, "stock_logits.pt")
    torch.save(eval_tokens, tokens_file)
    model.eval()
    with torch.no_grad():
        patched_logits = model(input_ids=eval_tokens.to(model.device)).logits.float().cpu()
    env = {k: v for k, v in os.environ.items() if k != "KT_ENABLE"}
    subprocess.run([sys.executable, "-c", RELOAD_WITHOUT_KT_PATCH, base_path, adapter_path, tokens_file, logits_file],
                   check=True, env=env)
    stock_logits = torch.load(logits_file).float()
    difference = (stock_logits - patched_logits).norm() / stock_logits.norm()
    match = difference < (2e-2 if use_gpu else 1e-4)
    print(f"plain PEFT reload (kt_patch not enabled): relative logits difference {difference:.2e} -> "
          f"{'match' if match else 'MISMATCH'}")
    if not match:
        sys.exit(1)


if __name__ == "__main__":
    main()
