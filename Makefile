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

.PHONY: install demo test
install: $(STAMP)

# The tiny CPU OPSD demo (examples/tiny_cpu.yaml), each run in a new directory under runs/.
demo: $(STAMP)
	$(BIN)/opsd demo examples/tiny_cpu.yaml run_dir=runs/demo-$$(date +%Y%m%d-%H%M%S)

# The layer contracts (pyproject.toml, [tool.importlinter]), then the tests.
test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -p no:cacheprovider
