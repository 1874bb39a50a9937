"""A small convolutional VAE: the latent space the diffusion transformer works in (paper Sec. 3.1).

LetsTalk, like Stable Diffusion, does not diffuse pixels: a VAE first maps each 256x256 frame to a 32x32x4 latent,
so the transformer sees 64x fewer positions. The official code reuses Stable Diffusion's VAE; we train our own
small one (nothing can be downloaded here, and a 64x64 CPU demo needs a 4x factor that SD's VAE does not offer).

  encoder: conv -> [ResBlock, stride-2 conv] x log2(factor) -> ResBlock x 2 -> (mean, log-variance), 4 channels
  decoder: conv -> ResBlock x 2 -> [nearest 2x upsample + conv, ResBlock] x log2(factor) -> conv to RGB

Residual blocks with GroupNorm, no attention (the faces are small; convolutions see enough of them).

`python vae.py --ckpt runs/vae/ckpt.pt --image face.png` writes a side-by-side reconstruction and prints PSNR;
training is `python train.py --stage vae` (see train.py), and `python train.py --stage vae --init CKPT
--latent-noise S` fine-tunes only the decoder of a trained VAE to draw clean frames from a diffusion model's
slightly-off latents (VAE.forward).
"""

import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (Parser, contents_of, file_name, load_checkpoint, load_image, save_png, to_tensor, to_uint8,
                    user_errors, writable_file)


@dataclass
class VAEConfig:
    """Shape and loss weight of a VAE: frame resolution, downsampling factor, latent channels, base width, KL weight
    (each field is commented below)."""

    resolution: int = 256  # frame size the VAE is trained at, and the whole pipeline works at
    factor: int = 8  # spatial downsampling: 8 is the paper's 256x256 -> 32x32; 4 the CPU demo's 64x64 -> 16x16
    latent_channels: int = 4  # as Stable Diffusion's VAE
    width: int = 64  # channels at full resolution, doubled at every downsampling (train.py: --vae-width, 32)
    kl_weight: float = 1e-4  # small: the KL only keeps the latents tame, reconstruction comes first

    def __post_init__(self):
        """Refuse a shape no VAE here can have (a typo, or the config of a damaged or foreign checkpoint)."""
        if (self.factor not in (4, 8) or not 16 <= self.resolution <= 1024 or self.resolution % self.factor
                or self.latent_channels < 1 or self.width < 4 or self.width % 4):  # norm: groups of 4 channels
            raise ValueError(f"no VAE has this shape: {self}")


def norm(channels):
    """GroupNorm with the most groups, up to 32 (SD's VAE's), that split the channels evenly into groups of at
    least 4: channels / 4 up to 128 channels, 32 for a multiple of 32 above, else the largest divisor below 32."""
    return nn.GroupNorm(max(g for g in range(1, 33) if channels % g == 0 and channels // g >= 4), channels)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus a skip (1x1 conv when the width changes). (B, cin, H, W) ->
    (B, cout, H, W)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        """x (B, cin, H, W) -> (B, cout, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class VAE(nn.Module):
    """Frames (B, 3, H, W) in [-1, 1] <-> latents (B, 4, H / factor, W / factor).

    `latent_scale` (a buffer, so it travels in the state dict) is 1 / std of the latents on the training data,
    measured once after training (Stable Diffusion's 0.18215 is the same idea): the diffusion model works on
    `encode(x) * latent_scale`, which has unit variance, so the noise schedule means what it says.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        levels = int(math.log2(config.factor))  # halvings: 2 or 3
        ch = [config.width * 2 ** i for i in range(levels + 1)]
        down = []
        for i in range(levels):
            down += [ResBlock(ch[i], ch[i]), nn.Conv2d(ch[i], ch[i + 1], 3, stride=2, padding=1)]
        self.encoder = nn.Sequential(
            nn.Conv2d(3, ch[0], 3, padding=1), *down, ResBlock(ch[-1], ch[-1]), ResBlock(ch[-1], ch[-1]),
            norm(ch[-1]), nn.SiLU(),
            nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1))
        up = []
        for i in reversed(range(levels)):
            up += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch[i + 1], ch[i], 3, padding=1),
                   ResBlock(ch[i], ch[i])]
        self.decoder = nn.Sequential(
            nn.Conv2d(config.latent_channels, ch[-1], 3, padding=1), ResBlock(ch[-1], ch[-1]),
            ResBlock(ch[-1], ch[-1]), *up, norm(ch[0]), nn.SiLU(),
            nn.Conv2d(ch[0], 3, 3, padding=1))
        self.register_buffer("latent_scale", torch.tensor(1.0))

    def moments(self, x):
        """The posterior q(z|x) = N(mean, exp(logvar)): (B, 3, H, W) -> two (B, 4, h, w)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)

    def encode(self, x):
        """(B, 3, H, W) -> the posterior mean (B, 4, h, w): deterministic latents, the ones the diffusion model is
        trained on and decoded from (training the VAE itself samples z around it: forward)."""
        return self.moments(x)[0]

    def forward(self, x, latent_noise=0.0):
        """The training pass, (B, 3, H, W) -> (reconstruction (B, 3, H, W), mean, logvar (B, 4, h, w) each): z is
        sampled from q(z|x) by the reparameterisation trick and decoded unclamped. (A forward pass, so that
        DistributedDataParallel sees it and averages the gradients across GPUs.)

        latent_noise > 0 (a decoder fine-tune, `train.py --stage vae --init`): each frame's z also gets Gaussian
        noise of a std drawn from U(0, latent_noise), measured in the diffusion model's units (z * latent_scale,
        unit variance). A diffusion model's latents are never exactly an encoder's: a decoder trained only on the
        encoder's draws their small errors as speckle, one trained on noised latents draws through them."""
        mean, logvar = self.moments(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()  # z ~ q(z|x), differentiable in mean and logvar
        if latent_noise:
            sigma = torch.rand(len(z), 1, 1, 1, device=z.device) * latent_noise / self.latent_scale
            z = z + sigma * torch.randn_like(z)
        return self.decoder(z), mean, logvar

    def decode(self, z):
        """(B, 4, h, w) -> (B, 3, H, W), clamped to [-1, 1], the range of frames. (Training reconstructs through
        forward, unclamped, so that pixels which overshoot still get a gradient back.)"""
        return self.decoder(z).clamp(-1, 1)


def kl_divergence(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, 1)) per element: 0.5 (mean^2 + var - 1 - logvar), averaged. -> scalar."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()


