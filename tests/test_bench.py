"""The benchmark runs end to end (tiny model, CPU) and reports what it measured."""

import re
import sys

from streamv2v.bench import main


def test_bench_reports_every_configuration(tiny_diffusers_dir, tiny_taesd_dir, capsys):
    argv = ["--model", str(tiny_diffusers_dir), "--vae", str(tiny_taesd_dir), "--device", "cpu"]
    argv += ["--sizes", "32", "--steps", "1,2", "--banks", "none,queue,dyme"]
    assert main([*argv, "--accel", "off,static", "--frames", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "cpu" in out
    rows = re.findall(
        r"^(off|static)\s+(none|queue|dyme)\s+(\d)\s+32\s+([\d.]+)\s+([\d.]+)\s+-\s+([\d.]+)"
        r"\s+(-|[+-][\d.]+%)$",
        out,
        re.M,
    )
    assert sorted(row[:3] for row in rows) == sorted(
        (a, b, s) for a in ("off", "static") for b in ("none", "queue", "dyme") for s in ("1", "2")
    )
    ms_of = {row[:3]: float(row[3]) for row in rows}
    for accel, bank, steps, ms, fps, first, extra in rows:
        assert float(ms) > 0 and abs(float(fps) - 1000 / float(ms)) < 0.2 and float(first) >= 0
        if bank == "none":
            assert extra == "-"
        else:  # the bank's cost against the same accel, steps and size without one
            expected = 100 * (float(ms) / ms_of[accel, "none", steps] - 1)
            assert abs(float(extra.rstrip("%")) - expected) < 0.1 + 100 * 0.01 / float(ms)


def test_bench_leaves_the_bank_cost_blank_without_a_row_to_compare(
    tiny_diffusers_dir, tiny_taesd_dir, capsys
):
    argv = ["--model", str(tiny_diffusers_dir), "--vae", str(tiny_taesd_dir), "--device", "cpu"]
    argv += ["--sizes", "32", "--steps", "1", "--banks", "dyme", "--accel", "off"]
    assert main([*argv, "--frames", "1", "--warmup", "1"]) == 0
    row = re.search(r"^off\s+dyme\s.*$", capsys.readouterr().out, re.M).group(0)
    assert row.split()[-1] == "-"


def test_bench_profiles_where_the_time_goes(tiny_diffusers_dir, tiny_taesd_dir, capsys):
    argv = ["--model", str(tiny_diffusers_dir), "--vae", str(tiny_taesd_dir), "--device", "cpu"]
    argv += ["--sizes", "32", "--steps", "2", "--banks", "dyme", "--accel", "off"]
    assert main([*argv, "--frames", "1", "--warmup", "1", "--profile", "2"]) == 0
    out = capsys.readouterr().out
    profile = out[out.index("profile: off dyme 2 steps 32") :]
    assert "Self CPU" in profile and "aten::" in profile  # torch.profiler's table of this row


def test_bench_rejects_bad_arguments(capsys):
    assert main(["--banks", "fifo", "--device", "cpu"]) == 1
    assert "fifo" in capsys.readouterr().err
    assert main(["--accel", "turbo", "--device", "cpu"]) == 1
    assert "turbo" in capsys.readouterr().err
    assert main(["--profile", "-1", "--device", "cpu"]) == 1
    assert "--profile" in capsys.readouterr().err
    assert main(["--vae", "x", "--device", "cpu"]) == 1
    assert "--vae only acts with --model" in capsys.readouterr().err


def test_node_bench_compares_the_node_with_the_engine(tiny_diffusers_dir, tiny_taesd_dir, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "node.py"
    spec = importlib.util.spec_from_file_location("node_bench", path)
    node_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(node_bench)
    argv = ["--model", str(tiny_diffusers_dir), "--vae", str(tiny_taesd_dir), "--device", "cpu"]
    argv += ["--frames", "3", "--size", "32", "--runs", "1", "--accel", "off"]
    stand_ins = ("folder_paths", "comfy", "comfy.utils", "comfy.model_management", "server")
    assert not any(name in sys.modules for name in stand_ins)
    try:
        assert node_bench.main(argv) == 0
    finally:  # its ComfyUI stand-ins and its copy of the pack must not leak into other tests
        for name in list(sys.modules):
            if name in stand_ins or name.split(".")[0] == node_bench.PACK:
                del sys.modules[name]
    out = capsys.readouterr().out
    node_fps = float(re.search(r"^node: 3 frames in \d+ ms .* = ([\d.]+) FPS$", out, re.M)[1])
    engine_fps = float(re.search(r"^engine: [\d.]+ ms/frame = ([\d.]+) FPS$", out, re.M)[1])
    ratio = int(re.search(r"^node / engine: (\d+)%$", out, re.M)[1])
    assert node_fps > 0 and engine_fps > 0 and abs(ratio - 100 * node_fps / engine_fps) <= 1
