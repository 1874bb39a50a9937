"""Tests of data.py: audio features, the synthetic world, the on-disk layout and the clip datasets."""

import json
import math
import wave

import av
import numpy as np
import pytest
import torch

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
    got, rate = data.read_wav(path)
    assert rate == 16000 and got.shape == x.shape
    assert np.abs(got - x).max() <= step
    mono = data.load_audio(path)  # channels averaged, already 16 kHz
    assert np.abs(mono - x.mean(1)).max() <= step


def test_load_audio_resamples_to_16k(tmp_path):
    t = np.arange(44100) / 44100
    write_pcm(tmp_path / "a.wav", np.stack([0.5 * np.sin(2 * np.pi * 440 * t)] * 2, 1), 44100, 16)
    got = data.load_audio(tmp_path / "a.wav")
    assert len(got) == 16000
    want = 0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    assert np.abs(got - want)[500:-500].max() < 2e-3  # away from the zero-padded ends


def test_resample_removes_what_the_new_rate_cannot_hold():
    t = np.arange(44100) / 44100
    kept = data.resample(np.sin(2 * np.pi * 1000 * t), 44100, 16000)
    gone = data.resample(np.sin(2 * np.pi * 10000 * t), 44100, 16000)  # above the 8 kHz Nyquist: would alias
    assert np.sqrt(np.mean(kept[500:-500] ** 2)) == pytest.approx(math.sqrt(0.5), rel=1e-2)
    assert np.sqrt(np.mean(gone[500:-500] ** 2)) < 0.01


def test_truncated_or_garbage_wav_raises_a_clear_error(tmp_path):
    write_pcm(tmp_path / "ok.wav", np.zeros((1000, 1)), 16000, 16)
    (tmp_path / "cut.wav").write_bytes((tmp_path / "ok.wav").read_bytes()[:1000])
    (tmp_path / "junk.wav").write_bytes(np.random.default_rng(0).bytes(500))
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(data.DataError, match="truncated"):
        data.read_wav(tmp_path / "cut.wav")
    for name in ("junk.wav", "empty.wav"):
        with pytest.raises(data.DataError, match="not a WAV"):
            data.read_wav(tmp_path / name)
    with pytest.raises(data.DataError, match="no such file"):
        data.load_audio(tmp_path / "missing.wav")
    with pytest.raises(data.DataError, match="a folder, not an audio file"):
        data.load_audio(tmp_path)


def test_mel_of_a_pure_tone_peaks_in_the_right_bin():
    mel_scale = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    centres = 700 * (10 ** (np.linspace(0, mel_scale(8000), data.N_MELS + 2)[1:-1] / 2595) - 1)
    t = np.arange(16000) / 16000
    for f in (300.0, 1000.0, 3000.0, 6000.0):
        mel = data.log_mel(np.sin(2 * np.pi * f * t).astype(np.float32))
        assert int(mel[10:-10].mean(0).argmax()) == int(np.abs(centres - f).argmin())


