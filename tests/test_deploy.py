"""Offline checks of deploy/: the image, compose, Kubernetes and Prometheus files agree with the
code they deploy (commands, RELAY_* settings, ports, queue names, metric names).

No broker, database or Docker engine is needed. promtool, hadolint and docker compose are used
when installed, and their checks skipped otherwise.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from relay.broker import topology_of
from relay.broker.topology import StageName, Topology
from relay.commands.main import SERVICES, build_parser
from relay.metrics import Metrics
from relay.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
# The lock the image installs (`make lock` writes it), relative to the build context.
RUNTIME_LOCK = "requirements/runtime.txt"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"

# The oldest Kubernetes the manifests support, and the newest schema kubernetes-validate knows.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
KEDA_API = "keda.sh/v1alpha1"

# The metrics Relay exports, as the alert rules rely on them: name -> (type, labels). The
# alerts may also use what relay.metrics.Metrics registers today.
METRICS_CONTRACT: dict[str, tuple[str, frozenset[str]]] = {
    "relay_dead_letters": ("gauge", frozenset({"stage"})),
    "relay_queue_messages": ("gauge", frozenset({"stage", "queue"})),
    "relay_queue_consumers": ("gauge", frozenset({"stage", "queue"})),
    "relay_message_age_seconds": ("histogram", frozenset({"stage"})),
    "relay_end_to_end_seconds": ("histogram", frozenset()),
    "relay_delivery_attempts": ("counter", frozenset({"outcome", "status_class"})),
    "relay_endpoint_circuit": ("gauge", frozenset({"endpoint"})),
    "relay_http_requests": ("counter", frozenset({"method", "route", "status"})),
    "relay_messages_consumed": ("counter", frozenset({"stage", "outcome"})),
    "relay_bot_failures": ("counter", frozenset()),
    "relay_partition_oldest_unstarted_seconds": ("gauge", frozenset({"stage", "partition"})),
}
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
}
PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset"})


# --- loading ---------------------------------------------------------------------------------


def load_all(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file."""
    with path.open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def load_one(path: Path) -> dict[str, Any]:
    """The single YAML document of a file."""
    (doc,) = load_all(path)
    return doc


def yaml_files() -> list[Path]:
    """Every YAML file under deploy/."""
    return sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])


@cache
def k8s_documents() -> tuple[dict[str, Any], ...]:
    """Every Kubernetes object of deploy/k8s (the kustomization excluded)."""
    return tuple(
        doc
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in load_all(path)
    )


def k8s_objects(kind: str) -> dict[str, dict[str, Any]]:
    """The objects of one kind, by name."""
    return {doc["metadata"]["name"]: doc for doc in k8s_documents() if doc["kind"] == kind}


def compose_services() -> dict[str, dict[str, Any]]:
    """The compose services (YAML merge keys resolved)."""
    services: dict[str, dict[str, Any]] = load_one(COMPOSE)["services"]
    return services


def relay_services() -> dict[str, dict[str, Any]]:
    """The compose services that run the Relay image."""
    return {
        name: service
        for name, service in compose_services().items()
        if service.get("build", {}).get("dockerfile") == "deploy/Dockerfile"
    }


