# Room Classifier: one venv, one command per stage.
#   make all    set up, prepare the dataset, train + evaluate + register the model, build the bento
#   make test   the default test suite;  make test-e2e  the slow end-to-end group (CI runs both)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data
WEIGHTS ?= ../shared/weights
OUT ?= artifacts
PROFILE ?= default
ARCH ?= mobilenet_v2
# Distillation from CSAIL's Places365 network (weights in $(WEIGHTS)/places365); `make train KD=` trains without it.
KD ?= --kd-alpha 0.5 --kd-temperature 4
RUN_DIR ?= runs/$(PROFILE)
PORT ?= 3000
export TORCH_HOME ?= $(CURDIR)/.torch
export BENTOML_DO_NOT_TRACK ?= true
# Local base image and the host's extra CA certificates for machines without a registry (see scripts/container).
LOCAL_BASE ?= localhost/bento-base:bookworm
EXTRA_CA ?= /usr/local/share/ca-certificates

.PHONY: setup dataset train compare bento serve container-setup image run-image bench soak benchmark-data all test test-e2e

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[train,dev]"
	touch $@

dataset: setup
	$(PY) -m data_prep --sunrgbd $(DATA)/SUNRGBD --extra $(DATA)/extra/places365 --extra $(DATA)/extra/house_rooms --out $(OUT)/dataset

train: setup
	$(PY) -m training run --data $(OUT)/dataset --run-dir $(RUN_DIR) --profile $(PROFILE) --arch $(ARCH) --weights-dir $(WEIGHTS) --int8 $(KD)

compare: setup
	$(PY) -m training compare --data $(OUT)/dataset --run-dir runs/compare --weights-dir $(WEIGHTS) --archs mobilenet_v3_small mobilenet_v2 mobilenet_v3_large --distill both $(KD)

bento: setup
	$(VENV)/bin/bentoml build

serve: setup
	$(VENV)/bin/bentoml serve service:RoomClassifier --port $(PORT)

all: dataset train bento

container-setup:
	scripts/container/setup_podman.sh

image: setup
	RC_BASE_IMAGE=$(LOCAL_BASE) RC_EXTRA_CA_CERTS=$(EXTRA_CA) scripts/container/build_image.sh

run-image:
	scripts/container/run_container.sh $(IMAGE) $(PORT)

bench: setup
	$(PY) -m benchmarks.bench_service --json $(OUT)/bench.json --plot $(OUT)/bench.png

soak: setup
	$(PY) -m benchmarks.soak --json $(OUT)/soak.json --plot $(OUT)/soak.png

benchmark-data: setup
	$(PY) -m data_prep.benchmark

test: setup
	$(PY) -m pytest

test-e2e: setup
	$(PY) -m pytest -m e2e
