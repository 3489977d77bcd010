# The two commands a new user needs:  `make demo`  and  `make test`.
# Both create/refresh the project-local virtual environment first (idempotent; seconds when up to date).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_CONFIG ?= configs/cpu/frcnn_r18_bn_2img.yaml
DEMO_OUTPUT ?= output/demo
PYTEST_ARGS ?=

.PHONY: env data demo test test-quick bench bench-smoke pretrain clean-env

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

# End-to-end benchmark of every norm (docs/benchmarks.md): tables printed, JSON + plot in $(BENCH_OUTPUT).
# About an hour on an idle 2-core machine; BENCH_ARGS="--precise-bn-images 100 1000 10000" for the issue's sizes.
BENCH_OUTPUT ?= output/bench
BENCH_ARGS ?=
bench: data
	@$(PY) -W ignore tools/benchmark.py --output $(BENCH_OUTPUT) $(BENCH_ARGS)

# The same at tiny sizes (under a minute): checks that the benchmark runs.
bench-smoke: data
	@$(PY) -W ignore tools/benchmark.py --tiny --output $(BENCH_OUTPUT)/smoke $(BENCH_ARGS)

clean-env:
	rm -rf $(VENV)
