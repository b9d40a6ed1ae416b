"""Frame-exact video decoding with PyAV.

Frame ``i`` of a clip is the i-th frame a plain sequential decode of its video stream (the first that is not a
cover picture) yields. Decoding runs sequentially and stops after the last wanted frame (fastest and exact on
every test clip). When the first wanted frame lies far in (``seek_threshold``), the decoder seeks to a keyframe
before it and names frames by timestamp (pts -> index); that is used only when the stream's timestamps are
regular (integral pts step per frame, header duration = frames x step) and the decoded run after the seek is
gap-free, else it falls back to the sequential decode. Indices past the end are clamped to the last decoded
frame (header and packet counts can be one too high).

Every read is bounded by :class:`DecodeLimits`. The stream headers are checked when the file is opened, before
any frame is decoded: only a video stream with a real video codec (never FFmpeg's text-art demuxers, which draw
any text file as a 640x400 "video", nor a still image unless ``allow_images``), frames of at most
``max_pixels``, at most ``max_frames`` frames and ``max_seconds``. The decoder itself is told ``max_pixels`` (it
refuses to allocate a bigger frame), and every decoded frame is checked again: a stream whose frames turn out
bigger, or longer, than its header said is stopped. A read keeps at most ``max_decoded_bytes`` of RGB frames;
callers that shrink frames pass ``reduce``, applied to each frame as soon as it is decoded, so a read never
holds more than one full-size RGB frame at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
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
Reduce = Callable[[np.ndarray], np.ndarray]  # one decoded (H, W, 3) uint8 frame -> what the read keeps of it
_PICTURE = av.stream.Disposition.attached_pic | av.stream.Disposition.still_image  # cover art, a still

# FFmpeg demuxers / decoders of text art: any text file opens as a "video" through them
TEXT_FORMATS = frozenset({"tty", "bin", "xbin", "adf", "idf"})
TEXT_CODECS = frozenset({"ansi", "bintext", "xbin", "idf"})
# still images and image sequences (a PNG renamed .mp4 opens as ``png_pipe``; any ``*_pipe`` is an image reader)
IMAGE_FORMATS = frozenset({"image2", "image2pipe", "gif", "apng", "webp", "ico", "pcx", "sgi", "sunrast",
                           "tga", "xbm", "xpm", "xwd", "pam", "pbm", "pgm", "ppm", "qoi", "dds", "exr", "psd"})
IMAGE_CODECS = frozenset({"png", "apng", "bmp", "gif", "tiff", "webp", "jpeg2000", "jpegls", "jpegxl", "pam",
                          "pbm", "pgm", "pgmyuv", "ppm", "pcx", "sgi", "sunrast", "targa", "xbm", "xpm", "xwd",
                          "qoi", "dds", "exr", "hdr", "psd", "ico", "photocd", "alias_pix", "brender_pix"})


@dataclass(frozen=True)
class DecodeLimits:
    """What one clip read may cost. The defaults fit a 24 GB machine serving the default batch with a few
    decodes at once (one 4096 x 4096 RGB frame is 48 MiB)."""

    max_pixels: int = 4096 * 4096  # width x height of one frame
    max_frames: int = 100_000  # frames in the video stream
    max_seconds: float = 3600.0  # duration of the video stream
    max_decoded_bytes: int = 2 << 30  # RGB bytes of the frames one read keeps (after ``reduce``)
    allow_images: bool = False  # accept a still image or an image sequence (PNG, JPEG, GIF, ...) as a clip

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_frames", "max_seconds", "max_decoded_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InputError(f"decode limit {name} must be a positive number, got {value!r}")


DEFAULT_LIMITS = DecodeLimits()


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


def _open(path: str | Path, limits: DecodeLimits) -> InputContainer:
    """The file opened, its first video stream's headers checked against ``limits`` (nothing decoded yet but
    what FFmpeg's stream probing decodes, which is told ``max_pixels`` too)."""
    p = Path(path)
    if not p.exists():
        raise DecodeError(f"{p}: no such video file")
    if not p.is_file():
        raise DecodeError(f"{p}: not a file")
    if p.stat().st_size == 0:
        raise DecodeError(f"{p}: empty file (0 bytes)")
    try:
        container = av.open(str(p), metadata_errors="ignore", options={"max_pixels": str(limits.max_pixels)})
    except _AV_ERRORS as e:
        raise DecodeError(f"{p}: cannot open as a video ({_reason(e)})") from e
    try:
        if not container.streams.video:
            raise DecodeError(f"{p}: has no video stream")
        _check_headers(p, container, limits)
    except BaseException:
        container.close()
        raise
    return container


def video_stream(container: InputContainer) -> VideoStream:
    """The clip's video stream: the first one that is not a cover picture (else the first)."""
    videos = container.streams.video
    return next((v for v in videos if not v.disposition & _PICTURE), videos[0])


