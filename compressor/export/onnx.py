"""Export a Vision Mamba, plain or converted, to ONNX and check the file against PyTorch.

Exporter: ``torch.onnx.export(dynamo=True)`` (``torch.export`` + onnxscript). The TorchScript
exporter (``dynamo=False``) was tried first and rejected: on the chunked scan it writes a graph
whose shapes ONNX Runtime refuses to load ("Mul: Incompatible dimensions"), and on a converted
model it stops at an internal assert on ``scatter_``. The torch.export path exports both as they
are, into standard ``ai.onnx`` ops only (``scatter_add`` → ``ScatterElements(reduction='add')``,
the merge's stable ranking → comparisons and a ``ReduceSum``), with a graph half the size; it costs a slower export (seconds for the
test models, a minute or so for a depth-24 model on a small CPU).

The scan is written in one of the forms of :mod:`compressor.ops` (``scan=``, default
:data:`compressor.ops.EXPORT_SCAN_DEFAULT`): ``loop`` (one ``Scan`` node per direction: the
smallest graph and the fastest on ONNX Runtime's CPU provider), ``ssd`` (loop-free chunked
state-space form, about a hundred standard ops per direction and no control flow: for the CUDA
provider, whose CUDA graphs cannot hold a ``Scan``), ``chunked`` (the older two-level unrolled
form); docs/benchmarks.md has the measurements. ``loop`` and ``ssd`` are recorded as one op
each and written by their own ONNX translations (:mod:`compressor.ops._scan_onnx`), which is
what makes a depth-24 export take seconds. Standard ``ai.onnx`` ops only, no custom op in the
file. The exporter's optimiser is replaced by a lighter one (:mod:`._graph`): the rewriter it
runs took minutes on a depth-24 model.

Token counts are fixed by the image size, so height and width are static in the graph (ONNX
Runtime rejects other sizes) and are also written to ``metadata_props`` (``rmeeto.img_size``,
``rmeeto.tokens``, ``rmeeto.scan``, ...), which :func:`check_onnx_input` reads to give a
one-line error before anything runs.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from google.protobuf.message import DecodeError

from .. import ops
from .._version import __version__
from .._io import atomic_write
from ..errors import RmeetoError, ShapeError, first_line
from ..merge.schedule import tokens_per_layer
from ..models.vim import BiMambaMixer, RMSNorm, set_backend
from ._graph import block_node_counts, light_optimize
from ._runtime import check_chains, make_session

__all__ = ["ExportReport", "export_onnx", "check_onnx_file", "check_onnx_input", "INPUT_NAME", "OUTPUT_NAME"]

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
#: default ``rtol`` per exported dtype (max |ORT - PyTorch fp32| / max |PyTorch fp32|)
DEFAULT_RTOL = {torch.float32: 1e-4, torch.float16: 1e-2}
MIN_OPSET = 18  # the torch.export exporter's own opset; older ones go through a lossy down-conversion
_LATENCY_WARMUP, _LATENCY_REPEATS = 2, 7


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how it compares with PyTorch. Parity and latency fields
    are None when the check was skipped (``check=False``)."""

    path: Path
    opset: int
    scan: str
    node_count: int
    nodes_per_block: float | None
    file_size: int
    export_seconds: float
    max_abs_diff: float | None
    max_rel_diff: float | None
    top1_agreement: float | None
    ort_latency_ms: float | None
    providers: tuple[str, ...]
    input_shape: tuple
    dynamic_batch: bool

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"], d["input_shape"], d["providers"] = str(self.path), list(self.input_shape), list(self.providers)
        return d


