"""The benchmark's PyTorch yardstick: the project's U-Net (models/unet.py) in PyTorch eager, with
the same training step, timed the way `--mode=bench` times the JAX one.

Bench-only: this is the one module that imports torch, and no library module imports it.

The network is built from `config.model` with the same architecture, conventions and parameter
count as the Flax model. Its parameter names are improved-diffusion's `UNetModel`'s, so
`convert.weights.state_dict_from_params(params, config, "improved_diffusion")` loads into it with
`strict=True` and the two networks compute the same function (tests/test_torch_yardstick.py).

A training step: random t, q_sample, the eps MSE on the first C output channels (the Improved DDPM
config's L_hybrid adds a variational term that costs a few elementwise ops and is left out),
backward, clip_by_global_norm, AdamW, and the EMA update, as the JAX step does. bfloat16 is
torch.autocast, the mixed precision PyTorch users run; on CUDA the network runs channels_last,
the layout cuDNN's tensor-core convolutions want.

  python -m jax_diffusion.bench.torch_yardstick --config=configs/cifar10.py --batch=8 --fwd-batch=16

prints progress on stderr and one JSON line on stdout, last, with `train_img_per_s` and
`fwd_img_per_s` (the keys of `--mode=bench`).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jax_diffusion import schedules
from jax_diffusion.config_files import load_config_file
from jax_diffusion.models.layers import DOWNSAMPLE_PADDINGS
from jax_diffusion.models.unet import validate_model_config

DTYPES = ("float32", "bfloat16")


def timestep_embedding(t: torch.Tensor, dim: int, freq_shift: int, flip_sin_to_cos: bool
                       ) -> torch.Tensor:
    """Sinusoidal float32 features [B, dim] of timesteps t [B], the conventions of
    models/embeddings.py (freq_shift, [cos | sin] or [sin | cos])."""
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t.float()[:, None] * torch.exp(-math.log(10000.0) * exponents)[None]
    parts = [torch.cos(args), torch.sin(args)]
    return torch.cat(parts if flip_sin_to_cos else parts[::-1], dim=-1)


def _resize(x: torch.Tensor, resample: str) -> torch.Tensor:
    """Nearest-neighbour 2x ("up") or 2x2 average pooling ("down")."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest") if resample == "up" \
        else F.avg_pool2d(x, 2)


