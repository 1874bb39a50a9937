"""Speech in, per-frame audio features out: the audio condition of LetsTalk.

The official code embeds speech with a pretrained wav2vec; nothing can be downloaded here, so we compute a log-mel
spectrogram from scratch and let a small learned encoder (letstalk.AudioEncoder) read it:

1. reading: a WAV reader for PCM and float WAVs (`read_wav`), any other format through the FFmpeg inside the
   `av` wheel (`load_audio`), band-limited resampling to 16 kHz (`resample`);
2. features: a log-mel spectrogram (STFT + triangular mel filterbank), normalised per utterance and cut into one
   window of 20 mel frames per video frame (`audio_features`);
3. loudness per video frame (`frame_loudness`), which the synthetic world's mouths and the lip-sync metric follow.
"""

import math
from pathlib import Path

import av
import numpy as np
import torch

from common import UserError, atomic_write

# ----------------------------------------------------------------------------------------------------------------
# Constants shared by every file. Video runs at 25 fps and audio at 16 kHz, as in HDTF and the official code;
# a 10 ms mel hop gives each video frame exactly 4 mel frames.

FPS = 25
SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
HOP = 160  # 10 ms
WIN = 400  # 25 ms analysis window
N_FFT = 1024  # zero-padded FFT: bins 16 Hz apart (not 40), so the narrow low mel filters are sampled finely
N_MELS = 80
MELS_PER_FRAME = SAMPLES_PER_FRAME // HOP  # 4
AUDIO_MARGIN = 2  # video frames of audio context on each side (the official code's audio margin)
MEL_WINDOW = (2 * AUDIO_MARGIN + 1) * MELS_PER_FRAME  # 20: the mel frames each video frame sees


# ----------------------------------------------------------------------------------------------------------------
# 1. Reading: WAV files, any other format, resampling


MIN_RATE, MAX_RATE = 4_000, 384_000  # the sample rates we read: an absurd one would make resample allocate gigabytes


def check_rate(path, rate):
    """Refuse a sample rate outside MIN_RATE..MAX_RATE, before any sample is decoded."""
    if not MIN_RATE <= rate <= MAX_RATE:
        raise UserError(f"{path}: a sample rate of {rate} Hz (speech is recorded at {MIN_RATE}-{MAX_RATE} Hz)")


class OtherEncoding(UserError):
    """A WAV file in an encoding read_wav does not decode (mu-law, A-law, ADPCM...): load_audio hands it to FFmpeg."""


def read_wav(path):
    """Read a RIFF/WAVE file of any common encoding.

    Supports PCM 8-bit (unsigned), 16/24/32/64-bit (signed), IEEE float 32/64-bit, WAVE_FORMAT_EXTENSIBLE, any number
    of channels and any sample rate. Returns (samples, sample_rate) with samples float32 of shape (T, channels)
    in [-1, 1] for the integer encodings, float ones as stored (load_audio rejects non-finite or huge values).
    Raises UserError for anything that is not a complete WAV file, OtherEncoding for the telephone encodings.

    A WAV written to a pipe (ffmpeg, sox) cannot know its length when it writes the header: its data chunk claims
    0 or 0xFFFFFFFF bytes. Such a chunk runs to the end of the file.
    """
    data = Path(path).read_bytes()
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise UserError(f"{path}: not a WAV file (no RIFF/WAVE header)")
    pos, fmt, samples, streamed = 12, None, None, False
    while pos + 8 <= len(data):
        chunk_id, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if chunk_id == b"data" and size in (0, 0xFFFFFFFF):  # streamed: the samples run to the end of the file
            streamed, size = True, len(data) - pos - 8
        body = data[pos + 8:pos + 8 + size]
        if chunk_id == b"fmt ":
            if len(body) < 16:
                raise UserError(f"{path}: truncated WAV (fmt chunk of {len(body)} bytes)")
            tag, channels, rate = (int.from_bytes(body[a:b], "little") for a, b in ((0, 2), (2, 4), (4, 8)))
            bits = int.from_bytes(body[14:16], "little")
            if tag == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real tag opens the sub-format GUID
                tag = int.from_bytes(body[24:26], "little")
            fmt = (tag, channels, rate, bits)
        elif chunk_id == b"data":
            if len(body) < size:
                raise UserError(f"{path}: truncated WAV (data chunk promises {size} bytes, file holds {len(body)})")
            samples = body
        pos += 8 + size + (size & 1)  # chunks are padded to an even length
    if fmt is None or samples is None:
        raise UserError(f"{path}: WAV file without {'fmt' if fmt is None else 'data'} chunk")
    tag, channels, rate, bits = fmt
    if tag == 0xFFFE:  # still the extensible tag: its sub-format is missing or itself "extensible"
        raise UserError(f"{path}: corrupt WAV header (an extensible format without a real sub-format)")
    if tag not in (1, 3):  # PCM (tag 1) and IEEE float (3) are ours; mu-law (7), A-law (6), ADPCM... FFmpeg's
        raise OtherEncoding(f"{path}: a WAV encoding this reader does not decode (format tag {tag}, {bits} bits)")
    if bits not in ((8, 16, 24, 32, 64) if tag == 1 else (32, 64)):
        raise UserError(f"{path}: corrupt or unsupported WAV header ({'PCM' if tag == 1 else 'float'} of {bits} bits)")
    width = bits // 8
    if streamed and width * channels:  # a stream cut mid-sample: keep the whole samples
        samples = samples[:len(samples) - len(samples) % (width * channels)]
    if channels < 1 or len(samples) % (width * channels):
        raise UserError(f"{path}: corrupt WAV header ({channels} channels, {rate} Hz, {bits} bits)")
    check_rate(path, rate)
    if tag == 1 and bits == 8:
        x = (np.frombuffer(samples, np.uint8).astype(np.float32) - 128) / 128
    elif tag == 1 and bits in (16, 32, 64):
        x = np.frombuffer(samples, f"<i{width}").astype(np.float32) / 2 ** (bits - 1)
    elif tag == 1 and bits == 24:  # three little-endian bytes: place them in the top of an int32
        b = np.frombuffer(samples, np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] << 8 | b[:, 1] << 16 | b[:, 2] << 24) >> 8).astype(np.float32) / 2 ** 23
    else:  # IEEE float
        x = np.frombuffer(samples, f"<f{width}").astype(np.float32)
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


