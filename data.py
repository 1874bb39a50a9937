"""Data for LetsTalk: audio features, a synthetic talking-face world, real videos, and clip datasets.

Everything the model eats comes from here:

1. Audio I/O and features from scratch: a WAV reader for every common encoding, band-limited resampling to
   16 kHz, and a log-mel spectrogram (STFT + triangular mel filterbank) cut into per-video-frame windows.
2. A synthetic talking-face world (numpy + PIL + the espeak-ng speech synthesizer, no system package): faces
   drawn by our code whose mouth opening follows real synthesized speech, with random blinks and head motion
   and per-frame ground truth. Every CPU test and the shipped demo checkpoint live in this world.
3. One on-disk layout for synthetic and real data: OUT/<video>/{video.mp4, audio.wav, meta.json}.
   `python data.py synth` writes synthetic videos in it; `python data.py prepare` converts real talking-head
   videos (HDTF / CelebV-HQ style) into it.
4. ClipDataset: F-frame training clips with a reference frame, motion frames and aligned mel windows.

Run `python data.py --help` for the command line.
"""

import argparse
import base64
import json
import math
import os
import shutil
import subprocess
import sys
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------------------
# Constants shared by every file. Video runs at 25 fps and audio at 16 kHz, as in HDTF and the official code;
# a 10 ms mel hop gives each video frame exactly 4 mel frames.

FPS = 25
SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
HOP = 160  # 10 ms
WIN = 400  # 25 ms analysis window
N_FFT = 1024  # zero-padded FFT, so even the narrowest low mel filter covers at least one frequency bin
N_MELS = 80
MELS_PER_FRAME = SAMPLES_PER_FRAME // HOP  # 4
AUDIO_MARGIN = 2  # video frames of audio context on each side (the official code's audio margin)
MEL_WINDOW = (2 * AUDIO_MARGIN + 1) * MELS_PER_FRAME  # 20 mel frames per video frame


class DataError(ValueError):
    """A user-facing problem with an input file (unreadable, truncated, empty...). The CLIs exit with status 2."""


def check_device(name):
    """torch.device(name) if this machine has it, else a DataError that says what to pass instead."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DataError(f"--device {name}: not a device; pass cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name}: this machine has no CUDA GPU; pass --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DataError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise DataError(f"--device {name}: only cpu and cuda are supported")
    return device


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


class Parser(argparse.ArgumentParser):
    """The command-line parser of every script but letstalk.py (the model file imports no data code): a usage error
    (unknown option, bad number...) exits with status 2 and one line, like every other user error, instead of a
    usage dump."""

    def error(self, message):
        """Print `message` as one line that points to --help, and exit with status 2."""
        self.exit(2, f"error: {message} (`{self.prog} --help` lists the options)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help that shows each option's default, unless it has none or its help text already states it."""

    def _get_help_string(self, action):
        if action.default in (None, []) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# ----------------------------------------------------------------------------------------------------------------
# 1. Audio: WAV reading, resampling, log-mel spectrogram


