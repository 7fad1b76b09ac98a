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
