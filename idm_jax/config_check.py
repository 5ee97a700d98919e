"""Checks a run's config before any compute, naming each bad value.

Key typos are caught by ml_collections itself (configs are locked when
loaded through --config); this module checks values and combinations.
"""

from __future__ import annotations

from idm_jax import augment
from idm_jax import backend
from idm_jax import condense
from idm_jax import coresets
from idm_jax import data as data_lib
from idm_jax import models
from idm_jax import presets
from idm_jax import sweep_table
from idm_jax import table1_plan
from idm_jax import trainer

UPDATE_MODES = ("per_class", "joint")
INITS = condense.INITS_FROM_REAL + ("noise",)
# The allowed values of the other choices live with the code that acts on them (backend,
# trainer, data, condense), so a list is written once.


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"invalid config: {message}")


def _positive_ints(section, prefix: str, names: list[str]) -> None:
    for name in names:
        value = section[name]
        _require(isinstance(value, int) and value >= 1,
                 f"{prefix}{name} must be an integer >= 1, got {value!r}")


def _check_steps_per_dispatch(config) -> None:
    """idm.steps_per_dispatch: an integer >= 1 dividing every iteration cadence the host acts on
    (a log row, checkpoint or evaluation falls at the end of a call, never inside one)."""
    k = config.idm.steps_per_dispatch
    _require(isinstance(k, int) and not isinstance(k, bool) and k >= 1,
             f"idm.steps_per_dispatch must be an integer >= 1, got {k!r}")
    if k == 1:
        return
    for name, every in (("log_every", config.log_every), ("checkpoint_every", config.checkpoint_every),
                        ("eval.interval", config.eval.interval)):
        _require(not every or every % k == 0,
                 f"idm.steps_per_dispatch={k} must divide {name}={every}; pick a divisor of it")
    _require(config.data.on_device != "host",
             f"idm.steps_per_dispatch={k} needs the real data on the device; data.on_device='host'")


def validate(config) -> None:
    """Raises ValueError("invalid config: <field> ... got <value>") on the first bad value.

    Sections are checked in this order (the first bad value is the one named).
    """
    _check_run(config)
    _check_idm_numbers(config.idm)
    _check_idm_choices(config)
    _check_queue_and_pool(config.idm)
    _check_dsa_and_method(config)
    _check_data(config.data)
    _check_eval(config.eval)
    _check_cadences(config)
    _check_steps_per_dispatch(config)  # after the cadences it must divide are checked
    _check_continual(config)
    _check_consistency(config)
    _check_sweep(config)
    _check_baseline(config)
    _check_table1(config)


def _check_run(config) -> None:
    """What is condensed: ipc, method, the matching model, how many devices."""
    _require(isinstance(config.ipc, int) and config.ipc >= 1,
             f"ipc must be an integer >= 1, got {config.ipc!r}")
    _require(config.method in presets.METHODS, f"method must be one of {presets.METHODS}, got {config.method!r}")
    _require(config.model in models.MODEL_NAMES,
             f"model {config.model!r} is unknown; valid: {', '.join(models.MODEL_NAMES)}")
    _require("BN" not in config.model,
             f"model {config.model!r} uses batch norm, which the matching step does not "
             "support; use it for evaluation (eval.archs) instead")
    _require(isinstance(config.mesh_devices, int) and config.mesh_devices >= 0,
             f"mesh_devices must be an integer >= 0 (0 = all that divide the classes), "
             f"got {config.mesh_devices!r}")