def read_wav(path):
    """Read a RIFF/WAVE file of any common encoding.

    Supports PCM 8-bit (unsigned), 16/24/32-bit (signed), IEEE float 32/64-bit, WAVE_FORMAT_EXTENSIBLE, any number
    of channels and any sample rate. Returns (samples, sample_rate) with samples float32 of shape (T, channels)
    in [-1, 1]. Raises DataError for anything that is not a complete WAV file.
    """
    data = Path(path).read_bytes()
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise DataError(f"{path}: not a WAV file (no RIFF/WAVE header)")
    pos, fmt, samples = 12, None, None
    while pos + 8 <= len(data):
        chunk_id, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        body = data[pos + 8:pos + 8 + size]
        if chunk_id == b"fmt ":
            if len(body) < 16:
                raise DataError(f"{path}: truncated WAV (fmt chunk of {len(body)} bytes)")
            tag, channels, rate = (int.from_bytes(body[a:b], "little") for a, b in ((0, 2), (2, 4), (4, 8)))
            bits = int.from_bytes(body[14:16], "little")
            if tag == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real tag opens the sub-format GUID
                tag = int.from_bytes(body[24:26], "little")
            fmt = (tag, channels, rate, bits)
        elif chunk_id == b"data":
            if len(body) < size:
                raise DataError(f"{path}: truncated WAV (data chunk promises {size} bytes, file holds {len(body)})")
            samples = body
        pos += 8 + size + (size & 1)  # chunks are padded to an even length
    if fmt is None or samples is None:
        raise DataError(f"{path}: WAV file without {'fmt' if fmt is None else 'data'} chunk")
    tag, channels, rate, bits = fmt
    width = bits // 8
    if channels < 1 or rate < 1 or width < 1 or len(samples) % (width * channels):
        raise DataError(f"{path}: corrupt WAV header ({channels} channels, {rate} Hz, {bits} bits)")
    if tag == 1 and bits == 8:
        x = (np.frombuffer(samples, np.uint8).astype(np.float32) - 128) / 128
    elif tag == 1 and bits in (16, 32):
        x = np.frombuffer(samples, f"<i{width}").astype(np.float32) / 2 ** (bits - 1)
    elif tag == 1 and bits == 24:  # three little-endian bytes: place them in the top of an int32
        b = np.frombuffer(samples, np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] << 8 | b[:, 1] << 16 | b[:, 2] << 24) >> 8).astype(np.float32) / 2 ** 23
    elif tag == 3 and bits in (32, 64):
        x = np.frombuffer(samples, f"<f{width}").astype(np.float32)
    else:
        raise DataError(f"{path}: unsupported WAV encoding (format tag {tag}, {bits} bits)")
    return x.reshape(-1, channels), rate


def write_wav(path, wav, sample_rate=SAMPLE_RATE):
    """Write mono float audio (T,) in [-1, 1] as 16-bit PCM, atomically."""
    pcm = (np.asarray(wav, np.float64) * 32768).round().clip(-32768, 32767).astype("<i2").tobytes()
    header = b"RIFF" + (36 + len(pcm)).to_bytes(4, "little") + b"WAVE"
    header += b"fmt " + (16).to_bytes(4, "little") + (1).to_bytes(2, "little") + (1).to_bytes(2, "little")
    header += sample_rate.to_bytes(4, "little") + (2 * sample_rate).to_bytes(4, "little")
    header += (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
    header += b"data" + len(pcm).to_bytes(4, "little")
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(header + pcm))


def resample(wav, rate_in, rate_out=SAMPLE_RATE, zero_crossings=16):
    """Band-limited resampling of (T,) float audio with a Hann-windowed sinc kernel.

    Output sample n sits at input time t = n * rate_in / rate_out and is sum_k x[k] h(t - k), where h is a low-pass
    sinc at the lower of the two Nyquist frequencies (so downsampling does not alias). With up / down the reduced
    ratio rate_out / rate_in, the fractional part of t takes only `up` values, so the kernel is tabulated once per
    phase. Returns float32 (ceil(T * rate_out / rate_in),).
    """
    if rate_in == rate_out:
        return np.asarray(wav, np.float32)
    g = math.gcd(rate_in, rate_out)
    up, down = rate_out // g, rate_in // g
    cutoff = min(1.0, up / down)  # in units of the input Nyquist frequency
    half = int(math.ceil(zero_crossings / cutoff))  # kernel half-width in input samples
    taps = np.arange(-half, half + 1)
    d = (np.arange(up) * down % up / up)[:, None] - taps[None, :]  # t - k for each phase and tap
    kernel = cutoff * np.sinc(cutoff * d) * np.where(np.abs(d) < half, 0.5 + 0.5 * np.cos(np.pi * d / half), 0)
    n = np.arange(int(math.ceil(len(wav) * up / down)))
    base, phase = n * down // up + half + 1, n % up  # floor(t), shifted into the zero-padded input
    x = np.pad(np.asarray(wav, np.float64), (half + 1, half + 1))
    out = np.zeros(len(n))
    for j, tap in enumerate(taps):
        out += x[base + tap] * kernel[phase, j]
    return out.astype(np.float32)


