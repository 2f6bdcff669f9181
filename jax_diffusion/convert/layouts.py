"""Where each parameter of the project's U-Net lives in a PyTorch state dict, and its layout.

Two layouts: diffusers' `UNet2DModel` ("diffusers") and improved-diffusion / guided-diffusion's
`UNetModel` ("improved_diffusion"). `tensor_specs(config, layout)` lists, for every leaf of the
project's parameter tree, the PyTorch tensors it is made of, their shapes, and the two maps between
the layouts, so that import checks every name and shape before converting anything, and export is
the same table read backwards.

PyTorch layouts: Conv2d weight [O, I, kh, kw] (ours HWIO [kh, kw, I, O]); Linear weight [O, I]
(ours [I, O]); Conv1d weight [O, I, 1] (improved-diffusion's attention); the fused q, k, v kernel is
ours [C, 3C] with the output channels ordered per head [q | k | v] (improved-diffusion's qkv layout;
diffusers keeps separate to_q, to_k, to_v).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np

from jax_diffusion.models import create_model, example_inputs

LAYOUTS = ("diffusers", "improved_diffusion")

# Our ResBlock / AttentionBlock children -> the PyTorch module names, per layout.
_RESBLOCK_CHILDREN = {
    "diffusers": {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2",
                  "conv2": "conv2", "skip": "conv_shortcut"},
    "improved_diffusion": {"norm1": "in_layers.0", "conv1": "in_layers.2",
                           "emb_proj": "emb_layers.1", "norm2": "out_layers.0",
                           "conv2": "out_layers.3", "skip": "skip_connection"},
}
_ATTENTION_CHILDREN = {
    "diffusers": {"norm": "group_norm", "qkv": "to_", "proj_out": "to_out.0"},
    "improved_diffusion": {"norm": "norm", "qkv": "qkv", "proj_out": "proj_out"},
}
_TOP_LEVEL = {
    "diffusers": {"embed/dense0": "time_embedding.linear_1",
                  "embed/dense1": "time_embedding.linear_2",
                  "embed/label_embed": "class_embedding", "conv_in": "conv_in",
                  "norm_out": "conv_norm_out", "conv_out": "conv_out"},
    "improved_diffusion": {"embed/dense0": "time_embed.0", "embed/dense1": "time_embed.2",
                           "embed/label_embed": "label_emb", "conv_in": "input_blocks.0.0",
                           "norm_out": "out.0", "conv_out": "out.2"},
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One leaf of our parameter tree and the PyTorch tensors it is made of."""

    path: str                              # ours, e.g. "down0_res1/conv1/kernel"
    shape: tuple[int, ...]                 # ours
    sources: tuple[str, ...]               # PyTorch state-dict names
    source_shapes: tuple[tuple[int, ...], ...]
    to_ours: Callable[..., np.ndarray]     # source arrays -> ours
    to_source: Callable[[np.ndarray], tuple[np.ndarray, ...]]


def _block_prefixes(model_config: ml_collections.ConfigDict, image_size: int, layout: str
                    ) -> dict[str, str]:
    """Our block names (down0_res0, mid_attn, up1_upsample, ...) -> the PyTorch module prefix.

    Lists every block the U-Net could have; the caller keeps those our parameter tree holds.
    """
    m = model_config
    levels = len(m.ch_mult)
    last = levels - 1
    blocks = {}
    if layout == "diffusers":
        for level in range(levels):
            for i in range(m.num_res_blocks):
                blocks[f"down{level}_res{i}"] = f"down_blocks.{level}.resnets.{i}"
                blocks[f"down{level}_attn{i}"] = f"down_blocks.{level}.attentions.{i}"
            blocks[f"down{level}_downsample"] = f"down_blocks.{level}.downsamplers.0"
            for i in range(m.num_res_blocks + 1):
                blocks[f"up{level}_res{i}"] = f"up_blocks.{last - level}.resnets.{i}"
                blocks[f"up{level}_attn{i}"] = f"up_blocks.{last - level}.attentions.{i}"
            blocks[f"up{level}_upsample"] = f"up_blocks.{last - level}.upsamplers.0"
        blocks.update(mid_res0="mid_block.resnets.0", mid_attn="mid_block.attentions.0",
                      mid_res1="mid_block.resnets.1")
        return blocks
    # improved-diffusion numbers its blocks in call order: input_blocks.0 is conv_in; each
    # TimestepEmbedSequential holds a ResBlock (.0) and, at attention resolutions, attention (.1).
    k = 1
    for level in range(levels):
        for i in range(m.num_res_blocks):
            blocks[f"down{level}_res{i}"] = f"input_blocks.{k}.0"
            blocks[f"down{level}_attn{i}"] = f"input_blocks.{k}.1"
            k += 1
        if level != last:
            blocks[f"down{level}_downsample"] = f"input_blocks.{k}.0"
            k += 1
    blocks.update(mid_res0="middle_block.0", mid_attn="middle_block.1", mid_res1="middle_block.2")
    k = 0
    for level in reversed(range(levels)):
        has_attention = image_size // 2 ** level in m.attention_resolutions
        for i in range(m.num_res_blocks + 1):
            blocks[f"up{level}_res{i}"] = f"output_blocks.{k}.0"
            blocks[f"up{level}_attn{i}"] = f"output_blocks.{k}.1"
            if level != 0 and i == m.num_res_blocks:
                blocks[f"up{level}_upsample"] = f"output_blocks.{k}.{2 if has_attention else 1}"
            k += 1
    return blocks