def _check_idm_numbers(idm) -> None:
    """idm.*: counts, rates and fractions."""
    _positive_ints(idm, "idm.", [
        "iterations", "partition_factor", "batch_real", "net_num", "net_init_num",
        "net_generate_interval", "train_net_num", "fetch_net_num", "model_train_steps",
        "batch_train", "real_chunk_size"])
    _require(isinstance(idm.max_unrolled_queue_steps, int) and idm.max_unrolled_queue_steps >= 0,
             f"idm.max_unrolled_queue_steps must be an integer >= 0 (0 = all), got "
             f"{idm.max_unrolled_queue_steps!r}")
    _require(isinstance(idm.meter_reset_interval, int) and idm.meter_reset_interval >= 0,
             f"idm.meter_reset_interval must be an integer >= 0 (0 = never reset), got "
             f"{idm.meter_reset_interval!r}")
    _require(0.0 <= idm.model_aug_lr_jitter < 1.0,
             f"idm.model_aug_lr_jitter must be in [0, 1) (0.1 = lr +-10 %), got {idm.model_aug_lr_jitter!r}")
    _require(0.0 < idm.model_aug_class_fraction <= 1.0,
             f"idm.model_aug_class_fraction must be in (0, 1] (1 = all classes), got "
             f"{idm.model_aug_class_fraction!r}")


def _check_idm_choices(config) -> None:
    """idm.*: named choices and the values that depend on other fields."""
    idm = config.idm
    _require(idm.update_mode in UPDATE_MODES,
             f"idm.update_mode must be one of {UPDATE_MODES}, got {idm.update_mode!r}")
    _require(idm.init in INITS, f"idm.init must be one of {INITS}, got {idm.init!r}")
    keep = idm.keep_lowest_ce_real
    _require(isinstance(keep, int) and not isinstance(keep, bool) and keep >= 0,
             f"idm.keep_lowest_ce_real must be an integer >= 0 (0 = all), got {keep!r}")
    if keep and idm.partition_factor == 1:  # only the l = 1 path uses it
        _require(keep <= idm.batch_real,
                 f"idm.keep_lowest_ce_real ({keep}) exceeds idm.batch_real ({idm.batch_real}): it keeps "
                 "that many of each class's real batch")
    _require(idm.embedding in models.EMBEDDINGS,
             f"idm.embedding must be one of {models.EMBEDDINGS}, got {idm.embedding!r}")
    _require(idm.embedding == "last_block" or config.model.startswith("ConvNet"),
             f"idm.embedding={idm.embedding!r} needs a ConvNet matching model, got {config.model!r}")
    _require(idm.queue_train_impl in backend.QUEUE_TRAIN_IMPLS,
             f"idm.queue_train_impl must be one of {backend.QUEUE_TRAIN_IMPLS}, got {idm.queue_train_impl!r}")
    _require(idm.conv_impl in backend.CONV_IMPLS,
             f"idm.conv_impl must be one of {backend.CONV_IMPLS}, got {idm.conv_impl!r}")
    _require(idm.class_batch >= 0, f"idm.class_batch must be >= 0 (0 = auto), got {idm.class_batch!r}")
    _require(idm.lr_img > 0, f"idm.lr_img must be > 0, got {idm.lr_img!r}")
    _require(0 <= idm.momentum_img < 1, f"idm.momentum_img must be in [0, 1), got {idm.momentum_img!r}")
    _require(idm.ce_weight >= 0, f"idm.ce_weight must be >= 0, got {idm.ce_weight!r}")


def _check_queue_and_pool(idm) -> None:
    """The model queue's sizes, or the pre-trained pool that replaces it."""
    if idm.use_queue:
        _require(idm.net_init_num <= idm.net_num,
                 f"idm.net_init_num ({idm.net_init_num}) must be <= idm.net_num ({idm.net_num})")
        # At iteration 0 one more net is pushed, so the queue then holds net_init_num + 1.
        held = min(idm.net_init_num + 1, idm.net_num)
        for name in ("train_net_num", "fetch_net_num"):
            _require(idm[name] <= held,
                     f"idm.{name} ({idm[name]}) exceeds the {held} nets the queue holds at the start")
    pool_epochs = idm.pool_epochs
    _require(isinstance(pool_epochs, int) and pool_epochs >= 0,
             f"idm.pool_epochs must be an integer >= 0 (0 = off), got {pool_epochs!r}")
    if pool_epochs:
        _require(isinstance(idm.pool_size, int) and idm.pool_size >= 1,
                 f"idm.pool_size must be an integer >= 1, got {idm.pool_size!r}")
        _require(not idm.use_queue, f"idm.pool_epochs={pool_epochs} (a pre-trained pool) needs "
                 "idm.use_queue=False: the pool replaces the fresh nets of DM, not the queue")


