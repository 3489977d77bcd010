"""The documentation's commands and snippets, extracted from README.md, docs/ and the READMEs of datasets/
and configs/, so that a doc that drifts from the code fails here.

Every fenced ``bash``/``python`` block, every unlabelled fenced block and every indented code block whose
lines are commands is taken. The comment lines right above a block may say how it is tested:

- ``<!-- doc-test: skip (REASON) -->``: not run here (the reason says where it is tested, or why not);
- ``<!-- doc-test: skip `TEXT` (REASON) -->``: the block's commands that contain TEXT are not run (one such
  line per TEXT; each must match a command of its block);
- ``<!-- doc-test: context NAME (...) -->``: a Python snippet run after :data:`CONTEXTS` ``[NAME]`` has
  defined the names the prose around it assumes (``model``, ``image``, ...); ``, after the snippet above``
  continues that snippet's names.

Every shell block is checked command by command (not slow): the project's interpreter must be explicit
(``.venv/bin/python``, or a ``d2-bnstats-*`` command of the installed package); each tool's own parser
reads the command line and its config (``bnstats://`` names, ``KEY VALUE`` and ``path.key=value``
overrides) loads through the tool's checks; ``make`` names a Makefile target.

Then every command runs for real (slow), one doc per test, in document order, in one folder laid out as
a clone that every doc shares, as a reader following the docs top to bottom: a checkpoint trained by
one command serves the later ``MODEL.WEIGHTS output/...`` commands, and a doc run on its own first
trains the checkpoints it reads (:data:`TRAINED_BY`). The clone's ``.venv/bin/python``
(tests/doc_interpreter.py) appends each tool's tiny arguments (:data:`TINY_TOOLS`: a 1-iteration
schedule on the tiny data set, tiny benchmark sizes, 1-iteration pre-training, data sets the size of
fashion_scenes_tiny); ``make`` runs its recipe with those, the ``env`` step (which creates the virtual
environment) taken as done. The clone links the code and copies what commands write into
(configs/, docs/, results/, README.md, datasets/), so nothing is written into the repository. A
command run before word for word is not run again.

Python snippets run for real (slow), each in a fresh namespace of one process, in a folder laid out as
a clone.
"""
import argparse
import glob
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from contextlib import redirect_stdout
from typing import List, NamedTuple, Tuple

import pytest

from d2_bnstats.cli.args import ToolArgumentParser
from d2_bnstats.d2.lazy.train import load_config as load_lazy_config
from d2_bnstats.d2.train import load_config

from .conftest import REPO

DOCS = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))),
        "datasets/README.md", "configs/README.md"]
PYTHON = ".venv/bin/python"
COMMAND_START = re.compile(r"^(\.venv/bin/python|python|d2-bnstats-|make |OMP_NUM_THREADS=|nice |[A-Z]+=)")
DIRECTIVE = re.compile(r"^<!-- doc-test: (skip|context)\b\s*(.*?)\s*-->$")
COMMAND_SKIP = re.compile(r"^`([^`]+)`\s*(\(.*\))$")  # skip `TEXT` (REASON)
# the plug-in's commands: the clone's script, the installed command, yacs or LazyConfig overrides
PLUGIN_TOOLS = {
    "tools/train_net.py": ("d2-bnstats-train", "yacs"),
    "tools/lazyconfig_train_net.py": ("d2-bnstats-lazy-train", "lazy"),
    "tools/compare_bn_stats.py": ("d2-bnstats-compare", "yacs"),
    "tools/estimate_evalnorm.py": ("d2-bnstats-estimate-evalnorm", "yacs"),
    "tools/convert_to_mabn.py": ("d2-bnstats-convert-mabn", "yacs"),
    "tools/deploy_model.py": ("d2-bnstats-deploy", "yacs"),
}
COMMANDS = {command: script for script, (command, _) in PLUGIN_TOOLS.items()}
CLONE = ("configs", "tools", "datasets", "d2_bnstats", "bnstats_lab", "Makefile")


class Block(NamedTuple):
    doc: str
    line: int
    lang: str  # "bash" or "python"
    text: str
    directive: str  # "", "skip", "context"
    argument: str
    skips: Tuple[Tuple[str, str], ...] = ()  # (TEXT, REASON): its commands containing TEXT are not run

    @property
    def where(self):
        return f"{self.doc}:{self.line}"


