"""End to end: LoRA fine-tuning steps of a Qwen3-30B-A3B-shaped model (random bf16 weights) under kt_patch.

The model, adapter and loop are those of ``shared/bench/hf_baseline_gpu.py`` (the all-GPU HF + PEFT baseline), with
``kt_patch.enable()`` before the model is built: the model is built in host memory, its routed experts move into the
CPU kernel, and the rest goes to the GPU. Prints one JSON line: tokens/s, peak GPU memory, and the step time beside
the CPU expert time alone (the kernel's own wall time in the same steps, from its phase timer), which the SPEC wants
within 15 %:

    python benchmarks/e2e_qwen30b.py --layers 48 --qlen 2048 [--json FILE]

Needs about 64 GB of host memory at 48 layers (the experts' bf16 weights, once, in the kernel's layout). Drawing 30 B
normal values one by one takes the host many minutes, so while the model is built every ``normal_`` tiles one block
of N(0, 1) draws, shifted by a random offset per tensor (``--exact-init`` draws them all); the weights' values do not
change the kernel's speed.
"""
import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import time

import torch

import kt_patch


@contextlib.contextmanager
def tiled_normal_init(block_size=4_194_301):  # prime: a row of any shape here does not line up with the tiling
    block = torch.randn(block_size)
    draw = torch.Generator().manual_seed(0)
    original = torch.Tensor.normal_

    def normal_(tensor, mean=0.0, std=1.0, *, generator=None):
        if generator is not None or not tensor.is_contiguous() or tensor.numel() < block_size:
            return original(tensor, mean, std, generator=generator)
        shift = int(torch.randint(block_size, (), generator=draw))
        source = (block.roll(shift) * std + mean).to(tensor.dtype)
        flat, (full, rest) = tensor.view(-1), divmod(tensor.numel(), block_size)
        flat[:full * block_size].view(full, block_size).copy_(source.expand(full, block_size))
        flat[full * block_size:].copy_(source[:rest])
        return tensor

    torch.Tensor.normal_ = normal_
    try:
        yield
    finally:
        torch.Tensor.normal_ = original


