"""``--resume`` continues a run exactly: optimizer, LR-scheduler and grad-scaler state are checkpointed.

The end-to-end check trains the real Trainer on the tiny fashion-scenes split, once without a
break and once "interrupted" after checkpoint k (the interrupted run's directory holds what such a
run leaves: checkpoint k and the ``last_checkpoint`` pointer to it) and resumed with a new Trainer;
after N iterations both hold the same parameters and buffers, bit for bit. SGD momentum and a
warm-up that spans the resume make a lost optimizer or scheduler state visible.

What detectron2 does not restore on resume is kept out of the comparison on purpose: the training
data stream restarts from its beginning and the global RNG (RPN/ROI sampling) is not checkpointed,
so both runs train on one fixed batch and seed torch's RNG from the iteration before each step.
"""
import copy
import itertools
import os
import shutil

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import HookBase

from d2_bnstats.d2.checkpoint import AtomicCheckpointer
from d2_bnstats.d2.train import load_config
from d2_bnstats.d2.trainer import Trainer, checkpoint_training_state

from .conftest import REPO, tiny_opts

MAX_ITER = 3  # N
CHECKPOINT_PERIOD = 2  # k: the checkpoint after the 2nd iteration (model_0000001.pth)


def config_path(norm):
    return os.path.join(REPO, "configs", "cpu", f"frcnn_r18_{norm}_2img.yaml")


class SeedEachStep(HookBase):
    """The same sampling in every run that reaches an iteration, wherever the run started."""

    def before_step(self):
        torch.manual_seed(1000 + self.trainer.iter)


class FixedBatchTrainer(Trainer):
    """The real Trainer, training on one fixed batch (the data stream restarts on resume)."""

    batch = None

    @classmethod
    def build_train_loader(cls, cfg):
        return (copy.deepcopy(cls.batch) for _ in itertools.count())


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fixed_batch(datasets_root, tmp_path_factory):
    cfg = load_config(config_path("bn"), tiny_opts(tmp_path_factory.mktemp("batch")))
    torch.manual_seed(0)
    FixedBatchTrainer.batch = next(iter(Trainer.build_train_loader(cfg)))
    yield
    FixedBatchTrainer.batch = None


def train(norm, output_dir, resume, extra):
    opts = tiny_opts(output_dir, max_iter=MAX_ITER, **{
        "SOLVER.CHECKPOINT_PERIOD": CHECKPOINT_PERIOD,
        "SOLVER.WARMUP_ITERS": MAX_ITER,  # the LR changes every iteration, also after the resume
        "SOLVER.BASE_LR": 0.01,
        "SOLVER.MOMENTUM": 0.9,
        "DATASETS.TEST": "()",
        **extra,
    })
    cfg = load_config(config_path(norm), opts)
    cfg.freeze()
    trainer = FixedBatchTrainer(cfg)
    trainer.register_hooks([SeedEachStep()])
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


