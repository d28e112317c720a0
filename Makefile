PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup demo test check bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/pip install -q -c requirements-cpu.txt torch
	$(BIN)/pip install -q -c requirements-cpu.txt -e '.[dev]'

## record the digits example, replay it with a new metric, print the query
demo: setup
	$(BIN)/python examples/hindsight_demo.py

test: setup
	$(BIN)/pytest -q

check: setup
	$(BIN)/ruff check flor_lightning tests examples benchmarks
	$(BIN)/ruff format --check flor_lightning tests examples benchmarks
	$(BIN)/mypy
	$(BIN)/pytest -q

## every benchmark, one results table (benchmarks/results/RESULTS.md, embedded in README.md); < 15 min
bench: setup
	$(BIN)/pip install -q -c requirements-cpu.txt -e '.[bench]' || echo "peers not installed: their rows say SKIPPED"
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .flor build *.egg-info
