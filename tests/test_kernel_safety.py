"""The C++ kernel's safety contract at the binding: jobs keep what they use alive, interrupts cancel them, contexts
belong to their layer, fork() children get an error instead of a hang, bad thread counts are refused.

Every case that crashed or hung before the fix runs in a subprocess with a timeout, so a regression fails the test
instead of killing the test run. Inputs are fresh random draws (never zeros or ones).
"""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from kt_patch import _C
from kt_patch.kernel import ExpertKernel
from moe_reference import random_batch, random_layer

TESTS = os.path.dirname(os.path.abspath(__file__))
RUN_SEED = random.randrange(1 << 20)

# The preamble of every subprocess: a small random layer with LoRA and a batch, in the child's own process.
PRELUDE = f"""
import gc, os, signal, sys, time
sys.path.insert(0, {TESTS!r})
import torch
from kt_patch import _C
from kt_patch.kernel import ExpertKernel, ExpertLora, LoraFactors
from moe_reference import random_batch, random_layer
SEED = {RUN_SEED}
E, H, I, T, k = 8, 96, 64, 300, 4
weights, lora_gu, lora_dn = random_layer(E, H, I, 8, 8, torch.bfloat16, SEED)
x, ids, w, dy = random_batch(T, H, E, k, torch.bfloat16, SEED + 1)
LORA = ExpertLora(LoraFactors(*lora_gu), LoraFactors(*lora_dn))

def make_kernel(name="moe", threads=2):
    return ExpertKernel(*weights, name=name, threads=threads)

def step(kernel):
    y, ctx = kernel.forward(x, ids, w, LORA, save_for_backward=True)
    dx, dw = kernel.backward(ctx, dy, ctx.new_lora_grads(zeroed=False), accumulate=False)
    return y, dx, dw
"""


def run_child(body, timeout=60, **kwargs):
    """Runs PRELUDE + body in a fresh interpreter; returns the finished process (stdout, stderr as text)."""
    code = PRELUDE + textwrap.dedent(body)
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                              **kwargs)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"child hung for {timeout} s (run seed {RUN_SEED}); stdout: {e.stdout!r} stderr: {e.stderr!r}")


def assert_ok(proc):
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        f"child exited {proc.returncode} (run seed {RUN_SEED}): stdout {proc.stdout[-2000:]!r} "
        f"stderr {proc.stderr[-4000:]!r}")


def test_pending_dropped_before_wait_waits_for_its_job():
    """Dropping the handle (and the tensors) before wait() must not let the job write freed memory: the handle's
    destructor waits. The output held elsewhere then equals a waited run's."""
    assert_ok(run_child("""
        kernel = make_kernel()
        y_ref, _ = kernel.forward(x, ids, w, LORA)
        for _ in range(20):  # the ExpertKernel handle dropped at once, with every tensor it was given
            xi, idsi, wi = x.clone(), ids.clone(), w.clone()
            kernel.submit_forward(xi, idsi, wi, LORA, save_for_backward=True)
            del xi, idsi, wi
            gc.collect()
            torch.randn(T, H).mul_(3)  # reuse freed memory
        y = torch.empty_like(x)
        xi, idsi, wi = x.clone(), ids.clone(), w.clone()
        handle = kernel._layer.submit_forward(T, k, xi.data_ptr(), "bf16", idsi.data_ptr(), wi.data_ptr(),
                                              y.data_ptr(), False, kernel._lora_arg(LORA.gate_up),
                                              kernel._lora_arg(LORA.down), (xi, idsi, wi))
        del handle, xi, idsi, wi  # the destructor waits: y is complete afterwards
        assert torch.equal(y, y_ref), (y - y_ref).abs().max()
        print("ok")
    """))


def test_kernel_dropped_while_its_job_runs():
    """The job holds its layer (weights, buffers, thread pool): dropping the kernel object first is safe, also when
    the job then holds the last reference and releases the pool on one of the pool's own threads."""
    assert_ok(run_child("""
        y_ref, dx_ref, dw_ref = step(make_kernel())
        for i in range(30):
            kernel = make_kernel(threads=3)  # a thread count of its own: its pool goes when the kernel goes
            pending = kernel.submit_forward(x, ids, w, LORA, save_for_backward=True)
            del kernel
            gc.collect()
            if i % 2:
                y, _ = pending.wait()
                assert torch.equal(y, y_ref)
            del pending
        print("ok")
    """))


def test_interrupt_cancels_the_job_and_raises():
    """A KeyboardInterrupt during wait() stops the job at its next work item (the slow portable backend on a
    large batch would take seconds), raises promptly, and leaves the kernel usable; the cancelled handle's second
    wait() says the job was cancelled."""
    assert_ok(run_child("""
        big = ExpertKernel(*random_layer(8, 512, 512, 8, 8, torch.bfloat16, SEED + 2)[0], isa="scalar", threads=2)
        bx, bids, bw, _ = random_batch(4096, 512, 8, 4, torch.bfloat16, SEED + 3)
        def interrupt(*_):
            raise KeyboardInterrupt
        signal.signal(signal.SIGALRM, interrupt)
        pending = big.submit_forward(bx, bids, bw, save_for_backward=True)
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        start = time.monotonic()
        try:
            pending.wait()
            raise AssertionError("the forward was not interrupted")
        except KeyboardInterrupt:
            stopped = time.monotonic() - start
        assert stopped < 2.0, f"took {stopped:.2f} s to stop"
        try:
            pending.wait()
            raise AssertionError("a cancelled job's second wait() returned")
        except RuntimeError as e:
            assert "cancelled" in str(e), e
        kernel = make_kernel()
        reference = step(make_kernel(threads=1))
        assert all(torch.equal(a, b) for a, b in zip(step(kernel), reference))
        print("ok")
    """))


