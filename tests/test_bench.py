"""The benchmark runs end to end (tiny model, CPU) and reports what it measured."""

import importlib.util
import re
import sys
import types
from pathlib import Path

import torch

from streamv2v.bench import Result, main, table


def test_bench_reports_every_configuration(tiny_diffusers_dir, tiny_taesd_dir, capsys):
    argv = ["--model", str(tiny_diffusers_dir), "--vae", str(tiny_taesd_dir), "--device", "cpu"]
    argv += ["--sizes", "32", "--steps", "1,2", "--banks", "none,queue,dyme"]
    assert main([*argv, "--accel", "off,static", "--frames", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "cpu" in out
    rows = re.findall(
        r"^(off|static)\s+(none|queue|dyme)\s+(\d)\s+32\s+([\d.]+)\s+([\d.]+)\s+-\s+([\d.]+)"
        r"\s+(-|[+-][\d.]+%)\s+sdpa$",  # the attention kernel: PyTorch's on a CPU
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
    assert row.split()[-2:] == ["-", "sdpa"]


def test_bench_profiles_where_the_time_goes(tiny_diffusers_dir, tiny_taesd_dir, capsys):
    argv = ["--model", str(tiny_diffusers_dir), "--vae", str(tiny_taesd_dir), "--device", "cpu"]
    argv += ["--sizes", "32", "--steps", "2", "--banks", "dyme", "--accel", "off"]
    assert main([*argv, "--frames", "1", "--warmup", "1", "--profile", "2"]) == 0
    out = capsys.readouterr().out
    profile = out[out.index("profile: off dyme 2 steps 32") :]
    assert "Self CPU" in profile and "aten::" in profile  # torch.profiler's table of this row


def test_bench_times_a_row_in_chunks(tiny_diffusers_dir, tiny_taesd_dir, capsys):
    argv = ["--model", str(tiny_diffusers_dir), "--vae", str(tiny_taesd_dir), "--device", "cpu"]
    argv += ["--sizes", "32", "--steps", "2", "--banks", "dyme", "--accel", "off"]
    assert main([*argv, "--frames", "7", "--warmup", "0", "--chunks", "3"]) == 0
    out = capsys.readouterr().out
    row = re.search(r"^off\s+dyme\s+2\s+32\s+([\d.]+)", out, re.M)
    line = re.search(
        r"^chunks: off dyme 2 steps 32: 3 of about 2 frames, ([\d.]+) to ([\d.]+) ms/frame "
        r"\(slowest ([\d.]+) FPS\)$",  # no memory figures on a CPU
        out,
        re.M,
    )
    fastest, slowest, fps = map(float, line.groups())
    assert 0 < fastest <= float(row.group(1)) <= slowest  # the row's mean lies between its parts
    assert abs(fps - 1000 / slowest) < 0.1
    assert main([*argv, "--frames", "7", "--warmup", "0"]) == 0
    assert "chunks:" not in capsys.readouterr().out  # one part: nothing more to say


def test_bench_chunk_line_gives_memory_on_a_gpu():
    row = Result("compile", "dyme", 4, 512, 13.7, 73.0, 3310.0, 85.0, "sdpa", None, 20000)
    row.chunk_ms, row.allocated_mib = (13.61, 13.8, 13.7), (2980.4, 2980.6)
    assert (
        "chunks: compile dyme 4 steps 512: 3 of about 6666 frames, 13.61 to 13.80 ms/frame "
        "(slowest 72.5 FPS); allocated 2980 MiB after the first, 2981 MiB after the last"
    ) in table([row], "H100", "random", torch.float16)


def test_bench_says_which_attention_kernel_each_shape_got():
    cuda = torch.device("cuda")
    q, kv = (4, 4096, 320), (4, 8192, 320)
    times = {
        (cuda, torch.float16, (q, kv, kv), 8): (529.8e-6, 562.5e-6),
        (cuda, torch.float16, ((4, 1024, 640),) * 3, 8): (36.9e-6, 31.4e-6),
        (cuda, torch.float16, ((1, 64, 1280),) * 3, 8): "RuntimeError: no kernel",
    }
    out = table([], "H200", "random", torch.float16, times)
    assert "q 4x4096x320, k/v 4x8192x320, 8 heads: 529.8, 562.5 -> flash-attn-4" in out
    assert "q 4x1024x640, k/v 4x1024x640, 8 heads: 36.9, 31.4 -> SDPA" in out
    assert "k/v 1x64x1280, 8 heads: flash-attn-4 failed (RuntimeError: no kernel), SDPA" in out
    assert "kernels timed" not in table([], "cpu", "random", torch.float32, {})


def test_bench_rejects_bad_arguments(capsys):
    assert main(["--banks", "fifo", "--device", "cpu"]) == 1
    assert "fifo" in capsys.readouterr().err
    assert main(["--accel", "turbo", "--device", "cpu"]) == 1
    assert "turbo" in capsys.readouterr().err
    assert main(["--profile", "-1", "--device", "cpu"]) == 1
    assert "--profile" in capsys.readouterr().err
    assert main(["--sizes=-8", "--device", "cpu"]) == 1
    assert "--sizes: give sizes of 8 to 4096 pixels" in capsys.readouterr().err
    assert main(["--frames", "3", "--chunks", "4", "--device", "cpu"]) == 1
    assert "--chunks must be from 1 to --frames (3), got 4" in capsys.readouterr().err
    assert main(["--vae", "x", "--device", "cpu"]) == 1
    assert "--vae only acts with --model" in capsys.readouterr().err


def bench_script(name: str) -> types.ModuleType:
    """One of the scripts in bench/, loaded as a module."""
    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_node_bench_compares_the_node_with_the_engine(tiny_diffusers_dir, tiny_taesd_dir, capsys):
    node_bench = bench_script("node")
    argv = ["--model", str(tiny_diffusers_dir), "--vae", str(tiny_taesd_dir), "--device", "cpu"]
    argv += ["--frames", "3", "--size", "32", "--runs", "2", "--accel", "off"]
    stand_ins = ("folder_paths", "comfy", "comfy.utils", "comfy.model_management", "server")
    assert not any(name in sys.modules for name in stand_ins)
    try:
        assert node_bench.main(argv) == 0
    finally:  # its ComfyUI stand-ins and its copy of the pack must not leak into other tests
        for name in list(sys.modules):
            if name in stand_ins or name.split(".")[0] == node_bench.PACK:
                del sys.modules[name]
    out = capsys.readouterr().out
    node = re.search(
        r"^node: 3 frames in ([\d.]+) ms \(best of \[\d+, \d+\] ms; median ([\d.]+) ms\) "
        r"= ([\d.]+) FPS$",
        out,
        re.M,
    )
    best, median, node_fps = map(float, node.groups())
    assert best <= median and abs(node_fps - 3000 / best) < 0.2
    engine_fps = float(re.search(r"^engine: [\d.]+ ms/frame = ([\d.]+) FPS$", out, re.M)[1])
    ratio = int(re.search(r"^node / engine: (\d+)%$", out, re.M)[1])
    assert node_fps > 0 and engine_fps > 0 and abs(ratio - 100 * node_fps / engine_fps) <= 1


def test_kernels_are_sorted_by_what_they_do():
    """Names as CUPTI reports them from the compiled step's graphs on an H200 (shortened)."""
    from streamv2v.bench import kernel_kind

    kinds = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64": "attention",
        "kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_o": (
            "attention"  # flash-attn-4's
        ),
        "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x192x64": (
            "convolution"
        ),
        "void cutlass__5x_cudnn::Kernel<cutlass_tensorop_f16_s16816fprop_optimized_f16_64x64": (
            "convolution"
        ),
        "void nhwcAddPaddingKernel<__half, __half, float, true>": "convolution",
        "nvjet_sm90_hsh_168x128_64x5_1x2_h_bz_coopA_bias_TNN": "matrix product",
        "triton_per_fused_add_clone_convolution_div_native_group_norm_silu_7": (
            "Inductor's kernels (norms, element-wise)"
        ),
        "triton_poi_fused__to_copy_add_best_match_div_expand_gather_sort_unsqueeze_3": (
            "Inductor's kernels (norms, element-wise)"
        ),
        "best_match_kernel": "DyMe matching (Triton)",
        "void at_cuda_detail::cub::detail::radix_sort::DeviceRadixSortOnesweepKernel<": (
            "sort (DyMe's random split)"
        ),
        "void at::native::radixSortKVInPlace<2, -1, 64, 32, float, long, unsigned int>": (
            "sort (DyMe's random split)"
        ),
        "void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda>": "copy, fill",
        "memcpy32_post": "copy, fill",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<c10::Half, ArgMaxOps>": (
            "other"
        ),
    }
    assert {name: kernel_kind(name) for name in kinds} == kinds


def test_kernel_time_is_summed_per_kind_and_frame():
    from streamv2v.bench import kernel_time_by_kind

    columns = {
        "read": [("best_match_kernel", 0.0, 0), ("nvjet_sm90_x", 3000.0, 4), ("memset32", 8.0, 2)],
        "update": [("best_match_kernel", 1000.0, 10), ("triton_poi_fused_x", 500.0, 20)],
    }
    lines = kernel_time_by_kind(columns, frames=2).splitlines()
    rows = {label: numbers for label, *numbers in (line.rsplit(None, 2) for line in lines[2:])}
    assert lines[1].split() == ["read", "update"]
    assert rows["matrix product"] == ["1.50", "0.00"]
    assert rows["DyMe matching (Triton)"] == ["0.00", "0.50"]
    assert rows["Inductor's kernels (norms, element-wise)"] == ["0.00", "0.25"]
    assert rows["copy, fill"] == ["0.00", "0.00"]  # 4 us per frame, shown to 0.01 ms
    assert rows["all kernels"] == ["1.50", "0.75"]
    assert rows["kernels per frame"] == ["3", "15"]
    assert "attention" not in rows and "other" not in rows  # kinds no frame had are left out


def test_live_bench_times_the_live_loop_and_its_parts(tiny_diffusers_dir, tiny_taesd_dir, capsys):
    live_bench = bench_script("live")
    argv = ["--model", str(tiny_diffusers_dir), "--vae", str(tiny_taesd_dir), "--device", "cpu"]
    argv += ["--width", "40", "--height", "24", "--frames", "6", "--warmup", "2", "--accel", "off"]
    assert live_bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "accel off   40x24, 4 steps, DyMe bank" in out
    loop = re.search(
        r"^live loop: 6 frames in ([\d.]+) s = ([\d.]+) frames/s \(([\d.]+) ms per frame, "
        r"2 in flight\)$",
        out,
        re.M,
    )
    seconds, rate, ms = map(float, loop.groups())
    assert abs(rate * seconds / 6 - 1) < 0.01 and abs(rate * ms / 1000 - 1) < 0.01
    parts = re.search(
        r"^per frame, medians of 6: decode ([\d.]+) ms, stream frame \(run_live\) ([\d.]+) ms, "
        r"encode ([\d.]+) ms$",
        out,
        re.M,
    )
    assert all(float(x) > 0 for x in parts.groups())
    assert live_bench.main(argv + ["--in-flight", "0"]) == 1
    assert "--in-flight must be at least 1" in capsys.readouterr().err
