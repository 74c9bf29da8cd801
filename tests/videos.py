"""Small synthetic video files, built with PyAV, for the tests that need a real container.

Tests must not depend on media downloaded from anywhere, and they need control over the
things the reader and writer must get right: frame count, frame rate, odd sizes, rotation
metadata, and audio in codecs that an output container may or may not accept.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from streamv2v.video import VideoReader

VIDEO_CODECS = {".mp4": "libx264", ".mkv": "libx264", ".mov": "libx264", ".webm": "libvpx-vp9"}
SINE_HZ = 440.0


def frame_pattern(index: int, width: int, height: int) -> np.ndarray:
    """Frame ``index`` of a moving gradient with a white block in the top-left corner.

    The gradient moves so consecutive frames differ; the block is asymmetric so a rotated
    or flipped frame is told apart from an upright one.
    """
    x = np.arange(width, dtype=np.float32)[None, :]
    y = np.arange(height, dtype=np.float32)[:, None]
    red = (x * 255 / max(width - 1, 1) + index * 16) % 256
    green = np.broadcast_to(y * 255 / max(height - 1, 1), (height, width))
    blue = np.full((height, width), (index * 40) % 256, dtype=np.float32)
    frame = np.stack([np.broadcast_to(red, (height, width)), green, blue], axis=-1)
    frame[: max(height // 4, 1), : max(width // 4, 1)] = 255
    return frame.astype(np.uint8)


def make_video(
    path: Path,
    *,
    frames: int = 12,
    width: int = 64,
    height: int = 48,
    fps: Fraction | int = 24,
    audio: str | None = None,
    audio_rate: int = 48000,
    audio_seconds: float | None = None,
    rotation: int = 0,
    times: list[float] | None = None,
) -> Path:
    """Write ``frames`` frames of :func:`frame_pattern` to ``path``; return ``path``.

    ``audio`` names an audio encoder (``"aac"``, ``"libopus"``, ``"vorbis"``...) for a
    stereo sine track ``audio_seconds`` long (default: as long as the video); ``rotation``
    stores a display rotation (counter-clockwise degrees) as phones do for portrait clips.
    ``frames=0`` with audio, in ``.mkv``, gives a video stream with no frames at all (MP4
    would drop the stream). ``times`` (seconds, one per frame) makes a variable-rate video
    whose declared rate is ``fps``, timed in milliseconds as phones and recorders write them.
    """
    path = Path(path)
    fps = Fraction(fps)
    with av.open(str(path), "w") as container:
        codec = VIDEO_CODECS[path.suffix]
        video = container.add_stream(codec, rate=fps)
        video.width, video.height = width, height
        if times is not None:
            video.codec_context.time_base = Fraction(1, 1000)
        odd = width % 2 or height % 2
        video.pix_fmt = "yuv444p" if codec == "libx264" and odd else "yuv420p"
        if rotation:
            video.set_display_rotation(rotation)
        sound = None
        if audio is not None:
            sound = container.add_stream(audio, rate=audio_rate, layout="stereo")
            # FFmpeg's own vorbis and opus encoders are marked experimental.
            sound.codec_context.options = {"strict": "experimental"}
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_pattern(index, width, height), "rgb24")
            frame.pts = index if times is None else round(times[index] * 1000)
            container.mux(video.encode(frame))
        container.mux(video.encode())
        if sound is not None:
            seconds = frames / fps if audio_seconds is None else audio_seconds
            if times is not None and audio_seconds is None:
                seconds = times[-1] + 1 / 30
            samples = int(round(audio_rate * seconds))
            t = np.arange(samples, dtype=np.float32) / audio_rate
            wave = (0.3 * np.sin(2 * np.pi * SINE_HZ * t)).astype(np.float32)
            chunk = 1024
            for start in range(0, samples, chunk):
                piece = np.stack([wave[start : start + chunk]] * 2)
                frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout="stereo")
                frame.sample_rate = audio_rate
                frame.pts = start
                container.mux(sound.encode(frame))
            container.mux(sound.encode())
    return path


def probe(path: Path) -> dict:
    """What a player would see in ``path``: video size, rate, frame count, audio length."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        width, height = video.codec_context.width, video.codec_context.height
        fps = video.average_rate
    with VideoReader(path) as reader:  # converts with each frame's colour tags
        frames = list(reader)
        times = [float(t) for t in reader.times]
    with av.open(str(path)) as container:
        audio_seconds = None
        audio_codec = None
        if container.streams.audio:
            stream = container.streams.audio[0]
            audio_codec = stream.codec_context.name
            samples = sum(f.samples for f in container.decode(stream))
            audio_seconds = samples / stream.codec_context.sample_rate
    return {
        "width": width,
        "height": height,
        "fps": fps,
        "frames": frames,
        "times": times,
        "audio_codec": audio_codec,
        "audio_seconds": audio_seconds,
    }
