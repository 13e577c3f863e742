"""PEFT on patched models against the same script without kt_patch.

Training parity runs patched and stock in separate processes (same seed, same random tokens, LoRA on attention and
routed experts, 10 AdamW steps): losses to 1e-4 relative in fp32 (2e-2 in bf16), every LoRA gradient of step 2 to
1e-4 relative L2, identical adapter files' keys/shapes/config, and the patched adapter loaded by plain PEFT into a
stock model reproduces the patched model's logits (1e-4).
"""
import json
import os
import subprocess
import sys

import peft
import pytest
import torch
from safetensors.torch import load_file

import kt_patch
import tiny_models
from kt_patch.integrations.peft import PEFT_FOR_EXPERT_LORA
from kt_patch.kernel import NO_LORA
from kt_patch.layer import LORA_EXPERTS_MODULE, KtMoeLayer

checkpoints = tiny_models.checkpoints_fixture()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = tiny_models.patchable()
# With an older PEFT (the oldest-versions run) kt_patch refuses LoRA on routed experts at injection (tested below):
# the tests about LoRA elsewhere train attention LoRA there, those about expert LoRA are skipped.
LORA = tiny_models.expert_lora_variant()
EXPERT_LORA = LORA != "attention"
needs_expert_lora = pytest.mark.skipif(not EXPERT_LORA, reason=f"peft {peft.__version__} < {PEFT_FOR_EXPERT_LORA}: "
                                       "expert LoRA is refused at injection")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def train_in_subprocesses(checkpoints, out, model_types, *flags):
    """The stock and the patched run, concurrently, each in its own interpreter."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KT_")}
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    # One core each (the two runs are concurrent); PEFT writes target sets in hash order, so fix the hash seed to
    # compare adapter_config.json exactly.
    env.update(OMP_NUM_THREADS="1", KT_THREADS="1", PYTHONHASHSEED="0")
    script = os.path.join(REPO, "tests", "tiny_models.py")
    runs = {}
    for mode in ("stock", "patched"):
        cmd = [sys.executable, script, os.path.join(out, mode), *model_types, "--checkpoints", checkpoints, *flags]
        runs[mode] = subprocess.Popen(cmd + (["--patched"] if mode == "patched" else []), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for mode, proc in runs.items():
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{mode} run failed:\n{stderr[-4000:]}"
    return {mode: os.path.join(out, mode) for mode in runs}


def load_result(directory, model_type):
    return torch.load(os.path.join(directory, model_type, "result.pt"))


def safetensors_header(path):
    with open(path, "rb") as f:
        return f.read(int.from_bytes(f.read(8), "little"))


def assert_same_adapter_files(stock_dir, patched_dir):
    """Same keys, shapes, dtypes and layout (the safetensors header byte for byte) and the same adapter_config."""
    files = [os.path.join(d, "adapter_model.safetensors") for d in (stock_dir, patched_dir)]
    assert safetensors_header(files[0]) == safetensors_header(files[1])
    stock, patched = (load_file(f) for f in files)
    assert sorted(stock) == sorted(patched)
    assert all(stock[k].shape == patched[k].shape and stock[k].dtype == patched[k].dtype for k in stock)
    with open(os.path.join(stock_dir, "adapter_config.json")) as f, \
            open(os.path.join(patched_dir, "adapter_config.json")) as g:
        assert json.load(f) == json.load(g)


def stock_logits_with_adapter(checkpoint, adapter_dir, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert kt_patch.current_options() is None
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype), adapter_dir)
    assert not any(isinstance(m, KtMoeLayer) for m in model.modules())
    with torch.no_grad():
        return model(input_ids=tiny_models.evaluation_tokens()).logits.float()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_training_parity_every_family(checkpoints, tmp_path, dtype):
    flags = ["--bf16"] if dtype == "bf16" else []
    loss_tol = 1e-4 if dtype == "fp32" else 2e-2
    dirs = train_in_subprocesses(checkpoints, str(tmp_path), ALL, *flags, "--variant", LORA)
    for model_type in ALL:
        stock, patched = load_result(dirs["stock"], model_type), load_result(dirs["patched"], model_type)
        assert (stock["kt_layers"], patched["kt_layers"]) == (0, 2), model_type
        for step, (a, b) in enumerate(zip(stock["losses"], patched["losses"])):
            assert abs(a - b) <= loss_tol * abs(a), f"{model_type} step {step}: {a} vs {b}"
        assert sorted(stock["grads"]) == sorted(patched["grads"])
        expert_lora = [n for n in stock["grads"] if ".experts." in n]
        if EXPERT_LORA:
            assert model_type == "gpt_oss" or len(expert_lora) == 8, model_type  # 2 layers x (A, B) x (gate_up, down)
        else:
            assert not expert_lora, model_type
        if dtype == "fp32":
            for name, grad in stock["grads"].items():
                assert rel(patched["grads"][name], grad) <= 1e-4, f"{model_type} {name}"
        stock_dir, patched_dir = (os.path.join(dirs[m], model_type) for m in ("stock", "patched"))
        assert_same_adapter_files(stock_dir, patched_dir)
        if dtype == "fp32":
            logits = stock_logits_with_adapter(os.path.join(checkpoints, model_type), patched_dir, torch.float32)
            assert rel(logits, patched["logits"]) <= 1e-4, model_type


def patched_peft(checkpoints, model_type, config, **options):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    kt_patch.enable(**options)
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(os.path.join(checkpoints, model_type))
        return get_peft_model(model, config)
    finally:
        kt_patch.disable()


def stock_peft(checkpoints, model_type, config):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(os.path.join(checkpoints, model_type)), config)


def train_steps(model, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(steps):
        ids = torch.randint(3, 128, (2, 10), generator=data)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@needs_expert_lora
@pytest.mark.parametrize("model_type,variant", [("qwen3_moe", "names"), ("mixtral", "names"),
                                                ("qwen3_moe", "all-linear"), ("deepseek_v3", "all-linear")])
def test_target_forms_peft_rewrites(checkpoints, tmp_path, model_type, variant):
    """v4 expert names and all-linear (which also puts LoRA on the router, trained through the routing weights)."""
    stock = stock_peft(checkpoints, model_type, tiny_models.lora_config(model_type, variant))
    patched = patched_peft(checkpoints, model_type, tiny_models.lora_config(model_type, variant))
    assert all(layer.expert_lora().gate_up is not None for layer in patched.modules() if isinstance(layer, KtMoeLayer))
    for a, b in zip(train_steps(stock), train_steps(patched)):
        assert abs(a - b) <= 1e-4 * abs(a)
    stock.save_pretrained(str(tmp_path / "stock"))
    patched.save_pretrained(str(tmp_path / "patched"))
    assert_same_adapter_files(str(tmp_path / "stock"), str(tmp_path / "patched"))
    if variant == "all-linear":
        keys = load_file(str(tmp_path / "patched" / "adapter_model.safetensors"))
        assert any(".mlp.gate.lora_A" in k for k in keys)


@needs_expert_lora
def test_load_adapter_paths_on_patched_model(checkpoints, tmp_path):
    """PeftModel.from_pretrained and transformers' load_adapter on a patched model use the saved factors."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained = stock_peft(checkpoints, "qwen3_moe", tiny_models.lora_config("qwen3_moe"))
    train_steps(trained, 2)
    trained.save_pretrained(str(tmp_path))
    ids = tiny_models.evaluation_tokens()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
    path = os.path.join(checkpoints, "qwen3_moe")
    kt_patch.enable()
    try:
        via_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), str(tmp_path))
        via_transformers = AutoModelForCausalLM.from_pretrained(path)
        via_transformers.load_adapter(str(tmp_path))
    finally:
        kt_patch.disable()
    for model in (via_peft, via_transformers):
        layers = [m for m in model.modules() if isinstance(m, KtMoeLayer)]
        assert len(layers) == 2 and all(layer.expert_lora().down is not None for layer in layers)
        with torch.no_grad():
            assert rel(model(input_ids=ids).logits, expected) <= 1e-4
    with via_peft.disable_adapter(), torch.no_grad():  # adapters off: the kernel runs without LoRA
        assert all(layer.expert_lora() == NO_LORA for layer in via_peft.modules() if isinstance(layer, KtMoeLayer))
        assert rel(via_peft(input_ids=ids).logits, expected) > 1e-3


