"""Metrics from their definitions: the Fréchet distance behind FID / FVD / E-FID, SSIM, and lip sync.

The paper judges everything with FID, FVD, SSIM and E-FID (Tables 1-4). Each is a short formula once the features
exist; this file writes the formulas out so a student sees what the numbers mean:

  Fréchet distance   d^2 = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1^1/2 S_2 S_1^1/2)^1/2) between two Gaussians fitted
                     to features of real and generated samples (FID: Inception features of frames; FVD: I3D features
                     of clips; E-FID: expression coefficients);
  SSIM               local means, variances and covariance under an 11x11 Gaussian window (sigma 1.5);
  lip sync           Pearson r between mouth openness seen in generated frames and the openness the audio implies,
                     per clip with the clip mean removed, averaged over clips.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data

# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance


class RunningStats:
    """Mean and covariance of feature vectors seen in batches, so a large set never sits in memory at once.
    Accumulates sums in float64: mean = sum / n, cov = (sum of outer products - n mean mean^T) / (n - 1)."""

    def __init__(self, dim):
        self.n, self.sum, self.outer = 0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim,
                                                                                            dtype=torch.float64)

    def update(self, features):
        """features (B, dim)."""
        f = torch.as_tensor(features).double().reshape(len(features), -1)
        self.n += len(f)
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def mean_cov(self):
        mean = self.sum / self.n
        return mean, (self.outer - self.n * torch.outer(mean, mean)) / (self.n - 1)


def _sqrtm_psd(matrix):
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition (negative round-off
    eigenvalues clamped to 0)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1, cov1, mu2, cov2):
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2), in float64.

    tr((S1 S2)^1/2) is computed as tr((S1^1/2 S2 S1^1/2)^1/2): the inner matrix is symmetric PSD, so its square
    root comes from an eigendecomposition, stable where scipy's general sqrtm can return complex round-off.
    """
    mu1, cov1, mu2, cov2 = (torch.as_tensor(a).double() for a in (mu1, cov1, mu2, cov2))
    root1 = _sqrtm_psd(cov1)
    cross = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * cross).item()


# ----------------------------------------------------------------------------------------------------------------
# SSIM (Wang et al. 2004)


def ssim(x, y, window=11, sigma=1.5, k1=0.01, k2=0.03):
    """Structural similarity of images in [0, 1], (B, C, H, W) x 2 -> (B,): the mean over pixels and channels of

        SSIM = (2 mu_x mu_y + C1) (2 cov_xy + C2) / ((mu_x^2 + mu_y^2 + C1) (var_x + var_y + C2)),

    with local statistics under a Gaussian window, per channel, C1 = (k1 L)^2, C2 = (k2 L)^2, L = 1 (valid
    region only: no padding)."""
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).to(x.dtype)
    C = x.shape[1]
    kernel = (g[:, None] * g[None, :]).expand(C, 1, window, window)
    blur = lambda t: F.conv2d(t, kernel, groups=C)  # noqa: E731
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2, blur(x * y) - mu_x * mu_y
    c1, c2 = k1 ** 2, k2 ** 2
    s = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


# ----------------------------------------------------------------------------------------------------------------
# Lip sync


def per_clip_sync(predicted, truth):
    """Lip-sync r: Pearson correlation between two per-frame signals (clips, F), computed within each clip (so a
    clip's overall offset, or a shared silence, cannot create correlation) and averaged over clips with motion."""
    p, t = np.asarray(predicted, np.float64), np.asarray(truth, np.float64)
    p, t = p - p.mean(1, keepdims=True), t - t.mean(1, keepdims=True)
    norm = np.sqrt((p ** 2).sum(1) * (t ** 2).sum(1))
    keep = norm > 1e-12  # a clip where either signal is constant has no correlation to speak of
    return float(((p * t).sum(1)[keep] / norm[keep]).mean()) if keep.any() else 0.0


def mouth_darkness(frames, boxes):
    """A probe-free openness reading: how dark the mouth box is. frames uint8 (N, H, W, 3), boxes (N, 4) in pixels
    (x0, y0, x1, y1) -> (N,): 1 - mean brightness in [0, 1] inside each box (an open mouth shows its dark inside)."""
    out = np.zeros(len(frames))
    for i, (frame, (x0, y0, x1, y1)) in enumerate(zip(frames, boxes)):
        patch = frame[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))]
        out[i] = 1 - patch.mean() / 255 if patch.size else 0.0
    return out


# ----------------------------------------------------------------------------------------------------------------
# The probe: a measuring instrument for the synthetic world (never a training loss)


class Probe(nn.Module):
    """Reads a synthetic face: frames (B, 3, 64, 64) in [-1, 1] -> readings (B, 5): mouth openness, blink and head
    pose (dx, dy, roll, each scaled to about unit range). Its 128-d penultimate features stand in for Inception's
    in the synthetic world (synthetic FID / FVD), its readings for expression coefficients (synthetic E-FID)."""

    POSE_SCALE = (0.03, 0.02, 5.0)  # data.motion_track's pose scales

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for width in (32, 64, 128, 128):  # 64 -> 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.SiLU()]
            c = width
        self.convs = nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 16, 128), nn.SiLU())
        self.head = nn.Linear(128, 5)

    def features(self, frames):
        return self.convs(F.interpolate(frames, size=64, mode="bilinear", antialias=True, align_corners=False)
                          if frames.shape[-1] != 64 else frames)

    def forward(self, frames):
        return self.head(self.features(frames))

    @staticmethod
    def targets(openness, blink, pose):
        """Ground truth (B,), (B,), (B, 3) -> the readings the probe learns (B, 5)."""
        return torch.cat([openness[:, None], blink[:, None], pose / torch.tensor(Probe.POSE_SCALE)], dim=1)


