"""Default configuration shared by every model config.

`get_config(arg)` takes a preset name after the config path's colon
(`--config=configs/unet.py:demo`): "" (defaults), "paper", "demo" or "tiny".
Every field can be overridden on the command line, e.g. `--config.train.learning_rate=1e-5`.
"""

import ml_collections

PRESETS = ("", "paper", "demo", "tiny", "cpu")


def base_config() -> ml_collections.ConfigDict:
    """All fields with their defaults (the built-in synthetic data, 240x240 slices)."""
    c = ml_collections.ConfigDict()
    c.name = "default"

    c.data = d = ml_collections.ConfigDict()
    d.source = "synthetic"  # synthetic | kaggle_h5 | nifti
    d.root = ""  # Kaggle slice folder or raw NIfTI release folder
    d.cache_dir = ""  # NIfTI slice cache; "" -> ~/.cache/brats_jax/<hash of root>
    d.image_size = 240  # slices are resized to image_size x image_size; 0 = native size
    d.prune = True  # the study's pruning of near-empty background slices
    d.min_brain_fraction = 0.2  # pruning threshold on the brain (non-zero) area fraction
    d.val_fraction = 0.1  # of cases (patients), not slices
    d.test_fraction = 0.1
    d.val_cases = ""  # comma-separated case IDs; a split given by IDs ignores its fraction
    d.test_cases = ""
    d.split_seed = 0
    d.num_folds = 0  # > 1: cross-validation over the non-test cases (data/folds.py); 0 = off
    d.fold = 0  # this run's validation fold, 0..num_folds-1
    d.random_flip = False
    d.num_workers = 0  # grain worker processes; 0 = read in the main process
    d.synthetic_num_cases = 24
    d.synthetic_slices_per_case = 24
    d.synthetic_image_size = 240

    c.model = m = ml_collections.ConfigDict()
    m.name = "unet"  # unet | transunet
    m.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
    m.base_features = 64  # U-Net: channels of the first level (64 = the study's network)
    m.depth = 4  # U-Net: number of poolings
    m.norm = "none"  # U-Net: none | batch | group
    m.padding = "reflect"  # U-Net: reflect | zero
    m.conv_impl = "auto"  # U-Net ops (brats_jax.ops): auto | cpu_fast | gpu_fast | xla
    m.preset = "r50_vit_b16"  # TransUNet: r50_vit_b16 | small | tiny
    m.n_skip = 3  # TransUNet: skip connections used by the decoder
    m.pretrained_path = ""  # TransUNet: Google's R50+ViT-B_16.npz ("" = random init)

    c.train = t = ml_collections.ConfigDict()
    t.loss = "ce"  # ce | cb_ce | focal | cb_focal | dice | dice_ce
    t.gamma = 1.0  # focal losses
    t.beta = 0.99  # class-balanced losses (Cui et al.), weights from training pixel counts
    t.dice_weight = 0.5  # dice_ce: weight of the Dice term (CE gets 1 - dice_weight)
    t.optimizer = "adam"  # adam | adamw
    t.learning_rate = 1e-4
    t.schedule = "constant"  # constant | warmup_cosine
    t.warmup_steps = 0
    t.weight_decay = 0.0
    t.grad_clip_norm = 0.0  # 0 = no clipping
    t.batch_size = 1  # global batch (all devices, all hosts)
    t.num_epochs = 10
    t.num_steps = 0  # > 0 overrides num_epochs
    t.seed = 0
    t.log_every_steps = 50
    t.eval_every_steps = 0  # 0 = at the end of every epoch
    t.checkpoint_every_steps = 1000
    t.keep_checkpoints = 2  # last K checkpoints kept, plus the best by validation Dice

    c.eval = e = ml_collections.ConfigDict()
    e.batch_size = 16  # slices per evaluation/prediction step
    e.max_val_batches = 0  # 0 = whole validation split
    e.hd95_mode = "max"  # max (MONAI: max of directed 95th percentiles) | pooled (medpy)
    e.num_figure_slices = 6
    e.tta = "none"  # test-time flips of the test pass: none | flips | flips_ud (inference.py)
    return c


def apply_preset(c: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
    """Apply a preset in place.

    "paper": the study; "demo": synthetic data, <5 min on a CPU; "tiny": tests;
    "cpu": real data (give data.source and data.root) within ~30 min on 2 CPU cores.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS[1:]} or nothing")
    c.name = f"{c.model.name}-{preset}" if preset else c.model.name
    if preset == "paper":
        # The study: pruned 240x240 slices, batch 1, Adam, 10 epochs, unweighted CE.
        c.data.image_size = 240
        c.data.prune = True
        c.train.loss = "ce"
        c.train.batch_size = 1
        c.train.num_epochs = 10
        c.train.log_every_steps = 500
        c.train.checkpoint_every_steps = 5000
    elif preset == "demo":
        c.data.synthetic_num_cases = 20
        c.data.synthetic_slices_per_case = 24
        c.data.synthetic_image_size = 64
        c.data.image_size = 64
        c.data.val_fraction = 0.1
        c.data.test_fraction = 0.15
        c.data.random_flip = True
        c.train.batch_size = 8
        c.train.num_epochs = 0
        c.train.num_steps = 400
        c.train.learning_rate = 1e-3
        c.train.log_every_steps = 25
        c.train.eval_every_steps = 100
        c.train.checkpoint_every_steps = 100
        c.eval.max_val_batches = 8
    elif preset == "cpu":
        # Real data on a CPU budget (~30 min on 2 cores): 128 px, batch 8, Dice + CE.
        c.data.image_size = 128
        c.data.random_flip = True
        c.data.val_fraction = 0.0
        c.train.loss = "dice_ce"
        c.train.batch_size = 8
        c.train.num_epochs = 0
        c.train.num_steps = 2500
        c.train.learning_rate = 2e-3
        c.train.schedule = "warmup_cosine"
        c.train.warmup_steps = 100
        c.train.log_every_steps = 50
        c.train.eval_every_steps = 500
        c.train.checkpoint_every_steps = 250
        c.eval.batch_size = 32
    elif preset == "tiny":
        c.data.synthetic_num_cases = 6
        c.data.synthetic_slices_per_case = 6
        c.data.synthetic_image_size = 32
        c.data.image_size = 32
        c.data.val_fraction = 0.2
        c.data.test_fraction = 0.2
        c.train.batch_size = 2
        c.train.num_epochs = 0
        c.train.num_steps = 6
        c.train.learning_rate = 1e-3
        c.train.log_every_steps = 2
        c.train.eval_every_steps = 3
        c.train.checkpoint_every_steps = 2
        c.eval.batch_size = 4
        c.eval.num_figure_slices = 2
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The default (U-Net) configuration with an optional preset."""
    return apply_preset(base_config(), arg or "")
