"""Imported at interpreter start by ``kt_patch.pth`` when ``KT_ENABLE`` is set: enables kt_patch with the options
of the ``KT_*`` environment variables, before the user's script imports transformers or peft."""
import os
import sys

import kt_patch

try:
    kt_patch.enable()
except kt_patch.OptionError as error:
    # site.py would print the traceback and run the script unpatched; a misconfigured run should not start at all.
    sys.stderr.write(f"kt_patch (KT_ENABLE={os.environ.get('KT_ENABLE')}): {error}\n")
    sys.stderr.flush()
    os._exit(2)
