#!/bin/bash
# The wheelhouse the Dockerfile installs from, wheels/<target>/ in the build context (ignored
# by git). This step reads the network (PyPI, and TORCH_INDEX for the CPU torch where the
# machine has no local copy); the image build does not.
#   cpu: every wheel of `.[cpu]` at constraints-cpu.txt's versions, for this machine's Python
#        (3.11, as in Debian bookworm). Source-only packages are built into wheels here.
#   gpu: alignd's own requirements for vLLM's image (CPython $GPU_PYTHON, manylinux x86_64);
#        the image adds only those its base lacks. Binary wheels only: nothing to build.
# Usage: wheels.sh cpu|gpu [extra pip options, e.g. --extra-index-url URL]
set -euo pipefail
cd "$(dirname "$0")/../.."
target=$1; shift
PY=${PY:-.venv/bin/python}
out=wheels/$target
rm -rf "$out.partial"
mkdir -p "$out.partial"
# setuptools: the image builds alignd from its sources with build isolation, offline.
case $target in
cpu)
    "$PY" -m pip wheel --quiet --wheel-dir "$out.partial" "$@" -c constraints-cpu.txt '.[cpu]' 'setuptools>=68'
    rm -f "$out.partial"/alignd-*.whl  # the image builds its own from the sources
    ;;
gpu)
    mapfile -t reqs < <("$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
    "$PY" -m pip download --quiet --dest "$out.partial" --only-binary=:all: "$@" \
        --python-version "${GPU_PYTHON:-3.12}" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        "${reqs[@]}" 'setuptools>=68'
    ;;
*) echo "wheels.sh: cpu or gpu, not '$target'" >&2; exit 2 ;;
esac
rm -rf "$out"
mv "$out.partial" "$out"
echo "wheels.sh: $(find "$out" -name '*.whl' | wc -l) wheels, $(du -sh "$out" | cut -f1), in $out"
