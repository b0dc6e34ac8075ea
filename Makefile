# Two commands for a fresh machine with Python 3.11 and make:
#   make quickstart   environment + the quickstart study + its report
#   make test         environment + the test suite (what CI runs)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ROOT   ?= runs
WORKERS ?= 2

.PHONY: quickstart test test-all bench dashboard clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "rnnbench needs Python 3.11; set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,dashboard]'
	@touch $@

quickstart: $(STAMP)
	$(BIN)/rnnbench run quickstart --root $(ROOT) --workers $(WORKERS)
	$(BIN)/rnnbench report quickstart --root $(ROOT)
	@echo
	@echo "Report:    $(ROOT)/reports/quickstart/index.html"
	@echo "Dashboard: $(BIN)/rnnbench dashboard --root $(ROOT)   (then open http://127.0.0.1:5000)"

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/rnnbench bench

dashboard: $(STAMP)
	$(BIN)/rnnbench dashboard --root $(ROOT)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
