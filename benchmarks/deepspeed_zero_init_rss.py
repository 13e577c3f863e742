"""Host memory of building a patched model under DeepSpeed ZeRO-3 zero.Init (CPU accelerator, gloo).

    python benchmarks/deepspeed_zero_init_rss.py make DIR            # a Qwen3-MoE whose experts are ~400 MB (fp32)
    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node N benchmarks/deepspeed_zero_init_rss.py run DIR MODE

MODE: patched (the config's "kt_patch" block), unpatched (no block), or eager (block, no zero.Init). Each rank
prints its RSS before from_pretrained, its peak during it (ru_maxrss; the process had not been above that before)
and after it (and the anonymous part, before and after a gc), the routed experts' bytes, and what the host holds
after it (every rank's share of anonymous and shared memory, summed: the experts' shared segment counts once). kt_patch is activated by the block alone (no import here).
"""
import gc
import os
import resource
import sys

import torch


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def anonymous_mib():
    """The anonymous part of the RSS (not file pages such as the checkpoint's memory map)."""
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Anonymous:")) / 1024


def share_mib():
    """This process's proportional share of its anonymous and shared-memory pages (a /dev/shm segment mapped by the
    host's local ranks counts 1/ranks in each): summed over the ranks, the host's memory."""
    with open("/proc/self/smaps_rollup") as f:
        fields = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split()[-1] == "kB"}
    return (fields["Pss_Anon"] + fields["Pss_Shmem"]) / 1024


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make(directory):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3_moe", vocab_size=128, hidden_size=512, intermediate_size=256,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                  num_experts=64, num_experts_per_tok=2, moe_intermediate_size=512,
                                  max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)


def run(directory, mode):
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed(dist_backend="gloo")
    world = dist.get_world_size()
    config = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    if mode != "unpatched":
        config["kt_patch"] = {"threads": 1}
    live = HfDeepSpeedConfig(config)  # kept alive: from_pretrained builds under zero.Init (stage 3)
    if mode == "eager":
        del live
    before, peak_before, anonymous_before, share_before = rss_mib(), peak_mib(), anonymous_mib(), share_mib()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    peak, after, anonymous = peak_mib(), rss_mib(), anonymous_mib() - anonymous_before
    host = torch.tensor([share_mib() - share_before], dtype=torch.float64)
    dist.all_reduce(host)
    gc.collect()
    collected = anonymous_mib() - anonymous_before
    summary = getattr(model, "kt_patch_summary", None)
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n
                  and not hasattr(p, "ds_id")) if summary is None else summary.host_bytes
    if summary is None:  # unpatched: the whole expert size, from the ZeRO shapes
        experts = sum(p.ds_numel * p.element_size() if hasattr(p, "ds_id") else p.numel() * p.element_size()
                      for n, p in model.named_parameters() if ".experts." in n)
    line = (f"{mode} rank {dist.get_rank()}/{world}: RSS before {before:.0f} MiB, peak during from_pretrained "
            f"{peak:.0f} MiB (+{peak - before:.0f}; the process peak before it {peak_before:.0f}), after {after:.0f} "
            f"MiB (+{after - before:.0f}, of which anonymous +{anonymous:.0f}, +{collected:.0f} after gc.collect()); "
            f"routed experts {experts / 2**20:.0f} MiB; the host holds +{host.item():.0f} MiB (all ranks' anonymous "
            f"and shared memory)")
    for rank in range(world):
        dist.barrier()
        if rank == dist.get_rank():
            print(line, flush=True)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2])
    else:
        run(sys.argv[2], sys.argv[3])
