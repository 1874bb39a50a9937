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

import numpy as np
import torch
import torch.nn.functional as F

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
