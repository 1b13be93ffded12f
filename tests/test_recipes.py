"""Recipes: loading, validation, round-trip, the paper's token tables, the CLI."""

from __future__ import annotations

import dataclasses
import re

import pytest
from typer.testing import CliRunner

from compressor.cli import app
from compressor.errors import RecipeError
from compressor.merge.schedule import (
    class_token_after,
    cls_per_layer,
    merge_schedule,
    reduction_ratio,
    tokens_per_layer,
)
from compressor.models.registry import get_config
from compressor.flops import paper_reduction_ratio
from compressor.recipes import (
    Recipe,
    RetrainConfig,
    list_recipe_names,
    list_recipes,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
    with_overrides,
)

BUILTINS = [
    "none", "r014", "r028", "r031", "r042", "r056", "prune-r031", "paper-vim-ti", "paper-vim-s",
    "paper-vim-b", "paper-videomamba-ti", "paper-videomamba-s", "paper-videomamba-b", "smoke",
    "paper-videomamba-video-ti", "paper-videomamba-video-s", "paper-videomamba-video-m", "video-r031",
]


def _schedule(name: str, cls: int | None = 98):
    steps = merge_schedule(load_recipe(name).merge, 197, cls, 24)
    return tokens_per_layer(steps, 197, 24), cls_per_layer(steps, cls, 24), steps


# ---------------------------------------------------------------- token tables (the paper's schedule)


def test_r031_tokens_and_class_token_positions():
    tokens, cls, _ = _schedule("r031")
    assert tokens[::2] == [197, 186, 175, 164, 153, 142, 131, 120, 109, 98, 87, 76]
    assert cls[::2] == [98, 92, 86, 80, 74, 68, 62, 56, 50, 44, 39, 34]
    assert tokens[1::2] == tokens[::2] and cls[1::2] == cls[::2]  # unchanged until the next merge


def test_r014_uniform_tokens_and_class_token_positions():
    tokens, cls, _ = _schedule("r014")
    assert tokens[::2] == list(range(197, 141, -5))
    assert tokens[-1] == 142
    assert cls[:6:2] == [98, 95, 92] and cls[-1] == 65


def test_paper_vim_ti_final_merge_to_76():
    tokens, cls, steps = _schedule("paper-vim-ti")
    assert tokens[::2] == [197, 192, 187, 182, 177, 172, 167, 162, 157, 152, 147, 76]
    assert cls[:6:2] == [98, 95, 92] and cls[20] == 68 and cls[22] == 35
    assert steps[-1].r == 71 and [s.r for s in steps[:-1]] == [5] * 10


@pytest.mark.parametrize("r,expected", [(1, 97), (5, 95), (11, 92), (50, 73), (98, 49)])
def test_class_token_worked_examples(r, expected):
    assert class_token_after(98, 197, r, ordered=True) == expected


def test_videomamba_class_token_stays_at_head_and_ti_ends_at_142():
    cfg = get_config("videomamba_tiny")
    assert cfg.cls_index == 0
    for name in ("paper-videomamba-ti", "paper-videomamba-s"):
        tokens, cls, _ = _schedule(name, cls=cfg.cls_index)
        assert set(cls) == {0}
    tokens, _, _ = _schedule("paper-videomamba-ti", cls=0)
    assert tokens[-1] == 142
    r = load_recipe("paper-videomamba-ti")
    assert r.merge.final_tokens == 0 and r.retrain.ema is False and r.retrain.epochs == 30


@pytest.mark.parametrize("name,ratio", [("r014", 0.14), ("r028", 0.28), ("r031", 0.31), ("r042", 0.42), ("r056", 0.56)])
def test_reduction_ratios_as_the_paper_counts_them(name, ratio):
    merge = load_recipe(name).merge
    assert round(paper_reduction_ratio(get_config("vim_small"), merge), 2) == ratio
    assert paper_reduction_ratio(get_config("vim_small"), merge) == pytest.approx(132 * merge.num_prune / 4728)
    if name != "r056":  # r056 hits the (L-1)//2 cap in the last merges: the real ratio is 0.54
        steps = merge_schedule(merge, 197, 98, 24)
        assert round(reduction_ratio(steps, 197, 24), 2) == ratio


