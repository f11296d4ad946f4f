"""Fine-tune EfficientNet-Lite0 with fastai on the current labels.

A run reads top to bottom: load labels from the database, fit (the new head
first with the body frozen, then, if asked, the whole network), evaluate on
the holdout, score every pool photo out-of-fold, record.

The default recipe trains the new head (a hidden layer of 128 units) for 20
epochs on cached body features of each photo's centre view, its mirror image
and six random crops. Against a linear head on centre views only, the crops
and the hidden layer gain about two points; a whole-network epoch after it
changed the holdout by a photo or two and doubled the time, so it is a
setting, off by default (BENCHMARKS.md). A holdout photo's prediction
averages its centre view, its mirror image and sixteen random crops drawn
like the training ones; with the body frozen they are scored from cached
features, embedded once per photo set.

The body's BatchNorm layers stay in eval mode throughout: with batches of a
few dozen photos their running statistics drift away from the ImageNet ones
and cost several points of holdout accuracy.
"""

import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fastai.callback.schedule  # noqa: F401  (adds Learner.fit_one_cycle)
import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException, CancelValidException
from fastai.callback.progress import ProgressCallback  # noqa: F401  (no_bar)
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.core import DataLoaders, TfmdDL
from fastai.data.transforms import ColReader, IndexSplitter, Normalize
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.vision.augment import Flip, RandomCrop
from fastai.vision.core import PILImage
from fastai.vision.data import ImageBlock
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session
from torch import nn

from db.labels import class_names
from db.models import (
    CANCELLED,
    DONE,
    EXCLUDED,
    FAILED,
    HOLDOUT,
    POOL,
    Photo,
    TrainingRun,
    utcnow,
)
from db.settings import get_settings
from pipeline.embeddings import imagenet_view_set, uncached_view_count
from pipeline.images import MEAN, STD, BadImageError, load_rgb, resize_short
from pipeline.infer import predict_photos
from pipeline.model import body_and_head, create_model, get_device, save_weights
from pipeline.progress import Progress, null_progress
from pipeline.scoring import limit_per_class, score_run

logger = logging.getLogger(__name__)

MIN_PHOTOS_PER_CLASS = 2
# Views per step when the head trains on cached features (`batch_size` is for
# image epochs): a few thousand views, so larger steps, fewer of them.
FEATURE_BATCH_SIZE = 128
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1024


