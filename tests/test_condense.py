"""The jitted condensation step and the resumable run, on the embedded digits.

One tiny setting (ConvNet-D2 on 16x16 digits, IPC 1, small batches) so the
step compiles once for the whole module (make_step is cached per settings).
"""

import dataclasses
import json
import os
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from idm_jax import condense
from idm_jax import data as data_lib
from idm_jax import synthetic_file
from idm_jax import results as results_lib
from idm_jax import runner
from idm_jax import checkpoints


@pytest.fixture(scope="module")
def setup(digits):
    s = condense.settings_from_config(tiny_config(), digits)
    return s, condense.device_data(digits), condense.make_step(s)


def test_settings_follow_config_and_data(digits, setup):
    s, _, _ = setup
    assert s.num_classes == 10 and s.ipc == 1 and s.image_shape == (16, 16, 1)
    assert s.batch_real == 8 and s.loss.partition_factor == 2 and s.per_class_update
    big = tiny_config()
    big.idm.batch_real = 5000  # as CIFAR-100 IPC 1: more than a class holds
    min_count = int(np.bincount(digits.train_labels).min())
    assert condense.settings_from_config(big, digits).batch_real == min_count
    # Real images read per iteration: 10 classes x 8 + 2 nets x 2 steps x 16.
    assert condense.real_images_per_iteration(s) == 10 * 8 + 2 * 2 * 16
    dm = tiny_config()
    dm.idm.use_queue = False
    assert condense.real_images_per_iteration(condense.settings_from_config(dm, digits)) == 80


def test_auto_class_batch_one_class_at_a_time_on_cpu_for_full_batches():
    # CIFAR-10 IPC 10: 40 expanded + 256 real images per class.
    assert condense.auto_class_batch(296, on_cpu=True) == 1
    assert condense.auto_class_batch(296, on_cpu=False) == 4096 // 296 == 13
    # IPC 1 with a 1024-image real chunk.
    assert condense.auto_class_batch(1028, on_cpu=True) == 1
    assert condense.auto_class_batch(1028, on_cpu=False) == 3
    # Small classes stay stacked on CPU too (memory bound only).
    assert condense.auto_class_batch(12, on_cpu=True) == 4096 // 12 == 341
    assert condense.auto_class_batch(10_000, on_cpu=False) == 1


@pytest.mark.slow  # compiles several steps: 9-29 s on 2 cores (README, Test)
def test_class_chunks_give_the_same_step_as_all_classes_at_once(digits, setup):
    s, data, step = setup
    assert s.class_batch == 10  # the tiny setting stacks all classes
    chunked = condense.make_step(dataclasses.replace(s, class_batch=3))  # chunks 3, 3, 3, 1
    state = condense.init_state(s, digits, 0, "real")
    before = np.asarray(state.syn.images)
    new_all, m_all = step(jax.tree.map(jnp.copy, state), data)  # the step donates its input
    new_chunked, m_chunked = chunked(state, data)
    np.testing.assert_allclose(np.asarray(new_chunked.syn.images), np.asarray(new_all.syn.images),
                               rtol=1e-5, atol=1e-5)
    assert float(m_chunked["loss"]) == pytest.approx(float(m_all["loss"]), rel=1e-5)
    assert float(np.abs(np.asarray(new_all.syn.images) - before).max()) > 1e-4  # a real update


@pytest.mark.slow  # compiles the queue training twice (~40 s on 2 cores); test_models.py checks the vmapped step
def test_queue_members_trained_batched_without_convolutions_equal_one_after_another(digits, setup):
    """The queue training's forms: members one after another with the CPU's convs (the default
    everywhere), and batched with vmap over convs written as matmuls ("taps": no grouped
    convolution), give the same members and meters to float rounding."""
    from idm_jax import queue as queue_lib
    s, data, _ = setup
    assert s.queue_train_impl == "map" and s.conv_impl == "matmul"  # what "auto" picks on CPU
    state = condense.init_state(s, digits, 0, "real")
    slots, key = jnp.array([2, 0]), jax.random.PRNGKey(5)

    def trained(settings):
        fn = jax.jit(lambda queue: queue_lib.train(queue, slots, condense.make_member_train_fn(settings, data),
                                                   key, settings.queue_train_impl))
        return fn(state.queue)

    ref = trained(s)
    batched = trained(dataclasses.replace(s, queue_train_impl="vmap", conv_impl="taps"))
    moved = float(jnp.abs(ref.params["conv0"]["kernel"][2] - state.queue.params["conv0"]["kernel"][2]).max())
    assert moved > 1e-4  # the members did train
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), batched.params, ref.params)
    np.testing.assert_array_equal(batched.seen, ref.seen)
    np.testing.assert_allclose(batched.correct, ref.correct, atol=1e-6)
    assert float(ref.seen[2]) == s.model_train_steps * s.batch_train and float(ref.seen[1]) == 0.0