def model_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize(
    "norm, extra",
    [
        ("bn", {}),
        # L_aux on every value: the values it uses do not depend on the layer's step count
        ("evalnorm", {"BNSTATS.EVALNORM.AUX_SAMPLES": 0}),
        # the default L_aux subset, whose offset cycles with the layer's step: the step is in the checkpoint
        pytest.param("evalnorm", {}, marks=pytest.mark.slow, id="evalnorm-aux-subset"),
        ("mabn", {}),
    ],
    ids=["bn", "evalnorm", "evalnorm-aux-subset", "mabn"],
)
def test_resumed_run_matches_uninterrupted_run(norm, extra, fixed_batch, one_thread, tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    full = model_state(train(norm, uninterrupted, resume=False, extra=extra))

    checkpoint = f"model_{CHECKPOINT_PERIOD - 1:07d}.pth"
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copy(uninterrupted / checkpoint, interrupted / checkpoint)
    (interrupted / "last_checkpoint").write_text(checkpoint)

    resumed = train(norm, interrupted, resume=True, extra=extra)
    assert resumed.start_iter == CHECKPOINT_PERIOD
    at_checkpoint = torch.load(interrupted / checkpoint, map_location="cpu", weights_only=False)["model"]
    assert any(not torch.equal(v, at_checkpoint[k]) for k, v in full.items())  # it trained after the break
    resumed_state = model_state(resumed)
    assert resumed_state.keys() == full.keys()
    differing = [k for k, v in full.items() if not torch.equal(v, resumed_state[k])]
    assert not differing, f"{len(differing)} of {len(full)} tensors differ after resuming, e.g. {differing[:3]}"


def test_resume_after_a_damaged_last_checkpoint_continues_from_the_one_before(fixed_batch, one_thread, tmp_path):
    """What an in-place write killed halfway leaves (a truncated ``model_final.pth`` that
    ``last_checkpoint`` names): the resumed run starts from checkpoint k instead and ends as the
    uninterrupted run."""
    uninterrupted = tmp_path / "uninterrupted"
    finished = train("bn", uninterrupted, resume=False, extra={})
    assert isinstance(finished.checkpointer, AtomicCheckpointer)
    assert (uninterrupted / "last_checkpoint").read_text() == "model_final.pth"
    full = model_state(finished)

    checkpoint = f"model_{CHECKPOINT_PERIOD - 1:07d}.pth"
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    shutil.copy(uninterrupted / checkpoint, damaged / checkpoint)
    final = (uninterrupted / "model_final.pth").read_bytes()
    (damaged / "model_final.pth").write_bytes(final[: len(final) // 3])
    (damaged / "last_checkpoint").write_text("model_final.pth")

    resumed = train("bn", damaged, resume=True, extra={})
    assert resumed.start_iter == CHECKPOINT_PERIOD
    resumed_state = model_state(resumed)
    differing = [k for k, v in full.items() if not torch.equal(v, resumed_state[k])]
    assert not differing, f"{len(differing)} of {len(full)} tensors differ, e.g. {differing[:3]}"
    # the run rewrote the damaged file with a complete one
    assert torch.load(damaged / "model_final.pth", map_location="cpu", weights_only=False)["iteration"] == MAX_ITER - 1


# ---- what is added to the checkpoint, by what the trainer's state already holds ----


def sgd():
    return torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)


def scheduler(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, 2)


def test_training_state_saved_once_whatever_detectron2_saves_itself():
    optimizer = sgd()
    lr = scheduler(optimizer)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    objects = {"optimizer": optimizer, "scheduler": lr, "grad_scaler": scaler}
    model = torch.nn.Linear(1, 1)

    # a trainer state with iteration and hooks only (detectron2 of 2022): everything is added
    checkpointer = DetectionCheckpointer(model)
    added = checkpoint_training_state(checkpointer, {"iteration": 0, "hooks": {}}, objects)
    assert added == ["optimizer", "scheduler", "grad_scaler"]
    assert all(checkpointer.checkpointables[k] is v for k, v in objects.items())

    # today's detectron2: the step trainer's optimizer and scaler, the LR-scheduler hook's scheduler
    nested = {
        "iteration": 0,
        "hooks": {"LRScheduler": lr.state_dict()},
        "_trainer": {"iteration": 0, "optimizer": optimizer.state_dict(), "grad_scaler": scaler.state_dict()},
    }
    assert checkpoint_training_state(DetectionCheckpointer(model), nested, objects) == []

    # detectron2 before 2021: optimizer and scheduler were checkpointables of their own
    old = DetectionCheckpointer(model, optimizer=optimizer, scheduler=lr)
    assert checkpoint_training_state(old, {"iteration": 0}, objects) == ["grad_scaler"]

    # a disabled grad scaler (AMP off, or no device for it) has no state to save
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    assert checkpoint_training_state(DetectionCheckpointer(model), {}, {"grad_scaler": disabled}) == []

