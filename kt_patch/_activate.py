"""Imported at interpreter start by ``kt_patch.pth`` when ``KT_ENABLE`` is set (to anything but an off word).

It checks ``KT_ENABLE`` and the options of the ``KT_*`` variables at once, without torch, so that a misconfigured run
stops before the script starts; then it waits: ``kt_patch.enable()`` (which imports torch and installs the hooks) runs
when the first training library is imported. Programs that import none of them (``pip``, tools, other scripts in the
same environment) pay only the option check.
"""
import os
import sys

import wrapt

import kt_patch
from kt_patch import options

# Whatever a training script imports before it builds a model; kt_patch's own hooks then fire at once for those
# already imported.
TRAINING_LIBRARIES = ("transformers", "peft", "deepspeed", "accelerate", "trl")


def _stop(error: Exception) -> None:
    # site.py would print the traceback and run the script unpatched; a misconfigured run should not start at all.
    sys.stderr.write(f"kt_patch (KT_ENABLE={os.environ.get('KT_ENABLE')!r}): {error}\n")
    sys.stderr.flush()
    os._exit(2)


_enabled_here = False


def _enable_on_first_import(module) -> None:
    global _enabled_here
    # Once only, and not over a script's own enable(...) call made before it imported the library.
    if _enabled_here or kt_patch.current_options() is not None:
        return
    _enabled_here = True
    try:
        kt_patch.enable()
    except kt_patch.OptionError as error:
        _stop(error)


try:
    if options.parse_bool("KT_ENABLE", os.environ.get("KT_ENABLE", "")):
        options.resolve()
        for library in TRAINING_LIBRARIES:
            wrapt.register_post_import_hook(_enable_on_first_import, library)
except kt_patch.OptionError as error:
    _stop(error)
