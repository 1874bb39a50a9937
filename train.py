"""Training for LetsTalk, one loop for both stages.

  python train.py --stage vae               # 1. the VAE that defines the latent space (Sec. 3.1)
  python train.py                           # 2. the diffusion transformer on VAE latents (Sec. 3, Eq. 1-3)
  torchrun --nproc_per_node=8 train.py --size B --data DIR     # the same on 8 GPUs (DDP)

The loop is the same whatever it trains: AdamW with a linear warm-up, gradient clipping and accumulation, a tqdm
bar, a JSONL log, periodic evaluation, and atomic checkpoints that make every run time-budgeted (`--max-minutes`)
and resumable (`--resume` continues exactly: weights, EMA, optimizer, step, every rank's RNG state and the data
position). The settings are declared in config.py, the diffusion process in diffusion.py.

Data is a folder in data.py's layout (`--data DIR`), of which every 20th video is held out for evaluation; for
`--data synthetic` (the default) the synthetic world renders one once. The VAE trains on every 8th frame of
every video. The diffusion stage encodes every video once with the VAE (cached per video, each rank encoding its
share) and draws a fresh clip for every slot of every step from all of them, so steps are spent on the
transformer, not on decoding.
"""

import argparse
import datetime
import fcntl
import hashlib
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from audio import FPS, MEL_WINDOW, N_MELS
from common import (Parser, UserError, atomic_write, bounded, contents_of, file_name, load_checkpoint,
                    output_folder, remove_stale_temps, replaceable_checkpoint, save_png, save_torch, to_tensor,
                    to_uint8, user_errors, writable_file, writable_folder)
from config import (MOVABLE, RESUMABLE, TrainConfig, add_settings, flag, full_path, given, new_config,
                    resumed_config)
from data import GROUND_TRUTH, ClipSampler, VideoCache, VideoFolder, cache_frames, encode_videos
from diffusion import Diffusion
from kernels import TEMPORAL_KERNELS
from letstalk import LetsTalk, config_for
from metrics import PROBE, fidelity, load_probe, per_clip_sync, probe_readings
from sample import generate, load_model
from vae import VAE, VAEConfig, load_vae, latents_id, psnr, vae_from_state, vae_loss, vae_state
from world import Identity, render_folder

SYNTH_SECONDS = 4.0  # length of the synthetic videos --data synthetic renders
VAL_FRAMES = 256  # held-out frames the VAE stage scores

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


