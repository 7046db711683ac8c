"""The embedded default: the small CNN on scikit-learn's digits, trained with ANP.

Run it with ``anp-jax train --workdir=DIR``; change any field with
``--config.FIELD=VALUE`` (for example ``--config.method=vanilla``).  ``anp-jax train
--help`` lists every field with its default and the comment that follows it here.

A run resumed in the same workdir must have the same config, except for the fields that
do not change the trained model: ``eval.*``, ``eval_every_epochs``, ``log_every_steps``,
``tensorboard``, ``checkpoint_every_steps``, ``checkpoint_min_secs``, ``keep_checkpoints``,
``prefetch_batches``,
``data_dir``, ``download``, and ``num_epochs`` when it grows and the schedules of the epochs
already trained stay the same (``anp_jax.trainer.RESUMABLE_FIELDS``).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.dataset = "digits"  # a data set of anp_jax.data.DATASETS
    config.data_dir = ""  # "" means $TFDS_DATA_DIR or ~/tensorflow_datasets
    config.download = False  # let TFDS download a data set that is not prepared
    config.augment = "none"  # "none", "flip" or "pad_crop_flip" (on device, per example)
    # "auto" (in memory for the small sets, tf.data streaming for ImageNet), "memory", "stream"
    config.input_pipeline = "auto"
    config.image_size = 0  # streaming sets: crop size (0: the data set's, 224 for ImageNet)
    config.shuffle_buffer_size = 10_000  # streaming sets
    config.prefetch_batches = 2  # batches put on the devices ahead of the step
    config.mean = ()  # standardisation inside the model (pixels stay in [0, 1]): (), (m,)
    config.std = ()  # or (r, g, b)
    # "float32", or "bfloat16": mixed precision (bf16 activations, matmuls and noise
    # registers; float32 parameters, optimiser state and loss)
    config.dtype = "float32"
    config.model = "digits_cnn"  # see anp_jax.models.MODELS
    # "vanilla", "anp", "replay" (k updates per mini-batch, no noise: ANP's control);
    # adversarial training "pgd_at", "trades", "fast_at", "free_at"; with ANP "anp_pgd_at",
    # "anp_trades", "anp_fast_at", "anp_free_at"; their controls (the adversarial training
    # with ANP's k updates per mini-batch, no noise) "replay_pgd_at", "replay_trades",
    # "replay_fast_at".
    config.method = "anp"
    config.seed = 0  # parameter init, data order, augmentation, dropout and noise init

    config.num_epochs = 30  # passes over the training split
    config.batch_size = 32  # global batch, split across devices and processes
    config.optimizer = "sgd"  # "sgd" (momentum, L2 weight decay) or "adam" (AdamW)
    config.learning_rate = 0.05  # peak learning rate
    config.lr_schedule = "cosine"  # "constant", "cosine" or "step"
    config.lr_decay_epochs = 30  # "step": multiply by lr_decay_factor every this many epochs
    config.lr_decay_factor = 0.1  # "step": the factor of each drop
    # "step": the drops come this many epochs early (1: PyTorch's StepLR stepped at the
    # start of each epoch, the official code's drops at epochs 29, 59, 89, ... for 30)
    config.lr_decay_offset = 0
    config.momentum = 0.9  # SGD momentum
    config.weight_decay = 5e-4  # L2 weight decay (SGD) or decoupled decay (Adam)

    config.anp = ml_collections.ConfigDict()  # Adversarial Noise Propagation
    config.anp.layers = "all"  # "all", "0,1", "input,conv1", "shallow N", "deep N"
    config.anp.epsilon = 1.0  # eps: noise magnitude (per-example norm of the register);
    # with schedule "official", the peak of its eps column
    config.anp.alpha = 0.5  # alpha (the paper's eta): how much of the previous noise is kept
    config.anp.k = 2  # progressive steps: parameter updates per mini-batch
    config.anp.norm = "l2"  # "l2" (official), "linf" or "sign"
    config.anp.init = "none"  # "none" (official), "gaussian" or "uniform"
    config.anp.reset_per_batch = True  # zero the registers at every mini-batch (official)
    # The official code's input rule: the input's gradient summed over the k progressive
    # steps (g1, g1+g2, ...), hidden points use the current step's (noise.accumulate_gradients)
    config.anp.accumulate_input_grad = False
    # Noise relative to the activations: the injection at a point scaled by ||z|| per
    # example (noise.scale_by_activation_norm); needs anp.init = "none"
    config.anp.scale_by_activation_norm = False
    # "constant"; "official" (the CIFAR-10 table stretched to num_epochs, its eps column
    # times epsilon: the table's own values at 1.0); "linear" or
    # "cosine" (eps rises from 0 over warmup_epochs); "piecewise" (the lists below).
    config.anp.schedule = "constant"
    config.anp.warmup_epochs = 5.0  # "linear"/"cosine": epochs for eps to reach epsilon
    config.anp.boundaries = (10.0, 20.0)  # "piecewise": epochs where the values change
    config.anp.eps_values = (0.0, 1.0, 0.0)  # "piecewise": eps on each interval
    config.anp.alpha_values = (0.0, 0.5, 0.0)  # "piecewise": alpha on each interval
    config.anp.k_values = (1, 2, 1)  # "piecewise": k on each interval

    config.adv = ml_collections.ConfigDict()  # adversarial training, pixel units
    config.adv.norm = "linf"  # "linf" (the methods' own) or "l2" (normalised-gradient steps)
    config.adv.epsilon = 0.1  # budget of the training attack, in adv.norm
    config.adv.step_size = 0.025  # attack step size
    config.adv.steps = 7  # attack steps (PGD-AT, TRADES)
    config.adv.beta = 6.0  # TRADES
    config.adv.replays = 4  # Free-AT: updates per mini-batch

    config.eval = ml_collections.ConfigDict()  # evaluation (may change on resume)
    config.eval.batch_size = 512  # global evaluation batch
    # attacks of the final evaluation, ATTACK[STEPS]_NORM_EPS (pixels in [0, 1])
    config.eval.attacks = ("fgsm_linf_0.1", "fgsm_linf_0.2", "pgd10_linf_0.1", "pgd10_linf_0.2")
    # corruptions of the final evaluation, NAME_SEVERITY (severity 1-5)
    config.eval.corruptions = ("gaussian_noise_1", "gaussian_noise_3", "gaussian_noise_5")
    config.eval.curve_examples = 256  # learning curves: the first N test examples
    # learning curves: the quick attack ("": PGD-10 at the first of eval.attacks' budgets)
    config.eval.curve_attack = ""

    config.num_devices = -1  # -1: all local devices
    # Unroll the k progressive updates ("auto": on CPU, where XLA runs convolution
    # gradients inside loops slowly); otherwise one lax.fori_loop over a traced k.
    config.unroll_k = "auto"
    config.checkpoint_every_steps = -1  # mini-batches between checkpoints; -1: every epoch
    # with checkpoint_every_steps=-1: an epoch's checkpoint is skipped if the last one is
    # younger than this (short epochs would spend much of their time saving); the last
    # mini-batch and a stop signal always save; 0: every epoch
    config.checkpoint_min_secs = 60.0
    config.keep_checkpoints = 3  # checkpoints kept (the newest)
    # learning curves: a train row (loss, accuracy, noise norm, eps, alpha, k, lr) every
    # this many mini-batches and at the end of every epoch, in metrics.jsonl and TensorBoard
    config.log_every_steps = 50
    # learning curves: clean and quick robust accuracy every this many epochs (0: never)
    config.eval_every_epochs = 10
    config.tensorboard = True  # write TensorBoard event files into the workdir
    return config
