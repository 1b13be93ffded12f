"""Post-hoc conversion of Vision Mamba modules rmeeto did not write (``tests/foreign_models.py``):
discovery, bit-exact no-op, merged outputs against rmeeto's own model with the same weights or a
float64 loop written from the spec, the user's module untouched, deepcopy, save → load through a
model factory, re-training gradients, the fast merge, and one-line errors."""

from __future__ import annotations

import copy

import foreign_models as fm
import pytest
import torch
import torch.nn as nn
from helpers import naive_merge

from compressor import load_model
from compressor.convert import ConvertedModel, FactoryRef, convert, save_compressed, unmerged
from compressor.errors import RmeetoError, ShapeError
from compressor.merge import MergeConfig, TokenMerge, set_merge_impl
from compressor.models import VimConfig, VisionMamba

pytestmark = pytest.mark.usefixtures("one_thread")

MERGE = MergeConfig(num_prune=3)  # depth 4: one merge before layer 2
VARIANTS = {
    "official_like": dict(cls=8, tokens=17, call="hidden_residual", readout="token", blocks="stages", param="cls_tok"),
    "head_cls_residual_inside": dict(cls=0, tokens=17, call="hidden", readout="token", blocks="body", param="class_embedding"),
    "tail_cls_sequential": dict(cls=16, tokens=17, call="hidden", readout="token", blocks="trunk", param="summary_token"),
    "mean_pool_nested": dict(cls=None, tokens=16, call="hidden_residual", readout="mean", blocks="encoder.layers", param=None),
}


def images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def conv(model, recipe, **kw):
    """``convert`` with an explicit example input (HeadClsResidualInside has no ``img_size``)."""
    return convert(model, recipe, example_input=images(1, seed=9), **kw)


def merge_nodes(gm):
    mods = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], TokenMerge)]


def block_tokens(gm, model, x) -> list[int]:
    """Tokens each block of the converted model sees."""
    container = VARIANTS_BY_TYPE[type(model)]["blocks"]
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
             for b in gm.get_submodule(container).children()]
    with torch.no_grad():
        gm(x)
    for h in hooks:
        h.remove()
    return seen


VARIANTS_BY_TYPE = {type(getattr(fm, name)()): v for name, v in VARIANTS.items()}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    name = request.param
    return name, getattr(fm, name)(), VARIANTS[name]


def test_discovery_finds_blocks_tokens_class_token_and_readout(variant):
    name, model, want = variant
    gm = conv(model, "none")
    lay = gm.layout
    assert isinstance(gm, ConvertedModel) and gm.cfg is None
    assert (lay.blocks, lay.depth, lay.num_tokens, lay.cls_index) == (want["blocks"], 4, want["tokens"], want["cls"])
    assert (lay.block_call, lay.readout, lay.cls_param) == (want["call"], want["readout"], want["param"])
    assert lay.input_shape == (3, 32, 32) and lay.num_classes == model(images(1)).shape[-1]


