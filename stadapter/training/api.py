"""The training workflows `stadapter train` and `stadapter eval` call.

    train_task(...)       annotations -> a trained bundle under OUT/bundle, registered when asked
    evaluate_task(...)    a registry ref or a bundle directory -> metrics over an annotation file
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stadapter.bundle import Bundle, check_labels
from stadapter.config import AdapterConfig
from stadapter.errors import ConfigError
from stadapter.model.backbone import Backbone
from stadapter.model.loading import load_backbone
from stadapter.model.video_vit import VideoViT, count_parameters
from stadapter.recipes import PRESETS, Recipe, preset
from stadapter.registry.api import check_name, opened, parse_ref
from stadapter.training import dist as D
from stadapter.training.data import ClipSource
from stadapter.training.loop import TrainJob, TrainResult, run_training
from stadapter.training.monitor import check_log_to
from stadapter.training.report import plot_confusion, plot_curves
from stadapter.training.rundir import BUNDLE_DIR, CONFUSION, CURVES, METRICS_LOG, prepare_run_dir

if TYPE_CHECKING:
    from stadapter.registry import Registry
    from stadapter.video.datasets import Sample


@dataclass
class TrainOutcome:
    """bundle_dir is None on a non-main DDP rank; registered is the version's ref ("task:N") when the bundle
    was registered."""

    bundle_dir: Path | None
    metrics: dict[str, Any] | None
    trainable_params: int
    seconds: float
    skipped: int
    registered: str | None = None
    finished_before: bool = False  # resumed a run that had finished: nothing trained, the bundle as it was


@dataclass(frozen=True)
class Evaluation:
    """task: the evaluated bundle's task; clips: the annotated clips (decoded or skipped); metrics: top-1,
    top-5, per-class accuracy, confusion matrix, skipped_clips (:func:`stadapter.training.evaluate.evaluate`)."""

    task: str
    clips: int
    metrics: dict[str, Any]


def resolve_recipe(task: str, recipe: str | None, adapter: dict[str, Any] | None = None,
                   spec: dict[str, Any] | None = None, train: dict[str, Any] | None = None) -> Recipe:
    """The preset named by --recipe, else the task's name if it is a preset, else ``custom``; then overrides (a
    width given here replaces the preset's width rule)."""
    r = preset(recipe or (task if task in PRESETS else "custom"))
    return Recipe(r.name,
                  dataclasses.replace(r.adapter, **(adapter or {})),
                  dataclasses.replace(r.task, **(spec or {})),
                  dataclasses.replace(r.train, **(train or {})),
                  None if "width" in (adapter or {}) else r.width_fraction)


def recipe_from_options(task: str, recipe: str | None, adapter: dict[str, Any], spec: dict[str, Any],
                        train: dict[str, Any]) -> Recipe:
    """:func:`resolve_recipe` from a command's options: those left unset (None) keep the recipe's value; a method
    given without an activation gets the method's own."""
    adapter, spec, train = ({k: v for k, v in d.items() if v is not None} for d in (adapter, spec, train))
    if "method" in adapter and "activation" not in adapter:
        adapter["activation"] = None  # let the method pick its default activation
    return resolve_recipe(task, recipe, adapter, spec, train)


def outcome_lines(task: str, method: str, outcome: TrainOutcome) -> list[str]:
    """What ``stadapter train`` prints when a run ends (nothing on a non-main DDP rank)."""
    if outcome.bundle_dir is None:
        return []
    m = outcome.metrics or {}
    if outcome.finished_before:
        summary = f"{task}: the run had finished; nothing trained"
    else:
        summary = (f"trained {task} ({method}, {outcome.trainable_params:,} trainable params) "
                   f"in {outcome.seconds:.0f} s")
    if m.get("top1") is not None:
        summary += f"; val top-1 {100 * m['top1']:.1f}%, top-5 {100 * m['top5']:.1f}%"
    if outcome.skipped:
        summary += f"; {outcome.skipped} clip(s) skipped"
    ref = outcome.registered
    return [summary, f"bundle: {outcome.bundle_dir}" + (f"  registered as {ref}" if ref else "")]


def backbone_info(bb: Backbone) -> dict[str, Any]:
    return {**bb.describe(), "weights": getattr(bb, "weights", None), "fingerprint": bb.fingerprint()}


