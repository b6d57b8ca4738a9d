from __future__ import annotations

import pytest

from compressor.errors import EXIT_BAD_INPUT, RecipeError
from compressor.recipe import (
    SCHEMA,
    apply_overrides,
    default_recipe,
    dump_recipe,
    list_recipes,
    load_recipe,
    recipe_source,
    validate_recipe,
)

BUILTINS = [
    "group-lasso", "l0-group", "l1-group", "l1l2-group", "tl1-group", "tl1-group-2bit",
    "tl1-group-binary",
]  # fmt: skip


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_valid_and_complete():
    defaults = default_recipe()
    assert validate_recipe({}) == defaults
    assert validate_recipe(defaults) == defaults
    assert defaults["penalty"]["individual"] == {
        "kind": "tl1",
        "strength": 0.1,
        "lambda": None,
        "a": 1.0,
        "alpha": 1.0,
    }
    assert defaults["train"]["epochs"] == "auto" and defaults["train"]["min_steps"] == 600
    assert defaults["prune"]["keep"] == []
    assert set(defaults) == set(SCHEMA)


def test_defaults_are_fresh_copies():
    a = default_recipe()
    a["prune"]["keep"].append("x")
    assert default_recipe()["prune"]["keep"] == []


@pytest.mark.parametrize("name", BUILTINS)
def test_each_builtin_loads(name):
    recipe = load_recipe(name)
    assert recipe["description"]
    assert "\n" not in recipe["description"]
    assert recipe_source(name).name == f"{name}.yaml"
    # Strengths stay at their defaults (tuned later).
    assert recipe["penalty"]["individual"]["strength"] == 0.1
    assert recipe["penalty"]["group"]["strength"] == 1.0


def test_builtin_penalties():
    kinds = {name: load_recipe(name)["penalty"]["individual"]["kind"] for name in BUILTINS}
    assert kinds == {
        "group-lasso": "none",
        "l0-group": "l0",
        "l1-group": "l1",
        "l1l2-group": "l1-l2",
        "tl1-group": "tl1",
        "tl1-group-binary": "tl1",
        "tl1-group-2bit": "tl1",
    }
    assert load_recipe("tl1-group-binary")["activations"]["binarize"] is True
    assert load_recipe("tl1-group-2bit")["activations"]["bits"] == 2
    assert load_recipe("tl1-group")["activations"]["binarize"] is False
    assert load_recipe("l1l2-group")["penalty"]["individual"]["alpha"] == 1.0


def test_list_recipes_lists_every_builtin():
    listed = list_recipes()
    assert [name for name, _ in listed] == BUILTINS
    assert all(desc for _, desc in listed)


