"""The installed package stands alone: a wheel (not editable) in a fresh venv runs a mode from
outside the checkout, with only a user's copy of main.py and configs/ beside it.

The sweep and continual modes once imported `configs.base`, which the wheel does not ship; they
now take the DM preset from idm_jax/presets.py. Slow (a wheel build and a tiny sweep cell).
"""

import os
import shutil
import subprocess
import sys

import jax
import pytest

from helpers import REPO

pytestmark = pytest.mark.slow


def _run(cmd, cwd, timeout=600, env=None):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh venv holding the idm_jax wheel, a folder outside the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources it builds.
    source = tmp / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "runs", "__pycache__", ".carry", ".whl", ".gl"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(source)], cwd=tmp)
    (wheel,) = [f for f in os.listdir(tmp / "dist") if f.endswith(".whl")]
    _run([sys.executable, "-m", "venv", str(tmp / "venv")], cwd=tmp)
    python = str(tmp / "venv" / "bin" / "python")
    # The dependencies come from this environment's site-packages, added as a plain path: its
    # .pth files (among them the editable install of the checkout) are not processed.
    deps = os.path.dirname(os.path.dirname(jax.__file__))
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip()
    with open(os.path.join(site, "deps_of_the_test.pth"), "w") as f:
        f.write(deps + "\n")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(tmp / "dist" / wheel)], cwd=tmp)
    user = tmp / "user"  # a user's own copy of the scripts; the checkout is not on the path
    user.mkdir()
    shutil.copy(os.path.join(REPO, "main.py"), user / "main.py")
    shutil.copytree(os.path.join(REPO, "configs"), user / "configs")
    return python, user


def test_the_wheel_holds_the_package_and_no_checkout_is_reachable(installed):
    python, user = installed
    out = _run([python, "-c", "import idm_jax, idm_jax.presets as p; print(idm_jax.__file__); "
                "print(p.METHODS); import importlib.util as u; print(u.find_spec('tests'))"], cwd=user)
    where, methods, tests = out.stdout.split("\n")[:3]
    assert "site-packages" in where and not where.startswith(REPO), where
    assert methods == "('idm', 'dm')" and tests == "None"


def test_a_sweep_mode_runs_from_outside_the_checkout(installed):
    python, user = installed
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = _run([python, "main.py", "--config=configs/quick.py:1", "--mode=sweep", f"--workdir={user}/sweep",
                "--config.sweep.name=table2", "--config.sweep.cells=DM", "--config.sweep.iterations=2",
                "--config.eval.epochs=2", "--config.eval.num_seeds=1", "--config.idm.batch_real=8",
                "--config.eval.compare_random=False", "--config.checkpoint_every=0"], cwd=user, env=env)
    assert os.path.isfile(user / "sweep" / "sweep.json"), out.stderr[-2000:]
