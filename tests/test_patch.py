"""Activation (enable before/after imports, disable, KT_ENABLE=1 through the .pth line, options) and what a patched
model keeps from the stock one: from_pretrained / from_config entry points, checkpoints, router logits, checkpointing,
host residency of the routed experts."""
import logging
import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch

import kt_patch
import tiny_models
from kt_patch.layer import KtMoeLayer, is_placeholder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    for model_type in ("qwen3_moe", "mixtral", "deepseek_v3"):
        tiny_models.save(model_type, str(directory))
    return str(directory)


@pytest.fixture
def enabled():
    kt_patch.enable()
    yield
    kt_patch.disable()


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def run_python(code: str, env_extra=None, timeout=240, stderr=False):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KT_")}
    env.update(env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr if stderr else proc.stdout


LOAD_AND_REPORT = """
    from transformers import AutoModelForCausalLM
    from peft import LoraConfig
    model = AutoModelForCausalLM.from_pretrained({path!r})
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["o_proj"],
                                target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    layers = [m for m in peft_model.modules() if type(m).__name__ == "KtMoeLayer"]
    print("layers", len(layers), "lora", sum(l.expert_lora().gate_up is not None for l in layers))
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_enable_before_or_after_imports(checkpoints, when):
    path = os.path.join(checkpoints, "qwen3_moe")
    enable = "import kt_patch; kt_patch.enable()\n"
    # 'from peft import get_peft_model' binds the function before enable() in the 'after' case: still intercepted.
    imports = "from peft import get_peft_model\nimport transformers.modeling_utils\n"
    code = (enable + imports if when == "before" else imports + enable) + textwrap.dedent(LOAD_AND_REPORT).format(
        path=path)
    assert "layers 2 lora 2" in run_python(code)


def test_kt_enable_env_through_pth_line(checkpoints):
    """The .pth line as site.py runs it at interpreter start: activates only when KT_ENABLE is set."""
    pth = os.path.join(REPO, "kt_patch", "kt_patch.pth")
    script = textwrap.dedent(LOAD_AND_REPORT).format(path=os.path.join(checkpoints, "qwen3_moe"))
    start = f"import sys\nexec(open({pth!r}).read())\nprint('preloaded', 'kt_patch' in sys.modules)\n"
    unmodified = start + "from peft import get_peft_model\n" + script
    assert "preloaded True" in (out := run_python(unmodified, {"KT_ENABLE": "true"})) and "layers 2 lora 2" in out
    out = run_python(unmodified)
    assert "preloaded False" in out and "layers 0 lora 0" in out


def test_kt_enable_is_a_boolean_and_costs_no_torch_at_start_up():
    # -S: only the repository's .pth runs (an installed copy may be another version); site-packages still on the path
    site_packages = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    pth = os.path.join(REPO, "kt_patch", "kt_patch.pth")
    start = (f"import sys; sys.path += {site_packages!r}; exec(open({pth!r}).read())\n"
             "print('kt_patch' in sys.modules, 'torch' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KT_")}

    def run(script=start, **variables):
        return subprocess.run([sys.executable, "-S", "-c", script], env={**env, "PYTHONPATH": REPO, **variables},
                              capture_output=True, text=True, timeout=120)

    for word in ("0", "false", "No", "off", ""):
        assert run(KT_ENABLE=word).stdout.split() == ["False", "False"], word
    # The options are checked at start-up (an ISA and a family list make the check read the CPU and the registry),
    # torch waits for the first training library, and a script's own enable(...) before that import stays in force.
    script = start + ("import kt_patch; kt_patch.enable(threads=1); import peft\n"
                      "print(kt_patch.current_options().threads)")
    on = run(script, KT_ENABLE="yes", KT_ISA="scalar", KT_ARCHITECTURES="qwen3_moe,mixtral")
    assert on.stdout.split() == ["True", "False", "1"], on.stderr[-2000:]
    for word in ("maybe", "2"):
        proc = run(KT_ENABLE=word)
        assert proc.returncode == 2 and "KT_ENABLE must be one of 1, true, yes, on (on) or" in proc.stderr, word


def test_kt_enable_log_lines_follow_the_scripts_logging_and_log_level():
    pth = os.path.join(REPO, "kt_patch", "kt_patch.pth")
    script = f"""
        exec(open({pth!r}).read())
        import logging, sys, tiny_models
        import transformers  # kt_patch.enable() runs here, before the script configures logging
        tiny_models.build("qwen3_moe")
        sys.stderr.write("CONFIGURED\\n")
        logging.basicConfig(format="SCRIPT|%(name)s|%(levelname)s|%(message)s")
        tiny_models.build("qwen3_moe")
    """
    info = run_python(script, {"KT_ENABLE": "1"}, stderr=True).split("CONFIGURED")
    assert [part.count("kt_patch: patched") for part in info] == [1, 1]
    assert "\nkt_patch: patched" in info[0] and "\nSCRIPT|kt_patch|INFO|kt_patch: patched" in info[1]
    assert "SCRIPT" not in info[0] and all("moving experts to the CPU kernel" in part for part in info)
    warning = run_python(script, {"KT_ENABLE": "1", "KT_LOG_LEVEL": "WARNING"}, stderr=True)
    assert "kt_patch" not in warning  # neither the summary line nor the progress bar


INSTALLED_PTH = os.path.join(sysconfig.get_paths()["purelib"], "kt_patch.pth")


@pytest.mark.parametrize("launcher", [[], ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"],
                                      ["-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]])
def test_kt_enable_with_launchers(checkpoints, tmp_path, launcher):
    """An unmodified script under python / torchrun / accelerate launch is patched through the installed .pth."""
    assert os.path.exists(INSTALLED_PTH), "kt_patch.pth is not in site-packages: install kt_patch with pip " \
                                          "(`pip install -e .` or `pip install .`) before running the tests"
    script = tmp_path / "train.py"
    script.write_text("from peft import get_peft_model\n" + textwrap.dedent(LOAD_AND_REPORT).format(
        path=os.path.join(checkpoints, "qwen3_moe")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KT_")}
    env.update(KT_ENABLE="1", PYTHONPATH=os.path.join(REPO, "tests"))
    proc = subprocess.run([sys.executable, *launcher, str(script)], env=env, capture_output=True, text=True,
                          timeout=240, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layers 2 lora 2" in proc.stdout


def test_kt_enable_with_a_bad_option_stops_the_run():
    pth = os.path.join(REPO, "kt_patch", "kt_patch.pth")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KT_")}
    env.update(KT_ENABLE="1", KT_THREADS="four", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", f"exec(open({pth!r}).read()); print('script ran')"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "script ran" not in proc.stdout
    assert "KT_THREADS must be an integer; got 'four'" in proc.stderr


def test_disable_restores_stock_objects(checkpoints):
    from peft.tuners.tuners_utils import BaseTuner
    from transformers.modeling_utils import PreTrainedModel

    stock = (vars(PreTrainedModel)["from_pretrained"], vars(PreTrainedModel)["_from_config"],
             vars(BaseTuner)["inject_adapter"])
    kt_patch.enable()
    kt_patch.enable(threads=1)  # idempotent: one wrapper, new options
    assert kt_patch.current_options().threads == 1
    assert vars(PreTrainedModel)["from_pretrained"].__wrapped__ is stock[0]
    model = tiny_models_load(checkpoints)
    assert sum(isinstance(m, KtMoeLayer) for m in model.modules()) == 2
    kt_patch.disable()
    assert (vars(PreTrainedModel)["from_pretrained"], vars(PreTrainedModel)["_from_config"],
            vars(BaseTuner)["inject_adapter"]) == stock
    assert not any(isinstance(m, KtMoeLayer) for m in tiny_models_load(checkpoints).modules())


def tiny_models_load(checkpoints, model_type="qwen3_moe", **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.join(checkpoints, model_type), **kwargs)


def test_option_typo_is_an_error_naming_it():
    with pytest.raises(kt_patch.OptionError, match="thread"):
        kt_patch.enable(thread=2)
    with pytest.raises(kt_patch.OptionError, match="checkpoint_policy"):
        kt_patch.enable(checkpoint_policy="sometimes")
    assert kt_patch.current_options() is None


@pytest.mark.parametrize("variable, suggestion", [("KT_THREAD", "KT_THREADS"),
                                                   ("KT_CHECKPOINT_POLICYY", "KT_CHECKPOINT_POLICY")])
def test_misspelled_environment_variable_is_an_error_naming_the_option(monkeypatch, variable, suggestion):
    for not_an_option in ("KT_ENABLE", "KT_PROFILE", "KT_KERNEL_CPU_VARIANT"):  # read by kt_patch or kt-kernel
        monkeypatch.setenv(not_an_option, "1")
    monkeypatch.setenv(variable, "retain")
    with pytest.raises(kt_patch.OptionError, match=f"{variable} is not a kt_patch option .did you mean {suggestion}"):
        kt_patch.enable()
    monkeypatch.delenv(variable)
    assert kt_patch.enable().architectures == ("all",)
    kt_patch.disable()


def test_bad_option_values_are_option_errors_at_enable():
    from kt_patch.kernel import supported_isas

    bad = {"architectures": ["qwen3moe", 5, ["qwen3_moe", None]], "threads": [0, 2**40, 100000, 2.0],
           "isa": [isa for isa in ("amx_bf16", "avx512_bf16", "avx2") if isa not in supported_isas()]}
    for name, values in bad.items():
        for value in values:
            with pytest.raises(kt_patch.OptionError, match=name):
                kt_patch.enable(**{name: value})
    with pytest.raises(kt_patch.OptionError, match="did you mean qwen3_moe"):
        kt_patch.enable(architectures="olmoe,qwen3moe")
    if bad["isa"]:
        with pytest.raises(kt_patch.OptionError, match=f"cannot run '{bad['isa'][0]}'; it runs auto, "):
            kt_patch.enable(isa=bad["isa"][0])
    assert kt_patch.current_options() is None


def test_keyword_beats_environment(monkeypatch):
    monkeypatch.setenv("KT_ISA", "scalar")
    monkeypatch.setenv("KT_THREADS", "3")
    try:
        assert (kt_patch.enable(isa="auto").isa, kt_patch.current_options().threads) == ("auto", 3)
        assert kt_patch.enable(threads=1).isa == "scalar"
    finally:
        kt_patch.disable()


def test_unknown_model_untouched_with_one_log_line(enabled, caplog):
    from transformers import AutoModelForCausalLM, LlamaConfig

    with caplog.at_level(logging.INFO, logger="kt_patch"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                             num_hidden_layers=1, num_attention_heads=2))
    lines = [r.getMessage() for r in caplog.records if r.name == "kt_patch"]
    assert len(lines) == 1 and "LlamaForCausalLM has no known sparse-MoE block" in lines[0]
    assert not any(isinstance(m, KtMoeLayer) for m in model.modules())


def test_from_config_is_patched_once_with_summary_line(enabled, caplog):
    from transformers import AutoModelForCausalLM

    with caplog.at_level(logging.INFO, logger="kt_patch"):
        model = AutoModelForCausalLM.from_config(tiny_models.config("deepseek_v3"))
    lines = [r.getMessage() for r in caplog.records if r.name == "kt_patch"]
    assert len(lines) == 1 and "patched DeepseekV3ForCausalLM" in lines[0] and "2 MoE layers" in lines[0]
    assert "16 routed experts" in lines[0] and "ISA" in lines[0] and "threads" in lines[0]
    assert sum(isinstance(m, KtMoeLayer) for m in model.modules()) == 2


def test_base_checkpoint_of_patched_model_loads_in_stock_transformers(checkpoints, tmp_path):
    kt_patch.enable()
    try:
        patched = tiny_models_load(checkpoints, "mixtral")
    finally:
        kt_patch.disable()
    patched.save_pretrained(str(tmp_path))
    stock_original = tiny_models_load(checkpoints, "mixtral")
    reloaded = tiny_models_load(str(tmp_path.parent), tmp_path.name)
    assert not any(isinstance(m, KtMoeLayer) for m in reloaded.modules())
    original_state = stock_original.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original_state[name]), name
    ids = torch.randint(3, 128, (2, 9))
    assert rel(patched(input_ids=ids).logits, reloaded(input_ids=ids).logits) < 1e-5


def test_router_logits_and_aux_loss_as_stock(checkpoints):
    stock = tiny_models_load(checkpoints)
    kt_patch.enable()
    try:
        patched = tiny_models_load(checkpoints)
    finally:
        kt_patch.disable()
    ids = torch.randint(3, 128, (2, 11))
    a = stock(input_ids=ids, labels=ids, output_router_logits=True)
    b = patched(input_ids=ids, labels=ids, output_router_logits=True)
    assert len(a.router_logits) == len(b.router_logits) == 2
    assert torch.equal(a.router_logits[0], b.router_logits[0])  # first MoE layer: same input, same router
    assert rel(b.router_logits[1], a.router_logits[1]) < 1e-5  # input carries the kernel's fp32 rounding
    assert abs(a.aux_loss.item() - b.aux_loss.item()) <= 1e-6 * abs(a.aux_loss.item())
    assert rel(b.loss, a.loss) < 1e-5


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(checkpoints, reentrant):
    kt_patch.enable()
    try:
        plain, ckpt = tiny_models_load(checkpoints), tiny_models_load(checkpoints)
    finally:
        kt_patch.disable()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids = torch.randint(3, 128, (2, 13))
    for model in (plain, ckpt):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert grads
    for name, param in ckpt.named_parameters():
        if name in grads:
            assert rel(param.grad, grads[name]) < 1e-5, name


def test_device_moves_skip_routed_experts(checkpoints):
    from peft import get_peft_model

    kt_patch.enable()
    try:
        model = get_peft_model(tiny_models_load(checkpoints), tiny_models.lora_config("qwen3_moe"))
    finally:
        kt_patch.disable()
    kept, factors = set(), set()  # the experts' weights (placeholders) stay; their LoRA factors go with the model
    for layer in (m for m in model.modules() if isinstance(m, KtMoeLayer)):
        factors |= {id(t) for t in layer.expert_lora().tensors()}
        kept |= {id(p) for p in layer._modules["experts"].parameters()} - factors
    seen = []
    model._apply(lambda t: seen.append(id(t)) or t)
    assert kept and factors and not kept & set(seen)
    assert {id(p) for p in model.parameters()} - kept <= set(seen)
    for name, param in model.named_parameters():
        if name.endswith(("experts.base_layer.base_layer.gate_up_proj", "experts.base_layer.base_layer.down_proj")):
            assert is_placeholder(param) and param.device.type == "cpu"


@pytest.mark.parametrize("model_type,backward_weights", [("qwen2_moe", "transpose"), ("gpt_oss", "transpose"),
                                                          ("mixtral", "copy")])
def test_load_state_dict_puts_new_expert_weights_in_the_kernel(model_type, backward_weights):
    """Every layout (plain; GPT-OSS transposed, interleaved and biased) and the kernel's spec survive a load: the new
    kernel is built from the old one's spec with the new weights and biases."""
    from kt_patch.options import resolve
    from kt_patch.patcher import patch_model

    patched, other = tiny_models.build(model_type, seed=0), tiny_models.build(model_type, seed=1)
    patch_model(patched, resolve({"backward_weights": backward_weights, "isa": "scalar", "threads": 1}))
    specs = [layer.kernel.spec for layer in patched.modules() if isinstance(layer, KtMoeLayer)]
    result = patched.load_state_dict(other.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    layers = [layer for layer in patched.modules() if isinstance(layer, KtMoeLayer)]
    assert [layer.kernel.spec for layer in layers] == specs and specs[0].backward_weights == backward_weights
    assert all(layer.kernel.isa == "scalar" for layer in layers)
    ids = torch.randint(3, 128, (2, 9))
    assert rel(patched(input_ids=ids).logits, other(input_ids=ids).logits) < 1e-5
    state = patched.state_dict()
    for name, tensor in other.state_dict().items():
        assert torch.equal(state[name], tensor), name


def test_load_state_dict_of_biases_alone_reaches_the_kernel():
    from kt_patch.options import resolve
    from kt_patch.patcher import patch_model

    patched, other = tiny_models.build("gpt_oss", seed=0), tiny_models.build("gpt_oss", seed=0)
    patch_model(patched, resolve({"threads": 1}))
    g = torch.Generator().manual_seed(7)
    biases = {name: torch.randn(tensor.shape, generator=g) for name, tensor in other.state_dict().items()
              if name.endswith("_proj_bias") and ".experts." in name}
    assert biases
    other.load_state_dict(biases, strict=False)
    patched.load_state_dict(biases, strict=False)
    ids = torch.randint(3, 128, (2, 9))
    assert rel(patched(input_ids=ids).logits, other(input_ids=ids).logits) < 1e-5


def test_host_device_maps_draw_no_accelerator_warning(checkpoints, caplog):
    warning = "loads routed experts onto the accelerator"
    kt_patch.enable()
    try:
        for device_map in ({"": torch.device("cpu")}, {"": "cpu"}, "cpu", {"model": "cpu", "lm_head": "cpu"}, "auto"):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="kt_patch"):
                model = tiny_models_load(checkpoints, device_map=device_map)
            assert sum(isinstance(m, KtMoeLayer) for m in model.modules()) == 2
            # "auto" may place layers on an accelerator when there is one: kt_patch cannot tell beforehand
            assert (warning in caplog.text) == (device_map == "auto"), device_map
    finally:
        kt_patch.disable()


def test_torch_compile_matches_eager():
    # backend aot_eager: Dynamo's capture and AOTAutograd's joint graph as inductor gets them, without inductor's C++
    # build, which takes minutes on a CI runner's two cores.
    kt_patch.enable(threads=1)
    try:
        model = tiny_models.build("qwen3_moe").train()
    finally:
        kt_patch.disable()
    assert any(isinstance(m, KtMoeLayer) for m in model.modules())
    ids = torch.randint(3, 128, (2, 11))
    results = []
    for run in (model, torch.compile(model, backend="aot_eager")):
        model.zero_grad(set_to_none=True)
        loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert rel(compiled_loss, eager_loss) <= 1e-5 and sorted(compiled_grads) == sorted(eager_grads)
    assert all(rel(compiled_grads[n], g) <= 1e-4 for n, g in eager_grads.items())


def test_single_device_maps_are_recognised():
    from kt_patch.integrations.transformers import _single_device

    assert _single_device("cuda") == torch.device("cuda")
    assert _single_device(1) == torch.device("cuda", 1)
    assert _single_device({"": "cuda:0"}) == torch.device("cuda", 0)
    assert _single_device(torch.device("cuda", 2)) == torch.device("cuda", 2)
    for not_single in (None, "auto", "balanced", "sequential", "cpu", {"": "cpu"}, {"model": 0, "lm_head": 1}, True):
        assert _single_device(not_single) is None, not_single