def test_overrides_precedence_and_parsing(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 7\n  lr: 0.05\n")
    recipe = load_recipe(
        str(path),
        [
            "train.epochs=3",
            "prune.keep=[conv1, 'layer1.*']",
            "penalty.group.lambda=1e-4",
            "train.lr=1",
            "target.macs = 4",
            "train.max_steps_per_epoch=",
            "data.input_shape=[1, 28, 28]",
        ],
    )
    assert recipe["train"]["epochs"] == 3  # override beats file
    assert recipe["prune"]["keep"] == ["conv1", "layer1.*"]
    assert recipe["penalty"]["group"]["lambda"] == pytest.approx(1e-4)
    assert recipe["train"]["lr"] == 1.0 and isinstance(recipe["train"]["lr"], float)
    assert recipe["target"]["macs"] == 4.0
    assert recipe["train"]["max_steps_per_epoch"] is None
    assert recipe["data"]["input_shape"] == [1, 28, 28]
    assert recipe["train"]["batch_size"] == 128  # default kept


def test_apply_overrides_on_a_dict_and_whole_section():
    base = load_recipe("tl1-group")
    out = apply_overrides(base, ["train={epochs: 1, lr: 0.5}", "activations.binarize=true"])
    assert out["train"]["epochs"] == 1 and out["train"]["lr"] == 0.5
    assert out["train"]["momentum"] == 0.9  # rest of the section kept
    assert out["activations"]["binarize"] is True
    assert base["train"]["epochs"] == "auto"  # input not mutated


def test_file_floats_without_dot_and_ints_as_floats(tmp_path):
    path = write(tmp_path, "penalty:\n  individual:\n    lambda: 5e-4\n    a: 2\n")
    recipe = load_recipe(str(path))
    assert recipe["penalty"]["individual"]["lambda"] == pytest.approx(5e-4)
    assert recipe["penalty"]["individual"]["a"] == 2.0
    assert isinstance(recipe["penalty"]["individual"]["a"], float)


def test_empty_file_gives_defaults(tmp_path):
    assert load_recipe(str(write(tmp_path, ""))) == default_recipe()


def test_dump_load_round_trip(tmp_path):
    recipe = load_recipe(
        "tl1-group-binary",
        [
            "prune.keep=[conv1, '*.fc']",
            "data.mean=[0.5, 0.4, 0.3]",
            "data.std=[0.25, 0.2, 0.1]",
            "data.input_shape=[3, 32, 32]",
            "penalty.individual.lambda=1e-5",
            "target.size=100000",
            "description='with: colon and \"quotes\"'",
        ],
    )
    text = dump_recipe(recipe)
    path = write(tmp_path, text, "dumped.yaml")
    assert load_recipe(str(path)) == recipe
    assert dump_recipe(load_recipe(str(path))) == text


# ---------------------------------------------------------------- errors


def test_errors_are_bad_input():
    assert issubclass(RecipeError, ValueError)
    assert RecipeError.exit_code == EXIT_BAD_INPUT


def test_unknown_key_suggests_closest(tmp_path):
    path = write(tmp_path, "train:\n  lrr: 0.1\n", "x.yaml")
    with pytest.raises(RecipeError) as info:
        load_recipe(str(path))
    msg = str(info.value)
    assert "Unknown recipe key `train.lrr`" in msg
    assert str(path) in msg
    assert "Did you mean `train.lr`?" in msg
    assert "Allowed keys under `train`:" in msg and "batch_size" in msg


def test_unknown_top_level_key_and_override_key(tmp_path):
    path = write(tmp_path, "trian: {epochs: 1}\n")
    with pytest.raises(RecipeError, match=r"`trian`.*Did you mean `train`\?.*top level"):
        load_recipe(str(path))
    with pytest.raises(
        RecipeError, match=r"`penalty.group.weighing` from --set .*`penalty.group.weighting`"
    ):
        load_recipe("tl1-group", ["penalty.group.weighing=macs"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr=-1", "`train.lr` (from --set train.lr=-1) must be a float > 0. Got -1 instead."),
        ("train.lr=0", "must be a float > 0. Got 0 instead."),
        ("train.lr=fast", "must be a float > 0. Got 'fast' instead."),
        ("train.lr=.nan", "must be a float > 0. Got nan instead."),
        (
            "train.epochs=true",
            "`train.epochs` (from --set train.epochs=true) must be 'auto' or an int >= 0. Got true "
            "instead.",
        ),
        ("train.epochs=2.5", "must be 'auto' or an int >= 0. Got 2.5 instead."),
        ("train.batch_size=0", "must be an int >= 1. Got 0 instead."),
        ("train.momentum=1", "must be a float in the range [0, 1). Got 1 instead."),
        ("penalty.individual.alpha=0", "must be a float in the range (0, 1]. Got 0 instead."),
        ("penalty.individual.a=0", "must be a float > 0."),
        ("penalty.individual.lambda=-1", "must be null or a float >= 0. Got -1 instead."),
        (
            "penalty.individual.kind=tl2",
            "must be one of 'none', 'l1', 'l0', 'tl1', 'l1-l2'. Got 'tl2' instead. Did you mean 'tl1'?",
        ),
        (
            "penalty.group.weighting=flops",
            "must be one of 'auto', 'uniform', 'size', 'macs'. Got 'flops' instead.",
        ),
        (
            "splitting.beta_growth=0.5",
            "`splitting.beta_growth` (from --set splitting.beta_growth=0.5) must be a float >= 1.",
        ),
        ("splitting.prox_every=0", "must be an int >= 1."),
        ("train.optimizer=rmsprop", "must be one of 'sgd', 'adam', 'adamw'."),
        ("train.max_steps_per_epoch=0", "must be null or an int >= 1. Got 0 instead."),
        (
            "target.macs=1",
            "`target.macs` (from --set target.macs=1) must be null or a float > 1. Got 1 instead.",
        ),
        ("target.size=0", "must be null or an int >= 1."),
        ("target.reach_fraction=0", "must be a float in the range (0, 1]."),
        (
            "prune.keep=conv1",
            "must be a list of strings. Got 'conv1' instead. Write a YAML list, e.g. [conv1].",
        ),
        ("prune.keep=[1]", "must be a list of strings. Got [1] instead."),
        ("activations.bits=3", "must be one of 1, 2, 4. Got 3 instead."),
        ("activations.bits=true", "must be one of 1, 2, 4. Got true instead."),
        ("activations.binarize=1", "must be a bool (true or false). Got 1 instead."),
        ("activations.ste=reLU", "Did you mean 'relu'?"),
        ("export.opset=12", "must be an int in the range [13, 23]. Got 12 instead."),
        ("gates.max_accuracy_drop=-0.5", "must be null or a float >= 0. Got -0.5 instead."),
        ("data.input_shape=[1, 28]", "must be null or a list of 3 ints >= 1. Got [1, 28] instead."),
        (
            "data.std=[0]",
            "`data.std` (from --set data.std=[0]) must be null or a non-empty list of floats > 0.",
        ),
        ('description="two\\nlines"', "must be a one-line str."),
        ("train=3", "`train` (from --set train=3) must be a mapping of keys (allowed: epochs,"),
    ],
)
def test_value_errors_name_key_value_and_allowed(override, expected):
    with pytest.raises(RecipeError) as info:
        load_recipe("tl1-group", [override])
    assert expected in str(info.value)


def test_value_error_names_the_file(tmp_path):
    path = write(tmp_path, "train:\n  lr: -1\n", "bad.yaml")
    with pytest.raises(RecipeError) as info:
        load_recipe(str(path))
    assert str(info.value) == f"`train.lr` (in {path}) must be a float > 0. Got -1 instead."


def test_validate_recipe_errors():
    with pytest.raises(RecipeError, match=r"`train.epochs` \(in my.yaml\) must be 'auto' or an int >= 0"):
        validate_recipe({"train": {"epochs": -1}}, source="my.yaml")
    with pytest.raises(RecipeError, match="must be a mapping"):
        validate_recipe({"train": [1]})


def test_cross_field_mean_std():
    with pytest.raises(RecipeError, match="must be set together"):
        load_recipe("tl1-group", ["data.mean=[0.5]"])
    with pytest.raises(RecipeError, match="same length"):
        load_recipe("tl1-group", ["data.mean=[0.5]", "data.std=[0.2, 0.2]"])
    with pytest.raises(RecipeError, match="3 channels"):
        load_recipe("tl1-group", ["data.mean=[0.5]", "data.std=[0.2]", "data.input_shape=[3,8,8]"])


def test_missing_recipe_lists_builtins(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe("tl1-grup")
    msg = str(info.value)
    assert "Unknown recipe 'tl1-grup'. Did you mean 'tl1-group'?" in msg
    for name in BUILTINS:
        assert name in msg
    with pytest.raises(RecipeError, match=r"does not exist.*tl1-group"):
        load_recipe(str(tmp_path / "nope.yaml"))
    with pytest.raises(RecipeError, match="is a directory"):
        load_recipe(str(tmp_path) + "/")


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.1\n   epochs: 3\n", "broken.yaml")
    with pytest.raises(RecipeError) as info:
        load_recipe(str(path))
    msg = str(info.value)
    assert f"Cannot parse {path}, line 3" in msg
    assert "Fix the YAML syntax" in msg


def test_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(RecipeError, match=r"line 3.*duplicate key 'lr'"):
        load_recipe(str(path))


def test_non_mapping_recipe_file(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a YAML mapping of keys"):
        load_recipe(str(path))


@pytest.mark.parametrize("bad", ["train.epochs", "=3", "train..lr=1", "train.lr:1"])
def test_bad_set_syntax(bad):
    with pytest.raises(RecipeError) as info:
        load_recipe("tl1-group", [bad])
    assert "write `key.path=value`" in str(info.value)
    assert "--set train.epochs=3" in str(info.value)


def test_bad_set_value_yaml():
    with pytest.raises(RecipeError, match=r"Cannot parse the value of --set 'prune.keep=\[a'"):
        load_recipe("tl1-group", ["prune.keep=[a"])


def test_accuracy_gate_and_seeker_have_their_own_defaults(tmp_path):
    """A collapse fails by default (5 points); without a target the seeker looks for the
    largest reduction within 1 point; each has its own key."""
    defaults = default_recipe()
    assert defaults["gates"]["max_accuracy_drop"] == 5.0
    assert defaults["target"]["seek_accuracy_drop"] == 1.0
    assert (
        apply_overrides({}, ["gates.max_accuracy_drop=null"])["gates"]["max_accuracy_drop"] is None
    )
    # set explicitly (file or --set) the gate also asks for the seeker, as it always did
    from_file = load_recipe(write(tmp_path, "gates: {max_accuracy_drop: 1}\n"))
    assert from_file["target"]["seek_accuracy_drop"] == 1.0
    from_set = load_recipe("tl1-group", ["gates.max_accuracy_drop=2"])
    assert from_set["target"]["seek_accuracy_drop"] == 2.0
    both = load_recipe("tl1-group", ["gates.max_accuracy_drop=2", "target.seek_accuracy_drop=null"])
    assert (
        both["gates"]["max_accuracy_drop"] == 2.0 and both["target"]["seek_accuracy_drop"] is None
    )
    # recipe.yaml of a default run repeats it: the default gate and the default seeker
    dumped = write(tmp_path, dump_recipe(load_recipe("tl1-group")), "resolved.yaml")
    again = load_recipe(dumped)
    assert again == load_recipe("tl1-group")
    assert again["target"]["seek_accuracy_drop"] == 1.0
