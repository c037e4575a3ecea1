#!/bin/bash
# The runtime part of the image, the same for both flavours (run by the Dockerfile as root).
# UID 2000 in group 0 with a group-writable home: the image also runs under an arbitrary UID
# of group 0 (OpenShift, runAsUser), which has no passwd entry; the Dockerfile sets HOME and
# USER because such a UID gets neither, and torch asks getpass for a user name.
set -euo pipefail
useradd --uid 2000 --gid 0 --create-home --home-dir /home/alignd --shell /usr/sbin/nologin alignd
mkdir -p /home/alignd/.cache/huggingface /home/alignd/.cache/alignd
chmod -R g=u /home/alignd