class ResBlock(nn.Module):
    """models.layers.ResBlock: skip(x) + conv2(dropout(SiLU(norm2(conv1(SiLU(norm1(x))), emb))))."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, scale_shift: bool,
                 eps: float, groups: int, resample: str = "none"):
        super().__init__()
        self.resample, self.scale_shift = resample, scale_shift
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, c_in, eps), nn.SiLU(),
                                       nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(),
                                        nn.Linear(emb_dim, 2 * c_out if scale_shift else c_out))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, c_out, eps), nn.SiLU(),
                                        nn.Dropout(dropout), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip_connection = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample == "none":
            h = self.in_layers(x)
        else:  # BigGAN-style: resize both paths between norm1 and conv1
            h = _resize(self.in_layers[:-1](x), self.resample)
            x = _resize(x, self.resample)
            h = self.in_layers[-1](h)
        e = self.emb_layers(emb)[:, :, None, None]
        norm2, rest = self.out_layers[0], self.out_layers[1:]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = rest(norm2(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """models.layers.AttentionBlock: x + proj_out(attention(norm(x))), q, k, v from one fused
    projection whose 3C outputs are ordered per head [q | k | v]."""

    def __init__(self, channels: int, heads: int, eps: float, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels, eps)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, -1))  # [B, 3C, L]
        q, k, v = (part.transpose(1, 2) for part in  # each [B * heads, L, C // heads]
                   qkv.reshape(b * self.heads, 3 * c // self.heads, -1).chunk(3, dim=1))
        h = F.scaled_dot_product_attention(q, k, v)  # PyTorch's fused kernel where it has one
        h = h.transpose(1, 2).reshape(b, c, -1)
        return x + self.proj_out(h).reshape(b, c, height, width)


class Downsample(nn.Module):
    """A stride-2 3x3 convolution with the padding DOWNSAMPLE_PADDINGS names, or 2x2 pooling."""

    def __init__(self, channels: int, use_conv: bool, padding: str):
        super().__init__()
        before, after = DOWNSAMPLE_PADDINGS[padding]
        self.pad = (before, after, before, after)  # F.pad order: W then H
        self.op = nn.Conv2d(channels, channels, 3, stride=2) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(F.pad(x, self.pad) if isinstance(self.op, nn.Conv2d) else x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 convolution when use_conv."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_resize(x, "up"))


def _apply(blocks: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        h = block(h, emb) if isinstance(block, ResBlock) else block(h)
    return h


class UNet(nn.Module):
    """The U-Net of `config.model` for image_size x image_size x channels images, NCHW."""

    def __init__(self, model_config: ml_collections.ConfigDict, image_size: int, channels: int):
        super().__init__()
        validate_model_config(model_config, image_size)
        m = self.config = model_config
        emb_dim = 4 * m.ch
        self.time_embed = nn.Sequential(nn.Linear(m.ch, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        if m.num_classes > 0:  # the last row is the null label
            self.label_emb = nn.Embedding(m.num_classes + 1, emb_dim)

        def res(c_in: int, c_out: int, resample: str = "none") -> ResBlock:
            return ResBlock(c_in, c_out, emb_dim, m.dropout, m.use_scale_shift_norm, m.norm_eps,
                            m.num_groups, resample)

        def attention(c: int) -> AttentionBlock:
            heads = c // m.num_head_channels if m.num_head_channels > 0 else m.num_heads
            return AttentionBlock(c, heads, m.norm_eps, m.num_groups)

        def attn(c: int, size: int) -> list[nn.Module]:
            return [attention(c)] if size in m.attention_resolutions else []

        def down(c: int) -> nn.Module:
            return res(c, c, "down") if m.resblock_updown else Downsample(
                c, m.conv_resample, m.downsample_padding)

        def up(c: int) -> nn.Module:
            return res(c, c, "up") if m.resblock_updown else Upsample(c, m.conv_resample)

        c, size, last = m.ch, image_size, len(m.ch_mult) - 1
        self.input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(channels, c, 3, padding=1)])])
        skips = [c]
        for level, mult in enumerate(m.ch_mult):
            for _ in range(m.num_res_blocks):
                self.input_blocks.append(nn.ModuleList([res(c, m.ch * mult),
                                                        *attn(m.ch * mult, size)]))
                c = m.ch * mult
                skips.append(c)
            if level != last:
                self.input_blocks.append(nn.ModuleList([down(c)]))
                skips.append(c)
                size //= 2
        self.middle_block = nn.ModuleList([res(c, c), attention(c), res(c, c)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(m.ch_mult))):
            for i in range(m.num_res_blocks + 1):
                blocks = [res(c + skips.pop(), m.ch * mult), *attn(m.ch * mult, size)]
                c = m.ch * mult
                if level != 0 and i == m.num_res_blocks:
                    blocks.append(up(c))
                self.output_blocks.append(nn.ModuleList(blocks))
            if level != 0:
                size *= 2
        out_channels = channels * (2 if m.learn_sigma else 1)
        self.out = nn.Sequential(nn.GroupNorm(m.num_groups, c, m.norm_eps), nn.SiLU(),
                                 nn.Conv2d(c, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x: [B, C, H, W]; t: [B] timesteps (int or float); y: [B] labels or None (the null
        label of a class-conditional model). Returns [B, C or 2C, H, W]."""
        m = self.config
        emb = self.time_embed(timestep_embedding(t, m.ch, m.time_embedding_freq_shift,
                                                 m.time_embedding_flip_sin_to_cos))
        if m.num_classes > 0:
            if y is None:
                y = torch.full(t.shape, m.num_classes, dtype=torch.long, device=t.device)
            emb = emb + self.label_emb(y)
        h, skips = x, []
        for blocks in self.input_blocks:
            h = _apply(blocks, h, emb)
            skips.append(h)
        h = _apply(self.middle_block, h, emb)
        for blocks in self.output_blocks:
            h = _apply(blocks, torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def create_model(config: ml_collections.ConfigDict) -> UNet:
    """The yardstick U-Net of `config` (config.model at config.data's image size and channels)."""
    return UNet(config.model, config.data.image_size, config.data.channels)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _autocast(device: torch.device, dtype: str):
    """torch.autocast to bfloat16, or a disabled one for float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def make_train_step(model: UNet, config: ml_collections.ConfigDict, dtype: str
                    ) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """step(x0 [B, C, H, W], labels [B] or None) -> loss: one training step of `model` in place,
    the work of the JAX step (train_step.py) in eager PyTorch."""
    device = next(model.parameters()).device
    d = config.diffusion
    alphas_cumprod = np.cumprod(1.0 - schedules.get_beta_schedule(d.schedule, d.num_timesteps))
    signal = torch.tensor(np.sqrt(alphas_cumprod), dtype=torch.float32, device=device)
    noise_scale = torch.tensor(np.sqrt(1.0 - alphas_cumprod), dtype=torch.float32, device=device)
    # improved-diffusion's recipe feeds the network t * 1000 / T (config.diffusion).
    t_scale = 1000.0 / d.num_timesteps if d.rescale_timesteps else 1.0
    params = list(model.parameters())
    # fused: PyTorch's fastest AdamW on CUDA (one kernel for all parameters).
    optimizer = torch.optim.AdamW(params, lr=config.train.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=config.train.weight_decay,
                                  fused=device.type == "cuda")
    ema = [p.detach().clone() for p in params]
    channels = config.data.channels

    def step(x0: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        model.train()
        t = torch.randint(0, d.num_timesteps, (x0.shape[0],), device=device)
        noise = torch.randn_like(x0)
        x_t = signal[t][:, None, None, None] * x0 + noise_scale[t][:, None, None, None] * noise
        with _autocast(device, dtype):
            out = model(x_t, t * t_scale, labels)
        loss = F.mse_loss(out[:, :channels].float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, config.train.grad_clip)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - config.train.ema_decay)
        return loss.detach()

    return step


def _median_seconds(call: Callable[[], object], calls: int, windows: int,
                    synchronize: Callable[[], None]) -> float:
    """Median over `windows` of the seconds per call of `calls` calls, each window ending once
    the device has finished (CUDA runs asynchronously)."""
    per_call = []
    for _ in range(windows):
        synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        synchronize()
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call)


def benchmark(config: ml_collections.ConfigDict, batch: int, fwd_batch: int, dtype: str,
              device: str, warmup: int = 2, steps: int = 5, windows: int = 1, seed: int = 0,
              parts: tuple[str, ...] = ("train", "fwd")) -> dict:
    """Train and forward img/s of the yardstick for `config` on `device`, on random data:
    `warmup` untimed calls, then the median of `windows` windows of `steps` calls."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
    torch.manual_seed(seed)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its kernels
        # TF32 for float32 matmuls too (convolutions use it by default), as XLA's default
        # precision does on the GPU.
        torch.set_float32_matmul_precision("high")
        torch.cuda.reset_peak_memory_stats(dev)
    memory_format = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    model = create_model(config).to(dev, memory_format=memory_format)
    size, channels, classes = (config.data.image_size, config.data.channels,
                               config.model.num_classes)

    def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = torch.rand(n, channels, size, size, device=dev).mul_(2).sub_(1)
        y = torch.randint(0, classes, (n,), device=dev) if classes > 0 else None
        return x.contiguous(memory_format=memory_format), y

    def synchronize() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(name: str, call: Callable[[], object], n: int) -> float:
        for _ in range(warmup):
            call()
        seconds = _median_seconds(call, steps, windows, synchronize)
        print(f"torch {name}: {1e3 * seconds:.1f} ms/call, {n / seconds:.2f} img/s (batch {n})",
              file=sys.stderr, flush=True)
        return n / seconds

    result = {"framework": "pytorch", "torch": torch.__version__, "device": device,
              "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "dtype": dtype, "params": parameter_count(model), "batch": batch,
              "fwd_batch": fwd_batch, "train_img_per_s": None, "fwd_img_per_s": None}
    if "train" in parts:
        step, (x0, labels) = make_train_step(model, config, dtype), inputs(batch)
        result["train_img_per_s"] = timed("train", lambda: step(x0, labels), batch)
    if "fwd" in parts:
        model.eval()
        x, labels = inputs(fwd_batch)
        t = torch.randint(0, config.diffusion.num_timesteps, (fwd_batch,), device=dev)

        def forward() -> torch.Tensor:
            with torch.inference_mode(), _autocast(dev, dtype):
                return model(x, t, labels)
        result["fwd_img_per_s"] = timed("fwd", forward, fwd_batch)
    if dev.type == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(dev)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cifar10.py",
                        help="a config file; its config.model, data, diffusion and train are used")
    parser.add_argument("--batch", type=int, default=8, help="training batch")
    parser.add_argument("--fwd-batch", type=int, default=16, help="forward batch")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", default="train,fwd", help="train, fwd or both")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = benchmark(load_config_file(args.config), args.batch, args.fwd_batch, args.dtype,
                       args.device, args.warmup, args.steps, args.windows, args.seed,
                       tuple(args.parts.split(",")))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
