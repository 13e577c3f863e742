"""One host copy of the experts for several local ranks: the shared-memory segment on its own (one process playing
both local ranks; tests/test_distributed.py runs real ranks)."""
import os
import subprocess
import sys

import pytest
import torch

from kt_patch import _C, options
from kt_patch.kernel import ExpertKernel
from kt_patch.options import OptionError

E, H, I = 8, 64, 32


def weights(experts=E):
    g = torch.Generator().manual_seed(0)
    return torch.randn(experts, 2 * I, H, generator=g), torch.randn(experts, H, I, generator=g)


def shared(name, rank, timeout=5.0):
    return dict(shared_weights=name, local_rank=rank, local_world_size=2, peer_timeout=timeout)


def test_opener_maps_the_creators_weights_and_the_name_goes(tmp_path):
    name = f"kt_patch.test.{os.getpid()}.a"
    own = ExpertKernel(*weights(), threads=1)
    creator = ExpertKernel(*weights(), threads=1, **shared(name, 0))
    assert os.path.exists(f"/dev/shm/{name}")
    opener = ExpertKernel(*weights(), threads=1, **shared(name, 1))
    assert not os.path.exists(f"/dev/shm/{name}")  # every local rank mapped it: unlinked
    assert opener.weights_read_only and not creator.weights_read_only and opener.shared_name == name
    x, ids = torch.randn(5, H), torch.randint(0, E, (5, 2))
    w = torch.rand(5, 2)
    expected, _ = own.forward(x, ids, w)
    for kernel in (creator, opener):
        torch.testing.assert_close(kernel.forward(x, ids, w)[0], expected, rtol=0, atol=0)
    del creator  # the opener's mapping stays valid
    torch.testing.assert_close(opener.forward(x, ids, w)[0], expected, rtol=0, atol=0)
    for exported, given in zip(opener.export_weights(), weights()):
        torch.testing.assert_close(exported, given, rtol=0, atol=0)


def test_opener_times_out_naming_layer_and_segment():
    name = f"kt_patch.test.{os.getpid()}.missing"
    with pytest.raises(RuntimeError, match=rf"layers\.3\.mlp: .*/dev/shm/{name}: timed out after 0 s"):
        ExpertKernel(*weights(), name="layers.3.mlp", threads=1, **shared(name, 1, timeout=0.2))


def test_opener_refuses_another_layout():
    name = f"kt_patch.test.{os.getpid()}.layout"
    creator = ExpertKernel(*weights(), threads=1, **shared(name, 0))
    with pytest.raises(RuntimeError, match="another layout"):
        ExpertKernel(*weights(experts=4), threads=1, **shared(name, 1, timeout=1.0))
    del creator  # waits a few seconds for the missing rank, then removes the name
    assert not os.path.exists(f"/dev/shm/{name}")


def test_segment_of_a_killed_creator_is_removed():
    name = f"kt_patch.test.{os.getpid()}.stale"
    code = ("import os, torch; from kt_patch.kernel import ExpertKernel; "
            f"k = ExpertKernel(torch.zeros(2, 8, 16), torch.zeros(2, 16, 4), threads=1, shared_weights={name!r}, "
            "local_rank=0, local_world_size=2); os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert os.path.exists(f"/dev/shm/{name}")  # killed before the other rank mapped it
    assert _C.remove_stale_shared_weights(f"kt_patch.test.{os.getpid()}.") == 1
    assert not os.path.exists(f"/dev/shm/{name}")


def test_options(monkeypatch):
    assert options.Options().share_weights == "auto"
    assert options.Options(share_weights="OFF").share_weights == "off"
    with pytest.raises(OptionError, match="share_weights"):
        options.Options(share_weights="on")
    with pytest.raises(OptionError, match="peer_timeout"):
        options.Options(peer_timeout=0)
    assert options.resolve(environ={"KT_PEER_TIMEOUT": "30"}).peer_timeout == 30.0
    monkeypatch.setattr(options, "physical_cores_available", lambda: 16)
    monkeypatch.setattr(options, "_feeds_accelerator", lambda: False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert options.default_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert options.default_threads() == 16
