"""DeepSpeed LoRA runs of a tiny Qwen3-MoE (run by tests/test_deepspeed.py); this script never imports kt_patch.

    python ds_worker.py CHECKPOINT OUT SPECS             # SPECS: a comma list, run one after the other:
        0,1,2,3,3i        deepspeed.initialize loop at that ZeRO stage (3i: from_pretrained under zero.Init); a
                          "u" prefix: unpatched (no "kt_patch" block; those come first, before a block enables it)
        c2,c3,c3i         the same run interrupted: 2 steps, save_checkpoint, a fresh model and engine (other
                          adapter values), load_checkpoint, the third step
        trainer,utrainer  HF Trainer(TrainingArguments(deepspeed=...)) ZeRO-3 + zero.Init, gradient
                          checkpointing, gradient accumulation 2, max_grad_norm 1.0 (default), save_model
        refuse            offload_param, pipeline parallelism, fp16 with expert LoRA: the errors
        rss               host memory of from_pretrained under zero.Init (ZeRO-3, block) of CHECKPOINT's sibling
                          "_wide" model (experts of about 200 MB): anonymous RSS growth, peak, the experts' bytes
        accelerate        accelerate's Accelerator.prepare with the DeepSpeed plugin of `accelerate launch`
                          (the JSON file of ACCELERATE_DEEPSPEED_CONFIG_FILE, zero3_init_flag true)
    torchrun / deepspeed --num_gpus 2 / accelerate launch ... ds_worker.py ...   # two ranks, half the batch each

kt_patch is activated only by the config's "kt_patch" block (the start-up finder of kt_patch.pth). fp32; LoRA on
q/v and on the routed experts, every factor drawn at random so expert LoRA matters from the first step; a client
torch AdamW (no JIT-built DeepSpeed op); 3 steps with a global batch of 4 sequences. Rank 0 writes to OUT, per
spec: the losses, the saved adapter (ZeRO-3: through the consolidated state dict, as Trainer.save_model does) and
what DeepSpeed did to the routed experts.
"""
import os
import sys
import time

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
checkpoint, out, specs = ARGV[:3]
if "accelerate" not in specs:
    deepspeed.init_distributed(dist_backend="gloo")
else:  # accelerate's state starts the process group
    from accelerate import Accelerator

    accelerator = Accelerator()

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


def random_adapter(model, seed=11, scale=0.1):
    draw = torch.Generator().manual_seed(seed)  # the same adapter on every rank and in every run
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=draw) * scale)


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


def build(config, zero_init, seed=11):
    # The config is live before the model is built (as TrainingArguments(deepspeed=...) makes it): its "kt_patch"
    # block enables kt_patch here; kept alive, it makes from_pretrained build under zero.Init (stage 3).
    live = HfDeepSpeedConfig(config)
    keep = live if zero_init else None
    del live
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(**LORA))
    random_adapter(model, seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=1e-2), keep


def train(engine, steps, step_fn=None):
    batch = torch.randint(3, 128, (GLOBAL_BATCH, 24), generator=torch.Generator().manual_seed(7))
    mine = batch.chunk(world)[rank]
    losses = []
    for _ in range(steps):
        loss = engine(input_ids=mine, labels=mine).loss
        (step_fn or engine.backward)(loss)
        if step_fn is None:
            engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    return losses


def run_plain(spec):
    patched = not spec.startswith("u")
    stage = int(spec.lstrip("u")[0])
    zero_init = spec.endswith("i")
    config = ds_config(stage, patched)
    model, optimizer, keep = build(config, zero_init)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    losses = train(engine, 3)
    result = finish_run(spec, engine, model, stage, losses)
    if stage == 3 and zero_init and patched:
        # PeftModel.from_pretrained under ZeRO-3 (zero.Init) loads the saved adapter back
        base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        loaded = PeftModel.from_pretrained(base, f"{out}.{spec}")
        loaded_state = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
        result["reloaded_keys"] = sorted(k.replace(".default", "") for k in loaded_state)
        result["reloaded_report"] = routed_expert_report(loaded)
        result["reloaded_experts"] = {k.replace(".default", ""): v.clone() for k, v in loaded_state.items()
                                      if ".experts." in k}
    del keep
    return result


