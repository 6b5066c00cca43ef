# Room Classifier: one venv, one command per stage. `make all` runs the whole product, `make test` the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data
WEIGHTS ?= ../shared/weights
OUT ?= artifacts
export TORCH_HOME ?= $(CURDIR)/.torch

.PHONY: setup dataset train bento all test test-e2e

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[train,dev]"
	touch $@

dataset: setup
	$(PY) -m data_prep --sunrgbd $(DATA)/SUNRGBD --extra $(DATA)/extra/places365 --extra $(DATA)/extra/house_rooms --out $(OUT)/dataset

all: dataset

test: setup
	$(PY) -m pytest

test-e2e: setup
	$(PY) -m pytest -m e2e