def load_audio(path):
    """Load speech as mono float32 (T,) at 16 kHz.

    WAV files go through our own reader; any other format (mp3, m4a, flac, the audio track of a video...) is
    decoded by the FFmpeg bundled in the `av` wheel. Channels are averaged, then resampled with `resample`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {'a folder, not an audio file' if path.is_dir() else 'no such file'}")
    with open(path, "rb") as f:
        is_wav = f.read(4) == b"RIFF"
    if is_wav:
        x, rate = read_wav(path)
    else:
        try:
            with av.open(str(path)) as container:
                if not container.streams.audio:
                    raise DataError(f"{path}: no audio stream")
                stream = container.streams.audio[0]
                rate = stream.codec_context.sample_rate
                chunks = [frame.to_ndarray() for frame in container.decode(stream)]
        except av.FFmpegError as e:
            raise DataError(f"{path}: cannot decode audio ({e})") from None
        if not chunks:
            raise DataError(f"{path}: the audio stream is empty")
        # decoded frames are (channels, n) when planar and (1, n * channels) when packed
        x = np.concatenate([c.T if c.shape[0] == stream.codec_context.channels else
                            c.reshape(-1, stream.codec_context.channels) for c in chunks]).astype(np.float32)
        if np.issubdtype(chunks[0].dtype, np.integer):
            x /= np.iinfo(chunks[0].dtype).max + 1
    return resample(x.mean(1), rate, SAMPLE_RATE)


def mel_filterbank(n_freqs=N_FFT // 2 + 1, n_mels=N_MELS, sample_rate=SAMPLE_RATE, f_min=0.0, f_max=None):
    """Triangular filters on the HTK mel scale, mel(f) = 2595 log10(1 + f / 700). Returns (n_freqs, n_mels).

    Filter m rises linearly from mel point m to m + 1 and falls to m + 2; the n_mels + 2 points are equally
    spaced in mel between f_min and f_max (Nyquist by default).
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    hz_to_mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    mel_to_hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    points = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    freqs = np.linspace(0, sample_rate / 2, n_freqs)[:, None]
    lo, mid, hi = points[:-2][None], points[1:-1][None], points[2:][None]
    tri = np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid))
    return torch.from_numpy(np.maximum(tri, 0.0))


def log_mel(wav, n_frames=None):
    """Log-mel spectrogram of 16 kHz audio. wav: (T,) tensor or array -> (4 * n_frames, 80), same float dtype.

    STFT with a 25 ms Hann window every 10 ms (zero-padded to N_FFT, frames centred on multiples of the hop),
    power spectrum, triangular mel filters, natural log with a floor of 1e-5. Mel frame j is centred at j * 10 ms,
    so video frame i (25 fps) owns mel frames 4i .. 4i + 3. n_frames (default: as many whole video frames as the
    audio covers, rounded up) fixes the length: the audio is zero-padded or cut to n_frames * 640 samples.
    """
    wav = torch.as_tensor(wav)
    wav = wav.float() if wav.dtype not in (torch.float32, torch.float64) else wav
    n_frames = math.ceil(len(wav) / SAMPLES_PER_FRAME) if n_frames is None else n_frames
    wav = torch.nn.functional.pad(wav, (0, max(0, n_frames * SAMPLES_PER_FRAME - len(wav))))
    wav = wav[:n_frames * SAMPLES_PER_FRAME]
    window = torch.hann_window(WIN, periodic=True, dtype=wav.dtype)
    spec = torch.stft(wav, N_FFT, HOP, WIN, window, center=True, pad_mode="constant", return_complex=True)
    power = spec.abs() ** 2  # (N_FFT // 2 + 1, T / HOP + 1)
    mel = mel_filterbank().to(wav.dtype).T @ power  # (80, frames)
    return mel.clamp(min=1e-5).log().T[:n_frames * MELS_PER_FRAME]


def normalize_mel(mel):
    """Per-utterance normalisation: each mel bin to zero mean and unit variance over time. (T, 80) -> (T, 80).

    It removes the recording's level and spectral tilt (microphone, voice), leaving how the speech changes.
    """
    return (mel - mel.mean(0)) / mel.std(0).clamp(min=1e-3)


def mel_windows(mel, n_frames):
    """Cut a (4 * n_frames, 80) log-mel into per-video-frame windows (n_frames, 20, 80).

    Window i holds the mel frames of video frames i - 2 .. i + 2 (the audio margin), so the model hears a little
    before and after each frame. Indices past either end of the audio are clamped to the first or last mel frame,
    never wrapped around.
    """
    start = (torch.arange(n_frames) - AUDIO_MARGIN) * MELS_PER_FRAME
    idx = (start[:, None] + torch.arange(MEL_WINDOW)[None, :]).clamp(0, mel.shape[0] - 1)
    return mel[idx]


