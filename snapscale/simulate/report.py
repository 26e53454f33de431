"""A comparison as a table (text or Markdown), a JSON document, and two plots: GPU-hours against
the p99 wait of the requests that found no ready replica, and sampled deployments' replicas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from snapscale.simulate.policies import ALWAYS_ON, Result
from snapscale.simulate.run import Comparison

COLUMNS = ("policy", "GPU-h", "of always-on", "no ready replica", "p50 s", "p99 s", "p99.9 s",
           "timed out", "resume/hot/cache/store/cold", "freezes", "prefetches", "cache hits",
           "store GiB", "no GPU", "sim s")  # fmt: skip


def row(r: Result, always_gpu_s: float) -> dict[str, Any]:
    w = np.frombuffer(r.waits, dtype=np.float64) if len(r.waits) else np.empty(0)
    p50, p99, p999 = (float(x) for x in np.percentile(w, [50, 99, 99.9])) if len(w) else (None, None, None)
    hit = r.cache_hit_rate
    return {
        "policy": r.policy,
        "label": r.label,
        "gpu_hours": r.gpu_s / 3600,
        "share_of_always_on": r.gpu_s / always_gpu_s if always_gpu_s else None,
        "no_ready_replica": len(w) + r.timeouts,
        "wait_p50_s": p50,
        "wait_p99_s": p99,
        "wait_p999_s": p999,
        "timed_out": r.timeouts,
        "restores": {k: r.restores[k] for k in ("resume", "hot", "cache", "store", "cold")},
        "freezes": r.freezes,
        "prefetches": r.prefetches,
        "cache_hit_rate": hit,
        "store_gib": r.store_bytes / 2**30,
        "unplaceable": r.unplaceable,
        "peak_gpus": r.peak_gpus,
        "decisions": r.decisions,
        "events": r.events,
        "wall_s": r.wall_s,
    }


def rows(c: Comparison) -> list[dict[str, Any]]:
    always = c.by_name(ALWAYS_ON).gpu_s
    return [row(r, always) for r in c.results]


def _s(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def cells(x: dict[str, Any]) -> list[str]:
    on = x["policy"] == ALWAYS_ON
    rs = x["restores"]
    return [
        x["policy"],
        f"{x['gpu_hours']:,.0f}",
        "—" if x["share_of_always_on"] is None else f"{100 * x['share_of_always_on']:.1f}%",
        "0" if on else f"{x['no_ready_replica']:,}",
        _s(x["wait_p50_s"]),
        _s(x["wait_p99_s"]),
        _s(x["wait_p999_s"]),
        f"{x['timed_out']:,}",
        "—" if on else "/".join(f"{rs[k]:,}" for k in ("resume", "hot", "cache", "store", "cold")),
        f"{x['freezes']:,}",
        f"{x['prefetches']:,}",
        "—" if x["cache_hit_rate"] is None else f"{100 * x['cache_hit_rate']:.0f}%",
        f"{x['store_gib']:,.0f}",
        f"{x['unplaceable']:,}",
        "—" if on else f"{x['wall_s']:.0f}",
    ]


def markdown(c: Comparison) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(cells(x)) + " |" for x in rows(c)]
    return "\n".join(out)


def text(c: Comparison) -> str:
    table = [list(COLUMNS), *(cells(x) for x in rows(c))]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in table)


def document(c: Comparison) -> dict[str, Any]:
    return {
        "deployments": c.deployments,
        "requests": c.requests,
        "hosts": c.hosts,
        "gpus_per_host": c.gpus_per_host,
        "horizon_s": c.horizon_s,
        "tick_s": c.tick_s,
        "prepare_s": c.prepare_s,
        "peak_rss_bytes": c.peak_rss_bytes,
        "policies": rows(c),
        "sampled": {n: c.results[-1].series.get(n, []) for n in c.sampled},
    }


def plots(doc: dict[str, Any], out_dir: Path, formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """From `document(c)` (or a fleet.json read back): fleet-tradeoff.* (GPU-hours against the
    p50 and p99 wait) and fleet-replicas.* (the sampled deployments under the last policy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for i, x in enumerate(doc["policies"]):
        on = x["policy"] == ALWAYS_ON
        p50, p99 = (0.0, 0.0) if on else (x["wait_p50_s"], x["wait_p99_s"])
        if p99 is None:
            continue
        ax.scatter([x["gpu_hours"]], [p99], s=40, color=f"C{i}")
        ax.scatter([x["gpu_hours"]], [p50], s=40, color=f"C{i}", marker="v", alpha=0.6)
        ax.annotate(x["policy"], (x["gpu_hours"], p99), textcoords="offset points",
                    xytext=(6, 6 + 9 * (i % 3)), fontsize=8, color=f"C{i}")  # fmt: skip
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    top = max((x["wait_p99_s"] or 0.0) for x in doc["policies"])
    ax.set_ylim(-2, top * 1.35 + 1)
    ax.set_xlabel("GPU-hours over the day (log)")
    ax.set_ylabel("wait of requests finding no ready replica (s)\n● p99   ▼ p50")
    ax.set_title(f"{doc['deployments']:,} deployments, {doc['hosts']:,} hosts x {doc['gpus_per_host']} GPUs")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths = _save(fig, out_dir / "fleet-tradeoff", formats)
    plt.close(fig)
    sampled: dict[str, list[list[float]]] = doc["sampled"]
    fig, axes = plt.subplots(len(sampled) or 1, 1, figsize=(6.4, 1.1 + 0.9 * len(sampled)), dpi=100,
                             sharex=True, squeeze=False)  # fmt: skip
    for ax, (name, pts) in zip(axes[:, 0], sampled.items(), strict=False):
        if pts:
            ts = [p[0] / 3600 for p in pts] + [doc["horizon_s"] / 3600]
            ns = [p[1] for p in pts] + [pts[-1][1]]
            ax.step(ts, ns, where="post", linewidth=0.6)
        ax.set_ylabel(name, fontsize=7)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("hour")
    axes[0, 0].set_title(f"replicas of sampled deployments under {doc['policies'][-1]['policy']}", fontsize=9)
    fig.tight_layout()
    paths += _save(fig, out_dir / "fleet-replicas", formats)
    plt.close(fig)
    return paths


def _save(fig: Any, stem: Path, formats: tuple[str, ...]) -> list[Path]:
    out = []
    for f in formats:
        p = stem.with_suffix("." + f)
        fig.savefig(p, metadata={"Date": None} if f == "svg" else {"Software": None})
        out.append(p)
    return out