SIGINT_STORM = """
    kernel = make_kernel()
    reference = step(kernel)
    armed = False
    def interrupt(*_):
        if armed:
            raise KeyboardInterrupt
    signal.signal(signal.SIGINT, interrupt)
    print("ready", flush=True)
    done = interrupted = 0
    deadline = time.monotonic() + {seconds}
    while time.monotonic() < deadline:
        try:
            armed = True
            step(kernel)
            armed = False
            done += 1
        except KeyboardInterrupt:
            armed = False
            interrupted += 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    assert all(torch.equal(a, b) for a, b in zip(step(kernel), reference)), "results changed after interrupts"
    print(f"steps {{done}} interrupted {{interrupted}}")
    print("ok")
"""


def sigint_storm(seconds):
    """Runs SIGINT_STORM in a child while sending it SIGINT every 0.2-3 ms; returns the finished process."""
    proc = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(SIGINT_STORM.format(seconds=seconds))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        end = time.monotonic() + seconds
        while time.monotonic() < end and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            time.sleep(random.uniform(0.0002, 0.003))
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"child hung after the interrupts: {out!r} {err!r}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_sigint_storm_never_crashes():
    """KeyboardInterrupt anywhere: between submit and wait (the handle dropped while the job runs), inside wait()
    (the job cancelled), in torch or kernel.py code. The process must never crash, and results stay exact."""
    proc = sigint_storm(seconds=2.0)
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}: {proc.stderr[-4000:]}"
    assert_ok(proc)


def test_context_of_another_layer_is_rejected():
    big_w, gu, dn = random_layer(8, 48, 32, 4, 4, torch.float32, RUN_SEED)
    small_w, _, _ = random_layer(2, 48, 32, 0, 0, torch.float32, RUN_SEED + 1)
    big = ExpertKernel(*big_w, name="layers.1.big", threads=2)
    small = ExpertKernel(*small_w, name="layers.2.small", threads=2)
    x, ids, w, dy = random_batch(17, 48, 8, 2, torch.float32, RUN_SEED + 2)
    _, ctx = big.forward(x, ids, w, save_for_backward=True)
    with pytest.raises(ValueError, match=r"layers\.2\.small: .*'layers\.1\.big'"):
        small.backward(ctx, dy)
    dx, dw = big.backward(ctx, dy)  # its own layer takes it
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()


def test_fork_child_gets_an_error_not_a_hang():
    """The pool's threads do not exist in a fork() child: calling a kernel made before the fork raises, waiting
    for a job submitted before it raises, a kernel made in the child works, and exiting the child does not hang."""
    assert_ok(run_child("""
        kernel = make_kernel()
        y_ref, _ = kernel.forward(x, ids, w, LORA)
        pending = kernel.submit_forward(x, ids, w, LORA)
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                kernel.forward(x, ids, w, LORA)
                status = 3
            except RuntimeError as e:
                status = 0 if "does not survive fork()" in str(e) else 4
            try:
                pending.wait()
                status = status or 5
            except RuntimeError:
                pass
            fresh = make_kernel()
            y, _ = fresh.forward(x, ids, w, LORA)
            status = status or (0 if torch.equal(y, y_ref) else 6)
            del kernel, pending, fresh
            gc.collect()
            os._exit(status)
        y, _ = pending.wait()
        assert torch.equal(y, y_ref)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        print("ok")
    """, timeout=60))


def test_fork_child_exits_without_waiting_for_the_parents_threads():
    """A child that never calls the kernel exits normally (interpreter teardown frees the kernel)."""
    assert_ok(run_child("""
        kernel = make_kernel()
        kernel.forward(x, ids, w, LORA)
        pid = os.fork()
        if pid == 0:
            sys.exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        print("ok")
    """, timeout=60))


@pytest.mark.parametrize("threads", [0, -3, 4097, 100000])
def test_thread_count_out_of_range_is_refused(threads):
    gu, dn = (t.contiguous() for t in random_layer(2, 16, 16, 0, 0, torch.float32, RUN_SEED)[0])
    with pytest.raises(ValueError, match=rf"layer: threads must be in \[1, 4096\], got {threads}"):
        _C.MoELayer("layer", 2, 16, 16, gu.data_ptr(), dn.data_ptr(), "f32", "auto", threads)


def test_set_profiling_switches_the_profile():
    weights, gu, dn = random_layer(4, 32, 16, 4, 4, torch.float32, RUN_SEED)
    kernel = ExpertKernel(*weights, threads=2)
    x, ids, w, _ = random_batch(9, 32, 4, 2, torch.float32, RUN_SEED + 1)
    try:
        _C.set_profiling(False)
        _C.profile(reset=True)
        kernel.forward(x, ids, w)
        assert _C.profile() == {}
        _C.set_profiling(True)
        kernel.forward(x, ids, w)
        phases = _C.profile(reset=True)
        assert phases and all(name.startswith("forward.") for name in phases), phases
        assert all(seconds >= 0 and calls == 1 for seconds, calls in phases.values()), phases
        assert _C.profile() == {}
    finally:
        _C.set_profiling(False)


def test_lora_factors_value():
    A, B = torch.randn(8, 32), torch.randn(16, 8)
    f = _C.LoraFactors(A.data_ptr(), B.data_ptr(), "f32", 2, 0.75)
    assert (f.A, f.B, f.dtype, f.rank, f.scaling) == (A.data_ptr(), B.data_ptr(), "f32", 2, 0.75)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        _C.LoraFactors(A.data_ptr(), B.data_ptr(), "f32", 0, 1.0)
    with pytest.raises(ValueError, match="dtype must be 'bf16' or 'f32'"):
        _C.LoraFactors(A.data_ptr(), B.data_ptr(), "f16", 2, 1.0)
