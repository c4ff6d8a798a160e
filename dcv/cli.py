"""The ``dcv`` command.

    dcv validate CONFIG [--explain]           check a config; exit 0, or print every problem and exit 2;
                                              --explain also prints every field: type, default, the
                                              config's value where it differs, what it means
    dcv eval CONFIG [--model M]               target accuracy, every probe's accuracy and mean LD, KL to
                                              the config's base model when M differs; logged to MLflow
    dcv patch CONFIG --probe P [--model M] [--method exact|attribution|ig]
                                              head effects on a probe, without Ray: prints the top heads;
                                              reads and writes the patching pipeline's item files
                                              (<storage>/patching/items/), so what patch-all finished is
                                              reused and the other way round
    dcv circuit CONFIG --probe P [--model M] [--method ...]
                                              the probe's circuit from those effects (computed if missing),
                                              its faithfulness, and a layer x head heatmap PNG, written to
                                              <storage>/circuits/cli/
    dcv train CONFIG --method sft|rl [--seed S]
                                              one training trial on Ray Train (a local Ray is started on
                                              127.0.0.1 unless RAY_ADDRESS names a cluster); prints its
                                              evaluated checkpoints; a finished trial is not retrained
    dcv sweep CONFIG                          a Ray Tune sweep: every (method, lr, seed, grid) trial of the
                                              config's sweep section; resumes when rerun; writes the results
                                              table to <storage>/results/checkpoints.{parquet,csv}
    dcv plan CONFIG [--gpus N] [--cpus N]     what the run will cost before it starts: per stage its work,
                                              device-hours and wall time on a cluster of N GPUs / N CPU
                                              cores (default: this machine's cores for a CPU config, the
                                              GPUs the config asks for at once for a GPU one); dcv.plan
    dcv run CONFIG                            the whole experiment: base snapshot, sweep, patching, circuits,
                                              analysis and report (each stage resumes; see dcv.experiment);
                                              prints where the report and the MLflow store are
    dcv report RUN_DIR                        the report again from a run's stored analysis tables
    dcv calibrate CONFIG [--probe P] [--k 1,2,3,5] [--alphas 0.5,0]
                                              planted damage on the base model (top-k circuit heads, k
                                              random heads, a bf16 round trip) through the same patching,
                                              circuits and analysis; prints and writes the table
    dcv patch-all CONFIG [--probe P ...]      head effects of the base model and every checkpoint of the
                                              sweep's results table, on a Ray Data actor pool; writes
                                              <storage>/patching/effects.parquet; finished items are skipped

    dcv --version                             dcv's version and those of the libraries it runs on

Every command that reads a config takes ``--set dotted.key=value`` (repeatable) to override it; ``dcv
validate CONFIG --set ...`` checks the overridden config. Commands that start Ray (train, sweep, run,
patch-all, calibrate) print only dcv's lines once Ray starts: stage lines, one progress line per stage,
warnings from dcv, errors and the summary; everything else (worker output, Ray's own lines) goes to
``<storage>/logs/<command>-<time>-<pid>.log``, named in the summary (dcv.console). ``--verbose`` prints
everything on the terminal instead. Commands that write the storage root (train, sweep, run, patch-all,
calibrate) hold its lock while they run: a second one on the same root exits 2 at once, naming the
holder's pid, host, start time and command (dcv.storage.lock_storage); report and validate take none.
Heavy imports (torch, transformers, mlflow) happen inside the commands, so ``dcv validate`` is instant.
``build_parser`` has one block per command, ``COMMANDS`` what each runs; ``ray_jobs/*.py`` run a command
through ``job_main``.
"""

from __future__ import annotations

import argparse
import errno
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from dcv.config import (
    PATCHING_METHODS,
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    explain_config,
    load_config,
)
from dcv.console import Console
from dcv.storage import check_storage_root, is_remote_storage, logs_dir, storage_path, storage_root

