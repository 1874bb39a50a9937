"""Videos on disk and the clips LetsTalk trains on.

1. One on-disk layout for synthetic and real data: ROOT/<video>/{video.mp4, audio.wav, meta.json} (`save_video`,
   `VideoFolder`). world.py writes synthetic videos in it; `python data.py prepare` converts real talking-head
   videos (HDTF / CelebV-HQ style) into it.
2. Frame pools: a few frames of every video with their ground truth, cached in one file (`build_frame_pool`), which
   the probe of metrics.py learns to read.
3. Training data at any scale: one cache file per video, written once (each rank its share) and opened
   memory-mapped (`VideoCache`): every 8th frame for the VAE stage (`cache_frames`); VAE latents and mel windows
   for the diffusion stage (`encode_videos`), from which a fresh clip is drawn for every slot of every step
   (`ClipSampler`), as the official code's VideoLatentDataset does.

Run `python data.py prepare --help` for the command line.
"""

import json
import math
import os
import shutil
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np
import torch
from tqdm import tqdm

from audio import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, audio_features, decode_audio, load_audio, write_wav
from common import (MAX_NAME, HelpFormatter, Parser, UserError, atomic_write, bounded, load_checkpoint,
                    output_folder, parallel_map, save_torch, square_image, to_tensor, user_errors, writable_folder)

# ----------------------------------------------------------------------------------------------------------------
# 1. The on-disk layout: ROOT/<name>/{video.mp4, audio.wav, meta.json}


@dataclass
class Video:
    """One talking video: frames uint8 (N, H, W, 3), wav float32 (T,) at 16 kHz, and meta (a JSON-able dict;
    synthetic videos carry per-frame ground truth in it)."""
    frames: np.ndarray
    wav: np.ndarray
    meta: dict


def write_mp4(path, frames, wav=None, crf=16):
    """Write frames uint8 (N, H, W, 3), or any iterable of (H, W, 3) frames (encoded as they come), as 25-fps H.264
    yuv420p (plays in browsers) with optional 16 kHz mono audio as AAC. Uses the FFmpeg inside the `av` wheel; H
    and W must be even. Written atomically."""
    def write(tmp):
        with av.open(tmp, "w", format="mp4") as out:
            video = out.add_stream("libx264", rate=FPS, options={"crf": str(crf)})
            video.pix_fmt = "yuv420p"
            audio = None if wav is None else out.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
            for i, frame in enumerate(frames):
                if i == 0:  # the first frame sets the size
                    video.height, video.width = frame.shape[:2]
                out.mux(video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
            out.mux(video.encode())
            if audio is not None:
                chunk = av.AudioFrame.from_ndarray(wav.astype(np.float32)[None], format="flt", layout="mono")
                chunk.sample_rate, chunk.pts = SAMPLE_RATE, 0  # pts 0: the muxer then writes an edit list that
                # hides the encoder's 1024 priming samples, keeping sound and picture in sync
                out.mux(audio.encode(chunk))
                out.mux(audio.encode())
    atomic_write(path, write)


def read_video(path):
    """Decode every frame of one of the layout's videos (upright, square and 25 fps already, unlike the raw videos
    `prepare` reads) -> uint8 (N, H, W, 3)."""
    return np.stack([frame.to_ndarray(format="rgb24") for _, frame, _ in video_frames(path)])


LAYOUT_FILES = {"video.mp4", "audio.wav", "meta.json", "still.png"}  # a video's folder (still.png: world.py --still)


def check_replaceable(folder):
    """Refuse to write a video's folder where something of the user's is: only a missing path or a video folder
    (one holding meta.json: save_video renames only complete folders into place) that holds nothing but the
    layout's files may be replaced."""
    folder = Path(folder)
    if folder.is_symlink() or folder.exists() and not (folder / "meta.json").is_file():
        what = "a link" if folder.is_symlink() else "a folder without meta.json" if folder.is_dir() else "a file"
        raise UserError(f"{folder}: {what}, where a video's folder would be written; move it away or choose another "
                        "output folder")
    theirs = sorted(p.name for p in folder.iterdir() if p.name not in LAYOUT_FILES) if folder.exists() else []
    if theirs:
        raise UserError(f"{folder}: a video's folder that also holds {', '.join(theirs[:3])}"
                        f"{' ...' if len(theirs) > 3 else ''}, which replacing it would delete; move "
                        f"{'them' if len(theirs) > 1 else 'it'} away or choose another output folder")


def save_video(folder, video):
    """Write a Video in the on-disk layout: folder/{video.mp4 (with sound), audio.wav, meta.json}, replacing an
    older video folder of that name but nothing else (check_replaceable).

    The folder is assembled under a temporary name and renamed at the end, so an interrupted run leaves either a
    complete folder or none.
    """
    folder = Path(folder)
    check_replaceable(folder)
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed run left
    try:
        tmp.mkdir(parents=True)
        write_mp4(tmp / "video.mp4", video.frames, video.wav)
        write_wav(tmp / "audio.wav", video.wav)
        (tmp / "meta.json").write_text(json.dumps(video.meta))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:  # a failed write (a full disk, Ctrl-C) leaves no half-made folder behind (a killed process
        # may: the next save_video of that name removes it, and VideoFolder skips it)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# what synthetic videos know of each frame (world.py), with the shape of one frame's reading: mouth openness and
# roundness, eye closure, head pose (yaw, pitch, roll) and the mouth's box in pixels (x0, y0, x1, y1)
GROUND_TRUTH = {"openness": (), "roundness": (), "blink": (), "pose": (3,), "mouth_box": (4,)}


def _numbers(value, shape):
    """Whether a JSON value is an array of finite numbers of this shape."""
    try:
        array = np.asarray(value)
    except ValueError:  # lists of different lengths
        return False
    return array.shape == shape and array.dtype.kind in "iuf" and bool(np.isfinite(array).all())


def _read_meta(path):
    """A video's meta.json as a dict; a UserError names the file when it is not JSON, lacks the frame count, has a
    frame size ("size", absent in old folders) that is not a number of pixels, or ground truth (GROUND_TRUTH) that
    is not one finite reading of its shape per frame."""
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise UserError(f"{path}: cannot read ({e}); delete its folder and prepare or render it again") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("num_frames"), int) or meta["num_frames"] < 1:
        raise UserError(f"{path}: no frame count (num_frames); delete its folder and prepare or render it again")
    if "size" in meta and (not isinstance(meta["size"], int) or meta["size"] < 1):
        raise UserError(f"{path}: the frame size {meta['size']!r} is not a number of pixels; delete its folder and "
                        "prepare or render it again")
    if "source" in meta and not (isinstance(meta["source"], str) and meta["source"]):  # (prepare compares it)
        raise UserError(f"{path}: the source {meta['source']!r} is not a video's path; delete its folder and prepare "
                        "it again")
    for key, shape in GROUND_TRUTH.items():  # checked here, not at the first step after hours of encoding
        if key in meta and not _numbers(meta[key], (meta["num_frames"], *shape)):
            each = f"{shape[0]} numbers" if shape else "a number"
            raise UserError(f"{path}: its {key} ground truth is not {each} for each of its {meta['num_frames']} "
                            "frames; delete its folder and render it again")
    return meta


