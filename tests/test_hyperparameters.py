import json
from pathlib import Path

import pytest

from sm_effdet.errors import UserInputError
from sm_effdet.hyperparameters import (
    AUTO_BATCH_MIN_STEPS,
    AUTO_BATCH_SIZES,
    AUTO_WARMUP_STEPS,
    DEFAULT_BACKBONE_LR_RATIOS,
    DEFAULT_LEARNING_RATES,
    RECIPES,
    SPECS,
    example_hyperparameters,
    parse_hyperparameters,
)

REPO = Path(__file__).resolve().parents[1]


def test_plain_string_encoding():
    """Console, boto3 and the generic Estimator send str(v)."""
    hp = parse_hyperparameters(
        {
            "backbone": "tf_lite2",
            "img_size": "384",
            "learning_rate": "0.01",
            "pretrained": "False",
            "augment": "True",
            "precision": "bf16-mixed",
            "num_workers": "3",
            "num_classes": "4",
        }
    )
    assert (hp.backbone, hp.img_size, hp.learning_rate) == ("tf_lite2", 384, 0.01)
    assert hp.pretrained is False and hp.augment is True
    assert (hp.precision, hp.num_workers, hp.num_classes) == ("bf16-mixed", 3, 4)


def test_json_encoding():
    """Framework estimators send json.dumps(v)."""
    hp = parse_hyperparameters(
        {
            "backbone": json.dumps("models.ross.efficientdet.backbones.tf_lite0"),
            "model_type": json.dumps("models.ross.efficientdet"),
            "img_size": json.dumps(512),
            "pretrained": json.dumps(False),
            "learning_rate": json.dumps(0.002),
            "precision": json.dumps("16-mixed"),
            "num_workers": json.dumps("auto"),
        }
    )
    assert hp.backbone == "tf_lite0" and hp.model_type == "models.ross.efficientdet"
    assert (hp.img_size, hp.pretrained, hp.learning_rate) == (512, False, 0.002)
    assert (hp.precision, hp.num_workers) == ("16-mixed", "auto")


def test_native_json_values_and_text_numbers():
    hp = parse_hyperparameters({"epochs": 3, "augment": False, "precision": 32, "img_size": "\"256\""})
    assert (hp.epochs, hp.augment, hp.precision, hp.img_size) == (3, False, "32", 256)


def test_platform_keys_are_accepted():
    hp = parse_hyperparameters(
        {
            "sagemaker_program": "train",
            "sagemaker_region": json.dumps("eu-west-1"),
            "sagemaker_container_log_level": "20",
            "_tuning_objective_metric": "validation:mAP",
        }
    )
    assert hp == parse_hyperparameters({})


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"learning_rat": "0.1"}, "unknown hyperparameter 'learning_rat'; did you mean 'learning_rate'?"),
        ({"img_size": "300"}, "hyperparameter 'img_size' has invalid value '300': it must be a multiple of 128"),
        ({"img_size": "128"}, "'img_size' has invalid value '128'"),
        ({"pretrained": "maybe"}, "'pretrained' has invalid value 'maybe': it must be true (effdet's COCO detector), false (from scratch) or backbone"),
        ({"batch_size": "1.5"}, "'batch_size' has invalid value '1.5': it must be 'auto' or a whole number of 1 or more."),
        ({"epochs": "0"}, "'epochs' has invalid value '0': it must be at least 1"),
        ({"learning_rate": "-1"}, "'learning_rate' has invalid value '-1': it must be 'auto' or a number greater than 0."),
        ({"optimizer": "adam"}, "'optimizer' has invalid value 'adam': it must be one of adamw, sgd."),
        ({"precision": "8"}, "'precision' has invalid value '8'"),
        ({"val_fraction": "1"}, "'val_fraction' has invalid value '1': it must be below 1"),
        ({"monitor": "map"}, "it must be one of valid_map, valid_loss."),
        ({"backbone": "tf_lite9"}, "'backbone' has unknown value 'tf_lite9'; did you mean 'tf_lite4'?"),
        ({"model_type": "models.torchvision.faster_rcnn"}, "'model_type' has unsupported value"),
        ({"num_workers": "-2"}, "it must be 'auto' or a whole number of 0 or more."),
        ({"devices": "0"}, "'devices' has invalid value '0': it must be 'auto' or a whole number of 1 or more."),
        ({"epochs": "NaN"}, "'epochs' has invalid value 'NaN': it must be a whole number."),
        ({"seed": "-1"}, "'seed' has invalid value '-1': it must be at least 0."),
        ({"seed": str(2**32)}, "'seed' has invalid value '4294967296': it must be at most 4294967295."),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(raw, expected):
    with pytest.raises(UserInputError) as info:
        parse_hyperparameters(raw)
    assert expected in str(info.value)


