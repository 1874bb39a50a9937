"""Training for LetsTalk, one loop for every stage.

  python train.py --stage vae                 # the VAE that defines the latent space (Sec. 3.1)

The loop is the same whatever it trains: AdamW with a linear warm-up, gradient clipping, a tqdm bar, a JSONL log,
periodic evaluation, and atomic checkpoints that make every run time-budgeted (`--max-minutes`) and resumable
(`--resume` continues exactly: weights, optimizer, step, RNG state and data position).

Data is a fixed pool of frames cached in the run folder: synthetic talking faces by default (`--data synthetic`,
rendered once), or a folder in data.py's layout (`--data DIR`), of which every 20th video is held out.
"""

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm

import data
from vae import VAE, VAEConfig, psnr, vae_loss, vae_state


@dataclass
class TrainConfig:
    stage: str = "vae"
    data: str = "synthetic"  # or a folder in data.py's layout
    out: str = ""  # run folder (default runs/<stage>)
    resolution: int = 0  # frame size (default: 256 on CUDA as in the paper, 64 on CPU)
    factor: int = 0  # VAE downsampling (default: 8 at 256 and above, else 4: latents of 32x32 and 16x16)
    width: int = 32  # VAE channels at full resolution (32 trains fast on a CPU; try 64-128 for real data)
    videos: int = 600  # synthetic training videos in the pool (each gives FRAMES_PER_VIDEO frames)
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 100  # steps of linear learning-rate warm-up
    steps: int = 100_000  # stop after this many steps (or earlier, with --max-minutes)
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 250  # steps between evaluations on held-out data
    save_minutes: float = 10.0  # minutes between checkpoints (one is always written at the end)
    device: str = ""  # default: cuda if available, else cpu


FRAMES_PER_VIDEO = 8  # frames taken from each synthetic video for the VAE pool: many identities, few frames each
SYNTH_SECONDS = 1.0  # length of the synthetic videos the pools are cut from