def export_onnx(model: nn.Module, path, *, opset: int | None = None, batch: int = 1, dynamic_batch: bool = False,
                fp16: bool = False, check: bool = True, rtol: float | None = None, inputs: torch.Tensor | None = None,
                scan: str | None = None) -> ExportReport:
    """Export ``model`` (a :class:`~compressor.models.VisionMamba` or a module from
    :func:`compressor.convert.convert`) to ``path`` for ``(batch, C, img_size, img_size)`` images
    (video models: ``(batch, C, frames, img_size, img_size)`` clips).

    ``dynamic_batch`` makes dim 0 dynamic (H and W stay fixed); ``fp16`` exports half precision
    (the model itself is left unchanged); ``scan`` picks the scan's form in the graph (one of
    :data:`compressor.ops.EXPORT_SCANS`, default ``loop``). The file is written to a temporary name next to
    ``path``, checked with ``onnx.checker`` and, with ``check``, run with ONNX Runtime on seeded
    random images and on ``inputs`` ``(N, C, H, W)``; a relative difference to the fp32 PyTorch
    model above ``rtol`` (default 1e-4, 1e-2 for fp16) raises :class:`RmeetoError` and leaves
    nothing at ``path``. On success the file is renamed into place.
    """
    model = _as_converted(model)
    cfg = model.layout
    path = Path(path)
    if batch < 1:
        raise RmeetoError(f"batch must be >= 1, got {batch}")
    if opset is not None and opset < MIN_OPSET:
        raise RmeetoError(f"opset {opset} is not supported: the exporter writes opset {MIN_OPSET} or newer (omit --opset for the default)")
    if rtol is not None and not rtol >= 0:
        raise RmeetoError(f"rtol must be >= 0, got {rtol}")
    if path.is_dir():
        raise RmeetoError(f"{path} is a directory: pass a file name such as {path / 'model.onnx'}")
    scan = ops.EXPORT_SCAN_DEFAULT if scan is None else scan
    if scan not in ops.EXPORT_SCANS:
        raise RmeetoError(f"unknown scan form {scan!r}: choose one of {', '.join(ops.EXPORT_SCANS)}")
    dtype = torch.float16 if fp16 else torch.float32
    tol = DEFAULT_RTOL[dtype] if rtol is None else rtol
    shape = (batch, *cfg.input_shape)
    ref_model = model if _dtype_of(model) == torch.float32 else copy.deepcopy(model).float()
    out_model = copy.deepcopy(ref_model).half() if fp16 else ref_model
    probes = _probes(cfg, batch, dynamic_batch, inputs) if check else []
    refs = _run_torch(ref_model, probes)
    found: dict = {}

    def write(tmp: Path) -> None:
        t0 = time.perf_counter()
        program = _export(out_model, shape, opset, dynamic_batch, dtype, scan)
        blocks = block_node_counts(program.model)
        found["per_block"] = sum(blocks.values()) / len(blocks) if blocks else None
        program.model.metadata_props.update(_metadata(model, cfg, shape, dynamic_batch, dtype, scan))
        program.save(tmp, external_data=False)
        _chmod_like_new_file(tmp)
        found["seconds"] = time.perf_counter() - t0
        check_onnx_file(tmp)
        if check:
            found.update(_verify(tmp, probes, refs, dtype, tol, path))
            found["latency"] = _latency(found["sessions"][0], shape, dtype)

    try:
        atomic_write(path, write)
    except OSError as e:
        raise RmeetoError(f"cannot write {path}: {e.strerror or e}; choose a writable output location") from None
    header = onnx.load(str(path), load_external_data=False)
    return ExportReport(
        path=path, opset=_opset_of(header), scan=scan, node_count=len(header.graph.node), nodes_per_block=found["per_block"],
        file_size=path.stat().st_size,
        export_seconds=found["seconds"], max_abs_diff=found.get("max_abs"), max_rel_diff=found.get("max_rel"),
        top1_agreement=found.get("top1"), ort_latency_ms=found.get("latency"),
        providers=tuple(s.get_providers()[0] for s in found.get("sessions", ())),
        input_shape=("batch", *shape[1:]) if dynamic_batch else shape, dynamic_batch=dynamic_batch,
    )


# --------------------------------------------------------------------------------------------
# export


def _as_converted(model):
    """A converted model as it is; a plain one converted with the recipe ``none`` (bit-exact),
    so that every export reads its input shape and token layout the same way."""
    from ..convert import ConvertedModel, convert

    if not isinstance(model, nn.Module):
        raise RmeetoError(f"export_onnx expects a Vision Mamba module, got {type(model).__name__}")
    return model if isinstance(model, ConvertedModel) else convert(model, "none")


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@contextlib.contextmanager
def _export_mode(model: nn.Module, backend: str | None):
    """Eval mode (and ``backend`` on every Mamba op) for the duration; the old state comes back."""
    saved = {m: m.backend for m in model.modules() if isinstance(m, (BiMambaMixer, RMSNorm))}
    training = model.training
    if backend is not None:
        set_backend(model, backend)
    model.eval()
    try:
        yield model
    finally:
        for m, b in saved.items():
            m.backend = b
        model.train(training)


