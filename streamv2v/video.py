"""Video files in and out, one frame at a time, with PyAV.

A restyled video can be hours long and the stream only ever needs the current frame, so
frames are decoded, handed over and encoded one by one: memory stays flat for any length.
The output keeps what a viewer notices besides the pictures: the frame rate, the size,
the upright orientation and the input's sound.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from itertools import chain
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import ColorRange, Colorspace

from .errors import StreamV2VError
from .frames import to_uint8

TIME_SCALE = 90000  # ticks a second for frame times, as MPEG transport streams use
# A rate for the rare stream that declares none (raw elementary streams, some GIFs).
FALLBACK_FPS = Fraction(30)
AUDIO_BIT_RATE = 192_000
# Outputs are converted and tagged as BT.709 limited range: untagged video is read as BT.601
# or BT.709 depending on its size and player, which shifts colours in one of the two.
BT709 = 1  # AVCOL_PRI_BT709 = AVCOL_TRC_BT709 = AVCOL_SPC_BT709
# Frame colour tags swscale can convert from (its colour spaces share FFmpeg's numbers).
SWS_COLORSPACES = frozenset(int(c) for c in Colorspace)
YUV_RANGES = frozenset({int(ColorRange.MPEG), int(ColorRange.JPEG)})
# Encoders with a constant-quality mode: (default CRF, worst CRF). Lower is better and larger.
CRF = {"libx264": (18, 51), "libvpx-vp9": (31, 63)}
MPEG4_QSCALE = 2  # MPEG-4 Part 2 has no CRF; a fixed quantiser of 2 is near transparent
FFMPEG_LAMBDA_PER_QP = 118  # FF_QP2LAMBDA: turns a quantiser into libavcodec's "quality"


@dataclass(frozen=True)
class _Container:
    """How one output extension is written.

    ``remux`` lists the audio codecs copied as they are (None: whatever the muxer
    accepts); anything else is re-encoded with the first available ``audio`` encoder.
    MP4 and MOV get an explicit list because FFmpeg's muxers accept some codecs there
    (Vorbis in MP4, say) only as experimental, and fail when writing the header.
    """

    format: str
    video: tuple[str, ...]
    audio: tuple[str, ...]
    remux: frozenset[str] | None


_MP4_AUDIO = frozenset({"aac", "mp3", "ac3", "eac3", "alac", "opus"})
CONTAINERS = {
    ".mp4": _Container("mp4", ("libx264", "mpeg4"), ("aac",), _MP4_AUDIO),
    ".mov": _Container(
        "mov",
        ("libx264", "mpeg4"),
        ("aac",),
        _MP4_AUDIO - {"opus"} | {"pcm_s16le", "pcm_s16be", "pcm_s24le", "pcm_s24be"},
    ),
    ".mkv": _Container("matroska", ("libx264", "mpeg4"), ("aac",), None),
    ".webm": _Container("webm", ("libvpx-vp9",), ("libopus",), None),
}
EXTENSIONS = ", ".join(CONTAINERS)


def _encoder(name: str) -> av.Codec | None:
    try:
        return av.Codec(name, "w")
    except (av.error.FFmpegError, ValueError):
        return None


class VideoReader:
    """The frames of a video file as upright ``[H, W, 3]`` uint8 RGB arrays.

    Everything that can be wrong with the file (missing, not a video, no video stream,
    no frames) is found when it is opened, by decoding the first frame, so a caller can
    check its input before it spends time loading a model. Display rotation metadata
    (portrait clips from phones) is applied, so ``width``/``height`` are the upright size.
    Iterating again starts over from the first frame.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise StreamV2VError(f"input video {self.path} does not exist: check the path")
        if self.path.is_dir():
            raise StreamV2VError(f"input video {self.path} is a folder: give a video file")
        try:
            self._container = av.open(str(self.path))
        except (av.error.FFmpegError, OSError) as e:
            raise StreamV2VError(
                f"input video {self.path} is not a video FFmpeg can read ({_reason(e)}): "
                "give a video file such as .mp4, .mkv, .mov or .webm"
            ) from e
        try:
            if not self._container.streams.video:
                raise StreamV2VError(
                    f"input video {self.path} has no video stream (audio only?): "
                    "give a file that contains a video"
                )
            self._stream = self._container.streams.video[0]
            self._stream.thread_type = "AUTO"
            self._coded_size: tuple[int, int] | None = None  # set by the first frame
            self.times: list[Fraction] = []
            self._frames = self._decode()
            self._first: np.ndarray | None = next(self._frames, None)
            if self._first is None:
                raise StreamV2VError(
                    f"input video {self.path} has no video frames: give a video with at "
                    "least one frame"
                )
        except BaseException:
            self._container.close()
            raise
        self.height, self.width = self._first.shape[:2]
        self.fps = self._rate()
        self.frame_count = self._count_estimate()
        self.has_audio = bool(self._container.streams.audio)

    def _rate(self) -> Fraction:
        """Frames per second: the measured average, else what the stream declares."""
        stream = self._stream
        for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
            if rate:
                return Fraction(rate)
        return FALLBACK_FPS

    def _count_estimate(self) -> int | None:
        """The header's frame count, else duration x rate; only good for a progress bar."""
        stream = self._stream
        if stream.frames:
            return stream.frames
        if stream.duration and stream.time_base:
            seconds = stream.duration * stream.time_base
        elif self._container.duration:
            seconds = Fraction(self._container.duration, av.time_base)
        else:
            return None
        return max(1, round(seconds * self.fps))

    def _decode(self) -> Iterator[np.ndarray]:
        """Frames in display order; ``times`` gains each one's time from the first, which a
        variable-rate video (phones, screen and browser recordings) needs to keep its timing."""
        count = 0
        self.times = []
        start: Fraction | None = None
        try:
            for frame in self._container.decode(self._stream):
                if frame.pts is not None and frame.time_base:
                    time = frame.pts * frame.time_base
                    start = time if start is None else start
                    time -= start
                else:  # no timestamp: the next one at the stream's rate
                    time = self.times[-1] + 1 / self.fps if self.times else Fraction(0)
                if self.times and time <= self.times[-1]:  # repeated or out of order: keep order
                    time = self.times[-1] + Fraction(1, TIME_SCALE)
                self.times.append(time)
                if self._coded_size is None:
                    self._coded_size = (frame.width, frame.height)
                # Frames that change size mid-stream are scaled to the first one's size.
                width, height = self._coded_size
                rgb = frame.to_ndarray(format="rgb24", width=width, height=height, **_tags(frame))
                turns = round(frame.rotation / 90) % 4  # counter-clockwise, as displayed
                yield np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb
                count += 1
        except av.error.FFmpegError as e:
            raise StreamV2VError(
                f"input video {self.path} could not be decoded after {count} frames "
                f"({_reason(e)}): re-encode it, e.g. ffmpeg -i IN -c:v libx264 OUT.mp4"
            ) from e

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._first is not None:
            frames = chain([self._first], self._frames)
            self._first = None
        else:
            self._container.seek(0)
            frames = self._decode()
        yield from frames

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _AudioTrack:
    """The input's sound, moved into the output as the video is written.

    Packets go in as the video reaches their time, so the file is interleaved (audio
    next to the video it plays with) instead of all video followed by all audio, which
    would make the muxer buffer and players seek across the whole file.
    """

    def __init__(self, source: Path, output: av.container.OutputContainer, kind: _Container):
        self._input = av.open(str(source))
        self._source = self._input.streams.audio[0]
        # Our video starts at 0: shift the sound by the input video's start to keep sync.
        video = self._input.streams.video
        start = video[0].start_time if video else None
        self._offset = start * video[0].time_base if start is not None else Fraction(0)
        name = self._source.codec_context.name
        remux = kind.remux if kind.remux is not None else output.supported_codecs
        self.copied = name in remux
        if self.copied:
            self._target = output.add_stream_from_template(self._source)
        else:
            self._target = self._transcoder(output, kind, source)
        self._packets = self._input.demux(self._source)
        self._pending: av.Packet | None = None

    def _transcoder(
        self, output: av.container.OutputContainer, kind: _Container, source: Path
    ) -> av.AudioStream:
        encoder = next((c for c in map(_encoder, kind.audio) if c is not None), None)
        if encoder is None:
            raise StreamV2VError(
                f"the sound of {source} ({self._source.codec_context.name}) must be re-encoded "
                f"for {kind.format} but this PyAV build has no {'/'.join(kind.audio)} "
                "encoder: write .mkv instead"
            )
        rate = self._source.codec_context.sample_rate
        rates = encoder.audio_rates
        if rates and rate not in rates:
            rate = 48000 if 48000 in rates else max(rates)
        stream = output.add_stream(encoder.name, rate=rate)
        stream.layout = self._source.codec_context.layout
        stream.bit_rate = AUDIO_BIT_RATE
        return stream

    def _seconds(self, packet: av.Packet) -> Fraction:
        stamp = packet.pts if packet.pts is not None else packet.dts
        return stamp * packet.time_base - self._offset

    def _shift(self, stamp: int | None, time_base: Fraction) -> int | None:
        return None if stamp is None else stamp - round(self._offset / time_base)

    def write_until(self, output: av.container.OutputContainer, seconds: Fraction) -> None:
        """Mux the sound that starts before ``seconds`` into the output video's time."""
        while True:
            packet = self._pending if self._pending is not None else next(self._packets, None)
            self._pending = None
            if packet is None:
                return
            if packet.dts is not None and self._seconds(packet) >= seconds:
                self._pending = packet
                return
            if self.copied:
                if packet.dts is None:  # the empty packet that marks the end of the input
                    continue
                packet.pts = self._shift(packet.pts, packet.time_base)
                packet.dts = self._shift(packet.dts, packet.time_base)
                packet.stream = self._target
                output.mux(packet)
            else:
                for frame in packet.decode():
                    frame.pts = self._shift(frame.pts, frame.time_base)
                    output.mux(self._target.encode(frame))

    def finish(self, output: av.container.OutputContainer) -> None:
        if not self.copied:
            output.mux(self._target.encode(None))

    def close(self) -> None:
        self._input.close()


