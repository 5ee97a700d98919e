"""The authors' release defaults that both a config and the library's keyword defaults need,
written once: configs/base.py sets its fields from these, and the signatures of trainer.py,
evaluate.py, loss.py and augment.py default to them. Plain data, no JAX (a config stays cheap)."""

# DSA: every family, in the release's order of application (augment.parse_strategy).
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"

# The evaluation protocol (config eval.*): networks trained from scratch on a set, then tested.
EVAL_NUM_SEEDS = 5  # independently initialised networks
EVAL_EPOCHS = 1000  # lr x 0.1 at epochs // 2
EVAL_BATCH_SIZE = 256
EVAL_LR = 0.01
EVAL_MOMENTUM = 0.9
EVAL_WEIGHT_DECAY = 5e-4
EVAL_TEST_BATCH_SIZE = 1000
EVAL_SCHEDULE = "release"  # trainer.SCHEDULES

# The matching loss (config idm.*).
PARTITION_FACTOR = 2  # l: each synthetic image holds l x l pieces
CE_WEIGHT = 0.5  # lambda_reg (IPC 1 and 10; the paper's IPC-50 rows use 0.1)
REAL_CHUNK_SIZE = 1024  # real images per forward pass (memory only)