def test_noop_recipe_is_bit_identical_to_the_original(variant):
    _, model, _ = variant
    gm = conv(model, "none")
    x = images()
    assert merge_nodes(gm) == [] and gm.steps == []
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_merges_follow_the_schedule_and_the_class_token(variant):
    _, model, want = variant
    gm = conv(model, MERGE)
    assert len(merge_nodes(gm)) == 1
    (step,) = gm.steps
    L = want["tokens"]
    assert (step.layer, step.tokens_in, step.r) == (2, L, 3)
    assert step.cls_out == (None if want["cls"] is None else (want["cls"] * (L - 3)) // L)
    assert block_tokens(gm, model, images()) == [L, L, L - 3, L - 3]


def test_the_users_module_is_left_untouched(variant):
    _, model, _ = variant
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mode = model.training
    gm = conv(model, MERGE)
    gm.train()
    gm(images()).sum().backward()
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(1.0)
    assert model.training == mode
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_deepcopy_keeps_info_and_computes_the_same(variant):
    _, model, _ = variant
    gm = conv(model, MERGE)
    twin = copy.deepcopy(gm)
    assert isinstance(twin, ConvertedModel) and twin.info == gm.info and twin.steps == gm.steps
    x = images()
    with torch.no_grad():
        assert torch.equal(twin(x), gm(x))


def test_save_and_load_through_the_model_factory(variant, tmp_path):
    name, _, _ = variant
    factory = FactoryRef.parse(f"foreign_models:{name}", '{"seed": 3}')
    model = factory.build()
    gm = conv(model, MERGE, factory=factory)
    with torch.no_grad():  # as if re-trained: the file must carry these weights, not the factory's
        for p in gm.parameters():
            p.mul_(1.01)
    path = tmp_path / "c.pt"
    save_compressed(gm, path)
    with pytest.raises(RmeetoError, match=f"--model-factory foreign_models:{name}"):
        load_model(path)  # the stored factory runs only when the user names it
    back = load_model(path, factory=f"foreign_models:{name}")
    assert back.info.factory == factory and back.layout == gm.layout and back.steps == gm.steps
    x = images()
    with torch.no_grad():
        assert torch.equal(back(x), gm.eval()(x))
        plain = unmerged(back)
        assert type(plain) is type(model) and torch.equal(plain(x), conv(plain, "none")(x))


# --------------------------------------------------------------------------------------------
# merged outputs: against rmeeto's own model (same weights) or a float64 loop from the spec


def _as_vim(model: nn.Module, cls_position: str) -> VisionMamba:
    """rmeeto's VisionMamba with the weights of an OfficialLikeVim / MeanPoolNested."""
    sd = model.state_dict()
    prefix = {"tokenizer.conv.": "patch_embed.proj.", "stem.": "patch_embed.proj.", "cls_tok": "cls_token",
              "pos_tab": "pos_embed", "pos": "pos_embed", "stages.": "layers.", "encoder.layers.": "layers.",
              "final_norm_w": "norm_f.weight", "encoder.norm_w": "norm_f.weight", "classifier.": "head.",
              "head.": "head."}
    inner = {".ssm.": ".mixer.", ".norm_w": ".norm.weight"}
    out = {}
    for k, v in sd.items():
        a = next(a for a in prefix if k.startswith(a))
        k = prefix[a] + k[len(a):]
        for a, b in inner.items():
            k = k.replace(a, b)
        out[k] = v
    cfg = VimConfig(embed_dim=32, depth=4, img_size=32, patch_size=8, stride=8, num_classes=sd[
        "classifier.weight" if "classifier.weight" in sd else "head.weight"].shape[0], cls_position=cls_position,
        drop_path_rate=0.0)
    vim = VisionMamba(cfg).eval()
    vim.load_state_dict(out, strict=True)
    return vim


@pytest.mark.parametrize("name,cls_position", [("official_like", "middle"), ("mean_pool_nested", "none")])
def test_merged_equals_converting_rmeetos_own_model(name, cls_position):
    model = getattr(fm, name)()
    vim = _as_vim(model, cls_position)
    x = images(3)
    with torch.no_grad():
        assert torch.allclose(model(x), vim(x), rtol=0, atol=1e-5)  # the port itself is right
        for mc in (MERGE, MergeConfig(num_prune=3, mode="prune"), MergeConfig(num_prune=8)):
            ours, theirs = conv(vim, mc)(x), conv(model, mc)(x)
            assert ((ours - theirs).norm() / ours.norm()) < 1e-5, mc


def _spec_loop(model, x: torch.Tensor, num_prune: int) -> torch.Tensor:
    """The hidden-only variants in float64, merging with the spec's pseudo-code (naive_merge) at
    layers 2, 4, ...: the metric is the block input (the residual stream itself)."""
    m = copy.deepcopy(model).double()
    x = x.double()
    if isinstance(m, fm.HeadClsResidualInside):
        h = m.embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([m.class_embedding.expand(h.shape[0], -1, -1), h], 1) + m.position_embedding
        blocks, tp = list(m.body), 0
        finish = lambda h, tp: m.fc(m.out_norm(h)[:, tp])  # noqa: E731
    else:
        h = m.patchify(x).flatten(2).transpose(1, 2)
        h = torch.cat([h, m.summary_token.expand(h.shape[0], -1, -1)], 1) + m.pos
        blocks, tp = list(m.trunk), h.shape[1] - 1
        finish = lambda h, tp: m.logits(m.ln_out(h)[:, tp])  # noqa: E731
    size = [[1.0] * h.shape[1] for _ in range(h.shape[0])]
    for i, blk in enumerate(blocks):
        L = h.shape[1]
        r = min(num_prune, (L - 1) // 2)
        if i > 0 and i % 2 == 0 and r > 0:
            rows, sizes = [], []
            for j in range(h.shape[0]):
                oh, _, os_ = naive_merge(h[j].tolist(), h[j].tolist(), size[j], r, tp)
                rows.append(oh)
                sizes.append(os_)
            h, size, tp = torch.tensor(rows, dtype=torch.float64), sizes, (tp * (L - r)) // L
        h = blk(h)
    return finish(h, tp)


@pytest.mark.parametrize("name", ["head_cls_residual_inside", "tail_cls_sequential"])
@pytest.mark.parametrize("num_prune", [3, 8])
def test_hidden_only_blocks_merge_as_a_float64_spec_loop(name, num_prune):
    model = getattr(fm, name)()
    x = images(2, seed=5)
    with torch.no_grad():
        want = _spec_loop(model, x, num_prune)
        got = conv(model, MergeConfig(num_prune=num_prune))(x).double()
    assert ((got - want).norm() / want.norm()) < 1e-4


def test_mean_readout_becomes_size_weighted():
    model = fm.mean_pool_nested()
    gm = conv(model, MERGE)
    from compressor.fx import weighted_token_mean

    assert any(n.target is weighted_token_mean for n in gm.graph.nodes)
    assert not any(n.op == "call_method" and n.target == "mean" for n in gm.graph.nodes)


def test_official_like_readout_rewrites_only_the_readouts_use_of_the_index():
    """The ``M // 2`` node places the class token and is read back: only the readout changes."""
    gm = conv(fm.official_like(), MERGE)
    floordiv = [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") == "floordiv"]
    assert len(floordiv) == 1 and len(floordiv[0].users) == 2  # the two slices around the class token
    readout = [n for n in gm.graph.nodes if n.meta.get("rmeeto_readout") is not None]
    assert len(readout) == 1 and readout[0].args[1][1] == gm.steps[-1].cls_out == 6


# --------------------------------------------------------------------------------------------
# re-training, fast merge, export


def test_gradients_reach_every_used_parameter_of_a_foreign_model():
    gm = conv(fm.official_like(), MERGE).train()
    gm(images()).logsumexp(-1).sum().backward()
    grads = [p.grad for p in gm.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["official_like", "head_cls_residual_inside"])
def test_triton_merge_equals_the_reference_on_a_foreign_model(name):
    from compressor.merge import fast

    if not (fast.available() and fast.interpreting()):
        pytest.skip("needs Triton's CPU interpreter (TRITON_INTERPRET=1 without CUDA)")
    gm = conv(getattr(fm, name)(), MergeConfig(num_prune=5)).eval()
    x = images()
    with torch.no_grad():
        set_merge_impl(gm, "torch")
        ref = gm(x)
        set_merge_impl(gm, "triton")
        got = gm(x)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_wrong_input_size_is_a_one_line_shape_error():
    gm = conv(fm.mean_pool_nested(), MERGE)
    with pytest.raises(ShapeError, match=r"\(batch, 3, 32, 32\)"):
        gm(torch.randn(1, 3, 48, 48))


# --------------------------------------------------------------------------------------------
# discovery that fails says what and how to help it


def test_a_resnet_is_not_a_vision_mamba():
    import torchvision

    with pytest.raises(RmeetoError, match="no stack of Mamba blocks.*hints=") as e:
        conv(torchvision.models.resnet18(), "r031")
    assert "\n" not in str(e.value)


def test_two_interleaved_stacks_are_refused_even_with_a_hint():
    with pytest.raises(RmeetoError, match="2 stacks of Mamba blocks"):
        conv(fm.TwoStacks(), "r031")
    with pytest.raises(RmeetoError, match="interleaved"):
        conv(fm.TwoStacks(), "r031", hints={"blocks": "a"})


def test_hints_name_the_block_container_and_the_class_token():
    model = fm.head_cls_residual_inside()
    gm = conv(model, MERGE, hints={"blocks": "body", "cls_param": "class_embedding"})
    assert gm.layout.cls_index == 0 and gm.layout.blocks == "body"
    with pytest.raises(RmeetoError, match="not a submodule"):
        conv(model, MERGE, hints={"blocks": "trunk"})
    with pytest.raises(RmeetoError, match="unknown hint 'block'"):
        conv(model, MERGE, hints={"block": "body"})
    with pytest.raises(RmeetoError, match="not a class token"):
        conv(model, MERGE, hints={"cls_param": "position_embedding"})


def test_a_readout_of_a_patch_token_is_refused():
    class LastPatch(fm.MeanPoolNested):
        def forward(self, img):
            x = self.stem(img).flatten(2).transpose(1, 2) + self.pos
            return self.head(self.encoder(x)[:, -1])

    torch.manual_seed(0)
    with pytest.raises(RmeetoError, match="reads token 15, which is not a class token"):
        conv(LastPatch(), MERGE)


def test_an_untraceable_root_forward_names_the_line_and_the_hints():
    class Branchy(fm.MeanPoolNested):
        def forward(self, img):
            x = self.stem(img).flatten(2).transpose(1, 2) + self.pos
            if x.abs().sum() > 0:  # data-dependent control flow in the traced forward
                x = x * 1.0
            return self.head(self.encoder(x).mean(1))

    with pytest.raises(RmeetoError, match=r"cannot trace Branchy.forward.*test_convert_foreign.py:\d+.*hints=") as e:
        conv(Branchy(), MERGE)
    assert "\n" not in str(e.value)


def test_the_input_size_is_read_off_the_model_or_asked_for():
    for name in ("official_like", "tail_cls_sequential", "mean_pool_nested"):  # img_size int, tuple, int
        assert convert(getattr(fm, name)(), "none").layout.input_shape == (3, 32, 32)
    with pytest.raises(RmeetoError, match="example_input=torch.randn"):
        convert(fm.head_cls_residual_inside(), MERGE)  # no img_size attribute

def _checked(x):
    """A helper of the model's own module that branches on values: fx traces into it unless named."""
    if x.abs().max() > 1e9:
        raise ValueError("diverged")
    return x


class WithLocalHelper(fm.MeanPoolNested):
    def forward(self, img):
        x = _checked(self.stem(img).flatten(2).transpose(1, 2)) + self.pos
        return self.head(self.encoder(x).mean(dim=1))


def test_leaf_function_hint_keeps_a_helper_whole():
    torch.manual_seed(0)
    model = WithLocalHelper().eval()
    with pytest.raises(RmeetoError, match="cannot trace WithLocalHelper.forward"):
        conv(model, MERGE)
    gm = conv(model, "none", hints={"leaf_functions": [_checked]})
    x = images()
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    assert any(n.target is _checked for n in gm.graph.nodes)