def held_out(n):
    """Which of n videos (sorted by name) a folder holds out for validation: every 20th (19, 39, ...), or the last
    one when there are fewer than 20. Returns a list of indices."""
    return list(range(19, n, 20)) or [n - 1]


class VideoFolder:
    """A dataset root in the on-disk layout, as a sequence of Video (decoded on access).

    split "all" takes every video; "val" holds out the videos held_out names and "train" the rest (a folder of one
    video trains on it too), so a prepared folder gives held-out videos without a second copy. `size`
    is the frame size in pixels that every video of the folder (all splits) has, as their meta.json files say (in
    old folders, whose meta.json does not, the first video's, decoded): a folder of mixed sizes is refused, since
    training stacks frames of different videos.
    """

    def __init__(self, root, split="all"):
        self.root = Path(root)
        if self.root.is_file():
            raise UserError(f"{root}: a file; pass the folder of prepared videos (`python data.py prepare` writes one)")
        folders = sorted(p.parent for p in self.root.glob("*/meta.json")
                         if not p.parent.name.startswith("."))  # .<name>.partial: a save_video a kill cut short
        if not folders:
            raise UserError(f"{root}: no prepared videos (expected {root}/<name>/meta.json; "
                            "see `python world.py --help` and `python data.py prepare --help`)")
        metas = {p: _read_meta(p / "meta.json") for p in folders}
        sized = [(p, meta["size"]) for p, meta in metas.items() if "size" in meta]
        other = next(((p, size) for p, size in sized if size != sized[0][1]), None)
        if other is not None:
            raise UserError(f"{sized[0][0]} holds {sized[0][1]} px frames but {other[0]} {other[1]} px; prepare (or "
                            "render) all the videos of a folder with one --size")
        val = [folders[i] for i in held_out(len(folders))]
        self.folders = {"all": folders, "train": [f for f in folders if f not in val] or folders, "val": val}[split]
        self.meta = [metas[p] for p in self.folders]
        self.size = None  # (while the first video is decoded for it)
        self.size = sized[0][1] if sized else self[0].frames.shape[1]

    def __len__(self):
        return len(self.folders)

    def fingerprint(self):
        """videos_fingerprint of the folder's videos (of its split) as they are now; equal to the VideoCache's of
        the same videos, wherever the folder lies now. -> int."""
        return videos_fingerprint((f.name, _source(f)) for f in self.folders)

    def num_frames(self, i):
        """Frame count of video i, from its meta.json (nothing is decoded)."""
        return self.meta[i]["num_frames"]

    def __getitem__(self, i):
        frames = read_video(self.folders[i] / "video.mp4")
        if len(frames) != self.num_frames(i):  # more: the ground truth and the audio would end first
            raise UserError(f"{self.folders[i]}: meta.json counts {self.num_frames(i)} frames, video.mp4 holds "
                            f"{len(frames)}; delete the folder and prepare or render it again")
        size = self.meta[i].get("size")
        if size is not None and frames.shape[1:3] != (size, size):
            raise UserError(f"{self.folders[i]}: meta.json gives {size}x{size} frames, video.mp4 holds "
                            f"{frames.shape[2]}x{frames.shape[1]}; delete the folder and prepare or render it again")
        if size is None and self.size is not None and frames.shape[1:3] != (self.size, self.size):  # an old folder
            raise UserError(f"{self.folders[i]}: {frames.shape[2]}x{frames.shape[1]} frames, the folder's others "
                            f"{self.size}x{self.size}; prepare (or render) all the videos of a folder with one --size")
        wav = load_audio(self.folders[i] / "audio.wav")
        if len(wav) < self.num_frames(i) * SAMPLES_PER_FRAME:  # (a folder edited by hand: its missing end is silence)
            raise UserError(f"{self.folders[i]}: audio.wav holds {len(wav) / SAMPLE_RATE:.2f} s, the video "
                            f"{self.num_frames(i) / FPS:.2f} s; delete the folder and prepare or render it again")
        return Video(frames, wav, self.meta[i])


