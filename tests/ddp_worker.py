"""One process of a data-parallel LoRA run of a tiny Qwen3-MoE under kt_patch (run by tests/test_distributed.py).

    python ddp_worker.py CHECKPOINT OUT [--checkpointing]                    # one process, the whole batch
    torchrun --nproc_per_node 2 ddp_worker.py CHECKPOINT OUT [...]          # DDP on gloo, half the batch each
    torchrun --nproc_per_node 2 ddp_worker.py CHECKPOINT OUT --trainer      # HF Trainer picks DDP itself
    ... --cuda: the model (all but the routed experts) on the GPU; DDP still on gloo, every rank on cuda:0

Both minimise the mean of the two half-batches' losses: the one process sums them, DDP averages the ranks'
gradients. fp32; LoRA (all factors drawn at random, so the expert LoRA changes the outputs from the first step) on
q/v and on the routed experts; 3 AdamW steps. Rank 0 writes the per-step losses, the initial and final adapter and the
expert-LoRA gradient norms of the first step to OUT.
"""
import os
import sys

import torch
import torch.distributed as dist

import kt_patch

kt_patch.enable(threads=1)

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


checkpoint, out = sys.argv[1:3]
world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    dist.init_process_group("gloo")
rank = dist.get_rank() if world > 1 else 0

model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
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
batch = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(7)).to(device)
halves = batch.chunk(2)

losses, expert_grad_norms = [], {}
for step in range(3):
    if world > 1:
        loss = network(input_ids=halves[rank], labels=halves[rank]).loss
    else:
        loss = sum(model(input_ids=half, labels=half).loss for half in halves) / 2
    loss.backward()
    if step == 0:
        expert_grad_norms = {name: param.grad.norm().item() for name, param in trained.items() if "experts" in name}
    optimizer.step()
    optimizer.zero_grad()
    mean_loss = loss.detach().clone()
    if world > 1:
        dist.all_reduce(mean_loss)
        mean_loss /= world
    losses.append(mean_loss.item())

if rank == 0:
    torch.save({"losses": losses, "initial": {n: p.cpu() for n, p in initial.items()},
                "final": {n: p.detach().cpu() for n, p in trained.items()},
                "expert_grad_norms": expert_grad_norms}, out)
finish()
