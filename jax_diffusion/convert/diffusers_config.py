"""diffusers `UNet2DModel` config.json <-> the project's `config.model`.

`unet2d_config(config)` is the config.json of the diffusers model that computes the same function
as `config`'s U-Net (export writes it; the parity tests build their reference from it).
`check_unet2d_config(found, config)` names every architecture setting of an imported config.json
that differs from it: the conventions among them (time embedding, GroupNorm epsilon, downsampling
padding) change no shape, so comparing tensors alone would import a model that computes
something else.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from jax_diffusion import errors

# UNet2DModel.__init__'s defaults, for keys a config.json leaves out.
UNET2D_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None,
}
_DOWNSAMPLE_PADDING = {"tf_same": 0, "symmetric": 1}  # ours -> diffusers' downsample_padding


def _attention_channels(model_config: ml_collections.ConfigDict, image_size: int) -> list[int]:
    """Channels of every attention layer: the attention levels' and the middle's."""
    m = model_config
    sizes = [image_size // 2 ** level for level in range(len(m.ch_mult))]
    levels = [m.ch * mult for size, mult in zip(sizes, m.ch_mult, strict=True)
              if size in m.attention_resolutions]
    return levels + [m.ch * m.ch_mult[-1]]


def _head_dim(model_config: ml_collections.ConfigDict, image_size: int) -> int | None:
    """diffusers' one attention_head_dim for every attention layer (None: one head each)."""
    m = model_config
    if m.num_head_channels > 0:
        return m.num_head_channels
    if m.num_heads == 1:
        return None
    dims = {c // m.num_heads for c in _attention_channels(m, image_size)}
    if len(dims) > 1:
        raise errors.ConversionError(
            f"config.model.num_heads={m.num_heads} gives attention layers of different head widths "
            f"{sorted(dims)}, which a diffusers UNet2DModel (one attention_head_dim) cannot "
            f"express: "
            f"set config.model.num_head_channels instead")
    return dims.pop()


def unet2d_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The diffusers UNet2DModel config.json computing the same function as config's U-Net."""
    m, size = config.model, config.data.image_size
    if m.resblock_updown or not m.conv_resample:
        raise errors.ConversionError(
            "a diffusers UNet2DModel resamples with convolutions between blocks: config.model."
            "resblock_updown must be False and config.model.conv_resample True")
    if m.ch_mult[0] != 1:
        raise errors.ConversionError(
            f"a diffusers UNet2DModel's first level has the width of its input convolution: "
            f"config.model.ch_mult must start with 1, not {m.ch_mult[0]}")
    attention = [size // 2 ** level in m.attention_resolutions for level in range(len(m.ch_mult))]
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    return {
        "_class_name": "UNet2DModel",
        "sample_size": size,
        "in_channels": config.data.channels,
        "out_channels": config.data.channels * (2 if m.learn_sigma else 1),
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "freq_shift": m.time_embedding_freq_shift,
        "flip_sin_to_cos": m.time_embedding_flip_sin_to_cos,
        "down_block_types": down,
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": [d.replace("Down", "Up") for d in reversed(down)],
        "block_out_channels": [m.ch * mult for mult in m.ch_mult],
        "layers_per_block": m.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": _DOWNSAMPLE_PADDING[m.downsample_padding],
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": m.dropout,
        "act_fn": "silu",
        "attention_head_dim": _head_dim(m, size),
        "norm_num_groups": m.num_groups,
        # diffusers drops the middle attention's GroupNorm under scale_shift unless this is set
        "attn_norm_num_groups": m.num_groups if m.use_scale_shift_norm else None,
        "norm_eps": m.norm_eps,
        "resnet_time_scale_shift": "scale_shift" if m.use_scale_shift_norm else "default",
        "add_attention": True,
        "class_embed_type": None,
        # our table's last row is the null label
        "num_class_embeds": m.num_classes + 1 if m.num_classes > 0 else None,
    }


def _effective(found: dict[str, Any], key: str) -> Any:
    value = found.get(key, UNET2D_DEFAULTS.get(key))
    if key == "attn_norm_num_groups" and value is None:
        # what diffusers' middle block does with None
        scale_shift = _effective(found, "resnet_time_scale_shift") != "default"
        return None if scale_shift else _effective(found, "norm_num_groups")
    return list(value) if isinstance(value, tuple) else value


def _heads(found: dict[str, Any], channels: list[int]) -> list[int]:
    head_dim = _effective(found, "attention_head_dim")
    return [1 if head_dim is None else c // head_dim for c in channels]


# config.json key -> the config key a user changes to match it
_CONFIG_KEY = {
    "freq_shift": "config.model.time_embedding_freq_shift",
    "flip_sin_to_cos": "config.model.time_embedding_flip_sin_to_cos",
    "norm_eps": "config.model.norm_eps",
    "norm_num_groups": "config.model.num_groups",
    "attn_norm_num_groups": "config.model.num_groups (diffusers' attention GroupNorms)",
    "downsample_padding": "config.model.downsample_padding ('tf_same' = 0, 'symmetric' = 1)",
    "block_out_channels": "config.model.ch, ch_mult",
    "layers_per_block": "config.model.num_res_blocks",
    "down_block_types": "config.model.attention_resolutions",
    "up_block_types": "config.model.attention_resolutions",
    "in_channels": "config.data.channels",
    "out_channels": "config.data.channels, config.model.learn_sigma",
    "resnet_time_scale_shift": "config.model.use_scale_shift_norm",
    "num_class_embeds": "config.model.num_classes",
}


def check_unet2d_config(found: dict[str, Any], config: ml_collections.ConfigDict,
                        source: str) -> None:
    """Raise one ConversionError naming every setting of `found` (a config.json) that makes its
    network differ from config's U-Net."""
    if found.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise errors.ConversionError(
            f"{source} describes a {found['_class_name']}, not a UNet2DModel")
    want = unet2d_config(config)
    differences = []
    for key in want:
        if key in ("_class_name", "sample_size", "dropout", "attention_head_dim",
                   "num_class_embeds"):
            continue
        have, value = _effective(found, key), _effective(want, key)
        same = (abs(have - value) <= 1e-3 * value if key == "norm_eps" and have is not None
                else have == value)
        if not same:
            where = _CONFIG_KEY.get(key, "not configurable here")
            differences.append(f"{key}={have!r} (the config needs {value!r}: {where})")
    if _effective(found, "time_embedding_dim") is not None:
        differences.append(f"time_embedding_dim={found['time_embedding_dim']!r} (the config needs "
                           f"None: 4 * config.model.ch)")
    channels = _attention_channels(config.model, config.data.image_size)
    have_heads, want_heads = _heads(found, channels), _heads(want, channels)
    if have_heads != want_heads:
        differences.append(f"attention_head_dim={found.get('attention_head_dim')!r} gives "
                           f"{have_heads} heads (the config needs {want_heads}: config.model."
                           f"num_heads, num_head_channels)")
    classes = _effective(found, "num_class_embeds")
    num_classes = config.model.num_classes
    if (classes or 0) not in ((num_classes, num_classes + 1) if num_classes else (0,)):
        differences.append(f"num_class_embeds={classes!r} (the config needs "
                           f"{num_classes or None}: config.model.num_classes)")
    if differences:
        raise errors.ConversionError(f"{source} is not the network of this config: "
                                     + "; ".join(differences))


def config_from_unet2d(found: dict[str, Any], base: ml_collections.ConfigDict
                       ) -> ml_collections.ConfigDict:
    """A copy of `base` whose data and model sections describe the UNet2DModel of `found` (a
    config.json), checked with `check_unet2d_config`; the diffusion and sampler stay `base`'s."""
    config = ml_collections.ConfigDict(base.to_dict())
    channels = [int(c) for c in _effective(found, "block_out_channels")]
    size = int(found.get("sample_size") or config.data.image_size)
    config.data.image_size, config.data.channels = size, int(_effective(found, "in_channels"))
    m = config.model
    m.ch = channels[0]
    m.ch_mult = tuple(c // channels[0] for c in channels)
    m.num_res_blocks = int(_effective(found, "layers_per_block"))
    m.attention_resolutions = tuple(
        size // 2 ** level for level, block in enumerate(_effective(found, "down_block_types"))
        if block.startswith("Attn"))
    head_dim = _effective(found, "attention_head_dim")
    m.num_heads, m.num_head_channels = 1, -1 if head_dim is None else int(head_dim)
    m.resblock_updown, m.conv_resample = False, True
    m.use_scale_shift_norm = _effective(found, "resnet_time_scale_shift") == "scale_shift"
    m.learn_sigma = int(_effective(found, "out_channels")) == 2 * config.data.channels
    m.num_classes = max(int(_effective(found, "num_class_embeds") or 0) - 1, 0)
    m.time_embedding_freq_shift = int(_effective(found, "freq_shift"))
    m.time_embedding_flip_sin_to_cos = bool(_effective(found, "flip_sin_to_cos"))
    m.norm_eps = float(_effective(found, "norm_eps"))
    m.num_groups = int(_effective(found, "norm_num_groups"))
    padding = {value: name for name, value in _DOWNSAMPLE_PADDING.items()}
    m.downsample_padding = padding.get(int(_effective(found, "downsample_padding")), "symmetric")
    if m.learn_sigma:
        config.diffusion.var_type = "learned_range"
    return config
