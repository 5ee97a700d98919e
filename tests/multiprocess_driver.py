"""One process of a multi-process test run (tests/test_multiprocess.py starts several).

  python tests/multiprocess_driver.py PROCESS_ID NUM_PROCESSES PORT WORKDIR STEPS [AT_END]

Joins the others on localhost:PORT (CPU devices, gloo collectives), then condenses
helpers.tiny_config(iterations=4) in WORKDIR with run_condensation(max_steps=k) for each
k of STEPS (e.g. "1,3": one iteration, then resume for three more); after each call process 0
copies synthetic.npz to synthetic_<step>.npz. AT_END=1 evaluates at the end.
"""

import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def main(argv):
    pid, count, port, workdir, steps = int(argv[1]), int(argv[2]), argv[3], argv[4], argv[5]
    at_end = len(argv) > 6 and argv[6] == "1"
    from idm_jax import distributed  # pylint: disable=g-import-not-at-top
    distributed.initialize("on", f"localhost:{port}", count, pid, wait_s=60)
    import jax  # pylint: disable=g-import-not-at-top
    from helpers import tiny_config  # pylint: disable=g-import-not-at-top
    from idm_jax import runner  # pylint: disable=g-import-not-at-top
    c = tiny_config(iterations=4)
    c.eval.at_end = at_end
    for k in (int(x) for x in steps.split(",")):
        summary = runner.run_condensation(c, workdir, max_steps=k)
        if jax.process_index() == 0:
            shutil.copy(os.path.join(workdir, "synthetic.npz"),
                        os.path.join(workdir, f"synthetic_{summary['step']}.npz"))
    print(f"DONE process {jax.process_index()} of {jax.process_count()}", flush=True)


if __name__ == "__main__":
    main(sys.argv)
