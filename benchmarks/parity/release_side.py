"""The authors' release, driven on idm_jax's arrays. Runs in a Python that has torch (not idm_jax).

    release_side.py condense --release=DIR --data=ROOT/data.npz --out=ROOT/release --ipc=10 --budgets=0,10,25,50
    release_side.py evaluate --release=DIR --data=ROOT/data.npz --synthetic=SET.npz --epochs=100 --seeds=3 \
        --out=ROOT/release_eval.json

`condense` runs the release's own IDM_<dataset>.py unchanged, with the published command's flags
for the setting (evaluation off, one experiment, as many iterations as the largest budget). Two
stand-ins of ours are installed from outside before it starts:

* its dataset loader (`utils.get_dataset`) returns tensors made from the same uint8 arrays
  idm_jax trains on (data.npz, written by benchmarks/release_parity.py), scaled to [0, 1] and
  normalized exactly as torchvision's ToTensor + Normalize do;
* `torch.optim.SGD` is wrapped so that the optimizer of the synthetic images records them: at
  construction (the init, budget 0) and after every `budget * classes` per-class steps (the
  release takes one step per class per iteration), and times every iteration.

Each snapshot is written at once (snap_<budget>.npz: images f32[N, C, H, W] normalized, labels),
then timings.json (seconds of every iteration, peak resident memory, torch version).

`evaluate` scores one synthetic.npz (idm_jax's format) with the release's own `evaluate_synset`
(and its partition/expansion) so the two evaluators can be compared on one set.

The numpy helpers at the top import no torch: the test suite checks them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import runpy
import sys
import time

import numpy as np

SCRIPTS = {"CIFAR10": "IDM_cifar10.py", "CIFAR100": "IDM_cifar100.py"}

# The published commands (the release's command.txt) for CIFAR-10/100: flags common to every IPC,
# then the per-IPC extras. Evaluation is switched off by the runner (eval_interval > Iteration).
COMMON_FLAGS = [
    "--model", "ConvNet", "--dsa_strategy", "color_crop_cutout_flip_scale_rotate", "--init", "real",
    "--lr_img", "0.2", "--num_eval", "5", "--net_train_real", "--outer_loop", "1",
    "--mismatch_lambda", "0", "--net_decay", "--embed_last", "1000", "--syn_ce", "--train_net_num", "1",
    "--aug",
]
PER_IPC_FLAGS = {
    ("CIFAR10", 1): ["--ce_weight", "0.5", "--batch_real", "5000", "--net_generate_interval", "5"],
    ("CIFAR10", 10): ["--ce_weight", "0.5"],
    ("CIFAR10", 50): ["--ce_weight", "0.1"],
    ("CIFAR100", 1): ["--ce_weight", "0.5", "--batch_real", "5000", "--net_generate_interval", "5"],
    ("CIFAR100", 10): ["--ce_weight", "0.1", "--model_train_steps", "50", "--net_num", "100"],
    ("CIFAR100", 50): ["--ce_weight", "0.1"],
}


def release_argv(dataset: str, ipc: int, budgets: list[int]) -> list[str]:
    """Command-line flags for the release: the published ones, one experiment, max(budgets) updates.

    The release's loop runs iterations 0..Iteration inclusive, so Iteration = max(budgets) - 1
    gives max(budgets) synthetic updates; evaluation never triggers (eval_interval > Iteration).
    """
    if (dataset, ipc) not in PER_IPC_FLAGS:
        raise SystemExit(f"no published command for dataset {dataset!r} at IPC {ipc}; "
                         f"known: {sorted(PER_IPC_FLAGS)}")
    iterations = max(max(budgets) - 1, 0)
    return (["--dataset", dataset, "--ipc", str(ipc), *COMMON_FLAGS, *PER_IPC_FLAGS[(dataset, ipc)],
             "--num_exp", "1", "--Iteration", str(iterations), "--eval_interval", str(iterations + 1000)])


def to_release_layout(images_uint8: np.ndarray, mean, std) -> np.ndarray:
    """uint8[N, H, W, C] -> f32[N, C, H, W]: /255 then (x - mean) / std per channel (ToTensor + Normalize)."""
    x = np.asarray(images_uint8, np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def budget_reached(class_steps: int, num_classes: int, budgets: list[int]) -> int | None:
    """The budget completed by the `class_steps`-th per-class step, if any (release: 1 step per class)."""
    if class_steps % num_classes:
        return None
    done = class_steps // num_classes
    return done if done in budgets else None


def load_arrays(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def write_json(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ----------------------------------------------------------------------------------------------
# torch side

def _tensor_datasets(arrays: dict[str, np.ndarray]):
    import torch  # pylint: disable=g-import-not-at-top

    class Dataset(torch.utils.data.TensorDataset):
        classes = [str(n) for n in arrays["class_names"]]

    def make(split):
        x = torch.from_numpy(to_release_layout(arrays[f"{split}_images"], arrays["mean"], arrays["std"]))
        return Dataset(x, torch.from_numpy(arrays[f"{split}_labels"].astype(np.int64)))

    return make("train"), make("test")


def provide_removed_scipy_module() -> None:
    """The release imports `rotate` from scipy.ndimage.interpolation, a namespace SciPy deprecates
    (still there in 1.17) in favour of scipy.ndimage.rotate. If the installed SciPy has dropped it,
    the name points at scipy.ndimage, so the release's files still run unchanged."""
    try:
        import scipy.ndimage.interpolation  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
        import scipy.ndimage  # pylint: disable=g-import-not-at-top

        sys.modules["scipy.ndimage.interpolation"] = scipy.ndimage