EXIT_BAD_INPUT = 2  # also a storage root in use by another command (dcv.storage.StorageInUse)
EXIT_FAILED = 1  # a failure a rerun recovers from (failure_reason); other failures end in a traceback
VERSIONS_SHOWN = ("ray", "torch", "transformers", "trl", "transformer-lens", "mlflow")  # in dcv --version


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcv", description="Differential circuit vulnerability experiments")
    parser.add_argument("--version", action=PrintVersion, help="show dcv's and its libraries' versions")
    commands = parser.add_subparsers(dest="command", required=True)
    # Options shared by several commands, as argparse parents: --set for every command that reads a
    # config, --verbose for those that start Ray (there is something to hide), --model for those that
    # load one model.
    overrides = argparse.ArgumentParser(add_help=False)
    overrides.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field by dotted path, the value read as YAML (repeatable)",
    )
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print everything (worker output, Ray's own lines) here instead of <storage>/logs/",
    )
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", help="local folder, hub id or built-in name; default model.name")
    # patch and circuit: one model's head effects on one probe.
    one_probe = argparse.ArgumentParser(add_help=False)
    one_probe.add_argument("--probe", required=True, help="one of the config's probes")
    one_probe.add_argument("--method", default="exact", choices=PATCHING_METHODS)
    one_probe.add_argument("--top", type=int, default=15, help="how many heads to print")

    validate = commands.add_parser(
        "validate", parents=[overrides], help="check a config file (and overrides)"
    )
    validate.add_argument("config")
    validate.add_argument(
        "--explain",
        action="store_true",
        help="also print every config field: type, default, this config's value where it differs, meaning",
    )

    train = commands.add_parser(
        "train", parents=[overrides, verbose, model], help="train one trial (SFT or GRPO) under Ray Train"
    )
    train.add_argument("config")
    train.add_argument("--method", required=True, choices=("sft", "rl"))
    train.add_argument("--seed", type=int, help="default: the first of sweep.seeds")

    eval_ = commands.add_parser(
        "eval",
        parents=[overrides, verbose, model],
        help="score a model: target accuracy, probes, KL to the config's base",
    )
    eval_.add_argument("config")

    patch = commands.add_parser(
        "patch", parents=[overrides, verbose, model, one_probe], help="head effects of a model on a probe"
    )
    patch.add_argument("config")

    circuit = commands.add_parser(
        "circuit",
        parents=[overrides, verbose, model, one_probe],
        help="a probe's circuit and its faithfulness",
    )
    circuit.add_argument("config")

    sweep = commands.add_parser(
        "sweep",
        parents=[overrides, verbose],
        help="a Ray Tune sweep of training trials (method x lr x seed x grid)",
    )
    sweep.add_argument("config")

    patch_all = commands.add_parser(
        "patch-all", parents=[overrides, verbose], help="head effects of every checkpoint on a Ray actor pool"
    )
    patch_all.add_argument("config")
    patch_all.add_argument("--probe", dest="probes", action="append", help="only this probe (repeatable)")

    plan = commands.add_parser(
        "plan", parents=[overrides], help="each stage's work, device-hours and wall time, before running"
    )
    plan.add_argument("config")
    plan.add_argument("--gpus", type=float, help="GPUs of the cluster to price on (default: see dcv.plan)")
    plan.add_argument("--cpus", type=float, help="CPU cores of the cluster (default: this machine's)")

    run = commands.add_parser(
        "run",
        parents=[overrides, verbose],
        help="the whole experiment: sweep, patching, circuits, analysis, report",
    )
    run.add_argument("config")

    calibrate = commands.add_parser(
        "calibrate", parents=[overrides, verbose], help="planted damage on the base: what dcv can detect"
    )
    calibrate.add_argument("config")
    calibrate.add_argument("--probe", dest="probes", action="append", help="only this probe (repeatable)")
    calibrate.add_argument("--k", help="comma-separated head counts, e.g. 1,2,3,5 (default calibration.k)")
    calibrate.add_argument(
        "--alphas",
        help="comma-separated scales of the planted heads' output, e.g. 0.5,0 (default calibration.alphas)",
    )

    report = commands.add_parser("report", help="rebuild a run's report from its stored tables")
    report.add_argument(
        "run_dir", help="the run's storage.root, a folder or object-store URI (holds experiment_config.json)"
    )
    return parser


class PrintVersion(argparse.Action):
    """``--version``: print ``version_line()`` unwrapped (argparse's version action wraps it), exit 0."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def version_line() -> str:
    """``dcv 0.1.0 (python 3.11.7, ray 2.60.0, ...)``: read from the installed packages' metadata, so
    ``dcv --version`` imports none of them."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{name} {installed(name)}" for name in VERSIONS_SHOWN)
    return f"dcv {installed('dcv')} (python {sys.version.split()[0]}, {libraries})"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with Console(verbose=getattr(args, "verbose", False)) as console:
        try:
            return run_command(args, console)
        finally:
            shutdown_ray()  # while the log still runs, so Ray's last lines go there too


def run_command(args: argparse.Namespace, console: Console) -> int:
    """One parsed command (``COMMANDS``); bad input (config, files, values) is an error line and exit code
    2, a failure a rerun recovers from (``failure_reason``) an error line and exit code 1."""
    name = f"dcv {args.command}"
    cfg = model_cfg = None
    if "config" in vars(args):  # every command but report, which reads a run folder's stored config
        overrides = config_overrides(args)
        try:
            cfg = load_config(args.config, overrides)
            model_cfg = cfg.model
            if getattr(args, "model", None):
                model_cfg = load_config(args.config, [*overrides, f"model.name={args.model}"]).model
        except ConfigError as exc:
            console.error(f"{name}: {name_overrides(exc, overrides)}")
            return EXIT_BAD_INPUT
    try:
        COMMANDS[args.command](args, cfg, model_cfg, console)
    except (FileNotFoundError, ValueError) as exc:
        console.error(f"{name}: {exc}")
        return EXIT_BAD_INPUT
    except Exception as exc:
        reason = None if cfg is None else failure_reason(cfg, exc)
        if reason is None:
            raise
        console.error(f"{name}: {reason}")
        return EXIT_FAILED
    return 0


