"""The training loop: one adapter set trained on a frozen backbone, checkpointed, resumable, DDP-ready.

Determinism: the sample order of epoch e is a permutation seeded by (seed, e); every clip's augmentation is
seeded by (seed, epoch, index) in the dataset, and its head-dropout mask by (seed, epoch, index) here. So a
resumed run sees exactly the data and masks of an uninterrupted one, and N processes under DDP compute the
same global batch as one process.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from stadapter.config import AdapterConfig, TaskSpec, TrainConfig
from stadapter.errors import ConfigError, StadapterError
from stadapter.fsio import publish_file
from stadapter.model.video_vit import VideoViT
from stadapter.training import dist as D
from stadapter.training.data import ClipSource, IndexedBatch, loader_workers, make_loader, set_main_threads
from stadapter.training.evaluate import evaluate
from stadapter.training.monitor import Monitor
from stadapter.training.optim import lr_at, make_optimizer, scaled_lr, set_lr
from stadapter.training.rundir import CHECKPOINT, METRICS_LOG
from stadapter.video.datasets import SkipCounter


class AdapterParams(nn.Module):
    """An adapter set's tensors registered as parameters (so optimizers, state dicts and DDP see them) with the
    video model held outside the module tree, so DDP never touches the frozen backbone."""

    def __init__(self, model: VideoViT, tensors: dict[str, Tensor], seed: int) -> None:
        super().__init__()
        self.names = list(tensors)
        self.params = nn.ParameterList([nn.Parameter(t) for t in tensors.values()])
        self._model = [model]
        self.seed = seed

    def tensors(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.params, strict=True))

    def forward(self, clips: Tensor, sample_ids: Tensor, epoch: int) -> Tensor:
        model = self._model[0]
        t = self.tensors()
        feats = model.features(clips, t)  # (B, C) float32
        p = model.config.dropout
        if p > 0:
            masks = torch.stack([
                torch.bernoulli(torch.full((feats.shape[1],), 1 - p),
                                generator=torch.Generator().manual_seed(hash_seed(self.seed, epoch, int(i), 1)))
                for i in sample_ids]).to(feats.device)
            feats = feats * masks / (1 - p)
        return F.linear(feats, t["head.weight"], t["head.bias"])


def hash_seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


@dataclass
class TrainJob:
    task: str
    adapter: AdapterConfig
    spec: TaskSpec
    train: TrainConfig
    labels: list[str]
    train_source: ClipSource
    val_source: ClipSource | None
    out: Path
    max_steps: int | None = None  # stop early (tests, smoke runs)
    device: str | None = None
    log: Callable[[str], None] = print
    progress: bool = True  # a progress bar on a terminal (plain log lines otherwise)
    extra: dict[str, Any] = field(default_factory=dict)
    log_to: tuple[str, ...] = ()  # trackers: "tensorboard" (event files in out/tensorboard)


@dataclass
class TrainResult:
    tensors: dict[str, Tensor]
    metrics: dict[str, Any] | None
    steps: int
    seconds: float
    skipped: int
    finished_before: bool = False  # resumed a run whose checkpoint was already at its last step


def plan_steps(n_train: int, cfg: TrainConfig, world: int) -> tuple[int, int, int]:
    """(global batch, steps per epoch, total steps); refuses batches that do not split evenly."""
    batch = min(cfg.batch_size, n_train)
    if batch % (world * cfg.grad_accum):
        raise ConfigError(f"batch size {batch} must divide evenly over {world} process(es) x "
                          f"{cfg.grad_accum} accumulation step(s)")
    per_epoch = max(1, n_train // batch)
    return batch, per_epoch, max(1, math.ceil(cfg.epochs * per_epoch))


def epoch_batches(n: int, batch: int, per_epoch: int, seed: int, epoch: int) -> list[list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(hash_seed(seed, epoch, 0, 2))).tolist()
    return [order[s * batch:(s + 1) * batch] for s in range(per_epoch)]


def micro_batches(global_batch: list[int], info: D.DistInfo, accum: int) -> list[list[int]]:
    mine = global_batch[info.rank::info.world_size]
    size = len(mine) // accum
    return [mine[m * size:(m + 1) * size] for m in range(accum)]


def cpu_has_fast_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), read from ``cpuinfo`` (Linux)."""
    try:
        flags = cpuinfo.read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training steps: fp16 on CUDA with ``amp``, bf16 on CPU with ``cpu_bf16``, else
    None (fp32)."""
    if device.type == "cuda" and cfg.amp:
        return torch.float16
    if device.type == "cpu" and cfg.cpu_bf16:
        return torch.bfloat16
    return None


@dataclass(frozen=True)
class _Schedule:
    """The length of a run and its learning-rate curve."""

    batch: int  # global batch: clips per optimizer step, over every process and accumulation step
    per_epoch: int  # optimizer steps per epoch
    total: int  # optimizer steps in the run
    warmup: int  # warmup steps
    peak: float  # the learning rate after warmup

    @classmethod
    def of(cls, job: TrainJob, n_train: int, world: int) -> _Schedule:
        cfg = job.train
        batch, per_epoch, total = plan_steps(n_train, cfg, world)
        if job.max_steps is not None:
            total = min(total, job.max_steps)
        peak = scaled_lr(TrainConfig(**{**cfg.to_dict(), "batch_size": batch}))
        return cls(batch, per_epoch, total, int(round(cfg.warmup_epochs * per_epoch)), peak)

    def lr(self, step: int) -> float:
        return lr_at(step, self.total, self.warmup, self.peak)

    def eval_due(self, step: int, eval_every: float) -> bool:
        """After the last step, and after every ``eval_every``-th epoch (never mid-run when it is <= 0)."""
        end_of_epoch = step % self.per_epoch == 0
        return step == self.total or (
            end_of_epoch and eval_every > 0 and (step // self.per_epoch) % max(1, int(eval_every)) == 0)


FAR_BELOW = 4  # a batch of at most 1/FAR_BELOW of the recipe's is far below it: training warns


def plan_lines(job: TrainJob, sched: _Schedule, n_train: int, threads: int, workers: int) -> list[str]:
    """What a run is about to do, said before its first step; a warning when the batch is far below the
    recipe's, saying what ``--lr`` means and which rate the batch gets."""
    cfg, ref = job.train, job.train.lr_ref_batch
    epochs = sched.total / sched.per_epoch
    lines = [f"training {job.task}: {n_train} clips, batch {sched.batch}"
             + (f" (the recipe's: {ref})" if ref else "")
             + f", {sched.per_epoch} step(s) per epoch x {epochs:g} epoch(s) = {sched.total} steps "
             f"(warmup {sched.warmup}); peak learning rate {sched.peak:.3g} (--lr {cfg.lr_per_256:g} per 256 "
             f"clips); {threads} torch thread(s), {workers} decode worker(s)"]
    if ref and sched.batch * FAR_BELOW <= ref:
        linear = cfg.lr_per_256 * sched.batch / 256
        lines.append(f"warning: batch {sched.batch} is far below the recipe's {ref}. --lr is the learning rate "
                     f"per 256 clips, scaled linearly at and above the recipe's batch; a smaller batch keeps the "
                     f"recipe's rate at its own batch ({sched.peak:.3g}, not the linear {linear:.3g}). "
                     f"Few clips or steps may still need a larger --lr.")
    return lines


