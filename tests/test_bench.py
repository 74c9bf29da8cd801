"""The benchmark runs end to end (tiny model, CPU) and reports what it measured."""

import re

from streamv2v.bench import main


def test_bench_reports_every_configuration(tiny_diffusers_dir, tiny_taesd_dir, capsys):
    argv = ["--model", str(tiny_diffusers_dir), "--vae", str(tiny_taesd_dir), "--device", "cpu"]
    argv += ["--sizes", "32", "--steps", "1,2", "--banks", "none,queue,dyme"]
    assert main([*argv, "--accel", "off,static", "--frames", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "cpu" in out
    rows = re.findall(
        r"^(off|static)\s+(none|queue|dyme)\s+(\d)\s+32\s+([\d.]+)\s+([\d.]+)\s+-\s+([\d.]+)$",
        out,
        re.M,
    )
    assert sorted(row[:3] for row in rows) == sorted(
        (a, b, s) for a in ("off", "static") for b in ("none", "queue", "dyme") for s in ("1", "2")
    )
    for *_, ms, fps, first in rows:
        assert float(ms) > 0 and abs(float(fps) - 1000 / float(ms)) < 0.2 and float(first) > 0


def test_bench_rejects_bad_arguments(capsys):
    assert main(["--banks", "fifo", "--device", "cpu"]) == 1
    assert "fifo" in capsys.readouterr().err
    assert main(["--accel", "turbo", "--device", "cpu"]) == 1
    assert "turbo" in capsys.readouterr().err
    assert main(["--vae", "x", "--device", "cpu"]) == 1
    assert "--vae only acts with --model" in capsys.readouterr().err
