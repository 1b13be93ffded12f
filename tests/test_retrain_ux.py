"""What a user meets around re-training, through ``rmeeto compress`` (typer's CliRunner): the
recipe's epochs by default when data is given, a resume with another batch size, refusals that
say what to do, no output folder left behind by a failed check, a warning for a negligible
learning rate, and progress lines with real precision at least every minute without a terminal."""

from __future__ import annotations

import io
import json
import os
import signal
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

import compressor.engine.loop as loop
from compressor.cli import app
from compressor.engine import TrainingInterrupted, fit, load_checkpoint
from compressor.engine._build import lr_warning
from compressor.engine._progress import Reporter, fmt_rate
from compressor import load_model
from compressor.recipes import load_recipe, with_overrides
from helpers import make_image_folder, zoo_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), train=4, val=1)  # 40 train images


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return zoo_checkpoint(tmp_path_factory.mktemp("ckpt"))


def _compress(ckpt, out, *args):
    return runner.invoke(app, ["compress", str(ckpt), "--recipe", "smoke", "-o", str(out), *map(str, args)])


def _epochs(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_data_without_epochs_retrains_the_recipes_epochs_and_warns_of_a_tiny_lr(ckpt, data, tmp_path):
    res = _compress(ckpt, tmp_path / "a", "--data", data, "--batch-size", 8)
    assert res.exit_code == 0, res.output
    assert "re-training 1 epoch(s), the recipe's (smoke); --retrain-epochs 0 writes the training-free model" in res.output
    assert _epochs(tmp_path / "a") == [1] and load_model(tmp_path / "a" / "compressed.pt").extra["retrain_epochs"] == 1
    # smoke's lr 2e-5 per 512 at batch 8 is 3.1e-7: one line that names --lr
    warning = next(ln for ln in res.output.splitlines() if ln.startswith("warning:"))
    assert f"to {2e-5 * 8 / 512:.3g} at global batch 8" in warning and "--lr 0.00128 trains at 2e-05" in warning

    res = _compress(ckpt, tmp_path / "b", "--data", data, "--retrain-epochs", 0)
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "b" / "checkpoint.pt").exists() and load_model(tmp_path / "b" / "compressed.pt").extra["retrain_epochs"] == 0
    assert "warning" not in res.output and "re-training" not in res.output


def test_lr_warning_bounds():
    rt = load_recipe("smoke").retrain  # lr 2e-5 per 512
    assert lr_warning(with_overrides(load_recipe("smoke"), batch_size=512).retrain, 1) == ""
    assert "6.25e-07" in lr_warning(rt, 1)  # batch 16: below 1e-6
    big = with_overrides(load_recipe("smoke"), lr=1e-3, batch_size=16).retrain  # 3.1e-5: above 1e-6, 3% of the base
    assert f"{1e-3 * 16 / 512:.3g}" in lr_warning(big, 1)
    assert lr_warning(with_overrides(load_recipe("smoke"), lr=1e-3, batch_size=32).retrain, 1) == ""  # 6.25% of the base


def _interrupt_at(monkeypatch, step: int) -> None:
    real = loop.train_step

    def train_step(state, *args):
        loss = real(state, *args)
        if state.step == step:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(loop, "train_step", train_step)


def test_resume_with_another_batch_size_says_what_changes(ckpt, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _interrupt_at(monkeypatch, 2)  # batch 8: 5 steps per epoch; stopped after 2 steps = 16 images
    with pytest.raises(TrainingInterrupted):
        fit(None, load_model(ckpt), load_recipe("smoke"), data, out, epochs=2, batch_size=8, lr=1e-2, log_every=100)
    monkeypatch.undo()
    assert load_checkpoint(out / "checkpoint.pt")["step_in_epoch"] == 2

    res = _compress(ckpt, out, "--data", data, "--retrain-epochs", 2, "--batch-size", 4, "--lr", 1e-2, "--resume")
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("batch 4 instead"))
    assert line == ("batch 4 instead of the checkpoint's 8: lr 0.000156 -> 7.81e-05 (base 0.01 per 512, scaled linearly), "
                    "5 -> 10 steps per epoch; the interrupted epoch continues after the images it had done")
    assert "resuming" in res.output and "from step 4 of epoch 1" in res.output  # 16 images = 4 batches of 4
    assert _epochs(out) == [1, 2]
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["step"] == 20 and ck["recipe"]["retrain"]["batch_size"] == 4  # 2 epochs x 10 steps of the new schedule


