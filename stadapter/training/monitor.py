"""What a training run tells its user while it runs: a progress bar on a terminal, plain log lines elsewhere,
and TensorBoard event files on request.

- On a terminal (the console's ``is_terminal``): a rich progress line that fits 80 columns.
- Otherwise (a log file, a batch job, ``progress=False``): one plain line every ``every`` steps and after the
  last, and one per evaluation, through the run's ``log`` function.
- ``tensorboard``: event files in ``OUT/tensorboard`` (scalars train/loss, train/lr, train/clips_per_s,
  val/top1, val/top5), written with ``torch.utils.tensorboard`` (the ``tensorboard`` extra).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stadapter.errors import ConfigError
from stadapter.training.rundir import TENSORBOARD_DIR

if TYPE_CHECKING:
    from rich.console import Console

LOG_TO = ("tensorboard",)


def plain_every(total: int) -> int:
    """Steps between plain log lines: about 20 lines a run, at least every 50 steps, at most every step."""
    return max(1, min(50, total // 20))


def _eta(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Monitor:
    """Progress of one run on the main rank (quiet when not ``enabled``)."""

    def __init__(self, total: int, done: int, label: str, log: Callable[[str], None], *, enabled: bool = True,
                 progress: bool = True, console: Console | None = None, log_to: tuple[str, ...] = (),
                 out: Path | None = None) -> None:
        self.total, self.log, self.enabled = total, log, enabled
        self.every = plain_every(total)
        self.start, self.start_step = time.monotonic(), done
        self.bar: _Bar | None = None
        self.writer: Any = None
        if not enabled:
            return
        if progress:
            from rich.console import Console

            console = console or Console(stderr=True)
            if console.is_terminal:
                self.bar = _Bar(total, done, label, console)
        if "tensorboard" in log_to and out is not None:
            self.writer = tensorboard_writer(out / TENSORBOARD_DIR)

    def step(self, step: int, epoch: int, loss: float, lr: float, rate: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.advance(loss, lr, rate)
        elif step % self.every == 0 or step == self.total:
            left = (self.total - step) * (time.monotonic() - self.start) / max(1, step - self.start_step)
            self.log(f"step {step}/{self.total}  epoch {epoch + 1}  loss {loss:.4f}  lr {lr:.2e}  "
                     f"{rate:.1f} clips/s  eta {_eta(left)}")
        if self.writer is not None:
            for key, value in (("train/loss", loss), ("train/lr", lr), ("train/clips_per_s", rate)):
                self.writer.add_scalar(key, value, step)

    def evaluation(self, step: int, top1: float, top5: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.note(f"val {top1:.3f}")
        else:
            self.log(f"step {step}/{self.total}  validation top-1 {top1:.3f}  top-5 {top5:.3f}")
        if self.writer is not None:
            self.writer.add_scalar("val/top1", top1, step)
            self.writer.add_scalar("val/top5", top5, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def tensorboard_writer(directory: Path) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` into ``directory``; ConfigError when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--log-to tensorboard needs the tensorboard package: "
                          "pip install tensorboard") from None
    return SummaryWriter(log_dir=str(directory))


def check_log_to(names: tuple[str, ...]) -> tuple[str, ...]:
    """``names`` when each is a known tracker (and its package is installed); ConfigError otherwise."""
    unknown = [n for n in names if n not in LOG_TO]
    if unknown:
        raise ConfigError(f"unknown --log-to {', '.join(unknown)}; choose {', '.join(LOG_TO)}")
    if "tensorboard" in names:
        try:
            import tensorboard  # type: ignore[import-untyped]  # noqa: F401
        except ImportError:
            raise ConfigError("--log-to tensorboard needs the tensorboard package: "
                              "pip install tensorboard") from None
    return names


class _Bar:
    """A rich progress line within 80 columns: ``NAME ━━━━ 30/120 loss 1.6081 lr 2.5e-04 12/s val 0.750 0:01:02``
    (clips per second; the task name cut to 10 characters)."""

    def __init__(self, total: int, done: int, label: str, console: Console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        name = label if len(label) <= 10 else label[:9] + "~"
        self.p = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=8), MofNCompleteColumn(),
                          TextColumn("loss {task.fields[loss]} lr {task.fields[lr]} {task.fields[rate]}/s"
                                     "{task.fields[note]}"),
                          TimeRemainingColumn(), console=console, transient=False)
        self.p.start()
        self.t = self.p.add_task(name, total=total, completed=done, loss="-", lr="-", rate="-", note="")

    def advance(self, loss: float, lr: float, rate: float) -> None:
        self.p.update(self.t, advance=1, loss=f"{loss:.4f}", lr=f"{lr:.1e}", rate=f"{rate:.0f}")

    def note(self, text: str) -> None:
        self.p.update(self.t, note=f" {text}")

    def close(self) -> None:
        self.p.stop()


__all__ = ["LOG_TO", "TENSORBOARD_DIR", "Monitor", "check_log_to", "plain_every", "tensorboard_writer"]
