"""params.yaml: the single source of every parameter, validated before any work starts."""

import re
from pathlib import Path, PurePosixPath
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from busi import BusiError


class Section(BaseModel):
    # Unknown keys are typos, and "0.7" is not a number: refuse both.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Fractions(Section):
    train: float = Field(gt=0, lt=1)
    val: float = Field(ge=0, lt=1)
    test: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self):
        total = self.train + self.val + self.test
        if abs(total - 1) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self


class DatasetParams(Section):
    """How a dataset is laid out. `busi`: Kaggle's BUSI (class folders, `<id>_mask[_N].png` beside each image).
    `folders`: one folder of images and one of masks, paired by the name rules, and a CSV of labels (one row per
    image; other columns are ignored). A normal image may have no mask file (no lesion)."""
    layout: str = "busi"  # a name of busi.data.layouts.LAYOUTS (checked by busi.cli.check_tables)
    images: str = "images"  # folders layout: the images' folder, relative to the dataset's root
    masks: str = "masks"  # the masks' folder
    image_name: str = "{id}.png"  # an image's file name; {id} is the id column's value
    mask_name: str = "{id}.png"  # its mask's file name, e.g. mask_{id}.png or {id}_mask.png
    labels: str = "labels.csv"  # the labels CSV, relative to the dataset's root (which is where it is found)
    id_column: str = "id"
    label_column: str = "label"  # benign | malignant | normal (any subset of them)
    case_column: str | None = None  # patient or case: its images are one group, never in two splits

    @field_validator("images", "masks", "labels")
    @classmethod
    def _relative(cls, value: str) -> str:
        path = PurePosixPath(value)
        if not value or path.is_absolute() or ".." in path.parts or "\\" in value:
            raise ValueError("must be a path inside the dataset's root (relative, without '..')")
        return value

    @field_validator("image_name", "mask_name")
    @classmethod
    def _name_rule(cls, value: str) -> str:
        if value.count("{id}") != 1 or re.sub(r"\{id\}", "", value).count("{") or "/" in value or "\\" in value:
            raise ValueError("must be a file name holding {id} once, e.g. mask_{id}.png")
        return value

    @model_validator(mode="after")
    def _masks_apart(self):
        if self.layout == "folders" and (self.images, self.image_name) == (self.masks, self.mask_name):
            raise ValueError("images and masks have the same folder and name rule: give masks another one")
        return self


class ExternalDataset(DatasetParams):
    """A dataset a trained model is scored on and never trained or selected on (evaluate-external)."""
    path: str  # its folder or .zip (absolute, or relative to where the pipeline runs)


NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")  # an external dataset's name: file names and MLflow metric names


class SplitParams(Section):
    seed: int
    fractions: Fractions
    conflicts: Literal["drop", "keep"]
    folds: int = Field(ge=2)


class PreprocessParams(Section):
    image_size: int = Field(ge=32)

    @field_validator("image_size")
    @classmethod
    def _divisible_by_32(cls, size: int) -> int:
        if size % 32:
            raise ValueError("must be divisible by 32 (the U-Net halves it five times)")
        return size


class ModelParams(Section):
    encoder: str  # any segmentation_models_pytorch encoder name, or tu-<timm name>
    encoder_weights: Literal["imagenet"] | None  # pretrained weights come from the Hugging Face hub
    attention: Literal["scse"] | None  # Squeeze-and-Excitation in the decoder blocks
    pooling: Literal["max", "avg"]  # avg replaces the encoder's max-pooling layers, as the study did
    dropout: float = Field(ge=0, lt=1)  # before the classification head
    head_pooling: Literal["avg", "max"]
    # What the classification head sees: `global` pools the deepest encoder features over the whole image;
    # `lesion` adds the same features pooled under the predicted lesion (last two encoder stages).
    class_head: Literal["global", "lesion"] = "global"
    # nnU-Net's deep supervision: this many decoder stages before the last (1/2, 1/4, ... of the image) get a 1x1
    # lesion head of their own, scored by the loss against the downsampled mask while training; 0 = off.
    deep_supervision: int = Field(0, ge=0, le=3)


class Probability(Section):
    p: float = Field(ge=0, le=1)


class AffineParams(Probability):
    scale: float = Field(ge=0, lt=1)  # +- relative zoom
    translate: float = Field(ge=0, lt=1)  # +- fraction of the side
    rotate: float = Field(ge=0, le=180)  # +- degrees


class BrightnessContrastParams(Probability):
    limit: float = Field(ge=0, le=1)


class BlurParams(Probability):
    max_kernel: int = Field(ge=3)


class ClaheParams(Probability):
    clip_limit: float = Field(gt=0)


class AugmentParams(Section):
    horizontal_flip: float = Field(ge=0, le=1)
    affine: AffineParams
    brightness_contrast: BrightnessContrastParams
    clahe: ClaheParams
    median_blur: BlurParams
    gaussian_blur: BlurParams