def _resample_frames(times, n_out):
    """Index of the source frame shown at each output time k / 25 s: the last one whose timestamp is <= it."""
    out = np.searchsorted(times, np.arange(n_out) / FPS + 1e-6, side="right") - 1
    return np.clip(out, 0, len(times) - 1)


FACE_DETECTOR = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"  # ships inside opencv's wheel
FACE_SAMPLES = 8  # frames of a video the detector looks at


def find_face(frames, enlarge=2.2):
    """One square crop box (x0, y0, x1, y1) for a whole video, from a few of its frames uint8 (H, W, 3): OpenCV's
    Haar cascade (Viola and Jones) finds the largest face in each; the median of those boxes (which smooths the
    detector's jitter from frame to frame) is enlarged `enlarge` times around the face's centre so that hair and
    chin fit, made square and kept inside the frame. None when most of the frames show no face, or no one face:
    when the largest face moves between people (an interview), their median box lies between them."""
    detector = cv2.CascadeClassifier(FACE_DETECTOR)
    found = []
    for frame in frames:
        faces = detector.detectMultiScale(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), scaleFactor=1.1, minNeighbors=5,
                                          minSize=(24, 24))
        if len(faces):
            found.append(max(faces, key=lambda f: f[2] * f[3]))
    if len(found) <= len(frames) / 2:
        return None
    x, y, w, h = np.median(np.array(found, float), axis=0)
    height, width = frames[0].shape[:2]
    side = min(enlarge * max(w, h), width, height)
    x0 = float(np.clip(x + w / 2 - side / 2, 0, width - side))
    y0 = float(np.clip(y + h / 2 - side / 2, 0, height - side))
    centres = [(fx + fw / 2, fy + fh / 2) for fx, fy, fw, fh in found]
    if sum(x0 <= cx <= x0 + side and y0 <= cy <= y0 + side for cx, cy in centres) <= len(found) / 2:
        return None  # most faces found lie outside the crop: not one face (a face that sways stays inside it)
    return tuple(round(v) for v in (x0, y0, x0 + side, y0 + side))


def video_frames(src):
    """Decode a file's first video stream frame by frame: yields (the frame's time in seconds on the file's clock,
    av.VideoFrame, the stream's pixel aspect ratio: 1 for square pixels, 4/3 when each stored pixel is shown 4/3
    as wide as high). A UserError names the file when it cannot be decoded or holds no frame."""
    count = 0
    try:
        with av.open(str(src)) as container:
            if not container.streams.video:
                raise UserError(f"{src}: no video stream")
            stream = container.streams.video[0]
            aspect = float(stream.sample_aspect_ratio or 1)  # (unset: 0/1, square)
            if not 0.25 <= aspect <= 4:  # cameras and broadcasts stay within 1/2 and 2: a damaged or hostile file
                raise UserError(f"{src}: a pixel aspect ratio of {aspect:g}, which no video has; re-encode it")
            for i, f in enumerate(container.decode(stream)):
                count += 1
                yield (float(f.time) if f.time is not None else i / float(stream.average_rate)), f, aspect
    except av.FFmpegError as e:
        raise UserError(f"{src}: cannot decode ({e})") from None
    if not count:
        raise UserError(f"{src}: no video frames")


def upright(frame, aspect):
    """A decoded av.VideoFrame as a PIL image as it is shown: in square pixels (a video may store its frames
    squeezed, with the pixel `aspect` ratio to widen them by) and the right way up (phone videos store their frames
    sideways, with the rotation to apply: frame.rotation, degrees counterclockwise)."""
    image = frame.to_image()
    if abs(aspect - 1) > 1e-3:
        image = image.resize((max(1, round(image.width * aspect)), image.height))  # bicubic
    return image.rotate(frame.rotation, expand=True) if frame.rotation else image


