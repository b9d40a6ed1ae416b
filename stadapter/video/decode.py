"""Frame-exact video decoding with PyAV.

Frame ``i`` of a clip is the i-th frame a plain sequential decode of its first video stream yields. Decoding
runs sequentially and stops after the last wanted frame (fastest and exact on every test clip). When the first
wanted frame lies far in (``seek_threshold``), the decoder seeks to a keyframe before it and names frames by
timestamp (pts -> index); that is used only when the stream's timestamps are regular (integral pts step per
frame, header duration = frames x step) and the decoded run after the seek is gap-free, else it falls back to
the sequential decode. Indices past the end are clamped to the last decoded frame (header and packet counts
can be one too high).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.error
import numpy as np
from av.container import InputContainer
from av.video.frame import VideoFrame
from av.video.reformatter import VideoReformatter
from av.video.stream import VideoStream

from stadapter.errors import DecodeError, InputError

log = logging.getLogger(__name__)

SEEK_THRESHOLD = 300  # seek only when the first wanted frame is further in than this
_AV_ERRORS = (av.error.FFmpegError, OSError, UnicodeDecodeError, ValueError, EOFError)


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int  # non-empty packets of the video stream (exact or one too high; decode clamps)
    fps: float
    width: int
    height: int
    duration: float  # seconds


def _reason(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return str(text).splitlines()[0]


def _open(path: str | Path) -> InputContainer:
    p = Path(path)
    if not p.exists():
        raise DecodeError(f"{p}: no such video file")
    if not p.is_file():
        raise DecodeError(f"{p}: not a file")
    if p.stat().st_size == 0:
        raise DecodeError(f"{p}: empty file (0 bytes)")
    try:
        container = av.open(str(p), metadata_errors="ignore")
    except _AV_ERRORS as e:
        raise DecodeError(f"{p}: cannot open as a video ({_reason(e)})") from e
    if not container.streams.video:
        container.close()
        raise DecodeError(f"{p}: has no video stream")
    return container


def probe(path: str | Path, count_packets: bool = True) -> VideoInfo:
    """Frame count, frame rate, size and duration. ``count_packets`` demuxes (no decoding, ~ms) to count the
    stream's non-empty packets, which is right where headers are wrong (e.g. AVIs with dropped frames)."""
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        n = int(stream.frames or 0)
        if count_packets or n <= 0:
            n = 0
            try:
                for packet in container.demux(stream):
                    n += packet.size > 0
            except _AV_ERRORS as e:  # a truncated file: count what is readable
                log.debug("%s: demux stopped after %d packets (%s)", path, n, _reason(e))
        if n <= 0:
            raise DecodeError(f"{path}: no video frames found")
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / 1e6
        else:
            duration = n / fps if fps else 0.0
        return VideoInfo(num_frames=n, fps=fps, width=stream.codec_context.width,
                         height=stream.codec_context.height, duration=duration)


Decoded = tuple[dict[int, np.ndarray], int, int | None]  # ({index: (H, W, 3)}, frames decoded, largest pts)


def _rgb(reformatter: VideoReformatter, frame: VideoFrame) -> np.ndarray:
    """(H, W, 3) uint8 RGB. One reformatter per clip keeps its swscale context across frames (``to_ndarray(
    format=...)`` builds one per frame: ~3 ms even for a 32 x 32 frame); the pixels are the same."""
    return reformatter.reformat(frame, format="rgb24").to_ndarray()


def _decode_sequential(path: Path, container: InputContainer, stream: VideoStream, wanted: list[int]) -> Decoded:
    """Decode from the start up to the last wanted frame: ({index: (H, W, 3)}, frames decoded, largest pts)."""
    target, stop = set(wanted), wanted[-1]
    rgb = VideoReformatter()
    out: dict[int, np.ndarray] = {}
    n, max_pts = 0, None
    last: VideoFrame | None = None
    try:
        for frame in container.decode(stream):
            if n in target:
                out[n] = _rgb(rgb, frame)
            if frame.pts is not None:
                max_pts = frame.pts if max_pts is None else max(max_pts, frame.pts)
            last, n = frame, n + 1
            if n > stop:
                break
    except _AV_ERRORS as e:
        raise DecodeError(f"{path}: decoding failed after {n} frames ({_reason(e)})") from e
    if last is None:
        raise DecodeError(f"{path}: no frame could be decoded")
    if n - 1 not in out and n <= stop:
        out[n - 1] = _rgb(rgb, last)  # clamp target for indices past the end
    return out, n, max_pts


