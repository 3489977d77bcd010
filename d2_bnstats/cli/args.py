"""One command-line convention for every command of the plug-in.

- Flags and config overrides mix in any order: ``--config-file C MODEL.WEIGHTS W --output O --fold``
  is ``--config-file C --output O --fold MODEL.WEIGHTS W``. Overrides are ``KEY VALUE`` pairs for yacs
  configs and ``path.key=value`` for LazyConfigs (detectron2's two forms). detectron2's own parser
  takes the overrides as a ``REMAINDER``, which swallows every flag after the first override; here they
  are an ordinary positional read by ``parse_intermixed_args``.
- A flag that takes a list (``--strategies a b``) stops at the first word that is an override
  (``MODEL.WEIGHTS``, ``train.max_iter=10``): such words go back to the overrides.
- ``--config`` is an alias of ``--config-file``; a config file may be ``bnstats://NAME``, a config packaged
  with the plug-in (:mod:`d2_bnstats.model_zoo`), which the parsed arguments hold as its path.
- The launch flags (``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``; ``--resume``
  and ``--eval-only`` for the training commands) have detectron2's defaults (the per-user port of
  ``--dist-url`` included), and only commands that launch processes show them.
"""
import argparse
import re
from typing import Dict, Optional

from ..d2.datasets import add_register_coco_argument
from ..model_zoo import resolve_config_path

YACS = "yacs"
LAZY = "lazy"
# OUTPUT_DIR, MODEL.WEIGHTS, ...: yacs keys; train.max_iter=10, model.backbone.norm=GN: LazyConfig overrides
OVERRIDE_PATTERNS = {
    # a dotted key, or one of detectron2's top-level leaves (a bare "BN" after --norms is a value, not a key)
    YACS: re.compile(r"^([A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+|OUTPUT_DIR|SEED|CUDNN_BENCHMARK|VIS_PERIOD|VERSION)$"),
    LAZY: re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_\[\]]+)*="),
}
OVERRIDES_HELP = {
    YACS: 'config overrides, space-separated "PATH.KEY VALUE" pairs (e.g. MODEL.WEIGHTS W SOLVER.MAX_ITER 100), '
          "before, between or after the flags",
    LAZY: 'config overrides, "path.key=value" (e.g. train.max_iter=100 train.init_checkpoint=W), before, '
          "between or after the flags",
}
CONFIG_HELP = "config file (a path, or bnstats://NAME for a config packaged with d2_bnstats)"

LAUNCH_HELP = {
    "--num-gpus": "processes per machine: one per GPU, or on the CPU that many processes over gloo (default 1)",
    "--num-machines": "total number of machines (default 1)",
    "--machine-rank": "the rank of this machine, unique per machine (default 0)",
    "--dist-url": "initialization URL of torch.distributed (default: a port fixed per user, on 127.0.0.1)",
}
TRAINING_HELP = {
    "--resume": "continue from the last checkpoint in OUTPUT_DIR (else start from MODEL.WEIGHTS)",
    "--eval-only": "only evaluate MODEL.WEIGHTS (or with --resume the last checkpoint of OUTPUT_DIR)",
}


def _detectron2_defaults() -> Dict[str, object]:
    from detectron2.engine import default_argument_parser

    parser = default_argument_parser()
    return {dest: parser.get_default(dest) for dest in ("num_gpus", "num_machines", "machine_rank", "dist_url")}


class ToolArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` with the convention of the module docstring: ``--config-file``/``--config``
    (unless ``config=False``),
    ``--register-coco`` (unless ``register_coco=False``), the launch flags (``launch=True``; with
    ``training_flags`` also ``--resume`` and ``--eval-only``, whose help ``launch_help`` may replace)
    and the overrides (``overrides``: "yacs" or "lazy") as a positional that may stand anywhere."""

    def __init__(self, *args, overrides: str = YACS, config: bool = True, config_required: bool = False,
                 config_default: str = "", config_help: str = CONFIG_HELP, launch: bool = False,
                 training_flags: bool = False, launch_help: Optional[Dict[str, str]] = None,
                 register_coco: bool = True, **kwargs):
        if overrides not in OVERRIDE_PATTERNS:
            raise ValueError(f"overrides={overrides!r}: accepted: {', '.join(OVERRIDE_PATTERNS)}")
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.overrides = overrides
        if config:
            self.add_argument("--config-file", "--config", dest="config_file", metavar="FILE", required=config_required,
                              default=None if config_required else config_default, help=config_help)
        helps = {**TRAINING_HELP, **LAUNCH_HELP, **(launch_help or {})}
        if launch:
            if training_flags:
                for flag in TRAINING_HELP:
                    self.add_argument(flag, action="store_true", help=helps[flag])
            defaults = _detectron2_defaults()
            for flag, kind in (("--num-gpus", int), ("--num-machines", int), ("--machine-rank", int),
                               ("--dist-url", str)):
                dest = flag.lstrip("-").replace("-", "_")
                self.add_argument(flag, type=kind, default=defaults[dest], help=helps[flag])
        if register_coco:
            add_register_coco_argument(self)

    def _add_overrides(self) -> None:
        if not any(action.dest == "opts" for action in self._actions):  # last, so that it is last in --help
            self.add_argument("opts", nargs="*", default=[], metavar="OVERRIDE", help=OVERRIDES_HELP[self.overrides])

    def format_usage(self):
        self._add_overrides()
        return super().format_usage()

    def format_help(self):
        self._add_overrides()
        return super().format_help()

    def parse_known_args(self, args=None, namespace=None):
        self._add_overrides()
        return super().parse_known_args(args, namespace)

    def parse_args(self, args=None, namespace=None):
        """Flags and overrides in any order (module docstring); the config file resolved."""
        self._add_overrides()
        parsed = self.parse_intermixed_args(args, namespace)
        pattern = OVERRIDE_PATTERNS[self.overrides]
        list_flags = [a.dest for a in self._actions if a.option_strings and a.nargs in ("+", "*")]
        parsed.opts = list(parsed.opts or [])
        for dest in list_flags:
            values = getattr(parsed, dest, None)
            if not isinstance(values, list):
                continue
            for i, value in enumerate(values):
                if pattern.match(str(value)):
                    parsed.opts = list(values[i:]) + parsed.opts
                    setattr(parsed, dest, list(values[:i]))
                    break
        if getattr(parsed, "config_file", None):
            try:
                parsed.config_file = resolve_config_path(parsed.config_file)
            except FileNotFoundError as e:
                self.error(f"--config-file {e}")
        return parsed
