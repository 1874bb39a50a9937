"""The synthetic talking-face world: where every CPU test and the shipped demo checkpoint live.

Faces drawn by our own code whose mouth opening follows real synthesized speech, with random blinks and head
motion and per-frame ground truth, all deterministic given a seed:

1. speech: random English sentences spoken by espeak-ng (`speak`, `utterance`);
2. people: identities with their own face shape and colours (`identity`), split by index ranges so that training,
   validation and test never share a person or a sentence (`SPLITS`);
3. what happens: the mouth follows the speech (`mouth_track`), blinks and head pose do not (`motion_track`);
4. drawing: `render_frame`, `synth_video`, and `SyntheticVideos` (a split rendered on access).

`python world.py OUT --videos 8` writes synthetic videos in data.py's on-disk layout.
"""

import base64
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from audio import FPS, SAMPLE_RATE, frame_loudness, resample
from common import MAX_SEED, HelpFormatter, Parser, bounded, output_folder, parallel_map, save_png, user_errors
from data import Video, check_output, check_replaceable, held_out, save_video

# ----------------------------------------------------------------------------------------------------------------
# 1. Speech. espeak-ng's library and voice data ship inside the `espeakng-loader` wheel; we drive its C API
#    through ctypes (synchronous mode, a callback that collects the samples and the phoneme events). Each call runs
#    in a fresh Python process: the engine keeps state across syntheses (the phase of its pitch flutter is a static
#    variable in wavegen.c that nothing resets), so in one long-lived process the same sentence would come out
#    differently depending on what was spoken before it.
_ESPEAK_WORKER = r"""
import base64, ctypes, json, sys
import espeakng_loader
request = json.load(sys.stdin)
lib = ctypes.CDLL(espeakng_loader.get_library_path())
class Event(ctypes.Structure):  # espeak_EVENT in speak_lib.h
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]
buf = {}
@ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(Event))
def callback(wav, n, events):
    buf["samples"] += ctypes.string_at(wav, 2 * max(n, 0))
    i = 0
    while events[i].type != 0:  # espeakEVENT_LIST_TERMINATED
        if events[i].type == 7:  # espeakEVENT_PHONEME: audio_position in ms, id the phoneme mnemonic
            buf["phonemes"].append((events[i].audio_position / 1000, events[i].id.decode("ascii", "replace")))
        i += 1
    return 0
# AUDIO_OUTPUT_SYNCHRONOUS = 2, espeakINITIALIZE_PHONEME_EVENTS = 1
rate = lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 1)
lib.espeak_SetSynthCallback(callback)
lib.espeak_ng_SetRandSeed(request["seed"])
if lib.espeak_SetVoiceByName(request["voice"].encode()) != 0:
    sys.exit("espeak-ng has no voice " + request["voice"])
lib.espeak_SetParameter(1, request["rate"], 0)  # espeakRATE, words per minute
lib.espeak_SetParameter(3, request["pitch"], 0)  # espeakPITCH, 0..99
speech = []
for text in request["sentences"]:
    buf["samples"], buf["phonemes"] = bytearray(), []
    encoded = text.encode()
    lib.espeak_Synth(encoded, len(encoded) + 1, 0, 0, 0, 0, None, None)
    speech.append({"samples": base64.b64encode(bytes(buf["samples"])).decode(), "phonemes": buf["phonemes"]})
json.dump({"rate": rate, "speech": speech}, sys.stdout)
"""


def speak(sentences, voice="en-us", rate=160, pitch=50, seed=0):
    """Synthesize English sentences with espeak-ng, deterministically.

    voice is a language with an optional variant ("en-us+f2"), rate in words per minute, pitch 0..99.
    Returns one (wav float32 (T,) at 16 kHz, [(time_s, phoneme), ...]) per sentence.
    """
    request = json.dumps({"sentences": sentences, "voice": voice, "rate": int(rate), "pitch": int(pitch),
                          "seed": int(seed)})
    done = subprocess.run([sys.executable, "-c", _ESPEAK_WORKER], input=request, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"espeak-ng failed: {done.stderr.strip()[-300:]}")
    reply = json.loads(done.stdout)
    return [(resample(np.frombuffer(base64.b64decode(s["samples"]), "<i2") / 32768, reply["rate"], SAMPLE_RATE),
             [tuple(p) for p in s["phonemes"]]) for s in reply["speech"]]


