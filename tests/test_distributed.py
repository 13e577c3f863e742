"""Data-parallel training under kt_patch: real torchrun, DDP on gloo, N processes against one (SPEC §8).

Each rank computes its own tokens; the routed experts' packed weights are one shared-memory segment for the host's
local ranks (packed by local rank 0, mapped read-only by the others). DDP must start on a patched model (the experts'
weight placeholders are kept out of its broadcast) and the expert-LoRA gradients are averaged, so that N processes
with a part of the batch each train exactly as one process with the whole batch. A rank that raises makes every rank
raise, and nothing stays in /dev/shm.
"""
import glob
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import tiny_models

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_worker.py")
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    tiny_models.save("qwen3_moe", str(directory))
    return os.path.join(str(directory), "qwen3_moe")


def segments():
    return set(glob.glob("/dev/shm/kt_patch.*"))


def launch(launcher, checkpoint, out, *flags, env=None, timeout=300):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KT_")}
    environment.update(env or {})
    return subprocess.run([sys.executable, *launcher, WORKER, checkpoint, str(out), *flags], env=environment,
                          capture_output=True, text=True, timeout=timeout)


def run_worker(launcher, checkpoint, out, *flags, env=None):
    before = segments()
    proc = launch(launcher, checkpoint, out, *flags, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert segments() <= before, f"left in /dev/shm: {segments() - before}"
    return torch.load(out)


_single_runs = {}


def single_run(checkpoint, tmp_path, flags):
    """The one-process run with the whole batch (the same for every split: it sums the parts)."""
    key = tuple(flag for flag in flags if flag != "--split" and "," not in flag)
    if key not in _single_runs:
        _single_runs[key] = run_worker([], checkpoint, tmp_path / "one.pt", *flags)
    return _single_runs[key]


def assert_same_training(one, many, tolerance):
    assert one["expert_grad_norms"] and all(norm > 0 for norm in one["expert_grad_norms"].values())
    torch.testing.assert_close(torch.tensor(many["losses"]), torch.tensor(one["losses"]), rtol=tolerance, atol=0)
    assert many["final"].keys() == one["final"].keys()
    for name, final in one["final"].items():
        moved = (final - one["initial"][name]).norm() / one["initial"][name].norm()
        assert moved > 1e-3, f"{name} did not train"
        difference = (many["final"][name] - final).norm() / final.norm()
        assert difference <= tolerance, f"{name}: N processes {difference:.2e} away from one"


@pytest.mark.parametrize("processes", [2, 3])
@pytest.mark.parametrize("flags", [
    (), ("--checkpointing",),
    pytest.param(("--cuda",), marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
], ids=["plain", "checkpointing", "cuda"])
def test_ddp_processes_train_as_one(checkpoint, tmp_path, flags, processes):
    """On the GPU the rest of the model is on cuda and the expert-LoRA factors in host memory: DDP alone refuses
    parameters on two device types. GPU reductions are not bit-reproducible, so the tolerance there is looser."""
    tolerance = 1e-4 if "--cuda" in flags else 1e-5
    one = single_run(checkpoint, tmp_path, flags)
    many = run_worker([*TORCHRUN, str(processes)], checkpoint, tmp_path / "many.pt", *flags)
    assert_same_training(one, many, tolerance)


def test_uneven_parts_and_a_rank_without_tokens(checkpoint, tmp_path):
    """3 ranks with 4, 2 and 0 rows of the batch: the last contributes nothing (a row at weight 0), yet takes part
    in every collective; the result is still the one-process run's."""
    one = single_run(checkpoint, tmp_path, ())
    many = run_worker([*TORCHRUN, "3"], checkpoint, tmp_path / "uneven.pt", "--split", "4,2,0")
    assert_same_training(one, many, 1e-5)


def test_uneven_inputs_under_ddp_join(checkpoint, tmp_path):
    """DDP.join(): the second rank runs out of batches a step early and shadows the expert-LoRA average's
    collectives; nobody waits, and the adapter is the one-process run's whose last step has the first rank's part
    only (DDP averages by the initial world size)."""
    one = run_worker([], checkpoint, tmp_path / "join_one.pt", "--join")
    many = run_worker([*TORCHRUN, "2"], checkpoint, tmp_path / "join_many.pt", "--join")
    for name, final in one["final"].items():
        difference = (many["final"][name] - final).norm() / final.norm()
        assert difference <= 1e-5, f"{name}: joined run {difference:.2e} away from one process"


def test_kernel_with_zero_tokens():
    from kt_patch.kernel import ExpertKernel

    kernel = ExpertKernel(torch.randn(4, 16, 32), torch.randn(4, 32, 8), threads=1)
    x = torch.zeros(0, 32)
    y, ctx = kernel.forward(x, torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2), save_for_backward=True)
    dx, dw = kernel.backward(ctx, torch.zeros(0, 32))
    assert y.shape == (0, 32) and dx.shape == (0, 32) and dw.shape == (0, 2)


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_rank_raising_makes_every_rank_raise(checkpoint, tmp_path, where):
    """Rank 1's kernel raises in the first step's forward (or backward) and stays alive until every rank wrote what
    it raised: the others must raise on their own (not be killed by the launcher), naming rank 1 and its error."""
    out = tmp_path / "fail.pt"
    before = segments()
    started = time.monotonic()
    proc = launch([*TORCHRUN, "2"], checkpoint, out, "--fail", f"1:{where}", timeout=50)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    errors = {rank: (tmp_path / f"fail.pt.rank{rank}.err").read_text() for rank in range(2)
              if (tmp_path / f"fail.pt.rank{rank}.err").exists()}
    assert set(errors) == {0, 1}, (errors, proc.stderr[-3000:])
    assert f"injected kernel failure in the {where} on rank 1" in errors[1]
    assert errors[0].startswith("PeerFailed") and "rank 1:" in errors[0] and "injected kernel failure" in errors[0]
    assert segments() <= before
    print(f"{where}: every rank raised; torchrun run took {elapsed:.1f} s; rank 0: {errors[0]}")


@pytest.fixture(scope="module")
def large_experts(tmp_path_factory):
    """2 MoE layers of 64 experts, hidden 256, expert intermediate 512: 201 MB of fp32 expert weights."""
    directory = tmp_path_factory.mktemp("large")
    tiny_models.save("qwen3_moe", str(directory), hidden_size=256, moe_intermediate_size=512, num_experts=64)
    return os.path.join(str(directory), "qwen3_moe")


def test_host_memory_holds_one_copy_of_the_experts(large_experts, tmp_path):
    """The sum over 2 ranks of their proportional set size (PSS) is about one copy of the expert weights more than
    the processes' own memory, not two: sharing saves one copy against share_weights=off; the segments' PSS adds up
    to one copy."""
    measured = {}
    for mode in ("auto", "off"):
        out = tmp_path / f"memory_{mode}"
        proc = launch([*TORCHRUN, "2"], large_experts, out, "--memory", env={"KT_SHARE_WEIGHTS": mode})
        assert proc.returncode == 0, proc.stderr[-4000:]
        measured[mode] = [json.loads((tmp_path / f"memory_{mode}.rank{rank}.mem").read_text()) for rank in range(2)]
    expert_bytes = measured["auto"][0]["expert_bytes"]
    assert expert_bytes > 150e6
    pss = {mode: sum(rank["pss"] for rank in ranks) for mode, ranks in measured.items()}
    segment = sum(rank["segment_pss"] for rank in measured["auto"])
    print(f"expert bytes {expert_bytes / 2**20:.0f} MiB; PSS sum over 2 ranks: shared {pss['auto'] / 2**20:.0f} "
          f"MiB, off {pss['off'] / 2**20:.0f} MiB; the segments' PSS {segment / 2**20:.0f} MiB")
    assert abs(segment - expert_bytes) <= 0.02 * expert_bytes
    assert sum(rank["segment_pss"] for rank in measured["off"]) == 0
    assert pss["off"] - pss["auto"] >= 0.9 * expert_bytes  # (N - 1) copies saved


def test_trainer_under_torchrun_trains_with_ddp_and_saves_a_peft_adapter(checkpoint, tmp_path):
    out = tmp_path / "adapter"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KT_")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           WORKER, checkpoint, str(out), "--trainer"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert torch.load(str(out) + ".pt") == {"wrapped": "DistributedDataParallel", "world": 2}
    from safetensors.torch import load_file

    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any(".experts." in key for key in adapter) and all(t.isfinite().all() for t in adapter.values())