@needs_expert_lora
def test_gradients_are_ordinary_grads(checkpoints):
    """Accumulate over micro-batches, cleared by zero_grad, seen by clipping."""
    model = patched_peft(checkpoints, "qwen3_moe", tiny_models.lora_config("qwen3_moe"))
    expert_b = next(p for n, p in model.named_parameters() if n.endswith("experts.lora_B.default.weight"))
    ids = torch.randint(3, 128, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    once = expert_b.grad.clone()
    assert once.abs().sum() > 0
    model(input_ids=ids, labels=ids).loss.backward()
    assert rel(expert_b.grad, 2 * once) < 1e-6
    total = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1e-3)
    assert total > 1e-3 and expert_b.grad.norm() <= 1e-3 * 1.001
    model.zero_grad()
    assert expert_b.grad is None


@pytest.mark.parametrize("unsupported", [dict(use_dora=True), dict(lora_dropout=0.1)])
def test_unsupported_expert_lora_is_a_clear_error(checkpoints, unsupported):
    from peft import LoraConfig

    config = LoraConfig(r=4, target_modules=["o_proj"], target_parameters=["experts.gate_up_proj"], **unsupported)
    with pytest.raises(ValueError, match="does not work with"):
        patched_peft(checkpoints, "qwen3_moe", config)


