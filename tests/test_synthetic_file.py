"""synthetic.npz format, PNG grid, results.json / results.md and the paper's numbers."""

import json
import os
import types

import numpy as np
import pytest
from PIL import Image

from idm_jax import synthetic_file
from idm_jax import results as results_lib

MEAN = np.array([0.5, 0.25, 0.125], np.float32)
STD = np.array([0.25, 0.5, 0.5], np.float32)
NAMES = ("cat", "dog")


def _set(n=4, h=5, w=6, c=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 2.0, (n, h, w, c)).astype(np.float32)  # leaves [0, 1] after denorm
    labels = np.arange(n, dtype=np.int32) % 2
    return images, labels


def _save(path, images, labels, **kw):
    args = dict(mean=MEAN, std=STD, class_names=NAMES, partition_factor=2, method="idm",
                dataset="cifar10", config_json='{"ipc": 2}')
    args.update(kw)
    return synthetic_file.save_synthetic(str(path), images, labels, **args)


def test_round_trip_is_exact(tmp_path):
    images, labels = _set()
    path = _save(tmp_path / "synthetic.npz", images, labels)
    s = synthetic_file.load_synthetic(path)
    np.testing.assert_array_equal(s.images_normalized, images)
    np.testing.assert_array_equal(s.labels, labels)
    assert s.labels.dtype == np.int32
    np.testing.assert_array_equal(s.mean, MEAN)
    np.testing.assert_array_equal(s.std, STD)
    # Pixel-space copy: denormalized then clipped to [0, 1].
    np.testing.assert_allclose(s.images, np.clip(images * STD + MEAN, 0, 1), rtol=0, atol=1e-7)
    assert s.images.min() == 0.0 and s.images.max() == 1.0  # the N(0, 2) values really were clipped
    assert s.class_names == NAMES
    assert (s.partition_factor, s.method, s.dataset, s.config_json) == (2, "idm", "cifar10", '{"ipc": 2}')
    assert s.image_shape == (5, 6, 3) and s.num_classes == 2 and s.ipc == 2


def test_the_recorded_config_is_flat_and_older_nested_ones_read_flat(tmp_path):
    from configs import quick

    c = quick.get_config("2")
    text = synthetic_file.config_json(c)
    flat = json.loads(text)  # one layout for every mode: {"idm.iterations": ..., "ipc": 2, ...}
    assert flat["ipc"] == 2 and flat["idm.iterations"] == c.idm.iterations and "idm" not in flat
    assert synthetic_file.recorded_config(text) == flat
    s = synthetic_file.load_synthetic(_save(tmp_path / "s.npz", *_set(), config_json=text))
    assert synthetic_file.recorded_config(s.config_json)["data.source"] == "digits"
    # A coreset set written before the layout was one: the config nested.
    assert synthetic_file.recorded_config('{"idm": {"iterations": 200}, "ipc": 1}') == {"idm.iterations": 200, "ipc": 1}
    assert synthetic_file.recorded_config("not json") == {} and synthetic_file.recorded_config("[1]") == {}