def decode_frames(src, convert=lambda image: image):
    """Every frame of a file's first video stream as convert(PIL image, upright), and each one's time in seconds on
    the file's clock. Each frame is converted as soon as it is decoded, so a long video's full-size frames never sit in
    memory together (a minute of 1080p is 9 GB)."""
    frames, times = [], []
    for time, frame, aspect in video_frames(src):
        frames.append(convert(upright(frame, aspect)))
        times.append(time)
    return frames, times


def spread_frames(src, n=FACE_SAMPLES):
    """(n frames uint8 (H, W, 3) spread over a whole video (their gaps even to within a factor of two), how many
    frames it has), in one decoding pass that holds at most 2n of them: every 25th frame at first (a second at 25
    fps); whenever 2n are held, every other one is dropped and the stride doubles."""
    held, stride, count = [], FPS, 0
    for count, (_, frame, aspect) in enumerate(video_frames(src), 1):
        if (count - 1) % stride == 0:
            held.append(np.asarray(upright(frame, aspect)))
            if len(held) == 2 * n:
                held, stride = held[::2], 2 * stride
    return [held[k] for k in np.linspace(0, len(held) - 1, min(n, len(held))).astype(int)], count


def _still_picture(src):
    """The refusal of a file of one frame with a sound track (a podcast's cover image): how long it shows is not
    read, nor worth learning."""
    return UserError(f"{src}: one frame, a still picture; a talking-head video is needed")


def prepare_video(src, size, box=None):
    """Convert one real talking-head video into a Video: 25 fps, a square crop resized to size x size, 16 kHz mono
    audio. The crop is `box` (x0, y0, x1, y1) in pixels of the source frame as shown (upright, square pixels), else
    the face find_face sees in FACE_SAMPLES frames spread over the video; meta.json records it. Raises UserError if
    the file is unreadable or silent or shows no one face."""
    if box is None:  # a first pass for the detector
        samples, count = spread_frames(src)
        if count == 1:  # (before the detector, whose advice would be to give its box)
            raise _still_picture(src)
        box = find_face(samples)
        if box is None:
            raise UserError(f"{src}: no face, or not one face, in most of {len(samples)} frames looked at (give its "
                            "box with --boxes)")

    def crop(image):  # each frame to size x size as it is decoded: only the small frames are kept
        if not (0 <= box[0] < box[2] <= image.width and 0 <= box[1] < box[3] <= image.height):
            raise UserError(f"{src}: the crop box {list(box)} is not inside the {image.width}x{image.height} frame")
        return square_image(image, size, box)
    frames, times = decode_frames(src, convert=crop)
    if len(frames) == 1:
        raise _still_picture(src)
    wav, audio_start = decode_audio(src)
    if np.sqrt(np.mean(wav ** 2)) < 1e-4:
        raise UserError(f"{src}: silent audio")
    # one origin for both streams, the first video frame: audio before it is cut, a late audio start is padded with
    # silence, so that sound and picture keep the offset they have in the file
    origin = times[0]
    lag = int(round((audio_start - origin) * SAMPLE_RATE))
    wav = np.concatenate([np.zeros(max(lag, 0), np.float32), wav[max(-lag, 0):]])
    times = np.array(times) - origin
    last = float(np.median(np.diff(times))) if len(times) > 1 else 1 / FPS  # how long the last frame is shown
    n = min(int(math.floor(len(wav) / SAMPLES_PER_FRAME)), int(round((times[-1] + last) * FPS)))
    if n < 1:
        raise UserError(f"{src}: shorter than one frame")
    keep = _resample_frames(times, n)
    meta = {"num_frames": n, "fps": FPS, "size": size, "source": str(Path(src).resolve()),
            "box": [float(v) for v in box]}
    return Video(np.stack([frames[k] for k in keep]), wav[:n * SAMPLES_PER_FRAME], meta)  # one copy, of the kept frames


VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v"}


def _prepared(path):
    """Whether a file is the video.mp4 of a video folder of the layout (save_video's: beside its audio.wav and a
    meta.json with a frame count), which an earlier prepare wrote."""
    folder = path.parent
    if path.name != "video.mp4" or not (folder / "audio.wav").is_file() or not (folder / "meta.json").is_file():
        return False
    try:
        _read_meta(folder / "meta.json")
    except UserError:
        return False
    return True


def _prepare_one(job):
    """Prepare and save one video of `prepare`: job = (src, folder, size, box). Returns the error's text, or None."""
    src, folder, size, box = job
    try:
        save_video(folder, prepare_video(src, size, box))
    except UserError as e:
        return str(e)
    return None