def test_mel_agrees_with_a_direct_dft():
    n_frames = 12
    wav = np.random.default_rng(1).normal(0, 0.1, n_frames * data.SAMPLES_PER_FRAME)  # float64 end to end
    # framing written out: frames centred on multiples of the hop, zeros outside the audio, the 400-sample
    # periodic Hann window centred in the 1024-point FFT frame
    padded = np.pad(wav, (data.N_FFT // 2, data.N_FFT // 2))
    window = np.zeros(data.N_FFT)
    offset = (data.N_FFT - data.WIN) // 2
    window[offset:offset + data.WIN] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(data.WIN) / data.WIN)
    n = np.arange(data.N_FFT)
    dft = np.exp(-2j * np.pi * np.arange(data.N_FFT // 2 + 1)[:, None] * n[None, :] / data.N_FFT)
    frames = np.stack([padded[j * data.HOP:j * data.HOP + data.N_FFT] * window for j in range(4 * n_frames)])
    power = np.abs(frames @ dft.T) ** 2
    want = np.log(np.maximum(power @ data.mel_filterbank().numpy(), 1e-5))
    got = data.log_mel(torch.from_numpy(wav), n_frames)
    assert got.dtype == torch.float64 and got.shape == (4 * n_frames, 80)
    assert np.abs(got.numpy() - want).max() < 1e-4


def test_mel_windows_are_clamped_at_the_ends_never_wrapped():
    n = 10
    mel = torch.arange(4 * n, dtype=torch.float32)[:, None].repeat(1, 80)  # each mel frame holds its index
    win = data.mel_windows(mel, n)
    assert win.shape == (n, data.MEL_WINDOW, 80)
    assert win[0, :, 0].tolist() == [0] * 8 + list(range(12))  # frames -2, -1 clamp to mel frame 0
    assert win[n - 1, :, 0].tolist() == list(range(4 * n - 12, 4 * n)) + [4 * n - 1] * 8
    assert win[5, :, 0].tolist() == list(range(12, 32))  # video frame 5 = mel 20..23, with 2 frames each side


# ---------------------------------------------------------------------------------------------------------------
# The synthetic world


def test_synthesis_is_deterministic_given_the_seed():
    a, b = data.synth_video("val", 3, 1.0, 64, seed=0), data.synth_video("val", 3, 1.0, 64, seed=0)
    c = data.synth_video("val", 3, 1.0, 64, seed=1)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.wav, b.wav) and a.meta == b.meta
    assert not np.array_equal(a.frames, c.frames)
    assert a.frames.shape == (25, 64, 64, 3) and a.wav.shape == (16000,)


@pytest.fixture(scope="module")
def scripts():
    """One minute of synthetic speech with its ground truth (no frames drawn: only the script is needed)."""
    return [data.synth_script("val", i, 4.0)[1:] for i in range(15)]


def test_mouth_follows_loudness_and_blinks_and_pose_do_not(scripts):
    loud = np.concatenate([data.frame_loudness(wav, meta["num_frames"]) for wav, meta in scripts])
    assert len(loud) >= 20 * data.FPS
    openness = np.concatenate([meta["openness"] for _, meta in scripts])
    assert pearson(openness, loud) > 0.8
    assert abs(pearson(np.concatenate([meta["blink"] for _, meta in scripts]), loud)) < 0.2
    pose = np.concatenate([meta["pose"] for _, meta in scripts])
    for k in range(3):
        assert abs(pearson(pose[:, k], loud)) < 0.2
    assert openness.std() > 0.2 and pose.std(0).min() > 0  # and all of them really move


def test_mel_energy_and_mouth_are_aligned_at_lag_zero(scripts):
    """An off-by-one between mel frames and video frames would move the peak of the cross-correlation."""
    pairs = [(np.array(meta["openness"]), data.log_mel(wav, meta["num_frames"]).reshape(-1, 4, 80).mean((1, 2))
              .numpy()) for wav, meta in scripts]
    r = {}
    for lag in range(-3, 4):
        a = np.concatenate([o[max(0, lag):len(o) + min(0, lag)] for o, _ in pairs])
        b = np.concatenate([e[max(0, -lag):len(e) - max(0, lag)] for _, e in pairs])
        r[lag] = pearson(a, b)
    assert max(r, key=r.get) == 0
    assert r[0] > r[-1] + 0.1 and r[0] > r[1] + 0.1


def test_splits_never_share_identities_or_sentences():
    ids, texts = {}, {}
    for split in data.SPLITS:
        metas = [data.synth_script(split, i, 0.2)[2] for i in range(25)]
        ids[split] = {m["identity"]["id"] for m in metas}
        texts[split] = {m["text"] for m in metas}
        lo, hi = data.SPLITS[split]
        assert all(lo <= i < hi for i in ids[split])
    assert data.SPLITS["train"][1] - data.SPLITS["train"][0] >= 500
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not ids[a] & ids[b] and not texts[a] & texts[b]
    looks = {json.dumps({k: v for k, v in vars(data.identity(i)).items() if k != "id"}) for i in range(1100)}
    assert len(looks) == 1100  # every identity looks different


def test_mouth_is_big_dark_and_its_box_is_where_it_is_drawn():
    ident = data.identity(7)
    closed, box_closed = data.render_frame(ident, 64, 0.0, 0.3, 0.0, (0.0, 0.0, 0.0))
    opened, box_open = data.render_frame(ident, 64, 1.0, 0.3, 0.0, (0.02, -0.01, 4.0))
    face_width = 2 * ident.face_w * 64
    assert box_closed[2] - box_closed[0] >= face_width / 4  # at least a quarter of the face wide
    assert (box_open[3] - box_open[1]) - (box_closed[3] - box_closed[1]) >= 8  # opening spans >= 2 latent px (4x)
    rgb = opened.astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    dark = (r < 80) & (r > g + 20) & (r > b + 15)  # the dark red interior
    dark[:32] = False  # the upper half holds the eyes, whose iris may be any dark colour
    ys, xs = np.nonzero(dark)
    assert len(ys) > 20
    x0, y0, x1, y1 = box_open
    assert x0 <= xs.min() + 0.5 and xs.max() + 0.5 <= x1 and y0 <= ys.min() + 0.5 and ys.max() + 0.5 <= y1


# ---------------------------------------------------------------------------------------------------------------
# On-disk layout, command line, clips


def _probe(path):
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        return {"frames": v.frames, "fps": float(v.average_rate), "codec": v.codec_context.name,
                "pix_fmt": v.codec_context.pix_fmt, "audio": [a.codec_context.name for a in c.streams.audio],
                "size": (v.codec_context.width, v.codec_context.height)}


def test_synth_cli_writes_playable_videos_that_read_back(tmp_path, capsys):
    data.main(["synth", str(tmp_path), "--videos", "4", "--seconds", "3", "--size", "64"])
    folders = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(folders) == 4 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    for folder in folders:
        info = _probe(folder / "video.mp4")
        assert info == {"frames": 75, "fps": 25.0, "codec": "h264", "pix_fmt": "yuv420p", "audio": ["aac"],
                        "size": (64, 64)}
        rate_bits = wave.open(str(folder / "audio.wav"))
        assert (rate_bits.getframerate(), rate_bits.getnchannels(), rate_bits.getnframes()) == (16000, 1, 48000)
        # the AAC track in the mp4 (decoded by FFmpeg) carries the same speech as audio.wav
        from_mp4, from_wav = data.load_audio(folder / "video.mp4"), data.load_audio(folder / "audio.wav")
        assert pearson(from_mp4[:47000], from_wav[:47000]) > 0.95
    from_disk = data.ClipDataset(data.VideoFolder(tmp_path), frames=16, motion=2)
    in_memory = data.ClipDataset(data.SyntheticVideos("train", 4, 3.0, 64), frames=16, motion=2)
    assert len(from_disk) == len(in_memory) == 4 * (75 - 15 - 2)
    psnr = lambda x, y: 10 * math.log10(4 / (x - y).pow(2).mean())  # noqa: E731  (images in [-1, 1])
    chroma_only = lambda x: data.to_tensor(np.stack([av.VideoFrame.from_ndarray(f, format="rgb24").reformat(  # noqa: E731
        format="yuv420p").to_ndarray(format="rgb24") for f in ((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1)
                                                     .numpy()]))
    for i in (0, 100, len(in_memory) - 1):
        a, b = from_disk[i], in_memory[i]
        # equal within video-compression error: H.264 at 4:2:0 loses about as much as 4:2:0 chroma alone (the
        # encoder is not bit-exact from run to run, so an absolute bound would be flaky)
        for key in ("frames", "ref", "motion"):
            x, y = a[key].view(-1, *a[key].shape[-3:]), b[key].view(-1, *b[key].shape[-3:])
            assert psnr(x, y) > min(30, psnr(chroma_only(y), y) - 2.5), key
        assert torch.allclose(a["mel"], b["mel"], atol=0.05)  # 16-bit WAV quantisation only
        for key in data.GROUND_TRUTH:
            assert torch.equal(a[key], b[key])


def test_clip_dataset_items(tmp_path):
    videos = data.SyntheticVideos("test", 2, 2.0, 32)
    ds = data.ClipDataset(videos, frames=8, stride=2, motion=3)
    assert len(ds) == 2 * (50 - 7 * 2 - 3 * 2)
    item = ds[5]
    video = videos[0]
    s = 3 * 2 + 5
    assert item["frames"].shape == (8, 3, 32, 32) and item["ref"].shape == (3, 32, 32)
    assert torch.equal(item["frames"], data.to_tensor(video.frames[s:s + 16:2]))
    assert torch.equal(item["motion"], data.to_tensor(video.frames[[s - 6, s - 4, s - 2]]))
    assert item["mel"].shape == (8, 20, 80)
    assert torch.equal(item["mel"], data.audio_features(video.wav, 50)[s:s + 16:2])
    clip_frames = [data.to_tensor(f) for f in video.frames[s:s + 16:2]]
    assert not any(torch.equal(item["ref"], f) for f in clip_frames)
    assert any(torch.equal(item["ref"], data.to_tensor(f)) for f in video.frames)
    assert item["openness"].tolist() == pytest.approx(video.meta["openness"][s:s + 16:2])
    assert item["pose"].shape == (8, 3) and item["mouth_box"].shape == (8, 4)
    assert torch.equal(item["frames"], data.to_tensor(((item["frames"] + 1) * 127.5).round().byte().numpy()
                                                      .transpose(0, 2, 3, 1)))  # exact uint8 values
    pool = data.ClipPool.build(ds, 3, tmp_path / "pool.pt")
    assert len(pool) == 3 and len(data.ClipPool(tmp_path / "pool.pt")) == 3
    first, last = pool[0], pool[2]
    for key, value in ds[0].items():
        assert torch.allclose(first[key], value, atol=1e-6)
    assert torch.allclose(last["frames"], ds[len(ds) - 1]["frames"], atol=1e-6)


def _write_raw_video(path, n, fps, width, height, audio):
    """A raw test video: frame k has brightness 4k in its centre square and coloured bars left and right."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=fps, options={"crf": "10"})
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        stream = out.add_stream("aac", rate=44100, layout="stereo")
        bar = (width - height) // 2
        for k in range(n):
            frame = np.full((height, width, 3), 4 * k, np.uint8)
            frame[:, :bar] = (255, 0, 0)
            frame[:, width - bar:] = (0, 0, 255)
            out.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(video.encode())
        chunk = av.AudioFrame.from_ndarray(np.stack([audio, audio]).astype(np.float32), format="fltp",
                                           layout="stereo")
        chunk.sample_rate = 44100
        out.mux(stream.encode(chunk))
        out.mux(stream.encode())


def test_prepare_converts_real_videos_skips_bad_ones_and_resumes(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    (raw / "speaker").mkdir(parents=True)
    t = np.arange(2 * 44100) / 44100
    _write_raw_video(raw / "speaker" / "talk.mp4", 60, 30, 96, 64, 0.3 * np.sin(2 * np.pi * 300 * t))
    _write_raw_video(raw / "silent.mp4", 30, 30, 96, 64, np.zeros_like(t))
    (raw / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(300))
    data.main(["prepare", str(raw), str(out), "--size", "32"])
    lines = capsys.readouterr()
    assert "prepared 1, already done 0, skipped as unreadable or silent 2" in lines.out
    assert lines.err.count("warning: skipped") == 2
    (folder,) = [p for p in out.iterdir()]
    assert folder.name == "speaker__talk"
    info = _probe(folder / "video.mp4")
    assert info["frames"] == 50 and info["fps"] == 25 and info["size"] == (32, 32)
    frames, _ = data.read_video(folder / "video.mp4")
    # centre square only (no red or blue bar), and output frame k shows source frame floor(k * 30 / 25)
    assert np.abs(frames[:, :, :, 0].astype(int) - frames[:, :, :, 2]).max() < 12
    want = 4 * np.floor(np.arange(50) * 30 / 25)
    assert np.abs(frames[:, 8:24, 8:24].mean((1, 2, 3)) - want).max() < 4
    wav, rate = data.read_wav(folder / "audio.wav")
    assert rate == 16000 and wav.shape == (50 * data.SAMPLES_PER_FRAME, 1)
    assert np.sqrt(np.mean(wav[2000:-2000] ** 2)) == pytest.approx(0.3 / math.sqrt(2), rel=0.05)
    data.main(["prepare", str(raw), str(out), "--size", "32"])  # a second run redoes nothing
    assert "prepared 0, already done 1, skipped as unreadable or silent 2" in capsys.readouterr().out


def test_prepare_uses_the_crop_boxes_given(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    _write_raw_video(raw / "a.mp4", 10, 25, 96, 64, 0.3 * np.sin(np.arange(44100) * 0.05))
    (tmp_path / "boxes.json").write_text(json.dumps({"a": [0, 0, 16, 16]}))  # inside the red bar
    data.main(["prepare", str(raw), str(out), "--size", "16", "--boxes", str(tmp_path / "boxes.json")])
    frames, _ = data.read_video(out / "a" / "video.mp4")
    assert frames[:, 4:12, 4:12, 0].mean() > 200 and frames[:, 4:12, 4:12, 2].mean() < 40


@pytest.mark.parametrize("argv, words", [
    ([], ["synth", "prepare", "layout"]),
    (["synth"], ["--videos", "--seconds", "--size", "--split", "--seed", "ground truth"]),
    (["prepare"], ["--size", "--boxes", "25 fps", "resumes"]),
])
def test_help_explains_each_command(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        data.main(argv + ["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert [w for w in words if w not in text] == []


@pytest.mark.parametrize("argv, message", [
    (["synth", "{tmp}/s", "--size", "63"], "--size must be an even number"),
    (["prepare", "{tmp}/nothing", "{tmp}/out"], "no video files"),
    (["prepare", "{tmp}", "{tmp}/out", "--boxes", "{tmp}/missing.json"], "cannot read crop boxes"),
    (["prepare", "{tmp}", "{tmp}/out", "--boxes", "{tmp}/three.json"], "not [x0, y0, x1, y1]"),
    (["synth", "{tmp}/a_file", "--videos", "1"], "a file of that name exists"),
    (["synth", "{tmp}/s", "--videos", "0"], "--videos: 0: must be at least 1"),
    (["synth", "{tmp}/s", "--seconds", "0.01"], "--seconds: 0.01: must be at least 0.04"),
    (["synth", "{tmp}/s", "--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "nothing").mkdir()
    (tmp_path / "three.json").write_text('{"clip": [10, 20, 200]}')
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        data.main([a.format(tmp=tmp_path) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_video_folder_splits_never_overlap(tmp_path):
    """Every 20th video is held out for validation; a folder of fewer than 20 holds out its last one."""
    data.main(["synth", str(tmp_path), "--videos", "3", "--seconds", "0.2", "--size", "32"])
    train_set, val_set = data.VideoFolder(tmp_path, "train"), data.VideoFolder(tmp_path, "val")
    assert len(val_set) == 1 and len(train_set) == 2
    assert not set(train_set.folders) & set(val_set.folders)
    assert set(train_set.folders) | set(val_set.folders) == set(data.VideoFolder(tmp_path).folders)
