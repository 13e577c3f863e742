"""Data-parallel training under kt_patch: real torchrun, DDP on gloo, two processes against one (SPEC §8).

Each rank holds its own kernel and computes its own tokens; DDP must start on a patched model (the experts' weight
placeholders are kept out of its broadcast) and average the expert-LoRA gradients, so that two processes with half
the batch each train exactly as one process with the whole batch.
"""
import os
import subprocess
import sys

import pytest
import torch

import tiny_models

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_worker.py")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    tiny_models.save("qwen3_moe", str(directory))
    return os.path.join(str(directory), "qwen3_moe")


def run_worker(launcher, checkpoint, out, *flags):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KT_")}
    proc = subprocess.run([sys.executable, *launcher, WORKER, checkpoint, str(out), *flags], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


@pytest.mark.parametrize("flags", [
    (), ("--checkpointing",),
    pytest.param(("--cuda",), marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
], ids=["plain", "checkpointing", "cuda"])
def test_ddp_two_processes_train_as_one(checkpoint, tmp_path, flags):
    """On the GPU the rest of the model is on cuda and the expert-LoRA factors in host memory: DDP alone refuses
    parameters on two device types. GPU reductions are not bit-reproducible, so the tolerance there is looser."""
    tolerance = 1e-4 if "--cuda" in flags else 1e-5
    one = run_worker([], checkpoint, tmp_path / "one.pt", *flags)
    two = run_worker(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], checkpoint,
                     tmp_path / "two.pt", *flags)
    assert one["expert_grad_norms"] and all(norm > 0 for norm in one["expert_grad_norms"].values())
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=tolerance, atol=0)
    assert two["final"].keys() == one["final"].keys()
    for name, final in one["final"].items():
        moved = (final - one["initial"][name]).norm() / one["initial"][name].norm()
        assert moved > 1e-3, f"{name} did not train"
        difference = (two["final"][name] - final).norm() / final.norm()
        assert difference <= tolerance, f"{name}: two processes {difference:.2e} away from one"


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
