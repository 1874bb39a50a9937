"""The plumbing every script shares, so that each of the other files is about one idea.

- user errors: `UserError` is a problem the user can fix (a missing file, a bad flag, no GPU); `fail` is the one way
  a script reports one: `error: ...` on stderr, one line, exit status 2, no traceback;
- the command line: `Parser` (usage errors go through `fail` too), `bounded` numbers, `file_name` outputs,
  `add_device`;
- work on many videos: `parallel_map` (worker processes with a progress bar);
- files: `writable_file` / `writable_folder` check an output before any work, `output_folder` leaves no empty one
  behind, `atomic_write` (a crash never leaves half a file under the final name, and the next write of that name
  removes what a killed run left) and `load_checkpoint` (every torch.load of the project: weights_only=True, on
  the CPU, refusing NaN or infinite weights, naming the file); `replaceable_checkpoint` lets an output
  replace only a checkpoint of its own kind;
- images: `to_tensor` and `to_uint8` convert frames between uint8 (..., H, W, 3) and float (..., 3, H, W) in
  [-1, 1], and `load_image` reads a portrait of any kind.
"""

import argparse
import errno
import math
import multiprocessing
import os
import pickle
import re
import signal
import sys
import threading
import time
import warnings
import zipfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------------------
# User errors


MAX_SEED = 2**32 - 1  # the largest seed numpy and torch both take


class UserError(ValueError):
    """A problem the user can fix (an unreadable file, a bad flag, a missing device): reported by `fail`."""


def fail(message):
    """Print `error: message` to stderr and exit with status 2: how every script ends on a user error. The message
    stays one line even when a path in it holds a line break (shown as \\n), and printable when a file name in it
    is not UTF-8 (its bytes shown as \\udcff escapes)."""
    message = message.encode("utf-8", "backslashreplace").decode()
    print("error: " + message.replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr)
    sys.exit(2)


INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C, as shells report it
BROKEN_PIPE = 141  # ... and of one whose reader went away (`| head`): killed by SIGPIPE


def brief(e, limit=240):
    """An exception's text for an error line: its lines joined into one, cut after `limit` characters (a state
    dict's mismatch lists every key), or its type's name when it has no text."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def out_of_memory(e):
    """Whether an exception is the machine running out of memory: Python's, the CPU allocator's or CUDA's."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "DefaultCPUAllocator: can't allocate" in str(e)


def compile_failed(e):
    """Whether an exception is torch.compile's backend failing (no C compiler on the machine, say). Told by the
    class's name: importing torch._dynamo to compare classes would slow every script's start by almost a second."""
    return any(c.__name__ == "BackendCompilerFailed" for c in type(e).__mro__)


