"""Tests of world.py: the synthetic world is deterministic, its mouth follows the speech, its splits are
disjoint, and its command line writes playable videos in data.py's layout."""

import json
import math
import wave

import av
import numpy as np
import pytest
import torch

import audio
import common
import data
import world
from conftest import probe_video


def pearson(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def test_synthesis_is_deterministic_given_the_seed():
    a, b = world.synth_video("val", 3, 1.0, 64, seed=0), world.synth_video("val", 3, 1.0, 64, seed=0)
    c = world.synth_video("val", 3, 1.0, 64, seed=1)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.wav, b.wav) and a.meta == b.meta
    assert not np.array_equal(a.frames, c.frames)
    assert a.frames.shape == (25, 64, 64, 3) and a.wav.shape == (16000,)
    for seconds, frames in ((0.059, 1), (0.061, 2)):  # not whole frames: the speech is as long as the frames
        _, wav, meta = world.synth_script("val", 3, seconds)
        assert meta["num_frames"] == frames and len(wav) == frames * 640


@pytest.fixture(scope="module")
def scripts():
    """One minute of synthetic speech with its ground truth (no frames drawn: only the script is needed)."""
    return [world.synth_script("val", i, 4.0)[1:] for i in range(15)]


def test_mouth_follows_loudness_and_blinks_and_pose_do_not(scripts):
    loud = np.concatenate([audio.frame_loudness(wav, meta["num_frames"]) for wav, meta in scripts])
    assert len(loud) >= 20 * audio.FPS
    openness = np.concatenate([meta["openness"] for _, meta in scripts])
    assert pearson(openness, loud) > 0.8
    assert abs(pearson(np.concatenate([meta["blink"] for _, meta in scripts]), loud)) < 0.2
    pose = np.concatenate([meta["pose"] for _, meta in scripts])
    for k in range(3):
        assert abs(pearson(pose[:, k], loud)) < 0.2
    assert openness.std() > 0.2 and pose.std(0).min() > 0  # and all of them really move


