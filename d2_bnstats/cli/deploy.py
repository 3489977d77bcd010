"""``d2-bnstats-deploy`` (in a clone also ``tools/deploy_model.py``): export a model trained with the
plug-in's norms for deployment (TorchScript or ONNX).

    d2-bnstats-deploy --config-file configs/cpu/frcnn_r18_mabn_2img.yaml \\
        MODEL.WEIGHTS output/cpu/frcnn_r18_mabn_2img/model_final.pth --output deploy/mabn --fold

Follows detectron2's ``tools/deploy/export_model.py --export-method tracing``: the model is called as
``model.inference([{"image": image}], do_postprocess=False)``, traced with detectron2's
``TracingAdapter`` + ``torch.jit.trace`` on one sample image and written to OUTPUT/model.ts (or
model.onnx). Before tracing, every norm whose inference is a fixed affine (BN, SyncBN, GhostBN,
RoIShuffleBN, MABN with its weight centralization stored, PreciseBN'd BN) becomes detectron2's
FrozenBatchNorm2d; with --fold those are folded into the convolution before them. EvalNorm layers
stay (their inference depends on the sample). See docs/deployment.md.

The sample image: --sample-image FILE (read and resized as detectron2's DefaultPredictor does), else
the first image of DATASETS.TEST[0]; --random-sample uses a random image of INPUT.MIN_SIZE_TEST
pixels square (no data needed; tracing records shapes, but data-dependent branches such as "no
detection" follow the sample). The exported file is checked against the eager original on the
sample image before it gets its final name (--no-verify skips this); a failed export leaves no file.
--benchmark N times the eager original, the FrozenBN model, the folded model and the traced model.
KEY VALUE pairs override the config. The logic is in :mod:`d2_bnstats.d2.deploy` and
:mod:`d2_bnstats.d2.export`.
"""
import json
import logging
import os
import sys

import torch

from ..d2.library_noise import silence_library_noise
from ..d2.datasets import check_datasets, register_coco_from_args
from ..d2.export import FILE_NAMES, FORMATS
from ..d2.train import input_errors, load_config
from ..outputs import check_output_folder
from .args import ToolArgumentParser

logger = logging.getLogger("d2_bnstats.deploy")


def argument_parser() -> ToolArgumentParser:
    p = ToolArgumentParser(description=__doc__, config_required=True)
    p.add_argument("--output", required=True, help="output folder (created if missing) for model.ts / model.onnx")
    p.add_argument("--format", choices=FORMATS, default="torchscript", help="output format (default torchscript)")
    p.add_argument("--fold", action="store_true", help="fold the frozen norms into the preceding convolutions")
    p.add_argument("--sample-image", metavar="FILE", help="image to trace with (default: first of DATASETS.TEST[0])")
    p.add_argument("--random-sample", action="store_true", help="trace with a random image (no data needed)")
    p.add_argument("--no-verify", action="store_true", help="do not compare the exported model with the original")
    p.add_argument("--benchmark", type=int, default=0, metavar="N", help="time N inferences of each variant")
    return p


def parse_args(argv=None):
    return argument_parser().parse_args(argv)


def load_model(cfg):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from ..d2.population import test_batch_stats_enabled

    if test_batch_stats_enabled(cfg):
        raise SystemExit(
            "this config evaluates with the test batch's statistics (BNSTATS.TEST_BATCH_STATS.ENABLED True); "
            "a deployed model normalizes with fixed statistics. Pass BNSTATS.TEST_BATCH_STATS.ENABLED False "
            "to export the model with its population statistics."
        )
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting a randomly initialized model")
    return model.eval()


def sample_image(cfg, args) -> torch.Tensor:
    """A CHW float image as the model's test-time input (resized as DefaultPredictor does)."""
    if args.random_sample:
        size = int(cfg.INPUT.MIN_SIZE_TEST)
        return torch.rand(3, size, size, generator=torch.Generator().manual_seed(0)) * 255
    if args.sample_image:
        import detectron2.data.transforms as T
        from detectron2.data import detection_utils

        if not os.path.isfile(args.sample_image):
            raise SystemExit(f"--sample-image {args.sample_image} does not exist")
        original = detection_utils.read_image(args.sample_image, format=cfg.INPUT.FORMAT)
        aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
        image = aug.get_transform(original).apply_image(original)
        return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
    from detectron2.data import build_detection_test_loader

    from ..d2.datasets import check_datasets

    if not cfg.DATASETS.TEST:
        raise SystemExit("DATASETS.TEST is empty: pass --sample-image FILE or --random-sample")
    try:
        check_datasets(cfg)
        batch = next(iter(build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])))
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise SystemExit(f"no sample image from {cfg.DATASETS.TEST[0]}: {e}\nPass --sample-image FILE or --random-sample.")
    return batch[0]["image"].float()