@contextmanager
def user_errors():
    """Run a script's body; a UserError raised inside ends it through `fail`, and so do what the machine refuses:
    memory (sizes within the options' bounds can still be too much), disk space, a file's permissions, any other
    file the system refuses to make or read, a compiler for torch.compile. Ctrl-C ends it with one line (exit 130),
    and so does a request to terminate (SIGTERM: `kill`, a job scheduler, `docker stop`), so that the files being
    written are cleaned up; a closed standard output (`| head`) ends it quietly (exit 141), instead of a traceback.
    A file name that is not UTF-8 is printed with escapes rather than crashing the print."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(errors="backslashreplace")
        yield
        sys.stdout.flush()  # a closed output fails here, inside, not in Python's own flush at exit
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would fail too
        sys.exit(BROKEN_PIPE)
    except (MemoryError, RuntimeError) as e:
        if isinstance(e.__context__, KeyboardInterrupt):  # Ctrl-C inside torch.save, whose zip writer then fails
            print("interrupted", file=sys.stderr)  # as it closes
            sys.exit(INTERRUPTED)
        detail = brief(e)
        if out_of_memory(e):
            fail(f"out of memory ({detail}); ask for less at once (smaller sizes or batches, fewer frames, shorter "
                 "audio) or use a machine with more memory")
        if compile_failed(e):
            fail(f"torch.compile failed ({detail}); pass --no-compile to run without it (it needs a C compiler, "
                 "e.g. gcc, on this machine)")
        raise
    except PermissionError as e:  # a file or folder this user may not read or write
        fail(f"{e.filename or e}: permission denied")
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            fail(f"{e.filename or 'a file'}: no space left on the device; free some and run again (a training run "
                 "continues from its last checkpoint with --resume)")
        if e.filename is None:  # not about a file: a bug, whose traceback is wanted
            raise
        fail(f"{e.filename}: {e.strerror or e}")  # a file the system refused (one our checks could not foresee)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    """A signal handler that interrupts the work as Ctrl-C does."""
    raise KeyboardInterrupt


# ----------------------------------------------------------------------------------------------------------------
# The command line


class Parser(argparse.ArgumentParser):
    """The command-line parser of every script but letstalk.py (the model file imports nothing of ours): a usage
    error (unknown option, bad number...) exits through `fail`, one line that points to --help, instead of a
    usage dump. An empty argument is one too: it is what an unset shell variable gives ("$OUT"), and as a path it
    would quietly mean the current folder, or a default."""

    def parse_known_args(self, args=None, namespace=None):
        """argparse's parsing, after refusing an empty argument (`--out ""`, `--out=`)."""
        args = sys.argv[1:] if args is None else [str(a) for a in args]
        for i, arg in enumerate(args):
            if arg == "" or (arg.startswith("-") and "=" in arg and not arg.partition("=")[2]):  # "", --out=, -o=
                where = arg if arg else f"after {args[i - 1]}" if i else "first"
                self.error(f"an empty argument ({where}); pass a value (an unset shell variable?)")
        return super().parse_known_args(args, namespace)

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
    """An argparse `type` for a finite number of `kind` (int or float) in [low, high], or above `above`
    (exclusive), and at most `high`, which every number needs: an unbounded one would let a typo allocate
    terabytes or run for years. A number out of range, NaN or infinite stops the command as it is parsed (exit 2,
    one line), before any slow work starts."""
    if high is None or (low is None) == (above is None):
        raise TypeError("bounded needs high and one of low or above")
    rule = f"at least {low}" if above is None else f"above {above}"
    most = high if kind is int else f"{high:g}"  # 4294967295, not 4.29497e+09

    def parse(text):
        value = kind(text)  # a ValueError here makes argparse say "invalid int value"
        if not math.isfinite(value) or value < (low if above is None else above) or value == above or value > high:
            raise argparse.ArgumentTypeError(f"{text}: must be {rule} and at most {most}")
        return value

    parse.__name__ = kind.__name__  # how argparse names the type in its messages
    parse.bounds = (low if above is None else above, high)  # tests/test_hostile.py checks every option has them
    return parse


def file_name(text):
    """An argparse `type` for a file the command writes: a Path, unless the name ends in / (Path would drop the
    slash and write a file of that name)."""
    if text.endswith(os.sep):
        raise argparse.ArgumentTypeError(f"{text}: a folder name (it ends in {os.sep}); pass a file name")
    return Path(text)


def add_device(parser):
    """Add --device to a parser: where the models run, by default cuda when this machine has a GPU, else cpu."""
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default, help=f"cpu, cuda or cuda:N (default: {default}, "
                        "cuda when this machine has a GPU)")