def test_expert_lora_with_a_peft_too_old_for_it_is_refused_at_injection(checkpoints, monkeypatch):
    # 0.19.0 and older lay out fused-expert LoRA otherwise: the real one in the oldest-versions run, else its version
    if EXPERT_LORA:
        monkeypatch.setattr(peft, "__version__", "0.19.0")
    message = rf"LoRA on routed experts needs peft >= {PEFT_FOR_EXPERT_LORA} \(installed: {peft.__version__}\)"
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        patched_peft(checkpoints, "qwen3_moe", tiny_models.lora_config("qwen3_moe"))
    attention_only = patched_peft(checkpoints, "qwen3_moe", tiny_models.lora_config("qwen3_moe", "attention"))
    assert any(".o_proj.lora_A." in name for name, _ in attention_only.named_parameters())


@needs_expert_lora
def test_two_active_adapters_on_experts_is_an_error(checkpoints):
    model = patched_peft(checkpoints, "qwen3_moe", tiny_models.lora_config("qwen3_moe"))
    model.add_adapter("second", tiny_models.lora_config("qwen3_moe"))
    model.base_model.set_adapter(["default", "second"])
    with pytest.raises(NotImplementedError, match="several active adapters"):
        model(input_ids=torch.randint(3, 128, (1, 5)))


def test_lora_experts_train_and_save_with_the_adapter(checkpoints, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = patched_peft(checkpoints, "qwen3_moe", tiny_models.lora_config("qwen3_moe", LORA), lora_experts=2,
                         lora_expert_intermediate_size=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and f".{LORA_EXPERTS_MODULE}." in n]
    assert len(trainable) == 4  # 2 layers x (gate_up_proj, down_proj)
    ids = tiny_models.evaluation_tokens()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    train_steps(model, 3)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    model.save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    # PEFT's keys for a modules_to_save entry, each once (PEFT 0.18-0.20 added copies when the name held "lora_")
    assert sorted(k for k in saved if f".{LORA_EXPERTS_MODULE}." in k) == [
        f"base_model.model.model.layers.{i}.mlp.{LORA_EXPERTS_MODULE}.{name}"
        for i in range(2) for name in ("down_proj", "gate_up_proj")]
    kt_patch.enable(lora_experts=2, lora_expert_intermediate_size=8)
    try:
        reloaded = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(os.path.join(checkpoints, "qwen3_moe")), str(tmp_path))
    finally:
        kt_patch.disable()
    with torch.no_grad():
        assert rel(reloaded(input_ids=ids).logits, after) <= 1e-5
    assert rel(after, before) > 1e-4


