"""compose/, the Dockerfile and the Grafana dashboard, checked without a Docker engine.

With `docker compose` present, `docker compose config` validates the files too. Span names the
dashboard queries must come from tests/span_contract.py (what the restorer emits).
"""

from __future__ import annotations

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
}  # fmt: skip
SNAPSCALE_SERVICES = ("scaler", "gpu-host")
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


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${VAR:-default}` substitution (enough of it for our files)."""
    return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


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


def _docker_compose() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        r = subprocess.run([*cmd, "version"], capture_output=True, text=True, check=False)
        if r.returncode == 0:
            return cmd
    return None


def test_docker_compose_config_validates() -> None:
    cmd = _docker_compose()
    if cmd is None:
        pytest.skip("no `docker compose` here; the structural tests below stand in for it")
    for files in ([COMPOSE_FILE], [COMPOSE_FILE, CPU_FILE], [COMPOSE_FILE, CLUSTER_FILE]):
        args = [a for f in files for a in ("-f", str(f))]
        r = subprocess.run([*cmd, *args, "config", "-q"], capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr


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
    for name in ("nats", "minio", "prometheus", "grafana", "scaler", "gpu-host"):
        hc = services[name].get("healthcheck")
        assert hc and hc["test"][0] in ("CMD", "CMD-SHELL"), f"{name} lacks a healthcheck"
    # JetStream, not just the server: the healthcheck asks for it.
    assert "js-enabled" in " ".join(services["nats"]["healthcheck"]["test"])
    cmd = services["nats"]["command"]
    assert "-js" in cmd and "-sd" in cmd


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


def _service_env(compose: dict[str, Any], name: str) -> dict[str, str]:
    env = compose["services"][name]["environment"]
    assert isinstance(env, dict)
    return {k: interpolate(str(v), {}) for k, v in env.items()}


def test_snapscale_services_get_their_settings(compose: dict[str, Any]) -> None:
    services = compose["services"]
    bucket_cmd = " ".join(services["minio-init"]["entrypoint"])
    for name in SNAPSCALE_SERVICES:
        env = _service_env(compose, name)
        missing = [k for k in SNAPSCALE_ENV if not env.get(k)]
        assert not missing, f"{name} lacks {missing}"
        # The same parser the services use accepts it.
        s = Settings.from_env(env)
        assert s.store.scheme == "s3"
        assert f"local/{s.store.bucket}" in bucket_cmd, "minio-init must create the bucket the services use"
        assert s.store.endpoint_url == "http://minio:9000"
        assert s.nats_url == "nats://nats:4222"
        assert s.signing_key
        assert s.otlp_endpoint == "http://otel-collector:4318"
        minio_user = services["minio"]["environment"]["MINIO_ROOT_USER"]
        assert env["AWS_ACCESS_KEY_ID"] == interpolate(minio_user, {})
        assert services[name]["build"]["dockerfile"] == "Dockerfile"
        assert (COMPOSE / services[name]["build"]["context"] / "Dockerfile").is_file()


def test_gpu_host_can_checkpoint(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["gpu-host"]
    assert gpu["privileged"] is True
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    targets = {v["target"]: v for v in gpu["volumes"] if isinstance(v, dict)}
    assert targets["/run/netns"]["bind"]["propagation"] == "rshared"
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


def test_ports_published(compose: dict[str, Any]) -> None:
    def published(name: str) -> set[int]:
        return {int(str(p).split(":")[0]) for p in compose["services"][name].get("ports", [])}

    assert {4317, 4318} <= published("otel-collector")
    assert 3000 in published("grafana")
    assert 4222 in published("nats")
    assert {9000, 9001} <= published("minio")


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


def test_tempo_generates_the_metrics_the_dashboard_reads() -> None:
    tempo = load_yaml(COMPOSE / "tempo.yaml")
    processors = tempo["overrides"]["defaults"]["metrics_generator"]["processors"]
    assert {"span-metrics", "local-blocks"} <= set(processors)
    dims = tempo["metrics_generator"]["processor"]["span_metrics"]["dimensions"]
    assert {sc.TIER_ATTR, sc.FALLBACK_ATTR} <= set(dims)
    assert tempo["metrics_generator"]["processor"]["local_blocks"]["filter_server_spans"] is False
    assert tempo["metrics_generator"]["storage"]["remote_write"][0]["url"].startswith(
        "http://prometheus:9090/"
    )


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
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Admin"


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
    # What the issue asks the dashboard to show.
    assert sc.SCALE_UP_SPAN in seen_names
    assert set(sc.RESTORE_PHASES) <= seen_names, "every restore phase in the breakdown"
    wanted = {sc.TIER_ATTR, sc.FALLBACK_ATTR, sc.PREFETCH_BYTES_ATTR, sc.PREFETCH_CACHED_BYTES_ATTR}
    assert wanted <= seen_attrs


def test_promql_queries_read_tempo_span_metrics(dashboard: dict[str, Any]) -> None:
    tempo = load_yaml(COMPOSE / "tempo.yaml")
    dimensions = tempo["metrics_generator"]["processor"]["span_metrics"]["dimensions"]
    dims = {d.replace(".", "_") for d in dimensions}
    labels_ok = dims | {"le", "span_name", "service"}
    metric = sc.TIME_TO_READY_METRIC.replace(".", "_")
    targets = _targets(dashboard, "prometheus")
    assert targets
    seen_metric = False
    for t in targets:
        expr = t["expr"]
        assert _balanced(expr), expr
        if metric in expr:
            seen_metric = True
            for group in _PROM_LABEL.findall(expr):
                labels = {x.strip() for x in group.split(",")}
                assert labels <= sc.TIME_TO_READY_LABELS | {"le"}, f"{expr}: {labels} not on the histogram"
            continue
        assert "traces_spanmetrics_" in expr
        for _op, value in _PROM_SPAN.findall(expr):
            assert set(value.split("|")) <= sc.SPAN_NAMES, expr
        for group in _PROM_LABEL.findall(expr):
            labels = {x.strip() for x in group.split(",")}
            assert labels <= labels_ok, f"{expr}: labels {labels - labels_ok} are not span-metrics dimensions"
    assert seen_metric, "a panel reads the restorer's own time-to-ready histogram"


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


CLUSTER_FILE = COMPOSE / "docker-compose.cluster.yml"


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Compose's merge of an override file, as far as these files use it: mappings merge key by
    key (environment too), a list replaces (command)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_cluster_override_runs_three_routed_nats_nodes_and_r3_services(compose: dict[str, Any]) -> None:
    over = load_yaml(CLUSTER_FILE)
    merged = _merged(compose, over)
    services = merged["services"]
    nodes = ["nats", "nats-2", "nats-3"]
    names, routes = set(), set()
    for node in nodes:
        cmd = services[node]["command"]
        assert "-js" in cmd and cmd[cmd.index("--cluster_name") + 1] == "snapscale"
        names.add(cmd[cmd.index("-n") + 1])
        routes.add(cmd[cmd.index("-routes") + 1])
        assert "js-enabled" in " ".join(services[node]["healthcheck"]["test"])
    assert len(names) == 3, "every node needs its own server name in a JetStream cluster"
    [route_list] = routes  # one route list, naming every node's cluster port
    assert sorted(u.split("//")[1].split(":")[0] for u in route_list.split(",")) == sorted(nodes)
    assert {"nats-2-data", "nats-3-data"} <= set(merged["volumes"])
    for name in SNAPSCALE_SERVICES:
        env = {k: interpolate(str(v), {}) for k, v in services[name]["environment"].items()}
        s = Settings.from_env(env)  # the services' own parser
        assert [u.split("//")[1].split(":")[0] for u in s.nats_servers] == nodes
        assert s.js_replicas == 3
        assert s.store.scheme == "s3", "the override keeps the base file's other settings"
        assert {"nats", "nats-2", "nats-3"} <= set(services[name]["depends_on"])
