"""Settings come from the environment once, with clear errors for bad values; specs parse strictly."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapscale.shared.bus.auth import connect_options
from snapscale.shared.bus.spec import DeploymentSpec, load_spec
from snapscale.shared.bus.subjects import Bucket, Subjects, Verb
from snapscale.shared.core.errors import ConfigError
from snapscale.shared.core.settings import Settings


def test_from_env_reads_everything() -> None:
    s = Settings.from_env(
        {
            "SNAPSCALE_NATS_URL": "nats://n:4222",
            "SNAPSCALE_STORE": "s3://bkt/some/prefix",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
            "SNAPSCALE_SIGNING_KEY": "k",
            "SNAPSCALE_CACHE_DIR": "/tmp/c",
            "SNAPSCALE_HOST_ID": "gpu-7",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
            "SNAPSCALE_S3_DIRECT_GET": "0",
        }
    )
    assert s.nats_url == "nats://n:4222"
    assert (s.store.scheme, s.store.bucket, s.store.prefix) == ("s3", "bkt", "some/prefix")
    assert s.store.endpoint_url == "http://127.0.0.1:9000"
    assert s.signing_key == b"k"
    assert s.cache_dir == Path("/tmp/c")
    assert s.host_id == "gpu-7"
    assert s.otlp_endpoint == "http://127.0.0.1:4318"
    assert not s.store.direct_get and Settings.from_env({}).store.direct_get


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"SNAPSCALE_STORE": "ftp://x"}, "file:///path or s3://"),
        ({"SNAPSCALE_STORE": "s3:///nobucket"}, "needs a bucket"),
        ({"SNAPSCALE_STORE": "file://relative"}, "absolute path"),
        ({"SNAPSCALE_CACHE_BYTES": "lots"}, "not an integer"),
        ({"SNAPSCALE_S3_DIRECT_GET": "maybe"}, "say 1 or 0"),
        ({"SNAPSCALE_METRICS_PORT": "70000"}, "1-65535"),
        ({"SNAPSCALE_METRICS_PORT": "metrics"}, "not an integer"),
        ({"SNAPSCALE_NATS_USER": "u", "SNAPSCALE_NATS_TOKEN": "t"}, "not \\['user', 'token'\\]"),
        ({"SNAPSCALE_NATS_TOKEN": "t", "SNAPSCALE_NATS_CREDS": "/c"}, "not \\['token', 'creds'\\]"),
        ({"SNAPSCALE_NATS_PASSWORD": "p"}, "without SNAPSCALE_NATS_USER"),
        ({"SNAPSCALE_NATS_CERT": "/c.pem"}, "go together"),
    ],
)
def test_bad_env_is_a_config_error(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        Settings.from_env(env)


def test_metrics_endpoint_is_opt_in_and_local_by_default() -> None:
    assert Settings.from_env({}).metrics_address is None
    assert Settings.from_env({"SNAPSCALE_METRICS_PORT": "9464"}).metrics_address == ("127.0.0.1", 9464)
    s = Settings.from_env({"SNAPSCALE_METRICS_PORT": "9464", "SNAPSCALE_METRICS_HOST": "0.0.0.0"})
    assert s.metrics_address == ("0.0.0.0", 9464)


def test_nats_credentials_become_connect_options() -> None:
    """Each credential reaches nats-py as the option it reads; secrets stay out of the repr."""
    env = {"SNAPSCALE_NATS_USER": "scaler", "SNAPSCALE_NATS_PASSWORD": "pw"}
    env["SNAPSCALE_NATS_INBOX"] = "_INBOX.sc"
    s = Settings.from_env(env)
    assert connect_options(s.nats_auth) == {"user": "scaler", "password": "pw", "inbox_prefix": "_INBOX.sc"}
    assert "pw" not in repr(s)
    assert connect_options(Settings.from_env({"SNAPSCALE_NATS_TOKEN": "tk"}).nats_auth) == {"token": "tk"}
    assert connect_options(Settings.from_env({"SNAPSCALE_NATS_CREDS": "/etc/x.creds"}).nats_auth) == {
        "user_credentials": "/etc/x.creds"
    }
    assert connect_options(Settings.from_env({"SNAPSCALE_NATS_NKEY": "/etc/u.nk"}).nats_auth) == {
        "nkeys_seed": "/etc/u.nk"
    }
    assert connect_options(Settings.from_env({}).nats_auth) == {}  # anonymous


def test_signing_key_required_when_used() -> None:
    with pytest.raises(ConfigError, match="SNAPSCALE_SIGNING_KEY"):
        Settings.from_env({}).require_signing_key()


def test_subjects_match_design() -> None:
    s = Subjects()
    assert s.traffic("llm") == "snapscale.traffic.llm"
    assert s.cmd(Verb.SCALE_UP, "h1") == "snapscale.cmd.scale-up.h1"
    assert s.evt_replica("llm") == "snapscale.evt.replica.llm"
    assert s.evt_checkpoint("llm") == "snapscale.evt.checkpoint.llm"
    assert s.evt_host("h1") == "snapscale.evt.host.h1"
    assert s.bucket(Bucket.CHECKPOINTS) == "checkpoints"
    assert Subjects("t1").bucket(Bucket.CHECKPOINTS) == "t1_checkpoints"
    with pytest.raises(ValueError, match="subject token"):
        s.traffic("a.b")


def test_spec_from_toml(tmp_path: Path) -> None:
    p = tmp_path / "spec.toml"
    p.write_text(
        '[deployment]\nname = "llm"\ncommand = ["python", "-m", "server"]\ngpus = 1\n'
        "[deployment.scaling]\nstable_window_s = 30.0\nmax_replicas = 4\n"
    )
    d = load_spec(p)
    assert d.name == "llm" and d.gpus == 1
    assert d.scaling.stable_window_s == 30.0 and d.scaling.max_replicas == 4
    assert DeploymentSpec.from_json(d.to_json()) == d


def test_spec_hash_ignores_scaling_knobs() -> None:
    a = DeploymentSpec(name="d", command=["x"])
    b = DeploymentSpec.from_json(a.to_json().replace(b'"max_replicas":10', b'"max_replicas":3'))
    c = DeploymentSpec(name="d", command=["y"])
    assert b.scaling.max_replicas == 3
    assert a.spec_hash() == b.spec_hash() != c.spec_hash()


def test_bad_spec_names_the_field(tmp_path: Path) -> None:
    p = tmp_path / "spec.toml"
    p.write_text('name = "llm"\ncommand = ["x"]\ngpus = "two"\n')
    with pytest.raises(ConfigError, match=r"gpus: expected an integer"):
        load_spec(p)


def test_nats_url_lists_a_cluster_and_js_replicas_is_read() -> None:
    s = Settings.from_env(
        {"SNAPSCALE_NATS_URL": "nats://a:4222, nats://b:4222,tls://c:4443", "SNAPSCALE_JS_REPLICAS": "3"}
    )
    assert s.nats_servers == ["nats://a:4222", "nats://b:4222", "tls://c:4443"]
    assert s.js_replicas == 3
    assert Settings.from_env({}).js_replicas == 1


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"SNAPSCALE_NATS_URL": "nats://a:4222,,nats://b:4222"}, "empty server entry"),
        ({"SNAPSCALE_NATS_URL": "nats://a:4222,b:4222"}, "'b:4222' is not a NATS URL"),
        ({"SNAPSCALE_NATS_URL": "http://a:4222"}, "not a NATS URL"),
        ({"SNAPSCALE_NATS_URL": "nats://a:42x"}, "bad port"),
        ({"SNAPSCALE_JS_REPLICAS": "0"}, "SNAPSCALE_JS_REPLICAS=0: JetStream keeps 1 to 5"),
        ({"SNAPSCALE_JS_REPLICAS": "three"}, "not an integer"),
    ],
)
def test_bad_nats_settings_name_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        Settings.from_env(env)
