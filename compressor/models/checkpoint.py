"""Safe checkpoint loading: read a file without running its code, find the state_dict, read the
architecture off the tensor shapes, and build the model.

Official Vim / VideoMamba files are ``torch.save`` of ``{'model': state_dict, 'optimizer', ...,
'args': argparse.Namespace, ['model_ema']}``. They are read with ``weights_only=True`` and only the
globals in :data:`SAFE_GLOBALS` allowed: a pickle that asks for anything else (``os.system``, a
class with ``__reduce__``) is refused before it runs. Vim and VideoMamba share every key and shape,
so the family cannot be read off a file: it is a parameter.
"""

from __future__ import annotations

import argparse
import logging
import math
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError
from .config import FAMILIES, VimConfig
from .vim import VisionMamba, set_backend

__all__ = [
    "SAFE_GLOBALS",
    "read_checkpoint",
    "extract_state_dict",
    "infer_config",
    "load_official",
    "describe_checkpoint",
    "family_from_model_name",
]

log = logging.getLogger(__name__)

#: The only globals a checkpoint's pickle may reference besides tensors and plain containers.
#: ``argparse.Namespace`` is the ``args`` entry of the official training checkpoints.
SAFE_GLOBALS: tuple = (argparse.Namespace,)

RESAVE_HINT = "re-save the state_dict only, e.g. `torch.save(model.state_dict(), path)`"

# keys every supported (bimamba v2) Vision Mamba state_dict has; depth, width etc. are read off them
_REQUIRED = (
    "pos_embed",
    "patch_embed.proj.weight",
    "norm_f.weight",
    "layers.0.norm.weight",
    "layers.0.mixer.in_proj.weight",
    "layers.0.mixer.A_log",
    "layers.0.mixer.conv1d.weight",
    "layers.0.mixer.x_proj.weight",
    "layers.0.mixer.dt_proj.weight",
    "layers.0.mixer.out_proj.weight",
)
_BACKWARD_KEY = "layers.0.mixer.A_b_log"
_DEFAULT_IMG_SIZE = 224
_CLS_POSITION = {"vim": "middle", "videomamba": "head"}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.")
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


# --------------------------------------------------------------------------------------------
# reading a file


def read_checkpoint(path) -> dict:
    """``torch.load`` ``path`` on the CPU with ``weights_only=True`` (only :data:`SAFE_GLOBALS`
    allowed) and check it holds a dict. Raises :class:`CheckpointError` with a one-line message."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory: pass the .pth file inside it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): re-download or re-save it")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # then it fails, or loads fine
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unpickling_error(path, e) from e
    except PermissionError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror}): check its permissions") from e
    except (RuntimeError, EOFError, KeyError, ValueError, IndexError, OSError, UnicodeDecodeError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"checkpoint {path} is not a readable PyTorch file: truncated, corrupt or another format ({_reason(e)}); "
            "re-download it or save it again with torch.save"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a checkpoint (a dict of tensors): {RESAVE_HINT}"
        )
    return obj


def _unpickling_error(path: Path, e: Exception) -> CheckpointError:
    """A refused global becomes a security message naming it; anything else is corruption."""
    m = _GLOBAL_RE.search(str(e))
    if m:
        return CheckpointError(
            f"checkpoint {path} asks to load the Python global {m.group(1)!r}, which is not allow-listed: "
            f"rmeeto refuses to run code from checkpoints; if you trust the file, {RESAVE_HINT}"
        )
    return CheckpointError(
        f"checkpoint {path} could not be unpickled safely ({_reason(e)}): it is corrupt or not a plain "
        f"tensor checkpoint; {RESAVE_HINT}"
    )


def _reason(e: BaseException) -> str:
    """A short, single-line description of a low-level load error."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # torch's weights-only messages start with boilerplate; the specific line comes later
    text = next((ln for ln in lines if "Unsupported" in ln), None)
    text = text or next((ln for ln in lines if "failed" in ln), lines[0] if lines else "")
    text = text.split(". ")[0].rstrip(".")
    if not text or text.isdigit() or len(text) < 4:
        text = {EOFError: "the file ends early"}.get(type(e), f"{type(e).__name__}: {text}".rstrip(": "))
    return text[:160]