def _check_dsa_and_method(config) -> None:
    """The DSA strategy string, and the fields method 'dm' fixes."""
    idm = config.idm
    try:
        augment.parse_strategy(idm.dsa_strategy)
    except ValueError as e:
        raise ValueError(f"invalid config: idm.dsa_strategy: {e}") from None
    if config.method == "dm":
        for key in presets.DM_DEFINING:
            dm_value, value = presets.DM_PRESET[key], presets.get_dotted(config, key)
            _require(value == dm_value,
                     f"method 'dm' needs {key}={dm_value!r}, got {value!r} (load the "
                     "DM preset with e.g. --config=configs/cifar10.py:10,dm)")


def _check_data(data) -> None:
    _require(data.resize in data_lib.RESIZE_MODES,
             f"data.resize must be one of {data_lib.RESIZE_MODES}, got {data.resize!r}")
    _require(data.on_device in condense.PLACEMENTS,
             f"data.on_device must be one of {condense.PLACEMENTS}, got {data.on_device!r}")
    _require(data.class_sampling in data_lib.CLASS_SAMPLINGS,
             f"data.class_sampling must be one of {data_lib.CLASS_SAMPLINGS}, got {data.class_sampling!r}")
    _require(data.train_sampling in data_lib.TRAIN_SAMPLINGS,
             f"data.train_sampling must be one of {data_lib.TRAIN_SAMPLINGS}, got {data.train_sampling!r}")


def _check_eval(ev) -> None:
    _positive_ints(ev, "eval.", ["num_seeds", "epochs", "batch_size", "test_batch_size", "interval_epochs"])
    _require(ev.interval >= 0, f"eval.interval must be >= 0 (0 = off), got {ev.interval!r}")
    try:
        models.parse_archs(ev.archs)
    except ValueError as e:
        raise ValueError(f"invalid config: eval.archs: {e}") from None
    _require(ev.seed_parallel in backend.SEED_PARALLEL,
             f"eval.seed_parallel must be one of {backend.SEED_PARALLEL}, got {ev.seed_parallel!r}")
    _require(ev.conv_impl in backend.CONV_IMPLS,
             f"eval.conv_impl must be one of {backend.CONV_IMPLS}, got {ev.conv_impl!r}")
    _require(ev.loop in backend.EVAL_LOOPS, f"eval.loop must be one of {backend.EVAL_LOOPS}, got {ev.loop!r}")
    _require(ev.schedule in trainer.SCHEDULES,
             f"eval.schedule must be one of {trainer.SCHEDULES}, got {ev.schedule!r}")
    _require(0.0 <= ev.scores_weight <= 1.0, f"eval.scores_weight must lie in [0, 1], got {ev.scores_weight!r}")
    _require(0.0 <= ev.whole_data_accuracy <= 100.0,
             "eval.whole_data_accuracy must be a percentage in [0, 100] (0 = not given), "
             f"got {ev.whole_data_accuracy!r}")
    _require(not ev.whole_data_accuracy or ev.whole_data_source.strip(),
             f"eval.whole_data_accuracy={ev.whole_data_accuracy!r} needs its source: "
             "--config.eval.whole_data_source='<where the number comes from>'")


def _check_cadences(config) -> None:
    """Logging, checkpoints and repeated runs."""
    _positive_ints(config, "", ["log_every", "keep_checkpoints", "runs"])
    _require(isinstance(config.checkpoint_every, int) and config.checkpoint_every >= 0,
             f"checkpoint_every must be an integer >= 0 (0 = off), got {config.checkpoint_every!r}")
    _require(config.checkpoint_every_minutes >= 0,
             f"checkpoint_every_minutes must be >= 0 (0 = off), got {config.checkpoint_every_minutes!r}")


