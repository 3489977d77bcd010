"""detectron2 glue: the get_norm patch, config keys, trainer, hooks, launch, evaluation.

The maths lives in :mod:`d2_bnstats.layers` and knows nothing of what is here.
"""