class TrainParams(Section):
    seed: int
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)  # AdamW's decoupled L2, the study's weight decay
    scheduler: Literal["cosine", "plateau"]
    class_loss_weight: float = Field(ge=0)  # cross-entropy on the class, added to Dice + BCE on the mask
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)  # of the class cross-entropy
    # the Dice loss over the batch's pixels pooled (batch), or per lesion image, then averaged (image: each lesion
    # counts as much as any other, as per-image Dice scores them; images without a lesion learn from BCE alone)
    dice: Literal["batch", "image"] = "batch"
    # uniform: every image once an epoch, the cross-entropy weighted by class; balanced: images drawn with
    # replacement so that each class is a third of every epoch, the cross-entropy unweighted.
    sampling: Literal["uniform", "balanced"] = "uniform"
    # picks the kept checkpoint on validation (val_score: the mean of validation Dice and weighted F1, both
    # tasks), or last: the final epoch's weights, none picked, no early stopping (as a fold of busi
    # cross-validate always keeps them: its validation images are the held-out ones it is scored on)
    monitor: Literal["last", "val_dice", "val_iou", "val_loss", "val_accuracy", "val_f1_weighted", "val_score"]
    patience: int = Field(ge=1)  # early stopping: epochs without a better monitor value
    # epochs of self-supervised pretraining (the U-Net restores distorted training images) before the masks
    pretrain_epochs: int = Field(default=0, ge=0)
    ema: float = Field(ge=0, lt=1)  # decay of an exponential moving average of the weights; 0 turns it off
    validate_raw: bool  # with EMA, also validate the raw weights each epoch (val_raw_* in the history)
    precision: Literal["auto", "fp32", "bf16"]  # auto: bf16 autocast where the CPU supports it, AMP on CUDA
    max_train_images: int = Field(ge=0)  # 0: all; a smaller number makes quick smoke runs

    @model_validator(mode="after")
    def _plateau_watches_a_metric(self):
        if self.monitor == "last" and self.scheduler == "plateau":
            raise ValueError("monitor: last watches no validation metric, which scheduler: plateau needs; "
                             "use scheduler: cosine, or a val_* monitor")
        return self


class CropConfig(Section):
    """What rebuilds a crop network and cuts its crops (busi.model.crop), saved beside its weights."""
    size: int = Field(ge=32, le=512)  # the crop's side in pixels
    margin: float = Field(ge=0, le=2)  # the lesion's box grown by this much of its longer side, each way


class CropParams(CropConfig):
    """The crop network's training (busi.crop_training, stage train_crop)."""
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)  # the one-cycle schedule's peak
    seed: int
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # as train.precision


class EvaluateParams(Section):
    threshold: float = Field(gt=0, lt=1)  # on the lesion probability
    # step -> auto (decided on the validation split) | on | off | a value; a step left out is off. The steps, and
    # what each accepts, are busi.model.postprocessing.STEPS (checked by busi.cli.check_tables).
    postprocessing: dict[str, str | bool | float] = {}
    calibration: Literal["temperature", "off"] = "off"  # class probabilities: one temperature fitted on validation
    bootstrap: int = Field(ge=0)  # resamples for the 95% confidence intervals; 0 turns them off
    seed: int
    figure_cases: int = Field(ge=1)  # best and worst test cases per class in the contour figure


class NetworkConfig(Section):
    """What rebuilds one trained network: its model section and the square image size it was trained at.
    Training checkpoints and the predictor artifact store this, not the whole params file."""
    model: ModelParams
    image_size: int = Field(ge=32)


class Params(Section):
    dataset: DatasetParams = DatasetParams()  # the dataset the pipeline trains on
    external: dict[str, ExternalDataset] = {}  # datasets to score trained models on (never trained on)
    split: SplitParams
    preprocess: PreprocessParams
    model: ModelParams
    augment: AugmentParams
    train: TrainParams
    crop: CropParams
    evaluate: EvaluateParams

    @field_validator("external")
    @classmethod
    def _names(cls, external: dict) -> dict:
        for name in external:
            if not NAME.match(name):
                raise ValueError(f"{name!r}: a dataset name is lower-case letters, digits, - and _ (at most 40)")
        return external


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml; any problem is one BusiError line naming the parameter."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise BusiError(f"{path}: not found (run from the repository root)") from None
    except UnicodeDecodeError:
        raise BusiError(f"{path}: not a text file (expected YAML)") from None
    except IsADirectoryError:
        raise BusiError(f"{path}: a folder, not a params file") from None
    except yaml.YAMLError as err:
        raise BusiError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    try:
        return Params.model_validate(raw if raw is not None else {})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        msg = first["msg"].removeprefix("Value error, ")
        raise BusiError(f"{path}: {where}: {msg} (got {first['input']!r})") from None


def load_grid(path: Path | str, base: Params) -> dict[str, Params]:
    """A grid file (cv/study.yaml): {name: {dotted.param: value, ...}}, each configuration `base` with those
    changes, validated as params.yaml is; any problem is one BusiError line naming the file, row and parameter."""
    path = Path(path)
    try:
        grid = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise BusiError(f"{path}: cannot read the grid ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if not isinstance(grid, dict) or not grid:
        raise BusiError(f"{path}: a grid is a mapping of names to parameter changes, e.g. vgg16: "
                        "{model.encoder: vgg16}")
    configs = {}
    for name, changes in grid.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise BusiError(f"{path}: {name!r}: a name is lower-case letters, digits, - and _ (at most 40)")
        if not isinstance(changes, dict):
            raise BusiError(f"{path}: {name}: expected a mapping of parameters to values, got {changes!r}")
        tree = base.model_dump(mode="json")
        for key, value in changes.items():
            *sections, leaf = str(key).split(".")
            node = tree
            for section in sections:
                if not isinstance(node.get(section), dict):
                    raise BusiError(f"{path}: {name}: {key}: no such parameter")
                node = node[section]
            if leaf not in node:
                raise BusiError(f"{path}: {name}: {key}: no such parameter")
            node[leaf] = value
        try:
            configs[name] = Params.model_validate(tree)
        except ValidationError as err:
            first = err.errors()[0]
            msg = first["msg"].removeprefix("Value error, ")
            raise BusiError(f"{path}: {name}: {'.'.join(map(str, first['loc']))}: {msg} "
                            f"(got {first['input']!r})") from None
    return configs
