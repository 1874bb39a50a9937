"""One check per exercise of EXERCISES.md.

check_NAME(impl) takes the implementation under test (the real function, or a student's version of it; a method is
called as impl(obj, ...)) and raises AssertionError with a hint when it is wrong. Every expected value is computed
here from the formula or by brute force (loops over the indices), never copied from the project's output, so the
checks stay meaningful when the project's own body is replaced. Each check runs in well under a second.
"""

from functools import lru_cache

import numpy as np
import torch
from torch.distributions import Normal, kl_divergence

import diffusion
import letstalk


def close(got, want, what, atol=1e-5, rtol=1e-5):
    """Assert got (tensor, array or number) equals want elementwise, with a readable message: how far off, and the
    first wrong element (index, got, want), which often tells a layout mistake from a formula mistake."""
    got = torch.as_tensor(got).detach().double()
    want = torch.as_tensor(want).double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    ok = torch.isclose(got, want, atol=atol, rtol=rtol)
    if not ok.all():
        first = tuple(int(i) for i in (~ok).nonzero()[0])
        err = (got - want).abs().nan_to_num(float("inf")).max().item()
        raise AssertionError(f"{what}: off by up to {err:.3g}; first at index {first}: got {got[first].item():.6g}, "
                             f"want {want[first].item():.6g}")


def unchanged(inputs, originals, what, why):
    """Assert the tensors in inputs {name: tensor} still equal their copies in originals: the function under test
    must not write into its arguments (in-place ops such as x0.mul_(...) or x0 *= ...)."""
    changed = [name for name, value in inputs.items() if not torch.equal(value, originals[name])]
    assert not changed, (f"{what} changed its input {' and '.join(changed)} in place (an in-place op such as "
                         f"{changed[0]}.mul_(...) or {changed[0]} *= ...), but {why}: compute the result in a new "
                         "tensor")


def randomize(module, seed=0, std=0.5):
    """Random values in every parameter: a zero-initialised layer would hide whole paths through a block."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def tiny_config(**overrides):
    """A LetsTalk small enough to check by brute force: width 8, 2 heads, 4 patches of a 4x4 latent."""
    return letstalk.LetsTalkConfig(**{**dict(depth=1, width=8, heads=2, latent_size=4, latent_channels=3, frames=3,
                                             motion=2, audio_layers=1, audio_tokens=2), **overrides})


# ----------------------------------------------------------------------------------------------------------------
# vae.py


def check_psnr(impl):
    """vae.psnr(x, y): images in [-1, 1], one value per image, peak 1 on the [0, 1] scale."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    deltas = np.array([0.02, 0.2, 1.0])  # a uniform difference d in [-1, 1] is d / 2 on the [0, 1] scale
    got = impl(x, x + torch.tensor(deltas, dtype=x.dtype).view(-1, 1, 1, 1))
    close(got, -10 * np.log10((deltas / 2) ** 2), "psnr of images that differ by 0.02, 0.2 and 1.0 everywhere "
          "(expected 40, 20 and 6.02 dB, one value per image)", atol=1e-3)
    half = torch.zeros(2, 3, 8, 8)  # half the values differ by 0.2, the rest not at all: MSE 0.02 (0.005 on [0, 1])
    half[0, :, :4] = 0.2  # the top half of every channel
    half[1, 0], half[1, 1, :4] = 0.2, 0.2  # all of channel 0 and the top half of channel 1
    close(impl(x[:2], x[:2] + half), [-10 * np.log10(0.02 / 4)] * 2, "psnr of images where half the values differ "
          "by 0.2 and the rest not at all (the top half of every channel; all of channel 0 and the top half of "
          "channel 1): expected 23.01 dB for both, from the mean squared error of the whole image (average the "
          "squared error over every pixel and channel first, then take the log; an average of per-pixel or "
          "per-channel PSNRs is not the image's PSNR)", atol=1e-3)
    same = impl(x, x.clone())
    assert torch.isfinite(same).all() and (same > 60).all(), \
        f"identical images should give a large finite PSNR (clamp the error away from 0), got {same.tolist()}"


