"""The deployment material in deploy/ is checked as CI can check it without a cluster or a Docker
engine: the Helm chart rendered by the real helm and validated against the Kubernetes schemas,
its objects checked against each other, the compose file against the compose specification, and
the Grafana dashboard against the metrics the code exports."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "kubernetes" / "modelplane"
COMPOSE = ROOT / "deploy" / "compose" / "compose.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "modelplane-dashboard.json"
KUBERNETES_VERSION = "1.33.0"
DATABASE = "database.url=postgresql+asyncpg://modelplane:secret@postgres:5432/modelplane"

# Value sets an operator is expected to use; each must render to valid, consistent objects.
VALUE_SETS = {
    "defaults": [DATABASE],
    "https-gateway": [DATABASE, "tls.gatewayHttps=true"],
    "plaintext-no-policies": [DATABASE, "tls.enabled=false", "networkPolicy.enabled=false"],
    "cpu-only-autoscaling": [
        DATABASE,
        "inference.autoscaling.targetRequestsInFlight=0",
        "gateway.autoscaling.targetRequestsPerSecond=0",
    ],
    "fixed-replicas-existing-secrets": [
        "database.existingSecret=modelplane-db",
        "objectStorage.existingSecret=minio-credentials",
        "objectStorage.endpointUrl=http://minio.storage.svc:9000",
        "inference.autoscaling.enabled=false",
        "gateway.autoscaling.enabled=false",
    ],
}


def _helm() -> str:
    helm = os.environ.get("HELM") or str(ROOT / ".tools" / "kube" / "helm" / "helm")
    if not Path(helm).is_file():
        pytest.fail(f"helm is not at {helm}: `make test` installs it (make .tools/kube/helm/helm)")
    return helm


def _render(values: list[str]) -> list[dict[str, Any]]:
    arguments = [arg for value in values for arg in ("--set", value)]
    result = subprocess.run(
        [_helm(), "template", "modelplane", str(CHART), "--namespace", "modelplane", *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return _render(VALUE_SETS[request.param])


def test_helm_lint_passes_strictly() -> None:
    result = subprocess.run(
        [_helm(), "lint", "--strict", str(CHART), "--set", DATABASE],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_object_is_valid_against_the_kubernetes_schema(rendered: list[dict[str, Any]]) -> None:
    for doc in rendered:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name} is not valid Kubernetes {KUBERNETES_VERSION}: {error.message} at {list(error.path)}")


def _workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] in ("Deployment", "StatefulSet")}


def _pods_matching(docs: list[dict[str, Any]], selector: dict[str, str]) -> list[str]:
    return [
        name
        for name, workload in _workloads(docs).items()
        if selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
    ]


def _containers(workload: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from workload["spec"]["template"]["spec"]["containers"]


def test_services_pdbs_and_autoscalers_point_at_real_workloads(rendered: list[dict[str, Any]]) -> None:
    workloads = _workloads(rendered)
    for doc in rendered:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind == "Service":
            [target] = _pods_matching(rendered, doc["spec"]["selector"])
            ports = {p["name"] for c in _containers(workloads[target]) for p in c.get("ports", [])}
            for port in doc["spec"]["ports"]:
                assert port["targetPort"] in ports, f"Service {name} targets {port['targetPort']}, not on {target}"
        elif kind == "PodDisruptionBudget":
            assert _pods_matching(rendered, doc["spec"]["selector"]["matchLabels"]), f"PDB {name} selects no pods"
        elif kind == "HorizontalPodAutoscaler":
            target = doc["spec"]["scaleTargetRef"]
            assert workloads[target["name"]]["kind"] == target["kind"]
            assert "replicas" not in workloads[target["name"]]["spec"], f"{target['name']} fights its HPA"


def test_every_address_a_service_dials_is_a_rendered_service_port(rendered: list[dict[str, Any]]) -> None:
    services = {
        (d["metadata"]["name"], port["port"]) for d in rendered if d["kind"] == "Service" for port in d["spec"]["ports"]
    }
    dialled = [
        (env["name"], env["value"])
        for workload in _workloads(rendered).values()
        for container in _containers(workload)
        for env in container.get("env", [])
        if env["name"].endswith("_ADDRESS") and "value" in env
    ]
    assert dialled
    for name, address in dialled:
        host, port = address.rsplit(":", 1)
        assert host == "localhost" or (host, int(port)) in services, f"{name}={address} is no Service port"


def test_probes_use_ports_the_containers_serve(rendered: list[dict[str, Any]]) -> None:
    for workload in _workloads(rendered).values():
        for container in _containers(workload):
            ports = {p["name"] for p in container.get("ports", [])} | {p["containerPort"] for p in container["ports"]}
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            for kind in ("readinessProbe", "livenessProbe"):
                probe = container[kind]
                port = (probe.get("grpc") or probe.get("httpGet"))["port"]
                assert port in ports, f"{container['name']} {kind} on {port}, which it does not serve"
                if "grpc" in probe:  # the service must be told to serve health there
                    assert str(port) in {v for k, v in env.items() if k.endswith("_HEALTH_PORT")}


def test_secrets_and_volumes_referenced_are_rendered_or_named_existing(rendered: list[dict[str, Any]]) -> None:
    secrets = {d["metadata"]["name"] for d in rendered if d["kind"] == "Secret"}
    # Made by the operator (README): per-service TLS Secrets and any existingSecret given in values.
    external = {"modelplane-db", "minio-credentials"} | {
        f"modelplane-tls-{s}" for s in ("registry", "loader", "inference", "gateway")
    }
    for workload in _workloads(rendered).values():
        spec = workload["spec"]["template"]["spec"]
        volumes = {v["name"] for v in spec.get("volumes", [])}
        volumes |= {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets | external
        for container in _containers(workload):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{container['name']} mounts undeclared volume {mount['name']}"
            for env in container.get("env", []):
                reference = env.get("valueFrom", {}).get("secretKeyRef")
                if reference:
                    assert reference["name"] in secrets | external, f"{env['name']} reads missing {reference}"


def test_network_policies_admit_only_the_intended_callers() -> None:
    docs = _render(VALUE_SETS["defaults"])
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert (
        policies["modelplane-default-deny"]["podSelector"]["matchLabels"]["app.kubernetes.io/part-of"] == "modelplane"
    )
    assert "ingress" not in policies["modelplane-default-deny"]

    def callers(policy: str, port: int) -> list[dict[str, Any]]:
        rules = policies[policy]["ingress"]
        return [peer for rule in rules if any(p["port"] == port for p in rule["ports"]) for peer in rule["from"]]

    def components(peers: list[dict[str, Any]]) -> set[str]:
        return {
            p["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
            for p in peers
            if "namespaceSelector" not in p
        }

    dify = callers("modelplane-gateway", 8080)
    assert {"namespaceSelector", "podSelector"} <= dify[0].keys()  # Dify's pods, in Dify's namespace
    assert components(callers("modelplane-registry", 50051)) == {"triton", "inference", "gateway"}
    assert components(callers("modelplane-inference", 50053)) == {"gateway"}
    assert components(callers("modelplane-triton", 8001)) == {"inference"}


def test_the_chart_refuses_to_render_without_a_database() -> None:
    result = subprocess.run(
        [_helm(), "template", "modelplane", str(CHART)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode != 0
    assert "Set database.url" in result.stderr


# Compose -------------------------------------------------------------------------------------


def _compose_schema() -> dict[str, Any]:
    schema = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(schema.read_text())


def test_the_compose_file_follows_the_compose_specification() -> None:
    document = yaml.safe_load(COMPOSE.read_text())
    errors = sorted(jsonschema.Draft7Validator(_compose_schema()).iter_errors(document), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_compose_file_is_consistent() -> None:
    document = yaml.safe_load(COMPOSE.read_text())
    services = document["services"]
    volumes, networks = set(document["volumes"]), set(document["networks"])
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for network in service.get("networks", []):
            assert network in networks, f"{name} joins undeclared network {network}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in volumes, f"{name} mounts undeclared volume {source}"
    # Dify's network is the stock project's, joined (not created) by the gateway only.
    assert document["networks"]["dify"]["external"] is True
    assert [n for n, s in services.items() if "dify" in s.get("networks", [])] == ["gateway"]
    # The loader writes the repository Triton reads.
    assert "model-repository:/models" in services["triton"]["volumes"]
    assert "model-repository:/models" in services["loader"]["volumes"]
    for variable in re.findall(r"\$\{(\w+)", COMPOSE.read_text()):
        assert f"{variable}=" in (COMPOSE.parent / ".env.example").read_text(), f"{variable} missing in .env.example"


def test_every_file_the_dockerfile_copies_exists() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"


# Grafana -------------------------------------------------------------------------------------

# Triton's metric names (its documented Prometheus metrics), which its endpoint serves beside ours.
TRITON_METRICS = {
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_gpu_utilization",
    "nv_gpu_memory_used_bytes",
    "nv_gpu_memory_total_bytes",
}
PROCESS_METRICS = {"process_cpu_seconds_total", "process_resident_memory_bytes"}


def _modelplane_metric_names() -> set[str]:
    from prometheus_client import REGISTRY

    # Importing them registers the gRPC and HTTP metrics.
    for module in ("modelplane.common.interceptors", "modelplane.gateway.middleware"):
        importlib.import_module(module)

    names = set()
    for metric in REGISTRY.collect():
        names |= {sample.name for sample in metric.samples} | {metric.name}
        if metric.type == "counter":
            names.add(f"{metric.name}_total")
        if metric.type == "histogram":
            names |= {f"{metric.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
    return names


def test_the_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    known = _modelplane_metric_names() | TRITON_METRICS | PROCESS_METRICS
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(queries) >= 10
    functions = {"sum", "by", "rate", "histogram_quantile", "le", "on", "without"}
    for query in queries:
        unquoted = re.sub(r'\{[^}]*\}|"[^"]*"|\[[^]]*\]', "", query)
        for name in re.findall(r"\b[a-z_][a-z0-9_]*\b", unquoted):
            if name.startswith(("modelplane_", "nv_", "process_")):
                assert name in known, f"dashboard queries {name}, which nothing exports"
            else:
                assert name in functions | {"route", "status", "method", "code", "model", "e6"}, (name, query)


def test_gateway_probes_never_wait_for_models(rendered: list[dict[str, Any]]) -> None:
    """Liveness is /healthz (a loading model must not get a gateway restarted); readiness leaves the
    models out (a loading or failed model must not take every gateway out of its Service)."""
    [gateway] = [c for w in _workloads(rendered).values() for c in _containers(w) if c["name"] == "gateway"]
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz?exclude=models"
