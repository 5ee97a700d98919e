"""idm_jax command line: condense, evaluate a synthetic set, or run a baseline.

  python main.py --config=configs/quick.py --workdir=runs/quick
  python main.py --config=configs/cifar10.py:10 --workdir=runs/c10_ipc10
  python main.py --config=configs/cifar10.py:10 --mode=evaluate \
      --synthetic=runs/c10_ipc10/synthetic.npz --workdir=runs/c10_eval
  python main.py --config=configs/cifar10.py:10 --mode=evaluate --synthetic=release_ipc10.npz \
      --synthetic_space=normalized --synthetic_partition_factor=2 --workdir=runs/release_eval
  python main.py --config=configs/cifar10.py:10 --mode=baseline \
      --config.baseline.method=herding --workdir=runs/c10_herding
  python main.py --config=configs/cifar10.py:10 --mode=export \
      --synthetic=runs/c10_ipc10/synthetic.npz --workdir=runs/c10_export
  python main.py --config=configs/cifar100.py:10 --mode=continual --workdir=runs/continual
  python main.py --config=configs/cifar100.py:10 --mode=consistency --workdir=runs/fig4
  python main.py --config=configs/cifar10.py:10 --mode=sweep --workdir=runs/sweep_table2 \
      --config.sweep.name=table2 --config.sweep.iterations=1000
  python main.py --config=configs/cifar10.py --mode=table1 --workdir=runs/table1 \
      --config.table1.cells=cifar10:1,cifar10:10 --config.table1.methods=random,dm,idm

The logic lives in the importable `idm_jax` package; this file only parses
flags and dispatches, so everything it runs is testable.
"""

import os
import signal
import sys


def _interrupted_while_starting(signum, frame):
    """Ctrl-C while the modules below load or the flags are read (seconds): one line, not a traceback."""
    del frame
    print("error: interrupted (Ctrl-C) while starting; nothing was written", file=sys.stderr, flush=True)
    # os._exit, not sys.exit: a SystemExit raised inside a native module's import (jaxlib's) aborts
    # the process with a C++ error instead of exiting; nothing is open or written yet.
    os._exit(128 + signum)


if __name__ == "__main__":  # not when imported (tests); main() hands Ctrl-C back to Python
    signal.signal(signal.SIGINT, _interrupted_while_starting)

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from idm_jax import backend
from idm_jax import baselines
from idm_jax import checkpoints
from idm_jax import compile_cache
from idm_jax import config_check
from idm_jax import config_files
from idm_jax import consistency
from idm_jax import continual
from idm_jax import distributed
from idm_jax import errors
from idm_jax import evaluate_set
from idm_jax import presets
from idm_jax import run_io
from idm_jax import runner
from idm_jax import export
from idm_jax import sweeps
from idm_jax import table1
from idm_jax import workdir
from idm_jax import workdir_lock

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/cifar10.py:10.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics, results).")
_MODE = flags.DEFINE_enum("mode", "condense",
                          ["condense", "evaluate", "baseline", "continual", "consistency", "sweep", "export", "table1"],
                          "What to run.")
_SYNTHETIC = flags.DEFINE_string("synthetic", None, "synthetic.npz to score with --mode=evaluate (or to "
                                 "write in other layouts with --mode=export); with --mode=consistency, "
                                 "NAME=PATH[,NAME=PATH...] (empty: condense them).")
# --mode=evaluate on a set made elsewhere (docs/EVALUATE_ANY_SET.md): an .npz of only images and labels
# takes the dataset config's mean/std and class names; these say what its arrays hold.
_SYN_SPACE = flags.DEFINE_enum("synthetic_space", "pixel", ["pixel", "normalized"],
                               "evaluate: the .npz's `images` are [0, 1] pixels (or uint8) or normalized "
                               "with the dataset's mean and std (the authors' release and DM save these).")
