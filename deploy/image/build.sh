#!/bin/bash
# Build one flavour of the Dockerfile (its FLAVOR build argument) as $IMAGE:<flavour>, and report
# its size.
# Usage: build.sh cpu|gpu  (env: IMAGE, DOCKER, CPU_BASE_IMAGE, BASE_IMAGE)
#   CPU_BASE_IMAGE unset: a Debian bookworm base made here by debootstrap (no registry needed);
#   set it to debian:bookworm-slim where a registry is reached.
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/image/engine.sh
target=$1
image=${IMAGE:-alignd}:$target
[ -d "wheels/$target" ] || { echo "build.sh: no wheels/$target: run make wheels-$target first" >&2; exit 1; }
ensure_engine
args=(--network host --build-arg "FLAVOR=$target" --tag "$image"
      --build-arg "VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)"
      --build-arg "REVISION=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)")
if [ "$target" = cpu ]; then
    if [ -z "${CPU_BASE_IMAGE:-}" ]; then
        CPU_BASE_IMAGE=alignd-base:bookworm
        ensure_base "$CPU_BASE_IMAGE"
    fi
    args+=(--build-arg "CPU_BASE_IMAGE=$CPU_BASE_IMAGE")
elif [ -n "${BASE_IMAGE:-}" ]; then
    args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
fi
start=$(date +%s)
"$DOCKER" build "${args[@]}" .
size=$("$DOCKER" image inspect -f '{{.Size}}' "$image")
echo "build.sh: $image built in $(( $(date +%s) - start )) s; size $(( size / 1000000 )) MB"