def test_loading_an_adapter_checks_its_lora_experts_against_the_model(checkpoints, tmp_path):
    """PeftModel.from_pretrained and model.load_adapter: an adapter saved with LoRA Experts loads them into a model
    patched with the same options and is refused (naming the options) by one patched without them (PEFT would drop them
    without an error) or with another count or size; model.load_adapter of transformers that would leave them out
    refuses it too. An adapter without them loads into a model with them, whose LoRA Experts start at zero output and
    train from there."""
    import transformers
    from packaging.version import Version
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kt_patch.integrations.transformers import TRANSFORMERS_LOADING_MODULES_TO_SAVE

    old_transformers = Version(transformers.__version__) < Version(TRANSFORMERS_LOADING_MODULES_TO_SAVE)
    left_out = "has LoRA Experts, which model.load_adapter does not load before transformers"
    ids = tiny_models.evaluation_tokens()
    trained = {}
    for name, make in (("with", patched_peft), ("without", stock_peft)):
        options = dict(lora_experts=2, lora_expert_intermediate_size=8) if name == "with" else {}
        model = make(checkpoints, "qwen3_moe", tiny_models.lora_config("qwen3_moe", "attention"), **options)
        train_steps(model, 1)  # LoRA (and LoRA Experts) off zero output
        model.save_pretrained(str(tmp_path / name))
        with torch.no_grad():
            trained[name] = model(input_ids=ids).logits

    def load(adapter, via, **options):
        kt_patch.enable(**options)
        try:
            model = AutoModelForCausalLM.from_pretrained(os.path.join(checkpoints, "qwen3_moe"))
            if via == "transformers":
                model.load_adapter(str(tmp_path / adapter), is_trainable=True)
                return model
            return PeftModel.from_pretrained(model, str(tmp_path / adapter), is_trainable=True)
        finally:
            kt_patch.disable()

    for via in ("peft", "transformers"):
        if via == "transformers" and old_transformers:
            with pytest.raises(ValueError, match=left_out):
                load("with", via, lora_experts=2, lora_expert_intermediate_size=8)
        else:
            model = load("with", via, lora_experts=2, lora_expert_intermediate_size=8)
            with torch.no_grad():
                assert rel(model(input_ids=ids).logits, trained["with"]) <= 1e-5, via
        with pytest.raises(ValueError, match="trained with LoRA Experts .* has none: .* the lora_experts and "
                                             "lora_expert_intermediate_size options the adapter was trained with"):
            load("with", via)
        for count, size in ((3, 8), (2, 4)):
            message = (f"being loaded are 2 of intermediate size 8 per layer, this model's {count} of {size}: .* "
                       "lora_experts=2, lora_expert_intermediate_size=8")
            error = ValueError
            if via == "transformers" and old_transformers:
                message = left_out
            elif via == "transformers":  # transformers' own size-mismatch error
                error, message = RuntimeError, "ignore_mismatched_sizes"
            with pytest.raises(error, match=message):
                load("with", via, lora_experts=count, lora_expert_intermediate_size=size)
        model = load("without", via, lora_experts=2, lora_expert_intermediate_size=8)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad and f".{LORA_EXPERTS_MODULE}." in n]
        assert len(trainable) == 4, via  # 2 layers x (gate_up_proj, down_proj)
        with torch.no_grad():
            assert rel(model(input_ids=ids).logits, trained["without"]) <= 1e-5, via


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_with_accumulation_and_clipping_matches_stock(checkpoints, tmp_path, checkpointing):
    from transformers import Trainer, TrainingArguments

    # activation_checkpointing: the name since transformers 5.23 (gradient_checkpointing before, deprecated since)
    checkpointing_argument = ("activation_checkpointing" if "activation_checkpointing" in
                              TrainingArguments.__dataclass_fields__ else "gradient_checkpointing")
    results = []
    for make in (stock_peft, patched_peft):
        model = make(checkpoints, "qwen3_moe", tiny_models.lora_config("qwen3_moe", LORA))
        data = torch.Generator().manual_seed(9)
        rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 128, (16, 12), generator=data)]
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_grad_norm=0.05, max_steps=4, learning_rate=1e-2,
                                 logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0,
                                 disable_tqdm=True, **{checkpointing_argument: checkpointing})
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((losses, norms, weights))
    (stock_losses, stock_norms, stock_weights), (losses, norms, weights) = results
    assert len(losses) == 4 and all(n > 0.05 for n in stock_norms)  # clipping was active
    for a, b in zip(stock_losses + stock_norms, losses + norms):
        assert abs(a - b) <= 1e-4 * abs(a)
    assert sorted(weights) == sorted(stock_weights)
    for name, weight in weights.items():
        assert rel(weight, stock_weights[name]) <= 1e-4, name


