"""Tests of audio.py: every WAV encoding and FFmpeg format read alike, resampling, the log-mel features."""

import math

import av
import numpy as np
import pytest
import torch

import audio
import common
import data
from conftest import write_float, write_pcm


def pearson(a, b):
    return float(np.corrcoef(a, b)[0, 1])


# ---------------------------------------------------------------------------------------------------------------
# Audio


@pytest.mark.parametrize("bits", [8, 16, 24, 32, "float", "extensible"])
@pytest.mark.parametrize("channels", [1, 2])
def test_wav_encodings_load_to_the_same_waveform(tmp_path, bits, channels):
    rng = np.random.default_rng(0)
    x = np.clip(rng.normal(0, 0.3, (4000, channels)), -0.99, 0.99)
    path = tmp_path / "a.wav"
    if isinstance(bits, int):
        write_pcm(path, x, 16000, bits)
        step = max(1 / 2 ** (bits - 1), 1e-7)  # 32-bit PCM is finer than the float32 we return
    else:
        write_float(path, x, 16000, extensible=bits == "extensible")
        step = 1e-6
    got, rate = audio.read_wav(path)
    assert rate == 16000 and got.shape == x.shape
    assert np.abs(got - x).max() <= step
    mono = audio.load_audio(path)  # channels averaged, already 16 kHz
    assert np.abs(mono - x.mean(1)).max() <= step


def test_a_float_wav_louder_than_full_scale_is_scaled_down_to_it(tmp_path):
    x = 3 * np.sin(np.arange(4000) * 0.05)  # peak 3: clipped at 1, it would be a square wave
    write_float(tmp_path / "loud.wav", x[:, None], 16000)
    assert np.abs(audio.load_audio(tmp_path / "loud.wav") - x / np.abs(x).max()).max() < 1e-6


def test_load_audio_resamples_to_16k(tmp_path):
    t = np.arange(44100) / 44100
    write_pcm(tmp_path / "a.wav", np.stack([0.5 * np.sin(2 * np.pi * 440 * t)] * 2, 1), 44100, 16)
    got = audio.load_audio(tmp_path / "a.wav")
    assert len(got) == 16000
    want = 0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    assert np.abs(got - want)[500:-500].max() < 2e-3  # away from the zero-padded ends


def test_resample_removes_what_the_new_rate_cannot_hold():
    t = np.arange(44100) / 44100
    kept = audio.resample(np.sin(2 * np.pi * 1000 * t), 44100, 16000)
    gone = audio.resample(np.sin(2 * np.pi * 10000 * t), 44100, 16000)  # above the 8 kHz Nyquist: would alias
    assert np.sqrt(np.mean(kept[500:-500] ** 2)) == pytest.approx(math.sqrt(0.5), rel=1e-2)
    assert np.sqrt(np.mean(gone[500:-500] ** 2)) < 0.01


def test_truncated_or_garbage_wav_raises_a_clear_error(tmp_path):
    write_pcm(tmp_path / "ok.wav", np.zeros((1000, 1)), 16000, 16)
    (tmp_path / "cut.wav").write_bytes((tmp_path / "ok.wav").read_bytes()[:1000])
    (tmp_path / "junk.wav").write_bytes(np.random.default_rng(0).bytes(500))
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(common.UserError, match="truncated"):
        audio.read_wav(tmp_path / "cut.wav")
    for name in ("junk.wav", "empty.wav"):
        with pytest.raises(common.UserError, match="not a WAV"):
            audio.read_wav(tmp_path / name)
    with pytest.raises(common.UserError, match="no such file"):
        audio.load_audio(tmp_path / "missing.wav")
    with pytest.raises(common.UserError, match="a folder, not an audio file"):
        audio.load_audio(tmp_path)


def test_mel_of_a_pure_tone_peaks_in_the_right_bin():
    mel_scale = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    centres = 700 * (10 ** (np.linspace(0, mel_scale(8000), audio.N_MELS + 2)[1:-1] / 2595) - 1)
    t = np.arange(16000) / 16000
    for f in (300.0, 1000.0, 3000.0, 6000.0):
        mel = audio.log_mel(np.sin(2 * np.pi * f * t).astype(np.float32))
        assert int(mel[10:-10].mean(0).argmax()) == int(np.abs(centres - f).argmin())