def _check_not_truncated(path: Path, stream: VideoStream, max_pts: int | None, n: int, stop: int) -> None:
    """The stream ended before frame ``stop``: fine near the end (counts can be one too high), but a stream
    that stops well before the duration its header gives is truncated (threaded decoding hides the error)."""
    if max_pts is None or not stream.duration or not stream.time_base:
        return
    tb = float(stream.time_base)
    fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
    total = stream.duration * tb
    reached = (max_pts - (stream.start_time or 0)) * tb + 1 / fps
    if total - reached > max(3 / fps, 0.05 * total):
        raise DecodeError(f"{path}: the video stream ends at {reached:.2f}s of {total:.2f}s after {n} frames, "
                          f"before frame {stop} (truncated file?)")


def _pts_step(stream: VideoStream) -> int | None:
    """pts units per frame when the stream's timestamps are regular, else None."""
    if not stream.time_base or not stream.average_rate or not stream.frames or not stream.duration:
        return None
    step = 1 / (Fraction(stream.average_rate) * Fraction(stream.time_base))
    if step.denominator != 1 or step <= 0 or stream.frames * step != stream.duration:
        return None
    return int(step)


def _decode_seeking(container: InputContainer, stream: VideoStream, wanted: list[int]) -> Decoded | None:
    """Seek to a keyframe before the first wanted frame and index frames by pts. None when the timestamps do
    not give exact indices (the caller then decodes sequentially)."""
    step = _pts_step(stream)
    if step is None:
        return None
    start = stream.start_time or 0
    target, first, stop = set(wanted), wanted[0], wanted[-1]
    out: dict[int, np.ndarray] = {}
    prev: int | None = None
    last: VideoFrame | None = None
    rgb = VideoReformatter()
    try:
        container.seek(start + first * step, backward=True, any_frame=False, stream=stream)
        for frame in container.decode(stream):
            if frame.pts is None or (frame.pts - start) % step:
                return None
            i = (frame.pts - start) // step
            if (prev is None and i > first) or (prev is not None and i != prev + 1):
                return None  # landed after the wanted frame, or a gap / reordering: not exact
            if i in target:
                out[i] = _rgb(rgb, frame)
            prev, last = i, frame
            if i >= stop:
                break
    except _AV_ERRORS:
        return None
    if prev is None or last is None:
        return None
    if prev not in out and prev < stop:
        out[prev] = _rgb(rgb, last)
    return out, prev + 1, last.pts


def decode_frames(path: str | Path, indices: Sequence[int] | np.ndarray, seek_threshold: int = SEEK_THRESHOLD
                  ) -> np.ndarray:
    """The frames at ``indices`` (any order, repeats allowed) as (N, H, W, 3) uint8 RGB.

    Indices past the last decodable frame are clamped to it. Raises DecodeError naming the file when it is
    missing, empty, truncated before the wanted frames, or undecodable.
    """
    p = Path(path)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)  # (N,)
    if idx.size == 0:
        raise InputError("decode_frames needs at least one frame index")
    if (idx < 0).any():
        raise InputError(f"frame indices must be >= 0, got {idx.min()}")
    wanted = sorted(set(idx.tolist()))
    for seek in ([True] if wanted[0] > seek_threshold else []) + [False]:
        with _open(p) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if seek:
                result = _decode_seeking(container, stream, wanted)
                if result is None:
                    log.debug("%s: timestamps not exact after seeking; decoding sequentially", p)
                    continue
            else:
                result = _decode_sequential(p, container, stream, wanted)
            frames, n, max_pts = result
            if n <= wanted[-1]:
                _check_not_truncated(p, stream, max_pts, n, wanted[-1])
            break
    clamped = np.minimum(idx, n - 1)
    return np.stack([frames[int(i)] for i in clamped])  # (N, H, W, 3)


__all__ = ["VideoInfo", "probe", "decode_frames", "SEEK_THRESHOLD"]
