# deeplense_nb — set-up, tests, demo, docs, benchmarks.  `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# uv: the one on PATH, else the one pip installed for python3 (bootstrapped by the `uv` target).
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
DEVICE ?= auto
DEMO_OUT ?= demo_out
export PYTHONUNBUFFERED := 1
export MPLBACKEND := Agg

.PHONY: help uv sync demo test lab docs bench readme export clean-nbs

help:  ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

uv:  ## install uv with pip when it is missing
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || \
	  { echo ">> uv not found: installing it with 'python3 -m pip install uv'"; python3 -m pip install --quiet uv; }

$(VENV)/.synced: uv.lock pyproject.toml | uv
	@echo ">> creating $(VENV) from uv.lock (uv sync --frozen)"
	$(UV) sync --frozen --all-extras --compile-bytecode
	@touch $@

sync: $(VENV)/.synced  ## create/update .venv from uv.lock

demo: $(VENV)/.synced  ## set up, simulate a Task I set, train, evaluate, write a report (DEVICE=cuda scales it up; OVERWRITE=1 to run again into DEMO_OUT)
	$(BIN)/deeplense demo --out $(DEMO_OUT) --device $(DEVICE) $(if $(OVERWRITE),--overwrite)

test: $(VENV)/.synced  ## the CI gate: library in sync with notebooks, docs preprocessing, notebook tests, pytest
	@echo ">> 1/5 nbdev-clean + nbdev-export must not change nbs/ or deeplense_nb/"
	@before=$$( (git diff --no-ext-diff -- nbs deeplense_nb; git status --porcelain --untracked-files=all -- nbs deeplense_nb) | md5sum ); \
	 $(BIN)/nbdev-clean && $(BIN)/nbdev-export && \
	 after=$$( (git diff --no-ext-diff -- nbs deeplense_nb; git status --porcelain --untracked-files=all -- nbs deeplense_nb) | md5sum ); \
	 if [ "$$before" != "$$after" ]; then echo "!! nbdev-clean/nbdev-export changed files: the library is out of sync with the notebooks."; \
	   git status --short -- nbs deeplense_nb; exit 1; fi
	@echo ">> 2/5 README.md generated from nbs/index.ipynb"
	$(PY) tools/readme.py --check
	@echo ">> 3/5 nbdev-proc-nbs (docs preprocessing)"
	$(BIN)/nbdev-proc-nbs > /dev/null
	@echo ">> 4/5 nbdev-test (skips cells marked: notest slow cuda; 2 workers of 1 torch thread each)"
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/nbdev-test --n-workers 2 --timing
	@echo ">> 5/5 pytest (2 workers of 1 torch thread each)"
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/pytest -n 2 --dist load

lab: $(VENV)/.synced  ## JupyterLab on the project
	$(BIN)/jupyter lab --notebook-dir=.

docs: $(VENV)/.synced  ## render the docs with Quarto (or, without Quarto, run the preprocessing only)
	@if command -v quarto >/dev/null 2>&1; then $(BIN)/nbdev-docs; \
	 else echo ">> Quarto is not installed (https://quarto.org/docs/get-started/): running nbdev-proc-nbs only; rendered docs need Quarto."; \
	   $(BIN)/nbdev-proc-nbs && echo ">> preprocessed notebooks are in _proc/"; fi

bench: $(VENV)/.synced  ## run benchmarks/bench_*.py, JSON results in bench_results/
	@mkdir -p bench_results
	@for f in benchmarks/bench_*.py; do echo ">> $$f"; $(PY) $$f --out bench_results || exit 1; done

readme: $(VENV)/.synced  ## regenerate README.md from nbs/index.ipynb
	$(PY) tools/readme.py

export: $(VENV)/.synced  ## nbdev-export + nbdev-clean
	$(BIN)/nbdev-export && $(BIN)/nbdev-clean
