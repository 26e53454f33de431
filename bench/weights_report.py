"""What `bench/weights_gpu.py` measured, side by side: weights in the image (today) against weights
outside it (`snapscale.workload`), as a printed table with seconds per GB of weights.

Pure: measurements in, text out. No I/O, no clocks.
"""

from __future__ import annotations

from typing import Any

GIB = 1 << 30
MODES = ("image", "outside")
TITLES = {"image": "weights in image", "outside": "weights outside"}
# (label, where in a mode's results, format); a path is keys into the mode's dict
ROWS: list[tuple[str, tuple[str, ...], str]] = [
    ("cold boot -> first answer", ("cold_boot_s",), "s"),
    ("resume -> first answer (hooks around it)", ("resume", "to_answer_s"), "s"),
    ("  cuda_restore", ("resume", "cuda_restore_s"), "s"),
    ("  after_restore (KV; weights mapped + filled)", ("resume", "after_restore_s"), "s"),
    ("freeze (sandbox stopped)", ("freeze", "timings_s", "freeze"), "s"),
    ("  before_freeze (KV dropped; weights released)", ("freeze", "timings_s", "before_freeze"), "s"),
    ("  cuda_checkpoint", ("freeze", "timings_s", "cuda_checkpoint"), "s"),
    ("  criu_dump", ("freeze", "timings_s", "criu_dump"), "s"),
    ("  drop_zero_pages (beside the stop)", ("freeze", "timings_s", "drop_zero_pages"), "s"),
    ("    waited for after the stop", ("freeze", "timings_s", "drop_zero_pages_wait"), "s"),
    ("image", ("freeze", "image_bytes"), "gib"),
    ("weights outside the image", ("freeze", "weights_bytes"), "gib"),
    ("restore -> first answer", ("restore", "to_answer_s"), "s"),
    ("  criu_restore", ("restore", "timings_s", "criu_restore"), "s"),
    ("  cuda_restore", ("restore", "timings_s", "cuda_restore"), "s"),
    ("  after_restore (KV; weights mapped + filled)", ("restore", "timings_s", "after_restore"), "s"),
    ("    weights fill", ("restore", "workload", "weights_restore_s"), "s"),
    ("    weights fill GB/s", ("restore", "workload", "weights_restore_gbps"), "x"),
    ("  ready_probe", ("restore", "timings_s", "ready_probe"), "s"),
    ("restore at CRIU -v4 -> first answer", ("profiled", "to_answer_s"), "s"),
    ("  criu_restore", ("profiled", "timings_s", "criu_restore"), "s"),
    ("    CRIU: before fork (images, ns, mounts)", ("profiled", "criu", "phases_s", "before_fork"), "s"),
    ("    CRIU: fork and prepare tasks", ("profiled", "criu", "phases_s", "fork_and_prepare"), "s"),
    ("    CRIU: page reads (faults, zeroing, copy)", ("profiled", "criu", "phases_s", "page_reads"), "s"),
    ("    CRIU: page reads GB/s", ("profiled", "criu", "page_gbps"), "x"),
    ("    CRIU: restorer, other", ("profiled", "criu", "phases_s", "restorer_other"), "s"),
    ("    CRIU: after resume", ("profiled", "criu", "phases_s", "after_resume"), "s"),
    ("    before CRIU's first log line", ("profiled", "criu", "unlogged_s"), "s"),
]


def get(d: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def cell(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if kind == "gib":
        return f"{v / GIB:.2f} GiB"
    if kind == "s":
        return f"{v:.2f} s"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def per_gb(seconds: Any, nbytes: int) -> str:
    if not isinstance(seconds, int | float) or nbytes <= 0:
        return "-"
    return f"{seconds / (nbytes / 1e9):.3f} s/GB"


def table(results: dict[str, Any]) -> str:
    """Both modes' rows, then time per GB of weights for each tier and whether every answer matched."""
    modes = [m for m in MODES if m in results.get("modes", {})]
    runs = {m: results["modes"][m] for m in modes}
    w = int(results.get("weights_bytes", 0))
    head = (
        f"preset {results.get('preset')}: {results.get('params', 0) / 1e9:.2f} B params, "
        f"weights {w / GIB:.2f} GiB; {results.get('gpu', 'no GPU')}"
    )
    width = 48
    lines = [head, f"{'':{width}}" + "".join(f"{TITLES[m]:>20}" for m in modes)]
    for label, path, kind in ROWS:
        vals = [get(runs[m], path) for m in modes]
        if all(v is None for v in vals):
            continue
        lines.append(f"{label:{width}}" + "".join(f"{cell(v, kind):>20}" for v in vals))
    lines.append(f"{'time per GB of weights':{width}}")
    for label, path in (
        ("  cold boot", ("cold_boot_s",)),
        ("  freeze", ("freeze", "timings_s", "freeze")),
        ("  restore (host cache warm)", ("restore", "to_answer_s")),
        ("  resume", ("resume", "to_answer_s")),
    ):
        vals = [per_gb(get(runs[m], path), w) for m in modes]
        if any(v != "-" for v in vals):
            lines.append(f"{label:{width}}" + "".join(f"{v:>20}" for v in vals))
    checks = [("answers identical to the cold boot's", "identical")]
    for label, key in checks:
        lines.append(f"{label:{width}}" + "".join(f"{cell(runs[m].get(key), 'x'):>20}" for m in modes))
    if len(modes) == 2:
        same = results.get("cold_answers_identical")
        lines.append(f"{'cold boot answers identical across modes':{width}}{cell(same, 'x'):>20}")
    return "\n".join(lines)
