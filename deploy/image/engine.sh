# Sourced by build.sh and image_test.py's callers: a Docker engine to talk to, and a local
# Debian base image where no image registry is reached.
#   ensure_engine: use $DOCKER's engine if it answers; otherwise (as root) install Debian's
#     docker.io and start dockerd without a bridge or iptables (this machine's sandbox allows
#     neither), so builds and containers use --network host.
#   ensure_base NAME: debootstrap bookworm (minbase, with what the cpu stage needs, so its apt
#     step is skipped) and `docker import` it as NAME, once.
DOCKER=${DOCKER:-/usr/bin/docker}
export DOCKER_BUILDKIT=1

ensure_engine() {
    if [ -x "$DOCKER" ] && "$DOCKER" info >/dev/null 2>&1; then return 0; fi
    if [ "$(id -u)" != 0 ]; then
        echo "engine.sh: no Docker engine answers at $DOCKER, and only root may start one" >&2
        return 1
    fi
    if ! command -v dockerd >/dev/null || [ ! -x "$DOCKER" ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
    fi
    if ! "$DOCKER" info >/dev/null 2>&1; then
        echo "engine.sh: starting dockerd (log: /var/log/alignd-dockerd.log)"
        nohup dockerd --bridge=none --iptables=false --ip-forward=false \
            >/var/log/alignd-dockerd.log 2>&1 &
        for _ in $(seq 60); do
            "$DOCKER" info >/dev/null 2>&1 && return 0
            sleep 1
        done
        echo "engine.sh: dockerd did not answer within 60 s:" >&2
        tail -20 /var/log/alignd-dockerd.log >&2
        return 1
    fi
}

ensure_base() {
    local name=$1 root
    if "$DOCKER" image inspect "$name" >/dev/null 2>&1; then return 0; fi
    command -v debootstrap >/dev/null || {
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    }
    root=$(mktemp -d /var/tmp/alignd-base.XXXXXX)
    echo "engine.sh: debootstrap bookworm into $root (a few minutes)"
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-dev,g++,libnuma1,tini,ca-certificates \
        bookworm "$root" http://deb.debian.org/debian >/var/log/alignd-debootstrap.log
    # apt's lists and caches are not needed in an image, and the build never calls apt here.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
    tar -C "$root" -c . | "$DOCKER" import - "$name"
    rm -rf "$root"
}