def test_every_backbone_short_and_dotted():
    from sm_effdet.backbones import BACKBONES

    for name in ("tf_lite0", "tf_lite4", "tf_d0", "d5", "tf_d3_ap", "tf_d7x"):
        assert name in BACKBONES
        dotted = parse_hyperparameters({"backbone": f"models.ross.efficientdet.backbones.{name}"})
        assert dotted.backbone == name


def test_recipe_keys_and_the_learning_rate_of_each_optimizer():
    default = parse_hyperparameters({})
    assert default.learning_rate == "auto" and default.peak_learning_rate("coco") == 0.001
    # Fresh BiFPN and heads on a pretrained backbone take a higher rate (docs/quality.md).
    assert default.peak_learning_rate("backbone") == DEFAULT_LEARNING_RATES["adamw"]["backbone"] >= 0.003
    assert default.peak_learning_rate("warm") == default.peak_learning_rate("scratch") == 0.001
    sgd = parse_hyperparameters({"optimizer": "sgd"})
    assert {sgd.peak_learning_rate(s) for s in DEFAULT_LEARNING_RATES["sgd"]} == {0.1}
    assert set(DEFAULT_LEARNING_RATES["sgd"]) == set(DEFAULT_LEARNING_RATES["adamw"])
    by_hand = parse_hyperparameters({"optimizer": "sgd", "learning_rate": "0.02"})
    assert {by_hand.peak_learning_rate(s) for s in DEFAULT_LEARNING_RATES["sgd"]} == {0.02}
    assert parse_hyperparameters({"pretrained": "Backbone"}).pretrained == "backbone"
    assert parse_hyperparameters({"pretrained": "False"}).pretrained is False
    custom = parse_hyperparameters(
        {"ema_decay": "0", "freeze_backbone_epochs": "3", "clip_grad_norm": "0"}
    )
    assert (custom.moving_average_decay(), custom.freeze_backbone_epochs, custom.gradient_clip) == (0, 3, None)
    assert (default.gradient_clip, sgd.gradient_clip) == (10.0, None)
    with pytest.raises(UserInputError, match="'ema_decay' has invalid value '1': it must be 'auto' or a "
                       "number of 0 or more and below 1"):
        parse_hyperparameters({"ema_decay": "1"})


def test_batch_size_auto_is_the_largest_that_makes_enough_steps_an_epoch():
    auto = parse_hyperparameters({})
    sizes = ", ".join(map(str, AUTO_BATCH_SIZES))
    for size in AUTO_BATCH_SIZES:
        enough = size * AUTO_BATCH_MIN_STEPS  # images that make the minimum number of steps at `size`
        assert auto.chosen_batch_size(enough, 1) == (size, (
            f"batch_size auto: {enough} training images make {AUTO_BATCH_MIN_STEPS} steps an epoch at {size}, "
            f"the largest of {sizes} that makes at least {AUTO_BATCH_MIN_STEPS}"))
        assert auto.chosen_batch_size(2 * enough, 2)[0] == size  # the steps split over two GPUs
    smallest = AUTO_BATCH_SIZES[-1]
    few = smallest * (AUTO_BATCH_MIN_STEPS - 1)
    assert auto.chosen_batch_size(few, 1) == (smallest, (
        f"batch_size auto: {few} training images make {AUTO_BATCH_MIN_STEPS - 1} steps an epoch at {smallest}, "
        f"the smallest of {sizes}; none makes {AUTO_BATCH_MIN_STEPS}"))
    # One image short of the minimum at the largest size: the next size.
    assert auto.chosen_batch_size(AUTO_BATCH_SIZES[0] * (AUTO_BATCH_MIN_STEPS - 1), 1)[0] == AUTO_BATCH_SIZES[1]
    assert parse_hyperparameters({"batch_size": "16"}).chosen_batch_size(10, 1) == (16, "batch_size 16")
    with pytest.raises(UserInputError, match="'batch_size' has invalid value '0': it must be 'auto' or a whole "
                       "number of 1 or more"):
        parse_hyperparameters({"batch_size": "0"})


def test_the_recipe_sets_the_moving_average_when_ema_decay_is_auto():
    short, long = parse_hyperparameters({}), parse_hyperparameters({"recipe": "Long", "epochs": "1"})
    assert (short.recipe, short.moving_average_decay()) == ("short", 0)
    assert RECIPES["short"]["ema_decay"] == 0
    assert (long.recipe, long.moving_average_decay()) == ("long", RECIPES["long"]["ema_decay"])
    assert RECIPES["long"]["ema_decay"] > 0
    assert long.describe_recipe() == (
        f"recipe: long: scale 0.5-1.5 on 100% of the images, EMA {RECIPES['long']['ema_decay']:g} with warm-up "
        "(ema_decay auto)")
    # ema_decay by hand wins over the recipe's.
    by_hand = parse_hyperparameters({"recipe": "long", "ema_decay": "0", "augment": "false"})
    assert by_hand.moving_average_decay() == 0
    assert by_hand.describe_recipe() == "recipe: long: augmentation off (augment=false), no EMA"
    assert parse_hyperparameters({"ema_decay": "0.999"}).moving_average_decay() == 0.999
    with pytest.raises(UserInputError, match="'recipe' has invalid value 'longer': it must be one of short, long"):
        parse_hyperparameters({"recipe": "longer"})


