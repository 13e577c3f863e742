"""DeepSpeed ZeRO 0, 1, 2, 3 and 3 with zero.Init on a patched model, activated only by the config's "kt_patch" block
(SPEC §3, §8): on the CPU accelerator, gloo, two torchrun processes against one, patched against unpatched.

One worker run covers several configs (DeepSpeed engines one after the other in one process), so the whole file
costs three launches. The first DeepSpeed run on a machine JIT-builds its shm comm op (about 35 s, cached in
~/.cache/torch_extensions); the configs use a client torch AdamW, so no optimizer op is built.
"""
import os
import subprocess
import sys

import pytest
import torch

import tiny_models

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[test]')")

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_worker.py")
CONFIGS = ["0", "1", "2", "3", "3i"]  # 3i: ZeRO-3 with from_pretrained under zero.Init


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    tiny_models.save("qwen3_moe", str(directory))
    return os.path.join(str(directory), "qwen3_moe")


def run_worker(launcher, checkpoint, out, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KT_")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", *launcher, WORKER,
                           checkpoint, str(out), *args], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return torch.load(out), proc.stderr


@pytest.fixture(scope="module")
def runs(checkpoint, tmp_path_factory):
    directory = tmp_path_factory.mktemp("ds")
    one, log = run_worker(["--nproc_per_node", "1"], checkpoint, directory / "one.pt", "plain",
                          ",".join(["u" + c for c in CONFIGS] + CONFIGS))
    two, _ = run_worker(["--nproc_per_node", "2"], checkpoint, directory / "two.pt", "plain", ",".join(CONFIGS))
    return one, two, log


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("config", CONFIGS)
def test_two_processes_train_as_one_and_as_unpatched_deepspeed(runs, config):
    """Losses and saved adapter of 2 patched ranks = 1 patched process = 1 unpatched DeepSpeed process (same global
    batch, fp32, gradient clipping on). Against unpatched the kernel's summation order differs from torch's: the
    adapter agrees to 5e-5 (its smallest tensors), the losses to 1e-5."""
    one, two, _ = runs
    patched, unpatched, pair = one[config], one["u" + config], two[config]
    for result in (patched, pair):
        assert result["report"] == {"kt_layers": 2, "ds_params": 0, "placeholders": 4, "off_cpu": 0}
    assert unpatched["report"]["kt_layers"] == 0
    assert patched["optimizer"] == unpatched["optimizer"]
    torch.testing.assert_close(torch.tensor(pair["losses"]), torch.tensor(patched["losses"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(patched["losses"]), torch.tensor(unpatched["losses"]), rtol=1e-5, atol=0)
    assert pair["adapter"].keys() == patched["adapter"].keys() == unpatched["adapter"].keys()
    assert any(".experts." in key for key in patched["adapter"])
    for key, value in unpatched["adapter"].items():
        assert relative(pair["adapter"][key], patched["adapter"][key]) <= 1e-5, key
        assert relative(patched["adapter"][key], value) <= 5e-5, key


def test_zero_init_adapter_reloads_under_zero3(runs):
    one, _, log = runs
    result = one["3i"]
    assert result["reloaded_report"] == {"kt_layers": 2, "ds_params": 0, "placeholders": 4, "off_cpu": 0}
    for key, value in result["reloaded_experts"].items():
        torch.testing.assert_close(value, result["adapter"][key], rtol=0, atol=0)
    assert "kt_patch: patched" in log  # activated by the block alone: the worker never imports kt_patch


def test_block_errors():
    from kt_patch import options
    from kt_patch.integrations.deepspeed import configure_from_config

    with pytest.raises(options.OptionError, match="threads.*auto"):
        configure_from_config({"kt_patch": {"threads": "auto"}})
    with pytest.raises(options.OptionError, match=r"unknown kt_patch option\(s\) \['thread'\].*threads"):
        configure_from_config({"kt_patch": {"thread": 2}})
    with pytest.raises(options.OptionError, match="isa.*amx_bf16"):
        configure_from_config({"kt_patch": {"isa": "sse"}})
    assert options.deepspeed_block() is None and options.current() is None


def test_block_precedence(monkeypatch):
    import kt_patch
    from kt_patch import options
    from kt_patch.integrations.deepspeed import configure_from_config

    monkeypatch.setenv("KT_CHECKPOINT_POLICY", "retain")
    try:
        kt_patch.enable(threads=3)
        configure_from_config({"kt_patch": {"threads": 2, "checkpoint_policy": "recompute", "log_level": "WARNING"}})
        resolved = kt_patch.current_options()
        assert (resolved.threads, resolved.checkpoint_policy, resolved.log_level) == (3, "retain", "WARNING")
    finally:
        kt_patch.disable()
        options.set_deepspeed_block(None)
        options.set_requested({})