def check_kl(impl):
    """vae.kl_divergence(mean, logvar): KL(N(mean, exp(logvar)) || N(0, 1)) averaged over elements."""
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 3, generator=g), 2 * torch.randn(2, 4, 3, 3, generator=g)
    got = impl(mean.requires_grad_(), logvar.requires_grad_())
    assert torch.as_tensor(got).dim() == 0, "the KL should be one number (the mean over every element)"
    assert isinstance(got, torch.Tensor) and got.requires_grad, \
        "the KL must stay a tensor that gradients flow through (no .item(), .detach() or numpy): the VAE trains on it"
    want = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).mean()
    close(got, want, "KL of random Gaussians against N(0, 1)")
    close(impl(torch.zeros(3), torch.zeros(3)), 0.0, "KL of N(0, 1) against itself")


# ----------------------------------------------------------------------------------------------------------------
# letstalk.py


def check_sincos(impl):
    """letstalk.sincos_1d(dim, positions): [sin(p w_i) for i < dim/2, cos(p w_i) ...], w_i = 10000^(-i / (dim/2))."""
    for dim, positions in [(16, torch.arange(12)), (6, torch.tensor([0, 3, 999]))]:
        half = dim // 2
        angles = positions.double().numpy()[:, None] * 10000.0 ** (-np.arange(half) / half)[None]
        got = impl(dim, positions)
        assert got.dtype == torch.float32, f"the embedding should be float32, got {got.dtype}"
        close(got, np.concatenate([np.sin(angles), np.cos(angles)], axis=1), f"sincos_1d({dim}, {positions.tolist()})")


def check_unpatchify(impl):
    """LetsTalk.unpatchify(tokens (B*F, P, p*p*C), B) -> (B, F, C, h, w): token i*s + j holds the patch of row
    block i and column block j, its features ordered (row in patch, column in patch, channel)."""
    model = letstalk.LetsTalk(tiny_config())
    B, F, C, p, s = 2, 3, 3, 2, 2  # s = latent_size / patch
    tokens = torch.arange(B * F * s * s * p * p * C, dtype=torch.float32).view(B * F, s * s, p * p * C)
    want = torch.zeros(B, F, C, s * p, s * p)
    for b, f, c, i, j, u, v in np.ndindex(B, F, C, s, s, p, p):
        want[b, f, c, i * p + u, j * p + v] = tokens[b * F + f, i * s + j, (u * p + v) * C + c]
    close(impl(model, tokens, B), want, "unpatchify of numbered tokens (compare a few values by hand)", atol=0)


def temporal_reference(block, x, motion, B):
    """Block.temporal by brute force: one sequence per clip and patch position, motion frames first."""
    F, P = x.shape[0] // B, x.shape[1]
    M = 0 if motion is None else motion.shape[1]
    new_x, new_motion = x.clone(), (None if motion is None else motion.clone())
    for b, p in np.ndindex(B, P):
        history = [motion[b, m, p] for m in range(M)]
        seq = torch.stack(history + [x[b * F + f, p] for f in range(F)])[None]  # (1, M + F, D)
        seq = (seq + block.temporal_fc(block.temporal_attn(block.temporal_norm(seq))))[0]
        for m in range(M):
            new_motion[b, m, p] = seq[m]
        for f in range(F):
            new_x[b * F + f, p] = seq[M + f]
    return new_x, new_motion


@torch.no_grad()
def check_temporal(impl):
    """Block.temporal(x (B*F, P, D), None, B): attention over the F frames of each patch position."""
    block = randomize(letstalk.Block(tiny_config()))
    B, F, P, D = 2, 3, 4, 8
    x = torch.randn(B * F, P, D, generator=torch.Generator().manual_seed(1))
    got_x, got_motion = impl(block, x, None, B)
    assert got_motion is None, "without motion frames the second output should be None"
    close(got_x, temporal_reference(block, x, None, B)[0], "temporal attention of 2 clips of 3 frames x 4 patches")


@torch.no_grad()
def check_motion(impl):
    """Block.temporal(x, motion (B, M, P, D), B): the M motion frames come first in every sequence, and come back
    updated."""
    block = randomize(letstalk.Block(tiny_config()))
    B, F, P, D = 2, 3, 4, 8
    g = torch.Generator().manual_seed(1)
    for M in (2, 1):
        x, motion = torch.randn(B * F, P, D, generator=g), torch.randn(B, M, P, D, generator=g)
        got_x, got_motion = impl(block, x, motion, B)
        want_x, want_motion = temporal_reference(block, x, motion, B)
        close(got_x, want_x, f"clip frames after temporal attention with {M} motion frames")
        assert got_motion is not None, "the motion frames should come back (updated), not None"
        close(got_motion, want_motion, f"the {M} motion frames after temporal attention (in the order they came in)")