def audio_features(wav, n_frames):
    """The audio condition of a whole video: 16 kHz (T,) -> normalised mel windows (n_frames, 20, 80) float32."""
    return mel_windows(normalize_mel(log_mel(wav, n_frames)), n_frames).float()


def frame_loudness(wav, n_frames):
    """Loudness of each video frame's 40 ms of audio in dB (RMS, floor -100 dB). (T,) -> (n_frames,) float64."""
    x = np.zeros(n_frames * SAMPLES_PER_FRAME)
    x[:min(len(wav), len(x))] = wav[:len(x)]
    rms = np.sqrt((x.reshape(n_frames, -1) ** 2).mean(1))
    return 20 * np.log10(np.maximum(rms, 1e-5))


# ----------------------------------------------------------------------------------------------------------------
# 2. The synthetic world. Speech comes from espeak-ng, whose library and voice data ship inside the
#    `espeakng-loader` wheel; we drive its C API through ctypes (synchronous mode, a callback that collects the
#    samples and the phoneme events). Each call runs in a fresh Python process: the engine keeps state across
#    syntheses (the phase of its pitch flutter is a static variable in wavegen.c that nothing resets), so in one
#    long-lived process the same sentence would come out differently depending on what was spoken before it.

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


# Identities and utterances are split by index ranges, so the splits can never share one.
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
    mouth_w: float  # half-width of the mouth as a fraction of the face half-width (>= 0.32: a big mouth)
    eye_gap: float  # eye centre offset from the face centre line, fraction of the face half-width


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
    scale = np.array([0.03, 0.02, 5.0])
    for i in range(n_frames):
        state = 0.95 * state + rng.normal(0, 0.3, 3)
        pose[i] = np.clip(state, -2, 2) * scale
    return blink, pose


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


@dataclass
class Video:
    """One talking video: frames uint8 (N, H, W, 3), wav float32 (T,) at 16 kHz, and meta (a JSON-able dict;
    synthetic videos carry per-frame ground truth in it)."""
    frames: np.ndarray
    wav: np.ndarray
    meta: dict


def synth_script(split="train", index=0, seconds=4.0, seed=0):
    """What happens in synthetic video `index` of `split`, before anything is drawn: (Identity, wav, meta).

    The person and the utterance are drawn from the split's own ranges (SPLITS, UTTERANCE_SPLITS). meta holds
    the per-frame ground truth: openness, roundness, blink (each (N,)) and pose (N, 3).
    """
    rng = np.random.default_rng([seed, 3, list(SPLITS).index(split), index])
    lo, hi = SPLITS[split]
    ident = identity(int(rng.integers(lo, hi)), seed)
    lo, hi = UTTERANCE_SPLITS[split]
    wav, phonemes, info = utterance(int(rng.integers(lo, hi)), seconds, seed)
    n = int(round(seconds * FPS))
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


# ----------------------------------------------------------------------------------------------------------------
# 3. The on-disk layout: ROOT/<name>/{video.mp4, audio.wav, meta.json}


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


