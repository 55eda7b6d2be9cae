# The two commands a fresh clone needs: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint proto proto-check bench bench-quick clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: it resolves to the CPU wheel on this disk (see DEVELOPERS.md).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# The demo as a local deployment (global, boundaries, devices as processes over gRPC + mTLS);
# `.venv/bin/echelon demo` simulates the same run, bit-for-bit repeatably.
demo: $(STAMP)
	$(BIN)/echelon demo --deploy

test: $(STAMP) lint proto-check
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# Regenerate the committed wire code from proto/ (protoc bundled with the pinned grpcio-tools).
proto: $(STAMP)
	$(BIN)/python -m echelon.tools.protogen src

# CI: the committed generated code must equal a fresh generation.
proto-check: $(STAMP)
	$(BIN)/python -m echelon.tools.protogen --check

# Every figure of benchmarks/ (long).
bench: $(STAMP)
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

# Every benchmark in its quick mode (each under a minute), so a benchmark that breaks fails CI.
bench-quick: $(STAMP)
	for b in benchmarks/*.py; do echo "== $$b --quick"; $(BIN)/python $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