def spatial_reference(block, x, c, symbiotic, guides):
    """Block.spatial by brute force: per frame (or per clip with full attention), adaLN from the clip's timestep."""
    B, P = c.shape[0], x.shape[1]
    F = x.shape[0] // B
    shift1, scale1, gate1, shift2, scale2, gate2 = block.ada(c).chunk(6, dim=-1)  # each (B, D)
    new_x, new_sym = x.clone(), (None if symbiotic is None else symbiotic.clone())
    for b in range(B):
        frames = range(b * F, (b + 1) * F)
        hs = [x[n] if symbiotic is None else torch.cat([x[n], symbiotic[n]]) for n in frames]
        qs = [block.norm1(h) * (1 + scale1[b]) + shift1[b] for h in hs]
        kvs = [q if guides is None else torch.cat([q, block.norm1(guides[n])]) for q, n in zip(qs, frames)]
        if block.full:  # one attention over every token of the clip
            out = block.attn(torch.cat(qs)[None], torch.cat(kvs)[None])[0].split([len(q) for q in qs])
        else:
            out = [block.attn(q[None], kv[None])[0] for q, kv in zip(qs, kvs)]
        for n, h, o in zip(frames, hs, out):
            h = h + gate1[b] * o
            h = h + gate2[b] * block.mlp(block.norm2(h) * (1 + scale2[b]) + shift2[b])
            new_x[n] = h[:P]
            if symbiotic is not None:
                new_sym[n] = h[P:]
    return new_x, new_sym


@torch.no_grad()
def check_spatial(impl):
    """Block.spatial(x, c, symbiotic, guides): symbiotic tokens join the frame's tokens (and are updated), guides
    join keys and values only; adaLN modulation from the timestep of the frame's own clip."""
    B, F, P, D, S, G = 2, 3, 4, 8, 3, 5
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(B * F, P, D, generator=g), torch.randn(B, D, generator=g)
    sym, guides = torch.randn(B * F, S, D, generator=g), torch.randn(B * F, G, D, generator=g)
    for attention in ("factorized", "full"):
        block = randomize(letstalk.Block(tiny_config(attention=attention, motion=0)))
        for name, s, gd in [("no condition tokens", None, None), ("symbiotic tokens", sym, None),
                            ("siamese guides", None, guides), ("symbiotic tokens and siamese guides", sym, guides)]:
            got_x, got_sym = impl(block, x, c, s, gd)
            want_x, want_sym = spatial_reference(block, x, c, s, gd)
            what = f"{attention} spatial attention with {name}" + \
                (f" (self.full: one attention over the tokens of all {F} frames of a clip)" if block.full else "")
            close(got_x, want_x, f"frame tokens, {what}", atol=1e-4)
            if s is None:
                assert got_sym is None, f"{what}: without symbiotic tokens the second output should be None"
            else:
                close(got_sym, want_sym, f"symbiotic tokens, {what} (they are updated like frame tokens)", atol=1e-4)


# The sizes the README documents: (depth, width, heads), the paper's B and L and our T and S.
DOCUMENTED_SIZES = {"T": (6, 128, 4), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16)}


@lru_cache(maxsize=None)
def _parameters_or_error(entry):
    """(parameter count, None) of a LetsTalk of one SIZES entry, or (None, the error of a forward pass)."""
    small = dict(latent_size=4, frames=2, motion=1)
    try:
        with torch.device("meta"):  # shapes only: even L costs nothing
            count = sum(p.numel() for p in letstalk.LetsTalk(letstalk.LetsTalkConfig(**dict(entry), **small))
                        .parameters())
            model = letstalk.LetsTalk(letstalk.LetsTalkConfig(**{**dict(entry), "depth": 1}, **small))
            model(torch.randn(1, 2, 4, 4, 4), torch.zeros(1, dtype=torch.long), torch.randn(1, 4, 4, 4),
                  torch.randn(1, 2, 20, 80), torch.randn(1, 1, 4, 4, 4))
        return count, None
    except Exception as e:  # noqa: BLE001  (the message is the student's hint)
        return None, f"{type(e).__name__}: {e}"


