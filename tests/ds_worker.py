"""DeepSpeed LoRA runs of a tiny Qwen3-MoE (run by tests/test_deepspeed.py); this script never imports kt_patch.

    python ds_worker.py CHECKPOINT OUT plain CONFIGS      # CONFIGS: comma list of 0,1,2,3,3i (3i: zero.Init) with an
                                                          # optional "u" prefix: unpatched (no "kt_patch" block)
    torchrun / deepspeed --num_gpus 2 ds_worker.py ...    # two ranks, half the global batch each
    ... ds_worker.py CHECKPOINT OUT trainer               # HF Trainer(deepspeed=...) ZeRO-3 + zero.Init,
                                                          # gradient checkpointing, gradient accumulation 2

kt_patch is activated only by the config's "kt_patch" block (the start-up finder of kt_patch.pth). fp32; LoRA on
q/v and on the routed experts, every factor drawn at random so expert LoRA matters from the first step; a client
torch AdamW (no JIT-built DeepSpeed op); 3 steps with a global batch of 4 sequences. Rank 0 writes to OUT, per
config: the losses, the saved adapter (ZeRO-3: through the consolidated state dict, as Trainer.save_model does) and
what DeepSpeed did to the routed experts.
"""
import os
import sys

import torch
import torch.distributed as dist

import deepspeed
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig


def finish():
    """End without interpreter teardown (gloo threads vs teardown abort, see tests/ddp_worker.py)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


ARGV = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
checkpoint, out, mode = ARGV[:3]
deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
GLOBAL_BATCH = 4
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])


def ds_config(stage, patched, **extra):
    config = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
              "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage}, "steps_per_print": 1000,
              "gradient_clipping": 0.5, "wall_clock_breakdown": False}
    if patched:
        config["kt_patch"] = {"threads": 1}
    config.update(extra)
    return config


def random_adapter(model):
    draw = torch.Generator().manual_seed(11)  # the same adapter on every rank and in every run
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=draw) * 0.1)


def routed_expert_report(model):
    """What DeepSpeed did to the routed experts' parameters (the module under a KtMoeLayer)."""
    report = {"kt_layers": 0, "ds_params": 0, "placeholders": 0, "off_cpu": 0}
    for module in model.modules():
        if type(module).__name__ == "KtMoeLayer":
            report["kt_layers"] += 1
            for name, param in module._modules[module.family.experts].named_parameters():
                report["ds_params"] += hasattr(param, "ds_id")
                report["off_cpu"] += param.device.type != "cpu"
                report["placeholders"] += param.dim() > 0 and all(s == 0 for s in param.stride())
    return report


def run_plain(spec):
    patched = not spec.startswith("u")
    stage = int(spec.lstrip("u")[0])
    zero_init = spec.endswith("i")
    config = ds_config(stage, patched)
    # The config is live before the model is built (as TrainingArguments(deepspeed=...) makes it): its "kt_patch"
    # block enables kt_patch here; kept alive, it makes from_pretrained build under zero.Init (stage 3).
    live = HfDeepSpeedConfig(config)
    keep = live if zero_init else None
    del live
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(**LORA))
    random_adapter(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-2), config=config)
    batch = torch.randint(3, 128, (GLOBAL_BATCH, 24), generator=torch.Generator().manual_seed(7))
    mine = batch.chunk(world)[rank]
    losses = []
    for _ in range(3):
        loss = engine(input_ids=mine, labels=mine).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    report = routed_expert_report(model)
    adapter_dir = f"{out}.{spec}"
    if stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # a collective, as in Trainer.save_model
        if rank == 0:
            model.save_pretrained(adapter_dir, state_dict=state)
    elif rank == 0:
        model.save_pretrained(adapter_dir)
    dist.barrier()
    result = {"losses": losses, "report": report, "optimizer": type(engine.optimizer).__name__,
              "adapter": load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))}
    if stage == 3 and zero_init and patched:
        # PeftModel.from_pretrained under ZeRO-3 (zero.Init) loads the saved adapter back
        base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        loaded = PeftModel.from_pretrained(base, adapter_dir)
        loaded_state = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
        result["reloaded_keys"] = sorted(k.replace(".default", "") for k in loaded_state)
        result["reloaded_report"] = routed_expert_report(loaded)
        result["reloaded_experts"] = {k.replace(".default", ""): v.clone() for k, v in loaded_state.items()
                                      if ".experts." in k}
    del keep
    return result


results = {}
if mode == "plain":
    for spec in ARGV[3].split(","):
        results[spec] = run_plain(spec)
if rank == 0:
    torch.save(results, out)
finish()
