"""The exercise property: for every exercise, its check passes on our code, fails on an empty body (`raise
NotImplementedError`) and fails on each plausible wrong solution below.

Wrong solutions are what a student might really write: each has one mistake, named in its comment (a few reuse
our function for the part they get right). They must be rejected by an AssertionError of the check (a clean "this
is wrong"), not by a crash of the wrong solution itself. "Ours" is the function in the project as it stands, so run
this file on the unmodified project. Test ids are E01-ours, E01-empty, E01-wrong1... and never contain an exercise
name, so `-k NAME` selects only the student's test in test_exercises.py.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from einops import rearrange, repeat

import audio
import checks
import diffusion
import letstalk
import metrics
import test_exercises
import vae
from letstalk import Block, modulate

# ----------------------------------------------------------------------------------------------------------------
# Wrong solutions, exercise by exercise


def psnr_without_rescale(x, y):
    # forgets that the images live in [-1, 1]: the peak is 2 there, so every value is 6 dB too low
    return -10 * torch.log10((x - y).pow(2).flatten(1).mean(1).clamp(min=1e-10))


def psnr_natural_log(x, y):
    # ln instead of log10
    return -10 * torch.log((x - y).pow(2).flatten(1).mean(1).clamp(min=1e-10) / 4)


def psnr_of_the_batch(x, y):
    # one number for the whole batch instead of one per image
    return -10 * torch.log10(((x - y).pow(2).mean() / 4).clamp(min=1e-10))


def psnr_unclamped(x, y):
    # identical images give log10(0) = -inf, so an infinite PSNR that poisons every average
    return -10 * torch.log10((x - y).pow(2).flatten(1).mean(1) / 4)


def psnr_per_pixel(x, y):
    # one PSNR per pixel, then their mean: the log of an average is not the average of logs (and every exact pixel
    # counts as 100 dB)
    mse = ((x - y).pow(2).mean(1) / 4).clamp(min=1e-10)  # (B, H, W)
    return (-10 * torch.log10(mse)).flatten(1).mean(1)


def psnr_per_channel(x, y):
    # one PSNR per colour channel, then their mean: right only when the error is spread evenly over the channels
    mse = ((x - y).pow(2).flatten(2).mean(2) / 4).clamp(min=1e-10)  # (B, 3)
    return (-10 * torch.log10(mse)).mean(1)


def kl_without_half(mean, logvar):
    # drops the 1/2 in front
    return (mean.pow(2) + logvar.exp() - 1 - logvar).mean()


def kl_logvar_as_log_std(mean, logvar):
    # reads logvar as log(std): var = exp(2 logvar)
    return 0.5 * (mean.pow(2) + (2 * logvar).exp() - 1 - 2 * logvar).mean()


def kl_detached(mean, logvar):
    # the right number, cut off from the graph: the VAE's KL term would silently stop training anything
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean().detach()


def kl_summed(mean, logvar):
    # sums over elements where the docstring asks for the mean (the KL weight would then depend on the image size)
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum()


def q_sample_without_roots(self, x0, t, noise):
    # alpha_bar and 1 - alpha_bar without square roots: the variance is no longer 1
    ab = self.alphas_cumprod[t].view(-1, *[1] * (x0.dim() - 1))
    return ab * x0 + (1 - ab) * noise


def q_sample_swapped(self, x0, t, noise):
    # the two coefficients swapped: t = 0 gives pure noise
    ab = self.alphas_cumprod[t].view(-1, *[1] * (x0.dim() - 1))
    return (1 - ab).sqrt() * x0 + ab.sqrt() * noise


def q_sample_off_by_one(self, x0, t, noise):
    # timesteps counted from 1: alpha_bar_{t-1}, and t = 0 wraps around to the noisiest step
    ab = self.alphas_cumprod[t - 1].view(-1, *[1] * (x0.dim() - 1))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def q_sample_in_place(self, x0, t, noise):
    # the right values, written into x0: train.py then computes the x0 and v targets from x_t instead of x0
    ab = self._ab(t, x0)
    return x0.mul_(ab.sqrt()).add_((1 - ab).sqrt() * noise)


def sincos_over_dim(dim, positions):
    # frequencies 10000^(-i / dim) instead of 10000^(-i / (dim / 2)): the slowest wave is too fast
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / dim)
    angles = positions.double()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_growing_frequencies(dim, positions):
    # 10000^(+i / (dim / 2)): the sign of the exponent flipped
    freqs = 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.double()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_cos_first(dim, positions):
    # cos half first: a different layout from the one every checkpoint was trained with
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.double()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def mel_windows_one_frame_margin(mel, n_frames):
    # off by one video frame: the window covers frames i - 1 .. i + 3
    start = (torch.arange(n_frames) - 1) * audio.MELS_PER_FRAME
    idx = (start[:, None] + torch.arange(audio.MEL_WINDOW)[None, :]).clamp(0, mel.shape[0] - 1)
    return mel[idx]


def mel_windows_wrapped(mel, n_frames):
    # indices before the start wrap around to the end of the audio (Python's negative indexing) instead of clamping
    start = (torch.arange(n_frames) - audio.AUDIO_MARGIN) * audio.MELS_PER_FRAME
    idx = (start[:, None] + torch.arange(audio.MEL_WINDOW)[None, :]) % mel.shape[0]
    return mel[idx]


def mel_windows_margin_in_mel_frames(mel, n_frames):
    # the margin of 2 counted in mel frames instead of video frames
    start = torch.arange(n_frames) * audio.MELS_PER_FRAME - audio.AUDIO_MARGIN
    idx = (start[:, None] + torch.arange(audio.MEL_WINDOW)[None, :]).clamp(0, mel.shape[0] - 1)
    return mel[idx]


def _unpatchify_as(self, tokens, B, pattern):
    p, s = self.cfg.patch, self.cfg.latent_size // self.cfg.patch
    return rearrange(tokens, pattern, b=B, h=s, p=p, q=p)


def unpatchify_channels_first(self, tokens, B):
    # channels first inside each patch, not the (p q c) order patchify writes
    return _unpatchify_as(self, tokens, B, "(b f) (h w) (c p q) -> b f c (h p) (w q)")


def unpatchify_transposed(self, tokens, B):
    # rows and columns of patches swapped: the frame comes out transposed
    return _unpatchify_as(self, tokens, B, "(b f) (w h) (p q c) -> b f c (h p) (w q)")


def unpatchify_frames_outer(self, tokens, B):
    # batch and frame axes grouped the wrong way round: frames of different clips get mixed up
    return _unpatchify_as(self, tokens, B, "(f b) (h w) (p q c) -> b f c (h p) (w q)")


def _attend(self, seq):
    return seq + self.temporal_fc(self.temporal_attn(self.temporal_norm(seq)))


def temporal_frames_outer(self, x, motion, B):
    # reads x as (f b) instead of (b f): sequences mix frames of different clips
    seq = _attend(self, rearrange(x, "(f b) p d -> (b p) f d", b=B))
    return rearrange(seq, "(b p) f d -> (f b) p d", b=B), None


def temporal_over_patches(self, x, motion, B):
    # no reshape at all: attends over the patches of each frame (that is the spatial attention's job)
    return _attend(self, x), None


def temporal_wrong_inverse(self, x, motion, B):
    # the forward reshape is right, the way back reads (p b) instead of (b p)
    seq = _attend(self, rearrange(x, "(b f) p d -> (b p) f d", b=B))
    return rearrange(seq, "(p b) f d -> (b f) p d", b=B), None


def temporal_no_residual(self, x, motion, B):
    # forgets the residual connection: the block is no longer the identity when temporal_fc is zero
    seq = rearrange(x, "(b f) p d -> (b p) f d", b=B)
    seq = self.temporal_fc(self.temporal_attn(self.temporal_norm(seq)))
    return rearrange(seq, "(b p) f d -> (b f) p d", b=B), None


def motion_ignored(self, x, motion, B):
    # the motion frames are never attended to: windows of a long video do not see each other
    return Block.temporal(self, x, None, B)[0], motion


def motion_appended(self, x, motion, B):
    # motion frames appended after the clip, but sliced as if they came first: off by M frames
    M = motion.shape[1]
    seq = torch.cat([rearrange(x, "(b f) p d -> b f p d", b=B), motion], dim=1)
    seq = rearrange(_attend(self, rearrange(seq, "b f p d -> (b p) f d")), "(b p) f d -> b f p d", b=B)
    return rearrange(seq[:, M:], "b f p d -> (b f) p d"), seq[:, :M]


def motion_reversed(self, x, motion, B):
    # motion frames prepended one at a time, each before the one taken earlier: the sequence holds them in reverse
    # order, and the updated motion frames come back in reverse order too
    M = motion.shape[1]
    seq = rearrange(x, "(b f) p d -> b f p d", b=B)
    for m in range(M):
        seq = torch.cat([motion[:, m:m + 1], seq], dim=1)
    seq = rearrange(_attend(self, rearrange(seq, "b f p d -> (b p) f d")), "(b p) f d -> b f p d", b=B)
    return rearrange(seq[:, M:], "b f p d -> (b f) p d"), seq[:, :M]


def motion_not_updated(self, x, motion, B):
    # the clip sees the motion frames, but the next block gets the motion frames of the previous one unchanged
    return Block.temporal(self, x, motion, B)[0], motion


def _sizes_with(new):
    """SIZES with one new entry placed after T."""
    return {"T": letstalk.SIZES["T"], "XS": new, **{k: v for k, v in letstalk.SIZES.items() if k != "T"}}


# width 250 splits into 5 heads of 50, but the 2D sin-cos embedding needs a width divisible by 4
sizes_width_not_divisible_by_4 = _sizes_with(dict(depth=8, width=250, heads=5))
# 512 wide and 12 deep is bigger than S, yet placed between T and S
sizes_out_of_order = _sizes_with(dict(depth=12, width=512, heads=8))
# 192 does not split into 5 heads
sizes_heads_do_not_divide = _sizes_with(dict(depth=8, width=192, heads=5))


def _mel_filterbank(n_freqs, n_mels, sample_rate, f_min, f_max, hz_to_mel, mel_to_hz, freqs):
    f_max = sample_rate / 2 if f_max is None else f_max
    points = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    lo, mid, hi = points[:-2][None], points[1:-1][None], points[2:][None]
    freqs = freqs[:, None]
    return torch.from_numpy(np.maximum(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0.0))


def mel_filterbank_linear(n_freqs=513, n_mels=80, sample_rate=16000, f_min=0.0, f_max=None):
    # forgets the mel scale: centres equally spaced in Hz, so the low frequencies (where speech is) get few filters
    return _mel_filterbank(n_freqs, n_mels, sample_rate, f_min, f_max, lambda f: f, lambda f: f,
                           np.linspace(0, sample_rate / 2, n_freqs))


def mel_filterbank_wrong_bins(n_freqs=513, n_mels=80, sample_rate=16000, f_min=0.0, f_max=None):
    # takes n_freqs for the FFT size: bin k placed at k * rate / n_freqs, so the bins run up to the sample rate
    return _mel_filterbank(n_freqs, n_mels, sample_rate, f_min, f_max, lambda f: 2595 * np.log10(1 + f / 700),
                           lambda m: 700 * (10 ** (m / 2595) - 1), np.arange(n_freqs) * sample_rate / n_freqs)


def mel_filterbank_mixed_logs(n_freqs=513, n_mels=80, sample_rate=16000, f_min=0.0, f_max=None):
    # a wrong mel scale: natural log going to mel, 10^x coming back
    return _mel_filterbank(n_freqs, n_mels, sample_rate, f_min, f_max, lambda f: 2595 * np.log(1 + f / 700),
                           lambda m: 700 * (10 ** (m / 2595) - 1), np.linspace(0, sample_rate / 2, n_freqs))


def split_v_sign(self, x_t, t, out):
    # v = sqrt(ab) eps - sqrt(1 - ab) x0 inverted with the wrong sign on v
    if self.prediction != "v":
        return diffusion.Diffusion.split(self, x_t, t, out)
    ab = self._ab(t, x_t)
    return ab.sqrt() * x_t + (1 - ab).sqrt() * out, (1 - ab).sqrt() * x_t - ab.sqrt() * out


def split_eps_without_root(self, x_t, t, out):
    # eps prediction: (x_t - (1 - ab) eps) / ab, the square roots forgotten
    if self.prediction != "eps":
        return diffusion.Diffusion.split(self, x_t, t, out)
    ab = self._ab(t, x_t)
    return (x_t - (1 - ab) * out) / ab, out


def split_x0_without_root(self, x_t, t, out):
    # x0 prediction: dividing by 1 - ab instead of sqrt(1 - ab)
    if self.prediction != "x0":
        return diffusion.Diffusion.split(self, x_t, t, out)
    ab = self._ab(t, x_t)
    return out, (x_t - ab.sqrt() * out) / (1 - ab)


def ddim_step_negative_index(self, x0, eps, t, t_prev, eta, noise):
    # t_prev = -1 read as alphas_cumprod[-1]: Python's last element, the noisiest step, instead of alpha_bar = 1
    ab, ab_prev = self.alphas_cumprod[t].item(), self.alphas_cumprod[t_prev].item()
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) if eta else 0.0
    return math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps + sigma * noise


def ddim_step_zero_is_clean(self, x0, eps, t, t_prev, eta, noise):
    # t_prev = 0 taken for the clean end (alpha_bar = 1) like -1: timestep 0 still holds a little noise
    ab = self.alphas_cumprod[t].item()
    ab_prev = self.alphas_cumprod[t_prev].item() if t_prev > 0 else 1.0
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    return math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps + sigma * noise


def ddim_step_variance_as_std(self, x0, eps, t, t_prev, eta, noise):
    # sigma without its square root (a variance used as a standard deviation)
    ab = self.alphas_cumprod[t].item()
    ab_prev = self.alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0
    sigma = eta * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
    return math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps + sigma * noise


def ddim_step_eps_ignores_sigma(self, x0, eps, t, t_prev, eta, noise):
    # the eps coefficient sqrt(1 - ab_prev) forgets to give up sigma^2: right only for eta = 0
    ab = self.alphas_cumprod[t].item()
    ab_prev = self.alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    return math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps + sigma * noise


def ddim_step_in_place(self, x0, eps, t, t_prev, eta, noise):
    # the right values, written into x0: the dpm++ sampler's stored x0 of this step becomes x_prev
    ab = self.alphas_cumprod[t].item()
    ab_prev = self.alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    return x0.mul_(math.sqrt(ab_prev)).add_(math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps + sigma * noise)


def frechet_without_root(mu1, cov1, mu2, cov2):
    # the cross term tr(S1 S2) instead of tr((S1 S2)^1/2)
    return ((mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * (cov1 @ cov2).trace()).item()


def frechet_product_of_roots(mu1, cov1, mu2, cov2):
    # tr(S1^1/2 S2^1/2): equal to tr((S1 S2)^1/2) only when the covariances commute (diagonal ones do)
    cross = (metrics._sqrtm_psd(cov1) @ metrics._sqrtm_psd(cov2)).trace()
    return ((mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * cross).item()


def frechet_unclamped(mu1, cov1, mu2, cov2):
    # square roots of the eigenvalues as they come: a singular covariance's zeros come out as -1e-17 and give NaN
    root1 = metrics._sqrtm_psd(cov1)
    cross = torch.linalg.eigvalsh(root1 @ cov2 @ root1).sqrt().sum()
    return ((mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * cross).item()


def frechet_as_tensor(mu1, cov1, mu2, cov2):
    # the right value, left a 0-d tensor where callers format and JSON-dump a float
    return torch.tensor(metrics.frechet_distance(mu1, cov1, mu2, cov2), dtype=torch.float64)


def frechet_mean_not_squared(mu1, cov1, mu2, cov2):
    # |mu1 - mu2| where the distance wants |mu1 - mu2|^2
    root1 = metrics._sqrtm_psd(cov1)
    cross = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).norm() + cov1.trace() + cov2.trace() - 2 * cross).item()


def spatial_symbiotic_as_guides(self, x, c, symbiotic=None, guides=None):
    # symbiotic tokens handled like siamese guides: they join keys and values, but are neither modulated nor updated
    if symbiotic is not None:
        guides = symbiotic if guides is None else torch.cat([symbiotic, guides], dim=1)
    return Block.spatial(self, x, c, None, guides)[0], symbiotic


def _spatial_factorized(self, x, c, symbiotic, guides, frames_outer=False, gate_mlp=True):
    """Block.spatial, factorized attention only (self.full ignored), with the switches the wrong solutions below
    flip."""
    B, P = c.shape[0], x.shape[1]
    pattern = "b (six d) -> six (f b) 1 d" if frames_outer else "b (six d) -> six (b f) 1 d"
    shift1, scale1, gate1, shift2, scale2, gate2 = repeat(self.ada(c), pattern, six=6, f=x.shape[0] // B)
    h = x if symbiotic is None else torch.cat([x, symbiotic], dim=1)
    q = modulate(self.norm1(h), shift1, scale1)
    h = h + gate1 * self.attn(q, q if guides is None else torch.cat([q, self.norm1(guides)], dim=1))
    h = h + (gate2 if gate_mlp else 1) * self.mlp(modulate(self.norm2(h), shift2, scale2))
    return h[:, :P], (None if symbiotic is None else h[:, P:])


def spatial_frames_outer(self, x, c, symbiotic=None, guides=None):
    # the timestep modulation repeated as (f b): frames of one clip get the other clip's timestep
    return _spatial_factorized(self, x, c, symbiotic, guides, frames_outer=True)


def spatial_ungated_mlp(self, x, c, symbiotic=None, guides=None):
    # the MLP branch without its adaLN-Zero gate: a new block is no longer the identity
    return _spatial_factorized(self, x, c, symbiotic, guides, gate_mlp=False)


def spatial_always_per_frame(self, x, c, symbiotic=None, guides=None):
    # ignores self.full: with attention="full" each frame still attends only to its own tokens, not the whole clip's
    return _spatial_factorized(self, x, c, symbiotic, guides)


# ----------------------------------------------------------------------------------------------------------------
# The registry: (exercise name, its check, our implementation, its empty version, the wrong solutions)


def empty(*args, **kwargs):
    raise NotImplementedError


EXERCISES = [
    ("psnr", checks.check_psnr, vae.psnr, empty,
     [psnr_without_rescale, psnr_natural_log, psnr_of_the_batch, psnr_unclamped, psnr_per_pixel, psnr_per_channel]),
    ("kl", checks.check_kl, vae.kl_divergence, empty, [kl_without_half, kl_logvar_as_log_std, kl_summed, kl_detached]),
    ("q_sample", checks.check_q_sample, diffusion.Diffusion.q_sample, empty,
     [q_sample_without_roots, q_sample_swapped, q_sample_off_by_one, q_sample_in_place]),
    ("sincos", checks.check_sincos, letstalk.sincos_1d, empty,
     [sincos_over_dim, sincos_growing_frequencies, sincos_cos_first]),
    ("mel_windows", checks.check_mel_windows, audio.mel_windows, empty,
     [mel_windows_one_frame_margin, mel_windows_wrapped, mel_windows_margin_in_mel_frames]),
    ("unpatchify", checks.check_unpatchify, letstalk.LetsTalk.unpatchify, empty,
     [unpatchify_channels_first, unpatchify_transposed, unpatchify_frames_outer]),
    ("temporal", checks.check_temporal, Block.temporal, empty,
     [temporal_frames_outer, temporal_over_patches, temporal_wrong_inverse, temporal_no_residual]),
    # a table, not a function: its "empty body" is an empty table
    ("model_size", checks.check_model_size, letstalk.SIZES, {},
     [sizes_width_not_divisible_by_4, sizes_out_of_order, sizes_heads_do_not_divide]),
    ("mel_filterbank", checks.check_mel_filterbank, audio.mel_filterbank, empty,
     [mel_filterbank_linear, mel_filterbank_wrong_bins, mel_filterbank_mixed_logs]),
    ("split", checks.check_split, diffusion.Diffusion.split, empty,
     [split_v_sign, split_eps_without_root, split_x0_without_root]),
    ("ddim_step", checks.check_ddim_step, diffusion.Diffusion.ddim_step, empty,
     [ddim_step_negative_index, ddim_step_variance_as_std, ddim_step_eps_ignores_sigma, ddim_step_zero_is_clean,
      ddim_step_in_place]),
    ("frechet", checks.check_frechet, metrics.frechet_distance, empty,
     [frechet_without_root, frechet_product_of_roots, frechet_mean_not_squared, frechet_unclamped,
      frechet_as_tensor]),
    ("spatial", checks.check_spatial, Block.spatial, empty,
     [spatial_symbiotic_as_guides, spatial_frames_outer, spatial_ungated_mlp, spatial_always_per_frame]),
    ("motion", checks.check_motion, Block.temporal, empty,
     [motion_ignored, motion_appended, motion_not_updated, motion_reversed]),
]


def _cases():
    for i, (_, check, ours, blank, wrong) in enumerate(EXERCISES, 1):
        yield pytest.param(check, ours, "ours", id=f"E{i:02d}-ours")
        yield pytest.param(check, blank, "empty", id=f"E{i:02d}-empty")
        for k, candidate in enumerate(wrong, 1):
            yield pytest.param(check, candidate, "wrong", id=f"E{i:02d}-wrong{k}")


@pytest.mark.parametrize("check, candidate, kind", list(_cases()))
def test_check_accepts_ours_and_rejects_the_rest(check, candidate, kind):
    if kind == "ours":
        check(candidate)
    elif kind == "empty":
        with pytest.raises((NotImplementedError, AssertionError)):
            check(candidate)
    else:
        with pytest.raises(AssertionError):
            check(candidate)


def test_every_exercise_has_a_student_test_a_command_and_wrong_solutions():
    students = sorted(name for name in dir(test_exercises) if name.startswith("test_"))
    names = [name for name, *_ in EXERCISES]
    assert sorted(f"test_{name}" for name in names) == students
    guide = (Path(__file__).resolve().parents[2] / "EXERCISES.md").read_text(encoding="utf-8")
    # everything `-k` matches against besides the student tests: this file's tests and ids, the files and folders
    others = [name for name, value in globals().items() if name.startswith("test_") and callable(value)]
    others += [case.id for case in _cases()] + ["test_exercises.py", "test_property.py", "exercises", "tests"]
    for name, _, _, _, wrong in EXERCISES:
        assert wrong, f"{name}: no wrong solution"
        assert f"python -m pytest tests/exercises -k {name}`" in guide, f"EXERCISES.md has no command for {name}"
        selected = [test for test in students + others if name.lower() in test.lower()]
        assert selected == [f"test_{name}"], f"`-k {name}` selects {selected}"
