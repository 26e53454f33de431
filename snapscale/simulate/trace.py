"""Traces: which deployment gets a request when, and how long serving it takes.

A seeded generator (Zipf-like popularity, diurnal and bursty arrivals, a mix of model sizes) and
loaders for real logs: a CSV of timestamp, deployment, duration, and the Azure Functions 2019
per-minute invocation counts. Numpy arrays per deployment; nothing here knows about policies.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from snapscale.shared.bus import check_token
from snapscale.shared.core.errors import ConfigError

DAY_S = 86400.0
Floats = npt.NDArray[np.float64]
# image GiB and median service seconds of the three sizes measured (docs/bench/weights.md, run 1:
# llama-0.8b, -3b, -8b images 2.35, 7.56, 15.82 GiB) and the share of deployments of each
MODEL_MIX: tuple[tuple[float, float, float], ...] = ((2.35, 0.3, 0.6), (7.56, 0.8, 0.3), (15.82, 1.5, 0.1))


@dataclass
class Trace:
    names: list[str]
    image_gib: list[float]
    arrivals: list[Floats]  # per deployment, seconds from the start, sorted
    durations: list[Floats]  # per deployment, service seconds, aligned with arrivals
    horizon_s: float

    @property
    def requests(self) -> int:
        return sum(len(a) for a in self.arrivals)


@dataclass(frozen=True)
class GenSpec:
    deployments: int = 10_000
    requests: int = 4_000_000  # expected requests over the horizon, all deployments together
    zipf: float = 1.0  # popularity of the deployment of rank r ~ r ** -zipf
    diurnal: float = 0.6  # the day's swing: rate x (1 + diurnal * sin(...)), a phase per deployment
    bursts_per_day: float = 2.0  # per deployment, each 2-10 minutes at 5-20x its rate
    horizon_s: float = DAY_S
    seed: int = 1


def generate(g: GenSpec) -> Trace:
    rng = np.random.default_rng(g.seed)
    n = g.deployments
    ranks = np.arange(1, n + 1, dtype=np.float64)
    weight = ranks**-g.zipf
    expected = g.requests * weight / weight.sum()
    sizes = np.array([m[0] for m in MODEL_MIX])
    medians = np.array([m[1] for m in MODEL_MIX])
    kind = rng.choice(len(MODEL_MIX), size=n, p=[m[2] for m in MODEL_MIX])
    minutes = max(1, math.ceil(g.horizon_s / 60))
    t_min = np.arange(minutes, dtype=np.float64) * 60.0
    arrivals: list[Floats] = []
    durations: list[Floats] = []
    for d in range(n):
        rate = 1.0 + g.diurnal * np.sin(2 * np.pi * (t_min / DAY_S - rng.random()))
        for _ in range(rng.poisson(g.bursts_per_day * g.horizon_s / DAY_S)):
            start = int(rng.integers(0, minutes))
            rate[start : start + int(rng.integers(2, 11))] *= rng.uniform(5, 20)
        count = rng.poisson(expected[d])
        if count == 0:
            arrivals.append(np.empty(0))
            durations.append(np.empty(0))
            continue
        cdf = np.cumsum(rate)
        which = np.searchsorted(cdf, rng.random(count) * cdf[-1], side="right")
        a = np.sort(t_min[np.minimum(which, minutes - 1)] + rng.random(count) * 60.0)
        arrivals.append(a[a < g.horizon_s])
        service = rng.lognormal(math.log(medians[kind[d]]), 0.8, len(arrivals[-1]))
        durations.append(np.minimum(600.0, service))
    width = len(str(n - 1))
    names = [f"dep-{i:0{width}d}" for i in range(n)]
    return Trace(names, [float(sizes[k]) for k in kind], arrivals, durations, g.horizon_s)


def _number(text: str, where: str, field: str, lo: float, hi: float) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ConfigError(f"{where}: {field}: not a number: {text!r}") from None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ConfigError(f"{where}: {field}: must be within [{lo:g}, {hi:g}], got {text!r}")
    return v


def _name(text: str, where: str) -> str:
    try:
        return check_token("deployment", text)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _build(
    per: dict[str, tuple[list[float], list[float]]], image_gib: float, horizon: float | None, *, shift: bool
) -> Trace:
    if not per:
        raise ConfigError("the trace has no requests")
    names = sorted(per)
    t0 = min(min(per[n][0]) for n in names) if shift else 0.0
    arr = [np.asarray(per[n][0]) - t0 for n in names]
    dur = [np.asarray(per[n][1]) for n in names]
    order = [np.argsort(a, kind="stable") for a in arr]
    arr = [a[o] for a, o in zip(arr, order, strict=True)]
    dur = [d[o] for d, o in zip(dur, order, strict=True)]
    end = horizon if horizon is not None else max(float(a[-1]) for a in arr) + 1.0
    return Trace(names, [image_gib] * len(names), arr, dur, end)


def load_csv(path: Path, *, image_gib: float = 2.35, horizon_s: float | None = None) -> Trace:
    """Rows of `timestamp,deployment,duration` (seconds; a header line is allowed)."""
    per: dict[str, tuple[list[float], list[float]]] = {}
    with path.open(newline="") as f:
        for i, row in enumerate(csv.reader(f), 1):
            if not row or (i == 1 and row[0].strip().lower() == "timestamp"):
                continue
            where = f"{path}:{i}"
            if len(row) != 3:
                raise ConfigError(f"{where}: want 3 fields (timestamp,deployment,duration), got {len(row)}")
            ts = _number(row[0], where, "timestamp", 0, 1e11)
            dur = _number(row[2], where, "duration", 0, DAY_S)
            a, d = per.setdefault(_name(row[1].strip(), where), ([], []))
            a.append(ts)
            d.append(dur)
    return _build(per, image_gib, horizon_s, shift=True)


def load_azure(path: Path, *, duration_s: float = 1.0, image_gib: float = 2.35, seed: int = 1) -> Trace:
    """Azure Functions 2019 `invocations_per_function_md.anon.dNN.csv`: HashOwner, HashApp,
    HashFunction, Trigger, then the counts of minutes 1..1440; each function is a deployment and
    a minute's invocations fall uniformly within it (seeded)."""
    rng = np.random.default_rng(seed)
    per: dict[str, tuple[list[float], list[float]]] = {}
    with path.open(newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None or header[:4] != ["HashOwner", "HashApp", "HashFunction", "Trigger"]:
            raise ConfigError(f"{path}:1: want the header HashOwner,HashApp,HashFunction,Trigger,1,...,1440")
        minutes = len(header) - 4
        for i, row in enumerate(rows, 2):
            where = f"{path}:{i}"
            if len(row) != len(header):
                raise ConfigError(f"{where}: want {len(header)} fields, got {len(row)}")
            name = _name(f"fn-{row[2][:48]}", where)
            counts = [int(_number(c, where, f"minute {m + 1}", 0, 1e7)) for m, c in enumerate(row[4:])]
            total = sum(counts)
            if total == 0:
                continue
            starts = np.repeat(np.arange(minutes, dtype=np.float64) * 60.0, counts)
            a, d = per.setdefault(name, ([], []))
            a.extend((starts + rng.random(total) * 60.0).tolist())
            d.extend([duration_s] * total)
    return _build(per, image_gib, minutes * 60.0, shift=False)