def _check_kind(p: Path, container: InputContainer, stream: VideoStream, limits: DecodeLimits) -> None:
    """Refuse text read as video, and still images (or a cover picture alone) unless ``limits.allow_images``."""
    fmt, codec = container.format.name, stream.codec_context.name or "unknown"
    if fmt in TEXT_FORMATS or codec in TEXT_CODECS:
        raise DecodeError(f"{p}: not a video (FFmpeg reads it as text art: format {fmt}, codec {codec})")
    image = fmt in IMAGE_FORMATS or fmt.endswith("_pipe") or codec in IMAGE_CODECS or stream.disposition & _PICTURE
    if image and not limits.allow_images:
        raise DecodeError(f"{p}: not a video but a still image or image sequence (format {fmt}, codec {codec})")


def _header_duration(stream: VideoStream, container: InputContainer) -> float:
    """The stream's duration in seconds as its headers give it (0 when they do not)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / 1e6 if container.duration else 0.0


def _check_headers(p: Path, container: InputContainer, limits: DecodeLimits) -> None:
    """The first video stream's codec, frame size, frame count and duration against ``limits``."""
    stream = video_stream(container)
    _check_kind(p, container, stream, limits)
    ctx = stream.codec_context
    if ctx.width * ctx.height > limits.max_pixels:
        raise DecodeError(f"{p}: frames of {ctx.width}x{ctx.height} exceed the decode limit of "
                          f"{limits.max_pixels} pixels per frame (max_pixels)")
    if (stream.frames or 0) > limits.max_frames:
        raise DecodeError(f"{p}: {stream.frames} frames exceed the decode limit of {limits.max_frames} frames "
                          f"(max_frames)")
    seconds = _header_duration(stream, container)
    if seconds > limits.max_seconds:
        raise DecodeError(f"{p}: {seconds:.0f} s exceed the decode limit of {limits.max_seconds:g} s "
                          f"(max_seconds)")


def _too_many_frames(p: Path, limits: DecodeLimits) -> DecodeError:
    return DecodeError(f"{p}: more than {limits.max_frames} frames, the decode limit (max_frames)")


def probe(path: str | Path, count_packets: bool = True, limits: DecodeLimits = DEFAULT_LIMITS) -> VideoInfo:
    """Frame count, frame rate, size and duration. ``count_packets`` demuxes (no decoding, ~ms) to count the
    stream's non-empty packets, which is right where headers are wrong (e.g. AVIs with dropped frames); the
    count stops, and the clip is refused, past ``limits.max_frames``."""
    p = Path(path)
    with _open(p, limits) as container:
        stream = video_stream(container)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        n = int(stream.frames or 0)
        if count_packets or n <= 0:
            n = 0
            try:
                for packet in container.demux(stream):
                    n += packet.size > 0
                    if n > limits.max_frames:
                        raise _too_many_frames(p, limits)
            except _AV_ERRORS as e:  # a truncated file: count what is readable
                log.debug("%s: demux stopped after %d packets (%s)", path, n, _reason(e))
        if n <= 0:
            raise DecodeError(f"{path}: no video frames found")
        duration = _header_duration(stream, container) or (n / fps if fps else 0.0)
        return VideoInfo(num_frames=n, fps=fps, width=stream.codec_context.width,
                         height=stream.codec_context.height, duration=duration)


Decoded = tuple[dict[int, np.ndarray], int, int | None]  # ({index: kept frame}, frames decoded, largest pts)


class _FrameKeeper:
    """What a read keeps of its decoded frames, within its limits: every decoded frame's size is checked before
    it is converted; a kept frame becomes (H, W, 3) uint8 RGB, goes through ``reduce`` at once and counts
    against ``max_decoded_bytes``. One reformatter per clip keeps its swscale context across frames
    (``to_ndarray(format=...)`` builds one per frame: ~3 ms even for a 32 x 32 frame); the pixels are the same."""

    def __init__(self, path: Path, limits: DecodeLimits, reduce: Reduce | None) -> None:
        self.path, self.limits, self.reduce = path, limits, reduce
        self.rgb = VideoReformatter()
        self.kept_bytes = 0
        self.size: tuple[int, int] | None = None  # (width, height) of the first kept frame

    def check(self, frame: VideoFrame, decoded: int) -> None:
        """Stop a stream whose frames are bigger, or more, than the limits (whatever its header said)."""
        if frame.width * frame.height > self.limits.max_pixels:
            raise DecodeError(f"{self.path}: frame {decoded} is {frame.width}x{frame.height}, over the decode "
                              f"limit of {self.limits.max_pixels} pixels per frame (max_pixels)")
        if decoded >= self.limits.max_frames:
            raise _too_many_frames(self.path, self.limits)

    def keep(self, frame: VideoFrame) -> np.ndarray:
        """(H, W, 3) uint8 RGB through ``reduce``; a frame whose size differs from the first kept one (the stream
        changed resolution) is scaled to that size, so every kept frame has one shape."""
        if self.size is None:
            self.size = (frame.width, frame.height)
        scale = {} if self.size == (frame.width, frame.height) else {"width": self.size[0], "height": self.size[1]}
        kept = self.rgb.reformat(frame, format="rgb24", **scale).to_ndarray()  # (H, W, 3)
        if self.reduce is not None:
            kept = self.reduce(kept)
        self.kept_bytes += kept.nbytes
        if self.kept_bytes > self.limits.max_decoded_bytes:
            raise DecodeError(f"{self.path}: the frames asked for exceed the decode limit of "
                              f"{self.limits.max_decoded_bytes} bytes (max_decoded_bytes)")
        return kept


