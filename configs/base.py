"""Every knob of an idm_jax run, with the authors' release default.

Other configs import `get_config()` from here and override a few fields, so a
config file reads like a row of the paper's hyperparameter table. Where the
paper's text and the release differ, the release value is the default and the
paper's is named in the comment (see docs/RELEASE.md).
"""

import os

import ml_collections

from idm_jax import defaults  # JAX-free, as presets: a config is data
from idm_jax.presets import METHODS, apply_method, set_dotted


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Condensations with seeds seed, seed+1, ...: the release runs 5 (num_exp),
  # each scored by eval.num_seeds networks; results.json then pools all of
  # them (25 networks, as the paper's mean +- std). 1 keeps a run to one
  # condensation; the config argument ",paper" (e.g. cifar10.py:10,paper) sets PAPER_RUNS.
  c.runs = 1
  c.ipc = 10  # images per class
  # "idm" = the full method; "dm" = Distribution Matching (fresh net every
  # step, no queue, no partition, no CE). Ablations toggle the idm.* switches.
  c.method = "idm"

  c.data = ml_collections.ConfigDict()
  # "digits" (embedded, no network), "tfds:<name>", or a folder / .tar.gz of
  # <split>/<class>/<image> files.
  c.data.source = "digits"
  c.data.normalization = ""  # "" = infer from the dataset name
  c.data.image_size = 0  # 0 = native resolution
  # How image_size is reached: "stretch" (both sides resized) or "center_crop" (shorter
  # side to image_size, then the central square: the ImageNet-subset protocol).
  c.data.resize = "stretch"
  # Folder sources: the class folders to use, in label order. "" = all, sorted;
  # "imagenet_subset" = the release's 100 ImageNet wnids (shipped); a file of one
  # name per line; or comma-separated names.
  c.data.classes = ""
  c.data.cache_dir = ""  # "" = $IDM_CACHE_DIR or ~/.cache/idm_jax
  # Where the condensation step draws real batches: "device" (the whole uint8 train
  # set on the accelerator, sampled inside the jit), "host" (memory-mapped on the
  # host, the same draws gathered there and fed to the step), "auto" = "host" for
  # train sets over 4 GiB (data.MEMMAP_BYTES), else "device".
  c.data.on_device = "auto"
  # The release's ImageNet-subset loader (data plumbing, off by default;
  # docs/RELEASE.md#imagenet-subset-quirks). class_sampling: "random" = a fresh random subset per class and
  # iteration (every other release script); "first" = the first batch_real files of the class
  # in file order every iteration (its class_sample(c, n) returns cls_idx[c][:n]; the init's
  # real images then are the first ones too). train_sampling: the queue's training batches,
  # "random" = independent draws; "passes" = consecutive batches of shuffled passes over the
  # train set (its repeated BatchSampler; the short last batch of a pass is skipped).
  c.data.class_sampling = "random"
  c.data.train_sampling = "random"

  c.model = "ConvNet"  # network used for matching (idm_jax.models.MODEL_NAMES)

  c.idm = ml_collections.ConfigDict()
  c.idm.iterations = 20000
  # "real": l*l downscaled real images of the class packed into each image
  # (release, CIFAR); "real_tiled": l*l downscaled copies of ONE real image
  # (release, ImageNet subset: a quirk, not the default there); "real_whole":
  # one full real image each (release, TinyImageNet); "noise": N(0, 1).
  c.idm.init = "real"
  # Condense on [0, 1] images instead of normalized ones (release, ImageNet subset: DSA's
  # zero fill is then black, and the final evaluation trains on those [0, 1] images while
  # the test set is normalized, as the release does). Off: a release bug.
  c.idm.unnormalized = False
  c.idm.dsa_strategy = defaults.DSA_STRATEGY
  # What the loss matches: "last_block" = flattened output of the last block
  # (2048 values on CIFAR; the published commands' --embed_last 1000);
  # "before_last_pool" = the last block before its pooling (8192 values; the
  # release script's default --embed_last -1). ConvNet only.
  c.idm.embedding = "last_block"
  c.idm.partition_factor = defaults.PARTITION_FACTOR  # l in the paper; 1 = no partition/expansion
  c.idm.batch_real = 256  # real images per class per iteration
  c.idm.lr_img = 0.2  # SGD on synthetic images (DM: 1.0)
  c.idm.momentum_img = 0.5
  # "per_class": one SGD step per class, one shared momentum buffer (release).
  # "joint": sum class losses, one step per iteration (one fused update).
  c.idm.update_mode = "per_class"
  # CE regularizer weight lambda_reg (paper: 0.5 for IPC 1/10, 0.1 for 50).
  # The release multiplies it by the matching net's training accuracy in
  # percent (0-100): torchnet's meter returns (1 - errors/seen) * 100, so a
  # net at 0 % gives 0, and a net never trained yet also gives 0.
  c.idm.ce_weight = defaults.CE_WEIGHT
  c.idm.use_ce = True  # ablation switch for the CE regularizer
  # Only with partition_factor 1: the release's CIFAR-10 IPC-1 branch without --aug
  # (IDM_cifar10.py, `ipc == 1 and not aug`) matches the keep_lowest_ce_real (2560) real
  # images of the batch with the lowest CE under the matching net (0 = all), and applies the
  # CE term only to synthetic images that net misclassifies. Set by cifar10.py:1.
  c.idm.keep_lowest_ce_real = 0
  c.idm.ce_only_misclassified = False
  c.idm.use_queue = True  # False: fresh random net every iteration (as DM)
  c.idm.net_num = 100  # N_max, queue capacity
  c.idm.net_init_num = 3  # nets in the queue at iteration 0 (before the push)
  c.idm.net_generate_interval = 30  # push a new net every this many its
  # Nets drawn for the matching loss; with several, one pass of per-class
  # steps per net, net after net (as the release loops).
  c.idm.train_net_num = 1
  c.idm.fetch_net_num = 2  # nets drawn for training each iteration
  c.idm.model_train_steps = 10  # SGD steps per fetched net (paper: K=100)
  # CPU only: unroll at most this many of those steps, looping over blocks of them (0 = all,
  # the fastest; a cap such as 10 lowers CIFAR-100 IPC 10's peak memory, at the price of slower
  # queue training: docs/RESULTS.md#where-the-memory-went).
  c.idm.max_unrolled_queue_steps = 0
  # Iterations per jitted call (a lax.scan over the step): the host dispatches and waits once per
  # this many. 1 = one call per iteration. Must divide log_every, checkpoint_every and
  # eval.interval; needs data.on_device=device.
  c.idm.steps_per_dispatch = 1
  c.idm.batch_train = 256  # real images per queue-training step
  c.idm.model_lr = 0.01
  c.idm.model_momentum = 0.9
  c.idm.model_weight_decay = 5e-4
  # "Model augmentation" (paper supplement, ImageNet subset; not in the release's
  # commands, so off everywhere): each queue net's lr is model_lr * U(1 -+ jitter)
  # (paper: 0.1) and it trains only on a random subset of this fraction of the
  # classes (the paper gives no fraction; 1.0 = all classes, off).
  c.idm.model_aug_lr_jitter = 0.0
  c.idm.model_aug_class_fraction = 1.0
  c.idm.meter_reset_interval = 100  # release: eval_interval; meters reset (0 = never)
  # Queue members trained one after another ("map", each a plain full-batch network) or batched
  # ("vmap": grouped convs with conv_impl "xla"/"matmul", batched matmuls with "taps"). "auto": "map".
  c.idm.queue_train_impl = "auto"
  # How the condensation step's convs are computed (models.CONV_IMPLS, values unchanged): "xla",
  # "matmul" (im2col weight gradient), "taps" (matmuls only); "auto": "matmul" on CPU, else "xla".
  c.idm.conv_impl = "auto"
  c.idm.real_chunk_size = defaults.REAL_CHUNK_SIZE  # real images per forward chunk (memory)
  c.idm.class_batch = 0  # classes vectorised together; 0 = auto (condense.auto_class_batch)
  # Pre-trained pool (paper Fig. 3; idm_jax/pool.py): E > 0 with use_queue=False matches in a
  # network drawn from pool_size nets trained E epochs on the real data (built once, cached).
  c.idm.pool_epochs = 0  # E; 0 = off (fresh random nets, as DM)
  c.idm.pool_size = 100  # the paper pre-trains 100 ConvNets per E (600 for E = 10..60)

  c.eval = ml_collections.ConfigDict()
  c.eval.archs = "ConvNet"  # comma-separated, e.g. "ConvNet,AlexNet,VGG11,ResNet18"
  c.eval.num_seeds = defaults.EVAL_NUM_SEEDS  # independently initialised nets, trained together
  c.eval.epochs = defaults.EVAL_EPOCHS  # lr x0.1 at epochs // 2
  c.eval.batch_size = defaults.EVAL_BATCH_SIZE
  c.eval.lr = defaults.EVAL_LR
  c.eval.momentum = defaults.EVAL_MOMENTUM
  c.eval.weight_decay = defaults.EVAL_WEIGHT_DECAY
  c.eval.dsa = True  # per-image DSA while training evaluation nets
  c.eval.test_batch_size = defaults.EVAL_TEST_BATCH_SIZE
  c.eval.interval = 0  # evaluate during condensation every N its (0 = off)
  c.eval.interval_epochs = 300  # epochs for those periodic evaluations
  c.eval.at_end = True  # full evaluation of the final synthetic set
  # Also score ipc random real images per class with the same evaluation and report both
  # (the quick demo's "IDM vs Random" line); off for the paper configs.
  c.eval.compare_random = False
  # DD-Ranking's scores (idm_jax/references.py, docs/EVALUATE_ANY_SET.md): beside the set's accuracy,
  # the accuracy of ipc random real images per class and of the whole training set under this same
  # evaluation (each measured once, cached under <data cache>/references/), and HLR, IOR, LRS.
  c.eval.scores = True
  c.eval.scores_weight = 0.5  # w of LRS = (e^a - e^-1) / (e - e^-1), a = w * IOR - (1 - w) * HLR
  # The whole-data accuracy (%) to use instead of training on the whole set (0 = not given), and
  # where it comes from (required with it), e.g. 84.8 and "paper Table 1".
  c.eval.whole_data_accuracy = 0.0
  c.eval.whole_data_source = ""
  # Train on the whole set here only up to this many training images (the digits: yes; CIFAR-10's
  # 50,000: no, give whole_data_accuracy); a cached measurement is used whatever the size.
  c.eval.whole_data_max_images = 10000
  # The seeds' networks train one after another (lax.map, "map") or batched (jax.vmap, "vmap":
  # with conv_impl "xla" or "matmul" its convs become grouped convs, slow on CPU and CUDA; with
  # "taps", batched matmuls). "auto": "map" (idm_jax/backend.py).
  c.eval.seed_parallel = "auto"
  # How the evaluation networks' convs are computed: "xla", "matmul" (im2col weight gradient, the
  # CPU's), "taps" (matmuls only); "auto": by backend (idm_jax/convs.py). Values do not change.
  c.eval.conv_impl = "auto"
  # "device": epochs run in a jitted loop (GPU/TPU); "host": one jitted step,
  # Python loop (CPU, where conv gradients inside loops are slow). "auto".
  c.eval.loop = "auto"
  # "release": epochs+1 passes, lr x0.1 and a fresh optimizer after pass
  # epochs//2+1 (what the release runs); "paper": epochs passes, drop at half.
  c.eval.schedule = defaults.EVAL_SCHEDULE

  c.baseline = ml_collections.ConfigDict()
  c.baseline.method = "random"  # "random" | "herding" | "forgetting" | "whole"
  c.baseline.train_epochs = 30  # epochs of the feature/forgetting network

  # The paper's other experiments (main.py --mode=continual | consistency | sweep).
  c.continual = ml_collections.ConfigDict()  # Sec. 5.6, Fig. 8 (idm_jax/continual.py)
  c.continual.num_steps = "5,10"  # class-incremental settings: classes split into this many steps
  c.continual.methods = "idm,dm,random"  # memory construction; idm runs with partition_factor below
  c.continual.ipc = 20  # memory budget: images per seen class
  c.continual.partition_factor = 1  # the paper's l = 1 for continual learning
  c.continual.class_order_seeds = "0,1,2,3,4"  # order = np.random.RandomState(seed).permutation
  c.continual.iterations = 0  # condensation iterations per step; 0 = idm.iterations

  c.consistency = ml_collections.ConfigDict()  # Sec. 5.3, Fig. 4 (idm_jax/consistency.py)
  c.consistency.max_k = 100  # nearest real neighbours k = 1..max_k
  c.consistency.feature_epochs = 30  # epochs of the feature network trained on the real data
  c.consistency.sets = "fig4"  # without --synthetic: condense this sweep's cells, then score them

  c.sweep = ml_collections.ConfigDict()  # Tables 2-3, Figs. 3, 5-7 (idm_jax/sweeps.py)
  c.sweep.name = "table2"  # a key of idm_jax.sweeps.SWEEPS
  c.sweep.iterations = 0  # condensation iterations per cell; 0 = idm.iterations
  c.sweep.cells = ""  # comma-separated cell names to run; "" = all

  # The paper's Table 1 (main.py --mode=table1, idm_jax/table1.py): cells run in turn, resumable.
  c.table1 = ml_collections.ConfigDict()
  c.table1.cells = "cifar10:1,cifar10:10,cifar10:50"  # <config file name>:<ipc>, e.g. quick:1
  c.table1.methods = "random,dm,idm"  # any of these; run cheapest first (this order)
  c.table1.iterations = 20000  # condensation iterations of DM and IDM cells (the paper's)
  c.table1.order = ""  # cells run first, e.g. "cifar10:10:idm"; "" = cheapest first
  c.table1.budget_s = 0.0  # seconds for everything: a cell starts only when it fits; 0 = no limit
  c.table1.tune_s = 0.0  # seconds timing step variants before the first DM/IDM cell; 0 = off
  c.table1.pace = ""  # s/iteration instead of the measured ones, e.g. "idm=0.1,dm=0.02"
  c.table1.startup_s = 30.0  # a cell's start-up and compiling, in its estimate
  c.table1.eval_s = 0.0  # 5 nets x 1000 epochs of an IPC-10 set (s); 0 = docs/gpu_speed.json's
  c.table1.export_dir = ""  # copy table1.* and the finished sets here ("" = no copy)
  c.table1.export_max_files = 0  # at most this many files there, a temporary included; 0 = no cap
  c.table1.export_max_mb = 0.0  # files over this many MB are left out; 0 = no cap

  # Devices the synthetic set's class axis is sharded over (one host): 0 = as
  # many local devices as divide the class count, 1 = a single device.
  c.mesh_devices = 0
  c.log_every = 10  # iterations between progress lines / metrics rows
  c.checkpoint_every = 500  # iterations between orbax checkpoints (0 = off)
  # Also checkpoint when this much wall-clock time passed since the newest
  # checkpoint (0 = off): a crash loses at most ~10 minutes, even on a CPU where
  # 500 iterations take hours. The first iteration of a fresh run is saved too.
  c.checkpoint_every_minutes = 10.0
  c.keep_checkpoints = 2
  return c


