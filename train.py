"""Training for LetsTalk, one loop for both stages.

  python train.py --stage vae               # 1. the VAE that defines the latent space (Sec. 3.1)
  python train.py                           # 2. the diffusion transformer on VAE latents (Sec. 3, Eq. 1-3)
  torchrun --nproc_per_node=8 train.py --size B --data DIR     # the same on 8 GPUs (DDP)

The loop is the same whatever it trains: AdamW with a linear warm-up, gradient clipping and accumulation, a tqdm
bar, a JSONL log, periodic evaluation, and atomic checkpoints that make every run time-budgeted (`--max-minutes`)
and resumable (`--resume` continues exactly: weights, EMA, optimizer, step, RNG state and data position).

Data is a fixed pool cached on disk: single frames for the VAE; for the diffusion stage, F-frame clips already
encoded by the VAE (latents of the clip, its reference and motion frames, and the mel windows), so CPU steps are
spent on the transformer. The pool comes from the synthetic world (`--data synthetic`, the default) or from a
folder in data.py's layout (`--data DIR`), of which every 20th video is held out for evaluation.
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import metrics
from letstalk import SIZES, LetsTalk, config_for
from vae import VAE, VAEConfig, load_vae, psnr, vae_loss, vae_state

# ----------------------------------------------------------------------------------------------------------------
# Diffusion (paper Sec. 3.1, Eq. 1-3), shared with sample.py


class Diffusion:
    """DDPM with fixed variances: the noise schedule, the forward process q(x_t | x_0), training targets and the
    reverse-process samplers (DDPM and DDIM).

    The official code follows DiT and also learns the variances (8 output channels, a hybrid loss) and samples with
    250 DDPM steps; we keep the variances fixed (the paper's Eq. 3 is all it needs) and sample with DDIM in 25-50.
    """

    def __init__(self, steps=1000, schedule="linear"):
        if schedule == "linear":  # DDPM's schedule: beta from 1e-4 to 0.02
            betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
        elif schedule == "cosine":  # Nichol & Dhariwal: alpha_bar follows a squared cosine, gentler at the ends
            s = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
            alpha_bar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"schedule is 'linear' or 'cosine', got {schedule!r}")
        self.steps = steps
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()  # alpha_bar_t, decreasing from ~1 to ~0

    def _ab(self, t, x):
        """alpha_bar_t for a batch of timesteps t (B,), shaped to broadcast against x (B, ...)."""
        return self.alphas_cumprod.to(x.device)[t].view(-1, *[1] * (x.dim() - 1))

    def q_sample(self, x0, t, noise):
        """Eq. 2: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, a sample of q(x_t | x_0) (Eq. 1)."""
        ab = self._ab(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def target(self, x0, noise, t, prediction):
        """What the network learns to output. eps: the noise (Eq. 3, the paper's choice); x0: the clean latents
        (sharp at high noise, but errors scale with the signal); v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans &
        Ho: well scaled at every noise level)."""
        ab = self._ab(t, x0)
        return {"eps": noise, "x0": x0, "v": ab.sqrt() * noise - (1 - ab).sqrt() * x0}[prediction]

    def split(self, x_t, t, out, prediction):
        """From the network output, the implied (x0, eps) at x_t."""
        ab = self._ab(t, x_t)
        if prediction == "eps":
            return (x_t - (1 - ab).sqrt() * out) / ab.sqrt(), out
        if prediction == "x0":
            return out, (x_t - ab.sqrt() * out) / (1 - ab).sqrt()
        x0 = ab.sqrt() * x_t - (1 - ab).sqrt() * out
        return x0, (1 - ab).sqrt() * x_t + ab.sqrt() * out

    def loss_weight(self, t, prediction, min_snr_gamma=None):
        """Per-sample loss weight (B,). Without min-SNR all weights are 1 (Eq. 3). Min-SNR-gamma (Hang et al.)
        caps how much the nearly clean timesteps count, expressed for each target: it speeds up training."""
        if min_snr_gamma is None:
            return torch.ones(len(t), device=t.device)
        ab = self.alphas_cumprod.to(t.device)[t]
        snr = ab / (1 - ab)
        capped = snr.clamp(max=min_snr_gamma)
        return {"eps": capped / snr, "x0": capped, "v": capped / (snr + 1)}[prediction]

    @torch.no_grad()
    def sample(self, denoise, shape, steps=25, eta=0.0, generator=None, device="cpu", progress=False):
        """Draw x_0 from noise: denoise(x_t, t) -> (x0, eps) is the model (with guidance), shape the latents'.

        DDIM (Song et al.) on `steps` evenly spaced timesteps; eta = 0 is deterministic DDIM, eta = 1 with
        steps = self.steps is DDPM's ancestral sampler with the posterior variance.
        """
        x = torch.randn(shape, generator=generator, device="cpu").to(device)
        times = torch.linspace(self.steps - 1, 0, steps).round().long().tolist()
        for i, t in enumerate(tqdm(times, desc="denoise", leave=False, disable=not progress)):
            x0, eps = denoise(x, torch.full((shape[0],), t, device=device, dtype=torch.long))
            noise = torch.randn(shape, generator=generator, device="cpu").to(device)
            x = self.ddim_step(x0, eps, t, times[i + 1] if i + 1 < len(times) else -1, eta, noise)
        return x

    def ddim_step(self, x0, eps, t, t_prev, eta, noise):
        """One reverse step from timestep t to t_prev (-1: the clean end, alpha_bar = 1), given the model's
        (x0, eps) at x_t, all (B, ...): x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma noise,
        sigma = eta sqrt((1 - ab_prev) / (1 - ab) (1 - ab / ab_prev))."""
        ab = self.alphas_cumprod[t].item()
        ab_prev = self.alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        return math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps + sigma * noise


# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Every setting of a run; `python train.py --help` lists them with HELP below, BOUNDS gives their ranges.
    Zeros and empty strings mean "the default for this device and stage" (see resolve)."""
    stage: str = "diffusion"
    data: str = "synthetic"
    out: str = ""
    cache: str = ""
    seed: int = 0
    device: str = ""
    steps: int = 100_000
    batch_size: int = 0
    accum: int = 1
    lr: float = 0.0
    warmup: int = 100
    cooldown: int = 0
    grad_clip: float = 1.0
    eval_every: int = 250
    save_minutes: float = 10.0
    # VAE stage
    resolution: int = 0
    factor: int = 0
    width: int = 32
    videos: int = 600
    # diffusion stage
    vae: str = "runs/vae/ckpt.pt"
    size: str = ""
    frames: int = 0
    motion: int = 2
    ref_fusion: str = "symbiotic"
    audio_fusion: str = "direct"
    clips: int = 2000
    prediction: str = "eps"
    schedule: str = "linear"
    min_snr_gamma: float = 0.0
    mouth_weight: float = 1.0
    blink_repeat: int = 1
    drop_audio: float = 0.1
    drop_ref: float = 0.1
    drop_motion: float = 0.3
    ema: float = 0.999
    compile: bool = False


HELP = {
    "stage": "vae (stage 1) or diffusion (stage 2)",
    "data": "'synthetic' or a folder in data.py's layout",
    "out": "run folder (default runs/<stage>)",
    "cache": "where the encoded pool lives (default: the run folder)",
    "seed": "seed of the weights, the data order and the synthetic world",
    "device": "cpu or cuda (default: cuda if available)",
    "steps": "stop after this many optimizer steps (or earlier, with --max-minutes)",
    "batch_size": "clips (frames for the VAE) per micro-batch and rank (default: 32 VAE; diffusion 16, or 8 for "
                  "size B and 4 for L, which fit an 80 GB GPU)",
    "accum": "gradient accumulation: micro-batches per optimizer step",
    "lr": "peak learning rate (default: 5e-4 VAE, 3e-4 diffusion size T, 1e-4 as the official code for S/B/L)",
    "warmup": "steps of linear learning-rate warm-up (0: none)",
    "cooldown": "steps of linear learning-rate decay to 0 before --steps (0: none); a cooled-down model samples "
                "cleaner images. Set --steps to a step you will reach",
    "grad_clip": "clip the global gradient norm to this",
    "eval_every": "steps between evaluations (and, for diffusion, a sample grid PNG)",
    "save_minutes": "minutes between checkpoints (one is always written at the end)",
    "resolution": "frame size (default: 256 on CUDA as in the paper, 64 on CPU)",
    "factor": "VAE downsampling (default: 8 at 256 and above, else 4: latents of 32x32 and 16x16)",
    "width": "VAE channels at full resolution (32 trains fast on a CPU; try 64-128 for real data)",
    "videos": "synthetic training videos the pool is cut from",
    "vae": "VAE checkpoint from `train.py --stage vae` (diffusion stage)",
    "size": "model size T, S, B, L (default: B on CUDA, T on CPU)",
    "frames": "F per clip (default 16 as the paper on CUDA, 8 on CPU)",
    "motion": "M motion frames before each clip (0: none)",
    "ref_fusion": "how the portrait is fused: symbiotic (the paper), siamese or direct",
    "audio_fusion": "how the audio is fused: direct (the paper), siamese or symbiotic",
    "clips": "clips in the encoded pool",
    "prediction": "network target: eps (the paper's Eq. 3), v or x0",
    "schedule": "noise schedule: linear (DDPM, the official code) or cosine",
    "min_snr_gamma": "0: off (plain Eq. 3); 5 is the usual value",
    "mouth_weight": "loss weight inside the mouth box (synthetic) or lower face (real data); 1: off",
    "blink_repeat": "synthetic data: clips with a blink appear this many times per epoch, since a small model "
                    "under-produces rare blinks; 1: off",
    "drop_audio": "probability of dropping the audio (classifier-free guidance), independent of the reference",
    "drop_ref": "probability of dropping the reference (classifier-free guidance)",
    "drop_motion": "probability of dropping the motion frames, so the model also learns to start a video",
    "ema": "EMA decay of the weights sample.py uses (warmed up: min(decay, (1 + n) / (10 + n)))",
    "compile": "torch.compile the model; --no-compile for eager (default: on CUDA, where it is faster once compiled, "
               "a minute or two in)",
}


# the range of every numeric setting; a number outside it stops the command line before any work starts
BOUNDS = {"steps": dict(low=1), "batch_size": dict(low=1), "accum": dict(low=1), "lr": dict(above=0),
          "warmup": dict(low=0), "cooldown": dict(low=0), "grad_clip": dict(above=0), "eval_every": dict(low=1),
          "save_minutes": dict(above=0), "resolution": dict(low=16), "width": dict(low=4), "videos": dict(low=1),
          "frames": dict(low=1), "motion": dict(low=0), "clips": dict(low=1), "min_snr_gamma": dict(low=0),
          "mouth_weight": dict(low=0), "blink_repeat": dict(low=1), "drop_audio": dict(low=0, high=1),
          "drop_ref": dict(low=0, high=1), "drop_motion": dict(low=0, high=1), "ema": dict(low=0, high=1)}


# what --resume may change: when to stop, the learning-rate tail, the blink rebalancing, and where and how it runs
# (under torchrun each rank's own GPU); every other setting would make it another run
RESUMABLE = ("steps", "cooldown", "blink_repeat", "compile", "device")
FRAMES_PER_VIDEO = 8  # frames taken from each synthetic video for the VAE pool: many identities, few frames each
SYNTH_SECONDS = 1.0  # length of the synthetic videos the VAE pool is cut from
CLIP_SECONDS = 4.0  # and the diffusion pool


# ----------------------------------------------------------------------------------------------------------------
# Distributed helpers: the same script runs alone or under torchrun


def rank():
    """This process's rank under torchrun; 0 when not distributed."""
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    """The number of processes under torchrun; 1 when not distributed."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    """Wait for every rank (nothing to wait for when not distributed)."""
    if dist.is_initialized():
        dist.barrier()


def mean_across_ranks(value):
    """The mean of a float over all ranks (all-reduced); the value itself when not distributed."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.item() / world()


def batch_indices(step, batch_size, n, seed):
    """The pool indices of global batch `step`: consecutive slices of one random permutation per epoch, so the data
    position is a pure function of the step and a resumed run sees exactly the batches it would have seen."""
    start, out = step * batch_size, []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out += perm[offset:offset + batch_size - len(out)].tolist()
    return out


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: the VAE


def distributed(model, device):
    """The model wrapped in DistributedDataParallel under torchrun (it averages the gradients across ranks in
    backward), else the model itself."""
    if not dist.is_initialized():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def videos_for(cfg, split, n_synthetic, seconds, resolution):
    """The videos of `split`: n_synthetic SyntheticVideos of `seconds` at `resolution` for --data synthetic,
    else a VideoFolder of cfg.data (n_synthetic, seconds and resolution unused)."""
    if cfg.data == "synthetic":
        return data.SyntheticVideos(split, n_synthetic, seconds, resolution, cfg.seed)
    return data.VideoFolder(cfg.data, split)


def build_frame_pool(videos, path, seed=0):
    """FRAMES_PER_VIDEO frames of every video, with their ground truth, cached as a ClipPool of 1-frame clips."""
    clips = data.ClipDataset(videos, frames=1, motion=0, seed=seed)
    return data.ClipPool.build(clips, min(len(videos) * FRAMES_PER_VIDEO, len(clips)), path)


class VAEStage:
    """Reconstruction of single frames (vae.vae_loss); evaluation: PSNR on held-out identities or videos."""

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        self.model = VAE(VAEConfig(resolution=cfg.resolution, factor=cfg.factor, width=cfg.width)).to(device)
        self.train_frames = self.pool("train", cfg.videos)["frames"][:, 0]  # uint8 (N, 3, H, W)
        self.val_frames = self.pool("val", max(8, cfg.videos // 10))["frames"][:, 0].to(device).float() / 127.5 - 1
        self.net = distributed(self.model, device)

    def pool(self, split, n_videos):
        """The 1-frame ClipPool of a split as a dict (frames uint8 (N, 1, 3, H, W), ...), built by rank 0 on
        first use and cached in cfg.cache."""
        path = Path(self.cfg.cache) / f"frames_{split}.pt"
        if rank() == 0 and not path.exists():
            build_frame_pool(videos_for(self.cfg, split, n_videos, SYNTH_SECONDS, self.cfg.resolution), path,
                             self.cfg.seed)
        barrier()
        return data.ClipPool(path).data

    def __len__(self):
        return len(self.train_frames)

    def loss(self, indices):
        """vae_loss on the training frames at `indices` (a list of pool indices) -> (scalar loss, logs dict)."""
        x = self.train_frames[indices].to(self.device).float() / 127.5 - 1
        return vae_loss(self.net, x, self.model.config.kl_weight)

    @torch.no_grad()
    def evaluate(self, step, out):
        """Mean PSNR of the eval-mode VAE on the held-out frames -> {"val_psnr": float}."""
        self.model.eval()
        scores = torch.cat([psnr(self.model.decode(self.model.encode(x)), x) for x in self.val_frames.split(64)])
        self.model.train()
        return {"val_psnr": scores.mean().item()}

    @torch.no_grad()
    def before_save(self):
        """Measure latent_scale = 1 / std of the (mean) latents of training frames, so the checkpoint is usable."""
        self.model.eval()
        x = self.train_frames[:512].to(self.device).float() / 127.5 - 1
        z = torch.cat([self.model.encode(chunk) for chunk in x.split(64)])
        self.model.latent_scale.fill_(1.0 / z.std().item())
        self.model.train()

    def state(self):
        """The stage's part of a checkpoint: {"vae": vae_state}."""
        return {"vae": vae_state(self.model)}

    def load(self, ckpt):
        """Restore the VAE weights from a checkpoint written by save_checkpoint."""
        self.model.load_state_dict(ckpt["vae"]["weights"])

    def after_step(self, step):
        """Nothing to do after an optimizer step (the VAE keeps no EMA)."""
        pass


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: the diffusion transformer


@torch.no_grad()
def encode_pool(vae, clips, n, path, device):
    """Encode n clips (evenly spread over a ClipDataset) with the VAE, scaled to unit variance, and save them:
    latents (n, F, C, h, w), ref (n, C, h, w), motion (n, M, C, h, w), mel (n, F, 20, 80), ground truth."""
    picks = np.linspace(0, len(clips) - 1, n).round().astype(int)
    parts = {}
    for i in tqdm(picks, desc="encode clips", unit="clip"):
        item = clips[int(i)]
        images = torch.cat([item["frames"], item["ref"][None], item["motion"]]).to(device)
        z = (vae.encode(images) * vae.latent_scale).cpu()
        F_ = len(item["frames"])
        enc = {"latents": z[:F_], "ref": z[F_], "motion": z[F_ + 1:], "ref_image": item["ref"]}
        enc.update({k: v for k, v in item.items() if k not in ("frames", "ref", "motion")})
        for k, v in enc.items():
            parts.setdefault(k, []).append(v)
    pool = {k: torch.stack(v) for k, v in parts.items()}
    for k in ("latents", "ref", "motion", "mel"):  # half precision halves the file; unit-scale values keep 3 digits
        pool[k] = pool[k].half()
    pool["ref_image"] = ((pool["ref_image"] + 1) * 127.5).round().to(torch.uint8)
    data.atomic_write(path, lambda tmp: torch.save(pool, tmp))


def loss_region(pool_item_boxes, resolution, latent_size, mouth_weight, shape):
    """Per-latent-pixel loss weights (B, F, 1, h, w): mouth_weight inside the mouth box (synthetic ground truth)
    or, without one, inside the lower-middle of the face (real data: rows 55-95%, columns 25-75%), 1 elsewhere."""
    B, F_, _, h, w = shape
    weight = torch.ones(B, F_, 1, h, w)
    ys, xs = torch.arange(h).view(-1, 1) + 0.5, torch.arange(w).view(1, -1) + 0.5
    if pool_item_boxes is None:
        inside = (ys >= 0.55 * h) & (ys <= 0.95 * h) & (xs >= 0.25 * w) & (xs <= 0.75 * w)
        return weight + (mouth_weight - 1) * inside.float()
    box = pool_item_boxes * (latent_size / resolution)  # (B, F, 4) in latent pixels
    x0, y0, x1, y1 = (box[..., k, None, None] for k in range(4))
    inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    return weight + (mouth_weight - 1) * inside.float()[:, :, None]


class DiffusionStage:
    """The LetsTalk denoiser trained with L_simple (Eq. 3) on VAE latents of clips, plus an EMA copy."""

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        self.vae = load_vae(cfg.vae, device)
        self.resolution = self.vae.config.resolution
        latent = self.resolution // self.vae.config.factor
        mcfg = config_for(cfg.size, latent_size=latent, latent_channels=self.vae.config.latent_channels,
                          frames=cfg.frames, motion=cfg.motion, ref_fusion=cfg.ref_fusion,
                          audio_fusion=cfg.audio_fusion)
        self.model = LetsTalk(mcfg).to(device)
        self.ema = LetsTalk(mcfg).to(device).requires_grad_(False)
        self.ema.load_state_dict(self.model.state_dict())
        self.diffusion = Diffusion(schedule=cfg.schedule)
        # with ground truth and a probe (metrics.py probe), evaluations also measure lip sync
        synthetic = cfg.data == "synthetic" and self.resolution == 64
        self.probe = metrics.load_probe(metrics.PROBE) if synthetic and metrics.PROBE.exists() else None
        self.train_pool = self.pool("train", cfg.clips)
        self.val_pool = self.pool("val", max(16, cfg.clips // 20))
        # One epoch's pool items: every clip once, plus (--blink-repeat) the clips with a blink again. Blinks are rare
        # and audio-independent, and a small model all but stops producing such events; repeating them rebalances.
        self.order = torch.arange(len(self.train_pool["latents"]))
        if cfg.blink_repeat > 1:
            if "blink" not in self.train_pool:
                raise data.DataError("--blink-repeat needs blink ground truth, which only synthetic data has")
            blinks = self.order[(self.train_pool["blink"] > 0.5).any(1)]
            self.order = torch.cat([self.order, blinks.repeat(cfg.blink_repeat - 1)])
        # compile the DDP wrapper, not the model inside it, so DDP's gradient buckets still overlap the backward
        net = distributed(self.model, device)
        self.net = torch.compile(net) if cfg.compile else net

    def pool(self, split, n):
        """The encoded clips of a split (encode_pool's dict: latents (N, F, C, h, w), ref, motion, mel, ...), built
        by rank 0 on first use and cached in cfg.cache."""
        path = Path(self.cfg.cache) / f"clips_{split}_{n}x{self.cfg.frames}f{self.cfg.motion}m.pt"
        if rank() == 0 and not path.exists():
            n_videos = max(4, n // 8) if self.cfg.data == "synthetic" else None
            clips = data.ClipDataset(videos_for(self.cfg, split, n_videos, CLIP_SECONDS, self.resolution),
                                     frames=self.cfg.frames, motion=self.cfg.motion, seed=self.cfg.seed)
            encode_pool(self.vae, clips, min(n, len(clips)), path, self.device)
        barrier()
        return torch.load(path, weights_only=True)

    def __len__(self):
        return len(self.order)

    def conditions(self, pool, indices, train):
        """Inputs of the model for pool items: (x0, ref, mel, motion, drop masks)."""
        cfg, dev = self.cfg, self.device
        get = lambda k: pool[k][indices].to(dev).float()  # noqa: E731
        x0, ref, mel = get("latents"), get("ref"), get("mel")
        motion = get("motion") if cfg.motion else None
        B = len(indices)
        drops = {"drop_ref": None, "drop_audio": None, "drop_motion": None}
        if train:
            # small noise on the reference, as the official code (sigma = exp(N(-3, 0.5))); we add it to the
            # cached latent rather than to the image, so the pool need not be re-encoded
            ref = ref + torch.exp(torch.randn(B, 1, 1, 1, device=dev) * 0.5 - 3) * torch.randn_like(ref)
            if motion is not None:  # motion frames from the real frames before the clip, lightly noised
                motion = motion + torch.exp(torch.randn(B, 1, 1, 1, 1, device=dev) * 0.5 - 3) * torch.randn_like(motion)
            drops = {f"drop_{k}": torch.rand(B, device=dev) < getattr(cfg, f"drop_{k}")
                     for k in ("ref", "audio", "motion")}
            if motion is None:
                drops["drop_motion"] = None
        return x0, ref, mel, motion, drops

    def loss(self, indices):
        """L_simple (Eq. 3) on the clips at epoch positions `indices` (self.order maps them to pool items), with
        random t, noise and condition drops; optional mouth and min-SNR weights -> (scalar loss, {})."""
        cfg = self.cfg
        indices = self.order[indices]
        x0, ref, mel, motion, drops = self.conditions(self.train_pool, indices, train=True)
        t = torch.randint(0, self.diffusion.steps, (len(indices),), device=self.device)
        noise = torch.randn_like(x0)
        x_t = self.diffusion.q_sample(x0, t, noise)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.net(x_t, t, ref, mel, motion, **drops)
        err = (out.float() - self.diffusion.target(x0, noise, t, cfg.prediction)).pow(2)  # Eq. 3
        if cfg.mouth_weight != 1:
            boxes = self.train_pool["mouth_box"][indices] if "mouth_box" in self.train_pool else None
            err = err * loss_region(boxes, self.resolution, x0.shape[-1], cfg.mouth_weight, x0.shape).to(err.device)
        weight = self.diffusion.loss_weight(t, cfg.prediction, cfg.min_snr_gamma or None)
        loss = (err.flatten(1).mean(1) * weight).mean()
        return loss, {}

    def after_step(self, step):
        """EMA of the weights, with a warm-up so a short run's EMA is not mostly its initial weights."""
        decay = min(self.cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p, 1 - decay)

    @torch.no_grad()
    def evaluate(self, step, out):
        """Validation loss of the EMA model at fixed timesteps and noise, and a PNG grid of sampled frames
        (per clip: reference | generated frames, then the real frames below)."""
        g = torch.Generator().manual_seed(1234)
        n = min(8, len(self.val_pool["latents"]))
        idx = np.linspace(0, len(self.val_pool["latents"]) - 1, n).round().astype(int).tolist()  # across videos
        x0, ref, mel, motion, _ = self.conditions(self.val_pool, idx, train=False)
        t = torch.randint(0, self.diffusion.steps, (n,), generator=g).to(self.device)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        target = self.diffusion.target(x0, noise, t, self.cfg.prediction)
        val_loss = (self.ema(self.diffusion.q_sample(x0, t, noise), t, ref, mel, motion) - target).pow(2).mean()
        k = 2  # sample two clips with DDIM and decode them

        def denoise(x, tt):
            out = self.ema(x, tt, ref[:k], mel[:k], None if motion is None else motion[:k])
            return self.diffusion.split(x, tt, out, self.cfg.prediction)
        z = self.diffusion.sample(denoise, (k, *x0.shape[1:]), steps=25, generator=g, device=self.device)
        rows = []
        for i in range(k):
            gen = self.vae.decode(z[i] / self.vae.latent_scale)
            real = self.vae.decode(x0[i] / self.vae.latent_scale)
            refimg = self.val_pool["ref_image"][idx[i]].float().to(self.device) / 127.5 - 1
            rows += [torch.cat([refimg, *gen], dim=2), torch.cat([torch.zeros_like(refimg), *real], dim=2)]
        grid = ((torch.cat(rows, dim=1).permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().cpu().numpy()
        path = Path(out) / "samples" / f"step{step:07d}.png"
        path.parent.mkdir(exist_ok=True)
        data.atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
        result = {"val_loss": val_loss.item()}
        if self.probe is not None:  # lip sync of the EMA model on 8 held-out clips (metrics.py)
            refs = self.val_pool["ref_image"][idx].permute(0, 2, 3, 1).numpy()
            diffusion_cfg = {"schedule": self.cfg.schedule, "prediction": self.cfg.prediction}
            result["val_sync"], result["val_sync_mismatched"], _ = metrics.lip_sync(
                self.ema, self.vae, diffusion_cfg, self.probe, refs, self.val_pool["mel"][idx].float(),
                self.val_pool["openness"][idx].numpy(), device=self.device)
        return result

    def before_save(self):
        """Nothing to measure before a checkpoint."""
        pass

    def state(self):
        """The stage's part of a checkpoint: model config and weights, EMA weights, the VAE, diffusion settings."""
        return {"model": {"config": asdict(self.model.cfg), "weights": self.model.state_dict()},
                "ema": self.ema.state_dict(), "vae": vae_state(self.vae),
                "diffusion": {"steps": self.diffusion.steps, "schedule": self.cfg.schedule,
                              "prediction": self.cfg.prediction}}

    def load(self, ckpt):
        """Restore the model and EMA weights from a checkpoint written by save_checkpoint."""
        self.model.load_state_dict(ckpt["model"]["weights"])
        self.ema.load_state_dict(ckpt["ema"])


@torch.no_grad()
def export(run_ckpt, dst, frames=512):
    """Write the part of a diffusion run's checkpoint that sample.py needs: the EMA weights, the VAE and the
    diffusion settings, in fp16 (sampling casts back to float32; half the bytes), plus `domain`: the VAE's worst
    PSNR on `frames` training frames, so sample.py can tell when a portrait is unlike anything trained on."""
    ckpt = torch.load(run_ckpt, map_location="cpu", weights_only=True)
    if ckpt.get("stage") != "diffusion":
        raise data.DataError(f"{run_ckpt}: not a diffusion run's checkpoint")
    cfg = TrainConfig(**ckpt["train_config"])
    vae = VAE(VAEConfig(**ckpt["vae"]["config"])).eval()
    vae.load_state_dict(ckpt["vae"]["weights"])
    videos = videos_for(cfg, "train", 32, CLIP_SECONDS, vae.config.resolution)
    n = min(len(videos), 32)
    x = torch.cat([data.to_tensor(videos[i].frames[:math.ceil(frames / n)]) for i in range(n)])
    worst = min(psnr(vae.decode(vae.encode(chunk)), chunk).min().item() for chunk in x.split(64))
    half = lambda weights: {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}  # noqa: E731
    out = {"stage": "export", "step": ckpt["step"], "train_config": ckpt["train_config"],
           "model": {"config": ckpt["model"]["config"]}, "ema": half(ckpt["ema"]),
           "vae": {"config": ckpt["vae"]["config"], "weights": half(ckpt["vae"]["weights"])},
           "diffusion": ckpt["diffusion"], "domain": {"vae_min_psnr": worst}}
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    data.atomic_write(dst, lambda tmp: torch.save(out, tmp))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The loop


def save_checkpoint(path, cfg, step, stage, optimizer, elapsed):
    """Write the run's state atomically: a plain dict of tensors and numbers (loads with weights_only=True)."""
    stage.before_save()
    ckpt = {"stage": cfg.stage, "step": step, "elapsed": elapsed, "train_config": asdict(cfg), **stage.state(),
            "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
            **({"cuda_rng": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}
    data.atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def train(cfg, resume=False, max_minutes=None):
    """Run (or continue) training until cfg.steps or max_minutes. Returns the final evaluation dict."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(cfg.cache).mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.pt"
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    stage = (VAEStage if cfg.stage == "vae" else DiffusionStage)(cfg, device)
    # fused: one kernel updates every parameter (CPU and CUDA alike); the default steps them one by one
    optimizer = torch.optim.AdamW(stage.model.parameters(), lr=cfg.lr, weight_decay=0.0, fused=True)
    step, elapsed = 0, 0.0
    if resume:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        stage.load(ckpt)
        optimizer.load_state_dict(ckpt["optimizer"])
        step, elapsed = ckpt["step"], ckpt["elapsed"]
        torch.set_rng_state(ckpt["rng"])
        if "cuda_rng" in ckpt and device.type == "cuda":  # the noise drawn on the GPU continues exactly too
            torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu())
    if rank() > 0:  # other ranks draw other noise
        torch.manual_seed(cfg.seed * 1000 + rank() + step)
    def lr_at(s):  # linear warm-up, constant, then (with --cooldown) a linear decay to 0 at cfg.steps
        return cfg.lr * min(1.0, (s + 1) / cfg.warmup if cfg.warmup else 1.0,
                             (cfg.steps - s) / cfg.cooldown if cfg.cooldown else 1.0)
    is_main = rank() == 0

    start, last_save = time.time(), time.time()
    log = open(out / "log.jsonl", "a") if is_main else None
    bar = tqdm(total=cfg.steps, initial=step, desc=cfg.stage, unit="step", dynamic_ncols=True, disable=not is_main)
    global_batch = cfg.batch_size * world()
    while step < cfg.steps and (max_minutes is None or time.time() - start < 60 * max_minutes):
        tick = time.time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        total, logs = 0.0, {}
        for micro in range(cfg.accum):
            indices = batch_indices(step * cfg.accum + micro, global_batch, len(stage), cfg.seed)
            loss, logs = stage.loss(indices[rank()::world()])
            if not torch.isfinite(loss):
                bar.close()
                sys.exit(f"error: the loss became {loss.item()} at step {step}; the last checkpoint ({ckpt_path}) "
                         "is intact. Lower --lr or check the data.")
            (loss / cfg.accum).backward()
            total += loss.item() / cfg.accum
        grad_norm = torch.nn.utils.clip_grad_norm_(stage.model.parameters(), cfg.grad_clip).item()
        optimizer.step()
        stage.after_step(step)
        step += 1
        total = mean_across_ranks(total)
        bar.set_postfix(loss=f"{total:.4f}", refresh=False)
        bar.update(1)
        record = {"step": step, "loss": total, "lr": lr_at(step - 1), "grad_norm": grad_norm,
                  "it_s": 1 / max(time.time() - tick, 1e-9), **logs}
        if is_main and step % cfg.eval_every == 0:
            record.update(stage.evaluate(step, out))
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val")))
        if is_main:
            log.write(json.dumps(record) + "\n")
            log.flush()
        if time.time() - last_save > 60 * cfg.save_minutes:
            if is_main:
                save_checkpoint(ckpt_path, cfg, step, stage, optimizer, elapsed + time.time() - start)
            last_save = time.time()
    bar.close()
    result = {"step": step}
    if dist.is_initialized():  # DDP keeps replicas identical; check it, a desync would silently waste the run
        checksum = torch.tensor([sum(p.double().sum().item() for p in stage.model.parameters())],
                                device=next(stage.model.parameters()).device)
        spread = [checksum.clone(), checksum.clone()]
        dist.all_reduce(spread[0], op=dist.ReduceOp.MAX)
        dist.all_reduce(spread[1], op=dist.ReduceOp.MIN)
        result["rank_param_spread"] = (spread[0] - spread[1]).item()
    if is_main:
        save_checkpoint(ckpt_path, cfg, step, stage, optimizer, elapsed + time.time() - start)
        result.update(stage.evaluate(step, out), minutes=(elapsed + time.time() - start) / 60)
        log.write(json.dumps({"final": result}) + "\n")
        log.close()
        print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "step")
              + f"; checkpoint {ckpt_path}")
    barrier()
    return result


def fail(message):
    """Print `error: message` to stderr and exit with status 2 (a usage error)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def resolve(args):
    """A TrainConfig from the command line, with the device-dependent defaults filled in."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        gpu = data.check_device(device).type == "cuda"
    except data.DataError as e:
        fail(str(e))
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    cfg = TrainConfig(**given)
    cfg.device = device
    cfg.out = cfg.out or f"runs/{cfg.stage}"
    cfg.cache = cfg.cache or cfg.out
    if cfg.data != "synthetic" and not Path(cfg.data).is_dir():
        fail(f"--data {cfg.data}: not a folder (make one with `python data.py synth` or `python data.py prepare`), "
             "or use --data synthetic")
    if cfg.stage == "vae":
        cfg.resolution = cfg.resolution or (256 if gpu else 64)
        cfg.factor = cfg.factor or (8 if cfg.resolution >= 256 else 4)
        cfg.batch_size, cfg.lr = cfg.batch_size or 32, cfg.lr or 5e-4
        if cfg.resolution % (2 * cfg.factor):
            fail(f"--resolution {cfg.resolution}: must be a multiple of {2 * cfg.factor}, twice --factor (the "
                 "diffusion model cuts the latents into 2x2 patches)")
        if cfg.width % 4:
            fail(f"--width {cfg.width}: must be a multiple of 4 (GroupNorm takes groups of 4 channels)")
        return cfg
    cfg.compile = gpu if args.compile is None else args.compile
    cfg.size = cfg.size or ("B" if gpu else "T")
    cfg.frames = cfg.frames or (16 if gpu else 8)
    # B and L at the paper's clip keep about 4.6 and 12 GiB of bf16 activations per clip for the backward (bench.py's
    # saved_mib, README): batch 16 of B would not fit an 80 GB GPU beside the weights and AdamW
    cfg.batch_size = cfg.batch_size or {"B": 8, "L": 4}.get(cfg.size, 16)
    cfg.lr = cfg.lr or (3e-4 if cfg.size == "T" else 1e-4)
    if cfg.size in ("B", "L") and not gpu:
        fail(f"--size {cfg.size} needs a GPU (one step on this CPU would take minutes). On a CPU, train the tiny "
             "model: `python train.py --size T`; on GPUs: `torchrun --nproc_per_node=N train.py --size "
             f"{cfg.size} --data DIR` with DIR from `python data.py prepare`.")
    if not Path(cfg.vae).is_file():
        fail(f"--vae {cfg.vae}: no VAE checkpoint; train one first with `python train.py --stage vae`")
    return cfg


def main(argv=None):
    """`python train.py`: train a stage, --resume a run or --export it for sample.py (argv=None: sys.argv)."""
    parser = data.Parser(prog="train.py", description=__doc__.split("\n\n")[0] + "\n\n" +
                                     __doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped; "
                        "its settings come from its checkpoint (--steps, --cooldown, --blink-repeat, --compile, "
                        "--device and --max-minutes may change)")
    parser.add_argument("--max-minutes", type=data.bounded(float, 0), default=None,
                        help="stop cleanly with a checkpoint after this much training time (0: set the run up, "
                        "train no step)")
    choices = {"stage": ["vae", "diffusion"], "size": list(SIZES), "prediction": ["eps", "v", "x0"],
               "schedule": ["linear", "cosine"], "ref_fusion": ["symbiotic", "siamese", "direct"],
               "audio_fusion": ["symbiotic", "siamese", "direct"], "factor": [4, 8]}
    for f in fields(TrainConfig):
        flag, help_text = "--" + f.name.replace("_", "-"), HELP[f.name]
        if "default" not in help_text:
            help_text += f" (default: {f.default!r})"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = data.bounded(type(f.default), **BOUNDS[f.name]) if f.name in BOUNDS else type(f.default)
            parser.add_argument(flag, type=kind, default=None, choices=choices.get(f.name), help=help_text)
    parser.add_argument("--export", type=Path, metavar="PATH", help="write the sampling part of --out's checkpoint "
                        "(EMA weights, VAE, fp16) to PATH for sample.py, and exit")
    args = parser.parse_args(argv)

    if args.export:
        try:
            export(Path(args.out or "runs/diffusion") / "ckpt.pt", args.export)
        except (FileNotFoundError, data.DataError) as e:
            fail(f"--export: {e} (pass the run folder with --out)")
        print(f"wrote {args.export} ({args.export.stat().st_size / 1e6:.1f} MB)")
        return None
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available() and args.device != "cpu"
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        dist.init_process_group("nccl" if cuda else "gloo")
    out = Path(args.out or f"runs/{args.stage or TrainConfig.stage}")
    if args.resume:
        if not (out / "ckpt.pt").exists():
            fail(f"nothing to resume in {out} (no ckpt.pt); drop --resume to start a run")
        saved = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)["train_config"]
        moved = {"out": str(out), "cache": str(out) if saved["cache"] == saved["out"] else saved["cache"]}
        fixed = sorted(f.name for f in fields(TrainConfig) if f.name not in (*RESUMABLE, "out")
                       and getattr(args, f.name) is not None and getattr(args, f.name) != saved[f.name])
        if fixed:  # repeating a setting is fine; changing one would silently not happen
            fail(f"{', '.join('--' + k.replace('_', '-') for k in fixed)}: a resumed run keeps the settings in its "
                 f"checkpoint; only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE)} and --max-minutes "
                 "may change")
        changed = {k: getattr(args, k) for k in RESUMABLE if getattr(args, k) is not None}
        cfg = TrainConfig(**{**saved, **moved, **changed})  # the folder may have moved
        try:  # a run from a GPU machine may be continued on a CPU with --device cpu
            data.check_device(cfg.device)
        except data.DataError as e:
            fail(f"{e} (the run was saved with --device {saved['device']})")
    else:
        cfg = resolve(args)
        if (out / "ckpt.pt").exists():
            fail(f"{out} already holds a run; pass --resume to continue it or --out for a new one")
    try:
        return train(cfg, resume=args.resume, max_minutes=args.max_minutes)
    except (data.DataError, ValueError) as e:
        fail(str(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
