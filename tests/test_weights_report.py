"""bench/weights_report.py: the side-by-side table of weights in the image against weights outside."""

from __future__ import annotations

from typing import Any

from bench.weights_gpu import parse
from bench.weights_report import table

GB = 10**9


def mode(restore_s: float, image: int, identical: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "cold_boot_s": 30.0,
        "freeze": {"timings_s": {"freeze": 9.0, "criu_dump": 4.0}, "image_bytes": image, "weights_bytes": 0},
        "restore": {"to_answer_s": restore_s, "timings_s": {"criu_restore": 1.5}},
        "identical": identical,
        **extra,
    }


def test_side_by_side_with_time_per_gb() -> None:
    results = {
        "preset": "llama-8b", "params": 8_030_000_000, "weights_bytes": 16 * GB, "gpu": "NVIDIA H200",
        "modes": {"image": mode(14.6, 17 << 30), "outside": mode(1.6, 1 << 30, resume={"to_answer_s": 0.4})},
        "cold_answers_identical": True,
    }  # fmt: skip
    out = table(results)
    lines = out.splitlines()
    assert lines[0] == "preset llama-8b: 8.03 B params, weights 14.90 GiB; NVIDIA H200"
    assert "weights in image" in lines[1] and lines[1].index("weights in image") < lines[1].index("outside")
    restore = next(ln for ln in lines if ln.startswith("restore -> first answer"))
    assert restore.split()[-4:] == ["14.60", "s", "1.60", "s"]
    assert next(ln for ln in lines if ln.startswith("image ")).split()[-4:] == ["17.00", "GiB", "1.00", "GiB"]
    per_gb = next(ln for ln in lines if ln.startswith("  restore (host cache warm)"))
    assert per_gb.split()[-4:] == ["0.912", "s/GB", "0.100", "s/GB"]  # 14.6 s and 1.6 s over 16 GB
    resume = next(ln for ln in lines if ln.startswith("resume -> first answer"))
    assert resume.split()[-3:] == ["-", "0.40", "s"]  # measured in one mode only
    assert "CRIU: page reads" not in out  # rows nobody measured are left out
    assert lines[-1].split()[-1] == "yes"


def test_a_mismatch_and_a_failed_mode_show() -> None:
    results = {"preset": "llama-0.8b", "params": 1, "weights_bytes": GB,
               "modes": {"image": mode(2.0, 1, identical=False), "outside": {"error": "boom"}}}  # fmt: skip
    out = table(results)
    assert next(ln for ln in out.splitlines() if ln.startswith("answers identical")).split()[-2:] == [
        "NO",
        "-",
    ]


def test_bench_flags() -> None:
    a = parse(["--preset", "8b", "--skip", "image,profile"])
    assert a.preset == "8b" and a.skip == {"image", "profile"} and a.kv_mib == 4096
    cpu = parse(["--cpu"])
    assert cpu.preset == "tiny" and "resume" in cpu.skip and cpu.kv_mib == 8