# --------------------------------------------------------------------------------------------
# finding the state_dict


def extract_state_dict(obj: dict, ema: bool = False) -> tuple[dict, str]:
    """The model weights in a loaded checkpoint, as ``(state_dict, note)``.

    Accepts ``{'model': sd, 'model_ema'?, ...}`` (official), ``{'state_dict': sd}`` and a raw
    state_dict; strips a ``module.`` prefix, drops ``distill_head.*`` (VideoMamba
    self-distillation) and casts fp16/bf16 to fp32. ``ema=True`` selects ``model_ema``.
    ``note`` says what was changed ("" when nothing was).
    """
    sd = _select(obj, ema)
    notes = []
    if any(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        notes.append("stripped the 'module.' prefix")
    distill = [k for k in sd if k.startswith("distill_head.")]
    if distill:
        sd = {k: v for k, v in sd.items() if not k.startswith("distill_head.")}
        notes.append(f"ignored {len(distill)} distill_head.* keys (self-distillation head, unused at inference)")
    low = sorted({str(v.dtype).removeprefix("torch.") for v in sd.values() if v.dtype in (torch.float16, torch.bfloat16)})
    if low:
        sd = {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in sd.items()}
        notes.append(f"cast {'/'.join(low)} weights to float32")
    return sd, "; ".join(notes)


def _select(obj: dict, ema: bool) -> dict:
    if ema:
        if not isinstance(obj.get("model_ema"), dict):
            raise CheckpointError(f"the checkpoint has no 'model_ema' weights (keys: {_keys(obj)}): drop --ema / ema=True")
        return _check_tensors(obj["model_ema"], "model_ema")
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            return _check_tensors(obj[key], key)
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    raise CheckpointError(
        f"no state_dict found in the checkpoint (top-level keys: {_keys(obj)}): expected 'model', "
        f"'state_dict' or a dict of tensors; {RESAVE_HINT}"
    )


def _check_tensors(sd: dict, where: str) -> dict:
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad or not sd:
        what = f"non-tensor entries such as {bad[0]!r}" if bad else "no tensors"
        raise CheckpointError(f"checkpoint entry {where!r} has {what}: it is not a model state_dict; {RESAVE_HINT}")
    return dict(sd)


def _keys(d: dict, n: int = 5) -> str:
    keys = [str(k) for k in d][:n]
    more = len(d) - len(keys)
    return ", ".join(keys) + (f" (+{more} more)" if more > 0 else "") if keys else "none"


# --------------------------------------------------------------------------------------------
# reading the architecture off the shapes


def infer_config(state_dict: dict, family: str = "vim", **overrides) -> VimConfig:
    """The :class:`VimConfig` whose model has exactly ``state_dict``'s keys and shapes.

    ``family`` (``vim`` or ``videomamba``) decides what the file cannot: where the class token
    sits and whether the scan directions are averaged. ``img_size`` (default 224) gives the
    stride from the ``pos_embed`` grid; ``overrides`` then replace config fields.
    """
    if family not in FAMILIES:
        raise CheckpointError(f"unknown family {family!r}: choose one of {', '.join(FAMILIES)}")
    missing = [k for k in _REQUIRED if k not in state_dict]
    if missing:
        raise CheckpointError(
            f"not a Vision Mamba state_dict: missing {_keys(dict.fromkeys(missing))}; expected the official "
            "hustvl/Vim or OpenGVLab/VideoMamba layout (pos_embed, patch_embed, layers.N.mixer.*)"
        )
    if _BACKWARD_KEY not in state_dict:
        raise CheckpointError(
            f"unsupported variant: {_BACKWARD_KEY} is missing, so this is a bimamba v1 / unidirectional "
            "Mamba checkpoint; bimamba v1 / unidirectional Mamba checkpoints are not supported (only bimamba v2)"
        )
    sh = {k: tuple(v.shape) for k, v in state_dict.items()}
    arch = _mixer_shapes(sh)
    img_size = int(overrides.pop("img_size", 0) or 0)
    geometry = _geometry(sh, "cls_token" in sh, img_size, arch["embed_dim"])
    fields = dict(
        **arch,
        **geometry,
        num_classes=sh["head.weight"][0] if "head.weight" in sh else 0,
        cls_position=_CLS_POSITION[family] if "cls_token" in sh else "none",
        divide_out=family == "vim",
        family=family,
    )
    try:
        return VimConfig(**fields).replace(**overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"bad override for the inferred config: {e}") from None


def _mixer_shapes(sh: dict) -> dict:
    """Width, depth, state size, expand, dt rank and conv width from the layer shapes."""
    d = sh["cls_token"][-1] if "cls_token" in sh else sh["patch_embed.proj.weight"][0]
    depth = 1 + max(int(m.group(1)) for k in sh if (m := _LAYER_RE.match(k)))
    d_inner, d_state = sh["layers.0.mixer.A_log"]
    in_rows, in_cols = sh["layers.0.mixer.in_proj.weight"]
    if in_cols != d or in_rows != 2 * d_inner or d_inner % d:
        raise CheckpointError(
            f"unsupported variant: layers.0.mixer.in_proj.weight has shape {(in_rows, in_cols)}, expected "
            f"(2·expand·{d}, {d}) with A_log {(d_inner, d_state)}: not an official Vim/VideoMamba mixer"
        )
    dt_rank = sh["layers.0.mixer.dt_proj.weight"][1]
    return dict(
        embed_dim=d,
        depth=depth,
        d_state=d_state,
        d_conv=sh["layers.0.mixer.conv1d.weight"][-1],
        expand=d_inner // d,
        dt_rank=0 if dt_rank == math.ceil(d / 16) else dt_rank,  # 0 = the official default
    )


def _geometry(sh: dict, has_cls: bool, img_size: int, d: int) -> dict:
    """Patch size, channels, image size and stride from ``patch_embed`` and the ``pos_embed`` grid.

    stride = (img_size - patch) / (grid - 1). Without an explicit ``img_size`` the official 224 is
    tried first, then non-overlapping patches (``img_size = grid · patch``, e.g. 448 px files).
    """
    _, in_chans, ph, pw = sh["patch_embed.proj.weight"]
    if ph != pw:
        raise CheckpointError(f"unsupported variant: non-square patches {ph}x{pw} in patch_embed.proj.weight")
    tokens = sh["pos_embed"][1]
    grid = math.isqrt(tokens - has_cls)
    if len(sh["pos_embed"]) != 3 or sh["pos_embed"][2] != d or grid * grid != tokens - has_cls:
        raise CheckpointError(
            f"unsupported variant: pos_embed has shape {sh['pos_embed']}, whose {tokens - has_cls} patch rows "
            f"do not form a square grid of width {d} (class token {'present' if has_cls else 'absent'})"
        )
    for size in [img_size] if img_size else [_DEFAULT_IMG_SIZE, grid * ph]:
        stride = _stride(size, ph, grid)
        if stride:
            return dict(patch_size=ph, in_chans=in_chans, img_size=size, stride=stride)
    raise CheckpointError(
        f"pos_embed's {grid}x{grid} grid does not fit image size {img_size or _DEFAULT_IMG_SIZE} with patch {ph}: pass the image "
        f"size the model was trained at (img_size=..., e.g. {grid * ph})"
    )


def _stride(img_size: int, patch: int, grid: int) -> int:
    """The stride that tiles ``img_size`` into ``grid`` patches of ``patch`` (0 if none does)."""
    if grid == 1:
        return patch if img_size < 2 * patch else 0
    stride, rest = divmod(img_size - patch, grid - 1)
    return stride if rest == 0 and 0 < stride <= patch else 0


# --------------------------------------------------------------------------------------------
# building the model


def load_official(path, family: str = "vim", ema: bool = False, backend: str = "auto", obj: dict | None = None,
                  **overrides) -> VisionMamba:
    """A Vision Mamba in eval mode with the weights of the official checkpoint ``path``.

    The architecture is inferred from the shapes (:func:`infer_config`); ``family`` says Vim or
    VideoMamba, ``ema`` selects ``model_ema``, ``backend`` the op backend; ``overrides`` replace
    config fields (``img_size``, ``num_classes``, ``drop_path_rate``, ...). ``obj``: the file's
    contents when the caller has read it already (:func:`read_checkpoint`). rmeeto's compressed
    files are read by :func:`compressor.loading.load_model`, the one loading entry of the package.
    """
    obj = read_checkpoint(path) if obj is None else obj
    if "rmeeto_format" in obj:
        raise CheckpointError(f"{path} is an rmeeto compressed checkpoint: load it with compressor.load_model")
    sd, note = extract_state_dict(obj, ema=ema)
    if note:
        log.info("%s: %s", path, note)
    cfg = infer_config(sd, family, **overrides)
    model = VisionMamba(cfg)
    _load_strict(model, sd, overrides)
    return set_backend(model, backend).eval()


def _load_strict(model: VisionMamba, sd: dict, overrides: dict) -> None:
    """``load_state_dict(strict=True)``; its multi-line error becomes one line naming the first problem."""
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(_mismatch(model.state_dict(), sd, overrides) or f"cannot load the weights: {_reason(e)}") from e


def _mismatch(expected: dict, found: dict, overrides: dict) -> str:
    """One line describing how ``found`` differs from the model's ``expected`` state_dict."""
    hint = (
        f"check the overrides ({', '.join(f'{k}={v!r}' for k, v in overrides.items())})"
        if overrides else "the file mixes shapes of different models, or is a variant rmeeto does not support"
    )
    for k, v in expected.items():
        if k in found and found[k].shape != v.shape:
            return (
                f"shape mismatch for {k}: the model expects {tuple(v.shape)}, the checkpoint has "
                f"{tuple(found[k].shape)}; {hint}"
            )
    missing = [k for k in expected if k not in found]
    if missing:
        return f"the checkpoint lacks {len(missing)} key(s) of the inferred model ({_keys(dict.fromkeys(missing))}): it is incomplete or {hint}"
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        return (
            f"the checkpoint has {len(unexpected)} key(s) the inferred model lacks ({_keys(dict.fromkeys(unexpected))}): "
            "an unsupported Vision Mamba variant (e.g. rope, extra heads)"
        )
    return ""


# --------------------------------------------------------------------------------------------
# describing a file (``rmeeto info``)


def describe_checkpoint(path, family: str | None = None, ema: bool = False, obj: dict | None = None) -> dict:
    """What ``rmeeto info`` shows of an official checkpoint: the inferred architecture and facts
    about the file (``obj``: its contents, when already read).

    With ``family=None`` the family is the one the checkpoint's ``args.model`` names (official
    training checkpoints); without that, a Vim layout is read as Vim and ``ambiguous`` says it
    could as well be VideoMamba (the two share every key and shape).
    """
    obj = read_checkpoint(path) if obj is None else obj
    info = {"path": str(path), "top_level_keys": [str(k) for k in obj], "has_ema": isinstance(obj.get("model_ema"), dict)}
    info.update(epoch=obj.get("epoch"), model_name=_args_model(obj.get("args")))
    sd, note = extract_state_dict(obj, ema=ema)
    named = family_from_model_name(info["model_name"])
    cfg = infer_config(sd, family or named or "vim")
    ambiguous = family is None and named is None and cfg.cls_position != "none"
    info.update(
        rmeeto_format=None,
        family=family or named,
        family_source="--family" if family else ("args.model" if named else None),
        config=cfg,
        parameters=sum(v.numel() for v in sd.values()),
        tokens=cfg.num_tokens,
        cls_position=cfg.cls_position,
        cls_index=cfg.cls_index,
        ambiguous=ambiguous,
        ambiguity="Vim or VideoMamba layout: pass --family" if ambiguous else None,
        note=note,
    )
    return info


def family_from_model_name(name: str | None) -> str | None:
    """The family an official training run's ``args.model`` names (``vim_tiny_patch16_224_...`` →
    ``vim``, ``videomamba_small`` → ``videomamba``); None when it names neither."""
    low = (name or "").lower()
    for family in FAMILIES:
        if low.startswith(family):
            return family
    return None


def _args_model(args) -> str | None:
    """``args.model`` of an official training checkpoint (a Namespace, sometimes a dict)."""
    value = args.get("model") if isinstance(args, dict) else getattr(args, "model", None)
    return value if isinstance(value, str) else None
