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
from idm_jax import presets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------- #
# Configs
# --------------------------------------------------------------------------- #


# The tiny digits setting (configs/quick.py made small): ConvNet-D2 on 16x16 digits, small
# batches, a 2-epoch evaluation of 2 networks. Its step compiles in seconds, once for every test
# file that uses it (make_step is cached per settings).
TINY = {
    "idm.batch_real": 8,
    "idm.batch_train": 16,
    "idm.model_train_steps": 2,
    "idm.net_num": 4,
    "idm.net_generate_interval": 2,
    "idm.meter_reset_interval": 3,
    "log_every": 1,
    "checkpoint_every": 2,
    "eval.epochs": 2,
    "eval.num_seeds": 2,
    "eval.test_batch_size": 364,
    "eval.compare_random": False,  # the quick demo's Random line is tested in test_integration.py
    "eval.scores": False,  # DD-Ranking's references and scores are tested in test_yardstick.py
}
NO_FINAL_EVAL = {"eval.at_end": False}  # for runs whose final evaluation is not what a test is about


def tiny_config(iterations=4, arg="1", sets=None):
    """The one config builder of the tests: configs/quick.py:<arg> with TINY, idm.iterations =
    `iterations` (None: quick's own), then `sets` ({"eval.at_end": False, ...}), each applied by
    presets.set_dotted, the one dotted-key setter (a misspelt key fails)."""
    c = quick.get_config(arg)
    fields = {**TINY, **({} if iterations is None else {"idm.iterations": iterations}), **(sets or {})}
    for key, value in fields.items():
        presets.set_dotted(c, key, value)
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
