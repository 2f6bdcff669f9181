"""Every configuration key with its default. Experiment configs start from this and override."""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "digits"          # "digits" (offline) or a tfds image dataset, e.g. "cifar10"
    data.tfds_data_dir = ""          # "" = tfds default (~/tensorflow_datasets)
    data.image_size = 16
    data.channels = 1
    data.random_flip = False         # horizontal flip; wrong for digits, right for CIFAR-10
    data.train_split = "train"
    data.eval_split = "test"
    data.worker_count = 0            # grain worker processes of the train pipeline; 0 = in-process
    data.decoded_cache = True        # tfds: decode a split once into .npy files (N*H*W*C bytes)
    data.download = True             # download and prepare a missing tfds dataset on first use
    data.prepare_timeout = 3600      # seconds other processes wait for process 0 to prepare it

    config.model = model = ml_collections.ConfigDict()
    model.ch = 64
    model.ch_mult = (1, 2)
    model.num_res_blocks = 2
    model.attention_resolutions = (8,)   # in pixels: attention at these feature-map sizes
    model.num_heads = 1
    model.num_head_channels = -1         # > 0: channels // num_head_channels heads, not num_heads
    model.dropout = 0.1
    model.conv_resample = True
    model.resblock_updown = False        # BigGAN-style up/down-sampling inside ResBlocks
    model.use_scale_shift_norm = False   # AdaGN
    model.learn_sigma = False            # 2C output channels (for diffusion.var_type learned_range)
    model.num_classes = 0                # 0: unconditional; else K + 1 label rows (K: null label)
    model.dtype = "float32"              # compute: "float32" | "bfloat16"; parameters stay float32
    model.remat = False                  # jax.checkpoint each ResBlock to save activation memory
    # Conventions that tell the published networks apart (no parameter changes shape):
    # Ho et al.'s DDPM (google/ddpm-cifar10-32) 1, False, 1e-6, "tf_same"; improved-diffusion 0,
    # True, 1e-5, "symmetric". Imported weights compute another function under the other ones.
    model.time_embedding_freq_shift = 0  # sinusoid frequencies 10000^(-i / (ch/2 - shift)): 0 or 1
    model.time_embedding_flip_sin_to_cos = True  # True: [cos | sin] features; False: [sin | cos]
    model.norm_eps = 1e-5                # every GroupNorm's epsilon
    model.num_groups = 32                # GroupNorm groups; fewer (e.g. 8) for a narrow model
    model.downsample_padding = "symmetric"  # stride-2 conv: "symmetric" (1, 1) or "tf_same" (0, 1)

    config.diffusion = diffusion = ml_collections.ConfigDict()
    # The Gaussian path: "vp" (the discrete DDPM / Improved DDPM process; the keys below up to
    # min_snr_gamma) | "edm" (Karras et al. 2022: x0 + s eps, EDM's preconditioning and loss)
    # | "flow" (rectified flow: (1 - t) x0 + t eps, the velocity loss). docs/recipes.md
    diffusion.process = "vp"
    diffusion.schedule = "linear"        # "linear" | "cosine"
    diffusion.num_timesteps = 1000
    diffusion.mean_type = "eps"          # "eps" | "x0" | "v"
    diffusion.var_type = "fixed_large"   # "fixed_small" | "fixed_large" | "learned_range"
    diffusion.loss_type = "mse"          # "mse" (L_simple) | "hybrid" | "kl"
    diffusion.rescale_timesteps = False  # True: the network sees t * 1000 / T (improved-diffusion)
    diffusion.loss_weighting = "none"    # "none" (L_simple) | "min_snr" (Hang et al. 2023) | "edm"
    diffusion.min_snr_gamma = 5.0        # "min_snr" weighs the x0 error by min(SNR, gamma)
    # loss_weighting "edm" (any process but flow): EDM's (s^2 + sd^2) / (s sd)^2 on the x0 error
    diffusion.sigma_data = 0.5           # sd: EDM's data std, of its weight and preconditioning
    diffusion.sigma_min = 0.002          # edm, flow: the levels s = sigma / alpha sampled between
    diffusion.sigma_max = 80.0

    config.train = train = ml_collections.ConfigDict()
    train.num_steps = 2000
    train.epochs = 0                     # > 0: length epochs * iterations_per_epoch (DDIM)
    train.iterations_per_epoch = 0       # 0 with epochs > 0: one pass over the training set
    train.batch_size = 64                # global, over all devices and processes
    train.lr = 2e-4
    train.warmup_steps = 100
    train.lr_schedule = "constant"       # after warmup: "constant" (DDPM) | "cosine" (to 0)
    train.grad_clip = 1.0
    train.weight_decay = 0.0
    train.ema_decay = 0.999
    # EDM's half-life EMA instead of the bare decay: beta = 0.5^(batch / halflife), the half-life
    # capped at rampup_ratio x the images seen so far; 0 = off (ema_decay, EDM: 500 and 0.05)
    train.ema_halflife_kimg = 0.0
    train.ema_rampup_ratio = 0.0
    # "fixed" (the EMA above) | "power": also EDM2's power-function EMAs of these widths
    # (sigma_rel), stored in float16 every ema_snapshot_every steps for --mode=phema
    train.ema = "fixed"
    train.ema_sigma_rels = (0.05, 0.10)
    train.ema_snapshot_every = 1000
    # The noise levels a step trains at: "uniform" (vp: timesteps; flow: t) | "lognormal" (EDM:
    # ln s ~ N(mean, std^2)) | "logit_normal" (SD3: logit t ~ N(mean, std^2), t = s / (1 + s))
    train.noise_sampling = "uniform"
    train.lognormal_mean = -1.2
    train.lognormal_std = 1.2
    train.logit_normal_mean = 0.0
    train.logit_normal_std = 1.0
    train.label_dropout = 0.0            # chance of the null label instead of the label (guidance)
    train.steps_per_jit = 1              # > 1: several steps per compiled call, to hide dispatch
    train.step_loop = "auto"             # the k steps: "scan" | "unroll" | "auto" (CPU: unroll)
    train.log_every = 100
    train.checkpoint_every = 1000
    train.sample_every = 1000            # 0 disables sample grids
    train.max_to_keep = 3
    train.seed = 0

    config.sample = sample = ml_collections.ConfigDict()
    # "ddpm" | "ddim" | "euler" | "dpm_solver++" (2M) | "dpm_solver++3m" | "unipc" | "edm_heun"
    sample.method = "ddim"
    sample.num_steps = 50                # network evaluations (NFE); edm_heun needs an odd number
    sample.eta = 0.0
    # steps: "auto" (the method's grid for the process: samplers.methods.TIME_GRIDS & co.) |
    # "uniform" | "quadratic" (in t) | "logsnr" | "karras" (rho 7) | "trailing" (vp only:
    # distilled students)
    sample.schedule = "auto"
    # logsnr and karras span sigma = sqrt((1 - abar) / abar) from max(sigma(t=0), sigma_min) to
    # min(sigma(t=T-1), sigma_max); 80 is EDM's sigma_max, 0 keeps the model's own sigma_min
    sample.sigma_min = 0.0
    sample.sigma_max = 80.0
    sample.churn = 0.0                   # edm_heun only: Karras et al. S_churn; 0 = Alg. 1
    sample.guidance_scale = 1.0          # 1 = plain conditional; > 1 classifier-free guidance
    sample.clip_denoised = True
    sample.num_samples = 1000
    sample.batch_size = 250
    sample.use_ema = True
    sample.ema_sigma_rel = 0.0           # > 0: the power EMA of this tracked width; 0 = ema_decay's
    sample.checkpoint_step = -1          # -1 = latest
    sample.seed = 0
    sample.grid_size = 100               # images in the grid PNG

    config.eval = evaluation = ml_collections.ConfigDict()
    # any of fid, is, kid, pr, sfid, fd_dinov2, digits, nll (comma-separated)
    evaluation.metrics = "fid,is,kid"
    evaluation.num_samples = 50000       # FID is biased upwards at small N; the papers use 50k
    evaluation.batch_size = 200          # Inception batch
    evaluation.samples_dir = ""          # "" = sample now; else read its samples_*.npz
    # FID Inception weights: "auto" fetches inception_url on first use into the cache
    # ($JAX_DIFFUSION_CACHE_DIR, else $XDG_CACHE_HOME/jax_diffusion, else ~/.cache/jax_diffusion)
    # and checks inception_sha256 before use; any other value is a path (.pth / .pt / .bin / .npz).
    evaluation.inception_weights = "auto"
    evaluation.inception_url = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
                                "fid_weights/pt_inception-2015-12-05-6726825d.pth")
    evaluation.inception_sha256 = (
        "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2")
    # Inception input convention; FIDs compare only within one: "tf1" (the papers' TF graph, as
    # torch-fidelity) | "pytorch_fid" (pytorch-fid) | "clean" (clean-fid).
    evaluation.inception_preprocess = "tf1"
    evaluation.reference_stats = ""      # "" = from the training set, cached in the workdir
    # DINOv2 ViT-L/14 weights for fd_dinov2, fetched and checked like the Inception weights.
    evaluation.dinov2_weights = "auto"
    evaluation.dinov2_url = ("https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/"
                             "dinov2_vitl14_pretrain.pth")
    evaluation.dinov2_sha256 = (
        "d5383ea8f4877b2472eb973e0fd72d557c7da5d3611bd527ceeb1d7162cbf428")
    evaluation.nll_examples = 0          # 0 = the whole eval split
    evaluation.nll_batch_size = 64
    # quality vs NFE, e.g. "ddim:10,20,50;dpm_solver++3m:5,10,20;edm_heun:9,19"; "" = none
    evaluation.sweep = ""
    # quality vs EMA width, e.g. "0.02,0.05,0.1,0.15,0.2": each rebuilt from the power-EMA
    # snapshots of a config.train.ema="power" run; "" = none
    evaluation.ema_sweep = ""

    # --mode=import / --mode=export (jax_diffusion/convert/): PyTorch checkpoints <-> Orbax.
    config.convert = convert = ml_collections.ConfigDict()
    convert.source = ""                  # import: a diffusers UNet2DModel dir or a .safetensors/.pt
    convert.format = "auto"              # "auto" | "diffusers" | "improved_diffusion"; auto: a dir
                                         # with config.json is diffusers, a file improved_diffusion
    convert.step = 0                     # import: the checkpoint step written into --workdir
    convert.target = ""                  # export: the diffusers model directory written

    # --mode=bench (jax_diffusion/bench/run.py): random data, compile timed apart, medians.
    config.bench = bench = ml_collections.ConfigDict()
    bench.parts = "train,fwd,sample"     # comma-separated subset of train, fwd, sample, data, host,
                                         # checkpoint, memory, eval
    bench.batch_size = 8                 # global training batch; must divide over the devices
    bench.sample_batch_size = 16         # batch of the forward passes and of sampling
    bench.num_steps = 5                  # timed calls per window (train steps, forward passes)
    bench.warmup_steps = 2               # untimed calls after compiling
    bench.windows = 3                    # timed windows; the median is reported
    bench.sample_steps = "10,50"         # an int or a comma string: one compiled sampler each
    bench.method = "ddim"                # sampler for sample_steps: any config.sample.method
    bench.seed = 0                       # random data and sampling key
    bench.data_dir = ""                  # data: a CIFAR-shaped tfds set; "" = <workdir>/bench_data
    bench.data_batch_size = 128          # data: global batch of the pipeline (the CIFAR recipe's)
    bench.data_batches = 100             # data: batches per timed window
    bench.data_workers = "0,1,2"         # data: grain worker process counts to measure
    bench.steps_per_jit = "1,4,16"       # host: steps per compiled call to measure
    bench.memory_batches = "64,128"      # memory: per-device batches analysed (two give the fit)
    bench.checkpoint_loop_calls = 100_000  # checkpoint: tiny jitted calls standing in for the loop
    bench.gap_batches = 6                # eval: sampling batches a window when timing their gaps

    # --mode=distill (jax_diffusion/distill/loop.py): few-step students of a trained teacher. Batch
    # size, seed, gradient clipping, logging and checkpoint intervals come from config.train.
    config.distill = distill = ml_collections.ConfigDict()
    distill.method = "progressive"       # "progressive" (Salimans & Ho) | "consistency" (Song)
    distill.teacher_workdir = ""         # a --mode=train workdir: its latest EMA weights
    distill.teacher_steps = 64           # progressive: the teacher's DDIM (eta 0) trailing steps
    distill.num_halvings = 4             # progressive: stages; last student teacher_steps / 2**it
    distill.steps_per_stage = 2000       # optimizer steps of each stage (consistency: one stage)
    distill.lr = 1e-4                    # constant AdamW learning rate, fresh optimizer each stage
    distill.ema_decay = 0.999            # EMA of the student; the EMA is the next stage's teacher
    distill.mean_type = "v"              # progressive student: "v" | "x0" (eps fails at 1 step)
    distill.guidance_scale = 1.0         # the teacher's classifier-free guidance w, distilled in
    # Consistency distillation (consistency.py): f = c_skip x + c_out F, F the teacher's network.
    distill.num_scales = 18              # N levels of the training grid (the paper's CIFAR-10 18)
    distill.sigma_max = 80.0             # Karras levels up to this sigma (EDM's), plus t = T - 1
    distill.sigma_data = 0.5             # sigma_data of c_skip / c_out (EDM's and the paper's)
    distill.solver = "heun"              # the teacher's ODE step: "heun" | "euler" (= DDIM)
    distill.target_decay = 0.95          # mu of the target network's EMA; 0 = the student itself
    distill.student_steps = 0            # written by --mode=distill into its checkpoints; leave 0

    # --mode=phema (jax_diffusion/training/phema_command.py): any EMA width rebuilt from snapshots.
    config.phema = phema = ml_collections.ConfigDict()
    phema.sigma_rel = 0.1                # the width to rebuild, in (0, 0.2887)
    phema.output_workdir = ""            # the new workdir that receives it as a checkpoint
    phema.step = -1                      # the snapshot step rebuilt at; -1 = the latest

    # Multi-process runs (TPU pods, several GPU hosts): jax_diffusion/runtime/distributed.py.
    config.distributed = dist = ml_collections.ConfigDict()
    dist.cluster = "auto"                # "auto": a SLURM step or Cloud TPU VM joins itself; "none"
    dist.coordinator_address = ""        # host:port of process 0, e.g. "10.0.0.2:1234"; "" = auto
    dist.num_processes = 0               # with coordinator_address: how many processes join
    dist.process_id = -1                 # with coordinator_address: this process's id, 0..n-1
    dist.local_device_count = 0          # > 0 forces that many CPU devices (tests); 0: XLA_FLAGS
    dist.initialization_timeout = 300    # seconds to wait for every process to join
    dist.heartbeat_timeout = 100         # seconds of silence after which a process counts as dead

    return config
