"""The TinyImageNet setting end to end on a tiny generated folder of the right shape.

3 classes of 64x64 JPEGs laid out as the usual train/<class>, val/<class> tree; the config is
configs/tinyimagenet.py with only the budgets shrunk, so the release's choices (ConvNet-3 on
64x64 with its 8192-value embedding, one-real-image init, ImageNet statistics) run for real.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import tinyimagenet
from idm_jax import condense
from idm_jax import synthetic_file
from idm_jax import runner


def _write_tree(root, classes=3, per_split=(6, 3), size=64):
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_split):
        for c in range(classes):
            folder = root / split / f"n0000000{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                base = np.zeros((size, size, 3), np.uint8) + np.uint8(60 * c + 20)  # class colour
                noise = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
                Image.fromarray(base + noise).save(folder / f"{i}.JPEG", quality=95)
    return root


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
    return _write_tree(tmp_path_factory.mktemp("tiny_imagenet"))


@pytest.mark.slow  # compiles several steps: 9-29 s on 2 cores (README, Test)
def test_tinyimagenet_runs_as_the_release_on_a_tiny_folder(tiny_tree, tmp_path):
    c = tinyimagenet.get_config("1")
    c.data.source = str(tiny_tree)
    c.data.cache_dir = str(tmp_path / "cache")
    c.idm.iterations = 2
    c.idm.batch_real, c.idm.batch_train, c.idm.model_train_steps, c.idm.net_num = 4, 8, 1, 4
    c.eval.epochs, c.eval.num_seeds, c.eval.test_batch_size = 1, 1, 9
    c.log_every = 1
    summary = runner.run_condensation(c, str(tmp_path / "run"))
    synset = synthetic_file.load_synthetic(summary["synthetic"])
    assert synset.images.shape == (3, 64, 64, 3) and synset.partition_factor == 2
    np.testing.assert_allclose(synset.mean, [0.485, 0.456, 0.406], rtol=1e-6)
    results = json.load(open(tmp_path / "run" / "results.json"))
    assert list(results["archs"]) == ["ConvNet"] and results["archs"]["ConvNet"]["num_train_images"] == 12
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    # The matching network: ConvNet-3 on 64x64, an 8192-value embedding (128 x 8 x 8).
    from idm_jax import data  # pylint: disable=g-import-not-at-top
    ds = data.load_config_dataset(c)
    s = condense.settings_from_config(c, ds)
    assert s.model_name == "ConvNet" and s.model.depth == 3
    import jax  # pylint: disable=g-import-not-at-top
    params = condense.make_init_fn(s)(jax.random.PRNGKey(0))[0]
    emb, _ = jax.eval_shape(condense.make_apply_fn(s.model), params,
                            jax.ShapeDtypeStruct((2, 64, 64, 3), np.float32))
    assert emb.shape == (2, 8192)
    # The release's TinyImageNet init: each synthetic image is one whole real image.
    init = condense.init_synset(s, ds, seed=0, init=c.idm.init)
    real = (ds.train_images / 255.0 - ds.mean) / ds.std
    for k in range(3):
        gap = np.abs(real[ds.train_labels == k] - np.asarray(init.images[k, 0])).max(axis=(1, 2, 3))
        assert gap.min() < 1e-5
    assert os.path.exists(tmp_path / "run" / "synthetic.png")
