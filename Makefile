# The two commands a new user needs:  `make demo`  and  `make test`.
# Both create/refresh the project-local virtual environment first (idempotent; seconds when up to date).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_CONFIG ?= configs/cpu/frcnn_r18_bn_2img.yaml
DEMO_OUTPUT ?= output/demo
PYTEST_ARGS ?=

.PHONY: env data demo test test-quick bench clean-env

env:
	@VENV=$(VENV) bash scripts/setup_env.sh

data: env
	@$(PY) datasets/prepare_fashion_scenes.py --name fashion_scenes

# Build fashion-scenes, train the CPU-sized Faster R-CNN at 2 images per batch, COCO-evaluate.
demo: data
	@$(PY) -W ignore tools/train_net.py --config $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_OUTPUT)

# The whole suite, slow tests included (what CI runs).
test: env
	@$(PY) -m pytest -q $(PYTEST_ARGS)

# Everything but the tests marked slow.
test-quick: env
	@$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean-env:
	rm -rf $(VENV)
