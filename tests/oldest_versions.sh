#!/usr/bin/env bash
# The oldest-versions leg of the README's test command: kt_patch installed in .venv-oldest with transformers and peft
# at the floors that pyproject.toml declares (read from it, so the floors stay the tested ones), then the tests that
# depend on those versions: every family patched or, where its registry entry needs a newer transformers, left
# untouched with the version named (test_registry.py); LoRA training parity with stock PEFT, with LoRA on the routed
# experts refused at injection by a PEFT too old for it, LoRA Experts saved and reloaded to the trained model
# (test_peft.py); LLaMA-Factory 0.9.5's checkpoint function on the transformers it takes (test_checkpointing.py).
set -euo pipefail
cd "$(dirname "$0")/.."
floors=$(python3 -c '
import re, tomllib
dependencies = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(" ".join(re.sub(">=", "==", d) for d in dependencies if re.match(r"(transformers|peft)>=", d)))')
echo "oldest versions: $floors"
python3 -m venv .venv-oldest && . .venv-oldest/bin/activate
pip install torch==2.13.0
pip install torch==2.13.0 $floors -e . pytest
python -m pytest -q tests/test_registry.py tests/test_peft.py \
    tests/test_checkpointing.py::test_llamafactory_checkpoint_function_trains_as_unpatched
