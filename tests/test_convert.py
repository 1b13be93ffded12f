"""``convert``: graph changes (merge nodes, readout) and numbers (bit-exact no-op, equal to a merge
loop written by hand, gradients, save/load), on small CPU models."""

from __future__ import annotations


import pytest
import torch

from compressor.convert import convert, save_compressed
from compressor.errors import RecipeError, ShapeError
from compressor.merge import MergeConfig, MergeStep, TokenMerge
from compressor import load_model
from compressor.models import VimConfig, VisionMamba, create_model
from compressor.models.vim import DropPath
from compressor.recipes import Recipe, load_recipe
from helpers import FIXTURES, record_tokens


# the paper's token table (official code), num_prune 11 on depth 24
R031_TOKENS = [197, 186, 175, 164, 153, 142, 131, 120, 109, 98, 87, 76]
R031_CLS = [98, 92, 86, 80, 74, 68, 62, 56, 50, 44, 39, 34]


pytestmark = pytest.mark.usefixtures("one_thread")


def merge_nodes(gm) -> list:
    mods = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], TokenMerge)]


def hand_schedule(depth: int, L: int, tp: int | None, num_prune: int, final_tokens: int = 0):
    """The spec's schedule written out: merges before every 2nd layer, r capped at (L - 1) // 2,
    the class token moving to (tp * (L - r)) // L."""
    layers = [i for i in range(1, depth) if i % 2 == 0]
    steps = {}
    for k, i in enumerate(layers):
        want = L - final_tokens if final_tokens and k == len(layers) - 1 else num_prune
        r = min(want, (L - (tp is not None)) // 2)
        if r <= 0:
            continue
        new_tp = None if tp is None else (tp * (L - r)) // L
        steps[i] = MergeStep(i, L, r, tp, new_tp)
        L, tp = L - r, new_tp
    return steps, tp


def eager_merged(model: VisionMamba, cfg: MergeConfig, img: torch.Tensor) -> torch.Tensor:
    """The merged forward as a plain loop over ``model.layers`` (no converter, no fx)."""
    c = model.cfg
    steps, tp = hand_schedule(c.depth, c.num_tokens, c.cls_index, cfg.num_prune, cfg.final_tokens)
    hidden, residual, size = model.embed(img), None, None
    for i, blk in enumerate(model.layers):
        if i in steps:
            hidden, residual, size = TokenMerge(steps[i], cfg)(hidden, residual, size)
        hidden, residual = blk(hidden, residual)
    out, _ = model.norm_f(model.drop_path(hidden), residual)
    if tp is not None:
        feat = out[:, tp]
    elif size is None:
        feat = out.mean(dim=1)
    else:
        feat = (out * size).sum(dim=1) / size.sum(dim=1)
    return model.head(feat)


@pytest.fixture(scope="module")
def deep():
    """Depth 24 at 224 px (197 tokens) but narrow, so that a forward stays cheap on a CPU."""
    torch.manual_seed(0)
    model = create_model("vim_tiny", embed_dim=32, img_size=224, num_classes=5).eval()
    return model, torch.randn(1, 3, 224, 224)


@pytest.fixture(scope="module")
def deep_r031(deep):
    """The depth-24 model converted with r031 and run once: (gm, output, tokens per block)."""
    model, x = deep
    gm = convert(model, "r031")
    out, seen = record_tokens(gm, x)
    return gm, out, seen


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return create_model("vim_test").eval(), torch.randn(2, 3, 32, 32)


def test_none_recipe_is_bit_exact_and_inserts_nothing(small):
    model, x = small
    gm = convert(model, "none")
    assert merge_nodes(gm) == [] and gm.steps == []
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_r031_depth24_tokens_per_layer_and_class_token(deep_r031):
    gm, _, seen = deep_r031
    nodes = merge_nodes(gm)
    assert len(nodes) == 11
    assert [n.meta["rmeeto_merge"].layer for n in nodes] == list(range(2, 24, 2))
    assert seen == [t for t in R031_TOKENS for _ in range(2)]
    assert [s.cls_out for s in gm.steps] == R031_CLS[1:]
    assert gm.readout.index == 34
    steps, tp = hand_schedule(24, 197, 98, 11)
    assert [s.tokens_out for s in steps.values()] == R031_TOKENS[1:] and tp == 34


def test_paper_vim_ti_ends_at_76_tokens_class_token_35(deep):
    model, x = deep
    gm = convert(model, "paper-vim-ti")
    _, seen = record_tokens(gm, x)
    uniform = [197 - 5 * k for k in range(11)]  # 197 ... 147
    assert seen == [t for t in uniform + [76] for _ in range(2)]
    assert gm.readout.index == 35 and gm.steps[-1].cls_out == 35
    assert [s.cls_out for s in gm.steps][:2] == [95, 92]


def test_converted_equals_a_hand_written_merge_loop(deep, deep_r031):
    model, x = deep
    _, ours, _ = deep_r031
    with torch.no_grad():
        ref = eager_merged(model, load_recipe("r031").merge, x)
    # the graph runs the hand loop's modules in the same order on the same inputs: bit-exact
    assert torch.equal(ours, ref), (ours - ref).abs().max()


def test_gradients_flow_through_merges():
    torch.manual_seed(0)
    model = create_model("vim_test", drop_path_rate=0.0).train()
    gm = convert(model, "r031")
    assert gm.training and len(merge_nodes(gm)) == 1 and gm.steps[0].layer == 2
    loss = gm(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum()
    loss.backward()
    for name, p in gm.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.startswith(("layers.", "cls_token", "pos_embed", "patch_embed")):
            assert p.grad.abs().sum() > 0, name
    for i in (2, 3):  # right at the merge and after it
        assert gm.get_submodule(f"layers.{i}.mixer.in_proj").weight.grad.abs().sum() > 0


def test_save_compressed_and_load_model_round_trip(small, tmp_path):
    model, x = small
    gm = convert(model, "r031")
    path = tmp_path / "c.pt"
    save_compressed(gm, path, extra={"note": "test"})
    loaded = load_model(path)
    assert loaded.extra == {"note": "test"} and len(merge_nodes(loaded)) == 1
    assert loaded.steps == gm.steps and loaded.recipe == gm.recipe
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))


