"""Metrics from their definitions: the Fréchet distance behind FID / FVD / E-FID, SSIM, lip sync, and the
instruments that read frames for them (the synthetic world's probe, the standard feature extractors).

The paper judges everything with FID, FVD, SSIM and E-FID (Tables 1-4). Each is a short formula once the features
exist; this file writes the formulas out so a student sees what the numbers mean:

  Fréchet distance   d^2 = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1^1/2 S_2 S_1^1/2)^1/2) between two Gaussians fitted
                     to features of real and generated samples (FID: Inception features of frames; FVD: I3D features
                     of clips; E-FID: expression coefficients);
  SSIM               local means, variances and covariance under an 11x11 Gaussian window (sigma 1.5);
  lip sync           Pearson r between mouth openness seen in generated frames and the openness the audio implies,
                     per clip with the clip mean removed, averaged over clips (ours: the paper reports no lip-sync
                     figure, and SyncNet's LSE-C / LSE-D, the field's usual one, needs weights we cannot fetch);
  re-render fidelity the PSNR between a frame and the closest frame the synthetic world's renderer draws of the
                     same person (the synthetic world only).

Nothing here samples or trains a denoiser: training imports this file to log lip sync, and evaluate.py, which
generates the videos, builds the paper's tables from it.
"""

import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import inception_v3
from tqdm import tqdm

from common import UserError, contents_of, load_checkpoint, to_tensor
from world import POSE_SCALE, identity, render_frame

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
        """Of every feature seen so far: (mean (dim,), covariance (dim, dim)), float64. Needs two or more."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.n}")
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
    clip's overall offset, or a shared silence, cannot create correlation) and averaged over the clips whose truth
    moves. A clip whose prediction does not move (a frozen mouth) follows nothing: it counts as 0."""
    p, t = np.asarray(predicted, np.float64), np.asarray(truth, np.float64)
    p, t = p - p.mean(1, keepdims=True), t - t.mean(1, keepdims=True)
    p_norm, t_norm = np.sqrt((p ** 2).sum(1)), np.sqrt((t ** 2).sum(1))
    keep = t_norm > 1e-6  # a truth that does not move has nothing to follow
    r = np.where(p_norm > 1e-6, (p * t).sum(1) / np.maximum(p_norm * t_norm, 1e-12), 0.0)
    return float(r[keep].mean()) if keep.any() else 0.0


def mouth_darkness(frames, boxes):
    """A probe-free openness reading: how dark the mouth box is. frames uint8 (N, H, W, 3), boxes (N, 4) in pixels
    (x0, y0, x1, y1) -> (N,): 1 - mean brightness in [0, 1] inside each box (an open mouth shows its dark inside)."""
    out = np.zeros(len(frames))
    for i, (frame, (x0, y0, x1, y1)) in enumerate(zip(frames, boxes)):
        patch = frame[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))]
        out[i] = 1 - patch.mean() / 255 if patch.size else 0.0
    return out


# ----------------------------------------------------------------------------------------------------------------
# Re-render fidelity: how cleanly a frame is a drawing of its person (the synthetic world only)

# the free parameters of world.render_frame: mouth openness, roundness, blink, head dx, dy (fractions of the frame)
# and roll (degrees), and the range searched for each (the world's own tracks stay well inside it)
RENDER_RANGE = np.array([[0, 1], [0, 1], [0, 1], [-0.09, 0.09], [-0.06, 0.06], [-15, 15]], float)
RENDER_EVALS = 80  # renders per frame the search may spend: real frames then score 40-60 dB, and VAE reconstructions
# within about 0.3 dB of what 150 find


def rerender_psnr(ident, frame, start):
    """The PSNR in dB between a frame uint8 (H, W, 3) of the person `ident` (a world.Identity) and the closest
    frame world.render_frame draws of that person, whatever the mouth, eyes and head do: how cleanly the frame is
    a drawing of that person, which FID on the probe's features cannot see (the probe reads mouth, blink and pose,
    not speckles or smears). `start` (6,) is where the search starts (the probe's readings); a pattern search
    (each parameter up and down by a step, the steps halved when nothing improves) refines it."""
    size, target = frame.shape[0], frame.astype(np.float32)

    def error(p):
        return float(np.mean((render_frame(ident, size, *p[:3], p[3:])[0].astype(np.float32) - target) ** 2))
    p = np.clip(np.asarray(start, float), *RENDER_RANGE.T)
    best, step, evals = error(p), (RENDER_RANGE[:, 1] - RENDER_RANGE[:, 0]) / 8, 1
    while evals < RENDER_EVALS and step[0] > 1e-3:
        improved = False
        for k in range(len(p)):
            for sign in (1, -1):
                q = p.copy()
                q[k] = np.clip(q[k] + sign * step[k], *RENDER_RANGE[k])
                e, evals = error(q), evals + 1
                if e < best:
                    p, best, improved = q, e, True
                    break
        if not improved:
            step = step / 2
    return 10 * np.log10(255 ** 2 / max(best, 1e-10))