def _export(model: nn.Module, shape: tuple, opset: int | None, dynamic_batch: bool, dtype: torch.dtype, scan: str):
    # a batch of 1 would be specialised by torch.export: trace a dynamic batch with 2
    example = torch.randn(max(shape[0], 2) if dynamic_batch else shape[0], *shape[1:], generator=torch.Generator().manual_seed(0))
    example = example.to(device=_device_of(model), dtype=dtype)
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with _export_mode(model, scan), torch.no_grad(), ops.onnx_translation() as table:
        try:
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic_shapes, custom_translation_table=table, optimize=False, verify=False, report=False,
                verbose=False,
            )
        except torch.onnx.OnnxExporterError as e:
            raise RmeetoError(f"ONNX export failed: {first_line(e.__cause__ or e)}") from e
    light_optimize(program.model)
    return program


def _metadata(model, cfg, shape: tuple, dynamic_batch: bool, dtype: torch.dtype, scan: str) -> dict[str, str]:
    steps, recipe = model.steps, model.recipe
    return {
        "rmeeto.version": __version__,
        "rmeeto.family": model.cfg.family if model.cfg is not None else "foreign",
        "rmeeto.img_size": str(cfg.img_size),
        "rmeeto.in_chans": str(cfg.in_chans),
        "rmeeto.frames": str(cfg.frames),
        "rmeeto.input_shape": "x".join(["N" if dynamic_batch else str(shape[0]), *map(str, shape[1:])]),
        "rmeeto.dtype": str(dtype).removeprefix("torch."),
        "rmeeto.scan": scan,
        "rmeeto.recipe": recipe.name,
        "rmeeto.tokens": ",".join(map(str, tokens_per_layer(steps, cfg.num_tokens, cfg.depth))),
        "rmeeto.num_classes": str(cfg.num_classes),
    }


def _chmod_like_new_file(path: Path) -> None:
    """The temp file is created 0600; give the result the mode a plain ``open()`` would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _opset_of(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


# --------------------------------------------------------------------------------------------
# parity and latency with ONNX Runtime


def _probes(cfg, batch: int, dynamic_batch: bool, inputs) -> list[torch.Tensor]:
    """Seeded random images at the export batch (and one other batch when it is dynamic), then
    ``inputs`` cut into batches the graph accepts."""
    g = torch.Generator().manual_seed(0)
    sizes = (batch, batch + 2) if dynamic_batch else (batch,)
    probes = [torch.randn(n, *cfg.input_shape, generator=g) for n in sizes]
    if inputs is None:
        return probes
    inputs = torch.as_tensor(inputs).detach().float().cpu()
    want = tuple(cfg.input_shape)
    if inputs.dim() != len(want) + 1 or tuple(inputs.shape[1:]) != want:
        raise ShapeError(f"inputs must be (N, {', '.join(map(str, want))}) images for this model, got {tuple(inputs.shape)}")
    if dynamic_batch:
        return probes + [inputs]
    if inputs.shape[0] % batch:
        raise ShapeError(f"{inputs.shape[0]} inputs do not split into batches of {batch}: pass a multiple of {batch} or use dynamic_batch")
    return probes + list(inputs.split(batch))


def _run_torch(model: nn.Module, probes: list[torch.Tensor]) -> list[np.ndarray]:
    if not probes:
        return []
    dev = _device_of(model)
    with _export_mode(model, None), torch.no_grad():
        return [model(x.to(dev)).float().cpu().numpy() for x in probes]


def _sessions(path: Path) -> list:
    """One ONNX Runtime session per provider worth checking: CUDA first when available, CPU always."""
    return [make_session(path, chain) for chain in check_chains()]


def _verify(tmp: Path, probes, refs, dtype: torch.dtype, tol: float, dest: Path) -> dict:
    sessions = _sessions(tmp)
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    max_abs = max_rel = 0.0
    agree = total = 0
    for sess in sessions:
        for x, ref in zip(probes, refs):
            out = sess.run(None, {INPUT_NAME: x.numpy().astype(np_dtype)})[0].astype(np.float32)
            err = float(np.abs(out - ref).max())
            max_abs, max_rel = max(max_abs, err), max(max_rel, err / max(float(np.abs(ref).max()), 1e-12))
            agree += int((out.argmax(-1) == ref.argmax(-1)).sum())
            total += ref.shape[0]
    if not max_rel <= tol:  # also catches NaN
        raise RmeetoError(
            f"ONNX Runtime output differs from PyTorch: max abs {max_abs:.3g}, max rel {max_rel:.3g} > rtol {tol:g}, "
            f"top-1 agreement {agree}/{total}; nothing was written to {dest}"
        )
    return {"sessions": sessions, "max_abs": max_abs, "max_rel": max_rel, "top1": agree / total}


def _latency(sess, shape: tuple, dtype: torch.dtype) -> float:
    """Median wall time of one ``sess.run`` at the export batch, in milliseconds."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float16 if dtype == torch.float16 else np.float32)
    for _ in range(_LATENCY_WARMUP):
        sess.run(None, {INPUT_NAME: x})
    times = []
    for _ in range(_LATENCY_REPEATS):
        t0 = time.perf_counter()
        sess.run(None, {INPUT_NAME: x})
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