def prepare(raw_dir, out_dir, size=256, boxes=None, workers=1, shard=(0, 1)):
    """Convert every video under raw_dir (shard i of n: every n-th, from the i-th) into the layout under out_dir,
    in `workers` processes. Resumable: folders already complete are skipped. A file that is corrupt, silent or
    without a face is skipped. Returns (written, already done, [why each skipped file was skipped])."""
    if not Path(raw_dir).is_dir():  # else rglob finds nothing, and "no video files" would hide the mistake
        raise UserError(f"{raw_dir}: a file, not a folder of videos; pass the folder that holds it"
                        if Path(raw_dir).exists() else f"{raw_dir}: no such folder; pass the folder of raw videos")
    out = Path(out_dir).resolve()
    if out == Path(raw_dir).resolve() or out in Path(raw_dir).resolve().parents:
        raise UserError(f"{raw_dir}: inside the output folder {out_dir}; pass an output folder outside it")
    # not raw material: the output folder, if inside raw_dir, and any earlier output there; of a file with a second
    # name (a link), one name: its own
    named, done = {}, 0
    for p in sorted(Path(raw_dir).rglob("*"), key=lambda p: (p.is_symlink(), p)):
        if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file() and out not in p.resolve().parents:
            if _prepared(p):
                done += 1
            else:
                named.setdefault(p.resolve(), p)
    sources = sorted(named.values())
    if not sources and done:
        raise UserError(f"{raw_dir}: its {done} video(s) are already in the layout (video.mp4, audio.wav, meta.json, "
                        "as prepare and world.py write them); train on the folder itself: --data " + str(raw_dir))
    if not sources:
        raise UserError(f"{raw_dir}: no video files ({', '.join(sorted(VIDEO_EXTENSIONS))})")
    # every video gets a folder of its own: a/b.mp4 -> a__b, .c.mp4 -> c (VideoFolder skips names with a leading
    # dot: unfinished folders); two sources with one folder would lose one of them
    folders, key_of = {}, {}  # key: the path under raw_dir without the suffix, what --boxes names a video by
    for src in sources:
        key_of[src] = src.relative_to(raw_dir).with_suffix("").as_posix()
        name = key_of[src].replace("/", "__").lstrip(".")
        if not name:
            raise UserError(f"{src}: a name of dots only, which makes no folder name; rename it")
        try:  # the folder's name is also its cache file's and its name in JSON: it must be text
            name.encode()
        except UnicodeEncodeError:
            raise UserError(f"{src}: a name that is not UTF-8 text, which cache files and JSON cannot hold; rename "
                            "it") from None
        if len(name.encode()) > MAX_NAME - len(".pt"):  # its cache file, <name>.pt, is the longest name it gets
            raise UserError(f"{src}: makes a folder name of {len(name.encode())} bytes (a/b.mp4 -> a__b), more than "
                            f"the {MAX_NAME - len('.pt')} this allows; rename it or move it up")
        if name in folders:
            raise UserError(f"{folders[name]} and {src} would both be prepared into {out_dir}/{name}; rename one")
        folders[name] = src
    unknown = sorted(set(boxes or ()) - set(key_of.values()))
    if unknown:
        raise UserError(f"--boxes: {unknown[0]!r} names no video of {raw_dir} (name a video by its path under it "
                        "without the suffix: a/b for a/b.mp4)")
    name_of = {src: name for name, src in folders.items()}
    sources = sources[shard[0]::shard[1]]  # (none, for a shard beyond the number of videos: nothing to do)
    jobs = []
    for src in sources:
        folder = Path(out_dir) / name_of[src]
        box = None if boxes is None else boxes.get(key_of[src])
        if not (folder / "meta.json").exists():
            check_replaceable(folder)  # before any work: a file or folder of the user's in the way is never replaced
            jobs.append((src, folder, size, box))
            continue
        meta = _read_meta(folder / "meta.json")  # prepared before: from this video, unless another is still there
        theirs = Path(meta.get("source", src))  # (a source moved since, or renamed: taken to be this one)
        if theirs.exists() and not theirs.samefile(src):
            raise UserError(f"{src} would be prepared into {folder}, which holds another video, prepared from "
                            f"{theirs}; rename one, or prepare into another folder")
        if box is not None and meta.get("box") != [float(v) for v in box]:
            print(f"note: {folder} was prepared with another box, which it keeps; delete the folder to prepare it "
                  f"again with {list(box)}", file=sys.stderr)
    with output_folder(out):
        errors = [e for e in parallel_map(_prepare_one, jobs, workers, "prepare") if e is not None]
    return len(jobs) - len(errors), len(sources) - len(jobs), errors


def check_output(out, size, synthetic):
    """Refuse, before any work, an output folder of the layout that cannot be written, a frame size H.264 cannot
    take, or a folder of videos that training could not take together with these (`synthetic`: world.py's, with
    ground truth; else prepared ones): of another size, or of the other kind."""
    writable_folder(out, "output folder")
    if size % 2:
        raise UserError(f"--size {size}: must be even (H.264 needs even frame sizes)")
    earlier = next((m for m in Path(out).glob("*/meta.json") if not m.parent.name.startswith(".")), None)
    meta = _read_meta(earlier) if earlier else {}
    if meta.get("size") not in (None, size):  # training stacks frames of every video: one folder, one size
        raise UserError(f"{out} holds videos of {meta['size']} px ({earlier.parent.name}); add to it with --size "
                        f"{meta['size']} or pass another output folder")
    kinds = ("synthetic videos (world.py's)", "prepared videos (data.py prepare's)")
    if meta and any(key in meta for key in GROUND_TRUTH) != synthetic:  # one batch, one kind (train.py)
        raise UserError(f"{out} holds {kinds[synthetic]} ({earlier.parent.name}), which training does not mix with "
                        f"{kinds[not synthetic]}; pass another output folder")


