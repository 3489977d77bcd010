"""Device-generic checks behind tests/test_cuda.py, each taking the device (and the sync-mode setter
of :mod:`.device_parity`), so tests/test_device_parity.py runs the very same code on the CPU:

* :func:`precise_bn_parity`: PreciseBN of a two-norm net on ``device`` equals PreciseBN on CPU in
  float64, with every per-batch forward (the statistics hooks included) under "sync is an error";
* :func:`layer_checkpoint_roundtrip`: a layer trained on ``device`` saves a state that loads on CPU
  (same tensors, same eval output) and back on ``device`` (same tensors);
* :func:`detectron2_checkpoint_roundtrip`: the same for a detectron2 model through its checkpointer;
* :func:`compare_tool_run`: a model trained 2 iterations on ``device`` with the plug-in's Trainer,
  then ``tools/compare_bn_stats.py`` on ``device``: every strategy runs and gives an AP;
* :func:`synchronised_norms_parity`: SyncBN, SyncEvalNorm and SyncMABN in two processes (gloo) on
  ``device`` tensors equal one process on the concatenated batch in float64.
"""
import copy
import io
import json
import os
import subprocess
import sys

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.events import EventStorage
from torch import nn

from d2_bnstats.layers.population import precise_bn
from d2_bnstats.registry import get_norm

from . import device_parity as dp
from . import sync_guard as sg
from .conftest import REPO, tiny_opts


class TwoNormNet(nn.Module):
    def __init__(self, build):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.norm1 = build()
        self.conv2 = nn.Conv2d(32, 32, 1)
        self.norm2 = build()

    def forward(self, x):
        return self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))


def precise_bn_parity(variant: str, device, set_mode=sg.set_cuda_sync_mode) -> None:
    torch.manual_seed(0)
    net = TwoNormNet(dp.norm_variants(32)[variant])
    twin = copy.deepcopy(net).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 3, 9, 11, generator=g, dtype=torch.float64) * 2 + 0.5).float().double() for n in (4, 3, 5)]

    def guarded_forward(model, batch):
        with sg.sync_errors(set_mode):
            return model(batch)

    net.to(device)
    with dp.same_permutations(0):
        report = precise_bn(net, [b.float().to(device) for b in batches], len(batches), forward=guarded_forward)
    with dp.same_permutations(0):
        reference = precise_bn(twin, batches, len(batches))
    assert report.updated == reference.updated == ["norm1", "norm2"]
    assert [s.count for s in report.layers] == [s.count for s in reference.layers]
    got, ref = net.state_dict(), twin.state_dict()
    for key in ref:
        if ref[key].is_floating_point():
            d = dp.relative_difference(got[key].double().cpu(), ref[key])
            assert d <= 1e-4, (key, d)
        else:
            assert torch.equal(got[key].cpu(), ref[key]), key


def layer_checkpoint_roundtrip(variant: str, device) -> None:
    build = dp.norm_variants(32)[variant]
    torch.manual_seed(0)
    layer = build().to(device)
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01) if params else None
    x = torch.randn(*dp.SHAPES["rois"]) * 2 + 0.5
    for _ in range(3):
        dp.training_step(layer, x.to(device), torch.randn_like(x).to(device), opt)
    layer.eval()
    saved = io.BytesIO()
    torch.save(layer.state_dict(), saved)
    on_cpu = build()
    on_cpu.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), map_location="cpu"))
    on_cpu.eval()
    state = layer.state_dict()
    assert all(torch.equal(on_cpu.state_dict()[k], v.cpu()) for k, v in state.items())
    assert getattr(on_cpu, "steps", None) == getattr(layer, "steps", None)
    with torch.no_grad():
        d = dp.relative_difference(on_cpu(x).double(), layer(x.to(device)).double().cpu())
    assert d < 1e-5, d
    back = build().to(device)
    back.load_state_dict(on_cpu.state_dict())
    assert all(torch.equal(back.state_dict()[k], v) for k, v in state.items())


def detectron2_checkpoint_roundtrip(norm: str, device, folder) -> None:
    trainer = dp.detectron2_trainer(norm, device)
    with EventStorage(0):
        for _ in range(2):
            trainer.run_step()
    model = trainer.model
    DetectionCheckpointer(model, save_dir=str(folder)).save("trained")
    path = os.path.join(str(folder), "trained.pth")
    cpu_model = dp.detectron2_trainer(norm, "cpu").model
    DetectionCheckpointer(cpu_model).load(path)
    state = model.state_dict()
    assert sorted(cpu_model.state_dict()) == sorted(state)
    assert all(torch.equal(cpu_model.state_dict()[k], v.cpu()) for k, v in state.items())
    images = torch.rand(2, 3, 64, 96) * 255
    model.eval()
    cpu_model.eval()
    with torch.no_grad():
        on_device = model.backbone((images.to(device) - model.pixel_mean) / model.pixel_std)
        on_cpu = cpu_model.backbone((images - cpu_model.pixel_mean) / cpu_model.pixel_std)
    for level in on_cpu:
        d = dp.relative_difference(on_device[level].double().cpu(), on_cpu[level].double())
        assert d < 1e-3, (level, d)
    back = dp.detectron2_trainer(norm, device).model
    DetectionCheckpointer(back).load(path)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in state.items())


