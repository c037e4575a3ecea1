#!/bin/bash
# The static checks of the image and deploy/ (make deploy-check; CI runs them on every stop).
# Offline: each tool comes with its binary or schemas (deploy/requirements-check.txt), found on
# PATH. Rendered manifests go to build/deploy-check/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/deploy-check
chart=deploy/helm/alignd
rm -rf "$out" && mkdir -p "$out"

echo "== hadolint Dockerfile"
hadolint --failure-threshold style Dockerfile

echo "== helm lint and helm template"
# Every opt-in at once, and tensor 2 x pipeline 2 (4 GPUs a pod); KEDA apart (one autoscaler).
all=(parallelism.tensor=2 parallelism.pipeline=2 autoscaling.enabled=true serviceMonitor.enabled=true
     networkPolicy.enabled=true runtimeClassName=nvidia prefetch.hfTokenSecret=hf-token)
keda=(autoscaling.enabled=true autoscaling.kind=keda)
python3 deploy/helm.py lint "$chart"
python3 deploy/helm.py lint "$chart" "${all[@]}"
python3 deploy/helm.py template "$chart" > "$out/defaults.yaml"
python3 deploy/helm.py template "$chart" "${all[@]}" > "$out/all.yaml"
python3 deploy/helm.py template "$chart" "${keda[@]}" > "$out/keda.yaml"
# The chart must refuse a grace period that SIGKILLs the drain.
if python3 deploy/helm.py template "$chart" terminationGracePeriodSeconds=30 > /dev/null 2>&1; then
    echo "check.sh: the chart rendered a grace period shorter than the drain" >&2
    exit 1
fi

echo "== yamllint"
yamllint --strict -c deploy/.yamllint.yaml deploy/compose.yaml deploy/compose.cpu.yaml \
    "$chart/Chart.yaml" "$chart/values.yaml" "$out"/*.yaml

echo "== kubernetes-validate --strict"
kubernetes-validate --strict "$out/defaults.yaml" "$out/all.yaml" "$out/keda.yaml"

echo "== chart assertions"
python3 deploy/chart_checks.py "$out/defaults.yaml" "$out/all.yaml"

echo "== docker compose config -q"
# Paths resolve against a project folder of our own, where an empty key file stands in for the
# real one: deploy/secrets/ is left alone.
mkdir -p "$out/compose/secrets" && touch "$out/compose/secrets/api_key"
for f in deploy/compose.yaml deploy/compose.cpu.yaml; do
    docker-compose --project-directory "$out/compose" -f "$f" config -q
done
echo "check.sh: all static checks passed"
