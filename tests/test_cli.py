"""``python -m streamv2v``: options, fast failures with one-line reasons, whole runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from videos import make_video, probe

from streamv2v import cli, loading, stream, video
from streamv2v.cli import main
from streamv2v.frames import output_size

ROOT = Path(__file__).resolve().parents[1]
NO_MODEL = "/nonexistent/model.safetensors"  # reached only if a check ran too late


def _fails(capsys, argv, message, status=1):
    assert main(argv) == status
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("streamv2v: error:")]
    assert len(lines) == 1, err
    assert message in lines[0]
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def clip(tmp_path):
    return make_video(tmp_path / "in.mp4", frames=6, width=64, height=48, audio="aac")


def test_help_documents_every_option(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for action in cli.build_parser()._actions:
        for flag in action.option_strings:
            assert flag in text
    assert "fp16 on cuda and mps, fp32 on cpu" in " ".join(text.split())


def test_module_entry_point_runs():
    done = subprocess.run(
        [sys.executable, "-m", "streamv2v", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0 and "usage: streamv2v" in done.stdout


def test_a_mistake_is_the_only_line_on_stderr(tmp_path, clip):
    """Nothing a library prints on import (transformers warns where torchvision is missing)
    comes before the one line that says what to fix."""
    argv = [str(clip), str(tmp_path / "out.mp4"), "--model", NO_MODEL, "--prompt", "x"]
    done = subprocess.run(
        [sys.executable, "-m", "streamv2v", *argv, "--max-skip", "3"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "streamv2v: error: --max-skip only acts with the similar-frame filter: set a "
        "--similar-filter threshold"
    ]


def test_missing_arguments_are_usage_errors(capsys):
    _fails(capsys, ["in.mp4"], "the following arguments are required", status=2)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.mp4", "does not exist"),
        (lambda d: d, "is a folder"),
        (lambda d: _text(d / "notes.mp4"), "is not a video FFmpeg can read"),
    ],
    ids=["missing", "folder", "not-a-video"],
)
def test_a_bad_input_fails_before_the_model_loads(tmp_path, capsys, make, message):
    path = make(tmp_path)
    argv = [str(path), str(tmp_path / "out.mp4"), "--model", NO_MODEL, "--prompt", "x"]
    line = _fails(capsys, argv, message)
    assert str(path) in line
    assert not (tmp_path / "out.mp4").exists()


@pytest.mark.parametrize(
    ("extra", "message", "status"),
    [
        (["--lora", "{lora}:strong"], "weight 'strong' is not a number", 1),
        (["--t-index-list", "30,x"], "not a comma-separated list of whole numbers", 2),
        (["--t-index-list", "40,30"], "must be strictly ascending", 1),
        (
            ["--t-index-list", "30,40", "--steps", "2"],
            "--t-index-list replaces steps and strength: give either --t-index-list or",
            1,
        ),
        (["--max-skip", "3"], "--max-skip only acts with the similar-frame filter: set a --sim", 1),
        (["--guidance", "1.5"], "has no effect with cfg type 'none'", 1),
        (["--bank", "dyme", "--bank-size", "3"], "no effect with the 'dyme' bank", 1),
        (["--width", "4"], "width must be a whole number of pixels within 8..4096", 1),
        (["--width", "0"], "width must be a whole number of pixels within 8..4096, got 0", 1),
        (
            ["--height", "4096"],
            "height 4096 on 64x48 frames makes them 5461 pixels wide, over 4096: give the width",
            1,
        ),
        (["--negative-prompt", "blurry"], "negative prompt has no effect with cfg type", 1),
        (["--crf", "99"], "crf 99 for output", 1),
        (["--cfg-type", "fast"], "invalid choice: 'fast'", 2),
    ],
)
def test_bad_settings_fail_before_the_model_loads(tmp_path, capsys, clip, extra, message, status):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    extra = [arg.format(lora=lora) for arg in extra]
    argv = [str(clip), str(tmp_path / "out.mp4"), "--model", NO_MODEL, "--prompt", "x", *extra]
    _fails(capsys, argv, message, status)
    assert not (tmp_path / "out.mp4").exists()


def test_a_bad_output_fails_before_the_model_loads(tmp_path, capsys, clip):
    argv = [str(clip), str(tmp_path / "out.avi"), "--model", NO_MODEL, "--prompt", "x"]
    _fails(capsys, argv, "unknown extension '.avi'")
    argv = [str(clip), str(clip), "--model", NO_MODEL, "--prompt", "x"]
    _fails(capsys, argv, "is the input video")


def test_a_missing_model_is_explained(tmp_path, capsys, clip):
    argv = [str(clip), str(tmp_path / "out.mp4"), "--model", NO_MODEL, "--prompt", "x"]
    _fails(capsys, argv, NO_MODEL)
    assert not (tmp_path / "out.mp4").exists()


def test_ctrl_c_exits_130_without_a_traceback(tmp_path, capsys, monkeypatch, clip):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(video, "VideoReader", interrupted)
    argv = [str(clip), str(tmp_path / "out.mp4"), "--model", NO_MODEL, "--prompt", "x"]
    _fails(capsys, argv, "interrupted", status=130)


def test_ctrl_c_mid_run_keeps_a_playable_start(tmp_path, capsys, monkeypatch, clip):
    class Model:
        description = "stand-in"

    class Stream:  # passes frames through and is interrupted at the fourth
        accel_note = None

        def __init__(self, *args, **kwargs):
            pass

        def process(self, frames):
            for index, frame in enumerate(frames):
                if index == 3:
                    raise KeyboardInterrupt
                yield frame

    monkeypatch.setattr(loading, "load_model", lambda *args, **kwargs: Model())
    monkeypatch.setattr(stream, "StreamV2V", Stream)
    out = tmp_path / "out.mp4"
    argv = [str(clip), str(out), "--model", NO_MODEL, "--prompt", "x"]
    _fails(capsys, argv, f"{out} holds the first 3 frames", status=130)
    result = probe(out)
    assert len(result["frames"]) == 3
    assert result["audio_seconds"] == pytest.approx(3 / 24, abs=0.03)


def test_output_size_keeps_the_aspect_ratio_when_one_side_is_given():
    assert output_size(None, None, 640, 360) == (640, 360)
    assert output_size(320, None, 640, 360) == (320, 180)
    assert output_size(None, 90, 640, 360) == (160, 90)
    assert output_size(100, 100, 640, 360) == (100, 100)


def test_a_whole_run_keeps_frames_rate_size_and_sound(tmp_path, capsys, clip, tiny_diffusers_dir):
    out = tmp_path / "out.mp4"
    argv = [str(clip), str(out), "--model", str(tiny_diffusers_dir), "--prompt", "a cat"]
    assert main([*argv, "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "wrote" in err
    assert "streamv2v: acceleration 'compile' needs an NVIDIA GPU" in err  # the default's fallback
    result, source = probe(out), probe(clip)
    assert len(result["frames"]) == 6
    assert (result["width"], result["height"], result["fps"]) == (64, 48, 24)
    assert result["audio_codec"] == "aac"
    assert result["audio_seconds"] == pytest.approx(source["audio_seconds"], abs=0.03)


@pytest.mark.parametrize("suffix,declared", [(".mp4", 30), (".mkv", 1000)])
def test_a_variable_rate_video_keeps_its_timing_and_sound(
    tmp_path, suffix, declared, tiny_diffusers_dir
):
    """Half a second of frames, a second of nothing, half a second again: a phone's or a
    screen recorder's video. Its frames keep their times, so the sound stays in sync."""
    times = [i / 30 for i in range(15)] + [1.5 + i / 30 for i in range(15)]
    clip = make_video(tmp_path / f"vfr{suffix}", frames=30, fps=declared, times=times, audio="aac")
    out = tmp_path / f"out{suffix}"
    argv = [str(clip), str(out), "--model", str(tiny_diffusers_dir), "--prompt", "a cat"]
    assert main([*argv, "--device", "cpu", "--accel", "off"]) == 0
    result, source = probe(out), probe(clip)
    assert source["times"] == pytest.approx(times, abs=0.001)
    assert result["times"] == pytest.approx(times, abs=0.002)
    assert result["audio_seconds"] == pytest.approx(source["audio_seconds"], abs=0.05)


