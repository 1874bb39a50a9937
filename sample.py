"""Portrait + speech -> talking video.

  python sample.py face.png speech.wav                 # writes face_speech.mp4 with the shipped demo checkpoint
  python sample.py face.png speech.wav -o out.mp4 --ckpt runs/diffusion/ckpt.pt --steps 50 --audio-scale 3

The whole audio is animated: ceil(duration x 25) frames, generated in windows of F frames. Each window after the
first is conditioned on the last M frames of the previous one (motion frames, the official long-video variant), so
there is no jump at window borders; the first window starts from the learned "no history" tokens.

Classifier-free guidance with separate scales: the model is run without any condition, with the portrait only, and
with both, and the three noise predictions are combined as
    eps = eps(none) + s_ref (eps(ref) - eps(none)) + s_audio (eps(ref, audio) - eps(ref)).
"""

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

import data
from letstalk import LetsTalk, LetsTalkConfig
from train import Diffusion
from vae import VAE, VAEConfig

DEFAULT_CKPT = Path(__file__).resolve().parent / "checkpoints" / "letstalk-tiny.pt"


def load_model(path, device):
    """The EMA denoiser, the VAE and the diffusion settings of a checkpoint written by train.py."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise data.DataError(f"{path}: no such checkpoint (train one with `python train.py`, then pass --ckpt)") from None
    except Exception as e:  # not a torch file, or one that would need to run code to load
        raise data.DataError(f"{path}: not a letstalk checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "ema", "vae", "diffusion"} <= ckpt.keys():
        raise data.DataError(f"{path}: not a letstalk diffusion checkpoint (train one with `python train.py`)")
    model = LetsTalk(LetsTalkConfig(**ckpt["model"]["config"])).to(device).eval()
    model.load_state_dict({k: v.float() for k, v in ckpt["ema"].items()})
    vae = VAE(VAEConfig(**ckpt["vae"]["config"])).to(device).eval()
    vae.load_state_dict({k: v.float() for k, v in ckpt["vae"]["weights"].items()})
    return model, vae, ckpt["diffusion"]


def load_image(path, size):
    """Any image PIL opens (RGB, RGBA, grayscale, palette, 16-bit), centre square crop -> uint8 (size, size, 3)."""
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise data.DataError(f"{path}: no such file") from None
    except (OSError, UnidentifiedImageError) as e:
        raise data.DataError(f"{path}: cannot read image ({e})") from None
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit or float grey: scale to 8 bits first
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((255 * (a - a.min()) / max(a.max() - a.min(), 1e-9)).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))  # transparent parts become white
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return data.square_image(img, size)


@torch.no_grad()
def generate(model, vae, diffusion_cfg, image, mel, steps=25, sampler="ddim", audio_scale=2.0, ref_scale=1.5,
             seed=0, device="cpu"):
    """Animate a portrait uint8 (H, W, 3) with per-frame mel windows (N, 20, 80) (data.audio_features).
    Returns frames uint8 (N, H, W, 3) at the model's resolution."""
    cfg = model.cfg
    F_, M = cfg.frames, cfg.motion
    n = len(mel)
    windows = math.ceil(n / F_)
    mel = torch.cat([mel, mel[-1:].expand(windows * F_ - n, -1, -1)]).to(device)  # the last window: repeat
    diffusion = Diffusion(schedule=diffusion_cfg["schedule"])
    prediction = diffusion_cfg["prediction"]
    scale = vae.latent_scale
    ref = vae.encode(data.to_tensor(image)[None].to(device)) * scale  # (1, C, h, w)
    generator = torch.Generator().manual_seed(seed)
    shape = (1, F_, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    motion = torch.zeros(1, M, *shape[2:], device=device) if M else None
    yes, no = torch.tensor([False], device=device), torch.tensor([True], device=device)
    frames = []
    for w in tqdm(range(windows), desc="windows", unit="window", disable=windows == 1):
        m = mel[None, w * F_:(w + 1) * F_]
        drop_motion = (no if w == 0 else yes).repeat(3) if M else None

        def denoise(x, t):
            # one batch of three: no condition | portrait only | portrait and audio
            out = model(x.repeat(3, 1, 1, 1, 1), t.repeat(3), ref.repeat(3, 1, 1, 1), m.repeat(3, 1, 1, 1),
                        None if motion is None else motion.repeat(3, 1, 1, 1, 1),
                        drop_ref=torch.cat([no, yes, yes]), drop_audio=torch.cat([no, no, yes]),
                        drop_motion=drop_motion)
            x0_eps = [diffusion.split(x, t, o[None], prediction) for o in out]
            eps = [e for _, e in x0_eps]
            eps = eps[0] + ref_scale * (eps[1] - eps[0]) + audio_scale * (eps[2] - eps[1])
            ab = diffusion.alphas_cumprod[t[0]].item()
            return (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab), eps

        z = diffusion.sample(denoise, shape, steps=diffusion.steps if sampler == "ddpm" else steps,
                             eta=1.0 if sampler == "ddpm" else 0.0, generator=generator, device=device,
                             progress=True)
        if M:
            motion = z[:, -M:]
        frames.append(vae.decode(z[0] / scale))
    video = torch.cat(frames)[:n]
    return ((video.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().cpu().numpy()


def contact_sheet(reference, frames, columns=8):
    """reference | up to `columns` evenly spaced frames, one row. uint8 (H, W * (columns + 1), 3)."""
    pick = np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int)
    return np.concatenate([reference, *frames[pick]], axis=1)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("image", type=Path, help="portrait: any image PIL opens, centre-cropped to a square")
    parser.add_argument("audio", type=Path, help="speech: WAV of any common encoding, or any format FFmpeg reads")
    parser.add_argument("-o", "--out", type=Path, help="output .mp4 (default: <image>_<audio>.mp4 here)")
    parser.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT, help="checkpoint from train.py")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim",
                        help="ddim (fast, deterministic) or ddpm (all 1000 ancestral steps)")
    parser.add_argument("--audio-scale", type=float, default=2.0, help="classifier-free guidance on the audio")
    parser.add_argument("--ref-scale", type=float, default=1.5, help="classifier-free guidance on the portrait")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256, help="frame size of the written video (upscaled from the "
                        "model's resolution; 0 keeps the model's)")
    parser.add_argument("--frames", type=Path, help="also write every frame as a PNG into this folder")
    parser.add_argument("--grid", type=Path, help="also write a contact sheet PNG: reference | frames")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    out = args.out or Path(f"{args.image.stem}_{args.audio.stem}.mp4")
    try:
        model, vae, diffusion_cfg = load_model(args.ckpt, args.device)
        image = load_image(args.image, vae.config.resolution)
        wav = data.load_audio(args.audio)
        if len(wav) < data.SAMPLES_PER_FRAME:
            raise data.DataError(f"{args.audio}: the audio is shorter than one video frame (40 ms)")
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    mel = data.audio_features(wav, math.ceil(len(wav) / data.SAMPLES_PER_FRAME))
    frames = generate(model, vae, diffusion_cfg, image, mel, args.steps, args.sampler, args.audio_scale,
                      args.ref_scale, args.seed, args.device)
    if args.size and args.size != frames.shape[1]:
        frames = np.stack([np.asarray(Image.fromarray(f).resize((args.size, args.size), Image.BICUBIC))
                           for f in frames])
        image = np.asarray(Image.fromarray(image).resize((args.size, args.size), Image.BICUBIC))
    padded = np.zeros(len(frames) * data.SAMPLES_PER_FRAME, np.float32)  # the sound lasts exactly as the video
    padded[:len(wav)] = wav[:len(padded)]
    data.write_mp4(out, frames, padded)
    if args.frames:
        args.frames.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(frames):
            Image.fromarray(f).save(args.frames / f"{i:05d}.png")
    if args.grid:
        Image.fromarray(contact_sheet(image, frames)).save(args.grid)
    print(f"wrote {out}: {len(frames)} frames, {len(frames) / data.FPS:.2f} s")


if __name__ == "__main__":
    main()
