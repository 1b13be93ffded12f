"""Per-layer recipes (``[merge] schedule = {layer = tokens}``): loading, validation, the schedule's
arithmetic against the uniform form, FLOPs, TOML and checkpoint round trips, conversion."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from compressor.cli import app
from compressor.convert import convert, save_compressed
from compressor.errors import RecipeError
from compressor.merge.schedule import MergeConfig, cls_per_layer, merge_schedule, tokens_per_layer
from compressor import load_model
from compressor.models import create_model
from compressor.models.registry import get_config
from compressor.profile import count_flops, paper_tokens_per_layer
from compressor.recipes import (
    Recipe,
    list_recipes,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
    recipe_to_toml,
    with_overrides,
)

PER_LAYER = '''name = "pl"
description = "three merges"
[merge]
schedule = {2 = 11, 4 = 11, 6 = 20}
'''


def _write(tmp_path, body, name="pl.toml"):
    p = tmp_path / name
    p.write_text(body)
    return p


def test_per_layer_file_loads_sorted_and_as_a_subtable(tmp_path):
    r = load_recipe(_write(tmp_path, PER_LAYER))
    assert r.merge.schedule == ((2, 11), (4, 11), (6, 20)) and r.merge.per_layer
    assert r.merge.merge_layers(24) == [2, 4, 6] and r.merge.prune_at(6) == 20 and r.merge.prune_at(3) == 0
    sub = load_recipe(_write(tmp_path, '[merge]\nmode = "prune"\n[merge.schedule]\n6 = 20\n2 = 11\n4 = 11\n', "sub.toml"))
    assert sub.merge.schedule == r.merge.schedule and sub.merge.mode == "prune"


def test_per_layer_tokens_and_class_token_by_hand():
    steps = merge_schedule(MergeConfig(schedule={2: 11, 4: 11, 6: 20}), 197, 98, 24)
    assert [(s.layer, s.tokens_in, s.r) for s in steps] == [(2, 197, 11), (4, 186, 11), (6, 175, 20)]
    # class token: 98 -> 98*186//197 = 92 -> 92*175//186 = 86 -> 86*155//175 = 76
    assert [s.cls_out for s in steps] == [92, 86, 76]
    assert tokens_per_layer(steps, 197, 24)[6:] == [155] * 18


def test_per_layer_caps_like_the_uniform_form():
    steps = merge_schedule(MergeConfig(schedule={1: 500, 2: 0, 3: 500}), 197, 98, 24)
    assert [(s.layer, s.r) for s in steps] == [(1, 98), (3, 49)]  # (197-1)//2, (99-1)//2; 0 is a no-op
    no_cls = merge_schedule(MergeConfig(schedule={1: 500}), 196, None, 24)
    assert no_cls[0].r == 98 and no_cls[0].cls_out is None


@pytest.mark.parametrize("name", [r.name for r in list_recipes() if r.merge.num_prune and not r.merge.final_tokens])
def test_uniform_builtins_equal_their_per_layer_spelling(name):
    uniform = load_recipe(name).merge
    for cfg in (get_config("vim_small"), get_config("videomamba_tiny"), get_config("vim_test")):
        layers = uniform.merge_layers(cfg.depth)
        per_layer = MergeConfig(mode=uniform.mode, schedule={i: uniform.num_prune for i in layers})
        a = merge_schedule(uniform, cfg.num_tokens, cfg.cls_index, cfg.depth)
        b = merge_schedule(per_layer, cfg.num_tokens, cfg.cls_index, cfg.depth)
        assert a == b
        assert cls_per_layer(a, cfg.cls_index, cfg.depth) == cls_per_layer(b, cfg.cls_index, cfg.depth)
        fa, fb = count_flops(cfg, a, merge=uniform), count_flops(cfg, b, merge=per_layer)
        assert fa["gflops_both"] == fb["gflops_both"] and fa["gflops_paper"] == pytest.approx(fb["gflops_paper"], abs=0)
        assert paper_tokens_per_layer(cfg, uniform) == paper_tokens_per_layer(cfg, per_layer)


def test_paper_convention_uses_each_layers_count():
    cfg = get_config("vim_small")
    m = MergeConfig(schedule={2: 11, 6: 20})
    tokens = paper_tokens_per_layer(cfg, m)
    assert tokens[1] == 197 and tokens[2] == 186 and tokens[5] == 186 and tokens[6] == 166 and tokens[-1] == 166


@pytest.mark.parametrize(
    "body,needles",
    [
        ('[merge]\nnum_prune = 5\nschedule = {2 = 3}\n', ["[merge] schedule", "remove num_prune"]),
        ('[merge]\ninterval = 3\nlayers = [2]\nschedule = {2 = 3}\n', ["remove interval, layers"]),
        ('[merge]\nschedule = {0 = 3}\n', ["[merge] schedule must be a table of layer = tokens", "{0 = 3}"]),
        ('[merge]\nschedule = {2 = -1}\n', ["[merge] schedule must be", "{2 = -1}"]),
        ('[merge]\nschedule = {two = 1}\n', ["[merge] schedule must be", "two"]),
        ('[merge]\nschedule = {2 = 1.5}\n', ["[merge] schedule must be", "1.5"]),
        ('[merge]\nschedule = {2 = true}\n', ["[merge] schedule must be"]),
        ('[merge]\nschedule = [2, 4]\n', ["[merge] schedule must be", "[2, 4]"]),
        ('[merge]\nschedule = {2 = 1, 02 = 3}\n', ["[merge] schedule must be"]),
        ('[merge]\nschedul = {2 = 1}\n', ['did you mean "schedule"']),
    ],
)
def test_bad_per_layer_files_name_key_and_file(tmp_path, body, needles):
    p = _write(tmp_path, body, "bad.toml")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: ") and "\n" not in msg
    for n in needles:
        assert n in msg


def test_empty_schedule_keeps_the_uniform_form(tmp_path):
    r = load_recipe(_write(tmp_path, "[merge]\nnum_prune = 4\nschedule = {}\n"))
    assert not r.merge.per_layer and r.merge.num_prune == 4


def test_overrides_cannot_mix_the_forms(tmp_path):
    r = load_recipe(_write(tmp_path, PER_LAYER))
    with pytest.raises(RecipeError, match=r"^overrides: \[merge\] schedule gives every merge layer"):
        with_overrides(r, num_prune=3)
    assert with_overrides(r, epochs=7).merge == r.merge


@pytest.mark.parametrize("name", [r.name for r in list_recipes()] + ["per-layer"])
def test_dict_and_toml_round_trips(tmp_path, name):
    r = load_recipe(_write(tmp_path, PER_LAYER)) if name == "per-layer" else load_recipe(name)
    d = recipe_to_dict(r)
    assert recipe_from_dict(d) == r
    assert ("schedule" in d["merge"]) == r.merge.per_layer  # uniform recipes are stored as before
    if r.merge.per_layer:
        assert d["merge"]["schedule"] == {"2": 11, "4": 11, "6": 20} and "num_prune" not in d["merge"]
    p = tmp_path / f"{r.name}.toml"
    p.write_text(recipe_to_toml(r))
    assert load_recipe(p) == r


def test_toml_keeps_retrain_changes_and_odd_strings(tmp_path):
    r = with_overrides(load_recipe("paper-vim-ti"), description='quote " and \u00e9', lr=3.5e-5, amp="bf16")
    p = tmp_path / "paper-vim-ti.toml"
    p.write_text(recipe_to_toml(r))
    text = p.read_text()
    assert "[retrain]" in text and "epochs = 30" in text and "weight_decay" not in text  # defaults left out
    assert load_recipe(p) == r


def test_convert_save_and_reload_a_per_layer_recipe(tmp_path):
    torch.manual_seed(0)
    model = create_model("vim_test").eval()  # 17 tokens, depth 4, class token at 8
    recipe = Recipe(name="pl", merge=MergeConfig(schedule={1: 3, 3: 2}))
    gm = convert(model, recipe)
    assert [(s.layer, s.tokens_in, s.r) for s in gm.steps] == [(1, 17, 3), (3, 14, 2)]
    path = tmp_path / "c.pt"
    save_compressed(gm, path)
    loaded = load_model(path)
    assert loaded.recipe == recipe and loaded.steps == gm.steps
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)
    # the same merges spelled uniformly compute the same numbers
    uniform = convert(model, MergeConfig(num_prune=3, layers=(1,)))
    with torch.no_grad():
        one = convert(model, MergeConfig(schedule={1: 3}))
        torch.testing.assert_close(one(x), uniform(x), rtol=0, atol=0)


def test_convert_refuses_layers_beyond_the_depth():
    with pytest.raises(RecipeError, match=r"\[merge\] schedule lists layer 9 but the model has 4 layers"):
        convert(create_model("vim_test"), Recipe(name="x", merge=MergeConfig(schedule={2: 1, 9: 1})))


def test_cli_shows_a_per_layer_recipe(tmp_path):
    res = CliRunner().invoke(app, ["recipes", "show", str(_write(tmp_path, PER_LAYER)), "--model", "vim_small"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # rich wraps at the runner's 80 columns
    assert "per layer" in text and "{2: 11, 4: 11, 6: 20}" in text
    assert "155" in res.output and "-20" in res.output
