"""The deployment spec refuses what an operator gets wrong, every problem at once with its field
path, before anything is deployed; the examples still load."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import orjson
import pytest

from snapscale.shared.bus.spec import DeploymentSpec, HooksSpec, ReadySpec, ScalingSpec, load_spec
from snapscale.shared.core.errors import ConfigError
from snapscale.shared.core.fieldcheck import FieldsError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

CARELESS = """\
[deployment]
name = "a.b"
command = []
prot = 8000
port = 99999
gpus = -2
[deployment.scaling]
utilization = 7
min_replicas = 5
max_replicas = 2
ready_timeout_s = -1
stable_window_s = nan
relase_mode = "stop"
[deployment.ready]
timeout_s = "soon"
[scaling]
max_replicas = 1
"""


def problems(text: str, tmp_path: Path) -> dict[str, str]:
    p = tmp_path / "spec.toml"
    p.write_text(text)
    with pytest.raises(FieldsError) as got:
        load_spec(p)
    assert str(p) in str(got.value)
    return {pr.path: pr.reason for pr in got.value.problems}


def test_every_problem_at_once_with_its_path(tmp_path: Path) -> None:
    got = problems(CARELESS, tmp_path)
    assert set(got) == {
        "scaling",
        "deployment.prot",
        "deployment.name",
        "deployment.command",
        "deployment.port",
        "deployment.gpus",
        "deployment.ready.timeout_s",
        "deployment.scaling.relase_mode",
        "deployment.scaling.utilization",
        "deployment.scaling.stable_window_s",
        "deployment.scaling.ready_timeout_s",
        "deployment.scaling.min_replicas",
    }
    assert got["deployment.prot"] == "unknown key (did you mean 'port'?)"
    assert got["deployment.scaling.relase_mode"] == "unknown key (did you mean 'release_mode'?)"
    assert "did you mean deployment.scaling" in got["scaling"]
    assert "65535, got 99999" in got["deployment.port"]
    assert "got -2" in got["deployment.gpus"]
    assert "at most 1, got 7" in got["deployment.scaling.utilization"]
    assert "finite" in got["deployment.scaling.stable_window_s"]
    assert "above 0" in got["deployment.scaling.ready_timeout_s"]
    assert got["deployment.scaling.min_replicas"] == "5 is above max_replicas (2)"
    assert "expected a number" in got["deployment.ready.timeout_s"]
    assert "subject token" in got["deployment.name"]


def test_a_key_far_from_any_lists_the_known_ones(tmp_path: Path) -> None:
    got = problems('name = "x"\ncommand = ["true"]\nzzz = 1\n', tmp_path)
    assert got["zzz"].startswith("unknown key (known: name, command, env")


@pytest.mark.parametrize(
    ("scaling", "path", "needle"),
    [
        ("panic_window_s = 90.0\nstable_window_s = 60.0", "scaling.panic_window_s", "above stable_window_s"),
        ("min_replicas = 1\nmax_replicas = 0", "scaling.min_replicas", "above max_replicas"),
        ("max_scale_down_rate = 1.0", "scaling.max_scale_down_rate", "above 1"),
        ("scale_to_zero_after_s = inf", "scaling.scale_to_zero_after_s", "finite"),
        ("target_concurrency = 0", "scaling.target_concurrency", "above 0"),
    ],
)
def test_ranges_and_cross_field_rules(scaling: str, path: str, needle: str, tmp_path: Path) -> None:
    got = problems(f'name = "x"\ncommand = ["true"]\n[scaling]\n{scaling}\n', tmp_path)
    assert list(got) == [path]
    assert needle in got[path]


def test_a_mistyped_field_is_not_also_judged_by_a_cross_field_rule(tmp_path: Path) -> None:
    spec = 'name = "x"\ncommand = ["true"]\n[scaling]\nmin_replicas = "3"\nmax_replicas = 1\n'
    got = problems(spec, tmp_path)
    assert list(got) == ["scaling.min_replicas"] and "expected an integer" in got["scaling.min_replicas"]


def test_hook_and_probe_paths_are_url_paths(tmp_path: Path) -> None:
    got = problems(
        'name = "x"\ncommand = ["true"]\n[ready]\nhttp_path = "healthz"\n[hooks]\nbefore_freeze = "x"\n',
        tmp_path,
    )
    assert set(got) == {"ready.http_path", "hooks.before_freeze"}


def test_kv_values_get_the_same_checks() -> None:
    """The scaler and restorer read specs from KV: one written there by hand is refused alike."""
    good = DeploymentSpec(name="x", command=["true"])
    assert DeploymentSpec.from_json(good.to_json()) == good
    plain = orjson.loads(good.to_json())
    plain["scaling"]["max_replicas"] = -1
    plain["colour"] = "blue"
    with pytest.raises(FieldsError) as got:
        DeploymentSpec.from_json(orjson.dumps(plain))
    assert [p.path for p in got.value.problems] == ["colour", "scaling.max_replicas"]
    with pytest.raises(ConfigError, match="not JSON"):
        DeploymentSpec.from_json(b"{")


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_the_examples_load(path: Path) -> None:
    assert load_spec(path).command


@pytest.mark.parametrize("cls", [DeploymentSpec, ReadySpec, HooksSpec, ScalingSpec])
def test_every_number_declares_its_range(cls: type) -> None:
    """A field added later gets a range in its class's LIMITS table, or this fails naming it."""
    hints = typing.get_type_hints(cls)
    numbers = [f.name for f in dataclasses.fields(cls) if hints[f.name] in (int, float)]
    assert numbers or cls is not ScalingSpec
    missing = [n for n in numbers if n not in cls.LIMITS]  # type: ignore[attr-defined]
    assert not missing, f"{cls.__name__}: no range declared in LIMITS for {missing}"
