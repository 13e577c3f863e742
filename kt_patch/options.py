"""The one validated options object.

Precedence, highest first: ``enable(**kwargs)`` > ``KT_*`` environment variables > the ``"kt_patch"`` block of a
DeepSpeed JSON > defaults. Every option has an environment variable ``KT_<NAME upper-cased>``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import sys
from typing import Any, Mapping

from . import _C, registry  # the extension alone (no torch): the CPU's features as the kernel's dispatcher reads them
from .machine import physical_cores_available
from .shared_weights import local_topology

ISAS = ("auto", "amx_bf16", "avx512_bf16", "avx2", "scalar")
CHECKPOINT_POLICIES = ("recompute", "retain")
BACKWARD_WEIGHTS = ("transpose", "copy")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EXECUTORS = ("auto", "cpu", "accelerator", "hybrid")
SHARE_WEIGHTS = ("auto", "off")
EXPERT_LORA_PLACEMENTS = ("model", "host")
MAX_THREADS = 4096  # a pool size no host reaches; larger values are typos, and the pool would try to start them all
# KT_* variables that are not options: kt_patch's switch, the benchmarks' kernel-profile switch, and those of
# KTransformers' kt-kernel, which the benchmark runs beside kt_patch in one environment.
NON_OPTION_VARIABLES = ("KT_ENABLE", "KT_PROFILE", "KT_KERNEL_CPU_VARIANT", "KT_KERNEL_DEBUG")
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")


class OptionError(ValueError):
    """An unknown option or a bad value."""


def default_threads() -> int:
    """This process's share of the physical cores (all of them, or an equal part for each of the host's local ranks
    when a launcher started several: ``LOCAL_WORLD_SIZE``), less one for the thread that feeds the GPU when there is
    one."""
    cores = max(1, physical_cores_available() // local_topology()[1])
    return max(1, cores - 1) if _feeds_accelerator() and cores > 2 else cores


def _feeds_accelerator() -> bool:
    """Whether this process drives a GPU, decided without importing torch when it is not imported yet (options are
    resolved at interpreter start-up under KT_ENABLE): the device nodes of the NVIDIA and AMD drivers."""
    if "torch" in sys.modules:
        return sys.modules["torch"].cuda.is_available()
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/kfd")


@dataclasses.dataclass(frozen=True)
class Options:
    threads: int | None = None  # None: default_threads()
    isa: str = "auto"
    checkpoint_policy: str = "recompute"
    backward_weights: str = "transpose"
    architectures: tuple[str, ...] = ("all",)
    log_level: str = "INFO"
    lora_experts: int = 0
    lora_expert_intermediate_size: int = 64
    executor: str = "auto"
    gpu_expert_budget: Any = "auto"  # "auto" or GiB (a number >= 0)
    accelerator_fraction: Any = None  # None, or the fraction of each layer's experts forced onto the accelerator
    expert_lora_placement: str = "model"  # model: the expert-LoRA factors go with the model (not for executor cpu)
    share_weights: str = "auto"  # auto: one copy of the packed experts per host (shared memory) under several local ranks
    peer_timeout: Any = 1800  # seconds kt_patch waits for another rank (shared segment, expert-LoRA averaging)

    def __post_init__(self):
        if self.threads is None:
            object.__setattr__(self, "threads", default_threads())
        _check_int(self, "threads", minimum=1, maximum=MAX_THREADS)
        _check_choice(self, "isa", ISAS)
        _check_isa_runs_here(self.isa)
        _check_choice(self, "checkpoint_policy", CHECKPOINT_POLICIES)
        _check_choice(self, "backward_weights", BACKWARD_WEIGHTS)
        _check_choice(self, "log_level", LOG_LEVELS)
        _check_int(self, "lora_experts", minimum=0)
        _check_int(self, "lora_expert_intermediate_size", minimum=1)
        _check_choice(self, "executor", EXECUTORS)
        budget = self.gpu_expert_budget
        if budget != "auto":
            _check_number(self, "gpu_expert_budget", 0.0, float("inf"), "'auto' or a number of GiB >= 0")
        if self.accelerator_fraction is not None:
            _check_number(self, "accelerator_fraction", 0.0, 1.0, "a number in [0, 1] (or unset)")
        _check_choice(self, "expert_lora_placement", EXPERT_LORA_PLACEMENTS)
        _check_choice(self, "share_weights", SHARE_WEIGHTS)
        _check_number(self, "peer_timeout", 1e-3, float("inf"), "a number of seconds > 0")
        object.__setattr__(self, "architectures", _architectures(self.architectures))


FIELDS = {f.name: f for f in dataclasses.fields(Options)}


def _check_choice(opts, name, allowed):
    value = getattr(opts, name)
    if name == "log_level" and isinstance(value, str):
        value = value.upper()
    elif isinstance(value, str):
        value = value.lower()
    if value not in allowed:
        raise OptionError(f"kt_patch option {name!r} must be one of {', '.join(allowed)}; got {getattr(opts, name)!r}")
    object.__setattr__(opts, name, value)


def _check_number(opts, name, low, high, allowed):
    value = getattr(opts, name)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not low <= number <= high:
        raise OptionError(f"kt_patch option {name!r} must be {allowed}; got {value!r}")
    object.__setattr__(opts, name, number)


def _check_int(opts, name, minimum, maximum=None):
    value = getattr(opts, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum and value > maximum):
        allowed = f"from {minimum} to {maximum}" if maximum else f">= {minimum}"
        raise OptionError(f"kt_patch option {name!r} must be an integer {allowed}; got {value!r}")


def _check_isa_runs_here(isa: str) -> None:
    if isa == "auto":
        return
    runs = list(_C.supported_isas())
    if isa not in runs:
        raise OptionError(f"kt_patch option 'isa': this CPU cannot run {isa!r}; it runs {', '.join(['auto', *runs])}")


def _architectures(value) -> tuple[str, ...]:
    """'all' or known family names, from a comma list or a sequence of names."""
    names = tuple(a.strip() for a in value.split(",") if a.strip()) if isinstance(value, str) else value
    if not isinstance(names, (tuple, list)) or not names or not all(isinstance(a, str) for a in names):
        raise OptionError(f"kt_patch option 'architectures' must be 'all' or a list of family names; got {value!r}")
    known = registry.names()
    for name in names:
        if name != "all" and name not in known:
            raise OptionError(f"kt_patch option 'architectures': unknown family {name!r}{_did_you_mean(name, known)}"
                              f"; known families: all, {', '.join(known)}")
    return tuple(names)


def _did_you_mean(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def parse_bool(name: str, raw: str) -> bool:
    """An environment switch: 1/true/yes/on or 0/false/no/off/empty, any case; anything else is an error."""
    word = raw.strip().lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise OptionError(f"environment variable {name} must be one of {', '.join(TRUE_WORDS)} (on) or "
                      f"{', '.join(FALSE_WORDS[:-1])} or empty (off); got {raw!r}")


def _coerce(name: str, raw: str) -> Any:
    """Turn an environment string into the option's type."""
    if FIELDS[name].type.startswith("int"):  # "int" or "int | None" (the annotations are strings)
        try:
            return int(raw)
        except ValueError:
            raise OptionError(f"environment variable KT_{name.upper()} must be an integer; got {raw!r}") from None
    return raw