# ----------------------------------------------------------------------------------------------------------------
# 2. Frame pools: the probe's frames


FRAMES_PER_VIDEO = 16  # frames taken from each video for a frame pool: many identities, few frames each
POOL_KEYS = ("frames", "openness", "blink", "pose")  # what the probe trains on (metrics.train_probe)


def build_frame_pool(videos, path):
    """About FRAMES_PER_VIDEO frames of every video (evenly spread over all their frames) with their ground truth,
    saved atomically in one file (the probe's training and test frames): {"frames": uint8 (N, H, W, 3),
    "openness", "roundness", "blink": (N,), "pose": (N, 3), "mouth_box": (N, 4)}. Returns that dict."""
    offsets = np.concatenate([[0], np.cumsum([videos.num_frames(v) for v in range(len(videos))])])
    picks = np.linspace(0, offsets[-1] - 1, min(len(videos) * FRAMES_PER_VIDEO, offsets[-1])).round().astype(int)
    video_of = np.searchsorted(offsets, picks, side="right") - 1
    parts = []
    for v in tqdm(np.unique(video_of), desc="frame pool", unit="video"):
        video, idx = videos[int(v)], picks[video_of == v] - offsets[v]
        parts.append({"frames": torch.from_numpy(video.frames[idx]),
                      **{k: torch.tensor(np.asarray(video.meta[k])[idx], dtype=torch.float32)
                         for k in GROUND_TRUTH if k in video.meta}})
    pool = {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
    save_torch(path, pool)
    return pool


def load_frame_pool(path):
    """The dict build_frame_pool saved at `path`; one without POOL_KEYS, of an older layout or of other shapes
    is refused."""
    pool = load_checkpoint(path, what="a frame pool", hint="; delete it, and it is built again")
    missing = [k for k in POOL_KEYS if k not in pool]
    if missing:
        raise UserError(f"{path}: a frame pool without {', '.join(missing)}; delete it, and it is built again")
    frames = pool["frames"]
    if isinstance(frames, torch.Tensor) and frames.dim() == 5:
        raise UserError(f"{path}: a frame pool of an older letstalk; delete it, and it is built again")
    n = frames.shape[0] if isinstance(frames, torch.Tensor) and frames.dim() else 0
    readings = {"openness": (n,), "blink": (n,), "pose": (n, 3)}
    fine = n > 0 and frames.dtype == torch.uint8 and frames.dim() == 4 and frames.shape[-1] == 3 and all(
        isinstance(pool[k], torch.Tensor) and tuple(pool[k].shape) == shape for k, shape in readings.items())
    if not fine:
        raise UserError(f"{path}: not a frame pool of uint8 frames (N, H, W, 3) with N openness, blink and pose "
                        "readings; delete it, and it is built again")
    return pool


# ----------------------------------------------------------------------------------------------------------------
# 3. Latents: one file per video, and fresh clips every step


def _cache_each(videos, cache, entry, desc, rank=0, world=1):
    """Write cache/<name>.pt = entry(video) for each video of a VideoFolder not cached yet, or cached from another
    preparation of that name (_cached). Rank r of `world` takes videos r, r + world, ...; each file is written
    atomically, so a killed run continues with the videos not yet done. Returns how many this rank wrote."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(rank, len(videos), world) if not _cached(cache / f"{videos.folders[i].name}.pt",
                                                                      videos.folders[i])]
    stale = sum((cache / f"{videos.folders[i].name}.pt").exists() for i in todo)
    if stale:  # (each rank of its own share)
        print(f"note: {cache}: {stale} cached videos are not those of the videos now (prepared or rendered again "
              "since, cached by an older letstalk, or unreadable); making them again", file=sys.stderr)
    for i in tqdm(todo, desc=desc, unit="video", disable=rank > 0 or not todo):
        item = entry(videos[i])
        save_torch(cache / f"{videos.folders[i].name}.pt", {**item, "source": _source(videos.folders[i])})
    return len(todo)


def _source(folder):
    """What a cache file records of the video it was made from: a checksum of its meta.json (source file, frame
    count, frame size, crop box; a synthetic video's whole script), which changes when the folder is prepared or
    rendered from other material (the cache is named after the folder, not its contents). Copying, touching or
    rendering the same videos again changes nothing (video.mp4's bytes would: H.264 encodes differ from run to
    run). A raw file replaced by another of the same name, length and box goes unseen. -> int64 (1,)."""
    return torch.tensor([zlib.crc32((Path(folder) / "meta.json").read_bytes())])


def videos_fingerprint(named_sources):
    """A checksum of which videos and of what each was made from, from (name, _source) pairs: it changes when a
    video is added, removed, renamed or prepared again, which counts alone can miss. -> int."""
    return zlib.crc32(";".join(f"{name}:{source.tolist()}" for name, source in named_sources).encode())


def _cached(path, folder):
    """Whether the cache file `path` holds video `folder` as it is now. One made from an earlier preparation of
    that name (other frames, another size), by an older letstalk, or truncated or unreadable is not: it is made
    again. (Bytes changed inside a whole file are not found: that would read every file at every start.)"""
    if not path.exists():
        return False
    try:
        source = load_checkpoint(path, needs=("source",), mmap=True)["source"]
    except UserError:
        return False
    return isinstance(source, torch.Tensor) and source.tolist() == _source(folder).tolist()


FRAME_EVERY = 8  # the VAE stage keeps every 8th frame of every video (~3 per second): ~600 KB per second at 256 px


def cache_frames(videos, cache, rank=0, world=1):
    """The VAE stage's frames: cache/<name>.pt holds frames uint8 (ceil(N / FRAME_EVERY), H, W, 3), every
    FRAME_EVERY-th frame of the video, and its source (resumable, each rank its share, as _cache_each). Returns how
    many this rank wrote."""
    return _cache_each(videos, cache, lambda video: {"frames": torch.from_numpy(video.frames[::FRAME_EVERY].copy())},
                       "cache frames", rank, world)


def encode_videos(videos, vae, cache, device, rank=0, world=1):
    """Encode the videos of a VideoFolder with the VAE, once: cache/<name>.pt holds latents fp16 (N, C, h, w)
    (scaled to unit variance), mel fp16 (N, 20, 80), the per-frame ground truth of synthetic videos and the source
    (resumable, each rank its share, as _cache_each). Returns how many this rank encoded."""
    @torch.no_grad()
    def encode(video):
        x = to_tensor(video.frames)
        z = torch.cat([vae.encode(chunk.to(device)) for chunk in x.split(64)]) * vae.latent_scale
        item = {"latents": z.half().cpu(), "mel": audio_features(video.wav, len(video.frames)).half()}
        item.update({k: torch.tensor(np.asarray(video.meta[k]), dtype=torch.float32) for k in GROUND_TRUTH
                     if k in video.meta})
        return item
    return _cache_each(videos, cache, encode, "encode videos", rank, world)


class VideoCache:
    """The videos `names` cached in the folder `cache` (by encode_videos: key "latents"; by cache_frames: key
    "frames"), memory-mapped: opening reads no data, a rank's memory does not grow with the dataset, and the ranks
    of one node share the page cache. entries[i] is video i's dict; lengths[i] the length of its `key`."""

    def __init__(self, cache, names, key="latents"):
        self.names = list(names)
        self.entries = [load_checkpoint(Path(cache) / f"{name}.pt", needs=(key,), what="a cached video",
                                        hint="; delete it, and it is made again", mmap=True) for name in names]
        self.lengths = np.array([len(e[key]) for e in self.entries])
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])  # global index of (video, position)

    def fingerprint(self):
        """videos_fingerprint of the videos the cache holds, as they were when cached. -> int."""
        return videos_fingerprint((name, entry["source"]) for name, entry in zip(self.names, self.entries))

    def locate(self, index):
        """Global positions (int array) -> (video, position within it) int arrays."""
        video = np.searchsorted(self.offsets, index, side="right") - 1
        return video, index - self.offsets[video]


