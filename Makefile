# The README's two commands, `make demo` and `make test`, set everything up themselves:
# a local virtual environment in $(VENV) with the project installed in editable mode.
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install first. These wheels lie on this project's machines; elsewhere
# override it, e.g. `make test TORCH_SPEC=torch` (any torch>=2.2 works).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

# Debian packages the project needs: dot (graph rendering), chromium (the TensorBoard page
# test). Installed when missing and run as root.
DEBIAN_PACKAGES ?= graphviz chromium
DEBIAN_COMMANDS ?= dot chromium

.PHONY: install system-deps demo test test-cuda zoo bench lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install --quiet $(TORCH_SPEC) 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install --quiet -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import torch, torchvision, lens_core, lens_callbacks"
	touch $@

install: $(VENV)/.installed system-deps

system-deps:
	@missing=""; for c in $(DEBIAN_COMMANDS); do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_PACKAGES) >/dev/null; \
		else echo "missing:$$missing; install the Debian packages: sudo apt-get install $(DEBIAN_PACKAGES)"; fi; \
	fi

demo: install
	$(PY) examples/lightning_quickstart.py

lint: install
	$(VENV)/bin/ruff check .
	mkdir -p build/mypy && ln -sfn ../../core build/mypy/lens_core && ln -sfn ../../lens_callbacks build/mypy/lens_callbacks
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -m "not zoo and not cuda" $(PYTEST_ARGS)

test-cuda: install
	$(PY) -m pytest -m cuda $(PYTEST_ARGS)

zoo: install
	$(PY) -m pytest -m zoo $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/capture_overhead.py
	$(PY) benchmarks/training_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