@contextmanager
def run_lock(out):
    """Hold the run folder `out` while a run trains into it (rank 0 does, under torchrun): a second run started
    into the same folder stops at once instead of the two overwriting each other's checkpoints and log. The lock
    (flock on the folder itself) ends with the process, however it ends; folders made here and left empty (the
    run was refused) are removed (common.output_folder)."""
    if rank() != 0:
        yield
        return
    with output_folder(out):
        folder = os.open(out, os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(folder)
            raise UserError(f"{out}: another run is training into this folder now; wait for it to end or pass "
                            "another --out") from None
        except OSError:  # a file system that cannot lock a folder (NFS, some network mounts): the run goes unguarded
            print(f"note: {out}: this file system cannot lock the run folder; start one run at a time into it",
                  file=sys.stderr)
        try:
            yield
        finally:
            os.close(folder)


def torchrun_world():
    """The number of processes torchrun started (its WORLD_SIZE), 1 without torchrun; a UserError when the
    variables are set, but not as torchrun sets them."""
    if "WORLD_SIZE" not in os.environ:
        return 1
    names = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    values = [os.environ.get(name, "") for name in names]
    if not all(v.isdigit() for v in values[:3]) or not all(values[3:]):
        raise UserError(f"WORLD_SIZE is set, but not {', '.join(names[1:])} as torchrun sets them; start distributed "
                        "runs with torchrun (`torchrun --nproc_per_node N train.py ...`), or unset WORLD_SIZE")
    return int(values[0])


def distributed(model, device):
    """The model wrapped in DistributedDataParallel under torchrun (it averages the gradients across ranks in
    backward), else the model itself."""
    if not dist.is_initialized():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def batch_indices(step, batch_size, n, seed):
    """The indices (into n cached frames) of global batch `step`: consecutive slices of one random permutation per
    epoch, so the data position is a pure function of the step and a resumed run sees exactly the batches it would
    have seen."""
    start, out = step * batch_size, []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out += perm[offset:offset + batch_size - len(out)].tolist()
    return out


def short_hash(text):
    """Eight hex digits that tell one text from another."""
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def data_folder(cfg, resolution):
    """The folder of videos a run trains on: --data DIR, or for --data synthetic the cfg.videos synthetic videos of
    SYNTH_SECONDS at `resolution` that rank 0 renders once under --cache (kept for every run that asks the same)."""
    if cfg.data != "synthetic":
        return Path(cfg.data)
    root = Path(cfg.cache) / f"synthetic_{cfg.videos}x{SYNTH_SECONDS:g}s_{resolution}px_seed{cfg.seed}"
    if rank() == 0:
        render_folder(root, cfg.videos, SYNTH_SECONDS, resolution, cfg.seed)
    barrier()
    return root


def same_videos(data, advice):
    """The refusal of a resume whose training videos have changed since its checkpoint, though not their count."""
    return (f"--data {data}: its training videos are not the ones the run's checkpoint was trained on (added, removed "
            f"or prepared again since); an exact resume needs the same videos: {advice}")


def training_split(folder):
    """The training videos of a folder: VideoFolder(folder, "train"), and a note (from rank 0) when they are the
    held-out ones too (a folder of one video), so that the validation figures measure the fit only."""
    videos = VideoFolder(folder, "train")
    if rank() == 0 and videos.folders == VideoFolder(folder, "val").folders:
        print(f"note: {folder} holds one video, so training validates on the video it trains on: its validation "
              "figures measure the fit, not how well it generalises", file=sys.stderr)
    return videos


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: the VAE


class VAEStage:
    """Reconstruction of single frames (vae.vae_loss); evaluation: PSNR on held-out identities or videos. With
    --init, a decoder fine-tune: the encoder and latent_scale of the checkpoint's VAE stay as they are (a diffusion
    model trained on its latents can then use the new decoder), the decoder learns from noised latents."""

    def __init__(self, cfg, device, resume):
        self.cfg, self.device = cfg, device
        if cfg.init:  # resumed, the VAE comes from the run's own checkpoint (load puts its weights back): --init is
            # not read again, so it may have moved
            self.model = load_vae(Path(cfg.out) / "ckpt.pt" if resume else cfg.init, device).train()
            self.model.encoder.requires_grad_(False)
        else:
            self.model = VAE(VAEConfig(resolution=cfg.resolution, factor=cfg.factor, width=cfg.vae_width)).to(device)
        # every 8th frame of every video, cached once per video (each rank its share) and memory-mapped
        folder = data_folder(cfg, cfg.resolution)
        videos, resolution = VideoFolder(folder), self.model.config.resolution
        if videos.size != resolution:
            raise UserError(f"--data {cfg.data}: {videos.size}x{videos.size} frames, but the VAE works at "
                            f"{resolution}x{resolution}; " + (f"pass --resolution {videos.size}" if not cfg.init else
                                                              f"the VAE of --init {cfg.init} cannot learn this data"))
        cache = Path(cfg.cache) / f"frames_{folder.name}-{short_hash(str(folder.resolve()))}"
        cache_frames(videos, cache, rank(), world())
        barrier()
        self.train = VideoCache(cache, [f.name for f in training_split(folder).folders], key="frames")
        self.val_frames = to_tensor(self.frames(VideoCache(cache, [f.name for f in VideoFolder(folder, "val").folders],
                                                           key="frames"), VAL_FRAMES)).to(device)
        self.net = distributed(self.model, device)

    @staticmethod
    def frames(cache, n):
        """n frames evenly spread over a frame cache (all of them if it holds fewer) -> uint8 (n, H, W, 3)."""
        picks = np.linspace(0, cache.offsets[-1] - 1, min(n, cache.offsets[-1])).round().astype(int)
        return np.stack([cache.entries[v]["frames"][i].numpy() for v, i in zip(*cache.locate(picks))])

    def loss(self, micro_step):
        """vae_loss on this rank's share of micro-batch `micro_step`: frames drawn from all training videos, one
        random permutation of every cached frame per epoch -> (scalar loss, logs)."""
        indices = batch_indices(micro_step, self.cfg.batch_size * world(), int(self.train.offsets[-1]), self.cfg.seed)
        video, position = self.train.locate(np.array(indices[rank()::world()]))
        x = to_tensor(np.stack([self.train.entries[v]["frames"][i].numpy() for v, i in zip(video, position)]))
        return vae_loss(self.net, x.to(self.device), self.model.config.kl_weight, self.cfg.latent_noise)

    @torch.no_grad()
    def evaluate(self, step, out):
        """Mean PSNR of the eval-mode VAE on the held-out frames -> {"val_psnr": float}, and with --latent-noise S
        {"val_psnr_noised": float}: the same frames decoded from latents noised by S (the top of the range)."""
        self.model.eval()
        latents = [self.model.encode(x) for x in self.val_frames.split(64)]
        logs = {"val_psnr": torch.cat([psnr(self.model.decode(z), x) for z, x in
                                       zip(latents, self.val_frames.split(64))]).mean().item()}
        if self.cfg.latent_noise:
            noise = torch.Generator(self.device).manual_seed(0)  # the same noise at every evaluation
            sigma = self.cfg.latent_noise / self.model.latent_scale
            logs["val_psnr_noised"] = torch.cat([
                psnr(self.model.decode(z + sigma * torch.randn(z.shape, generator=noise, device=z.device)), x)
                for z, x in zip(latents, self.val_frames.split(64))]).mean().item()
        self.model.train()
        return logs

    @torch.no_grad()
    def before_save(self):
        """Measure latent_scale = 1 / std of the (mean) latents of training frames, so the checkpoint is usable; a
        decoder fine-tune keeps the one its encoder came with."""
        if self.cfg.init:
            return
        self.model.eval()
        x = to_tensor(self.frames(self.train, 512)).to(self.device)
        z = torch.cat([self.model.encode(chunk) for chunk in x.split(64)])
        self.model.latent_scale.fill_(1.0 / z.std().item())
        self.model.train()

    def state(self):
        """The stage's part of a checkpoint: {"vae": vae_state, "frames": training frames cached, "data": which}."""
        return {"vae": vae_state(self.model), "frames": int(self.train.offsets[-1]), "data": self.train.fingerprint()}

    def load(self, ckpt):
        """Restore the VAE weights from a checkpoint written by save_checkpoint."""
        then, now = ckpt.get("frames", int(self.train.offsets[-1])), int(self.train.offsets[-1])  # (older: no count)
        if then != now:  # the batches are a function of the step and of the frames: other frames, other batches
            raise UserError(f"--data {self.cfg.data}: {now} training frames cached, but the run's checkpoint was "
                            f"trained on {then}; an exact resume needs the same videos: start a new run")
        if ckpt.get("data", self.train.fingerprint()) != self.train.fingerprint():  # (older checkpoints: no data)
            raise UserError(same_videos(self.cfg.data, "start a new run"))
        self.model.load_state_dict(ckpt["vae"]["weights"])

    def after_step(self, step):
        """Nothing to do after an optimizer step (the VAE keeps no EMA)."""
        pass


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: the diffusion transformer


def loss_region(mouth_boxes, resolution, latent_size, mouth_weight, shape):
    """Per-latent-pixel loss weights (B, F, 1, h, w): mouth_weight inside the mouth box (synthetic ground truth)
    or, without one, inside the lower-middle of the face (real data: rows 55-95%, columns 25-75%), 1 elsewhere."""
    B, F_, _, h, w = shape
    weight = torch.ones(B, F_, 1, h, w)
    ys, xs = torch.arange(h).view(-1, 1) + 0.5, torch.arange(w).view(1, -1) + 0.5
    if mouth_boxes is None:
        inside = (ys >= 0.55 * h) & (ys <= 0.95 * h) & (xs >= 0.25 * w) & (xs <= 0.75 * w)
        return weight + (mouth_weight - 1) * inside.float()
    box = mouth_boxes * (latent_size / resolution)  # (B, F, 4) in latent pixels
    x0, y0, x1, y1 = (box[..., k, None, None] for k in range(4))
    inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    return weight + (mouth_weight - 1) * inside.float()[:, :, None]


def motion_region(x0, motion_weight):
    """Per-latent-pixel loss weights (B, F, 1, h, w) of clips x0 (B, F, C, h, w), largest where the clip moves:
    1 + (motion_weight - 1) d / mean(d), d each latent pixel's distance from its clip's mean frame (mean over
    channels), mean(d) over the batch, so still clips keep weights near 1. A head that drifts by a pixel changes
    only its outline, a blink only the eyes: a few latent pixels that plain Eq. 3 weighs like the still
    background. Not in the paper."""
    d = (x0 - x0.mean(1, keepdim=True)).abs().mean(2, keepdim=True)
    return 1 + (motion_weight - 1) * d / d.mean().clamp_min(1e-8)


def mismatched_partners(video):
    """For clips drawn from videos `video` (n,) int: whose audio each clip is sampled with as mismatched audio, the
    next clip from another video (a clip of the same video could overlap it in time), or simply the next clip
    when all are from one video. Returns (n,) int indices."""
    n = len(video)
    return np.array([next((j % n for j in range(i + 1, i + n) if video[j % n] != video[i]), (i + 1) % n)
                     for i in range(n)])


def probe_figures(probe, videos, truth, people):
    """Validation figures of the synthetic world's probe. videos uint8 (2n, F, H, W, 3): n clips sampled with their
    own audio, then the same n with another clip's (mismatched_partners); truth (n, F): their true mouth openness;
    people: the n clips' world.Identity. Returns val_sync and val_sync_mismatched (the probe's openness against the
    truth, metrics.per_clip_sync) and val_fidelity (the re-render fidelity of each own-audio clip's middle frame:
    how cleanly it is a drawing of that person)."""
    n, middle = len(truth), videos.shape[1] // 2
    opening = probe_readings(probe, videos)[..., 0]
    return {"val_sync": per_clip_sync(opening[:n], truth), "val_sync_mismatched": per_clip_sync(opening[n:], truth),
            "val_fidelity": fidelity(probe, videos[:n, middle:middle + 1], people)}


class DiffusionStage:
    """The LetsTalk denoiser trained with L_simple (Eq. 3) on VAE latents of clips, plus an EMA copy."""

    def __init__(self, cfg, device, resume):
        self.cfg, self.device = cfg, device
        self.vae = load_vae(cfg.vae, device)
        self.resolution = self.vae.config.resolution
        latent = self.resolution // self.vae.config.factor
        mcfg = config_for(cfg.size, latent_size=latent, latent_channels=self.vae.config.latent_channels,
                          frames=cfg.frames, motion=cfg.motion, mel_window=MEL_WINDOW, n_mels=N_MELS,
                          ref_fusion=cfg.ref_fusion, audio_fusion=cfg.audio_fusion)
        self.model = LetsTalk(mcfg).to(device)
        self.model.set_temporal_kernel(TEMPORAL_KERNELS[cfg.temporal_kernel])  # the EMA, only sampled, keeps SDPA
        self.ema = LetsTalk(mcfg).to(device).requires_grad_(False)
        self.ema.load_state_dict(self.model.state_dict())
        self.diffusion = Diffusion(schedule=cfg.schedule, prediction=cfg.prediction)
        if cfg.init and not resume:  # checked before the data is touched (a resumed run loads its own weights)
            self.start_from(cfg.init)
        # with ground truth and a probe (evaluate.py probe), evaluations also measure lip sync (the probe was trained
        # on 64-px renders, so only a 64-px synthetic run is measured)
        synthetic = cfg.data == "synthetic" and self.resolution == 64
        self.probe = load_probe(PROBE) if synthetic and PROBE.exists() else None
        # every video encoded once (each rank its share), then fresh clips from all of them (data.py)
        need = cfg.frames + cfg.motion  # frames a clip spans with its motion frames, checked before any work
        if cfg.data == "synthetic" and need > SYNTH_SECONDS * FPS:
            raise UserError(f"--frames {cfg.frames} and --motion {cfg.motion} span {need} frames; the synthetic "
                            f"videos have {SYNTH_SECONDS * FPS:.0f}")
        folder = data_folder(cfg, self.resolution)
        videos = VideoFolder(folder)
        if len({tuple(k in meta for k in GROUND_TRUTH) for meta in videos.meta}) > 1:  # a batch stacks one kind
            raise UserError(f"--data {cfg.data}: mixes videos with the synthetic world's per-frame ground truth and "
                            "videos without it (from data.py prepare); train on one kind, in a folder of its own")
        if need > max(videos.meta[i]["num_frames"] for i in range(len(videos))):
            raise UserError(f"--frames {cfg.frames} and --motion {cfg.motion} span {need} frames; no video of "
                            f"{cfg.data} is that long")
        if videos.size != self.resolution:
            raise UserError(f"--data {cfg.data}: {videos.size}x{videos.size} frames, but the VAE {cfg.vae} was trained "
                            f"on {self.resolution}x{self.resolution}; train a VAE on this data (--stage vae)")
        cache = Path(cfg.cache) / (f"latents_{folder.name}-{short_hash(str(folder.resolve()))}_vae-"
                                   f"{latents_id(self.vae)[:8]}")  # a new encoder never reuses old latents
        encode_videos(videos, self.vae, cache, device, rank(), world())
        barrier()
        train_cache = VideoCache(cache, [f.name for f in training_split(folder).folders])
        if cfg.blink_repeat > 1 and "blink" not in train_cache.entries[0]:
            raise UserError("--blink-repeat needs blink ground truth, which only synthetic data has")
        try:
            self.sampler = ClipSampler(train_cache, cfg.frames, cfg.motion, seed=cfg.seed,
                                       blink_repeat=cfg.blink_repeat)
        except UserError:  # a video is long enough (checked above), but only a held-out one
            held = ", ".join(f.name for f in VideoFolder(folder, "val").folders[:3])
            raise UserError(f"--data {cfg.data}: only its held-out videos (every 20th by name, here {held}) span "
                            f"--frames {cfg.frames} + --motion {cfg.motion}; add longer training videos or pass "
                            "fewer --frames") from None
        short = int((train_cache.lengths < need).sum())
        if short and rank() == 0:
            print(f"note: {short} of {len(train_cache.lengths)} training videos are shorter than --frames "
                  f"{cfg.frames} + --motion {cfg.motion}: no clip is drawn from them", file=sys.stderr)
        # what any rank has drawn so far: each (video, start), and each video
        self.seen = {"clips": torch.zeros(self.sampler.cache.offsets[-1], dtype=torch.bool),
                     "videos": torch.zeros(len(train_cache.entries), dtype=torch.bool)}
        # 8 fixed validation clips drawn from the held-out videos, with their portraits as images
        val_videos = VideoFolder(folder, "val")
        try:
            val_sampler = ClipSampler(VideoCache(cache, [f.name for f in val_videos.folders]), cfg.frames, cfg.motion,
                                      seed=cfg.seed + 1)
        except UserError:  # the training videos are long enough (checked above), the held-out ones are not
            raise UserError(f"--data {cfg.data}: its held-out videos (every 20th by name, here "
                            f"{', '.join(f.name for f in val_videos.folders[:3])}) are all shorter than --frames "
                            f"{cfg.frames} + --motion {cfg.motion}; replace them or pass fewer --frames") from None
        self.val = val_sampler.batch(0, 0, 8)
        video, _, ref = val_sampler.draws(0, 0, 8)
        self.val_partner = mismatched_partners(video)
        self.val_portraits = np.empty((len(video), self.resolution, self.resolution, 3), np.uint8)  # (8, H, W, 3)
        for v in np.unique(video):  # each held-out video decoded once, one at a time (a real one may be minutes long)
            self.val_portraits[video == v] = val_videos[v].frames[ref[video == v]]
        self.val_people = [Identity.from_meta(val_videos.meta[v]["identity"]) for v in video] if self.probe else None
        # compile the DDP wrapper, not the model inside it, so DDP's gradient buckets still overlap the backward
        net = distributed(self.model, device)
        self.net = torch.compile(net) if cfg.compile else net

    def conditions(self, batch, train):
        """Inputs of the model for a batch of ClipSampler.batch: (x0, ref, mel, motion, drop masks)."""
        cfg, dev = self.cfg, self.device
        x0, ref, mel = (batch[k].to(dev) for k in ("latents", "ref", "mel"))
        motion = batch["motion"].to(dev) if cfg.motion else None
        B = len(x0)
        drops = {"drop_ref": None, "drop_audio": None, "drop_motion": None}
        if train:
            # small noise on the reference, as the official code (sigma = exp(N(-3, 0.5))); we add it to the
            # cached latent rather than to the image, so the cache need not be re-encoded
            ref = ref + torch.exp(torch.randn(B, 1, 1, 1, device=dev) * 0.5 - 3) * torch.randn_like(ref)
            if motion is not None:  # motion frames from the real frames before the clip, noised like the reference
                # as the official code does (it also adds diffusion noise of t < 50 and zeroes a quarter of the
                # positions; we keep the first noise only): at sampling they are generated, never quite real
                motion = motion + torch.exp(torch.randn(B, 1, 1, 1, 1, device=dev) * 0.5 - 3) * torch.randn_like(motion)
            # each condition dropped on its own, so that sample.py can guide the portrait and the audio with
            # separate scales, as InstructPix2Pix does its two conditions
            drops = {f"drop_{k}": torch.rand(B, device=dev) < getattr(cfg, f"drop_{k}")
                     for k in ("ref", "audio", "motion")}
            if motion is None:
                drops["drop_motion"] = None
        return x0, ref, mel, motion, drops

    def loss(self, micro_step):
        """L_simple (Eq. 3) on this rank's fresh clips of micro-batch `micro_step`, with random t, noise and
        condition drops; optional mouth, motion and min-SNR weights -> (scalar loss, {clips_seen, videos_seen}): the
        distinct clips (video, start) and videos drawn so far by all ranks (whose draws every rank can replay)."""
        cfg = self.cfg
        batch = self.sampler.batch(micro_step, rank(), cfg.batch_size)
        for r in range(world()):
            video, start, _ = self.sampler.draws(micro_step, r, cfg.batch_size)
            self.seen["clips"][self.sampler.cache.offsets[video] + start] = True
            self.seen["videos"][video] = True
        x0, ref, mel, motion, drops = self.conditions(batch, train=True)
        t = torch.randint(0, self.diffusion.steps, (len(x0),), device=self.device)
        noise = torch.randn_like(x0)
        x_t = self.diffusion.q_sample(x0, t, noise)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.net(x_t, t, ref, mel, motion, **drops)
        err = (out.float() - self.diffusion.target(x0, noise, t)).pow(2)  # Eq. 3
        if cfg.mouth_weight != 1:
            boxes = batch.get("mouth_box")
            err = err * loss_region(boxes, self.resolution, x0.shape[-1], cfg.mouth_weight, x0.shape).to(err.device)
        if cfg.motion_weight != 1:
            err = err * motion_region(x0, cfg.motion_weight)
        weight = self.diffusion.loss_weight(t, cfg.min_snr_gamma)
        loss = (err.flatten(1).mean(1) * weight).mean()
        return loss, {"clips_seen": int(self.seen["clips"].sum()), "videos_seen": int(self.seen["videos"].sum())}

    def after_step(self, step):
        """EMA of the weights, with a warm-up so a short run's EMA is not mostly its initial weights."""
        decay = min(self.cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p, 1 - decay)

    @torch.no_grad()
    def evaluate(self, step, out):
        """Validation loss of the EMA model at fixed timesteps and noise, and a PNG grid of sampled frames (per
        clip: reference | generated frames, then the VAE's reconstruction of the real frames below); with the probe
        also val_sync, val_sync_mismatched and val_fidelity. Returns those figures as a dict."""
        g = torch.Generator().manual_seed(1234)
        x0, ref, mel, motion, _ = self.conditions(self.val, train=False)
        n = len(x0)
        t = torch.randint(0, self.diffusion.steps, (n,), generator=g).to(self.device)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        target = self.diffusion.target(x0, noise, t)
        val_loss = (self.ema(self.diffusion.q_sample(x0, t, noise), t, ref, mel, motion) - target).pow(2).mean()
        k = 2  # sample two clips with DDIM 25 (a picture to look at: the quality, not the cost) and decode them

        def denoise(x, tt):
            out = self.ema(x, tt, ref[:k], mel[:k], None if motion is None else motion[:k])
            return self.diffusion.split(x, tt, out)
        z = self.diffusion.sample(denoise, (k, *x0.shape[1:]), 25, "ddim", generator=g, device=self.device)
        rows = []
        for i in range(k):
            gen = to_uint8(self.vae.decode(z[i] / self.vae.latent_scale))  # (F, H, W, 3)
            real = to_uint8(self.vae.decode(x0[i] / self.vae.latent_scale))
            portrait = self.val_portraits[i]
            rows += [np.concatenate([portrait, *gen], axis=1), np.concatenate([np.zeros_like(portrait), *real], axis=1)]
        path = Path(out) / "samples" / f"step{step:07d}.png"
        path.parent.mkdir(exist_ok=True)
        save_png(path, np.concatenate(rows))
        result = {"val_loss": val_loss.item()}
        if self.probe is not None:  # lip sync: the probe's mouth opening in windows sampled with each clip's own
            # audio and with another video's, against the true opening (metrics.per_clip_sync)
            refs, mels = self.val_portraits, self.val["mel"]
            both = generate(self.ema, self.vae, self.diffusion, np.concatenate([refs, refs]),
                            torch.cat([mels, mels[self.val_partner]]), steps=10, sampler="ddim", device=self.device,
                            progress=False)  # DDIM 10, as for the README's logged val figures
            result.update(probe_figures(self.probe, both, self.val["openness"].numpy(), self.val_people))
        return result

    def before_save(self):
        """Nothing to measure before a checkpoint."""
        pass

    def state(self):
        """The stage's part of a checkpoint: model config and weights, EMA weights, the VAE, diffusion settings."""
        return {"model": {"config": asdict(self.model.cfg), "weights": self.model.state_dict()},
                "ema": self.ema.state_dict(), "vae": vae_state(self.vae),
                "diffusion": self.diffusion.config(), "seen": self.seen, "data": self.sampler.cache.fingerprint()}

    @torch.no_grad()
    def start_from(self, path):
        """--init: the model and its EMA start from the EMA weights of the diffusion checkpoint at `path`, which
        must have been trained on this run's VAE latents, with this run's model shape and diffusion."""
        model, vae, diffusion, _ = load_model(path, "cpu")
        theirs, ours = asdict(model.cfg), asdict(self.model.cfg)
        differ = [f"{k} {theirs[k]}, here {ours[k]}" for k in ours if theirs[k] != ours[k]]
        differ += [f"{k} {v}, here {self.diffusion.config()[k]}" for k, v in diffusion.config().items()
                   if v != self.diffusion.config()[k]]
        if differ:
            raise UserError(f"--init {path}: its model differs from the one these settings build ({'; '.join(differ)})"
                            "; pass the settings it was trained with")
        if latents_id(vae) != latents_id(self.vae):
            raise UserError(f"--init {path}: trained on the latents of another VAE than --vae {self.cfg.vae}; leave "
                            "--vae out to use its own")
        self.model.load_state_dict(model.state_dict())
        self.ema.load_state_dict(model.state_dict())

    def load(self, ckpt):
        """Restore the model and EMA weights and the clips seen from a checkpoint written by save_checkpoint."""
        then, now = (len(ckpt["seen"]["videos"]), len(ckpt["seen"]["clips"])), (len(self.seen["videos"]),
                                                                               len(self.seen["clips"]))
        if then != now:  # the data position is a function of the step and of the data: other data, other batches
            raise UserError(f"--data {self.cfg.data}: {now[0]} training videos ({now[1]} frames), but the "
                            f"run's checkpoint was trained on {then[0]} ({then[1]}); an exact resume needs the same "
                            "videos: start a new run from it with --init")
        if ckpt.get("data", self.sampler.cache.fingerprint()) != self.sampler.cache.fingerprint():  # (older: none)
            raise UserError(same_videos(self.cfg.data, "start a new run from it with --init"))
        self.model.load_state_dict(ckpt["model"]["weights"])
        self.ema.load_state_dict(ckpt["ema"])
        self.seen = {k: v.clone() for k, v in ckpt["seen"].items()}


@torch.no_grad()
def export(run_ckpt, dst, vae_path=None, data=None):
    """Write the part of a diffusion run's checkpoint that sample.py needs: the EMA weights, the VAE and the
    diffusion settings, in fp16 (sampling casts back to float32; half the bytes), plus `domain`: the VAE's worst
    PSNR on about 512 training frames (the first frames of up to 32 videos: as many people as it can, since
    faces differ more between people than within a video), so sample.py can tell when a portrait is unlike
    anything trained on.
    `vae_path`: a checkpoint whose VAE replaces the run's, which must encode the same latents (a decoder
    fine-tuned by `--stage vae --init`). `data`: where the run's folder of training videos is now, if it moved."""
    model, vae, diffusion, _ = load_model(run_ckpt, "cpu")  # as sample.py will load it: checked before it is written
    ckpt = load_checkpoint(run_ckpt, needs=("train_config", "step"), what="a diffusion run's checkpoint",
                           hint=" (pass the run folder with --out)", mmap=True)
    with contents_of(run_ckpt, "a diffusion run's checkpoint"):
        cfg = TrainConfig(**ckpt["train_config"])
    if data is not None:
        if cfg.data == "synthetic" or data == "synthetic":  # (synthetic videos are rendered again where gone)
            raise UserError(f"--data {data}: with --export, where the run's folder of training videos is now; "
                            f"this run trained on {'synthetic videos' if cfg.data == 'synthetic' else cfg.data}")
        cfg.data = data
    if vae_path:
        other = load_vae(vae_path)
        if latents_id(other) != latents_id(vae):
            raise UserError(f"--vae {vae_path}: its encoder is not the one {run_ckpt} was trained on; only a decoder "
                            f"fine-tuned from it (`train.py --stage vae --init {run_ckpt}`) can replace it")
        vae = other
    try:  # the export records how well the VAE reconstructs training frames: sample.py's out-of-domain note
        videos = VideoFolder(data_folder(cfg, vae.config.resolution), "train")
    except UserError as e:
        raise UserError(f"--export measures the VAE on the run's training videos, which it cannot read: {e}"
                        f"{'' if data else '; if they moved, pass --data with their new place'}") from None
    if data is not None and ckpt.get("data", videos.fingerprint()) != videos.fingerprint():  # (older: none)
        raise UserError(f"--data {data}: not the training videos of {run_ckpt} (others, or added, removed or prepared "
                        "again since); pass the folder they moved to")
    n = min(len(videos), 32)
    x = torch.cat([to_tensor(videos[i].frames[:math.ceil(512 / n)]) for i in range(n)])
    worst = min(psnr(vae.decode(vae.encode(chunk)), chunk).min().item() for chunk in x.split(64))
    half = lambda weights: {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}  # noqa: E731
    out = {"stage": "export", "step": ckpt["step"], "train_config": ckpt["train_config"],
           "model": {"config": asdict(model.cfg)}, "ema": half(model.state_dict()),
           "vae": {"config": asdict(vae.config), "weights": half(vae.state_dict())},
           "diffusion": diffusion.config(), "domain": {"vae_min_psnr": worst}}
    save_torch(dst, out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The loop


DIVERGED = 1e4  # every loss here starts near 1 (unit-variance targets, frames in [-1, 1]): this far above, it diverged


# what a resume reads of a run's checkpoint besides its settings: save_checkpoint's keys and its stage's state ("frames"
# and "data" are left out: older runs saved none, and still resume)
RESUME_NEEDS = {"vae": ("step", "elapsed", "rng", "optimizer", "vae"),
                "diffusion": ("step", "elapsed", "rng", "optimizer", "model", "ema", "vae", "seen")}


def save_checkpoint(path, cfg, step, stage, optimizer, elapsed):
    """Write the run's state atomically: a plain dict of tensors and numbers (loads with weights_only=True). Every
    rank calls it (each hands over its RNG state); rank 0 writes. Weights that are not finite are never saved."""
    if not all(torch.isfinite(p).all() for p in stage.model.parameters()):
        raise UserError(f"the weights are not finite at step {step}; {path} was not overwritten")
    rng = rng_states()
    if rank() == 0:
        stage.before_save()
        ckpt = {"stage": cfg.stage, "step": step, "elapsed": elapsed, "train_config": asdict(cfg), **stage.state(),
                "optimizer": optimizer.state_dict(), **rng}
        save_torch(path, ckpt)


def progress(ckpt):
    """A run checkpoint's (step, training seconds so far); a ValueError (inside contents_of: a UserError naming the
    file) when either is not what a run saves."""
    step, elapsed = ckpt["step"], ckpt["elapsed"]
    if not (type(step) is int and step >= 0 and type(elapsed) in (int, float) and 0 <= elapsed < math.inf):
        raise ValueError(f"its step is {step!r} and its elapsed time {elapsed!r}")
    return step, float(elapsed)


def trim_log(path, step):
    """Drop the lines of a run's log.jsonl after `step`: a run resumed from its checkpoint at `step` logs the
    steps after it again. Lines that are no record of a step (one a crash cut short, or foreign) go too."""
    def step_of(line):  # a step line, or the {"final": {...}} line that ends each piece of a run; else None
        try:
            record = json.loads(line)
            found = record["final"]["step"] if "final" in record else record["step"]
        except (ValueError, TypeError, KeyError, RecursionError):
            return None
        return found if isinstance(found, int) else None
    if path.exists():
        lines = [line for line in path.read_text(errors="replace").splitlines()
                 if (at := step_of(line)) is not None and at <= step]
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in lines)))


