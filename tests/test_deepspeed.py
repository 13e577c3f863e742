"""DeepSpeed ZeRO 0, 1, 2, 3 and 3 with zero.Init on a patched model, activated only by the config's "kt_patch" block
(SPEC §3, §8): on the CPU accelerator, gloo, two processes against one, patched against unpatched; HF Trainer,
save_checkpoint / load_checkpoint, the refused features; launched by torchrun, the deepspeed launcher and
accelerate launch.

One worker run covers several specs (DeepSpeed engines one after the other in one process), so the whole file
costs four launches. The first DeepSpeed run in an environment JIT-builds its shm comm op (about 35 s, cached in
<venv>/torch_extensions); the configs use a client torch AdamW, so no optimizer op is built.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import tiny_models

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[test]')")

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_worker.py")
CONFIGS = ["0", "1", "2", "3", "3i"]  # 3i: ZeRO-3 with from_pretrained under zero.Init
# one process: the unpatched runs (u*) first, before a block enables kt_patch in it
ONE = ["u" + c for c in CONFIGS] + ["utrainer"] + CONFIGS + ["trainer", "rtrainer", "c0", "c3", "refuse"]
TWO = CONFIGS + ["trainer"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    tiny_models.save("qwen3_moe", str(directory))
    # the worker's "rss" spec: experts of 2 x 32 x 3 x 512 x 512 fp32 = 192 MiB
    tiny_models.build("qwen3_moe", hidden_size=512, num_experts=32, moe_intermediate_size=512).save_pretrained(
        os.path.join(str(directory), "qwen3_moe_wide"))
    return os.path.join(str(directory), "qwen3_moe")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_worker(launcher, checkpoint, out, specs):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KT_")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    # DeepSpeed JIT-builds its shm comm op under a lock file; one build killed midway leaves the lock and every later
    # build waits on it forever, so the op is built per environment rather than in the user's shared cache
    env["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # the deepspeed launcher's
    proc = subprocess.run([sys.executable, "-m", *launcher, WORKER, checkpoint, str(out), ",".join(specs)], env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-6000:] + proc.stdout[-3000:]
    return torch.load(out, weights_only=False), proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def runs(checkpoint, tmp_path_factory):
    directory = tmp_path_factory.mktemp("ds")
    one, log = run_worker(["torch.distributed.run", "--standalone", "--nproc_per_node", "1"], checkpoint,
                          directory / "one.pt", ONE)
    two, _ = run_worker(["torch.distributed.run", "--standalone", "--nproc_per_node", "2"], checkpoint,
                        directory / "two.pt", TWO)
    return one, two, log


@pytest.fixture(scope="module")
def deepspeed_launcher(checkpoint, tmp_path_factory):
    """The deepspeed launcher, two ranks: interrupted runs (save_checkpoint, fresh engine, load_checkpoint)."""
    directory = tmp_path_factory.mktemp("dsl")
    return run_worker(["deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port())],
                      checkpoint, directory / "out.pt", ["rss", "c2", "c3i"])


@pytest.fixture(scope="module")
def accelerate_launch(checkpoint, tmp_path_factory):
    """accelerate launch with a DeepSpeed plugin: the JSON file (with the block) and zero3_init_flag."""
    directory = tmp_path_factory.mktemp("acc")
    json_file, yaml_file = directory / "ds.json", directory / "accelerate.yaml"
    json_file.write_text(json.dumps({
        "train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3}, "steps_per_print": 1000, "gradient_clipping": 0.5,
        "kt_patch": {"threads": 1}}))
    yaml_file.write_text("\n".join([
        "compute_environment: LOCAL_MACHINE", "distributed_type: DEEPSPEED", "deepspeed_config:",
        f"  deepspeed_config_file: {json_file}", "  zero3_init_flag: true", "num_processes: 2", "num_machines: 1",
        "machine_rank: 0", "use_cpu: true", "rdzv_backend: static", "same_network: true", ""]))
    return run_worker(["accelerate.commands.launch", "--config_file", str(yaml_file), "--main_process_port",
                       str(free_port())], checkpoint, directory / "out.pt", ["accelerate"])


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def assert_same_adapter(result, reference, tolerance):
    assert result["adapter"].keys() == reference["adapter"].keys()
    for key, value in reference["adapter"].items():
        assert relative(result["adapter"][key], value) <= tolerance, key


UNTOUCHED = {"kt_layers": 2, "ds_params": 0, "placeholders": 4, "off_cpu": 0}


@pytest.mark.parametrize("config", CONFIGS)
def test_two_processes_train_as_one_and_as_unpatched_deepspeed(runs, config):
    """Losses and saved adapter of 2 patched ranks = 1 patched process = 1 unpatched DeepSpeed process (same global
    batch, fp32, gradient clipping on). Against unpatched the kernel's summation order differs from torch's: the
    adapter agrees to 5e-5 (its smallest tensors), the losses to 1e-5."""
    one, two, _ = runs
    patched, unpatched, pair = one[config], one["u" + config], two[config]
    for result in (patched, pair):
        assert result["report"] == UNTOUCHED
    assert unpatched["report"]["kt_layers"] == 0
    assert patched["optimizer"] == unpatched["optimizer"]
    torch.testing.assert_close(torch.tensor(pair["losses"]), torch.tensor(patched["losses"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(patched["losses"]), torch.tensor(unpatched["losses"]), rtol=1e-5, atol=0)
    assert pair["adapter"].keys() == patched["adapter"].keys() == unpatched["adapter"].keys()
    assert any(".experts." in key for key in patched["adapter"])
    for key, value in unpatched["adapter"].items():
        assert relative(pair["adapter"][key], patched["adapter"][key]) <= 1e-5, key
        assert relative(patched["adapter"][key], value) <= 5e-5, key


def test_hf_trainer_with_deepspeed(runs):
    """Trainer(args=TrainingArguments(deepspeed=...)): ZeRO-3 with zero.Init, "auto" values, gradient checkpointing,
    gradient accumulation 2, max_grad_norm 1.0 acting (norms above it): 2 ranks = 1 process = unpatched, the logged
    grad_norm included (the clip norm combines DeepSpeed's gradients and the expert LoRA's)."""
    one, two, _ = runs
    patched, unpatched, pair = one["trainer"], one["utrainer"], two["trainer"]
    assert patched["report"] == pair["report"] == UNTOUCHED and unpatched["report"]["kt_layers"] == 0
    assert patched["engine"] == "DeepSpeedEngine" and len(patched["losses"]) == 3 and patched["checkpointing"]
    assert min(unpatched["grad_norms"]) > 1.0  # the clip acts at every step
    for key in ("losses", "grad_norms"):
        torch.testing.assert_close(torch.tensor(patched[key]), torch.tensor(unpatched[key]), rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.tensor(pair[key]), torch.tensor(patched[key]), rtol=1e-5, atol=0)
    assert any(".experts." in key for key in patched["adapter"])
    assert_same_adapter(pair, patched, 1e-5)
    assert_same_adapter(patched, unpatched, 5e-5)


def test_hf_trainer_resumes_from_its_deepspeed_checkpoint(runs):
    """Trainer checkpoint at step 2 (save_strategy steps: DeepSpeed's save_checkpoint inside), a fresh model with
    other adapter values and a new Trainer with resume_from_checkpoint (DeepSpeed's load_checkpoint): step 3's loss,
    grad_norm and the final adapter are the uninterrupted run's."""
    one, _, _ = runs
    resumed, uninterrupted = one["rtrainer"], one["trainer"]
    for key in ("losses", "grad_norms"):
        torch.testing.assert_close(torch.tensor(resumed[key]), torch.tensor(uninterrupted[key]), rtol=1e-5, atol=0)
    assert_same_adapter(resumed, uninterrupted, 1e-5)


@pytest.mark.parametrize("spec", ["c0", "c3", "c2", "c3i"])
def test_checkpoint_resume_equals_uninterrupted(runs, deepspeed_launcher, spec):
    """save_checkpoint after 2 steps, a fresh model and engine (other adapter values), load_checkpoint, step 3: the
    losses and adapter of the uninterrupted 1-process run (the companion optimizer's Adam state came back; without it
    the expert LoRA differs by 8%). c2 and c3i: two ranks started by the deepspeed launcher. The model states file
    holds no routed-expert entry (they are detached while DeepSpeed saves)."""
    one, _, _ = runs
    result = one[spec] if spec in one else deepspeed_launcher[0][spec]
    reference = one[spec[1:]]
    assert result["report"] == UNTOUCHED
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)
    assert_same_adapter(result, reference, 1e-5)
    assert result["checkpoint_expert_keys"] == []


def test_deepspeed_launcher_block_alone(deepspeed_launcher):
    assert deepspeed_launcher[1].count("kt_patch: patched") >= 4  # 2 ranks x 2 models, the worker never imports it


def test_zero_init_host_memory_near_the_experts(deepspeed_launcher):
    """from_pretrained under zero.Init, 2 ranks on one host (the CPU accelerator: ZeRO's partitions are host memory
    too): what the host holds once it returns, the ranks' shares of anonymous and shared memory summed, is one copy of
    the experts (the local ranks share the kernel's packed weights) and the small rest, not also the ranks' ZeRO
    partitions of them (held by DeepSpeed's reference cycles until a gc collection). The peak is rank 0's checkpoint
    loading by transformers (the same without kt_patch); printed, not checked."""
    result = deepspeed_launcher[0]["rss"]
    experts = result["experts"]
    assert experts >= 190 * 2**20 and result["report"] == UNTOUCHED
    assert "one copy for the host's 2 local ranks" in result["shared"]
    print(f"experts {experts / 2**20:.0f} MiB; held by the host {result['host'] / 2**20:.0f} MiB; rank 0: anonymous "
          f"{result['retained'] / 2**20:.0f} MiB, peak growth {result['peak'] / 2**20:.0f} MiB")
    assert result["host"] <= experts * 1.1 + 2 * 48 * 2**20, result


def test_accelerate_launch_with_deepspeed_plugin(runs, accelerate_launch):
    """accelerate launch, DeepSpeed plugin from its config file (JSON with the block, zero3_init_flag): the model
    built under zero.Init and prepared by accelerate trains as the 1-process plain ZeRO-3 + zero.Init loop."""
    one, _, _ = runs
    result, log = accelerate_launch
    result = result["accelerate"]
    assert result["zero_init"] and result["report"] == UNTOUCHED
    assert result["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
    assert log.count("kt_patch: patched") == 2
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(one["3i"]["losses"]), rtol=1e-5, atol=0)
    assert_same_adapter(result, one["3i"], 1e-5)


def test_unsupported_features_refused_at_initialize(runs):
    """ZeRO-Infinity offload_param, pipeline parallelism and fp16 with expert LoRA: deepspeed.initialize raises
    kt_patch's OptionError (so before any step), naming the feature and what to do instead."""
    errors = runs[0]["refuse"]
    assert errors["offload_param"].startswith("OptionError: kt_patch: ZeRO-Infinity parameter offload")
    assert "remove offload_param" in errors["offload_param"]
    assert errors["pipeline"].startswith("OptionError: kt_patch: DeepSpeed pipeline parallelism is not supported")
    assert errors["fp16"].startswith("OptionError: kt_patch: fp16 (loss scaling) with LoRA on routed experts")
    assert "bf16 or fp32" in errors["fp16"]


def test_zero_init_adapter_reloads_under_zero3(runs):
    one, _, log = runs
    result = one["3i"]
    assert result["reloaded_report"] == UNTOUCHED
    for key, value in result["reloaded_experts"].items():
        torch.testing.assert_close(value, result["adapter"][key], rtol=0, atol=0)
    assert "kt_patch: patched" in log  # activated by the block alone: the worker never imports kt_patch


CONFIG_WATCH_PROBE = """
import sys
import peft  # imports accelerate.utils.deepspeed, where the installed kt_patch.pth starts watching configs
from accelerate.utils.deepspeed import HfDeepSpeedConfig
import kt_patch
heavy = ("kt_patch.integrations", "kt_patch.kernel", "kt_patch.layer")
loaded = lambda: sorted(m for m in sys.modules if m.startswith(heavy))
before = loaded()
HfDeepSpeedConfig({"train_batch_size": 2})
unblocked = loaded(), kt_patch.current_options()
HfDeepSpeedConfig({"train_batch_size": 2, "kt_patch": {"threads": 1}})
print(before, *unblocked, loaded() != [], kt_patch.current_options().threads)
"""


def test_a_program_that_imports_peft_loads_kt_patch_only_for_a_config_with_its_block(tmp_path):
    """kt_patch installed, not enabled: a program that imports PEFT (and with it accelerate's DeepSpeed utilities)
    loads the option check only, not kt_patch's hooks, kernel or layers; a live DeepSpeed config without the block
    loads nothing more; one with it enables kt_patch."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KT_")}
    run = subprocess.run([sys.executable, "-c", CONFIG_WATCH_PROBE], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split("\n")[-2] == "[] [] None True 1", run.stdout


def test_block_errors():
    from kt_patch import options
    from kt_patch._deepspeed_config import configure_from_config

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
    from kt_patch._deepspeed_config import configure_from_config

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
