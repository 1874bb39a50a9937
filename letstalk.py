"""LetsTalk: the spatial-temporal diffusion transformer (paper Sec. 3.2-3.3, Fig. 2-3).

Read this file top to bottom next to the paper. The model predicts the noise in a clip of VAE latents:

    noisy latents (B, F, C, h, w) --patchify--> tokens (B*F, P, D), P = (h / 2) * (w / 2)
    every block:  temporal attention   one patch position across the F frames (+ M motion frames)   Sec. 3.2
                  audio fusion          direct: cross-attention to the frame's own audio tokens      Sec. 3.3
                  spatial attention     the P tokens of one frame (+ symbiotic condition tokens)     Sec. 3.2
                  MLP                   spatial attention and MLP modulated by the timestep (adaLN-Zero)
    final layer --unpatchify--> predicted noise (B, F, C, h, w) (or v or x0: diffusion.Diffusion's `prediction`)

Factorizing attention this way costs O(F*P^2 + P*F^2) instead of O((F*P)^2) for joint attention (Eq. 4; with
symbiotic fusion the spatial term is F*(2P)^2, as the portrait's P tokens join each frame's, and with M motion
frames the temporal term is P*(F+M)^2);
`attention="full"` switches to joint attention for comparison (bench.py measures both).

adaLN-Zero (from DiT; Fig. 2 leaves the timestep path out): the LayerNorms of the spatial half have no weights of
their own; a shift, a scale and a gate per channel are computed from the timestep embedding, and the gates start at
zero (as do the output layers of the other branches: `Block`), so every block starts as the identity. Motion frames
are not in the paper: they are the official code's way to continue a long video window by window (model_cat_long.py;
sample.py), the last M latents of the previous window.

Conditions (Sec. 3.3, Fig. 3), each fused by one of three schemes chosen independently:
  symbiotic  the condition's tokens are concatenated with each frame's tokens on the token axis and fused by the
             spatial self-attention and MLP; they are carried and updated from block to block (the paper's choice
             for the portrait);
  direct     cross-attention from the frame's tokens to the condition's tokens in every block (the paper's choice
             for audio);
  siamese    a parallel condition transformer of the same depth; its hidden states at layer l join the keys and
             values of the backbone's spatial attention at layer l (as ReferenceNet does in AnimateAnyone).

The layout follows the official code (zhang-haojie/LetsTalk, models/model_cat.py and model_cat_long.py): its
block order, reference tokens sharing the video's patch embedding, motion frames prepended in temporal attention
only. `python letstalk.py --size B` prints parameter counts and GFLOPs of every fusion choice.
"""

import argparse
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from torch.utils.flop_counter import FlopCounterMode

# depth (blocks), width (D), heads. B and L are the paper's LetsTalk-B / -L: the official code builds them on VDT
# (Video Diffusion Transformer) sizes B/2 and L/2, "/2" being the 2x2 latent patches.
SIZES = {
    "T": dict(depth=6, width=128, heads=4),  # tiny: the CPU demo and the tests
    "S": dict(depth=12, width=384, heads=6),
    "B": dict(depth=12, width=768, heads=12),
    "L": dict(depth=24, width=1024, heads=16),
}
FUSIONS = ("symbiotic", "siamese", "direct")


