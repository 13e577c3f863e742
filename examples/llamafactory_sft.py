"""LLaMA-Factory's LoRA SFT recipe on a tiny Qwen3-MoE with ``KT_ENABLE=1``: the routed experts run in kt_patch.

Everything is built locally (no downloads): a random Qwen3-MoE checkpoint with a small BPE tokenizer trained on the
data, an alpaca-format data set with its ``dataset_info.json``, and LLaMA-Factory's SFT LoRA recipe as a YAML
(``finetuning_type: lora``, its default gradient checkpointing, a few steps on the CPU). It then runs

    KT_ENABLE=1 llamafactory-cli train <that yaml>

after the same run with ``KT_ENABLE=0``, and checks that kt_patch took the experts over (its log line), that every
logged loss is finite and the one of the run without kt_patch (to LLaMA-Factory's 4 logged decimals), and that the
adapter was saved; it prints the adapter's LoRA targets. Needs ``llamafactory`` installed beside kt_patch (README,
Versions).

    python examples/llamafactory_sft.py [--lora-target all] [--steps 4] [--output-dir DIR]

``--lora-target`` is LLaMA-Factory's ``lora_target``. Its ``all`` finds the modules whose class is a Linear, which
the fused routed experts are not; the per-expert names (``gate_proj,up_proj,down_proj``) reach the routed experts
with a PEFT that rewrites them to the fused parameters (0.19 and later). With a PEFT too old for LoRA on fused experts
as the kernel reads it, kt_patch refuses that at injection (exit status of the training run: non-zero, its message
printed).
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile

PROMPTS = ["Name a colour.", "Count to three.", "Say hello.", "Name an animal.", "Give a number.", "Name a fruit."]
ANSWERS = ["Blue is a colour.", "One, two, three.", "Hello there!", "A cat is an animal.", "Seven.", "An apple."]


def write_dataset(directory: str) -> None:
    rows = [{"instruction": p, "input": "", "output": a} for p, a in zip(PROMPTS * 4, ANSWERS * 4)]
    with open(os.path.join(directory, "tiny_sft.json"), "w") as f:
        json.dump(rows, f)
    with open(os.path.join(directory, "dataset_info.json"), "w") as f:
        json.dump({"tiny_sft": {"file_name": "tiny_sft.json"}}, f)


def build_model(path: str) -> None:
    """A random Qwen3-MoE (2 layers, 8 experts, top-2) and a byte-level BPE tokenizer trained on the data."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    texts = PROMPTS + ANSWERS + ["Human: ", "Assistant:", "\n"]
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                           eos_token="</s>")
    hf_tokenizer.save_pretrained(path)
    config = AutoConfig.for_model("qwen3_moe", vocab_size=len(hf_tokenizer), hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                  norm_topk_prob=True, max_position_embeddings=256, tie_word_embeddings=False,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


def write_recipe(path: str, model: str, data: str, output: str, lora_target: str, steps: int) -> None:
    """LLaMA-Factory's LoRA SFT example recipe (examples/train_lora/*_lora_sft.yaml) cut to a few CPU steps."""
    recipe = {
        "model_name_or_path": model, "trust_remote_code": True,
        "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_rank": 8, "lora_target": lora_target,
        "dataset": "tiny_sft", "dataset_dir": data, "template": "default", "cutoff_len": 64, "max_samples": 24,
        "overwrite_cache": True, "preprocessing_num_workers": 1, "dataloader_num_workers": 0,
        "output_dir": output, "logging_steps": 1, "save_steps": steps, "plot_loss": False,
        "overwrite_output_dir": True, "save_only_model": False, "report_to": "none",
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1.0e-3,
        "max_steps": steps, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "bf16": False,
        "ddp_timeout": 180000000,
    }
    with open(path, "w") as f:
        f.writelines(f"{key}: {json.dumps(value)}\n" for key, value in recipe.items())


class Run:
    def __init__(self, log: str):
        self.log = log
        # LLaMA-Factory logs each step's metrics as a dict: {'loss': 5.821, ...} (the value quoted by some versions)
        self.losses = [float(value) for value in re.findall(r"'loss': '?([-+0-9.eEinfa]+)'?", log)]


def train(recipe: str, output: str, kt_enable: str) -> Run:
    """``KT_ENABLE=<kt_enable> llamafactory-cli train <recipe>`` writing to ``output``; exits on a failed run."""
    with open(recipe) as f:
        text = re.sub(r"^output_dir: .*$", f"output_dir: {json.dumps(output)}", f.read(), flags=re.M)
    recipe = recipe.replace(".yaml", f"_kt_enable_{kt_enable}.yaml")
    with open(recipe, "w") as f:
        f.write(text)
    print(f"KT_ENABLE={kt_enable} llamafactory-cli train {recipe}", flush=True)
    env = {**os.environ, "KT_ENABLE": kt_enable, "KT_THREADS": os.environ.get("KT_THREADS", "1")}
    cli = os.path.join(os.path.dirname(sys.executable), "llamafactory-cli")
    run = subprocess.run([cli, "train", recipe], env=env, capture_output=True, text=True)
    log = run.stdout + run.stderr
    with open(output + ".log", "w") as f:
        f.write(log)
    if run.returncode != 0:
        refusal = re.search(r"^\w+Error: kt_patch: .*$", log, flags=re.M)  # kt_patch's refusal, else the log's end
        print(refusal.group(0) if refusal else log[-6000:])
        sys.exit(f"llamafactory-cli train failed (exit {run.returncode}); log: {output}.log")
    return Run(log)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora-target", default="all", help="LLaMA-Factory's lora_target (default: all)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--output-dir", help="where everything goes (default: a new temporary folder)")
    args = parser.parse_args()
    out = args.output_dir or tempfile.mkdtemp(prefix="kt_patch_llamafactory_")
    model, data, output = (os.path.join(out, name) for name in ("model", "data", "output"))
    os.makedirs(data, exist_ok=True)
    build_model(model)
    write_dataset(data)
    recipe = os.path.join(out, "sft_lora.yaml")
    write_recipe(recipe, model, data, output, args.lora_target, args.steps)
    stock = train(recipe, output + "_stock", kt_enable="0")
    patched = train(recipe, output, kt_enable="1")
    kt_line = re.search(r"kt_patch: patched .*", patched.log)
    adapter = os.path.join(output, "adapter_model.safetensors")
    problems = [message for failed, message in [
        (kt_line is None, "no 'kt_patch: patched' line: the experts were not taken over"),
        (len(patched.losses) != args.steps, f"{len(patched.losses)} losses logged for {args.steps} steps"),
        (not all(math.isfinite(loss) for loss in patched.losses), f"a loss is not finite: {patched.losses}"),
        (any(abs(a - b) > 2e-3 for a, b in zip(stock.losses, patched.losses)),
         f"losses {patched.losses} differ from the run without kt_patch {stock.losses}"),
        (not os.path.exists(adapter), f"no adapter at {adapter}")] if failed]
    if problems:
        print(patched.log[-6000:])
        sys.exit("; ".join(problems))
    from safetensors import safe_open

    with safe_open(adapter, "pt") as f:
        keys = list(f.keys())
    targets = sorted({re.sub(r"^.*layers\.\d+\.", "", key).split(".lora_")[0] for key in keys})
    print(kt_line.group(0))
    print(f"losses with kt_patch:    {', '.join(f'{loss:.4f}' for loss in patched.losses)}")
    print(f"losses without kt_patch: {', '.join(f'{loss:.4f}' for loss in stock.losses)}")
    print(f"adapter: {adapter} ({len(keys)} tensors; LoRA on {', '.join(targets)})")


if __name__ == "__main__":
    main()