_SYN_LAYOUT = flags.DEFINE_enum("synthetic_layout", "auto", ["auto", "NHWC", "NCHW"],
                                "evaluate: axis order of the .npz's images (torch saves NCHW); auto: by the "
                                "dataset's image shape.")
_SYN_PARTITION = flags.DEFINE_integer("synthetic_partition_factor", None,
                                      "evaluate: cut each image into l x l pieces (IDM's l; the release's "
                                      "--aug is 2); default: the file's, else 1.")
_SYN_METHOD = flags.DEFINE_string("synthetic_method", None,
                                  "evaluate: method name in results (e.g. idm, dm: the paper's number is "
                                  "shown beside); default: the file's, else 'external'.")
_RESTART = flags.DEFINE_bool("restart", False, "condense: delete the workdir's run outputs (checkpoints, "
                             "metrics, synthetic set, results) and start over; configs are kept.")
_REEVALUATE = flags.DEFINE_bool("reevaluate", False, "condense: evaluate a completed run again "
                                "(by default a finished workdir is only reported).")
# Several processes (hosts), see idm_jax/distributed.py and docs/SCALING.md: every process runs the
# same command; these (or $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID) say
# where they meet, unless JAX detects the cluster (SLURM, Cloud TPU).
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", list(distributed.MODES),
                                 "auto: join other processes when an address/count is given or a "
                                 "cluster is detected; on: always (JAX detects the rest); off: never.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in the run (0 = from the cluster).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (-1 = from the cluster).")