def _decode_sequential(path: Path, container: InputContainer, stream: VideoStream, wanted: list[int],
                       keeper: _FrameKeeper) -> Decoded:
    """Decode from the start up to the last wanted frame: ({index: kept frame}, frames decoded, largest pts)."""
    target, stop = set(wanted), wanted[-1]
    out: dict[int, np.ndarray] = {}
    n, max_pts = 0, None
    last: VideoFrame | None = None
    try:
        for frame in container.decode(stream):
            keeper.check(frame, n)
            if n in target:
                out[n] = keeper.keep(frame)
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
        out[n - 1] = keeper.keep(last)  # clamp target for indices past the end
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


def _decode_seeking(container: InputContainer, stream: VideoStream, wanted: list[int],
                    keeper: _FrameKeeper) -> Decoded | None:
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
    try:
        container.seek(start + first * step, backward=True, any_frame=False, stream=stream)
        for frame in container.decode(stream):
            if frame.pts is None or (frame.pts - start) % step:
                return None
            i = (frame.pts - start) // step
            keeper.check(frame, i)
            if (prev is None and i > first) or (prev is not None and i != prev + 1):
                return None  # landed after the wanted frame, or a gap / reordering: not exact
            if i in target:
                out[i] = keeper.keep(frame)
            prev, last = i, frame
            if i >= stop:
                break
    except _AV_ERRORS:
        return None
    if prev is None or last is None:
        return None
    if prev not in out and prev < stop:
        out[prev] = keeper.keep(last)
    return out, prev + 1, last.pts


def decode_frames(path: str | Path, indices: Sequence[int] | np.ndarray, seek_threshold: int = SEEK_THRESHOLD,
                  limits: DecodeLimits = DEFAULT_LIMITS, reduce: Reduce | None = None) -> np.ndarray:
    """The frames at ``indices`` (any order, repeats allowed) as (N, H, W, 3) uint8 RGB, each passed through
    ``reduce`` (e.g. a resize; it must give every frame the same shape) as soon as it is decoded.

    Indices past the last decodable frame are clamped to it. Raises DecodeError naming the file when it is
    missing, empty, truncated before the wanted frames, undecodable, or over ``limits``.
    """
    p = Path(path)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)  # (N,)
    if idx.size == 0:
        raise InputError("decode_frames needs at least one frame index")
    if (idx < 0).any():
        raise InputError(f"frame indices must be >= 0, got {idx.min()}")
    wanted = sorted(set(idx.tolist()))
    for seek in ([True] if wanted[0] > seek_threshold else []) + [False]:
        with _open(p, limits) as container:
            stream = video_stream(container)
            _check_output_bytes(p, stream, idx.size, limits, reduce)
            stream.thread_type = "AUTO"
            stream.codec_context.options = {"max_pixels": str(limits.max_pixels)}  # the decoder's own check
            keeper = _FrameKeeper(p, limits, reduce)
            if seek:
                result = _decode_seeking(container, stream, wanted, keeper)
                if result is None:
                    log.debug("%s: timestamps not exact after seeking; decoding sequentially", p)
                    continue
            else:
                result = _decode_sequential(p, container, stream, wanted, keeper)
            frames, n, max_pts = result
            if n <= wanted[-1]:
                _check_not_truncated(p, stream, max_pts, n, wanted[-1])
            break
    clamped = np.minimum(idx, n - 1)
    return np.stack([frames[int(i)] for i in clamped])  # (N, H, W, 3)


def _check_output_bytes(p: Path, stream: VideoStream, count: int, limits: DecodeLimits,
                        reduce: Reduce | None) -> None:
    """Refuse before decoding a read whose ``count`` full-size RGB frames (no ``reduce``) exceed
    ``max_decoded_bytes`` by the header's frame size."""
    if reduce is None and count * stream.codec_context.width * stream.codec_context.height * 3 > \
            limits.max_decoded_bytes:
        raise DecodeError(f"{p}: {count} frames of {stream.codec_context.width}x{stream.codec_context.height} "
                          f"exceed the decode limit of {limits.max_decoded_bytes} bytes (max_decoded_bytes)")


__all__ = ["VideoInfo", "DecodeLimits", "DEFAULT_LIMITS", "Reduce", "probe", "decode_frames", "video_stream",
           "SEEK_THRESHOLD"]
