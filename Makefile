# Two commands for a fresh machine with Python 3.11 and make:
#   make quickstart   environment + the quickstart study + its report
#   make test         environment + the test suite (what CI runs)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ROOT   ?= runs
WORKERS ?= 2

REFERENCE := studies/results/odyssey

.PHONY: quickstart test test-all bench dashboard reference figures clean

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

# The suite in TEST_JOBS processes (pytest-xdist), a test file per process at a time: 8.0-9.5 min on 2 cores (CI).
TEST_JOBS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q -n $(TEST_JOBS) --dist loadfile --durations=15

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

# The reference study (studies/odyssey.yaml, about 45 min with 2 workers on 2 cores; resumes if stopped),
# then its tables copied over the shipped ones: `git diff studies/results` shows what moved on this machine.
reference: $(STAMP)
	$(BIN)/rnnbench run odyssey --root $(ROOT) --workers $(WORKERS)
	$(BIN)/rnnbench report odyssey --root $(ROOT)
	mkdir -p $(REFERENCE)
	cp $(ROOT)/reports/odyssey/*.parquet $(ROOT)/reports/odyssey/*.csv $(ROOT)/reports/odyssey/manifest.json $(REFERENCE)/

# The shipped reference report redrawn from the shipped tables alone (no training, no MLflow).
figures: $(STAMP)
	$(BIN)/rnnbench report --from $(REFERENCE) --out $(ROOT)/reports/odyssey-shipped
	@echo "Report: $(ROOT)/reports/odyssey-shipped/index.html"

bench: $(STAMP)
	$(BIN)/rnnbench bench

dashboard: $(STAMP)
	$(BIN)/rnnbench dashboard --root $(ROOT)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
