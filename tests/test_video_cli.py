"""Clips through every command: the video data path (PyAV decoding, segment sampling, per-clip
transforms), and compress (with re-training), eval, export, info, visualize and profile on a tiny
video model and clips made here."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from compressor import load_model
from compressor.cli import app
from compressor.engine.clips import (ClipFolder, ClipMixup, build_clip_eval_transform, build_clip_train_transform,
                                     read_clip, sample_indices)
from compressor.engine.data import build_mixup, check_data_dir
from compressor.errors import RmeetoError
from compressor.models import create_model
from compressor.recipes import RetrainConfig
from helpers import make_clip_folder, make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = 3


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """3 classes of moving squares: train/ as MPEG-4 files, val/ as folders of PNG frames."""
    return make_clip_folder(tmp_path_factory.mktemp("clips") / "data", classes=CLASSES, train=4, val=2,
                            as_frames=("val",))


@pytest.fixture(scope="module")
def video_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("videomamba_video_test", num_classes=CLASSES)
    path = tmp_path_factory.mktemp("ckpt") / "video_t.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(model="videomamba_video_test")}, path)
    return path


# ---------------------------------------------------------------- sampling and decoding


def test_segment_sampling_known_answers():
    assert sample_indices(16, 4, train=False) == [2, 6, 9, 13]  # the middle of each quarter of 0..15
    assert sample_indices(2, 4, train=False) == [0, 0, 0, 1]  # short clips repeat frames
    assert sample_indices(1, 3, train=True) == [0, 0, 0]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = sample_indices(30, 8, train=True, generator=g)
        seg = 29 / 8
        assert all(round(seg * i) <= j <= round(seg * (i + 1)) for i, j in enumerate(idx))
        assert idx == sorted(idx)


def test_decoded_video_frames_are_the_sampled_ones(tmp_path):
    """Frame t of a written video is uniformly grey at level 20·t: the decoded clip's levels name
    the frames that were sampled (MPEG-4 is lossy, so within a few levels)."""
    import av

    path = tmp_path / "ramp.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for t in range(10):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * t, np.uint8), format="rgb24")))
        out.mux(stream.encode())
    clip = read_clip(path, 5)
    assert clip.shape == (5, 3, 32, 32) and clip.dtype == torch.uint8
    levels = clip.float().mean(dim=(1, 2, 3))
    want = torch.tensor([20.0 * i for i in sample_indices(10, 5, train=False)])
    assert (levels - want).abs().max() < 6, levels


def test_frame_folders_and_video_files_read_alike(clips):
    folder = clips / "val" / "class1" / "clip0"
    assert read_clip(folder, 4).shape == (4, 3, 32, 32)
    with pytest.raises(RmeetoError, match="does not exist"):
        read_clip(clips / "val" / "nope.mp4", 4)
    broken = clips.parent / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    with pytest.raises(RmeetoError, match="cannot decode the video"):
        read_clip(broken, 4)


def test_train_transform_draws_one_set_of_parameters_per_clip():
    """A clip of four identical frames stays four identical frames through crop, flip,
    RandAugment, erasing and CutMix/Mixup: every frame gets the same random parameters."""
    rt = RetrainConfig(reprob=1.0)  # erasing always on
    tf = build_clip_train_transform(24, rt)
    torch.manual_seed(0)
    frame = torch.randint(0, 256, (1, 3, 40, 48), dtype=torch.uint8)
    batch = torch.stack([tf(frame.expand(4, -1, -1, -1).clone()).transpose(0, 1) for _ in range(4)])  # (4, 3, 4, 24, 24)
    assert batch.shape == (4, 3, 4, 24, 24)
    mixup = build_mixup(rt, num_classes=3, clips=True)
    assert isinstance(mixup, ClipMixup)
    for _ in range(4):  # mixup or cutmix, chosen at random
        mixed, target = mixup(batch.clone(), torch.tensor([0, 1, 2, 0]))
        assert torch.equal(mixed, mixed[:, :, :1].expand_as(mixed)) and target.shape == (4, 3)
    ev = build_clip_eval_transform(24, 0.875)(frame.expand(2, -1, -1, -1))
    assert ev.shape == (2, 3, 24, 24) and torch.equal(ev[0], ev[1])


def test_clip_folders_are_checked_before_any_work(clips, tmp_path):
    spec = check_data_dir(clips, num_classes=CLASSES, clips=True)
    assert spec.classes == ("class0", "class1", "class2")
    ds = ClipFolder(spec.val, 4, build_clip_eval_transform(32), train=False)
    x, y = ds[0]
    assert len(ds) == 6 and x.shape == (3, 4, 32, 32) and y == 0
    images = make_image_folder(tmp_path / "images", classes=CLASSES, train=1, val=1)
    with pytest.raises(RmeetoError, match="holds no clips .* the model takes video clips"):
        check_data_dir(images, num_classes=CLASSES, clips=True)


def test_unsupported_auto_augment_for_clips_is_named():
    with pytest.raises(RmeetoError, match="clips support RandAugment"):
        build_clip_train_transform(32, replace(RetrainConfig(), auto_augment="augmix-m5"))


# ---------------------------------------------------------------- every command


def test_compress_retrain_eval_info_visualize_profile_on_clips(clips, video_ckpt, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    r = runner.invoke(app, ["compress", str(video_ckpt), "--recipe", "smoke", "--retrain-epochs", "1", "--data", str(clips),
                            "-o", str(out), "--batch-size", "4", "--workers", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    gm = load_model(out / "compressed.pt")
    assert gm.layout.input_shape == (3, 4, 32, 32) and gm.cfg.is_video and gm.steps[0].cls_out == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and np.isfinite(log[0]["train_loss"]) and log[0]["val_top1"] is not None

    r = runner.invoke(app, ["eval", str(out / "compressed.pt"), "--data", str(clips), "--workers", "0", "--device", "cpu"])
    assert r.exit_code == 0 and "top-1" in r.output and "6 (4 frames each)" in r.output, r.output
    r = runner.invoke(app, ["info", str(video_ckpt)])
    assert r.exit_code == 0 and "frames / tubelet" in r.output and "4 frames of 4x4" in r.output, r.output
    r = runner.invoke(app, ["info", str(out / "compressed.pt")])
    assert r.exit_code == 0 and "3x4x32x32" in r.output, r.output

    png = tmp_path / "merges.png"
    r = runner.invoke(app, ["visualize", str(video_ckpt), str(clips / "val" / "class0" / "clip0"),
                            str(clips / "train" / "class1" / "clip0.mp4"), "--recipe", "r031", "-o", str(png)])
    assert r.exit_code == 0 and "2 clip(s), 64 patches -> 54 tokens" in r.output, r.output
    assert png.read_bytes()[:4] == b"\x89PNG"

    r = runner.invoke(app, ["profile", str(out / "compressed.pt"), "-o", str(tmp_path / "report"), "--device", "cpu",
                            "--batch-sizes", "2", "--backends", "eager", "--repeats", "1", "--warmup", "0",
                            "--data", str(clips), "--workers", "0"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    merged = report["models"][1]
    assert merged["arch"]["num_frames"] == 4 and merged["tokens_per_layer"] == [65, 65, 63, 63]
    assert merged["accuracy"]["images"] == 6


def test_clip_evaluation_reports_progress_per_batch(clips, video_ckpt):
    from compressor.engine import evaluate_checkpoint

    calls = []
    m = evaluate_checkpoint(video_ckpt, clips, batch_size=4, num_workers=0, device="cpu",
                            progress=lambda what, done, total: calls.append((what, done, total)))
    assert calls == [("evaluating", 1, 2), ("evaluating", 2, 2)] and m["images"] == 6 and m["frames"] == 4


def test_a_video_model_refuses_image_folders_in_one_line(video_ckpt, tmp_path):
    images = make_image_folder(tmp_path / "images", classes=CLASSES, train=1, val=1)
    r = CliRunner().invoke(app, ["eval", str(video_ckpt), "--data", str(images), "--workers", "0", "--device", "cpu"])
    assert r.exit_code == 1 and "holds no clips" in r.output and "Traceback" not in r.output


def test_export_a_video_model_with_onnxruntime_parity(video_ckpt, tmp_path):
    from compressor.export import check_onnx_input
    from compressor.errors import ShapeError

    path = tmp_path / "video.onnx"
    r = CliRunner().invoke(app, ["export", str(video_ckpt), "--onnx", str(path)])
    assert r.exit_code == 0 and "1x3x4x32x32" in r.output, r.output
    rel = float(next(line for line in r.output.splitlines() if "max rel diff" in line).split()[-2])
    assert rel <= 1e-4
    check_onnx_input(path, (1, 3, 4, 32, 32))
    with pytest.raises(ShapeError, match="clips of 4 frames, got 8"):
        check_onnx_input(path, (1, 3, 8, 32, 32))
