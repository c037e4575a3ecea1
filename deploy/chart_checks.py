"""Assertions on the chart as rendered by deploy/check.sh (helm template's output files).

Usage: chart_checks.py DEFAULTS.yaml ALL_OPTIONS.yaml
  DEFAULTS: the chart with its default values; ALL_OPTIONS: with tensor 2 x pipeline 2 and
  every opt-in on (check.sh's --set list).
"""

from __future__ import annotations

import sys

import yaml


def objects(path: str) -> dict[str, dict]:
    with open(path) as f:
        return {doc["kind"]: doc for doc in yaml.safe_load_all(f) if doc}


def server(deployment: dict) -> tuple[dict, dict]:
    pod = deployment["spec"]["template"]["spec"]
    return pod, next(c for c in pod["containers"] if c["name"] == "alignd")


def flag(container: dict, name: str) -> str:
    values = [a.split("=", 1)[1] for a in container["args"] if a.startswith(f"--{name}=")]
    assert len(values) == 1, f"--{name} given {len(values)} times: {container['args']}"
    return values[0]


def check(path: str, gpus: int, kinds: set[str]) -> None:
    objs = objects(path)
    assert kinds <= set(objs), f"{path}: missing {kinds - set(objs)}"
    pod, alignd = server(objs["Deployment"])
    for where in ("requests", "limits"):
        assert alignd["resources"][where]["nvidia.com/gpu"] == gpus, (where, alignd["resources"])
    assert int(flag(alignd, "tensor-parallel-size")) * int(flag(alignd, "pipeline-parallel-size")) == gpus
    drain = float(flag(alignd, "shutdown-timeout"))
    pause = int(alignd["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > drain + pause, "SIGKILL would cut the drain"
    key_file = flag(alignd, "api-key-file")
    mounts = {m["mountPath"]: m["name"] for m in alignd["volumeMounts"]}
    assert key_file.rsplit("/", 1)[0] in mounts, f"{key_file} is not mounted"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "persistentVolumeClaim" in volumes[mounts["/home/alignd/.cache"]]
    assert pod["securityContext"]["runAsNonRoot"] and alignd["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert alignd["startupProbe"]["periodSeconds"] * alignd["startupProbe"]["failureThreshold"] >= 600
    # Readiness must leave the Service while draining; liveness must not kill a drain.
    assert alignd["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert alignd["livenessProbe"]["httpGet"]["path"] == "/health"


def main() -> int:
    defaults, everything = sys.argv[1:3]
    check(defaults, 1, {"Deployment", "Service", "Secret", "PersistentVolumeClaim", "PodDisruptionBudget"})
    check(everything, 4, {"HorizontalPodAutoscaler", "ServiceMonitor", "NetworkPolicy"})
    print("chart_checks: the rendered chart holds (GPUs, drain and grace period, probes, key, shm, cache, security)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