def write_mp4(path, frames, wav=None, fps=FPS, crf=16):
    """Write frames uint8 (N, H, W, 3) as H.264 yuv420p (plays in browsers) with optional 16 kHz mono audio as AAC.
    Uses the FFmpeg inside the `av` wheel; H and W must be even. Written atomically."""
    def write(tmp):
        with av.open(tmp, "w", format="mp4") as out:
            video = out.add_stream("libx264", rate=fps, options={"crf": str(crf)})
            video.height, video.width, video.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
            audio = None if wav is None else out.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
            for frame in frames:
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
    """Decode every frame of a video file. Returns (frames uint8 (N, H, W, 3), fps as a float)."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            fps = float(stream.average_rate or FPS)
    except (av.FFmpegError, IndexError) as e:
        raise DataError(f"{path}: cannot decode video ({e})") from None
    if not frames:
        raise DataError(f"{path}: no video frames")
    return np.stack(frames), fps


def save_video(folder, video):
    """Write a Video in the on-disk layout: folder/{video.mp4 (with sound), audio.wav, meta.json}.

    The folder is assembled under a temporary name and renamed at the end, so an interrupted run leaves either a
    complete folder or none.
    """
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_mp4(tmp / "video.mp4", video.frames, video.wav)
    write_wav(tmp / "audio.wav", video.wav)
    (tmp / "meta.json").write_text(json.dumps(video.meta))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


class VideoFolder:
    """A dataset root in the on-disk layout, as a sequence of Video (decoded on access).

    split "all" takes every video; "val" holds out every 20th (sorted by name) and "train" the rest, so a
    prepared folder gives held-out videos without a second copy.
    """

    def __init__(self, root, split="all"):
        self.root = Path(root)
        folders = sorted(p.parent for p in self.root.glob("*/meta.json"))
        if not folders:
            raise DataError(f"{root}: no prepared videos (expected {root}/<name>/meta.json; "
                            f"see `python data.py synth --help` and `python data.py prepare --help`)")
        val = folders[19::20] or folders[-1:]  # fewer than 20 videos: the last one is held out
        self.folders = {"all": folders, "train": [f for f in folders if f not in val] or folders, "val": val}[split]
        self.meta = [json.loads((p / "meta.json").read_text()) for p in self.folders]

    def __len__(self):
        return len(self.folders)

    def num_frames(self, i):
        """Frame count of video i, from its meta.json (nothing is decoded)."""
        return self.meta[i]["num_frames"]

    def __getitem__(self, i):
        frames, _ = read_video(self.folders[i] / "video.mp4")
        return Video(frames, load_audio(self.folders[i] / "audio.wav"), self.meta[i])


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


def _resample_frames(times, n_out):
    """Index of the source frame shown at each output time k / 25 s: the last one whose timestamp is <= it."""
    out = np.searchsorted(times, np.arange(n_out) / FPS + 1e-6, side="right") - 1
    return np.clip(out, 0, len(times) - 1)


def square_image(img, size, box=None):
    """Crop a PIL image to `box` (x0, y0, x1, y1), else to its centre square, and resize it to size x size.
    Returns uint8 (size, size, 3)."""
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s) if box is None else box
    return np.asarray(img.convert("RGB").crop(box).resize((size, size), Image.BICUBIC))


def prepare_video(src, size, box=None):
    """Convert one real talking-head video into a Video: 25 fps, square crop (`box` = (x0, y0, x1, y1) in source
    pixels, else the centre square), resized to size x size, 16 kHz mono audio. Raises DataError if the file is
    unreadable or silent."""
    try:
        with av.open(str(src)) as container:
            if not container.streams.video:
                raise DataError(f"{src}: no video stream")
            stream = container.streams.video[0]
            frames, times = [], []
            for f in container.decode(stream):
                frames.append(square_image(f.to_image(), size, box))
                times.append(float(f.time) if f.time is not None else len(times) / float(stream.average_rate))
    except av.FFmpegError as e:
        raise DataError(f"{src}: cannot decode ({e})") from None
    if not frames:
        raise DataError(f"{src}: no video frames")
    wav = load_audio(src)
    if np.sqrt(np.mean(wav ** 2)) < 1e-4:
        raise DataError(f"{src}: silent audio")
    times = np.array(times) - times[0]
    n = min(int(math.floor(len(wav) / SAMPLES_PER_FRAME)), int(round((times[-1] + 1 / FPS) * FPS)))
    if n < 1:
        raise DataError(f"{src}: shorter than one frame")
    keep = _resample_frames(times, n)
    return Video(np.stack(frames)[keep], wav[:n * SAMPLES_PER_FRAME],
                 {"num_frames": n, "fps": FPS, "size": size, "source": str(src)})


VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v"}


def prepare(raw_dir, out_dir, size=256, boxes=None):
    """Convert every video under raw_dir into the layout under out_dir. Resumable: folders already complete are
    skipped. A corrupt or silent file is skipped with one warning line. Returns (written, skipped, failed)."""
    sources = sorted(p for p in Path(raw_dir).rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
    if not sources:
        raise DataError(f"{raw_dir}: no video files ({', '.join(sorted(VIDEO_EXTENSIONS))})")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    written = skipped = failed = 0
    for src in tqdm(sources, desc="prepare", unit="video"):
        name = src.relative_to(raw_dir).with_suffix("").as_posix().replace("/", "__")
        folder = Path(out_dir) / name
        if (folder / "meta.json").exists():
            skipped += 1
            continue
        try:
            save_video(folder, prepare_video(src, size, None if boxes is None else boxes.get(src.stem)))
            written += 1
        except DataError as e:
            tqdm.write(f"warning: skipped {e}", file=sys.stderr)
            failed += 1
    return written, skipped, failed


# ----------------------------------------------------------------------------------------------------------------
# 4. Clips for training


def to_tensor(frames):
    """uint8 frames (..., H, W, 3) -> float tensor (..., 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.array(frames)).movedim(-1, -3).float() / 127.5 - 1