def check_model_size(sizes):
    """letstalk.SIZES: the documented sizes unchanged, every size builds and runs, sizes ordered small to large."""
    for name, (depth, width, heads) in DOCUMENTED_SIZES.items():
        assert sizes.get(name) == dict(depth=depth, width=width, heads=heads), \
            f"size {name} should stay depth {depth}, width {width}, heads {heads}; got {sizes.get(name)}"
    previous = None
    for name, entry in sizes.items():
        width, heads = entry["width"], entry["heads"]
        assert width % heads == 0, f"size {name}: width {width} does not split into {heads} heads"
        assert width % 4 == 0, f"size {name}: the 2D sin-cos position embedding needs a width divisible by 4"
        count, error = _parameters_or_error(tuple(sorted(entry.items())))
        assert error is None, f"size {name} does not run: {error}"
        if previous is not None:
            assert count > previous[1], (f"size {name} ({count / 1e6:.1f}M parameters on 4x4 latents) comes after "
                                         f"{previous[0]} ({previous[1] / 1e6:.1f}M): keep SIZES ordered from small to "
                                         "large")
        previous = name, count


# ----------------------------------------------------------------------------------------------------------------
# diffusion.py: the diffusion process


def _alpha_bar(process, t, ndim):
    return process.alphas_cumprod.double()[t].view(-1, *[1] * (ndim - 1))


def check_q_sample(impl):
    """Diffusion.q_sample(x0, t, noise) = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (Eq. 2)."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 2, 3, 4, 4, generator=g), torch.randn(4, 2, 3, 4, 4, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    for schedule in ("linear", "cosine"):
        process = diffusion.Diffusion(schedule=schedule)
        ab = _alpha_bar(process, t, x0.dim())
        want = ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()
        inputs = dict(x0=x0, t=t, noise=noise)
        originals = {name: value.clone() for name, value in inputs.items()}
        close(impl(process, x0, t, noise), want, f"q_sample at t = {t.tolist()} ({schedule} schedule)")
        unchanged(inputs, originals, "q_sample", "train.py still needs x0 and noise after it, for the training target")


def check_split(impl):
    """Diffusion.split(x_t, t, out) -> (x0, eps), for networks that predict eps, x0 or v (diffusion.prediction)."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 2, 3, 4, 4, generator=g).double(), torch.randn(4, 2, 3, 4, 4, generator=g).double()
    t = torch.tensor([0, 100, 500, 900])
    ab = _alpha_bar(diffusion.Diffusion(), t, x0.dim())
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    outputs = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}
    for prediction, out in outputs.items():
        got_x0, got_eps = impl(diffusion.Diffusion(prediction=prediction), x_t.float(), t, out.float())
        close(got_x0, x0, f"x0 recovered from a perfect {prediction} prediction", atol=2e-3, rtol=1e-3)
        close(got_eps, eps, f"eps recovered from a perfect {prediction} prediction", atol=2e-3, rtol=1e-3)


def check_ddim_step(impl):
    """Diffusion.ddim_step(x0, eps, t, t_prev, eta, noise): one reverse step, t_prev = -1 meaning the clean end."""
    process = diffusion.Diffusion()
    ab_all = process.alphas_cumprod.double().numpy()
    g = torch.Generator().manual_seed(0)
    x0, eps, noise = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    # t_prev = 0 is a real timestep (alpha_bar_0 < 1; sample() always steps to it), -1 the clean end
    for t, t_prev, eta in [(999, 959, 0.0), (500, 499, 1.0), (300, 200, 0.5), (20, 0, 1.0), (20, -1, 0.0),
                           (40, -1, 1.0)]:
        ab, ab_prev = float(ab_all[t]), (float(ab_all[t_prev]) if t_prev >= 0 else 1.0)
        sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        want = np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev - sigma ** 2) * eps + sigma * noise
        inputs = dict(x0=x0, eps=eps, noise=noise)
        originals = {name: value.clone() for name, value in inputs.items()}
        close(impl(process, x0, eps, t, t_prev, eta, noise), want, f"ddim_step from t = {t} to {t_prev}, eta {eta}")
        unchanged(inputs, originals, "ddim_step", "the dpm++ sampler keeps this step's x0 for its next step")


# ----------------------------------------------------------------------------------------------------------------
# audio.py: the audio front end