def env_options(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The options set by ``KT_*`` variables; a ``KT_*`` variable that names no option is an error (a typo)."""
    environ = os.environ if environ is None else environ
    variables = {f"KT_{name.upper()}": name for name in FIELDS}
    for variable in sorted(environ):
        if variable.startswith("KT_") and variable not in variables and variable not in NON_OPTION_VARIABLES:
            raise OptionError(f"environment variable {variable} is not a kt_patch option"
                              f"{_did_you_mean(variable, [*variables, *NON_OPTION_VARIABLES])}; options: "
                              f"{', '.join(variables)}")
    return {name: _coerce(name, environ[variable]) for variable, name in variables.items() if variable in environ}


def resolve(kwargs: Mapping[str, Any] | None = None, deepspeed_block: Mapping[str, Any] | None = None,
            environ: Mapping[str, str] | None = None) -> Options:
    """Merge the sources by precedence and validate; unknown names are errors that list the known ones."""
    merged: dict[str, Any] = {}
    for source, values in (("DeepSpeed 'kt_patch' block", deepspeed_block or {}), ("environment", env_options(environ)),
                           ("enable()", kwargs or {})):
        unknown = sorted(set(values) - set(FIELDS))
        if unknown:
            raise OptionError(f"unknown kt_patch option(s) {unknown} in {source}"
                              f"{_did_you_mean(unknown[0], FIELDS)}; known options: {', '.join(FIELDS)}")
        merged.update(values)
    return Options(**merged)


_current: Options | None = None

# The DeepSpeed JSON's "kt_patch" block (set by kt_patch.integrations.deepspeed when a config carrying one is seen)
# and the keywords of the last enable() call, so that a block seen later re-resolves with the right precedence.
_deepspeed_block: dict | None = None
_requested: dict = {}


def check_deepspeed_block(block: Any) -> dict:
    """The block as a dict of options; "auto" (which accelerate fills in everywhere) or a non-dict is an error."""
    if not isinstance(block, Mapping):
        raise OptionError(f"the DeepSpeed config's 'kt_patch' block must be an object of options "
                          f"({', '.join(FIELDS)}); got {block!r}")
    for name, value in block.items():
        if isinstance(value, str) and value.strip().lower() == "auto":
            raise OptionError(f"kt_patch option {name!r} in the DeepSpeed config's 'kt_patch' block is \"auto\": "
                              "the block takes explicit values only (leave the option out for its default)")
    return dict(block)


def deepspeed_block() -> dict | None:
    return _deepspeed_block


def set_deepspeed_block(block: Mapping[str, Any] | None) -> None:
    global _deepspeed_block
    _deepspeed_block = None if block is None else check_deepspeed_block(block)


def requested() -> dict:
    """The keywords of the last ``kt_patch.enable`` call."""
    return dict(_requested)


def set_requested(kwargs: Mapping[str, Any]) -> None:
    global _requested
    _requested = dict(kwargs)


def current() -> Options | None:
    """The options in force (set by ``kt_patch.enable``), or None while kt_patch is disabled."""
    return _current


def set_current(options: Options | None) -> None:
    global _current
    _current = options


@contextlib.contextmanager
def suspended():
    """Within this block no model is patched; the options in force before are restored after it."""
    previous = _current
    set_current(None)
    try:
        yield
    finally:
        set_current(previous)