# What each command runs: (its parsed arguments, the config with --set applied, the model --model names
# (default the config's), the console). report reads no config file: it gets None for both.
COMMANDS: dict[str, Callable[..., object]] = {
    "validate": lambda args, cfg, model_cfg, console: run_validate(args, cfg, console),
    "train": lambda args, cfg, model_cfg, console: run_train(cfg, args.method, args.seed, console),
    "eval": lambda args, cfg, model_cfg, console: run_eval(cfg, model_cfg),
    "patch": lambda args, cfg, model_cfg, console: run_patch(
        cfg, model_cfg, checked_probe(cfg, args.probe), args.method, args.top
    ),
    "circuit": lambda args, cfg, model_cfg, console: run_circuit(
        cfg, model_cfg, checked_probe(cfg, args.probe), args.method
    ),
    "sweep": lambda args, cfg, model_cfg, console: run_sweep_command(cfg, console),
    "patch-all": lambda args, cfg, model_cfg, console: run_patch_all(cfg, args.probes, console),
    "plan": lambda args, cfg, model_cfg, console: run_plan(args, cfg, console),
    "run": lambda args, cfg, model_cfg, console: run_experiment_command(cfg, console),
    "calibrate": lambda args, cfg, model_cfg, console: run_calibrate(cfg, args.probes, console),
    "report": lambda args, cfg, model_cfg, console: run_report(args.run_dir),
}


