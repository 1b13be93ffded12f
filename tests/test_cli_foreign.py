"""``--model-factory`` through the CLI: info, compress (training-free and re-trained), eval,
export, profile and visualize of a Vision Mamba class rmeeto did not write
(``foreign_models.official_like``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_image_folder
from PIL import Image
from typer.testing import CliRunner

from compressor import load_model
from compressor.cli import app
from compressor.convert import ConvertedModel, convert
from compressor.errors import RmeetoError

runner = CliRunner()
FACTORY = "foreign_models:official_like"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The user's model saved the official way: ``{'model': state_dict, 'epoch'}``."""
    import foreign_models

    path = tmp_path_factory.mktemp("foreign") / "mine.pth"
    torch.save({"model": foreign_models.official_like(seed=7).state_dict(), "epoch": 1}, path)
    return path


@pytest.fixture(scope="module")
def compressed(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    result = runner.invoke(app, ["compress", str(ckpt), "--model-factory", FACTORY, "--recipe", "r031", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out / "compressed.pt"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=10, train=2, val=2)


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    return lines[0]


def test_info_shows_what_the_converter_finds(ckpt):
    result = runner.invoke(app, ["info", str(ckpt), "--model-factory", FACTORY], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "4 in 'stages'" in out and "17 / 32" in out and "8 (cls_tok)" in out and "class token x[:, i]" in out
    assert "merges auto" in out


def test_compressed_file_loads_only_with_the_factory_named(compressed, ckpt):
    with pytest.raises(RmeetoError, match="--model-factory foreign_models:official_like"):
        load_model(compressed)
    gm = load_model(compressed, factory=FACTORY)
    assert isinstance(gm, ConvertedModel) and gm.recipe.name == "r031" and gm.layout.blocks == "stages"
    mine = load_model(ckpt, factory=FACTORY)  # the user's class with the checkpoint's (seed 7) weights
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(gm(x), convert(mine, "r031")(x), atol=1e-6)
    result = runner.invoke(app, ["info", str(compressed)], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "load with --model-factory foreign_models:official_like" in result.output


def test_eval_export_profile_visualize_take_the_factory(compressed, data, tmp_path):
    err = one_line_error(runner.invoke(app, ["eval", str(compressed), "--data", str(data), "--workers", "0"]))
    assert "--model-factory foreign_models:official_like" in err
    ok = ["--model-factory", FACTORY]
    res = runner.invoke(app, ["eval", str(compressed), "--data", str(data), "--workers", "0", "--batch-size", "4", *ok])
    assert res.exit_code == 0 and "top-1" in res.output, res.output
    res = runner.invoke(app, ["export", str(compressed), "--onnx", str(tmp_path / "m.onnx"), *ok])
    assert res.exit_code == 0 and (tmp_path / "m.onnx").is_file(), res.output
    res = runner.invoke(app, ["profile", str(compressed), "--device", "cpu", "--batch-sizes", "2", "--backends", "eager",
                              "--warmup", "1", "--repeats", "2", "--overhead", "none", "-o", str(tmp_path / "rep"), *ok])
    assert res.exit_code == 0 and (tmp_path / "rep" / "report.json").is_file(), res.output
    img = tmp_path / "a.png"
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(img)
    res = runner.invoke(app, ["visualize", str(compressed), str(img), "-o", str(tmp_path / "v.png"), *ok])
    assert res.exit_code == 0 and (tmp_path / "v.png").is_file(), res.output


def test_compress_retrains_a_foreign_model(ckpt, data, tmp_path):
    out = tmp_path / "rt"
    res = runner.invoke(app, ["compress", str(ckpt), "--model-factory", FACTORY, "--recipe", "r031", "-o", str(out),
                              "--retrain-epochs", "1", "--data", str(data), "--batch-size", "8", "--workers", "0",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    gm = load_model(out / "compressed.pt", factory=FACTORY)
    before = load_model(ckpt, factory=FACTORY)
    changed = [k for k, v in gm.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert changed  # re-training moved the weights
    assert (out / "summary.md").is_file() and (out / "best.pt").is_file()


def test_bad_factories_are_one_line_errors(ckpt, tmp_path):
    base = ["compress", str(ckpt), "-o", str(tmp_path / "x")]
    assert "cannot import no_such_module" in one_line_error(runner.invoke(app, [*base, "--model-factory", "no_such_module:f"]))
    assert "pkg.module:callable" in one_line_error(runner.invoke(app, [*base, "--model-factory", "foreign_models"]))
    assert "not valid JSON" in one_line_error(runner.invoke(app, [*base, "--model-factory", FACTORY, "--model-kwargs", "{depth"]))
    err = one_line_error(runner.invoke(app, [*base, "--model-factory", FACTORY, "--model-kwargs", '{"depth": 2}']))
    assert "do not fit the model foreign_models:official_like builds" in err


def test_info_names_two_class_tokens_and_the_merge_that_runs(tmp_path):
    import foreign_models

    path = tmp_path / "double.pth"
    torch.save({"model": foreign_models.double_cls(seed=3).state_dict()}, path)
    result = runner.invoke(app, ["info", str(path), "--model-factory", "foreign_models:double_cls"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    last = foreign_models.double_cls().pos_embed.shape[1] - 1  # head first, tail last: 16 patches + 2
    assert f"0 and {last} (two, both protected)" in out and "class tokens x[:, i] and x[:, j]" in out
    assert "torch reference on every device" in out
