"""compose/: every service the settings name exists with a healthcheck, and the
addresses compose/README.md tells users to export match what the compose file publishes.

Docker does not run here, so this checks the files against each other.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from sluicegate.settings import Settings

COMPOSE_DIR = Path(__file__).resolve().parents[2] / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
README = COMPOSE_DIR / "README.md"

# compose service -> the settings field (SLUICE_<FIELD>) that points sluice at it.
SERVICE_SETTING = {
    "nats": "nats_url",
    "kafka": "kafka_bootstrap",
    "postgres": "database_url",
    "otel-collector": "otlp_endpoint",
}


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


@pytest.fixture(scope="module")
def exports() -> dict[str, str]:
    """``export SLUICE_X=value`` lines of the README, by settings field name."""
    pairs = re.findall(r"^export SLUICE_([A-Z_]+)=(\S+)", README.read_text(), re.MULTILINE)
    return {name.lower(): value for name, value in pairs}


def published(service: dict[str, Any]) -> dict[int, int]:
    """Host port -> container port, from ``[host_ip:]host:container`` entries."""
    ports: dict[int, int] = {}
    for entry in service.get("ports", []):
        *_, host, container = str(entry).split(":")
        ports[int(host)] = int(container)
    return ports


def url_port(value: str) -> int:
    port = urlsplit(value if "://" in value else f"tcp://{value}").port
    assert port is not None, f"{value} names no port"
    return port


def test_settings_still_have_the_fields_compose_serves() -> None:
    for field in SERVICE_SETTING.values():
        assert field in Settings.model_fields, f"Settings has no {field}; update this test"


@pytest.mark.parametrize("name", [*SERVICE_SETTING, "jaeger"])
def test_service_exists_with_a_healthcheck(services: dict[str, dict[str, Any]], name: str) -> None:
    assert name in services, f"compose/docker-compose.yml has no service {name!r}"
    check = services[name].get("healthcheck", {})
    assert check.get("test"), f"service {name!r} has no healthcheck test"
    assert not check.get("disable"), f"service {name!r} disables its healthcheck"


def test_every_long_running_service_has_a_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        if service.get("restart") == "no":  # a one-shot init container
            continue
        assert service.get("healthcheck"), f"service {name!r} has no healthcheck"


def test_readme_exports_every_service_url(exports: dict[str, str]) -> None:
    for service, field in SERVICE_SETTING.items():
        assert field in exports, f"compose/README.md exports no SLUICE_{field.upper()} ({service})"


@pytest.mark.parametrize(("service", "field"), SERVICE_SETTING.items())
def test_exported_port_is_published_by_its_service(
    services: dict[str, dict[str, Any]], exports: dict[str, str], service: str, field: str
) -> None:
    port = url_port(exports[field])
    ports = published(services[service])
    assert port in ports, f"SLUICE_{field.upper()} uses port {port}; {service} publishes {ports}"
    assert ports[port] == port, f"{service} maps host {port} to container {ports[port]}"


def test_kafka_advertises_the_exported_address(
    services: dict[str, dict[str, Any]], exports: dict[str, str]
) -> None:
    env = services["kafka"]["environment"]
    advertised = [urlsplit(u.strip()) for u in env["KAFKA_ADVERTISED_LISTENERS"].split(",")]
    host, port = exports["kafka_bootstrap"].rsplit(":", 1)
    assert any(u.hostname == host and u.port == int(port) for u in advertised), (
        f"clients bootstrapping at {host}:{port} are not told that address: {advertised}"
    )
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller", "not a single-node KRaft setup"
    cluster_id = env["CLUSTER_ID"]
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16, "CLUSTER_ID is not a UUID"


def test_postgres_credentials_match_the_exported_url(
    services: dict[str, dict[str, Any]], exports: dict[str, str]
) -> None:
    env = services["postgres"]["environment"]
    url = urlsplit(exports["database_url"])
    assert url.username == env["POSTGRES_USER"]
    assert url.password == env["POSTGRES_PASSWORD"]
    assert url.path.lstrip("/") == env["POSTGRES_DB"]


def test_nats_runs_jetstream_on_a_volume(services: dict[str, dict[str, Any]]) -> None:
    nats = services["nats"]
    command = nats["command"]
    assert "-js" in command
    store = command[command.index("-sd") + 1]
    assert any(str(v).endswith(f":{store}") for v in nats["volumes"]), (
        "JetStream store not on a volume"
    )


def test_collector_config_matches_its_ports_and_healthcheck(
    services: dict[str, dict[str, Any]], exports: dict[str, str]
) -> None:
    collector = services["otel-collector"]
    source = next(v.split(":")[0] for v in collector["volumes"] if v.startswith("./"))
    config = yaml.safe_load((COMPOSE_DIR / source).read_text())
    protocols = config["receivers"]["otlp"]["protocols"]
    assert url_port(protocols["http"]["endpoint"]) == url_port(exports["otlp_endpoint"])
    health_port = url_port(config["extensions"]["health_check"]["endpoint"])
    assert f":{health_port}/" in " ".join(collector["healthcheck"]["test"])
    assert "traces" in config["service"]["pipelines"]


def test_every_address_in_readme_is_published(services: dict[str, dict[str, Any]]) -> None:
    all_published = {port for s in services.values() for port in published(s)}
    mentioned = {
        int(p) for p in re.findall(r"(?:127\.0\.0\.1|localhost):(\d+)", README.read_text())
    }
    missing = mentioned - all_published
    assert not missing, f"compose/README.md names ports no service publishes: {sorted(missing)}"
