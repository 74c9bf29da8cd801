"""Reading and writing real video files: sizes, rates, sound and the errors users hit."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from videos import frame_pattern, make_video, probe

from streamv2v.errors import StreamV2VError
from streamv2v.video import VideoReader, VideoWriter

LOSSY = 8  # mean absolute error (of 255) a lossy round trip of the test pattern stays under


def _copy(src, dst, **writer_args):
    with (
        VideoReader(src) as reader,
        VideoWriter(
            dst, reader.fps, reader.width, reader.height, audio_from=src, **writer_args
        ) as writer,
    ):
        for frame in reader:
            writer.write(frame)
    return writer


def _close_to_pattern(frames, width, height):
    expected = np.stack([frame_pattern(i, width, height) for i in range(len(frames))])
    return np.abs(np.stack(frames).astype(int) - expected).mean() < LOSSY


def test_reader_reports_the_video_and_yields_its_frames(tmp_path):
    path = make_video(tmp_path / "in.mp4", frames=12, width=64, height=48, audio="aac")
    with VideoReader(path) as reader:
        assert (reader.width, reader.height) == (64, 48)
        assert reader.fps == 24
        assert reader.frame_count == 12
        assert reader.has_audio
        assert reader.path == path
        frames = list(reader)
        again = list(reader)  # a second pass starts over
    assert len(frames) == len(again) == 12
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in frames)
    assert _close_to_pattern(frames, 64, 48)
    assert np.array_equal(frames[5], again[5])


def test_round_trip_keeps_frames_rate_size_and_sound(tmp_path):
    src = make_video(tmp_path / "in.mp4", frames=12, audio="aac")
    writer = _copy(src, tmp_path / "out.mp4")
    assert writer.frames_written == 12
    out, ref = probe(tmp_path / "out.mp4"), probe(src)
    assert (out["width"], out["height"], out["fps"]) == (64, 48, 24)
    assert len(out["frames"]) == 12
    assert _close_to_pattern(out["frames"], 64, 48)
    assert out["audio_codec"] == "aac"
    assert out["audio_seconds"] == pytest.approx(ref["audio_seconds"], abs=0.03)


@pytest.mark.parametrize(
    ("source", "sound", "target", "expected"),
    [
        ("in.mp4", "aac", "out.mkv", "aac"),  # copied
        ("in.mp4", "aac", "out.mov", "aac"),  # copied
        ("in.mp4", "aac", "out.webm", "opus"),  # WebM takes no AAC: re-encoded
        ("in.webm", "libopus", "out.mp4", "opus"),  # copied
        ("in.mkv", "vorbis", "out.mp4", "aac"),  # Vorbis in MP4 is experimental: re-encoded
        ("in.mkv", "vorbis", "out.mov", "aac"),  # MOV takes no Vorbis: re-encoded
    ],
)
def test_sound_is_copied_or_reencoded_to_fit_the_container(
    tmp_path, source, sound, target, expected
):
    src = make_video(tmp_path / source, frames=12, audio=sound)
    _copy(src, tmp_path / target)
    out = probe(tmp_path / target)
    assert len(out["frames"]) == 12
    assert out["fps"] == 24
    assert out["audio_codec"] == expected
    assert out["audio_seconds"] == pytest.approx(0.5, abs=0.05)


def test_ntsc_rate_and_duration_are_kept(tmp_path):
    rate = Fraction(30000, 1001)
    src = make_video(tmp_path / "in.mp4", frames=30, fps=rate, audio="aac")
    _copy(src, tmp_path / "out.mp4")
    with av.open(str(tmp_path / "out.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == rate
        assert stream.frames == 30
        assert float(stream.duration * stream.time_base) == pytest.approx(30 / rate, abs=1e-3)


def test_sound_longer_than_the_video_is_cut_where_the_video_ends(tmp_path):
    src = make_video(tmp_path / "in.mp4", frames=12, audio="aac", audio_seconds=3.0)
    _copy(src, tmp_path / "out.mp4")
    assert probe(tmp_path / "out.mp4")["audio_seconds"] == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize(("target", "pix_fmt"), [("out.mp4", "yuv444p"), ("out.webm", "yuv420p")])
def test_odd_sizes_are_kept_exactly(tmp_path, target, pix_fmt):
    src = make_video(tmp_path / "in.mkv", frames=6, width=65, height=49)
    _copy(src, tmp_path / target)
    out = probe(tmp_path / target)
    assert (out["width"], out["height"]) == (65, 49)
    assert _close_to_pattern(out["frames"], 65, 49)
    with av.open(str(tmp_path / target)) as container:
        assert container.streams.video[0].codec_context.pix_fmt == pix_fmt


def test_even_sizes_use_widely_playable_yuv420p_tagged_bt709(tmp_path):
    src = make_video(tmp_path / "in.mp4", frames=3)
    _copy(src, tmp_path / "out.mp4")
    with av.open(str(tmp_path / "out.mp4")) as container:
        codec = container.streams.video[0].codec_context
        assert (codec.name, codec.pix_fmt) == ("h264", "yuv420p")
        bt709, limited = 1, 1  # AVCOL_SPC_BT709 (= _PRI_, _TRC_), AVCOL_RANGE_MPEG
        assert (codec.colorspace, codec.color_primaries, codec.color_trc) == (bt709,) * 3
        assert codec.color_range == limited


def test_colours_survive_the_round_trip(tmp_path):
    orange = np.full((48, 64, 3), (200, 60, 30), np.uint8)
    with VideoWriter(tmp_path / "out.mp4", 24, 64, 48) as writer:
        writer.write(orange)
    with VideoReader(tmp_path / "out.mp4") as reader:
        assert np.abs(next(iter(reader)).astype(int) - orange).max() <= 3


@pytest.mark.skipif(
    not hasattr(av.video.stream.VideoStream, "set_display_rotation"),
    reason="this PyAV cannot write rotation metadata to make the test video",
)
def test_phone_rotation_is_applied(tmp_path):
    src = make_video(tmp_path / "in.mp4", frames=3, width=64, height=48, rotation=90)
    with VideoReader(src) as reader:
        assert (reader.width, reader.height) == (48, 64)
        frame = next(iter(reader))
    # Turned a quarter counter-clockwise, the white top-left block is at the bottom left.
    assert frame[-4:, :4].min() > 200
    assert frame[:4, :4].min() < 100  # the top right, which is not white


def test_writer_takes_float_tensors_and_mpeg4(tmp_path):
    path = tmp_path / "out.mkv"
    with VideoWriter(path, 12, 64, 48, codec="mpeg4") as writer:
        for i in range(4):
            writer.write(torch.from_numpy(frame_pattern(i, 64, 48)).float() / 255)
    out = probe(path)
    assert len(out["frames"]) == 4 and out["fps"] == 12 and out["audio_codec"] is None
    assert _close_to_pattern(out["frames"], 64, 48)


def test_nothing_is_created_before_the_first_frame(tmp_path):
    path = tmp_path / "out.mp4"
    writer = VideoWriter(path, 24, 64, 48)
    assert not path.exists()
    with pytest.raises(StreamV2VError, match="no frames were written"):
        writer.close()
    assert not path.exists()


def test_an_interrupted_write_leaves_a_playable_file(tmp_path):
    src = make_video(tmp_path / "in.mp4", frames=12, audio="aac")
    path = tmp_path / "out.mp4"
    with (
        pytest.raises(KeyboardInterrupt),
        VideoReader(src) as reader,
        VideoWriter(path, reader.fps, 64, 48, audio_from=src) as writer,
    ):
        for index, frame in enumerate(reader):
            if index == 6:
                raise KeyboardInterrupt
            writer.write(frame)
    out = probe(path)
    assert len(out["frames"]) == 6
    assert out["audio_seconds"] == pytest.approx(0.25, abs=0.05)


def test_frames_of_the_wrong_size_are_refused(tmp_path):
    with VideoWriter(tmp_path / "out.mp4", 24, 64, 48) as writer:
        writer.write(np.zeros((48, 64, 3), np.uint8))
        with pytest.raises(StreamV2VError, match="32x32 but output .* is 64x48"):
            writer.write(np.zeros((32, 32, 3), np.uint8))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.mp4", "does not exist"),
        (lambda d: d, "is a folder"),
        (lambda d: _text(d / "notes.mp4"), "is not a video FFmpeg can read"),
        (lambda d: _audio_only(d / "sound.m4a"), "has no video stream"),
        (
            lambda d: make_video(d / "empty.mkv", frames=0, audio="aac", audio_seconds=0.5),
            "has no video frames",
        ),
    ],
    ids=["missing", "folder", "text", "audio-only", "no-frames"],
)
def test_bad_inputs_are_explained(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(StreamV2VError, match=message) as error:
        VideoReader(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("out.avi", {}, "unknown extension '.avi': use one of .mp4, .mov, .mkv, .webm"),
        ("nowhere/out.mp4", {}, "folder .* does not exist"),
        ("folder.mp4", {}, "is a folder"),
        ("folder", {}, "is a folder: give a file name such as out.mp4"),
        ("out.mp4", {"codec": "no-such-codec"}, "no no-such-codec video encoder"),
        ("out.mp4", {"codec": "aac"}, "no aac video encoder"),
        ("out.webm", {"codec": "mpeg4"}, ".webm files cannot hold mpeg4 video"),
        ("out.mp4", {"codec": "mpeg4", "crf": 20}, "crf applies to libx264/libvpx-vp9"),
        ("out.mp4", {"fps": 0}, "frame rate 0 .* must be positive"),
    ],
)
def test_bad_outputs_are_explained(tmp_path, name, kwargs, message):
    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "folder").mkdir()
    args = {"fps": 24, **kwargs}
    with pytest.raises(StreamV2VError, match=message):
        VideoWriter(tmp_path / name, args.pop("fps"), 64, 48, **args)


def test_writing_over_the_input_is_refused(tmp_path):
    src = make_video(tmp_path / "in.mp4", frames=2)
    with pytest.raises(StreamV2VError, match="is the input video"):
        VideoWriter(tmp_path / "." / "in.mp4", 24, 64, 48, audio_from=src)
    assert len(probe(src)["frames"]) == 2


def _text(path):
    path.write_text("not a video\n" * 100)
    return path


def _audio_only(path):
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=48000, layout="mono")
        for start in range(0, 4800, 1024):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = 48000, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def test_frame_times_keep_order_on_a_coarse_clock_and_must_increase(tmp_path):
    """MPEG-4 Part 2 counts at the rate itself: two times within one of its ticks still give
    two frames, in order; a time that goes back is a mistake and is named."""
    frame = np.zeros((48, 64, 3), np.uint8)
    with VideoWriter(tmp_path / "out.mp4", 30, 64, 48, codec="mpeg4") as writer:
        for time in (Fraction(0), Fraction(1, 100), Fraction(1, 10)):
            writer.write(frame, time)
        with pytest.raises(StreamV2VError, match="not after the frame before it"):
            writer.write(frame, Fraction(1, 20))
    assert len(probe(tmp_path / "out.mp4")["frames"]) == 3
