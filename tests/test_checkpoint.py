"""Checkpoint loading: safety, layouts, architecture inference, errors, and ``rmeeto info``."""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from compressor import load_model
from compressor.cli import app
from compressor.errors import CheckpointError
from compressor.models import VimConfig, VisionMamba, create_model, get_config, infer_config, list_models, read_checkpoint
from compressor.merge import fast
from compressor.models.checkpoint import SAFE_GLOBALS, describe_checkpoint, extract_state_dict
from helpers import FIXTURES

VIM_REF = FIXTURES / "vim_official_depth8.pt"
VIM_LAYOUT = FIXTURES / "vim_official_layout_depth8.pth"
VIDEOMAMBA_REF = FIXTURES / "videomamba_official_depth8.pt"
N_IMAGES = 4  # all four fixture images


def _fixture(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"conformance fixture {path.name} not found in {FIXTURES}")
    return path


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def _one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vim_ref():
    return torch.load(_fixture(VIM_REF), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def vim_official(vim_ref):
    return load_model(_fixture(VIM_LAYOUT))


@pytest.fixture
def tiny(tmp_path):
    """A vim_test model and its state_dict saved in the official layout."""
    torch.manual_seed(0)
    model = create_model("vim_test").eval()
    path = tmp_path / "tiny.pth"
    torch.save({"model": model.state_dict(), "epoch": 3, "args": argparse.Namespace(model="vim_test")}, path)
    return model, path


# ---------------------------------------------------------------------------------------------
# official files reproduce the official outputs


def test_official_layout_reproduces_logits_and_features(vim_official, vim_ref):
    assert not vim_official.training
    assert vim_official.cfg == VimConfig(embed_dim=192, depth=8, num_classes=10)
    images = vim_ref["images"][:N_IMAGES]
    with torch.no_grad():
        features = vim_official.forward_features(images)
        logits = vim_official.head(features)
    assert _rel_err(features, vim_ref["features"][:N_IMAGES]) < 1e-4
    assert _rel_err(logits, vim_ref["logits"][:N_IMAGES]) < 1e-4


def test_fp16_state_dict_loads_as_the_same_fp32_weights(vim_official, vim_ref, tmp_path):
    sd = vim_ref["state_dict"]
    assert sd["pos_embed"].dtype == torch.float16
    path = tmp_path / "fp16.pth"
    torch.save({"model": sd}, path)
    model = load_model(path)
    got, want = model.state_dict(), vim_official.state_dict()
    assert got.keys() == want.keys()
    for k in want:  # fp16 → fp32 is lossless, so these are the weights that reproduce the logits
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k


def test_videomamba_family_reproduces_logits(tmp_path):
    ref = torch.load(_fixture(VIDEOMAMBA_REF), map_location="cpu", weights_only=True)
    path = tmp_path / "videomamba.pth"
    torch.save({"model": ref["state_dict"]}, path)
    model = load_model(path, family="videomamba")
    assert model.cfg.cls_position == "head" and model.cfg.divide_out is False
    with torch.no_grad():
        logits = model(ref["images"][:N_IMAGES])
    assert _rel_err(logits, ref["logits"][:N_IMAGES]) < 1e-4


def test_ema_selects_model_ema(tiny, tmp_path):
    model, _ = tiny
    sd = model.state_dict()
    ema_sd = {k: v + 1.0 for k, v in sd.items()}
    path = tmp_path / "ema.pth"
    torch.save({"model": sd, "model_ema": ema_sd}, path)
    assert torch.equal(load_model(path).head.weight, sd["head.weight"])
    assert torch.equal(load_model(path, ema=True).head.weight, ema_sd["head.weight"])
    torch.save({"model": sd}, path)
    assert "model_ema" in _one_line_error(load_model, path, ema=True)


# ---------------------------------------------------------------------------------------------
# architecture inference


def _official_shapes(cfg: VimConfig) -> dict:
    """Meta tensors with the shapes of ``VisionMamba(cfg).state_dict()``, without building the
    full-depth model: one real layer, replicated (every layer has the same shapes)."""
    one = VisionMamba(cfg.replace(depth=1)).state_dict()
    sd = {k: torch.empty(v.shape, device="meta") for k, v in one.items() if not k.startswith("layers.")}
    for i in range(cfg.depth):
        sd.update({k.replace("layers.0.", f"layers.{i}.", 1): torch.empty(v.shape, device="meta") for k, v in one.items() if k.startswith("layers.0.")})
    return sd


@pytest.mark.parametrize("name", list_models())
def test_infer_config_recovers_every_registered_model(name):
    cfg = get_config(name)
    sd = _official_shapes(cfg)
    assert len(sd) == 7 + 17 * cfg.depth + cfg.is_video  # 415 at depth 24 (+ temporal_pos_embedding for video)
    assert infer_config(sd, family=cfg.family) == cfg


def test_infer_config_reads_stride_8_and_overrides():
    sd = _official_shapes(get_config("vim_tiny_stride8"))
    assert sd["pos_embed"].shape[1] == 730
    cfg = infer_config(sd, drop_path_rate=0.0, num_classes=7)
    assert (cfg.stride, cfg.num_tokens, cfg.cls_index) == (8, 730, 364)
    assert (cfg.drop_path_rate, cfg.num_classes) == (0.0, 7)


def test_infer_config_without_cls_token_and_at_448():
    sd = _official_shapes(get_config("videomamba_tiny", img_size=448))
    assert sd["pos_embed"].shape[1] == 785
    assert infer_config(sd, family="videomamba").img_size == 448
    del sd["cls_token"]
    sd["pos_embed"] = torch.empty(1, 784, 192, device="meta")
    cfg = infer_config(sd, family="videomamba")
    assert (cfg.cls_position, cfg.cls_index, cfg.num_tokens) == ("none", None, 784)


def test_infer_config_rejects_unsupported_variants(tiny):
    sd = tiny[0].state_dict()
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.zeros(64), "fc.weight": torch.zeros(10, 512)}
    msg = _one_line_error(infer_config, resnet)
    assert "not a Vision Mamba" in msg and "pos_embed" in msg and msg.count("+") == 1  # 5 named, the rest counted
    backward = ("A_b_log", "D_b", "conv1d_b.", "x_proj_b.", "dt_proj_b.")
    v1 = {k: v for k, v in sd.items() if not any(b in k for b in backward)}
    assert len(v1) < len(sd)
    assert "bimamba v1 / unidirectional Mamba checkpoints are not supported" in _one_line_error(infer_config, v1)
    not_square = dict(sd, pos_embed=torch.zeros(1, 16, 32))  # 15 patches + class token
    assert "square" in _one_line_error(infer_config, not_square)
    assert "img_size" in _one_line_error(infer_config, sd, img_size=40)
    assert "family" in _one_line_error(infer_config, sd, family="resnet")


