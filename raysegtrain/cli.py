"""`raysegtrain` command line. User mistakes print one line `error: ...` and exit 2; no tracebacks."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from .errors import ReportedError, TrainingError, UserError
from .redaction import redact_text, redact_uri, redacted_console


CONFIG_ARGS_HELP = ("optional YAML config, or a dataset folder (same as data.root=FOLDER), then dotted overrides "
                    "such as model.arch=fpn optim.lr=3e-4")


def _config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG.yaml | DATASET_DIR] [key=value ...]`: the first item is a config file or a dataset folder unless it is
    an override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _load(items: list[str]):
    """The config of `[CONFIG.yaml | DATASET_DIR] [key=value ...]`. A folder is unambiguous (a config is a file), so
    it stands for `data.root=FOLDER`; overrides still apply after it."""
    from . import config

    path, overrides = _config_and_overrides(items)
    if path is not None and not Path(path).expanduser().exists():
        raise UserError(f"{path}: no such config file or dataset folder (overrides look like key=value)")
    if path is not None and Path(path).expanduser().is_dir():
        return config.build({"data": {"root": str(Path(path).expanduser())}}, overrides, source=f"data.root={path}")
    return config.load(path, overrides)


# ------------------------------------------------------------------------------------------------------ commands
def cmd_fit(args) -> int:
    from .interrupt import Interrupted
    from .terminal import console as make_console
    from .train import fit

    if args.resume:  # the run's own config, with the overrides a resume may make
        from .resume import config_for_resume

        cfg = config_for_resume(args.resume, args.config)
    else:
        cfg = _load(args.config)
    console = make_console()
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0

    def announce(cfg, name):
        s = cfg.scaling
        console.print(f"[bold]raysegtrain fit[/] run {name}: {cfg.model.arch}/{cfg.model.encoder} on "
                      f"{cfg.data.root or 'the embedded synthetic ' + cfg.data.synthetic.variant + ' dataset'}; "
                      f"{s.num_workers} worker(s), batch {cfg.train.batch_size} per worker = "
                      f"{cfg.train.batch_size * s.num_workers} global, {cfg.train.epochs} epochs")

    try:
        result = fit(cfg, resume=args.resume, address=args.address, verbose=args.verbose,
                     progress="lines" if args.no_progress else "bar", console=console, on_ready=announce)
    except Interrupted as e:
        # the run's folder keeps its config: the hint needs only where that folder is
        from .config import RunSettings

        default = RunSettings.model_fields["storage_path"].default
        where = [f"run.storage_path={cfg.run.storage_path}"] if cfg.run.storage_path != default else []
        again = ["raysegtrain", "fit", "--resume", e.run_name, *where,
                 *(["--address", args.address] if args.address else [])]
        print(f"interrupted: continue with {redact_text(shlex.join(again))}", file=sys.stderr, flush=True)
        return e.exit_code
    best = f"{result.best_value:.4f}" if result.best_value is not None else "n/a"
    console.print(f"[bold green]done[/] run {result.run_name}: best {result.monitor} {best}")
    if result.degenerate:
        console.print(f"  [yellow]warning[/]: the best model is {result.degenerate} (see the confusion matrix in "
                      f"MLflow)")
    for warning in result.warnings:
        console.print(f"[bold yellow]warning[/]: {warning}")
    console.print(f"  best checkpoint: {result.best_checkpoint}")
    if result.mlflow_run_id:
        from . import tracking

        console.print(f"  MLflow run: {result.mlflow_run_id} ({redact_uri(result.tracking_uri)})")
        console.print(f"  in the UI: {redact_text(tracking.run_link(result.tracking_uri, result.mlflow_run_id))}"
                      f"{ui_hint(result.tracking_uri)}", soft_wrap=True)
    return 0


def cmd_lr_find(args) -> int:
    from .terminal import console as make_console
    from .train import lr_find

    cfg = _load(args.config)
    console = make_console()
    result, files, run_id = lr_find(cfg, address=args.address, verbose=args.verbose, console=console)
    console.print(f"[bold green]lr-find[/]: {result.summary()}", highlight=False)
    console.print(f"  plot: {files['plot']}   curve: {files['csv']}")
    if run_id:
        console.print(f"  MLflow run: {run_id}")
    console.print(f"  train with it: raysegtrain fit ... optim.lr={result.suggestion:.3g}   (or optim.lr=auto)")
    return 0


def cmd_tune(args) -> int:
    from .terminal import console as make_console
    from .tune import run_study

    console = make_console()
    overrides = list(args.overrides)
    if args.repeat:
        top, _, seeds = args.repeat.partition("x")
        if not (top.isdigit() and seeds.isdigit()):
            raise UserError(f"--repeat {args.repeat!r}: write TOPxSEEDS, e.g. --repeat 3x3")
        overrides += [f"repeat.top={top}", f"repeat.seeds={seeds}"]
    result = run_study(args.space, overrides, name=args.name, resume=args.resume, address=args.address,
                       verbose=args.verbose, live=not args.no_progress)
    if result.interrupted:
        console.print(f"[yellow]interrupted[/]: continue with raysegtrain tune {args.space} --resume"
                      + (f" --name {args.name}" if args.name else ""))
        return 130
    from rich.table import Table

    from .study_status import column_names, short_value, varying_keys

    metric = next((k for k in (result.leaderboard[0] if result.leaderboard else {}) if k.startswith("val_")), "value")
    params = [{k[6:]: v for k, v in row.items() if k.startswith("param.") and v is not None}
              for row in result.leaderboard]
    keys = varying_keys(params)
    table = Table(title=f"leaderboard: study {result.name}")
    for col in ("rank", "trial", metric, "epochs", "state", "note", *column_names(keys)):
        table.add_column(col, overflow="fold")
    for i, (row, p) in enumerate(zip(result.leaderboard, params), 1):
        value = row.get(metric)
        table.add_row(str(i), row["trial_id"], f"{value:.4f}" if isinstance(value, float) else "-",
                      str(row["epochs"]), row["state"], row.get("note", ""), *(short_value(p.get(k)) for k in keys))
    console.print(table)
    if result.repeat:
        rep = Table(title=f"repeat-best: the top configs over seeds, ranked by the mean {metric}")
        for col in ("rank", "config of trial", "mean", "std", "95 % CI", "runs", "values"):
            rep.add_column(col, overflow="fold")
        for i, row in enumerate(result.repeat, 1):
            mean, std, lo, hi = (row.get(k) for k in (f"mean_{metric}", "std", "ci95_low", "ci95_high"))
            rep.add_row(str(i), row["config_of_trial"], f"{mean:.4f}" if mean is not None else "-",
                        f"{std:.4f}" if std is not None else "-",
                        f"{lo:.4f}..{hi:.4f}" if lo is not None else "-", str(row["runs"]), row["values"])
        console.print(rep)
        console.print(f"best config by the mean over seeds: that of trial {result.best_trial} "
                      f"(its search run: {metric} {result.best_value})")
    else:
        console.print(f"best trial {result.best_trial}: {metric} {result.best_value}")
    best_note = next((row.get("note") for row in result.leaderboard if row["trial_id"] == result.best_trial), None)
    if best_note:
        console.print(f"  [yellow]warning[/]: the best trial's model is {best_note}")
    if result.final_test:
        f = result.final_test
        test_metric = "test_" + metric.removeprefix("val_")
        value = f.get(test_metric)
        shown = f"{value:.4f}" if isinstance(value, float) else "n/a"
        console.print(f"final test (split {f['split']}, trial {f['trial_id']}, evaluated once after selection): "
                      f"{test_metric} {shown}", highlight=False)
        console.print(f"  {f['note']}", highlight=False, markup=False)
    else:
        console.print("  no test split: the validation figure above chose the config and is optimistic for it")
    console.print(f"  best config: {result.best_config_path}   (raysegtrain fit {result.best_config_path})")
    if result.parent_run_id and result.view_route:
        from . import mlflow_links

        link = mlflow_links.url(mlflow_links.ui_base(result.tracking_uri), result.view_route)
        console.print(f"  MLflow study run: {result.parent_run_id} ({redact_uri(result.tracking_uri)})")
        console.print(f"  the study in the UI: {redact_text(link)}{ui_hint(result.tracking_uri)}", soft_wrap=True)
    return 0


def ui_hint(tracking_uri: str) -> str:
    """How to serve the UI a printed link points at, unless the store is a tracking server (which serves it)."""
    return "" if tracking_uri.startswith(("http://", "https://")) else "   (serve it with: raysegtrain ui)"


def cmd_data_synth(args) -> int:
    from .config import SyntheticConfig
    from .data.synthetic import generate

    syn = SyntheticConfig(variant=args.variant, size=args.size, num_train=args.num_train, num_val=args.num_val,
                          num_test=args.num_test, seed=args.seed)
    out = generate(Path(args.out), syn)
    print(f"wrote {syn.num_train + syn.num_val + syn.num_test} images to {out}; train with: "
          f"raysegtrain fit data.root={out}" + (" data.num_classes=4" if syn.variant == "multiclass" else ""))
    return 0


def cmd_data_check(args) -> int:
    from .data.check import check_dataset
    from .data.splits import resolve_root

    cfg = _load(args.config)
    problems = check_dataset(cfg.data)
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} problem(s) in {resolve_root(cfg.data)}", file=sys.stderr)
        return 2
    print(f"ok: {resolve_root(cfg.data)}")
    return 0


def cmd_config(args) -> int:
    from .config import describe_defaults

    if args.defaults:
        print(describe_defaults())
    else:
        print(_load(args.config).to_yaml(), end="")
    return 0


DEFAULT_UI_PORT = 5000


def port_is_free(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def ui_port(host: str, requested: int | None) -> int:
    """The port the UI will serve on. A port the user asked for must be free (else a one-line error: printing its
    link would send them to whatever already listens there); the default moves to a free port if it is taken."""
    import socket

    if requested is not None:
        if not port_is_free(host, requested):
            raise UserError(f"port {requested} on {host} is already in use (another MLflow UI?): choose a free one "
                            f"with --port, or omit --port to pick one")
        return requested
    if port_is_free(host, DEFAULT_UI_PORT):
        return DEFAULT_UI_PORT
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cmd_ui(args) -> int:
    from . import mlflow_links, tracking

    port = ui_port(args.host, args.port)
    if args.port is None and port != DEFAULT_UI_PORT:
        print(f"port {DEFAULT_UI_PORT} is in use: serving on {port}", file=sys.stderr)
    args.port = port
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    cmd = tracking.ui_command(uri, args.host, args.port, workers=args.workers)
    import signal
    import subprocess
    import time

    base = mlflow_links.ui_base(host=args.host, port=args.port)
    # read from the store before the server starts: a new store is created (under its lock) here, not by two
    # processes at once
    links = ui_links(uri, args.experiment, base)
    # its own process group: stopped as a whole below
    server = subprocess.Popen(cmd, start_new_session=True, env=tracking.ui_env())

    def stop(*_):
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        # the links are printed once the server answers: a link that does not open yet is no use
        while server.poll() is None and not tracking.ui_answers(base):
            time.sleep(0.25)
        if server.poll() is not None:
            return server.returncode or 1
        print(f"MLflow UI for {redact_uri(uri)} (Ctrl-C stops it)", flush=True)
        for line in links:
            print(f"  {line}", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        stop()
        return 0


def ui_links(uri: str, experiment: str, base: str) -> list[str]:
    """The links `ui` prints, all in MLflow's training view: EXPERIMENT's runs table (else the experiments list)
    and, when the store holds studies, the newest study's view (its trials, best first, with their columns)."""
    from . import mlflow_links, tracking

    exp = tracking.experiment_id(uri, experiment)
    lines = [f"runs: {mlflow_links.url(base, mlflow_links.runs_route(exp) if exp else mlflow_links.home_route())}"]
    views = tracking.study_views(uri)
    if views:
        study, study_exp, key = views[0]
        lines.append(f"study {study}: {mlflow_links.url(base, mlflow_links.runs_route(study_exp, key))}")
    return lines


