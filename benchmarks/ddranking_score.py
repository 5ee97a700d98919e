"""Score an exported idm_jax set with DD-Ranking's own evaluator (pip `ddranking` 0.2.0), offline.

Two steps, in two Python environments (DD-Ranking needs torch; idm_jax does not):

  # 1. with idm_jax: CIFAR-10 from the archive idm_jax reads, in the layout torchvision's CIFAR10 reads
  python benchmarks/ddranking_score.py cifar --config=configs/cifar10.py --out=/tmp/ddr_data
  # 2. with torch, torchvision and ddranking installed: the export of `main.py --mode=export`
  python benchmarks/ddranking_score.py score --export=runs/c10_export --data=/tmp/ddr_data --ipc=1 \
      --epochs=10 --num_eval=1 --out=runs/c10_export/ddranking_scores

`score` builds DD-Ranking's `LabelRobustScoreHard` (CIFAR10, ConvNet-3, DSA with DSA's parameters,
the set's own learning rate --syn_lr as the release trains; DD-Ranking searches 5 learning rates for the
random-real reference whatever is given) and calls its `compute_metrics` on `ddranking/images.npy` and
`labels.npy`, with the hard labels passed (a partitioned set holds l x l x IPC images per class).
Two things of ddranking 0.2.0 are worked around, nothing else is changed:

* torchvision checks the md5 of the original CIFAR pickles; ours are written from the same images
  (decoded from the archive), so its check is replaced by "the file exists";
* its compute_metrics appends each LRS twice, so its save_results (a pandas DataFrame of unequal
  columns) fails after all the training; the list written is every second entry (the mean and std it
  returns are unaffected: each value appears twice).

CIFAR-10 has no cached whole-data accuracy in DD-Ranking (only ImageNet-1K and TinyImageNet), so
`eval_full_data` is on: it trains on the whole training set for --epochs epochs with its
REAL_DATA_TRAINING_CONFIG optimizer (lr 0.01, step scheduler). It tests every 10 epochs and keeps the
best: --epochs must be at least 10. Writes <out>/scores.json (what DD-Ranking returned, the LRS
recomputed on fractions beside it, the settings and versions) and DD-Ranking's obj_scores.csv.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

# DSA's parameters (VICO-UoE/DatasetCondensation ParamDiffAug), as DD-Ranking's DM/CIFAR-10 configs give them.
DSA_PARAMS = {"prob_flip": 0.5, "ratio_scale": 1.2, "ratio_rotate": 15.0, "ratio_crop_pad": 0.125,
              "ratio_cutout": 0.5, "brightness": 1.0, "saturation": 2.0, "contrast": 0.5}
# ddranking 0.2.0's DSA reads these names.
DDRANKING_DSA = {"flip": DSA_PARAMS["prob_flip"], "scale": DSA_PARAMS["ratio_scale"],
                 "rotate": DSA_PARAMS["ratio_rotate"], "crop": DSA_PARAMS["ratio_crop_pad"],
                 "cutout": DSA_PARAMS["ratio_cutout"], "brightness": DSA_PARAMS["brightness"],
                 "saturation": DSA_PARAMS["saturation"], "contrast": DSA_PARAMS["contrast"]}
MIN_EPOCHS = 10  # DD-Ranking tests every 10 epochs; fewer never test and report 0 %
# The accuracies compute_metrics logs (it returns only HLR, IOR and LRS), one of each per evaluation.
ACCURACY_LINE = re.compile(r"^(Syn|Full|Random) data hard label acc: ([0-9.]+)%")


def write_cifar(args) -> None:
    """Step 1 (idm_jax's environment): config.data's CIFAR-10/100 in torchvision's layout."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import numpy as np  # pylint: disable=g-import-not-at-top
    from idm_jax import config_files, data, export  # pylint: disable=g-import-not-at-top

    ds = data.load_config_dataset(config_files.load_config_file(*config_files.split_config_value(args.config)))

    def subset(labels, per_class):
        if not per_class:
            return np.arange(len(labels))
        return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(ds.num_classes)])

    train = subset(ds.train_labels, args.train_per_class)
    test = subset(ds.test_labels, args.test_per_class)
    folder = export.write_torchvision_cifar(args.out, np.asarray(ds.train_images[train]),
                                                 ds.train_labels[train], np.asarray(ds.test_images[test]),
                                                 ds.test_labels[test], ds.class_names)
    print(f"wrote {len(train)} train and {len(test)} test images of {ds.name} to {folder}")