@dataclass
class TrainConfig:
    """Settings of one fine-tune; saved with the run it produced."""

    image_size: int = 224
    batch_size: int = 32
    frozen_epochs: int = 20
    unfrozen_epochs: int = 0
    head_lr: float = 2e-3
    body_lr: float = 1e-5
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    # Test-time augmentation: a holdout photo's prediction is the mean over
    # its centre view, its mirror image and `tta_crops` random crops.
    tta: bool = True
    tta_crops: int = 16
    # Train the head on cached body features instead of frozen image epochs.
    head_on_features: bool = True
    # Random crops of each pool photo, besides the centre view and its
    # mirror, that the head trains on (with `head_on_features`).
    crop_views: int = 6
    # Units of the head's hidden layer; 0 for a single linear layer.
    head_hidden: int = 128
    # Dropout before the head and inside it.
    head_dropout: float = 0.5
    folds: int = 10
    seed: int = 42
    # Only for quick trials and tests: at most this many pool/holdout photos
    # per class, chosen by id.
    max_per_class: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        """Refuse settings that cannot train, naming the setting and its value."""

        def whole(name: str, low: int, high: int | None = None) -> None:
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < low
                or (high is not None and value > high)
            ):
                span = f"from {low} to {high}" if high else f"{low} or more"
                raise ValueError(f"{name} must be a whole number {span}, not {value!r}")

        def rate(name: str, low: float, high: float, high_included: bool) -> None:
            value = getattr(self, name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not (
                low <= value <= high if high_included else low <= value < high
            ):
                bracket = "]" if high_included else ")"
                raise ValueError(
                    f"{name} must be a number in [{low}, {high}{bracket}, not {value!r}"
                )

        whole("image_size", MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        whole("batch_size", 1)
        whole("frozen_epochs", 0)
        whole("unfrozen_epochs", 0)
        whole("folds", 2)
        whole("seed", 0)
        whole("crop_views", 0)
        whole("head_hidden", 0)
        whole("tta_crops", 0)
        if self.frozen_epochs + self.unfrozen_epochs == 0:
            raise ValueError(
                "frozen_epochs and unfrozen_epochs are both 0: set at least one epoch"
            )
        for name in ("head_lr", "body_lr"):
            rate(name, 0.0, 1.0, True)
            if getattr(self, name) == 0:
                raise ValueError(f"{name} must be above 0, not 0")
        rate("weight_decay", 0.0, 1.0, True)
        rate("label_smoothing", 0.0, 1.0, False)
        rate("head_dropout", 0.0, 1.0, False)
        for name in ("tta", "head_on_features"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"{name} must be true or false, not {getattr(self, name)!r}"
                )
        if self.max_per_class is not None:
            whole("max_per_class", 1)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(values) - known
        if unknown:
            raise ValueError(
                f"unknown training settings {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**values)


class NotTrainableError(ValueError):
    """The labels as they stand cannot train a classifier; the message says why."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_photos(session: Session, split: str, max_per_class: int | None):
    """Photos of `split` that take part in training or evaluation."""
    query = select(Photo).where(Photo.split == split).order_by(Photo.id)
    photos = limit_per_class(list(session.scalars(query)), max_per_class)
    missing = {p.path for p in photos if not Path(p.path).is_file()}
    if missing:
        logger.warning(
            "%d photos are gone from disk and left out: %s",
            len(missing),
            sorted(missing)[:5],
        )
    return [p for p in photos if p.status != EXCLUDED and p.path not in missing]


def check_trainable(photos: list[Photo], classes: list[str]) -> None:
    """Refuse, before any work, labels that cannot train or be scored.

    Raises:
        NotTrainableError: no photos, fewer than two classes with photos, or a
            class with a single photo (out-of-fold scoring needs two).
    """
    if not photos:
        raise NotTrainableError(
            "no pool photos to train on: every photo is excluded or none was imported"
        )
    counts = {name: 0 for name in classes}
    for photo in photos:
        counts[photo.label] = counts.get(photo.label, 0) + 1
    present = [name for name, count in counts.items() if count > 0]
    if len(present) < 2:
        raise NotTrainableError(
            f"training needs at least two classes with photos; found {counts}"
        )
    for name, count in counts.items():
        if count == 1:
            raise NotTrainableError(
                f"class {name!r} has 1 photo; out-of-fold scoring needs at least "
                f"{MIN_PHOTOS_PER_CLASS} per class: add photos, relabel some to "
                "it, or relabel this one"
            )


class _SkipValidation(Callback):
    """Holdout accuracy is measured once at the end, not after every epoch."""

    def before_validate(self):
        raise CancelValidException()


class _FrozenBatchNorm(Callback):
    """Keep every BatchNorm in the body in eval mode (ImageNet statistics)."""

    order = 1  # after fastai's TrainEvalCallback switches to train mode

    def before_train(self):
        head = self.learn.model.get_classifier()
        for module in self.learn.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        head.train()


class _ReportProgress(Callback):
    """Forward fastai's batch counter to a `Progress` and honour cancellation.

    The fit's progress is mapped onto the fraction range [start, end].
    """

    order = 50

    def __init__(self, progress: Progress, start: float, end: float, phase: str):
        self.progress = progress
        self.start, self.end = start, end
        self.phase = phase

    def after_batch(self):
        if not self.training:
            return
        done = (self.epoch + (self.iter + 1) / self.n_iter) / self.n_epoch
        loss = float(self.smooth_loss) if self.smooth_loss is not None else 0.0
        message = (
            f"{self.phase}: epoch {self.epoch + 1}/{self.n_epoch}, "
            f"batch {self.iter + 1}/{self.n_iter}, loss {loss:.3f}"
        )
        if self.progress(self.start + (self.end - self.start) * done, message):
            raise CancelFitException()


class CancelledError(RuntimeError):
    """The user asked the job to stop."""


def build_dataloaders(
    photos: list[Photo], classes: list[str], config: TrainConfig, device: torch.device
):
    """fastai DataLoaders over photos decoded and resized once, held in memory."""
    images: dict[str, Image.Image] = {}
    rows = []
    for photo in photos:
        try:
            images[photo.path] = resize_short(load_rgb(photo.path), config.image_size)
        except (BadImageError, FileNotFoundError) as error:
            logger.warning("leaving out %s: %s", photo.path, error)
            continue
        rows.append({"path": photo.path, "label": photo.label})
    if not rows:
        raise NotTrainableError("none of the pool photos could be read")

    import pandas as pd

    frame = pd.DataFrame(rows)
    block = DataBlock(
        blocks=(ImageBlock(PILImage), CategoryBlock(vocab=classes)),
        get_x=lambda row: PILImage(images[row["path"]]),
        get_y=ColReader("label"),
        splitter=IndexSplitter([]),
        item_tfms=RandomCrop(config.image_size),
        batch_tfms=[Flip(), Normalize.from_stats(list(MEAN), list(STD))],
    )
    loaders = block.dataloaders(
        frame,
        bs=min(config.batch_size, len(frame)),
        num_workers=0,
        device=device,
        shuffle=True,
        drop_last=len(frame) > config.batch_size,
    )
    return loaders, len(rows)


def _check_cancel(progress: Progress) -> None:
    if progress.cancelled:
        raise CancelledError("training cancelled")


def fit_head_on_features(
    model: nn.Module,
    photos: list[Photo],
    classes: list[str],
    config: TrainConfig,
    progress: Progress,
    device: torch.device,
    ends: tuple[float, float],
) -> None:
    """Phase 1: train the new head alone on the frozen body's cached features.

    With the body frozen and its BatchNorm in eval mode, the body's output for
    a given view of a photo never changes, so it is computed once per photo
    and kept: the photo and its mirror image (shared with the ranking's
    cache) and `config.crop_views` random crops, which stand in for the
    augmentation of image epochs. The head then trains on them for many
    epochs in seconds, and a retrain embeds only photos it has not seen.
    """
    embed_end, head_end = ends  # of embedding and of the head on the bar
    message = f"embedding {len(photos)} photos, {2 + config.crop_views} views each"
    views = imagenet_view_set(
        photos,
        config.image_size,
        config.crop_views,
        progress=lambda f: progress(embed_end * f, message),
        between=lambda: _check_cancel(progress),
    )  # (N, 2 + crop_views, D)
    _check_cancel(progress)
    # Computing features may have built a model (and drawn random numbers) or
    # not, if they were cached; reseed so both cases train alike.
    seed_everything(config.seed)
    index = {name: i for i, name in enumerate(classes)}
    labels = torch.tensor([index[p.label] for p in photos])
    labels = labels.repeat_interleave(views.shape[1])
    features = torch.from_numpy(views.reshape(-1, views.shape[-1]))  # (N*V, D)
    head = nn.Sequential(nn.Dropout(model.drop_rate), model.get_classifier())
    loaders = DataLoaders(
        TfmdDL(
            list(zip(features, labels, strict=True)),
            bs=FEATURE_BATCH_SIZE,
            shuffle=True,
            drop_last=len(labels) > FEATURE_BATCH_SIZE,
            device=device,
        ),
        TfmdDL([], bs=FEATURE_BATCH_SIZE, device=device),
        device=device,
    )
    learner = Learner(
        loaders,
        head,
        loss_func=CrossEntropyLossFlat(label_smoothing=config.label_smoothing),
        cbs=[_SkipValidation()],
    )
    cb = _ReportProgress(progress, embed_end, head_end, "head")
    with learner.no_bar(), learner.no_logging():
        learner.fit_one_cycle(
            config.frozen_epochs, config.head_lr, wd=config.weight_decay, cbs=[cb]
        )
    _check_cancel(progress)


# Relative costs for placing the phases on the progress bar, in units of one
# view embedded by the body: an epoch of the head over one cached view, and
# reading the holdout's cached features.
HEAD_VIEW_EPOCH_COST = 0.007
CACHED_EVALUATION_COST = 40


def _phase_ends(
    config: TrainConfig, pool: list[Photo], holdout: list[Photo]
) -> tuple[float, float, float]:
    """Where embedding, the head's epochs and all training end on the progress
    bar (0-1); evaluation runs from the third point to 0.92, scoring after it.

    When the head trains alone on cached features, the bar is shared in
    proportion to the work left: views not yet in the caches (a first run
    embeds the pool's views and the holdout's test-time crops; a retrain
    mostly none) and the head's epochs. Otherwise the bands are fixed, the
    whole network's epochs, when there are any, taking a band of their own.
    """
    if config.unfrozen_epochs:
        return 0.2, 0.25, 0.6
    if not head_on_cached_features(asdict(config)):
        return 0.35, 0.4, 0.4
    size, pool_views = config.image_size, 2 + config.crop_views
    embed = uncached_view_count(pool, size, config.crop_views)
    head = HEAD_VIEW_EPOCH_COST * len(pool) * pool_views * config.frozen_epochs
    crops = config.tta_crops if config.tta else 0
    evaluation = uncached_view_count(holdout, size, crops) + CACHED_EVALUATION_COST
    scale = 0.92 / (embed + head + evaluation)
    return embed * scale, (embed + head) * scale, (embed + head) * scale


def fit(
    learner: Learner,
    config: TrainConfig,
    progress: Progress,
    head_done: bool,
    ends: tuple[float, float, float],
) -> None:
    """Head first with the body frozen (unless already done), then all layers."""
    # Phase 1: only the new head learns, on images.
    if config.frozen_epochs and not head_done:
        learner.freeze()
        cb = _ReportProgress(progress, 0.0, ends[1], "head")
        learner.fit_one_cycle(
            config.frozen_epochs, config.head_lr, wd=config.weight_decay, cbs=[cb]
        )
        _check_cancel(progress)

    # Phase 2: the whole network, the body at a tenth of the head's rate or less.
    if config.unfrozen_epochs:
        learner.unfreeze()
        cb = _ReportProgress(progress, ends[1], ends[2], "all layers")
        learner.fit_one_cycle(
            config.unfrozen_epochs,
            slice(config.body_lr, config.head_lr / 10),
            wd=config.weight_decay,
            cbs=[cb],
        )
        _check_cancel(progress)


def head_on_cached_features(config: dict) -> bool:
    """Whether the settings `config` train the head on cached body features."""
    return bool(config.get("head_on_features")) and config.get("frozen_epochs", 0) > 0


def body_trained(config: dict) -> bool:
    """Whether a run with the stored settings `config` changed the ImageNet body.

    When it did not (the head trained alone on cached features), the run's
    predictions can come from the body's cached features of each view.
    """
    return config.get("unfrozen_epochs", 0) > 0 or not head_on_cached_features(config)


def predict_views(
    model: nn.Module,
    photos: list[Photo],
    size: int,
    tta: bool,
    crops: int,
    from_features: bool,
    progress=None,
) -> np.ndarray:
    """Class probabilities of photo records over a run's test-time views.

    With `from_features`, for a head on the ImageNet body, only the head runs,
    on the cached ImageNet features of each view (computed once per photo);
    otherwise the whole network runs on every view. Both give the same result.
    """
    if not from_features:
        return predict_photos(model, photos, size, tta, crops)
    if not photos:
        return np.zeros((0, model.num_classes), dtype=np.float32)
    views = imagenet_view_set(photos, size, crops if tta else 0, progress)
    if not tta:
        views = views[:, :1]
    device = next(model.parameters()).device
    head = model.get_classifier().eval()
    with torch.inference_mode():
        features = torch.from_numpy(views).to(device)  # (N, V, D)
        probs = torch.softmax(head(features), dim=-1).mean(dim=1)
    return probs.float().cpu().numpy()


def evaluate(
    model: nn.Module,
    photos: list[Photo],
    classes: list[str],
    config: TrainConfig,
    body_trained: bool = True,
    progress=None,
) -> tuple[dict, np.ndarray]:
    """Accuracy and confusion matrix on `photos` (rows: given, cols: predicted).

    A body that never trained is the ImageNet one, whose features of each view
    are cached: then only the head runs, on those features.
    """
    probs = predict_views(
        model,
        photos,
        config.image_size,
        config.tta,
        config.tta_crops,
        from_features=not body_trained,
        progress=progress,
    )
    index = {name: i for i, name in enumerate(classes)}
    truth = np.array([index[p.label] for p in photos], dtype=int)
    predicted = probs.argmax(axis=1) if len(photos) else np.zeros(0, dtype=int)
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    for t, p in zip(truth, predicted, strict=True):
        confusion[t, p] += 1
    accuracy = float((truth == predicted).mean()) if len(photos) else None
    return {
        "accuracy_holdout": accuracy,
        "n_holdout": len(photos),
        "confusion": confusion.tolist(),
    }, probs


def train_run(
    session: Session,
    config: TrainConfig | None = None,
    progress: Progress = null_progress,
) -> TrainingRun:
    """Fine-tune on the current labels, evaluate, score and record a new run.

    The run row is committed first (status `running`) so that a crash leaves a
    trace; it ends `done` with metrics, or `failed` with the error.

    Raises:
        NotTrainableError: the labels cannot train (see `check_trainable`).
        CancelledError: `progress` reported a cancellation.
    """
    config = config or TrainConfig()
    settings = get_settings()
    seed_everything(config.seed)
    device = get_device()

    # Load labels from the database.
    classes = class_names(session)
    pool = select_photos(session, POOL, config.max_per_class)
    holdout = [
        p
        for p in select_photos(session, HOLDOUT, config.max_per_class)
        if p.label in classes
    ]
    check_trainable(pool, classes)
    run = TrainingRun(
        config=asdict(config),
        classes=classes,
        device=str(device),
        n_train=len(pool),
        pid=os.getpid(),
    )
    session.add(run)
    session.commit()
    logger.info(
        "run %s: %d pool photos, %d holdout, classes %s, on %s",
        run.id,
        len(pool),
        len(holdout),
        classes,
        device,
    )

    try:
        ends = _phase_ends(config, pool, holdout)
        started = time.perf_counter()
        model = create_model(
            len(classes),
            head_hidden=config.head_hidden,
            drop_rate=config.head_dropout,
        ).to(device)

        # Phase 1 on cached features, when the recipe says so.
        head_done = head_on_cached_features(asdict(config))
        if head_done:
            fit_head_on_features(
                model, pool, classes, config, progress, device, ends[:2]
            )

        # Build data loaders and fit, unless the head alone was the recipe.
        if config.unfrozen_epochs or not head_done:
            progress(
                ends[1] if head_done else 0.0,
                f"decoding {len(pool)} photos",
            )
            loaders, run.n_train = build_dataloaders(pool, classes, config, device)
            seed_everything(config.seed + 1)
            learner = Learner(
                loaders,
                model,
                loss_func=CrossEntropyLossFlat(label_smoothing=config.label_smoothing),
                splitter=body_and_head,
                train_bn=False,
                cbs=[_SkipValidation(), _FrozenBatchNorm()],
            )
            with learner.no_bar(), learner.no_logging():
                fit(learner, config, progress, head_done, ends)
        train_seconds = time.perf_counter() - started

        # Evaluate on the holdout.
        message = f"evaluating on {len(holdout)} holdout photos"
        evaluate_start = ends[2]
        progress(evaluate_start, message)
        model.eval()
        # A body that never trained embeds like the ImageNet one.
        trained = body_trained(asdict(config))
        metrics, holdout_probs = evaluate(
            model,
            holdout,
            classes,
            config,
            trained,
            progress=lambda f: progress(
                evaluate_start + (0.92 - evaluate_start) * f, message
            ),
        )
        metrics["train_seconds"] = round(train_seconds, 2)
        metrics["train_class_counts"] = {
            name: sum(p.label == name for p in pool) for name in classes
        }

        # Save the weights.
        run_dir = settings.artifact_dir / "runs" / str(run.id)
        weights = run_dir / "model.pt"
        save_weights(model, weights)
        run.artifact_path = str(weights)
        # Commit now: scoring reads for a while, and must not hold the write lock.
        session.commit()
        (run_dir / "config.json").write_text(
            json.dumps({"config": asdict(config), "classes": classes}, indent=2)
        )

        # Score every pool photo out-of-fold, and record.
        progress(0.92, "scoring pool photos out-of-fold")
        # Scoring with a body that never trained has nothing to add to the
        # ImageNet embeddings.
        score_run(
            session,
            run,
            model,
            holdout=holdout,
            holdout_probs=holdout_probs,
            thorough=trained,
        )
        run.metrics = metrics
        run.train_seconds = round(train_seconds, 2)
        run.status = DONE
        run.finished_at = utcnow()
        session.commit()
        progress(1.0, f"done: holdout accuracy {_percent(metrics['accuracy_holdout'])}")
        logger.info("run %s done: %s", run.id, metrics)
        return run
    except BaseException as error:
        session.rollback()
        run.status = CANCELLED if isinstance(error, CancelledError) else FAILED
        run.metrics = {"error": str(error) or type(error).__name__}
        run.finished_at = utcnow()
        session.commit()
        raise


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"
