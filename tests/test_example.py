"""The README's main example, run as a user runs it: it fine-tunes a tiny MoE under kt_patch with HF Trainer, then a
separate interpreter (kt_patch not enabled) reloads the adapter with plain PEFT and must reproduce the logits."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_main_example_trains_and_its_adapter_reloads_with_plain_peft(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KT_")}
    run = subprocess.run([sys.executable, os.path.join(REPO, "examples", "finetune_tiny_moe.py"), "--steps", "10",
                          "--output-dir", str(tmp_path)], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "over 10 steps" in run.stdout and "-> match" in run.stdout, run.stdout
