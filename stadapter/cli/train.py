"""`stadapter train` and `stadapter eval`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from stadapter.cli.common import BackboneOpt, DbOpt, DeviceOpt, JsonOpt, WeightsOpt, console, err_console, user_errors
from stadapter.config import DEFAULT_BACKBONE, METHODS
from stadapter.errors import ConfigError


def _csv_ints(text: str | None, what: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None


def _log(msg: str) -> None:
    err_console.print(msg, highlight=False, soft_wrap=True, markup=False)  # one line each, never wrapped


@user_errors
def train(
    task: Annotated[str, typer.Option("--task", "-t", help="Task name. A preset name (k400, ssv2, diving48, ucf101, "
                                                           "hmdb51) also picks that recipe.")],
    train_annotations: Annotated[Path, typer.Option(
        "--train", help="Training annotations: a `path label` list, a path,label CSV, Kinetics CSV, SSv2 JSON, "
                        "UCF101/HMDB51 splits.")],
    val_annotations: Annotated[Path | None, typer.Option(
        "--val", help="Validation annotations (same formats).")] = None,
    root: Annotated[Path | None, typer.Option(help="Directory the clip paths are relative to "
                                                    "(default: the annotation file's directory).")] = None,
    recipe: Annotated[str | None, typer.Option(
        help="Recipe preset (default: the task name if it is one, else custom).")] = None,
    backbone: BackboneOpt = DEFAULT_BACKBONE,
    weights: WeightsOpt = None,
    method: Annotated[str, typer.Option(help=f"{', '.join(METHODS)}")] = "st-adapter",
    frames: Annotated[int | None, typer.Option(help="Frames per clip (default: the recipe's).")] = None,
    width: Annotated[int | None, typer.Option(help="Adapter bottleneck width r.")] = None,
    positions: Annotated[str | None, typer.Option(help="Adapter positions: attn, mlp or attn,mlp.")] = None,
    kernel: Annotated[str | None, typer.Option(help="Depth-wise conv kernel kT,kH,kW (default 3,1,1).")] = None,
    activation: Annotated[str | None, typer.Option(
        help="Adapter activation: none (official code), gelu (Eq. 2).")] = None,
    pool: Annotated[str | None, typer.Option(help="cls (the paper) or patch-mean.")] = None,
    epochs: Annotated[float | None, typer.Option(help="Training epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Clips per optimizer step over all processes.")] = None,
    lr: Annotated[float | None, typer.Option(
        help="Learning rate per 256 clips (default 1e-3): scaled linearly to batches at and above the recipe's "
             "batch (the paper's rule); a smaller batch keeps the recipe's rate at its own batch. Training prints "
             "the rate it uses.")] = None,
    warmup_epochs: Annotated[float | None, typer.Option(help="Linear warmup epochs.")] = None,
    conv_lr_mult: Annotated[float | None, typer.Option(
        help="Learning-rate multiplier for the depth-wise conv.")] = None,
    head_lr_mult: Annotated[float | None, typer.Option(
        help="Learning-rate multiplier for the classifier head.")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Gradient accumulation steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Save a checkpoint every N steps.")] = None,
    num_workers: Annotated[int | None, typer.Option(help="Data-loading worker processes.")] = None,
    cache_clips: Annotated[bool | None, typer.Option("--cache-clips/--no-cache-clips",
                                                     help="Keep decoded clips in memory across epochs (small "
                                                          "datasets; loads in the training process).")] = None,
    flip: Annotated[bool | None, typer.Option("--flip/--no-flip", help="Horizontal flip in training.")] = None,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="Half-precision backbone on CUDA.")] = None,
    cpu_bf16: Annotated[bool | None, typer.Option("--cpu-bf16/--no-cpu-bf16",
                                                  help="bfloat16 autocast when training on CPU (faster on CPUs "
                                                       "with AVX512-BF16 or AMX; adapters, head and optimizer "
                                                       "stay fp32).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (checkpoint, metrics, bundle with curves). "
                                                  "Default: runs/TASK. One that holds a run needs --resume or "
                                                  "--overwrite.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its checkpoint (a finished run: "
                                              "nothing is trained or registered unless --register).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start again in an --out that holds a run (deletes its "
                                                 "checkpoint, metrics, bundle).")] = False,
    log_to: Annotated[list[str] | None, typer.Option(
        "--log-to", metavar="TRACKER", help="Also log to: tensorboard (event files in OUT/tensorboard; pip "
                                            "install 'stadapter\\[tensorboard]'). Repeatable.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")] = None,
    device: DeviceOpt = "auto",
    register: Annotated[bool | None, typer.Option(
        "--register/--no-register", help="Register the bundle in the registry (default: a newly trained one; "
                                         "a finished run resumed only with --register).")] = None,
    db: DbOpt = None,
) -> None:
    """Train an adapter set for a task and register the resulting bundle.

    Works the same under torchrun (DDP; gloo on CPU, nccl on GPU), run as a module:

    torchrun --nproc-per-node 2 -m stadapter train --task ... --train ...

    (`torchrun ... stadapter train` fails with "can't open file": torchrun runs a Python file or module.)
    """
    from stadapter.registry.api import check_name
    from stadapter.training.api import outcome_lines, recipe_from_options, train_task
    from stadapter.video.datasets import load_annotations

    check_name(task, "task")  # before any work: the run folder runs/TASK must stay under runs/
    r = recipe_from_options(
        task, recipe, dict(method=method, width=width, kernel=_csv_ints(kernel, "--kernel"), activation=activation,
                           positions=tuple(positions.split(",")) if positions else None, pool=pool),
        dict(num_frames=frames, flip=flip),
        dict(epochs=epochs, batch_size=batch_size, lr_per_256=lr, warmup_epochs=warmup_epochs, seed=seed,
             conv_lr_mult=conv_lr_mult, head_lr_mult=head_lr_mult, grad_accum=grad_accum, amp=amp,
             checkpoint_every=checkpoint_every, num_workers=num_workers, cpu_bf16=cpu_bf16, cache_clips=cache_clips))
    tr = load_annotations(train_annotations, split="train", root=root)
    va = load_annotations(val_annotations, split="val", root=root, classes=tr.classes) if val_annotations else None
    outcome = train_task(task, r, tr.samples, tr.classes, va.samples if va else None, backbone, weights,
                         out or Path("runs") / task, resume=resume, overwrite=overwrite, max_steps=max_steps,
                         device=device, log=_log, log_to=tuple(log_to or ()),
                         extra={"data": {"train": str(train_annotations),
                                         "val": str(val_annotations) if val_annotations else None,
                                         "num_train": len(tr.samples)}},
                         register=register, registry=db, data=str(train_annotations))
    for line in outcome_lines(task, r.adapter.method, outcome):
        console.print(line, highlight=False, soft_wrap=True, markup=False)


@user_errors
def evaluate_cmd(
    task: Annotated[str, typer.Option("--task", "-t", help="TASK, TASK:VERSION or TASK@ALIAS in the registry.")],
    val_annotations: Annotated[Path, typer.Option("--val", help="Evaluation annotations.")],
    root: Annotated[Path | None, typer.Option(help="Directory the clip paths are relative to.")] = None,
    bundle: Annotated[Path | None, typer.Option(
        help="Evaluate this bundle directory instead of a registry entry.")] = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    db: DbOpt = None,
) -> None:
    """Evaluate a trained task with its own test views: top-1/top-5, per-class accuracy, confusion matrix."""
    from stadapter.training.api import evaluate_task

    result = evaluate_task(val_annotations, ref=task if bundle is None else None, bundle_dir=bundle, registry=db,
                           root=root, device=device, log=_log)
    metrics = result.metrics
    if as_json:
        typer.echo(json.dumps(metrics))
        return
    table = Table(title=f"{result.task} on {result.clips} clips")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, acc in metrics["per_class"].items():
        table.add_row(name, "-" if acc is None else f"{100 * acc:.1f}%")
    console.print(table)
    console.print(f"top-1 {100 * metrics['top1']:.2f}%  top-5 {100 * metrics['top5']:.2f}%  "
                  f"({metrics['skipped_clips']} skipped)")
