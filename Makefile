PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= $(shell sed -n 's/^torch==/torch==/p' docker/requirements-torch.txt)
PY := $(VENV)/bin/python

.PHONY: install test test-containers lint run compile bench clean docs

install: $(VENV)/.installed

# Exactly the lock (docker/requirements*.txt, written by `make lock`): torch first (TORCH_SPEC overrides it, e.g.
# for a CUDA build), its own dependencies held to the lock, then every other pin, the CPU vLLM engine's pins without
# their deps (ENGINE_LOCK= leaves it out; docker/lock.py says which packages it drops and why), then the package.
ENGINE_LOCK ?= docker/requirements-engine-cpu.txt
LOCKS := docker/requirements.txt docker/requirements-test.txt docker/requirements-torch.txt $(ENGINE_LOCK)
$(VENV)/.installed: pyproject.toml $(LOCKS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c docker/requirements.txt "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r docker/requirements.txt -r docker/requirements-test.txt
	$(if $(ENGINE_LOCK),$(PY) -m pip install -q --no-deps -r $(ENGINE_LOCK))
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) docker/lock.py --pip-check
	touch $@

test: install
	$(PY) -m pytest -q -m "not containers" tests

# ruff's rules and line length are in pyproject.toml ([tool.ruff]).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Builds the CPU image (local Debian base and torch wheelhouse where no registry is reachable), runs a stage inside
# it exactly as the compiled pipeline states it, and runs the smoke pipeline through kfp.local.DockerRunner.
test-containers: install
	$(MAKE) image-cpu
	BLUEPRINT_TEST_IMAGE=$(LOCAL_IMAGE) $(PY) -m pytest -q -m containers tests

clean:
	rm -rf $(VENV) artifacts .pytest_cache site

# The docs site (mkdocs.yml, docs/) into site/; --strict fails on a broken link or anchor. The settings reference
# is generated from the stages' configs as it builds (docs/hooks.py).
docs: install
	$(VENV)/bin/mkdocs build --strict --site-dir site

run: install
	$(VENV)/bin/blueprint run --profile default

compile: install
	BLUEPRINT_IMAGE=$(IMAGE) $(VENV)/bin/blueprint compile --out pipeline.yaml --image $(IMAGE) $(CLUSTER_FLAGS)

bench: install
	$(PY) benchmarks/shard_throughput.py
	$(PY) benchmarks/reward_throughput.py
	$(PY) benchmarks/ppo_throughput.py
	$(PY) benchmarks/sandbox_throughput.py
	$(PY) benchmarks/rollout_engines.py

# ---- Images and Kubeflow delivery (docs/kubeflow.md) ------------------------------------------------------------------------------------
# IMAGE is the one image reference: `make push` pushes it, `make compile/submit/schedule` put it in the pipeline.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
REGISTRY ?= ghcr.io/blueprint-rt
IMAGE ?= $(REGISTRY)/blueprint:$(VERSION)
CUDA_IMAGE ?= $(IMAGE)-cuda
LOCAL_IMAGE := blueprint:$(VERSION)
LOCAL_CUDA_IMAGE := blueprint:$(VERSION)-cuda
BASE_IMAGE ?=
CUDA_BASE_IMAGE ?=
CA_BUNDLE ?= $(PIP_CERT)
CLUSTER ?=
KFP_HOST ?= $(KF_PIPELINES_ENDPOINT)
CRON ?= 0 3 * * 1
# docker when its daemon answers, else podman; empty when neither works
ENGINE ?= $(shell if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then echo docker; \
                  elif command -v podman >/dev/null 2>&1; then echo podman; fi)
CLUSTER_FLAGS = $(if $(CLUSTER),--cluster-config $(CLUSTER))
SOURCE ?= $(shell git remote get-url origin 2>/dev/null)
REVISION ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
# OCI labels as build args (for the Dockerfile's LABEL) and as --label: buildah's layer cache ignores a changed
# ARG in LABEL and would keep the previous revision.
OCI = org.opencontainers.image
BUILD_FLAGS = --build-arg VERSION=$(VERSION) --build-arg REVISION=$(REVISION) \
	--label $(OCI).version=$(VERSION) --label $(OCI).revision=$(REVISION) \
	$(if $(SOURCE),--build-arg SOURCE=$(SOURCE) --label $(OCI).source=$(SOURCE)) \
	$(if $(CA_BUNDLE),--secret id=ca$(comma)src=$(CA_BUNDLE))