def check_device(name):
    """torch.device(name) if this machine has it, else a UserError that says what to pass instead. A GPU named by
    its index also becomes the current one: what launches on the current GPU (kernels.py's Triton kernels, which
    take no device) then runs on it, without torchrun too."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; pass cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cpu" and device.index not in (None, 0):
        raise UserError(f"--device {name}: the CPU has no index; pass --device cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA GPU; pass --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


# ----------------------------------------------------------------------------------------------------------------
# Work on many videos


def parallel_map(fn, jobs, workers, desc):
    """[fn(job) for job in jobs] with a progress bar, in up to `workers` processes (None: one per core) when there
    are enough jobs to pay for starting them, else in this one. fn must be a module-level function."""
    workers = min(workers or os.cpu_count(), len(jobs) // 4)
    if workers < 2:
        with tqdm(jobs, desc=desc, unit="video", disable=not jobs) as bar:  # closed first: `interrupted` gets its
            return [fn(job) for job in bar]  # own line
    # spawn, not fork: this process may hold torch's thread pools, which a forked child must not inherit
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_end_with,
                             initargs=(os.getpid(),)) as pool:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the workers, started by submit, inherit this:
        try:  # Ctrl-C is this process's to handle (a worker interrupted while it imports torch prints a traceback)
            futures = [pool.submit(fn, job) for job in jobs]
        finally:
            signal.signal(signal.SIGINT, previous)
        try:
            with tqdm(futures, desc=desc, unit="video") as bar:  # closed first: `interrupted` gets its own line
                return [future.result() for future in bar]
        except BaseException as e:  # Ctrl-C or a failed job: stop the workers (this process's only children) rather
            for worker in multiprocessing.active_children():  # than wait for the jobs they run; the pool then fails
                worker.terminate()  # the jobs not done (cancelling them too, as Executor.map does, trips a bug of
                # Python 3.11's pool)
            if isinstance(e, BrokenProcessPool):
                raise UserError(f"{desc}: a worker process died (killed, perhaps for want of memory); run again to "
                                "continue, with fewer workers if it happens again") from None
            raise


def _end_with(parent):
    """Run in each worker of parallel_map as it starts: end the worker once `parent` is gone. A parent killed with
    SIGKILL cannot stop its workers, which would otherwise wait for jobs forever, each holding its imports."""
    def watch():
        while os.getppid() == parent:  # a worker whose parent died is handed to another process
            time.sleep(1)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


# ----------------------------------------------------------------------------------------------------------------
# Files


def writable_file(path, flag, suffixes=(), inputs=()):
    """Refuse, before any work, an output file that could not be written or would destroy something: a folder of
    that name, a folder where no file can be made, a suffix not in `suffixes` (the formats the writer knows), or
    one of the command's `inputs`. Returns the path."""
    path = Path(path)
    if len(os.fsencode(path.name)) > MAX_NAME:  # fsencode: a name need not be UTF-8
        raise UserError(f"{flag} {path}: a file name of more than {MAX_NAME} bytes; pass a shorter one")
    if _stat(path, flag) == "folder":
        raise UserError(f"{flag} {path}: a folder; pass a file name")
    if suffixes and path.suffix.lower() not in suffixes:
        raise UserError(f"{flag} {path}: must end in {' or '.join(suffixes)}")
    if path.exists() and any(Path(p).exists() and path.samefile(p) for p in inputs):
        raise UserError(f"{flag} {path}: that is an input of this command; pass another name")
    if _stat(path.parent, flag) != "folder":
        raise UserError(f"{flag} {path}: the folder {path.parent} does not exist")
    _try_writing(path.parent, flag, path)
    return path


def writable_folder(path, flag):
    """Refuse, before any work, an output folder that is a file or lies where nothing can be written (it may not
    exist yet: it is made when written). Returns the path."""
    path = Path(path)
    if any(len(os.fsencode(part)) > MAX_NAME for part in path.parts):
        raise UserError(f"{flag} {path}: a name of more than {MAX_NAME} bytes; pass a shorter one")
    existing = next(p for p in (path, *path.parents) if _stat(p, flag) != "missing")  # "." or "/" at the latest
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: " + ("a file of that name exists; pass a folder" if existing == path else
                                              f"{existing} is a file, not a folder"))
    _try_writing(existing, flag, path)
    return path


def _try_writing(folder, flag, path):
    """Make a file in `folder` and remove it again, or refuse the output `path`: asked whether it may write,
    os.access says yes to root even in a read-only or virtual folder such as /proc."""
    tmp = _temp_name(folder / "probe")
    try:
        tmp.touch(exist_ok=False)
        tmp.unlink()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {folder} ({e.strerror})") from None