def frame_pool(cfg, split):
    """Single frames for the VAE, cached in the run folder: a ClipPool whose items hold frames (1, 3, H, W)."""
    path = Path(cfg.out) / f"frames_{split}.pt"
    if path.exists():
        return data.ClipPool(path)
    if cfg.data == "synthetic":
        n = cfg.videos if split == "train" else max(8, cfg.videos // 10)
        videos = data.SyntheticVideos(split, n, SYNTH_SECONDS, cfg.resolution, cfg.seed)
        count = n * FRAMES_PER_VIDEO
    else:
        videos = data.VideoFolder(cfg.data, split)
        count = len(videos) * FRAMES_PER_VIDEO
    clips = data.ClipDataset(videos, frames=1, motion=0, seed=cfg.seed)
    return data.ClipPool.build(clips, min(count, len(clips)), path)


def batch_indices(step, batch_size, n, seed):
    """The pool indices of batch `step`: consecutive slices of one random permutation per epoch, so the data
    position is a pure function of the step and a resumed run sees exactly the batches it would have seen."""
    start, out = step * batch_size, []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out += perm[offset:offset + batch_size - len(out)].tolist()
    return out


@torch.no_grad()
def measure_latent_scale(vae, frames):
    """1 / std of the VAE's (mean) latents on training frames (B, 3, H, W), stored in vae.latent_scale."""
    vae.eval()
    z = torch.cat([vae.encode(frames[i:i + 64]) for i in range(0, len(frames), 64)])
    vae.latent_scale.fill_(1.0 / z.std().item())
    vae.train()


@torch.no_grad()
def evaluate(vae, frames):
    """Mean PSNR (dB) of eval-mode reconstructions of held-out frames (B, 3, H, W)."""
    vae.eval()
    scores = torch.cat([psnr(vae.decode(vae.encode(x)), x) for x in frames.split(64)])
    vae.train()
    return scores.mean().item()


def save_checkpoint(path, cfg, step, vae, optimizer, elapsed):
    """Write the run's state atomically: a plain dict of tensors and numbers (loads with weights_only=True)."""
    ckpt = {"stage": cfg.stage, "step": step, "elapsed": elapsed, "train_config": asdict(cfg),
            "vae": vae_state(vae), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}
    data.atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def train(cfg, resume=False, max_minutes=None):
    """Run (or continue) training until cfg.steps or max_minutes. Returns the final evaluation dict."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.pt"
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    vae = VAE(VAEConfig(resolution=cfg.resolution, factor=cfg.factor, width=cfg.width)).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    step, elapsed = 0, 0.0
    if resume:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        vae.load_state_dict(ckpt["vae"]["weights"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        step, elapsed = ckpt["step"], ckpt["elapsed"]
    train_frames = frame_pool(cfg, "train").data["frames"][:, 0]  # uint8 (N, 3, H, W), converted per batch
    val_frames = frame_pool(cfg, "val").data["frames"][:, 0].to(device).float() / 127.5 - 1
    lr_at = lambda s: cfg.lr * min(1.0, (s + 1) / cfg.warmup)  # noqa: E731  (linear warm-up, then constant)

    start, last_save = time.time(), time.time()
    log = open(out / "log.jsonl", "a")
    bar = tqdm(total=cfg.steps, initial=step, desc=cfg.stage, unit="step", dynamic_ncols=True)
    while step < cfg.steps and (max_minutes is None or time.time() - start < 60 * max_minutes):
        x = train_frames[batch_indices(step, cfg.batch_size, len(train_frames), cfg.seed)]
        x = x.to(device).float() / 127.5 - 1
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss, logs = vae_loss(vae, x)
        if not torch.isfinite(loss):
            bar.close()
            sys.exit(f"error: the loss became {loss.item()} at step {step}; the last checkpoint ({ckpt_path}) is "
                     "intact. Lower --lr or check the data.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip).item()
        optimizer.step()
        step += 1
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        bar.update(1)
        record = {"step": step, "loss": loss.item(), "lr": lr_at(step - 1), "grad_norm": grad_norm, **logs}
        if step % cfg.eval_every == 0:
            record["val_psnr"] = evaluate(vae, val_frames)
            tqdm.write(f"step {step}: val PSNR {record['val_psnr']:.2f} dB")
        log.write(json.dumps(record) + "\n")
        if time.time() - last_save > 60 * cfg.save_minutes:
            measure_latent_scale(vae, train_frames[:512].to(device).float() / 127.5 - 1)
            save_checkpoint(ckpt_path, cfg, step, vae, optimizer, elapsed + time.time() - start)
            last_save = time.time()
    bar.close()
    measure_latent_scale(vae, train_frames[:512].to(device).float() / 127.5 - 1)
    save_checkpoint(ckpt_path, cfg, step, vae, optimizer, elapsed + time.time() - start)
    result = {"step": step, "val_psnr": evaluate(vae, val_frames), "latent_scale": vae.latent_scale.item(),
              "minutes": (elapsed + time.time() - start) / 60}
    log.write(json.dumps({"final": result}) + "\n")
    log.close()
    print(f"step {step}: val PSNR {result['val_psnr']:.2f} dB, latent scale {result['latent_scale']:.4f}, "
          f"{result['minutes']:.1f} min trained; checkpoint {ckpt_path}")
    return result


def main(argv=None):
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--stage", choices=["vae"], default=defaults.stage, help="what to train")
    parser.add_argument("--data", default=defaults.data, help="'synthetic' or a folder made by data.py")
    parser.add_argument("--out", default=None, help="run folder: checkpoint, log, cached data (default runs/<stage>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped; "
                        "its settings come from its checkpoint")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop cleanly with a checkpoint after this "
                        "much training time")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="total steps of the run")
    parser.add_argument("--resolution", type=int, default=None, help="frame size (default 256 on CUDA, 64 on CPU)")
    parser.add_argument("--factor", type=int, choices=[4, 8], default=None,
                        help="VAE downsampling (default 8 at resolution 256 and above, else 4)")
    for name in ("width", "videos", "batch_size", "lr", "warmup", "grad_clip", "seed", "eval_every",
                 "save_minutes"):
        field = next(f for f in fields(TrainConfig) if f.name == name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(field.default), default=field.default)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = parser.parse_args(argv)

    out = Path(args.out or f"runs/{args.stage}")
    if args.resume:
        if not (out / "ckpt.pt").exists():
            print(f"error: nothing to resume in {out} (no ckpt.pt); drop --resume to start a run", file=sys.stderr)
            sys.exit(2)
        saved = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)["train_config"]
        cfg = TrainConfig(**{**saved, "steps": args.steps, "out": str(out)})
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        resolution = args.resolution or (256 if device == "cuda" else 64)
        if args.data != "synthetic" and not Path(args.data).is_dir():
            print(f"error: --data {args.data}: not a folder (make one with `python data.py synth` or "
                  "`python data.py prepare`), or use --data synthetic", file=sys.stderr)
            sys.exit(2)
        cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)
                             if f.name not in ("out", "resolution", "factor", "device")},
                          out=str(out), resolution=resolution, device=device,
                          factor=args.factor or (8 if resolution >= 256 else 4))
        if (out / "ckpt.pt").exists():
            print(f"error: {out} already holds a run; pass --resume to continue it or --out for a new one",
                  file=sys.stderr)
            sys.exit(2)
    try:
        return train(cfg, resume=args.resume, max_minutes=args.max_minutes)
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
