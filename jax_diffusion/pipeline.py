"""`Pipeline`: a trained, imported, distilled or published model as one object that draws images.

    from jax_diffusion import Pipeline
    pipe = Pipeline.from_workdir("runs/digits")
    images, labels = pipe.sample(100, method="ddim", num_steps=50, seed=0)

`--mode=sample` is built on it, so for the same config and seed both give the same images.
"""
from __future__ import annotations

import json
import logging
import os
from typing import NamedTuple

import ml_collections
import numpy as np

from jax_diffusion import config_files, errors
from jax_diffusion.generation import restore, sampling
from jax_diffusion.models import create_model
from jax_diffusion.runtime import parallel
from jax_diffusion.samplers import check_sample_config, consistency
from jax_diffusion.training import checkpoints


class Samples(NamedTuple):
    """What `Pipeline.sample` returns: uint8 images [N, H, W, C] and their int32 labels [N]
    (zeros for an unconditional model)."""
    images: np.ndarray
    labels: np.ndarray


class Pipeline:
    """A model with its config, drawing images with any sampler of the method table.

    Build one with `from_workdir` (a run's checkpoint) or `from_pretrained` (a PyTorch file or
    directory, read in memory), or directly from a config and parameters. The parameters are
    restored once per checkpoint and each sampler is compiled once per batch size.
    """

    def __init__(self, config: ml_collections.ConfigDict, params=None, workdir: str | None = None,
                 mesh=None):
        if params is None and workdir is None:
            raise ValueError("Pipeline needs params or a workdir to restore them from")
        self.config = config
        self.workdir = workdir
        self.mesh = mesh if mesh is not None else parallel.create_mesh()
        self._params: dict = {None: params} if params is not None else {}
        self._sample_fns: dict[str, sampling.SampleFn] = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None, use_ema: bool = True,
                     config: ml_collections.ConfigDict | None = None) -> Pipeline:
        """The model of a trained (--mode=train), imported (--mode=import) or distilled
        (--mode=distill) workdir: checkpoint `step` (None: the latest), its EMA parameters (or
        the raw ones with use_ema=False). `config` defaults to the one the checkpoint recorded,
        so the sampler settings are the run's own."""
        manager = checkpoints.create_manager(workdir, read_only=True)
        chosen = checkpoints.select_step(manager, -1 if step is None else step)
        if config is None:
            config = _recorded_config(checkpoints.restore_config(manager, chosen))
        else:
            config = ml_collections.ConfigDict(config.to_dict())
        if step is not None:
            config.sample.checkpoint_step = step
        config.sample.use_ema = use_ema
        return cls(config, workdir=workdir)

    @classmethod
    def from_pretrained(cls, path: str, config: ml_collections.ConfigDict | str | None = None,
                        format: str = "auto") -> Pipeline:  # noqa: A002  (the config key's name)
        """A published PyTorch model read in memory (no checkpoint written): a diffusers
        UNet2DModel directory (its config.json gives the network; the diffusion is `config`'s,
        by default DDPM's linear 1000-step eps process) or an improved-diffusion `.pt` state
        dict (which records no architecture: `config` must describe it, e.g.
        "configs/cifar10_improved.py"). `config` is a ConfigDict or a config file path; its
        process must be "vp", the published models' discrete process."""
        from jax_diffusion.convert import diffusers_config, sources
        if isinstance(config, str):
            config = config_files.load_config_file(config)
        if config is not None and config.diffusion.process != "vp":
            raise errors.ConfigError(
                f"config.diffusion.process={config.diffusion.process!r}: published diffusers and "
                f"improved-diffusion models are 'vp' models; pass a config with process 'vp'")
        fmt = sources.resolve_format(path, format)
        if fmt == "diffusers":
            found = _read_json(os.path.join(path, "config.json"))
            config = diffusers_config.config_from_unet2d(
                found, config if config is not None else config_files.default_config())
        elif config is None:
            raise errors.ConfigError(
                f"{path} is an improved-diffusion state dict, which records no architecture: pass "
                f"config= (a config file such as 'configs/cifar10_improved.py' or a ConfigDict)")
        config = ml_collections.ConfigDict(config.to_dict())
        config.convert.source, config.convert.format = path, fmt
        params = sources.read_source(config)
        mesh = parallel.create_mesh()
        return cls(config, params=parallel.replicate(params, mesh), mesh=mesh)

    # ------------------------------------------------------------------ sampling
    def sample(self, num_samples: int, labels=None, method: str | None = None,
               num_steps: int | None = None, eta: float | None = None,
               guidance_scale: float | None = None, seed: int = 0,
               batch_size: int | None = None, progress: bool = False) -> Samples:
        """`num_samples` images drawn with `method` at `num_steps` network evaluations (each
        None: the config's config.sample value; eta None keeps the config's eta for its own
        method and is 0 for another), for `labels` [num_samples] (None: classes cycling
        0..K-1). On a distilled workdir, num_steps picks the student (a count it does not hold
        is a ConfigError) and the student's recorded sampler is used. Batch i uses the key
        fold_in(PRNGKey(seed), i), so the images depend on
        the seed and batch size (default config.sample.batch_size), not on the device count."""
        config = self._sampling_config(method, num_steps, eta, guidance_scale)
        num_classes = config.model.num_classes
        if labels is None:
            labels = sampling.default_labels(num_samples, num_classes)
        labels = np.asarray(labels, np.int32).reshape(-1)
        if len(labels) != num_samples:
            raise ValueError(f"labels has {len(labels)} entries for num_samples={num_samples}")
        if num_classes > 0 and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must lie in 0..{num_classes - 1} for this model")
        batch = parallel.round_up_to_devices(
            min(batch_size or config.sample.batch_size, num_samples), self.mesh)
        params, step = self._restored(config)
        source = "pretrained weights" if step is None else (
            f"step {step} ({'EMA' if config.sample.use_ema else 'raw'} params)")
        logging.info("Sampling %d images from %s with %s, %d steps", num_samples, source,
                     config.sample.method, config.sample.num_steps)
        key = json.dumps([config.sample.to_dict(), config.diffusion.to_dict(),
                          config.distill.to_dict(), batch], sort_keys=True, default=str)
        if key not in self._sample_fns:
            self._sample_fns[key] = sampling.make_sample_fn(
                config, create_model(config.model), self.mesh, batch)
        images = sampling.generate_samples(self._sample_fns[key], params, labels, batch, seed,
                                           self.mesh, progress=progress)
        return Samples(images, labels)

    def _sampling_config(self, method, num_steps, eta, guidance_scale
                         ) -> ml_collections.ConfigDict:
        """The config with the given sampler settings, resolved for a student's workdir."""
        config = ml_collections.ConfigDict(self.config.to_dict())
        if method is not None:
            config.sample.method = method
            if eta is None and method != self.config.sample.method:
                config.sample.eta = 0.0   # the run's eta belongs to its own method
        for key, value in (("num_steps", num_steps), ("eta", eta),
                           ("guidance_scale", guidance_scale)):
            if value is not None:
                config.sample[key] = value
        if self.workdir is not None:
            config = restore.student_config(config, self.workdir)
        if config.sample.method != consistency.SAMPLER:   # a student's record names it
            check_sample_config(config)
        return config

    def _restored(self, config: ml_collections.ConfigDict) -> tuple[object, int | None]:
        """(params, checkpoint step) of config.sample.checkpoint_step, restored on first use;
        the step is None for weights given in memory."""
        if self.workdir is None:
            return self._params[None], None
        key = (config.sample.checkpoint_step, config.sample.use_ema, config.sample.ema_sigma_rel)
        if key not in self._params:
            self._params[key] = restore.restore_for_sampling(
                config, self.workdir, self.mesh, create_model(config.model))
        return self._params[key]


def _recorded_config(record: dict) -> ml_collections.ConfigDict:
    """configs/default.py with every key a checkpoint recorded; keys this version does not know
    are left out (a checkpoint of another version still samples)."""
    config = config_files.default_config()

    def merge(node: ml_collections.ConfigDict, values: dict) -> None:
        for key, value in values.items():
            if key not in node:
                continue
            if isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
                merge(node[key], value)
            else:
                node[key] = tuple(value) if isinstance(value, list) else value

    merge(config, record)
    return config


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise errors.InputFileError(f"{path} is not readable JSON ({e})") from None