MAX_NAME = 255 - 20  # file systems allow 255 bytes a name; atomic_write's temporary name adds up to 20


@contextmanager
def output_folder(path):
    """Make the folder `path`, and any missing folders above it, for the files a with-block writes into it; if the
    block ends with nothing written there (every input skipped, a full disk, Ctrl-C before the first file), the
    folders this call made are removed again, so a failed run leaves no empty output behind. Yields the path."""
    path = Path(path)
    made = [p for p in (path, *path.parents) if not p.exists()]  # path first, up to the first that existed
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        for folder in made:
            try:
                folder.rmdir()  # only an empty folder goes
            except OSError:  # written into (by this block, or by another process meanwhile): it and those above stay
                break


def _stat(path, flag):
    """'folder', 'file' (anything else that exists, a link to nothing included) or 'missing'; a path the system
    cannot even look up (too long, a loop of links) is a UserError."""
    try:
        return "folder" if path.is_dir() else "file" if path.exists() or path.is_symlink() else "missing"
    except OSError as e:
        raise UserError(f"{flag} {path}: {e.strerror}") from None


def _temp_name(path):
    """Where atomic_write puts `path` while writing it: .<stem>.<pid>-<random><suffix>, next to it."""
    return path.with_name(f".{path.stem}.{os.getpid()}-{os.urandom(4).hex()}{path.suffix}")


def remove_stale_temps(path):
    """Delete the temporary files of `path` that writers killed before they finished left behind (those whose
    process is gone); a checkpoint's can be gigabytes."""
    path = Path(path)
    ours = re.compile(re.escape(f".{path.stem}.") + r"(\d+)-[0-9a-f]{8}" + re.escape(path.suffix))  # _temp_name's
    for tmp in path.parent.glob(f".{path.stem}.*-*{path.suffix}"):  # (only those: a user's files stay)
        match = ours.fullmatch(tmp.name)
        if match and int(match[1]) != os.getpid() and not Path(f"/proc/{match[1]}").exists():
            tmp.unlink(missing_ok=True)


def atomic_write(path, write):
    """Call write(tmp_path) on a temporary file next to `path`, then rename it into place, so a crash never leaves
    a half-written file under the final name. A failure to write (disk full, read-only folder) removes the
    temporary file and is a UserError that names `path`."""
    path = Path(path)
    remove_stale_temps(path)
    tmp = _temp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the folder may refuse this too; the error to report is the first one
            pass
        if isinstance(e, OSError):
            raise UserError(f"{path}: cannot write ({e.strerror or e})") from None
        raise


def save_torch(path, obj):
    """torch.save(obj) to `path`, atomically, through a file object: given a name, torch.save reports a full disk
    as a RuntimeError; given a file, as the OSError that atomic_write turns into a UserError."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    atomic_write(path, write)


def load_checkpoint(path, needs=(), what="a letstalk checkpoint", hint="", mmap=False):
    """torch.load(path) the safe way: weights_only=True (plain tensors and numbers, no code runs) and on the CPU
    (the caller moves what it needs to its device; RNG states must stay on the CPU); with mmap=True the tensors
    stay in the file, read on access. A UserError names the file when it is missing, is not a torch file, is
    not a dict holding every key of `needs`, or holds a NaN or infinity in a float tensor (no run saves one: a
    damaged or edited file; not checked with mmap, which would read it all); `hint` says what to do."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: a folder, not {what}{hint}" if path.is_dir() else
                        f"{path}: not a regular file (a pipe or a device), not {what}{hint}" if path.exists() else
                        f"{path}: no such file; expected {what}{hint}")
    try:  # is_zipfile answers False for a file it may not read
        open(path, "rb").close()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    if not zipfile.is_zipfile(path):  # what torch.save writes; an empty, truncated or foreign file is not one
        raise UserError(f"{path}: not {what} (not a whole file written by torch.save){hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: not {what} (it holds objects that only running code could load){hint}") from None
    except Exception as e:  # noqa: BLE001  (a damaged archive)
        raise UserError(f"{path}: not {what} ({type(e).__name__}: {brief(e)}){hint}") from None
    if not isinstance(ckpt, dict) or not set(needs) <= ckpt.keys():
        raise UserError(f"{path}: not {what}{hint}")
    if not mmap:
        bad = next((name for name, t in _tensors(ckpt) if t.is_floating_point() and not t.isfinite().all()), None)
        if bad is not None:
            raise UserError(f"{path}: damaged: its {bad} holds NaN or infinite values{hint}")
    return ckpt