@dataclass
class LetsTalkConfig:
    """Shape of a LetsTalk model: `depth` blocks of width D with `heads` heads and an MLP of mlp_ratio * D; latents
    of latent_channels x latent_size x latent_size cut into patch x patch patches; F `frames` per window and M
    `motion` frames before it; per frame a mel_window x n_mels mel window, encoded to K = audio_tokens tokens by
    audio_layers transformer layers; the fusion scheme of the portrait and of the audio (one of FUSIONS); and
    "factorized" or "full" attention."""

    depth: int  # SIZES names the sizes (config_for)
    width: int
    heads: int
    mlp_ratio: float = 4.0
    latent_channels: int = 4
    latent_size: int = 16  # h = w of the VAE latents (32 for 256x256 frames at factor 8, 16 for 64x64 at 4)
    patch: int = 2
    frames: int = 16  # F, frames generated per window
    motion: int = 2  # M, motion frames from the previous window, as the official long model (0: the model takes none)
    mel_window: int = 20  # mel frames seen by each video frame: its own 4 and two frames' worth either side
    n_mels: int = 80  # (both audio.py's: train.py passes its MEL_WINDOW and N_MELS)
    audio_tokens: int = 5  # K audio tokens per frame, one per video frame of that window (the official code: 32
    # wav2vec tokens of width 768)
    audio_layers: int = 2  # transformer layers of the audio encoder
    ref_fusion: str = "symbiotic"  # the paper's choice for the portrait
    audio_fusion: str = "direct"  # the paper's choice for audio
    attention: str = "factorized"  # or "full": joint attention over all F * P tokens (Eq. 4's baseline)

    def __post_init__(self):
        """Refuse a shape no model can have (a typo, or the config of a damaged or foreign checkpoint)."""
        counts = (self.depth, self.width, self.heads, self.latent_channels, self.latent_size, self.patch, self.frames,
                  self.mel_window, self.n_mels, self.audio_tokens, self.audio_layers)
        if (min(counts) < 1 or self.motion < 0 or self.width % self.heads or self.width % 4  # 4: sincos_2d's
                or self.latent_size % self.patch):
            raise ValueError(f"no model has this shape: {self}")


def config_for(size, **overrides):
    """The LetsTalkConfig of a named size ('T', 'S', 'B', 'L'), with any field overridden."""
    return LetsTalkConfig(**{**SIZES[size], **overrides})


# ----------------------------------------------------------------------------------------------------------------
# Embeddings


