"""Loaded when a program imports ``deepspeed`` or ``accelerate.utils.deepspeed`` (the finder the second line of
``kt_patch.pth`` puts on ``sys.meta_path``; it costs one set lookup per import and loads nothing before then).

Once those modules have run, kt_patch watches their configs: a DeepSpeed config with a top-level ``"kt_patch"``
block enables and configures kt_patch (:mod:`kt_patch._deepspeed_config`; the rest of kt_patch is loaded only then,
or when DeepSpeed's engine is), with no import or ``KT_ENABLE`` in the script.
"""
from __future__ import annotations

import importlib.util
import sys

from ._deepspeed_config import watch_configs


def find_spec(finder, name):
    """The module's real spec, its loader wrapped to call :func:`loaded` once the module has run."""
    finder.names.discard(name)
    if not finder.names and finder in sys.meta_path:
        sys.meta_path.remove(finder)
    spec = importlib.util.find_spec(name)  # this finder no longer answers for `name`
    if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
        return spec
    spec.loader = _Loader(spec.loader, name)
    return spec


class _Loader:
    def __init__(self, loader, name):
        self._loader, self._name = loader, name

    def __getattr__(self, attr):
        return getattr(self._loader, attr)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        loaded(self._name, module)


def loaded(name, module) -> None:
    if name == "accelerate.utils.deepspeed":
        watch_configs(module)
    elif "deepspeed.runtime.engine" in sys.modules:
        from .integrations import deepspeed as integration

        integration.install_engine(sys.modules["deepspeed.runtime.engine"])

