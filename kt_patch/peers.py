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

import datetime
import sys
import time

import torch.distributed as dist
from torch.distributed.distributed_c10d import _get_default_store

from . import options

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
_GLOO_GROUPS: dict = {}
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


def peer_timeout() -> float:
    """Seconds a rank waits for the others in kt_patch's own collectives (the ``peer_timeout`` option)."""
    in_force = options.current()
    return float(in_force.peer_timeout if in_force is not None else options.Options.peer_timeout)


def wait(work, what: str) -> None:
    """Wait for a collective of the averaging, raising when another rank reported a failure, when a rank left (gloo
    fails the collective) or after ``peer_timeout`` seconds."""
    timeout = peer_timeout()
    started = time.monotonic()
    pause = 1e-4
    while not work.is_completed():
        check(force=True)
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"kt_patch: rank {dist.get_rank()}: waited {timeout:g} s for the other ranks in "
                               f"{what} (option peer_timeout, KT_PEER_TIMEOUT): a rank is stuck or far behind")
        time.sleep(pause)
        pause = min(pause * 2, 0.02)
    try:
        work.wait()
    except Exception as error:
        check(force=True)  # the rank that failed first, if it said why
        raise RuntimeError(f"kt_patch: rank {dist.get_rank()}: {what} failed: another rank left ({error})") from error


def gloo_group(process_group):
    """A gloo group of ``process_group``'s ranks, made once, for the expert-LoRA gradients alone: DDP's reducer
    issues its own collectives from the accelerator's autograd thread, and sharing a group with it would interleave
    theirs and ours in a different order on each rank."""
    key = tuple(dist.get_process_group_ranks(process_group))
    if key not in _GLOO_GROUPS:
        # only these ranks take part, so DDP on a subgroup (several data-parallel groups) makes no world-wide call
        _GLOO_GROUPS[key] = dist.new_group(ranks=list(key), backend="gloo", use_local_synchronization=True,
                                           timeout=datetime.timedelta(seconds=peer_timeout()))
    return _GLOO_GROUPS[key]