def _module_name(parts: list[str], blocks: dict[str, str], layout: str) -> str:
    """The PyTorch module that holds our parameter at `parts` (without the leaf name)."""
    joined = "/".join(parts)
    if joined in _TOP_LEVEL[layout]:
        return _TOP_LEVEL[layout][joined]
    block, child = parts[0], parts[1]
    prefix = blocks[block]
    if block.endswith(("_downsample", "_upsample")) and child == "conv":  # conv_resample
        if layout == "improved_diffusion" and block.endswith("_downsample"):
            return f"{prefix}.op"
        return f"{prefix}.conv"
    children = _ATTENTION_CHILDREN if "attn" in block else _RESBLOCK_CHILDREN
    return f"{prefix}.{children[layout][child]}"


def _conv_spec(path, shape, module):
    if path.endswith("bias"):
        return _plain_spec(path, shape, f"{module}.bias")
    kh, kw, c_in, c_out = shape
    return TensorSpec(path, shape, (f"{module}.weight",), ((c_out, c_in, kh, kw),),
                      lambda w: w.transpose(2, 3, 1, 0), lambda k: (k.transpose(3, 2, 0, 1),))


def _dense_spec(path, shape, module, source_ndim=2):
    """A Linear (or a 1x1 Conv1d, source_ndim=3) as our [I, O] kernel."""
    if path.endswith("bias"):
        return _plain_spec(path, shape, f"{module}.bias")
    c_in, c_out = shape
    extra = (1,) * (source_ndim - 2)
    return TensorSpec(path, shape, (f"{module}.weight",), ((c_out, c_in) + extra,),
                      lambda w: w.reshape(c_out, c_in).T,
                      lambda k: (k.T.reshape((c_out, c_in) + extra),))


def _plain_spec(path, shape, name):
    return TensorSpec(path, shape, (name,), (shape,), lambda w: w, lambda v: (v,))


def _split_qkv_spec(path, shape, module, heads):
    """diffusers' to_q, to_k, to_v (Linear, [C, C] each) <-> our fused per-head [q | k | v]."""
    if path.endswith("bias"):
        c = shape[0] // 3
        names = tuple(f"{module}{p}.bias" for p in "qkv")
        return TensorSpec(path, shape, names, ((c,),) * 3,
                          lambda *bs: np.stack([b.reshape(heads, -1) for b in bs], 1).reshape(-1),
                          lambda v: tuple(v.reshape(heads, 3, -1)[:, i].reshape(c)
                                          for i in range(3)))
    c = shape[0]
    names = tuple(f"{module}{p}.weight" for p in "qkv")

    def to_ours(*ws):  # each w [C_out, C_in]: ours [C_in, heads, 3, head_dim]
        return np.stack([w.T.reshape(c, heads, c // heads) for w in ws], 2).reshape(c, 3 * c)

    def to_source(k):
        k = k.reshape(c, heads, 3, c // heads)
        return tuple(k[:, :, i].reshape(c, c).T for i in range(3))
    return TensorSpec(path, shape, names, ((c, c),) * 3, to_ours, to_source)


def _leaf_spec(path: str, shape: tuple[int, ...], module: str, layout: str,
               heads: int) -> TensorSpec:
    parts = path.split("/")
    owner = parts[-2]
    if owner == "label_embed":
        return _plain_spec(path, shape, f"{module}.weight")
    if owner.startswith("norm"):
        return _plain_spec(path, shape, f"{module}.{'weight' if parts[-1] == 'scale' else 'bias'}")
    if owner in ("dense0", "dense1", "emb_proj"):
        return _dense_spec(path, shape, module)
    if owner == "proj_out":
        return _dense_spec(path, shape, module, 2 if layout == "diffusers" else 3)
    if owner == "qkv":
        if layout == "diffusers":
            return _split_qkv_spec(path, shape, module, heads)
        return _dense_spec(path, shape, module, 3)  # Conv1d(C, 3C, 1): same channel order as ours
    return _conv_spec(path, shape, module)


def _attention_heads(model_config: ml_collections.ConfigDict, channels: int) -> int:
    m = model_config
    return channels // m.num_head_channels if m.num_head_channels > 0 else m.num_heads


def abstract_params(config: ml_collections.ConfigDict):
    """The shapes of `config`'s U-Net parameters, without computing them."""
    model = create_model(config.model)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs(config)))["params"]


def _flat(tree) -> Iterator[tuple[str, tuple[int, ...]]]:
    for keys, leaf in jax.tree_util.tree_leaves_with_path(tree):
        yield "/".join(k.key for k in keys), tuple(leaf.shape)


def tensor_specs(config: ml_collections.ConfigDict, layout: str) -> list[TensorSpec]:
    """One TensorSpec per leaf of `config`'s U-Net parameters, in tree order."""
    blocks = _block_prefixes(config.model, config.data.image_size, layout)
    specs = []
    for path, shape in _flat(abstract_params(config)):
        parts = path.split("/")
        module = _module_name(parts[:-1], blocks, layout)
        heads = _attention_heads(config.model, shape[0]) if parts[-2] == "qkv" else 1
        specs.append(_leaf_spec(path, shape, module, layout, heads))
    return specs

