"""Export a trained run as a phone-ready model file, checked before it is listed.

Two formats: ExecuTorch `.pte` lowered to the XNNPACK backend (optionally int8,
quantized post-training with PT2E), and ONNX for onnxruntime. The exported
graph takes one photo preprocessed by `pipeline.images` and returns softmax
probabilities, so a phone app needs only the sidecar JSON written beside the
file: the labels in output order and the preprocessing stated in full.

A file is trusted only after it has been run itself, by its own runtime, over
the holdout photos and compared with the PyTorch model it came from. An export
that disagrees (fp32), or that disagrees too often or loses accuracy (int8), is
refused: its file is deleted and no `Export` row is recorded. Files are written
under a `.partial` name and renamed into place, so a crash never leaves a
half-written model behind.
"""

import copy
import itertools
import json
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session
from torch import nn

from db.models import EXCLUDED, HOLDOUT, POOL, Export, Photo, TrainingRun
from db.settings import get_settings
from pipeline.images import (
    BadImageError,
    preprocess,
    preprocess_file,
    preprocessing_spec,
    upright_rgb,
)
from pipeline.model import ARCHITECTURE, load_weights
from pipeline.progress import Progress, null_progress
from pipeline.runs import get_run

logger = logging.getLogger(__name__)

FORMATS = ("pte", "onnx")
SUFFIXES = {"pte": ".pte", "onnx": ".onnx"}
INPUT_NAME = "input"
OUTPUT_NAME = "probs"
MIN_AGREEMENT = 0.99  # fp32: share of holdout photos with the same top class
MIN_INT8_AGREEMENT = 0.98  # int8: the default of `ExportConfig.min_int8_agreement`
MAX_ACCURACY_DROP = 0.01  # int8: holdout accuracy it may lose against PyTorch
CALIBRATION_BATCH = 10  # photos per calibration forward pass
CHECK_BATCH = 16  # photos per PyTorch forward pass while checking
# Submodules left in float by int8 exports: the stem and the first five of the
# seven stages (0.7 M of 3.4 M weights). On the default recipe's Seefood model,
# with only the stem and stages 0-1 in float int8 agreed with PyTorch on 98.6 %
# of the holdout; with these, on 99.4 %, for 5.6 MB instead of 3.7 and 7.6 ms
# a photo instead of 6.1. They must come before every quantized module:
# XNNPACK cannot lower a float convolution fed by an int8 one.
INT8_FLOAT_MODULES = (
    "model.conv_stem",
    "model.blocks.0",
    "model.blocks.1",
    "model.blocks.2",
    "model.blocks.3",
    "model.blocks.4",
)
LATENCY_WARMUP = 3
LATENCY_PHOTOS = 20

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass
class ExportConfig:
    """Settings of one export; saved in the sidecar of the file it produced.

    Attributes:
        format: "pte" (ExecuTorch, XNNPACK backend) or "onnx".
        int8: quantize weights and activations to int8 (pte only).
        calibration_photos: pool photos that set the int8 activation ranges
            and bias corrections, taken in turn from each label.
        check_limit: check on at most this many holdout photos, taken in turn
            from each label; None for all.
        min_int8_agreement: refuse an int8 file whose top class matches
            PyTorch's on a smaller share of the holdout photos checked.
    """

    format: str = "pte"
    int8: bool = False
    calibration_photos: int = 50
    check_limit: int | None = None
    min_int8_agreement: float = MIN_INT8_AGREEMENT

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(
                f"unknown export format {self.format!r}; expected one of {FORMATS}"
            )
        if not isinstance(self.int8, bool):
            raise ValueError(f"int8 must be True or False, not {self.int8!r}")
        if self.int8 and self.format != "pte":
            raise ValueError(
                f"int8 quantization is only offered for format 'pte', not "
                f"{self.format!r}; export {self.format!r} without int8"
            )
        if not isinstance(self.calibration_photos, int) or self.calibration_photos < 1:
            raise ValueError(
                f"calibration_photos must be a positive integer, "
                f"not {self.calibration_photos!r}"
            )
        if self.check_limit is not None and (
            not isinstance(self.check_limit, int) or self.check_limit < 1
        ):
            raise ValueError(
                f"check_limit must be a positive integer or None, "
                f"not {self.check_limit!r}"
            )
        if (
            isinstance(self.min_int8_agreement, bool)
            or not isinstance(self.min_int8_agreement, int | float)
            or not 0 <= self.min_int8_agreement <= 1
        ):
            raise ValueError(
                f"min_int8_agreement must be a share between 0 and 1, "
                f"not {self.min_int8_agreement!r}"
            )

    @property
    def kind(self) -> str:
        """The `Export.format` value: "pte", "pte_int8" or "onnx"."""
        return f"{self.format}_int8" if self.int8 else self.format