def fidelity(probe, videos, people):
    """Re-render fidelity of videos uint8 (N, K, H, W, 3), video i showing people[i] (world.Identity): the median
    rerender_psnr of their N * K frames, each search started from the probe's readings (roundness, which the probe
    does not read, from the middle)."""
    reads = probe_readings(probe, videos)
    scores = []
    for person, frames, r in zip(people, videos, reads):
        for frame, (openness, blink, *pose) in zip(frames, r):
            start = [openness, 0.5, blink, *(p * s for p, s in zip(pose, POSE_SCALE))]
            scores.append(rerender_psnr(person, frame, start))
    return float(np.median(scores))


# ----------------------------------------------------------------------------------------------------------------
# The probe: a measuring instrument for the synthetic world (never a training loss)


class Probe(nn.Module):
    """Reads a synthetic face: frames (B, 3, 64, 64) in [-1, 1] -> readings (B, 5): mouth openness, blink and head
    pose (dx, dy, roll, each divided by world.POSE_SCALE, so about unit size). In the synthetic world its 128-d
    penultimate features stand in for Inception's (synthetic FID), its readings of 8-frame clips for I3D's features
    (synthetic FVD, 40-d), and its openness and blink for expression coefficients (synthetic E-FID)."""

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
        return torch.cat([openness[:, None], blink[:, None], pose / torch.tensor(POSE_SCALE)], dim=1)