# ---------------------------------------------------------------------------------------------
# safety: a checkpoint's code never runs


class _Payload:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return (self.call, (self.arg,))


def _payloads(marker: Path):
    import os

    return {
        "os.system": _Payload(os.system, f"touch '{marker}'"),
        "builtins.exec": _Payload(exec, f"open({str(marker)!r}, 'w').write('pwned')"),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec"])
def test_malicious_pickle_is_refused_before_it_runs(tmp_path, kind):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_payloads(probe)[kind]))  # plain unpickling runs it: the payload is real
    assert probe.exists()
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": _payloads(marker)[kind]}, path)
    msg = _one_line_error(read_checkpoint, path)
    assert "refuses to run code" in msg and "torch.save(model.state_dict(), path)" in msg
    assert kind.split(".")[1] in msg  # names the global it asked for
    with pytest.raises(CheckpointError):
        load_model(path)
    assert not marker.exists()


def test_allow_list_admits_the_official_args_and_nothing_else(tiny, tmp_path):
    """A harmless global that is not allow-listed (a Fraction in ``args``) is refused by name;
    the official ``argparse.Namespace`` loads."""
    from fractions import Fraction

    model, _ = tiny
    ok = tmp_path / "ok.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(model="vim_test", lr=5e-4)}, ok)
    assert read_checkpoint(ok)["args"].lr == 5e-4 and argparse.Namespace in SAFE_GLOBALS
    other = tmp_path / "other.pth"
    torch.save({"model": model.state_dict(), "args": {"lr": Fraction(1, 2)}}, other)
    msg = _one_line_error(read_checkpoint, other)
    assert "fractions.Fraction" in msg and "not allow-listed" in msg


