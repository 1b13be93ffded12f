"""Fitting re-training to the machine: the batch to the memory (probe, estimate, one-line stop
or a lowered default), loader workers and intra-op threads to the cores."""

from __future__ import annotations

import os

import pytest
import torch

import compressor.engine._cpu as cpu
import compressor.engine._setup as setup
import compressor.engine.data as data_mod
from compressor.engine import fit, load_checkpoint, make_student
from compressor.engine._memory import (HARD_FRACTION, SHARE, StepMemory, available_bytes, fit_batch_size,
                                       largest_fitting_batch, probe_step_memory)
from compressor.errors import RmeetoError
from compressor.models import create_model
from compressor.recipes import load_recipe
from helpers import make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")
GB = 1e9


# --------------------------------------------------------------------------------------------
# the batch against the memory

MEM = StepMemory(per_image=0.05 * GB, fixed=0.1 * GB)  # 50 MB per image + 100 MB


def test_a_batch_that_fits_is_kept():
    assert fit_batch_size(128, explicit=False, mem=MEM, available=40 * GB) == (128, None)
    assert fit_batch_size(128, explicit=True, mem=MEM, available=8 * GB) == (128, None)  # 6.5 GB ≤ 90% of 8
    assert fit_batch_size(4096, explicit=True, mem=MEM, available=None) == (4096, None)  # unknown: unchecked


def test_the_recipes_default_is_lowered_to_a_share_of_the_memory_and_said_in_one_line():
    batch, note = fit_batch_size(128, explicit=False, mem=MEM, available=20 * GB)
    # 25% of 20 GB = 5 GB → (5 - 0.1) / 0.05 = 98 → 96 (a multiple of 8)
    assert batch == 96 and MEM.at(batch) <= SHARE["cpu"] * 20 * GB < MEM.at(batch + 8)
    assert "\n" not in note and "128" in note and "96" in note and "--batch-size" in note
    small, _ = fit_batch_size(128, explicit=False, mem=MEM, available=1.2 * GB)  # 0.3 GB → 4 (below 8: as is)
    assert small == 4


def test_an_explicit_batch_that_does_not_fit_stops_naming_one_that_does():
    with pytest.raises(RmeetoError) as e:
        fit_batch_size(256, explicit=True, mem=MEM, available=10 * GB)
    msg = str(e.value)
    want = largest_fitting_batch(MEM, HARD_FRACTION * 10 * GB)
    want -= want % 8
    assert "\n" not in msg and "--batch-size 256" in msg and f"--batch-size {want}" in msg
    assert MEM.at(want) <= HARD_FRACTION * 10 * GB
    with pytest.raises(RmeetoError, match="even at batch 1"):
        fit_batch_size(8, explicit=True, mem=MEM, available=0.1 * GB)


def test_available_bytes_reads_meminfo():
    got = available_bytes(torch.device("cpu"))
    if not os.path.exists("/proc/meminfo"):
        assert got is None
        return
    with open("/proc/meminfo") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    assert abs(got - kb * 1024) < 2 * GB  # read a moment apart: other processes move it


def test_probe_counts_what_autograd_keeps_and_leaves_the_rng_alone():
    torch.manual_seed(0)
    student = make_student(create_model("vim_test"), load_recipe("smoke"))
    shape = student.layout.input_shape
    state = torch.get_rng_state()
    mem = probe_step_memory(student, shape, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)  # a run stays reproducible
    assert student.training
    # what autograd keeps for 2 images, counted independently, scaled to one
    seen = {}
    params = {p.data_ptr() for p in student.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        student(torch.randn(2, *shape))
    kept = sum(seen.values()) / 2
    assert kept > 0
    assert kept < mem.per_image < 3 * kept + 4 * 4 * torch.Size(shape).numel()
    n_params = sum(p.numel() for p in student.parameters())
    assert mem.fixed == pytest.approx(3 * 4 * n_params)


def test_fit_lowers_the_recipes_batch_when_memory_is_short(tmp_path, monkeypatch, capsys):
    data = make_image_folder(tmp_path / "data")
    torch.manual_seed(0)
    teacher = create_model("vim_test")
    recipe = load_recipe("smoke")  # batch 16
    mem = probe_step_memory(make_student(teacher, recipe), (3, 32, 32), torch.device("cpu"))
    available = (mem.at(8) + 0.5 * mem.per_image) / SHARE["cpu"]  # room for 8 images, not 16
    monkeypatch.setattr(setup, "available_bytes", lambda device: int(available))
    out = tmp_path / "out"
    result = fit(None, teacher, recipe, data, out, epochs=1, log_every=100)
    assert result.recipe.retrain.batch_size == 8
    assert load_checkpoint(out / "checkpoint.pt")["recipe"]["retrain"]["batch_size"] == 8
    printed = capsys.readouterr().out
    assert "re-training with batch 8" in printed
    # an explicit batch may use up to 90% of the memory: 16 fits there...
    fit(None, teacher, recipe, data, tmp_path / "out2", epochs=1, batch_size=16, log_every=100)
    assert load_checkpoint(tmp_path / "out2" / "checkpoint.pt")["recipe"]["retrain"]["batch_size"] == 16
    # ...and when it does not: one line naming one that does, before any step or output
    available = (mem.at(8) + 0.5 * mem.per_image) / HARD_FRACTION
    with pytest.raises(RmeetoError) as e:
        fit(None, teacher, recipe, data, tmp_path / "out3", epochs=1, batch_size=16, log_every=100)
    assert "\n" not in str(e.value) and "--batch-size 16" in str(e.value) and "--batch-size 8 " in str(e.value)
    assert not (tmp_path / "out3" / "checkpoint.pt").exists()


# --------------------------------------------------------------------------------------------
# cores: loader workers and threads


@pytest.mark.parametrize("cores,cap,want", [(1, 8, 0), (2, 8, 1), (4, 8, 3), (32, 8, 8), (2, 0, 0)])
def test_loader_workers_follow_the_cores(monkeypatch, cores, cap, want):
    monkeypatch.setattr(data_mod, "usable_cores", lambda: cores)
    assert data_mod.auto_num_workers(cap) == want


def test_usable_cores_is_the_affinity():
    assert data_mod.usable_cores() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("load,want", [(0.0, 2), (0.4, 2), (0.6, 1), (1.0, 1), (1.9, 1), (8.0, 1)])
def test_threads_follow_the_cores_the_load_leaves(monkeypatch, load, want):
    monkeypatch.setattr(cpu, "usable_cores", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert cpu.free_cores() == want


def test_cpu_threads_sets_and_restores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "free_cores", lambda: 1)
    torch.set_num_threads(2)
    try:
        with cpu.cpu_threads(torch.device("cpu")) as n:
            assert n == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice wins
        with cpu.cpu_threads(torch.device("cpu")) as n:
            assert n is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
