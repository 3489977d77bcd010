# The two commands a new user needs:  `make demo`  and  `make test`.
# Both create/refresh the project-local virtual environment first (idempotent; seconds when up to date).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_CONFIG ?= configs/cpu/frcnn_r18_bn_2img.yaml
DEMO_OUTPUT ?= output/demo
PYTEST_ARGS ?=

.PHONY: env data demo test test-quick bench pretrain clean-env

env:
	@VENV=$(VENV) bash scripts/setup_env.sh

data: env
	@$(PY) datasets/prepare_fashion_scenes.py --name fashion_scenes

# Build fashion-scenes, train the CPU-sized Faster R-CNN at 2 images per batch, COCO-evaluate.
demo: data
	@$(PY) -W ignore tools/train_net.py --config $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_OUTPUT)

# Backbones pre-trained on Fashion-MNIST for the CPU transfer configs (frozen / fine-tuned / re-initialised BN);
# each is built once (delete the file to rebuild it).
PRETRAINED := output/pretrain/r18_fashion_mnist.pkl output/pretrain/r18_gn_fashion_mnist.pkl output/pretrain/r18_fashion_mnist_wc.pkl
pretrain: $(PRETRAINED)

output/pretrain/r18_fashion_mnist.pkl: | env
	@$(PY) -W ignore tools/pretrain_backbone.py --output $@ --json $(@:.pkl=.json)
output/pretrain/r18_gn_fashion_mnist.pkl: | env
	@$(PY) -W ignore tools/pretrain_backbone.py --norm GN --output $@ --json $(@:.pkl=.json)
output/pretrain/r18_fashion_mnist_wc.pkl: | env
	@$(PY) -W ignore tools/pretrain_backbone.py --weight-centralization --output $@ --json $(@:.pkl=.json)

# The whole suite, slow tests included (what CI runs).
test: env
	@$(PY) -m pytest -q $(PYTEST_ARGS)

# Everything but the tests marked slow.
test-quick: env
	@$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean-env:
	rm -rf $(VENV)
