PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
REFERENCE_DIR ?= .cache/reference

.PHONY: install test

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -r requirements.txt "torch==$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')"
	$(PY) -m pip install --quiet --no-deps openicl==0.1.8
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip download --quiet --no-deps EMOLoss==0.0.3 -d $(REFERENCE_DIR)
	touch $@

install: $(VENV)/.installed

test: install
	HF_HUB_OFFLINE=1 WANDB_MODE=$${WANDB_MODE:-disabled} $(PY) -m pytest -q

# ---- Track 1: language modelling (GPT-2; needs the Hugging Face Hub, ideally a GPU) ----
DATA ?= wikitext2
LM_OBJECTIVES ?= mle,mixce,tailr,emo
EXPERIMENT ?= lm_gpt2
RUN_ARGS ?=

.PHONY: lm-gpt2 tables

lm-gpt2: install
	$(PY) run.py -m experiment=lm_gpt2 data=$(DATA) objective=$(LM_OBJECTIVES) $(RUN_ARGS)
	$(MAKE) tables EXPERIMENT=lm_gpt2

tables: install
	$(PY) -m experiments.tables --experiment $(EXPERIMENT)

# ---- The demo: tiny GPT-2 students of a synthetic oracle language (offline, CPU, a few minutes) ----
# Exact forward/reverse KL and TVD from the oracle, MAUVE (MiniLM) and distinct-n per objective.
# One torch thread per process: the tiny models gain nothing from more, and lose a lot on a busy CPU.
DEMO_OBJECTIVES ?= mle,mixce,tailr,emo
DEMO_THREADS ?= 1

.PHONY: demo

demo: install
	OMP_NUM_THREADS=$(DEMO_THREADS) HF_HUB_OFFLINE=1 WANDB_MODE=$${WANDB_MODE:-disabled} \
		$(PY) run.py -m experiment=demo objective=$(DEMO_OBJECTIVES) $(RUN_ARGS)
	$(PY) -m experiments.demo