def vae_loss(vae, x, kl_weight, latent_noise=0.0):
    """The VAE objective on frames x (B, 3, H, W) in [-1, 1], for a VAE (or its DistributedDataParallel wrapper):

        L = mean|x - x'| + mean (x - x')^2 + kl_weight * KL(q(z|x) || N(0, I)),   x' = decode(z), z ~ q(z|x)

    L1 keeps edges sharp, MSE punishes large errors (it is what PSNR measures). With latent_noise, z is also noised
    (VAE.forward). Returns (loss, logs dict).
    """
    reconstruction, mean, logvar = vae(x, latent_noise)
    err = reconstruction - x
    l1, mse, kl = err.abs().mean(), err.pow(2).mean(), kl_divergence(mean, logvar)
    return l1 + mse + kl_weight * kl, {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}


def psnr(x, y):
    """Peak signal-to-noise ratio in dB of images in [-1, 1], one value per image: (B, 3, H, W) x 2 -> (B,)."""
    mse = (x - y).pow(2).flatten(1).mean(1) / 4  # on the [0, 1] scale, where the peak is 1
    return -10 * torch.log10(mse.clamp(min=1e-10))


def latents_id(vae):
    """The fingerprint of the diffusion latents `vae` gives any frame (a hex string): a SHA-256 of its encoder
    weights (names, shapes and values) and latent_scale, to fp16 precision (an --export keeps its VAE in fp16).
    Decoders do not count: `train.py --stage vae --init` fine-tunes only the decoder, so a diffusion model trained
    on one VAE's latents can be decoded by another with the same id, and cached latents stay valid."""
    h = hashlib.sha256()
    for name, tensor in sorted({**vae.encoder.state_dict(), "latent_scale": vae.latent_scale}.items()):
        h.update(f"{name}{tuple(tensor.shape)}".encode() + tensor.detach().cpu().half().numpy().tobytes())
    return h.hexdigest()


def vae_state(vae):
    """What a checkpoint holds of a VAE: plain dicts of numbers and tensors (loadable with weights_only=True)."""
    return {"config": asdict(vae.config), "weights": vae.state_dict()}


def vae_from_state(state, device="cpu"):
    """The inverse of vae_state: the VAE, in eval mode, on `device`."""
    vae = VAE(VAEConfig(**state["config"]))
    vae.load_state_dict(state["weights"])
    return vae.to(device).eval()


def load_vae(path, device="cpu"):
    """The VAE of a checkpoint written by `train.py --stage vae` (or of any run that holds one), in eval mode."""
    ckpt = load_checkpoint(path, needs=("vae",), what="a letstalk checkpoint with a VAE",
                           hint=" (train one with `python train.py --stage vae`)")
    with contents_of(path, "a letstalk checkpoint with a VAE"):
        return vae_from_state(ckpt["vae"], device)


def main(argv=None):
    """`python vae.py`: reconstruct one image through a trained VAE and print the PSNR (argv=None: sys.argv)."""
    parser = Parser(prog="vae.py", description="Reconstruct an image through a trained VAE: writes original | "
                    "reconstruction side by side and prints the PSNR.")
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint with a VAE: `train.py --stage vae`'s, a "
                        "diffusion run's or an export")
    parser.add_argument("--image", type=Path, required=True, help="any image PIL opens; centre-cropped to a square "
                        "and resized to the resolution the VAE was trained at")
    parser.add_argument("--out", type=file_name, help="output PNG (default: <image>_recon.png here)")
    args = parser.parse_args(argv)
    out = args.out or Path(f"{args.image.stem}_recon.png")
    with user_errors():
        writable_file(out, "--out", (".png",), inputs=(args.image, args.ckpt))
        vae = load_vae(args.ckpt)
        x = to_tensor(load_image(args.image, vae.config.resolution))[None]
        with torch.no_grad():
            y = vae.decode(vae.encode(x))
        save_png(out, np.concatenate([to_uint8(x[0]), to_uint8(y[0])], axis=1))
        print(f"PSNR {psnr(x, y).item():.2f} dB, wrote {out}")


if __name__ == "__main__":
    main()