def test_mel_agrees_with_a_direct_dft():
    n_frames = 12
    wav = np.random.default_rng(1).normal(0, 0.1, n_frames * audio.SAMPLES_PER_FRAME)  # float64 end to end
    # framing written out: frames centred on multiples of the hop, zeros outside the audio, the 400-sample
    # periodic Hann window centred in the 1024-point FFT frame
    padded = np.pad(wav, (audio.N_FFT // 2, audio.N_FFT // 2))
    window = np.zeros(audio.N_FFT)
    offset = (audio.N_FFT - audio.WIN) // 2
    window[offset:offset + audio.WIN] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(audio.WIN) / audio.WIN)
    n = np.arange(audio.N_FFT)
    dft = np.exp(-2j * np.pi * np.arange(audio.N_FFT // 2 + 1)[:, None] * n[None, :] / audio.N_FFT)
    frames = np.stack([padded[j * audio.HOP:j * audio.HOP + audio.N_FFT] * window for j in range(4 * n_frames)])
    power = np.abs(frames @ dft.T) ** 2
    want = np.log(np.maximum(power @ audio.mel_filterbank().numpy(), 1e-5))
    got = audio.log_mel(torch.from_numpy(wav), n_frames)
    assert got.dtype == torch.float64 and got.shape == (4 * n_frames, 80)
    assert np.abs(got.numpy() - want).max() < 1e-4


def test_mel_windows_are_clamped_at_the_ends_never_wrapped():
    n = 10
    mel = torch.arange(4 * n, dtype=torch.float32)[:, None].repeat(1, 80)  # each mel frame holds its index
    win = audio.mel_windows(mel, n)
    assert win.shape == (n, audio.MEL_WINDOW, 80)
    assert win[0, :, 0].tolist() == [0] * 8 + list(range(12))  # frames -2, -1 clamp to mel frame 0
    assert win[n - 1, :, 0].tolist() == list(range(4 * n - 12, 4 * n)) + [4 * n - 1] * 8
    assert win[5, :, 0].tolist() == list(range(12, 32))  # video frame 5 = mel 20..23, with 2 frames each side


# ---------------------------------------------------------------------------------------------------------------
# The synthetic world


@pytest.mark.parametrize("claimed", [0, 0xFFFFFFFF])
def test_a_streamed_wav_reads_to_the_end_of_the_file(tmp_path, claimed):
    """A WAV written to a pipe does not know its length: its data chunk (and RIFF) size says 0 or 0xFFFFFFFF."""
    x = np.sin(np.linspace(0, 200, 3000))[:, None] * 0.5
    write_pcm(tmp_path / "a.wav", x, 16000, 16)
    raw = bytearray((tmp_path / "a.wav").read_bytes())
    data_at = raw.index(b"data")
    raw[4:8] = raw[data_at + 4:data_at + 8] = claimed.to_bytes(4, "little")
    (tmp_path / "streamed.wav").write_bytes(bytes(raw) + b"\x01")  # and cut one byte into a next sample
    got, rate = audio.read_wav(tmp_path / "streamed.wav")
    want, _ = audio.read_wav(tmp_path / "a.wav")
    assert rate == 16000 and np.array_equal(got, want)


@pytest.mark.parametrize("codec", ["pcm_mulaw", "pcm_alaw", "adpcm_ima_wav", "pcm_s64le"])
def test_telephone_encoded_wavs_are_decoded_by_ffmpeg(tmp_path, codec):
    """read_wav decodes PCM and float; a mu-law, A-law or ADPCM WAV (telephony, old recorders) goes to FFmpeg.
    (64-bit PCM, as FFmpeg writes it, is read_wav's own.)"""
    t = np.arange(8000) / 8000
    x = 0.5 * np.sin(2 * np.pi * 300 * t)
    with av.open(str(tmp_path / "a.wav"), "w", format="wav") as out:  # written by FFmpeg, the reference encoder
        stream = out.add_stream(codec, rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.round(x * 32767).astype(np.int16)[None], format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    if codec == "pcm_s64le":
        assert audio.read_wav(tmp_path / "a.wav")[0].shape == (8000, 1)
    else:
        with pytest.raises(audio.OtherEncoding):
            audio.read_wav(tmp_path / "a.wav")
    got, want = audio.load_audio(tmp_path / "a.wav"), audio.resample(x, 8000, 16000)
    n = min(len(got), len(want))
    assert n > 15000 and np.abs(got[1000:n - 1000] - want[1000:n - 1000]).max() < 0.05  # 8-bit companding, ADPCM


def _mp2_stream(path, rate, x):
    """x (T,) in [-1, 1] as a mono MPEG-2 audio stream of an MPEG-TS file at `rate` (a broadcast recording)."""
    with av.open(str(path), "w", format="mpegts") as out:
        stream = out.add_stream("mp2", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.round(x * 32767).astype(np.int16)[None], format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)


def test_unsigned_pcm_is_centred_and_a_rate_change_midway_is_refused(tmp_path):
    """8-bit PCM is unsigned, its silence at 128: decoded without centring, a silent track read as a constant 0.5
    (and passed the silence check). Recordings joined end to end can change their sample rate partway: read at the
    first one's rate, the rest played 3x slow, so they are refused."""
    with av.open(str(tmp_path / "u8.mkv"), "w") as out:
        stream = out.add_stream("pcm_u8", rate=16000, layout="mono")
        x = 0.5 * np.sin(2 * np.pi * 300 * np.arange(16000) / 16000)
        frame = av.AudioFrame.from_ndarray(np.round(x * 32767).astype(np.int16)[None], format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    got, _ = audio.decode_audio(tmp_path / "u8.mkv")
    assert np.abs(got - x).max() < 0.02  # 8 bits: steps of 1/128
    for rate in (16000, 48000):
        _mp2_stream(tmp_path / f"{rate}.ts", rate, 0.5 * np.sin(2 * np.pi * 300 * np.arange(rate) / rate))
    (tmp_path / "joined.ts").write_bytes((tmp_path / "16000.ts").read_bytes() + (tmp_path / "48000.ts").read_bytes())
    assert len(audio.decode_audio(tmp_path / "48000.ts")[0]) > 15000  # one rate: read
    with pytest.raises(common.UserError, match="changes its sample rate or channel count partway"):
        audio.decode_audio(tmp_path / "joined.ts")


def test_impossible_wav_headers_are_refused_in_one_line(tmp_path):
    write_pcm(tmp_path / "ok.wav", np.zeros((100, 1)), 16000, 16)
    raw = bytearray((tmp_path / "ok.wav").read_bytes())
    raw[34:36] = (0).to_bytes(2, "little")  # bits per sample: 0
    (tmp_path / "zero.wav").write_bytes(bytes(raw))
    with pytest.raises(common.UserError, match="corrupt or unsupported WAV header"):
        audio.load_audio(tmp_path / "zero.wav")
    raw = bytearray((tmp_path / "ok.wav").read_bytes())
    raw[20:22] = (0xFFFE).to_bytes(2, "little")  # "extensible", in a 16-byte fmt chunk with no room for the sub-format
    (tmp_path / "extensible.wav").write_bytes(bytes(raw))
    with pytest.raises(common.UserError, match="an extensible format without a real sub-format"):
        audio.load_audio(tmp_path / "extensible.wav")


def test_channels_that_cancel_out_are_refused_by_both_readers(tmp_path):
    """A stereo track whose second channel has inverted polarity averages to near silence: the speech would be
    lost and pass the silence check. Quieter second channels (a far microphone, one side silent) still load."""
    v = 0.3 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000)
    write_pcm(tmp_path / "anti.wav", np.stack([v, -v], 1), 16000, 16)
    write_pcm(tmp_path / "one_side.wav", np.stack([v, 0 * v], 1), 16000, 16)
    with av.open(str(tmp_path / "anti.mkv"), "w") as out:  # the same track through FFmpeg
        stream = out.add_stream("pcm_s16le", rate=16000, layout="stereo")
        pcm = np.round(np.stack([v, -v], 1) * 32767).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="stereo")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    for name in ("anti.wav", "anti.mkv"):
        with pytest.raises(common.UserError, match="channels cancel out"):
            audio.load_audio(tmp_path / name)
    assert np.abs(audio.load_audio(tmp_path / "one_side.wav") - v / 2).max() < 1e-4


def test_aac_is_read_without_its_encoders_padding(tmp_path):
    """AAC codes 1024 samples a packet and pads the last one; the file states the real length. 4 s read as 4.03 s
    gave sample.py's own video, fed back in, a frame too many."""
    wav = 0.3 * np.sin(2 * np.pi * 300 * np.arange(64000) / 16000)
    data.write_mp4(tmp_path / "a.mp4", np.zeros((100, 16, 16, 3), np.uint8), wav)
    got = audio.load_audio(tmp_path / "a.mp4")
    assert len(got) == 64000 and pearson(got[1000:-1000], wav[1000:-1000]) > 0.99


def test_loudness_is_in_db_of_the_rms_and_mel_bins_are_normalised_each_on_its_own():
    t = np.arange(2 * audio.SAMPLES_PER_FRAME) / 16000
    sine = np.sin(2 * np.pi * 1000 * t)  # 25 whole periods a frame
    assert audio.frame_loudness(sine, 2) == pytest.approx([-3.0103] * 2, abs=1e-3)  # RMS 1/sqrt(2)
    assert audio.frame_loudness(0.1 * sine, 2) == pytest.approx([-23.0103] * 2, abs=1e-3)
    mel = torch.randn(200, 80) * torch.linspace(0.1, 10, 80) + torch.linspace(-5, 5, 80)  # a tilted spectrum
    got = audio.normalize_mel(mel)
    assert torch.allclose(got.mean(0), torch.zeros(80), atol=1e-4) and torch.allclose(got.std(0), torch.ones(80))


def test_an_odd_sized_chunk_before_the_data_is_skipped_with_its_pad_byte(tmp_path):
    """RIFF pads a chunk of odd size with one byte (editors write odd LIST/INFO chunks before the samples)."""
    x = np.clip(np.random.default_rng(0).normal(0, 0.3, (1000, 1)), -0.99, 0.99)
    write_pcm(tmp_path / "plain.wav", x, 16000, 16)
    raw = (tmp_path / "plain.wav").read_bytes()
    at = raw.index(b"data")
    odd = b"LIST" + (3).to_bytes(4, "little") + b"abc" + b"\0"  # 3 bytes of content, 1 of padding
    body = raw[12:at] + odd + raw[at:]
    (tmp_path / "odd.wav").write_bytes(b"RIFF" + (4 + len(body)).to_bytes(4, "little") + b"WAVE" + body)
    assert np.array_equal(audio.read_wav(tmp_path / "odd.wav")[0], audio.read_wav(tmp_path / "plain.wav")[0])
