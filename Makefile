# Two commands do all set-up: `make demo` and `make test`. Both build .venv when
# pyproject.toml changes and are silent when nothing did.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python
DEMO_OUT ?= demo-out

.PHONY: demo test lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Setting up $(VENV) (torch 2.13.0 CPU, then hlip[dev]) ..."
	@$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "is ignored" || true
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "is ignored" || true
	@$(PY) -c "import hlip, torch, zarr, webdataset" && touch $(STAMP)

test: $(STAMP)
	@$(PY) -m pytest -q -n 2 --durations=15 tests

lint: $(STAMP)
	@$(VENV)/bin/ruff check hlip tests bench
	@$(VENV)/bin/ruff format --check hlip tests bench

demo: $(STAMP)
	@bash scripts/demo.sh $(DEMO_OUT)

clean:
	rm -rf $(VENV) $(DEMO_OUT)