def _nonnegative_int(value, name: str, zero_means: str) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
             f"{name} must be an integer >= 0 ({zero_means}), got {value!r}")


def _check_continual(config) -> None:
    """--mode=continual's section: its lists, memory budget, l and iterations."""
    if "continual" not in config:
        return
    cl = config.continual
    try:
        presets.name_list(cl.methods, "continual.methods", presets.CONTINUAL_METHODS)
        steps = presets.int_list(cl.num_steps, "continual.num_steps")
        presets.int_list(cl.class_order_seeds, "continual.class_order_seeds")
    except ValueError as e:
        raise ValueError(f"invalid config: {e}") from None
    _require(all(n >= 1 for n in steps), f"continual.num_steps must all be >= 1, got {cl.num_steps!r}")
    _positive_ints(cl, "continual.", ["ipc", "partition_factor"])
    _nonnegative_int(cl.iterations, "continual.iterations", "0 = idm.iterations")


def _check_consistency(config) -> None:
    """--mode=consistency's section (consistency.sets names the sweep whose sets it condenses)."""
    if "consistency" not in config:
        return
    _positive_ints(config.consistency, "consistency.", ["max_k", "feature_epochs"])
    _require(isinstance(config.consistency.sets, str) and config.consistency.sets.strip(),
             f"consistency.sets must name a sweep, got {config.consistency.sets!r}")
    _require(config.consistency.sets in sweep_table.SWEEPS,
             f"consistency.sets: unknown sweep {config.consistency.sets!r}; valid: {', '.join(sweep_table.SWEEPS)}")


def _check_sweep(config) -> None:
    """--mode=sweep's section (its cells are checked against the sweep the mode runs: consistency
    takes them from consistency.sets' sweep)."""
    if "sweep" not in config:
        return
    sw = config.sweep
    _require(isinstance(sw.name, str) and sw.name.strip(), f"sweep.name must name a sweep, got {sw.name!r}")
    _require(sw.name in sweep_table.SWEEPS,
             f"sweep.name: unknown sweep {sw.name!r}; valid: {', '.join(sweep_table.SWEEPS)}")
    _nonnegative_int(sw.iterations, "sweep.iterations", "0 = idm.iterations")
    _require(isinstance(sw.cells, str), f"sweep.cells must be comma-separated cell names, got {sw.cells!r}")


def _check_baseline(config) -> None:
    """--mode=baseline's section."""
    if "baseline" not in config:
        return
    _require(config.baseline.method in coresets.BASELINES,
             f"baseline.method must be one of {coresets.BASELINES}, got {config.baseline.method!r}")
    _positive_ints(config.baseline, "baseline.", ["train_epochs"])


def _check_table1(config) -> None:
    """--mode=table1's section: its cell, method and order lists and paces (idm_jax/table1_plan.py),
    and its numbers."""
    if "table1" not in config:
        return
    t1 = config.table1
    table1_plan.plan(table1_plan.parse_cells(t1.cells), table1_plan.parse_methods(t1.methods), t1.order)
    table1_plan.parse_paces(t1.pace)
    _require(isinstance(t1.iterations, int) and t1.iterations >= 1,
             f"table1.iterations must be an integer >= 1, got {t1.iterations!r}")
    for name in ("budget_s", "tune_s", "startup_s", "eval_s", "export_max_mb"):
        _require(t1[name] >= 0, f"table1.{name} must be >= 0 (0 = off), got {t1[name]!r}")
    _require(isinstance(t1.export_max_files, int) and t1.export_max_files >= 0,
             f"table1.export_max_files must be an integer >= 0 (0 = no cap), got {t1.export_max_files!r}")
    _require(t1.export_max_files != 1, "table1.export_max_files=1 leaves no room beside the temporary "
             "of a file being written; give 2 or more (0 = no cap)")