class ExportRefusedError(ValueError):
    """The export was refused: nothing was left on disk or recorded.

    `checks` holds the measurements that led to the refusal, when the file
    got as far as being checked.
    """

    def __init__(self, message: str, checks: dict | None = None):
        super().__init__(message)
        self.checks = checks or {}


class _Probabilities(nn.Module):
    """The classifier with softmax on top: the graph phones run."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)  # (1, num_classes)


def export_run(
    session: Session,
    run_id: int | None,
    config: ExportConfig | None = None,
    progress: Progress = null_progress,
) -> Export:
    """Write run `run_id` as a model file and sidecar, check it, record it.

    Returns the new `Export` row, flushed but not committed.

    Raises:
        LookupError, ValueError: no such run, or the run did not finish.
        FileNotFoundError: the run's weights are gone.
        ExportRefusedError: no photos to check or calibrate with, or the file
            disagrees with PyTorch; nothing is left on disk or recorded.
        pipeline.train.CancelledError: `progress` reported a cancellation.
    """
    config = config or ExportConfig()

    # Load the run and its model.
    _report(progress, 0.0, "loading the run")
    run = get_run(session, run_id)
    if not run.artifact_path or not Path(run.artifact_path).is_file():
        raise FileNotFoundError(
            f"run {run.id} has no saved weights at {run.artifact_path}; train again"
        )
    size = int(run.config["image_size"])
    classes = list(run.classes)
    model = _Probabilities(load_weights(run.artifact_path, len(classes))).eval()
    holdout = _holdout_photos(session, run, config.check_limit)
    if not holdout:
        raise ExportRefusedError(
            f"run {run.id}: no holdout photos with labels {classes} to check the "
            "export against; import a test/ folder first"
        )
    logger.info(
        "run %s: exporting %s, %d holdout photos to check",
        run.id,
        config.kind,
        len(holdout),
    )

    path, sidecar_path = _reserve_paths(run, config)
    partial = _partial(path)
    try:
        # Convert and write the file.
        if config.format == "pte":
            data, calibrated = _to_pte(model, size, session, run, config, progress)
        else:
            data, calibrated = _to_onnx(model, size, progress), None
        _report(progress, 0.5, f"writing {path.name}")
        _write(partial, data)

        # Check the written file against PyTorch.
        checks = _check_file(partial, config, model, holdout, classes, size, progress)
        checks["size_mb"] = round(len(data) / 1e6, 3)
        if config.int8:
            checks["calibration_photos"] = calibrated
        refusal = refusal_reason(checks, config.int8, config.min_int8_agreement)
        if refusal:
            raise ExportRefusedError(
                f"run {run.id}: {config.kind} export refused: {refusal}", checks
            )

        # Publish the file and its sidecar, then record them.
        _report(progress, 0.97, "writing the sidecar")
        os.replace(partial, path)
        sidecar = _sidecar(run, config, path, classes, size, checks, data)
        _write_atomic(sidecar_path, json.dumps(sidecar, indent=2).encode())
        export = Export(
            run_id=run.id,
            format=config.kind,
            path=str(path),
            sidecar_path=str(sidecar_path),
            size_bytes=len(data),
            checks=checks,
        )
        session.add(export)
        session.flush()
    except BaseException:
        for leftover in (partial, path, _partial(sidecar_path), sidecar_path):
            leftover.unlink(missing_ok=True)
        raise
    # Reported, not checked: a cancel arriving now is too late to undo.
    progress(1.0, f"export {export.id} written: {_summary(checks)}")
    logger.info("run %s: export %s at %s: %s", run.id, export.id, path, checks)
    return export


def refusal_reason(
    checks: dict, int8: bool, min_int8_agreement: float = MIN_INT8_AGREEMENT
) -> str | None:
    """Why an export with these checks must not be published, or None.

    fp32 must agree with PyTorch on `MIN_AGREEMENT` of the photos. int8 must
    agree on `min_int8_agreement` of them and lose at most `MAX_ACCURACY_DROP`
    of holdout accuracy: accuracy alone would let a file through that is as
    often right as PyTorch but on other photos.
    """
    if not int8 and checks["agreement"] < MIN_AGREEMENT:
        return (
            f"it agrees with PyTorch on {100 * checks['agreement']:.1f} % of "
            f"{checks['n_checked']} holdout photos, below the "
            f"{100 * MIN_AGREEMENT:.0f} % required (largest probability "
            f"difference {checks['max_prob_diff']:.3g})"
        )
    if int8 and checks["agreement"] < min_int8_agreement - 1e-9:
        return (
            f"int8 agrees with PyTorch on {100 * checks['agreement']:.1f} % of "
            f"{checks['n_checked']} holdout photos, below the "
            f"{100 * min_int8_agreement:.1f} % required (largest probability "
            f"difference {checks['max_prob_diff']:.3g}; holdout accuracy "
            f"{100 * checks['accuracy_holdout']:.1f} %, PyTorch "
            f"{100 * checks['pytorch_accuracy_holdout']:.1f} %). Export fp32 "
            "instead"
        )
    drop = checks["pytorch_accuracy_holdout"] - checks["accuracy_holdout"]
    if int8 and drop > MAX_ACCURACY_DROP + 1e-9:
        return (
            f"int8 holdout accuracy {100 * checks['accuracy_holdout']:.1f} % is "
            f"{100 * drop:.1f} points below PyTorch's "
            f"{100 * checks['pytorch_accuracy_holdout']:.1f} % on "
            f"{checks['n_checked']} photos; at most "
            f"{100 * MAX_ACCURACY_DROP:.0f} point may be lost. Export fp32 "
            "instead, or calibrate on more photos"
        )
    return None


def list_exports(session: Session, run_id: int | None = None) -> list[Export]:
    """Recorded exports, newest first, leaving out those whose file is gone."""
    query = select(Export).order_by(Export.created_at.desc(), Export.id.desc())
    if run_id is not None:
        query = query.where(Export.run_id == run_id)
    return [e for e in session.scalars(query) if Path(e.path).is_file()]


def load_exported(path: str | Path) -> Runner:
    """A function running the model file at `path` on one preprocessed photo.

    The function takes a float32 array (1, 3, S, S) and returns the
    probabilities (num_classes,). Loaded programs are cached per file version.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: the suffix is neither .pte nor .onnx.
    """
    path = Path(path)
    kind = {suffix: name for name, suffix in SUFFIXES.items()}.get(path.suffix)
    if kind is None:
        raise ValueError(f"{path}: unknown model file type; expected .pte or .onnx")
    stat = path.stat()
    return _cached_runner(str(path.resolve()), kind, stat.st_mtime_ns, stat.st_size)


def predict_with_export(
    export: Export, image: Image.Image
) -> tuple[str, float, np.ndarray]:
    """Classify `image` with the exported file itself, as a phone would.

    Returns the label, its probability and all probabilities in the order of
    the sidecar's labels.
    """
    if not export.sidecar_path:
        raise ValueError(f"export {export.id} has no sidecar to read labels from")
    sidecar = _read_sidecar(export.sidecar_path)
    labels = sidecar["labels"]
    size = sidecar["input"]["shape"][-1]
    x = preprocess(upright_rgb(image), size)[None]  # (1, 3, S, S)
    probs = load_exported(export.path)(x)
    if len(probs) != len(labels):
        raise ValueError(
            f"{export.path} outputs {len(probs)} values but its sidecar "
            f"{export.sidecar_path} names {len(labels)} labels"
        )
    best = int(np.argmax(probs))
    return labels[best], float(probs[best]), probs


def _report(progress: Progress, fraction: float, message: str) -> None:
    if progress(fraction, message):
        from pipeline.train import CancelledError

        raise CancelledError(f"export cancelled while {message}")


def _holdout_photos(
    session: Session, run: TrainingRun, limit: int | None
) -> list[Photo]:
    """Holdout photos in turn from each label, so a limited check sees all."""
    query = (
        select(Photo)
        .where(
            Photo.split == HOLDOUT,
            Photo.label.in_(list(run.classes)),
            Photo.status != EXCLUDED,
        )
        .order_by(Photo.id)
    )
    return _in_turn(session.scalars(query))[:limit]


def _calibration_photos(session: Session) -> list[Photo]:
    """Pool photos taken in turn from each label, so every class is seen."""
    query = (
        select(Photo)
        .where(Photo.split == POOL, Photo.status != EXCLUDED)
        .order_by(Photo.id)
    )
    return _in_turn(session.scalars(query))


def _in_turn(photos: Iterable[Photo]) -> list[Photo]:
    """One photo of each label in turn (labels sorted), each label by id."""
    by_label: dict[str, list[Photo]] = {}
    for photo in photos:
        by_label.setdefault(photo.label, []).append(photo)
    rounds = itertools.zip_longest(*(by_label[k] for k in sorted(by_label)))
    return [p for photos in rounds for p in photos if p is not None]


def _reserve_paths(run: TrainingRun, config: ExportConfig) -> tuple[Path, Path]:
    """Free names for the model file and its sidecar, held by an empty .partial."""
    folder = get_settings().artifact_dir / "exports" / f"run{run.id}"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    prefix = config.format + ("-int8" if config.int8 else "")
    for counter in itertools.count(1):
        stem = f"{prefix}-{stamp}" + (f"-{counter}" if counter > 1 else "")
        path = folder / (stem + SUFFIXES[config.format])
        sidecar_path = folder / (stem + ".json")
        if path.exists() or sidecar_path.exists():
            continue
        try:
            flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
            os.close(os.open(_partial(path), flags, 0o666))
        except FileExistsError:  # another export took this name just now
            continue
        return path, sidecar_path
    raise AssertionError("unreachable")


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _write_atomic(path: Path, data: bytes) -> None:
    partial = _partial(path)
    _write(partial, data)
    os.replace(partial, path)


def _to_pte(
    model: nn.Module,
    size: int,
    session: Session,
    run: TrainingRun,
    config: ExportConfig,
    progress: Progress,
) -> tuple[bytes, int | None]:
    """Lower to ExecuTorch with XNNPACK; int8 is calibrated on pool photos.

    Returns the program's bytes and how many photos calibrated it (int8).
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackPartitioner,
    )
    from executorch.exir import to_edge_transform_and_lower

    calibrated = None
    if config.int8:
        model, calibrated = _quantize(model, size, session, run, config, progress)
    _report(progress, 0.27, "capturing the graph")
    example = (torch.zeros(1, 3, size, size),)
    program = torch.export.export(model, example, strict=False)
    _report(progress, 0.3, "lowering to XNNPACK")
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    return lowered.to_executorch().buffer, calibrated


