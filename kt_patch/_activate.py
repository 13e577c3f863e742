"""Imported at interpreter start by ``kt_patch.pth`` when ``KT_ENABLE`` is set: enables kt_patch with the options
of the ``KT_*`` environment variables, before the user's script imports transformers or peft."""
import kt_patch

kt_patch.enable()