def test_a_run_with_taesd_a_queue_bank_two_steps_and_a_new_width(
    tmp_path, capsys, clip, tiny_diffusers_dir, tiny_taesd_dir
):
    out = tmp_path / "out.mkv"
    argv = [str(clip), str(out), "--model", str(tiny_diffusers_dir), "--prompt", "a cat"]
    argv += ["--vae", str(tiny_taesd_dir), "--bank", "queue", "--bank-size", "2"]
    argv += ["--t-index-list", "30,40", "--width", "40", "--dtype", "fp32"]
    assert main(argv) == 0
    assert "TAESD" in capsys.readouterr().err
    result = probe(out)
    assert len(result["frames"]) == 6
    assert (result["width"], result["height"], result["fps"]) == (40, 30, 24)
    assert result["audio_seconds"] == pytest.approx(0.25, abs=0.03)


def _text(path):
    path.write_text("not a video\n" * 100)
    return path


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("MPS backend out of memory (MPS allocated: 9.00 GB)"),
        MemoryError(),
    ],
    ids=["cuda", "mps", "cpu"],
)
def test_running_out_of_memory_is_one_line(tmp_path, capsys, clip, tiny_diffusers_dir, error):
    def fail(self, frames):
        raise error
        yield

    out = tmp_path / "out.mp4"
    argv = [str(clip), str(out), "--model", str(tiny_diffusers_dir), "--prompt", "a cat"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("streamv2v.stream.StreamV2V.process", fail)
        _fails(capsys, [*argv, "--device", "cpu"], "out of cpu memory: lower --width/--height")