def _directive(lines, index):
    """The directive comments right above line ``index``: the block's (kind, argument) and its
    per-command skips."""
    kind, argument, skips = "", "", []
    for previous in reversed(lines[:index]):
        if not previous.strip():
            continue
        match = DIRECTIVE.match(previous.strip())
        if not match:
            break
        command = COMMAND_SKIP.match(match.group(2)) if match.group(1) == "skip" else None
        if command:
            skips.insert(0, (command.group(1), command.group(2)))
        else:
            kind, argument = match.group(1), match.group(2)
    return kind, argument, tuple(skips)


def extract_blocks(doc: str) -> List[Block]:
    lines = open(os.path.join(REPO, doc), encoding="utf-8").read().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            text = "\n".join(lines[i + 1:end])
            lang = fence.group(1) or ("bash" if any(COMMAND_START.match(l) for l in text.split("\n")) else "")
            if lang in ("bash", "sh", "python"):
                blocks.append(Block(doc, i + 1, "python" if lang == "python" else "bash", text, *_directive(lines, i)))
            i = end + 1
            continue
        if lines[i].startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            text = textwrap.dedent("\n".join(lines[i:end])).strip("\n")
            if COMMAND_START.match(text.split("\n")[0]):
                blocks.append(Block(doc, i + 1, "bash", text, *_directive(lines, i)))
            i = end
            continue
        i += 1
    return blocks


BLOCKS = [block for doc in DOCS for block in extract_blocks(doc)]


SUBSTITUTION = re.compile(r"^([A-Z_]+)=\$\((.*)\)\s*(#.*)?$")  # VAR=$(command)


def logical_lines(text: str) -> List[str]:
    """A shell block's lines, continuations joined."""
    return re.sub(r"\\\n", " ", text).split("\n")


def shell_commands(text: str) -> List[List[str]]:
    """The commands of a shell block as word lists (continuations joined, comments dropped); a line
    ``VAR=$(command)`` is ``["VAR=$(", command words...]``."""
    out = []
    for line in logical_lines(text):
        substitution = SUBSTITUTION.match(line.strip())
        if substitution:
            out.append([substitution.group(1) + "=$("] + shlex.split(substitution.group(2)))
        elif shlex.split(line, comments=True):
            out.append(shlex.split(line, comments=True))
    return out


def test_the_docs_have_commands_and_snippets_and_every_skip_says_why():
    assert len([b for b in BLOCKS if b.lang == "bash"]) >= 15 and len([b for b in BLOCKS if b.lang == "python"]) >= 8
    for block in BLOCKS:
        if block.directive == "skip":
            assert len(block.argument) > 10, f"{block.where}: a skip says why"
        commands = [" ".join(words) for words in shell_commands(block.text)] if block.lang == "bash" else []
        for text, reason in block.skips:
            assert len(reason) > 10, f"{block.where}: a skip says why"
            assert any(text in command for command in commands), f"{block.where}: no command contains {text!r}"
    assert any(block.skips for block in BLOCKS)


def test_a_skip_comment_names_the_block_or_some_of_its_commands():
    lines = ["<!-- doc-test: skip `make test` (the suite itself: this test is one of its tests) -->",
             "<!-- doc-test: skip `--num-gpus 8` (COCO in 8 processes) -->", "", "```bash"]
    assert _directive(lines, 3) == ("", "", (("make test", "(the suite itself: this test is one of its tests)"),
                                             ("--num-gpus 8", "(COCO in 8 processes)")))
    assert _directive(["text", "<!-- doc-test: skip (a reason for the block) -->", "```bash"], 2) == \
        ("skip", "(a reason for the block)", ())
    assert _directive(["<!-- doc-test: skip (old) -->", "text", "```bash"], 2) == ("", "", ())


# ------------------------------------------------------------------------------------------ checked
class _Parsed(Exception):
    def __init__(self, namespace):
        self.namespace = namespace


