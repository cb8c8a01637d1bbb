# batchscore: `make demo` runs the example end to end (`make up` leaves its Airflow up, for its UI); `make test` runs the suite (lint and type check first);
# `make test-unit` the tests that need neither Docker nor a scheduler, for the edit-test loop.
# Every target is safe to repeat: what was built before is reused.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
IMAGE  ?= batchscore-scoring:latest
SERVE_IMAGE ?= batchscore-iris-serve:latest
# The compose stack's image; docker-compose.yaml and the tests read the same variable.
BATCHSCORE_AIRFLOW_IMAGE ?= batchscore-airflow:latest
IRIS   := include/examples/iris
MODEL  := $(IRIS)/model/iris-classifier/model.joblib

.DEFAULT_GOAL := help
.PHONY: help venv images images-gpu images-airflow images-serve example demo up demo-s3 compose-env lint typecheck test-unit test bench schema lock clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

venv: $(VENV)/.installed  ## the virtual environment with the pinned Airflow side and the pinned dev tools (ruff, mypy)
$(VENV)/.installed: requirements.lock requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt -c requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

images:  ## the scoring image, built offline when no registry answers (docker/build-images.sh)
	IMAGE=$(IMAGE) bash docker/build-images.sh

images-gpu:  ## the GPU variant of the scoring image (needs a CUDA runtime base: CUDA_BASE_IMAGE)
	bash docker/build-images.sh --gpu

images-airflow:  ## the Airflow image of the docker-compose stack (batchscore-airflow), built offline like the scoring image
	IMAGE=$(BATCHSCORE_AIRFLOW_IMAGE) bash docker/build-images.sh --airflow

images-serve: images  ## the example's SageMaker serving image (batchscore-iris-serve), FROM the scoring image
	DOCKER_BUILDKIT=0 docker build --quiet --build-arg BASE_IMAGE=$(IMAGE) -t $(SERVE_IMAGE) $(IRIS)/serving

example: images images-serve $(MODEL)  ## train the example model, write its input files; build its serving image
$(MODEL): $(IRIS)/train.py
	docker run --rm --user $$(id -u):$$(id -g) -e HOME=/tmp -v $(CURDIR)/$(IRIS):/example -w /example $(IMAGE) python3 train.py

demo: venv example  ## run the example DAG on a real scheduler and print where its output is
	$(BIN)/python -m batchscore run iris-batch --dags-folder dags --home .airflow

up: venv example  ## the demo's Airflow (.airflow), left up: prints its URL and login; Ctrl-C stops it and removes its runs' containers
	$(BIN)/python -m batchscore up --dags-folder dags --home .airflow

demo-s3: venv example  ## the example with model, input and output on a local S3 server (SeaweedFS); KEEP=1 keeps it up after
	$(BIN)/python -m batchscore demo-s3 --dags-folder dags --home .airflow-s3 $(if $(KEEP),--keep)

compose-env: .env  ## .env for docker-compose.yaml: your uid, the Docker socket's group, this folder, the data folder, secrets
.env:
	mkdir -p data var/airflow/logs
	{ echo "# docker-compose settings (make compose-env; README: Running on several workers)"; \
	  echo "AIRFLOW_UID=$$(id -u)"; \
	  echo "DOCKER_GID=$$(stat -c %g /var/run/docker.sock)"; \
	  echo "BATCHSCORE_HOST_DIR=$(CURDIR)"; \
	  echo "BATCHSCORE_DATA_DIR=$(CURDIR)/data"; \
	  echo "AIRFLOW_JWT_SECRET=$$(python3 -c 'import secrets; print(secrets.token_urlsafe(64))')"; \
	  echo "AIRFLOW_API_SECRET_KEY=$$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"; \
	} > $@
	@echo "wrote $@; start the stack with: docker-compose up -d"

lint: venv  ## ruff: the lint rules and the formatting (configured in pyproject.toml)
	$(BIN)/ruff check . ; found=$$?; $(BIN)/ruff format --check . && exit $$found

typecheck: venv  ## mypy on batchscore and batchscore_runtime (configured in pyproject.toml)
	$(BIN)/mypy --python-executable $(BIN)/python

# The fast lane: no Docker engine, image or scheduler needed (the markers are in pyproject.toml;
# tests/conftest.py marks every test that uses an image fixture `docker`). Its tests mostly wait on
# the processes they start, so more workers than cores still pay: UNIT_WORKERS=0 runs them in one process.
UNIT_WORKERS ?= 4
UNIT_MARKERS := not docker and not scheduler and not celery and not s3 and not bench
test-unit: venv  ## the tests that need no Docker, Airflow, S3 server nor benchmark run, in parallel (about a minute on 2 cores)
	$(BIN)/pytest -n $(UNIT_WORKERS) -m "$(UNIT_MARKERS)"

test: venv lint typecheck example images-airflow  ## lint, type check, then the test suite (what CI runs); the Celery tests need postgresql and redis-server (Debian packages)
	$(BIN)/pytest

bench: venv example  ## the benchmarks of issue 6 (bench/README.md), not part of test; some: make bench ONLY="merge skew"
	$(BIN)/python -m bench $(ONLY)

schema: venv  ## regenerate the JSON schema of the deployment YAML
	$(BIN)/python -m batchscore.spec > include/schema/deployment.schema.json

lock:  ## re-pin requirements.lock from requirements.in
	rm -rf /tmp/batchscore-lock && $(PYTHON) -m venv /tmp/batchscore-lock
	/tmp/batchscore-lock/bin/pip install --quiet -r requirements.in
	(echo "# Pinned dependency tree of the Airflow side (generated from requirements.in by \`make lock\`)."; \
	 /tmp/batchscore-lock/bin/pip freeze | sort -f) > requirements.lock

clean:  ## remove the venv, the demos' Airflow homes and outputs, and the example's model and data
	rm -rf $(VENV) .airflow .airflow-s3 var $(IRIS)/model $(IRIS)/data $(IRIS)/data-serve $(IRIS)/data-serve-jsonl
