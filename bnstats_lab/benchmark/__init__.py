"""Benchmarks of the norms: per layer (layers.py), PreciseBN's cost (precise_bn.py), the distributed
layers in several processes (distributed.py) and end to end in detectron2 models: e2e.py runs the
measurements of training.py, memory.py, inference.py and precise_bn_scaling.py on the models of
models.py and reports them with report.py; timing.py holds the interleaved timing they share."""