def install_dataset_adapter(release_utils, arrays: dict[str, np.ndarray]) -> None:
    """Replaces the release's `utils.get_dataset` with one that serves `arrays`."""
    import torch  # pylint: disable=g-import-not-at-top

    def get_dataset(dataset, data_path, batch_size=1, subset=None, args=None):
        del dataset, data_path, batch_size, subset, args
        dst_train, dst_test = _tensor_datasets(arrays)
        testloader = torch.utils.data.DataLoader(dst_test, batch_size=256, shuffle=False, num_workers=0)
        num_classes = len(dst_train.classes)
        channel, height, width = dst_train.tensors[0].shape[1:]
        class_map = {c: c for c in range(num_classes)}
        return (int(channel), (int(height), int(width)), num_classes, list(dst_train.classes),
                [float(m) for m in arrays["mean"]], [float(s) for s in arrays["std"]], dst_train,
                dst_test, testloader, None, class_map, class_map)

    release_utils.get_dataset = get_dataset


class InitOnly(Exception):
    """Raised once the init is recorded when budget 0 is the only budget."""


class Recorder:
    """Snapshots the synthetic images at budgets and times iterations (see the module docstring)."""

    def __init__(self, out: str, num_classes: int, num_images: int, budgets: list[int], on_snapshot=None):
        self.out, self.num_classes, self.num_images, self.budgets = out, num_classes, num_images, budgets
        self.on_snapshot = on_snapshot  # e.g. writes the timings so far, for a run cut short
        self.tensor = None
        self.labels = None
        self.class_steps = 0
        self.iteration_starts: list[float] = []

    def is_synthetic(self, params) -> bool:
        return (self.tensor is None and len(params) == 1 and getattr(params[0], "ndim", 0) == 4
                and params[0].shape[0] == self.num_images)

    def attach(self, tensor) -> None:
        self.tensor = tensor
        self._snapshot(0)
        if max(self.budgets) == 0:
            raise InitOnly  # nothing more to record: stop the release before its first iteration

    def before_step(self) -> None:
        if self.class_steps % self.num_classes == 0:
            self.iteration_starts.append(time.perf_counter())

    def after_step(self) -> None:
        self.class_steps += 1
        budget = budget_reached(self.class_steps, self.num_classes, self.budgets)
        if budget is not None:
            self._snapshot(budget)

    def _snapshot(self, budget: int) -> None:
        if budget not in self.budgets:
            return
        images = self.tensor.detach().cpu().numpy().astype(np.float32)
        ipc = self.num_images // self.num_classes
        labels = np.repeat(np.arange(self.num_classes), ipc).astype(np.int32)  # the release's order
        path = os.path.join(self.out, f"snap_{budget}.npz")
        with open(path + ".tmp", "wb") as f:
            np.savez(f, images_nchw=images, labels=labels, budget=np.asarray(budget))
        os.replace(path + ".tmp", path)
        print(f"[parity] release snapshot after {budget} iterations -> {path}", flush=True)
        if self.on_snapshot is not None:
            self.on_snapshot()

    def iteration_seconds(self, end: float) -> list[float]:
        starts = self.iteration_starts + [end]
        return [b - a for a, b in zip(starts[:-1], starts[1:])]


def install_recorder(torch, recorder: Recorder) -> None:
    """Wraps torch.optim.SGD so the synthetic images' optimizer reports to `recorder`."""
    base = torch.optim.SGD

    class RecordingSGD(base):
        def __init__(self, params, *args, **kwargs):
            params = list(params)
            self._record = recorder.is_synthetic(params)
            super().__init__(params, *args, **kwargs)
            if self._record:
                recorder.attach(params[0])

        def step(self, closure=None):
            if self._record:
                recorder.before_step()
            out = super().step(closure)
            if self._record:
                recorder.after_step()
            return out

    torch.optim.SGD = RecordingSGD