def finish_run(spec, engine, model, stage, losses):
    report = routed_expert_report(model)
    adapter_dir = f"{out}.{spec}"
    if stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # a collective, as in Trainer.save_model
        if rank == 0:
            model.save_pretrained(adapter_dir, state_dict=state)
    elif rank == 0:
        model.save_pretrained(adapter_dir)
    dist.barrier()
    return {"losses": losses, "report": report, "optimizer": type(engine.optimizer).__name__,
            "adapter": load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))}


def run_resumed(spec):
    """2 steps, save_checkpoint, then a fresh model and engine with other adapter values, load_checkpoint, step 3."""
    stage = int(spec[1])
    zero_init = spec.endswith("i")
    config = ds_config(stage, True)
    directory = f"{out}.{spec}.checkpoint"
    model, optimizer, keep = build(config, zero_init)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    losses = train(engine, 2)
    engine.save_checkpoint(directory, tag="two", client_state={"mine": 5})
    del engine, model, optimizer, keep
    model, optimizer, keep = build(config, zero_init, seed=12)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    path, client_state = engine.load_checkpoint(directory, tag="two")
    assert path is not None and client_state.get("mine") == 5, (path, client_state)
    assert not any(key.startswith("kt_patch") for key in client_state), client_state
    losses += train(engine, 1)
    result = finish_run(spec, engine, model, stage, losses)
    if rank == 0:
        name = next(n for n in sorted(os.listdir(os.path.join(directory, "two"))) if n.endswith("model_states.pt"))
        saved = torch.load(os.path.join(directory, "two", name), map_location="cpu", weights_only=False)
        module = saved.get("module") or {}
        result["checkpoint_expert_keys"] = sorted(k for k in module if ".experts." in k)
    del keep
    return result


def run_trainer(spec):
    """HF Trainer with TrainingArguments(deepspeed=dict): ZeRO-3 (from_pretrained under zero.Init), "auto" values
    filled by the Trainer, gradient checkpointing, gradient accumulation 2, max_grad_norm 1.0, linear schedule.
    rtrainer: a checkpoint at step 2 (Trainer's: adapter + DeepSpeed's save_checkpoint), then a fresh model (other
    adapter values) and Trainer resumed from it (DeepSpeed's load_checkpoint) for step 3."""
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 1000,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    if spec != "utrainer":
        config["kt_patch"] = {"threads": 1}
    arguments = TrainingArguments(output_dir=f"{out}.{spec}.run", deepspeed=config, use_cpu=True,
                                  per_device_train_batch_size=GLOBAL_BATCH // 2 // world, gradient_accumulation_steps=2,
                                  gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                                  learning_rate=1e-2, max_steps=3, logging_steps=1, save_steps=2,
                                  save_strategy="steps" if spec == "rtrainer" else "no",
                                  report_to=[], seed=5, disable_tqdm=True)
    data = torch.randint(3, 128, (3 * GLOBAL_BATCH, 24), generator=torch.Generator().manual_seed(9))
    dataset = [{"input_ids": row, "labels": row} for row in data]

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, *args, **kwargs):  # x20: gradient norms above max_grad_norm 1.0, the clip acts
            result = super().compute_loss(*args, **kwargs)
            return (result[0] * 20, result[1]) if isinstance(result, tuple) else result * 20

    def fresh(seed):
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)  # under zero.Init
        model = get_peft_model(model, LoraConfig(**LORA))
        random_adapter(model, seed)
        return model, InOrder(model=model, args=arguments, train_dataset=dataset)

    model, trainer = fresh(11)
    trainer.train()
    history = trainer.state.log_history
    if spec == "rtrainer":
        from accelerate.state import AcceleratorState

        del model, trainer
        AcceleratorState._reset_state()  # one Accelerator with a DeepSpeed plugin per state (as a new process has)
        model, trainer = fresh(12)
        trainer.train(resume_from_checkpoint=f"{out}.{spec}.run/checkpoint-2")
        history = history[:2] + [entry for entry in trainer.state.log_history if entry.get("step") == 3]
    trainer.save_model(f"{out}.{spec}")  # a collective under ZeRO-3
    dist.barrier()
    return {"losses": [entry["loss"] for entry in history if "loss" in entry],
            "grad_norms": [entry["grad_norm"] for entry in history if "grad_norm" in entry],
            "report": routed_expert_report(model), "engine": type(trainer.model_wrapped).__name__,
            "checkpointing": any(getattr(m, "gradient_checkpointing", False) for m in model.modules()),
            "adapter": load_file(os.path.join(f"{out}.{spec}", "adapter_model.safetensors"))}