@dataclass
class _Stepper:
    """One optimizer step: gradients accumulated over ``accum`` micro-batches, DDP syncing on the last."""

    module: AdapterParams
    ddp: nn.Module  # ``module``, or its DistributedDataParallel wrapper
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    info: D.DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None
    accum: int
    batch: int  # global batch: each process's summed loss is divided by its share of it

    def step(self, micro: Iterator[IndexedBatch], epoch: int, lr: float, skips: SkipCounter) -> tuple[float, int]:
        """Runs the next ``accum`` micro-batches of ``micro`` -> (summed loss, clips) of this process."""
        set_lr(self.opt, lr)
        self.opt.zero_grad(set_to_none=True)
        loss_sum, n_clips = 0.0, 0
        for m in range(self.accum):
            ids, clips, labels, skipped = next(micro)
            skips.update(ok=len(ids), skipped=skipped)
            last = m == self.accum - 1
            ctx = self.ddp.no_sync() if isinstance(self.ddp, DistributedDataParallel) and not last else nullcontext()
            with ctx, torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                if len(ids):
                    logits = self.ddp(clips.to(self.device, non_blocking=True), ids, epoch)
                    loss = F.cross_entropy(logits.float(), labels.to(self.device), reduction="sum")
                else:  # every clip of this micro-batch failed to decode: keep DDP in step
                    loss = torch.stack([p.sum() * 0 for p in self.module.params]).sum()
                self.scaler.scale(loss / max(1, self.batch // self.info.world_size)).backward()
            loss_sum += float(loss.detach())
            n_clips += len(ids)
        self.scaler.step(self.opt)
        self.scaler.update()
        return loss_sum, n_clips


def run_training(job: TrainJob, model: VideoViT, info: D.DistInfo, resume: bool = False) -> TrainResult:
    """Train a fresh adapter set for ``job`` (``resume``: from the checkpoint in ``job.out`` when there is one)."""
    cfg = job.train
    device = next(model.backbone.parameters()).device
    job.out.mkdir(parents=True, exist_ok=True)
    n_train = len(job.train_source)
    sched = _Schedule.of(job, n_train, info.world_size)
    tensors = model.init_adapter_set(torch.Generator().manual_seed(cfg.seed))
    module = AdapterParams(model, {k: v.to(device) for k, v in tensors.items()}, cfg.seed)
    opt = make_optimizer(module.tensors(), cfg, sched.peak)
    amp_dtype = autocast_dtype(cfg, device)
    if amp_dtype is torch.bfloat16 and info.is_main and not cpu_has_fast_bf16():
        job.log("warning: --cpu-bf16: this CPU reports neither AVX512-BF16 nor AMX, so bf16 steps may be several "
                "times slower than fp32; drop --cpu-bf16 (or pass --no-cpu-bf16)")
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)  # bf16 needs no loss scaling
    ckpt_path, signature = job.out / CHECKPOINT, _signature(job, sched.batch, sched.total)
    step = _resume(job, module, opt, scaler, signature, info) if resume else 0
    if resume and step >= sched.total:
        return TrainResult(_final(module), None, step, 0.0, 0, finished_before=True)
    workers = loader_workers(job.train_source, cfg.num_workers)
    threads_before = torch.get_num_threads()  # restored at the end: a library caller keeps its own setting
    threads = set_main_threads(workers, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if info.is_main:
        for line in plan_lines(job, sched, n_train, threads, workers):
            job.log(line)
    ddp = (DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
           if info.enabled else module)
    stepper = _Stepper(module, ddp, opt, scaler, info, device, amp_dtype, cfg.grad_accum, sched.batch)
    skips = SkipCounter(warn=job.log if info.is_main else (lambda _: None))
    start, seen, metrics = time.monotonic(), 0, None
    bar = Monitor(sched.total, step, job.task, job.log, enabled=info.is_main, progress=job.progress,
                  log_to=job.log_to, out=job.out)
    try:
        with _metrics_log(job.out / METRICS_LOG, enabled=info.is_main) as write_metrics:
            model.train()
            while step < sched.total:
                epoch, in_epoch = divmod(step, sched.per_epoch)
                batches = epoch_batches(n_train, sched.batch, sched.per_epoch, cfg.seed, epoch)[in_epoch:]
                plan = [mb for gb in batches for mb in micro_batches(gb, info, cfg.grad_accum)]
                loader = make_loader(job.train_source, plan, epoch, train=True, seed=cfg.seed,
                                     workers=cfg.num_workers)
                it: Iterator[IndexedBatch] = iter(loader)
                for _ in batches:
                    lr = sched.lr(step)
                    loss_sum, n_clips = stepper.step(it, epoch, lr, skips)
                    step += 1
                    seen += n_clips * info.world_size
                    mean_loss, rate = loss_sum / max(1, n_clips), seen / max(1e-9, time.monotonic() - start)
                    bar.step(step, epoch, mean_loss, lr, rate)
                    write_metrics({"step": step, "epoch": epoch, "loss": mean_loss, "lr": lr, "clips_per_s": rate})
                    if step % cfg.checkpoint_every == 0 or step == sched.total:
                        if info.is_main:
                            _save_checkpoint(ckpt_path, module, opt, scaler, step, signature)
                        D.barrier(info)
                    if job.val_source is not None and sched.eval_due(step, cfg.eval_every):
                        if info.is_main:
                            metrics = _validate(job, job.val_source, model, module, step, write_metrics, bar)
                        D.barrier(info)
                        model.train()
                    if step >= sched.total:
                        break
                del it, loader
    finally:
        bar.close()
        torch.set_num_threads(threads_before)
    return TrainResult(_final(module), metrics, step, time.monotonic() - start, skips.skipped)


def _final(module: AdapterParams) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.tensors().items()}


MetricsWriter = Callable[[dict[str, Any]], None]


@contextmanager
def _metrics_log(path: Path, enabled: bool) -> Iterator[MetricsWriter]:
    """A writer of one JSON line per record, appended to ``path`` and flushed (a no-op when not enabled)."""
    if not enabled:
        yield lambda record: None
        return
    with open(path, "a") as f:

        def write(record: dict[str, Any]) -> None:
            f.write(json.dumps(record) + "\n")
            f.flush()

        yield write


def _validate(job: TrainJob, source: ClipSource, model: VideoViT, module: AdapterParams, step: int,
              write_metrics: MetricsWriter, bar: Monitor) -> dict[str, Any]:
    """Metrics of the adapter set so far on the validation clips, logged and shown on the progress bar."""
    metrics = evaluate(model, module.tensors(), source, job.labels, workers=job.train.num_workers)
    metrics["step"] = step
    write_metrics({"step": step, "split": "val", "top1": metrics["top1"], "top5": metrics["top5"]})
    bar.evaluation(step, metrics["top1"], metrics["top5"])
    return metrics


def _resume(job: TrainJob, module: AdapterParams, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            signature: dict[str, Any], info: D.DistInfo) -> int:
    """The step to go on from: the checkpoint's (its metrics log cut back to that step), else 0."""
    ckpt_path = job.out / CHECKPOINT
    if not ckpt_path.exists():
        job.log(f"no checkpoint in {job.out}; starting from scratch")
        _truncate_log(job.out / METRICS_LOG, 0)  # lines of a run killed before its first checkpoint
        return 0
    step = _load_checkpoint(ckpt_path, module, opt, scaler, signature)
    _truncate_log(job.out / METRICS_LOG, step)
    if info.is_main:
        job.log(f"resuming from step {step} of {signature['total']} ({ckpt_path})")
    return step


def _signature(job: TrainJob, batch: int, total: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed (settings that do not change the result left out)."""
    train = {k: v for k, v in job.train.to_dict().items()
             if k not in ("num_workers", "checkpoint_every", "cache_clips")}
    return {"task": job.task, "adapter": job.adapter.to_dict(), "spec": job.spec.to_dict(), "train": train,
            "batch": batch, "total": total, "num_train": len(job.train_source), "labels": job.labels}


def _save_checkpoint(path: Path, module: AdapterParams, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                     step: int, signature: dict[str, Any]) -> None:
    state = {"step": step, "names": module.names, "tensors": [p.detach().cpu() for p in module.params],
             "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "signature": json.dumps(signature)}
    publish_file(path, lambda out: torch.save(state, out))


def _load_checkpoint(path: Path, module: AdapterParams, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                     signature: dict[str, Any]) -> int:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any load failure means an unreadable checkpoint
        raise StadapterError(f"cannot read checkpoint {path}: {e}") from e
    saved = json.loads(state["signature"])
    if saved != json.loads(json.dumps(signature)):
        diff = sorted(k for k in signature if saved.get(k) != json.loads(json.dumps(signature)).get(k))
        raise StadapterError(f"checkpoint {path} belongs to a different run (differs in: {', '.join(diff)}); "
                             f"use another --out or drop --resume")
    if state["names"] != module.names:
        raise StadapterError(f"checkpoint {path} holds other tensors than this model")
    with torch.no_grad():
        for p, t in zip(module.params, state["tensors"], strict=True):
            p.copy_(t)
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    return int(state["step"])


def _truncate_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))
