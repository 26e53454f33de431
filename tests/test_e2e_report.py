"""The e2e bench's arithmetic: ratios against the cold boot and against engine.restore alone, the
control plane's share of a restore, and the printed table. Pure."""

from __future__ import annotations

import pytest

from bench.e2e_report import Raw, Up, phases_line, ratios, table

COLD = {"launch": 0.1, "ready_probe": 29.8, "total": 29.9}
FROM_STORE = {"lookup": 0.01, "prefetch": 0.6, "materialize": 1.7, "criu_restore": 2.5, "cuda_restore": 0.5,
              "after_restore": 0.01, "ready_probe": 0.0, "total": 5.4}  # fmt: skip
WARM = {"materialize": 0.0, "criu_restore": 2.0, "cuda_restore": 0.5, "after_restore": 0.0, "total": 2.6}


def _ups() -> list[Up]:
    return [
        Up("cold boot", "cold", "r1", 29.9, 30.0, True, COLD),
        Up("from store", "store", "r2", 5.9, 6.0, True, FROM_STORE),
        Up("warm", "cache", "r3", 2.9, 3.0, True, WARM),
        Up("resume", "resume", "r3", 1.1, 1.2, False, {"cuda_restore": 1.1, "total": 1.1}),
    ]


def test_ratios() -> None:
    r = ratios(_ups(), Raw(2.5, {"criu_restore": 2.0}, materialize_s=1.0, answer_identical=True))
    assert r["cold_over_2_store"] == 5.0
    assert r["cold_over_3_cache"] == 10.0
    assert r["cold_over_4_resume"] == 25.0
    assert r["2_store_over_raw"] == 2.4 and r["2_store_overhead_s"] == 3.5
    assert r["3_cache_over_raw"] == 1.2 and r["3_cache_overhead_s"] == 0.5
    # what the same restore spent outside its own engine steps (criu, cuda, hook, probe)
    assert r["2_store_minus_own_engine_s"] == pytest.approx(6.0 - 3.01)
    assert r["3_cache_minus_own_engine_s"] == 0.5
    assert not any(k.startswith("4_resume_") and "raw" in k for k in r)  # a resume is no restore


def test_ratios_without_a_cold_boot_or_raw() -> None:
    ups = _ups()[1:]
    r = ratios(ups, None)
    assert not any(k.startswith("cold_over") or "raw" in k or "overhead" in k for k in r)
    assert "1_store_minus_own_engine_s" in r


def test_table_and_phases() -> None:
    assert phases_line({"total": 2.0, "zeta": 1.0, "lookup": 0.5}) == "lookup 0.50  total 2.00  zeta 1.00"
    text = table(_ups(), Raw(2.5, {"criu_restore": 2.0}, 1.0, True), 3 * 2**30)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["#", "step", "tier"]
    assert "NO" in lines[4] and "yes" in lines[1]  # the resume's answer differed
    assert "engine.restore alone" in lines[5]
    assert "image: 3.00 GiB" in text and "cold_over_3_cache: 10.0" in text
