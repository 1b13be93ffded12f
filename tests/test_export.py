"""ONNX export: parity with PyTorch for plain and converted models (merge and prune), both scan
forms (``loop``: one Scan per direction, ``ssd``: no control flow), dynamic batch, graph size
(no per-token unroll), the merge's scatters (no duplicate indices where they would overwrite),
the execution providers checked, static image size, atomic writes, clean errors, and
``rmeeto export``. Exports are the slow part (seconds each): files are shared per module."""

from __future__ import annotations

import os
import stat
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

import compressor.export._runtime as ort_runtime
import compressor.export.onnx as onnx_export
from compressor.cli import app
from compressor.convert import convert, save_compressed
from compressor.errors import RmeetoError, ShapeError
from compressor.export import check_onnx_file, check_onnx_input, export_onnx
from compressor.merge import MergeConfig
from compressor.models import VimConfig, VisionMamba, create_model
from helpers import FIXTURES, negative_step_slices

VIM_REF = FIXTURES / "vim_official_depth8.pt"
# Nodes per block (vim_test: 17 tokens, 8 per chunk for ssd), measured: loop 100 (a Scan per
# direction, its body six ops, ~40 ops around each: softplus, layout, gating), ssd 158. The
# scan unrolled per token would add ~6 ops per token and direction (chunked: 374 per block at
# 197 tokens); the bounds leave ~25% headroom, far below either.
MAX_BLOCK_NODES = {"loop": 125, "ssd": 200}
MAX_NODES_VIM_TEST = 4 * MAX_BLOCK_NODES["ssd"] + 100  # depth 4, plus embedding/head/merges


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name: str = "vim_test", **overrides) -> VisionMamba:
    torch.manual_seed(0)
    return create_model(name, **overrides).eval()