# ---------------------------------------------------------------------------------------------
# one-line errors for user mistakes


def test_unreadable_files_give_one_line_errors(tiny, tmp_path):
    _, good = tiny
    data = good.read_bytes()
    cases = {
        tmp_path / "missing.pth": ("does not exist", None),
        tmp_path: ("directory", None),
        tmp_path / "empty.pth": ("empty", b""),
        tmp_path / "truncated.pth": ("truncated", data[: len(data) // 2]),
        tmp_path / "notes.txt": ("not a readable PyTorch file", b"these are not weights\n"),
    }
    for path, (hint, content) in cases.items():
        if content is not None:
            path.write_bytes(content)
        assert hint in _one_line_error(load_model, path), path


@pytest.mark.parametrize("obj", [torch.zeros(3), [torch.zeros(3)]])
def test_non_dict_is_not_a_checkpoint(tmp_path, obj):
    path = tmp_path / "x.pth"
    torch.save(obj, path)
    assert "not a checkpoint" in _one_line_error(read_checkpoint, path)


def test_non_vim_state_dict_and_shape_mismatch(tiny, tmp_path):
    _, path = tiny
    msg = _one_line_error(load_model, path, num_classes=1000)
    assert "shape mismatch for head.weight" in msg and "(1000, 32)" in msg and "(10, 32)" in msg and "override" in msg
    resnet = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}}, resnet)
    assert "not a Vision Mamba" in _one_line_error(load_model, resnet)
    extra = tmp_path / "extra.pth"
    torch.save(dict(tiny[0].state_dict(), **{"rope.freqs_cos": torch.zeros(4)}), extra)
    assert "rope.freqs_cos" in _one_line_error(load_model, extra)


def test_no_state_dict_found(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "notes": "hello"}, path)
    assert "no state_dict found" in _one_line_error(load_model, path)


# ---------------------------------------------------------------------------------------------
# layouts


