"""``python -m kt_patch bench``: one MoE layer forward + backward with expert LoRA, kt_patch beside references.

Backends, all on the same random bf16 weights and batches:
  kt_patch    the C++ kernel (this package), ``--threads`` pool threads
  torch_bf16  a PyTorch loop over experts in bf16 with autograd (the same algorithm as
              shared/bench/kt_anchor_bench.py), ``--threads`` torch threads
  kt_kernel   KTransformers' kt-kernel, run through shared/bench/kt_anchor_bench.py when ``kt_kernel`` imports

LoRA: ``target_modules=[gate_proj, up_proj, down_proj], r=8`` as PEFT applies it to fused experts: rank 16 on
gate_up (gate and up share A), rank 8 on down, alpha 16 — the same adapter capacity kt-kernel gets with rank 8 on
gate, up and down. FLOPs count base GEMMs only (forward 6HIk per token, backward dX the same), as the anchor does.
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
import time

import torch
import torch.nn.functional as F

SHAPES = {"qwen30b": (2048, 768, 128, 8), "small": (1024, 512, 32, 4)}  # hidden, intermediate, experts, top-k
BACKENDS = ("kt_patch", "torch_bf16", "kt_kernel")
RANK, ALPHA = 8, 16.0
ANCHOR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench", "kt_anchor_bench.py")


def make_layer(H, I, E, seed=1234):
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s, scale: (torch.randn(*s, generator=g) * scale).to(torch.bfloat16)
    weights = (rn(E, 2 * I, H, scale=H ** -0.5), rn(E, H, I, scale=I ** -0.5))
    r_gu = 2 * RANK  # PEFT fuses gate_proj + up_proj targets into gate_up_proj with rank 2r, alpha 2*alpha
    lora_gu = (rn(E * r_gu, H, scale=H ** -0.5).float(), rn(2 * I, E * r_gu, scale=0.05).float(), ALPHA / RANK)
    lora_dn = (rn(E * RANK, I, scale=I ** -0.5).float(), rn(H, E * RANK, scale=0.05).float(), ALPHA / RANK)
    return weights, lora_gu, lora_dn


def make_batch(T, H, E, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    top, ids = torch.topk(torch.softmax(torch.randn(T, E, generator=g), -1), k, dim=-1)
    dy = (torch.randn(T, H, generator=g) * 0.1).to(torch.bfloat16)
    return x, ids.contiguous(), (top / top.sum(-1, keepdim=True)).contiguous(), dy


def timed(step, min_time, min_iters=3, warmup=1):
    for _ in range(warmup):
        step()
    fwd, bwd, t0 = [], [], time.perf_counter()
    while len(fwd) < min_iters or time.perf_counter() - t0 < min_time:
        f, b = step()
        fwd.append(f)
        bwd.append(b)
    return statistics.median(fwd), statistics.median(bwd)


def run_kt_patch(weights, lora_gu, lora_dn, batches, threads, min_time, profile=False):
    from . import _C
    from .kernel import ExpertKernel

    kernel = ExpertKernel(*weights, name="bench", threads=threads)
    kernel.set_lora(lora_gu, lora_dn)
    out = {}
    for T, (x, ids, w, dy) in batches.items():
        def step():
            t0 = time.perf_counter()
            _, ctx = kernel.forward(x, ids, w, save_for_backward=True)
            t1 = time.perf_counter()
            kernel.backward(ctx, dy, ctx.new_lora_grads(zeroed=False), accumulate=False)  # as the autograd node
            return t1 - t0, time.perf_counter() - t1

        _C.profile(True)
        out[T] = timed(step, min_time)
        if profile:
            phases = _C.profile(True)
            total = sum(s for s, _ in phases.values())
            print(f"kt_patch qlen {T}: " + ", ".join(f"{name} {s / n * 1e3:.1f} ms ({100 * s / total:.0f}%)"
                                                   for name, (s, n) in sorted(phases.items())))
    return out, {"isa": kernel.isa, "backward_weights": kernel.backward_weights}


def torch_moe(x, ids, w, weights, lora_gu, lora_dn):
    gate_up, down = weights
    E, two_i, _ = gate_up.shape
    I, k = two_i // 2, ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()
    outs, toks, start = [], [], 0
    for e, c in enumerate(counts):
        if not c:
            continue
        sel = order[start:start + c]
        start += c
        tok = sel // k
        xe = x.index_select(0, tok)
        A, B, s = lora_gu
        r = A.shape[0] // E
        gu = xe @ gate_up[e].T + s * (xe @ A.view(E, r, -1)[e].T) @ B.view(-1, r, E)[:, :, e].T
        z = F.silu(gu[:, :I]) * gu[:, I:]
        A, B, s = lora_dn
        r = A.shape[0] // E
        o = z @ down[e].T + s * (z @ A.view(E, r, -1)[e].T) @ B.view(-1, r, E)[:, :, e].T
        outs.append(o * w.reshape(-1).index_select(0, sel).unsqueeze(1).to(o.dtype))
        toks.append(tok)
    return x.new_zeros(x.shape).index_add(0, torch.cat(toks), torch.cat(outs))


def run_torch(weights, lora_gu, lora_dn, batches, threads, min_time):
    torch.set_num_threads(threads)
    lgu = tuple(t.to(torch.bfloat16).requires_grad_(True) for t in lora_gu[:2]) + lora_gu[2:]
    ldn = tuple(t.to(torch.bfloat16).requires_grad_(True) for t in lora_dn[:2]) + lora_dn[2:]
    out = {}
    for T, (x0, ids, w0, dy) in batches.items():
        def step():
            for t in (*lgu[:2], *ldn[:2]):
                t.grad = None
            x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
            t0 = time.perf_counter()
            y = torch_moe(x, ids, w, weights, lgu, ldn)
            t1 = time.perf_counter()
            y.backward(dy)
            return t1 - t0, time.perf_counter() - t1

        out[T] = timed(step, min_time)
    return out


def run_kt_kernel(shape, qlens, threads, anchor):
    """kt-kernel through the shared anchor script (its own subprocess, its own LoRA layout: r=8 on gate/up/down)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kt.json")
        cmd = [sys.executable, anchor, "--shapes", shape, "--qlens", ",".join(map(str, qlens)),
               "--backends", f"kt:{threads}", "--no-validate", "--json", path, "--max-retries", "0"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        res = None
        if run.returncode == 0:
            with open(path) as f:
                res = json.load(f)["results"][shape].get(f"kt:{threads}")
    if not res:  # the anchor prints the worker's error; the other backends' results still stand
        print(f"kt_kernel: the anchor run failed (rc {run.returncode}):\n{run.stdout[-1500:]}{run.stderr[-1500:]}",
              file=sys.stderr)
        return None
    return {int(q): (res[str(q)]["fwd_s"], res[str(q)]["bwd_s"]) for q in qlens}


def machine():
    info = {"platform": platform.platform(), "cpu": platform.processor(), "cores": os.cpu_count(),
            "torch": torch.__version__}
    try:  # the first processor's entry; family/model tell CPU generations apart that share a model name
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        info["cpu"] = fields.get("model name", info["cpu"])
        info.update({f"cpu_{key.replace('cpu ', '')}": fields[key] for key in ("cpu family", "model", "stepping")
                     if key in fields})
    except OSError:
        pass
    from .kernel import supported_isas

    info["isas"] = supported_isas()
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m kt_patch bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="small,qwen30b", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--qlens", default="128,512,2048")
    ap.add_argument("--threads", type=int, default=None, help="default: the kt_patch threads option")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timed iterations per point")
    ap.add_argument("--anchor", default=ANCHOR, help="path of shared/bench/kt_anchor_bench.py (for kt_kernel)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--profile", action="store_true", help="print where kt_patch's time goes, per kernel phase")
    args = ap.parse_args(argv)
    from . import options

    if args.profile or os.environ.get("KT_PROFILE", "0") not in ("", "0"):
        from . import _C

        _C.set_profiling(True)
    threads = args.threads or options.resolve().threads
    shapes, backends = args.shapes.split(","), args.backends.split(",")
    for what, given, allowed in (("shape", shapes, SHAPES), ("backend", backends, BACKENDS)):
        if unknown := [g for g in given if g not in allowed]:
            ap.error(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)}")
    try:
        qlens = [int(q) for q in args.qlens.split(",")]
    except ValueError:
        ap.error(f"--qlens takes a comma list of integers, got {args.qlens!r}")
    if min(qlens) < 1:
        ap.error(f"--qlens must be >= 1, got {args.qlens!r}")
    shapes, backends, qlens = (list(dict.fromkeys(values)) for values in (shapes, backends, qlens))  # once each
    if "kt_kernel" in backends and not (importlib.util.find_spec("kt_kernel") and os.path.exists(args.anchor)):
        print("kt_kernel: not importable here (or anchor script missing); skipped", file=sys.stderr)
        backends.remove("kt_kernel")
        if not backends:
            sys.exit("nothing to run: kt_kernel was the only backend asked for")
    report = {"machine": machine(), "results": []}
    machine_info = report["machine"]
    print(f"machine: {machine_info['cpu']} (family {machine_info.get('cpu_family', '?')} model "
          f"{machine_info.get('cpu_model', '?')}), {machine_info['cores']} cpus, isas {machine_info['isas']}")
    for shape in shapes:
        H, I, E, k = SHAPES[shape]
        weights, lora_gu, lora_dn = make_layer(H, I, E)
        batches = {T: make_batch(T, H, E, k, seed=T) for T in qlens}
        timings, config = {}, None
        if "kt_patch" in backends:
            timings["kt_patch"], config = run_kt_patch(weights, lora_gu, lora_dn, batches, threads, args.min_time,
                                                       args.profile)
            report["kt_patch"] = config
        if "torch_bf16" in backends:
            timings["torch_bf16"] = run_torch(weights, lora_gu, lora_dn, batches, threads, args.min_time)
        if "kt_kernel" in backends:
            kt_kernel = run_kt_kernel(shape, qlens, threads, args.anchor)
            if kt_kernel:
                timings["kt_kernel"] = kt_kernel
        flop = 6 * H * I * k
        print(f"\nshape {shape}: H={H} I={I} E={E} k={k}, LoRA r={RANK} (gate_up {2 * RANK}), threads={threads}"
              + (f", kt_patch isa {config['isa']}, backward weights {config['backward_weights']}" if config else ""))
        print(f"{'backend':11s} {'qlen':>5s} {'fwd ms':>9s} {'bwd ms':>9s} {'tok/s':>8s} {'GFLOP/s':>8s} "
              + " ".join(f"{'x ' + b:>12s}" for b in timings if b != "kt_patch"))
        for T in qlens:
            for name, per in timings.items():
                fwd, bwd = per[T]
                tps = T / (fwd + bwd)
                ratios = " ".join(f"{per_T_ratio(timings, name, other, T):>12s}" for other in timings
                                  if other != "kt_patch")
                print(f"{name:11s} {T:5d} {fwd * 1e3:9.1f} {bwd * 1e3:9.1f} {tps:8.0f} "
                      f"{2 * flop * T / (fwd + bwd) / 1e9:8.1f} {ratios}")
                report["results"].append({"backend": name, "shape": shape, "qlen": T, "threads": threads,
                                          "fwd_ms": fwd * 1e3, "bwd_ms": bwd * 1e3, "tokens_per_s": tps})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nwrote {args.json}")


def per_T_ratio(timings, name, other, T):
    """Speed of `name` relative to `other` (tokens/s ratio); only shown on kt_patch rows."""
    if name != "kt_patch":
        return ""
    return f"{sum(timings[other][T]) / sum(timings[name][T]):.2f}x"