@pytest.mark.slow  # compiles the GPU/TPU variants of the step on CPU: ~30 s each on 2 cores (README, Test)
@pytest.mark.parametrize("queue_train_impl, conv_impl", [("map", "xla"), ("vmap", "matmul")])
def test_accelerator_step_equals_the_cpu_step(digits, setup, queue_train_impl, conv_impl):
    """The GPU/TPU step (loops kept as lax.scan / lax.map; queue members one after another, its
    default, or batched with vmap) is the CPU step (loops unrolled, members one after another),
    to float rounding: 3 iterations with a push, queue training and meter updates."""
    s, data, cpu_step = setup
    assert s.unroll_loops and s.queue_train_impl == "map"  # what "auto" picks on CPU
    accel = dataclasses.replace(s, unroll_loops=False, queue_train_impl=queue_train_impl, conv_impl=conv_impl,
                                class_batch=3)
    accel_step = condense.make_step(accel)
    cpu_chunks = dataclasses.replace(s, class_batch=3)  # chunks 3, 3, 3, 1: the map over chunks
    cpu_step = condense.make_step(cpu_chunks)  # built once: each make_step compiles anew
    state = condense.init_state(s, digits, 0, "real")
    a, b = jax.tree.map(jnp.copy, state), state
    for _ in range(3):
        a, ma = accel_step(a, data)
        b, mb = cpu_step(b, data)
        for k in ("loss", "mmd", "ce", "match_acc", "queue_acc"):
            np.testing.assert_allclose(float(ma[k]), float(mb[k]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.syn.images, b.syn.images, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.syn.momentum, b.syn.momentum, rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5),
                 a.queue.params, b.queue.params)
    np.testing.assert_array_equal(a.queue.seen, b.queue.seen)
    np.testing.assert_allclose(a.queue.correct, b.queue.correct, atol=1e-6)


@pytest.mark.slow  # compiles the batched step with convs as matmuls: ~40 s on 2 cores
def test_step_with_convs_as_matmuls_follows_the_cpu_step(digits, setup):
    """The batched step without grouped convolutions (members vmapped, conv_impl "taps": matmuls
    in the matching network too) follows the CPU step over 3 iterations. Its forward sums in
    another order (gradients w.r.t. the images agree to ~5e-7 relative), and the matching loss's
    difference of mean embeddings amplifies that in a few pixels (up to ~2e-3 of 2,560 after 3
    iterations): compared as whole arrays (relative L2), metrics to 1e-4."""
    s, data, _ = setup
    taps_step = condense.make_step(dataclasses.replace(s, unroll_loops=False, queue_train_impl="vmap",
                                                       conv_impl="taps", class_batch=3))
    cpu_step = condense.make_step(dataclasses.replace(s, class_batch=3))
    state = condense.init_state(s, digits, 0, "real")
    a, b = jax.tree.map(jnp.copy, state), jax.tree.map(jnp.copy, state)
    for _ in range(3):
        a, ma = taps_step(a, data)
        b, mb = cpu_step(b, data)
        for k in ("loss", "mmd", "ce", "match_acc", "queue_acc"):
            np.testing.assert_allclose(float(ma[k]), float(mb[k]), rtol=1e-4, atol=1e-4)

    def relative(x, y, before):  # the difference against the change the 3 iterations made
        return float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y - before))

    assert relative(a.syn.images, b.syn.images, state.syn.images) < 1e-3
    for x, y, before in zip(jax.tree.leaves(a.queue.params), jax.tree.leaves(b.queue.params),
                            jax.tree.leaves(state.queue.params)):
        if float(jnp.linalg.norm(y - before)) > 0:  # the members that trained
            assert relative(x, y, before) < 1e-3
    np.testing.assert_array_equal(a.queue.seen, b.queue.seen)


