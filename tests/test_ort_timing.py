"""The onnxruntime execution backend of ``rmeeto profile`` (compressor.profile.timing): the CPU
provider timed for real on a tiny model; the CUDA provider's selection, export settings and IO
binding with the providers mocked (no GPU here: the GPU run is benchmarks/onnx_gpu.sh)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import compressor.export._runtime as ort_runtime
import compressor.export.onnx as onnx_export
import compressor.profile.timing as timing
from compressor.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cpu_provider_is_timed():
    torch.manual_seed(0)
    model = create_model("vim_test", depth=1).eval()
    cache: dict = {}
    try:
        row = timing.time_backend(model, "onnxruntime", torch.randn(2, 3, 32, 32), warmup=1, repeats=2, cache=cache)
    finally:
        timing.close_cache(cache)
    assert row["status"] == "ok" and row["device"] == "cpu" and row["latency_ms_median"] > 0
    assert "CPUExecutionProvider" in row["note"] and "float32" in row["note"]


class _FakeBinding:
    def __init__(self):
        self.inputs, self.outputs, self.runs = [], [], 0

    def bind_input(self, name, device, index, dtype, shape, ptr):
        self.inputs.append((name, device, dtype, shape))

    def bind_output(self, name, device, index):
        self.outputs.append((name, device))

    def synchronize_outputs(self):
        pass


class _FakeSession:
    def __init__(self):
        self.binding = _FakeBinding()

    def get_inputs(self):
        return [types.SimpleNamespace(name="image")]

    def get_outputs(self):
        return [types.SimpleNamespace(name="logits")]

    def io_binding(self):
        return self.binding

    def run_with_iobinding(self, binding):
        binding.runs += 1


class _CudaLike:
    """A CPU tensor that says it is on CUDA (what the runner reads of its input)."""

    def __init__(self, t):
        self.t, self.is_cuda, self.dtype, self.shape = t, True, t.dtype, t.shape

    def detach(self):
        return self.t


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_provider_chosen_for_cuda_inputs(monkeypatch, dtype):
    monkeypatch.setattr(ort_runtime, "cuda_available", lambda: True)
    made = []
    fake = _FakeSession()
    monkeypatch.setattr(timing, "_ort_session", lambda model, provider, dt: made.append((provider, dt)) or (None, fake))
    runner = timing.prepare_runner("onnxruntime", torch.nn.Identity(), _CudaLike(torch.zeros(2, 3, 8, 8, dtype=dtype)), {})
    assert made == [(ort_runtime.CUDA, dtype)]
    assert runner.device == "cuda" and runner.host_timed and "CUDAExecutionProvider" in runner.note
    stats = timing.measure(runner, 2, warmup=1, repeats=3)  # host-timed: no torch.cuda calls
    assert fake.binding.runs == 4 and stats["latency_ms_median"] >= 0 and stats["peak_memory_mb"] is None
    assert fake.binding.inputs == [("image", "cuda", np.float16 if dtype == torch.float16 else np.float32, (2, 3, 8, 8))]
    assert fake.binding.outputs == [("logits", "cuda")]


def test_cpu_provider_without_onnxruntime_gpu(monkeypatch):
    """CUDA inputs but no CUDA provider: the CPU provider is timed and the note says so."""
    monkeypatch.setattr(ort_runtime, "cuda_available", lambda: False)
    made = []
    session = types.SimpleNamespace(get_inputs=lambda: [types.SimpleNamespace(name="image")], run=lambda *a: None)
    monkeypatch.setattr(timing, "_ort_session", lambda model, provider, dt: made.append((provider, dt)) or (None, session))
    runner = timing.prepare_runner("onnxruntime", torch.nn.Identity(), _CudaLike(torch.zeros(1, 3, 8, 8, dtype=torch.float16)), {})
    assert made == [(ort_runtime.CPU, torch.float32)] and runner.device == "cpu"
    assert "onnxruntime-gpu is not installed" in runner.note


def test_cuda_session_is_an_ssd_export_in_the_model_dtype(monkeypatch):
    calls = {}

    def fake_export(model, path, **kw):
        calls["export"] = kw

    monkeypatch.setattr(onnx_export, "export_onnx", fake_export)
    monkeypatch.setattr(ort_runtime, "make_session", lambda path, chain: calls.setdefault("chain", chain) and _FakeSession())
    tmp, _ = timing._ort_session(create_model("vim_test", depth=1), ort_runtime.CUDA, torch.float16)
    tmp.cleanup()
    assert calls["export"]["scan"] == "ssd" and calls["export"]["fp16"] and calls["export"]["dynamic_batch"]
    assert calls["chain"] == [ort_runtime.CUDA, ort_runtime.CPU]
    tmp, _ = timing._ort_session(create_model("vim_test", depth=1), ort_runtime.CPU, torch.float32)
    tmp.cleanup()
    assert calls["export"]["scan"] is None and not calls["export"]["fp16"]