def replaceable_checkpoint(path, flag, what, ours):
    """Refuse, before any work, an existing output `path` that is not `what` (ours(checkpoint dict) tells): another
    run's checkpoint, a network, a damaged file are kept, not replaced."""
    if not Path(path).exists():
        return
    try:
        mine = ours(load_checkpoint(path))
    except UserError:
        mine = False
    if not mine:
        raise UserError(f"{flag} {path}: holds something other than {what}, which this would replace; pass another "
                        "name (or delete it first)")


def _tensors(obj, name=""):
    """(dotted name, tensor) of every tensor in nested dicts and lists."""
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, (dict, list, tuple)):
        for key, value in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
            yield from _tensors(value, f"{name}.{key}" if name else str(key))


@contextmanager
def contents_of(path, what):
    """Use what a loaded file holds; a file of the right keys but the wrong contents (other shapes, settings of
    another version, values of the wrong type) raises inside: a UserError that names it instead."""
    try:
        yield
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        raise UserError(f"{path}: not {what} ({type(e).__name__}: {brief(e)})") from None


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


MAX_PIXELS = 50 * 10**6  # a larger "portrait" is an error or a decompression bomb (PIL warns from 89 MP)


def load_image(path, size):
    """Any image PIL opens (RGB, RGBA, grayscale, palette, 16-bit), centre square crop -> uint8 (size, size, 3)."""
    if not Path(path).is_file():  # a folder, a device, a pipe: nothing an image can be read from
        raise UserError(f"{path}: {'no such file' if not Path(path).exists() else 'not a regular file'}")
    with warnings.catch_warnings():  # damaged EXIF is only metadata: PIL warns, and reads the image without it;
        warnings.simplefilter("ignore", UserWarning)  # its warning of a huge image comes before MAX_PIXELS refuses it
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        too_big = f"a portrait needs far fewer (at most {MAX_PIXELS // 10**6} megapixels): scale it down first"
        try:
            img = Image.open(path)
            if img.width * img.height > MAX_PIXELS:  # checked from the header, before the pixels are decoded
                raise UserError(f"{path}: {img.width}x{img.height} pixels; {too_big}")
            img.load()
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except UserError:
            raise
        except Image.DecompressionBombError:  # PIL's own refusal, from the header too, of over 2x its 89 MP
            raise UserError(f"{path}: over {2 * Image.MAX_IMAGE_PIXELS // 10**6} megapixels; {too_big}") from None
        except (OSError, UnidentifiedImageError, ValueError) as e:  # ValueError: e.g.
            # a compressed text chunk too large to unpack
            raise UserError(f"{path}: cannot read image ({e})") from None
        img = ImageOps.exif_transpose(img)  # a phone's photo: stored sideways, with an EXIF tag saying how to turn it
    if img.mode.startswith("I;16"):  # 16-bit grey: to 8 bits
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().astype(np.uint8))
    elif img.mode in ("I", "F"):  # 32-bit integer or float grey, of no fixed range: stretched to 8 bits
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all():
            raise UserError(f"{path}: the image holds NaN or infinite values")
        img = Image.fromarray((255 * (a - a.min()) / max(a.max() - a.min(), 1e-9)).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))  # transparent parts become white
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return square_image(img, size)


def save_png(path, image):
    """Write uint8 (H, W, 3) as a PNG, atomically."""
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