def config_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` items, then the options that are config fields under a short name (calibrate's --k and
    --alphas), so a problem with them is named like one of a --set."""
    overrides = list(args.overrides)
    if getattr(args, "k", None):
        overrides.append(f"calibration.k=[{args.k}]")
    if getattr(args, "alphas", None):
        overrides.append(f"calibration.alphas=[{args.alphas}]")
    return overrides


def job_main(command: str, argv: Sequence[str] | None = None) -> int:
    """``ray_jobs/<job>.py``: ``dcv COMMAND`` with the job's arguments (default ``sys.argv[1:]``).

    The job scripts name the config with ``--config PATH`` (the ``ray job submit`` lines in README.md
    and configs/); it is moved to dcv's CONFIG position, every other argument passes through as is."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            argv = [argv[i + 1], *argv[:i], *argv[i + 2 :]]
            break
        if arg.startswith("--config="):
            argv = [arg.removeprefix("--config="), *argv[:i], *argv[i + 1 :]]
            break
    return main([command, *argv])


def run_validate(args: argparse.Namespace, cfg: ExperimentConfig, console: Console) -> None:
    overrides = config_overrides(args)
    probes = ", ".join(p.name for p in cfg.probes)
    given = f" with {', '.join(overrides)}" if overrides else ""
    about = f"model {cfg.model.name}, target {cfg.target_task.name}, probes {probes}"
    check_storage_root(cfg.storage.root)  # what dcv run's preflight checks of the root, in the same function
    if cfg.external is not None:
        # dcv run refuses these in its preflight: validate refuses exactly the same (file-level checks only).
        from dcv.external import check_external

        planned = check_external(cfg)
        about += f"; external: {len(cfg.external.runs)} runs, {len(planned)} checkpoints"
    console.line(f"{args.config}{given}: ok ({about})")
    if cfg.target_task.name == "sciknoweval" and not cfg.target_task.reads_hub():
        # What the rows give, before compute is spent (a hub source is read only by a run: no download here).
        from dcv.tasks.sciknoweval import read_sciknoweval

        console.line(f"target_task: {read_sciknoweval(cfg.target_task).summary()}")
    if args.explain:
        console.line("\n".join(explain_config(cfg)))


def run_plan(args: argparse.Namespace, cfg: ExperimentConfig, console: Console):
    """``dcv plan``: the plan's table (dcv.plan); a config ``dcv validate`` refuses fails here the same way
    (run_command loads it), an unknown model's size is an error naming model.name."""
    from dcv.plan import Cluster, build_plan, default_cluster, format_plan

    cluster = default_cluster(cfg)
    if args.gpus is not None or args.cpus is not None:
        gpus = cluster.gpus if args.gpus is None else args.gpus
        cpus = cluster.cpus if args.cpus is None else args.cpus
        if gpus < 0 or cpus <= 0:
            raise ValueError(
                f"--gpus {gpus:g} / --cpus {cpus:g}: a cluster needs >= 0 GPUs and > 0 CPU cores"
            )
        cluster = Cluster(gpus, cpus, f"{gpus:g} GPUs, {cpus:g} CPU cores (--gpus/--cpus)")
    plan = build_plan(cfg, cluster, args.config)
    console.line("\n".join(format_plan(plan)))
    return plan


def checked_probe(cfg: ExperimentConfig, probe: str) -> str:
    """``--probe`` of patch and circuit: one of the config's probes (else a ValueError naming them)."""
    if probe not in [p.name for p in cfg.probes]:
        names = ", ".join(p.name for p in cfg.probes)
        raise ValueError(f"--probe {probe!r} is not one of the config's probes ({names})")
    return probe


def failure_reason(cfg: ExperimentConfig, exc: BaseException) -> str | None:
    """A clear line for the failures a rerun recovers from (a full disk, a tracking server that went
    away), else None (the traceback is the clearest report)."""
    if is_disk_full(exc):
        root = storage_root_of(cfg)
        return (
            f"the disk is full (or a file-size limit was hit): {exc}; no file was left half-written under "
            f"its final name (dcv writes to a temporary name, then renames); free space under {root} "
            "and rerun the same command: finished work is kept"
        )
    from dcv import tracking

    try:
        uri = tracking.resolve_tracking_uri(cfg)
    except ValueError:
        return None
    return tracking.tracking_server_gone(uri)


def is_disk_full(exc: BaseException | None) -> bool:
    """An ENOSPC, EFBIG or EDQUOT anywhere in the chain (Ray hands a worker's error on as ``cause``, or
    only as text)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return True
        if any(text in str(exc) for text in ("No space left on device", "File too large")):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return False


def storage_root_of(cfg: ExperimentConfig) -> str | Path:
    """The root to lock: the local folder (absolute, as every stage resolves it), or the object-store URI."""
    root = cfg.storage.root
    if "://" in root and not root.startswith("file://"):
        return root
    return Path(root.removeprefix("file://")).expanduser().resolve()


def name_overrides(exc: ConfigError, overrides: list[str]) -> str:
    """The config's problems, each one that a ``--set`` caused marked with that override, so a problem in
    ``circuits.tau`` reads ``... (got 1.5) [--set circuits.tau=1.5]``."""
    keys = {item.partition("=")[0]: item for item in overrides}
    lines = []
    for problem in exc.problems:
        # "<source>: <dotted.field>: <what is wrong>"; the field may go on below the key (a[0], a.b).
        field = problem.split(": ")[1] if problem.count(": ") >= 2 else ""
        hits = [
            item for key, item in keys.items() if field == key or field.startswith((f"{key}.", f"{key}["))
        ]
        lines.append(problem + "".join(f" [--set {item}]" for item in hits))
    return str(ConfigError(lines))


def start_ray(cfg: ExperimentConfig, console: Console, command: str) -> None:
    """Take the storage root's lock, start the log (``<storage>/logs/``, unless --verbose), then connect
    Ray: from here on the terminal gets only the console's lines.

    The lock comes first, after the command's checks (which only read) and before anything is written
    under the root: a second command on a root in use stops here with StorageInUse (exit 2), before Ray
    starts. It is held until the process ends (dcv.storage.lock_storage)."""
    from dcv.storage import lock_storage

    holder = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])  # "dcv run configs/demo.yaml"
    lock_storage(storage_root_of(cfg), holder, say=console.warn)
    if is_remote_storage(cfg.storage.root):
        log_dir = Path.cwd() / "dcv-logs"  # an object-store root has no local folder to hold the log
    else:
        log_dir = logs_dir(storage_root(cfg))
    console.start_log(log_dir, command)
    init_ray()
    if not console.verbose:
        from ray.data import DataContext

        # Ray Data's progress bars are the driver's own (tqdm on stderr): in a log file, only noise.
        DataContext.get_current().enable_progress_bars = False


_ray_started_here = False  # init_ray connected Ray in this process (so shutdown_ray disconnects it)


def shutdown_ray() -> None:
    """Disconnect the Ray that init_ray connected; one connected by the caller (a test) stays."""
    global _ray_started_here
    if _ray_started_here:
        import ray

        ray.shutdown()
        _ray_started_here = False


def init_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS, or start a local Ray bound to 127.0.0.1."""
    import os

    import ray

    from dcv.training.trial import runtime_env_vars

    global _ray_started_here
    if ray.is_initialized():
        return
    # log_to_driver stays on (Ray's default): every worker's output reaches this process, which writes it
    # to the run's log (dcv.console) or, with --verbose, to the terminal.
    runtime_env = {"env_vars": runtime_env_vars(dict(os.environ))}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env)
    else:
        if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
            # Ray 2.60 turns token auth on for a new local Ray unless RAY_AUTH_MODE says otherwise.
            raise ValueError(
                f"[ray] RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']}: dcv keeps Ray token auth on, since "
                "anyone who reaches a Ray port can run code as you; unset RAY_AUTH_MODE or set it to token"
            )
        # Ray 2.60 swaps a loopback _node_ip_address for the machine's routable address, and its GCS and
        # raylet then listen on every interface, unless "Ray clusters" are off (a switch named for
        # Windows/macOS, read once at import, hence also the constant). Off, they listen on 127.0.0.1 only.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
        start_local_ray(runtime_env)
    _ray_started_here = True


RAY_START_ATTEMPTS = 3


def start_local_ray(runtime_env: dict) -> None:
    """A new local Ray (address="local": never one that another `ray start` left on this machine).

    Ray 2.60 gives a new node a hard-coded 30 s to register with its GCS (ray/_private/node.py); on a busy
    2-core machine it can miss that ("The current node timed out during startup"), though nothing is wrong.
    Then the Ray processes this attempt started (children of this process, newer than the attempt) are
    stopped and Ray is started again, up to RAY_START_ATTEMPTS times."""
    import psutil
    import ray

    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        started = time.time()
        try:
            ray.init(
                address="local",
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                runtime_env=runtime_env,
            )
            return
        except Exception as error:
            if "timed out during startup" not in str(error) or attempt == RAY_START_ATTEMPTS:
                raise
            print(
                f"warning: Ray did not start in time (attempt {attempt} of {RAY_START_ATTEMPTS}); again",
                file=sys.stderr,
            )
            ray.shutdown()
            for child in psutil.Process().children(recursive=True):
                try:
                    if child.create_time() >= started - 1 and "ray" in " ".join(child.cmdline()):
                        child.kill()
                except psutil.Error:
                    pass


def run_train(cfg: ExperimentConfig, method: str, seed: int | None, console: Console | None = None):
    from dcv import tracking

    console = console or Console()
    # A tracking server that is down or refuses our credentials fails here, before Ray or any storage write.
    tracking.check_tracking_server(tracking.resolve_tracking_uri(cfg))
    from dcv.training.trial import check_trial_config, finished_trial, run_trial, trial_name, trials_root

    seed = cfg.sweep.seeds[0] if seed is None else seed
    name = trial_name(cfg, method, seed)
    check_trial_config(cfg, trials_root(cfg) / name)
    records = finished_trial(cfg, name)
    if records is not None:
        console.line(f"trial {name} finished before; not retraining")
    else:
        start_ray(cfg, console, "train")
        console.line(f"trial {name}: training ({method}, seed {seed})")
        start = time.perf_counter()
        records = run_trial(cfg, method, seed)
        console.line(f"trial {name} trained in {time.perf_counter() - start:.0f} s")
    train_key = "train/loss" if method == "sft" else "train/reward"
    console.line(
        f"{'step':>6}{'target acc':>12}{train_key:>14}{'KL to base':>12}  "
        + "  ".join(p.name for p in cfg.probes)
    )
    for r in records:
        m = r.metrics
        train = f"{m[train_key]:.4f}" if train_key in m else "-"
        probes = "  ".join(f"{m.get(f'probe/{p.name}/accuracy', float('nan')):.3f}" for p in cfg.probes)
        console.line(
            f"{r.step:>6}{m['target/accuracy']:>12.3f}{train:>14}{m.get('kl_to_base', 0.0):>12.4f}  {probes}"
        )
    console.line(f"checkpoints: {Path(records[-1].path).parent}")
    _name_log(console)
    return records


def run_patch_all(cfg: ExperimentConfig, probes: list[str] | None, console: Console | None = None):
    """Head effects of the base model and every results-table checkpoint (dcv.circuits.pipeline)."""
    from dcv import tracking
    from dcv.circuits.pipeline import build_work_items, log_pipeline_run, run_pipeline
    from dcv.results import read_results

    _quiet_transformers()
    build_work_items(cfg, read_results(storage_root(cfg)), probes)  # bad input: before Ray
    tracking.check_tracking_server(tracking.resolve_tracking_uri(cfg))
    console = console or Console()
    start_ray(cfg, console, "patch-all")
    start = time.perf_counter()
    run = run_pipeline(cfg, probes, progress=console.progress)
    seconds = time.perf_counter() - start
    console.line(
        f"patch-all: {run.computed} items computed, {run.skipped} skipped, {run.total} in all "
        f"({run.table.height} rows) in {seconds:.1f} s\ntable: {run.path}"
    )
    log_pipeline_run(cfg, run)
    _name_log(console)
    return run


def run_sweep_command(cfg: ExperimentConfig, console: Console | None = None):
    import polars as pl

    from dcv import tracking
    from dcv.storage import RESULTS_FILE, results_dir
    from dcv.training.sweep import check_plan, plan_trials, run_sweep

    specs = plan_trials(cfg)
    check_plan(cfg, specs)  # every trial's config, before Ray starts
    # A tracking server that is down or refuses our credentials fails here, before any trial starts.
    tracking.check_tracking_server(tracking.resolve_tracking_uri(cfg))
    console = console or Console()
    console.line(f"sweep {cfg.sweep.name}: {len(specs)} trials ({', '.join(s.name for s in specs)})")
    start_ray(cfg, console, "sweep")
    start = time.perf_counter()
    table = run_sweep(cfg)
    console.line(
        f"sweep {cfg.sweep.name} done in {time.perf_counter() - start:.0f} s: {table.height} checkpoints"
    )
    columns = [c for c in ("trial", "step", "target/accuracy", "kl_to_base") if c in table.columns]
    with pl.Config(tbl_rows=40, tbl_width_chars=120):
        console.line(str(table.select(columns)))
    console.line(f"results: {results_dir(storage_root(cfg)) / RESULTS_FILE}")
    _name_log(console)
    return table


def _name_log(console: Console) -> None:
    if console.log_line():
        console.line(console.log_line())


def _open_instructions(storage: Path, report_html: Path, tracking_uri: str, log: str = "") -> str:
    from dcv.tracking import redact_uri

    ui = (
        f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"
        if tracking_uri.startswith("sqlite:")
        else f"open {redact_uri(tracking_uri)} in a browser"
    )
    return (
        f"report: {report_html}\n        {report_html.with_suffix('.md')} "
        f"(figures in {report_html.parent / 'figures'})\n"
        f"tables: {storage / 'analysis'}\nMLflow store: {redact_uri(tracking_uri)}\n"
        f"MLflow UI: {ui}   (then http://127.0.0.1:5000)" + (f"\n{log}" if log else "")
    )


def run_experiment_command(cfg: ExperimentConfig, console: Console | None = None):
    """``dcv run``: every stage of dcv.experiment on the local Ray (or RAY_ADDRESS's cluster)."""
    from dcv.experiment import run_experiment

    _quiet_transformers()
    console = console or Console()

    def connect() -> None:
        # run_experiment calls this after its preflight checks (which only read), so a bad input fails
        # before the storage lock is taken, the log starts and Ray starts (seconds, not a minute).
        if cfg.benchmarks.tasks and cfg.benchmarks.allow_code_execution:
            # Said in the workers too, but their output goes to the log: the user must see it here.
            console.warn(
                f"benchmarks: allow_code_execution is true: tasks {cfg.benchmarks.tasks} may EXECUTE "
                "MODEL-WRITTEN CODE on this machine (or the cluster's), with this process's permissions"
            )
        start_ray(cfg, console, "run")

    start = time.perf_counter()
    run = run_experiment(cfg, progress=console.progress, stage_line=console.line, connect=connect)
    stages = ", ".join(f"{name} {s:.0f} s" for name, s in run.stage_seconds.items())
    console.line(f"experiment {cfg.name} done in {time.perf_counter() - start:.0f} s ({stages})")
    console.line(_open_instructions(run.storage, run.report_html, run.tracking_uri, console.log_line()))
    console.line("\n" + "\n\n".join(run.answer))
    return run


def run_calibrate(cfg: ExperimentConfig, probes: list[str] | None, console: Console | None = None):
    """``dcv calibrate``: the base snapshot, then planted damage through patching and circuits."""
    import polars as pl

    from dcv.calibration import calibration_path, run_calibration
    from dcv.config import select_probes
    from dcv.detection import plant_table, verdict_table
    from dcv.experiment import prepare_base

    _quiet_transformers()
    select_probes(cfg, probes)  # an unknown probe fails before anything starts
    storage = storage_root(cfg)
    console = console or Console()
    start_ray(cfg, console, "calibrate")
    start = time.perf_counter()
    table = run_calibration(prepare_base(cfg, storage), storage, probes, progress=console.progress)
    with pl.Config(tbl_rows=100, tbl_cols=20, tbl_width_chars=250, fmt_str_lengths=40):
        console.line(str(plant_table(table)))  # " *": flagged (on the precision copy, a false positive)
    for row in verdict_table(table).iter_rows(named=True):
        judged = (
            "passes its positive control" if row["passes_positive_control"] else f"FAILS: {row['failure']}"
        )
        console.line(
            f"{row['probe']} {row['metric']}: weakest detected k = {row['min_detectable_k']} at alpha "
            f"{row['min_detectable_alpha']}; separates from random plants at k = "
            f"{row['separates_at_k'] or '-'}; {judged}"
        )
    for (probe,), rows in table.group_by("probe", maintain_order=True):
        row = rows.row(0, named=True)
        console.line(
            f"{probe}: minimum detectable effect (one model, {row['n_items']} items): V "
            f"{row['mde_vulnerability']:.3g}, P {row['mde_preservation']:.3g}, forgetting "
            f"{row['mde_forgetting']:.3g}"
        )
    console.line(f"calibrated in {time.perf_counter() - start:.0f} s; table: {calibration_path(storage)}")
    _name_log(console)
    return table


def run_report(run_dir: str | Path):
    from dcv import tracking
    from dcv.experiment import load_run_config, rebuild_report

    md, page, answer = rebuild_report(run_dir)
    cfg = load_run_config(run_dir)
    print(_open_instructions(storage_path(cfg.storage.root), page, tracking.resolve_tracking_uri(cfg)))
    print("\n" + "\n\n".join(answer))
    return md, page


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def run_eval(cfg: ExperimentConfig, model_cfg: ModelConfig) -> dict[str, float]:
    """Evaluate ``model_cfg``'s model with ``cfg``'s tasks; KL is to ``cfg.model`` when they differ."""
    from dcv import tracking
    from dcv.evaluation import evaluate_model, sample_kl_reference
    from dcv.models import load_model, load_tokenizer
    from dcv.tasks import load_target_splits
    from dcv.tasks.probes import build_probes

    _quiet_transformers()
    # Everything that can fail on bad input is built before the model is loaded.
    _, test_items = load_target_splits(cfg.target_task)
    tracking_uri = tracking.resolve_tracking_uri(cfg)
    start = time.perf_counter()
    tokenizer = load_tokenizer(model_cfg)
    probes = build_probes(cfg.probes, tokenizer, cfg.target_task)
    model = load_model(model_cfg, tokenizer)
    base_model = kl_reference = None
    if model_cfg.name != cfg.model.name:
        base_model = load_model(cfg.model, tokenizer)
        kl_reference = sample_kl_reference(base_model, tokenizer, test_items, cfg.evaluation)
    metrics = evaluate_model(
        model, tokenizer, cfg.evaluation, test_items, probes, base_model, kl_reference
    ).metrics
    seconds = time.perf_counter() - start

    print(format_scores(model_cfg.name, metrics, probes))
    kept = ", ".join(f"{p.name} {len(p)}/{p.n_candidates}" for p in probes)
    print(f"evaluated in {seconds:.1f} s; probe items kept / generated: {kept}")
    tags = {"dcv.stage": "eval", "dcv.model": model_cfg.name}
    with tracking.child_run(cfg, f"eval:{model_cfg.name}", tags=tags) as run:
        run.log_params({"eval.model": model_cfg.name})
        run.log_metrics({**metrics, "eval/seconds": seconds})
    print(f"logged to MLflow at {tracking_uri} (experiment {cfg.tracking.experiment_name!r})")
    return metrics


def format_scores(model_name: str, metrics: dict[str, float], probes) -> str:
    rows = [("target", int(metrics["target/n_items"]), metrics["target/accuracy"], None)]
    rows += [
        (f"probe:{p.name}", len(p), metrics[f"probe/{p.name}/accuracy"], metrics[f"probe/{p.name}/mean_ld"])
        for p in probes
    ]
    lines = [f"model {model_name}", f"{'task':<20}{'items':>7}{'accuracy':>10}{'mean LD':>10}"]
    for task, n, accuracy, ld in rows:
        lines.append(f"{task:<20}{n:>7}{accuracy:>10.3f}{'' if ld is None else f'{ld:.3f}':>10}")
    lines.append(f"{'format rate':<20}{'':>7}{metrics['target/format_rate']:>10.3f}")
    if "kl_to_base" in metrics:
        lines.append(f"{'KL(base || model)':<20}{'':>7}{metrics['kl_to_base']:>10.4f}")
    return "\n".join(lines)


def patch_work(cfg: ExperimentConfig, model_cfg: ModelConfig, probe: str, method: str) -> list[dict]:
    """The patching pipeline's work items (dcv.circuits.pipeline) for every head of one model on one
    probe, in head order, each with the ``path`` of its item file.

    ``dcv patch`` and ``dcv circuit`` read and write the pipeline's own files (one patch cache): for the
    config's base model these are ``dcv patch-all``'s items, so each command reuses what the other
    computed. Another model (``--model``) is keyed as the pipeline keys a checkpoint: its name and
    dtype, with the probe's items, the method, the heads and ig steps."""
    from dcv.circuits.pipeline import model_items
    from dcv.models import model_head_grid
    from dcv.storage import BASE_MODEL

    model = BASE_MODEL if model_cfg == cfg.model else model_cfg.name
    shape = model_head_grid(model_cfg)
    return model_items(cfg, storage_root(cfg), (model, model, 0, model_cfg.name), shape, probe, method)


def circuit_outputs(cfg: ExperimentConfig, model_cfg: ModelConfig, probe: str, method: str) -> Path:
    """``<storage>/circuits/cli/<model>__<probe>__<method>__<hash>`` (add ``.circuit.parquet`` or
    ``.heatmap.png``): ``dcv circuit``'s outputs, named by the effects they come from."""
    from dcv.storage import circuits_dir, content_hash, file_slug

    digest = content_hash([item["item_id"] for item in patch_work(cfg, model_cfg, probe, method)])
    name = f"{file_slug(model_cfg.name)}__{probe}__{method}__{digest}"
    return circuits_dir(storage_root(cfg)) / "cli" / name


def run_patch(cfg: ExperimentConfig, model_cfg: ModelConfig, probe: str, method: str, top: int):
    """Head effects of one model on one probe (no Ray): items finished by an earlier ``dcv patch``,
    ``patch-all`` or ``run`` are reused, not redone; the rest are computed here and stored as the
    pipeline stores them (``patch_work``)."""
    import polars as pl

    from dcv.circuits.pipeline import compute_item, read_item
    from dcv.models import load_model, load_tokenizer
    from dcv.storage import write_parquet
    from dcv.tasks.probes import build_probe

    _quiet_transformers()
    work = patch_work(cfg, model_cfg, probe, method)
    tokenizer = load_tokenizer(model_cfg)
    items = build_probe(cfg.probe(probe), tokenizer, cfg.target_task).items
    tables = [read_item(Path(item["path"]), item["n_rows"]) for item in work]
    todo = [i for i, table in enumerate(tables) if table is None]
    if len(todo) < len(work):
        where = Path(work[0]["path"]).parent
        print(f"reusing {len(work) - len(todo)} of {len(work)} stored items under {where}")
    model = load_model(model_cfg, tokenizer) if todo else None
    for i in todo:  # each item stored once computed: a killed dcv patch keeps what it finished
        start = time.perf_counter()
        tables[i] = compute_item(model, items, work[i], cfg)
        seconds = time.perf_counter() - start
        print(f"patched {work[i]['n_rows']} heads x {len(items)} items ({method}) in {seconds:.1f} s")
        write_parquet(tables[i], Path(work[i]["path"]))
    table = pl.concat(tables)
    if top:
        print(f"top heads of {model_cfg.name} on {probe} ({method}, {len(items)} items):")
        print(f"{'layer':>6}{'head':>6}{'effect':>10}")
        for layer, head, effect in (
            table.sort(pl.col("effect").abs(), descending=True)
            .head(top)
            .select("layer", "head", "effect")
            .iter_rows()
        ):
            print(f"{layer:>6}{head:>6}{effect:>10.3f}")
        print("\n".join(f"table: {item['path']}" for item in work))
    return table, items


def run_circuit(cfg: ExperimentConfig, model_cfg: ModelConfig, probe: str, method: str):
    from dcv import tracking
    from dcv.circuits.circuit import circuit_table, select_circuit
    from dcv.models import load_model, load_tokenizer
    from dcv.report import plot_head_heatmap
    from dcv.storage import write_parquet

    effects, items = run_patch(cfg, model_cfg, probe, method, top=0)
    model = load_model(model_cfg, load_tokenizer(model_cfg))
    circuit = select_circuit(model, items, effects, cfg.circuits, batch_size=cfg.patching.batch_size)
    c = cfg.circuits
    rule = (
        f"top {c.top_k}"
        if c.selection == "top_k"
        else f"smallest top set with F >= {c.tau}, at most {c.k_max}"
    )
    missed = "" if circuit.reached_tau else f"; tau {c.tau} not reached"
    print(
        f"circuit of {model_cfg.name} on {probe} ({method}; {rule}): {len(circuit)} heads, "
        f"faithfulness {circuit.faithfulness:.3f}{missed}"
    )
    print("heads (layer.head): " + " ".join(f"{layer}.{head}" for layer, head in circuit.heads))
    print("faithfulness of the top-k sets: " + " ".join(f"{f:.2f}" for f in circuit.curve))
    outputs = circuit_outputs(cfg, model_cfg, probe, method)
    circuit_path = write_parquet(
        circuit_table(circuit, effects), outputs.with_name(f"{outputs.name}.circuit.parquet")
    )
    png = plot_head_heatmap(
        effects,
        outputs.with_name(f"{outputs.name}.heatmap.png"),
        title=f"{model_cfg.name} / {probe} / {method}: {len(circuit)} heads, F = {circuit.faithfulness:.2f}",
        marked=circuit.heads,
    )
    print(f"circuit: {circuit_path}\nheatmap: {png}")
    tags = {"dcv.stage": "circuit", "dcv.model": model_cfg.name, "dcv.probe": probe}
    with tracking.child_run(cfg, f"circuit:{model_cfg.name}:{probe}:{method}", tags=tags) as run:
        run.log_metrics({"circuit/size": len(circuit), "circuit/faithfulness": circuit.faithfulness})
        effect_files = [Path(item["path"]) for item in patch_work(cfg, model_cfg, probe, method)]
        for path in (*effect_files, circuit_path, png):
            run.log_artifact(path, artifact_path="circuits")
    return circuit


if __name__ == "__main__":
    raise SystemExit(main())