def condense(args) -> None:
    import torch  # pylint: disable=g-import-not-at-top

    budgets = sorted({int(b) for b in args.budgets.split(",")})
    arrays = load_arrays(args.data)
    num_classes = len(arrays["class_names"])
    os.makedirs(args.out, exist_ok=True)
    workdir = os.path.join(args.out, "work")  # the release writes result/, data/, checkpoints/ here
    os.makedirs(workdir, exist_ok=True)
    release = os.path.abspath(args.release)
    sys.path.insert(0, release)
    provide_removed_scipy_module()
    import utils as release_utils  # noqa: E402  # pylint: disable=g-import-not-at-top

    install_dataset_adapter(release_utils, arrays)
    argv = release_argv(args.dataset, args.ipc, budgets)
    start = time.perf_counter()

    def write_timings(complete: bool) -> None:
        end = time.perf_counter()
        # Until the run ends, only iterations that a snapshot closed are whole.
        seconds = recorder.iteration_seconds(end)
        write_json(os.path.join(args.out, "timings.json"), {
            "implementation": "release", "dataset": args.dataset, "ipc": args.ipc, "budgets": budgets,
            "complete": complete, "iteration_seconds": seconds if complete else seconds[:-1] or seconds,
            "total_seconds": end - start, "peak_rss_gib": peak_rss_gib(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads(), "argv": argv, "host": platform.processor() or platform.machine()})

    recorder = Recorder(args.out, num_classes, num_classes * args.ipc, budgets,
                         on_snapshot=lambda: write_timings(complete=False))
    install_recorder(torch, recorder)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    script = os.path.join(release, SCRIPTS[args.dataset])
    print("[parity] running", script, " ".join(argv), flush=True)
    cwd = os.getcwd()
    os.chdir(workdir)
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
    except InitOnly:
        pass
    finally:
        os.chdir(cwd)
    write_timings(complete=True)


def evaluate(args) -> None:
    import torch  # pylint: disable=g-import-not-at-top

    release = os.path.abspath(args.release)
    sys.path.insert(0, release)
    provide_removed_scipy_module()
    import dc_utils  # noqa: E402  # pylint: disable=g-import-not-at-top

    arrays = load_arrays(args.data)
    with np.load(args.synthetic, allow_pickle=False) as f:
        pixels, labels, factor = f["images"], f["labels"], int(f["partition_factor"])
    images = (pixels - arrays["mean"].astype(np.float32)) / arrays["std"].astype(np.float32)
    images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    labels = torch.from_numpy(labels.astype(np.int64))
    if factor == 2:
        images, labels = dc_utils.number_sign_augment(images, labels)
    elif factor != 1:
        raise SystemExit(f"the release's evaluator expands l = 2 only, got partition_factor {factor}")
    _, dst_test = _tensor_datasets(arrays)
    testloader = torch.utils.data.DataLoader(dst_test, batch_size=256, shuffle=False, num_workers=0)
    ns = argparse.Namespace(
        lr_net=0.01, epoch_eval_train=args.epochs, batch_train=256, dsa=True,
        dsa_strategy="color_crop_cutout_flip_scale_rotate", dsa_param=dc_utils.ParamDiffAug(),
        device="cuda" if torch.cuda.is_available() else "cpu", dataset=args.dataset)
    channel, height, width = images.shape[1:]
    # Time the test pass apart, so seconds per training pass compare with idm_jax's evaluator.
    test_seconds = [0.0]
    release_epoch = dc_utils.epoch

    def timed_epoch(mode, *a, **k):
        start = time.perf_counter()
        out = release_epoch(mode, *a, **k)
        if mode == "test":
            test_seconds[0] += time.perf_counter() - start
        return out

    dc_utils.epoch = timed_epoch
    accuracies, seconds = [], []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        net = dc_utils.get_network(args.model, int(channel), len(arrays["class_names"]), (int(height), int(width)))
        start = time.perf_counter()
        test_seconds[0] = 0.0
        _, _, acc = dc_utils.evaluate_synset(seed, net, images, labels, testloader, ns)
        seconds.append(time.perf_counter() - start - test_seconds[0])
        accuracies.append(100.0 * float(acc))
    write_json(args.out, {
        "evaluator": "release", "synthetic": os.path.abspath(args.synthetic), "epochs": args.epochs,
        "accuracies": accuracies, "mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)),
        "num_train_images": int(images.shape[0]), "seconds": seconds,  # training only, test pass apart
        "seconds_per_pass": [s / (args.epochs + 1) for s in seconds], "torch": torch.__version__})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("condense", "evaluate"):
        p = sub.add_parser(name)
        p.add_argument("--release", required=True, help="checkout of github uitrbn/IDM")
        p.add_argument("--data", required=True, help="data.npz written by release_parity.py")
        p.add_argument("--dataset", default="CIFAR10", choices=sorted(SCRIPTS))
        p.add_argument("--out", required=True)
        p.add_argument("--seed", type=int, default=0)
    sub.choices["condense"].add_argument("--ipc", type=int, default=10)
    sub.choices["condense"].add_argument("--budgets", default="0,10,25,50")
    sub.choices["evaluate"].add_argument("--synthetic", required=True)
    sub.choices["evaluate"].add_argument("--epochs", type=int, default=1000)
    sub.choices["evaluate"].add_argument("--seeds", type=int, default=5)
    sub.choices["evaluate"].add_argument("--model", default="ConvNet")
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.release, SCRIPTS[args.dataset])):
        raise SystemExit(f"--release={args.release!r} holds no {SCRIPTS[args.dataset]}: "
                         "point it at a checkout of github uitrbn/IDM")
    if args.command == "condense":
        condense(args)
    else:
        evaluate(args)


if __name__ == "__main__":
    main()