class VideoWriter:
    """Encode frames to a video file, with the sound of another file copied in.

    The extension picks the container: ``.mp4``, ``.mov`` and ``.mkv`` get H.264 (libx264;
    MPEG-4 Part 2 where the PyAV build lacks it), ``.webm`` gets VP9. H.264 in 4:2:0 needs an
    even width and height, so an odd-sized output is encoded in 4:4:4 (High 4:4:4 profile)
    to keep its exact size: FFmpeg-based players (VLC, mpv) play it, browsers and QuickTime
    do not; pick ``.webm``, whose VP9 keeps odd sizes in 4:2:0, for those.

    The sound of ``audio_from`` is copied packet for packet when the container takes its
    codec, else re-encoded (AAC; Opus for WebM), and is cut where the video ends. Frames are
    shown at the times ``write`` is given (``VideoReader.times``: a variable-rate video keeps
    its timing), else one after another at ``fps``.

    Nothing is created on disk until the first frame arrives, so a writer can be set up
    (and its path checked) before a long model load without leaving empty files behind.
    On an exception inside ``with`` the frames written so far are finished into a playable
    file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: Fraction | float,
        width: int,
        height: int,
        *,
        audio_from: str | os.PathLike | None = None,
        codec: str | None = None,
        crf: int | None = None,
    ) -> None:
        self.path = Path(path)
        _check_writable(self.path)  # first: a folder has no extension either
        self._kind = CONTAINERS.get(self.path.suffix.lower())
        if self._kind is None:
            raise StreamV2VError(
                f"output {self.path} has an unknown extension {self.path.suffix!r}: "
                f"use one of {EXTENSIONS}"
            )
        if not fps or fps <= 0:
            raise StreamV2VError(f"frame rate {fps} for output {self.path} must be positive")
        if width < 1 or height < 1:
            raise StreamV2VError(f"size {width}x{height} for output {self.path} must be positive")
        self.fps = Fraction(fps).limit_denominator(1_000_000)
        self.width, self.height = int(width), int(height)
        self._codec = self._pick_codec(codec)
        self._options = self._codec_options(crf)
        self._audio_from = None
        if audio_from is not None:
            self._audio_from = Path(audio_from)
            if self.path.exists() and self.path.samefile(self._audio_from):
                raise StreamV2VError(
                    f"output {self.path} is the input video: writing it would destroy the "
                    "input, give another output path"
                )
        self.frames_written = 0
        self._last_pts: int | None = None
        self._last_time: Fraction | None = None
        self._container: av.container.OutputContainer | None = None
        self._video: av.VideoStream | None = None
        self._audio: _AudioTrack | None = None
        self._closed = False

    def _pick_codec(self, codec: str | None) -> av.Codec:
        names = (codec,) if codec is not None else self._kind.video
        found = next((c for c in map(_encoder, names) if c is not None and c.type == "video"), None)
        if found is None:
            wanted = codec if codec is not None else "/".join(self._kind.video)
            raise StreamV2VError(
                f"this PyAV build has no {wanted} video encoder for output {self.path}: "
                f"see av.codecs_available, or use another extension ({EXTENSIONS})"
            )
        with av.open(io.BytesIO(), "w", format=self._kind.format) as probe:
            if found.name not in probe.supported_codecs:
                raise StreamV2VError(
                    f"output {self.path}: {self.path.suffix} files cannot hold {found.name} "
                    "video; pick another codec or extension"
                )
        return found

    def _codec_options(self, crf: int | None) -> dict[str, str]:
        name = self._codec.name
        if crf is not None:
            if name not in CRF:
                raise StreamV2VError(
                    f"crf applies to {'/'.join(CRF)}, not to the {name} encoder of "
                    f"output {self.path}: leave crf unset"
                )
            if not isinstance(crf, int) or not 0 <= crf <= CRF[name][1]:
                raise StreamV2VError(
                    f"crf {crf!r} for output {self.path} must be a whole number within "
                    f"0..{CRF[name][1]} for {name} (default {CRF[name][0]})"
                )
        if name == "libx264":
            # veryfast: encoding runs in step with the model, so it must stay far faster than
            # it (about 3x medium's speed for about 13% larger files at the same CRF).
            return {"crf": str(crf if crf is not None else CRF[name][0]), "preset": "veryfast"}
        if name == "libvpx-vp9":
            crf = crf if crf is not None else CRF[name][0]
            return {"crf": str(crf), "b": "0", "row-mt": "1", "deadline": "good", "cpu-used": "4"}
        if name == "mpeg4":
            quality = MPEG4_QSCALE * FFMPEG_LAMBDA_PER_QP
            return {"flags": "+qscale", "global_quality": str(quality)}
        return {}

    def _pix_fmt(self) -> str:
        formats = [f.name for f in self._codec.video_formats or ()]
        odd = self.width % 2 or self.height % 2
        if self._codec.name == "libx264" and odd:
            return "yuv444p"
        if not formats or "yuv420p" in formats:
            return "yuv420p"
        return formats[0]

    def _open(self) -> None:
        options = {"movflags": "+faststart"} if self._kind.format in ("mp4", "mov") else {}
        container = av.open(str(self.path), "w", format=self._kind.format, options=options)
        try:
            video = container.add_stream(self._codec.name, rate=self.fps, options=self._options)
            video.codec_context.time_base = self._time_base()
            video.width, video.height = self.width, self.height
            video.pix_fmt = self._pix_fmt()
            video.color_primaries = video.color_trc = video.colorspace = BT709
            video.color_range = ColorRange.MPEG
            audio = None
            if self._audio_from is not None:
                with av.open(str(self._audio_from)) as probe:
                    has_audio = bool(probe.streams.audio)
                if has_audio:
                    audio = _AudioTrack(self._audio_from, container, self._kind)
        except BaseException:
            container.close()
            self.path.unlink(missing_ok=True)
            raise
        self._container, self._video, self._audio = container, video, audio

    def _time_base(self) -> Fraction:
        """Ticks that hold every frame of the constant rate exactly (a multiple of its
        numerator) and variable-rate times to about 1/TIME_SCALE s. MPEG-4 Part 2 allows at
        most 65535 ticks a second: there the rate's own."""
        ticks = self.fps.numerator
        if self._codec.name != "mpeg4":
            ticks *= -(-TIME_SCALE // ticks)  # the smallest multiple >= TIME_SCALE
        return Fraction(1, ticks)

    def write(self, frame: np.ndarray | torch.Tensor, time: Fraction | None = None) -> None:
        """Append one frame: uint8 0..255 or float 0..1, ``[H, W, C]`` at the writer's size.

        ``time``: when it is shown, in seconds from the first frame (``VideoReader.times``),
        so a variable-rate video keeps its timing and its sync with the sound; without it,
        the next frame at ``fps``.
        """
        if self._closed:
            raise StreamV2VError(f"output {self.path} is already closed: open a new writer")
        rgb = to_uint8(frame, f"frame {self.frames_written} for {self.path}")
        if rgb.shape[:2] != (self.height, self.width):
            raise StreamV2VError(
                f"frame {self.frames_written} is {rgb.shape[1]}x{rgb.shape[0]} but output "
                f"{self.path} is {self.width}x{self.height}: give frames of one size"
            )
        try:
            if self._container is None:
                self._open()
            picture = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
                format=self._video.pix_fmt,
                dst_colorspace=Colorspace.ITU709,
                dst_color_range=ColorRange.MPEG,
            )
            time = self.frames_written / self.fps if time is None else Fraction(time)
            if self._last_time is not None and time <= self._last_time:
                raise StreamV2VError(
                    f"frame {self.frames_written} for {self.path} is timed at {float(time):.6f} "
                    "s, not after the frame before it: give increasing times"
                )
            pts = round(time / self._video.codec_context.time_base)
            if self._last_pts is not None:  # two times within one tick (MPEG-4 Part 2's clock)
                pts = max(pts, self._last_pts + 1)
            picture.pts, self._last_pts, self._last_time = pts, pts, time
            self._container.mux(self._video.encode(picture))
            self.frames_written += 1
            if self._audio is not None:  # the sound up to the end of this frame
                self._audio.write_until(self._container, time + 1 / self.fps)
        except (av.error.FFmpegError, OSError) as e:
            raise StreamV2VError(f"writing output {self.path} failed: {_reason(e)}") from e

    def close(self) -> None:
        """Finish the file; an error if no frame was ever written (no empty videos)."""
        self._finish()
        if self.frames_written == 0:
            raise StreamV2VError(
                f"no frames were written to output {self.path}: the input gave no frames"
            )

    def _finish(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._container is None:
            return
        try:
            self._container.mux(self._video.encode(None))
            if self._audio is not None:
                self._audio.finish(self._container)
            self._container.close()
        except (av.error.FFmpegError, OSError) as e:
            raise StreamV2VError(f"finishing output {self.path} failed: {_reason(e)}") from e
        finally:
            if self._audio is not None:
                self._audio.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._finish()


def _tags(frame: av.VideoFrame) -> dict[str, int]:
    """Conversion settings that honour the frame's own colour matrix and range.

    PyAV 18 does this by itself. PyAV 14 converts with BT.601 unless it is given the source
    matrix *and* a different destination one (RGB has no matrix, so that one is unused).
    Untagged frames get FFmpeg's assumption, BT.601.
    """
    source = frame.colorspace if frame.colorspace in SWS_COLORSPACES else Colorspace.ITU601
    other = Colorspace.ITU601 if source == Colorspace.ITU709 else Colorspace.ITU709
    tags = {"src_colorspace": source, "dst_colorspace": other}
    if frame.color_range in YUV_RANGES:
        tags.update(src_color_range=frame.color_range, dst_color_range=ColorRange.JPEG)
    return tags


def _check_writable(path: Path) -> None:
    if path.is_dir():
        raise StreamV2VError(f"output {path} is a folder: give a file name such as out.mp4")
    folder = path.parent
    if not folder.is_dir():
        raise StreamV2VError(f"output folder {folder} does not exist: create it first")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise StreamV2VError(f"output {path} is not writable: pick another path")


def _reason(error: BaseException) -> str:
    """FFmpeg's own words for an error, without the file name it repeats."""
    return getattr(error, "strerror", None) or str(error)