def progress(message, start=time.perf_counter()):
    print(f"[{time.perf_counter() - start:7.1f} s] {message}", file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--qlen", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4, help="the first is warm-up and not counted")
    ap.add_argument("--experts-lora", type=int, default=1)
    ap.add_argument("--gc", type=int, default=1, help="non-reentrant gradient checkpointing")
    ap.add_argument("--exact-init", action="store_true", help="draw every weight (slow at 48 layers)")
    ap.add_argument("--executor", default="auto", help="kt_patch executor: auto, cpu, accelerator, hybrid")
    ap.add_argument("--gpu-expert-budget", default="auto", help="GiB for resident experts and stream buffers")
    ap.add_argument("--accelerator-fraction", type=float, default=None, help="force this share of each layer's "
                    "busiest experts onto the GPU (default: balanced on measured rates)")
    ap.add_argument("--expert-lora-placement", default="model", help="kt_patch option: model or host (the expert-LoRA "
                    "factors and their optimizer state out of GPU memory)")
    ap.add_argument("--baselines", default=None, metavar="DIR",
                    help="folder with fsdp2_offload_gpu.py and hf_baseline_gpu.py: run them before kt_patch, each in "
                         "its own process on the same model, and print one table with ratios")
    ap.add_argument("--profile", default=None, metavar="TRACE",
                    help="profile one more step, not counted, with torch.profiler: a Chrome trace to this file "
                         "(.json.gz) and the busiest operators on stderr")
    ap.add_argument("--planner-log", default=None, metavar="FILE", help="kt_patch's debug log (each layer's split "
                    "per step and the step costs it was chosen from) to this file")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first step is warm-up)")
    # the baselines first, while this process holds none of the host and GPU memory its own run takes
    baselines = run_baselines(args) if args.baselines else None
    kt_patch.enable(executor=args.executor, gpu_expert_budget=args.gpu_expert_budget,
                    accelerator_fraction=args.accelerator_fraction, expert_lora_placement=args.expert_lora_placement)
    if args.planner_log:
        handler = logging.FileHandler(args.planner_log, mode="w")
        handler.setLevel(logging.DEBUG)
        logging.getLogger("kt_patch").addHandler(handler)
        logging.getLogger("kt_patch").setLevel(logging.DEBUG)
        record_planner_inputs(args.planner_log + ".jsonl")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from kt_patch import _C

    _C.set_profiling(True)  # the kernel's own time per step

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = AutoConfig.for_model(
        "qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_experts=128, num_experts_per_tok=8, num_hidden_layers=args.layers, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, vocab_size=151936, max_position_embeddings=4096,
        norm_topk_prob=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    start = time.perf_counter()
    with contextlib.nullcontext() if args.exact_init else tiled_normal_init():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # host memory; patched when built
    build_s = time.perf_counter() - start
    progress(f"built and patched in {build_s:.1f} s: {model.kt_patch_summary}")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] + (
        ["gate_proj", "up_proj", "down_proj"] if args.experts_lora else [])
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    # everything but the routed experts (their LoRA factors too unless executor='cpu'), after the adapter is added,
    # as Trainer and accelerate move a model
    model.to(device)
    if args.gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    tiers = lambda: [m.accelerator for m in model.modules() if getattr(m, "accelerator", None) is not None]  # noqa

    def busy():  # seconds each side worked (and "rest": non-expert), over the steps whose measurements are in
        return {side: sum(t.busy_seconds[side] for t in tiers()) for side in ("cpu", "accelerator", "link", "rest")}

    step_s, expert_s, parts_s, losses, busy_s = [], [], [], [], [busy()]
    for step in range(args.steps + bool(args.profile)):
        ids = torch.randint(0, config.vocab_size, (1, args.qlen), device=device)
        sync()
        profiler = None
        if step == args.steps:
            profiler = torch.profiler.profile(with_stack=False, record_shapes=False)
            profiler.__enter__()
        _C.profile(True)
        marks = [time.perf_counter()]
        loss = model(input_ids=ids, labels=ids).loss
        sync()
        marks.append(time.perf_counter())
        loss.backward()
        sync()
        marks.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        marks.append(time.perf_counter())
        if profiler is not None:
            profiler.__exit__(None, None, None)
            profiler.export_chrome_trace(args.profile)
            for key in ("self_cpu_time_total", "self_device_time_total"):
                print(profiler.key_averages().table(sort_by=key, row_limit=25), file=sys.stderr)
            progress(f"profiled step: {marks[-1] - marks[0]:.2f} s (forward, backward, optimizer "
                     f"{[round(b - a, 3) for a, b in zip(marks, marks[1:])]})")
            break
        step_s.append(marks[-1] - marks[0])
        parts_s.append([round(b - a, 3) for a, b in zip(marks, marks[1:])])
        expert_s.append(sum(seconds for seconds, _ in _C.profile(True).values()))
        losses.append(loss.item())
        busy_s.append(busy())
        progress(f"step {step}: {step_s[-1]:.2f} s (forward, backward, optimizer {parts_s[-1]}), kernel "
                 f"{expert_s[-1]:.2f} s, loss {losses[-1]:.4f}")
    counted = slice(1, None)
    mean = lambda values: sum(values[counted]) / len(values[counted])  # noqa: E731
    result = {
        "layers": args.layers, "qlen": args.qlen, "executor": args.executor,
        "gpu_expert_budget": args.gpu_expert_budget, "accelerator_fraction": args.accelerator_fraction,
        "expert_lora_placement": args.expert_lora_placement,
        "experts_lora": args.experts_lora, "gc": args.gc,
        "trainable": sum(p.numel() for p in trainable), "build_s": round(build_s, 1),
        "step_s": [round(s, 3) for s in step_s], "forward_backward_optimizer_s": parts_s,
        "cpu_expert_s": [round(s, 3) for s in expert_s],
        "tok_s": round(args.qlen / mean(step_s), 1),
        "step_over_cpu_expert": round(mean(step_s) / mean(expert_s), 3) if mean(expert_s) else None,
        # a step's tier times are read when the next step is planned: step i's arrive with step i + 1
        "tier_busy_s": [{side: round(b[side] - a[side], 3) for side in a} for a, b in zip(busy_s[2:], busy_s[3:])],
        "loss": [round(v, 4) for v in losses],
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "kt_patch": str(model.base_model.model.kt_patch_summary),
    }
    result["planner"] = [  # every sixth layer: its split and fitted step costs (ms per unit, us per row)
        {"layer": t.kernel.name, "tier": t.tier_name, "on_accelerator": len(t.step_plan.experts) if t.step_plan else 0,
         **{side: None if not cost.known else [round(cost.per_unit * 1e3, 3), round(cost.per_row * 1e6, 3)]
            for side, cost in (("cpu", t.rates.cpu), ("accelerator", t.rates.accelerator), ("link", t.rates.link))}}
        for t in tiers()[::6]]
    if result["tier_busy_s"]:
        busiest = max(sum(step[side] for step in result["tier_busy_s"]) for side in ("cpu", "accelerator", "link"))
        result["step_over_busier_tier"] = round(mean(step_s) / (busiest / len(result["tier_busy_s"])), 3)
    print(json.dumps(result))
    if baselines is not None:
        result["baselines"] = baselines
        print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def record_planner_inputs(path: str) -> None:
    """Each balanced split's inputs and result, one JSON line each (to replay the planner off the machine)."""
    from kt_patch.executor import AcceleratorTier

    balanced_count = AcceleratorTier._balanced_count
    out = open(path, "w")

    def recorded(tier, sorted_counts):
        chosen, forecast = balanced_count(tier, sorted_counts)
        rates = tier.rates
        out.write(json.dumps({
            "layer": tier.kernel.name, "tier": tier.tier_name, "chosen": chosen, "counts": sorted_counts.tolist(),
            "forecast": forecast, "rest": rates.rest,
            **{side: [getattr(rates, side).per_unit, getattr(rates, side).per_row, rates.scale[side]]
               for side in ("cpu", "accelerator", "link") if getattr(rates, side).known}}) + "\n")
        out.flush()
        return chosen, forecast

    AcceleratorTier._balanced_count = recorded