@pytest.fixture()
def parse_only(monkeypatch):
    """Parsers stop once they have parsed: a tool's main reads its command line and goes no further."""
    for cls in (argparse.ArgumentParser, ToolArgumentParser):
        original = cls.__dict__["parse_args"]

        def parse(self, args=None, namespace=None, _original=original):
            raise _Parsed(_original(self, args, namespace))

        monkeypatch.setattr(cls, "parse_args", parse)


def _load_tool(path):
    spec = importlib.util.spec_from_file_location("doc_tool_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse(clone, script, argv):
    tool = _load_tool(os.path.join(clone, script))
    with pytest.raises(_Parsed) as parsed:
        tool.main(argv)
    return parsed.value.namespace


def _check_config(script, args, where):
    """The config loads with the command's overrides through the tool's checks. A checkpoint that an
    earlier command of the docs writes (MODEL.WEIGHTS, train.init_checkpoint) need not exist yet."""
    if not getattr(args, "config_file", None) or script not in PLUGIN_TOOLS:
        return
    if args.config_file.startswith("output/") and not os.path.exists(args.config_file):
        return  # written by an earlier command of the docs (estimate_evalnorm.py's config)
    world = getattr(args, "num_gpus", 1) * getattr(args, "num_machines", 1)
    if PLUGIN_TOOLS[script][1] == "lazy":
        opts = list(args.opts)
        try:
            load_lazy_config(args.config_file, opts, world_size=world)
        except Exception as e:
            if "init_checkpoint" not in str(e):
                raise AssertionError(f"{where}: {e}")
            load_lazy_config(args.config_file, opts + ["train.init_checkpoint="], world_size=world)
        return
    try:
        load_config(args.config_file, list(args.opts), world_size=world)
    except FileNotFoundError as e:
        if "MODEL.WEIGHTS" not in str(e):
            raise AssertionError(f"{where}: {e}")
        load_config(args.config_file, list(args.opts) + ["MODEL.WEIGHTS", ""], world_size=world)


@pytest.fixture()
def clone(tmp_path):
    """A folder laid out as a clone (links to its code, configs and data scripts; output/ is its own)."""
    for name in CLONE:
        os.symlink(os.path.join(REPO, name), tmp_path / name)
    return tmp_path


def _check_command(words, variables, clone, where):
    if words[0].endswith("=$("):  # VAR=$(.venv/bin/python -c CODE): CODE's output
        assert words[1:3] == [PYTHON, "-c"], f"{where}: {' '.join(words)}"
        out = io.StringIO()
        with redirect_stdout(out):
            exec(compile(words[3], where, "exec"), {})
        variables[words[0][:-3]] = os.environ[words[0][:-3]] = out.getvalue().strip()
        return
    words = [os.path.expandvars(w) if "$" in w else w for w in words]
    while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value before or as a command
        name, value = words.pop(0).split("=", 1)
        variables[name] = os.environ[name] = value
    if words[:1] == ["nice"]:
        words = words[3:]
    if not words:
        return
    if words[0] == "make":
        targets = re.findall(r"^([a-z-]+):", open(os.path.join(REPO, "Makefile")).read(), re.M)
        assert words[1] in targets, f"{where}: make {words[1]}: no such target"
        return
    if words[0] in COMMANDS:
        words = [PYTHON, COMMANDS[words[0]]] + words[1:]
    assert words[0] == PYTHON, f"{where}: {' '.join(words)!r}: run it with the project's interpreter, {PYTHON}"
    if words[1] == "-c":
        compile(words[2], where, "exec")
        return
    script = words[1]
    assert os.path.isfile(os.path.join(clone, script)), f"{where}: no {script}"
    args = _parse(clone, script, words[2:])
    _check_config(script, args, where)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "bash" and b.directive != "skip"],
                         ids=lambda b: b.where)
def test_every_documented_command_reads_its_arguments_and_config(block, clone, parse_only, monkeypatch):
    monkeypatch.chdir(clone)
    variables = {}
    for name in ("C", "W", "ZOO"):
        monkeypatch.delenv(name, raising=False)
    for words in shell_commands(block.text):
        _check_command(words, variables, str(clone), block.where)