def test_images_normalized_falls_back_to_normalized_pixels(tmp_path):
    images, labels = _set()
    path = _save(tmp_path / "s.npz", images, labels)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != "images_normalized"}
    np.savez(tmp_path / "old.npz", **arrays)
    s = synthetic_file.load_synthetic(str(tmp_path / "old.npz"))
    pixels = np.clip(images * STD + MEAN, 0, 1)
    np.testing.assert_allclose(s.images_normalized, (pixels - MEAN) / STD, atol=1e-6)


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    images, labels = _set()
    path = _save(tmp_path / "synthetic.npz", images, labels)
    assert sorted(os.listdir(tmp_path)) == ["synthetic.npz"]

    def broken_savez(f, **arrays):
        f.write(b"PK half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path / "synthetic.npz", images * 0, labels)
    # The old file is intact and the half-written temporary is gone.
    assert sorted(os.listdir(tmp_path)) == ["synthetic.npz"]
    np.testing.assert_array_equal(synthetic_file.load_synthetic(path).images_normalized, images)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        synthetic_file.load_synthetic(str(tmp_path / "nope.npz"))


def test_random_bytes_and_truncated_files_are_named(tmp_path):
    bad = tmp_path / "garbage.npz"
    bad.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(ValueError, match="garbage.npz.*not a readable .npz"):
        synthetic_file.load_synthetic(str(bad))
    images, labels = _set()
    good = _save(tmp_path / "good.npz", images, labels)
    data = open(good, "rb").read()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.npz"):
        synthetic_file.load_synthetic(str(cut))


def _rewrite(tmp_path, name, **changes):
    """A valid file with some arrays replaced (None removes the key)."""
    images, labels = _set()
    src = _save(tmp_path / "src.npz", images, labels)
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    for k, v in changes.items():
        if v is None:
            del arrays[k]
        else:
            arrays[k] = v
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def test_missing_key_is_named(tmp_path):
    path = _rewrite(tmp_path, "nolabels.npz", labels=None)
    with pytest.raises(ValueError, match=r"nolabels.npz.*\['labels'\]"):
        synthetic_file.load_synthetic(path)


def test_wrongly_shaped_images(tmp_path):
    path = _rewrite(tmp_path, "flat.npz", images=np.zeros((4, 5, 6), np.float32),
                    images_normalized=None)
    with pytest.raises(ValueError, match=r"flat.npz.*4-D.*\(4, 5, 6\)"):
        synthetic_file.load_synthetic(path)


def test_label_count_mismatch(tmp_path):
    path = _rewrite(tmp_path, "labels.npz", labels=np.zeros(3, np.int32))
    with pytest.raises(ValueError, match=r"labels.npz.*labels shape \(3,\) for 4 images"):
        synthetic_file.load_synthetic(path)


def test_label_out_of_range_and_bad_partition(tmp_path):
    path = _rewrite(tmp_path, "range.npz", labels=np.array([0, 1, 2, 0], np.int32))
    with pytest.raises(ValueError, match=r"range.npz.*\[0, 2\)"):
        synthetic_file.load_synthetic(path)
    path = _rewrite(tmp_path, "part.npz", partition_factor=np.asarray(0))
    with pytest.raises(ValueError, match="part.npz.*partition_factor must be >= 1, got 0"):
        synthetic_file.load_synthetic(path)


def test_save_rejects_bad_input(tmp_path):
    images, labels = _set()
    with pytest.raises(ValueError, match="4-D"):
        _save(tmp_path / "a.npz", images[0], labels)
    with pytest.raises(ValueError, match="one label per image"):
        _save(tmp_path / "a.npz", images, labels[:3])
    with pytest.raises(ValueError, match="one value per channel"):
        _save(tmp_path / "a.npz", images, labels, mean=[0.5])
    with pytest.raises(ValueError, match="partition_factor"):
        _save(tmp_path / "a.npz", images, labels, partition_factor=0)
    assert not os.listdir(tmp_path)


def test_check_compatible_names_both_sides():
    images, labels = _set()
    s = synthetic_file.SyntheticSet(images=images, images_normalized=images, labels=labels, mean=MEAN,
                                    std=STD, class_names=NAMES, partition_factor=1, method="random",
                                    dataset="x", path="syn.npz")
    ok = types.SimpleNamespace(name="toy", image_shape=(5, 6, 3), num_classes=2)
    synthetic_file.check_compatible(s, ok)
    wrong_shape = types.SimpleNamespace(name="toy", image_shape=(32, 32, 3), num_classes=2)
    with pytest.raises(ValueError, match=r"syn.npz.*\(5, 6, 3\).*'toy'.*\(32, 32, 3\)"):
        synthetic_file.check_compatible(s, wrong_shape)
    wrong_classes = types.SimpleNamespace(name="toy", image_shape=(5, 6, 3), num_classes=10)
    with pytest.raises(ValueError, match=r"2 classes but dataset 'toy' has 10"):
        synthetic_file.check_compatible(s, wrong_classes)


def test_grid_png_rows_are_classes(tmp_path):
    # 3 classes; class 1 has two images, so the grid is 3 rows x 2 columns of 8x8 cells -> 64 px.
    images = np.zeros((4, 8, 8, 1), np.float32)
    images[0] = 1.0
    images[1, :4] = 0.5
    labels = np.array([1, 1, 0, 2])
    path = synthetic_file.save_grid_png(str(tmp_path / "grid.png"), images, labels, 3, min_cell=64, gap=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (3 * 66 - 2, 2 * 66 - 2)
    row1 = grid[66:66 + 64]
    assert np.all(row1[:, :64] == 255)  # image 0: white, first cell of class 1's row
    assert np.all(row1[:32, 66:130] == 128) and np.all(row1[32:, 66:130] == 0)  # image 1
    assert np.all(grid[:64, 66:130] == 255)  # class 0 has one image: its 2nd cell is background
    assert os.listdir(tmp_path) == ["grid.png"]
    rgb = synthetic_file.save_grid_png(str(tmp_path / "rgb.png"), np.ones((2, 4, 4, 3)), [0, 1], 2)
    assert Image.open(rgb).mode == "RGB"
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        synthetic_file.save_grid_png(str(tmp_path / "x.png"), np.ones((2, 4, 4, 3)), [0, 2], 2)


def test_write_results_round_trip(tmp_path):
    results = {"method": "random", "archs": {"ConvNet": {"accuracies": np.array([50.0, 52.0]),
                                                        "mean": np.float32(51.0),
                                                        "seconds_per_epoch": float("nan")}}}
    path = results_lib.write_results(str(tmp_path), results)
    assert json.load(open(path)) == {"method": "random", "archs": {"ConvNet": {
        "accuracies": [50.0, 52.0], "mean": 51.0, "seconds_per_epoch": None}}}
    assert os.listdir(tmp_path) == ["results.json"]


def test_paper_numbers_match_reference():
    assert results_lib.paper_accuracy("cifar10", "idm", 10, "ConvNet", partition_factor=2)[:2] == (58.6, 0.1)
    assert results_lib.paper_accuracy("cifar100", "idm", 50, "ConvNet")[0] == 50.0
    assert results_lib.paper_accuracy("tinyimagenet", "dm", 1, "ConvNetD4", partition_factor=1,
                                  train_arch="ConvNetD4")[0] == 3.9
    assert results_lib.paper_accuracy("imagenet_subset", "idm", 1, "ConvNetD6", train_arch="ConvNetD6")[0] == 11.2
    assert results_lib.paper_accuracy("cifar10", "whole", None, "ConvNet")[0] == 84.8
    assert results_lib.paper_accuracy("cifar10", "random", 1, "ConvNet", partition_factor=1)[:2] == (14.4, 2.0)
    # Table 5: CIFAR-10 IPC 10 condensed with ConvNet, no partition.
    table5 = [results_lib.paper_accuracy("cifar10", "idm", 10, a, partition_factor=1)[0]
              for a in ("ConvNet", "AlexNet", "VGG11", "ResNet18")]
    assert table5 == [53.0, 44.6, 47.8, 44.6]
    assert results_lib.paper_accuracy("cifar10", "dm", 10, "AlexNet", partition_factor=1)[0] == 38.8
    # No number for settings the paper did not run.
    assert results_lib.paper_accuracy("cifar10", "idm", 10, "AlexNet", partition_factor=2) is None
    assert results_lib.paper_accuracy("cifar10", "idm", 20, "ConvNet") is None
    assert results_lib.paper_accuracy("tinyimagenet", "idm", 1, "ConvNetD4", train_arch="AlexNet") is None
    assert results_lib.paper_accuracy("digits", "idm", 1, "ConvNet") is None
    assert results_lib.paper_results()["continual"]["idm"] == [39.3, 39.3]


@pytest.mark.parametrize("name,key", [("cifar10", "cifar10"), ("tfds:cifar100", "cifar100"),
                                      ("cifar10-jpeg", "cifar10"),
                                      ("/data/cifar10-jpeg.tar.gz", "cifar10"),
                                      ("tiny-imagenet-200", "tinyimagenet"), ("digits", None)])
def test_paper_dataset_key(name, key):
    assert results_lib.paper_dataset_key(name) == key


def test_results_markdown_puts_paper_beside_measured():
    results = {"method": "idm", "dataset": "cifar10-jpeg", "ipc": 10, "partition_factor": 2,
               "train_arch": "ConvNet",
               "archs": {"ConvNet": {"mean": 57.123, "std": 0.456, "accuracies": [1, 2, 3, 4, 5],
                                     "num_seeds": 5, "epochs": 1000, "num_train_images": 400},
                         "AlexNet": {"mean": 40.0, "std": 1.0, "num_seeds": 5, "epochs": 1000,
                                     "num_train_images": 400}}}
    md = results_lib.results_markdown(results)
    lines = md.splitlines()
    convnet = next(l for l in lines if l.startswith("| ConvNet"))
    assert "57.12 ± 0.46" in convnet and "58.6 ± 0.1" in convnet and "Table 1" in convnet
    assert "| 400 |" in convnet and "| 1000 |" in convnet
    alexnet = next(l for l in lines if l.startswith("| AlexNet"))
    assert "40.00 ± 1.00" in alexnet and alexnet.endswith("| — | — |")


def test_results_markdown_adds_the_random_reference_rows():
    results = {"method": "idm", "dataset": "cifar10", "ipc": 10, "partition_factor": 2, "train_arch": "ConvNet",
               "archs": {"ConvNet": {"mean": 57.0, "std": 0.5, "num_seeds": 2, "epochs": 150,
                                     "num_train_images": 400}},
               "random_reference": {"ConvNet": {"mean": 25.125, "std": 1.0, "num_seeds": 2, "epochs": 150,
                                                "num_train_images": 100}}}
    ref = [l for l in results_lib.results_markdown(results).splitlines() if "Random real images" in l]
    assert ref == ["| ConvNet, Random real images (reference) | 2 | 150 | 100 | 25.12 ± 1.00 | 26.0 ± 1.2 | "
                   "Table 1, CIFAR-10 IPC 10 |"]


# ----------------------------------------------------------------------------------------------
# Sets made elsewhere: a bare images + labels .npz, its metadata from the dataset it is scored on

TOY_DATA = types.SimpleNamespace(name="toy", mean=MEAN, std=STD, class_names=NAMES, image_shape=(5, 6, 3))


def _bare(tmp_path, name="bare.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def _pixels(n=4, seed=1):
    return np.random.default_rng(seed).uniform(0, 1, (n, 5, 6, 3)).astype(np.float32)


def test_bare_file_without_a_dataset_names_every_missing_key(tmp_path):
    path = _bare(tmp_path, images=_pixels(), labels=np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"bare.npz' lacks key\(s\) \['mean', 'std', 'class_names', "
                                         r"'partition_factor', 'method', 'dataset'\].*--mode=evaluate"):
        synthetic_file.load_synthetic(path)


def test_bare_pixel_file_takes_statistics_and_names_from_the_dataset(tmp_path):
    pixels = _pixels()
    path = _bare(tmp_path, images=pixels, labels=np.array([0, 1, 0, 1], np.int64))
    s = synthetic_file.load_synthetic(path, TOY_DATA)
    np.testing.assert_allclose(s.images_normalized, (pixels - MEAN) / STD, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(s.images, pixels)
    assert s.labels.dtype == np.int32 and s.labels.tolist() == [0, 1, 0, 1]
    assert (s.class_names, s.partition_factor, s.method, s.dataset) == (NAMES, 1, "external", "toy")
    np.testing.assert_array_equal(s.mean, MEAN)
    assert s.filled_from_dataset == synthetic_file.METADATA_KEYS
    # uint8 pixels are 0-255
    u8 = np.round(pixels * 255).astype(np.uint8)
    s8 = synthetic_file.load_synthetic(_bare(tmp_path, "u8.npz", images=u8, labels=[0, 1, 0, 1]), TOY_DATA)
    np.testing.assert_allclose(s8.images, u8 / 255.0, atol=1e-7)


def test_bare_normalized_nchw_file_as_torch_saves_it(tmp_path):
    normalized = np.random.default_rng(2).normal(0, 1.5, (4, 5, 6, 3)).astype(np.float32)
    nchw = np.transpose(normalized, (0, 3, 1, 2))  # [N, C, H, W] = (4, 3, 5, 6)
    path = _bare(tmp_path, images=nchw, labels=[1, 0, 1, 0])
    for layout in ("auto", "NCHW"):
        s = synthetic_file.load_synthetic(path, TOY_DATA, space="normalized", layout=layout, partition_factor=2,
                                          method="dm")
        np.testing.assert_array_equal(s.images_normalized, normalized)
        np.testing.assert_allclose(s.images, np.clip(normalized * STD + MEAN, 0, 1), atol=1e-6)
        assert (s.partition_factor, s.method, s.image_shape) == (2, "dm", (5, 6, 3))
    # Read as NHWC it does not fit the dataset: both shapes are named.
    with pytest.raises(ValueError, match=r"bare.npz' has images of shape \(3, 5, 6\) \(H, W, C\) but "
                                         r"dataset 'toy' has \(5, 6, 3\)"):
        synthetic_file.load_synthetic(path, TOY_DATA, space="normalized", layout="NHWC")


def test_layout_guess_without_a_dataset_and_ambiguous_shapes(tmp_path):
    normalized = np.random.default_rng(3).normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    arrays = dict(images=normalized, labels=np.array([0, 1]), mean=MEAN, std=STD,
                  class_names=np.asarray(NAMES), partition_factor=np.asarray(1), method=np.asarray("dm"),
                  dataset=np.asarray("x"))
    s = synthetic_file.load_synthetic(_bare(tmp_path, "full.npz", **arrays), space="normalized")
    assert s.image_shape == (8, 8, 3)  # channels on axis 1: NCHW
    cube = types.SimpleNamespace(**{**vars(TOY_DATA), "image_shape": (3, 3, 3)})
    path = _bare(tmp_path, "cube.npz", images=np.zeros((2, 3, 3, 3), np.float32), labels=[0, 1])
    with pytest.raises(ValueError, match=r"cube.npz': images of shape \(2, 3, 3, 3\) fit both .*"
                                         r"--synthetic_layout"):
        synthetic_file.load_synthetic(path, cube)
    assert synthetic_file.load_synthetic(path, cube, layout="NHWC").image_shape == (3, 3, 3)


def test_pixel_and_normalized_spaces_are_told_apart(tmp_path):
    normalized = np.random.default_rng(4).normal(0, 1.5, (4, 5, 6, 3)).astype(np.float32)
    path = _bare(tmp_path, "norm.npz", images=normalized, labels=[0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"norm.npz': images span \[-[0-9.]+, [0-9.]+\], not pixel values.*"
                                         r"--synthetic_space=normalized"):
        synthetic_file.load_synthetic(path, TOY_DATA)
    path = _bare(tmp_path, "pix.npz", images=_pixels(), labels=[0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"pix.npz': images said to be normalized lie in \[0.0.*no negative"):
        synthetic_file.load_synthetic(path, TOY_DATA, space="normalized")
    path = _bare(tmp_path, "255.npz", images=_pixels() * 255, labels=[0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"255.npz': images span \[.*, 25[0-9.]*\].*uint8"):
        synthetic_file.load_synthetic(path, TOY_DATA)


def test_bare_file_with_bad_labels_or_size_is_one_clear_line(tmp_path):
    path = _bare(tmp_path, "labels.npz", images=_pixels(), labels=[0, 1, 5, 1])
    with pytest.raises(ValueError, match=r"labels.npz': labels must lie in \[0, 2\) \(2 class names\), "
                                         r"got range \[0, 5\]"):
        synthetic_file.load_synthetic(path, TOY_DATA)
    path = _bare(tmp_path, "float.npz", images=_pixels(), labels=np.array([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="float.npz': labels must be integers, got dtype float64"):
        synthetic_file.load_synthetic(path, TOY_DATA)
    path = _bare(tmp_path, "count.npz", images=_pixels(), labels=[0, 1, 0])
    with pytest.raises(ValueError, match=r"count.npz': .*labels shape \(3,\) for 4 images"):
        synthetic_file.load_synthetic(path, TOY_DATA)
    big = np.zeros((2, 32, 32, 3), np.float32)
    path = _bare(tmp_path, "size.npz", images=big, labels=[0, 1])
    with pytest.raises(ValueError, match=r"size.npz' has images of shape \(32, 32, 3\) \(H, W, C\) but "
                                         r"dataset 'toy' has \(5, 6, 3\)"):
        synthetic_file.load_synthetic(path, TOY_DATA)
    path = _bare(tmp_path, "nolabels.npz", images=big)
    with pytest.raises(ValueError, match=r"nolabels.npz' lacks key\(s\) \['labels'\]"):
        synthetic_file.load_synthetic(path, TOY_DATA)
    with pytest.raises(ValueError, match="unknown image space 'rgb'"):
        synthetic_file.load_synthetic(path, TOY_DATA, space="rgb")
    with pytest.raises(ValueError, match="unknown image layout 'CHW'"):
        synthetic_file.load_synthetic(path, TOY_DATA, layout="CHW")


def test_idm_jax_file_keeps_its_own_metadata_and_overrides_apply(tmp_path):
    images, labels = _set()
    path = _save(tmp_path / "s.npz", images, labels)
    s = synthetic_file.load_synthetic(path, TOY_DATA)  # the dataset fills nothing: every key is there
    assert s.filled_from_dataset == () and (s.partition_factor, s.method, s.dataset) == (2, "idm", "cifar10")
    np.testing.assert_array_equal(s.images_normalized, images)
    s1 = synthetic_file.load_synthetic(path, TOY_DATA, partition_factor=1, method="idm_l1")
    assert (s1.partition_factor, s1.method) == (1, "idm_l1")
    with pytest.raises(ValueError, match=r"s.npz' holds images_normalized.*drop --synthetic_space=normalized"):
        synthetic_file.load_synthetic(path, TOY_DATA, space="normalized")
    with pytest.raises(ValueError, match="partition_factor must be >= 1, got 0"):
        synthetic_file.load_synthetic(path, TOY_DATA, partition_factor=0)


def test_file_without_pixel_copy_loads(tmp_path):
    # A published set may keep only images_normalized (the pixel copy is derived from it).
    images, labels = _set()
    path = _rewrite(tmp_path, "compact.npz", images=None)
    s = synthetic_file.load_synthetic(path)
    np.testing.assert_array_equal(s.images_normalized, images)
    np.testing.assert_allclose(s.images, np.clip(images * STD + MEAN, 0, 1), atol=1e-6)


def test_atomic_file_makes_the_folder_and_keeps_the_old_file_on_failure(tmp_path):
    from idm_jax import workdir
    path = tmp_path / "new" / "folder" / "out.bin"
    with workdir.atomic_file(str(path)) as f:
        f.write(b"first")
    assert path.read_bytes() == b"first"
    with pytest.raises(RuntimeError, match="mid-write"):
        with workdir.atomic_file(str(path), needed_bytes=6) as f:
            f.write(b"sec")
            raise RuntimeError("mid-write")
    assert path.read_bytes() == b"first" and os.listdir(path.parent) == ["out.bin"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_file_gets_the_mode_open_would_give(tmp_path, umask):
    """mkstemp makes 0600 files: a results folder shared with a group must stay readable."""
    from idm_jax import workdir
    old = os.umask(umask)
    try:
        workdir.atomic_write(str(tmp_path / "config.json"), "{}")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    mode = os.stat(tmp_path / "config.json").st_mode & 0o777
    assert mode == os.stat(tmp_path / "plain.txt").st_mode & 0o777 == 0o666 & ~umask