def test_refusals_say_exactly_what_to_do(ckpt, data, tmp_path):
    out = tmp_path / "done"
    assert _compress(ckpt, out, "--data", data, "--batch-size", 8, "--lr", 1e-2).exit_code == 0
    res = _compress(ckpt, out, "--data", data, "--batch-size", 8)
    assert res.exit_code == 1 and "--resume (a different --batch-size is fine)" in res.output
    assert f"after deleting {out / 'checkpoint.pt'}" in res.output.replace("\n", "")
    res = _compress(ckpt, out, "--data", data, "--batch-size", 8, "--lr", 1e-3, "--resume")
    assert res.exit_code == 1
    text = " ".join(res.output.split())
    assert "differs in retrain.lr (checkpoint 0.01, now 0.001); pass --lr 0.01 (the original run's)" in text
    res = _compress(ckpt, out, "--data", data, "--batch-size", 8, "--lr", 1e-2, "--no-distill", "--resume")
    assert res.exit_code == 1 and "pass --distill (as the original run)" in " ".join(res.output.split())


@pytest.mark.parametrize("args, needle", [
    (["--data", "{tmp}/missing"], "does not exist"),
    (["--data", "{data}", "--batch-size", "64"], "lower --batch-size"),
    (["--data", "{data}", "--recipe", "nope"], "unknown recipe"),
    (["--retrain-epochs", "1"], "needs --data"),
])
def test_failed_checks_leave_no_output_folder(ckpt, data, tmp_path, args, needle):
    out = tmp_path / "never" / "out"
    args = [a.replace("{tmp}", str(tmp_path)).replace("{data}", str(data)) for a in args]
    res = _compress(ckpt, out, *args)
    assert res.exit_code == 1 and needle in res.output, res.output
    assert not (tmp_path / "never").exists()


def test_progress_lines_have_real_precision():
    assert [fmt_rate(v) for v in (0.0527, 7.414, 95.31, 1234.4)] == ["0.0527", "7.41", "95.3", "1234"]
    buf = io.StringIO()
    r = Reporter(console=Console(file=buf, width=200), tty=False)
    r.start_epoch(0, 3, 40)
    r.update(12, 2.3456, 6.25e-7, 0.05)
    assert buf.getvalue().startswith("epoch 1/3 step 12/40  loss 2.3456  lr 6.25e-07  0.05 img/s  eta ")


def test_heartbeat_without_a_terminal(monkeypatch):
    buf = io.StringIO()
    with Reporter(console=Console(file=buf, width=200), tty=False, heartbeat_s=0.2) as r:
        r.status("epoch 1/1 step 1/40")
        time.sleep(0.6)
    assert "epoch 1/1 step 1/40: still running" in buf.getvalue()
    with Reporter(console=Console(file=io.StringIO()), tty=True, heartbeat_s=0.2) as r:
        assert r._thread is None  # a terminal has its progress bar


def test_loop_reports_by_the_clock_without_a_terminal(ckpt, data, tmp_path, monkeypatch):
    monkeypatch.setattr(Reporter, "interval_s", property(lambda self: 0.0))  # "a minute" has passed after each step
    res = _compress(ckpt, tmp_path / "o", "--data", data, "--batch-size", 8, "--lr", 1e-2)
    assert res.exit_code == 0, res.output
    steps = [ln.split()[3] for ln in res.output.splitlines() if ln.startswith("epoch 1/1 step ")]
    assert steps == ["1/5", "2/5", "3/5", "4/5", "5/5"]  # log_every is 20: only the clock made these