def prepare_backbone(spec: str, weights: str | None, device: torch.device, amp: bool) -> Backbone:
    bb = load_backbone(spec, weights).to(device)
    if device.type == "cuda" and amp:
        bb = bb.half()  # frozen backbone in half precision; adapters and head stay fp32
    return bb


def _requested_device(device: str | None) -> str | None:
    """'auto' (the CLI's default) and None both mean: CUDA when present, else the CPU."""
    return None if device == "auto" else device


def train_task(task: str, recipe: Recipe, samples_train: list[Sample], labels: list[str],
               samples_val: list[Sample] | None, backbone: str, weights: str | None, out: Path,
               resume: bool = False, max_steps: int | None = None, device: str | None = None,
               log: Callable[[str], None] = print, progress: bool = True, extra: dict[str, Any] | None = None,
               *, register: bool | None = False, registry: Registry | str | None = None,
               source: dict[str, Any] | None = None, data: str | None = None, overwrite: bool = False,
               log_to: tuple[str, ...] = ()) -> TrainOutcome:
    """Train ``recipe``'s adapter set for ``task`` on a frozen ``backbone`` and save the bundle (with metrics,
    curves and ``extra`` in its config) to ``out/bundle``. Under torchrun every rank trains; the main rank saves.

    ``out`` holding a run is refused unless ``resume`` (go on from its checkpoint) or ``overwrite`` (delete the
    run's files and start again; :mod:`stadapter.training.rundir`). Resuming a run that had finished trains
    nothing and returns its bundle with ``finished_before`` set.

    With ``register``, the main rank then registers the bundle as the next version of ``task`` in ``registry``
    (an open registry, or a database URL; None: the default database), with ``source`` as its lineage (default
    ``{"kind": "train", "run": str(out)}``) and ``data`` naming the training data; ``registered`` holds the
    new version's ref. ``register=None``: register a newly trained bundle, not one of a finished run resumed
    (that registers only with ``register=True``). ``log_to``: ``("tensorboard",)`` writes event files to
    ``out/tensorboard``. An invalid task name is refused before any work (the registry's name rule)."""
    check_name(task, "task")
    if not samples_train:
        raise ConfigError("the training set is empty")
    check_labels(list(labels), len(labels), f"task {task!r}")  # the bundle's rule, before any training
    check_log_to(log_to)
    device = _requested_device(device)
    dev = D.device_for(device, 0)
    info = D.init_distributed(dev)
    if dev.type == "cuda" and device is None:
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    try:
        prepare_run_dir(out, resume=resume, overwrite=overwrite, delete=info.is_main)  # every rank refuses alike
        D.barrier(info)
        bb = prepare_backbone(backbone, weights, dev, recipe.train.amp)
        recipe = recipe.for_backbone(bb.dim)
        adapter = dataclasses.replace(recipe.adapter, num_classes=len(labels))
        model = VideoViT(bb, adapter, recipe.task.num_frames)
        src: dict[str, Any] = dict(spec=recipe.task, size=bb.image_size, mean=bb.mean, std=bb.std,
                                   seed=recipe.train.seed)
        cache = recipe.train.cache_clips
        train_src = ClipSource(samples_train, **src, cache={} if cache else None)
        val_src = ClipSource(samples_val, **src, cache={} if cache else None) if samples_val else None
        job = TrainJob(task, adapter, recipe.task, recipe.train, labels, train_src, val_src, out, max_steps,
                       device, log, progress, extra or {}, log_to)
        result = run_training(job, model, info, resume=resume)
        if not info.is_main:
            return TrainOutcome(None, result.metrics, count_parameters(result.tensors), result.seconds,
                                result.skipped)
        if result.finished_before and (out / BUNDLE_DIR).is_dir():
            outcome = _finished_outcome(out, result, log, register)
        else:
            outcome = _save_bundle(task, recipe, adapter, bb, labels, result, out, extra)
    finally:
        D.shutdown(info)
    if outcome.bundle_dir is not None and (register is True or (register is None and not outcome.finished_before)):
        with opened(registry) as reg:
            outcome.registered = reg.register(outcome.bundle_dir, task=task,
                                              source=source or {"kind": "train", "run": str(out)}, data=data).ref
    return outcome