def run_refused(spec):
    """Each unsupported DeepSpeed feature: the error deepspeed.initialize raises (None: it did not raise)."""
    errors = {}
    cases = {"offload_param": ds_config(3, True, zero_optimization={"stage": 3, "offload_param": {"device": "cpu"}}),
             "fp16": ds_config(2, True, fp16={"enabled": True}), "pipeline": ds_config(1, True)}
    for name, config in cases.items():
        model, optimizer, keep = build(config, False)
        if name == "pipeline":
            from deepspeed.pipe import PipelineModule

            model = PipelineModule(layers=list(model.base_model.model.model.layers), num_stages=1,
                                   loss_fn=torch.nn.MSELoss())
        try:
            deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            errors[name] = None
        except Exception as error:  # noqa: BLE001 - the test reads the type and message
            errors[name] = f"{type(error).__name__}: {error}"
    return errors


def run_rss(spec):
    """Host memory that from_pretrained under zero.Init leaves held: each rank's proportional share of its anonymous
    and shared-memory pages (the experts' /dev/shm segment shared by the local ranks counts once in the sum), summed
    over the ranks; and rank 0's own anonymous growth and peak."""
    import gc
    import resource

    def rollup():
        with open("/proc/self/smaps_rollup") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[-1] == "kB"}
        return fields["Pss_Anon"] + fields["Pss_Shmem"], fields["Anonymous"]

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    gc.collect()
    live = HfDeepSpeedConfig(ds_config(3, True))
    (share_before, anonymous_before), peak_before = rollup(), peak()
    model = AutoModelForCausalLM.from_pretrained(checkpoint + "_wide", dtype=torch.float32)
    share, anonymous = rollup()  # no gc.collect() here: what the patched model holds as from_pretrained returns
    host = torch.tensor([share - share_before], dtype=torch.float64)
    dist.all_reduce(host)
    del live
    return {"host": int(host.item()), "retained": anonymous - anonymous_before, "peak": peak() - peak_before,
            "experts": model.kt_patch_summary.host_bytes, "shared": model.kt_patch_summary.shared,
            "report": routed_expert_report(model)}


def run_accelerate(spec):
    """accelerate launch with a DeepSpeed plugin (the JSON file and zero3_init_flag from its config file): the
    model is built under the plugin's zero.Init, prepared with a client AdamW; same steps as the plain loop."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    zero_init = is_deepspeed_zero3_enabled()  # from_pretrained builds under zero.Init
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(**LORA))
    random_adapter(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer = accelerator.prepare(model, torch.optim.AdamW(trainable, lr=1e-2))

    def backward_and_step(loss):
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    losses = train(engine, 3, backward_and_step)
    result = finish_run(spec, engine, model, 3, losses)
    result["zero_init"] = zero_init
    return result


results = {}
for spec in specs.split(","):
    started = time.perf_counter()
    if spec in ("trainer", "utrainer", "rtrainer"):
        results[spec] = run_trainer(spec)
    elif spec == "refuse":
        results[spec] = run_refused(spec)
    elif spec == "rss":
        results[spec] = run_rss(spec)
    elif spec == "accelerate":
        results[spec] = run_accelerate(spec)
    elif spec.startswith("c"):
        results[spec] = run_resumed(spec)
    else:
        results[spec] = run_plain(spec)
    if rank == 0:
        print(f"ds_worker: {spec} took {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
if rank == 0:
    torch.save(results, out)
finish()