COMPARE_STRATEGIES = ("ema", "precise_bn:4", "batch_stats:1", "evalnorm_learned", "evalnorm_rule")


def compare_tool_run(device: str, datasets_root: str, folder) -> dict:
    from d2_bnstats.d2.train import load_config
    from d2_bnstats.d2.trainer import Trainer

    config = os.path.join(REPO, "configs", "cpu", "frcnn_r18_evalnorm_2img.yaml")
    out = os.path.join(str(folder), "train")
    cfg = load_config(config, tiny_opts(out) + ["MODEL.DEVICE", device])
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    weights = os.path.join(out, "model_final.pth")
    assert os.path.isfile(weights)
    output = os.path.join(str(folder), "compare")
    args = [sys.executable, os.path.join(REPO, "tools", "compare_bn_stats.py"), "--config-file", config,
            "--output", output, "--strategies", *COMPARE_STRATEGIES, "--discrepancy-images", "2"]
    args += tiny_opts(os.path.join(str(folder), "unused"), **{"MODEL.WEIGHTS": weights, "MODEL.DEVICE": device})
    # this checkout first; the rest of PYTHONPATH kept (where detectron2 may be installed)
    path = os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    env = dict(os.environ, DETECTRON2_DATASETS=datasets_root, PYTHONWARNINGS="ignore", PYTHONPATH=path)
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(output, "compare.json")) as f:
        summary = json.load(f)
    assert len(summary["strategies"]) == len(COMPARE_STRATEGIES)
    for s in summary["strategies"]:
        assert s["available"], s
        ap = s["results"]["fashion_scenes_tiny_val"]["bbox"]["AP"]
        assert ap == ap, s  # a number, not NaN
    return summary


SYNC_NORMS = ("SyncBN", "SyncEvalNorm", "SyncMABN")


def _sync_worker(rank, world_size, device, xs, gs):
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(0)  # both processes on the one GPU
    results = {}
    for name in SYNC_NORMS:
        torch.manual_seed(0)
        layer = get_norm(name, xs[0].shape[1]).to(device)
        x = xs[rank].float().to(device).requires_grad_(True)
        out = layer(x)
        (out * gs[rank].float().to(device)).sum().backward()
        results[name] = {
            "output": out.detach().double().cpu(),
            "grad_input": x.grad.double().cpu(),
            "grads": {n: p.grad.double().cpu() for n, p in layer.named_parameters() if p.grad is not None},
            "buffers": {n: b.cpu() for n, b in layer.named_buffers()},
        }
    return results


def synchronised_norms_parity(device: str) -> None:
    from .distributed import run_distributed

    g = torch.Generator().manual_seed(2)
    sizes = (3, 2)  # unequal batches
    xs = [(torch.randn(n, 32, 5, 6, generator=g, dtype=torch.float64) * 2 + 0.5).float().double() for n in sizes]
    gs = [torch.randn(n, 32, 5, 6, generator=g, dtype=torch.float64).float().double() for n in sizes]
    results = run_distributed(_sync_worker, world_size=2, args=(device, xs, gs))
    rows = [0, sizes[0], sizes[0] + sizes[1]]
    for name in SYNC_NORMS:
        torch.manual_seed(0)
        layer = get_norm(name, 32).double()
        x = torch.cat(xs).requires_grad_(True)
        out = layer(x)
        (out * torch.cat(gs)).sum().backward()
        for rank, r in enumerate(results):
            part, r = slice(rows[rank], rows[rank + 1]), r[name]
            assert dp.relative_difference(r["output"], out.detach()[part]) < 1e-4, (name, rank)
            assert dp.relative_difference(r["grad_input"], x.grad[part]) < 1e-4, (name, rank)
            for key, ref in layer.named_buffers():
                got = r["buffers"][key]
                if ref.is_floating_point():
                    assert dp.relative_difference(got.double(), ref) < 1e-4, (name, key)
                else:
                    assert torch.equal(got, ref), (name, key)
        for pname, p in layer.named_parameters():
            if p.grad is not None:  # what DistributedDataParallel sums
                total = sum(r[name]["grads"][pname] for r in results)
                assert dp.relative_difference(total, p.grad) < 1e-4, (name, pname)
