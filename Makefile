# fed-deq — every target creates .venv on first use, so `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch is installed first and pinned here; pyproject keeps a range so pip keeps this one.
# Elsewhere, point pip at a CPU wheel index with e.g. make TORCH_PIP_ARGS="--index-url <your CPU wheel index>".
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP  := $(VENV)/.fed-deq-installed
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: install run test bench bench-solvers bench-scale study robustness deploy-local test-containers clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC) $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/fed-deq simulate

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench-solvers: $(STAMP)
	$(BIN)/python benchmarks/solvers.py

# The 100- vs 10,000-client fleet alone (about 6 min; `make bench` runs it too): docs/scale.md.
bench-scale: $(STAMP)
	$(BIN)/python benchmarks/scale.py

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# docs/results.md and its figures: heterogeneous-fleet.yaml, 4 models x 3 rules x 5 seeds = 60 runs in one engine.
# Wall time: 52 min on this 2-core machine (2026-11-30); an interrupted study resumes (finished runs are reused).
study: $(STAMP)
	$(BIN)/python benchmarks/study.py

# docs/robustness.md and its figures: default.yaml, the robustness matrix (5 rules x 5 attacks x 2 fractions x 3
# seeds, plus a clean run per rule and seed: 165 runs) and 3 cells x 2 trainings x 3 seeds with adversarial
# evaluation (18 runs), all in one engine. Wall time: about 70 min on this 2-core machine (2026-11-30); an interrupted study
# resumes (finished runs made by the same code are reused).
robustness: $(STAMP)
	$(BIN)/python benchmarks/robustness_study.py

deploy-local: $(STAMP)
	$(BIN)/fed-deq deploy-local scenarios/default.yaml --out runs/deploy-local

test-containers: $(STAMP)
	bash docker/test-containers.sh

clean:
	rm -rf runs .pytest_cache
