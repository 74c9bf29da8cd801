"""The bank ablation runs end to end (tiny model, TAESD, CPU) and reports every row."""

import json

import pytest
import torch
from videos import make_video

from streamv2v import ablate

ROWS = ["no bank", "queue(1)", "queue(2)", "queue(4)", "DyMe(1)"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a busy 2-core machine run 50x slower when torch's threads compete."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("ablate") / "in.mp4", frames=4, width=32, height=32)


def test_ablation_reports_every_configuration(
    video, tiny_diffusers_dir, tiny_taesd_dir, capsys, monkeypatch
):
    run_stream = ablate._run_stream

    def queue4_runs_out_of_memory(stream, *args):
        if stream.bank.config.kind == "queue" and stream.bank.config.size == 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return run_stream(stream, *args)

    monkeypatch.setattr(ablate, "_run_stream", queue4_runs_out_of_memory)
    argv = [str(video), "--model", str(tiny_diffusers_dir), "--vae", str(tiny_taesd_dir)]
    argv += ["--prompt", "a watercolor painting", "--device", "cpu", "--steps", "2"]
    assert ablate.main([*argv, "--warmup", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["bank"] for row in report["rows"]] == ROWS
    assert report["frames"] == 4 and report["t_index_list"] == [30, 40]
    assert report["scale"] == "0..255" and "DIS" in report["flow"]
    for row in report["rows"]:
        if row["bank"] == "queue(4)":  # one configuration failing does not end the run
            assert row["error"] == "out of cpu memory" and row["ms_per_frame"] is None
            continue
        assert row["error"] is None
        assert row["ms_per_frame"] > 0 and row["warp_error"] > 0
        assert row["pixel_consistency"] >= 0
        assert row["peak_memory_gib"] is None  # measured on CUDA only
    assert report["input_video"]["pixel_consistency"] > 0  # the test video moves

    lines = ablate.table(report).splitlines()
    for label in ROWS:
        (line,) = [line for line in lines if line.startswith(label + " ")]
        cells = line.split()
        if label == "queue(4)":
            assert "out of cpu memory" in line
        else:
            assert cells[-3] == "-"  # peak memory
            assert float(cells[-4]) > 0 and float(cells[-2]) > 0
    assert "torch " in lines[2]
    assert any(line.split()[:2] == ["bank", "ms/frame"] for line in lines if line)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-frames", "1"], "--max-frames 1"),
        (["--warmup", "4"], "not more than --warmup 4"),
        (["--flow", "raft"], "needs a local RAFT weights file"),
        (["--flow", "dis", "--raft-weights", "raft.pth"], "no effect with flow 'dis'"),
        (["--width", "4"], "width must be"),
    ],
)
def test_bad_arguments_end_before_the_model_loads(video, capsys, extra, message):
    argv = [str(video), "--model", "/nonexistent/model", "--prompt", "x", "--device", "cpu"]
    assert ablate.main([*argv, *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_input_and_usage_errors(tmp_path, capsys):
    argv = ["--model", "m", "--prompt", "x", "--device", "cpu"]
    assert ablate.main([str(tmp_path / "missing.mp4"), *argv]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert ablate.main([str(tmp_path / "missing.mp4"), "--model", "m"]) == 2
    assert "--prompt" in capsys.readouterr().err