_DIST_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300,
                                     "Seconds to wait for all processes to start before failing.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt, caught below
    backend.use_cpu_memory_scheduler()  # before JAX starts its backends (idm_jax/backend.py)
    compile_cache.enable()  # before anything compiles: programs shared with every later run here
    run_io.quiet_library_logs()
    try:
        config_check.validate(config)
        workdir.check_writable(_WORKDIR.value)  # before any compute
        several = distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                                         _PROCESS_ID.value, _DIST_TIMEOUT.value)
        # One run per workdir (every mode), before anything is written; released at exit, so
        # SIGTERM exits through Python too (the condensation loop still checkpoints first).
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        workdir_lock.lock_until_exit(_WORKDIR.value)
        logging.info("JAX %s, devices: %s", jax.__version__, jax.devices())
        if several and (_MODE.value != "condense" or config.runs > 1):
            raise ValueError(f"--mode={_MODE.value} (runs={config.runs}) runs on one process; "
                             "several processes run --mode=condense with runs=1")
        if _MODE.value == "condense" and config.runs > 1:
            runner.run_repeated(config, _WORKDIR.value)
        elif _MODE.value == "condense":
            runner.run_condensation(config, _WORKDIR.value, restart=_RESTART.value,
                                    reevaluate=_REEVALUATE.value)
        elif _MODE.value == "evaluate":
            if not _SYNTHETIC.value:
                raise ValueError("--mode=evaluate needs --synthetic=<path to synthetic.npz>")
            evaluate_set.run_evaluation(config, _WORKDIR.value, _SYNTHETIC.value, space=_SYN_SPACE.value,
                                        layout=_SYN_LAYOUT.value, partition_factor=_SYN_PARTITION.value,
                                        method=_SYN_METHOD.value)
        elif _MODE.value == "export":  # the set in other tools' layouts (idm_jax/export.py)
            if not _SYNTHETIC.value:
                raise ValueError("--mode=export needs --synthetic=<path to the set's .npz>")
            export.run_export(config, _WORKDIR.value, _SYNTHETIC.value, space=_SYN_SPACE.value,
                                   layout=_SYN_LAYOUT.value, partition_factor=_SYN_PARTITION.value,
                                   method=_SYN_METHOD.value)
        elif _MODE.value == "baseline":
            baselines.run_baseline(config, _WORKDIR.value)
        elif _MODE.value == "continual":
            continual.run_continual(config, _WORKDIR.value)
        elif _MODE.value == "consistency":
            consistency.run_consistency(config, _WORKDIR.value, _SYNTHETIC.value)
        elif _MODE.value == "table1":  # the command's --config.<field> values apply to every cell
            table1.run_table1(config, _WORKDIR.value,
                              overrides=config_flags.get_override_values(flags.FLAGS["config"]))
        else:
            sweeps.run_sweep(config, _WORKDIR.value)
    except (ValueError, OSError, runner.NonFiniteLossError, errors.MissingDependency,
            distributed.DistributedError) as e:
        # Bad input (or a full disk): one clear line, not a traceback from deep inside JAX.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # the condensation loop checkpoints on Ctrl-C itself; elsewhere, this
        print(f"error: {interrupted_line(_MODE.value, _WORKDIR.value, config.runs)}", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


def interrupted_line(mode: str, workdir_path: str, runs: int = 1) -> str:
    """What a Ctrl-C outside the condensation loop (data loading, initialising, compiling, evaluating)
    leaves in the workdir and how to go on, in one line. Every output is written whole (temporary
    file, then rename), so what is there is intact."""
    if mode == "condense" and runs > 1:
        return (f"interrupted (Ctrl-C); finished runs and the checkpoints under {workdir_path}/run_* are kept: "
                "rerun the same command to resume")
    if mode == "condense":
        latest = checkpoints.latest_checkpoint(workdir_path) if os.path.isdir(workdir_path) else None
        if latest is None:
            return (f"interrupted (Ctrl-C) before the first checkpoint in {workdir_path}: nothing to resume "
                    "from; rerun the same command to start again")
        return (f"interrupted (Ctrl-C); the checkpoint at iteration {latest} in {workdir_path} is kept: "
                "rerun the same command to resume from it")
    return (f"interrupted (Ctrl-C); the files already in {workdir_path} are whole and nothing half-written "
            f"is left: rerun the same command to finish --mode={mode}")


def _exit_on_sigterm(signum, frame):
    del frame
    sys.exit(128 + signum)


def config_arg_problem(argv) -> str | None:
    """The first problem with --config / --config.<field> in argv, once absl has refused them.

    Loads the config file as absl would (`path[:arg]`, get_config(arg)) and walks every override's
    field path, so a config file's own error (e.g. "IPC must be >= 1") and a misspelt field are
    reported in our words, whatever absl's wording. None when both look fine.
    """
    config_value, overrides = None, []
    for i, arg in enumerate(argv[1:], 1):
        name, eq, value = arg.partition("=")
        if name == "--config":
            config_value = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
        elif name.startswith("--config."):
            overrides.append(name[len("--config."):])
    if not config_value:
        return None  # absl reports the missing flag
    path, config_arg = config_files.split_config_value(config_value)
    if not os.path.isfile(path):
        return f"config file {path!r} not found"
    try:
        config = config_files.load_config_file(path, config_arg)
    except Exception as e:  # pylint: disable=broad-except
        return f"--config={config_value}: {e}"
    for field in overrides:
        problem = presets.field_problem(config, field)
        if problem:
            return f"--config.{field}: {problem}"
    return None


def flag_error_line(error: Exception) -> str:
    """One line for an error absl raised while parsing: its first line, plus the message of the
    exception it wraps (e.g. an override's failed type conversion) where that line lacks it."""
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else type(error).__name__
    inner = error.__cause__ or error.__context__
    if inner is not None and str(inner) not in line:
        line = f"{line} {inner}"
    return " ".join(line.split())


def parse_flags(argv):
    """absl flag parsing, with flag and config errors reported in one line, not a traceback."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, ValueError, AttributeError, KeyError) as e:
        # Only now is the config file loaded a second time, to name the problem in our words.
        problem = config_arg_problem(argv) or flag_error_line(e)
    print(f"error: bad flag or config: {problem}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
