"""examples/deploy/: the manifests are valid and agree with the worker they deploy.

Built-in kinds are validated by ``kubernetes-validate`` (strict: no unknown fields)
against a pinned Kubernetes version. KEDA's ScaledObject is a CRD, which
kubernetes-validate has no schema for: it is checked against the fields of
KEDA's documented v1alpha1 spec that these manifests use, and against the
worker's own configuration (group, topic, metric names).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate as kv
import yaml

from cdc.config import load_config
from cdc.metrics import WorkerMetrics

DEPLOY = Path(__file__).resolve().parents[1] / "examples" / "deploy"
K8S_VERSION = "1.30"


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path.name, doc))
    return found


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


def test_every_built_in_manifest_is_valid_kubernetes() -> None:
    checked = 0
    for _, doc in documents():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        kv.validate(doc, K8S_VERSION, strict=True)  # raises ValidationError naming the field
        checked += 1
    kinds = {doc["kind"] for _, doc in documents()}
    assert {
        "Deployment",
        "ConfigMap",
        "Service",
        "HorizontalPodAutoscaler",
        "ScaledObject",
    } <= kinds
    assert checked >= 5


def test_the_scaled_object_scales_the_worker_on_its_consumer_group_lag(tmp_path: Path) -> None:
    (scaled,) = by_kind("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert set(spec) <= {
        "scaleTargetRef",
        "minReplicaCount",
        "maxReplicaCount",
        "pollingInterval",
        "cooldownPeriod",
        "advanced",
        "triggers",
        "idleReplicaCount",
        "fallback",
    }
    workers = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "tieredcache-cdc"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": workers[0]["metadata"]["name"],
    }
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    triggers = {t["name"]: t for t in spec["triggers"]}
    for trigger in triggers.values():
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), (
            "KEDA trigger metadata values are strings"
        )
    # The worker's configuration, as deployed, is what the lag trigger watches.
    (config_map,) = [d for d in by_kind("ConfigMap") if d["metadata"]["name"] == "tieredcache-cdc"]
    path = tmp_path / "cdc.toml"
    path.write_text(config_map["data"]["cdc.toml"])
    config = load_config(path, env={"CDC_DB_PASSWORD": "x"})
    kafka = triggers["lag"]
    assert kafka["type"] == "kafka"
    assert kafka["metadata"]["consumerGroup"] == config.worker.group_id
    assert kafka["metadata"]["topic"] in config.worker.topics
    assert kafka["metadata"]["bootstrapServers"] == config.worker.bootstrap_servers
    assert (
        kafka["metadata"]["offsetResetPolicy"]
        == config.worker.consumer_config()["auto.offset.reset"]
    )
    # No scale-out while a layer is down: the formula reads the worker's blocked gauge.
    blocked = triggers["blocked"]
    names = {m.name for m in WorkerMetrics().registry.collect()}
    metric = re.search(r"(tieredcache_cdc_\w+)", blocked["metadata"]["query"]).group(1)  # type: ignore[union-attr]
    assert metric in names, f"{metric} is not a metric the worker exports"
    formula = spec["advanced"]["scalingModifiers"]["formula"]
    assert set(re.findall(r"[a-z_]+", formula)) <= set(triggers)
    # The pod's grace period covers the worker's SIGTERM drain.
    pod = workers[0]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config.worker.shutdown_grace
    port = pod["containers"][0]["ports"][0]["containerPort"]
    assert port == config.health_port


def test_the_application_hpa_uses_the_adapter_metric() -> None:
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    (adapter,) = [d for d in by_kind("ConfigMap") if d["metadata"]["name"] == "prometheus-adapter"]
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert any(rule["name"]["as"] == name for rule in rules)


def test_the_deployed_toml_is_a_valid_worker_configuration(tmp_path: Path) -> None:
    (config_map,) = [d for d in by_kind("ConfigMap") if d["metadata"]["name"] == "tieredcache-cdc"]
    tomllib.loads(config_map["data"]["cdc.toml"])
    path = tmp_path / "cdc.toml"
    path.write_text(config_map["data"]["cdc.toml"])
    assert load_config(path, env={"CDC_DB_PASSWORD": "x"}).rules.tables