# --------------------------------------------------------------------------------------------
# reading exported files back


def _load_header(path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise RmeetoError(f"ONNX file {path} does not exist: check the path or export it with `rmeeto export`")
    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as e:
        raise RmeetoError(f"{path} is not a readable ONNX model ({first_line(e)}): re-export it with `rmeeto export`") from None


def check_onnx_file(path: str | os.PathLike) -> dict[str, str]:
    """Run ``onnx.checker`` on the file (path-based, so models over 2 GB work) and return its
    ``metadata_props``. A missing, truncated or invalid file raises a one-line :class:`RmeetoError`."""
    path = Path(path)
    if not path.is_file():
        raise RmeetoError(f"ONNX file {path} does not exist: check the path or export it with `rmeeto export`")
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise RmeetoError(f"{path} is not a valid ONNX model ({first_line(e)}): re-export it with `rmeeto export`") from None
    return {p.key: p.value for p in _load_header(path).metadata_props}


def _input_dims(model: onnx.ModelProto) -> list[int | str]:
    inits = {i.name for i in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in inp.type.tensor_type.shape.dim]


def check_onnx_input(path: str | os.PathLike, shape) -> None:
    """Raise a one-line :class:`~compressor.errors.ShapeError` unless ``shape`` ``(N, C, H, W)``
    (a clip model's ``(N, C, T, H, W)``) fits the exported graph: T, H and W are fixed at export
    (they fix the token counts), the batch too unless it was exported with a dynamic batch."""
    model = _load_header(path)
    dims = _input_dims(model)
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(dims):
        raise ShapeError(f"model expects {len(dims)}-d inputs {_fmt(dims)}, got shape {_fmt(shape)}")
    if len(dims) in (4, 5) and tuple(shape[-2:]) != tuple(dims[-2:]):
        raise ShapeError(
            f"model exported for {dims[-2]}x{dims[-1]} inputs, got {shape[-2]}x{shape[-1]}: its token counts are fixed, "
            f"resize the {'clips' if len(dims) == 5 else 'images'} or export a model built for {shape[-2]} px"
        )
    if len(dims) == 5 and shape[2] != dims[2]:
        raise ShapeError(f"model exported for clips of {dims[2]} frames, got {shape[2]}: its token counts are fixed, "
                         f"sample {dims[2]} frames per clip")
    for i, (want, got) in enumerate(zip(dims, shape)):
        if isinstance(want, int) and want != got:
            what = "batch" if i == 0 else f"dim {i}"
            hint = f": re-export with --batch {got} or --dynamic-batch" if i == 0 else ""
            raise ShapeError(f"model exported for {what} {want}, got {got} (input {_fmt(shape)}, expected {_fmt(dims)}){hint}")


def _fmt(dims) -> str:
    return "x".join(str(d) for d in dims)


