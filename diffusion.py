"""The diffusion process (paper Sec. 3.1, Eq. 1-3): noise schedule, forward process, training target, samplers.

LetsTalk diffuses VAE latents z_0. The forward process adds Gaussian noise in T = 1000 steps,

    q(z_t | z_0) = N(sqrt(alpha_bar_t) z_0, (1 - alpha_bar_t) I)                                      (Eq. 1-2)

and the transformer learns to undo it by predicting the noise, L = || eps - eps_theta(z_t, t, c) ||^2 (Eq. 3),
or equivalently z_0 or v (`Diffusion`'s `prediction`; the CPU demo's recipes use them).
Sampling runs the reverse process from pure noise with DDIM or DPM-Solver++(2M), its second-order multistep
refinement at the same cost per step, or DDPM's ancestral sampler. Nothing here knows about faces or transformers:
the model enters only as a function `denoise(x_t, t) -> (x0, eps)`, so training (train.py), sampling (sample.py)
and evaluation share this one file.

The official code follows DiT and also learns the variances (8 output channels, a hybrid loss) and samples with
250 DDPM steps; we keep the variances fixed (the paper's Eq. 3 is all it needs) and sample with DDIM or
DPM-Solver++ in 8-50 steps (DDPM, kept for reference, takes all 1000).
"""

import math

import torch
from tqdm import tqdm

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v", "x0")
SAMPLERS = ("ddim", "dpm++", "ddpm")


STEPS = 1000  # T, the number of diffusion steps: DDPM's, DiT's and the official code's