def train_probe(train_pool, val_pool, steps=1500, seed=0):
    """Fit the probe to ground-truth frames (frame pools from train.build_frame_pool), with light blur and noise
    so that it also reads VAE-decoded frames. Returns (probe, validation r of openness)."""
    torch.manual_seed(seed)
    probe = Probe()
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3)
    frames = train_pool["frames"][:, 0]
    target = Probe.targets(train_pool["openness"][:, 0], train_pool["blink"][:, 0], train_pool["pose"][:, 0])
    for step in tqdm(range(steps), desc="probe", unit="step"):
        idx = torch.randint(0, len(frames), (64,))
        x = frames[idx].float() / 127.5 - 1
        if step % 2:  # half the batches blurred like a decoder's output
            x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        x = x + 0.03 * torch.randn_like(x)
        loss = (probe(x) - target[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe.eval()
    with torch.no_grad():
        got = probe(val_pool["frames"][:, 0].float() / 127.5 - 1)[:, 0].numpy()
    return probe, float(np.corrcoef(got, val_pool["openness"][:, 0].numpy())[0, 1])


def load_probe(path):
    probe = Probe()
    probe.load_state_dict(torch.load(path, weights_only=True))
    return probe.eval()


# ----------------------------------------------------------------------------------------------------------------
# Lip sync of a checkpoint on held-out identities and speech


@torch.no_grad()
def lip_sync(model, vae, diffusion_cfg, probe, refs, mels, openness, steps=10, seed=0, device="cpu"):
    """Generate one window per clip from its reference uint8 (N, H, W, 3) and mel windows (N, F, 20, 80), once with
    its own audio and once with the next clip's, and correlate the probe's openness with the true openness (N, F).
    Returns (sync, sync with mismatched audio, generated frames (N, F, H, W, 3))."""
    import sample  # here, not at the top: sample.py imports train.py, which imports this file
    read = lambda frames: probe(data.to_tensor(frames))[:, 0].numpy()  # noqa: E731
    matched, mismatched, videos = [], [], []
    for i in tqdm(range(len(refs)), desc="lip sync", unit="clip", leave=False):
        gen = sample.generate(model, vae, diffusion_cfg, refs[i], mels[i], steps=steps, seed=seed, device=device)
        other = sample.generate(model, vae, diffusion_cfg, refs[i], mels[(i + 1) % len(refs)], steps=steps,
                                seed=seed, device=device)
        matched.append(read(gen))
        mismatched.append(read(other))
        videos.append(gen)
    return per_clip_sync(matched, openness), per_clip_sync(mismatched, openness), np.stack(videos)


@torch.no_grad()
def sync_eval(ckpt, probe, clips=16, steps=10, seed=0, device="cpu"):
    """Lip sync of a checkpoint on `clips` test clips (held-out identities and sentences): generated frames with
    their own audio and with another clip's, real frames (the ceiling), and the probe-free darkness check."""
    import sample  # see lip_sync
    model, vae, diffusion_cfg = sample.load_model(ckpt, device)
    videos = data.SyntheticVideos("test", clips, 4.0, vae.config.resolution, seed)
    dataset = data.ClipDataset(videos, frames=model.cfg.frames, motion=0, seed=seed)
    per_video = len(dataset) // clips
    items = [dataset[i * per_video + per_video // 2] for i in range(clips)]
    to_uint8 = lambda t: ((t.permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()  # noqa: E731
    truth = np.stack([item["openness"].numpy() for item in items])
    sync, mismatched, generated = lip_sync(model, vae, diffusion_cfg, probe,
                                           np.stack([to_uint8(item["ref"][None])[0] for item in items]),
                                           torch.stack([item["mel"] for item in items]), truth, steps, seed, device)
    real = [probe(item["frames"])[:, 0].numpy() for item in items]
    dark = [mouth_darkness(g, item["mouth_box"].numpy()) for g, item in zip(generated, items)]
    return {"sync": sync, "sync_mismatched": mismatched, "sync_real": per_clip_sync(real, truth),
            "darkness_sync": per_clip_sync(dark, truth), "clips": clips, "frames": model.cfg.frames, "steps": steps}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="metrics.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="train the synthetic-world probe (mouth, blink, pose reader)")
    p.add_argument("--out", type=Path, default=Path("checkpoints/probe.pt"))
    p.add_argument("--videos", type=int, default=300, help="training videos (8 frames each)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--cache", type=Path, default=Path("runs/probe"), help="where the frame pools are cached")
    p = sub.add_parser("sync", help="lip sync of a checkpoint on held-out identities and speech")
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--probe", type=Path, default=Path("checkpoints/probe.pt"))
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per window")
    args = parser.parse_args(argv)
    if args.command == "probe":
        import train
        args.cache.mkdir(parents=True, exist_ok=True)
        pools = {}
        for split, n in (("train", args.videos), ("val", max(8, args.videos // 10))):
            path = args.cache / f"frames_{split}.pt"
            if not path.exists():
                train.build_frame_pool(data.SyntheticVideos(split, n, 1.0, 64), path)
            pools[split] = data.ClipPool(path).data
        probe, r = train_probe(pools["train"], pools["val"], args.steps)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        data.atomic_write(args.out, lambda tmp: torch.save(probe.state_dict(), tmp))
        print(f"probe: openness r = {r:.3f} on held-out identities; wrote {args.out}")
        return r
    result = sync_eval(args.ckpt, load_probe(args.probe), args.clips, args.steps)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