def run_baselines(args) -> dict:
    """FSDP2 CPU offload and all-GPU HF+PEFT on the same model shape, each in its own process; their results."""
    common = ["--layers", str(args.layers), "--qlen", str(args.qlen), "--steps", str(args.steps),
              "--experts-lora", str(args.experts_lora)]
    commands = {
        "fsdp2_cpu_offload": ["torchrun", "--nproc_per_node", "1", os.path.join(args.baselines, "fsdp2_offload_gpu.py"),
                              *common],
        "all_gpu_hf_peft": [sys.executable, os.path.join(args.baselines, "hf_baseline_gpu.py"), *common,
                            "--gc", str(args.gc)],
    }
    results = {}
    for name, command in commands.items():
        run = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
        results[name] = json.loads(lines[-1]) if run.returncode == 0 and lines else {"error": run.stderr[-2000:]}
        progress(f"{name}: {results[name].get('tok_s', 'failed')} tok/s")
    return results


def print_table(result: dict) -> None:
    rows = [("kt_patch " + result["executor"], result)] + list(result["baselines"].items())
    print(f"{'system':24s} {'tok/s':>8s} {'peak GiB':>9s} {'kt_patch / it':>14s}")
    for name, row in rows:
        tok_s = row.get("tok_s")
        ratio = f"{result['tok_s'] / tok_s:.2f}x" if tok_s else "-"
        print(f"{name:24s} {tok_s or 'failed':>8} {row.get('peak_gib') or '-':>9} {ratio:>14s}")


if __name__ == "__main__":
    main()