@needs_expert_lora
def test_switching_adapters_follows_peft(checkpoints):
    """Two adapters, one active at a time: the kernel always uses the active one's factors, as stock PEFT does."""
    second = tiny_models.lora_config("qwen3_moe")
    second.init_lora_weights = False  # random B, so the two adapters differ
    models = []
    for make in (stock_peft, patched_peft):
        model = make(checkpoints, "qwen3_moe", tiny_models.lora_config("qwen3_moe"))
        torch.manual_seed(4)
        model.add_adapter("second", second)
        models.append(model)
    stock, patched = models
    patched.load_state_dict(stock.state_dict(), strict=False)  # same factors for both adapters
    ids = tiny_models.evaluation_tokens()
    outputs = {}
    for name in ("second", "default", "second"):
        for label, model in (("stock", stock), ("patched", patched)):
            model.set_adapter(name)
            with torch.no_grad():
                outputs[label] = model(input_ids=ids).logits
        assert rel(outputs["patched"], outputs["stock"]) <= 1e-4, name


def test_adapter_save_does_not_read_experts_back(checkpoints, tmp_path, monkeypatch):
    model = patched_peft(checkpoints, "qwen3_moe", tiny_models.lora_config("qwen3_moe", LORA))
    for layer in (m for m in model.modules() if isinstance(m, KtMoeLayer)):
        monkeypatch.setattr(layer.kernel, "export_weights", lambda: pytest.fail("expert weights read back"))
    kt_patch.enable()
    try:
        model.save_pretrained(str(tmp_path))
    finally:
        kt_patch.disable()
    assert os.path.exists(tmp_path / "adapter_model.safetensors")


@needs_expert_lora
def test_merging_into_kernel_experts_is_refused_before_anything_merges(checkpoints):
    config = tiny_models.lora_config("qwen3_moe")
    config.init_lora_weights = False  # random B: a merged attention LoRA would change the outputs
    model = patched_peft(checkpoints, "qwen3_moe", config)
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        before = ({name: p.clone() for name, p in model.named_parameters()}, model(input_ids=ids).logits)
    kt_patch.enable()
    try:
        for merge in (model.merge_and_unload, model.merge_adapter):
            with pytest.raises(ValueError, match="cannot merge LoRA into routed experts"):
                merge()
    finally:
        kt_patch.disable()
    with torch.no_grad():
        after = ({name: p.clone() for name, p in model.named_parameters()}, model(input_ids=ids).logits)
    assert sorted(after[0]) == sorted(before[0]) and any(".o_proj.lora_A." in name for name in after[0])
    assert all(torch.equal(after[0][name], value) for name, value in before[0].items())
    assert torch.equal(after[1], before[1])
