"""`predict`, `evaluate` and `export` on the command line: arguments in, library calls, a short report out.

Errors follow cli.py's rule: a `ReportedError` is printed as one line `error: ...` with its exit code (2 for the
user's mistakes, 1 for an export that fails its parity check).
"""

from __future__ import annotations

import argparse
from pathlib import Path

MODEL_HELP = ("checkpoint file or folder, or an MLflow run: runs:/<run_id>[/artifact] or a 32-hex run id (its "
              "best_checkpoint artifact)")


def add_commands(sub) -> None:
    p = sub.add_parser("predict", help="masks and overlays for images, locally or as Ray Data batch inference")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("inputs", nargs="+", metavar="INPUTS", help="image files, folders or glob patterns")
    p.add_argument("--out", required=True, help="output folder: <stem>_mask.png and <stem>_overlay.png per image")
    p.add_argument("--threshold", type=float, help="binary models: probability threshold (default: the "
                                                   "training config's train.threshold)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: mean over horizontal/vertical flips")
    p.add_argument("--sliding-window", action="store_true",
                   help="predict at the image's own resolution in training-size windows, blended")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap fraction (default 0.5)")
    p.add_argument("--blend", choices=["gaussian", "linear"], default="gaussian",
                   help="sliding-window blending weights (default gaussian)")
    p.add_argument("--min-size", type=int, default=0, help="remove predicted components smaller than N pixels")
    p.add_argument("--fill-holes", action="store_true", help="fill background holes inside predicted regions")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--batch-size", type=int, default=8, help="images (or windows) per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (with --ray: auto, cpu or cuda)")
    p.add_argument("--ray", action="store_true", help="run as Ray Data batch inference (model actors on GPUs/CPUs)")
    p.add_argument("--workers", type=int, help="--ray: model actors (default: one per GPU, else CPUs/4)")
    p.add_argument("--address", help="--ray: cluster address (default $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--tracking-uri", help="MLflow store for run MODELs (default $MLFLOW_TRACKING_URI, else "
                                          "sqlite:///mlflow.db)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    e = sub.add_parser("evaluate", help="metrics of a model on a split: per-class table, per-image CSV, confusion "
                                        "matrix")
    e.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    e.add_argument("config", nargs="*", metavar="[CONFIG.yaml] [key=value]",
                   help="changes to the checkpoint's config, e.g. data.root=/other/copy")
    e.add_argument("--split", default="val", help="train, val, test or a split name (default val)")
    e.add_argument("--out", help="report folder (default eval-<split>)")
    e.add_argument("--overwrite", action="store_true", help="replace existing report files")
    e.add_argument("--log-mlflow", action="store_true",
                   help="log eval_<split>_* metrics and the report files to MODEL's MLflow run")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    e.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="ONNX or TorchScript with dynamic batch and size, checked against PyTorch")
    x.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    x.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    x.add_argument("--out", required=True, help="file to write")
    x.add_argument("--overwrite", action="store_true", help="replace an existing file")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    x.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest accepted |exported - PyTorch| on the logits (default 1e-3)")
    x.add_argument("--register", metavar="NAME", help="also register the file in the MLflow model registry as NAME")
    x.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    x.set_defaults(func=cmd_export)


def _console():
    from .terminal import console

    return console()


def _device(name: str) -> str | None:
    return None if name == "auto" else name


def cmd_predict(args: argparse.Namespace) -> int:
    from .inference import InferenceOptions, load
    from .predict import predict

    options = InferenceOptions(threshold=args.threshold, tta=args.tta, sliding_window=args.sliding_window,
                               overlap=args.overlap, blend=args.blend, min_size=args.min_size,
                               fill_holes=args.fill_holes, batch_size=args.batch_size)
    # with --ray the driver only ships the weights; the actors pick their own device
    loaded = load(args.model, device="cpu" if args.ray else _device(args.device), tracking_uri=args.tracking_uri)
    summary = predict(loaded, args.inputs, args.out, options, overwrite=args.overwrite, use_ray=args.ray,
                      workers=args.workers, address=args.address, device=args.device,
                      progress=not args.no_progress)
    where = "Ray Data" if summary.engine == "ray" else str(loaded.device)
    _console().print(f"wrote masks and overlays of {summary.images} image(s) to {summary.out_dir} ({where})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .errors import UserError
    from .evaluate import check_report_paths, class_table, evaluate_model, evaluation_config, log_report, \
        write_report
    from .inference import load

    loaded = load(args.model, device=_device(args.device), tracking_uri=args.tracking_uri)
    if args.log_mlflow and loaded.run_id is None:
        raise UserError("--log-mlflow needs MODEL to be an MLflow run (runs:/<run_id> or a run id)")
    config_file, overrides = (args.config[0], args.config[1:]) if args.config and "=" not in args.config[0] \
        else (None, args.config)
    cfg = evaluation_config(loaded.cfg, config_file, overrides)
    out = Path(args.out or f"eval-{args.split}")
    check_report_paths(out, args.overwrite)
    report = evaluate_model(loaded, cfg, args.split, device=_device(args.device))
    files = write_report(report, out)
    from .terminal import console as make_console

    make_console(stderr=False).print(class_table(report))
    console = _console()
    console.print(f"wrote {', '.join(str(p) for p in files.values())}")
    if args.log_mlflow:
        log_report(report, files, loaded.run_id, loaded.tracking_uri)
        from . import tracking

        console.print(f"logged eval_{report.split}_* metrics and files to MLflow run {loaded.run_id}: "
                      f"{tracking.run_link(loaded.tracking_uri, loaded.run_id)}", soft_wrap=True)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export, register, require_format_packages
    from .inference import load

    require_format_packages(args.format)  # before the model loads: a missing extra is the first thing to say
    loaded = load(args.model, device="cpu", tracking_uri=args.tracking_uri)
    result = export(loaded, args.format, args.out, opset=args.opset, tolerance=args.tolerance,
                    overwrite=args.overwrite)
    console = _console()
    for shape, diff in result.diffs:
        console.print(f"  input {tuple(shape)}: max |{args.format} - pytorch| = {diff:.3g}")
    console.print(f"wrote {result.path} ({args.format}, dynamic batch and size; max abs diff {result.max_diff:.3g} "
                  f"<= {args.tolerance:g})")
    if args.register:
        name, version = register(result, args.register, loaded, args.tracking_uri)
        console.print(f"registered as MLflow model {name!r} version {version}")
    return 0
