"""Re-training engine on the CPU: tiny ``vim_test`` model (32 px, 4 layers), generated
ImageFolder data (10 classes x 8 train + 4 val PNGs), ``smoke`` recipe (no Mixup, no
RandAugment, no drop path, fp32, ``num_workers=0``), one intra-op thread (fast and reproducible
on a shared 2-core machine)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import compressor.engine.loop as loop
from compressor.cli import app
from compressor.engine import NonFiniteLoss, TrainingInterrupted, distill_kl, fit, load_checkpoint, make_student
from compressor.engine._build import build_optimizer, build_scheduler
from compressor.engine._state import TrainState
from compressor.engine.distributed import Dist
from compressor.engine.loss import build_criterion
from compressor.errors import RmeetoError
from compressor import load_model
from compressor.recipes import load_recipe, with_overrides
from helpers import make_image_folder, zoo_checkpoint

REPO = Path(__file__).resolve().parents[1]
FILES = {"compressed.pt", "best.pt", "checkpoint.pt", "log.jsonl", "summary.md"}
RUN = dict(batch_size=16, lr=1e-2, log_every=100)  # 5 steps per epoch; lr high enough to move weights


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return zoo_checkpoint(tmp_path_factory.mktemp("ckpt"))


def teacher(ckpt: Path):
    return load_model(ckpt)


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"weights differ: {different[:5]}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data, ckpt) -> Path:
    """Two epochs (10 steps) without interruption: the reference for the resume tests."""
    out = tmp_path_factory.mktemp("uninterrupted")
    torch.set_num_threads(1)
    fit(None, teacher(ckpt), load_recipe("smoke"), data, out, epochs=2, **RUN)
    return out


# --------------------------------------------------------------------------------------------
# end to end


def test_cli_one_epoch_writes_all_outputs(tmp_path, data, ckpt):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["compress", str(ckpt), "--recipe", "smoke", "--retrain-epochs", "1",
                                   "--data", str(data), "-o", str(out), "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert FILES <= {p.name for p in out.iterdir()}
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    assert {"train_loss", "lr", "val_top1", "val_top5", "val_loss", "images_per_s", "time_s"} <= records[0].keys()
    summary = (out / "summary.md").read_text()
    assert "original" in summary and "training-free" in summary and "re-trained 1 epoch" in summary
    assert "R-MeeTo re-training" in res.output  # the rich table
    for name in ("compressed.pt", "best.pt"):
        model = load_model(out / name)
        assert model.recipe.name == "smoke" and model.recipe.retrain.seed == 3 and len(model.steps) == 1
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1

    res = CliRunner().invoke(app, ["eval", str(out / "compressed.pt"), "--data", str(data), "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert "top-1" in res.output and "images/s" in res.output and "17 → 15" in res.output


def test_loss_decreases_on_a_fixed_batch(ckpt):
    torch.manual_seed(0)
    recipe = with_overrides(load_recipe("smoke"), epochs=1)
    model = teacher(ckpt)
    student = make_student(model, recipe)
    optimizer = build_optimizer(student, 5e-3, 0.05)
    state = TrainState(
        model=student, student=student, teacher=model, criterion=build_criterion(recipe.retrain, False, True),
        optimizer=optimizer, scheduler=build_scheduler(optimizer, recipe.retrain, 20), dist=Dist(),
    )
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    losses = [train_step_loss(state, x, y) for _ in range(10)]
    assert all(p.requires_grad for p in student.parameters())
    assert losses[-1] < 0.7 * losses[0], losses


def train_step_loss(state, x, y) -> float:
    return float(loop.train_step(state, x, y))


def test_distill_kl_is_batchmean_kl_times_t_squared():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    p_t = torch.softmax(t / 2, -1)
    want = (p_t * (p_t.log() - torch.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    assert torch.allclose(distill_kl(s, t, 2.0), want, atol=1e-6)
    assert distill_kl(t, t).abs() < 1e-6


# --------------------------------------------------------------------------------------------
# resume


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    import compressor.engine.loop as loop
    from compressor import load_model
    from compressor.recipes import load_recipe
    torch.set_num_threads(1)
    ckpt, data, out, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    real_step = loop.train_step
    def step(state, *args):
        if state.step == kill_at:  # optimizer steps done so far
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(state, *args)
    loop.train_step = step
    loop.fit(None, load_model(ckpt), load_recipe("smoke"), data, out, epochs=2, batch_size=16, lr=1e-2, log_every=100)
""")