def test_wrong_input_size_is_a_one_line_shape_error(small):
    model, _ = small
    gm = convert(model, "r031")
    with pytest.raises(ShapeError) as e:
        gm(torch.randn(1, 3, 48, 48))
    msg = str(e.value)
    assert "\n" not in msg and "32" in msg and "48" in msg


def test_explicit_layers_beyond_the_depth_are_an_error(small):
    model, _ = small
    recipe = Recipe(name="deep-layers", merge=MergeConfig(num_prune=2, layers=(2, 9)))
    with pytest.raises(RecipeError, match="layer 9"):
        convert(model, recipe)


@pytest.fixture(scope="module")
def official():
    path = FIXTURES / "vim_official_depth8.pt"
    if not path.exists():
        pytest.skip(f"fixture {path} is absent")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    model = VisionMamba(VimConfig(depth=8, num_classes=10)).eval()
    model.load_state_dict({k: v.float() for k, v in obj["state_dict"].items()})
    return model, obj["images"][:1]


@pytest.mark.parametrize(
    "merge,tokens,cls",
    [
        (MergeConfig(num_prune=5), [197, 192, 187, 182], [95, 92, 89]),
        (MergeConfig(num_prune=11), [197, 186, 175, 164], [92, 86, 80]),
        (MergeConfig(num_prune=11, mode="prune"), [197, 186, 175, 164], [92, 86, 80]),
    ],
    ids=["r5", "r11", "prune11"],
)
def test_official_depth8_fixture_converts(official, merge, tokens, cls):
    model, img = official
    gm = convert(model, merge)
    out, seen = record_tokens(gm, img)
    assert seen == [t for t in tokens for _ in range(2)]
    assert [s.cls_out for s in gm.steps] == cls and gm.readout.index == cls[-1]
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_videomamba_class_token_stays_at_the_head():
    torch.manual_seed(0)
    model = create_model("videomamba_test").eval()
    gm = convert(model, "r031")
    assert gm.steps and all(s.cls_in == 0 and s.cls_out == 0 for s in gm.steps)
    assert gm.readout.index == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(gm(x), eager_merged(model, gm.recipe.merge, x), atol=1e-6, rtol=0)


def test_mean_pooling_readout_is_size_weighted():
    torch.manual_seed(0)
    model = create_model("vim_test", cls_position="none").eval()
    gm = convert(model, "r031")
    assert gm.readout.index is None and len(merge_nodes(gm)) == 1
    captured = {}
    h1 = gm.norm_f.register_forward_hook(lambda m, a, out: captured.__setitem__("tokens", out[0]))
    h2 = gm.merge2.register_forward_hook(lambda m, a, out: captured.__setitem__("size", out[2]))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = gm(x)
    h1.remove(), h2.remove()
    tokens, size = captured["tokens"], captured["size"]
    assert tokens.shape[1] == 8 and size.shape == (2, 8, 1) and size.sum(1).eq(16).all()
    assert size.max() > 1  # unequal weights, so the weighted mean differs from the plain one
    weighted = sum(size[:, i] * tokens[:, i] for i in range(8)) / size[:, :, 0].sum(1, keepdim=True)
    assert torch.allclose(out, model.head(weighted), atol=1e-6)
    assert not torch.allclose(out, model.head(tokens.mean(1)), atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(out, eager_merged(model, gm.recipe.merge, x), atol=1e-6)


def test_train_mode_applies_drop_path():
    torch.manual_seed(0)
    model = create_model("vim_test", drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    gm = convert(model.eval(), "r031")  # converted in eval mode, switched to train afterwards
    mods = dict(gm.named_modules())
    assert any(n.op == "call_module" and isinstance(mods[n.target], DropPath) for n in gm.graph.nodes)
    gm.train()
    a, b = gm(x), gm(x)
    assert not torch.equal(a, b)  # stochastic depth is active
    a.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in gm.parameters() if p.grad is not None)
    gm.eval()
    with torch.no_grad():
        assert torch.allclose(gm(x), eager_merged(model, gm.recipe.merge, x), atol=1e-6)
    # a no-op recipe in train mode draws the same random numbers as the eager model
    plain = convert(model.train(), "none")
    torch.manual_seed(1)
    y1 = plain(x)
    torch.manual_seed(1)
    y2 = model(x)
    assert torch.equal(y1, y2)
    plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), model.eval()(x))


def test_converted_models_own_their_weights():
    """Casting or training one converted model must not touch the source model or a sibling."""
    from compressor.convert import convert as _convert
    from compressor.merge import MergeConfig as _MC
    from compressor.models import create_model as _create

    base = _create("vim_test").eval()
    a = _convert(base, _MC(num_prune=2))
    b = _convert(base, "none")
    a.half()
    with torch.no_grad():
        next(b.parameters()).add_(1.0)
    assert all(p.dtype == torch.float32 for p in base.parameters())
    assert all(p.dtype == torch.float32 for p in b.parameters())
    assert not torch.equal(next(base.parameters()), next(b.parameters()))
