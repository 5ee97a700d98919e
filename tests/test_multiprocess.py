"""Several processes on jax.distributed (idm_jax.distributed): 2 processes on localhost, CPU.

Each process of a run is a subprocess (tests/multiprocess_driver.py or main.py) with one CPU
device, joined through a free localhost port with gloo collectives; every launch has a
timeout, so a broken rendezvous fails the test instead of hanging it.
"""

import json
import os
import sys

import jax
import numpy as np
import pytest

from idm_jax import data as data_lib
from idm_jax import condense, distributed
from idm_jax import evaluate
from helpers import free_port, launch, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "multiprocess_driver.py")


def main_py(*args):
    return [sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/quick.py", *args]


# ----------------------------------------------------------------------------
# Fast: the rendezvous fails clearly


def test_a_missing_process_fails_with_a_clear_error_not_a_hang(tmp_path):
    port = free_port()
    (rc, _, err), = launch([main_py(f"--workdir={tmp_path}", "--num_processes=2", "--process_id=0",
                                    f"--coordinator_address=localhost:{port}",
                                    "--distributed_timeout=5")], timeout=180)
    assert rc == 2, err[-2000:]
    assert "could not meet 2 processes at localhost:" in err, err[-2000:]
    assert "--num_processes" in err


def test_processes_started_with_different_counts_all_stop_with_one_error(tmp_path):
    port = free_port()
    common = [f"--workdir={tmp_path}", f"--coordinator_address=localhost:{port}",
              "--distributed_timeout=60"]
    results = launch([main_py(*common, "--num_processes=2", "--process_id=0"),
                      main_py(*common, "--num_processes=3", "--process_id=1")], timeout=240)
    for rc, _, err in results:
        assert rc == 2, err[-2000:]
        assert "different process counts [2, 3]" in err, err[-2000:]


def test_bad_distributed_settings_name_the_value(monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="'maybe'"):
        distributed.initialize("maybe")
    with pytest.raises(ValueError, match="process_id=2 is outside 0..1"):
        distributed.initialize("auto", "localhost:1", 2, 2)
    with pytest.raises(ValueError, match="num_processes must be >= 1.*-3"):
        distributed.initialize("auto", "", -3)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
        distributed.initialize("auto")


def test_one_process_is_left_alone(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("SLURM_", "OMPI_", "TPU_WORKER", "JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS_ID")):
            monkeypatch.delenv(k)
    assert not distributed.cluster_detected()
    assert distributed.initialize("auto") is False
    assert distributed.initialize("off", "localhost:1", 2, 0) is False
    assert distributed.initialize("auto", "localhost:1", 1, 0) is False  # one process: nothing to join
    assert distributed.is_main() and not distributed.multi_process()
    assert condense.class_mesh(1, 10) is None
    assert distributed.any_process(True) and not distributed.any_process(False)
    distributed.check_replicated({"a": np.ones(3)}, "anything")  # no-op
    assert distributed.gather_objects({"x": 1}) == [{"x": 1}]


def test_cluster_detection(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("SLURM_", "OMPI_", "TPU_WORKER")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not distributed.cluster_detected()  # srun -n 1: one process
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.cluster_detected()
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t0,t1")
    assert distributed.cluster_detected()


def test_checksums_see_any_difference():
    a = {"q": np.arange(6, dtype=np.float32), "k": np.asarray([1, 2], np.uint32)}
    b = {"q": np.arange(6, dtype=np.float32), "k": np.asarray([1, 3], np.uint32)}
    assert distributed.local_checksum(a) == distributed.local_checksum(jax.tree.map(np.copy, a))
    assert distributed.local_checksum(a) != distributed.local_checksum(b)


def test_evaluation_networks_are_dealt_round_robin_and_merged_in_seed_order():
    archs = ["ConvNet", "AlexNet"]
    shares = [evaluate.evaluation_tasks(archs, 3, p, 2) for p in range(2)]
    assert shares == [{"ConvNet": [0, 2], "AlexNet": [1]}, {"ConvNet": [1], "AlexNet": [0, 2]}]
    alone = evaluate.evaluation_tasks(archs, 3, 0, 1)
    assert alone == {"ConvNet": [0, 1, 2], "AlexNet": [0, 1, 2]}

    def part(arch, seeds):
        acc = [10.0 * s + (arch == "AlexNet") for s in seeds]
        return {"arch": arch, "accuracies": acc, "train_loss": acc, "train_accuracy": acc,
                "mean": 0.0, "std": 0.0, "num_seeds": len(seeds), "train_seconds": 1.0,
                "test_seconds": 0.5}

    parts = [{a: part(a, s) for a, s in share.items()} for share in shares]
    merged = evaluate.merge_evaluations(parts, shares, archs)
    assert merged["ConvNet"]["accuracies"] == [0.0, 10.0, 20.0]
    assert merged["AlexNet"]["accuracies"] == [1.0, 11.0, 21.0]
    assert merged["ConvNet"]["mean"] == pytest.approx(10.0)
    assert merged["ConvNet"]["std"] == pytest.approx(np.std([0.0, 10.0, 20.0]))
    assert merged["ConvNet"]["num_seeds"] == 3 and merged["ConvNet"]["train_seconds"] == 2.0


def test_a_share_of_the_seeds_trains_exactly_those_networks():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(20, 8, 8, 1)).astype(np.float32)
    labels = np.repeat(np.arange(10), 2)
    test_images = rng.integers(0, 255, (30, 8, 8, 1)).astype(np.uint8)
    test_labels = rng.integers(0, 10, 30)
    kw = dict(mean=np.zeros(1), std=np.ones(1), arch="ConvNetD2", num_classes=10,
              key=jax.random.PRNGKey(3), num_seeds=3, epochs=2, batch_size=8, dsa_strategy="")
    full = evaluate.train_and_evaluate(images, labels, test_images, test_labels, **kw)
    share = evaluate.train_and_evaluate(images, labels, test_images, test_labels, **kw,
                                        seed_indices=[2, 0])
    assert share["num_seeds"] == 2
    np.testing.assert_allclose(share["accuracies"], [full["accuracies"][2], full["accuracies"][0]])
    np.testing.assert_allclose(share["train_loss"], [full["train_loss"][2], full["train_loss"][0]],
                               rtol=1e-5)
    with pytest.raises(ValueError, match=r"seed_indices \[3\]"):
        evaluate.train_and_evaluate(images, labels, test_images, test_labels, **kw, seed_indices=[3])


# ----------------------------------------------------------------------------
# Slow: a whole 2-process condensation against one process


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """Two 2-process runs side by side: (resumed) 1 iteration + 3 more with the final
    evaluation, and (straight) 4 iterations; each process: one CPU device."""
    resumed = str(tmp_path_factory.mktemp("two_proc_resumed"))
    straight = str(tmp_path_factory.mktemp("two_proc_straight"))
    p1, p2 = free_port(), free_port()
    cmds = [[sys.executable, DRIVER, str(i), "2", str(p1), resumed, "1,3", "1"] for i in range(2)]
    cmds += [[sys.executable, DRIVER, str(i), "2", str(p2), straight, "4"] for i in range(2)]
    results = launch(cmds, timeout=1500)
    for rc, out, err in results:
        assert rc == 0 and "DONE process" in out, err[-3000:]
    return resumed, straight


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    from idm_jax import runner  # pylint: disable=g-import-not-at-top
    workdir = str(tmp_path_factory.mktemp("one_proc"))
    c = tiny_config(iterations=4)
    c.eval.at_end = False
    runner.run_condensation(c, workdir, max_steps=1)
    first = dict(np.load(os.path.join(workdir, "synthetic.npz")))
    runner.run_condensation(c, workdir)
    return first, dict(np.load(os.path.join(workdir, "synthetic.npz")))


def _images(workdir, step):
    return np.load(os.path.join(workdir, f"synthetic_{step}.npz"))["images_normalized"]


@pytest.mark.slow
def test_two_processes_match_one_process(two_process_runs, one_process_run):
    resumed, straight = two_process_runs
    first, last = one_process_run
    # Same tolerance policy as test_sharding: tight after one step, bounded drift later
    # (the programs order float sums differently; a ReLU near its kink can then flip).
    assert np.abs(_images(resumed, 1) - first["images_normalized"]).max() < 1e-5
    diff = np.abs(_images(straight, 4) - last["images_normalized"])
    assert (diff > 1e-4).mean() < 0.05 and diff.max() < 0.05, (diff.max(), (diff > 1e-4).mean())
    npz = np.load(os.path.join(straight, "synthetic.npz"))
    assert npz["labels"].tolist() == last["labels"].tolist()


@pytest.mark.slow
def test_two_process_resume_gives_the_uninterrupted_result(two_process_runs):
    resumed, straight = two_process_runs
    assert np.abs(_images(resumed, 4) - _images(straight, 4)).max() < 1e-5
    # Process 0 alone wrote the metrics: one row per iteration, no duplicates.
    with open(os.path.join(resumed, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]
    steps = sorted(int(d) for d in os.listdir(os.path.join(resumed, "checkpoints")) if d.isdigit())
    assert steps[-1] == 4


@pytest.mark.slow
def test_two_process_evaluation_spreads_the_networks_and_matches_one_process(two_process_runs):
    resumed, _ = two_process_runs
    with open(os.path.join(resumed, "results.json")) as f:
        results = json.load(f)
    arch = results["archs"]["ConvNetD2"]
    assert arch["num_seeds"] == 2 and arch["processes"] == 2  # one network on each process
    c = tiny_config(iterations=4)
    npz = np.load(os.path.join(resumed, "synthetic_4.npz"))
    ds = data_lib.load_config_dataset(c)
    alone = evaluate.evaluate_archs(npz["images_normalized"], npz["labels"], ds, c.eval,
                                    archs=["ConvNetD2"], key=jax.random.fold_in(jax.random.PRNGKey(c.seed), 4),
                                    partition_factor=int(npz["partition_factor"]))
    np.testing.assert_allclose(arch["accuracies"], alone["ConvNetD2"]["accuracies"], atol=1e-6)