# ---------------------------------------------------------------------------------- run for real
# The tiny arguments the clone's interpreter appends to each tool (tests/doc_interpreter.py): "append"
# always, each "unless_named" override only when the command does not set that key itself (a command
# that names its own data set trains and evaluates on it).
TINY_YACS = ["SOLVER.MAX_ITER", "1", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0", "DATALOADER.NUM_WORKERS", "0",
             "TEST.EVAL_PERIOD", "0", "BNSTATS.PRECISE_BN.NUM_SAMPLES", "2"]
TINY_DATA_YACS = {"DATASETS.TRAIN": ["DATASETS.TRAIN", "('fashion_scenes_tiny_train',)"],
                  "DATASETS.TEST": ["DATASETS.TEST", "('fashion_scenes_tiny_val',)"]}
TINY_LAZY = ["train.max_iter=1", "dataloader.train.num_workers=0"]
TINY_DATA_LAZY = {"dataloader.train.dataset.names=": ["dataloader.train.dataset.names=fashion_scenes_tiny_train"],
                  "dataloader.test.dataset.names=": ["dataloader.test.dataset.names=fashion_scenes_tiny_val"]}
# a free port instead of the fixed per-user one, which another multi-process run on the machine may hold
LAUNCH = ["--dist-url", "auto"]
YACS_TOOL = {"append": TINY_YACS, "unless_named": TINY_DATA_YACS}
TINY_TOOLS = {
    "tools/train_net.py": {"append": LAUNCH + TINY_YACS, "unless_named": TINY_DATA_YACS},
    "tools/lazyconfig_train_net.py": {"append": LAUNCH + TINY_LAZY, "unless_named": TINY_DATA_LAZY},
    "tools/compare_bn_stats.py": {"append": LAUNCH + ["--max-images", "2", "--precise-bn-samples", "2",
                                                      "--bootstrap-rounds", "20", "--discrepancy-images", "2"]
                                  + TINY_YACS, "unless_named": TINY_DATA_YACS},
    "tools/estimate_evalnorm.py": {"append": ["--images", "2"] + TINY_YACS, "unless_named": TINY_DATA_YACS},
    "tools/convert_to_mabn.py": YACS_TOOL,
    "tools/deploy_model.py": YACS_TOOL,
    "tools/benchmark.py": {"append": ["--tiny", "DATALOADER.NUM_WORKERS", "0"], "unless_named": TINY_DATA_YACS},
    "tools/benchmark_norms.py": {"append": ["--quick"]},
    "tools/benchmark_sync.py": {"append": ["--repeats", "1", "--iters", "1", "--warmup", "0",
                                           "DATALOADER.NUM_WORKERS", "0"], "unless_named": TINY_DATA_YACS},
    "tools/pretrain_backbone.py": {"append": ["--max-iter", "1", "--batch-size", "2", "--train-subset", "8",
                                              "--test-subset", "8"]},
    # fashion_scenes_tiny's size: `--name fashion_scenes_tiny` finds the tiny set up to date
    "datasets/prepare_fashion_scenes.py": {"append": ["--num-train", "16", "--num-val", "8"]},
}
# What an earlier part of the docs trains (README.md, `make demo`), for a doc run on its own: a missing
# checkpoint that a command reads is trained first by the command that writes it.
TRAINED_BY = [
    (r"output/cpu/(\w+)/model_final\.pth$", ".venv/bin/python tools/train_net.py --config configs/cpu/{}.yaml"),
    (r"output/lazy/cpu/(\w+)/model_final\.pth$",
     ".venv/bin/python tools/lazyconfig_train_net.py --config-file configs/lazy/cpu/{}.py"),
    (r"output/demo/model_final\.pth$", "make demo"),
]
LINKED = ("tools", "d2_bnstats", "bnstats_lab")  # code: no documented command writes there
COPIED = ("configs", "datasets", "docs", "results", "README.md", "Makefile")  # make_configs.py, the report write here
INTERPRETER = os.path.join(REPO, "tests", "doc_interpreter.py")
COMMAND_TIMEOUT = 300
ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def _expand(word, variables):
    return VARIABLE.sub(lambda m: variables.get(m.group(1) or m.group(2), ""), word)