GROUND_TRUTH = ("openness", "roundness", "blink", "pose", "mouth_box")


class ClipDataset(Dataset):
    """F-frame training clips cut from a sequence of videos (VideoFolder or SyntheticVideos).

    Item i is a dict:
      frames (F, 3, H, W) in [-1, 1]: frames s, s + stride, ..., s + (F - 1) stride of one video;
      ref (3, H, W): a reference frame from elsewhere in the same video (the portrait condition);
      motion (M, 3, H, W): the M frames just before the clip at the same stride (for long-video generation);
      mel (F, 20, 80): the normalised log-mel windows of the clip's frames;
      and, for synthetic videos, the ground truth of the clip's frames (openness, roundness, blink (F,),
      pose (F, 3), mouth_box (F, 4)).
    Every start with room for the motion frames is a clip, so len() counts all of them; a small cache keeps the
    most recently decoded videos.
    """

    def __init__(self, videos, frames=16, stride=1, motion=2, seed=0, cache=8):
        self.videos, self.F, self.stride, self.M = videos, frames, stride, motion
        self.seed, self.cache_size = seed, cache
        # start s needs the motion frames s - M*stride .. s - stride and the last frame s + (F-1)*stride
        self.index = [(v, s) for v in range(len(videos))
                      for s in range(motion * stride, videos.num_frames(v) - (frames - 1) * stride)]
        if not self.index:
            raise DataError(f"no video is long enough for {frames} frames + {motion} motion frames at stride {stride}")
        self._cache = OrderedDict()

    def __len__(self):
        return len(self.index)

    def _video(self, v):
        if v not in self._cache:
            video = self.videos[v]
            mel = audio_features(video.wav, len(video.frames))
            self._cache[v] = (video, mel)
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(v)
        return self._cache[v]

    def __getitem__(self, i):
        v, s = self.index[i]
        video, mel = self._video(v)
        idx = np.arange(self.F) * self.stride + s
        motion_idx = s - self.stride * np.arange(self.M, 0, -1)
        # the reference comes from outside the clip where the video allows it (otherwise anywhere in it)
        n, rng = len(video.frames), np.random.default_rng([self.seed, i])
        outside = np.setdiff1d(np.arange(n), idx)
        ref = int(rng.choice(outside if len(outside) else np.arange(n)))
        item = {"frames": to_tensor(video.frames[idx]), "ref": to_tensor(video.frames[ref]),
                "motion": to_tensor(video.frames[motion_idx]), "mel": mel[idx]}
        for key in GROUND_TRUTH:
            if key in video.meta:
                item[key] = torch.tensor(np.asarray(video.meta[key])[idx], dtype=torch.float32)
        return item


