"""One process of a data-parallel LoRA run of a tiny Qwen3-MoE under kt_patch (run by tests/test_distributed.py).

    python ddp_worker.py CHECKPOINT OUT [--checkpointing]                    # one process, the whole batch
    torchrun --nproc_per_node N ddp_worker.py CHECKPOINT OUT [...]          # DDP on gloo, a part of the batch each
    torchrun --nproc_per_node 2 ddp_worker.py CHECKPOINT OUT --trainer      # HF Trainer picks DDP itself
    ... --cuda: the model (all but the routed experts) on the GPU; DDP still on gloo, every rank on cuda:0
    ... --split 4,2,0: rows of the 6-row batch per rank (default: equal parts); a rank of 0 rows runs one row with
        loss weight 0 (stock transformers cannot run an empty batch), as DDP scripts do for a rank without data
    ... --fail RANK:forward|backward: that rank's first MoE kernel raises in the first step's forward or backward;
        every rank writes what it raised to OUT.rankR.err and exits 1 once every rank has written one
    ... --join: under DDP.join(), the last rank runs one step fewer (uneven inputs)
    ... --memory: load, patch, and write each rank's memory (smaps_rollup Pss, and the Pss of kt_patch's /dev/shm
        mappings) to OUT.rankR.mem while every rank is alive, then exit

Every run minimises the sum of the per-token losses over the whole batch divided by its token count: one process
sums its parts, DDP averages the ranks' gradients of (their part's sum) * world / tokens. fp32; LoRA (all factors
drawn at random, so the expert LoRA changes the outputs from the first step) on q/v and on the routed experts; 3
AdamW steps. Rank 0 writes the per-step losses, the initial and final adapter and the expert-LoRA gradient norms of
the first step to OUT.
"""
import contextlib
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import kt_patch

kt_patch.enable(threads=int(os.environ.get("WORKER_THREADS", "1")))

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def finish():
    """End the process without interpreter teardown. gloo's threads release finished collectives, whose tensors need
    the GIL, possibly after the main thread has started tearing the interpreter down; a thread asking for the GIL
    then aborts the process (a PyTorch race: SIGABRT after all work was done, seen here in about 1 of 15 runs)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def flag(name, default=None):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def memory():
    """This process's proportional set size, all of it and the part in kt_patch's shared segments (bytes)."""
    with open("/proc/self/smaps_rollup") as f:
        total = next(int(line.split()[1]) for line in f if line.startswith("Pss:")) * 1024
    shared, in_segment = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's first line
                in_segment = len(fields) >= 6 and fields[5].startswith("/dev/shm/kt_patch.")
            elif in_segment and fields[0] == "Pss:":
                shared += int(fields[1]) * 1024
    return {"pss": total, "segment_pss": shared}


def fail_everywhere(error):
    """Write what this rank raised, wait (bounded) until every rank has written its own, and exit 1."""
    with open(f"{out}.rank{rank}.err", "w") as f:
        f.write(f"{type(error).__name__}: {error}")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not all(os.path.exists(f"{out}.rank{r}.err") for r in range(world)):
        time.sleep(0.05)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


checkpoint, out = sys.argv[1:3]
world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    dist.init_process_group("gloo")
rank = dist.get_rank() if world > 1 else 0

model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
if "--memory" in sys.argv:
    dist.barrier()
    with open(f"{out}.rank{rank}.mem", "w") as f:
        json.dump({**memory(), "expert_bytes": model.kt_patch_summary.host_bytes}, f)
    dist.barrier()
    finish()
model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj",
                                                                                "up_proj", "down_proj"]))
draw = torch.Generator().manual_seed(11)  # the same adapter on every rank and in the one-process run
with torch.no_grad():
    for param in model.parameters():
        if param.requires_grad:
            param.copy_(torch.randn(param.shape, generator=draw) * 0.1)
device = torch.device("cuda" if "--cuda" in sys.argv else "cpu")
model.to(device)
if "--checkpointing" in sys.argv:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
if "--trainer" in sys.argv:
    from transformers import Trainer, TrainingArguments

    rows = [{"input_ids": row, "labels": row} for row in torch.randint(3, 128, (8, 24), generator=draw)]
    trainer = Trainer(model=model, train_dataset=rows, args=TrainingArguments(
        output_dir=out + ".trainer", max_steps=2, per_device_train_batch_size=2, use_cpu=True, report_to=[],
        save_strategy="no", disable_tqdm=True))
    trainer.train()
    if trainer.is_world_process_zero():
        trainer.save_model(out)  # the adapter, as a plain PEFT directory
        torch.save({"wrapped": type(trainer.model_wrapped).__name__, "world": trainer.args.world_size}, out + ".pt")
    finish()
trained = {name: param for name, param in model.named_parameters() if param.requires_grad}
initial = {name: param.detach().clone() for name, param in trained.items()}
network = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
optimizer = torch.optim.AdamW(trained.values(), lr=1e-2)
batch = torch.randint(3, 128, (6, 24), generator=torch.Generator().manual_seed(7)).to(device)
split = [int(n) for n in flag("--split", ",".join([str(6 // max(world, 2))] * max(world, 2))).split(",")]
parts = list(batch.split(split))
tokens = batch[:, 1:].numel()


def part_loss(module, rows, weight=1.0):
    """The sum of the per-token losses of ``rows``, times ``weight / tokens`` (a 0-row part: one row, weight 0)."""
    if rows.shape[0] == 0:
        rows, weight = batch[:1], 0.0
    logits = module(input_ids=rows).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), rows[:, 1:].reshape(-1),
                           reduction="sum") * (weight / tokens)


if flag("--fail") is not None:
    fail_rank, fail_where = flag("--fail").split(":")
    if rank == int(fail_rank):
        from kt_patch.layer import KtMoeLayer

        kernel = next(m for m in model.modules() if isinstance(m, KtMoeLayer)).kernel
        method = "submit_forward" if fail_where == "forward" else "submit_backward"

        def injected(*args, **kwargs):
            raise RuntimeError(f"injected kernel failure in the {fail_where} on rank {rank}")

        setattr(kernel, method, injected)

# --join: under DDP.join(), the last rank runs out of batches one step early; the one-process run's last step then
# takes the other ranks' parts only (DDP averages by the initial world size).
join = "--join" in sys.argv
steps = 3 - (1 if join and rank == world - 1 and world > 1 else 0)
losses, expert_grad_norms = [], {}
try:
    uneven = network.join() if join and world > 1 else contextlib.nullcontext()
    with uneven:
        for step in range(steps):
            if world > 1:
                loss = part_loss(network, parts[rank], weight=world)
            else:
                loss = sum(part_loss(model, part) for part in (parts[:-1] if join and step == 2 else parts))
            loss.backward()
            if step == 0:
                expert_grad_norms = {name: param.grad.norm().item() for name, param in trained.items()
                                     if "experts" in name}
            optimizer.step()
            optimizer.zero_grad()
            mean_loss = loss.detach().clone()
            if world > 1 and not join:
                dist.all_reduce(mean_loss)
                mean_loss /= world
            losses.append(mean_loss.item())
except Exception as error:
    if flag("--fail") is None:
        raise
    fail_everywhere(error)

if rank == 0:
    torch.save({"losses": losses, "initial": {n: p.cpu() for n, p in initial.items()},
                "final": {n: p.detach().cpu() for n, p in trained.items()},
                "expert_grad_norms": expert_grad_norms}, out)
finish()