def test_resume_after_sigkill_matches_uninterrupted(tmp_path, data, ckpt, uninterrupted):
    out = tmp_path / "killed"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), str(ckpt), str(data), str(out), "7"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]  # killed in the middle of epoch 2
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1  # the last complete checkpoint
    assert not (out / "compressed.pt").exists()

    fit(None, teacher(ckpt), load_recipe("smoke"), data, out, epochs=2, resume=True, **RUN)
    assert_same_weights(uninterrupted / "compressed.pt", out / "compressed.pt")
    a, b = (load_checkpoint(p / "checkpoint.pt") for p in (uninterrupted, out))
    assert all(torch.equal(a["optimizer"]["state"][k]["exp_avg"], b["optimizer"]["state"][k]["exp_avg"]) for k in a["optimizer"]["state"])
    assert [r["epoch"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())] == [1, 2]


def test_ctrl_c_saves_mid_epoch_and_resumes_exactly(tmp_path, data, ckpt, uninterrupted, monkeypatch):
    out = tmp_path / "interrupted"
    real_step = loop.train_step

    def step(state, *args):
        loss = real_step(state, *args)
        if state.step == 7:  # Ctrl-C during step 7 (2 steps into epoch 2)
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(loop, "train_step", step)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="step 2/5.*--resume"):
        fit(None, teacher(ckpt), load_recipe("smoke"), data, out, epochs=2, **RUN)
    ckpt_state = load_checkpoint(out / "checkpoint.pt")
    assert (ckpt_state["epoch"], ckpt_state["step"], ckpt_state["step_in_epoch"]) == (1, 7, 2)
    assert signal.getsignal(signal.SIGINT) is handler  # the Ctrl-C handler is restored

    monkeypatch.setattr(loop, "train_step", real_step)
    fit(None, teacher(ckpt), load_recipe("smoke"), data, out, epochs=2, resume=True, **RUN)
    assert_same_weights(uninterrupted / "compressed.pt", out / "compressed.pt")


def test_resume_refuses_other_settings_and_fresh_run_refuses_existing_checkpoint(data, ckpt, uninterrupted):
    with pytest.raises(RmeetoError, match=r"differs in retrain\.lr"):
        fit(None, teacher(ckpt), load_recipe("smoke"), data, uninterrupted, epochs=2, resume=True, batch_size=16, lr=1e-3)
    with pytest.raises(RmeetoError, match="--resume"):
        fit(None, teacher(ckpt), load_recipe("smoke"), data, uninterrupted, epochs=2, **RUN)


def test_nan_loss_stops_with_a_message_and_keeps_the_checkpoint(tmp_path, data, ckpt, monkeypatch):
    out = tmp_path / "nan"
    real_step = loop.train_step

    def step(state, *args):
        if state.step == 2:
            with torch.no_grad():
                state.student.head.weight.fill_(float("nan"))
        return real_step(state, *args)

    monkeypatch.setattr(loop, "train_step", step)
    with pytest.raises(NonFiniteLoss, match=r"loss became nan at epoch 1.*checkpoint\.pt keeps the last good state"):
        fit(None, teacher(ckpt), load_recipe("smoke"), data, out, epochs=1, **RUN)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "compressed.pt").exists()


# --------------------------------------------------------------------------------------------
# user mistakes: exit 1 with one line, before any training