def train_probe(train_pool, val_pool, steps=1500):
    """Fit the probe to ground-truth frames (two data.build_frame_pool dicts), with light blur and
    noise so that it also reads VAE-decoded frames. Returns (probe, validation r of openness)."""
    torch.manual_seed(0)
    probe = Probe()
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3)
    frames = train_pool["frames"]
    target = Probe.targets(train_pool["openness"], train_pool["blink"], train_pool["pose"])
    for step in tqdm(range(steps), desc="probe", unit="step"):
        idx = torch.randint(0, len(frames), (64,))
        x = to_tensor(frames[idx])
        if step % 2:  # half the batches blurred like a decoder's output
            x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        x = x + 0.03 * torch.randn_like(x)
        loss = (probe(x) - target[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe.eval()
    with torch.no_grad():
        got = probe(to_tensor(val_pool["frames"]))[:, 0].numpy()
    return probe, float(np.corrcoef(got, val_pool["openness"].numpy())[0, 1])


PROBE = Path(__file__).resolve().parent / "checkpoints" / "probe.pt"  # the shipped probe, whatever the working dir


def load_probe(path):
    """The Probe whose weights `python evaluate.py probe` saved at `path`, in eval mode."""
    probe, weights = Probe(), load_checkpoint(path, needs=("head.weight",), what="a probe",
                                              hint=" (train one: `python evaluate.py probe`)")
    with contents_of(path, "a probe"):
        probe.load_state_dict(weights)
    return probe.eval()


# ----------------------------------------------------------------------------------------------------------------
# The standard feature extractors. Their weights cannot be downloaded here (nothing is fetched at run time): the
# user passes the files, and every figure names the extractor it came from.


def load_inception(path):
    """FID's extractor: Inception-v3 (torchvision's architecture) with weights from `path`, either torchvision's
    inception_v3_google-0cc3c7bd.pth (1000 classes) or pytorch-fid's pt_inception-2015-12-05-6726825d.pth (1008
    classes; pytorch-fid also changes a few pooling layers, so its FIDs differ slightly from ours). Returns a
    function frames (B, 3, H, W) in [-1, 1] -> (B, 2048), the pool features before the classifier.

    Both sets of weights come from Google's TensorFlow Inception, which takes inputs in [-1, 1]: torchvision's
    pretrained builder sets transform_input=True, which maps ImageNet-normalised input back to [-1, 1] before the
    first layer. Our frames are in [-1, 1] already, so they go in as they are."""
    state = load_checkpoint(path, needs=("fc.weight",), what="Inception-v3 weights", hint="; pass torchvision's "
                            "inception_v3_google-0cc3c7bd.pth or pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    with contents_of(path, "Inception-v3 weights"):  # e.g. another network's, which also has an fc layer
        state = {k: v for k, v in state.items() if not k.startswith("AuxLogits")}
        net = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=state["fc.weight"].shape[0])
        net.load_state_dict(state)
    net.fc = nn.Identity()
    net.eval()

    @torch.no_grad()
    def features(frames):
        """frames (B, 3, H, W) in [-1, 1], resized to 299x299 -> pool features (B, 2048)."""
        return net(F.interpolate(frames, size=(299, 299), mode="bilinear", align_corners=False))
    return features


def load_torchscript(path, flag, what):
    """A TorchScript extractor the user passes (FVD's I3D, E-FID's expression network)."""
    if path is None or not Path(path).is_file():
        raise UserError(f"{flag} {path}: no such file; pass {what}")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format these networks ship in
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:  # noqa: BLE001  (any failure means: not a TorchScript file)
        raise UserError(f"{flag} {path}: not a TorchScript file ({type(e).__name__})") from None


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
# Measuring generated videos (evaluate.py)


@torch.no_grad()
def probe_readings(probe, videos, features=False):
    """The probe on videos uint8 (N, T, H, W, 3) -> readings (N, T, 5) (or its features (N, T, 128))."""
    x = to_tensor(videos).flatten(0, 1)
    out = torch.cat([probe.features(c) if features else probe(c) for c in x.split(256)])
    return out.unflatten(0, videos.shape[:2]).numpy()


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
    """Where the background and the skin are in a synthetic face (world.render_frame's layout), robust to the head
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
    person, the synthetic person after it): {"background": ratio, "skin": ratio}; 0 is perfect, 1 is no identity at
    all."""
    bg_box, skin_box = identity_regions(identities, videos.shape[2])
    n = len(identities)
    others = [next((identities[j % n] for j in range(i + 1, i + n) if identities[j % n]["id"] != ident["id"]),
                   asdict(identity(ident["id"] + 1))) for i, ident in enumerate(identities)]
    ratios = {}
    for key, box in (("background", bg_box), ("skin", skin_box)):
        seen = _colour_at(videos, box)  # (N, T, 3)
        own = np.array([ident[key] for ident in identities], float)[:, None]
        other = np.array([ident[key] for ident in others], float)[:, None]
        ratios[key] = float(np.linalg.norm(seen - own, axis=-1).mean() / np.linalg.norm(seen - other, axis=-1).mean())
    return ratios


def off_palette(videos, real, pixels=4096):
    """For each video uint8 (N, T, H, W, 3): the distance of `pixels` random pixels (the same for every call) to
    the nearest colour of the real video (N, T, H, W, 3) -> (N, pixels). A saturated blob is a colour the real
    video never shows."""
    rng = np.random.default_rng(0)
    out = []
    for v, r in zip(videos, real):
        palette = torch.from_numpy(np.unique(r.reshape(-1, 3) // 4 * 4 + 2, axis=0)).float()
        pick = v.reshape(-1, 3)[rng.integers(0, v.shape[0] * v.shape[1] * v.shape[2], pixels)]
        out.append(torch.cdist(torch.from_numpy(pick).float(), palette).min(1).values.numpy())
    return np.stack(out)


def frame_change(videos):
    """Mean absolute frame-to-frame change of videos uint8 (N, T, H, W, 3), on the [0, 1] scale."""
    return float(np.abs(np.diff(videos.astype(np.float32) / 255, axis=1)).mean())


def border_jump(videos, window):
    """Seams of a video generated in windows of `window` frames (sample.generate): the mean absolute change from
    frame to frame across window borders over that inside windows, for videos uint8 (N, T, H, W, 3) with T >
    window. About 1 where each window continues the last one smoothly (real videos: 1 for any window)."""
    change = np.abs(np.diff(videos.astype(np.float32), axis=1)).mean(axis=(0, 2, 3, 4))  # (T - 1,): t -> t + 1
    border = np.arange(1, len(change) + 1) % window == 0
    return float(change[border].mean() / change[~border].mean())


