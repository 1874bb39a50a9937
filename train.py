"""Training for LetsTalk, one loop for both stages.

  python train.py --stage vae               # 1. the VAE that defines the latent space (Sec. 3.1)
  python train.py                           # 2. the diffusion transformer on VAE latents (Sec. 3, Eq. 1-3)
  torchrun --nproc_per_node=8 train.py --size B --data DIR     # the same on 8 GPUs (DDP)

The loop is the same whatever it trains: AdamW with a linear warm-up, gradient clipping and accumulation, a tqdm
bar, a JSONL log, periodic evaluation, and atomic checkpoints that make every run time-budgeted (`--max-minutes`)
and resumable (`--resume` continues exactly: weights, EMA, optimizer, step, every rank's RNG state and the data
position). The settings are declared in config.py, the diffusion process in diffusion.py.

Data is a fixed pool cached on disk: single frames for the VAE; for the diffusion stage, F-frame clips already
encoded by the VAE (latents of the clip, its reference and motion frames, and the mel windows), so CPU steps are
spent on the transformer. The pool comes from the synthetic world (`--data synthetic`, the default) or from a
folder in data.py's layout (`--data DIR`), of which every 20th video is held out for evaluation.
"""

import argparse
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common import (Parser, UserError, atomic_write, bounded, fail, load_checkpoint, save_png, to_tensor, to_uint8,
                    user_errors)
from config import TrainConfig, add_settings, given, new_config, resumed_config
from data import ClipDataset, ClipPool, VideoFolder, build_frame_pool
from diffusion import Diffusion
from letstalk import LetsTalk, config_for
from metrics import PROBE, load_probe, per_clip_sync, probe_readings
from sample import generate
from vae import VAE, VAEConfig, load_vae, psnr, vae_from_state, vae_loss, vae_state
from world import SyntheticVideos

SYNTH_SECONDS = 1.0  # length of the synthetic videos the VAE's frame pool is cut from
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


def _all_reduce(values, op):
    """all_reduce a list of floats across ranks with `op`, on the device the backend needs (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=op)
    return t.tolist()


def mean_across_ranks(value):
    """The mean of a float over all ranks (all-reduced); the value itself when not distributed."""
    return _all_reduce([value], dist.ReduceOp.SUM)[0] / world() if dist.is_initialized() else value


def any_rank(flag):
    """True if `flag` is True on any rank. Every rank then takes the same branch: ranks that disagreed about when
    to stop or to save (each reads its own clock) would wait on each other forever."""
    return bool(_all_reduce([float(flag)], dist.ReduceOp.MAX)[0]) if dist.is_initialized() else flag


def rng_states():
    """Every rank's random-number state, gathered on every rank: {"rng": uint8 (world, n)} plus "cuda_rng" on a GPU.
    Each rank draws its own noise and condition drops, so an exact resume must restore each one's state."""
    mine = {"rng": torch.get_rng_state(), **({"cuda_rng": torch.cuda.get_rng_state()}
                                              if torch.cuda.is_available() else {})}
    states = [mine]
    if dist.is_initialized():
        states = [None] * world()
        dist.all_gather_object(states, mine)
    return {key: torch.stack([s[key] for s in states]) for key in mine}


def distributed(model, device):
    """The model wrapped in DistributedDataParallel under torchrun (it averages the gradients across ranks in
    backward), else the model itself."""
    if not dist.is_initialized():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def batch_indices(step, batch_size, n, seed):
    """The pool indices of global batch `step`: consecutive slices of one random permutation per epoch, so the data
    position is a pure function of the step and a resumed run sees exactly the batches it would have seen."""
    start, out = step * batch_size, []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out += perm[offset:offset + batch_size - len(out)].tolist()
    return out


def videos_for(cfg, split, n_synthetic, seconds, resolution):
    """The videos of `split`: n_synthetic SyntheticVideos of `seconds` at `resolution` for --data synthetic,
    else a VideoFolder of cfg.data (n_synthetic, seconds and resolution unused)."""
    if cfg.data == "synthetic":
        return SyntheticVideos(split, n_synthetic, seconds, resolution, cfg.seed)
    return VideoFolder(cfg.data, split)


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: the VAE