def diverged(what, value, step, ckpt_path, saved_at, cfg):
    """The UserError that stops a diverged run: which value went wrong, which checkpoint is safe, and what to do (a
    resume keeps the run's --lr, so a lower one means a new run; a diffusion run can start from the safe one)."""
    safe = (f"the last checkpoint ({ckpt_path}, step {saved_at}) was written before and is intact" if saved_at
            is not None else "no checkpoint was written")
    start = (f" (--init {ckpt_path} starts it from that checkpoint)" if saved_at is not None and
             cfg.stage == "diffusion" else "")
    return UserError(f"the {what} became {value:.4g} at step {step}: training diverged; {safe}. Start a new run with "
                     f"a lower --lr than {cfg.lr:g}{start}, or check the data")


def train(cfg, resume=False, max_minutes=None):
    """Run (or continue) training until cfg.steps or max_minutes. Returns the final evaluation dict."""
    out = Path(cfg.out)
    ckpt_path = out / "ckpt.pt"
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    stage = (VAEStage if cfg.stage == "vae" else DiffusionStage)(cfg, device, resume)  # checks the data, then caches it
    out.mkdir(parents=True, exist_ok=True)
    if rank() == 0:
        remove_stale_temps(ckpt_path)  # what a run killed while saving left
    # fused: one kernel updates every parameter (CPU and CUDA alike); the default loops over them on a CPU and
    # groups them into a few foreach kernels on CUDA
    trained = [p for p in stage.model.parameters() if p.requires_grad]  # a decoder fine-tune freezes the encoder
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=0.0, fused=True)
    step, elapsed, saved_at = 0, 0.0, None
    torch.manual_seed(cfg.seed * 1000 + rank())  # from here on each rank draws its own noise
    if resume:  # loaded on the CPU: the model and optimizer copy what they need to the device, RNG states stay
        ckpt = load_checkpoint(ckpt_path, needs=RESUME_NEEDS[cfg.stage], what="a letstalk run's checkpoint")
        with contents_of(ckpt_path, "a letstalk run's checkpoint"):
            stage.load(ckpt)
            optimizer.load_state_dict(ckpt["optimizer"])
            step, elapsed = progress(ckpt)
            same_world = len(ckpt["rng"]) == world()
            if same_world:  # (a row is cloned: set_rng_state reads a view's storage from its start)
                torch.set_rng_state(ckpt["rng"][rank()].clone())
                if "cuda_rng" in ckpt and device.type == "cuda":  # the noise drawn on the GPU continues exactly too
                    torch.cuda.set_rng_state(ckpt["cuda_rng"][rank()].clone())
        saved_at = step
        if not same_world:  # another number of ranks: the run continues, its random draws are new ones
            torch.manual_seed(cfg.seed * 1000 + rank() + step)
            if rank() == 0:
                print(f"note: the run was saved by {len(ckpt['rng'])} process(es) and resumes on {world()}: it "
                      "continues, but not exactly as it would have")

    def lr_at(s):  # linear warm-up, constant, then (with --cooldown) a linear decay to 0 at cfg.steps (ours:
        # the official config trains at a constant 1e-4, without warm-up)
        return cfg.lr * min(1.0, (s + 1) / cfg.warmup if cfg.warmup else 1.0,
                             (cfg.steps - s) / cfg.cooldown if cfg.cooldown else 1.0)
    is_main = rank() == 0

    start, last_save = time.time(), time.time()
    if is_main and resume:
        trim_log(out / "log.jsonl", step)
    if is_main and not resume:  # a new run: a new log, never written through a link into another file
        (out / "log.jsonl").unlink(missing_ok=True)
    log = open(out / "log.jsonl", "a") if is_main else None
    # the bar counts what ends the run: the time budget when there is one (the steps it allows are not known), else
    # the steps
    budget = None if max_minutes is None else 60 * max_minutes
    if budget is None:
        bar = tqdm(total=cfg.steps, initial=step, unit="step", desc=cfg.stage, dynamic_ncols=True, disable=not is_main)
    else:
        bar = tqdm(total=budget, desc=cfg.stage, dynamic_ncols=True, disable=not is_main,
                   bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s of the time budget [{elapsed}<{remaining}{postfix}]")
    with bar:  # closed on any exit, so an error or `interrupted` gets a line of its own
        while step < cfg.steps and not any_rank(max_minutes is not None and time.time() - start >= 60 * max_minutes):
            tick = time.time()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            total, logs = 0.0, {}
            for micro in range(cfg.accum):
                loss, logs = stage.loss(step * cfg.accum + micro)
                if any_rank(not loss.item() < DIVERGED):  # NaN fails the comparison too; every rank stops together
                    raise diverged("loss", mean_across_ranks(loss.item()), step, ckpt_path, saved_at, cfg)
                (loss / cfg.accum).backward()
                total += loss.item() / cfg.accum
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip).item()
            if not math.isfinite(grad_norm):  # the same on every rank (DDP averaged the gradients)
                raise diverged("gradient norm", grad_norm, step, ckpt_path, saved_at, cfg)
            optimizer.step()
            stage.after_step(step)
            step += 1
            total = mean_across_ranks(total)
            bar.set_postfix(step=step, loss=f"{total:.4f}", refresh=False)
            bar.update(1 if budget is None else min(time.time() - start, budget) - bar.n)
            record = {"step": step, "loss": total, "lr": lr_at(step - 1), "grad_norm": grad_norm,
                      "it_s": 1 / max(time.time() - tick, 1e-9), **logs}
            if is_main and step % cfg.eval_every == 0:
                record.update(stage.evaluate(step, out))
                tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items()
                                                        if k.startswith("val")))
            if is_main:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if any_rank(time.time() - last_save > 60 * cfg.save_minutes):
                save_checkpoint(ckpt_path, cfg, step, stage, optimizer, elapsed + time.time() - start)
                last_save, saved_at = time.time(), step
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
                        "its settings come from its checkpoint (only --max-minutes and "
                        f"{', '.join(flag(name) for name in RESUMABLE)} may change; "
                        f"{', '.join(flag(name) for name in MOVABLE)} may name where the run's files are now, if "
                        "they moved: the run checks they hold what it trained on)")
    parser.add_argument("--max-minutes", type=bounded(float, 0, 10**6), default=None,
                        help="stop cleanly with a checkpoint after this much training time (0: set the run up, "
                        "train no step)")
    add_settings(parser)
    parser.add_argument("--export", type=file_name, metavar="PATH", help="write the sampling part of --out's "
                        "checkpoint (EMA weights, VAE, fp16) to PATH for sample.py, and exit; with --vae, that "
                        "checkpoint's fine-tuned decoder (--stage vae --init) replaces the run's. It reads the run's "
                        "training videos to measure its VAE on them (with --data, from where their folder is now, if "
                        "it moved; synthetic ones are rendered again if its --cache is gone)")
    args = parser.parse_args(argv)
    settings = given(args)

    if args.export:
        with user_errors():
            ignored = [flag(k) for k in settings if k not in ("out", "vae", "data")]
            ignored += ["--resume"] * args.resume + ["--max-minutes"] * (args.max_minutes is not None)
            if ignored:
                raise UserError(f"{', '.join(ignored)}: --export only writes --out's run (with --vae's decoder) for "
                                "sample.py; drop them")
            run = Path(args.out or "runs/diffusion") / "ckpt.pt"
            inputs = (run, Path(args.vae)) if args.vae else (run,)
            writable_file(args.export, "--export", (".pt",), inputs=inputs)
            replaceable_checkpoint(args.export, "--export", "an export", lambda ckpt: ckpt.get("stage") == "export")
            export(run, args.export, args.vae, full_path("data", args.data))
            print(f"wrote {args.export} ({args.export.stat().st_size / 1e6:.1f} MB)")
        return None
    with user_errors():
        launched = torchrun_world()
        cuda = launched > 1 and torch.cuda.is_available() and args.device != "cpu"
        if cuda and int(os.environ["LOCAL_RANK"]) >= torch.cuda.device_count():
            raise UserError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', 'more')} processes on a machine of "
                            f"{torch.cuda.device_count()} GPU(s); pass --nproc_per_node {torch.cuda.device_count()} "
                            "or fewer (one per GPU), or --device cpu")
    if launched > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            settings["device"] = f"cuda:{os.environ['LOCAL_RANK']}"
        # the ranks wait at barriers while rank 0 renders synthetic videos and each rank encodes its share: hours
        # for a big dataset, where NCCL's default timeout (10 minutes) would end the run
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=6))
    out = Path(args.out or f"runs/{args.stage or TrainConfig.stage}")
    try:
        with user_errors():
            writable_folder(out, "--out")
            for part, kind in (("ckpt.pt", "file"), ("log.jsonl", "file"), ("samples", "folder")):
                if (out / part).exists() and (out / part).is_dir() != (kind == "folder"):
                    raise UserError(f"--out {out}: the run keeps a {kind} named {part} there, and something else has "
                                    "that name; move it away or pass another --out")
            writable_folder(args.cache or TrainConfig.cache, "--cache")
            if args.resume:
                if not (out / "ckpt.pt").exists():
                    raise UserError(f"nothing to resume in {out} (no ckpt.pt); drop --resume to start a run")
                saved = load_checkpoint(out / "ckpt.pt", needs=("train_config",), what="a letstalk run's checkpoint",
                                        mmap=True)  # only its settings and step are read here
                if saved.get("stage") == "export":
                    raise UserError(f"{out / 'ckpt.pt'}: an export (train.py --export), which keeps no optimizer "
                                    "state to resume; start a new run from it with --init")
                with contents_of(out / "ckpt.pt", "a letstalk run's checkpoint"):
                    cfg = resumed_config(saved["train_config"], settings, out)
                    missing = [key for key in RESUME_NEEDS[cfg.stage] if key not in saved]
                    if missing:  # found now, not after the videos are encoded
                        raise UserError(f"{out / 'ckpt.pt'}: not a letstalk run's checkpoint (it holds no "
                                        f"{', '.join(missing)})")
                    step, _ = progress(saved)
                    # the VAE behind --vae, checked before its latents are encoded: the run's model learned others
                    if cfg.stage == "diffusion" and latents_id(vae_from_state(saved["vae"])) != latents_id(
                            load_vae(cfg.vae)):
                        raise UserError(f"--vae {cfg.vae}: not the VAE the run was trained with (the file changed "
                                        "since), whose latents its model learned; put that VAE back, or start a new "
                                        "run from it with --init, leaving --vae out")
                if step >= cfg.steps:
                    raise UserError(f"{out}: the run is at step {step} of --steps {cfg.steps}; pass a larger --steps "
                                    "to train on")
            else:
                cfg = new_config(settings)
                if (out / "ckpt.pt").exists():
                    raise UserError(f"{out} already holds a run; pass --resume to continue it or --out for a new one")
            with run_lock(out):
                return train(cfg, resume=args.resume, max_minutes=args.max_minutes)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