# A tiny grammar for random sentences: enough variety of phonemes and rhythm, nothing to download.
_WORDS = {
    "det": "the a my your this that every one some our".split(),
    "adj": "small big old young green bright quiet happy heavy simple golden broken gentle hungry early wooden "
           "silver strange tired clever".split(),
    "noun": "dog house river teacher window garden city morning letter music mountain kitchen doctor bicycle "
            "picture story engine ocean village machine friend summer table orange paper voice market".split(),
    "verb": "finds opens watches carries follows paints builds reads remembers moves answers visits cleans "
            "pushes catches needs".split(),
    "adv": "slowly quickly always never often quietly gladly suddenly carefully today again".split(),
    "prep": "near under behind beside over through across inside".split(),
}
VOICES = ["en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc"]
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2", "klatt3"]


def random_sentence(rng):
    """A random English sentence from a small grammar, e.g. 'the old dog slowly opens a green window near ...'."""
    pick = lambda kind: _WORDS[kind][rng.integers(len(_WORDS[kind]))]  # noqa: E731

    def phrase():
        return " ".join([pick("det")] + ([pick("adj")] if rng.random() < 0.6 else []) + [pick("noun")])
    words = [phrase(), pick("adv") if rng.random() < 0.4 else "", pick("verb"), phrase()]
    if rng.random() < 0.5:
        words += [pick("prep"), phrase()]
    return " ".join(w for w in words if w) + "."


# ----------------------------------------------------------------------------------------------------------------
# 2. People. Identities and utterances are split by index ranges, so the splits can never share one.
SPLITS = {"train": (0, 1000), "val": (1000, 1050), "test": (1050, 1100)}
UTTERANCE_SPLITS = {"train": (0, 100000), "val": (100000, 101000), "test": (101000, 102000)}


