"""``rmeeto compress`` and ``rmeeto visualize`` through typer's CliRunner, on a tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.fx as fx
from PIL import Image
from typer.testing import CliRunner

from compressor.cli import app
from compressor.compress import compress
from compressor.errors import RmeetoError
from compressor.merge import TokenMerge
from compressor import load_model
from compressor.models import create_model

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An official-layout vim_test checkpoint: ``{'model': state_dict}``."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "vim_test.pth"
    torch.save({"model": create_model("vim_test").state_dict(), "epoch": 3}, path)
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    a = np.zeros((48, 64, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, 64, dtype=np.uint8)[None]
    a[12:36, 20:44] = (20, 200, 40)
    path = tmp_path_factory.mktemp("img") / "square.png"
    Image.fromarray(a).save(path)
    return path


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_compress_writes_a_loadable_checkpoint_with_fewer_tokens(ckpt, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["compress", str(ckpt), "--recipe", "r031", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "17" in result.output and "9" in result.output and "reduction ratio" in result.output
    path = out / "compressed.pt"
    assert path.is_file()
    gm = load_model(path)
    assert isinstance(gm, fx.GraphModule) and gm.recipe.name == "r031"
    merges = [m for m in gm.modules() if isinstance(m, TokenMerge)]
    assert len(merges) == 1 and merges[0].tokens_in == 17 and merges[0].tokens_in - merges[0].r == 9
    assert gm.extra["source_checkpoint"] == str(ckpt.resolve()) and gm.extra["family"] == "vim"
    assert gm.extra["schedule"] == [{"layer": 2, "tokens_in": 17, "r": 8, "cls_in": 8, "cls_out": 4}]
    x = torch.randn(2, 3, 32, 32)
    original = load_model(ckpt)
    with torch.no_grad():
        out_c, out_o = gm(x), original(x)
    assert out_c.shape == out_o.shape == (2, 10) and not torch.allclose(out_c, out_o)


def test_compress_library_function_caps_an_oversized_recipe(ckpt, tmp_path):
    path = compress(ckpt, "r056", tmp_path / "o", quiet=True)  # 20 per merge > 8 available: capped
    assert load_model(path).steps[0].r == 8


def test_bad_recipe_name_is_one_line(ckpt, tmp_path):
    msg = one_line_error(runner.invoke(app, ["compress", str(ckpt), "--recipe", "nope", "-o", str(tmp_path / "o")]))
    assert "unknown recipe 'nope'" in msg
    assert not (tmp_path / "o").exists()


def test_layers_beyond_the_depth_name_the_layer(ckpt, tmp_path):
    recipe = tmp_path / "deep.toml"
    recipe.write_text('name = "deep"\n[merge]\nnum_prune = 2\nlayers = [2, 7]\n')
    msg = one_line_error(runner.invoke(app, ["compress", str(ckpt), "--recipe", str(recipe), "-o", str(tmp_path / "o")]))
    assert "layer 7" in msg and "4 layers" in msg


def test_unwritable_out_dir_is_one_line(ckpt, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    msg = one_line_error(runner.invoke(app, ["compress", str(ckpt), "-o", str(blocker / "out")]))
    assert "cannot write" in msg and str(blocker / "out") in msg


def test_retrain_without_data_is_an_error(ckpt, tmp_path):
    msg = one_line_error(runner.invoke(app, ["compress", str(ckpt), "-o", str(tmp_path / "o"), "--retrain-epochs", "1"]))
    assert "--data" in msg
    with pytest.raises(RmeetoError, match="--data"):
        compress(ckpt, "r031", tmp_path / "o", retrain_epochs=1, quiet=True)


def test_visualize_writes_a_png(ckpt, image, tmp_path):
    out = tmp_path / "merges.png"
    result = runner.invoke(app, ["visualize", str(ckpt), str(image), str(image), "--recipe", "r031", "-o", str(out)])
    assert result.exit_code == 0, result.output
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with Image.open(out) as im:
        assert im.width > 1.5 * im.height  # one row: one panel per image, the tokens drawn over it


def test_merge_drawing_titles_the_class_and_overlays_the_image():
    from compressor.merge.visualize import _token_layer, image_label, merges_figure

    assert image_label("data/val/cat/0001.jpg") == "cat (0001.jpg)" and image_label("img.png") == "img.png"
    labels = np.array([[0, 0], [1, 2]])  # token 0 holds two patches, tokens 1 and 2 one each
    layer = _token_layer(labels, 4, alpha=0.4)  # 2 px per patch
    assert layer.shape == (4, 4, 4)
    assert np.allclose(layer[0, 1:3, 3], 0.4) and np.all(layer[0, 0, :3] == layer[0, 3, :3])  # merged: one colour
    assert np.all(layer[3, 0:2, 3] == 0) and np.all(layer[3, 3, 3] == 0)  # single patches: transparent
    assert np.all(layer[2, 0:4] == 1.0)  # white outline along the merged token's lower edge
    assert np.all(layer[3, 2, 3] == 0)  # no outline between two single-patch tokens
    pruned = _token_layer(np.array([[0, -1], [1, 1]]), 2)
    assert pruned[0, 1, 3] == 0.75 and np.all(pruned[0, 1, :3] == 0)  # dropped patch: dark
    rgb = torch.rand(2, 3, 8, 8)
    sources = torch.zeros(2, 3, 4)
    sources[:, 0, :2] = sources[:, 1, 2] = sources[:, 2, 3] = 1
    fig = merges_figure(rgb, sources, 2, titles=["cat (0.jpg)", "dog (1.jpg)"])
    assert [ax.get_title().splitlines()[0] for ax in fig.axes] == ["cat (0.jpg)", "dog (1.jpg)"]
    assert all(ax.get_title().endswith("3 patch tokens from 4: 1 merged") for ax in fig.axes)
    assert [len(ax.images) for ax in fig.axes] == [2, 2]  # the image, and the token layer over it
    assert np.allclose(fig.axes[0].images[0].get_array(), rgb[0].permute(1, 2, 0).numpy())


def test_visualize_uses_a_compressed_checkpoint_as_it_is(ckpt, image, tmp_path):
    path = compress(ckpt, "r031", tmp_path / "c", quiet=True)
    out = tmp_path / "m.png"
    result = runner.invoke(app, ["visualize", str(path), str(image), "--recipe", "r014", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "ignored" in result.output and out.stat().st_size > 0


def test_visualize_bad_image_is_one_line(ckpt, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    msg = one_line_error(runner.invoke(app, ["visualize", str(ckpt), str(bad), "-o", str(tmp_path / "m.png")]))
    assert "bad.png" in msg
