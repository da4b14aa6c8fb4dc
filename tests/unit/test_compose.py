"""compose.yaml as production would run it (no Docker engine here: its structure is
checked): each process under its own role and user, passwords only from the
environment that scripts/gen-secrets writes, nothing published beyond localhost."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml

from tests.helpers import ROOT

COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
URL = re.compile(r"^[a-z+]+://(?P<user>[^:@/]+):(?P<password>[^@]+)@")


def env(service: str) -> dict[str, str]:
    return dict(SERVICES[service].get("environment") or {})


def test_each_process_has_its_own_identity_and_no_superuser() -> None:
    users = {}
    for service in ("migrate", "manager", "runner"):
        for key, value in env(service).items():
            m = URL.match(str(value))
            if m:
                users[(service, key)] = m["user"]
                # Every password is a variable the secrets file fills, never a literal.
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", m["password"]), (service, key)
    assert users == {
        ("migrate", "TASKMGR_DATABASE_URL"): "taskmgr_owner",
        ("manager", "TASKMGR_DATABASE_URL"): "taskmgr_manager",
        ("manager", "TASKMGR_AMQP_URL"): "taskmgr_manager",
        ("runner", "TASKMGR_AMQP_URL"): "taskmgr_runner",
    }
    assert "TASKMGR_DATABASE_URL" not in env("runner"), "runners hold no database credentials"
    text = (ROOT / "compose.yaml").read_text()
    assert "postgres:postgres" not in text and "guest:guest" not in text


def test_ports_are_published_on_localhost_unless_asked() -> None:
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert str(port).startswith("${TASKMGR_BIND:-127.0.0.1}:"), (name, port)


def test_the_broker_users_of_compose_are_those_of_this_machine() -> None:
    """One list of RabbitMQ users and permissions (scripts/rabbitmq-users), read by both
    scripts/setup.sh and the compose one-shot service; compose sets a password for each."""
    users = [
        line.split()[0]
        for line in (ROOT / "scripts" / "rabbitmq-users").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert users == ["taskmgr_manager", "taskmgr_runner", "taskmgr_service", "taskmgr_consumer"]
    wanted = {f"TASKMGR_RABBIT_PASSWORD_{u.upper()}" for u in users}
    assert wanted <= set(env("rabbitmq-users"))


def test_gen_secrets_writes_a_private_env_file_with_every_variable(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    (copy / "scripts").mkdir(parents=True)
    (copy / "scripts" / "gen-secrets").write_bytes((ROOT / "scripts" / "gen-secrets").read_bytes())
    subprocess.run(["bash", str(copy / "scripts" / "gen-secrets")], check=True, capture_output=True)
    written = copy / ".env"
    assert oct(os.stat(written).st_mode & 0o777) == "0o600"
    values = dict(line.split("=", 1) for line in written.read_text().splitlines() if "=" in line)
    needed = set(re.findall(r"\$\{([A-Z_]+):\?", (ROOT / "compose.yaml").read_text()))
    assert needed <= set(values), needed - set(values)
    assert all(len(v) >= 24 for v in values.values())
    again = subprocess.run(["bash", str(copy / "scripts" / "gen-secrets")], capture_output=True, text=True)
    assert again.returncode == 1 and "exists" in again.stderr


# -- the observability profile: Prometheus with its alerts, Alertmanager, a receiver -------

OBSERVABILITY = ("prometheus", "alertmanager", "alert-receiver", "grafana")


def mounts(service: str) -> dict[str, str]:
    """Container path -> repository path of a service's bind mounts."""
    out = {}
    for volume in SERVICES[service].get("volumes", []):
        source, target = volume.removesuffix(":ro").split(":", 1)
        if source.startswith("./"):
            out[target] = source
    return out


def test_the_observability_services_come_only_with_their_profile() -> None:
    for name in OBSERVABILITY:
        assert SERVICES[name]["profiles"] == ["observability"], name
    for name, service in SERVICES.items():
        if name not in OBSERVABILITY:
            # Every other service runs with `up`, but the tools run by hand (tokens).
            assert service.get("profiles") in (None, ["tools"]), name
    for name in OBSERVABILITY:
        for source in mounts(name).values():
            assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"


def test_prometheus_loads_the_alert_rules_beside_its_config_and_sends_to_alertmanager() -> None:
    files = mounts("prometheus")
    assert files["/etc/prometheus/prometheus.yml"] == "./docs/observability/prometheus.yml"
    config = yaml.safe_load((ROOT / files["/etc/prometheus/prometheus.yml"]).read_text())
    for rule_file in config["rule_files"]:
        # A relative path is read beside the config: it must be mounted there.
        assert files.get(f"/etc/prometheus/{rule_file}") == f"./docs/observability/{rule_file}", rule_file
    assert "./docs/observability/alerts.yml" in files.values()
    targets = [
        t for am in config["alerting"]["alertmanagers"] for sc in am["static_configs"] for t in sc["targets"]
    ]
    assert targets == ["alertmanager:9093"]
    assert "alertmanager" in SERVICES and "alertmanager" in SERVICES["prometheus"]["depends_on"]


def test_alertmanager_routes_every_alert_to_the_example_webhook_receiver() -> None:
    files = mounts("alertmanager")
    # The image's default config path: no command-line flag needed.
    config = yaml.safe_load((ROOT / files["/etc/alertmanager/alertmanager.yml"]).read_text())
    receivers = {r["name"]: r for r in config["receivers"]}
    assert config["route"]["receiver"] in receivers
    for route in config["route"].get("routes", []):
        assert route["receiver"] in receivers
    (hook,) = receivers[config["route"]["receiver"]]["webhook_configs"]
    m = re.fullmatch(r"http://(?P<host>[\w-]+):(?P<port>\d+)/\S*", hook["url"])
    assert m and hook["send_resolved"] is True
    # The URL reaches the receiver service, which listens on that port and runs the
    # example from the repository.
    receiver = SERVICES[m["host"]]
    assert receiver["command"][-2:] == ["--port", m["port"]]
    assert mounts(m["host"])[receiver["command"][1]] == "./examples/alert_receiver.py"
    assert m["host"] in SERVICES["alertmanager"]["depends_on"]
    rules = yaml.safe_load((ROOT / "docs" / "observability" / "alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    for inhibit in config.get("inhibit_rules", []):
        for matcher in inhibit["source_matchers"] + inhibit["target_matchers"]:
            assert re.fullmatch(r'alertname="(\w+)"', matcher)[1] in names, matcher  # type: ignore[index]