def _finished_outcome(out: Path, result: TrainResult, log: Callable[[str], None],
                      register: bool | None) -> TrainOutcome:
    """The outcome of resuming a run that had finished: its bundle as it is, nothing trained."""
    bundle = Bundle.load(out / BUNDLE_DIR)
    log(f"{out} holds a finished run (step {result.steps}); nothing to train, its bundle is {out / BUNDLE_DIR}"
        + ("" if register is True else "; not registered again (pass --register to register it)"))
    metrics = bundle.metrics if isinstance(bundle.metrics, dict) else None
    return TrainOutcome(out / BUNDLE_DIR, metrics, count_parameters(result.tensors), 0.0, 0, finished_before=True)


def _save_bundle(task: str, recipe: Recipe, adapter: AdapterConfig, bb: Backbone, labels: list[str],
                 result: TrainResult, out: Path, extra: dict[str, Any] | None) -> TrainOutcome:
    """Write ``out/bundle`` (replacing an older one) with its figures, and ``out/curves.png``."""
    metrics = None
    if result.metrics is not None:
        metrics = {**result.metrics, "skipped_train_clips": result.skipped, "train_seconds": result.seconds,
                   "steps": result.steps}
    trainable = count_parameters(result.tensors)
    figures = {}
    if plot_curves(out / METRICS_LOG, out / CURVES, title=f"{task} ({adapter.method})"):
        figures[CURVES] = (out / CURVES).read_bytes()
    if result.metrics is not None and result.metrics.get("confusion"):
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            png = plot_confusion(result.metrics["confusion"], labels, Path(tmp) / CONFUSION,
                                 title=f"{task}: validation confusion matrix (step {result.steps})")
            if png is not None:
                figures[CONFUSION] = png.read_bytes()
    bundle = Bundle(task=task, adapter=adapter, spec=recipe.task, backbone=backbone_info(bb), labels=labels,
                    tensors=result.tensors, metrics=metrics,
                    extra={"recipe": recipe.name, "train": recipe.train.to_dict(), "trainable_params": trainable,
                           **(extra or {})}, figures=figures)
    bundle_dir = out / BUNDLE_DIR
    if bundle_dir.exists():
        shutil.rmtree(bundle_dir)
    bundle.save(bundle_dir)
    return TrainOutcome(bundle_dir, metrics, trainable, result.seconds, result.skipped)


def evaluate_task(annotations: Path, *, ref: str | None = None, bundle_dir: Path | None = None,
                  registry: Registry | str | None = None, root: Path | None = None, device: str | None = None,
                  amp: bool = True, log: Callable[[str], None] = print) -> Evaluation:
    """Evaluate a trained adapter set over the clips of ``annotations`` (paths relative to ``root``, default the
    file's directory) with the task's own test views.

    The set is the registry version ``ref`` (TASK, TASK:VERSION or TASK@ALIAS; ``registry`` as in
    :func:`train_task`) or the bundle directory ``bundle_dir``. Its backbone is built from the bundle's spec
    and weights (half precision on CUDA with ``amp``) and must have the fingerprint the bundle was trained on."""
    from stadapter.training.evaluate import evaluate
    from stadapter.video.datasets import load_annotations

    if ref is not None and bundle_dir is None:
        parse_ref(ref)  # a malformed reference is refused before the registry is opened
        with opened(registry) as reg:
            bundle = reg.load_bundle(ref)
    elif bundle_dir is not None and ref is None:
        bundle = Bundle.load(bundle_dir)
    else:
        raise ConfigError("evaluate a registry ref or a bundle directory (one of the two)")
    dev = D.device_for(_requested_device(device))
    bb = prepare_backbone(bundle.backbone["spec"], bundle.backbone.get("weights"), dev, amp=amp)
    bundle.check_backbone(bb.fingerprint(), str(bb.spec))
    model = VideoViT(bb, bundle.adapter, bundle.spec.num_frames).eval()
    tensors = {k: v.to(dev) for k, v in bundle.tensors.items()}
    ann = load_annotations(annotations, split="val", root=root, classes=bundle.labels)
    src = ClipSource(ann.samples, bundle.spec, bb.image_size, bb.mean, bb.std)
    return Evaluation(bundle.task, len(ann.samples), evaluate(model, tensors, src, bundle.labels, log=log))