def test_mel_energy_and_mouth_are_aligned_at_lag_zero(scripts):
    """An off-by-one between mel frames and video frames would move the peak of the cross-correlation."""
    pairs = [(np.array(meta["openness"]), audio.log_mel(wav, meta["num_frames"]).reshape(-1, 4, 80).mean((1, 2))
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
    for split in world.SPLITS:
        metas = [world.synth_script(split, i, 0.2)[2] for i in range(25)]
        ids[split] = {m["identity"]["id"] for m in metas}
        texts[split] = {m["text"] for m in metas}
        lo, hi = world.SPLITS[split]
        assert all(lo <= i < hi for i in ids[split])
    assert world.SPLITS["train"][1] - world.SPLITS["train"][0] >= 500
    for ranges in (world.SPLITS, world.UTTERANCE_SPLITS):  # all of each range, not only the 25 drawn above
        spans = sorted(ranges.values())
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not ids[a] & ids[b] and not texts[a] & texts[b]
    looks = {json.dumps({k: v for k, v in vars(world.identity(i)).items() if k != "id"}) for i in range(1100)}
    assert len(looks) == 1100  # every identity looks different


def test_mouth_is_big_dark_and_its_box_is_where_it_is_drawn():
    ident = world.identity(7)
    closed, box_closed = world.render_frame(ident, 64, 0.0, 0.3, 0.0, (0.0, 0.0, 0.0))
    opened, box_open = world.render_frame(ident, 64, 1.0, 0.3, 0.0, (0.02, -0.01, 4.0))
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


def test_the_mouth_box_moves_with_the_head():
    ident = world.identity(7)
    _, still = world.render_frame(ident, 64, 0.5, 0.3, 0.0, (0.0, 0.0, 0.0))
    _, moved = world.render_frame(ident, 64, 0.5, 0.3, 0.0, (0.06, 0.04, 0.0))  # 3.8 and 2.6 px at 64 px
    shift = np.array(moved) - np.array(still)
    assert np.abs(shift - [0.06 * 64, 0.04 * 64] * 2).max() <= 0.5


def test_roundness_follows_the_vowel_on_screen_and_eases_back_in_silence():
    """Frame i shows the phoneme spoken at its middle, (i + 0.5) / 25 s; in silence the lips ease to neutral 0.3."""
    wav = np.zeros(20 * 640, np.float32)
    wav[:10 * 640] = 0.5 * np.sin(np.arange(10 * 640) * 0.3)  # 10 loud frames, then 10 silent ones
    _, roundness = world.mouth_track(wav, [(0.0, "u"), (0.2, "i")], 20)
    assert list(roundness[:5]) == [1.0] * 5 and list(roundness[5:10]) == [0.0] * 5  # "i" from 0.2 s: frame 5
    assert abs(roundness[-1] - 0.3) < 0.01


def test_blinks_come_every_one_and_a_half_to_five_seconds():
    for seed in range(5):
        blink, _ = world.motion_track(250, np.random.default_rng(seed))  # 10 s
        onsets = np.flatnonzero((blink > 0) & (np.roll(blink, 1) == 0))
        assert 2 <= len(onsets) <= 7 and (blink > 0).mean() < 0.25


# ---------------------------------------------------------------------------------------------------------------
# On-disk layout, command line, clips


def test_synth_cli_writes_playable_videos_that_read_back(tmp_path, capsys):
    world.main([str(tmp_path), "--videos", "4", "--seconds", "3", "--size", "64"])
    folders = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(folders) == 4 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    for folder in folders:
        info = probe_video(folder / "video.mp4")
        assert info == {"frames": 75, "fps": 25.0, "codec": "h264", "pix_fmt": "yuv420p", "audio": ["aac"],
                        "size": (64, 64)}
        rate_bits = wave.open(str(folder / "audio.wav"))
        assert (rate_bits.getframerate(), rate_bits.getnchannels(), rate_bits.getnframes()) == (16000, 1, 48000)
        # the AAC track in the mp4 (decoded by FFmpeg) carries the same speech as audio.wav
        from_mp4, from_wav = audio.load_audio(folder / "video.mp4"), audio.load_audio(folder / "audio.wav")
        assert pearson(from_mp4[:47000], from_wav[:47000]) > 0.95
    from_disk, in_memory = data.VideoFolder(tmp_path), world.SyntheticVideos("train", 4, 3.0, 64)
    assert len(from_disk) == len(in_memory) == 4
    psnr = lambda x, y: 10 * math.log10(4 / (x - y).pow(2).mean())  # noqa: E731  (images in [-1, 1])
    chroma_only = lambda x: common.to_tensor(np.stack([av.VideoFrame.from_ndarray(f, format="rgb24").reformat(  # noqa: E731
        format="yuv420p").to_ndarray(format="rgb24") for f in ((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1)
                                                     .numpy()]))
    for i in (0, 3):
        a, b = from_disk[i], in_memory[i]
        # equal within video-compression error: H.264 at 4:2:0 loses about as much as 4:2:0 chroma alone (the
        # encoder is not bit-exact from run to run, so an absolute bound would be flaky)
        x, y = common.to_tensor(a.frames), common.to_tensor(b.frames)
        assert x.shape == y.shape == (75, 3, 64, 64) and psnr(x, y) > min(30, psnr(chroma_only(y), y) - 2.5)
        mel_a, mel_b = (audio.audio_features(v.wav, 75) for v in (a, b))
        assert torch.allclose(mel_a, mel_b, atol=0.05)  # 16-bit WAV quantisation only
        for key in data.GROUND_TRUTH:
            assert np.array_equal(a.meta[key], b.meta[key]), key


def test_help_explains_the_command(capsys):
    with pytest.raises(SystemExit) as e:
        world.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert [w for w in ["--videos", "--seconds", "--size", "--split", "--seed", "ground truth", "layout"]
            if w not in text] == []


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/s", "--size", "63"], "--size 63: must be even"),
    (["{tmp}/a_file", "--videos", "1"], "a file of that name exists"),
    (["{tmp}/s", "--videos", "0"], "--videos: 0: must be at least 1"),
    (["{tmp}/s", "--seconds", "0.01"], "--seconds: 0.01: must be at least 0.04"),
    (["{tmp}/s", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["{tmp}/mine", "--videos", "3"], "train_00002: a folder without meta.json"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "mine" / "train_00002").mkdir(parents=True)  # a user's folder where the third video would go
    with pytest.raises(SystemExit) as e:
        world.main([a.format(tmp=tmp_path) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "mine" / "train_00000").exists()  # found before any video was rendered


def test_render_folder_writes_the_held_out_people_where_video_folder_holds_out(tmp_path):
    """20 videos rendered by 2 worker processes: the 20th (the one VideoFolder keeps for validation) shows a person
    of the validation split; a second call renders nothing."""
    world.render_folder(tmp_path, 20, 0.04, 16, workers=2)
    val, train = data.VideoFolder(tmp_path, "val"), data.VideoFolder(tmp_path, "train")
    assert [m["split"] for m in val.meta] == ["val"] and {m["split"] for m in train.meta} == {"train"}
    assert len(train) == 19 and [m["index"] for m in train.meta[:3]] == [0, 1, 2]
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("meta.json")}
    world.render_folder(tmp_path, 20, 0.04, 16, workers=2)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("meta.json")} == stamps
