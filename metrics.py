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

import json
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
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
        """Of every feature seen so far: (mean (dim,), covariance (dim, dim)), float64."""
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
        """frames (B, 3, H, W) in [-1, 1], resized to 64x64 if needed -> penultimate features (B, 128)."""
        return self.convs(F.interpolate(frames, size=64, mode="bilinear", antialias=True, align_corners=False)
                          if frames.shape[-2:] != (64, 64) else frames)

    def forward(self, frames):
        """frames (B, 3, H, W) in [-1, 1] -> readings (B, 5): openness, blink, pose (dx, dy, roll) / POSE_SCALE."""
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


PROBE = Path(__file__).resolve().parent / "checkpoints" / "probe.pt"  # the shipped probe, whatever the working dir


def load_probe(path):
    """The Probe whose weights `python metrics.py probe` saved at `path`, in eval mode."""
    probe = Probe()
    probe.load_state_dict(torch.load(path, weights_only=True))
    return probe.eval()


# ----------------------------------------------------------------------------------------------------------------
# The standard feature extractors. Their weights cannot be downloaded here (nothing is fetched at run time): the
# user passes the files, and every figure names the extractor it came from.


def load_inception(path):
    """FID's extractor: Inception-v3 (torchvision's architecture) with weights from `path`, either torchvision's
    inception_v3_google-0cc3c7bd.pth (1000 classes, ImageNet input normalisation) or pytorch-fid's
    pt_inception-2015-12-05-6726825d.pth (1008 classes, inputs in [-1, 1]; pytorch-fid also changes a few pooling
    layers, so its FIDs differ slightly from ours). Returns a function frames (B, 3, H, W) in [-1, 1] -> (B, 2048),
    the pool features before the classifier."""
    from torchvision.models import inception_v3
    state = _load_weights(path, "--inception", "torchvision's inception_v3_google-0cc3c7bd.pth or pytorch-fid's "
                          "pt_inception-2015-12-05-6726825d.pth")
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits")}
    classes = state["fc.weight"].shape[0]
    net = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=classes)
    net.load_state_dict(state)
    net.fc = nn.Identity()
    net.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    @torch.no_grad()
    def features(frames):
        """frames (B, 3, H, W) in [-1, 1], resized to 299x299 -> pool features (B, 2048)."""
        x = F.interpolate(frames, size=(299, 299), mode="bilinear", align_corners=False)
        return net(x if classes == 1008 else ((x + 1) / 2 - mean) / std)
    return features


def load_torchscript(path, flag, what):
    """A TorchScript extractor the user passes (FVD's I3D, E-FID's expression network)."""
    if path is None or not Path(path).is_file():
        raise data.DataError(f"{flag} {path}: no such file; pass {what}")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format these networks ship in
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:  # noqa: BLE001  (any failure means: not a TorchScript file)
        raise data.DataError(f"{flag} {path}: not a TorchScript file ({type(e).__name__})") from None