# The paper's protocol: 5 condensations (the release's --num_exp 5), each evaluated by
# eval.num_seeds (5) networks; its mean +- std are over those 25 networks.
PAPER = "paper"
PAPER_RUNS = 5


def parse_arg(arg: str | None, default_ipc: int = 10) -> tuple[int, str, bool]:
  """Parses a config argument "<ipc>[,<method>][,paper]", e.g. "10", "1,dm" or "10,paper".

  Returns (ipc, method, paper): paper = the paper's protocol (runs = PAPER_RUNS).
  """
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  ipc, method, paper = default_ipc, "idm", False
  for part in parts:
    if part.isdigit():
      ipc = int(part)
    elif part in METHODS:
      method = part
    elif part == PAPER:
      paper = True
    else:
      raise ValueError(
          f"bad config argument {arg!r}: {part!r} is neither an IPC number, "
          f"a method in {METHODS} nor {PAPER!r}; e.g. 'cifar10.py:10', "
          "'cifar10.py:1,dm' or 'cifar10.py:10,paper'")
  if ipc < 1:
    raise ValueError(f"IPC must be >= 1, got {ipc} (config argument {arg!r})")
  return ipc, method, paper


def first_existing(paths, fallback: str) -> str:
  """The first path that exists, else `fallback` (e.g. a tfds name)."""
  for p in paths:
    if p and os.path.exists(os.path.expanduser(p)):
      return os.path.abspath(os.path.expanduser(p))
  return fallback


def make_config(arg, dataset_settings, per_ipc, default_ipc=10):
  """Builds a dataset config: base, then dataset fields, then IPC row.

  Args:
    arg: the ":<ipc>[,<method>][,paper]" string from --config=configs/x.py:<arg>.
    dataset_settings: {dotted key: value} applied for every IPC.
    per_ipc: {ipc: {dotted key: value}} - the release's command table.
    default_ipc: IPC when the argument is empty.
  """
  ipc, method, paper = parse_arg(arg, default_ipc)
  c = get_config()
  c.ipc = ipc
  if paper:
    c.runs = PAPER_RUNS
  # IPCs outside the table (e.g. 20) take the nearest row's settings.
  row = per_ipc[min(per_ipc, key=lambda k: (abs(k - ipc), k))]
  for key, value in {**dataset_settings, **row}.items():
    set_dotted(c, key, value)
  apply_method(c, method)
  return c