comma := ,

.PHONY: lock wheelhouse images image-cpu image-cuda push submit schedule check-engine

# The one way to move versions: resolve pyproject.toml afresh in a throwaway venv and pin what it installed.
# Then `make install` (the venv is rebuilt from the new lock) and `make test`. torch stays at TORCH_SPEC (the
# locked one by default): `make lock TORCH_SPEC=torch==X.Y.Z` moves it too. The CUDA image's vLLM closure is
# resolved from metadata by uv (docker/lock.py; `docker/lock.py --cuda` redoes only that, where uv is installed).
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LOCK_VENV)/bin/python -m pip install -q ".[test,docs,engine-cpu]"
	$(LOCK_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(LOCK_VENV)/bin/python -m pip install -q uv
	$(LOCK_VENV)/bin/python docker/lock.py
	rm -rf $(LOCK_VENV)

# torch for the CPU image from a local wheelhouse (pip resolves TORCH_SPEC as it does for `make install`): no
# CUDA wheels pulled into a CPU image, and the same recipe serves air-gapped builds (fill it where pip can reach).
wheelhouse: install
	@ls docker/wheelhouse/torch-*.whl >/dev/null 2>&1 || $(PY) -m pip download -q --no-deps -d docker/wheelhouse "$(TORCH_SPEC)"

check-engine:
	@test -n "$(ENGINE)" || { echo "make: no container engine: neither a running docker daemon nor podman was" \
	  "found. Install Docker (with BuildKit) or Podman, or build on CI; see docs/kubeflow.md." >&2; exit 1; }

images: image-cpu image-cuda

# BASE_IMAGE empty: python:3.11-slim when the engine has it or can pull it, else a local Debian base built with
# debootstrap from the host's mirror (docker/base-image.sh).
image-cpu: check-engine wheelhouse
	base=$$(docker/base-image.sh $(ENGINE) $(BASE_IMAGE)) && \
	$(if $(filter docker,$(ENGINE)),DOCKER_BUILDKIT=1) $(ENGINE) build -f docker/Dockerfile \
	  $(if $(filter podman,$(ENGINE)),--ignorefile docker/Dockerfile.dockerignore) \
	  $(BUILD_FLAGS) --build-arg BASE_IMAGE=$$base -t $(LOCAL_IMAGE) .

# CUDA_BASE_IMAGE empty: nvidia/cuda's base when it can be pulled, else the same local Debian base (the CUDA torch
# wheels carry their CUDA libraries; the node's driver comes in through the NVIDIA container runtime).
image-cuda: check-engine
	base=$$(docker/base-image.sh $(ENGINE) $(or $(CUDA_BASE_IMAGE),nvidia/cuda:13.0.0-base-ubuntu22.04)) && \
	$(if $(filter docker,$(ENGINE)),DOCKER_BUILDKIT=1) $(ENGINE) build -f docker/Dockerfile.cuda \
	  $(if $(filter podman,$(ENGINE)),--ignorefile docker/Dockerfile.cuda.dockerignore) \
	  $(BUILD_FLAGS) --build-arg BASE_IMAGE=$$base -t $(LOCAL_CUDA_IMAGE) .

push: check-engine
	$(ENGINE) tag $(LOCAL_IMAGE) $(IMAGE)
	$(ENGINE) push $(IMAGE)
	@if $(ENGINE) image inspect $(LOCAL_CUDA_IMAGE) >/dev/null 2>&1; then \
	  $(ENGINE) tag $(LOCAL_CUDA_IMAGE) $(CUDA_IMAGE) && $(ENGINE) push $(CUDA_IMAGE); fi

submit: install
	$(VENV)/bin/blueprint submit --host "$(KFP_HOST)" --image $(IMAGE) $(CLUSTER_FLAGS)

schedule: install
	$(VENV)/bin/blueprint schedule --host "$(KFP_HOST)" --cron "$(CRON)" --image $(IMAGE) $(CLUSTER_FLAGS)