def _load_weights(path, flag, what):
    if path is None or not Path(path).is_file():
        raise data.DataError(f"{flag} {path}: no such file; pass {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise data.DataError(f"{flag} {path}: not a weights file ({type(e).__name__})") from None


I3D_HELP = ("the I3D TorchScript export used by StyleGAN-V and most FVD code (i3d_torchscript.pt); it is called as "
            "i3d(videos (B, 3, T, 224, 224) in [-1, 1], rescale=False, resize=False, return_features=True)")
EXPRESSION_HELP = ("a TorchScript module frames (B, 3, H, W) in [0, 1] -> expression coefficients (B, K), e.g. the "
                   "expression part of a 3DMM fit (Deep3DFaceRecon's 64 coefficients, as the paper's E-FID)")


@torch.no_grad()
def i3d_features(i3d, clips):
    """FVD features of clips (B, T, 3, H, W) in [-1, 1] -> (B, 400) (T >= 10; the usual FVD clip is 16 frames)."""
    x = F.interpolate(clips.flatten(0, 1), size=(224, 224), mode="bilinear", align_corners=False)
    x = x.unflatten(0, clips.shape[:2]).transpose(1, 2)  # (B, 3, T, 224, 224)
    return i3d(x, rescale=False, resize=False, return_features=True)


# ----------------------------------------------------------------------------------------------------------------
# Lip sync during training (train.py calls this on a few validation clips)


@torch.no_grad()
def lip_sync(model, vae, diffusion_cfg, probe, refs, mels, openness, steps=10, seed=0, device="cpu"):
    """Generate one window per clip from its reference uint8 (N, H, W, 3) and mel windows (N, F, 20, 80), once with
    its own audio and once with the next clip's, and correlate the probe's openness with the true openness (N, F).
    Returns (sync, sync with mismatched audio, generated frames (N, F, H, W, 3))."""
    import sample  # here, not at the top: sample.py imports train.py, which imports this file
    both = sample.generate(model, vae, diffusion_cfg, np.concatenate([refs, refs]),
                           torch.cat([mels, mels.roll(-1, 0)]), steps=steps, seed=seed, device=device, progress=False)
    read = probe_readings(probe, both)[..., 0]
    return per_clip_sync(read[:len(refs)], openness), per_clip_sync(read[len(refs):], openness), both[:len(refs)]


@torch.no_grad()
def probe_readings(probe, videos, features=False):
    """The probe on videos uint8 (N, T, H, W, 3) -> readings (N, T, 5) (or its features (N, T, 128))."""
    x = data.to_tensor(videos).flatten(0, 1)
    out = torch.cat([probe.features(c) if features else probe(c) for c in x.split(256)])
    return out.unflatten(0, videos.shape[:2]).numpy()


# ----------------------------------------------------------------------------------------------------------------
# The evaluation: `python metrics.py eval`


def frechet(real, fake):
    """Fréchet distance between two feature sets (N, d) through RunningStats."""
    stats = []
    for features in (real, fake):
        s = RunningStats(features.shape[-1])
        s.update(features)
        stats.append(s.mean_cov())
    return frechet_distance(*stats[0], *stats[1])


def clip_windows(x, length=8, stride=2):
    """Overlapping windows over time: (N, T, ...) -> (N * K, length, ...)."""
    starts = range(0, x.shape[1] - length + 1, stride)
    return np.concatenate([x[:, s:s + length] for s in starts])


def _colour_at(frames, region):
    """Median colour (N, T, 3) of a region of every frame: region (N, 4) (x0, y0, x1, y1) in pixels, per video."""
    out = np.zeros((*frames.shape[:2], 3))
    for i, (x0, y0, x1, y1) in enumerate(region.round().astype(int)):
        out[i] = np.median(frames[i, :, y0:y1, x0:x1].reshape(frames.shape[1], -1, 3), axis=1)
    return out


def identity_regions(identities, size):
    """Where the background and the skin are in a synthetic face (data.render_frame's layout), robust to the head
    drift: background = the top-left corner, skin = the cheeks between eyes and mouth. -> two (N, 4) boxes."""
    bg = np.array([[0, 0, 0.06 * size, 0.1 * size]] * len(identities))
    skin = []
    for ident in identities:
        fw, fh = ident["face_w"] * size, ident["face_h"] * size
        cx, cy = size / 2, 0.46 * size
        skin.append([cx + 0.2 * fw, cy + 0.04 * fh, cx + 0.6 * fw, cy + 0.16 * fh])
    return bg, np.array(skin)


def identity_ratio(videos, identities):
    """Colour distance of each generated video's background and skin to its own identity's colours, over the
    distance to another person's (the next video's with another identity, or, when every video shows the same
    person, the synthetic person after it): (background ratio, skin ratio); 0 is perfect, 1 is no identity at all."""
    bg_box, skin_box = identity_regions(identities, videos.shape[2])
    n = len(identities)
    others = [next((identities[j % n] for j in range(i + 1, i + n) if identities[j % n]["id"] != ident["id"]),
                   asdict(data.identity(ident["id"] + 1))) for i, ident in enumerate(identities)]
    ratios = []
    for key, box in (("background", bg_box), ("skin", skin_box)):
        seen = _colour_at(videos, box)  # (N, T, 3)
        own = np.array([ident[key] for ident in identities], float)[:, None]
        other = np.array([ident[key] for ident in others], float)[:, None]
        ratios.append(float(np.linalg.norm(seen - own, axis=-1).mean() / np.linalg.norm(seen - other, axis=-1).mean()))
    return tuple(ratios)


def off_palette(videos, real, pixels=4096, seed=0):
    """For each video uint8 (N, T, H, W, 3): the distance of `pixels` random pixels to the nearest colour of the
    real video (N, T, H, W, 3) -> (N, pixels). A saturated blob is a colour the real video never shows."""
    rng = np.random.default_rng(seed)
    out = []
    for v, r in zip(videos, real):
        palette = torch.from_numpy(np.unique(r.reshape(-1, 3) // 4 * 4 + 2, axis=0)).float()
        pick = v.reshape(-1, 3)[rng.integers(0, v.shape[0] * v.shape[1] * v.shape[2], pixels)]
        out.append(torch.cdist(torch.from_numpy(pick).float(), palette).min(1).values.numpy())
    return np.stack(out)


def frame_change(videos):
    """Mean absolute frame-to-frame change of videos uint8 (N, T, H, W, 3), on the [0, 1] scale."""
    return float(np.abs(np.diff(videos.astype(np.float32) / 255, axis=1)).mean())


def eval_videos(n, seconds, resolution, split, seed):
    """n synthetic test videos: frames uint8 (n, T, H, W, 3), wavs, metas."""
    videos = [data.synth_video(split, i, seconds, resolution, seed) for i in tqdm(range(n), desc="videos",
                                                                                   leave=False)]
    return np.stack([v.frames for v in videos]), [v.wav for v in videos], [v.meta for v in videos]


@torch.no_grad()
def evaluate(ckpt, probe, videos=12, seconds=3.0, steps=10, audio_scale=2.0, split="test", seed=0, inception=None,
             i3d=None, expression=None, speech=(), sheet=None, device="cpu"):
    """Evaluate a checkpoint on `videos` synthetic videos of `split` (held-out identities and sentences): each is
    animated from one of its frames with its own audio, with mismatched audio (the same recording shifted by half
    its length: the same voice, other words) and with silence. Returns a dict of every figure (see README)."""
    import sample  # see lip_sync
    model, vae, diffusion_cfg, _ = sample.load_model(ckpt, device)
    res = vae.config.resolution
    real, wavs, metas = eval_videos(videos, seconds, res, split, seed)
    other_real, _, _ = eval_videos(videos, seconds, res, split, seed + 1)  # the floor: other real videos
    N, T = real.shape[:2]
    mels = torch.stack([data.audio_features(w, T) for w in wavs])
    refs = real[:, T // 2]  # the portrait: the middle frame of each video
    conditions = {"matched": mels, "mismatched": mels.roll(T // 2, dims=1), "silent": torch.zeros_like(mels)}
    gen = sample.generate(model, vae, diffusion_cfg, np.concatenate([refs] * 3), torch.cat(list(conditions.values())),
                          steps=steps, audio_scale=audio_scale, seed=seed, device=device)
    gen = dict(zip(conditions, np.split(gen, 3)))
    fake = gen["matched"]
    truth = np.array([m["openness"] for m in metas])
    result = {"checkpoint": str(ckpt), "videos": N, "frames": T, "steps": steps, "audio_scale": audio_scale,
              "split": split, "resolution": res}

    # Fréchet distances on the probe's features: frames (FID), 8-frame clips of readings (FVD), expression (E-FID)
    feats = {k: probe_readings(probe, v, features=True) for k, v in (("real", real), ("other", other_real),
                                                                       ("fake", fake))}
    reads = {k: probe_readings(probe, v) for k, v in (("real", real), ("other", other_real), ("fake", fake),
                                                      ("mismatched", gen["mismatched"]), ("silent", gen["silent"]))}
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    clip = lambda x: clip_windows(x).reshape(-1, 8 * 5)  # noqa: E731
    for name, get in (("fid", lambda k: flat(feats[k])), ("fvd", lambda k: clip(reads[k])),
                      ("efid", lambda k: flat(reads[k][..., :2]))):
        result[f"{name}_probe"] = frechet(get("real"), get("fake"))
        result[f"{name}_probe_floor"] = frechet(get("real"), get("other"))
        result[f"{name}_probe_dim"] = get("real").shape[1]
    result["fid_probe_samples"], result["fvd_probe_samples"] = N * T, len(clip(reads["real"]))
    to01 = lambda v: torch.from_numpy(v).flatten(0, 1).permute(0, 3, 1, 2).double() / 255  # noqa: E731
    result["ssim"] = ssim(to01(real), to01(fake)).mean().item()

    # lip sync: the probe's openness against the ground truth, per video (its mean removed)
    result["sync"] = per_clip_sync(reads["fake"][..., 0], truth)
    result["sync_mismatched"] = per_clip_sync(reads["mismatched"][..., 0], truth)
    result["sync_real"] = per_clip_sync(reads["real"][..., 0], truth)
    boxes = [np.array(m["mouth_box"]) for m in metas]
    result["darkness_sync"] = per_clip_sync([mouth_darkness(f, b) for f, b in zip(fake, boxes)], truth)
    result["darkness_sync_real"] = per_clip_sync([mouth_darkness(f, b) for f, b in zip(real, boxes)], truth)

    # diversity (Sec. 4.4): generated over real, read by the probe on both
    rate = lambda r: (r[..., 1] > 0.5).mean()  # noqa: E731  (fraction of frames with the eyes mostly closed)
    result["blink_rate_ratio"] = float(rate(reads["fake"]) / max(rate(reads["real"]), 1e-9))
    result["mouth_motion_ratio"] = float(reads["fake"][..., 0].std(1).mean() / reads["real"][..., 0].std(1).mean())
    result["head_motion_ratio"] = float(reads["fake"][..., 2:].std(1).mean() / reads["real"][..., 2:].std(1).mean())
    result["motion_real"], result["motion_speech"] = frame_change(real), frame_change(fake)
    result["motion_silent"] = frame_change(gen["silent"])

    # identity and artefacts
    identities = [m["identity"] for m in metas]
    result["identity_background_ratio"], result["identity_skin_ratio"] = identity_ratio(fake, identities)
    reconstructed = np.stack([_decode_uint8(vae, v, device) for v in real])
    threshold = np.percentile(off_palette(reconstructed, real), 99.9)
    result["blob_threshold"] = float(threshold)
    result["blob_fraction"] = float((off_palette(fake, real) > threshold).mean())

    # the standard extractors, where the user passed them
    x = lambda v: data.to_tensor(v).flatten(0, 1)  # noqa: E731
    if inception is not None:
        net = load_inception(inception)
        fid = lambda v: torch.cat([net(c) for c in x(v).split(32)]).numpy()  # noqa: E731
        f_real = fid(real)
        result["fid_inception"], result["fid_inception_floor"] = frechet(f_real, fid(fake)), frechet(f_real,
                                                                                                     fid(other_real))
    if i3d is not None:
        net = load_torchscript(i3d, "--i3d", I3D_HELP)
        fvd = lambda v: i3d_features(net, data.to_tensor(clip_windows(v, 16, 8))).numpy()  # noqa: E731
        f_real = fvd(real)
        result["fvd_i3d"], result["fvd_i3d_floor"] = frechet(f_real, fvd(fake)), frechet(f_real, fvd(other_real))
    if expression is not None:
        net = load_torchscript(expression, "--expression", EXPRESSION_HELP)
        efid = lambda v: torch.cat([net((c + 1) / 2) for c in x(v).split(64)]).numpy()  # noqa: E731
        f_real = efid(real)
        result["efid_expression"], result["efid_expression_floor"] = frechet(f_real, efid(fake)), frechet(
            f_real, efid(other_real))
    if speech:
        result.update(unseen_speech(model, vae, diffusion_cfg, probe, refs, speech, steps, audio_scale, seed, device))
    if sheet is not None:
        write_sheet(sheet, refs[:2], real[:2], fake[:2], gen["mismatched"][:2])
    return result


def _decode_uint8(vae, frames, device):
    """The VAE's reconstruction of frames uint8 (T, H, W, 3), as uint8."""
    x = data.to_tensor(frames).to(device)
    y = torch.cat([vae.decode(vae.encode(c)) for c in x.split(64)])
    return ((y.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().cpu().numpy()


def trim_silence(wav):
    """Cut the leading and trailing silence (video frames 40 dB below the loudest) of a 16 kHz waveform: every
    recording starts and ends quiet, and those shared edges alone would correlate mismatched pairs."""
    n = len(wav) // data.SAMPLES_PER_FRAME
    loud = np.flatnonzero(data.frame_loudness(wav, n) > data.frame_loudness(wav, n).max() - 40)
    return wav[loud[0] * data.SAMPLES_PER_FRAME:(loud[-1] + 1) * data.SAMPLES_PER_FRAME]


@torch.no_grad()
def unseen_speech(model, vae, diffusion_cfg, probe, refs, speech, steps, audio_scale, seed, device):
    """Speech the model never heard (WAV files; e.g. another TTS engine): the probe's openness on the generated
    frames against the speech's loudness envelope in dB, per file; mismatched: the envelope of the next file."""
    import sample  # see lip_sync
    wavs = [trim_silence(data.load_audio(p)) for p in speech]
    T = min(len(w) for w in wavs) // data.SAMPLES_PER_FRAME
    mels = torch.stack([data.audio_features(w, T) for w in wavs])
    loud = np.stack([data.frame_loudness(w, T) for w in wavs])
    gen = sample.generate(model, vae, diffusion_cfg, refs[np.arange(len(wavs)) % len(refs)], mels, steps=steps,
                          audio_scale=audio_scale, seed=seed, device=device)
    opening = probe_readings(probe, gen)[..., 0]
    return {"unseen_sync": per_clip_sync(opening, loud), "unseen_sync_mismatched":
            per_clip_sync(opening, np.roll(loud, -1, axis=0)), "unseen_files": len(wavs), "unseen_frames": T}


def write_sheet(path, refs, real, fake, mismatched, columns=8):
    """Contact sheet, per video three rows: reference | ground truth; generated; generated with other audio."""
    pick = np.linspace(0, real.shape[1] - 1, columns).round().astype(int)
    rows = []
    for ref, *videos in zip(refs, real, fake, mismatched):
        for j, v in enumerate(videos):
            first = ref if j == 0 else np.full_like(ref, 255)
            rows.append(np.concatenate([first, *v[pick]], axis=1))
    sheet = Image.fromarray(np.concatenate(rows)).resize((rows[0].shape[1] * 2, len(rows) * rows[0].shape[0] * 2),
                                                        Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    data.atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))


def report(r):
    """The evaluation as markdown: the paper's columns (Tables 1-2) on the probe's features, then what the paper
    lacks (lip sync, diversity, identity, artefacts)."""
    extra = [f"{name} ({r[key]:.3f}, floor {r[key + '_floor']:.3f})" for name, key in
             (("FID Inception", "fid_inception"), ("FVD I3D", "fvd_i3d"), ("E-FID expression", "efid_expression"))
             if key in r]
    lines = [
        f"{r['videos']} videos x {r['frames']} frames of held-out identities and sentences ({r['split']} split), "
        f"DDIM {r['steps']}, audio guidance {r['audio_scale']}. Synthetic world, probe features: NOT comparable "
        "to the paper's Tables 1-2 (other data, other extractor).",
        "",
        "| | FID (probe) | FVD (probe) | SSIM | E-FID (probe) | Sync | Sync, mismatched audio |",
        "|---|---|---|---|---|---|---|",
        f"| generated | {r['fid_probe']:.3f} | {r['fvd_probe']:.3f} | {r['ssim']:.3f} | {r['efid_probe']:.4f} | "
        f"{r['sync']:.2f} | {r['sync_mismatched']:.2f} |",
        f"| floor / ceiling: real vs other real | {r['fid_probe_floor']:.3f} | {r['fvd_probe_floor']:.3f} | 1 | "
        f"{r['efid_probe_floor']:.4f} | {r['sync_real']:.2f} | |",
        "",
        f"Feature dimensions: FID {r['fid_probe_dim']} ({r['fid_probe_samples']} frames), FVD {r['fvd_probe_dim']} "
        f"({r['fvd_probe_samples']} clips), E-FID {r['efid_probe_dim']}. "
        + (("Standard extractors: " + "; ".join(extra) + ".") if extra else
           "Standard FID / FVD / E-FID: not computed (pass --inception, --i3d, --expression)."),
        f"Probe-free lip sync (mouth-box darkness): {r['darkness_sync']:.2f} "
        f"(real frames {r['darkness_sync_real']:.2f}).",
        f"Diversity, generated / real: blink rate {r['blink_rate_ratio']:.2f}x, mouth motion "
        f"{r['mouth_motion_ratio']:.2f}x, head motion {r['head_motion_ratio']:.2f}x. Frame-to-frame change: real "
        f"{r['motion_real']:.4f}, generated {r['motion_speech']:.4f}, generated from silence {r['motion_silent']:.4f}.",
        f"Identity (colour distance to own / to another identity): background {r['identity_background_ratio']:.3f}, "
        f"skin {r['identity_skin_ratio']:.3f}. Off-palette pixels: {100 * r['blob_fraction']:.2f}% (colours "
        f"farther than {r['blob_threshold']:.1f} from every colour of the real video; 0.1% of the VAE's "
        "reconstructions are)."]
    if "unseen_sync" in r:
        lines.append(f"Unseen speech ({r['unseen_files']} files): openness vs loudness r = {r['unseen_sync']:.2f}, "
                     f"mismatched {r['unseen_sync_mismatched']:.2f}.")
    return "\n".join(lines)


def ablation_table(results):
    """Tables 3 and 4 at toy scale: one row per fusion setting."""
    lines = ["| portrait | audio | FID (probe) | FVD (probe) | SSIM | E-FID (probe) | Sync | Blink | Head motion | "
             "Motion in silence |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (ref, audio), r in results.items():
        lines.append(f"| {ref} | {audio} | {r['fid_probe']:.3f} | {r['fvd_probe']:.3f} | {r['ssim']:.3f} | "
                     f"{r['efid_probe']:.4f} | {r['sync']:.2f} | {r['blink_rate_ratio']:.2f}x | "
                     f"{r['head_motion_ratio']:.2f}x | {r['motion_silent']:.4f} |")
    return "\n".join(lines)


# Tables 3 and 4: each portrait scheme with direct audio, each audio scheme with symbiotic portrait
ABLATION = [("symbiotic", "direct"), ("direct", "direct"), ("siamese", "direct"), ("symbiotic", "siamese"),
            ("symbiotic", "symbiotic")]
ABLATION_RECIPE = ["--size", "T", "--clips", "4000", "--prediction", "v", "--mouth-weight", "5", "--seed", "0",
                   "--eval-every", "1000000"]  # the demo's recipe; no evaluations inside the budget


def ablation(root, budget_min, probe, cache=None, **eval_args):
    """Train size T once per fusion setting for the same budget (resuming an interrupted run), evaluate each once
    (cached in its eval.json) and return {(portrait, audio): result}."""
    import train
    root = Path(root)
    results = {}
    for ref, audio in ABLATION:
        out = root / f"ref-{ref}_audio-{audio}"
        done = out / "eval.json"
        if not done.exists():
            ckpt = out / "ckpt.pt"
            spent = torch.load(ckpt, weights_only=True)["elapsed"] / 60 if ckpt.exists() else 0.0
            if spent < budget_min:
                args = ["--resume"] if ckpt.exists() else [*ABLATION_RECIPE, "--ref-fusion", ref,
                                                           "--audio-fusion", audio, "--cache",
                                                           str(cache or root / "cache")]
                train.main(["--out", str(out), "--max-minutes", str(budget_min - spent), *args])
            result = evaluate(ckpt, probe, **eval_args)
            data.atomic_write(done, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
        results[(ref, audio)] = json.loads(done.read_text())
    return results


def main(argv=None):
    """`python metrics.py probe|eval|ablation`: train the probe, evaluate a checkpoint, or run the fusion ablation
    (argv=None: sys.argv)."""
    parser = data.Parser(prog="metrics.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=data.HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="train the synthetic-world probe (mouth, blink, pose reader)",
                       formatter_class=data.HelpFormatter)
    p.add_argument("--out", type=Path, default=PROBE, help="where to write it (the default replaces the shipped "
                   "probe, which train.py's lip-sync logging and eval read)")
    p.add_argument("--videos", type=data.bounded(int, 1), default=300, help="training videos (8 frames each)")
    p.add_argument("--steps", type=data.bounded(int, 1), default=1500, help="optimizer steps of 64 frames")
    p.add_argument("--cache", type=Path, default=Path("runs/probe"), help="where the frame pools are cached")
    evaluation = data.Parser(add_help=False)  # the options eval and ablation share
    evaluation.add_argument("--probe", type=Path, default=PROBE,
                            help="the synthetic-world probe (`python metrics.py probe` trains one)")
    evaluation.add_argument("--videos", type=data.bounded(int, 1), default=12, help="test videos generated")
    evaluation.add_argument("--seconds", type=data.bounded(float, (8 + 2) / data.FPS), default=3.0,
                            help="length of each test video, at least two of FVD's 8-frame clips (stride 2)")
    evaluation.add_argument("--steps", type=data.bounded(int, 1), default=10, help="DDIM steps per window")
    evaluation.add_argument("--audio-scale", type=float, default=2.0, help="classifier-free guidance on the audio")
    evaluation.add_argument("--split", choices=["test", "val"], default="test",
                            help="held-out identities and sentences to evaluate on")
    evaluation.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                            help="where the models run")
    evaluation.add_argument("--data", choices=["synthetic"], default="synthetic",
                            help="the synthetic world (its ground truth is what lip sync and diversity need)")
    p = sub.add_parser("eval", parents=[evaluation], formatter_class=data.HelpFormatter,
                       help="FID / FVD / SSIM / E-FID, lip sync and diversity of a checkpoint")
    p.add_argument("--ckpt", type=Path, default=PROBE.parent / "letstalk-tiny.pt",
                   help="checkpoint from train.py (default: the shipped demo)")
    p.add_argument("--inception", type=Path, help="Inception-v3 weights for the standard FID (see load_inception)")
    p.add_argument("--i3d", type=Path, help="I3D TorchScript for the standard FVD: " + I3D_HELP)
    p.add_argument("--expression", type=Path, help="expression extractor for the standard E-FID: " + EXPRESSION_HELP)
    p.add_argument("--speech", type=Path, nargs="*", default=[], help="WAV files of speech never trained on "
                   "(e.g. assets/unseen/*.wav): lip sync against their loudness")
    p.add_argument("--sheet", type=Path, help="write a contact sheet PNG: reference | real; generated; other audio")
    p.add_argument("--json", type=Path, help="write the results here (default: runs/eval/<ckpt>_<split>.json)")
    p = sub.add_parser("ablation", parents=[evaluation], formatter_class=data.HelpFormatter,
                       help="Tables 3-4 at toy scale: train and evaluate each fusion scheme for the same budget",
                       description="Train size T (the demo's recipe: " + " ".join(ABLATION_RECIPE) + ") once per "
                       "fusion setting (each portrait scheme with direct audio, each audio scheme with symbiotic "
                       "portrait) for the same budget and seed, then evaluate each. Interrupted runs resume; "
                       "finished ones are read from their eval.json.")
    p.add_argument("--budget-min", type=data.bounded(float, above=0), default=15.0,
                   help="training minutes per fusion setting")
    p.add_argument("--out", type=Path, default=Path("runs/ablation"), help="one run folder per setting, resumable")
    p.add_argument("--cache", type=Path, help="where the shared clip pool lives (default: OUT/cache); a run folder "
                   "trained with the same recipe, e.g. runs/demo, lends its pool")
    args = parser.parse_args(argv)
    try:
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
        if not args.probe.is_file():
            raise data.DataError(f"--probe {args.probe}: no such file (train one: `python metrics.py probe`)")
        probe = load_probe(args.probe)
        data.check_device(args.device)
        shared = dict(videos=args.videos, seconds=args.seconds, steps=args.steps, audio_scale=args.audio_scale,
                      split=args.split, device=args.device)
        if args.command == "ablation":
            results = ablation(args.out, args.budget_min, probe, cache=args.cache, **shared)
            print(ablation_table(results))
            return results
        for flag in ("inception", "i3d", "expression"):  # a missing file fails now, not after generating
            if getattr(args, flag) is not None and not getattr(args, flag).is_file():
                raise data.DataError(f"--{flag} {getattr(args, flag)}: no such file")
        result = evaluate(args.ckpt, probe, inception=args.inception, i3d=args.i3d, expression=args.expression,
                          speech=args.speech, sheet=args.sheet, **shared)
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    path = args.json or Path("runs/eval") / f"{args.ckpt.stem}_{args.split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    print(report(result))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