def _quantize(
    model: nn.Module,
    size: int,
    session: Session,
    run: TrainingRun,
    config: ExportConfig,
    progress: Progress,
) -> tuple[nn.Module, int]:
    """int8 calibrated on pool photos, preprocessed exactly as the check does.

    Returns the converted module (float in, float out) and how many photos
    calibrated it.
    """
    wanted = config.calibration_photos
    photos = []
    for x in _calibration_inputs(session, size, wanted):
        photos.append(x)
        _report(
            progress,
            0.02 + 0.08 * len(photos) / wanted,
            f"calibrating int8: reading photo {len(photos)}/{wanted}",
        )
    if not photos:
        raise ExportRefusedError(
            f"run {run.id}: no readable pool photos to calibrate int8 with"
        )
    batches = [
        torch.from_numpy(np.stack(photos[i : i + CALIBRATION_BATCH]))
        for i in range(0, len(photos), CALIBRATION_BATCH)
    ]  # each (B, 3, S, S)

    def observed(done: int) -> None:
        _report(
            progress,
            0.1 + 0.15 * done / len(batches),
            f"calibrating int8 on batch {done}/{len(batches)}",
        )

    quantized = quantize_int8(model, batches, on_batch=observed)
    logger.info("run %s: int8 calibrated on %d pool photos", run.id, len(photos))
    return quantized, len(photos)


