"""The whole config checked once, before any device, dataset or checkpoint is touched.

Part of the entry layer with cli.py: it may read the tables and checks of the mode modules (the
metric table of evaluation/run.py, the parts of bench.py, convert's checks); library modules
never import it.

`validate_config(config, mode, workdir)` walks every section and raises `ConfigError` naming the
key, the bad value and what is allowed; the modes then trust the config. Allowed values come from
the modules that own them (samplers, diffusion, schedules, evaluation), so a new sampler or
metric is allowed here as soon as it is in its module's table. Checks that need the device
count (batches split over all devices) run in `check_device_divisibility`, after the processes
of a multi-process run have joined.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import ml_collections
import numpy as np

from jax_diffusion.config_files import comma_list
from jax_diffusion.errors import ConfigError

DIGITS = "digits"
FLOAT_DTYPES = ("float32", "bfloat16")


def _require(condition: bool, key: str, value, rule: str) -> None:
    if not condition:
        raise ConfigError(f"config.{key}={value!r} {rule}")


def _choice(value, key: str, allowed: Sequence[str]) -> None:
    _require(value in allowed, key, value, f"is unknown; allowed: {', '.join(map(str, allowed))}")


def _positive_int(section: ml_collections.ConfigDict, name: str, prefix: str,
                  minimum: int = 1) -> None:
    value = section[name]
    _require(isinstance(value, (int, np.integer)) and not isinstance(value, bool)
             and value >= minimum, f"{prefix}.{name}", value, f"must be an integer >= {minimum}")


def _fraction(value: float, key: str, low: float, high: float, *, high_open: bool) -> None:
    inside = low <= value < high if high_open else low <= value <= high
    _require(inside, key, value, f"must lie in [{low:g}, {high:g}{')' if high_open else ']'}")


def _check_workdir(workdir: str) -> None:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir} is a file, not a directory; give a directory "
                          f"(it is created when missing)")


def _check_data(data: ml_collections.ConfigDict) -> None:
    _require(isinstance(data.dataset, str) and data.dataset.strip(), "data.dataset",
             data.dataset, f"must name a dataset: {DIGITS!r} (offline) or a tfds image dataset "
             f"such as 'cifar10'")
    _positive_int(data, "image_size", "data")
    _choice(data.channels, "data.channels", (1, 3))
    _positive_int(data, "worker_count", "data", minimum=0)
    _require(isinstance(data.download, bool), "data.download", data.download,
             "must be True or False")
    _require(isinstance(data.decoded_cache, bool), "data.decoded_cache", data.decoded_cache,
             "must be True or False")
    _require(data.prepare_timeout > 0, "data.prepare_timeout", data.prepare_timeout,
             "must be > 0 seconds")
    if data.dataset == DIGITS:
        _require(data.channels == 1, "data.channels", data.channels,
                 "must be 1 for the digits dataset (grayscale)")
    else:
        _check_tfds_name(data.dataset)


def _check_tfds_name(name: str) -> None:
    """An unknown dataset fails here, not after the model is built. tfds is imported only for
    non-digits datasets (it takes a few seconds)."""
    import tensorflow_datasets as tfds
    try:
        tfds.builder_cls(name)
    except Exception:  # noqa: BLE001  (tfds raises DatasetNotFoundError or a registry error)
        raise ConfigError(
            f"config.data.dataset={name!r} is neither {DIGITS!r} nor a dataset tfds knows "
            f"(e.g. 'cifar10', 'mnist'; see tfds.list_builders())") from None


def _check_model(config: ml_collections.ConfigDict) -> None:
    from jax_diffusion.models import validate_model_config
    model = config.model
    validate_model_config(model, image_size=config.data.image_size)
    learned = config.diffusion.var_type == "learned_range"
    _require(model.learn_sigma == learned, "model.learn_sigma", model.learn_sigma,
             f"must be {learned} with config.diffusion.var_type={config.diffusion.var_type!r} "
             f"(learned_range needs the 2C-channel output, the fixed variances a C-channel one)")


def _check_diffusion(diffusion: ml_collections.ConfigDict) -> None:
    from jax_diffusion import diffusion as gaussian
    from jax_diffusion import schedules
    _choice(diffusion.schedule, "diffusion.schedule", schedules.SCHEDULES)
    _positive_int(diffusion, "num_timesteps", "diffusion")
    _choice(diffusion.mean_type, "diffusion.mean_type", gaussian.MEAN_TYPES)
    _choice(diffusion.var_type, "diffusion.var_type", gaussian.VAR_TYPES)
    _choice(diffusion.loss_type, "diffusion.loss_type", gaussian.LOSS_TYPES)
    _choice(diffusion.loss_weighting, "diffusion.loss_weighting", gaussian.LOSS_WEIGHTINGS)
    _require(diffusion.min_snr_gamma > 0, "diffusion.min_snr_gamma", diffusion.min_snr_gamma,
             "must be > 0 (5 in Hang et al. 2023)")
    _require(isinstance(diffusion.rescale_timesteps, bool), "diffusion.rescale_timesteps",
             diffusion.rescale_timesteps, "must be True or False")
    _require(not (diffusion.loss_type == "mse" and diffusion.var_type == "learned_range"),
             "diffusion.loss_type", diffusion.loss_type,
             "does not train a learned variance: use 'hybrid' or 'kl' with "
             "config.diffusion.var_type='learned_range'")


def _check_train(config: ml_collections.ConfigDict) -> None:
    train = config.train
    for name in ("num_steps", "batch_size", "steps_per_jit", "max_to_keep"):
        _positive_int(train, name, "train")
    for name in ("epochs", "iterations_per_epoch", "warmup_steps", "log_every",
                 "checkpoint_every", "sample_every"):
        _positive_int(train, name, "train", minimum=0)
    _require(train.lr > 0, "train.lr", train.lr, "must be > 0")
    from jax_diffusion.train_state import learning_rate_schedule
    learning_rate_schedule(train)  # raises ConfigError for an unknown or impossible lr_schedule
    _require(train.grad_clip > 0, "train.grad_clip", train.grad_clip, "must be > 0")
    _require(train.weight_decay >= 0, "train.weight_decay", train.weight_decay, "must be >= 0")
    _fraction(train.ema_decay, "train.ema_decay", 0.0, 1.0, high_open=True)
    _fraction(train.label_dropout, "train.label_dropout", 0.0, 1.0, high_open=True)
    if train.label_dropout > 0:
        _require(config.model.num_classes > 0, "train.label_dropout", train.label_dropout,
                 "needs a class-conditional model (config.model.num_classes > 0)")
    from jax_diffusion.train_step import STEP_LOOPS
    _choice(train.step_loop, "train.step_loop", STEP_LOOPS)
    k = train.steps_per_jit
    for name in ("log_every", "checkpoint_every", "sample_every"):
        _require(train[name] % k == 0, f"train.{name}", train[name],
                 f"must be 0 or a multiple of config.train.steps_per_jit={k}")
    if train.epochs == 0 or train.iterations_per_epoch > 0:  # else it needs the dataset size
        steps = (train.epochs * train.iterations_per_epoch if train.epochs
                 else train.num_steps)
        _require(steps % k == 0, "train.num_steps" if not train.epochs else "train.epochs",
                 steps, f"gives a run length that must be a multiple of "
                 f"config.train.steps_per_jit={k}")


def _check_sample(config: ml_collections.ConfigDict) -> None:
    from jax_diffusion import samplers
    sample = config.sample
    samplers.check_sample_config(config)
    if sample.guidance_scale != 1.0:
        _require(config.model.num_classes > 0, "sample.guidance_scale", sample.guidance_scale,
                 "needs a class-conditional model (config.model.num_classes > 0); use 1")
    for name in ("num_samples", "batch_size", "grid_size"):
        _positive_int(sample, name, "sample")
    _positive_int(sample, "checkpoint_step", "sample", minimum=-1)


def _check_sweep(config: ml_collections.ConfigDict) -> None:
    """Every setting of config.eval.sweep must be a sampler that runs on this config."""
    from jax_diffusion.evaluation.sweep import parse_sweep, sweep_config
    for method, nfe in parse_sweep(config.eval.sweep):
        sweep_config(config, method, nfe)  # runs samplers.check_sample_config


def _npz_keys(path: str, key: str) -> set[str]:
    if not os.path.isfile(path):
        raise ConfigError(f"config.{key}={path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as file:
            return set(file.files)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config.{key}={path!r} is not a readable .npz file ({e})") from None


def _check_eval(config: ml_collections.ConfigDict, mode: str) -> None:
    from jax_diffusion import downloads
    from jax_diffusion.evaluation import dinov2, inception
    from jax_diffusion.evaluation.inception import WEIGHTS_FILE
    from jax_diffusion.evaluation.precision_recall import NEAREST_K
    from jax_diffusion.evaluation.reference_stats import PREPROCESS_KEY, SPATIAL_KEYS
    from jax_diffusion.evaluation.run import INCEPTION_METRICS, METRICS, SAMPLE_METRICS
    evaluation = config.eval
    metrics = comma_list(evaluation.metrics, "config.eval.metrics", METRICS)
    for name in ("num_samples", "batch_size", "nll_batch_size"):
        _positive_int(evaluation, name, "eval")
    _positive_int(evaluation, "nll_examples", "eval", minimum=0)
    if mode != "eval":
        return
    if evaluation.sweep:
        _check_sweep(config)
        _require(set(metrics) & SAMPLE_METRICS, "eval.metrics", evaluation.metrics,
                 f"has no metric that scores samples for config.eval.sweep; use one of "
                 f"{', '.join(sorted(SAMPLE_METRICS))}")
    if "digits" in metrics:
        _require(config.data.dataset == DIGITS and config.model.num_classes == 10,
                 "eval.metrics", evaluation.metrics,
                 "asks for 'digits', which scores class-conditional samples of the digits "
                 "dataset: it needs config.data.dataset='digits' and config.model.num_classes=10")
    inception_metrics = set(metrics) & INCEPTION_METRICS
    if {"fid", "kid", "sfid", "fd_dinov2"} & set(metrics):
        _require(evaluation.num_samples >= 2, "eval.num_samples", evaluation.num_samples,
                 "must be >= 2 for FID/KID/sFID/FD-DINOv2 (a covariance needs two samples)")
    if "pr" in metrics:
        _require(evaluation.num_samples > NEAREST_K, "eval.num_samples", evaluation.num_samples,
                 f"must be > {NEAREST_K} for precision/recall (each point's {NEAREST_K}-th "
                 f"nearest neighbour)")
    dinov2.check_config(evaluation, wanted="fd_dinov2" in metrics)
    if evaluation.samples_dir and set(metrics) & SAMPLE_METRICS:
        _require(os.path.isdir(evaluation.samples_dir), "eval.samples_dir",
                 evaluation.samples_dir, "is not a directory; write samples there with "
                 "--mode=sample or leave it empty to sample on the fly")
    inception.check_preprocess_mode(evaluation.inception_preprocess)
    _require(downloads.SHA256_PATTERN.fullmatch(str(evaluation.inception_sha256).lower()),
             "eval.inception_sha256", evaluation.inception_sha256,
             "must be the 64 hex digits of the weights file's SHA-256")
    if evaluation.reference_stats and {"fid", "kid", "pr", "sfid"} & inception_metrics:
        keys = _npz_keys(evaluation.reference_stats, "eval.reference_stats")
        if PREPROCESS_KEY in keys:
            with np.load(evaluation.reference_stats, allow_pickle=False) as file:
                recorded = str(file[PREPROCESS_KEY])
            _require(recorded == evaluation.inception_preprocess, "eval.reference_stats",
                     evaluation.reference_stats,
                     f"was computed with inception_preprocess={recorded!r}, but "
                     f"config.eval.inception_preprocess={evaluation.inception_preprocess!r}: "
                     f"statistics of different conventions are not comparable")
        _require({"mu", "sigma"} <= keys, "eval.reference_stats", evaluation.reference_stats,
                 f"needs arrays 'mu' and 'sigma' (it holds {sorted(keys)})")
        _require("kid" not in metrics or "features" in keys, "eval.reference_stats",
                 evaluation.reference_stats,
                 "holds only mu/sigma, but KID needs the reference 'features': drop kid from "
                 "config.eval.metrics or leave reference_stats empty to compute them")
        _require("pr" not in metrics or "features" in keys, "eval.reference_stats",
                 evaluation.reference_stats,
                 "has no reference 'features', which precision/recall needs: drop pr from "
                 "config.eval.metrics or leave reference_stats empty to compute them")
        _require("sfid" not in metrics or set(SPATIAL_KEYS) <= keys, "eval.reference_stats",
                 evaluation.reference_stats,
                 f"has no sFID statistics {', '.join(SPATIAL_KEYS)}: drop sfid from "
                 f"config.eval.metrics or leave reference_stats empty to compute them")
    if inception_metrics and evaluation.inception_weights != "auto":
        _require(os.path.isfile(evaluation.inception_weights), "eval.inception_weights",
                 evaluation.inception_weights,
                 f"is not a file; config.eval.metrics asks for "
                 f"{', '.join(sorted(inception_metrics))}, which need the FID Inception weights "
                 f"{WEIGHTS_FILE} (the file pytorch-fid and torch-fidelity use) or an .npz of "
                 f"the same parameters")


def _check_bench(bench: ml_collections.ConfigDict) -> None:
    from jax_diffusion import samplers
    from jax_diffusion.bench import PARTS
    comma_list(bench.parts, "config.bench.parts", PARTS)
    comma_list(bench.sample_steps, "config.bench.sample_steps", integers=True)
    from jax_diffusion.bench_host import parse_worker_counts
    parse_worker_counts(bench.data_workers)
    for name in ("steps_per_jit", "memory_batches"):
        comma_list(bench[name], f"config.bench.{name}", integers=True)
    for name in ("data_batch_size", "data_batches", "checkpoint_loop_calls"):
        _positive_int(bench, name, "bench")
    _positive_int(bench, "gap_batches", "bench", minimum=2)  # a gap lies between two batches
    _require(isinstance(bench.data_dir, str), "bench.data_dir", bench.data_dir,
             "must be a directory path, or '' for <workdir>/bench_data")
    _choice(bench.method, "bench.method", samplers.METHODS)
    for name in ("batch_size", "sample_batch_size", "num_steps", "windows"):
        _positive_int(bench, name, "bench")
    _positive_int(bench, "warmup_steps", "bench", minimum=0)


# The keys of distill.METHODS, spelled here so that validating does not import the distillation
# loop and its data pipeline (3 s) for every mode; tests/test_consistency.py checks they agree.
DISTILL_METHODS = ("progressive", "consistency")
STUDENT_MEAN_TYPES = ("v", "x0")  # eps cannot give x0 at the pure-noise step of a 1-step student


def _check_consistency(config: ml_collections.ConfigDict) -> None:
    from jax_diffusion.distill_targets import ODE_STEPS, consistency_timesteps
    from jax_diffusion.schedules import get_beta_schedule
    distill = config.distill
    _choice(distill.solver, "distill.solver", tuple(ODE_STEPS))
    _fraction(distill.target_decay, "distill.target_decay", 0.0, 1.0, high_open=True)
    _require(distill.sigma_data > 0, "distill.sigma_data", distill.sigma_data, "must be > 0")
    _positive_int(distill, "num_scales", "distill", minimum=3)
    _require(distill.sigma_max > 0, "distill.sigma_max", distill.sigma_max, "must be > 0")
    betas = get_beta_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    try:
        consistency_timesteps(betas, distill.num_scales, distill.sigma_max)
    except ValueError as e:
        raise ConfigError(f"config.distill.num_scales={distill.num_scales} with "
                          f"config.distill.sigma_max={distill.sigma_max}: {e}; lower num_scales "
                          f"or raise sigma_max") from None


def _check_distill(config: ml_collections.ConfigDict, mode: str, workdir: str) -> None:
    distill = config.distill
    _choice(distill.method, "distill.method", DISTILL_METHODS)
    _positive_int(distill, "steps_per_stage", "distill")
    _positive_int(distill, "student_steps", "distill", minimum=0)
    _require(distill.lr > 0, "distill.lr", distill.lr, "must be > 0")
    _fraction(distill.ema_decay, "distill.ema_decay", 0.0, 1.0, high_open=True)
    _require(distill.guidance_scale >= 0, "distill.guidance_scale", distill.guidance_scale,
             "must be >= 0 (1 = no guidance)")
    if distill.guidance_scale != 1.0:
        _require(config.model.num_classes > 0, "distill.guidance_scale", distill.guidance_scale,
                 "needs a class-conditional teacher (config.model.num_classes > 0); use 1")
    if distill.method == "consistency":
        _check_consistency(config)
    else:
        _check_progressive(config)
    if mode != "distill":
        return
    _require(distill.student_steps == 0, "distill.student_steps", distill.student_steps,
             "is written by --mode=distill into its checkpoints; leave it 0")
    teacher = distill.teacher_workdir
    _require(bool(teacher) and os.path.isdir(teacher), "distill.teacher_workdir", teacher,
             "must be the workdir of a trained teacher (--mode=train --workdir=...)")
    _require(os.path.abspath(teacher) != os.path.abspath(workdir), "distill.teacher_workdir",
             teacher, "is --workdir itself; the student needs a workdir of its own")


def _check_progressive(config: ml_collections.ConfigDict) -> None:
    distill = config.distill
    _choice(distill.mean_type, "distill.mean_type", STUDENT_MEAN_TYPES)
    for name in ("teacher_steps", "num_halvings"):
        _positive_int(distill, name, "distill")
    total = config.diffusion.num_timesteps
    _require(distill.teacher_steps <= total, "distill.teacher_steps", distill.teacher_steps,
             f"must be at most config.diffusion.num_timesteps={total}")
    halved = 2 ** distill.num_halvings
    _require(distill.teacher_steps % halved == 0, "distill.num_halvings", distill.num_halvings,
             f"halves config.distill.teacher_steps={distill.teacher_steps} {halved}-fold, which "
             f"must divide it; use a teacher_steps that is a multiple of {halved} (e.g. "
             f"{halved * max(1, distill.teacher_steps // halved)}) or fewer halvings")


def validate_config(config: ml_collections.ConfigDict, mode: str, workdir: str) -> None:
    """Every section of `config` for `--mode=mode`; raises ConfigError on the first problem.

    Touches no device, dataset or checkpoint: only files the config names (reference
    statistics, a samples folder) are looked at, and only for the mode that reads them."""
    from jax_diffusion.distributed import validate_distributed_config
    _check_workdir(workdir)
    _check_diffusion(config.diffusion)
    _check_data(config.data)
    _check_model(config)
    _check_train(config)
    _check_sample(config)
    _check_eval(config, mode)
    _check_bench(config.bench)
    _check_distill(config, mode, workdir)
    validate_distributed_config(config.distributed)
    if mode in ("import", "export"):
        from jax_diffusion.convert.run import validate_convert_config
        validate_convert_config(config, mode)


def check_device_divisibility(config: ml_collections.ConfigDict, mode: str, mesh) -> None:
    """The global batches the mode uses must split evenly over all devices of `mesh` (of all
    processes); sampling and evaluation batches are rounded up to the device count instead."""
    from jax_diffusion import parallel
    keys = {"train": ("train.batch_size",),
            "eval": ("eval.nll_batch_size",) if "nll" in comma_list(
                config.eval.metrics, "config.eval.metrics") else (),
            "bench": ("bench.batch_size", "bench.sample_batch_size"),
            "distill": ("train.batch_size",)}.get(mode, ())
    for key in keys:
        section, name = key.split(".")
        parallel.check_divisible(config[section][name], mesh, f"config.{key}")