def lrs_of_fractions(hlr_pp: float, ior_pp: float, w: float = 0.5) -> float:
    """The paper's LRS, on fractions (idm_jax.yardstick.lrs, restated: this step runs without idm_jax)."""
    a = w * ior_pp / 100.0 - (1.0 - w) * hlr_pp / 100.0
    return (math.exp(a) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def accuracies_of(lines) -> dict[str, list[float]]:
    """{"syn", "full", "random": [accuracy (%) per evaluation]} from DD-Ranking's log lines."""
    found: dict[str, list[float]] = {"syn": [], "full": [], "random": []}
    for line in lines:
        match = ACCURACY_LINE.match(str(line))
        if match:
            found[match[1].lower()].append(float(match[2]))
    return found


def score(args) -> dict:
    """Step 2 (DD-Ranking's environment): its LabelRobustScoreHard on the export."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    import torchvision  # pylint: disable=g-import-not-at-top
    import ddranking  # pylint: disable=g-import-not-at-top
    from importlib.metadata import version  # pylint: disable=g-import-not-at-top
    from ddranking.metrics import hard_label  # pylint: disable=g-import-not-at-top
    from ddranking.utils import misc  # pylint: disable=g-import-not-at-top
    from torchvision.datasets import cifar  # pylint: disable=g-import-not-at-top

    if args.epochs < MIN_EPOCHS:
        raise SystemExit(f"error: --epochs={args.epochs}: DD-Ranking tests every {MIN_EPOCHS} epochs, so it "
                         f"needs at least {MIN_EPOCHS}")
    cifar.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)  # our pickles are not the originals
    hard_label.save_results = lambda results, path: misc.save_results(
        {**results, "lrs": results["lrs"][::2]}, path)  # it appends each LRS twice
    logged = []
    hard_label.logging = lambda message: (logged.append(message), misc.logging(message))  # keep the accuracies
    torch.set_num_threads(args.threads)

    images = torch.from_numpy(np.load(os.path.join(args.export, "ddranking", "images.npy")))
    labels = torch.from_numpy(np.load(os.path.join(args.export, "ddranking", "labels.npy")))
    with open(os.path.join(args.export, "export.json")) as f:
        exported = json.load(f)
    os.makedirs(args.out, exist_ok=True)
    evaluator = hard_label.LabelRobustScoreHard(
        dataset=args.dataset, real_data_path=args.data, ipc=args.ipc, model_name="ConvNet-3",
        data_aug_func="dsa", aug_params=dict(DDRANKING_DSA), optimizer="sgd", lr_scheduler="step",
        step_size=args.step_size or max(1, args.epochs // 2), weight_decay=0.0005, momentum=0.9,
        num_eval=args.num_eval, im_size=(32, 32), num_epochs=args.epochs, real_batch_size=args.real_batch_size,
        syn_batch_size=256, num_workers=0, save_path=os.path.join(args.out, "obj_scores.csv"),
        device=args.device, random_data_path=os.path.join(args.out, "random_data"), eval_full_data=True)
    start = time.time()
    got = evaluator.compute_metrics(image_tensor=images, hard_labels=labels, syn_lr=args.syn_lr)
    got = {k: float(v) for k, v in got.items()}
    record = {
        "ddranking": got,
        "accuracies": accuracies_of(logged),
        "lrs_of_fractions": lrs_of_fractions(got["hard_label_recovery_mean"], got["improvement_over_random_mean"]),
        "units": {"accuracies": "percent (best of the tests every 10 epochs)",
                  "hard_label_recovery_*, improvement_over_random_*": "percentage points",
                  "label_robust_score_*": "DD-Ranking's code: LRS of the percentages (floor -0.1565)",
                  "lrs_of_fractions": "LRS of the mean HLR and IOR as fractions, as idm_jax reports it"},
        "settings": {"dataset": args.dataset, "ipc": args.ipc, "images": int(images.shape[0]),
                     "epochs": args.epochs, "num_eval": args.num_eval, "syn_lr": args.syn_lr,
                     "step_size": args.step_size or max(1, args.epochs // 2), "real_batch_size": args.real_batch_size,
                     "eval_full_data": True, "model": "ConvNet-3", "augmentation": "dsa", "device": args.device,
                     "normalization": exported.get("ddranking", {}).get("normalization")},
        "versions": {"ddranking": version("ddranking"), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "python": sys.version.split()[0]},
        "seconds": time.time() - start,
        "export": os.path.abspath(args.export),
    }
    del ddranking
    with open(os.path.join(args.out, "scores.json"), "w") as f:
        json.dump(record, f, indent=2)
    print(json.dumps(record, indent=2))
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    c = sub.add_parser("cifar", help="write config.data's CIFAR-10/100 in torchvision's layout (idm_jax)")
    c.add_argument("--config", default="configs/cifar10.py", help="config file (its data section is read)")
    c.add_argument("--out", required=True, help="root folder: cifar-10-batches-py/ is written in it")
    c.add_argument("--train_per_class", type=int, default=0, help="first N train images per class (0: all)")
    c.add_argument("--test_per_class", type=int, default=0, help="first N test images per class (0: all)")
    s = sub.add_parser("score", help="DD-Ranking's LabelRobustScoreHard on an export (torch + ddranking)")
    s.add_argument("--export", required=True, help="the workdir of main.py --mode=export")
    s.add_argument("--data", required=True, help="the root written by the cifar step")
    s.add_argument("--dataset", default="CIFAR10", choices=["CIFAR10", "CIFAR100"])
    s.add_argument("--ipc", type=int, required=True, help="the stored IPC (the random-real reference's)")
    s.add_argument("--epochs", type=int, default=MIN_EPOCHS)
    s.add_argument("--num_eval", type=int, default=1)
    s.add_argument("--syn_lr", type=float, default=0.01, help="the set's learning rate (the release's 0.01)")
    s.add_argument("--step_size", type=int, default=0, help="epochs per lr step (0: half the epochs)")
    s.add_argument("--real_batch_size", type=int, default=256)
    s.add_argument("--device", default="cpu")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--out", required=True, help="folder for scores.json and DD-Ranking's files")
    args = parser.parse_args(argv)
    if args.step == "cifar":
        write_cifar(args)
    else:
        score(args)


if __name__ == "__main__":
    main()