def _inputs(words):
    """The checkpoints a command reads."""
    for i, word in enumerate(words):
        if word == "MODEL.WEIGHTS" and i + 1 < len(words):
            yield words[i + 1]
        elif word.startswith("train.init_checkpoint="):
            yield word.split("=", 1)[1]


def _coco_files(tiny, folder, num_classes=3):
    """The reader's own COCO-format files of datasets/README.md (path/to/{train,val}.json, images): the
    tiny splits with their first ``num_classes`` categories."""
    os.makedirs(folder)
    for split in ("train", "val"):
        data = json.load(open(os.path.join(tiny, f"{split}.json")))
        keep = {c["id"] for c in sorted(data["categories"], key=lambda c: c["id"])[:num_classes]}
        data["categories"] = [c for c in data["categories"] if c["id"] in keep]
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] in keep]
        with open(os.path.join(folder, f"{split}.json"), "w") as f:
            json.dump(data, f)
        os.symlink(os.path.join(tiny, split), os.path.join(folder, f"{split}_images"))


class Reader:
    """A clone in which the docs' commands run one after the other (module docstring)."""

    def __init__(self, folder, env):
        self.folder, self.env = folder, env
        self.ran = {}  # expanded words -> where they ran

    def run_block(self, block: Block) -> int:
        """Run the block's commands in order; returns how many ran (here or before)."""
        variables, count = {}, 0
        for line in logical_lines(block.text):
            words = shlex.split(line, comments=True)
            if not words or any(text in " ".join(words) for text, _ in block.skips):
                continue
            substitution = SUBSTITUTION.match(line.strip())
            if substitution:  # VAR=$(command)
                output = self.run(substitution.group(2), block, variables, capture=True)
                variables[substitution.group(1)] = output.strip()
                continue
            if all(ASSIGNMENT.match(w) for w in words):  # C=... W=...
                variables.update((name, _expand(value, variables)) for name, value in (w.split("=", 1) for w in words))
                continue
            count += 1
            for path in _inputs([_expand(w, variables) for w in words]):
                self.provide(path, block)
            self.run(line, block, variables)
        return count

    def provide(self, path, block):
        """Train the checkpoint ``path`` if it is missing and :data:`TRAINED_BY` names its command."""
        for pattern, command in TRAINED_BY:
            match = re.search(pattern, path)
            if match and not os.path.exists(os.path.join(self.folder, path)):
                self.run(command.format(*match.groups()), block)
                assert os.path.exists(os.path.join(self.folder, path)), f"{block.where}: `{command}` wrote no {path}"

    def run(self, line, block, variables=None, capture=False):
        """Run one command line in the clone (bash), unless it ran before word for word; its stdout, or a
        failure naming the block and the command with the tail of its output (``capture``: stderr
        apart, as ``$(...)`` takes only stdout)."""
        variables = variables or {}
        key = tuple(_expand(w, variables) for w in shlex.split(line, comments=True))
        if key in self.ran and not capture:
            return ""
        if key[0] == "make":  # the clone's interpreter is in place: the env step is done
            line = "make -o env" + line.strip()[len("make"):]
        try:
            proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", line], cwd=str(self.folder),
                                  env=dict(self.env, **variables), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE if capture else subprocess.STDOUT, text=True,
                                  timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired as e:
            output = e.output.decode(errors="replace") if isinstance(e.output, bytes) else e.output or ""
            pytest.fail(f"{block.where}: `{line.strip()}` ran past {COMMAND_TIMEOUT} s:\n{output[-4000:]}",
                        pytrace=False)
        if proc.returncode != 0:
            pytest.fail(f"{block.where}: `{line.strip()}` exited with {proc.returncode}:\n{proc.stdout[-4000:]}"
                        + (f"\n{proc.stderr[-4000:]}" if capture else ""), pytrace=False)
        self.ran[key] = block.where
        return proc.stdout