class ClipSampler:
    """Fresh training clips from a VideoCache, for every slot of every step, as the official code's dataset draws
    them: a video, weighted by its number of valid starts, a start, the F consecutive frames from it (the official
    frame_interval is 1), the M motion frames before them, and a reference frame from outside them all. Clips
    holding a blink (synthetic ground truth) count `blink_repeat` times, since a small model under-produces rare
    blinks. Every draw is a pure function of (seed, step, rank) and its slot in the batch, so --resume continues
    exactly and the ranks draw different clips."""

    def __init__(self, cache, frames, motion, seed=0, blink_repeat=1):
        self.cache, self.F, self.M, self.seed = cache, frames, motion, seed
        weight = np.zeros(cache.offsets[-1])  # of every (video, start); 0 where no clip starts
        for v, (entry, n) in enumerate(zip(cache.entries, cache.lengths)):
            starts = np.arange(motion, n - frames + 1)
            clip_weight = np.ones(len(starts))
            if blink_repeat > 1 and "blink" in entry:
                blinks = (entry["blink"] > 0.5).numpy()
                clip_weight[blinks[starts[:, None] + np.arange(frames)[None]].any(1)] = blink_repeat
            weight[cache.offsets[v] + starts] = clip_weight
        if not weight.any():
            raise UserError(f"no video is long enough for {frames} frames and {motion} motion frames")
        self.cumulative = np.cumsum(weight)

    def draws(self, step, rank, n):
        """The n clips rank `rank` trains on at `step`: (video, start, ref) int arrays of length n."""
        rng = np.random.default_rng([self.seed, step, rank])
        picks = np.searchsorted(self.cumulative, rng.random(n) * self.cumulative[-1], side="right")
        video, start = self.cache.locate(picks)
        # the reference: a frame outside motion frames and clip where the video has one, else any frame
        lo, hi = start - self.M, start + self.F - 1
        n_frames = self.cache.lengths[video]
        outside = n_frames - (hi - lo + 1)
        k = (rng.random(n) * np.maximum(outside, 1)).astype(int)
        ref = np.where(outside > 0, np.where(k < lo, k, k + (hi - lo + 1)), (rng.random(n) * n_frames).astype(int))
        return video, start, ref

    def batch(self, step, rank, n):
        """The clips of draws(step, rank, n) as a batch of float tensors: latents (n, F, C, h, w), ref (n, C, h, w),
        motion (n, M, C, h, w), mel (n, F, 20, 80), and the ground truth of the clip's frames where the data has
        it."""
        items = []
        for v, s, r in zip(*self.draws(step, rank, n)):
            entry, idx = self.cache.entries[v], s + np.arange(self.F)
            item = {"latents": entry["latents"][idx], "ref": entry["latents"][r],
                    "motion": entry["latents"][s - np.arange(self.M, 0, -1)], "mel": entry["mel"][idx]}
            item.update({k: entry[k][idx] for k in GROUND_TRUTH if k in entry})
            items.append(item)
        return {k: torch.stack([item[k] for item in items]).float() for k in items[0]}