def test_module_prefix_and_distill_head(tiny, tmp_path):
    model, _ = tiny
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    sd["module.distill_head.weight"] = torch.zeros(10, 32)
    sd["module.distill_head.bias"] = torch.zeros(10)
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": sd}, path)
    loaded = load_model(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    _, note = extract_state_dict(read_checkpoint(path))
    assert "module." in note and "2 distill_head" in note


def test_raw_bf16_state_dict_is_cast(tiny):
    sd = {k: v.bfloat16() for k, v in tiny[0].state_dict().items()}
    out, note = extract_state_dict(sd)
    assert out.keys() == sd.keys() and all(v.dtype == torch.float32 for v in out.values())
    assert "bfloat16" in note


def test_compressed_checkpoint_goes_to_convert(tmp_path, monkeypatch):
    """The one loading door hands rmeeto's compressed files to the converter's reader."""
    import compressor.loading as loading

    calls = []
    monkeypatch.setattr(loading, "load_compressed_payload", lambda obj, **kw: calls.append((obj, kw)) or "compressed-model")
    path = tmp_path / "merged.pth"
    torch.save({"rmeeto_format": 1, "model": {}}, path)
    assert load_model(path, backend="ref") == "compressed-model"
    assert calls[0][0]["rmeeto_format"] == 1 and calls[0][1]["backend"] == "ref"


def test_describe_checkpoint():
    d = describe_checkpoint(_fixture(VIM_LAYOUT))
    assert (d["tokens"], d["cls_index"], d["cls_position"]) == (197, 98, "middle")
    assert (d["family"], d["family_source"], d["ambiguous"]) == ("vim", "args.model", False)  # args.model names Vim
    assert d["has_ema"] and d["epoch"] == 299 and d["model_name"].startswith("vim_tiny_patch16_224")
    assert d["parameters"] == sum(p.numel() for p in VisionMamba(d["config"]).parameters())
    assert "backend" not in d and "merge_impl" not in d  # how this machine runs is not a property of the file
    v = describe_checkpoint(VIM_LAYOUT, family="videomamba")
    assert not v["ambiguous"] and v["cls_index"] == 0 and v["config"].divide_out is False


@pytest.mark.parametrize("name, family", [
    ("vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2", "vim"),
    ("videomamba_small", "videomamba"),
    (None, None),
    ("deit_small_patch16_224", None),
])
def test_describe_reads_the_family_from_args_model(tiny, tmp_path, name, family):
    model, _ = tiny
    path = tmp_path / "named.pth"
    torch.save({"model": model.state_dict(), **({"args": argparse.Namespace(model=name)} if name else {})}, path)
    d = describe_checkpoint(path)
    assert d["family"] == family and d["ambiguous"] == (family is None)
    assert d["cls_position"] == {"videomamba": "head"}.get(family, "middle")  # read as vim when unnamed
    assert describe_checkpoint(path, family="videomamba")["family_source"] == "--family"  # the option wins


def test_describe_compressed_reports_its_family(tmp_path):
    from compressor.convert import convert, save_compressed
    from compressor.loading import describe

    gm = convert(create_model("vim_test", family="videomamba", cls_position="head", divide_out=False).eval(), "r031")
    save_compressed(gm, tmp_path / "c.pt")
    d = describe(tmp_path / "c.pt")
    assert d["family"] == "videomamba" and d["rmeeto_format"] is not None
    result = CliRunner().invoke(app, ["info", str(tmp_path / "c.pt")])
    assert result.exit_code == 0 and "videomamba" in _row(result.output, "family"), result.output


# ---------------------------------------------------------------------------------------------
# rmeeto info


def _row(output: str, label: str) -> str:
    line = next((ln for ln in output.splitlines() if re.search(rf"\b{re.escape(label)}\b", ln)), "")
    assert line, f"no {label!r} row in:\n{output}"
    return line


def test_cli_info_on_fixture():
    result = CliRunner().invoke(app, ["info", str(_fixture(VIM_LAYOUT))])
    assert result.exit_code == 0, result.output
    assert re.search(r"\b192\b", _row(result.output, "embed dim"))
    assert re.search(r"\b8\b", _row(result.output, "depth"))
    assert re.search(r"\b197\b", _row(result.output, "tokens"))
    assert re.search(r"\b98\b", _row(result.output, "class token"))
    assert "vim (from args.model)" in _row(result.output, "family") and "pass --family" not in result.output
    assert re.search(r"backend auto\W+(\w+)", result.output).group(1) in ("ref", "cuda", "chunked")
    merges = "triton" if torch.cuda.is_available() and fast.available() else "torch"
    assert re.search(r"merges auto\W+(\w+)", result.output).group(1) == merges
    result = CliRunner().invoke(app, ["info", str(VIM_LAYOUT), "--family", "videomamba", "--ema"])
    assert result.exit_code == 0 and re.search(r"\b0 \(head\)", _row(result.output, "class token"))


def test_cli_info_missing_file_is_one_error_line(tmp_path):
    result = CliRunner().invoke(app, ["info", str(tmp_path / "nope.pth")])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "does not exist" in lines[0]
    assert "Traceback" not in result.output and not isinstance(result.exception, CheckpointError)