def _reader_went_away() -> int:
    """`raysegtrain config --defaults | head`: the reader closed the pipe, which is not an error of ours. Point
    stdout at /dev/null so that the interpreter's final flush does not raise again at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 0


# ------------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raysegtrain", description="Semantic-segmentation training on Ray, tracked in "
                                                                "MLflow.")
    from .version import __version__

    p.add_argument("--version", action="version", version=f"raysegtrain {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="train a model with Ray Train (DDP over workers)")
    f.add_argument("config", nargs="*", metavar="[CONFIG.yaml | DATASET_DIR] [key=value]", help=CONFIG_ARGS_HELP)
    f.add_argument("--resume", metavar="NAME",
                   help="continue run NAME from its latest checkpoint, on the config it was started with; only "
                        "key=value overrides of the keys a resume may change (train.epochs, ...) are allowed")
    f.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)")
    f.add_argument("--verbose", action="store_true", help="show Ray's and the workers' logs")
    f.add_argument("--no-progress", action="store_true", help="no progress bar: one line per epoch (for logs)")
    f.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    f.set_defaults(func=cmd_fit)

    lf = sub.add_parser("lr-find", help="LR range test on the real loop: loss-vs-lr plot and a suggested optim.lr")
    lf.add_argument("config", nargs="*", metavar="[CONFIG.yaml | DATASET_DIR] [key=value]", help=CONFIG_ARGS_HELP)
    lf.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)")
    lf.add_argument("--verbose", action="store_true", help="show Ray's and the workers' logs")
    lf.set_defaults(func=cmd_lr_find)

    t = sub.add_parser("tune", help="search configs with Ray Tune (Optuna + ASHA); every trial is a fit")
    t.add_argument("space", help="search-space YAML (see search_spaces/)")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="study settings (budget.num_samples=12) or base-config overrides (data.root=...)")
    t.add_argument("--name", help="study name (default: the space file's name)")
    t.add_argument("--resume", action="store_true", help="continue the interrupted study of this name")
    t.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)")
    t.add_argument("--verbose", action="store_true", help="show Ray's and the workers' logs")
    t.add_argument("--no-progress", action="store_true", help="no live status table")
    t.add_argument("--repeat", metavar="TOPxSEEDS",
                   help="after the search, re-run the TOP configs with SEEDS seeds each and choose by the mean "
                        "(the space file's repeat: {top, seeds}), e.g. 3x3")
    t.set_defaults(func=cmd_tune)

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="write the embedded synthetic defect dataset as an ordinary dataset")
    s.add_argument("out", help="output folder (must not exist or be empty)")
    s.add_argument("--variant", choices=["binary", "multiclass"], default="binary")
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--num-train", type=int, default=160)
    s.add_argument("--num-val", type=int, default=40)
    s.add_argument("--num-test", type=int, default=40)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_data_synth)
    c = dsub.add_parser("check", help="find every problem in a dataset before training (exit 2 if any)")
    c.add_argument("config", nargs="*", metavar="[CONFIG.yaml | DATASET_DIR] [key=value]", help=CONFIG_ARGS_HELP)
    c.set_defaults(func=cmd_data_check)

    g = sub.add_parser("config", help="print the resolved config, or every default with its meaning")
    g.add_argument("config", nargs="*", metavar="[CONFIG.yaml | DATASET_DIR] [key=value]", help=CONFIG_ARGS_HELP)
    g.add_argument("--defaults", action="store_true", help="every key, its default and what it means")
    g.set_defaults(func=cmd_config)

    u = sub.add_parser("ui", help="open the MLflow UI on 127.0.0.1")
    u.add_argument("--port", type=int, default=None,
                   help=f"port to serve on (default {DEFAULT_UI_PORT}, or a free one if that is taken)")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--tracking-uri", default=None)
    u.add_argument("--experiment", default="raysegtrain",
                   help="the experiment whose runs table (and newest study) the printed links open")
    u.add_argument("--workers", type=int, default=1,
                   help="server processes (default 1: one local user; MLflow's own default, 4, is for shared servers)")
    u.set_defaults(func=cmd_ui)
    from .cli_infer import add_commands; add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    import time

    os.environ.setdefault("RAYSEGTRAIN_T0", str(time.time()))  # the command's start, for the first-step latency
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    with redacted_console():  # no line this command prints shows a credential (redaction.py)
        args = build_parser().parse_args(argv)
        try:
            return _run(args)
        except Exception:  # a bug: its traceback, printed here so that it goes through the redacting console
            import traceback

            traceback.print_exc()
            return 1


def _run(args) -> int:
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe can still be handled, not in the interpreter's exit
        return code
    except BrokenPipeError:
        return _reader_went_away()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except TrainingError as e:
        print(f"error: training failed: {e}", file=sys.stderr)
        return e.exit_code
    except ReportedError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
