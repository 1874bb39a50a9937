"""The plumbing every script shares, so that each of the other files is about one idea.

- user errors: `UserError` is a problem the user can fix (a missing file, a bad flag, no GPU); `fail` is the one way
  a script reports one: `error: ...` on stderr, one line, exit status 2, no traceback;
- the command line: `Parser` (usage errors go through `fail` too), `bounded` numbers, `add_device`;
- work on many videos: `parallel_map` (worker processes with a progress bar);
- files: `atomic_write` (a crash never leaves half a file under the final name) and `load_checkpoint` (every
  torch.load of the project: weights_only=True, on the CPU, with an error that names the file);
- images: `to_tensor` and `to_uint8` convert frames between uint8 (..., H, W, 3) and float (..., 3, H, W) in
  [-1, 1], and `load_image` reads a portrait of any kind.
"""

import argparse
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------------------
# User errors


class UserError(ValueError):
    """A problem the user can fix (an unreadable file, a bad flag, a missing device): reported by `fail`."""


def fail(message):
    """Print `error: message` to stderr and exit with status 2: how every script ends on a user error."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


@contextmanager
def user_errors():
    """Run a script's body; a UserError raised inside ends it through `fail`."""
    try:
        yield
    except UserError as e:
        fail(str(e))


# ----------------------------------------------------------------------------------------------------------------
# The command line


class Parser(argparse.ArgumentParser):
    """The command-line parser of every script but letstalk.py (the model file imports nothing of ours): a usage
    error (unknown option, bad number...) exits through `fail`, one line that points to --help, instead of a
    usage dump."""

    def error(self, message):
        """Report a usage error as one line and exit with status 2."""
        fail(f"{message} (`{self.prog} --help` lists the options)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help that shows each option's default, unless it has none or its help text already states it."""

    def _get_help_string(self, action):
        if action.default in (None, []) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def bounded(kind, low=None, high=None, above=None):
    """An argparse `type` for a number of `kind` (int or float) in [low, high], or above `above` (exclusive).
    A number out of range stops the command as it is parsed (exit 2, one line), before any slow work starts."""
    rule = " and ".join(text for text, given in ((f"at least {low}", low), (f"above {above}", above),
                                                  (f"at most {high}", high)) if given is not None)

    def parse(text):
        value = kind(text)  # a ValueError here makes argparse say "invalid int value"
        if ((low is not None and value < low) or (above is not None and value <= above)
                or (high is not None and value > high)):
            raise argparse.ArgumentTypeError(f"{text}: must be {rule}")
        return value

    parse.__name__ = kind.__name__  # how argparse names the type in its messages
    return parse


def add_device(parser):
    """Add --device to a parser: where the models run, by default cuda when this machine has a GPU, else cpu."""
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default, help=f"cpu, cuda or cuda:N (default: {default}, "
                        "cuda when this machine has a GPU)")


def check_device(name):
    """torch.device(name) if this machine has it, else a UserError that says what to pass instead."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; pass cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA GPU; pass --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


# ----------------------------------------------------------------------------------------------------------------
# Work on many videos


def parallel_map(fn, jobs, workers, desc):
    """[fn(job) for job in jobs] with a progress bar, in up to `workers` processes (None: one per core) when there
    are enough jobs to pay for starting them, else in this one. fn must be a module-level function."""
    workers = min(workers or os.cpu_count(), len(jobs) // 4)
    if workers < 2:
        return [fn(job) for job in tqdm(jobs, desc=desc, unit="video", disable=not jobs)]
    # spawn, not fork: this process may hold torch's thread pools, which a forked child must not inherit
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(tqdm(pool.map(fn, jobs), total=len(jobs), desc=desc, unit="video"))


# ----------------------------------------------------------------------------------------------------------------
# Files


def atomic_write(path, write):
    """Call write(tmp_path) on a temporary file next to `path`, then rename it into place, so a crash never
    leaves a half-written file under the final name."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{os.urandom(4).hex()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path, needs=(), what="a letstalk checkpoint", hint="", mmap=False):
    """torch.load(path) the safe way: weights_only=True (plain tensors and numbers, no code runs) and on the CPU
    (the caller moves what it needs to its device; RNG states must stay on the CPU); with mmap=True the tensors
    stay in the file, read on access. A UserError names the file when it is missing, is not a torch file, or is
    not a dict holding every key of `needs`; `hint` says what to do."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {'a folder' if path.is_dir() else 'no such file'}, not {what}{hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001  (truncated, not a torch file, or one that would need to run code)
        raise UserError(f"{path}: not {what} ({type(e).__name__}){hint}") from None
    if not isinstance(ckpt, dict) or not set(needs) <= ckpt.keys():
        raise UserError(f"{path}: not {what}{hint}")
    return ckpt


# ----------------------------------------------------------------------------------------------------------------
# Images


def to_tensor(frames):
    """uint8 frames (..., H, W, 3), an array or a tensor -> float tensor (..., 3, H, W) in [-1, 1]."""
    x = frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.array(frames))
    return x.movedim(-1, -3).float() / 127.5 - 1


def to_uint8(x):
    """The inverse of to_tensor: float tensor (..., 3, H, W) in [-1, 1] -> uint8 array (..., H, W, 3), rounded
    and clipped."""
    return ((x.detach().movedim(-3, -1).float() + 1) * 127.5).round().clamp(0, 255).byte().cpu().numpy()


def square_image(img, size, box=None):
    """Crop a PIL image to `box` (x0, y0, x1, y1), else to its centre square, and resize it to size x size.
    Returns uint8 (size, size, 3)."""
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s) if box is None else box
    return np.asarray(img.convert("RGB").crop(box).resize((size, size), Image.BICUBIC))


def load_image(path, size):
    """Any image PIL opens (RGB, RGBA, grayscale, palette, 16-bit), centre square crop -> uint8 (size, size, 3)."""
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"{path}: cannot read image ({e})") from None
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit or float grey: scale to 8 bits first
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((255 * (a - a.min()) / max(a.max() - a.min(), 1e-9)).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))  # transparent parts become white
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return square_image(img, size)


def save_png(path, image):
    """Write uint8 (H, W, 3) as a PNG, atomically."""
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