class Diffusion:
    """DDPM with fixed variances: the noise schedule, the forward process q(x_t | x_0), the training target and the
    reverse-process samplers (DDPM, DDIM and DPM-Solver++(2M)).

    `prediction` says what the network outputs: eps, the noise (Eq. 3, the paper's choice); x0, the clean latents
    (sharp at high noise, but errors scale with the signal); or v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho:
    well scaled at every noise level). It belongs to the process a model was trained with, so checkpoints store
    `config()` and sampling rebuilds the same Diffusion from it.
    """

    def __init__(self, steps=STEPS, schedule="linear", prediction="eps"):
        if not 1 <= steps <= 100_000:
            raise ValueError(f"steps is from 1 to 100000, got {steps}")
        if schedule == "linear":  # DDPM's schedule: beta from 1e-4 to 0.02
            betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
        elif schedule == "cosine":  # Nichol & Dhariwal: alpha_bar follows a squared cosine, gentler at the ends
            s = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
            alpha_bar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"schedule is one of {SCHEDULES}, got {schedule!r}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction is one of {PREDICTIONS}, got {prediction!r}")
        self.steps, self.schedule, self.prediction = steps, schedule, prediction
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()  # alpha_bar_t, decreasing from ~1 to ~0

    def config(self):
        """What a checkpoint stores to rebuild this process: Diffusion(**config())."""
        return {"steps": self.steps, "schedule": self.schedule, "prediction": self.prediction}

    def _ab(self, t, x):
        """alpha_bar_t for a batch of timesteps t (B,), shaped to broadcast against x (B, ...)."""
        return self.alphas_cumprod.to(x.device)[t].view(-1, *[1] * (x.dim() - 1))

    def q_sample(self, x0, t, noise):
        """Eq. 2: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, a sample of q(x_t | x_0) (Eq. 1)."""
        ab = self._ab(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def target(self, x0, noise, t):
        """What the network learns to output at x_t = q_sample(x0, t, noise): eps, x0 or v (see the class)."""
        ab = self._ab(t, x0)
        return {"eps": noise, "x0": x0, "v": ab.sqrt() * noise - (1 - ab).sqrt() * x0}[self.prediction]

    def split(self, x_t, t, out):
        """From the network output at x_t, the implied (x0, eps), whatever the network predicts."""
        if self.prediction == "eps":
            return self.x0_from_eps(x_t, t, out), out
        ab = self._ab(t, x_t)
        if self.prediction == "x0":
            return out, (x_t - ab.sqrt() * out) / (1 - ab).sqrt()
        x0 = ab.sqrt() * x_t - (1 - ab).sqrt() * out
        return x0, (1 - ab).sqrt() * x_t + ab.sqrt() * out

    def x0_from_eps(self, x_t, t, eps):
        """Eq. 2 solved for x_0: (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        ab = self._ab(t, x_t)
        return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()

    def loss_weight(self, t, min_snr_gamma=None):
        """Per-sample loss weight (B,). Without min-SNR all weights are 1 (Eq. 3). Min-SNR-gamma (Hang et al.)
        caps how much the nearly clean timesteps count, expressed for each target: it speeds up training."""
        if min_snr_gamma is None:
            return torch.ones(len(t), device=t.device)
        ab = self.alphas_cumprod.to(t.device)[t]
        snr = ab / (1 - ab)
        capped = snr.clamp(max=min_snr_gamma)
        return {"eps": capped / snr, "x0": capped, "v": capped / (snr + 1)}[self.prediction]

    @torch.no_grad()
    def sample(self, denoise, shape, steps, sampler, generator=None, device="cpu", progress=False):
        """Draw x_0 from noise: denoise(x_t, t) -> (x0, eps) is the model (with guidance), shape the latents'.

        One denoise call per step, on `steps` evenly spaced timesteps (at most self.steps, which are all there are):
        "ddim" is deterministic DDIM (Song et al.);
        "dpm++" is DPM-Solver++(2M) (Lu et al., 2022), which also uses the previous step's x0 for a second-order
        step; "ddpm" is DDPM's ancestral sampler with the posterior variance, on all self.steps timesteps.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler is one of {SAMPLERS}, got {sampler!r}")
        steps = self.steps if sampler == "ddpm" else min(steps, self.steps)
        x = torch.randn(shape, generator=generator, device="cpu").to(device)
        times = torch.linspace(self.steps - 1, 0, steps).round().long().tolist()
        last = None  # (x0, t) of the previous step, for DPM-Solver++'s second order
        for i, t in enumerate(tqdm(times, desc="denoise", leave=False, disable=not progress)):
            x0, eps = denoise(x, torch.full((shape[0],), t, device=device, dtype=torch.long))
            t_prev = times[i + 1] if i + 1 < len(times) else -1
            if sampler == "dpm++" and last is not None and i + 2 < len(times):
                x = self.dpm_step(x, x0, t, t_prev, *last)
            else:  # DDIM; also DPM-Solver++'s first step (no earlier x0 to extrapolate from) and its last two (to
                # t = 0, then to the clean end), the longest in log-SNR, where an x0 extrapolated across the shorter
                # step before overshoots.
                # The noise is ddpm's (eta 1). DDIM's eta 0 ignores it but it is drawn all the same, so that a
                # generator shared by a long video's windows (sample.windows) reaches each window in the state it
                # had when the README's figures were measured
                noise = torch.randn(shape, generator=generator, device="cpu").to(device)
                x = self.ddim_step(x0, eps, t, t_prev, 1.0 if sampler == "ddpm" else 0.0, noise)
            last = (x0, t)
        return x

    def log_snr(self, t):
        """lambda_t = log(alpha_t / sigma_t), half the log signal-to-noise ratio at timestep t: the time variable
        of DPM-Solver, in which the probability-flow ODE is exactly solvable up to the model's x0."""
        ab = self.alphas_cumprod[t].item()
        return 0.5 * math.log(ab / (1 - ab))

    def dpm_step(self, x, x0, t, t_prev, x0_last, t_last):
        """One DPM-Solver++(2M) step from timestep t to t_prev, given x_t, the model's x0 at t and x0_last at the
        timestep t_last before t (Lu et al. 2022, Alg. 2). With h = lambda_prev - lambda_t, r = (lambda_t -
        lambda_last) / h and D = (1 + 1 / 2r) x0 - (1 / 2r) x0_last (x0 extrapolated to the middle of the step):
        x_prev = (sigma_prev / sigma_t) x_t + alpha_prev (1 - e^-h) D. With D = x0 this is the DDIM step."""
        ab, ab_prev = self.alphas_cumprod[t].item(), self.alphas_cumprod[t_prev].item()
        h = self.log_snr(t_prev) - self.log_snr(t)
        r = (self.log_snr(t) - self.log_snr(t_last)) / h
        d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_last
        return math.sqrt((1 - ab_prev) / (1 - ab)) * x + math.sqrt(ab_prev) * (1 - math.exp(-h)) * d

    def ddim_step(self, x0, eps, t, t_prev, eta, noise):
        """One reverse step from timestep t to t_prev, Python ints (-1: the clean end, alpha_bar = 1; 0 is the
        last real timestep), given the model's (x0, eps) at x_t, all (B, ...):
        x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma noise,
        sigma = eta sqrt((1 - ab_prev) / (1 - ab) (1 - ab / ab_prev))."""
        ab = self.alphas_cumprod[t].item()
        ab_prev = self.alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        return math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps + sigma * noise
