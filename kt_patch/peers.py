"""Ranks never hang on another rank's error (SPEC §8): a failure on one rank becomes an exception on every rank.

Once DDP wraps a patched model (:mod:`kt_patch.integrations.ddp`), a rank whose forward, expert backward or script
raises writes ``rank R: <error> (<where>)`` into the process group's store (the rendezvous store every rank already
talks to). The other ranks look at it at the start of every MoE layer's forward and expert backward (at most every
``_CHECK_EVERY`` seconds: one store round trip) and while they wait for kt_patch's own collectives (the expert-LoRA
averaging), which are bounded by the ``peer_timeout`` option; they then raise :class:`PeerFailed` naming that rank
and its error. A rank that dies without raising (killed, out of memory) closes its gloo connections, which fails the
collectives waiting for it.
"""
from __future__ import annotations

import sys
import time

import torch.distributed as dist
from torch.distributed.distributed_c10d import _get_default_store

_CHECK_EVERY = 0.01
_KEY = "first"


class PeerFailed(RuntimeError):
    """Another rank of the job failed; this rank stops too."""


class _Peers:
    def __init__(self, rank: int, store):
        self.rank, self.store = rank, store
        self.reported = False
        self._checked = 0.0

    def report(self, error: BaseException, where: str) -> None:
        if self.reported or isinstance(error, PeerFailed):
            return
        self.reported = True
        message = f"rank {self.rank}: {type(error).__name__}: {error} ({where})"
        try:
            if not self.store.check([_KEY]):
                self.store.set(_KEY, message)
        except Exception:  # the store is gone (the job is ending): nothing to tell
            pass

    def check(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.reported or (not force and now - self._checked < _CHECK_EVERY):
            return
        self._checked = now
        try:
            if not self.store.check([_KEY]):
                return
            message = self.store.get(_KEY).decode(errors="replace")
        except Exception:
            return
        raise PeerFailed(f"kt_patch: rank {self.rank} stops because {message}")


_active: _Peers | None = None
_previous_excepthook = None


def activate() -> None:
    """Start watching for failures (once the default process group exists)."""
    global _active, _previous_excepthook
    if _active is not None:
        return
    _active = _Peers(dist.get_rank(), dist.PrefixStore("kt_patch/failure/", _get_default_store()))
    _previous_excepthook = sys.excepthook
    sys.excepthook = _excepthook


def _excepthook(kind, error, traceback):
    report(error, "uncaught in the script")
    (_previous_excepthook or sys.__excepthook__)(kind, error, traceback)


def report(error: BaseException, where: str) -> None:
    if _active is not None:
        _active.report(error, where)


def check(force: bool = False) -> None:
    """Raise :class:`PeerFailed` when another rank reported a failure."""
    if _active is not None:
        _active.check(force)
