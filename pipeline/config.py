"""The one typed config shared by the CLI, DVC params and Prefect flow parameters.

A profile (``configs/<name>.yaml``) is a delta over the defaults declared here; overrides
(``head.epochs=3``) are deltas over the profile. The resolved config is written to
``params.yaml``, which DVC tracks per section and every stage's ``main()`` reads.
Unknown keys are errors that name the key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PARAMS_FILE = "params.yaml"
INGEST_MODULE = "pipeline/stages/ingest.py"  # ingest.watch for sources without local files
PROFILES = ("demo", "demo-csv", "cpu", "statefarm", "smoke")


# torch device names this project runs on: auto, cpu, cuda, cuda:N, mps.
Device = Annotated[str, StringConstraints(pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")]
# Lightning accelerators this project runs on (gpu and cuda alike: CUDA). Whether this machine has
# one is checked where a stage starts (pipeline/machine.py): a GPU profile is written on CPU machines too.
Accelerator = Literal["auto", "cpu", "gpu", "cuda", "mps"]
# Lightning's precisions (auto: this project's choice per accelerator, see TrainerConfig).
Precision = Literal["auto", "16-true", "16-mixed", "bf16-true", "bf16-mixed", "32-true", "64-true"]


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


class Section(BaseModel):
    # No inf or nan anywhere: an infinite learning rate or weight decay only fails deep inside training.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def item_stage(stage: str, *items: object) -> str:
    """The DVC name of one ``foreach`` item (``head@0``) or ``matrix`` item (``member@1-0``) of ``stage``."""
    return f"{stage}@{'-'.join(str(i) for i in items)}"


class PathsConfig(Section):
    """Every artifact path, declared once, relative to ``root`` (the project directory)."""

    root: Path = Field(default=Path("."), exclude=True)
    raw: str = "data/raw"
    hidden: str = "data/hidden"
    staging: str = "data/external"
    split_csv: str = "data/split.csv"
    sample: str = "data/sample"
    features: str = "data/features"
    models: str = "models"
    # Checkpoints of per-fold training runs, outside their (non-persistent) DVC outputs, so that a
    # killed run resumes; not tracked by DVC or git.
    checkpoints: str = ".checkpoints"
    predictions: str = "data/predictions"
    reports: str = "reports"
    stage_metrics: str = "reports/stages"
    metrics: str = "reports/metrics.json"
    scores: str = "reports/scores"  # DVC metrics: one small JSON per model (a row each in `dvc metrics show`)
    plots: str = "reports/plots"  # the data of dvc.yaml's `plots:` (learning curves, confusion, calibration)
    report_html: str = "reports/report.html"
    submission: str = "submissions/submission.csv"

    def path(self, name: str) -> Path:
        """Absolute-or-root-relative path of a declared artifact: ``cfg.paths.path("raw")``."""
        return self.root / getattr(self, name)

    def stage_metrics_file(self, stage: str) -> Path:
        return self.path("stage_metrics") / f"{stage}.json"

    def fold_models(self, model: str, fold: int) -> Path:
        """The checkpoints and weights of ``model`` (head, finetune, pseudo, member<m>) trained for ``fold``."""
        return self.path("models") / model / f"fold{fold}"

    def checkpoints_for(self, out_dir: Path) -> Path:
        """Where the training run writing ``out_dir`` keeps its checkpoints (``out_dir`` itself when it
        lies outside the project)."""
        try:
            return self.path("checkpoints") / Path(out_dir).relative_to(self.root)
        except ValueError:
            return Path(out_dir)

    def fold_predictions(self, model: str, fold: int) -> Path:
        """``oof.csv`` (the fold's held-out rows) and ``test.csv`` of ``model``'s ``fold`` model."""
        return self.path("predictions") / "folds" / model / str(fold)

    def oof_predictions(self, model: str) -> Path:
        """``oof.csv`` (every held-out row, with its fold) and ``test.csv`` (mean of the fold models) of a
        model, gathered by the ``oof`` stage."""
        return self.path("predictions") / "oof" / model


class SyntheticConfig(Section):
    """The embedded State-Farm-shaped dataset (pipeline/synthetic/drivers.py)."""

    n_train_drivers: int = Field(26, ge=2)
    n_test_drivers: int = Field(8, ge=1)
    # Frames per train driver are drawn uniformly from this range (real data: 346-1,237).
    train_per_driver: tuple[int, int] = (346, 1237)
    n_test: int = Field(79_726, ge=1)
    width: int = Field(640, ge=32)
    height: int = Field(480, ge=24)
    jpeg_quality: int = Field(90, ge=30, le=100)
    seed: int = Field(2016, ge=0)

    @model_validator(mode="after")
    def _check(self) -> SyntheticConfig:
        lo, hi = self.train_per_driver
        if not 10 <= lo <= hi:
            raise ValueError("train_per_driver must be (lo, hi) with 10 <= lo <= hi (every driver has all 10 classes)")
        if self.n_test < self.n_test_drivers:
            raise ValueError(f"n_test ({self.n_test}) must be at least n_test_drivers ({self.n_test_drivers}): every test driver has images")
        if self.width * 3 != self.height * 4:
            raise ValueError(f"synthetic images must be 4:3 like the real 640x480 frames, got {self.width}x{self.height}")
        return self


class CompetitionConfig(Section):
    """What the competition's files look like (README: "Point it at another competition"). Class names,
    their order and the submission's id column are read from ``sample_submission``, never from here.

    ``folder``: ``train_dir/<class>/<image>`` (State Farm, Plant Seedlings), optionally a ``labels_csv``
    listing every train image with its label and group. ``csv``: ``labels_csv`` with id and label
    columns, images in the flat ``train_dir`` named by ``filename`` (e.g. ``{id}.jpg``; Cassava)."""

    layout: Literal["folder", "csv"] = "folder"
    train_dir: str = "train"
    test_dir: str = "test"
    labels_csv: str | None = None  # relative to the competition folder
    id_column: str = "id"  # in labels_csv
    label_column: str = "label"  # in labels_csv
    group_column: str | None = None  # in labels_csv (State Farm: subject); None: no groups, folds over images
    filename: str = "{id}"  # an image's file name from its id, in train_dir and test_dir
    extensions: list[str] = [".jpg", ".jpeg"]  # image file extensions (case-insensitive)
    sample_submission: str = "sample_submission.csv"
    # file: the test images are public and submit uploads submissions/submission.csv. code: Kaggle hides
    # them; a notebook run on Kaggle without internet writes the scored submission.csv, so submit uploads
    # the chain's models and pushes that notebook (pipeline/kernel/). Only submit reads this.
    submission: Literal["file", "code"] = "file"

    @model_validator(mode="after")
    def _check(self) -> CompetitionConfig:
        if self.layout == "csv" and not self.labels_csv:
            raise ValueError("competition.layout=csv needs competition.labels_csv (the file with id and label columns)")
        if self.group_column and not self.labels_csv:
            raise ValueError("competition.group_column is a column of competition.labels_csv: set labels_csv too")
        if self.filename.count("{id}") != 1:
            raise ValueError(f"competition.filename must contain {{id}} exactly once, got {self.filename!r}")
        if not self.extensions or not all(e.startswith(".") and len(e) > 1 for e in self.extensions):
            raise ValueError(f"competition.extensions must be like ['.jpg'], got {self.extensions}")
        return self


class ShapesConfig(Section):
    """The embedded tiny dataset in the CSV layout (pipeline/synthetic/shapes.py): a labels file and
    flat image folders, string class names, no groups."""

    n_classes: int = Field(5, ge=2, le=8)
    n_train: int = Field(300, ge=10)
    n_test: int = Field(100, ge=1)
    width: int = Field(64, ge=16)
    height: int = Field(64, ge=16)
    jpeg_quality: int = Field(90, ge=30, le=100)
    seed: int = Field(4242, ge=0)


class IngestConfig(Section):
    # synthetic: the State-Farm-shaped generator; shapes: the tiny CSV-layout one (both keep hidden test
    # labels for scoring); dir: a competition folder; zip: the competition zip; kaggle: download it.
    source: Literal["synthetic", "shapes", "dir", "zip", "kaggle"] = "kaggle"
    # Competition folder (source=dir) or the competition zip (source=zip).
    path: str | None = None
    competition: str = "state-farm-distracted-driver-detection"
    # error: the first corrupt image stops ingest; quarantine: corrupt images are left out and listed.
    on_corrupt: Literal["error", "quarantine"] = "error"
    synthetic: SyntheticConfig = SyntheticConfig()
    shapes: ShapesConfig = ShapesConfig()

    # Derived, not set: what DVC hashes as ingest's source dependency, so a changed image in a `dir`
    # source (or a new `zip`) re-runs ingest. The other sources have no local files before ingest runs:
    # their inputs are ingest's params, and this names the ingest module (already a dependency).
    watch: str | None = None

    @model_validator(mode="after")
    def _needs_path(self) -> IngestConfig:
        if self.source in ("dir", "zip") and not self.path:
            raise ValueError(f"ingest.source={self.source} needs ingest.path")
        derived = os.path.expanduser(self.path) if self.source in ("dir", "zip") else INGEST_MODULE
        if self.watch is not None and self.watch != derived:
            raise ValueError(f"ingest.watch is derived from ingest.source and ingest.path ({derived}); do not set it")
        object.__setattr__(self, "watch", derived)
        return self


class SplitConfig(Section):
    # cv: K-fold cross-validation; every labelled image is in one of n_folds folds (grouped by the
    # competition's group column, stratified by class), each model is trained once per fold on the
    # other folds and predicts its fold (out-of-fold) and the test set. holdout: one validation split
    # (valid_groups / valid_fraction), one model each: faster, a noisier estimate.
    validation: Literal["cv", "holdout"] = "cv"
    # holdout: whole groups (drivers) held out, a count (>= 1) or a fraction of groups (< 1).
    valid_groups: float = Field(3, gt=0)
    # holdout without a group column: this fraction of the images, stratified by class.
    valid_fraction: float = Field(0.2, gt=0, lt=1)
    n_folds: int = Field(5, ge=2)
    seed: int = Field(0, ge=0)
    # Derived, not set: the folds that get a model (cv: 0..n_folds-1; holdout: [0], the validation
    # split). Written to params.yaml because dvc.yaml's per-fold stages loop over it.
    fold_ids: list[int] | None = None

    @model_validator(mode="after")
    def _derive_fold_ids(self) -> SplitConfig:
        derived = list(range(self.n_folds)) if self.validation == "cv" else [0]
        if self.fold_ids is not None and list(self.fold_ids) != derived:
            raise ValueError(f"split.fold_ids is derived from validation and n_folds ({derived}); do not set it")
        object.__setattr__(self, "fold_ids", derived)
        return self


class SampleConfig(Section):
    # The fast.ai course's convention: ~1,500 train and 1,000 valid images; capped by what the split has.
    n_train: int = Field(1500, ge=10)
    n_valid: int = Field(1000, ge=10)
    seed: int = Field(0, ge=0)


class ModelConfig(Section):
    # Any timm CNN by name ("vgg16_bn", the State Farm course recipe; "resnet50", "convnext_tiny", ...),
    # or "vgg16_bn_narrow": timm's VGG class in the vgg16_bn layout with fewer channels (CPU tests, demo).
    arch: str = "vgg16_bn"
    width_divisor: int = Field(8, ge=1)  # only for vgg16_bn_narrow
    # hub: ImageNet weights (hub_tag); file: weights_file; pretrain: the `pretrain` stage's backbone
    # (trained on a separate synthetic domain, the CPU stand-in for ImageNet); none: random init.
    weights: Literal["hub", "file", "pretrain", "none"] = "hub"
    weights_file: str | None = None
    hub_tag: str | None = None  # weights=hub: a timm name with its pretrained tag; None: model.arch's default tag
    # Model input (height, width); None keeps timm's resolved default (224x224).
    input_size: tuple[PositiveInt, PositiveInt] | None = None
    # weights=none: the random init is drawn from this seed, so every stage builds the same network.
    init_seed: int = Field(0, ge=0)
    # weights=pretrain: the pretrain stage's file (``<paths.models>/pretrain/backbone.pt``). Derived
    # from ``paths`` by ``Config`` (it depends on the root), so it is not a param: never set it by hand.
    pretrain_file: Path | None = Field(None, exclude=True)


PRETRAIN_BACKBONE = "pretrain/backbone.pt"  # under paths.models


def pretrain_backbone_file(paths: PathsConfig) -> Path:
    """Where the ``pretrain`` stage writes the backbone that ``model.weights=pretrain`` loads."""
    return paths.path("models") / PRETRAIN_BACKBONE


class PretrainConfig(Section):
    """``pretrain`` stage (runs only with ``model.weights=pretrain``): the CPU stand-in for ImageNet
    weights. The narrow VGG classifier is trained on a separate synthetic dataset drawn from its own
    ``seed`` (fresh drivers; never the competition's images or drivers) and its weights saved."""

    n_drivers: int = Field(32, ge=2)  # labelled pretraining drivers
    per_driver: tuple[int, int] = (50, 70)  # frames per pretraining driver, drawn from this range
    n_holdout_drivers: int = Field(4, ge=1)  # further drivers, only to measure pretraining accuracy
    n_holdout: int = Field(200, ge=1)  # images over the holdout drivers
    # Rendered size (4:3); None: the profile's ingest.synthetic size. Decoded to model.input_size.
    width: int | None = Field(None, ge=32)
    height: int | None = Field(None, ge=24)
    seed: int = Field(7919, ge=0)  # the pretraining domain's seed: must differ from ingest.synthetic.seed
    # The classifier trained: conv base, pool5 average-pooled to grid x grid, dense head without
    # hidden layers (BatchNorm1d -> Dropout -> Linear): the shape the features stage uses.
    grid: int = Field(2, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    epochs: int = Field(8, ge=1)  # epoch e trains on augmented copy e + 1 of every image
    lr: float = Field(3e-3, gt=0)  # AdamW peak learning rate (one-cycle schedule)
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(32, ge=2)
    num_workers: int = Field(0, ge=0)
    device: Device = "auto"  # auto: cuda when available, else cpu

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        lo, hi = self.per_driver
        if not 10 <= lo <= hi:
            raise ValueError("per_driver must be (lo, hi) with 10 <= lo <= hi (every driver has all 10 classes)")
        if (self.width is None) != (self.height is None):
            raise ValueError("set both pretrain.width and pretrain.height, or neither")
        if self.n_holdout < self.n_holdout_drivers:
            raise ValueError("n_holdout must be at least n_holdout_drivers")
        return self


class AugmentConfig(Section):
    """albumentations parameters; horizontal flips are never applied (they swap left/right classes)."""

    rotate_deg: float = Field(10, ge=0)
    shift: float = Field(0.05, ge=0)
    scale: float = Field(0.1, ge=0)
    shear_deg: float = Field(5, ge=0)
    brightness: float = Field(0.1, ge=0)
    contrast: float = Field(0.1, ge=0)
    channel_shift: int = Field(10, ge=0)  # per-channel shift in 0-255 pixel units (RGBShift)
    # How pixels moved in from outside the frame are filled by the affine transform.
    border: Literal["reflect", "replicate", "constant"] = "reflect"


class FeaturesConfig(Section):
    copies: int = Field(10, ge=1)  # train copies per image; copy 0 is unaugmented, 1.. augmented
    # pool5 is average-pooled to grid x grid: 512*grid^2 fp16 values per image for vgg16_bn
    # (grid 2: 4 KB; 7 would keep the whole 7x7 map at 224 px: 50 KB).
    grid: int = Field(2, ge=1)
    batch_size: int = Field(64, ge=1)
    chunk_size: int = Field(1024, ge=1)  # rows per chunk file (the unit of resume)
    num_workers: int = Field(4, ge=0)
    use_sample: bool = False
    device: Device = "auto"  # auto: cuda when available, else cpu
    seed: int = Field(0, ge=0)  # augmented copy k of image i depends only on (seed, k, image name)


Optimizer = Literal["adam", "adamw", "sgd", "nesterov", "rmsprop"]


class HeadConfig(Section):
    widths: list[PositiveInt] = [512, 512]
    dropout: float = Field(0.5, ge=0, lt=1)
    optimizer: Optimizer = "adam"
    lr: float = Field(1e-3, gt=0)
    first_epoch_lr: float = Field(1e-4, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(128, ge=1)
    max_epochs: int = Field(30, ge=1)
    patience: int = Field(5, ge=1)
    seed: int = Field(0, ge=0)
    accelerator: Accelerator = "auto"  # the head is small: cpu is fine; auto takes a GPU when there is one
    progress_bar: bool = False


class TrainerConfig(Section):
    """Lightning trainer for the end-to-end stages (finetune, pseudo). Multi-GPU/multi-node is
    Lightning DDP: ``devices: 8``, ``num_nodes: 2``, ``strategy: ddp``."""

    accelerator: Accelerator = "auto"
    # Per node: a count, -1 or "auto" (every GPU; one process on CPU), or GPU indices ("0,1").
    devices: int | str = "auto"
    num_nodes: int = Field(1, ge=1)
    # auto: one process, or DDP for several; ddp: always DDP. Either way DDP is built with
    # find_unused_parameters (pipeline/training/trainer.py build_strategy), which staged unfreezing needs.
    strategy: Literal["auto", "ddp"] = "auto"
    precision: Precision = "auto"  # auto: bf16-mixed on GPU (16-mixed where bf16 is missing), 32-true on CPU
    compile: bool = False  # torch.compile the network (recompiles when staged unfreezing changes)
    # CUDA's adaptive average pooling has no deterministic backward; the conv base pools pool5 to
    # grid x grid adaptively (and timm's VGG head does below 224 px), so "warn" rather than True.
    deterministic: bool | Literal["warn"] = "warn"
    # cuDNN autotuning (torch.backends.cudnn.benchmark). None: Lightning's choice, off while
    # deterministic is set. Measure both with benchmarks/train_throughput.py [--deterministic].
    benchmark: bool | None = None
    resume: bool = True  # resume an interrupted run of the same config, inputs and code from last.ckpt
    log_every_n_steps: int = Field(10, ge=1)

    @field_validator("devices", mode="before")
    @classmethod
    def _devices_lightning_takes(cls, value: Any) -> Any:
        if isinstance(value, int | str) and not isinstance(value, bool):
            text = str(value).strip()
            if text == "auto" or re.fullmatch(r"-1|[1-9]\d*", text) or ("," in text and re.fullmatch(r"\d+(\s*,\s*\d+)*\s*,?", text)):
                return value
        raise ValueError(f"devices must be a count >= 1, -1 or auto (every GPU), or GPU indices like '0,1'; got {value!r}")


class FinetuneConfig(Section):
    # Staged unfreezing: the head and the last `unfreeze_blocks` of VGG's 5 conv blocks train first;
    # every `unfreeze_every` epochs one more block is unfrozen (0: never).
    unfreeze_blocks: int = Field(2, ge=0, le=5)
    unfreeze_every: int = Field(2, ge=0)
    lr: float = Field(1e-4, gt=0)  # the head's learning rate
    first_epoch_lr: float = Field(1e-5, gt=0)  # the head's learning rate in epoch 0 (every group scaled alike)
    layer_lr_decay: float = Field(0.5, gt=0, le=1)  # conv block k from the end trains at lr * decay**k
    # first_epoch: epoch 0 at first_epoch_lr, then lr constant (Howard's low-then-fixed recipe; early
    # stopping picks the epoch). onecycle: per step, a warm-up from lr/25 to lr over the first quarter,
    # then annealed to ~0 at max_epochs (first_epoch_lr unused): converges in a fixed epoch budget, and
    # cv mode keeps the last epoch. Pseudo uses the same schedule over its own max_epochs.
    schedule: Literal["first_epoch", "onecycle"] = "first_epoch"
    # Batchnorm running statistics stay as the head saw them (eval mode), so fine-tuning starts where
    # the head ended: train-mode statistics of augmented batches shift the features under the head.
    # true: every epoch; first_epoch: the low-learning-rate epoch 0 only, then they follow the data.
    freeze_bn_stats: bool | Literal["first_epoch"] = False
    optimizer: Optimizer = "adam"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(32, ge=1)
    max_epochs: int = Field(8, ge=1)
    patience: int = Field(3, ge=1)
    num_workers: int = Field(4, ge=0)
    use_sample: bool = False
    seed: int = Field(0, ge=0)
    trainer: TrainerConfig = TrainerConfig()


# The fast.ai course's rule of thumb: a quarter to a third of every batch pseudo-labelled.
PSEUDO_FRACTION_RANGE = (0.25, 1 / 3)


class PseudoConfig(Section):
    """Pseudo-labelling on test images only (never validation), retraining with a fixed
    pseudo-labelled share of every batch; uses ``finetune``'s optimiser and trainer settings."""

    fraction: float = 0.25
    labels: Literal["soft", "hard"] = "soft"
    threshold: float | None = Field(None, gt=0, le=1)  # hard labels only: keep test images at least this confident
    iterations: int = Field(1, ge=1)  # pseudo-label, retrain, repeat (the retrained model labels the next round)
    # Cross pseudo-labelling: two students, each learning the pseudo-labels of one half of the test set
    # and predicting the other half, so no test prediction comes from a student taught that image (its
    # out-of-fold figure then speaks for its test predictions). Twice the training; off: one student
    # learns every test image's pseudo-label and predicts them all (transductive, overconfident there).
    cross: bool = True
    # Knowledge distillation: a student restarted from the head-stage network learns the teacher's
    # probabilities at `temperature` (loss scaled by T^2); otherwise the fine-tuned model trains on.
    distill: bool = False
    temperature: float = Field(1.0, gt=0)
    max_epochs: int = Field(4, ge=1)
    # The students' learning rate (None: finetune.lr; every layer group scaled alike). A student goes on
    # from a converged fine-tune: under finetune.schedule=onecycle a restart at the full peak undoes it.
    lr: float | None = Field(None, gt=0)
    seed: int = Field(0, ge=0)

    @field_validator("fraction")
    @classmethod
    def _fraction_in_course_range(cls, value: float) -> float:
        lo, hi = PSEUDO_FRACTION_RANGE
        if not lo - 1e-9 <= value <= hi + 1e-9:
            raise ValueError(f"pseudo.fraction must be between 0.25 and 1/3 inclusive (a quarter to a third of "
                             f"every batch pseudo-labelled), got {value}")
        return value

    @model_validator(mode="after")
    def _check_label_options(self) -> PseudoConfig:
        if self.threshold is not None and self.labels != "hard":
            raise ValueError("pseudo.threshold applies to hard labels only: set pseudo.labels=hard")
        if self.distill and self.labels != "soft":
            raise ValueError("pseudo.distill learns the teacher's soft targets: set pseudo.labels=soft")
        return self


MODELS = ("head", "finetune", "pseudo")  # the stage chain's models; members are member<m>


class EnsembleConfig(Section):
    """Members are extra models trained for the ensemble, one DVC stage per (member, fold)
    (``member@<m>-<fold>``, a ``matrix`` over ``members`` and ``split.fold_ids``). The candidates are
    the models in ``include`` and the members, each as its out-of-fold predictions."""

    # Member ids. Member m is the member_model recipe with seed <model's section>.seed + 1 + m; in
    # holdout mode, with hold_out_fold, also without the train drivers of fold m % split.n_folds.
    members: list[int] = [0, 1, 2]
    # What a member is. finetune: the CNN fine-tuned like the finetune stage (its settings, the member's
    # seed), the strong and diverse kind. head: a dense head on the cached features (seconds on CPU).
    member_model: Literal["finetune", "head"] = "finetune"
    hold_out_fold: bool = True
    include: list[Literal["head", "finetune", "pseudo"]] = list(MODELS)
    # Test-time augmentation of fine-tuned members: augmented passes (copies 1..tta, never flipped)
    # averaged with the plain one; kept for a member only when it lowers its held-out log loss. 0: off.
    tta: int = Field(4, ge=0)
    mean: Literal["arithmetic", "geometric"] = "arithmetic"
    # hill_climb: Caruana et al. (2004) ensemble selection with replacement on out-of-fold log loss
    # (weights = how often a model was picked); equal: every candidate alike.
    weights: Literal["hill_climb", "equal"] = "hill_climb"
    hill_climb_steps: int = Field(30, ge=1)
    # Test-neighbour smoothing: average each prediction with its k nearest neighbours (cosine on the
    # cached conv features), k the best of 1, 2, 3, 5, 10 ... up to this on out-of-fold log loss
    # (each fold's rows smoothed among that fold's images), applied only when it lowers it. 0: off.
    neighbours: int = Field(10, ge=0)
    # holdout mode: folds over the validation drivers for the nested estimate of fitted decisions.
    cross_fit_folds: int = Field(2, ge=2)

    @field_validator("members", mode="before")
    @classmethod
    def _count_means_range(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise ValueError(f"a member count must be >= 0, got {value}")
            return list(range(value))
        return value

    @model_validator(mode="after")
    def _check_members(self) -> EnsembleConfig:
        if len(set(self.members)) != len(self.members) or any(m < 0 for m in self.members):
            raise ValueError(f"ensemble.members must be distinct ids >= 0, got {self.members}")
        if not self.members and not self.include:
            raise ValueError("ensemble needs members or include (no predictions to combine)")
        return self

    def models(self) -> list[str]:
        """Every candidate model's name, in DAG order: the included stages, then member<m>."""
        return [m for m in MODELS if m in self.include] + [member_model_name(m) for m in self.members]


def member_model_name(member: int) -> str:
    return f"member{member}"


def model_stage(model: str, fold: int) -> str:
    """The DVC stage that trains ``model``'s fold ``fold``: ``head@0``, ``member@1-0`` (model member1)."""
    if model.startswith("member") and model.removeprefix("member").isdigit():
        return item_stage("member", int(model.removeprefix("member")), fold)
    return item_stage(model, fold)


class CalibrateConfig(Section):
    temperature: bool = True  # temperature scaling fitted on out-of-fold log loss
    clip: bool = True  # clip to [(1 - hi) / (K - 1), hi], hi chosen on out-of-fold rows (the fast.ai course: 0.93)
    # holdout mode: folds over validation drivers for the nested estimate of the calibrated log loss.
    cross_fit_folds: int = Field(2, ge=2)
    seed: int = Field(0, ge=0)
    # The submission's estimate printed last (pipeline/ensembling/estimate.py): the calibrated CV log
    # loss less half the label-free fold averaging gain; or CV as it is, less all the gain, or plus the
    # test's confidence shift. docs/results.md measures each against hidden test labels.
    estimate: Literal["cv", "cv_less_gain", "cv_less_half_gain", "cv_plus_shift"] = "cv_less_half_gain"
    # Groups (drivers) in the test set, for the estimate's interval; None: as many as the test rows
    # make at the labelled rows' images per group.
    test_groups: float | None = Field(None, gt=0)
    interval: float = Field(0.8, gt=0, lt=1)  # the interval's coverage (central, group bootstrap)


# Kaggle's dataset and notebook slugs (6-50 lower-case letters, digits and hyphens) and usernames.
KAGGLE_SLUG = re.compile(r"[a-z0-9][a-z0-9-]{4,48}[a-z0-9]")
KAGGLE_USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,49}")


class SubmitConfig(Section):
    enabled: bool = False  # upload; otherwise a dry run that prints the exact command
    message: str = "statefarm-pipeline"
    max_retries: int = Field(5, ge=0)  # retries after the first attempt, on 429/5xx/connection errors only
    backoff_s: float = Field(2.0, ge=0)  # first retry delay; doubles each retry
    # After a successful upload, poll the submission list this long for the public score (0: look once).
    score_wait_s: float = Field(0, ge=0)
    # Code competitions (competition.submission: code). The models go up as a private Kaggle dataset and
    # the inference script as a private notebook that reads it and the competition; both belong to
    # `owner` (None: the account the credentials name). Slugs: None derives them from ingest.competition.
    owner: str | None = None
    dataset: str | None = None  # the models' dataset (default <competition>-models)
    kernel: str | None = None  # the notebook (default <competition>-inference)
    accelerator: Literal["gpu", "none"] = "gpu"  # what the notebook runs on
    kernel_wait_s: float = Field(9 * 3600, gt=0)  # the longest wait for the dataset to be ready and the notebook to run
    poll_s: float = Field(30.0, gt=0)  # between status queries while waiting

    @field_validator("owner")
    @classmethod
    def _kaggle_username(cls, value: str | None) -> str | None:
        if value is not None and not KAGGLE_USERNAME.fullmatch(value):
            raise ValueError(f"a Kaggle username is letters, digits, hyphens and underscores, got {value!r}")
        return value

    @field_validator("dataset", "kernel")
    @classmethod
    def _kaggle_slug(cls, value: str | None) -> str | None:
        if value is not None and not KAGGLE_SLUG.fullmatch(value):
            raise ValueError(f"a Kaggle slug is 6-50 lower-case letters, digits and hyphens, got {value!r}")
        return value

    def dataset_slug(self, competition: str) -> str:
        return self.dataset or derived_slug(competition, "-models")

    def kernel_slug(self, competition: str) -> str:
        return self.kernel or derived_slug(competition, "-inference")


def derived_slug(competition: str, suffix: str) -> str:
    """``<competition><suffix>``, the competition part cut so the whole fits Kaggle's 50 characters."""
    return competition[:50 - len(suffix)].rstrip("-") + suffix


class FanoutConfig(Section):
    """Scale-out (flows/fanout.py): the per-fold stages as deployment runs on Prefect workers, gathered
    through the DVC remote's run cache. Orchestration only: no stage depends on these settings."""

    enabled: bool = False  # off: one machine runs every stage
    work_pool: str = "statefarm-pool"  # the pool whose `statefarm-stages` deployment runs the stages
    flow: str = "statefarm-stages"
    # The longest one stage may take on a worker, queueing included; then it counts as failed.
    stage_timeout_s: float = Field(6 * 3600, gt=0)
    retries: int = Field(1, ge=0)  # submit a failed or crashed stage again, before running it here
    run_locally_after_retries: bool = True  # else the run fails, naming the stage and the worker
    poll_s: float = Field(2.0, gt=0)


class Config(Section):
    profile: str = "statefarm"
    seed: int = Field(0, ge=0)
    paths: PathsConfig = PathsConfig()
    competition: CompetitionConfig = CompetitionConfig()
    ingest: IngestConfig = IngestConfig()
    split: SplitConfig = SplitConfig()
    sample: SampleConfig = SampleConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    augment: AugmentConfig = AugmentConfig()
    features: FeaturesConfig = FeaturesConfig()
    head: HeadConfig = HeadConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    pseudo: PseudoConfig = PseudoConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    calibrate: CalibrateConfig = CalibrateConfig()
    submit: SubmitConfig = SubmitConfig()
    fanout: FanoutConfig = FanoutConfig()

    @model_validator(mode="after")
    def _locate_pretrain_backbone(self) -> Config:
        self.model.pretrain_file = pretrain_backbone_file(self.paths)
        return self

    def at(self, root: Path | str) -> Config:
        """The same config with its artifact paths (and the pretrain backbone it loads) under ``root``."""
        paths = self.paths.model_copy(update={"root": Path(root)})
        model = self.model.model_copy(update={"pretrain_file": pretrain_backbone_file(paths)})
        return self.model_copy(update={"paths": paths, "model": model})

    def to_params(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------- loading


def deep_merge(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``"head.lr=0.01"`` -> ``{"head": {"lr": 0.01}}``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE (e.g. head.max_epochs=3)")
    dotted, raw = text.split("=", 1)
    try:
        value: Any = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        quoted = raw.replace("'", "''")  # YAML's escape inside single quotes
        raise ConfigError(f"override {text!r}: the value {raw} is not valid YAML (values are read as YAML: [a, b] is a "
                          f"list, {{k: v}} a mapping); quote a string: --set \"{dotted}='{quoted}'\"") from None
    for key in reversed(dotted.strip().split(".")):
        value = {key: value}
    return value


def overrides_to_delta(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        delta: dict[str, Any] = {}
        for key, value in overrides.items():
            if "." in key:
                nested: Any = value
                for part in reversed(key.split(".")):
                    nested = {part: nested}
                delta = deep_merge(delta, nested)
            else:
                delta = deep_merge(delta, {key: value})
        return delta
    delta = {}
    for text in overrides:
        delta = deep_merge(delta, parse_override(text))
    return delta


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (binary bytes): regenerate it with `python -m pipeline configure`") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def validate(data: dict[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "<root>"
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            lines.append(f"  {key}: {msg}")
        raise ConfigError(f"{source}: invalid config\n" + "\n".join(lines)) from None


def profile_path(profile: str) -> Path:
    path = CONFIG_DIR / f"{profile}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown profile {profile!r}: no {path} (known: {known})")
    return path


def profile_delta(profile: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """configs/<profile>.yaml merged over the profile it ``extends`` (if any), recursively."""
    if profile in seen:
        raise ConfigError(f"profiles extend each other in a loop: {' -> '.join((*seen, profile))}")
    data = read_yaml(profile_path(profile))
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{profile_path(profile)}: extends must be a profile name, got {base!r}")
    return deep_merge(profile_delta(base, (*seen, profile)), data)


def load_profile(profile: str, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Defaults <- the profile it extends <- configs/<profile>.yaml <- overrides, validated."""
    data = deep_merge(profile_delta(profile), {"profile": profile})
    data = deep_merge(data, overrides_to_delta(overrides))
    return validate(data, f"profile {profile}" + (f" with overrides {overrides}" if overrides else ""))


def missing_keys(data: Any, model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted keys of ``model``'s schema absent from ``data`` (a resolved config has every one)."""
    if not isinstance(data, dict):
        return []
    missing = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        if name not in data:
            missing.append(prefix + name)
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            missing += missing_keys(data[name], field.annotation, f"{prefix}{name}.")
    return missing


def load_params(path: Path | str = PARAMS_FILE, root: Path | str | None = None) -> Config:
    """The resolved config a stage runs with (``params.yaml``, written by ``configure``). A file that
    is not a complete resolved config (empty, partial, hand-trimmed) is refused: filling the gaps
    with defaults would silently run the statefarm settings."""
    path = Path(path)
    data = read_yaml(path)
    missing = missing_keys(data, Config)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        profile = data.get("profile", "<profile>")
        raise ConfigError(f"{path} is not a complete resolved config (missing {shown}): regenerate it with "
                          f"`python -m pipeline configure --profile {profile}`")
    cfg = validate(data, str(path))
    return cfg.at(root if root is not None else path.resolve().parent)


def write_params(cfg: Config, path: Path | str = PARAMS_FILE) -> Path:
    from pipeline.io import atomic_write_text

    header = f"# Resolved config (profile {cfg.profile}). Written by `python -m pipeline configure`; edit the profile instead.\n"
    return atomic_write_text(Path(path), header + yaml.safe_dump(cfg.to_params(), sort_keys=False))