def test_r056_real_schedule_is_capped():
    tokens, _, _ = _schedule("r056")
    assert tokens[-1] == 6 and all(n > 0 for n in tokens)


# ---------------------------------------------------------------- built-ins


def test_every_builtin_loads():
    assert list_recipe_names() == sorted(BUILTINS)
    recipes = list_recipes()
    assert [r.name for r in recipes] == sorted(BUILTINS)
    for r in recipes:
        assert isinstance(r, Recipe) and r.version == 1 and r.description
        assert r.merge.interval == 2 and r.merge.ordered and r.merge.distance == "cosine"


def test_builtin_values():
    expect = {"none": 0, "r014": 5, "r028": 10, "r031": 11, "r042": 15, "r056": 20, "prune-r031": 11,
              "paper-vim-ti": 5, "paper-vim-s": 11, "paper-vim-b": 11, "paper-videomamba-ti": 5,
              "paper-videomamba-s": 11, "paper-videomamba-b": 11, "smoke": 2, "paper-videomamba-video-ti": 40,
              "paper-videomamba-video-s": 88, "paper-videomamba-video-m": 88, "video-r031": 88}
    for name, num_prune in expect.items():
        assert load_recipe(name).merge.num_prune == num_prune, name
    assert load_recipe("prune-r031").merge.mode == "prune"
    assert load_recipe("paper-vim-ti").merge.final_tokens == 76
    assert load_recipe("paper-vim-ti").retrain.epochs == 30
    assert load_recipe("paper-vim-b").retrain.epochs == 15
    assert load_recipe("r031").retrain == RetrainConfig()  # the paper's 3-epoch defaults
    smoke = load_recipe("smoke").retrain
    assert (smoke.epochs, smoke.batch_size, smoke.mixup, smoke.cutmix, smoke.auto_augment) == (1, 16, 0.0, 0.0, "")


def test_retrain_defaults_are_the_papers():
    d = RetrainConfig()
    assert (d.epochs, d.lr, d.min_lr, d.warmup_epochs, d.weight_decay, d.batch_size) == (3, 2e-5, 1e-6, 0, 0.05, 128)
    assert (d.distill, d.distill_weight, d.distill_temperature, d.smoothing) == (True, 0.5, 1.0, 0.1)
    assert (d.mixup, d.cutmix, d.drop_path, d.auto_augment) == (0.8, 1.0, 0.1, "rand-m9-mstd0.5-inc1")
    assert (d.color_jitter, d.reprob, d.ema, d.ema_decay, d.amp) == (0.4, 0.25, False, 0.99996, "auto")
    assert (d.seed, d.clip_grad, d.num_workers, d.eval_crop_pct) == (0, 0.0, 8, 0.875)


def test_load_by_path(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text('description = "x"\n[merge]\nnum_prune = 3\n[retrain]\nlr = 1\n')
    r = load_recipe(p)
    assert r.name == "mine" and r.merge.num_prune == 3 and r.retrain.lr == 1.0 and isinstance(r.retrain.lr, float)
    assert load_recipe(str(p)) == r


def test_unknown_name_lists_builtins():
    with pytest.raises(RecipeError) as e:
        load_recipe("nosuch")
    msg = str(e.value)
    assert "nosuch" in msg and "r031" in msg and "paper-vim-ti" in msg and "\n" not in msg


# ---------------------------------------------------------------- bad files


@pytest.mark.parametrize(
    "body,needles",
    [
        ('[merge]\nnm_prune = 5\n', ["[merge]", "nm_prune", 'did you mean "num_prune"']),
        ('colour = 1\n', ["colour"]),
        ('[retrain]\nepoch = 3\n', ["[retrain]", "epoch"]),
        ('[merge]\nnum_prune = "x"\n', ['[merge] num_prune must be an integer >= 0, got "x"']),
        ('[merge]\nnum_prune = -1\n', ["[merge] num_prune must be an integer >= 0, got -1"]),
        ('[merge]\nnum_prune = 2.5\n', ["[merge] num_prune", "2.5"]),
        ('[merge]\nmode = "squash"\n', ['[merge] mode must be one of "merge", "prune", got "squash"']),
        ('[merge]\nordered = 1\n', ["[merge] ordered must be true or false, got 1"]),
        ('[retrain]\nlr = true\n', ["[retrain] lr", "true"]),
        ('[retrain]\namp = "fp8"\n', ["[retrain] amp", '"fp8"']),
        ('[retrain]\nepochs = 0\n', ["[retrain] epochs must be an integer >= 1, got 0"]),
        ('merge = 3\n', ["[merge] must be a table"]),
        ('version = 2\n', ["version must be 1", "got 2"]),
        ('[merge\nnum_prune = 1\n', ["invalid TOML"]),
    ],
)
def test_bad_recipe_files_name_key_and_file(tmp_path, body, needles):
    p = tmp_path / "bad.toml"
    p.write_text(body)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: ")
    assert "\n" not in msg
    for n in needles:
        assert n in msg


def test_missing_file_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "absent.toml")


