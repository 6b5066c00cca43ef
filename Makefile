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
ARCH ?=  # empty: the profile's backbone (`python -m training --help` lists both and the choices)
# The default profile distils from CSAIL's Places365 network (its file in $(WEIGHTS)/places365; README
# "Distillation"): TRAIN_ARGS="--kd-alpha 0" trains without it. `make compare` runs each MobileNet both ways.
TRAIN_ARGS ?=
RUN_DIR ?= runs/$(PROFILE)
# The model-store name `make train` adds a version to; the service serves RC_MODEL_TAG (room_classifier:latest).
MODEL_NAME ?= room_classifier
PORT ?= 3000
export TORCH_HOME ?= $(CURDIR)/.torch
export BENTOML_DO_NOT_TRACK ?= true
# Local base image and the host's extra CA certificates for machines without a registry (see scripts/container).
LOCAL_BASE ?= localhost/bento-base:bookworm
EXTRA_CA ?= /usr/local/share/ca-certificates

# The pipeline's products are files, so `make all` redoes only what is out of date (a second run does nothing):
# dataset manifest -> trained + registered run -> bento. `make -B train` retrains anyway.
DATASET := $(OUT)/dataset/manifest.csv
REGISTERED := $(RUN_DIR)/registered.json
BENTO := $(OUT)/bento.built

# make bulk SOURCE=DIR|LIST [RESULTS=FILE] [BULK_ARGS="--address HOST:PORT ..."]: tag a catalogue on Ray
RESULTS ?= $(OUT)/bulk/results.parquet
BULK_ARGS ?=

.PHONY: setup dataset train scene compare bento serve container-setup image run-image bench soak benchmark-data all test test-e2e test-web lint bulk bench-bulk manifests footprint

# setup: everything (training, tests, bulk, the browser for the page's tests); `make serve` needs only serving.
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml serving-requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[train,dev]"
	scripts/install_browser.sh
	command -v helm >/dev/null || scripts/deploy/install_helm.sh
	touch $@

$(VENV)/.serving: pyproject.toml serving-requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

dataset: $(DATASET)

$(DATASET): $(wildcard data_prep/*.py) | $(VENV)/.installed
	$(PY) -m data_prep --sunrgbd $(DATA)/SUNRGBD --extra $(DATA)/extra/places365 --extra $(DATA)/extra/house_rooms \
		--other $(DATA)/other/miniplaces --other $(DATA)/other/places365 --other $(DATA)/other/house_rooms --out $(OUT)/dataset

train: $(REGISTERED)

$(REGISTERED): $(DATASET) $(wildcard training/*.py) | $(VENV)/.installed
	$(PY) -m training run --data $(OUT)/dataset --run-dir $(RUN_DIR) --profile $(PROFILE) $(if $(strip $(ARCH)),--arch $(ARCH)) --weights-dir $(WEIGHTS) --int8 --model-name $(MODEL_NAME) $(TRAIN_ARGS)

# The Places365 scene network at its own 224 px with a classifier fitted on our photos (the accurate option, README
# "The scene network as the model"; chosen on validation over the `scene` profile), registered beside the default:
# serve it with RC_MODEL_TAG=room_classifier_scene:latest.
scene:
	$(MAKE) train PROFILE=scene_head MODEL_NAME=room_classifier_scene

compare: setup
	$(PY) -m training compare --data $(OUT)/dataset --run-dir runs/compare --weights-dir $(WEIGHTS) --distill both

bento: $(BENTO)

$(BENTO): $(REGISTERED) service.py bentofile.yaml serving-requirements.txt $(wildcard inference/*.py serving/*.py serving/static/*) | $(VENV)/.installed
	$(VENV)/bin/bentoml build
	touch $@

serve: $(VENV)/.serving
	$(VENV)/bin/bentoml serve service:RoomClassifier --port $(PORT)

all: $(BENTO)

container-setup:
	scripts/container/setup_podman.sh

image: setup
	RC_BASE_IMAGE=$(LOCAL_BASE) RC_EXTRA_CA_CERTS=$(EXTRA_CA) scripts/container/build_image.sh

run-image:
	@test -n "$(IMAGE)" || (echo "usage: make run-image IMAGE=localhost/room-classifier:<version> [PORT=3000]" && exit 2)
	scripts/container/run_container.sh $(IMAGE) $(PORT)

# deploy/manifests/room-classifier.yaml: the Helm chart rendered for people without Helm (needs helm:
# scripts/deploy/install_helm.sh); tests/test_deploy.py fails when the committed file differs.
manifests:
	scripts/deploy/render_manifests.sh > deploy/manifests/room-classifier.yaml

# What one replica needs (cold start, memory, cores): the numbers in deploy/helm/room-classifier/values.yaml.
footprint: setup
	$(PY) -m benchmarks.footprint --json $(OUT)/footprint.json

bench: setup
	$(PY) -m benchmarks.speed --batching-off --overload --json $(OUT)/speed.json

soak: setup
	$(PY) -m benchmarks.soak --json $(OUT)/soak.json --plot $(OUT)/soak.png

bulk: setup
	@test -n "$(SOURCE)" || (echo "usage: make bulk SOURCE=folder-or-list [RESULTS=file.parquet|.csv] [BULK_ARGS=...]" && exit 2)
	$(PY) -m bulk $(SOURCE) --out $(RESULTS) $(BULK_ARGS)

bench-bulk: setup
	$(PY) -m benchmarks.bulk --json $(OUT)/bench_bulk.json

benchmark-data: setup
	$(PY) -m data_prep.benchmark

test: setup
	ROOM_REQUIRE_BROWSER=1 ROOM_REQUIRE_HELM=1 $(PY) -m pytest

# ruff, then the import contracts in pyproject.toml ([tool.importlinter]: the kernel never imports the server, ...)
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

test-e2e: setup
	$(PY) -m pytest -m e2e

# The web page in headless Debian chromium (apt-get install -y chromium); screenshots of each state kept under $(OUT).
test-web: setup
	ROOM_REQUIRE_BROWSER=1 ROOM_SCREENSHOTS=$(OUT)/web_screenshots $(PY) -m pytest tests/test_web_page.py
