"""What the hosts' work costs in the simulation: seconds per tier, per GiB of image, cache sizes.

Each default is a GPU figure measured in this repository, named with its page and run (`SOURCES`),
so a number here can be checked against the run it came from. A profile file (TOML) overrides them.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

from snapscale.shared.core.errors import ConfigError

GIB = 1 << 30
REF_GIB = 2.35  # the GPU sample's image (0.84 B parameters, bf16, KV cache dropped): e2e runs 4-7


@dataclass(frozen=True)
class Profile:
    """Tier latency = its seconds for the reference image + its slope x (image GiB - 2.35)."""

    resume_s: float = 1.56
    resume_s_per_gib: float = 0.159
    hot_s: float = 2.45  # restore from the host cache with the image still assembled (hot)
    hot_s_per_gib: float = 0.723
    cache_s: float = 3.27  # restore from the host cache, image assembled again
    cache_s_per_gib: float = 1.072
    store_gib_per_s: float = 0.936  # a restore from the store adds image / this to a hot restore
    prefetch_gib_per_s: float = 2.196  # a prefetch command's download into the host cache
    cold_s: float = 32.23
    cold_s_per_gib: float = 1.487
    freeze_s: float = 10.7  # hooks, CUDA checkpoint, dump, zero pages, chunking, upload
    freeze_s_per_gib: float = 0.932
    cache_gib: float = 64.0  # the host cache (SNAPSCALE_CACHE_BYTES' default)
    hot_images: int = 2  # SNAPSCALE_HOT_IMAGES' default
    suspend_budget_gib: float = 32.0  # SNAPSCALE_SUSPEND_BUDGET_BYTES' default

    def _at(self, base: float, slope: float, gib: float) -> float:
        return max(0.0, base + slope * (gib - REF_GIB))

    def resume(self, gib: float) -> float:
        return self._at(self.resume_s, self.resume_s_per_gib, gib)

    def hot(self, gib: float) -> float:
        return self._at(self.hot_s, self.hot_s_per_gib, gib)

    def cache(self, gib: float) -> float:
        return self._at(self.cache_s, self.cache_s_per_gib, gib)

    def store(self, gib: float) -> float:
        return self.hot(gib) + gib / self.store_gib_per_s

    def cold(self, gib: float) -> float:
        return self._at(self.cold_s, self.cold_s_per_gib, gib)

    def freeze(self, gib: float) -> float:
        return self._at(self.freeze_s, self.freeze_s_per_gib, gib)

    def prefetch(self, gib: float) -> float:
        return gib / self.prefetch_gib_per_s


_E2E7 = "docs/benchmarks.md, end to end on a GPU, run 7 (1x H200, bab4e87)"
_W1 = "docs/bench/weights.md, run 1 (1x H200), weights in the image, llama-0.8b -> llama-8b"
SOURCES: dict[str, str] = {
    "resume_s": f"{_E2E7}: resume after suspend 1.56 s",
    "resume_s_per_gib": f"{_W1}: resume 0.52 -> 2.66 s for 2.35 -> 15.82 GiB",
    "hot_s": f"{_E2E7}: restore, host cache warm (hot image) 2.45 s",
    "hot_s_per_gib": f"{_W1}: restore -> first answer 1.95 -> 11.69 s for 2.35 -> 15.82 GiB",
    "cache_s": "docs/bench/e2e.md, run 7: host cache warm, hot image removed 3.27 s",
    "cache_s_per_gib": "hot_s_per_gib + run 7's (3.27 - 2.45) s / 2.35 GiB of prefetch + materialize",
    "store_gib_per_s": f"{_E2E7}: 2.35 GiB / (store 4.96 s - hot 2.45 s)",
    "prefetch_gib_per_s": "docs/bench/e2e.md, run 7: prefetch phase 1.07 s for 2.35 GiB",
    "cold_s": f"{_E2E7}: cold boot 32.23 s",
    "cold_s_per_gib": "docs/bench-data/weights_gpu_h200_{0.8b,8b}.json: cold boot 21.26 -> 41.29 s",
    "freeze_s": "docs/bench/e2e.md, run 7: freeze 10.7 s in all",
    "freeze_s_per_gib": f"{_W1}: engine freeze 3.24 -> 15.79 s",
    "cache_gib": "SNAPSCALE_CACHE_BYTES default (64 GiB), snapscale/shared/core/settings.py",
    "hot_images": "SNAPSCALE_HOT_IMAGES default (2), snapscale/restorer/config.py",
    "suspend_budget_gib": "SNAPSCALE_SUSPEND_BUDGET_BYTES default (32 GiB), snapscale/restorer/config.py",
}


def load_profile(path: Path | None) -> Profile:
    """The defaults, with what `path` (TOML, the field names above) sets; every bad key or value
    is listed in one ConfigError."""
    p = Profile()
    if path is None:
        return p
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"profile {path}: {e}") from e
    known = {f.name: f for f in fields(Profile)}
    problems: list[str] = []
    got: dict[str, float | int] = {}
    for key, value in raw.items():
        f = known.get(key)
        if f is None:
            problems.append(f"{key}: unknown key")
            continue
        whole = f.name == "hot_images"
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (whole and not isinstance(value, int))
        ):
            problems.append(f"{key}: must be {'a whole number' if whole else 'a number'}, got {value!r}")
        elif not math.isfinite(value) or value < 0 or value > 1e6:
            problems.append(f"{key}: must be within [0, 1e6], got {value!r}")
        elif key.endswith("_per_s") and value == 0:
            problems.append(f"{key}: must be above 0")
        else:
            got[key] = value
    if problems:
        raise ConfigError(f"profile {path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return replace(p, **got)  # type: ignore[arg-type]
