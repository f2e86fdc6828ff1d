# Two entry points for a fresh clone: `make demo` trains the digits example,
# `make test` runs lint, type checks and every test of the core and the plugins.
# Both create .venv and install everything on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PLUGINS := plugins/swag plugins/model_selection plugins/server_validation plugins/ray
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest install

install: $(STAMP)

$(STAMP): pyproject.toml setup.py flcore/_fold.c constraints.txt $(addsuffix /pyproject.toml,$(PLUGINS))
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]' $(addprefix -e ./,$(PLUGINS))
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/flcore run examples/digits/job.toml

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy flcore examples bench $(foreach p,$(PLUGINS),$(p)/flcore_$(notdir $(p)))

pytest: $(STAMP)
	$(BIN)/python -m pytest tests $(addsuffix /tests,$(PLUGINS))

test: lint typecheck pytest