def _ort(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _rel_err(out: np.ndarray, ref: torch.Tensor) -> float:
    ref = ref.detach().numpy()
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def _assert_standard_graph(path: Path, max_nodes: int, scan: str = "loop", depth: int = 4) -> Counter:
    model = onnx.load(str(path))
    ops = Counter(n.op_type for n in model.graph.node)
    nodes = len(model.graph.node)
    assert nodes < max_nodes, f"{nodes} nodes: is the scan unrolled per token?"
    assert not ops.keys() & {"Loop", "If"}
    assert ops["Scan"] == (2 * depth if scan == "loop" else 0), "one Scan per direction (loop), none (ssd)"
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, "custom ops in the graph"
    assert not model.functions
    return ops


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    model = _model()
    path = tmp_path_factory.mktemp("plain") / "vim_test.onnx"
    return model, export_onnx(model, path)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """vim_test converted with r031 (num_prune 11, capped to 8 of 17 tokens), dynamic batch."""
    gm = convert(_model(), "r031")
    path = tmp_path_factory.mktemp("merged") / "vim_test_r031.onnx"
    return gm, export_onnx(gm, path, dynamic_batch=True, batch=2)


# ---------------------------------------------------------------------------------------------
# parity and graph


def test_plain_export_matches_pytorch(plain):
    model, report = plain
    assert report.path.is_file() and report.file_size == report.path.stat().st_size
    assert report.max_rel_diff <= 1e-4 and report.top1_agreement == 1.0
    assert report.opset >= 18 and report.input_shape == (1, 3, 32, 32) and not report.dynamic_batch
    assert report.scan == "loop" and 0 < report.nodes_per_block <= MAX_BLOCK_NODES["loop"]
    assert report.providers[-1] == "CPUExecutionProvider" and report.ort_latency_ms > 0
    assert report.node_count == len(onnx.load(str(report.path)).graph.node)
    _assert_standard_graph(report.path, MAX_NODES_VIM_TEST)
    x = torch.randn(1, 3, 32, 32)
    out = _ort(report.path).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        assert _rel_err(out, model(x)) <= 1e-4
    assert [b.mixer.backend for b in model.layers] == ["auto"] * 4, "export must restore the backend"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(report.path.stat().st_mode) == 0o666 & ~umask, "not the private mode of the temp file"


def test_metadata_records_the_input_size(plain, merged):
    meta = check_onnx_file(plain[1].path)
    assert meta["rmeeto.img_size"] == "32" and meta["rmeeto.input_shape"] == "1x3x32x32"
    assert meta["rmeeto.recipe"] == "none" and meta["rmeeto.tokens"] == "17,17,17,17"
    meta = check_onnx_file(merged[1].path)
    assert meta["rmeeto.recipe"] == "r031" and meta["rmeeto.tokens"] == "17,17,9,9"
    assert meta["rmeeto.input_shape"] == "Nx3x32x32" and meta["rmeeto.family"] == "vim"


def test_no_flipped_copies_in_the_loop_export(plain, merged):
    """The backward direction runs a reversed Scan and an anti-causal conv: no Slice with a
    negative step (a flipped copy of the sequence, three per block before) in the file, and one
    Scan of each direction per block."""
    for report in (plain[1], merged[1]):
        model = onnx.load(str(report.path))
        assert negative_step_slices(model) == 0
        directions = Counter(tuple(next((list(a.ints) for a in n.attribute if a.name == "scan_input_directions"), [0, 0, 0]))
                             for n in model.graph.node if n.op_type == "Scan")
        assert directions == {(0, 0, 0): 4, (1, 1, 1): 4}, directions


def test_merged_export_dynamic_batch(merged):
    gm, report = merged
    assert report.dynamic_batch and report.input_shape == ("batch", 3, 32, 32)
    assert report.max_rel_diff <= 1e-4 and report.top1_agreement == 1.0
    ops = _assert_standard_graph(report.path, MAX_NODES_VIM_TEST)
    assert 0 < report.nodes_per_block <= MAX_BLOCK_NODES["loop"]
    reductions = [a.s for n in onnx.load(str(report.path)).graph.node if n.op_type == "ScatterElements" for a in n.attribute if a.name == "reduction"]
    assert b"add" in reductions, "scatter_add must be ScatterElements(reduction='add')"
    assert "TopK" not in ops  # the merge ranks its sources by comparisons (stable ties), no sort
    sess = _ort(report.path)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        out = sess.run(None, {"image": x.numpy()})[0]
        assert out.shape == (batch, 10)
        with torch.no_grad():
            assert _rel_err(out, gm(x)) <= 1e-4


def test_prune_mode_with_head_class_token(tmp_path):
    gm = convert(_model("videomamba_test"), MergeConfig(mode="prune", num_prune=3, interval=1))
    assert len(gm.steps) == 3
    report = export_onnx(gm, tmp_path / "prune.onnx", batch=2)
    assert report.max_rel_diff <= 1e-4 and report.top1_agreement == 1.0
    _assert_standard_graph(report.path, MAX_NODES_VIM_TEST + 200)  # three merges
    assert check_onnx_file(report.path)["rmeeto.tokens"] == "17,14,11,8"


@pytest.mark.parametrize("converted", [False, True])
def test_ssd_scan_export(converted, tmp_path):
    """The loop-free form: no control flow at all, same parity, bounded size per block."""
    model = convert(_model(), "r031") if converted else _model()
    report = export_onnx(model, tmp_path / "ssd.onnx", scan="ssd", batch=2)
    assert report.scan == "ssd" and check_onnx_file(report.path)["rmeeto.scan"] == "ssd"
    assert report.max_rel_diff <= 1e-4 and report.top1_agreement == 1.0
    assert 0 < report.nodes_per_block <= MAX_BLOCK_NODES["ssd"]
    _assert_standard_graph(report.path, MAX_NODES_VIM_TEST, scan="ssd")


def _scatter_index_outputs(path: Path, tmp_path: Path) -> tuple[Path, list[tuple[str, str, int]]]:
    """A copy of the graph that also outputs the index tensor of every ScatterND /
    ScatterElements without a reduction (those overwrite: duplicate indices would make the
    result depend on the order of writes). Returns the copy and ``(op, name, axis)`` each."""
    model = onnx.load(str(path))
    found = []
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        reduction = attrs["reduction"].s if "reduction" in attrs else b"none"
        if node.op_type in ("ScatterND", "ScatterElements") and reduction == b"none":
            axis = attrs["axis"].i if "axis" in attrs else 0
            found.append((node.op_type, node.input[1], axis))
            model.graph.output.append(onnx.helper.make_tensor_value_info(node.input[1], onnx.TensorProto.INT64, None))
    copy = tmp_path / "with_indices.onnx"
    onnx.save(model, str(copy))
    return copy, found


def test_merge_scatters_never_overwrite_one_place_twice(merged, tmp_path):
    """ONNX Runtime's CUDA provider warns that ScatterND with reduction 'none' is only correct
    without duplicate indices. The merge's overwriting scatters (the strided writes of its slot
    map and the marks of removed tokens) are read back from the running graph on random images:
    no index repeats; the only scatter that sums (duplicates by design) reduces with 'add'."""
    copy, found = _scatter_index_outputs(merged[1].path, tmp_path)
    assert {op for op, _, _ in found} == {"ScatterND", "ScatterElements"}, found
    sess = _ort(copy)
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((3, 3, 32, 32)).astype(np.float32)
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": x})))
        for op, name, axis in found:
            idx = outs[name]
            if op == "ScatterND":  # each row of the last axis is one target position
                rows = idx.reshape(-1, idx.shape[-1])
                assert len(np.unique(rows, axis=0)) == len(rows), f"{name}: duplicate ScatterND index"
            else:  # along `axis`, for every position of the other axes
                moved = np.moveaxis(idx, axis, -1).reshape(-1, idx.shape[axis])
                assert all(len(set(r)) == len(r) for r in moved.tolist()), f"{name}: duplicate ScatterElements index"


def test_providers_checked_and_cuda_fallback_refused(monkeypatch, tmp_path):
    """With onnxruntime-gpu (providers mocked here) the file is checked on the CUDA provider
    first and the CPU provider; a CUDA session that silently fell back to the CPU is an error."""
    ort_runtime.providers.cache_clear()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [ort_runtime.CUDA, ort_runtime.CPU])
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: None, raising=False)
    assert ort_runtime.check_chains() == [[ort_runtime.CUDA, ort_runtime.CPU], [ort_runtime.CPU]]
    made = []

    class FakeSession:
        def __init__(self, path, opts, providers):
            made.append(providers)
            self._providers = [p for p in providers if p == ort_runtime.CPU]  # CUDA did not start

        def get_providers(self):
            return self._providers

    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    with pytest.raises(RmeetoError, match="did not start CUDAExecutionProvider"):
        ort_runtime.make_session(tmp_path / "m.onnx", [ort_runtime.CUDA, ort_runtime.CPU])
    assert made == [[ort_runtime.CUDA, ort_runtime.CPU]]
    assert ort_runtime.make_session(tmp_path / "m.onnx", [ort_runtime.CPU]).get_providers() == [ort_runtime.CPU]
    ort_runtime.providers.cache_clear()  # the next test sees the real providers again


