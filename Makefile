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