def _bad_data(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    root, out = tmp_path / "d", tmp_path / "out"
    if kind == "missing":
        return root, out
    if kind == "no-val":
        make_image_folder(root, classes=2, val=0)
        for d in (root / "val").iterdir():
            d.rmdir()
        (root / "val").rmdir()
    elif kind == "class-mismatch":
        make_image_folder(root)
        (root / "val" / "class9").rename(root / "val" / "other")
    elif kind == "head-mismatch":
        make_image_folder(root, classes=5)
    elif kind == "empty-class":
        make_image_folder(root)
        for f in (root / "train" / "class3").iterdir():
            f.unlink()
    elif kind == "unwritable-out":
        make_image_folder(root, classes=10, train=2, val=1)
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"  # a path below a regular file cannot be created (even by root)
    return root, out


@pytest.mark.parametrize("kind,needle", [
    ("missing", "does not exist"),
    ("no-val", "no val/ (or test/)"),
    ("class-mismatch", "different classes"),
    ("head-mismatch", "5 classes but the model's head has 10"),
    ("empty-class", "holds no images"),
    ("unwritable-out", "cannot write"),
])
def test_bad_inputs_exit_1_with_one_line(tmp_path, ckpt, kind, needle):
    data, out = _bad_data(tmp_path, kind)
    res = CliRunner().invoke(app, ["compress", str(ckpt), "--recipe", "smoke", "--retrain-epochs", "1",
                                   "--data", str(data), "-o", str(out)])
    assert res.exit_code == 1, res.output
    text = res.output.strip()
    assert len(text.splitlines()) == 1 and text.startswith("error:") and needle in text, text
    assert not out.exists()  # checked first, created after


def test_eval_refuses_data_with_another_class_count(tmp_path, ckpt):
    data = make_image_folder(tmp_path / "five", classes=5, train=1, val=1)
    res = CliRunner().invoke(app, ["eval", str(ckpt), "--data", str(data), "--workers", "0"])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert "5 classes but the model's head has 10" in res.output


def test_cifar_layout_test_split_is_accepted_as_val(tmp_path, ckpt):
    from compressor.engine import check_data_dir

    root = make_image_folder(tmp_path / "cifar", classes=10, train=1, val=1, val_name="test")
    spec = check_data_dir(root, num_classes=10)
    assert spec.val.name == "test" and len(spec.classes) == 10


# --------------------------------------------------------------------------------------------
# two processes (gloo) under torchrun


DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    import compressor._io as io
    from compressor.engine import fit
    from compressor import load_model
    from compressor.recipes import load_recipe
    ckpt, data, out, log = sys.argv[1:5]
    real_write = io.atomic_write
    def write(path, fn):  # record who writes what
        with open(f"{log}.rank{os.environ.get('RANK', '0')}", "a") as f:
            f.write(f"{path}\\n")
        return real_write(path, fn)
    io.atomic_write = write
    fit(None, load_model(ckpt), load_recipe("smoke"), data, out, epochs=1, batch_size=8, lr=5e-2, no_aug=True,
        device="cpu", log_every=100)
""")


@pytest.mark.slow
def test_torchrun_two_processes_match_one_with_the_same_global_batch(tmp_path, data, ckpt):
    script, out2 = tmp_path / "ddp.py", tmp_path / "two"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(ckpt), str(data), str(out2), str(tmp_path / "writes")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("re-training smoke:") == 1  # only rank 0 prints
    assert (tmp_path / "writes.rank0").read_text() and not (tmp_path / "writes.rank1").exists()  # only rank 0 writes

    out1 = tmp_path / "one"
    fit(None, teacher(ckpt), load_recipe("smoke"), data, out1, epochs=1, batch_size=16, lr=5e-2, no_aug=True,
        device="cpu", log_every=100)
    w1, w2 = weights(out1 / "compressed.pt"), weights(out2 / "compressed.pt")
    moved = max((w1[k] - weights_init(ckpt)[k]).abs().max().item() for k in w1)
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert moved > 1e-3 and diff < 1e-4, (moved, diff)
    l1, l2 = (json.loads((o / "log.jsonl").read_text()) for o in (out1, out2))
    assert abs(l1["train_loss"] - l2["train_loss"]) < 1e-4 and l1["val_top1"] == l2["val_top1"]


def weights_init(ckpt: Path) -> dict:
    return torch.load(ckpt, weights_only=True)["model"]