def resample(wav, rate_in, rate_out):
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
    half = int(math.ceil(16 / cutoff))  # kernel half-width in input samples: 16 zero crossings of the sinc each side
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

    PCM and float WAV files go through our own reader; any other format (mp3, m4a, flac, the audio track of a
    video, a mu-law WAV...) is decoded by the FFmpeg bundled in the `av` wheel (`decode_audio`). Channels are
    averaged (`downmix`), then resampled. Samples lie in [-1, 1]: a float WAV beyond it is scaled down to it.
    """
    path = Path(path)
    if not path.is_file():
        why = ("a folder, not an audio file" if path.is_dir() else "not a regular file (a pipe or a device)"
               if path.exists() else "no such file")
        raise UserError(f"{path}: {why}")
    with open(path, "rb") as f:
        is_wav = f.read(4) == b"RIFF"
    wav = None
    if is_wav:
        try:
            x, rate = read_wav(path)
            wav = resample(downmix(path, x), rate, SAMPLE_RATE)
        except OtherEncoding:
            pass
    if wav is None:
        wav = decode_audio(path)[0]
    if not np.isfinite(wav).all():  # float WAVs can hold NaN or inf; they would poison every frame
        raise UserError(f"{path}: the audio holds NaN or infinite samples")
    if np.abs(wav).max(initial=0) > 100:  # float samples live in [-1, 1]; far outside, the file is garbage
        raise UserError(f"{path}: samples of magnitude {np.abs(wav).max():.3g}, far outside [-1, 1]")
    # a float recording louder than full scale is scaled down to it: a player would clip it, and so would the AAC
    # track of sample.py's video
    return wav / max(1.0, float(np.abs(wav).max(initial=0)))


def decode_audio(path):
    """The first audio stream of any file FFmpeg reads -> (mono float32 (T,) at 16 kHz, the time in seconds of
    its first sample on the file's clock, which a video stream of the same file shares)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise UserError(f"{path}: no audio stream")
            stream = container.streams.audio[0]
            if stream.codec_context is None:  # an encoding FFmpeg has no decoder for, or a header too damaged to say
                raise UserError(f"{path}: cannot decode audio (damaged, or an encoding FFmpeg has no decoder for)")
            rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
            check_rate(path, rate)
            # the track's length as the file states it, and the samples per packet of its encoding (AAC: 1024)
            length = stream.duration and math.ceil(stream.duration * stream.time_base * rate)
            packet = stream.codec_context.frame_size
            frames = list(container.decode(stream))
            chunks = [frame.to_ndarray() for frame in frames]
    except av.FFmpegError as e:
        raise UserError(f"{path}: cannot decode audio ({e})") from None
    if not chunks:
        raise UserError(f"{path}: the audio stream is empty")
    if any((f.sample_rate, f.layout.nb_channels) != (rate, channels) for f in frames):  # joined recordings
        raise UserError(f"{path}: the audio changes its sample rate or channel count partway; convert it to one rate "
                        "and one channel count with an audio tool first (e.g. ffmpeg -i IN -ar 16000 -ac 1 OUT.wav)")
    # decoded frames are (channels, n) when planar and (1, n * channels) when packed
    x = np.concatenate([c.T if c.shape[0] == channels else c.reshape(-1, channels) for c in chunks]).astype(np.float32)
    if length and 0 < len(x) - length <= packet:  # the encoder's padding of its last packet (AAC's is up to 1024
        x = x[:length]  # samples, a video frame too many): cut; a larger excess means the stated length is wrong
    kind = chunks[0].dtype
    if np.issubdtype(kind, np.unsignedinteger):  # unsigned PCM (8-bit) has its silence at half its range
        x = x / (np.iinfo(kind).max + 1) * 2 - 1
    elif np.issubdtype(kind, np.integer):
        x /= np.iinfo(kind).max + 1
    return resample(downmix(path, x), rate, SAMPLE_RATE), float(frames[0].time or 0.0)


def downmix(path, x):
    """Average the channels of (T, channels) float audio into mono (T,). Channels that cancel out (one of them
    recorded with inverted polarity) would leave near silence, so that is refused instead."""
    mono = x.mean(1)
    rms = lambda a: float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))  # noqa: E731
    loudest = max((rms(c) for c in x.T if len(c)), default=0.0)
    if loudest > 1e-3 and rms(mono) < 0.1 * loudest:  # over 20 dB lost: no recording of one voice does that
        raise UserError(f"{path}: its channels cancel out when mixed to mono (one has inverted polarity); keep one "
                        "channel with an audio tool first (e.g. ffmpeg -i IN -af 'pan=mono|c0=c0' OUT.wav)")
    return mono


# ----------------------------------------------------------------------------------------------------------------
# 2. Features: log-mel spectrogram, per-frame windows, loudness


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

