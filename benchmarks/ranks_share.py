"""Several ranks sharing one host copy of the experts vs one rank with all the cores (SPEC §8, issue 18).

    python benchmarks/ranks_share.py [--qlens 128,512,2048] [--cores 2] [--iters 5] [--shape small]

One MoE layer forward + backward with LoRA r=8 (as ``python -m kt_patch bench``), bf16, a global batch of ``qlen``
tokens per step:

* ``1 rank x N cores``: one process, a kernel of N threads, all qlen tokens in one call;
* ``N ranks x 1 core``: N processes, each pinned to one core with a 1-thread kernel and qlen/N tokens, the weights in
  one shared-memory segment (local rank 0 packs it, the others map it read-only), all stepping together.

Tokens/s = qlen / (the slowest rank's median step time). Prints one line per qlen, both side by side.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time

SHAPES = {"small": (1024, 512, 32, 4), "qwen30b": (2048, 768, 128, 8)}


def rank_main(rank, ranks, cores, shape, qlen, iters, segment, barrier, results):
    os.sched_setaffinity(0, cores)
    import torch

    from kt_patch.bench import make_batch, make_layer
    from kt_patch.kernel import ExpertKernel, ExpertLora, LoraFactors

    torch.set_num_threads(1)
    H, I, E, k = SHAPES[shape]
    weights, lora_gu, lora_dn = make_layer(H, I, E)
    shared = {} if ranks == 1 else {"shared_weights": segment, "local_rank": rank, "local_world_size": ranks,
                                    "peer_timeout": 300.0}
    kernel = ExpertKernel(*weights, name="bench", threads=len(cores), **shared)
    lora = ExpertLora(LoraFactors(*lora_gu), LoraFactors(*lora_dn))
    x, ids, w, dy = make_batch(qlen // ranks, H, E, k, seed=rank)

    def step():
        _, ctx = kernel.forward(x, ids, w, lora, save_for_backward=True)
        kernel.backward(ctx, dy, ctx.new_lora_grads(zeroed=False), accumulate=False)

    step()  # warm-up: page faults of the activation cache, first touch of the shared pages
    times = []
    for _ in range(iters):
        barrier.wait()  # the ranks step together, as data-parallel ranks do
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    results[rank] = statistics.median(times)


def measure(ranks, cores_per_rank, shape, qlen, iters):
    context = multiprocessing.get_context("spawn")
    barrier, manager = context.Barrier(ranks), context.Manager()
    results = manager.dict()
    available = sorted(os.sched_getaffinity(0))
    segment = f"kt_patch.bench.{os.getpid()}.{qlen}"
    procs = [context.Process(target=rank_main, args=(rank, ranks, set(available[rank * cores_per_rank:
                                                                                (rank + 1) * cores_per_rank]),
                                                     shape, qlen, iters, segment, barrier, results))
             for rank in range(ranks)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"a rank failed (exit {proc.exitcode})")
    return qlen / max(results.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qlens", default="128,512,2048")
    parser.add_argument("--cores", type=int, default=2, help="N: cores used (and ranks in the shared run)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    args = parser.parse_args(argv)
    if len(os.sched_getaffinity(0)) < args.cores:
        raise SystemExit(f"needs {args.cores} CPUs in the affinity mask")
    N = args.cores
    print(f"shape {args.shape} (H, I, E, k = {SHAPES[args.shape]}), bf16, LoRA r=8, forward + backward")
    print(f"{'qlen':>6} | {f'1 rank x {N} cores':>18} | {f'{N} ranks x 1 core':>18} | ratio")
    for qlen in (int(q) for q in args.qlens.split(",")):
        one = measure(1, N, args.shape, qlen, args.iters)
        many = measure(N, 1, args.shape, qlen, args.iters)
        print(f"{qlen:>6} | {one:>14.0f} tok/s | {many:>14.0f} tok/s | {many / one:.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