def sincos_1d(dim, positions):
    """Fixed sin-cos embedding of positions (N,) -> (N, dim), as in the Transformer and MAE."""
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim // 2))
    angles = positions.double()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(dim, size):
    """Fixed 2D sin-cos embedding of a size x size grid -> (size * size, dim): half the channels encode the row,
    half the column (row-major order, the order of the patch tokens)."""
    pos = torch.arange(size)
    rows, cols = sincos_1d(dim // 2, pos), sincos_1d(dim // 2, pos)
    return torch.cat([repeat(rows, "h d -> (h w) d", w=size), repeat(cols, "w d -> (h w) d", h=size)], dim=1)


class TimestepEmbedder(nn.Module):
    """Diffusion timestep t (B,) -> (B, D): sinusoidal features of t, then an MLP (as DiT)."""

    def __init__(self, width, frequencies=256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        """t (B,) -> (B, D), in the dtype of the MLP's weights."""
        return self.mlp(sincos_1d(self.frequencies, t).to(self.mlp[0].weight.dtype))


# ----------------------------------------------------------------------------------------------------------------
# Layers


class Attention(nn.Module):
    """Multi-head scaled dot-product attention, softmax(Q K^T / sqrt(d)) V (Eq. 5).

    Queries come from x (N, Lq, D); keys and values from `context` (N, Lk, D), which defaults to x. So one module
    serves self-attention, cross-attention (direct fusion) and self-attention with extra keys (siamese fusion).
    `attend` computes Eq. 5 on the (N, H, L, d) heads: SDPA, or a kernel with its signature (set_temporal_kernel).
    """

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.proj = nn.Linear(width, width), nn.Linear(width, 2 * width), nn.Linear(width, width)
        self.attend = F.scaled_dot_product_attention

    def forward(self, x, context=None):
        """x (N, Lq, D), context (N, Lk, D) or None (self-attention) -> (N, Lq, D)."""
        context = x if context is None else context
        q = rearrange(self.q(x), "n l (h d) -> n h l d", h=self.heads)
        k, v = rearrange(self.kv(context), "n l (two h d) -> two n h l d", two=2, h=self.heads)
        out = self.attend(q, k, v)
        return self.proj(rearrange(out, "n h l d -> n l (h d)"))


def mlp(width, ratio):
    """The transformer MLP: Linear to width * ratio, tanh-GELU, Linear back. (..., D) -> (..., D)."""
    return nn.Sequential(nn.Linear(width, int(width * ratio)), nn.GELU(approximate="tanh"),
                         nn.Linear(int(width * ratio), width))


def modulation(ada, c, chunks, frames=1):
    """adaLN parameters from the timestep embedding c (B, D): ada(c) is (B, chunks * D); it is repeated for each of
    the `frames` frames of a clip and split into `chunks` tensors (B * frames, 1, D) that broadcast over tokens."""
    return repeat(ada(c), "b d -> (b f) 1 d", f=frames).chunk(chunks, dim=-1)


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, with shift and scale predicted from the timestep."""
    return x * (1 + scale) + shift


def norm(width):
    """LayerNorm without its own affine parameters: adaLN supplies them where it modulates (the spatial half); the
    direct-fusion and siamese-guide norms stay unmodulated, as in the official code and DiT."""
    return nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)


class ConditionBlock(nn.Module):
    """Self-attention + MLP over condition tokens (N, L, D), both modulated by the timestep with adaLN-Zero.
    The building block of the siamese towers (the backbone's spatial half, without temporal attention or fusion)."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.attn, self.norm2 = norm(cfg.width), Attention(cfg.width, cfg.heads), norm(cfg.width)
        self.mlp = mlp(cfg.width, cfg.mlp_ratio)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 6 * cfg.width))

    def forward(self, h, c):
        """h (N, L, D) condition tokens, c (N, D) timestep embedding -> (N, L, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation(self.ada, c, 6)
        h = h + gate1 * self.attn(modulate(self.norm1(h), shift1, scale1))
        return h + gate2 * self.mlp(modulate(self.norm2(h), shift2, scale2))


class SiameseTower(nn.Module):
    """Siamese fusion (Fig. 3b): a transformer as deep as the backbone processes the condition tokens; its
    hidden state after layer l guides backbone layer l. (N, L, D) -> depth x (N, L, D)."""

    def __init__(self, cfg):
        super().__init__()
        self.blocks = nn.ModuleList(ConditionBlock(cfg) for _ in range(cfg.depth))

    def forward(self, h, c):
        """h (N, L, D), c (N, D) timestep embedding -> a list of depth hidden states (N, L, D), one per block."""
        states = []
        for block in self.blocks:
            h = block(h, c)
            states.append(h)
        return states


class AudioEncoder(nn.Module):
    """Per-frame mel windows (B, F, 20, 80) -> K audio tokens per frame (B, F, K, D).

    Two 1D convolutions over the window's 20 mel frames (the second, stride 2, halving them to 10), a sin-cos
    position, a few transformer layers, then average pooling to K tokens. The official code instead takes 32 tokens
    of width 768 from a pretrained wav2vec; we learn from the mel spectrogram because no pretrained speech model can
    be downloaded here, and a tiny model on a synthetic world does not need one.
    """

    def __init__(self, cfg):
        super().__init__()
        D = cfg.width
        self.conv = nn.Sequential(nn.Conv1d(cfg.n_mels, D, 3, padding=1), nn.GELU(),
                                  nn.Conv1d(D, D, 3, stride=2, padding=1), nn.GELU())
        self.register_buffer("pos", sincos_1d(D, torch.arange((cfg.mel_window + 1) // 2)), persistent=False)
        self.layers = nn.ModuleList(nn.ModuleList([nn.LayerNorm(D), Attention(D, cfg.heads), nn.LayerNorm(D),
                                                   mlp(D, cfg.mlp_ratio)]) for _ in range(cfg.audio_layers))
        self.tokens = cfg.audio_tokens

    def forward(self, mel):
        """mel (B, F, mel_window, n_mels) -> audio tokens (B, F, K, D)."""
        B = mel.shape[0]
        h = self.conv(rearrange(mel, "b f t m -> (b f) m t"))  # each frame's window on its own
        h = rearrange(h, "n d t -> n t d") + self.pos
        for norm1, attn, norm2, ff in self.layers:
            h = h + attn(norm1(h))
            h = h + ff(norm2(h))
        h = F.adaptive_avg_pool1d(rearrange(h, "n t d -> n d t"), self.tokens)
        return rearrange(h, "(b f) d k -> b f k d", b=B)


# ----------------------------------------------------------------------------------------------------------------
# The block (Fig. 2b)


class Block(nn.Module):
    """One LetsTalk block: temporal attention -> direct fusion -> spatial attention -> MLP.

    Works on frame tokens x (B*F, P, D). Every residual branch ends in a zero-initialised layer (adaLN-Zero gates,
    the temporal and cross-attention output projections), so a new block is the identity. (The official code
    zero-initialises only the adaLN modulation layers and the final layer; we extend it so the identity holds for
    the whole block.)
    """

    def __init__(self, cfg):
        super().__init__()
        D = cfg.width
        self.full = cfg.attention == "full"
        if not self.full:  # the temporal half; with full attention the spatial attention spans all frames
            # an affine LayerNorm, not modulated by the timestep, and an output layer after the attention's own
            # projection: TimeSformer's temporal branch, which VDT and the official code keep
            self.temporal_norm, self.temporal_attn = nn.LayerNorm(D), Attention(D, cfg.heads)
            self.temporal_fc = nn.Linear(D, D)
        direct = [name for name, scheme in (("ref", cfg.ref_fusion), ("audio", cfg.audio_fusion)) if scheme == "direct"]
        self.cross_norm = nn.ModuleDict({name: norm(D) for name in direct})
        self.cross_attn = nn.ModuleDict({name: Attention(D, cfg.heads) for name in direct})
        self.norm1, self.attn, self.norm2 = norm(D), Attention(D, cfg.heads), norm(D)
        self.mlp = mlp(D, cfg.mlp_ratio)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def temporal(self, x, motion, B):
        """Temporal self-attention (Sec. 3.2): each patch position attends over the frames, motion frames first.
        x (B*F, P, D), motion (B, M, P, D) or None -> the same two, updated."""
        M = 0 if motion is None else motion.shape[1]
        seq = rearrange(x, "(b f) p d -> b f p d", b=B)
        if M:
            seq = torch.cat([motion, seq], dim=1)
        seq = rearrange(seq, "b f p d -> (b p) f d")  # B*P sequences of F (+ M) frames: Eq. 4's P*F^2 term
        seq = seq + self.temporal_fc(self.temporal_attn(self.temporal_norm(seq)))
        seq = rearrange(seq, "(b p) f d -> b f p d", b=B)
        return rearrange(seq[:, M:], "b f p d -> (b f) p d"), (seq[:, :M] if M else None)

    def direct(self, x, contexts):
        """Direct fusion (Fig. 3a): cross-attention from each frame's tokens to its condition tokens.
        x (B*F, P, D), contexts {name: (B*F, L, D)} -> (B*F, P, D)."""
        for name, context in contexts.items():
            x = x + self.cross_attn[name](self.cross_norm[name](x), context)
        return x

    def spatial(self, x, c, symbiotic=None, guides=None):
        """Spatial self-attention and MLP over one frame's tokens (Sec. 3.2), modulated by the timestep.

        x (B*F, P, D); c (B, D) timestep embedding; symbiotic (B*F, S, D) condition tokens concatenated on the
        token axis (symbiotic fusion, Fig. 3c); guides (B*F, G, D) siamese hidden states that join the keys and
        values only. Returns x and symbiotic, updated. With attention="full" the attention spans all frames.
        """
        B, P = c.shape[0], x.shape[1]
        F_ = x.shape[0] // B
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation(self.ada, c, 6, frames=F_)
        h = x if symbiotic is None else torch.cat([x, symbiotic], dim=1)
        q = modulate(self.norm1(h), shift1, scale1)
        # guides are normalised but not modulated here: their own tower's blocks modulated them by the timestep
        kv = q if guides is None else torch.cat([q, self.norm1(guides)], dim=1)
        if self.full:  # joint attention over every token of the clip: O((F*P)^2)
            out = self.attn(rearrange(q, "(b f) n d -> b (f n) d", b=B), rearrange(kv, "(b f) n d -> b (f n) d", b=B))
            out = rearrange(out, "b (f n) d -> (b f) n d", f=F_)
        else:
            out = self.attn(q, kv)
        h = h + gate1 * out
        h = h + gate2 * self.mlp(modulate(self.norm2(h), shift2, scale2))
        return h[:, :P], (None if symbiotic is None else h[:, P:])

    def forward(self, x, c, motion=None, symbiotic=None, contexts=None, guides=None):
        """x (B*F, P, D), c (B, D), motion (B, M, P, D), symbiotic (B*F, S, D), contexts {name: (B*F, L, D)},
        guides (B*F, G, D) (each optional, see the methods above) -> (x, motion, symbiotic), updated."""
        if not self.full:
            x, motion = self.temporal(x, motion, c.shape[0])
        x = self.direct(x, contexts or {})
        x, symbiotic = self.spatial(x, c, symbiotic, guides)
        return x, motion, symbiotic


class FinalLayer(nn.Module):
    """Tokens (B*F, P, D) -> patches (B*F, P, p*p*C), through an adaLN-modulated LayerNorm (zero-initialised)."""

    def __init__(self, cfg):
        super().__init__()
        self.norm = norm(cfg.width)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))
        self.linear = nn.Linear(cfg.width, cfg.patch ** 2 * cfg.latent_channels)

    def forward(self, x, c):
        """x (B*F, P, D), c (B, D) -> (B*F, P, p*p*C)."""
        shift, scale = modulation(self.ada, c, 2, frames=x.shape[0] // c.shape[0])
        return self.linear(modulate(self.norm(x), shift, scale))


# ----------------------------------------------------------------------------------------------------------------
# The model


class LetsTalk(nn.Module):
    """The LetsTalk denoiser: predicts the noise (or the chosen target) of a noisy latent clip.

    forward(x, t, ref, mel, motion=None, drop_ref=None, drop_audio=None, drop_motion=None):
      x      (B, F, C, h, w)  noisy latents of the clip
      t      (B,)             diffusion timesteps
      ref    (B, C, h, w)     latent of the reference portrait
      mel    (B, F, 20, 80)   per-frame mel windows
      motion (B, M, C, h, w)  latents of the M frames before the clip (required when cfg.motion > 0)
      drop_* (B,) bool        replace that condition by its learned null embedding (classifier-free guidance;
                              a dropped motion means "no history": the clip drawn from the portrait alone)
    returns (B, F, C, h, w).
    """

    def __init__(self, cfg: LetsTalkConfig):
        super().__init__()
        if cfg.ref_fusion not in FUSIONS or cfg.audio_fusion not in FUSIONS:
            raise ValueError(f"fusion schemes are {FUSIONS}, got {cfg.ref_fusion!r} and {cfg.audio_fusion!r}")
        if cfg.attention not in ("factorized", "full") or (cfg.attention == "full" and cfg.motion):
            raise ValueError("attention is 'factorized' or 'full' (full attention takes no motion frames)")
        self.cfg = cfg
        D, p, C = cfg.width, cfg.patch, cfg.latent_channels
        self.patches = (cfg.latent_size // p) ** 2  # P
        self.embed = nn.Linear(p * p * C, D)  # patchify: one linear map per 2x2xC patch (a strided conv)
        self.register_buffer("pos_space", sincos_2d(D, cfg.latent_size // p), persistent=False)
        # temporal positions: motion frames 0..M-1, then the clip's frames, whether motion is given or not
        self.register_buffer("pos_time", sincos_1d(D, torch.arange(cfg.motion + cfg.frames)), persistent=False)
        self.t_embed = TimestepEmbedder(D)
        self.audio_encoder = AudioEncoder(cfg)
        # learned "no condition" tokens for classifier-free guidance, and for "no previous frames"
        self.null_ref = nn.Parameter(torch.randn(self.patches, D) * 0.02)
        self.null_audio = nn.Parameter(torch.randn(cfg.audio_tokens, D) * 0.02)
        self.null_motion = nn.Parameter(torch.randn(self.patches, D) * 0.02) if cfg.motion else None
        self.ref_tower = SiameseTower(cfg) if cfg.ref_fusion == "siamese" else None
        self.audio_tower = SiameseTower(cfg) if cfg.audio_fusion == "siamese" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg)
        self.initialize()

    def set_temporal_kernel(self, attend):
        """Compute every block's temporal attention with `attend`, a function with the signature of
        F.scaled_dot_product_attention: kernels.temporal_attention on a GPU, whose sequences of F + M frames are
        far shorter than SDPA's kernels are built for. The weights and the result stay the same."""
        for block in self.blocks:
            block.temporal_attn.attend = attend

    def initialize(self):
        """Xavier-uniform linear weights and zero biases, N(0, 0.02) for the timestep MLP, and zeros for every
        block's adaLN modulation (its gates start at 0: adaLN-Zero), the cross-attention and temporal output layers
        and the final layer: every block starts as the identity and a new model predicts zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        zero = [self.final.linear, self.final.ada[-1]]  # adaLN-Zero: every residual branch starts at zero
        for block in [*self.blocks, *(self.ref_tower.blocks if self.ref_tower else []),
                      *(self.audio_tower.blocks if self.audio_tower else [])]:
            zero.append(block.ada[-1])
        for block in self.blocks:
            zero += [attn.proj for attn in block.cross_attn.values()]
            zero += [] if block.full else [block.temporal_fc]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def patchify(self, latents):
        """(N, C, h, w) -> tokens (N, P, D): 2x2 patches, a linear map, plus the 2D position embedding."""
        p = self.cfg.patch
        return self.embed(rearrange(latents, "n c (h p) (w q) -> n (h w) (p q c)", p=p, q=p)) + self.pos_space

    def unpatchify(self, tokens, B):
        """(B*F, P, p*p*C) -> (B, F, C, h, w)."""
        p, s = self.cfg.patch, self.cfg.latent_size // self.cfg.patch
        return rearrange(tokens, "(b f) (h w) (p q c) -> b f c (h p) (w q)", b=B, h=s, p=p, q=p)

    @staticmethod
    def _drop(tokens, null, mask):
        """Replace the tokens (B, ..., L, D) of the samples where mask (B,) is True by the null tokens (L, D)."""
        if mask is None:
            return tokens
        return torch.where(mask.view(-1, *[1] * (tokens.dim() - 1)), null.to(tokens.dtype), tokens)

    def forward(self, x, t, ref, mel, motion=None, drop_ref=None, drop_audio=None, drop_motion=None):
        """x (B, F, C, h, w), t (B,), ref (B, C, h, w), mel (B, F, 20, 80), motion (B, M, C, h, w), drop_* (B,)
        -> the prediction (B, F, C, h, w) (the noise, or v or x0 if trained so); see the class docstring."""
        # The paper's model (Fig. 2, the defaults): the portrait's patch tokens join every frame's tokens in spatial
        # attention (symbiotic), each frame cross-attends to its own K audio tokens (direct), and the M motion
        # frames join temporal attention only. The other fusion schemes swap in below, one condition at a time.
        cfg = self.cfg
        B, F_ = x.shape[:2]
        if cfg.motion and (motion is None or motion.shape[1] != cfg.motion):
            raise ValueError(f"this model takes {cfg.motion} motion frames (B, {cfg.motion}, C, h, w), got "
                             f"{None if motion is None else tuple(motion.shape)}")
        c = self.t_embed(t)

        # the clip: patch tokens + 2D position + the frame's temporal position
        h = rearrange(self.patchify(rearrange(x, "b f c h w -> (b f) c h w")), "(b f) p d -> b f p d", b=B)
        h = rearrange(h + self.pos_time[cfg.motion:cfg.motion + F_, None], "b f p d -> (b f) p d")
        if cfg.motion:  # motion frames: the same embedding, their own temporal positions; null = "no history"
            m = rearrange(self.patchify(rearrange(motion, "b m c h w -> (b m) c h w")), "(b m) p d -> b m p d", b=B)
            m = self._drop(m, self.null_motion, drop_motion) + self.pos_time[:cfg.motion, None]
        else:
            m = None

        # the conditions: reference tokens share the video's patch embedding, so ref token p lines up with
        # video token p (official code); audio tokens come from the audio encoder, K per frame
        ref_tokens = self._drop(self.patchify(ref), self.null_ref, drop_ref)  # (B, P, D)
        audio_tokens = self._drop(self.audio_encoder(mel), self.null_audio, drop_audio)  # (B, F, K, D)
        per_frame = {"audio": rearrange(audio_tokens, "b f k d -> (b f) k d")}  # frame f: its own audio only
        if cfg.ref_fusion != "siamese":  # (the siamese tower repeats its own hidden states instead)
            per_frame["ref"] = repeat(ref_tokens, "b p d -> (b f) p d", f=F_)  # Fig. 2: repeated along frames
        schemes = {"ref": cfg.ref_fusion, "audio": cfg.audio_fusion}
        symbiotic = [per_frame[n] for n in ("ref", "audio") if schemes[n] == "symbiotic"]
        symbiotic = torch.cat(symbiotic, dim=1) if symbiotic else None
        contexts = {n: per_frame[n] for n in ("ref", "audio") if schemes[n] == "direct"}
        towers = []
        if self.ref_tower is not None:
            towers.append([repeat(s, "b p d -> (b f) p d", f=F_) for s in self.ref_tower(ref_tokens, c)])
        if self.audio_tower is not None:
            towers.append(self.audio_tower(per_frame["audio"], repeat(c, "b d -> (b f) d", f=F_)))

        for i, block in enumerate(self.blocks):
            guides = torch.cat([tower[i] for tower in towers], dim=1) if towers else None
            h, m, symbiotic = block(h, c, m, symbiotic, contexts, guides)
        return self.unpatchify(self.final(h, c), B)  # symbiotic and motion tokens are dropped at the output


# ----------------------------------------------------------------------------------------------------------------
# Parameter and FLOP table


def count_parameters(model):
    """Parameters per part: backbone (embeddings, blocks without fusion layers, final layer, the null motion
    frame), audio encoder, and fusion (cross-attention layers, siamese towers, the null portrait and audio)."""
    parts = {"backbone": 0, "audio encoder": 0, "fusion": 0}
    for name, param in model.named_parameters():
        if name.startswith("audio_encoder"):
            parts["audio encoder"] += param.numel()
        elif "cross_" in name or "tower" in name or name in ("null_ref", "null_audio"):
            parts["fusion"] += param.numel()
        else:
            parts["backbone"] += param.numel()
    return parts


def forward_flops(module, *inputs):
    """FLOPs of module(*inputs), counted by torch's FlopCounterMode on the meta device (shapes only: nothing is
    computed or allocated). There attention decomposes into matrix products the counter sees; on a CPU they
    would hide inside one fused kernel it does not count."""
    counter = FlopCounterMode(display=False)
    with torch.device("meta"), counter:
        module(*inputs)
    return counter.get_total_flops()


def forward_gflops(cfg, batch=1):
    """GFLOPs of one forward pass of LetsTalk(cfg) on `batch` clips of cfg.frames frames."""
    with torch.device("meta"):
        model = LetsTalk(cfg)
        s, C = cfg.latent_size, cfg.latent_channels
        inputs = (torch.randn(batch, cfg.frames, C, s, s), torch.zeros(batch), torch.randn(batch, C, s, s),
                  torch.randn(batch, cfg.frames, cfg.mel_window, cfg.n_mels),
                  torch.randn(batch, cfg.motion, C, s, s) if cfg.motion else None)
    return forward_flops(model, *inputs) / 1e9


def fail(message):
    """A usage error: one line on stderr, exit status 2."""
    print(f"error: {message} (`letstalk.py --help` lists the options)", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    """`python letstalk.py`: print parameters and GFLOPs of every fusion choice at one size (argv=None: sys.argv)."""
    parser = argparse.ArgumentParser(prog="letstalk.py", description="Parameters and forward GFLOPs of a LetsTalk "
                                     "model for one clip (by default the paper's: 16 frames of 256x256, 32x32x4 "
                                     "latents), for every fusion choice.")
    parser.add_argument("--size", choices=list(SIZES), default="B", help="model size (default: B)")
    parser.add_argument("--frames", type=int, default=16, help="F, frames per clip (default: 16)")
    parser.add_argument("--latent-size", type=int, default=32, help="h = w of the latents, even (default: 32, for "
                        "256x256 frames at VAE factor 8)")
    parser.error = fail  # one line and exit 2, as every script of the project (this file imports none of them)
    args = parser.parse_args(argv)
    if not 1 <= args.frames <= 256:
        fail(f"--frames {args.frames}: must be from 1 to 256")
    if not 2 <= args.latent_size <= 256 or args.latent_size % 2:
        fail(f"--latent-size {args.latent_size}: must be an even number from 2 to 256 (the model cuts 2x2 patches)")
    try:
        print(f"LetsTalk-{args.size}: {SIZES[args.size]}, {args.frames} frames of {args.latent_size}x"
              f"{args.latent_size}x4 latents, 2 motion frames")
        print(f"{'ref fusion':>10} {'audio fusion':>12} | {'backbone':>9} {'audio enc':>9} {'fusion':>9} "
              f"{'total':>9} | {'GFLOPs':>8}")
        for ref_fusion in FUSIONS:
            for audio_fusion in FUSIONS:
                print(fusion_row(args.size, args.frames, args.latent_size, ref_fusion, audio_fusion))
        sys.stdout.flush()  # a closed output fails here, inside, not in Python's own flush at exit
    except KeyboardInterrupt:  # Ctrl-C: one line and the shells' status, as every script of the project
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `| head` closed the output: stop quietly, as killed by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)


def fusion_row(size, frames, latent_size, ref_fusion, audio_fusion):
    """One line of `python letstalk.py`'s table: parameters per part (counted on the meta device, no memory) and
    forward GFLOPs of one clip."""
    cfg = config_for(size, frames=frames, latent_size=latent_size, ref_fusion=ref_fusion, audio_fusion=audio_fusion)
    with torch.device("meta"):
        parts = count_parameters(LetsTalk(cfg))
    m = {k: f"{v / 1e6:.1f}M" for k, v in parts.items()}
    return (f"{ref_fusion:>10} {audio_fusion:>12} | {m['backbone']:>9} {m['audio encoder']:>9} {m['fusion']:>9} "
            f"{sum(parts.values()) / 1e6:>8.1f}M | {forward_gflops(cfg):>8.1f}")


if __name__ == "__main__":
    main()