@pytest.fixture(scope="module")
def reader(tmp_path_factory, datasets_root):
    """The clone every doc's commands run in (module docstring), with its interpreter's server."""
    folder = tmp_path_factory.mktemp("reader")
    for name in LINKED:
        os.symlink(os.path.join(REPO, name), folder / name)
    for name in COPIED:
        source = os.path.join(REPO, name)
        (shutil.copytree if os.path.isdir(source) else shutil.copyfile)(source, folder / name)
    tiny = os.path.join(datasets_root, "fashion_scenes", "fashion_scenes_tiny")
    os.makedirs(folder / "datasets" / "fashion_scenes")
    os.symlink(tiny, folder / "datasets" / "fashion_scenes" / "fashion_scenes_tiny")
    _coco_files(tiny, str(folder / "path" / "to"))
    settings = folder / "interpreter.json"
    settings.write_text(json.dumps({"python": sys.executable, "tools": TINY_TOOLS,
                                    "address": f"\0d2_bnstats-docs-{os.getpid()}-{folder.name}"}))
    (folder / ".venv" / "bin").mkdir(parents=True)
    python = folder / ".venv" / "bin" / "python"
    python.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -S {shlex.quote(INTERPRETER)} "
                      f"{shlex.quote(str(settings))} \"$@\"\n")
    python.chmod(0o755)
    env = dict(os.environ, DETECTRON2_DATASETS=str(folder / "datasets"), PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    log = open(folder / "interpreter.log", "w")
    server = subprocess.Popen([sys.executable, INTERPRETER, "serve", str(settings)], cwd=str(folder), env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    try:
        assert server.stdout.readline().strip() == b"ready", (folder / "interpreter.log").read_text()[-3000:]
        yield Reader(folder, env)
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server and whatever a stopped command left running
        server.wait()
        log.close()


def test_the_tiny_arguments_come_last_and_keep_the_data_set_a_command_names(clone, parse_only, monkeypatch):
    """What the clone's interpreter makes of a documented command: the tiny schedule wins over the
    command's own (the tool reads the last value), a data set the command names stays."""
    from .doc_interpreter import tiny_arguments

    monkeypatch.chdir(clone)
    command = ["--config", "configs/cpu/frcnn_r18_bn_2img.yaml", "SOLVER.MAX_ITER", "100", "--num-gpus", "2",
               "DATASETS.TEST", "('fashion_scenes_tiny_train',)"]
    args = _parse(str(clone), "tools/train_net.py", command + tiny_arguments(command, TINY_TOOLS["tools/train_net.py"]))
    cfg = load_config(args.config_file, list(args.opts), world_size=args.num_gpus)
    assert cfg.SOLVER.MAX_ITER == 1 and args.num_gpus == 2 and args.dist_url == "auto"
    assert cfg.DATASETS.TRAIN == ("fashion_scenes_tiny_train",) and cfg.DATASETS.TEST == ("fashion_scenes_tiny_train",)
    lazy = ["train.max_iter=100", "dataloader.train.dataset.names=mine"]
    assert tiny_arguments(lazy, TINY_TOOLS["tools/lazyconfig_train_net.py"]) == \
        LAUNCH + TINY_LAZY + ["dataloader.test.dataset.names=fashion_scenes_tiny_val"]


RUN_DOCS = [doc for doc in DOCS if any(b.doc == doc and b.lang == "bash" and b.directive != "skip" for b in BLOCKS)]


@pytest.mark.slow
@pytest.mark.parametrize("doc", RUN_DOCS)
def test_every_documented_command_runs(doc, reader):
    ran = sum(reader.run_block(b) for b in BLOCKS if b.doc == doc and b.lang == "bash" and b.directive != "skip")
    assert ran, f"{doc}: every command is skipped"


@pytest.mark.slow
def test_a_documented_command_that_fails_names_its_block_and_shows_its_output(reader):
    block = Block("docs/example.md", 3, "bash", ".venv/bin/python tools/train_net.py --config configs/cpu/missing.yaml",
                  "", "")
    with pytest.raises(pytest.fail.Exception) as failed:
        reader.run_block(block)
    message = str(failed.value)
    assert message.startswith("docs/example.md:3: `.venv/bin/python tools/train_net.py") and "missing.yaml" in message


CONTEXTS = {
    "detector": '''
import torch
from d2_bnstats import model_zoo
from d2_bnstats.d2.train import load_config
from detectron2.modeling import build_model
cfg = load_config(model_zoo.get_config_file("cpu/frcnn_r18_mabn_2img.yaml"), ["MODEL.FPN.OUT_CHANNELS", "32"])
model = build_model(cfg).eval()
image = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(0)) * 255
''',
    "evalnorm_model": '''
from torch import nn
from d2_bnstats import EvalNorm2d
model = nn.Sequential(nn.Conv2d(3, 8, 3), EvalNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), EvalNorm2d(8))
''',
    "bn_model": '''
import torch
from torch import nn
model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
batches = [torch.randn(2, 3, 16, 16) for _ in range(4)]
num_batches = len(batches)
inputs = torch.randn(2, 3, 16, 16)
''',
    "coco_files": '''
import os
tiny = os.path.join(os.environ["DETECTRON2_DATASETS"], "fashion_scenes", "fashion_scenes_tiny")
os.makedirs("path/to", exist_ok=True)
os.symlink(os.path.join(tiny, "train.json"), "path/to/train.json")
os.symlink(os.path.join(tiny, "train"), "path/to/images")
''',
}
RUNNER = '''
import json, sys, traceback
snippets = json.load(open(sys.argv[1]))
failures, namespace = [], {}
for snippet in snippets:
    if not snippet["after"]:
        namespace = {"__name__": "__doc_snippet__"}
    try:
        exec(compile(snippet["context"], snippet["where"] + " (context)", "exec"), namespace)
        exec(compile(snippet["code"], snippet["where"], "exec"), namespace)
    except BaseException:
        failures.append(snippet["where"] + "\\n" + traceback.format_exc(limit=6))
print(json.dumps(failures))
'''


@pytest.mark.slow
def test_every_python_snippet_runs(clone, datasets_root):
    snippets = []
    for block in BLOCKS:
        if block.lang != "python" or block.directive == "skip":
            continue
        name, _, rest = block.argument.partition(" ")
        after = block.directive == "context" and "after the snippet above" in block.argument
        context = CONTEXTS[name.rstrip(",")] if block.directive == "context" and not after else ""
        snippets.append({"where": block.where, "code": block.text, "context": context, "after": after})
    (clone / "snippets.json").write_text(json.dumps(snippets))
    (clone / "runner.py").write_text(RUNNER)
    env = dict(os.environ, DETECTRON2_DATASETS=datasets_root, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               PYTHONPATH=str(clone))
    proc = subprocess.run([sys.executable, "runner.py", "snippets.json"], cwd=str(clone), env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "\n\n".join(failures)
    assert len(snippets) >= 8


@pytest.mark.parametrize("command", [
    "python tools/train_net.py --config configs/cpu/frcnn_r18_bn_2img.yaml",  # the system's python
    ".venv/bin/python tools/train_net.py --config-file C --num-gpus 2",  # a placeholder
    ".venv/bin/python tools/train_net.py --config configs/cpu/frcnn_r18_bn_2img.yaml SOLVER.STEPS (1200, 1400)",
    ".venv/bin/python tools/deploy_model.py --config-file configs/cpu/frcnn_r18_mabn_2img.yaml --output d --fold "
    "[--format onnx]",
    ".venv/bin/python tools/compare_bn_stats.py --config configs/cpu/frcnn_r18_bn_2img.yaml --strategy ema",
    "make demos",
])
def test_the_check_catches_a_command_that_drifted(command, clone, parse_only, monkeypatch):
    monkeypatch.chdir(clone)
    with pytest.raises((AssertionError, SystemExit, ValueError, FileNotFoundError, KeyError)):
        for words in shell_commands(command):
            _check_command(words, {}, str(clone), "example")


def test_the_demo_is_seeded():
    """`make demo` trains and compares with a fixed SEED (detectron2's default -1 draws a new one every
    run), so the README's demo numbers are what a run gives."""
    makefile = open(os.path.join(REPO, "Makefile")).read()
    assert "$(DEMO_OPTS)" in makefile.split("\ndemo:")[1].split("\n\n")[0]  # both demo commands get them
    options = re.search(r"^DEMO_OPTS \?= (.*)$", makefile, re.M).group(1)
    words = shlex.split(options)
    assert "SEED" in words and int(words[words.index("SEED") + 1]) >= 0, options