def settings_with(env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as a process with exactly these RELAY_* variables builds them."""
    for name in [n for n in os.environ if n.startswith("RELAY_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    return Settings(_env_file=None)


def parse_relay(args: list[str]) -> argparse.Namespace:
    """The arguments as `relay` parses them; a test failure (not an exit) if it refuses them."""
    try:
        return build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"`relay {shlex.join(args)}` is not a valid relay command")


def served_port(args: argparse.Namespace, settings: Settings) -> int:
    """The port a `relay` service command listens on."""
    ports: dict[str, int] = {
        "ingress": settings.http_port,
        "run": settings.http_port,
        "bot-worker": settings.bot_worker_port,
        "delivery-worker": settings.delivery_worker_port,
    }
    if args.command == "sink":
        port: int = args.port
        return port
    return ports[args.command]


def k8s_env() -> dict[str, str]:
    """What the pods get through envFrom: the ConfigMap's data and the Secret's stringData."""
    env = dict(k8s_objects("ConfigMap")["relay-config"]["data"])
    env.update(k8s_objects("Secret")["relay-secrets"]["stringData"])
    return env


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    arguments: str


def dockerfile_stages() -> list[list[Instruction]]:
    """The Dockerfile's instructions, one list per FROM stage (ARGs before the first left out)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[Instruction]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, arguments = line.partition(" ")
        instruction = Instruction(keyword.upper(), arguments.strip())
        if instruction.keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def relay_variables(text: str) -> set[str]:
    """Every RELAY_* name mentioned in a text."""
    return set(re.findall(r"\bRELAY_[A-Z0-9_]*[A-Z0-9]", text))


# --- every file ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs, f"{path} holds no document"
    assert all(isinstance(doc, dict) for doc in docs)


def test_every_relay_variable_mentioned_is_a_setting() -> None:
    # Comments and the README included: a misspelt name there misleads as much as in a value.
    fields = set(Settings.model_fields)
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        for name in relay_variables(path.read_text()):
            assert name.removeprefix("RELAY_").lower() in fields, f"{path.name}: {name}"


# --- the image -------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_and_runs_relay_as_non_root() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    assert stages[0][0].arguments.endswith(" AS builder")
    final = stages[-1]
    users = [i.arguments for i in final if i.keyword == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), "a numeric uid, which runAsNonRoot can verify"
    assert int(uid) != 0
    (entrypoint,) = [i.arguments for i in final if i.keyword == "ENTRYPOINT"]
    assert yaml.safe_load(entrypoint) == ["relay"]
    (cmd,) = [i.arguments for i in final if i.keyword == "CMD"]
    assert parse_relay(yaml.safe_load(cmd)).run in SERVICES


def test_dockerfile_exposes_the_service_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = settings_with({}, monkeypatch)
    exposed = {
        int(port)
        for i in dockerfile_stages()[-1]
        if i.keyword == "EXPOSE"
        for port in i.arguments.split()
    }
    assert exposed == {
        defaults.http_port,
        defaults.bot_worker_port,
        defaults.delivery_worker_port,
    }


def pip_installs(stage: list[Instruction]) -> list[list[str]]:
    """Every `pip install` command a stage runs, as arguments after `install`."""
    runs = [i.arguments for i in stage if i.keyword == "RUN"]
    commands = [shlex.split(command) for run in runs for command in run.split("&&")]
    return [
        c[c.index("install") + 1 :]
        for c in commands
        if "install" in c and any(word.endswith("pip") for word in c[: c.index("install")])
    ]


def test_the_image_installs_the_runtime_lock_then_relay_alone() -> None:
    # Exactly the versions the tests ran, hash-checked; Relay itself adds nothing unpinned.
    builder, *rest = dockerfile_stages()
    installs = pip_installs(builder)
    assert installs[0][-2:] == ["-r", RUNTIME_LOCK], "the first install is the runtime lock"
    assert "--require-hashes" in installs[0]
    assert installs[1:], "then Relay itself"
    assert all("--no-deps" in args and "-r" not in args for args in installs[1:])
    assert not [args for stage in rest for args in pip_installs(stage)], "only the builder"
    copied = [i.arguments.split()[0] for i in builder if i.keyword == "COPY"]
    assert RUNTIME_LOCK in copied


def test_dockerignore_lets_in_exactly_what_the_build_copies() -> None:
    lines = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allow-list: nothing enters the context unless named"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        source.rstrip("/")
        for stage in dockerfile_stages()
        for i in stage
        if i.keyword == "COPY" and not i.arguments.startswith("--from")
        for source in i.arguments.split()[:-1]
    }
    assert copied <= allowed
    root = DEPLOY.parent
    assert all((root / name).exists() for name in allowed)
    assert not {".env", ".relay", ".git", ".venv"} & allowed


def test_the_root_dockerignore_is_the_same_allow_list() -> None:
    # Without BuildKit, docker reads only the context root's .dockerignore.
    def rules(path: Path) -> list[str]:
        return [line for line in path.read_text().splitlines() if not line.startswith("#")]

    root = DEPLOY.parent
    assert rules(root / ".dockerignore") == rules(DEPLOY / "Dockerfile.dockerignore")


def test_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed")
    result = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- docker compose --------------------------------------------------------------------------


def test_compose_runs_every_service() -> None:
    commands = {parse_relay(service["command"]).command for service in relay_services().values()}
    assert commands == {"ingress", "bot-worker", "delivery-worker", "sink"}
    services = compose_services()
    assert services["bot-worker"]["deploy"]["replicas"] == 2
    assert services["delivery-worker"]["deploy"]["replicas"] == 2
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.13-management")


