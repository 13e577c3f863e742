"""``python -m kt_patch doctor``: the machine report, and the memory plan of ``--model`` against the checkpoint."""
import math
import os
import re
import subprocess
import sys
import types

import pytest
import torch
from safetensors import safe_open

import tiny_models
import kt_patch
from kt_patch import doctor as doctor_module

FAMILIES = ["qwen3_moe", "deepseek_v3", "gpt_oss", "mixtral"]  # plain, dense first layer, biases, other layout


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    for model_type in FAMILIES:
        tiny_models.save(model_type, str(directory))
    return str(directory)


def doctor(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KT_")}
    return subprocess.run([sys.executable, "-m", "kt_patch", "doctor", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def checkpoint_bytes(directory):
    """(routed-expert bytes, other bytes) of a float32 checkpoint, from its safetensors files."""
    experts = other = 0
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "pt") as f:
                for key in f.keys():
                    nbytes = math.prod(f.get_slice(key).get_shape()) * 4
                    if ".experts." in key:
                        experts += nbytes
                    else:
                        other += nbytes
    return experts, other


@pytest.mark.parametrize("model_type", FAMILIES)
def test_doctor_memory_plan_matches_the_checkpoint(checkpoints, model_type):
    directory = os.path.join(checkpoints, model_type)
    run = doctor("--model", directory, "--dtype", "float32")
    assert run.returncode == 0, run.stderr[-3000:]
    for field in ("cpu", "isas available", "isa chosen", "threads", "versions"):
        assert re.search(rf"^  {field} +: \S", run.stdout, re.M), run.stdout
    kernel = int(re.search(r"host memory +: .*?\((\d+) bytes\)", run.stdout).group(1))
    accelerator = int(re.search(r"accelerator +: .*\((\d+) bytes\)", run.stdout).group(1))
    assert (kernel, accelerator) == checkpoint_bytes(directory)
    assert re.search(rf"model +: {model_type} \(\w+\), 2 MoE layers, 16 routed experts", run.stdout), run.stdout


def test_doctor_rejects_a_missing_model_clearly(tmp_path):
    run = doctor("--model", str(tmp_path / "nowhere"))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "no such checkpoint directory or config file" in run.stderr


def test_memory_plan_leaves_the_options_in_force(checkpoints):
    """The plan builds an unpatched meta model without disabling kt_patch for its caller."""
    in_force = kt_patch.enable(threads=1)
    try:
        plan = doctor_module.memory_plan(os.path.join(checkpoints, "qwen3_moe"), torch.float32, "transpose")
        assert plan["layers"] == 2 and kt_patch.current_options() is in_force
    finally:
        kt_patch.disable()


def test_doctor_warns_when_the_experts_exceed_the_memory(checkpoints, monkeypatch, capsys):
    directory = os.path.join(checkpoints, "qwen3_moe")
    expert_bytes, _ = checkpoint_bytes(directory)
    monkeypatch.setattr(doctor_module.psutil, "virtual_memory", lambda: types.SimpleNamespace(total=expert_bytes // 3))
    assert doctor_module.main(["--model", directory, "--dtype", "float32"]) == 0
    assert re.search(r"WARNING +: the routed experts need 3\.\dx this machine's memory", capsys.readouterr().out)


def test_help_lists_the_commands():
    run = subprocess.run([sys.executable, "-m", "kt_patch", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "bench" in run.stdout and "doctor" in run.stdout and "--model" in run.stdout