def test_backbone_learning_rate_ratio_by_starting_point():
    default = parse_hyperparameters({})
    for start, ratio in DEFAULT_BACKBONE_LR_RATIOS.items():
        assert default.backbone_lr_factor(start) == ratio
    assert DEFAULT_BACKBONE_LR_RATIOS["scratch"] == 1.0  # nothing pretrained to protect
    set_by_hand = parse_hyperparameters({"backbone_lr_ratio": "0.25"})
    assert {set_by_hand.backbone_lr_factor(s) for s in DEFAULT_BACKBONE_LR_RATIOS} == {0.25}
    assert parse_hyperparameters({"backbone_lr_ratio": "\"AUTO\""}).backbone_lr_ratio == "auto"
    for bad in ("0", "-1", "11", "fast"):
        with pytest.raises(UserInputError, match=f"'backbone_lr_ratio' has invalid value '{bad}': it must "
                           "be 'auto' or a number greater than 0 and at most 10"):
            parse_hyperparameters({"backbone_lr_ratio": bad})


def test_warmup_in_epochs_or_auto_in_steps():
    assert parse_hyperparameters({"warmup_epochs": "2.5"}).warmup_steps(20, 200) == 50
    auto = parse_hyperparameters({"warmup_epochs": "auto"})
    # Long runs: the fixed number of steps; it is more than one epoch of a small data set.
    assert auto.warmup_steps(20, 4000) == AUTO_WARMUP_STEPS
    # Short runs: a third of the run at most; never less than one epoch.
    assert auto.warmup_steps(20, 150) == 50
    assert auto.warmup_steps(20, 30) == 20
    # Large data sets: one epoch when that is longer.
    assert auto.warmup_steps(500, 50_000) == 500
    with pytest.raises(UserInputError, match="'warmup_epochs' has invalid value '-1': it must be 'auto' or a number of 0 or more"):
        parse_hyperparameters({"warmup_epochs": "-1"})


def test_batch_norm_momentum():
    assert parse_hyperparameters({}).bn_momentum == 0.1
    assert parse_hyperparameters({"bn_momentum": "0.01"}).bn_momentum == 0.01
    for bad in ("0", "1.5"):
        with pytest.raises(UserInputError, match=f"'bn_momentum' has invalid value '{bad}': it must be greater than 0 and at most 1"):
            parse_hyperparameters({"bn_momentum": bad})


def test_batch_norm_statistics_images():
    assert parse_hyperparameters({"bn_stats_images": "64"}).bn_stats_images == 64
    assert parse_hyperparameters({"bn_stats_images": "0"}).bn_stats_images == 0
    with pytest.raises(UserInputError, match="'bn_stats_images' has invalid value '-5': it must be at least 0"):
        parse_hyperparameters({"bn_stats_images": "-5"})


def test_example_file_lists_every_key_with_its_default():
    example = json.loads((REPO / "hyperparameters.example.json").read_text())
    assert example == example_hyperparameters()
    optional = {name for name, spec in SPECS.items() if spec.default is None}
    assert set(example) | optional == set(SPECS)
    assert all(isinstance(v, str) for v in example.values())  # the plain-string form
    assert parse_hyperparameters(example) == parse_hyperparameters({})


def test_docs_document_every_key():
    page = (REPO / "docs" / "training.md").read_text()
    for name in SPECS:
        assert f"| `{name}` |" in page, name


def test_seed_takes_numpys_whole_range():
    assert parse_hyperparameters({"seed": "0"}).seed == 0
    assert parse_hyperparameters({"seed": str(2**32 - 1)}).seed == 2**32 - 1


@pytest.mark.parametrize("key", ["backbone", "img_size", "optimizer", "model_type", "learning_ra" + "x" * 99_989])
def test_a_huge_value_gives_a_short_reason_with_its_advice(key):
    from sm_effdet.errors import FAILURE_REASON_LIMIT

    with pytest.raises(UserInputError) as info:
        parse_hyperparameters({key: "v" * 100_000})
    message = str(info.value)
    assert len(message) < 600 and "(100000 characters)" in message
    assert message.endswith(".") and len(message) < FAILURE_REASON_LIMIT