def test_fp16_export(tmp_path):
    model = _model(depth=1)
    report = export_onnx(model, tmp_path / "half.onnx", fp16=True)
    assert report.max_rel_diff <= 1e-2 and next(model.parameters()).dtype == torch.float32
    graph = onnx.load(str(report.path)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert check_onnx_file(report.path)["rmeeto.dtype"] == "float16"


# ---------------------------------------------------------------------------------------------
# static image size


def test_ort_and_check_onnx_input_reject_other_sizes(plain, merged):
    path = plain[1].path
    check_onnx_input(path, (1, 3, 32, 32))
    with pytest.raises(ShapeError, match=r"^model exported for 32x32 inputs, got 64x64"):
        check_onnx_input(path, (1, 3, 64, 64))
    with pytest.raises(ShapeError, match=r"exported for batch 1, got 4.*--dynamic-batch"):
        check_onnx_input(path, torch.Size([4, 3, 32, 32]))
    with pytest.raises(ShapeError, match=r"dim 1 3, got 1"):
        check_onnx_input(path, (1, 1, 32, 32))
    with pytest.raises(ShapeError, match="4-d inputs"):
        check_onnx_input(path, (3, 32, 32))
    check_onnx_input(merged[1].path, (7, 3, 32, 32))
    with pytest.raises(ShapeError, match="32x32"):
        check_onnx_input(merged[1].path, (7, 3, 48, 48))
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):  # ONNX Runtime's own check
        _ort(path).run(None, {"image": np.zeros((1, 3, 64, 64), np.float32)})


