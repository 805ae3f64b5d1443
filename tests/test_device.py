from types import SimpleNamespace

import pytest
import torch

from cellsynth import device as dev
from cellsynth.device import (
    DeviceOutOfMemoryError,
    available_devices,
    default_dtype,
    describe_device,
    oom_guard,
    resolve_device,
)


@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    props = SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=int(79.1 * 2**30))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)


def test_auto_falls_back_to_cpu(no_accelerator):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")
    assert available_devices() == ["auto", "cpu"]


def test_auto_prefers_cuda_then_mps(monkeypatch, no_accelerator):
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"


def test_explicit_devices(two_gpus):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CUDA ") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert available_devices() == ["auto", "cpu", "cuda", "cuda:0", "cuda:1"]


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x", "", "meta"])
def test_unknown_device_names_the_value(name):
    with pytest.raises(ValueError, match="unknown device") as info:
        resolve_device(name)
    assert repr(name) in str(info.value)


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "mps"])
def test_unavailable_device_lists_what_is_available(no_accelerator, name):
    with pytest.raises(ValueError, match="not available") as info:
        resolve_device(name)
    assert repr(name) in str(info.value)
    assert "auto, cpu" in str(info.value)


def test_cuda_index_out_of_range(two_gpus):
    with pytest.raises(ValueError, match="'cuda:2' is not available"):
        resolve_device("cuda:2")


def test_non_string_device_is_a_type_error():
    with pytest.raises(TypeError, match="int"):
        resolve_device(0)


def test_dtype_policy(no_accelerator):
    assert default_dtype("cuda") is torch.float16
    assert default_dtype(torch.device("cuda", 1)) is torch.float16
    assert default_dtype("cpu") is torch.float32
    assert default_dtype("mps") is torch.float32
    assert default_dtype("auto") is torch.float32  # auto resolves to the CPU here
    assert default_dtype("cuda", prefer="float32") is torch.float32
    assert default_dtype("cpu", prefer="float16") is torch.float16
    assert default_dtype("mps", prefer="bfloat16") is torch.bfloat16


def test_dtype_rejects_bad_values():
    with pytest.raises(ValueError, match="'half'"):
        default_dtype("cpu", prefer="half")
    with pytest.raises(ValueError, match="'tpu'"):
        default_dtype("tpu")


def test_describe_cpu(no_accelerator, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert describe_device("auto") == "CPU (2 threads)"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert describe_device("cpu") == "CPU (1 thread)"


def test_describe_cuda_and_mps(two_gpus, monkeypatch):
    assert describe_device("cuda:1") == "CUDA 1: NVIDIA H100 80GB HBM3 (79.1 GiB)"
    assert describe_device("auto").startswith("CUDA 0: ")
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    assert describe_device("mps") == "Apple MPS"


@pytest.fixture
def empty_cache_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    return calls


def test_oom_guard_converts_cuda_oom(empty_cache_calls):
    original = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(DeviceOutOfMemoryError) as info:
        with oom_guard("stylizing tile 3 of 8", device="cuda:0"):
            raise original
    message = str(info.value)
    assert "stylizing tile 3 of 8" in message
    assert "cuda:0" in message
    for advice in ("tile or batch size", "fewer steps", "'cpu'"):
        assert advice in message
    assert info.value.__cause__ is original
    assert isinstance(info.value, RuntimeError)
    assert empty_cache_calls == [1]


def test_oom_guard_converts_runtime_error_and_guesses_device(empty_cache_calls):
    with pytest.raises(DeviceOutOfMemoryError, match="during denoising on mps"):
        with oom_guard("denoising"):
            raise RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)")
    with pytest.raises(DeviceOutOfMemoryError, match="on cuda"):
        with oom_guard("denoising"):
            raise RuntimeError("CUDA out of memory. Tried to allocate 20 MiB")
    assert len(empty_cache_calls) == 2


def test_oom_guard_skips_empty_cache_without_cuda(no_accelerator, monkeypatch):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: pytest.fail("empty_cache called"))
    with pytest.raises(DeviceOutOfMemoryError, match="on cpu"):
        with oom_guard("counting", device=torch.device("cpu")):
            raise RuntimeError("DefaultCPUAllocator: out of memory")


def test_oom_guard_passes_other_errors_and_nests(no_accelerator):
    with pytest.raises(RuntimeError, match="shape mismatch") as info:
        with oom_guard("denoising"):
            raise RuntimeError("shape mismatch")
    assert not isinstance(info.value, DeviceOutOfMemoryError)
    with pytest.raises(KeyError):
        with oom_guard("denoising"):
            raise KeyError("x")
    with pytest.raises(DeviceOutOfMemoryError, match="during inner") as info:
        with oom_guard("outer"):
            with oom_guard("inner", device="cuda"):
                raise RuntimeError("out of memory")
    assert "outer" not in str(info.value)
    with oom_guard("nothing"):
        pass