def _calibration_inputs(
    session: Session, size: int, wanted: int
) -> Iterator[np.ndarray]:
    """Up to `wanted` pool photos, preprocessed, in turn from each label."""
    used = 0
    for photo in _calibration_photos(session):
        if used == wanted:
            return
        try:
            x = preprocess_file(photo.path, size)  # (3, S, S)
        except (BadImageError, FileNotFoundError) as error:
            logger.warning("calibration: leaving out %s: %s", photo.path, error)
            continue
        used += 1
        yield x


def quantize_int8(
    model: nn.Module,
    batches: list[torch.Tensor],
    float_modules: tuple[str, ...] = INT8_FLOAT_MODULES,
    correct_bias: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> torch.fx.GraphModule:
    """`model` quantized to int8 with PT2E for XNNPACK, calibrated on `batches`.

    Weights are per-channel symmetric, activations per-tensor with histogram
    observers. Three departures from the stock XNNPACK recipe, each measured
    on the Seefood holdout: each convolution and its ReLU6 are observed as one
    (`_int8_quantizer`); the modules `float_modules` stay in float; and the
    BatchNorm biases cancel the mean shift that rounding the weights adds
    (`_correct_int8_bias`). BatchNorm is folded into the convolutions before
    any observer is placed, so the ranges are those of the folded weights.

    The graph is captured with a free batch size so that calibration runs a
    batch at a time; capture the result again for batch size 1.

    Args:
        model: in eval mode; takes (B, 3, S, S). It is left unchanged.
        batches: calibration inputs, each (B, 3, S, S), preprocessed as the
            model's inputs will be.
        float_modules: names of submodules of `model` left in float.
        correct_bias: apply the bias correction.
        on_batch: called with the number of batches observed so far.

    Returns:
        The converted module: float in, float out, int8 inside.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if model.training:
        raise ValueError("quantize a model in eval mode: call .eval() first")
    model = copy.deepcopy(model)  # the captured graph may share its tensors
    size = batches[0].shape[-1]
    program = torch.export.export(
        model,
        (torch.zeros(2, 3, size, size),),
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
        strict=False,
    )
    graph = program.module()
    if correct_bias:
        _correct_int8_bias(graph, model, batches, float_modules)
    config = get_symmetric_quantization_config(is_per_channel=True)
    prepared = prepare_pt2e(graph, _int8_quantizer(config, float_modules))
    with torch.no_grad():
        for done, batch in enumerate(batches, start=1):
            prepared(batch)
            if on_batch is not None:
                on_batch(done)
    return convert_pt2e(prepared)


def _correct_int8_bias(
    graph: torch.fx.GraphModule,
    model: nn.Module,
    batches: list[torch.Tensor],
    float_modules: tuple[str, ...],
) -> None:
    """Shift each BatchNorm after a quantized convolution by its weights' error.

    Rounding a convolution's BatchNorm-folded weights to int8 moves its output
    by `(W_int8 - W) @ E[input]` per channel on average. On EfficientNet-Lite0
    that shift, mostly from the depthwise and projection convolutions, is as
    large as the whole int8 error. Lowering the BatchNorm's bias by it cancels
    the average (bias correction, Nagel et al. 2019, "Data-Free Quantization");
    the input means come from running the float `model` over `batches`.
    Border pixels count like the others, which padding makes slightly wrong.
    """
    pairs = []  # (convolution, BatchNorm) submodule names
    for node in graph.graph.nodes:
        if node.target != torch.ops.aten.batch_norm.default:
            continue
        conv = node.args[0]
        if conv.target != torch.ops.aten.conv2d.default or len(conv.users) > 1:
            continue
        weights = (conv.args[1], node.args[1])
        if _in_modules(conv, float_modules) or not all(map(_is_weight, weights)):
            continue
        pairs.append(tuple(w.target.removesuffix(".weight") for w in weights))

    # Per-channel mean of each convolution's input, over all photos.
    sums: dict[str, torch.Tensor] = {}

    def add_mean(name: str, inputs: tuple[torch.Tensor, ...]) -> None:
        sums[name] = sums.get(name, 0) + inputs[0].mean((2, 3)).sum(0)  # (in,)

    hooks = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, inputs, name=name: add_mean(name, inputs)
        )
        for name, _ in pairs
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    count = sum(len(batch) for batch in batches)

    with torch.no_grad():
        for conv_name, norm_name in pairs:
            conv = model.get_submodule(conv_name)
            norm = model.get_submodule(norm_name)
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            folded = conv.weight * scale.view(-1, 1, 1, 1)  # (out, in/g, k, k)
            error = (_int8_per_channel(folded) - folded).sum((2, 3))  # (out, in/g)
            groups = conv.groups
            error = error.view(groups, -1, error.shape[1])  # (g, out/g, in/g)
            mean = (sums[conv_name] / count).view(groups, -1)  # (g, in/g)
            shift = torch.einsum("goi,gi->go", error, mean).reshape(-1)  # (out,)
            graph.get_parameter(f"{norm_name}.bias").sub_(shift)


def _is_weight(node) -> bool:
    return (
        isinstance(node, torch.fx.Node)
        and node.op == "get_attr"
        and node.target.endswith(".weight")
    )


def _int8_per_channel(weight: torch.Tensor) -> torch.Tensor:
    """`weight` rounded as the quantizer's per-channel symmetric observer does."""
    largest = weight.abs().flatten(1).max(1).values
    step = torch.clamp(largest / 127, min=2**-12).view(-1, *[1] * (weight.dim() - 1))
    return torch.clamp(torch.round(weight / step), -127, 127) * step


def _int8_quantizer(config, float_modules: tuple[str, ...]):
    """The stock XNNPACK quantizer, observing conv -> ReLU6 after the clamp.

    The stock quantizer fuses a convolution with a following ReLU but not with
    ReLU6 (hardtanh), so it observes the convolution's raw output: a range of
    tens of units of which only [0, 6] survives the clamp, leaving a few dozen
    of the 256 int8 levels for the values that matter. EfficientNet-Lite puts
    ReLU6 after 33 of its 49 convolutions. XNNPACK fuses the clamp into the
    convolution, so observing after it costs nothing at run time.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
    )

    def quantized(node: torch.fx.Node) -> bool:
        return not _in_modules(node, float_modules)

    class ClampAwareQuantizer(XNNPACKQuantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            _annotate_conv_clamp(model, config, quantized)
            return super().annotate(model)

    quantizer = ClampAwareQuantizer()
    quantizer.set_global(config)
    quantizer.set_filter_function(quantized)
    return quantizer


def _annotate_conv_clamp(
    model: torch.fx.GraphModule, config, keep: Callable[[torch.fx.Node], bool]
) -> None:
    """Annotate conv -> hardtanh as one int8 op observed after the hardtanh.

    The annotation the XNNPACK quantizer gives conv -> relu; the quantizer
    then leaves these nodes alone, as already annotated.
    """
    from torchao.quantization.pt2e.quantizer import (
        QuantizationAnnotation,
        get_bias_qspec,
        get_input_act_qspec,
        get_output_act_qspec,
        get_weight_qspec,
    )
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    clamps = (torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default)
    convs = (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default)
    for clamp in model.graph.nodes:
        if clamp.op != "call_function" or clamp.target not in clamps:
            continue
        conv = clamp.args[0]
        if not isinstance(conv, torch.fx.Node) or conv.target not in convs:
            continue
        if len(conv.users) > 1:  # the raw output is needed elsewhere too
            continue
        activation, weight = conv.args[0], conv.args[1]
        bias = conv.args[2] if len(conv.args) > 2 else None
        inputs = {activation: get_input_act_qspec(config)}
        inputs[weight] = get_weight_qspec(config)
        if isinstance(bias, torch.fx.Node):
            inputs[bias] = get_bias_qspec(config)
        nodes = [clamp, conv, *inputs]
        nodes.remove(activation)
        if any(Q_ANNOTATION_KEY in n.meta for n in nodes) or not all(map(keep, nodes)):
            continue
        conv.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(
            input_qspec_map=inputs, _annotated=True
        )
        clamp.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(
            output_qspec=get_output_act_qspec(config), _annotated=True
        )
        for node in nodes[2:]:  # weight and bias: annotated through the conv
            node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(_annotated=True)


def _in_modules(node: torch.fx.Node, names: tuple[str, ...]) -> bool:
    """Whether `node` was traced inside one of the submodules `names`."""
    paths = [path for path, _ in node.meta.get("nn_module_stack", {}).values()]
    return any(
        path == name or path.startswith(name + ".") for path in paths for name in names
    )


def _to_onnx(model: nn.Module, size: int, progress: Progress) -> bytes:
    _report(progress, 0.05, "converting to ONNX")
    with _quiet("onnx_ir", "onnxscript"):
        program = _onnx_program(model, size)
    return program.model_proto.SerializeToString()


def _onnx_program(model: nn.Module, size: int):
    return torch.onnx.export(
        model,
        (torch.zeros(1, 3, size, size),),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamo=True,
        external_data=False,
        verbose=False,
    )


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Hold the named loggers at WARNING: the ONNX optimizer logs every pass."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def _check_file(
    path: Path,
    config: ExportConfig,
    model: nn.Module,
    holdout: list[Photo],
    classes: list[str],
    size: int,
    progress: Progress,
) -> dict:
    """Run the file and PyTorch over the same preprocessed holdout photos."""
    # One thread, as for the latency: onnxruntime's default pool spins, and
    # crawls on a machine busy with other work.
    runner = _load_runner(path, config.format, threads=1)
    index = {name: i for i, name in enumerate(classes)}
    file_probs, torch_probs, truth, inputs, waiting = [], [], [], [], []
    with torch.no_grad():
        for number, photo in enumerate(holdout, start=1):
            try:
                x = preprocess_file(photo.path, size)[None]  # (1, 3, S, S)
            except (BadImageError, FileNotFoundError) as error:
                logger.warning("check: leaving out %s: %s", photo.path, error)
                x = None
            if x is not None:
                file_probs.append(runner(x))
                truth.append(index[photo.label])
                waiting.append(x)
                if len(inputs) < LATENCY_PHOTOS:
                    inputs.append(x)
            # PyTorch a batch at a time: one photo at a time spends most of
            # its time waiting on thread barriers when the cores are busy.
            if waiting and (len(waiting) == CHECK_BATCH or number == len(holdout)):
                batch = torch.from_numpy(np.concatenate(waiting))  # (B, 3, S, S)
                torch_probs.extend(model(batch).numpy())
                waiting = []
            _report(
                progress,
                0.5 + 0.4 * number / len(holdout),
                f"checking photo {number}/{len(holdout)} against PyTorch",
            )
    if not truth:
        raise ExportRefusedError(
            f"none of the {len(holdout)} holdout photos could be read to check "
            f"{path.name}"
        )
    file_probs, torch_probs = np.stack(file_probs), np.stack(torch_probs)
    truth = np.array(truth)

    _report(progress, 0.92, "measuring latency on one thread")
    checks = {
        "n_checked": len(truth),
        "agreement": float((file_probs.argmax(1) == torch_probs.argmax(1)).mean()),
        "max_prob_diff": float(np.abs(file_probs - torch_probs).max()),
        "accuracy_holdout": float((file_probs.argmax(1) == truth).mean()),
        "pytorch_accuracy_holdout": float((torch_probs.argmax(1) == truth).mean()),
        "latency_ms_median": _latency_ms(runner, inputs, config.format),
        "latency_threads": 1,
    }
    return checks


def _latency_ms(runner: Runner, inputs: list[np.ndarray], kind: str) -> float:
    """Median milliseconds per photo, one at a time, on one thread."""
    with _single_thread(executorch=kind == "pte"):
        for x in inputs[:LATENCY_WARMUP]:
            runner(x)
        times = []
        for x in itertools.islice(itertools.cycle(inputs), LATENCY_PHOTOS):
            started = time.perf_counter()
            runner(x)
            times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 3)


@contextmanager
def _single_thread(executorch: bool) -> Iterator[None]:
    """Limit PyTorch and ExecuTorch's XNNPACK thread pool to one thread.

    ExecuTorch's pool is process-wide and resetting it is unsafe while another
    thread runs a program; exports run in a worker process of their own.
    """
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if executorch:
        from executorch.extension.pybindings import portable_lib

        pool_threads = portable_lib._threadpool_get_thread_count()
        portable_lib._unsafe_reset_threadpool(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        if executorch:
            portable_lib._unsafe_reset_threadpool(pool_threads)


def _load_runner(path: Path, kind: str, threads: int | None = None) -> Runner:
    """Load the file with its own runtime; uncached, for files not yet published."""
    if kind == "pte":
        return _PteRunner(path)
    return _onnx_runner(path, threads)


class _PteRunner:
    """The `forward` method of an ExecuTorch program, one call at a time."""

    def __init__(self, path: Path):
        from executorch.runtime import Runtime

        self.path = path
        self.program = Runtime.get().load_program(Path(path))
        self.method = self.program.load_method("forward")
        self.expected = tuple(self.method.metadata.input_tensor_meta(0).sizes())
        # A method's planned memory is shared by all its calls, so calls from
        # several threads (the dashboard's sessions) must take turns.
        self.lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        _check_input(x, self.expected, self.path)
        with self.lock:
            (out,) = self.method.execute([torch.from_numpy(np.ascontiguousarray(x))])
            return out.numpy()[0].copy()


def _onnx_runner(path: Path, threads: int | None = None) -> Runner:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = threads
    ort_session = onnxruntime.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"]
    )
    expected = tuple(ort_session.get_inputs()[0].shape)

    def run(x: np.ndarray) -> np.ndarray:
        _check_input(x, expected, path)
        (out,) = ort_session.run([OUTPUT_NAME], {INPUT_NAME: x})
        return out[0]

    return run


def _check_input(x: np.ndarray, expected: tuple, path: Path) -> None:
    if x.dtype != np.float32 or tuple(x.shape) != expected:
        raise ValueError(
            f"{Path(path).name} takes float32 {expected}, got {x.dtype} "
            f"{tuple(x.shape)}; preprocess as its sidecar says"
        )


@lru_cache(maxsize=8)
def _cached_runner(path: str, kind: str, mtime_ns: int, size: int) -> Runner:
    # mtime and size are part of the key so a replaced file is loaded afresh.
    return _load_runner(Path(path), kind)


@lru_cache(maxsize=32)
def _cached_sidecar(path: str, mtime_ns: int) -> dict:
    return json.loads(Path(path).read_text())


def _read_sidecar(path: str | Path) -> dict:
    return _cached_sidecar(str(path), Path(path).stat().st_mtime_ns)


def _sidecar(
    run: TrainingRun,
    config: ExportConfig,
    path: Path,
    classes: list[str],
    size: int,
    checks: dict,
    data: bytes,
) -> dict:
    """Everything a phone app needs to use the file, and how it was checked."""
    if config.format == "pte":
        import executorch.version

        runtime = {
            "name": "ExecuTorch",
            "version": executorch.version.__version__,
            "backend": "XNNPACK",
            "input_by": "position 0 of method 'forward'",
        }
    else:
        import onnx

        model = onnx.load_from_string(data)
        opset = max(
            o.version for o in model.opset_import if o.domain in ("", "ai.onnx")
        )
        runtime = {"name": "onnxruntime", "opset": opset, "input_by": "name"}
    return {
        "file": path.name,
        "run_id": run.id,
        "format": config.format,
        "int8": config.int8,
        "export_config": asdict(config),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {"architecture": ARCHITECTURE, "num_classes": len(classes)},
        "runtime": runtime,
        "labels": classes,
        "input": {
            "name": INPUT_NAME,
            "shape": [1, 3, size, size],
            "dtype": "float32",
            "layout": "NCHW",
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": [1, len(classes)],
            "dtype": "float32",
            "meaning": "softmax probabilities, one per label in the order of "
            "`labels`; they sum to 1. The predicted label is the argmax.",
        },
        "preprocessing": preprocessing_spec(size),
        "quantization": (
            {
                "scheme": "PT2E static int8, XNNPACK quantizer, weights "
                "per-channel symmetric with bias correction, activations "
                "per-tensor (histogram observers), each convolution and its "
                "ReLU6 observed as one",
                "float_modules": list(INT8_FLOAT_MODULES),
                "calibration_photos": checks.get("calibration_photos"),
            }
            if config.int8
            else None
        ),
        "checks": checks,
    }


def _summary(checks: dict) -> str:
    return (
        f"{checks['size_mb']:.1f} MB, agreement {100 * checks['agreement']:.1f} %, "
        f"holdout accuracy {100 * checks['accuracy_holdout']:.1f} % "
        f"(PyTorch {100 * checks['pytorch_accuracy_holdout']:.1f} %), "
        f"{checks['latency_ms_median']:.1f} ms per photo"
    )
