# The two commands a new user needs:  `make demo`  and  `make test`.
# Both create/refresh the project-local virtual environment first (idempotent; seconds when up to date).
VENV ?= .venv
PY := $(VENV)/bin/python
# fashion-scenes at appearance diversity 2 (the results' benchmark level), where the inference statistics matter
DEMO_CONFIG ?= configs/cpu/demo_evalnorm_diverse.yaml
DEMO_SCENES ?= fashion_scenes_d200
DEMO_OUTPUT ?= output/demo
# The demo's schedule: 800 iterations (LR steps at 70% and 90%) keeps `make demo` under 15 minutes (8 measured,
# data already built). SEED 0: every run of the demo trains and compares the same (the README's numbers).
DEMO_OPTS ?= SOLVER.MAX_ITER 800 SOLVER.STEPS "(560, 720)" SEED 0
DEMO_STRATEGIES ?= ema precise_bn:100 evalnorm_learned evalnorm_rule
PYTEST_ARGS ?=
# test processes of `make test` (pytest-xdist; each gets its share of the cores as torch threads)
TEST_WORKERS ?= 2

.PHONY: env data demo test test-quick bench bench-smoke pretrain results results-data clean-env

env:
	@VENV=$(VENV) bash scripts/setup_env.sh

data: env
	@$(PY) datasets/prepare_fashion_scenes.py --name fashion_scenes
	@$(PY) datasets/prepare_fashion_scenes.py --name $(DEMO_SCENES)

# Build fashion-scenes (default and diverse), train the CPU-sized Faster R-CNN (EvalNorm in backbone and FPN)
# at 2 images per batch on the diverse scenes, COCO-evaluate; then evaluate the same checkpoint under each
# inference-statistics strategy (the comparison table at the end).
demo: data
	@$(PY) -W ignore tools/train_net.py --config $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_OUTPUT) $(DEMO_OPTS)
	@$(PY) -W ignore tools/compare_bn_stats.py --config $(DEMO_CONFIG) --output $(DEMO_OUTPUT)/compare \
		--strategies $(DEMO_STRATEGIES) --discrepancy-images 8 \
		OUTPUT_DIR $(DEMO_OUTPUT) MODEL.WEIGHTS $(DEMO_OUTPUT)/model_final.pth $(DEMO_OPTS)

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

# The whole suite, slow tests included (what CI runs: .ci/run): two pytest-xdist processes; 11.7 minutes measured
# in a fresh clone on the idle 2-core machine, 15.4 beside a 1-thread training run.
test: env
	@$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Everything but the tests marked slow (about 4 minutes).
test-quick: env
	@$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

# End-to-end benchmark of every norm (docs/benchmarks.md): tables printed, JSON + plot in $(BENCH_OUTPUT).
# About an hour on an idle 2-core machine; BENCH_ARGS="--precise-bn-images 100 1000 10000" for the full PreciseBN sizes.
BENCH_OUTPUT ?= output/bench
BENCH_ARGS ?=
bench: data
	@$(PY) -W ignore tools/benchmark.py --output $(BENCH_OUTPUT) $(BENCH_ARGS)

# The same at tiny sizes (under a minute): checks that the benchmark runs.
bench-smoke: data
	@$(PY) -W ignore tools/benchmark.py --tiny --output $(BENCH_OUTPUT)/smoke $(BENCH_ARGS)

# The declared experiments (bnstats_lab/experiments/catalog.py; protocol in docs/results.md): runs every
# (cell, seed) without a record under results/, resumable, in the order of the protocol's revision (the
# dose-response cells of e1, the converged detectors e5, then e2), then renders docs/results.md.
# Hours on 2 cores. EXPERIMENTS=... runs those experiments whole instead.
DOSE_RESPONSE_CELLS := scratch_2img_d050 scratch_2img_d100 scratch_2img_default
EXPERIMENTS ?=
EXPERIMENT_THREADS ?= 2
# every scene set the experiments use (each built once)
results-data: env
	@for name in fashion_scenes fashion_scenes_d050 fashion_scenes_d100 fashion_scenes_d200; do \
		$(PY) datasets/prepare_fashion_scenes.py --name $$name || exit 1; done

results: results-data
ifeq ($(strip $(EXPERIMENTS)),)
	-@$(PY) -W ignore tools/run_experiments.py --experiment e1 --cells $(DOSE_RESPONSE_CELLS) --threads $(EXPERIMENT_THREADS)
	-@$(PY) -W ignore tools/run_experiments.py --experiment e5 e2 --threads $(EXPERIMENT_THREADS)
	@$(PY) -W ignore tools/run_experiments.py --report
else
	@$(PY) -W ignore tools/run_experiments.py --experiment $(EXPERIMENTS) --threads $(EXPERIMENT_THREADS) --report
endif

clean-env:
	rm -rf $(VENV)