def test_init_from_real_packs_real_images(digits, setup):
    s, _, _ = setup
    syn = condense.init_synset(s, digits, seed=0, init="real")
    assert syn.images.shape == (10, 1, 16, 16, 1)
    np.testing.assert_array_equal(syn.labels, np.arange(10))
    assert float(jnp.abs(syn.momentum).max()) == 0.0
    # Each 8x8 quadrant is a real image of that class halved (bilinear 16 -> 8 without
    # antialiasing = the mean of each 2x2 block), and the 4 quadrants are 4 different images.
    real = np.asarray(data_lib.normalize(digits.train_images, digits.mean, digits.std))
    halved = real.reshape(-1, 8, 2, 8, 2, 1).mean(axis=(2, 4))
    images = np.asarray(syn.images)
    for c in range(10):
        own = halved[digits.train_labels == c]
        quadrants = [images[c, 0, r:r + 8, q:q + 8] for r in (0, 8) for q in (0, 8)]
        for quadrant in quadrants:
            assert np.abs(own - quadrant).max(axis=(1, 2, 3)).min() < 1e-5
        assert all(np.abs(a - b).max() > 1e-3 for i, a in enumerate(quadrants) for b in quadrants[i + 1:])


def test_real_whole_init_starts_each_image_as_one_full_real_image(digits, setup):
    # The release's TinyImageNet init: one real image per synthetic image even with partition on.
    s, _, _ = setup
    syn = condense.init_synset(s, digits, seed=0, init="real_whole")
    real = np.asarray(data_lib.normalize(digits.train_images, digits.mean, digits.std))
    for c in range(10):
        pool = real[digits.train_labels == c]
        distance = np.abs(pool - np.asarray(syn.images[c, 0])).max(axis=(1, 2, 3))
        assert distance.min() < 1e-6  # exactly one of its class's real images
    packed = condense.init_synset(s, digits, seed=0, init="real")
    assert not np.allclose(packed.images, syn.images)  # "real" packs 4 downscaled images instead


@pytest.mark.slow  # compiles several steps: 9-29 s on 2 cores (README, Test)
def test_two_matching_nets_step_is_one_pass_per_net(digits, setup):
    s, data, _ = setup
    s2 = dataclasses.replace(s, train_net_num=2)
    state = condense.init_state(s2, digits, 0, "real")
    # By hand: the nets and keys the step draws, then one per-class pass per net, in order.
    k_net, k_syn, _ = jax.random.split(jax.random.fold_in(state.key, state.step), 3)
    _, nets, accs, _ = condense.matching_nets(s2, state, k_net, condense.make_init_fn(s2))
    assert len(nets) == 2 and accs.shape == (2,)
    assert not np.allclose(nets[0]["classifier"]["kernel"], nets[1]["classifier"]["kernel"])  # distinct nets
    apply_fn = condense.make_apply_fn(s2.model)
    update = jax.jit(lambda syn, p, a, k: condense.update_synset(s2, syn, p, a, k, data, apply_fn))
    one, m1 = update(state.syn, nets[0], accs[0], k_syn)
    two, m2 = update(one, nets[1], accs[1], jax.random.fold_in(k_syn, 1))
    new, m = condense.make_step(s2)(jax.tree.map(jnp.copy, state), data)
    np.testing.assert_allclose(new.syn.images, two.images, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.syn.momentum, two.momentum, rtol=1e-5, atol=1e-5)
    assert float(m["loss"]) == pytest.approx(float(m1["loss"]) + float(m2["loss"]), rel=1e-5)
    assert float(np.abs(np.asarray(two.images) - np.asarray(one.images)).max()) > 1e-4  # net 2 moved it


def test_step_updates_state_queue_and_compiles_once(digits, setup):
    s, data, step = setup
    state = condense.init_state(s, digits, 0, "real")
    images0 = np.asarray(state.syn.images)
    sizes, accs = [], []
    for _ in range(5):
        state, m = step(state, data)
        sizes.append(int(m["queue_size"]))
        accs.append(float(m["match_acc"]))
        assert np.isfinite(float(m["loss"])) and float(m["mmd"]) > 0
    assert step._cache_size() == 1  # pylint: disable=protected-access
    assert int(state.step) == 5
    # 3 initial nets; pushes at iterations 0, 2, 4 (interval 2) into 4 slots.
    assert sizes == [4, 4, 4, 4, 4]
    np.testing.assert_array_equal(np.sort(np.asarray(state.queue.born)), [0, 0, 2, 4])
    assert float(np.abs(np.asarray(state.syn.images) - images0).max()) > 0
    # 2 nets trained x 2 steps x 16 images per iteration; meters reset at iteration 3.
    assert float(state.queue.seen.sum()) == pytest.approx(2 * 2 * 2 * 16)
    assert accs[0] == 0.0  # nothing trained before the first iteration's matching


