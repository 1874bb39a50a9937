"""Portrait + speech -> talking video.

  python sample.py face.png speech.wav                 # writes face_speech.mp4 with the shipped demo checkpoint
  python sample.py face.png speech.wav -o out.mp4 --ckpt runs/diffusion/ckpt.pt --steps 12 --audio-scale 3

The whole audio is animated: ceil(duration x 25) frames, generated in windows of F frames. Each window after the
first is conditioned on the last M frames of the previous one (motion frames, the official long-video variant), so
it continues that one (the jump left at the borders is measured by metrics.border_jump); the first window continues
the portrait, standing still for M frames (as the
official sample_long.py starts a video).

Classifier-free guidance with separate scales: the model is run with neither the portrait nor the audio (their
learned nulls), with the portrait only, and with both, and the noise predictions are combined as
    eps = eps(none) + s_ref (eps(ref) - eps(none)) + s_audio (eps(ref, audio) - eps(ref)).
Every pass keeps the motion frames: they are the video so far, not a condition to strengthen. A scale of 1 cancels
its term: the default (s_ref = s_audio = 1) needs one pass per step, audio guidance alone two.
"""

import contextlib
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from audio import FPS, SAMPLES_PER_FRAME, audio_features, load_audio
from common import (MAX_SEED, HelpFormatter, Parser, UserError, add_device, bounded, check_device, contents_of,
                    file_name, load_checkpoint, load_image, save_png, to_tensor, to_uint8, user_errors, writable_file,
                    writable_folder)
from data import write_mp4
from diffusion import SAMPLERS, STEPS, Diffusion
from letstalk import LetsTalk, LetsTalkConfig
from vae import psnr, vae_from_state

DEFAULT_CKPT = Path(__file__).resolve().parent / "checkpoints" / "letstalk-tiny.pt"
# the default sampler: dpm++ 8 matched DDIM 25 on 16 held-out people (fidelity 22.7 vs 22.8 dB, sync 0.94 vs 0.95)
# with 3x fewer model passes (README, Sampling)
SAMPLER, SAMPLER_STEPS = "dpm++", 8
# classifier-free guidance on the audio: none (1, one model pass per step). On 16 held-out people, x1 kept the sync of
# x2 (shipped checkpoint: 0.936 vs 0.944; unseen speech 0.885) and brought mouth motion from 1.47x to 1.21x of real
# (README, Sampling): twice the speed, less overshoot
AUDIO_SCALE = 1.0
MAX_SCALE = 20.0  # classifier-free guidance scales above ~10 only saturate the frames; 20 catches typos


def load_model(path, device):
    """(the EMA denoiser, the VAE, the Diffusion, the domain statistics or None) of a checkpoint written by
    train.py: a run's ckpt.pt, or its `--export`."""
    ckpt = load_checkpoint(path, needs=("model", "ema", "vae", "diffusion"), what="a letstalk diffusion checkpoint",
                           hint=" (a diffusion run's ckpt.pt or its --export, not the VAE stage's: train one with "
                           "`python train.py`)")
    with contents_of(path, "a letstalk diffusion checkpoint"):
        model = LetsTalk(LetsTalkConfig(**ckpt["model"]["config"]))
        model.load_state_dict(ckpt["ema"])
        vae, diffusion = vae_from_state(ckpt["vae"], device), Diffusion(**ckpt["diffusion"])
        domain = ckpt.get("domain")
        if domain is not None:  # exports hold it: the VAE's worst reconstruction of a training frame
            domain = {"vae_min_psnr": float(domain["vae_min_psnr"])}
            if math.isnan(domain["vae_min_psnr"]):
                raise ValueError("its domain's vae_min_psnr is NaN")
    return model.to(device).eval(), vae, diffusion, domain


DOMAIN_MARGIN_DB = 3.0  # held-out synthetic faces reconstruct up to ~2 dB below the worst training frame measured