@pytest.mark.parametrize("name", sorted(relay_services()))
def test_compose_service_command_and_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    service = relay_services()[name]
    assert service["build"]["context"] == ".."
    assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    args = parse_relay(service["command"])
    assert args.run in SERVICES, "a long-running service, not an admin command"
    env = service["environment"]
    assert set(env) <= {f"RELAY_{field.upper()}" for field in Settings.model_fields}
    settings = settings_with(env, monkeypatch)
    assert settings.database_url.startswith("postgresql://")
    assert settings.amqp_url.startswith("amqp://")
    assert settings.http_host == "0.0.0.0", "reachable from the other containers"


@pytest.mark.parametrize("name", sorted(relay_services()))
def test_compose_healthcheck_probes_the_served_port(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = relay_services()[name]
    args = parse_relay(service["command"])
    port = served_port(args, settings_with(service["environment"], monkeypatch))
    if args.command == "sink":
        assert args.host == "0.0.0.0"
    probe = " ".join(service["healthcheck"]["test"])
    assert service["healthcheck"]["test"][0] == "CMD"
    # The slim image has no curl: Python checks its own service.
    assert service["healthcheck"]["test"][1] == "python"
    checked = re.findall(r"127\.0\.0\.1(?::|',\s*)(\d+)", probe)
    assert checked == [str(port)], probe
    if args.command != "sink":
        assert re.search(rf":{port}/(readyz|healthz)'", probe), probe


def test_compose_healthchecks_and_start_order() -> None:
    services = compose_services()
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert condition == {"condition": "service_healthy"}, name
    for name in relay_services():
        assert "postgres" in services[name]["depends_on"]


def test_compose_volumes_and_mounts() -> None:
    compose = load_one(COMPOSE)
    services = compose["services"]
    named = set(compose["volumes"])
    for name in ("rabbitmq", "postgres"):
        sources = {mount.split(":")[0] for mount in services[name]["volumes"]}
        assert sources & named, f"{name} keeps its data in a named volume"
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"


def test_compose_enables_rabbitmq_prometheus() -> None:
    plugins = (DEPLOY / "rabbitmq" / "enabled_plugins").read_text()
    assert re.fullmatch(r"\[[a-z_,\s]+\]\.\s*", plugins)
    assert {"rabbitmq_management", "rabbitmq_prometheus"} <= set(re.findall(r"\w+", plugins))


def test_compose_network_is_allowed_past_the_ssrf_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    # The sink runs on the compose network; the delivery worker refuses private addresses unless
    # RELAY_ALLOWED_ENDPOINT_NETWORKS covers it.
    compose = load_one(COMPOSE)
    (network,) = compose["networks"].values()
    (pool,) = network["ipam"]["config"]
    subnet = ipaddress.ip_network(pool["subnet"])
    env = relay_services()["delivery-worker"]["environment"]
    allowed = settings_with(env, monkeypatch).allowed_endpoint_networks
    assert any(subnet.network_address in net and subnet.broadcast_address in net for net in allowed)


def test_docker_compose_config() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("docker compose is not installed")
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "--profile", "monitoring", "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def compose_command() -> list[str] | None:
    """`docker compose` or `docker-compose`, whichever works here."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker is None:
        return None
    probe = subprocess.run(
        [docker, "compose", "version"], capture_output=True, timeout=30, check=False
    )
    return [docker, "compose"] if probe.returncode == 0 else None


# --- Kubernetes ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_match_the_schemas(version: str) -> None:
    for doc in k8s_documents():
        if doc["apiVersion"] == KEDA_API:
            continue  # no bundled schema: test_keda_* check them
        kubernetes_validate.validate(doc, version, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_one(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    assert "namespace" not in kustomization, "namespace-agnostic: chosen at apply time"
    assert all("namespace" not in doc["metadata"] for doc in k8s_documents())


def test_k8s_settings_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    config = k8s_objects("ConfigMap")["relay-config"]["data"]
    secret = k8s_objects("Secret")["relay-secrets"]["stringData"]
    assert {"RELAY_AMQP_URL", "RELAY_DATABASE_URL"} <= set(secret)
    assert not set(config) & set(secret)
    fields = {f"RELAY_{field.upper()}" for field in Settings.model_fields}
    assert set(config) | set(secret) <= fields
    assert all(isinstance(value, str) for value in config.values()), "ConfigMap data is strings"
    settings = settings_with(k8s_env(), monkeypatch)
    assert settings.http_host == "0.0.0.0"
    assert settings.database_url.startswith("postgresql://"), "several pods share the store"


def deployment_cases() -> Iterator[tuple[str, dict[str, Any]]]:
    """Each Deployment's only container."""
    for name, deployment in k8s_objects("Deployment").items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        yield name, container


@pytest.mark.parametrize(
    ("name", "container"), list(deployment_cases()), ids=[n for n, _ in deployment_cases()]
)
def test_k8s_deployment(
    name: str, container: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    pod = k8s_objects("Deployment")[name]["spec"]["template"]["spec"]
    assert container.get("command", ["relay"]) == ["relay"]
    args = parse_relay(container["args"])
    assert args.run in SERVICES
    sources = container["envFrom"]
    assert {s["configMapRef"]["name"] for s in sources if "configMapRef" in s} <= set(
        k8s_objects("ConfigMap")
    )
    assert {s["secretRef"]["name"] for s in sources if "secretRef" in s} <= set(
        k8s_objects("Secret")
    )
    env = {**k8s_env(), **{e["name"]: e["value"] for e in container.get("env", [])}}
    settings = settings_with(env, monkeypatch)

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert served_port(args, settings) in ports.values()
    probes = {kind: container[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for probe in [*probes.values(), container["startupProbe"]["httpGet"]]:
        port = ports.get(probe["port"], probe["port"])
        assert port == served_port(args, settings), f"{name}: probe on {probe['port']}"

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == image_uid()
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]

    # SIGTERM: requests in flight get RELAY_SHUTDOWN_TIMEOUT, then the messages in hand as long.
    pause = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    paused = float(pause[-1]) if pause else 0.0
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > 2 * settings.shutdown_timeout + paused


def image_uid() -> str:
    """The uid the image's final stage runs as."""
    users = [i.arguments for i in dockerfile_stages()[-1] if i.keyword == "USER"]
    return users[-1].split(":")[0]


def pod_labels() -> dict[str, dict[str, str]]:
    """Each Deployment's pod labels, checking its selector matches them."""
    labels = {}
    for name, deployment in k8s_objects("Deployment").items():
        template = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= template.items()
        labels[name] = template
    return labels


def selects(selector: Mapping[str, str]) -> list[str]:
    """The Deployments whose pods a label selector picks."""
    return [name for name, labels in pod_labels().items() if selector.items() <= labels.items()]


def test_k8s_services_and_budgets_select_one_deployment() -> None:
    deployments = k8s_objects("Deployment")
    for name, service in k8s_objects("Service").items():
        (target,) = selects(service["spec"]["selector"])
        (container,) = deployments[target]["spec"]["template"]["spec"]["containers"]
        port_names = {p["name"] for p in container["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"{name}: {port['targetPort']}"
    budgeted = [
        target
        for budget in k8s_objects("PodDisruptionBudget").values()
        for target in selects(budget["spec"]["selector"]["matchLabels"])
    ]
    assert sorted(budgeted) == sorted(deployments), "one budget per Deployment"
    assert "relay-ingress" in selects(k8s_objects("Service")["relay-ingress"]["spec"]["selector"])


# --- KEDA ------------------------------------------------------------------------------------

WORKER_STAGES: dict[str, StageName] = {"bot-worker": "inbound", "delivery-worker": "outbound"}


def test_keda_trigger_authentication_references_a_secret() -> None:
    secrets = k8s_objects("Secret")
    authentications = k8s_objects("TriggerAuthentication")
    assert authentications
    for auth in authentications.values():
        assert auth["apiVersion"] == KEDA_API
        refs = auth["spec"]["secretTargetRef"]
        assert "host" in {ref["parameter"] for ref in refs}
        for ref in refs:
            assert ref["key"] in secrets[ref["name"]]["stringData"]
        host = next(ref for ref in refs if ref["parameter"] == "host")
        url = secrets[host["name"]]["stringData"][host["key"]]
        assert url.startswith(("http://", "https://")), "the management API, for useRegex"
    assert "relay-secrets" not in {
        ref["name"] for auth in authentications.values() for ref in auth["spec"]["secretTargetRef"]
    }


def test_keda_scales_each_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_with(k8s_env(), monkeypatch)
    deployments = k8s_objects("Deployment")
    scaled = {}
    for name, scaled_object in k8s_objects("ScaledObject").items():
        assert scaled_object["apiVersion"] == KEDA_API
        spec = scaled_object["spec"]
        target = deployments[spec["scaleTargetRef"]["name"]]
        assert "replicas" not in target["spec"], f"{name}: KEDA owns the replica count"
        (container,) = target["spec"]["template"]["spec"]["containers"]
        command = parse_relay(container["args"]).command
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        # Each worker holds whole partitions: replicas beyond them only stand by.
        assert spec["maxReplicaCount"] <= settings.partitions
        (trigger,) = spec["triggers"]
        check_rabbitmq_trigger(trigger, WORKER_STAGES[command], topology_of(settings))
        scaled[command] = name
    assert set(scaled) == set(WORKER_STAGES)


def check_rabbitmq_trigger(trigger: dict[str, Any], stage: StageName, topology: Topology) -> None:
    """A queue-depth trigger over exactly the stage's partition queues."""
    assert trigger["type"] == "rabbitmq"
    assert trigger["authenticationRef"]["name"] in k8s_objects("TriggerAuthentication")
    metadata = trigger["metadata"]
    assert all(isinstance(value, str) for value in metadata.values()), "KEDA metadata is strings"
    assert metadata["protocol"] == "http", "useRegex needs the management API"
    assert metadata["mode"] == "QueueLength"
    assert metadata["useRegex"] == "true"
    assert metadata["operation"] == "sum"
    assert float(metadata["value"]) > 0
    assert matched_queues(metadata["queueName"], topology) == [
        topology.queue(stage, p) for p in range(topology.partitions)
    ]


def matched_queues(pattern: str, topology: Topology) -> list[str]:
    """The queues of a topology the management API's regex filter (unanchored) picks."""
    return [name for name in topology.queue_names() if re.search(pattern, name)]


@pytest.mark.parametrize("partitions", [8, 16])
def test_keda_regexes_match_the_default_topology(
    partitions: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    defaults = settings_with({}, monkeypatch)
    topology = topology_of(defaults.model_copy(update={"partitions": partitions}))
    patterns = {
        so["spec"]["triggers"][0]["metadata"]["queueName"]
        for so in k8s_objects("ScaledObject").values()
    }
    matched = sorted(name for pattern in patterns for name in matched_queues(pattern, topology))
    partition_queues = sorted(
        topology.queue(stage, p) for stage in WORKER_STAGES.values() for p in range(partitions)
    )
    assert matched == partition_queues
    # Neither the delay queues, the dead letters nor the workers' presence queues count as work.
    assert "relay.inbound.delay.1000ms" in topology.queue_names()
    assert "relay.outbound.dead" in topology.queue_names()
    for pattern in patterns:
        assert not re.search(pattern, "relay.inbound.presence.1")
        assert not re.search(pattern, "relay.outbound.presence.1")


# --- Prometheus ------------------------------------------------------------------------------


@cache
def exported_samples() -> frozenset[str]:
    """Sample names Relay exports: the contract, and what Metrics registers today."""
    families = {name: kind for name, (kind, _) in METRICS_CONTRACT.items()}
    for family in Metrics().registry.collect():
        families[family.name] = family.type
    return frozenset(
        name + suffix for name, kind in families.items() for suffix in SAMPLE_SUFFIXES[kind]
    )


def contract_labels(sample: str) -> frozenset[str] | None:
    """The labels of a contract metric's sample (None if not in the contract)."""
    for name, (kind, labels) in METRICS_CONTRACT.items():
        if sample in {name + suffix for suffix in SAMPLE_SUFFIXES[kind]}:
            return labels | ({"le"} if sample.endswith("_bucket") else set())
    return None


def promql_selectors(expr: str) -> tuple[set[str], dict[str, set[str]]]:
    """The metric names of a PromQL expression, and the label names each is matched on."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    matched: dict[str, set[str]] = {}
    for name, body in re.findall(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", expr):
        matched.setdefault(name, set()).update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", body))
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\boffset\s+\w+", "", expr)
    names = {
        match.group(1)
        for match in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", expr)
        if not match.group(2) and match.group(1) not in PROMQL_KEYWORDS
    }
    return names, matched


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of alerts.yml."""
    return [rule for group in load_one(ALERTS)["groups"] for rule in group["rules"]]


def test_promql_selectors_parser() -> None:
    names, matched = promql_selectors(
        'histogram_quantile(0.9, sum by (le) (rate(a_bucket{stage="x}"}[5m]))) > 1e3'
        " and max by (q) (b offset 15m) > bool up"
    )
    assert names == {"a_bucket", "b", "up"}
    assert matched == {"a_bucket": {"stage"}}


def test_alert_rules_are_complete() -> None:
    groups = load_one(ALERTS)["groups"]
    assert all(group["name"] and group["rules"] for group in groups)
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)), "alert names are unique"
    for rule in alert_rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["expr"].strip()
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]


def test_alerts_cover_the_failure_modes() -> None:
    used = set().union(*(promql_selectors(rule["expr"])[0] for rule in alert_rules()))
    for sample in (
        "relay_dead_letters",
        "relay_delivery_attempts_total",
        "relay_queue_messages",
        "relay_message_age_seconds_bucket",
        "relay_endpoint_circuit",
        "relay_partition_oldest_unstarted_seconds",
        "up",
    ):
        assert sample in used, f"no alert on {sample}"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_uses_known_metrics(rule: dict[str, Any]) -> None:
    names, matched = promql_selectors(rule["expr"])
    assert names, "an alert on no metric"
    for name in names:
        if name == "up" or name.startswith("rabbitmq_"):
            continue
        assert name in exported_samples(), f"{rule['alert']}: Relay exports no {name}"
        labels = contract_labels(name)
        if labels is not None:
            unknown = matched.get(name, set()) - labels - TARGET_LABELS
            assert not unknown, f"{rule['alert']}: {name} has no label {unknown}"


def scrape_targets(config: dict[str, Any]) -> dict[str, set[int]]:
    """The ports Prometheus scrapes on each host name, from DNS and static discovery."""
    targets: dict[str, set[int]] = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for host in sd["names"]:
                targets.setdefault(host, set()).add(sd["port"])
        for target in [t for static in job.get("static_configs", []) for t in static["targets"]]:
            host, _, port = target.rpartition(":")
            targets.setdefault(host, set()).add(int(port))
    return targets


def test_prometheus_scrapes_every_relay_service(monkeypatch: pytest.MonkeyPatch) -> None:
    targets = scrape_targets(load_one(PROMETHEUS))
    for name, service in relay_services().items():
        args = parse_relay(service["command"])
        if args.command == "sink":
            continue  # a demo endpoint: no metrics
        port = served_port(args, settings_with(service["environment"], monkeypatch))
        assert targets.get(name) == {port}, name
    assert targets["rabbitmq"] == {15692}, "the rabbitmq_prometheus plugin's port"


def test_prometheus_config_fits_the_alerts() -> None:
    config = load_one(PROMETHEUS)
    for job in config["scrape_configs"]:
        if job["job_name"] != "rabbitmq":
            assert re.fullmatch("relay.*", job["job_name"]), "RelayServiceDown matches relay.*"
    # rule_files is relative to prometheus.yml, so both are mounted side by side.
    mounts = {
        mount.split(":")[0]: mount.split(":")[1]
        for mount in compose_services()["prometheus"]["volumes"]
    }
    config_dir = Path(mounts["./prometheus/prometheus.yml"]).parent
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS.parent / rule_file).is_file()
        assert mounts[f"./prometheus/{rule_file}"] == str(config_dir / rule_file)


def test_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    for command in (["check", "rules", str(ALERTS)], ["check", "config", str(PROMETHEUS)]):
        result = subprocess.run(
            [promtool, *command], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr


# --- the README ------------------------------------------------------------------------------


def test_readme_commands_are_relay_commands() -> None:
    # The `relay ...` admin commands shown for compose and Kubernetes, placeholders and all.
    found = 0
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "README.md").read_text())
    for match in re.finditer(r"\bexec\b[^\n]*?\brelay ([^\n`|)]*)", text):
        args = shlex.split(match.group(1).split("#")[0])
        assert parse_relay(args).run not in SERVICES, "an admin command"
        found += 1
    assert found >= 3