@dataclass
class Identity:
    """The look of one synthetic person. Colours are RGB in 0..255; sizes are fractions of the frame."""
    id: int
    skin: tuple
    hair: tuple
    hair_style: int  # 0 short, 1 long (to the shoulders), 2 bald with a fringe of hair at the sides
    eyes: tuple
    lips: tuple
    clothes: tuple
    background: tuple
    face_w: float  # half-width of the face ellipse
    face_h: float  # half-height
    mouth_w: float  # half-width of the mouth as a fraction of the face half-width
    eye_gap: float  # eye centre offset from the face centre line, fraction of the face half-width

    @classmethod
    def from_meta(cls, fields):
        """The Identity a video's meta.json stores (as asdict wrote it: its colours became lists)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


_HAIR = np.array([(20, 15, 10), (60, 35, 20), (110, 70, 35), (170, 120, 60), (220, 190, 120), (150, 150, 150),
                  (120, 40, 20), (230, 230, 225)], float)  # black, browns, blond, grey, red, white


def identity(index, seed=0):
    """The person with global index `index` (see SPLITS for which indices belong to which split)."""
    rng = np.random.default_rng([seed, 1, index])

    def colour(lo, hi, saturation=1.0):  # a random colour, pulled towards its grey by 1 - saturation
        c = rng.uniform(lo, hi, 3)
        return tuple(int(x) for x in c.mean() + saturation * (c - c.mean()))
    tone = rng.uniform(0.25, 1.0)  # skin from dark to light, slightly warm
    skin = (int(90 + 160 * tone), int(60 + 140 * tone), int(40 + 120 * tone))
    hair = _HAIR[rng.integers(len(_HAIR))] * rng.uniform(0.8, 1.2)  # natural shades, slightly varied
    return Identity(index, skin, tuple(int(c) for c in hair.clip(0, 255)), int(rng.integers(3)), colour(20, 160),
                    (int(rng.integers(140, 210)), int(rng.integers(40, 90)), int(rng.integers(50, 100))),
                    colour(20, 240, 0.6), colour(20, 240, 0.5), rng.uniform(0.27, 0.32), rng.uniform(0.35, 0.40),
                    rng.uniform(0.34, 0.42), rng.uniform(0.36, 0.44))


_ROUNDED, _SPREAD = set("uUoO0w"), set("iIeEa@")


# ----------------------------------------------------------------------------------------------------------------
# 3. What happens: the mouth follows the speech; blinks and the head move on their own


def _roundness(phoneme):
    """Lip rounding of a phoneme mnemonic: 1 for rounded vowels (u, o), 0 for spread ones (i, e, a), else None."""
    p = phoneme.lstrip("',%=")
    return None if not p else 1.0 if p[0] in _ROUNDED else 0.0 if p[0] in _SPREAD else None


def utterance(index, seconds, seed=0):
    """Speech for one synthetic video: random sentences in a random espeak-ng voice, exactly `seconds` long.

    Returns (wav (T,) float32 at 16 kHz, phoneme events [(time_s, phoneme)], info dict with text and voice).
    Sentences are spoken one after another with short pauses until the time is filled; the last is cut.
    """
    rng = np.random.default_rng([seed, 2, index])
    voice = f"{VOICES[rng.integers(len(VOICES))]}+{VARIANTS[rng.integers(len(VARIANTS))]}"
    rate, pitch = int(rng.integers(130, 200)), int(rng.integers(25, 80))
    n = int(round(seconds * SAMPLE_RATE))
    pieces, events, texts, t = [], [], [], 0
    while t < n:  # sentences last 1.5-4 s: ask for enough at once, and again if they fall short
        batch = [random_sentence(rng) for _ in range(int(seconds / 1.5) + 1)]
        for text, (wav, phonemes) in zip(batch, speak(batch, voice, rate, pitch, seed=index)):
            if t >= n:
                break
            pause = np.zeros(int(rng.uniform(0.1, 0.5) * SAMPLE_RATE), np.float32)
            events += [((t + len(pause)) / SAMPLE_RATE + time, p) for time, p in phonemes]
            pieces += [pause, wav]
            texts.append(text)
            t += len(pause) + len(wav)
    wav = np.concatenate(pieces)[:n]
    wav = wav / max(1e-3, np.abs(wav).max()) * rng.uniform(0.3, 0.9)  # random recording level
    wav = wav + rng.normal(0, 10 ** (-60 / 20), n).astype(np.float32)  # a faint noise floor, as in real rooms
    return wav.astype(np.float32), events, {"text": " ".join(texts), "voice": voice, "rate": rate, "pitch": pitch}


def mouth_track(wav, phonemes, n_frames):
    """Per-frame mouth ground truth from the speech: (openness (n,), roundness (n,)), both in [0, 1].

    Openness follows loudness relative to the utterance: 0 at 30 dB or more below its loud parts (95th
    percentile), 1 from 4 dB below them. Roundness comes from the vowel being spoken (u/o rounded, i/e/a spread),
    held through consonants, and eases back to neutral 0.3 in silence.
    """
    db = frame_loudness(wav, n_frames)
    openness = np.clip((db - np.percentile(db, 95) + 30) / 26, 0, 1)
    roundness, current, k = np.full(n_frames, 0.3), 0.3, 0
    for i in range(n_frames):
        t = (i + 0.5) / FPS
        while k < len(phonemes) and phonemes[k][0] <= t:
            r = _roundness(phonemes[k][1])
            current = current if r is None else r
            k += 1
        current = current if openness[i] > 0 else 0.3 + 0.5 * (current - 0.3)
        roundness[i] = current
    return openness, roundness


POSE_SCALE = (0.03, 0.02, 5.0)  # the head pose's typical size: dx, dy (fractions of the frame), roll (degrees)


def motion_track(n_frames, rng):
    """Audio-independent motion, the paper's 'diversity': blinks (n,) in [0, 1] and head pose (n, 3).

    Blinks come every 1.5-5 s and close the eyes over 5 frames. The pose (dx, dy as fractions of the frame,
    roll in degrees) is a slow mean-reverting random walk (Ornstein-Uhlenbeck).
    """
    blink = np.zeros(n_frames)
    t = int(rng.integers(0, 2 * FPS))
    while t < n_frames:
        for j, v in enumerate((0.4, 0.9, 1.0, 0.8, 0.3)):
            if t + j < n_frames:
                blink[t + j] = v
        t += int(rng.uniform(1.5, 5.0) * FPS)
    pose, state = np.zeros((n_frames, 3)), rng.normal(0, 1, 3) * 0.5
    scale = np.array(POSE_SCALE)
    for i in range(n_frames):
        state = 0.95 * state + rng.normal(0, 0.3, 3)
        pose[i] = np.clip(state, -2, 2) * scale
    return blink, pose


# ----------------------------------------------------------------------------------------------------------------
# 4. Drawing


def _ellipse(draw, cx, cy, rx, ry, fill):
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)


def render_frame(ident, size, openness, roundness, blink, pose):
    """Draw one frame of a synthetic person. Returns (uint8 image (size, size, 3), mouth box (x0, y0, x1, y1)).

    The face fills most of the frame, like aligned talking-head crops. The mouth is big and dark inside, so at
    64x64 its opening spans several latent pixels of a 4x VAE. The head layer is drawn upright at 4x (2x for
    256 and up) then rotated and shifted by the pose and downsampled, which antialiases every edge.
    """
    ss = 4 if size < 256 else 2
    S = size * ss
    canvas = Image.new("RGB", (S, S), ident.background)
    draw = ImageDraw.Draw(canvas)
    shade = tuple(int(c * 0.75) for c in ident.background)
    draw.rectangle([0, int(S * 0.75), S, S], fill=shade)  # a wall edge, so the background is not flat
    _ellipse(draw, S / 2, S * 1.08, S * 0.48, S * 0.26, ident.clothes)  # shoulders

    head = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    mask = Image.new("L", (S, S), 0)  # the mouth alone, to measure its box after the head moves
    d, dm = ImageDraw.Draw(head), ImageDraw.Draw(mask)
    cx, cy, fw, fh = S / 2, S * 0.46, S * ident.face_w, S * ident.face_h
    darker = tuple(int(c * 0.8) for c in ident.skin)
    d.rectangle([cx - fw * 0.35, cy + fh * 0.6, cx + fw * 0.35, S * 0.95], fill=darker)  # neck
    if ident.hair_style == 1:
        d.rectangle([cx - fw * 1.15, cy - fh * 0.3, cx + fw * 1.15, cy + fh * 1.1], fill=ident.hair)
    if ident.hair_style != 2:
        _ellipse(d, cx, cy - fh * 0.12, fw * 1.12, fh * 1.0, ident.hair)
    else:
        _ellipse(d, cx, cy, fw * 1.08, fh * 0.6, ident.hair)
    _ellipse(d, cx, cy, fw, fh, ident.skin)  # the face
    if ident.hair_style != 2:  # a fringe: the top of the hair ellipse over the forehead
        d.chord([cx - fw * 1.05, cy - fh * 1.12, cx + fw * 1.05, cy - fh * 0.25], 180, 360, fill=ident.hair)
    for side in (-1, 1):  # eyes, blinking: the eyelid (skin) covers the eye from the top
        ex, ey, erx, ery = cx + side * fw * ident.eye_gap, cy - fh * 0.12, fw * 0.2, fh * 0.1
        _ellipse(d, ex, ey, erx, ery, (245, 245, 240))
        _ellipse(d, ex, ey, ery * 0.9, ery * 0.9, ident.eyes)
        _ellipse(d, ex, ey, ery * 0.4, ery * 0.4, (10, 10, 10))
        if blink > 0:
            d.rectangle([ex - erx * 1.1, ey - ery * 1.2, ex + erx * 1.1, ey - ery * 1.2 + 2.4 * ery * blink],
                        fill=ident.skin)
        d.line([ex - erx, ey - ery * 1.9, ex + erx, ey - ery * 2.1 + side * ery * 0.2], fill=ident.hair,
               width=max(1, int(ery * 0.5)))  # eyebrow
    d.polygon([(cx, cy + fh * 0.05), (cx - fw * 0.12, cy + fh * 0.3), (cx + fw * 0.12, cy + fh * 0.3)], fill=darker)
    # The mouth: lips around a dark interior whose height is the openness; rounded vowels make it narrower.
    mx, my = cx, cy + fh * 0.52
    mw = fw * ident.mouth_w * (1.1 - 0.3 * roundness)
    mh = fh * (0.04 + 0.2 * openness)
    lip = fh * 0.06
    for dr in (d, dm):
        _ellipse(dr, mx, my, mw + lip, mh + lip, ident.lips if dr is d else 255)
    _ellipse(d, mx, my, mw, mh, (40, 5, 10))
    if openness < 0.15:  # nearly closed: the line where the lips meet
        d.line([mx - mw, my, mx + mw, my], fill=(60, 10, 20), width=max(1, int(lip * 0.6)))

    dx, dy, roll = pose
    shift = (dx * S, dy * S)
    head = head.rotate(roll, Image.BICUBIC, center=(cx, cy + fh * 0.6), translate=shift)
    mask = mask.rotate(roll, Image.BILINEAR, center=(cx, cy + fh * 0.6), translate=shift)
    canvas.paste(head, (0, 0), head)
    box = np.array(mask.getbbox() or (0, 0, 0, 0), np.float32) / ss
    return np.asarray(canvas.reduce(ss)), box


def synth_script(split="train", index=0, seconds=4.0, seed=0):
    """What happens in synthetic video `index` of `split`, before anything is drawn: (Identity, wav, meta).

    The person and the utterance are drawn from the split's own ranges (SPLITS, UTTERANCE_SPLITS). meta holds
    the per-frame ground truth: openness, roundness, blink (each (N,)) and pose (N, 3).
    """
    rng = np.random.default_rng([seed, 3, list(SPLITS).index(split), index])
    lo, hi = SPLITS[split]
    ident = identity(int(rng.integers(lo, hi)), seed)
    lo, hi = UTTERANCE_SPLITS[split]
    n = int(round(seconds * FPS))  # whole frames, and the speech of exactly those (0.059 s: one frame, 40 ms)
    wav, phonemes, info = utterance(int(rng.integers(lo, hi)), n / FPS, seed)
    openness, roundness = mouth_track(wav, phonemes, n)
    blink, pose = motion_track(n, rng)
    meta = {"num_frames": n, "fps": FPS, "split": split, "index": index, "seed": seed, "identity": asdict(ident),
            **info, "openness": openness.tolist(), "roundness": roundness.tolist(), "blink": blink.tolist(),
            "pose": pose.tolist()}
    return ident, wav, meta


def synth_video(split="train", index=0, seconds=4.0, size=64, seed=0):
    """Render synthetic video `index` of `split`. Deterministic given (split, index, seconds, size, seed).

    meta is synth_script's plus the size and mouth_box (N, 4): the mouth's box in pixels, measured on the frame.
    """
    ident, wav, meta = synth_script(split, index, seconds, seed)
    tracks = zip(meta["openness"], meta["roundness"], meta["blink"], meta["pose"])
    frames, boxes = zip(*(render_frame(ident, size, *state) for state in tracks))
    return Video(np.stack(frames), wav, {**meta, "size": size, "mouth_box": np.stack(boxes).tolist()})


class SyntheticVideos:
    """`n` synthetic videos of one split, rendered on access (no files), as a sequence of Video."""

    def __init__(self, split="train", n=100, seconds=4.0, size=64, seed=0):
        self.split, self.n, self.seconds, self.size, self.seed = split, n, seconds, size, seed

    def __len__(self):
        return self.n

    def num_frames(self, i):
        """Frame count of video i: seconds * 25, the same for every video (nothing is rendered)."""
        return int(round(self.seconds * FPS))

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return synth_video(self.split, i, self.seconds, self.size, self.seed)


def _write(job):
    """Render and save one video of render_folder: job = (folder, split, index, seconds, size, seed)."""
    folder, split, index, seconds, size, seed = job
    save_video(folder, synth_video(split, index, seconds, size, seed))


def render_folder(root, n, seconds, size, seed=0, workers=None):
    """Write n synthetic videos of `seconds` at `size` into root, in data.py's layout, once and in parallel worker
    processes (default: one per core): video i is root/<i:05d>, showing the validation split's people and sentences
    when VideoFolder holds it out (data.held_out) and the training split's otherwise. Videos already there are
    kept, so an interrupted render continues. Returns root."""
    root, val = Path(root), set(held_out(n))
    jobs = [(root / f"{i:05d}", "val" if i in val else "train", i, seconds, size, seed) for i in range(n)
            if not (root / f"{i:05d}" / "meta.json").exists()]
    with output_folder(root):
        parallel_map(_write, jobs, workers, "render videos")
    return root


def main(argv=None):
    """`python world.py OUT`: write synthetic talking-face videos in data.py's on-disk layout (argv=None:
    sys.argv)."""
    parser = Parser(prog="world.py", formatter_class=HelpFormatter,
                    description="Render synthetic talking faces speaking espeak-ng sentences into the on-disk layout "
                    "OUT/<split>_<index>/{video.mp4, audio.wav, meta.json}, with per-frame ground truth (mouth "
                    "openness, blink, head pose, mouth box) in meta.json.")
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--videos", type=bounded(int, 1, 100_000), default=8, help="number of videos")
    parser.add_argument("--seconds", type=bounded(float, 1 / FPS, 600), default=4.0, help="length of each video in "
                        "seconds, at least one frame")
    parser.add_argument("--size", type=bounded(int, 16, 1024), default=64, help="frame size in pixels, even (64 for "
                        "CPU, 256 as the paper)")
    parser.add_argument("--split", choices=list(SPLITS), default="train",
                        help="identities and sentences of this split (they never overlap across splits; "
                        "train.py --data on this folder holds out every 20th video, whose people may recur in the "
                        "others: --data synthetic renders its held-out videos from the val split)")
    parser.add_argument("--seed", type=bounded(int, 0, MAX_SEED), default=0,
                        help="world seed; the same seed gives the same videos")
    parser.add_argument("--still", action="store_true", help="also write each video's first frame as still.png (a "
                        "portrait for sample.py)")
    args = parser.parse_args(argv)
    with user_errors():
        check_output(args.out, args.size, synthetic=True)
        folders = [args.out / f"{args.split}_{i:05d}" for i in range(args.videos)]
        for folder in folders:  # before any work: a file or folder of the user's in the way is never replaced
            check_replaceable(folder)
        with output_folder(args.out):
            for i, folder in enumerate(tqdm(folders, desc="synth", unit="video")):
                video = synth_video(args.split, i, args.seconds, args.size, args.seed)
                save_video(folder, video)
                if args.still:
                    save_png(folder / "still.png", video.frames[0])
        print(f"wrote {args.videos} videos to {args.out}")


if __name__ == "__main__":
    main()