def test_given_inputs_are_checked_and_must_fit(tmp_path):
    model = _model(depth=1)
    x = torch.randn(4, 3, 32, 32)
    report = export_onnx(model, tmp_path / "a.onnx", batch=2, inputs=x)
    assert report.max_rel_diff <= 1e-4
    with pytest.raises(ShapeError, match=r"\(N, 3, 32, 32\)"):
        export_onnx(model, tmp_path / "b.onnx", inputs=torch.randn(2, 3, 64, 64))
    with pytest.raises(ShapeError, match="batches of 3"):
        export_onnx(model, tmp_path / "b.onnx", batch=3, inputs=x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx"]


# ---------------------------------------------------------------------------------------------
# atomic writes and clean errors


def test_parity_failure_writes_nothing(tmp_path, monkeypatch):
    real = onnx_export._run_torch
    monkeypatch.setattr(onnx_export, "_run_torch", lambda model, probes: [r + 1.0 for r in real(model, probes)])
    dest = tmp_path / "m.onnx"
    with pytest.raises(RmeetoError, match=r"differs from PyTorch: max abs .* max rel .* > rtol 0\.0001") as info:
        export_onnx(_model(depth=1), dest)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == [], "the temp file must be removed"


def test_unwritable_destination_is_a_clean_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RmeetoError, match="cannot write"):
        export_onnx(_model(depth=1), blocker / "m.onnx")
    with pytest.raises(RmeetoError, match="is a directory"):
        export_onnx(_model(depth=1), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and blocker.read_text() == "x"


def test_bad_arguments(tmp_path):
    with pytest.raises(RmeetoError, match="opset 13 is not supported"):
        export_onnx(_model(depth=1), tmp_path / "m.onnx", opset=13)
    with pytest.raises(RmeetoError, match="no stack of Mamba blocks found in Linear"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "m.onnx")
    with pytest.raises(RmeetoError, match="batch must be >= 1"):
        export_onnx(_model(depth=1), tmp_path / "m.onnx", batch=0)
    with pytest.raises(RmeetoError, match="rtol must be >= 0"):
        export_onnx(_model(depth=1), tmp_path / "m.onnx", rtol=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_corrupted_or_missing_onnx_is_a_clean_error(plain, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx file\x00\xff" * 8)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(plain[1].path.read_bytes()[:4096])
    for path in (garbage, truncated):
        for check in (check_onnx_file, lambda p: check_onnx_input(p, (1, 3, 32, 32))):
            with pytest.raises(RmeetoError, match="not a (valid|readable) ONNX model") as info:
                check(path)
            assert "\n" not in str(info.value)
    with pytest.raises(RmeetoError, match="does not exist"):
        check_onnx_input(tmp_path / "nope.onnx", (1, 3, 32, 32))


# ---------------------------------------------------------------------------------------------
# rmeeto export


def test_cli_export_plain_and_compressed(tmp_path):
    model = _model(depth=2)
    plain_ckpt, packed_ckpt = tmp_path / "plain.pth", tmp_path / "packed.pth"
    torch.save({"model": model.state_dict()}, plain_ckpt)
    save_compressed(convert(model, MergeConfig(num_prune=3, interval=1)), packed_ckpt)
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(plain_ckpt), "--onnx", str(tmp_path / "plain.onnx"), "--batch", "2"])
    assert result.exit_code == 0, result.output
    assert "max rel diff" in result.output and "2x3x32x32" in result.output
    result = runner.invoke(app, ["export", str(packed_ckpt), "--onnx", str(tmp_path / "packed.onnx"), "--dynamic-batch", "--scan", "ssd"])
    assert result.exit_code == 0, result.output
    assert "dynamic batch" in result.output and "per block" in result.output
    meta = check_onnx_file(tmp_path / "packed.onnx")
    assert meta["rmeeto.tokens"] == "17,14" and meta["rmeeto.scan"] == "ssd"


def test_cli_export_errors_are_one_red_line(tmp_path):
    runner = CliRunner()
    bad_scan = runner.invoke(app, ["export", str(tmp_path / "x.pth"), "--onnx", str(tmp_path / "m.onnx"), "--scan", "fast"])
    assert bad_scan.exit_code == 2 and "fast" in bad_scan.output  # typer's own choice check
    with pytest.raises(RmeetoError, match="unknown scan form 'fast'"):
        export_onnx(_model(depth=1), tmp_path / "m.onnx", scan="fast")
    for args in (["--batch", "2", "--dynamic-batch"], []):
        ckpt = tmp_path / ("nope.pth" if not args else "whatever.pth")
        result = runner.invoke(app, ["export", str(ckpt), "--onnx", str(tmp_path / "m.onnx"), *args])
        assert result.exit_code == 1, result.output
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "m.onnx").exists()


# ---------------------------------------------------------------------------------------------
# the official depth-8 fixture (197 tokens)


@pytest.fixture(scope="module")
def official():
    if not VIM_REF.exists():
        pytest.skip(f"conformance fixture {VIM_REF.name} not found in {FIXTURES}")
    ref = torch.load(VIM_REF, map_location="cpu", weights_only=True)
    model = VisionMamba(VimConfig(depth=8, num_classes=10)).eval()
    model.load_state_dict({k: v.float() for k, v in ref["state_dict"].items()})
    return model, ref


@pytest.mark.slow
@pytest.mark.parametrize("num_prune", [0, 11])
def test_official_fixture_exports_within_1e4(official, num_prune, tmp_path):
    model, ref = official
    module = convert(model, MergeConfig(num_prune=num_prune)) if num_prune else model
    images = ref["images"]
    report = export_onnx(module, tmp_path / "vim.onnx", batch=2, inputs=images)
    assert report.max_rel_diff <= 1e-4 and report.top1_agreement == 1.0
    # 197 tokens: ~100 nodes per block with one Scan per direction; the scan unrolled per
    # token would be 197 steps, over 20k nodes
    _assert_standard_graph(report.path, 8 * MAX_BLOCK_NODES["loop"] + 400, depth=8)
    out = np.concatenate([_ort(report.path).run(None, {"image": x.numpy()})[0] for x in images.split(2)])
    with torch.no_grad():
        assert _rel_err(out, module(images)) <= 1e-4
    if not num_prune:
        assert _rel_err(out, ref["logits"]) <= 1e-4  # and the official model's own logits
