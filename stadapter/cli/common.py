"""Shared CLI pieces: the options several commands take (defined once, here), the console, and the wrapper
that turns user errors into one line + exit 1."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from stadapter.errors import StadapterError
from stadapter.video.decode import DecodeLimits

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

BackboneOpt = Annotated[str, typer.Option(
    "--backbone", "-b", envvar="STADAPTER_BACKBONE",
    help="Backbone spec: open_clip:MODEL, timm:MODEL (with ?key=value options), or an alias: tiny, small.")]
WeightsOpt = Annotated[str | None, typer.Option(
    "--weights", "-w",
    help="Backbone weights: 'none' (seeded random init), a local .safetensors/.bin/.pt file (bundles name it "
         "file:NAME with its fingerprint; this machine remembers where it was loaded from), or a pretrained tag "
         "(open_clip default 'openai', timm 'pretrained'; these download).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the human-readable output.")]
DbOpt = Annotated[str | None, typer.Option(
    "--db", envvar="STADAPTER_DB", show_default=False,
    help="Registry database: an SQLAlchemy URL or an SQLite file. Default: SQLite at $STADAPTER_HOME/registry.db.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N, or auto (CUDA when available).")]
VerifyOpt = Annotated[Literal["store", "always"], typer.Option(
    "--verify",
    help="store: trust the blob store (every file was hashed once, when it was registered or pulled; its sha256 "
         "is its name), check sizes and headers on a first load; always: hash every file again on each process's "
         "first load of a version.")]
MaxPixelsOpt = Annotated[int, typer.Option(
    "--max-pixels", min=1, help="Refuse clips whose frames have more pixels (width x height); checked from the "
                                "headers before decoding.")]
MaxFramesOpt = Annotated[int, typer.Option("--max-frames", min=1, help="Refuse clips with more frames.")]
MaxSecondsOpt = Annotated[float, typer.Option("--max-seconds", min=0.001, help="Refuse longer clips (seconds).")]
MaxDecodedMbOpt = Annotated[int, typer.Option(
    "--max-decoded-mb", min=1, help="MiB of decoded RGB frames one clip may keep in memory.")]


def decode_limits(max_pixels: int, max_frames: int, max_seconds: float, max_decoded_mb: int) -> DecodeLimits:
    """The decode limit options as DecodeLimits."""
    return DecodeLimits(max_pixels=max_pixels, max_frames=max_frames, max_seconds=max_seconds,
                        max_decoded_bytes=max_decoded_mb << 20)


def print_error(message: str) -> None:
    """One ``error: ...`` line on stderr (the message is text, never rich markup)."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def fail(message: str) -> None:
    print_error(message)
    raise typer.Exit(1)


def user_errors(fn: F) -> F:
    """Print StadapterError (and a clean interrupt) as one line and exit 1; bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except StadapterError as e:
            fail(str(e))
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None
        except OSError as e:
            if os.environ.get("STADAPTER_DEBUG"):
                raise
            fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))

    return wrapper  # type: ignore[return-value]