def check_mel_filterbank(impl):
    """audio.mel_filterbank(n_freqs, n_mels, sample_rate, f_min, f_max) -> (n_freqs, n_mels) HTK-mel triangles."""
    for n_freqs, n_mels, rate, f_min, f_max in [(513, 80, 16000, 0.0, None), (129, 10, 8000, 100.0, 3000.0)]:
        f_max_hz = rate / 2 if f_max is None else f_max
        mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731  (HTK)
        edges = 700.0 * (10.0 ** (np.linspace(mel(f_min), mel(f_max_hz), n_mels + 2) / 2595.0) - 1.0)
        bins = np.arange(n_freqs) * (rate / 2) / (n_freqs - 1)  # FFT bin k sits at k * rate / n_fft
        want = np.zeros((n_freqs, n_mels))
        for m in range(n_mels):
            left, centre, right = edges[m:m + 3]
            rising, falling = (bins - left) / (centre - left), (right - bins) / (right - centre)
            want[:, m] = np.clip(np.minimum(rising, falling), 0.0, None)
        got = impl(n_freqs=n_freqs, n_mels=n_mels, sample_rate=rate, f_min=f_min, f_max=f_max)
        close(got, want, f"{n_mels} filters over {n_freqs} bins at {rate} Hz from {f_min} Hz", atol=1e-6)


def check_mel_windows(impl):
    """audio.mel_windows(mel (4 n, 80), n) -> (n, 20, 80): video frame i hears video frames i - 2 .. i + 2, mel
    indices clamped at both ends."""
    for n in (6, 1):
        mel = torch.arange(4 * n, dtype=torch.float32)[:, None] + torch.arange(80) / 100  # row j holds j.xx
        want = torch.zeros(n, 20, 80)
        for i, k in np.ndindex(n, 20):
            want[i, k] = mel[min(max(4 * (i - 2) + k, 0), 4 * n - 1)]
        close(impl(mel, n), want, f"windows of {n} video frames (row j of the mel holds the number j.xx: the "
              "window's first column tells which mel frames it took)", atol=0)


# ----------------------------------------------------------------------------------------------------------------
# metrics.py


def check_frechet(impl):
    """metrics.frechet_distance(mu1, cov1, mu2, cov2) = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)."""
    def distance(*args):
        return float(impl(*(torch.as_tensor(a, dtype=torch.float64) for a in args)))

    # one dimension: (m1 - m2)^2 + (s1 - s2)^2 with s the standard deviations
    close(distance([0.0], [[4.0]], [3.0], [[1.0]]), 9.0 + 1.0, "N(0, 4) vs N(3, 1) in 1D")
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    close(distance(np.ones(3), np.diag(a), np.zeros(3), np.diag(b)), 3 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum(),
          "diagonal covariances")
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    S1, S2 = A @ A.T + 0.1 * np.eye(4), B @ B.T + np.outer(B[0], B[0])
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    # S1 S2 is similar to the PSD matrix S1^1/2 S2 S1^1/2: real eigenvalues >= 0, and tr (S1 S2)^1/2 sums their roots
    cross = np.sqrt(np.clip(np.linalg.eigvals(S1 @ S2).real, 0, None)).sum()
    want = ((mu1 - mu2) ** 2).sum() + np.trace(S1) + np.trace(S2) - 2 * cross
    close(distance(mu1, S1, mu2, S2), want, "full covariances that do not commute", atol=1e-6, rtol=1e-6)
    close(distance(mu1, S1, mu1, S1), 0.0, "a Gaussian against itself", atol=1e-6)
    # fewer samples than dimensions, as FID of a few videos has: singular covariances, whose zero eigenvalues come
    # out of an eigensolver as round-off of either sign
    X, Y = rng.normal(size=(4, 20)), rng.normal(size=(5, 20))
    S1, S2 = np.cov(X, rowvar=False), np.cov(Y, rowvar=False)
    cross = np.sqrt(np.clip(np.linalg.eigvals(S1 @ S2).real, 0, None)).sum()
    want = ((X.mean(0) - Y.mean(0)) ** 2).sum() + np.trace(S1) + np.trace(S2) - 2 * cross
    close(distance(X.mean(0), S1, Y.mean(0), S2), want, "covariances of 4 and 5 samples in 20 dimensions (rank "
          "3 and 4: clamp round-off eigenvalues below 0 before their square roots)", atol=1e-6, rtol=1e-6)
    result = impl(*(torch.as_tensor(a, dtype=torch.float64) for a in (X.mean(0), S1, Y.mean(0), S2)))
    assert isinstance(result, float), f"the distance should be a Python float (.item()), got {type(result).__name__}"
