"""Time per step and host memory of the checkpoint policies ``recompute`` and ``retain``, side by side.

The model is the example's tiny Qwen3-MoE (``examples/finetune_tiny_moe.py``: 4 layers, 16 experts of which 4
active, hidden 256), LoRA r=8 on attention and experts as in the example, HF activation checkpointing (non-reentrant),
AdamW, fp32 by default. Each configuration runs in its own interpreter, so that peak memory is its own; a run without checkpointing is
the reference row.

    python benchmarks/checkpoint_policies.py [--steps 12] [--batch 8] [--seq 256] [--dtype float32] [--threads N]

Columns: median seconds per optimizer step (after 2 warm-up steps); CPU expert runs per layer per step (the layer's
``expert_runs`` counter); expert activation caches alive between forward and backward
(``kt_patch.kernel.live_contexts()``); peak host RSS above the RSS before the first step, sampled every 2 ms.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGURATIONS = ("no checkpointing", "recompute", "retain")


def example_module():
    spec = importlib.util.spec_from_file_location("finetune_tiny_moe", os.path.join(REPO, "examples",
                                                                                    "finetune_tiny_moe.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PeakRss:
    """Highest RSS of this process seen by a sampling thread while inside the ``with`` block."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self._process, self._interval = psutil.Process(), interval
        self.peak = 0

    def __enter__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)


def run_configuration(configuration: str, base_path: str, args) -> dict:
    import psutil
    import torch

    import kt_patch
    from kt_patch.kernel import live_contexts
    from kt_patch.layer import KtMoeLayer

    kt_patch.enable(checkpoint_policy="recompute" if configuration == "no checkpointing" else configuration,
                    threads=args.threads, log_level="WARNING")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, args.dtype))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    if configuration != "no checkpointing":
        model.get_base_model().activation_checkpointing_enable()
    model.train()
    layers = [m for m in model.modules() if isinstance(m, KtMoeLayer)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    data = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, model.config.vocab_size, (args.batch, args.seq), generator=data)
               for _ in range(args.steps)]
    seconds, caches = [], []
    start_rss = psutil.Process().memory_info().rss
    with PeakRss() as peak:
        for ids in batches:
            begin = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            caches.append(live_contexts())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - begin)
    return {"configuration": configuration, "step_s": statistics.median(seconds[2:]),
            "expert_runs": sum(layer.expert_runs for layer in layers) / len(layers) / args.steps,
            "caches": max(caches), "peak_mib": (peak.peak - start_rss) / 2**20, "layers": len(layers),
            "isa": layers[0].kernel.isa, "threads": layers[0].kernel.threads}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=0, help="kernel threads (0: kt_patch's default)")
    parser.add_argument("--worker", choices=CONFIGURATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be at least 3 (2 warm-up steps are not timed)")
    if args.worker:
        print(json.dumps(run_configuration(args.worker, args.base, args)))
        return

    with tempfile.TemporaryDirectory() as directory:
        base_path = os.path.join(directory, "base")
        example_module().build_base_model(base_path)
        results = []
        for configuration in CONFIGURATIONS:
            command = [sys.executable, os.path.abspath(__file__), "--worker", configuration, "--base", base_path,
                       "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
                       "--dtype", args.dtype, "--threads", str(args.threads)]
            done = subprocess.run(command, check=True, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get(
                                      "PYTHONPATH", "")])})
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first = results[0]
    print(f"checkpoint policies: example Qwen3-MoE ({first['layers']} MoE layers), batch {args.batch} x {args.seq} "
          f"tokens, {args.dtype}, {args.steps} steps; {platform.processor() or platform.machine()}, kernel ISA "
          f"{first['isa']}, {first['threads']} threads")
    print(f"{'configuration':<18}{'s/step':>9}{'vs recompute':>14}{'expert runs/layer':>19}{'caches after fwd':>18}"
          f"{'peak RSS +MiB':>15}")
    recompute = next(r for r in results if r["configuration"] == "recompute")
    for r in results:
        print(f"{r['configuration']:<18}{r['step_s']:>9.3f}{r['step_s'] / recompute['step_s']:>13.2f}x"
              f"{r['expert_runs']:>19.1f}{r['caches']:>18d}{r['peak_mib']:>15.1f}")


if __name__ == "__main__":
    main()