# ---------------------------------------------------------------- dict round-trip and overrides


@pytest.mark.parametrize("name", BUILTINS)
def test_dict_round_trip_is_exact(name):
    r = load_recipe(name)
    d = recipe_to_dict(r)
    assert recipe_from_dict(d) == r
    assert isinstance(d["merge"]["layers"], list)  # plain data, safe for weights_only loading


def test_round_trip_with_layers_and_odd_values():
    r = with_overrides(load_recipe("r031"), layers=[3, 7], lr=3.3e-5, seed=7, amp="bf16")
    assert r.merge.layers == (3, 7)
    assert recipe_from_dict(recipe_to_dict(r)) == r


def test_recipe_from_dict_validates():
    d = recipe_to_dict(load_recipe("r031"))
    d["retrain"]["bogus"] = 1
    with pytest.raises(RecipeError, match=r"stored recipe: unknown key \[retrain\]"):
        recipe_from_dict(d)


def test_overrides_precedence_cli_over_recipe_over_default():
    base = load_recipe("paper-vim-s")
    r = with_overrides(base, epochs=None, num_prune=5, batch_size=64)
    assert r.retrain.epochs == 15  # None = not given: the recipe's value wins over the default 3
    assert r.merge.num_prune == 5 and r.retrain.batch_size == 64  # given: CLI wins
    assert r.retrain.lr == RetrainConfig().lr  # neither: the default
    assert base.merge.num_prune == 11  # frozen, not mutated
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.name = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    "kw,needle", [({"num_prun": 3}, "num_prun"), ({"epochs": -1}, "[retrain] epochs"), ({"mode": "x"}, "[merge] mode")]
)
def test_bad_overrides(kw, needle):
    with pytest.raises(RecipeError) as e:
        with_overrides(load_recipe("r031"), **kw)
    assert needle in str(e.value) and str(e.value).startswith("overrides: ")


# ---------------------------------------------------------------- CLI


runner = CliRunner()


def test_cli_lists_builtins():
    res = runner.invoke(app, ["recipes"])
    assert res.exit_code == 0, res.output
    for name in ("r031", "paper-vim-ti", "smoke"):
        assert name in res.output


def test_cli_show_r031_on_vim_small():
    res = runner.invoke(app, ["recipes", "show", "r031", "--model", "vim_small"])
    assert res.exit_code == 0, res.output
    assert re.search(r"\b76\b", res.output) and "0.31" in res.output
    assert "3.5846" in res.output and "5.0769" in res.output  # paper convention: recipe, baseline


def test_cli_show_with_img_size_and_path(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text("[merge]\nnum_prune = 1\n")
    res = runner.invoke(app, ["recipes", "show", str(p), "--model", "vim_test", "--img-size", "64"])
    assert res.exit_code == 0, res.output
    assert "64 px" in res.output


def test_cli_show_unknown_recipe_is_one_error_line():
    res = runner.invoke(app, ["recipes", "show", "nosuch"])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "nosuch" in lines[0]
    assert "Traceback" not in res.output


def test_cli_show_bad_file_is_one_error_line(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[merge]\nnum_prune = -3\n")
    res = runner.invoke(app, ["recipes", "show", str(p)])
    assert res.exit_code == 1
    assert "num_prune" in res.output and "Traceback" not in res.output