class VAEStage:
    """Reconstruction of single frames (vae.vae_loss); evaluation: PSNR on held-out identities or videos."""

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        self.model = VAE(VAEConfig(resolution=cfg.resolution, factor=cfg.factor, width=cfg.vae_width)).to(device)
        self.train_frames = self.pool("train", cfg.videos)["frames"][:, 0]  # uint8 (N, H, W, 3)
        self.val_frames = to_tensor(self.pool("val", max(8, cfg.videos // 10))["frames"][:, 0]).to(device)
        self.net = distributed(self.model, device)

    def pool(self, split, n_videos):
        """The 1-frame ClipPool of a split as a dict (frames uint8 (N, 1, H, W, 3), ...), built by rank 0 on
        first use and cached in cfg.cache."""
        path = Path(self.cfg.cache) / f"frames_{split}.pt"
        if rank() == 0 and not path.exists():
            build_frame_pool(videos_for(self.cfg, split, n_videos, SYNTH_SECONDS, self.cfg.resolution), path,
                             self.cfg.seed)
        barrier()
        return ClipPool(path).data

    def __len__(self):
        return len(self.train_frames)

    def loss(self, indices):
        """vae_loss on the training frames at `indices` (a list of pool indices) -> (scalar loss, logs dict)."""
        x = to_tensor(self.train_frames[indices]).to(self.device)
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
        x = to_tensor(self.train_frames[:512]).to(self.device)
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
    pool["ref_image"] = torch.from_numpy(to_uint8(pool["ref_image"]))  # (n, H, W, 3)
    atomic_write(path, lambda tmp: torch.save(pool, tmp))


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
        self.diffusion = Diffusion(schedule=cfg.schedule, prediction=cfg.prediction)
        # with ground truth and a probe (evaluate.py probe), evaluations also measure lip sync
        synthetic = cfg.data == "synthetic" and self.resolution == 64
        self.probe = load_probe(PROBE) if synthetic and PROBE.exists() else None
        self.train_pool = self.pool("train", cfg.clips)
        self.val_pool = self.pool("val", max(16, cfg.clips // 20))
        # One epoch's pool items: every clip once, plus (--blink-repeat) the clips with a blink again. Blinks are rare
        # and audio-independent, and a small model all but stops producing such events; repeating them rebalances.
        self.order = torch.arange(len(self.train_pool["latents"]))
        if cfg.blink_repeat > 1:
            if "blink" not in self.train_pool:
                raise UserError("--blink-repeat needs blink ground truth, which only synthetic data has")
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
            clips = ClipDataset(videos_for(self.cfg, split, n_videos, CLIP_SECONDS, self.resolution),
                                     frames=self.cfg.frames, motion=self.cfg.motion, seed=self.cfg.seed)
            encode_pool(self.vae, clips, min(n, len(clips)), path, self.device)
        barrier()
        return ClipPool(path).data

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
        err = (out.float() - self.diffusion.target(x0, noise, t)).pow(2)  # Eq. 3
        if cfg.mouth_weight != 1:
            boxes = self.train_pool["mouth_box"][indices] if "mouth_box" in self.train_pool else None
            err = err * loss_region(boxes, self.resolution, x0.shape[-1], cfg.mouth_weight, x0.shape).to(err.device)
        weight = self.diffusion.loss_weight(t, cfg.min_snr_gamma)
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
        target = self.diffusion.target(x0, noise, t)
        val_loss = (self.ema(self.diffusion.q_sample(x0, t, noise), t, ref, mel, motion) - target).pow(2).mean()
        k = 2  # sample two clips with DDIM and decode them

        def denoise(x, tt):
            out = self.ema(x, tt, ref[:k], mel[:k], None if motion is None else motion[:k])
            return self.diffusion.split(x, tt, out)
        z = self.diffusion.sample(denoise, (k, *x0.shape[1:]), steps=25, generator=g, device=self.device)
        rows = []
        for i in range(k):
            gen = to_uint8(self.vae.decode(z[i] / self.vae.latent_scale))  # (F, H, W, 3)
            real = to_uint8(self.vae.decode(x0[i] / self.vae.latent_scale))
            portrait = self.val_pool["ref_image"][idx[i]].numpy()
            rows += [np.concatenate([portrait, *gen], axis=1), np.concatenate([np.zeros_like(portrait), *real], axis=1)]
        path = Path(out) / "samples" / f"step{step:07d}.png"
        path.parent.mkdir(exist_ok=True)
        save_png(path, np.concatenate(rows))
        result = {"val_loss": val_loss.item()}
        if self.probe is not None:  # lip sync: the probe's mouth opening in windows sampled with each clip's own
            # audio and with the next clip's, against the true opening (metrics.per_clip_sync)
            refs, mels = self.val_pool["ref_image"][idx].numpy(), self.val_pool["mel"][idx].float()
            both = generate(self.ema, self.vae, self.diffusion, np.concatenate([refs, refs]),
                            torch.cat([mels, mels.roll(-1, 0)]), steps=10, device=self.device, progress=False)
            opening, truth = probe_readings(self.probe, both)[..., 0], self.val_pool["openness"][idx].numpy()
            result["val_sync"] = per_clip_sync(opening[:n], truth)
            result["val_sync_mismatched"] = per_clip_sync(opening[n:], truth)
        return result

    def before_save(self):
        """Nothing to measure before a checkpoint."""
        pass

    def state(self):
        """The stage's part of a checkpoint: model config and weights, EMA weights, the VAE, diffusion settings."""
        return {"model": {"config": asdict(self.model.cfg), "weights": self.model.state_dict()},
                "ema": self.ema.state_dict(), "vae": vae_state(self.vae),
                "diffusion": self.diffusion.config()}

    def load(self, ckpt):
        """Restore the model and EMA weights from a checkpoint written by save_checkpoint."""
        self.model.load_state_dict(ckpt["model"]["weights"])
        self.ema.load_state_dict(ckpt["ema"])


@torch.no_grad()
def export(run_ckpt, dst, frames=512):
    """Write the part of a diffusion run's checkpoint that sample.py needs: the EMA weights, the VAE and the
    diffusion settings, in fp16 (sampling casts back to float32; half the bytes), plus `domain`: the VAE's worst
    PSNR on `frames` training frames, so sample.py can tell when a portrait is unlike anything trained on."""
    ckpt = load_checkpoint(run_ckpt, needs=("model", "ema", "vae", "diffusion", "train_config"),
                           what="a diffusion run's checkpoint", hint=" (pass the run folder with --out)")
    cfg = TrainConfig(**ckpt["train_config"])
    vae = vae_from_state(ckpt["vae"])
    videos = videos_for(cfg, "train", 32, CLIP_SECONDS, vae.config.resolution)
    n = min(len(videos), 32)
    x = torch.cat([to_tensor(videos[i].frames[:math.ceil(frames / n)]) for i in range(n)])
    worst = min(psnr(vae.decode(vae.encode(chunk)), chunk).min().item() for chunk in x.split(64))
    half = lambda weights: {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}  # noqa: E731
    out = {"stage": "export", "step": ckpt["step"], "train_config": ckpt["train_config"],
           "model": {"config": ckpt["model"]["config"]}, "ema": half(ckpt["ema"]),
           "vae": {"config": ckpt["vae"]["config"], "weights": half(ckpt["vae"]["weights"])},
           "diffusion": ckpt["diffusion"], "domain": {"vae_min_psnr": worst}}
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dst, lambda tmp: torch.save(out, tmp))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The loop


def save_checkpoint(path, cfg, step, stage, optimizer, elapsed):
    """Write the run's state atomically: a plain dict of tensors and numbers (loads with weights_only=True). Every
    rank calls it (each hands over its RNG state); rank 0 writes."""
    rng = rng_states()
    if rank() == 0:
        stage.before_save()
        ckpt = {"stage": cfg.stage, "step": step, "elapsed": elapsed, "train_config": asdict(cfg), **stage.state(),
                "optimizer": optimizer.state_dict(), **rng}
        atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


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
    torch.manual_seed(cfg.seed * 1000 + rank())  # from here on each rank draws its own noise
    if resume:  # loaded on the CPU: the model and optimizer copy what they need to the device, RNG states stay
        ckpt = load_checkpoint(ckpt_path, needs=("step", "rng", "optimizer"), what="a letstalk run's checkpoint")
        stage.load(ckpt)
        optimizer.load_state_dict(ckpt["optimizer"])
        step, elapsed = ckpt["step"], ckpt["elapsed"]
        if len(ckpt["rng"]) == world():  # (a row is cloned: set_rng_state reads a view's storage from its start)
            torch.set_rng_state(ckpt["rng"][rank()].clone())
            if "cuda_rng" in ckpt and device.type == "cuda":  # the noise drawn on the GPU continues exactly too
                torch.cuda.set_rng_state(ckpt["cuda_rng"][rank()].clone())
        else:  # another number of ranks: the run continues, its random draws are new ones
            torch.manual_seed(cfg.seed * 1000 + rank() + step)
            if rank() == 0:
                print(f"note: the run was saved by {len(ckpt['rng'])} process(es) and resumes on {world()}: it "
                      "continues, but not exactly as it would have")

    def lr_at(s):  # linear warm-up, constant, then (with --cooldown) a linear decay to 0 at cfg.steps
        return cfg.lr * min(1.0, (s + 1) / cfg.warmup if cfg.warmup else 1.0,
                             (cfg.steps - s) / cfg.cooldown if cfg.cooldown else 1.0)
    is_main = rank() == 0

    start, last_save = time.time(), time.time()
    log = open(out / "log.jsonl", "a") if is_main else None
    bar = tqdm(total=cfg.steps, initial=step, desc=cfg.stage, unit="step", dynamic_ncols=True, disable=not is_main)
    global_batch = cfg.batch_size * world()
    while step < cfg.steps and not any_rank(max_minutes is not None and time.time() - start >= 60 * max_minutes):
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
                fail(f"the loss became {loss.item()} at step {step}; the last checkpoint ({ckpt_path}) is intact. "
                     "Lower --lr or check the data.")
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
        if any_rank(time.time() - last_save > 60 * cfg.save_minutes):
            save_checkpoint(ckpt_path, cfg, step, stage, optimizer, elapsed + time.time() - start)
            last_save = time.time()
    bar.close()
    result = {"step": step}
    if dist.is_initialized():  # DDP keeps replicas identical; check it, a desync would silently waste the run
        checksum = sum(p.double().sum().item() for p in stage.model.parameters())
        high, low = _all_reduce([checksum], dist.ReduceOp.MAX)[0], _all_reduce([checksum], dist.ReduceOp.MIN)[0]
        result["rank_param_spread"] = high - low
    save_checkpoint(ckpt_path, cfg, step, stage, optimizer, elapsed + time.time() - start)
    if is_main:
        result.update(stage.evaluate(step, out), minutes=(elapsed + time.time() - start) / 60)
        log.write(json.dumps({"final": result}) + "\n")
        log.close()
        print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "step")
              + f"; checkpoint {ckpt_path}")
    barrier()
    return result


def main(argv=None):
    """`python train.py`: train a stage, --resume a run or --export it for sample.py (argv=None: sys.argv)."""
    parser = Parser(prog="train.py", description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped; "
                        "its settings come from its checkpoint (those config.py marks resumable, and --max-minutes, "
                        "may change)")
    parser.add_argument("--max-minutes", type=bounded(float, 0), default=None,
                        help="stop cleanly with a checkpoint after this much training time (0: set the run up, "
                        "train no step)")
    add_settings(parser)
    parser.add_argument("--export", type=Path, metavar="PATH", help="write the sampling part of --out's checkpoint "
                        "(EMA weights, VAE, fp16) to PATH for sample.py, and exit")
    args = parser.parse_args(argv)
    settings = given(args)

    if args.export:
        with user_errors():
            export(Path(args.out or "runs/diffusion") / "ckpt.pt", args.export)
        print(f"wrote {args.export} ({args.export.stat().st_size / 1e6:.1f} MB)")
        return None
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available() and args.device != "cpu"
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            settings["device"] = f"cuda:{os.environ['LOCAL_RANK']}"
        dist.init_process_group("nccl" if cuda else "gloo")
    out = Path(args.out or f"runs/{args.stage or TrainConfig.stage}")
    try:
        with user_errors():
            if args.resume:
                if not (out / "ckpt.pt").exists():
                    raise UserError(f"nothing to resume in {out} (no ckpt.pt); drop --resume to start a run")
                saved = load_checkpoint(out / "ckpt.pt", needs=("train_config",), what="a letstalk run's checkpoint")
                cfg = resumed_config(saved["train_config"], settings, out)
            else:
                cfg = new_config(settings)
                if (out / "ckpt.pt").exists():
                    raise UserError(f"{out} already holds a run; pass --resume to continue it or --out for a new one")
            return train(cfg, resume=args.resume, max_minutes=args.max_minutes)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
