"""Shared fixtures: tiny checkpoints trained by our own train.py, once per test session."""

import pytest

import train


@pytest.fixture(scope="session")
def vae_ckpt(tmp_path_factory):
    """A (barely trained) 32x32 VAE; its folder's parent also holds the cache of encoded clip pools."""
    root = tmp_path_factory.mktemp("train")
    train.main(["--stage", "vae", "--out", str(root / "vae"), "--videos", "2", "--resolution", "32", "--width", "8",
                "--batch-size", "4", "--steps", "2", "--device", "cpu"])
    return root / "vae" / "ckpt.pt"


def diffusion_args(out, vae_ckpt, *extra):
    """train.py arguments of a tiny diffusion run on 32x32 synthetic clips of 4 frames."""
    return ["--out", str(out), "--cache", str(vae_ckpt.parent.parent / "cache"), "--vae", str(vae_ckpt),
            "--size", "T", "--frames", "4", "--clips", "8", "--batch-size", "2", "--warmup", "2", "--eval-every", "3",
            "--device", "cpu", *extra]


@pytest.fixture(scope="session")
def diffusion_ckpt(vae_ckpt):
    out = vae_ckpt.parent.parent / "diffusion"
    train.main(diffusion_args(out, vae_ckpt, "--steps", "2"))
    return out / "ckpt.pt"