def verifier(reference, image, adapter, fmt: str):
    """A check of the written file before it gets its final name: it must give the eager original's
    detections on the sample image (an ONNX file passes ``onnx.checker`` and runs in onnxruntime when
    that is installed; it is not a dependency)."""
    from ..d2.export import detection_difference, run_onnx, same_detections

    def verify(path):
        if fmt == "onnx":
            import onnx

            onnx.checker.check_model(onnx.load(path))
            try:
                outputs = run_onnx(path, image)
            except ImportError:
                logger.info("onnxruntime is not installed: the ONNX file was checked with onnx.checker only")
                return
        else:
            with torch.no_grad():
                outputs = torch.jit.load(path, map_location=image.device)(image)
        difference = detection_difference(adapter.outputs_schema(outputs)[0]["instances"], reference)
        logger.info("exported vs eager original on the sample image: %s", difference)
        if not same_detections(difference):
            raise SystemExit(f"the exported model's detections differ from the original's ({difference}); nothing written")

    return verify


def benchmark(model, image, iterations: int) -> dict:
    """Seconds per image of the eager original and of the FrozenBN and folded models, eager and traced,
    for the whole model and for its backbone alone (where the norms are)."""
    from ..d2.deploy import convert_for_deployment
    from ..d2.export import rcnn_inference, time_variants, trace

    with torch.no_grad():
        batch = model.preprocess_image([{"image": image}]).tensor
    variants = {"eager original": lambda: rcnn_inference(model, [{"image": image}])}
    backbones = {"backbone original": lambda: model.backbone(batch)}
    for label, fold in (("FrozenBN", False), ("folded", True)):
        converted = convert_for_deployment(model, fold=fold)[0]
        traced = trace(converted, image)[0]
        variants[f"eager {label}"] = lambda m=converted: rcnn_inference(m, [{"image": image}])
        variants[f"traced {label}"] = lambda t=traced: t(image)
        backbones[f"backbone {label}"] = lambda m=converted: m.backbone(batch)
    return {**time_variants(variants, iterations), **time_variants(backbones, iterations)}


def main(argv=None):
    silence_library_noise()
    from detectron2.utils.logger import setup_logger

    from ..d2.deploy import convert_for_deployment
    from ..d2.export import export_onnx, export_torchscript, onnx_unavailable_reason, rcnn_inference, trace

    args = parse_args(argv)
    with input_errors("deploy_model"):  # everything read and written, before any work
        check_output_folder(args.output, "--output")
        register_coco_from_args(args.register_coco)  # the sample image may come from such a data set
        if args.format == "onnx" and onnx_unavailable_reason():
            raise ValueError(onnx_unavailable_reason())
        cfg = load_config(args.config_file, list(args.opts or []))
        if args.sample_image and not os.path.isfile(args.sample_image):
            raise FileNotFoundError(f"--sample-image {args.sample_image} does not exist")
        if not args.sample_image and not args.random_sample:
            if not cfg.DATASETS.TEST:
                raise ValueError("DATASETS.TEST is empty: pass --sample-image FILE or --random-sample")
            check_datasets(cfg, names={"DATASETS.TEST": cfg.DATASETS.TEST[:1]})
    setup_logger(name="d2_bnstats")
    model = load_model(cfg)
    image = sample_image(cfg, args).to(cfg.MODEL.DEVICE)
    deployed, report = convert_for_deployment(model, fold=args.fold)
    print(report.summary())
    with torch.no_grad():
        reference = rcnn_inference(model, [{"image": image}])[0]["instances"]
    traced, adapter = trace(deployed, image)
    verify = None if args.no_verify else verifier(reference, image, adapter, args.format)
    created = not os.path.isdir(args.output)
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, FILE_NAMES[args.format])
    try:
        if args.format == "torchscript":
            export_torchscript(traced, path, verify=verify)
        else:
            export_onnx(deployed, image, path, verify=verify)
    except BaseException:
        if created and not os.listdir(args.output):
            os.rmdir(args.output)  # a folder this run made for a file it could not write
        raise
    print(f"wrote {path}")
    numbers = {"file": path, "format": args.format, "fold": args.fold}
    if args.benchmark > 0:
        numbers["seconds_per_image"] = benchmark(model, image, args.benchmark)
        print(json.dumps(numbers, indent=1))
    return numbers


def command() -> int:
    main()
    return 0


if __name__ == "__main__":
    sys.exit(command())
