"""VideoMamba video models: the official logits, the merge on the long frame-major sequence (class
token protected at 0), foreign video classes, and the family read off a checkpoint's keys."""

from __future__ import annotations

import copy

import pytest
import torch

import foreign_models as fm
from compressor import load_model
from compressor.convert import convert
from compressor.errors import CheckpointError, RmeetoError
from compressor.flops import count_flops
from compressor.merge import MergeConfig, merge_schedule
from compressor.models import VisionMamba, create_model, get_config, infer_config
from compressor.models.checkpoint import describe_checkpoint
from compressor.recipes import load_recipe
from helpers import naive_merge, official_as_user_file, record_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The official video model's weights in a user's file layout, read with the default family."""
    f, obj = official_as_user_file("videomamba_video_official_depth8.pt", tmp_path_factory.mktemp("video"),
                                   "videomamba_video_t.pth")
    return load_model(f), obj, f


def test_video_family_is_read_off_the_keys(official):
    model, _, path = official
    cfg = model.cfg
    assert (cfg.family, cfg.num_frames, cfg.tubelet, cfg.img_size, cfg.num_tokens) == ("videomamba", 8, 1, 64, 129)
    assert cfg.cls_index == 0 and not cfg.divide_out and cfg.input_shape == (3, 8, 64, 64)
    info = describe_checkpoint(path)  # no --family: not ambiguous, unlike an image file
    assert info["family"] == "videomamba" and not info["ambiguous"] and info["config"].is_video


def test_official_video_logits_and_token_layout(official):
    model, obj, _ = official
    with torch.no_grad():
        out = model(obj["clips"])
        first = model.embed(obj["clips"][:1])[0]
    assert ((out - obj["logits"]).abs().max() / obj["logits"].abs().max()).item() < 1e-4
    # class token at 0, then frame 0's 16 patches, frame 1's, ...: the official layer-0 input
    want = obj["debug_clip0_layer0_input"].float()
    assert first.shape == (129, 192) and (first - want).abs().max().item() < 1e-5


def test_none_recipe_is_bit_exact(official):
    model, obj, _ = official
    gm = convert(model, "none")
    with torch.no_grad():
        assert torch.equal(gm(obj["clips"]), model(obj["clips"]))
    assert gm.layout.input_shape == (3, 8, 64, 64) and gm.layout.token_frames == 8 and gm.layout.grid == 4


@pytest.mark.parametrize("merge,tokens", [
    (MergeConfig(num_prune=16), [129, 129, 113, 113, 97, 97, 81, 81]),
    (MergeConfig(num_prune=40), [129, 129, 89, 89, 49, 49, 25, 25]),  # capped: (49 - 1) // 2 = 24
    (MergeConfig(num_prune=16, mode="prune"), [129, 129, 113, 113, 97, 97, 81, 81]),
], ids=["r16", "r40-capped", "prune16"])
def test_merges_keep_the_class_token_at_zero_and_follow_the_schedule(official, merge, tokens):
    model, obj, _ = official
    gm = convert(model, merge)
    out, seen = record_tokens(gm, obj["clips"])
    assert seen == tokens
    assert [s.tokens_out for s in gm.steps] == tokens[2::2]
    assert all(s.cls_in == 0 and s.cls_out == 0 for s in gm.steps) and gm.readout.index == 0
    assert torch.isfinite(out).all()


def _spec_loop(model: VisionMamba, clip: torch.Tensor, num_prune: int) -> torch.Tensor:
    """The merged forward in float64 with the spec's pseudo-code merge (naive_merge) before layers
    2, 4, ...: metric = the previous mixer's output, residual merged with the same plan."""
    m = copy.deepcopy(model).double()
    hidden, residual = m.embed(clip.double()), None
    size = [1.0] * hidden.shape[1]
    for i, blk in enumerate(m.layers):
        L = hidden.shape[1]
        r = min(num_prune, (L - 1) // 2)
        if i > 0 and i % 2 == 0 and r > 0:
            h, res, size = naive_merge(hidden[0].tolist(), residual[0].tolist(), size, r, 0)
            hidden, residual = torch.tensor([h], dtype=torch.float64), torch.tensor([res], dtype=torch.float64)
        hidden, residual = blk(hidden, residual)
    out, _ = m.norm_f(hidden, residual)
    return m.head(out[:, 0])


@pytest.mark.parametrize("num_prune", [16, 40])
def test_merged_video_model_equals_a_float64_spec_loop(official, num_prune):
    model, obj, _ = official
    clip = obj["clips"][:1]
    with torch.no_grad():
        want = _spec_loop(model, clip, num_prune)
        got = convert(model, MergeConfig(num_prune=num_prune)).double()(clip.double())
    assert ((got - want).norm() / want.norm()).item() < 1e-5  # the merge itself sums in fp32


def test_foreign_video_class_converts_with_its_frames_read_off_the_temporal_table():
    model = fm.official_like_video()
    clip = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = convert(model, "none")  # no example_input: 4 frames = 4 temporal rows x tubelet 1
    assert plain.layout.input_shape == (3, 4, 32, 32) and plain.layout.cls_index == 0 and plain.layout.token_frames == 4
    with torch.no_grad():
        assert torch.equal(plain(clip), model(clip))
    gm = convert(model, MergeConfig(num_prune=8))
    out, seen = record_tokens(gm, clip, "stages")
    assert seen == [65, 65, 57, 57] and gm.steps[0].cls_out == 0 and torch.isfinite(out).all()


def test_foreign_video_class_with_tubelet_two():
    model = fm.official_like_video(frames=8, tubelet=2)
    gm = convert(model, MergeConfig(num_prune=4))
    assert gm.layout.input_shape == (3, 8, 32, 32) and gm.layout.token_frames == 4 and gm.layout.num_tokens == 65


def test_foreign_video_class_without_a_frame_count_asks_for_an_example():
    model = fm.official_like_video()
    model.temporal_pos = torch.nn.Parameter(torch.zeros(4, 32))  # not a (1, frames, dim) table any more
    with pytest.raises(RmeetoError, match=r"example_input=torch.randn\(1, 3, T, H, W\)"):
        convert(model, "none")


def test_zoo_video_checkpoint_round_trip_and_tubelet(tmp_path):
    torch.manual_seed(0)
    model = create_model("videomamba_video_test", num_frames=8, tubelet=2).eval()
    torch.save({"model": model.state_dict()}, tmp_path / "v.pth")
    loaded = load_model(tmp_path / "v.pth", family="vim")  # the keys say video: VideoMamba whatever --family says
    assert loaded.cfg == model.cfg and loaded.cfg.token_frames == 4 and loaded.cfg.num_tokens == 65
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_inconsistent_video_keys_are_one_line_errors():
    sd = create_model("videomamba_video_test").state_dict()
    no_temporal = {k: v for k, v in sd.items() if k != "temporal_pos_embedding"}
    with pytest.raises(CheckpointError, match="5-d patch_embed.proj.weight without temporal_pos_embedding"):
        infer_config(no_temporal)
    flat = dict(sd, **{"patch_embed.proj.weight": sd["patch_embed.proj.weight"][:, :, 0]})
    with pytest.raises(CheckpointError, match="4-d patch_embed.proj.weight with temporal_pos_embedding"):
        infer_config(flat)


def test_video_configs_and_presets():
    for name, dim, depth in (("videomamba_video_tiny", 192, 24), ("videomamba_video_small", 384, 24),
                             ("videomamba_video_middle", 576, 32)):
        cfg = get_config(name)
        assert (cfg.embed_dim, cfg.depth, cfg.num_tokens, cfg.num_classes) == (dim, depth, 1569, 400)
        assert cfg.input_shape == (3, 8, 224, 224)
    ends = {"paper-videomamba-video-ti": (24, 1129), "paper-videomamba-video-s": (24, 601),
            "paper-videomamba-video-m": (32, 249), "video-r031": (24, 601)}
    for recipe, (depth, last) in ends.items():
        steps = merge_schedule(load_recipe(recipe).merge, 1569, 0, depth)
        assert steps[-1].tokens_out == last and all(s.cls_out == 0 for s in steps)
    with pytest.raises(ValueError, match="multiple of the tubelet"):
        get_config("videomamba_video_test").replace(num_frames=6, tubelet=4)


def test_video_flops_count_the_tubelet_kernel():
    cfg = get_config("videomamba_video_tiny")
    f = count_flops(cfg)
    assert f["breakdown_both"]["patch_embed"] == pytest.approx(1569 * 192 * 3 * 16 * 16 / 1e9)
    deeper = count_flops(cfg.replace(num_frames=16, tubelet=2))  # same tokens, kernel twice as deep
    assert deeper["breakdown_both"]["patch_embed"] == pytest.approx(2 * f["breakdown_both"]["patch_embed"])