# ----------------------------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    """`python data.py prepare RAW OUT`: convert real talking-head videos to the on-disk layout (argv=None:
    sys.argv)."""
    parser = Parser(prog="data.py", description="Make LetsTalk training data in the on-disk layout "
                    "ROOT/<video>/{video.mp4, audio.wav, meta.json} (synthetic videos: `python world.py`).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="convert real talking-head videos (HDTF, CelebV-HQ...)",
                       formatter_class=HelpFormatter,
                       description="Convert every video under RAW (any fps, resolution and container, with sound) "
                       "to 25 fps, a square crop around the face resized to --size, and 16 kHz mono audio. The face "
                       "is found by OpenCV's Haar cascade in 8 frames spread over each video (at most one in 25) "
                       "(the box is kept in meta.json). "
                       "Corrupt or silent files, still pictures, and videos without one face in most of those frames "
                       "(none, or the largest face moving between people), are skipped with a warning; rerunning "
                       "resumes where an interrupted run stopped.")
    p.add_argument("raw", type=Path, help="folder of raw videos (searched recursively)")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--size", type=bounded(int, 16, 2048), default=256,
                   help="output frame size, even (256 is the paper's)")
    p.add_argument("--boxes", type=Path, help="JSON file {video: [x0, y0, x1, y1]} of square crop boxes in pixels "
                   "of the source frame as shown (upright, in square pixels), for the videos whose box the detector "
                   "should not choose; a video is named by its path under RAW without the suffix (a/b for "
                   "RAW/a/b.mp4)")
    p.add_argument("--workers", type=bounded(int, 1, 1024),
                   help="videos prepared at once, in worker processes: up to this many and at most one per 4 videos "
                   "(under 8 videos: none, this process prepares them) (default: one per core)")
    p.add_argument("--shard", default="0/1", help="i/n: prepare every n-th video from the i-th, so that n machines "
                   "share a dataset (default: 0/1, all of them)")
    args = parser.parse_args(argv)
    with user_errors():
        check_output(args.out, args.size, synthetic=False)
        i, _, n = args.shard.partition("/")
        if not (i.isascii() and i.isdigit() and n.isascii() and n.isdigit() and int(i) < int(n)):
            raise UserError(f"--shard {args.shard}: give i/n with 0 <= i < n, e.g. 0/4")
        shard = (int(i), int(n))
        boxes = None
        if args.boxes is not None:
            if not args.boxes.is_file():
                raise UserError(f"{args.boxes}: cannot read crop boxes "
                                f"({'not a regular file' if args.boxes.exists() else 'no such file'})")
            try:
                boxes = {k: tuple(v) for k, v in json.loads(args.boxes.read_text()).items()}
            except (OSError, ValueError, TypeError, AttributeError, RecursionError) as e:
                raise UserError(f"{args.boxes}: cannot read crop boxes ({e})") from None
            wrong = next((k for k, v in boxes.items() if not _valid_box(v)), None)
            if wrong is not None:
                raise UserError(f"{args.boxes}: the box of {wrong} is {list(boxes[wrong])}, not [x0, y0, x1, y1] "
                                "with 0 <= x0 < x1 and 0 <= y0 < y1, a square in pixels of the source frame as shown")
        written, done, errors = prepare(args.raw, args.out, args.size, boxes, args.workers, shard)
        if errors and not written and not done:
            raise UserError(f"no video of {args.raw} could be prepared ({len(errors)} skipped); the first: {errors[0]}")
        for error in errors:
            print(f"warning: skipped {error}", file=sys.stderr)
        print(f"prepared {written}, already done {done}, skipped {len(errors)} (unreadable, silent or without one "
              "face)")


def _valid_box(box):
    """A crop box of --boxes: four finite numbers x0 < x1, y0 < y1, none negative or beyond any video's size, and
    square to within a pixel (a wider box would be squeezed into the square frame, stretching the face)."""
    return (len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
            and all(0 <= v <= 100_000 and math.isfinite(v) for v in box) and box[0] < box[2] and box[1] < box[3]
            and abs((box[2] - box[0]) - (box[3] - box[1])) <= 1)


if __name__ == "__main__":
    main()