class ClipPool(Dataset):
    """A fixed pool of clips cached in one file, so training does not re-render or re-decode every step.

    ClipPool.build(dataset, n, path) draws n clips (evenly spread over the dataset) and saves them (frames as
    uint8) atomically; ClipPool(path) loads them. Items are the same dicts as ClipDataset's.
    """

    def __init__(self, path):
        self.data = torch.load(path, weights_only=True)

    @classmethod
    def build(cls, dataset, n, path):
        """Stack n items evenly spread over `dataset` (frames, ref, motion as uint8 (n, ..., 3, H, W)), save them
        atomically to `path`, and return the loaded ClipPool."""
        picks = np.linspace(0, len(dataset) - 1, n).round().astype(int)
        items = [dataset[int(i)] for i in tqdm(picks, desc="cache clips", unit="clip")]
        data = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        for k in ("frames", "ref", "motion"):  # [-1, 1] floats back to exact uint8
            data[k] = ((data[k] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        atomic_write(path, lambda tmp: torch.save(data, tmp))
        return cls(path)

    def __len__(self):
        return len(self.data["frames"])

    def __getitem__(self, i):
        return {k: (v[i].float() / 127.5 - 1) if v.dtype == torch.uint8 else v[i] for k, v in self.data.items()}


# ----------------------------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    """`python data.py synth|prepare`: write synthetic videos or convert real ones to the on-disk layout
    (argv=None: sys.argv)."""
    parser = Parser(
        prog="data.py", description="Make LetsTalk training data in the on-disk layout "
        "ROOT/<video>/{video.mp4, audio.wav, meta.json}: synthetic talking faces, or real videos converted.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="write synthetic talking-face videos",
                       description="Render synthetic talking faces speaking espeak-ng sentences, with per-frame "
                       "ground truth (mouth openness, blink, head pose, mouth box) in meta.json.")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--videos", type=bounded(int, 1), default=8, help="number of videos (default 8)")
    p.add_argument("--seconds", type=bounded(float, 1 / FPS), default=4.0, help="length of each video in seconds, "
                   "at least one frame (default 4)")
    p.add_argument("--size", type=int, default=64, help="frame size in pixels, even (64 for CPU, 256 as the paper)")
    p.add_argument("--split", choices=list(SPLITS), default="train",
                   help="identities and sentences of this split (they never overlap across splits)")
    p.add_argument("--seed", type=int, default=0, help="world seed; the same seed gives the same videos")
    p.add_argument("--still", action="store_true", help="also write each video's first frame as still.png (a "
                   "portrait for sample.py)")
    p = sub.add_parser("prepare", help="convert real talking-head videos (HDTF, CelebV-HQ...)",
                       description="Convert every video under RAW (any fps, resolution and container, with sound) "
                       "to 25 fps, a square crop resized to --size, and 16 kHz mono audio. Corrupt or silent files "
                       "are skipped with a warning; rerunning resumes where an interrupted run stopped.")
    p.add_argument("raw", type=Path, help="folder of raw videos (searched recursively)")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--size", type=int, default=256, help="output frame size (default 256, the paper's)")
    p.add_argument("--boxes", type=Path, help="JSON file {video_stem: [x0, y0, x1, y1]} of square face boxes in "
                   "source pixels (e.g. from a face detector, enlarged to include hair and chin); default: the "
                   "centre square of each frame")
    args = parser.parse_args(argv)
    try:
        if args.out.exists() and not args.out.is_dir():
            raise DataError(f"{args.out}: a file of that name exists; pass a folder to write into")
        if args.size < 16 or args.size % 2:
            raise DataError(f"--size must be an even number >= 16, got {args.size}")
        if args.command == "synth":
            args.out.mkdir(parents=True, exist_ok=True)
            for i in tqdm(range(args.videos), desc="synth", unit="video"):
                folder, video = args.out / f"{args.split}_{i:05d}", synth_video(args.split, i, args.seconds,
                                                                                args.size, args.seed)
                save_video(folder, video)
                if args.still:
                    atomic_write(folder / "still.png", lambda tmp: Image.fromarray(video.frames[0]).save(tmp, "PNG"))
            print(f"wrote {args.videos} videos to {args.out}")
        else:
            boxes = None
            if args.boxes is not None:
                try:
                    boxes = {k: tuple(v) for k, v in json.loads(args.boxes.read_text()).items()}
                except (OSError, ValueError, TypeError, AttributeError) as e:
                    raise DataError(f"{args.boxes}: cannot read crop boxes ({e})") from None
                wrong = next((k for k, v in boxes.items()
                              if len(v) != 4 or not all(isinstance(x, (int, float)) for x in v)), None)
                if wrong is not None:
                    raise DataError(f"{args.boxes}: the box of {wrong} is {list(boxes[wrong])}, not [x0, y0, x1, y1]")
            written, skipped, failed = prepare(args.raw, args.out, args.size, boxes)
            print(f"prepared {written}, already done {skipped}, skipped as unreadable or silent {failed}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
