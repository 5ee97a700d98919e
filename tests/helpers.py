"""What several test files share: small configs, the command line, run folders, processes.

Imported as `from helpers import ...` (pytest puts tests/ on the path; so does
tests/multiprocess_driver.py).
"""

import hashlib
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np

from configs import quick

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------- #
# Configs
# --------------------------------------------------------------------------- #


def tiny_config(iterations=4, arg="1"):
    c = quick.get_config(arg)
    c.idm.iterations = iterations
    c.idm.batch_real = 8
    c.idm.batch_train = 16
    c.idm.model_train_steps = 2
    c.idm.net_num = 4
    c.idm.net_generate_interval = 2
    c.idm.meter_reset_interval = 3
    c.log_every = 1
    c.checkpoint_every = 2
    c.eval.epochs = 2
    c.eval.num_seeds = 2
    c.eval.test_batch_size = 364
    c.eval.compare_random = False  # the quick demo's Random line is tested in test_integration.py
    c.eval.scores = False  # DD-Ranking's references and scores are tested in test_yardstick.py
    return c

def fast_config(iterations=4, **fields):
    """tiny_config without the final evaluation (not what these tests are about)."""
    c = tiny_config(iterations)
    c.eval.at_end = False
    for key, value in fields.items():
        section, _, leaf = key.rpartition("__")
        (c[section] if section else c)[leaf] = value
    return c


# --------------------------------------------------------------------------- #
# A run's folder
# --------------------------------------------------------------------------- #


def snapshot(folder) -> dict[str, str]:
    """{relative path: sha256} of every file under folder (directories included as entries)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder) + "/"] = "dir"
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out

def metric_steps(workdir) -> list[int]:
    return [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]

def synthetic_images(workdir) -> np.ndarray:
    with np.load(os.path.join(workdir, "synthetic.npz")) as f:
        return f["images_normalized"]


# --------------------------------------------------------------------------- #
# The command line and other processes
# --------------------------------------------------------------------------- #

TINY_FLAGS = ["--config=configs/quick.py:1", "--config.idm.iterations=8", "--config.log_every=1",
              "--config.checkpoint_every=1", "--config.eval.at_end=False",
              "--config.idm.batch_real=8", "--config.idm.batch_train=16",
              "--config.idm.model_train_steps=2", "--config.idm.net_num=4",
              "--config.idm.net_generate_interval=2", "--config.idm.meter_reset_interval=3"]


def run_main(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def compile_cache_env(cache_dir):
    env = dict(os.environ)
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_PLATFORMS="cpu")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def single_process_env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    for k in [k for k in env if k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM_PROC",
                                              "JAX_PROCESS_ID", "TPU_WORKER"))]:
        env.pop(k)
    return env


def launch(commands, timeout):
    """Starts every command at once; returns [(returncode, stdout, stderr)], killing all on timeout."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=single_process_env(), cwd=REPO) for cmd in commands]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


# --------------------------------------------------------------------------- #
# GPU jobs (benchmarks/gpu_check.sh)
# --------------------------------------------------------------------------- #

OUT_NAME = re.compile(r"[A-Za-z0-9._-]+")  # what the device tool brings back by name


def assert_out_comes_back_whole(out):
    """$OUT as the device brings it back: <= 8 files of <= 16 MiB, <= 2 folders down, plain names."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    for p in out.rglob("*"):
        rel = p.relative_to(out)
        assert all(OUT_NAME.fullmatch(part) for part in rel.parts), rel
        if p.is_file():
            assert len(rel.parts) <= 3 and p.stat().st_size <= 16 * 2**20, (rel, p.stat().st_size)