def test_step_from_config_is_the_setup_by_hand(digits, setup):
    """step_from_config = settings_from_config, init_state, device_data, make_step: the same
    settings, state and (cached) step; with no dataset given it loads the config's own."""
    s, data, step = setup
    c = tiny_config()
    c.idm.init = "noise"
    ready = condense.step_from_config(c, seed=3)
    assert ready.dataset.name == digits.name and ready.settings == s and ready.step is step
    np.testing.assert_array_equal(ready.dataset.train_labels, digits.train_labels)
    np.testing.assert_array_equal(np.asarray(ready.data.class_counts), np.asarray(data.class_counts))
    by_hand = condense.init_state(s, digits, 3, "noise")
    assert jax.tree.structure(ready.state) == jax.tree.structure(by_hand)
    for got, want in zip(jax.tree.leaves(ready.state), jax.tree.leaves(by_hand)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert ready.state.syn.images.shape == (10, 1, 16, 16, 1)
    state, m = ready.step(ready.state, ready.data)
    assert int(state.step) == 1 and np.isfinite(float(m["loss"]))


def test_nonfinite_loss_freezes_state(digits, setup):
    s, data, step = setup
    state = condense.init_state(s, digits, 0, "real")
    state, _ = step(state, data)
    good = np.asarray(state.syn.images)
    bad = state.replace(syn=state.syn.replace(images=state.syn.images.at[0].set(jnp.nan)))
    bad_images = np.asarray(bad.syn.images)
    # (XLA:CPU's fused ReLU may turn NaN into 0, so the loss itself can look
    # finite; the step also checks the updated images.)
    frozen, _ = step(bad, data)
    assert int(frozen.nonfinite_step) == 1 and int(frozen.step) == 1
    np.testing.assert_array_equal(np.asarray(frozen.syn.images), bad_images)
    frozen, _ = step(frozen, data)  # stays frozen, keeps the first bad iteration
    assert int(frozen.nonfinite_step) == 1 and int(frozen.step) == 1
    assert good.shape == bad_images.shape


def test_dm_mode_uses_a_fresh_net_and_no_queue(digits):
    c = tiny_config()
    c.idm.use_queue, c.idm.partition_factor, c.idm.use_ce = False, 1, False
    s = condense.settings_from_config(c, digits)
    state = condense.init_state(s, digits, 0, "noise")
    assert state.queue is None
    state, m = condense.make_step(s)(state, condense.device_data(digits))
    assert float(m["match_acc"]) == 0.0 and float(m["ce"]) == 0.0 and "queue_acc" not in m


def test_dm_preset_step_is_one_joint_sgd_step_at_lr_1(digits):
    """DM (configs ...:1,dm): one joint step on the summed class losses at lr 1.0. From a zero
    momentum buffer the new buffer is the gradient itself, so x_new = x - 1.0 * grad."""
    s = condense.settings_from_config(tiny_config(arg="1,dm"), digits)
    assert (s.per_class_update, s.lr_img, s.use_queue, s.loss.partition_factor) == (False, 1.0, False, 1)
    state = condense.init_state(s, digits, 0, "real")
    x0 = np.asarray(state.syn.images)
    assert float(np.abs(np.asarray(state.syn.momentum)).max()) == 0.0
    new, m = condense.make_step(s)(state, condense.device_data(digits))
    grad = np.asarray(new.syn.momentum)  # buf = momentum * 0 + grad
    assert float(np.abs(grad).max()) > 0
    np.testing.assert_allclose(np.asarray(new.syn.images), x0 - 1.0 * grad, rtol=1e-6, atol=1e-6)
    assert float(m["ce"]) == 0.0 and np.isfinite(float(m["loss"]))


@pytest.mark.slow  # compiles several steps: 9-29 s on 2 cores (README, Test)
def test_periodic_evaluation_writes_eval_rows(tmp_path):
    c = tiny_config()
    c.eval.interval, c.eval.interval_epochs, c.eval.at_end = 2, 1, False
    runner.run_condensation(c, str(tmp_path))
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    evals = [r for r in rows if "eval/ConvNetD2/mean" in r]
    assert [r["step"] for r in evals] == [2]  # every 2 iterations, not at the end (done < total)
    assert 0.0 < evals[0]["eval/ConvNetD2/mean"] <= 100.0
    assert not os.path.exists(tmp_path / "results.json")  # eval.at_end=False


def _npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_run_end_to_end_outputs_and_resume_equals_uninterrupted(tmp_path):
    full_dir, split_dir = str(tmp_path / "full"), str(tmp_path / "split")
    summary = runner.run_condensation(tiny_config(), full_dir)
    for name in ("synthetic.npz", "synthetic.png", "config.json", "metrics.jsonl",
                 "results.json", "results.md"):
        assert os.path.exists(os.path.join(full_dir, name)), name
    rows = [json.loads(l) for l in open(os.path.join(full_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in rows)
    # The first iteration compiles: no speed for it; the others have one.
    assert "it_per_s" not in rows[0] and all(r["it_per_s"] > 0 for r in rows[1:])
    results = json.load(open(os.path.join(full_dir, "results.json")))
    assert results["ipc"] == 1 and results["iterations"] == 4
    events = [f for f in os.listdir(os.path.join(full_dir, "tensorboard")) if f.startswith("events.out.tfevents")]
    assert events, "no TensorBoard events written"
    tb = open(os.path.join(full_dir, "tensorboard", events[0]), "rb").read()
    assert all(tag in tb for tag in (b"loss", b"mmd", b"it_per_s"))
    assert summary["step"] == 4

    synset = synthetic_file.load_synthetic(os.path.join(full_dir, "synthetic.npz"))
    assert synset.images_normalized.shape == (10, 16, 16, 1) and synset.partition_factor == 2
    np.testing.assert_array_equal(synset.labels, np.arange(10))
    assert synset.images.min() >= 0.0 and synset.images.max() <= 1.0

    # Interrupted after 2 iterations (checkpoint), then the same call resumes.
    part = runner.run_condensation(tiny_config(), split_dir, max_steps=2)
    assert part["step"] == 2
    rest = runner.run_condensation(tiny_config(), split_dir)
    assert rest["start_step"] == 2 and rest["step"] == 4
    a = _npz(os.path.join(full_dir, "synthetic.npz"))
    b = _npz(os.path.join(split_dir, "synthetic.npz"))
    np.testing.assert_array_equal(a["images_normalized"], b["images_normalized"])
    rows = [json.loads(l) for l in open(os.path.join(split_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # Pinned: the resumed run's final evaluation reproduces the uninterrupted one exactly.
    split_results = json.load(open(os.path.join(split_dir, "results.json")))
    assert split_results["archs"]["ConvNetD2"]["accuracies"] == results["archs"]["ConvNetD2"]["accuracies"]

    # SIGTERM during iteration 2: checkpoint at 2 and a clean return; rerunning resumes.
    signal_dir = str(tmp_path / "signal")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(condense, "make_step", _sigterm_on_call(condense.make_step, 2))
        stopped = runner.run_condensation(tiny_config(), signal_dir)
    assert stopped["interrupted"] and stopped["step"] == 2
    assert not os.path.exists(os.path.join(signal_dir, "synthetic.npz"))
    mngr = checkpoints.checkpoint_manager(signal_dir, 2)
    assert mngr.latest_step() == 2
    mngr.close()
    resumed = runner.run_condensation(tiny_config(), signal_dir)
    assert resumed["start_step"] == 2 and resumed["step"] == 4
    c = _npz(os.path.join(signal_dir, "synthetic.npz"))
    np.testing.assert_array_equal(a["images_normalized"], c["images_normalized"])


def _sigterm_on_call(make_step, call: int):
    """make_step whose step sends this process SIGTERM on its `call`-th use (as `kill` would)."""
    def make(*args, **kwargs):
        step, calls = make_step(*args, **kwargs), []

        def step_then_signal(state, data):
            out = step(state, data)
            calls.append(1)
            if len(calls) == call:
                os.kill(os.getpid(), signal.SIGTERM)
            return out
        return step_then_signal
    return make


def test_nonfinite_run_stops_with_clear_error_and_keeps_checkpoint(tmp_path, monkeypatch):
    c = tiny_config()
    workdir = str(tmp_path / "nan")
    runner.run_condensation(c, workdir, max_steps=2)  # checkpoint at 2
    real_restore = checkpoints.restore_or_init

    def restore_then_poison(*args, **kwargs):
        state = real_restore(*args, **kwargs)
        return state.replace(syn=state.syn.replace(images=state.syn.images * jnp.inf))  # after restore

    monkeypatch.setattr(checkpoints, "restore_or_init", restore_then_poison)
    with pytest.raises(runner.NonFiniteLossError, match="non-finite .* at iteration 2"):
        runner.run_condensation(c, workdir)
    mngr = checkpoints.checkpoint_manager(workdir, 2)
    assert mngr.latest_step() == 2  # nothing newer was written
    mngr.close()


def test_combine_runs_pools_every_network_of_every_run():
    run = lambda accs: {"method": "idm", "dataset": "digits", "ipc": 1, "synthetic": "s.npz",
                        "archs": {"ConvNetD2": {"accuracies": accs, "mean": float(np.mean(accs)),
                                                "std": float(np.std(accs)), "epochs": 2, "train_seconds": 1.5}}}
    combined = results_lib.combine_runs([run([50.0, 52.0]), run([60.0, 62.0])])
    r = combined["archs"]["ConvNetD2"]
    assert r["accuracies"] == [50.0, 52.0, 60.0, 62.0] and r["num_seeds"] == 4
    assert r["mean"] == pytest.approx(56.0) and r["std"] == pytest.approx(np.std([50, 52, 60, 62]))
    assert r["run_means"] == [51.0, 61.0] and r["train_seconds"] == 3.0
    assert combined["runs"] == 2 and combined["synthetic"] == ["s.npz", "s.npz"]


def test_runs_condenses_with_successive_seeds_and_pools_the_evaluations(tmp_path, monkeypatch):
    c = tiny_config(iterations=2)
    c.runs = 2
    out = runner.run_repeated(c, str(tmp_path))
    results = json.load(open(tmp_path / "results.json"))
    r = results["archs"]["ConvNetD2"]
    assert results["runs"] == 2 and r["num_seeds"] == 4 and len(r["run_means"]) == 2
    assert out["results"]["archs"]["ConvNetD2"]["accuracies"] == r["accuracies"]
    a = _npz(tmp_path / "run_0" / "synthetic.npz")["images_normalized"]
    b = _npz(tmp_path / "run_1" / "synthetic.npz")["images_normalized"]
    assert not np.allclose(a, b)  # seeds 0 and 1: different inits and draws
    assert json.load(open(tmp_path / "run_1" / "config.json"))["seed"] == 1
    # A finished workdir: rerunning trains nothing and gives the same table.
    monkeypatch.setattr(runner, "run_condensation", lambda *a, **k: pytest.fail("a finished run was rerun"))
    again = runner.run_repeated(c, str(tmp_path))
    assert again["results"]["archs"]["ConvNetD2"]["accuracies"] == r["accuracies"]


def test_map_in_chunks_unrolls_only_a_few_chunks():
    fn = lambda x: {"y": jnp.tanh(x["a"]) * 2.0}
    inputs = {"a": jnp.arange(24.0).reshape(12, 2) / 7.0}
    expected = np.tanh(np.arange(24.0).reshape(12, 2) / 7.0) * 2.0

    def run(chunk, unroll):
        jaxpr = str(jax.make_jaxpr(lambda i: condense.map_in_chunks(fn, i, chunk, unroll=unroll))(inputs))
        out = condense.map_in_chunks(fn, inputs, chunk, unroll=unroll)
        np.testing.assert_allclose(out["y"], expected, rtol=1e-6)
        return "scan" in jaxpr or "while" in jaxpr

    assert condense.MAX_UNROLLED_CHUNKS == 10
    assert not run(chunk=2, unroll=True)  # 6 chunks: unrolled, no loop
    assert run(chunk=1, unroll=True)  # 12 chunks > 10: a loop (compile cost flat in the classes)
    assert run(chunk=2, unroll=False)  # accelerators: always a loop


def test_queue_training_unrolls_at_most_a_block_of_steps(digits):
    # 5 SGD steps of a queue member: fully unrolled (the CPU default) or as a loop over blocks
    # of 2 unrolled steps (idm.max_unrolled_queue_steps=2: 2 trips + 1 left over) must train
    # the member identically.
    c = tiny_config()
    c.idm.model_train_steps = 5
    data = condense.device_data(digits)
    outputs, unrolls = {}, {}
    for cap in (0, 2):
        c.idm.max_unrolled_queue_steps = cap
        s = dataclasses.replace(condense.settings_from_config(c, digits), unroll_loops=True)
        params, opt_state = condense.make_init_fn(s)(jax.random.PRNGKey(0))
        train = condense.make_member_train_fn(s, data)
        jaxpr = str(jax.make_jaxpr(train)(params, opt_state, jax.random.PRNGKey(1)))
        unrolls[cap] = re.findall(r"unroll=(\w+)", jaxpr)  # the scan's unroll (a loop when < 5)
        outputs[cap] = jax.jit(train)(params, opt_state, jax.random.PRNGKey(1))
    assert unrolls == {0: ["5"], 2: ["2"]}
    assert condense.queue_steps_unrolled(dataclasses.replace(s, unroll_loops=False)) == 1  # GPU/TPU: a loop
    for a, b in zip(jax.tree.leaves(outputs[0]), jax.tree.leaves(outputs[2])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert float(outputs[2][3]) == 5 * s.batch_train  # the meter saw every step's batch
    moved = [float(jnp.abs(p1 - p0).max()) for p1, p0 in zip(jax.tree.leaves(outputs[2][0]), jax.tree.leaves(params))]
    assert min(moved) > 0  # the steps did train every parameter


# ----------------------------------------------------------------------------
# Several iterations per dispatch (idm.steps_per_dispatch)


def test_dispatch_plan_aligns_whole_calls_to_multiples_of_the_count():
    assert runner.dispatch_plan(0, 5, 1) == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)]
    assert runner.dispatch_plan(0, 5, 2) == [(0, 2), (2, 2), (4, 1)]  # the end: one at a time
    # A resume at iteration 3 (a wall-clock checkpoint): single steps up to 4, then whole calls.
    assert runner.dispatch_plan(3, 12, 4) == [(3, 1), (4, 4), (8, 4)]
    assert runner.dispatch_plan(5, 7, 4) == [(5, 1), (6, 1)]  # no multiple of 4 inside
    assert runner.dispatch_plan(4, 4, 2) == []


def test_steps_per_dispatch_must_divide_the_cadences():
    from idm_jax import config_check
    c = tiny_config()
    assert c.idm.steps_per_dispatch == 1  # the default: one iteration per call
    c.idm.steps_per_dispatch, c.log_every, c.checkpoint_every = 2, 4, 6
    config_check.validate(c)
    c.log_every = 5
    with pytest.raises(ValueError, match=r"idm.steps_per_dispatch=2 must divide log_every=5"):
        config_check.validate(c)
    c.log_every, c.eval.interval = 4, 3
    with pytest.raises(ValueError, match=r"must divide eval.interval=3"):
        config_check.validate(c)
    c.eval.interval, c.data.on_device = 0, "host"
    with pytest.raises(ValueError, match=r"steps_per_dispatch=2 needs the real data on the device"):
        config_check.validate(c)
    c.data.on_device, c.idm.steps_per_dispatch = "device", 0
    with pytest.raises(ValueError, match=r"idm.steps_per_dispatch must be an integer >= 1, got 0"):
        config_check.validate(c)
    with pytest.raises(ValueError, match=r"steps per dispatch must be an integer >= 1, got 0"):
        condense.make_multi_step(condense.settings_from_config(tiny_config(), data_lib.load_dataset("digits")), 0)


@pytest.mark.slow
def test_multi_step_equals_single_steps_donates_and_compiles_once(digits, setup):
    """3 iterations in one call = 3 calls of the step: bit for bit on CPU (unrolled), to float
    rounding in the accelerator variant (a scan over the step; queue vmap, class lax.map)."""
    import warnings
    s, data, step = setup
    state = condense.init_state(s, digits, 0, "real")
    singles, rows = jax.tree.map(jnp.copy, state), []
    for _ in range(3):
        singles, m = step(singles, data)
        rows.append(jax.device_get(m))
    multi = condense.make_multi_step(s, 3)
    accel = condense.make_multi_step(
        dataclasses.replace(s, unroll_loops=False, queue_train_impl="vmap", class_batch=3), 3)
    a_state = jax.tree.map(jnp.copy, state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, metrics = multi(state, data)
        jax.block_until_ready(out)
    assert not [w for w in caught if "donated" in str(w.message)]
    assert state.syn.images.is_deleted()  # the state was donated, not copied
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(singles)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert metrics["loss"].shape == (3,)  # every iteration's metrics, stacked
    np.testing.assert_array_equal(metrics["loss"], [r["loss"] for r in rows])
    np.testing.assert_array_equal(metrics["queue_acc"], [r["queue_acc"] for r in rows])
    assert int(out.step) == 3 and rows[0]["loss"] != rows[2]["loss"]
    out, _ = multi(out, data)  # the next call neither recompiles nor retraces
    assert multi._cache_size() == 1 and int(out.step) == 6  # pylint: disable=protected-access
    a_out, a_metrics = accel(a_state, data)
    for a, b in zip(jax.tree.leaves(a_out), jax.tree.leaves(singles)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a_metrics["loss"], [r["loss"] for r in rows], rtol=1e-4)


@pytest.mark.slow
def test_runner_with_two_steps_per_dispatch_writes_what_one_step_does(tmp_path, monkeypatch):
    outputs, calls = {}, []

    def counted(*args):  # records the iteration each multi-iteration call starts at
        multi = make_multi_step(*args)

        def call(state, data):
            calls.append(int(state.step))
            return multi(state, data)
        return call

    make_multi_step = condense.make_multi_step
    monkeypatch.setattr(condense, "make_multi_step", counted)
    for k in (1, 2):
        c = tiny_config(iterations=5)  # calls of 2 for 0-4, then one for the 5th
        c.idm.steps_per_dispatch, c.log_every, c.checkpoint_every = k, 2, 2
        c.eval.at_end = False
        workdir = tmp_path / f"k{k}"
        runner.run_condensation(c, str(workdir))
        rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
        mngr = checkpoints.checkpoint_manager(str(workdir), 2)
        outputs[k] = rows, mngr.all_steps(), _npz(workdir / "synthetic.npz")["images_normalized"]
        mngr.close()
    (rows1, ckpts1, images1), (rows2, ckpts2, images2) = outputs[1], outputs[2]
    assert calls == [0, 2]  # K=2: two calls of 2 iterations, then the 5th alone
    assert [r["step"] for r in rows2] == [r["step"] for r in rows1] == [2, 4, 5]
    for a, b in zip(rows1, rows2):
        assert {k: v for k, v in a.items() if k != "it_per_s"} == {k: v for k, v in b.items() if k != "it_per_s"}
    assert list(ckpts2) == list(ckpts1) == [4, 5]  # keep_checkpoints=2 of 2, 4, 5
    np.testing.assert_array_equal(images2, images1)


def test_l1_low_ce_branch_matches_the_k_lowest_ce_real_images_of_the_class(digits):
    # The release's CIFAR-10 IPC-1 branch without partition (IDM_cifar10.py): the real side of
    # class c is the mean embedding of the k images of its batch with the lowest CE.
    c = tiny_config()
    c.idm.partition_factor, c.idm.keep_lowest_ce_real, c.idm.ce_only_misclassified = 1, 3, True
    c.idm.dsa_strategy = ""
    s = condense.settings_from_config(c, digits)
    assert (s.loss.keep_lowest_ce_real, s.loss.ce_only_misclassified) == (3, True)
    data = condense.device_data(digits)
    apply_fn = condense.make_apply_fn(s.model)
    params = condense.make_init_fn(s)(jax.random.PRNGKey(0))[0]
    key, cls = jax.random.PRNGKey(4), 6
    got = condense.real_class_mean(s, params, apply_fn, data, jnp.int32(cls), key, key)
    idx = condense.class_batch_indices(s, key, data.class_table, data.class_counts, cls)
    emb, logits = apply_fn(params, data_lib.normalize(digits.train_images[np.asarray(idx)], digits.mean,
                                                      digits.std))
    logp = np.asarray(jax.nn.log_softmax(logits))
    lowest = np.argsort(-logp[:, cls])[:3]
    np.testing.assert_allclose(got, np.asarray(emb)[lowest].mean(0), rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(got) - np.asarray(emb).mean(0)).max() > 1e-4  # not the whole batch
