"""Shared fixtures: tiny checkpoints trained by our own train.py, once per test session."""

import os

# pytest.ini runs the tests on two processes (pytest-xdist, -n auto: pytest_xdist_auto_num_workers below), one
# thread each, set before torch and numpy load, or the two would share 2 cores among 4 threads and slow each other
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"

import wave  # noqa: E402

import av  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# kernels.py's Triton kernels run in Triton's interpreter on the tests' CPU tensors (read when the kernels are
# defined, so before train.py imports them)
os.environ["TRITON_INTERPRET"] = "1"

import train  # noqa: E402


def pytest_xdist_auto_num_workers(config):
    """How many processes `-n auto` starts: two for the suite (on a 2-core CPU, about 30% sooner than one process
    of two threads), none for a -k selection such as an exercise's check, whose few tests end before two processes
    would have started."""
    return 0 if config.option.keyword else 2


@pytest.fixture(scope="session")
def vae_ckpt(tmp_path_factory):
    """A (barely trained) 32x32 VAE; its folder's parent also holds the cache of encoded clip pools."""
    root = tmp_path_factory.mktemp("train")
    train.main(["--stage", "vae", "--out", str(root / "vae"), "--cache", str(root / "cache"), "--videos", "2",
                "--resolution", "32", "--vae-width", "8", "--batch-size", "4", "--steps", "2", "--device", "cpu"])
    return root / "vae" / "ckpt.pt"


def diffusion_args(out, vae_ckpt, *extra):
    """train.py arguments of a tiny diffusion run on 4-frame clips of 2 synthetic videos at 32x32 (the VAE's)."""
    return ["--out", str(out), "--cache", str(vae_ckpt.parent.parent / "cache"), "--vae", str(vae_ckpt),
            "--size", "T", "--frames", "4", "--videos", "2", "--batch-size", "2", "--warmup", "2", "--eval-every", "3",
            "--device", "cpu", *extra]


@pytest.fixture(scope="session")
def diffusion_ckpt(vae_ckpt):
    out = vae_ckpt.parent.parent / "diffusion"
    train.main(diffusion_args(out, vae_ckpt, "--steps", "2"))
    return out / "ckpt.pt"


# WAV writers independent of data.py, for tests of every encoding


def write_pcm(path, x, rate, bits):
    """Reference writer for integer PCM (stdlib wave): x float (T, channels) in [-0.99, 0.99], full scale 2^(bits-1)."""
    if bits == 8:
        raw = np.round(x * 128 + 128).astype(np.uint8).tobytes()
    elif bits == 24:
        q = np.round(x * 2 ** 23).astype("<i4").reshape(-1, 1).view(np.uint8)[:, :3]
        raw = q.tobytes()
    else:
        raw = np.round(x * 2 ** (bits - 1)).astype(f"<i{bits // 8}").tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(x.shape[1])
        w.setsampwidth(bits // 8)
        w.setframerate(rate)
        w.writeframes(raw)


def write_float(path, x, rate, extensible=False):
    """Reference writer for IEEE-float WAV (format 3, or WAVE_FORMAT_EXTENSIBLE wrapping it)."""
    raw = x.astype("<f4").tobytes()
    ch = x.shape[1]
    common = ch.to_bytes(2, "little") + rate.to_bytes(4, "little") + (rate * 4 * ch).to_bytes(4, "little")
    common += (4 * ch).to_bytes(2, "little") + (32).to_bytes(2, "little")
    if extensible:
        guid = (3).to_bytes(2, "little") + bytes.fromhex("000000001000800000aa00389b71")
        fmt = (0xFFFE).to_bytes(2, "little") + common + (22).to_bytes(2, "little") + (32).to_bytes(2, "little")
        fmt += (0).to_bytes(4, "little") + guid
    else:
        fmt = (3).to_bytes(2, "little") + common
    body = b"WAVE" + b"fmt " + len(fmt).to_bytes(4, "little") + fmt + b"data" + len(raw).to_bytes(4, "little") + raw
    path.write_bytes(b"RIFF" + len(body).to_bytes(4, "little") + body)


def probe_video(path):
    """What a player sees of a video file: frame count, fps, codecs, pixel format and frame size."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        return {"frames": v.frames, "fps": float(v.average_rate), "codec": v.codec_context.name,
                "pix_fmt": v.codec_context.pix_fmt, "audio": [a.codec_context.name for a in c.streams.audio],
                "size": (v.codec_context.width, v.codec_context.height)}
