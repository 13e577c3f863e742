"""One host copy of the routed experts' packed weights, whatever the number of local ranks.

When a launcher starts several processes on one host (``LOCAL_WORLD_SIZE`` > 1: ``torchrun``, ``accelerate launch``,
the ``deepspeed`` launcher) each MoE layer's packed weights live in one POSIX shared-memory segment,
``/dev/shm/kt_patch.<job>.<layer>``: the host's local rank 0 creates it and packs into it, the other local ranks wait
until it is marked ready (bounded by the ``peer_timeout`` option, an error naming the layer and the segment), map it
read-only and count themselves in; the last one to map it removes its name, so nothing stays in ``/dev/shm`` (the
memory goes when the last process unmaps it). Each process keeps its own thread pool; the default thread count
splits the host's physical cores between the local ranks (:func:`kt_patch.options.default_threads`). Activations,
LoRA factors and their gradients stay per process.

The ``<job>`` part is the same in every local rank of one job and differs between jobs and restarts:
``TORCHELASTIC_RUN_ID`` (a fresh uuid under ``torchrun --standalone``), ``TORCHELASTIC_RESTART_COUNT``,
``MASTER_ADDR`` and ``MASTER_PORT``.
"""
from __future__ import annotations

import hashlib
import os
import re

from . import _C  # the extension alone (no torch): options import this module at start-up

PREFIX = "kt_patch."
_generations: dict[str, int] = {}  # base name -> kernels built for it (a rebuilt layer gets a new segment)
_swept = False


def local_topology(environ=None) -> tuple[int, int]:
    """(local rank, local world size) from the launcher's environment; (0, 1) outside a multi-process launch."""
    environ = os.environ if environ is None else environ
    size = environ.get("LOCAL_WORLD_SIZE") or environ.get("LOCAL_SIZE") or environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
    rank = environ.get("LOCAL_RANK") or environ.get("OMPI_COMM_WORLD_LOCAL_RANK")
    try:
        size, rank = int(size or 1), int(rank or 0)
    except ValueError:
        return 0, 1
    return (rank, size) if size > 1 and 0 <= rank < size else (0, 1)


def job_token(environ=None) -> str:
    environ = os.environ if environ is None else environ
    parts = [environ.get(key, "") for key in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "MASTER_ADDR",
                                              "MASTER_PORT")]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def segment_name(layer_name: str, environ=None) -> str:
    """A name for ``layer_name``'s segment, the same on every local rank of this job (a layer built again, e.g. by
    loading a state dict, gets the next one: the ranks build their layers in the same order)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", layer_name)
    if len(safe) > 160:
        safe = safe[:120] + "." + hashlib.sha1(layer_name.encode()).hexdigest()[:16]
    base = f"{PREFIX}{job_token(environ)}.{safe}"
    generation = _generations.get(base, 0)
    _generations[base] = generation + 1
    return base if generation == 0 else f"{base}.g{generation}"


def kernel_arguments(layer_name: str, options) -> dict:
    """The :class:`kt_patch.kernel.KernelSpec` fields that share ``layer_name``'s weights between the local ranks, or
    nothing when there is one local rank or ``share_weights`` is ``off``."""
    global _swept
    local_rank, local_world = local_topology()
    if options.share_weights == "off" or local_world <= 1:
        return {}
    if local_rank == 0 and not _swept:
        _C.remove_stale_shared_weights(PREFIX)  # left by creators that were killed before every rank mapped theirs
        _swept = True
    return {"shared_weights": segment_name(layer_name), "local_rank": local_rank, "local_world_size": local_world,
            "peer_timeout": float(options.peer_timeout)}
