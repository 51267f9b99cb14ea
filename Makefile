# diffbench: every target creates .venv and installs the project on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

EXP ?= eps_simple
ARGS ?=
OBJ ?= all
PROFILE ?= default
DATA ?=
SEEDS ?=
GPUS ?= 0
TRIALS_PER_GPU ?= 1
JOBS ?= 0
AGENTS ?= 0
LAUNCHER ?= local
WAIT ?=
PARTITION ?=
TIME ?= 240
CPUS ?= 4
ARRAY_PARALLELISM ?= 0
UNTIL ?=
MAX_STEPS ?=

.PHONY: help install test test-fast run sweep report lint format clean

help:
	@echo "make install           create .venv and install diffbench with its dev and bench tools"
	@echo "make test              run the test suite (what CI runs)"
	@echo "make test-fast         the tests not marked slow: the math, the statistics, the report (well under a minute)"
	@echo "make run EXP=eps_simple [ARGS='trainer.max_steps=500 seed=3']   train and evaluate one arm"
	@echo "make sweep OBJ=all [PROFILE=smoke|default|full] [DATA=digits] [SEEDS=3] [GPUS=0] [ARGS='…']"
	@echo "                       train + evaluate every selected arm x seed, then print the summary"
	@echo "                       OBJ=grid: every head x {elbo, elbo_is, eps, own}; OBJ=weightings: eps head x every weighting"
	@echo "make sweep OBJ=lr [LR_OF=all|grid|…]  the arms of sweep LR_OF at optim.lr 3e-4, 1e-3, 3e-3 on seed 0"
	@echo "make sweep OBJ=tuned [TUNE_OF=all|grid|…] [RATES=1e-4,3e-4,1e-3,3e-3]  each arm at its own learning rate:"
	@echo "                       stage 1 picks it on tuning seed 100 by validation metrics, stage 2 trains the seeds"
	@echo "make sweep OBJ=… UNTIL=settled [MAX_STEPS=16000]  double every trial's budget (continuing each trial)"
	@echo "                       until every headline is settled or more steps cannot help; resumes when rerun"
	@echo "make sweep … GPUS=1 TRIALS_PER_GPU=2   every GPU of the node busy, two trials per GPU"
	@echo "make sweep … LAUNCHER=slurm [PARTITION= TIME=240 WAIT=1]  a SLURM job array through submitit"
	@echo "make report [WANDB=entity/project]  verdicts, tables and figures from every finished run under runs/ -> runs/report/"
	@echo "make lint / format     ruff check / ruff format"
	@echo "make clean             remove caches (keeps runs/ and .venv)"

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

# Two pytest workers of one thread each (a file stays on one worker, so its fixtures are shared):
# on 2 cores that beats one process with two threads. TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: $(STAMP)
	$(PY) -m pytest $(XDIST)

test-fast: $(STAMP)
	$(PY) -m pytest $(XDIST) -m "not slow"

run: $(STAMP)
	$(PY) -m diffbench.run experiment=$(EXP) $(ARGS)

sweep: $(STAMP)
	$(PY) -m diffbench.sweep --obj "$(OBJ)" --profile "$(PROFILE)" --gpus "$(GPUS)" --jobs "$(JOBS)" \
		--trials-per-gpu "$(TRIALS_PER_GPU)" --agents "$(AGENTS)" --launcher "$(LAUNCHER)" \
		--time "$(TIME)" --cpus "$(CPUS)" --array-parallelism "$(ARRAY_PARALLELISM)" \
		$(if $(PARTITION),--partition "$(PARTITION)") \
		$(if $(WAIT),--wait) $(if $(DATA),--data "$(DATA)") $(if $(SEEDS),--seeds="$(SEEDS)") \
		$(if $(LR_OF),--lr-of "$(LR_OF)") $(if $(TUNE_OF),--tune-of "$(TUNE_OF)") \
		$(if $(RATES),--rates="$(RATES)") $(if $(UNTIL),--until "$(UNTIL)") \
		$(if $(MAX_STEPS),--max-steps "$(MAX_STEPS)") --args="$(ARGS)"

report: $(STAMP)
	$(PY) -m diffbench.report --runs runs $(if $(WANDB),--wandb "$(WANDB)")

lint: $(STAMP)
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests

format: $(STAMP)
	$(PY) -m ruff format src tests
	$(PY) -m ruff check --fix src tests

clean:
	rm -rf .pytest_cache .ruff_cache src/*.egg-info
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