@torch.no_grad()
def out_of_domain(vae, image, domain):
    """A warning line when the VAE reconstructs the portrait uint8 (H, W, 3) clearly worse than every training frame
    measured at export (then the model has never seen anything like it), else None."""
    if not domain:
        return None
    x = to_tensor(image)[None].to(vae.latent_scale.device)
    got = psnr(vae.decode(vae.encode(x)), x).item()
    if got >= domain["vae_min_psnr"] - DOMAIN_MARGIN_DB:
        return None
    return (f"note: this portrait is unlike the checkpoint's training faces (VAE reconstruction {got:.1f} dB, worst "
            f"in training {domain['vae_min_psnr']:.1f} dB): expect a poor video. A checkpoint knows the faces it was "
            "trained on (the shipped one, a synthetic world's); for real faces, train on real video (README, 'Real "
            "data').")


@torch.no_grad()
def windows(model, vae, diffusion, images, mels, steps=SAMPLER_STEPS, sampler=SAMPLER, audio_scale=AUDIO_SCALE,
            ref_scale=1.0, seed=0, device="cpu", progress=True):
    """Animate portraits uint8 (B, H, W, 3), each with its per-frame mel windows (B, N, 20, 80)
    (audio.audio_features), with the model's Diffusion. Yields the frames window by window as they are made, uint8
    (B, F, H, W, 3) at the model's resolution (the last window cut at frame N), so a long video need not be held.

    A guidance scale of 1 needs no pass of its own: with both at 1 (the default) the model runs once per step,
    with audio guidance only twice, with portrait guidance (alone or with audio guidance) three times.
    """
    cfg = model.cfg
    F_, M = cfg.frames, cfg.motion
    B, n = mels.shape[:2]
    count = math.ceil(n / F_)  # windows
    mels = torch.cat([mels, mels[:, -1:].expand(-1, count * F_ - n, -1, -1)], dim=1).to(device)  # repeat the end
    scale = vae.latent_scale
    ref = vae.encode(to_tensor(images).to(device)) * scale  # (B, C, h, w)
    generator = torch.Generator().manual_seed(seed)
    shape = (B, F_, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    # the last M latents so far, the next window's motion frames. Before the first window the portrait stands still
    # for M frames, as the official sample_long.py starts a video (we used to start from no motion frames, the
    # learned null: 2.3 dB less re-render fidelity for the shipped checkpoint on 16 held-out people; README, Sampling)
    history = ref[:, None].repeat(1, M, 1, 1, 1)
    # the passes this guidance needs, each a batch of B: (drop the portrait, drop the audio)
    passes = {"both": (False, False)}
    if audio_scale != 1 or ref_scale != 1:
        passes["ref"] = (False, True)
    if ref_scale != 1:
        passes["none"] = (True, True)
    k = len(passes)
    flags = lambda i: torch.tensor([p[i] for p in passes.values()], device=device).repeat_interleave(B)  # noqa: E731
    drop_ref, drop_audio = flags(0), flags(1)
    for w in tqdm(range(count), desc="windows", unit="window", disable=not progress or count == 1):
        m = mels[:, w * F_:(w + 1) * F_]
        motion = history.repeat(k, 1, 1, 1, 1) if M else None

        def denoise(x, t):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda")):
                out = model(x.repeat(k, 1, 1, 1, 1), t.repeat(k), ref.repeat(k, 1, 1, 1), m.repeat(k, 1, 1, 1),
                            motion, drop_ref=drop_ref, drop_audio=drop_audio).float()
            e = {name: diffusion.split(x, t, o)[1] for name, o in zip(passes, out.chunk(k))}
            # eps(none) + s_ref (eps(ref) - eps(none)) + s_audio (eps(both) - eps(ref)), with the unused terms left out
            eps = e["both"] if k == 1 else e["ref"] + audio_scale * (e["both"] - e["ref"])
            if "none" in e:
                eps = eps + (ref_scale - 1) * (e["ref"] - e["none"])
            return diffusion.x0_from_eps(x, t, eps), eps

        z = diffusion.sample(denoise, shape, steps, sampler, generator=generator, device=device,
                             progress=progress and count == 1)  # one bar: steps, or windows when several
        if M:  # the last M latents so far (the portrait's among them while fewer than M were generated)
            history = torch.cat([history, z], dim=1)[:, -M:]
        yield to_uint8(torch.stack([vae.decode(clip / scale) for clip in z]))[:, :n - w * F_]  # (B, F, H, W, 3)


def generate(model, vae, diffusion, images, mels, steps=SAMPLER_STEPS, sampler=SAMPLER, audio_scale=AUDIO_SCALE,
             ref_scale=1.0, seed=0, device="cpu", progress=True):
    """The frames of `windows` gathered: uint8 (B, N, H, W, 3) at the model's resolution."""
    return np.concatenate(list(windows(model, vae, diffusion, images, mels, steps, sampler, audio_scale, ref_scale,
                                       seed, device, progress)), axis=1)


GRID_COLUMNS = 8  # --grid: the portrait, then this many evenly spaced frames


FRAME_NAME = re.compile(r"\d{5}\.png")  # --frames writes 00000.png, 00001.png...
FRAMES_MARK = ".sample-frames"  # ...and this file, which makes the folder's NNNNN.png ours to replace


def main(argv=None):
    """`python sample.py IMAGE AUDIO`: animate a portrait with speech into an .mp4 (argv=None: sys.argv)."""
    parser = Parser(prog="sample.py", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("image", type=Path, help="portrait: any image PIL opens, centre-cropped to a square")
    parser.add_argument("audio", type=Path, help="speech: WAV of any common encoding, or any format FFmpeg reads")
    parser.add_argument("-o", "--out", type=file_name, help="output .mp4 (default: <image>_<audio>.mp4 here)")
    parser.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT, help="checkpoint from train.py")
    parser.add_argument("--steps", type=bounded(int, 1, STEPS), default=SAMPLER_STEPS, help="denoising steps")
    parser.add_argument("--sampler", choices=SAMPLERS, default=SAMPLER,
                        help="dpm++ (DPM-Solver++(2M): as accurate in 8 steps as ddim in 25), ddim (deterministic "
                        "DDIM) or ddpm (all 1000 ancestral steps, whatever --steps says)")
    parser.add_argument("--audio-scale", type=bounded(float, 0, MAX_SCALE), default=AUDIO_SCALE,
                        help=f"classifier-free guidance on the audio (default: {AUDIO_SCALE}, none: one model pass per "
                        "step; any other scale takes two)")
    parser.add_argument("--ref-scale", type=bounded(float, 0, MAX_SCALE), default=1.0,
                        help="classifier-free guidance on the portrait (1: none; any other scale costs two more model "
                        "passes per step without audio guidance, one more with it)")
    parser.add_argument("--seed", type=bounded(int, 0, MAX_SEED), default=0, help="seed of the initial noise")
    parser.add_argument("--size", type=bounded(int, 0, 2048), default=256,
                        help="frame size of the written video, even (upscaled from the model's resolution; 0 keeps "
                        "the model's)")
    parser.add_argument("--frames", type=Path, help="also write every frame as a PNG into this folder (a new or "
                        "empty one, or one sample.py wrote before: its earlier frames are removed first)")
    parser.add_argument("--grid", type=file_name, help="also write a contact sheet PNG: reference | frames")
    add_device(parser)
    args = parser.parse_args(argv)
    out = args.out or Path(f"{args.image.stem}_{args.audio.stem}.mp4")
    with user_errors():
        animate(args, out)


def animate(args, out):
    """sample.py's work: every check that can fail runs before the generation, which takes a while."""
    check_device(args.device)
    if args.size % 2:
        raise UserError(f"--size {args.size}: H.264 needs an even frame size (0 keeps the model's)")
    inputs = (args.image, args.audio, args.ckpt)
    writable_file(out, "--out" if args.out else "the output (named after the image and audio; choose one with -o)",
                  (".mp4",), inputs=inputs)
    if args.grid:
        writable_file(args.grid, "--grid", (".png",), inputs=inputs)
        if args.frames and args.grid.resolve().parent == args.frames.resolve() and FRAME_NAME.fullmatch(args.grid.name):
            raise UserError(f"--grid {args.grid}: the name of one of --frames' frames; pass another name")
    if args.frames:
        writable_folder(args.frames, "--frames")
        if any(p and p.resolve() == args.frames.resolve() for p in (out, args.grid)):
            raise UserError(f"--frames {args.frames}: also the name of another output of this command; pass another "
                            "folder")
        if any(Path(p).resolve().parent == args.frames.resolve() for p in inputs):
            raise UserError(f"--frames {args.frames}: holds an input of this command, which its PNGs could "
                            "overwrite; pass another folder")
        if args.frames.is_dir() and any(args.frames.iterdir()) and not (args.frames / FRAMES_MARK).exists():
            raise UserError(f"--frames {args.frames}: a folder of other files (sample.py did not write it), whose "
                            "PNGs its frames could replace; pass an empty or new folder")
    model, vae, diffusion, domain = load_model(args.ckpt, args.device)
    image = load_image(args.image, vae.config.resolution)
    wav = load_audio(args.audio)
    if len(wav) < SAMPLES_PER_FRAME:
        raise UserError(f"{args.audio}: the audio is shorter than one video frame (40 ms)")
    warning = out_of_domain(vae, image, domain)
    if warning:
        print(warning, file=sys.stderr)
    n = math.ceil(len(wav) / SAMPLES_PER_FRAME)
    mel = audio_features(wav, n)
    size = args.size or vae.config.resolution

    def shown(frame):  # a frame at --size
        return frame if size == frame.shape[0] else np.asarray(Image.fromarray(frame).resize((size, size),
                                                                                             Image.BICUBIC))
    if args.frames:
        try:
            args.frames.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--frames {args.frames}: cannot make the folder ({e.strerror})") from None
        (args.frames / FRAMES_MARK).touch()
        for old in args.frames.glob("*.png"):  # an earlier video's frames: none may stay beside this one's
            if FRAME_NAME.fullmatch(old.name) and old.is_file():
                old.unlink()
    in_grid = set(np.linspace(0, n - 1, min(GRID_COLUMNS, n)).round().astype(int).tolist())
    grid = [shown(image)]

    def made():  # each frame at --size as its window is made, also into --frames and --grid: none piles up
        with contextlib.closing(windows(model, vae, diffusion, image[None], mel[None], args.steps, args.sampler,
                                        args.audio_scale, args.ref_scale, args.seed, args.device)) as sampled:
            for i, frame in enumerate(shown(f) for window in sampled for f in window[0]):
                if args.frames:
                    save_png(args.frames / f"{i:05d}.png", frame)
                if i in in_grid:
                    grid.append(frame)
                yield frame
    padded = np.zeros(n * SAMPLES_PER_FRAME, np.float32)  # the sound lasts exactly as the video
    padded[:len(wav)] = wav[:len(padded)]
    with contextlib.closing(made()) as frames:  # closed before an error is printed: the bar ends on its own line
        write_mp4(out, frames, padded)
    steps = diffusion.steps if args.sampler == "ddpm" else args.steps
    print(f"wrote {out}: {n} frames, {n / FPS:.2f} s ({args.ckpt}, {args.sampler} in {steps} steps)")
    if args.frames:
        print(f"wrote {n} PNGs into {args.frames}")
    if args.grid:
        save_png(args.grid, np.concatenate(grid, axis=1))  # reference | frames, one row
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
