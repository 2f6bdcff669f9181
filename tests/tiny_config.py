"""A tiny class-conditional digits model (8x8 images, one level, no attention; the vp recipe of
configs/digits_vp.py) for end-to-end tests, as a ConfigDict for in-process tests and as the same
overrides for main.py flags."""
import os

from jax_diffusion.config_files import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_CONFIG = os.path.join(ROOT, "configs", "digits_vp.py")

# key -> (value, spelling on the command line)
_TINY = {
    "model.ch": (32, "32"),
    "model.ch_mult": ((1,), "(1,)"),
    "model.num_res_blocks": (1, "1"),
    "model.attention_resolutions": ((), "()"),
    "data.image_size": (8, "8"),
    "train.batch_size": (8, "8"),
    # No warmup: every step moves the parameters by ~lr, so a wrong gradient or a skipped step
    # shows far above float32 round-off.
    "train.lr": (1e-3, "0.001"),
    "train.warmup_steps": (0, "0"),
    # Constant: digits' cosine decay depends on num_steps, which the tests vary between the
    # halves of a resumed run and between runs they compare.
    "train.lr_schedule": ("constant", "constant"),
    "train.sample_every": (0, "0"),
    "sample.num_steps": (5, "5"),
    "sample.num_samples": (20, "20"),
    "sample.batch_size": (16, "16"),
}


def tiny_config(**overrides):
    """configs/digits.py with the tiny overrides; keyword `section__key=value` overrides more."""
    config = load_config_file(DIGITS_CONFIG)
    for dotted, (value, _) in _TINY.items():
        section, key = dotted.split(".")
        config[section][key] = value
    for name, value in overrides.items():
        section, key = name.split("__")
        config[section][key] = value
    return config


def tiny_flags(**overrides) -> list[str]:
    """The same model as main.py flags; `section__key="text"` adds or replaces an override."""
    flags = {dotted: text for dotted, (_, text) in _TINY.items()}
    for name, text in overrides.items():
        flags[name.replace("__", ".")] = str(text)
    return [f"--config={DIGITS_CONFIG}"] + [f"--config.{k}={v}" for k, v in flags.items()]


def default_eval_config(**overrides):
    """configs/default.py's config.eval with `overrides` set."""
    from configs.default import get_config
    config = get_config().eval
    config.update(overrides)
    return config
