"""Tests of data.py: the on-disk layout, preparing real videos, and the clip datasets."""

import fractions
import json
import math
import os
import shutil
import struct
import weakref
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import audio
import common
import data
import train
import world
from conftest import probe_video
from vae import VAE, VAEConfig


def test_a_frame_pool_spreads_its_frames_over_every_video_with_their_ground_truth(tmp_path):
    videos = world.SyntheticVideos("test", 3, 2.0, 32)  # 50 frames each
    pool = data.build_frame_pool(videos, tmp_path / "pool.pt")
    n = 3 * data.FRAMES_PER_VIDEO
    assert pool["frames"].shape == (n, 32, 32, 3) and pool["frames"].dtype == torch.uint8
    assert pool["pose"].shape == (n, 3) and pool["mouth_box"].shape == (n, 4)
    everything = [(v, f) for v in range(3) for f in range(50)]
    frames = {v: videos[v] for v in range(3)}
    found, at = [], 0  # where each pool frame sits among the 150 frames of the three videos, in order
    for i, frame in enumerate(pool["frames"].numpy()):
        at = next(g for g in range(at, 150) if np.array_equal(frames[everything[g][0]].frames[everything[g][1]], frame))
        v, f = everything[at]
        assert pool["openness"][i].item() == pytest.approx(frames[v].meta["openness"][f])
        assert pool["pose"][i].tolist() == pytest.approx(frames[v].meta["pose"][f])
        found.append(at)
        at += 1
    gaps = np.diff(found)
    assert found[0] == 0 and found[-1] == 149 and set(gaps) <= {3, 4}  # evenly spread, first and last included
    assert [sum(everything[g][0] == v for g in found) for v in range(3)] == [16, 16, 16]  # every person alike
    loaded = data.load_frame_pool(tmp_path / "pool.pt")
    assert loaded.keys() == pool.keys() and all(torch.equal(loaded[k], pool[k]) for k in pool)
    torch.save({k: v[:, None] for k, v in pool.items()}, tmp_path / "old.pt")  # the layout of ClipPool's clips
    with pytest.raises(common.UserError, match="a frame pool of an older letstalk; delete it"):
        data.load_frame_pool(tmp_path / "old.pt")


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
    (tmp_path / "boxes.json").write_text(json.dumps({"speaker/talk": [16, 0, 80, 64]}))  # the centre: no face
    boxes = ["--boxes", str(tmp_path / "boxes.json")]
    data.main(["prepare", str(raw), str(out), "--size", "32", *boxes])
    lines = capsys.readouterr()
    assert "prepared 1, already done 0, skipped 2 (unreadable, silent or without one face)" in lines.out
    assert lines.err.count("warning: skipped") == 2
    (folder,) = [p for p in out.iterdir()]
    assert folder.name == "speaker__talk"
    info = probe_video(folder / "video.mp4")
    assert info["frames"] == 50 and info["fps"] == 25 and info["size"] == (32, 32)
    frames = data.read_video(folder / "video.mp4")
    # centre square only (no red or blue bar), and output frame k shows source frame floor(k * 30 / 25)
    assert np.abs(frames[:, :, :, 0].astype(int) - frames[:, :, :, 2]).max() < 12
    want = 4 * np.floor(np.arange(50) * 30 / 25)
    assert np.abs(frames[:, 8:24, 8:24].mean((1, 2, 3)) - want).max() < 4
    wav, rate = audio.read_wav(folder / "audio.wav")
    assert rate == 16000 and wav.shape == (50 * audio.SAMPLES_PER_FRAME, 1)
    assert np.sqrt(np.mean(wav[2000:-2000] ** 2)) == pytest.approx(0.3 / math.sqrt(2), rel=0.05)
    data.main(["prepare", str(raw), str(out), "--size", "32", *boxes])  # a second run redoes nothing
    assert "prepared 0, already done 1, skipped 2" in capsys.readouterr().out
    # another video of the same name is not taken for the one prepared: refused before any work
    (tmp_path / "other" / "speaker").mkdir(parents=True)
    _write_raw_video(tmp_path / "other" / "speaker" / "talk.mp4", 30, 30, 96, 64, 0.3 * np.sin(np.pi * t))
    with pytest.raises(common.UserError, match=f"{out / 'speaker__talk'}, which holds another video, prepared from "
                       f"{raw / 'speaker' / 'talk.mp4'}; rename one"):
        data.prepare(tmp_path / "other", out, 32)
    raw.rename(tmp_path / "moved")  # the videos prepared from a folder that has moved since: done
    data.main(["prepare", str(tmp_path / "moved"), str(out), "--size", "32", *boxes])
    assert "prepared 0, already done 1, skipped 2" in capsys.readouterr().out


def test_a_slow_video_shows_its_last_frame_for_as_long_as_the_others(tmp_path):
    """A 10-fps video of 2 s: its last frame is shown for 0.1 s like every other one, not for one output frame
    (which cut the video to 48 frames)."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    _write_raw_video(raw / "slow.mp4", 20, 10, 96, 64, 0.3 * np.sin(np.arange(2 * 44100) * 0.05))
    (tmp_path / "boxes.json").write_text(json.dumps({"slow": [16, 0, 80, 64]}))
    data.main(["prepare", str(raw), str(out), "--size", "32", "--boxes", str(tmp_path / "boxes.json")])
    frames = data.read_video(out / "slow" / "video.mp4")
    want = 4 * np.floor(np.arange(50) * 10 / 25)  # output frame k shows source frame floor(k * 10 / 25)
    assert len(frames) == 50 and np.abs(frames[:, 8:24, 8:24].mean((1, 2, 3)) - want).max() < 4


def test_a_video_whose_sound_ends_early_is_cut_to_its_sound(tmp_path):
    """2 s of picture with 1 s of sound: the prepared video is the 25 frames that have sound, not 50 frames with
    1 s of audio (which VideoFolder then refused as a video longer than its audio.wav)."""
    _write_raw_video(tmp_path / "short.mp4", 50, 25, 48, 32, 0.3 * np.sin(np.arange(44100) * 0.05))
    video = data.prepare_video(tmp_path / "short.mp4", 16, (8, 0, 40, 32))
    assert video.meta["num_frames"] == len(video.frames) == 25 and len(video.wav) == 25 * audio.SAMPLES_PER_FRAME
    data.save_video(tmp_path / "out" / "short", video)
    assert len(data.VideoFolder(tmp_path / "out")[0].frames) == 25  # and it reads back


def test_a_still_picture_with_a_sound_track_is_refused(tmp_path):
    """One frame and 2 s of speech (a podcast's cover image) made a 1-frame video, the speech cut to 40 ms."""
    _write_raw_video(tmp_path / "still.mp4", 1, 25, 96, 64, 0.3 * np.sin(np.arange(2 * 44100) * 0.05))
    for box in ((16, 0, 80, 64), None):  # without a box: said before the detector, whose advice is to give one
        with pytest.raises(common.UserError, match="one frame, a still picture"):
            data.prepare_video(tmp_path / "still.mp4", 32, box)


def test_each_output_frame_shows_the_source_frame_on_screen_at_its_time():
    """A timestamp a hair past k / 25 s (a 1/90000 time base) still counts as on screen at k / 25 s; a frame is
    shown from its timestamp until the next one's."""
    assert list(data._resample_frames(np.array([0, 0.04 + 1e-9, 0.08]), 3)) == [0, 1, 2]
    assert list(data._resample_frames(np.array([0, 0.1, 0.2]), 6)) == [0, 0, 0, 1, 1, 2]


def test_a_portrait_is_cropped_to_its_centre_square():
    tall = np.zeros((30, 10, 3), np.uint8)
    tall[10:20] = (255, 0, 0)  # the middle third: red
    assert (common.square_image(Image.fromarray(tall), 10) == (255, 0, 0)).all()
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = (0, 0, 255)
    assert (common.square_image(Image.fromarray(wide), 10) == (0, 0, 255)).all()


def test_prepare_finds_the_face_and_skips_a_video_without_one(tmp_path, capsys):
    """A public-domain photograph (NASA's portrait of astronaut Eileen Collins, from scikit-image's data folder,
    192 px) panned by 16 px inside a wider frame, with synthesized speech: the prepared frames show the face in the
    middle, the box is in meta.json; a video of coloured bars beside it is skipped with one warning."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    photo = np.asarray(Image.open(Path(__file__).parent / "data" / "astronaut.jpg").convert("RGB"))
    wav = world.utterance(0, 2.0)[0]
    with av.open(str(raw / "astronaut.mp4"), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 256, 192, "yuv420p"
        sound = container.add_stream("aac", rate=16000, layout="mono")
        for k in range(50):
            frame = np.full((192, 256, 3), 40, np.uint8)
            frame[:, 24 + k // 3:216 + k // 3] = photo
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())
        chunk = av.AudioFrame.from_ndarray(wav[None], format="flt", layout="mono")
        chunk.sample_rate, chunk.pts = 16000, 0
        container.mux(sound.encode(chunk))
        container.mux(sound.encode())
    _write_raw_video(raw / "bars.mp4", 30, 25, 96, 64, 0.3 * np.sin(np.arange(88200) * 0.05))
    data.main(["prepare", str(raw), str(out), "--size", "96"])
    assert "prepared 1, already done 0, skipped 1" in capsys.readouterr().out
    x0, y0, x1, y1 = json.loads((out / "astronaut" / "meta.json").read_text())["box"]
    assert x1 - x0 == y1 - y0 and 0 <= x0 and x1 <= 256 and 0 <= y0 and y1 <= 192
    frames = data.read_video(out / "astronaut" / "video.mp4")
    fx0, fy0, fx1, fy1 = data.find_face([frames[len(frames) // 2]] * 3, enlarge=1)
    assert abs((fx0 + fx1) / 2 - 48) < 12 and abs((fy0 + fy1) / 2 - 48) < 12  # the face in the middle


def test_a_face_in_most_frames_gets_a_box_inside_the_frame():
    """The astronaut's face in a frame no taller than her photo: the enlarged box is cut to the frame's height,
    not pushed above it. A face in only one of 8 frames (cut-aways, B-roll) gets no box."""
    photo = np.asarray(Image.open(Path(__file__).parent / "data" / "astronaut.jpg").convert("RGB"))
    frame = np.full((192, 400, 3), 40, np.uint8)
    frame[:, 100:292] = photo
    blank = np.full_like(frame, 40)
    x0, y0, x1, y1 = data.find_face([frame] * 5 + [blank] * 3, enlarge=8)  # (her face: 34 px)
    assert 0 <= y0 and y1 <= 192 and 0 <= x0 and x1 <= 400 and x1 - x0 == y1 - y0 == 192
    assert data.find_face([frame] + [blank] * 7) is None


def test_a_face_that_moves_between_places_gets_no_box_between_them():
    """An interview: the largest face is on the left in half the frames, on the right in the others. The median
    of their boxes lay in the empty middle, so every prepared frame showed background; there is no one box."""
    photo = np.asarray(Image.open(Path(__file__).parent / "data" / "astronaut.jpg").convert("RGB"))

    def frame(x):
        out = np.full((192, 480, 3), 40, np.uint8)
        out[:, x:x + 192] = photo
        return out
    left = data.find_face([frame(0)] * 3, enlarge=1)
    assert 66 <= (left[0] + left[2]) / 2 <= 102  # the detector finds the face at either place alone
    assert data.find_face([frame(0)] * 4 + [frame(288)] * 4, enlarge=1) is None
    assert data.find_face([frame(0)] * 6 + [frame(288)] * 2, enlarge=1) == left  # most frames agree: that face
    assert data.find_face([frame(0), frame(26), frame(52), frame(26)] * 2) is not None  # one face swaying: its box


def test_the_crop_box_is_centred_on_the_face():
    """The astronaut's face (the detector's 36 px box at x 66..102, y 25..61 of her photo) centres on her nose,
    about (84, 43); with the photo at (100, 100) in a larger frame, the box is centred there at every enlargement
    (a centre taken at the box's bottom edge, y + h, put her chin in the middle and cut off her hair)."""
    photo = np.asarray(Image.open(Path(__file__).parent / "data" / "astronaut.jpg").convert("RGB"))
    frame = np.full((400, 400, 3), 40, np.uint8)
    frame[100:292, 100:292] = photo
    for enlarge in (1, 2):
        x0, y0, x1, y1 = data.find_face([frame] * 3, enlarge=enlarge)
        assert abs((x1 - x0) - (y1 - y0)) <= 1 and x1 - x0 >= 34 * enlarge  # square, to within rounding
        assert abs((x0 + x1) / 2 - 184) <= 5 and abs((y0 + y1) / 2 - 143) <= 5, (enlarge, (x0, y0, x1, y1))


def test_a_face_in_half_the_frames_is_not_a_face_in_most():
    """find_face wants a face in more than half of the frames: 4 of 8 gets no box, 5 of 8 gets one."""
    photo = np.asarray(Image.open(Path(__file__).parent / "data" / "astronaut.jpg").convert("RGB"))
    frame = np.full((192, 256, 3), 40, np.uint8)
    frame[:, 32:224] = photo
    blank = np.full_like(frame, 40)
    assert data.find_face([frame] * 4 + [blank] * 4) is None
    assert data.find_face([frame] * 5 + [blank] * 3) is not None


def test_prepare_uses_the_crop_boxes_given(tmp_path, capsys):
    """A box is given to one video by its path under the raw folder: a.mp4 and sub/a.mp4, one stem, take their own
    (the red bar left, the blue bar right); a box changed later is noted, a box naming no video refused."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    (raw / "sub").mkdir(parents=True)
    for path in (raw / "a.mp4", raw / "sub" / "a.mp4"):
        _write_raw_video(path, 10, 25, 96, 64, 0.3 * np.sin(np.arange(44100) * 0.05))
    (tmp_path / "boxes.json").write_text(json.dumps({"a": [0, 0, 16, 16], "sub/a": [80, 0, 96, 16]}))
    data.main(["prepare", str(raw), str(out), "--size", "16", "--boxes", str(tmp_path / "boxes.json")])
    red, blue = data.read_video(out / "a" / "video.mp4"), data.read_video(out / "sub__a" / "video.mp4")
    assert red[:, 4:12, 4:12, 0].mean() > 200 and red[:, 4:12, 4:12, 2].mean() < 40
    assert blue[:, 4:12, 4:12, 2].mean() > 200 and blue[:, 4:12, 4:12, 0].mean() < 40
    (tmp_path / "boxes.json").write_text(json.dumps({"a": [0, 0, 32, 32], "sub/a": [80, 0, 96, 16]}))
    capsys.readouterr()
    data.main(["prepare", str(raw), str(out), "--size", "16", "--boxes", str(tmp_path / "boxes.json")])
    lines = capsys.readouterr()  # a box changed for a video already prepared: kept, and said so
    assert "already done 2" in lines.out and lines.err.count("was prepared with another box") == 1
    (tmp_path / "boxes.json").write_text(json.dumps({"a": [0, 0, 16, 16], "sub/b": [80, 0, 96, 16]}))
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", str(raw), str(tmp_path / "new"), "--boxes", str(tmp_path / "boxes.json")])
    assert e.value.code == 2 and "--boxes: 'sub/b' names no video of" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("argv, words", [
    ([], ["prepare", "layout", "world.py"]),
    (["prepare"], ["--size", "--boxes", "25 fps", "resumes"]),
])
def test_help_explains_each_command(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        data.main(argv + ["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert [w for w in words if w not in text] == []


@pytest.mark.parametrize("argv, message", [
    (["prepare", "{tmp}", "{tmp}/out", "--size", "63"], "--size 63: must be even"),
    (["prepare", "{tmp}/nothing", "{tmp}/out"], "no video files"),
    (["prepare", "{tmp}/missing", "{tmp}/out"], "missing: no such folder"),
    (["prepare", "{tmp}/a_file", "{tmp}/out"], "a_file: a file, not a folder of videos"),
    (["prepare", "{tmp}", "{tmp}/out", "--boxes", "{tmp}/missing.json"], "cannot read crop boxes"),
    (["prepare", "{tmp}", "{tmp}/out", "--boxes", "{tmp}/three.json"], "not [x0, y0, x1, y1]"),
    (["prepare", "{tmp}", "{tmp}/a_file"], "a file of that name exists"),
    (["prepare", "{tmp}", "{tmp}/out", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["prepare", "{tmp}", "{tmp}/out", "--shard", "2/2"], "--shard 2/2: give i/n with 0 <= i < n"),
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


def _tiny_raw(path):
    """A 0.4 s raw video of 48x32 px with sound (its centre square, the box [8, 0, 40, 32], has no bars)."""
    _write_raw_video(path, 10, 25, 48, 32, 0.3 * np.sin(np.arange(20000) * 0.05))


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_prepare_refuses_to_replace_a_file_or_folder_of_the_users(tmp_path, capsys, kind):
    """out/notes, not written by prepare (no meta.json), is where raw/notes.mp4 would go: prepare stops before any
    work (a.mp4, which could be prepared, is not) with one line naming it, and every file stays as it was."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    _tiny_raw(raw / "a.mp4")
    _tiny_raw(raw / "notes.mp4")
    (tmp_path / "boxes.json").write_text(json.dumps({"a": [8, 0, 40, 32], "notes": [8, 0, 40, 32]}))
    mine = out / "notes" / "todo.txt" if kind == "folder" else out / "notes"
    mine.parent.mkdir(parents=True)
    mine.write_text("my notes")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", str(raw), str(out), "--size", "16", "--boxes", str(tmp_path / "boxes.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {out / 'notes'}: a {kind}")
    assert "move it away or choose another output folder" in err
    assert sorted(tmp_path.rglob("*")) == before and mine.read_text() == "my notes"


def test_prepare_shards_take_every_nth_video(tmp_path, capsys):
    """--shard i/n prepares videos i, i + n, ... of the sorted sources: of a, b, c, shard 0/2 takes a and c, and
    shard 1/2 then b, so two machines share the folder without overlap."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    for name in "abc":
        _tiny_raw(raw / f"{name}.mp4")
    (tmp_path / "boxes.json").write_text(json.dumps({name: [8, 0, 40, 32] for name in "abc"}))
    boxes = ["--size", "16", "--boxes", str(tmp_path / "boxes.json")]
    data.main(["prepare", str(raw), str(out), "--shard", "0/2", *boxes])
    assert "prepared 2, already done 0" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["a", "c"]
    data.main(["prepare", str(raw), str(out), "--shard", "1/2", *boxes])
    assert "prepared 1, already done 0" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "c"]


def test_a_video_and_a_link_to_it_are_prepared_once_under_the_files_own_name(tmp_path, capsys):
    """raw/a.mp4 is a link to raw/z.mp4: one video, prepared into out/z (its own name, which --boxes names it by),
    not into out/a, though the link's name sorts first."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    _tiny_raw(raw / "z.mp4")
    (raw / "a.mp4").symlink_to("z.mp4")
    (tmp_path / "boxes.json").write_text(json.dumps({"z": [8, 0, 40, 32]}))
    data.main(["prepare", str(raw), str(out), "--size", "16", "--boxes", str(tmp_path / "boxes.json")])
    assert "prepared 1, already done 0, skipped 0" in capsys.readouterr().out
    assert [p.name for p in out.iterdir()] == ["z"]


def test_save_video_replaces_only_video_folders_and_leaves_no_partial_folder(tmp_path, monkeypatch):
    video = data.Video(np.zeros((2, 16, 16, 3), np.uint8), np.zeros(2 * audio.SAMPLES_PER_FRAME, np.float32),
                       {"num_frames": 2, "size": 16})
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("my notes")
    with pytest.raises(common.UserError, match="notes: a folder without meta.json"):
        data.save_video(tmp_path / "notes", video)
    assert [p.name for p in tmp_path.rglob("*")] == ["notes", "todo.txt"]
    data.save_video(tmp_path / "v", video)
    (tmp_path / "v" / "still.png").write_bytes(b"world.py --still's")
    data.save_video(tmp_path / "v", video)  # an older video folder of that name is replaced
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["audio.wav", "meta.json", "video.mp4"]
    (tmp_path / "v" / "talk.mp4").write_bytes(b"sample.py's video of it")  # but not with a file of the user's
    with pytest.raises(common.UserError, match="v: a video's folder that also holds talk.mp4, which replacing it"):
        data.save_video(tmp_path / "v", video)
    assert (tmp_path / "v" / "talk.mp4").exists()

    def disk_full(*args):
        raise common.UserError("audio.wav: cannot write (No space left on device)")
    monkeypatch.setattr(data, "write_wav", disk_full)
    with pytest.raises(common.UserError, match="No space left"):
        data.save_video(tmp_path / "w", video)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "v"]  # no .w.partial left


def test_a_link_where_a_video_folder_would_go_is_never_replaced(tmp_path):
    """A link in the output folder, to a video folder elsewhere or to nothing, is the user's: replacing it would
    drop the link (or, followed, delete the video it points to), so check_replaceable refuses it."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "meta.json").write_text(json.dumps({"num_frames": 2}))  # a video folder, which alone is replaceable
    data.check_replaceable(elsewhere)
    (tmp_path / "linked").symlink_to(elsewhere)
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    for link in ("linked", "dangling"):
        with pytest.raises(common.UserError, match=f"{link}: a link, where a video's folder would be written"):
            data.check_replaceable(tmp_path / link)


@pytest.mark.parametrize("meta", [{"num_frames": 0}, {"num_frames": -3}, {"num_frames": 2.5}, {"fps": 25}, [2]])
def test_a_meta_json_without_a_positive_frame_count_is_refused(tmp_path, meta):
    """A video of 0 frames is no video: its meta.json is refused as one without a frame count, naming the file."""
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(common.UserError, match="meta.json: no frame count .num_frames.; delete its folder"):
        data._read_meta(tmp_path / "meta.json")
    (tmp_path / "meta.json").write_text(json.dumps({"num_frames": 1}))
    assert data._read_meta(tmp_path / "meta.json") == {"num_frames": 1}


def test_decode_frames_converts_each_frame_as_it_is_decoded(tmp_path):
    """Only the converted frames are kept, and each full frame is gone before the next is decoded: a long video's
    full-size frames never sit in memory together."""
    _tiny_raw(tmp_path / "a.mp4")
    seen, alive = [], []  # at each conversion: how many frames handed to convert before are still in memory

    def small(image):
        alive.append(sum(ref() is not None for ref in seen))
        seen.append(weakref.ref(image))
        return np.asarray(image.resize((8, 8)))
    frames, times = data.decode_frames(tmp_path / "a.mp4", convert=small)
    assert len(frames) == len(times) == 10 and all(f.shape == (8, 8, 3) for f in frames)
    assert alive == [0] * 10
    images, _ = data.decode_frames(tmp_path / "a.mp4")
    assert [image.size for image in images] == [(48, 32)] * 10  # without convert: PIL images, as decoded


def test_the_face_detector_sees_frames_spread_over_the_whole_video(tmp_path):
    """spread_frames holds at most 2 * n frames in its one pass, yet its n frames span the video: each frame of
    this 40-s video is filled with its own second, and the 8 picked ones cover it with gaps of 5 s, give or take a
    factor of two."""
    seconds = 40
    frames = np.repeat(np.arange(seconds, dtype=np.uint8) * 6, 25)[:, None, None, None] * np.ones((1, 16, 16, 3),
                                                                                              np.uint8)
    data.write_mp4(tmp_path / "long.mp4", frames, crf=0)
    spread, count = data.spread_frames(tmp_path / "long.mp4")
    picked = [int(round(f.mean() / 6)) for f in spread]
    assert count == 1000 and len(picked) == 8 and picked[0] == 0 and picked[-1] >= 32
    assert all(2.5 <= b - a <= 10 for a, b in zip(picked, picked[1:]))


def test_a_folder_of_mixed_frame_sizes_is_refused_and_its_size_is_known(tmp_path):
    """Videos of 32 and 16 px in one folder are refused at once, in every split (training would fail deep inside
    when stacking their frames); a folder of one size tells it, and a video whose frames disagree with its
    meta.json is refused when decoded."""
    world.main([str(tmp_path), "--videos", "1", "--seconds", "0.04", "--size", "32"])
    assert data.VideoFolder(tmp_path).size == 32
    meta = json.loads((tmp_path / "train_00000" / "meta.json").read_text())
    (tmp_path / "train_00000" / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "size"}))
    assert data.VideoFolder(tmp_path).size == 32  # an old folder, made before meta.json held the size: decoded
    (tmp_path / "train_00000" / "meta.json").write_text(json.dumps({**meta, "size": 16}))
    videos = data.VideoFolder(tmp_path)
    with pytest.raises(common.UserError, match="train_00000: meta.json gives 16x16 frames, video.mp4 holds 32x32"):
        videos[0]
    (tmp_path / "train_00000" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit):  # world.py and prepare refuse to add videos of another size: mixed by hand
        world.main([str(tmp_path), "--videos", "1", "--seconds", "0.04", "--size", "16", "--split", "val"])
    world.main([str(tmp_path / "other"), "--videos", "1", "--seconds", "0.04", "--size", "16", "--split", "val"])
    shutil.move(tmp_path / "other" / "val_00000", tmp_path / "val_00000")
    for split in ("all", "train", "val"):
        with pytest.raises(common.UserError, match="train_00000 holds 32 px frames but .*val_00000 16 px; "
                           "prepare .or render. all the videos of a folder with one --size"):
            data.VideoFolder(tmp_path, split)
    for name in ("train_00000", "val_00000"):  # an old folder of mixed sizes: found as its videos are decoded
        meta = json.loads((tmp_path / name / "meta.json").read_text())
        (tmp_path / name / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "size"}))
    videos = data.VideoFolder(tmp_path)
    with pytest.raises(common.UserError, match="val_00000: 16x16 frames, the folder's others 32x32"):
        videos[1]


def test_video_folder_splits_never_overlap(tmp_path, capsys):
    """Every 20th video is held out for validation; a folder of fewer than 20 holds out its last one. A folder
    of one video, which a run can only train on, gets a note from train.training_split that its validation is on
    that video (not from VideoFolder, which --export reads too)."""
    world.main([str(tmp_path), "--videos", "3", "--seconds", "0.2", "--size", "32"])
    train_set, val_set = data.VideoFolder(tmp_path, "train"), data.VideoFolder(tmp_path, "val")
    assert len(val_set) == 1 and len(train_set) == 2
    assert not set(train_set.folders) & set(val_set.folders)
    assert set(train_set.folders) | set(val_set.folders) == set(data.VideoFolder(tmp_path).folders)
    assert train.training_split(tmp_path).folders == train_set.folders and "note" not in capsys.readouterr().err
    for extra in train_set.folders:
        shutil.rmtree(extra)
    assert data.VideoFolder(tmp_path, "train").folders == data.VideoFolder(tmp_path, "val").folders
    assert train.training_split(tmp_path).folders == data.VideoFolder(tmp_path, "val").folders
    assert "holds one video, so training validates on the video it trains on" in capsys.readouterr().err


def test_prepare_keeps_sound_and_picture_together_when_the_streams_start_apart(tmp_path):
    """A file whose video starts 0.4 s after its audio (a cut recording): a flash at 1.2 s and a loud 40 ms at 1.2 s
    must land on the same prepared frame. Shifting each stream by its own first timestamp put them 10 frames apart."""
    path = tmp_path / "offset.mkv"
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=25)
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
        sound = out.add_stream("pcm_s16le", rate=16000, layout="mono")
        for k in range(50):  # frames at 0.4 s + k / 25; frame 20 (1.2 s) is the flash
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 250 if k == 20 else 30, np.uint8), "rgb24")
            frame.pts, frame.time_base = k + 10, fractions.Fraction(1, 25)
            out.mux(video.encode(frame))
        out.mux(video.encode())
        t = np.arange(int(2.4 * 16000)) / 16000  # from 0 s; loud from 1.2 s to 1.24 s
        wav = 0.3 * np.sin(2 * np.pi * 300 * t) * np.where((t >= 1.2) & (t < 1.24), 1.0, 0.05)
        chunk = av.AudioFrame.from_ndarray((wav * 32767).astype(np.int16)[None], format="s16", layout="mono")
        chunk.sample_rate, chunk.pts, chunk.time_base = 16000, 0, fractions.Fraction(1, 16000)
        out.mux(sound.encode(chunk))
        out.mux(sound.encode())
    prepared = data.prepare_video(path, 32, box=(0, 0, 32, 32))
    flash = int(np.argmax(prepared.frames.mean(axis=(1, 2, 3))))
    loud = int(np.argmax(audio.frame_loudness(prepared.wav, prepared.meta["num_frames"])))
    assert flash == loud == 20


# ---------------------------------------------------------------------------------------------------------------
# Latents for training: encoded once per video, fresh clips every step


def _stub_cache(folder, videos, frames):
    """A VideoCache of `videos` tiny entries of `frames` frames (the sampler draws from their lengths)."""
    k = torch.arange(frames, dtype=torch.float32)  # frame k holds the number k in each of its arrays
    entry = {"latents": k.view(frames, 1, 1, 1).expand(frames, 4, 2, 2).clone(),
             "mel": k.view(frames, 1, 1).expand(frames, 20, 80).clone(), "openness": k.clone()}
    for v in range(videos):
        torch.save(entry, folder / f"v{v}.pt")
    return data.VideoCache(folder, [f"v{v}" for v in range(videos)])


def test_forty_steps_of_fresh_clips_cover_the_training_videos(tmp_path):
    """40 videos of 3 s (38 for training, as VideoFolder holds out 2): 40 steps of batch 8 draw at least 280
    distinct clips from at least 90% of the videos; a fixed pool of 2000 clips would repeat the same ones."""
    sampler = data.ClipSampler(_stub_cache(tmp_path, 38, 75), frames=16, motion=2, seed=0)
    drawn = [sampler.draws(step, 0, 8) for step in range(40)]
    clips = {(v, s) for video, start, _ in drawn for v, s in zip(video, start)}
    assert len(clips) >= 280 and len({v for v, _ in clips}) >= 0.9 * 38


def test_each_draw_is_a_pure_function_of_seed_step_and_rank(tmp_path):
    cache = _stub_cache(tmp_path, 5, 40)
    sampler = data.ClipSampler(cache, frames=8, motion=2, seed=7)
    a, b = sampler.draws(3, 1, 16), data.ClipSampler(cache, 8, 2, seed=7).draws(3, 1, 16)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(sampler.draws(3, 0, 16)[1], a[1])  # another rank draws other clips
    video, start, ref = sampler.draws(0, 0, 500)
    assert set(start) == set(range(2, 33))  # every start with room for the motion frames and the clip
    assert ((ref < start - 2) | (ref > start + 7)).all()  # the portrait is from outside
    batch = sampler.batch(0, 0, 4)
    video, start, ref = sampler.draws(0, 0, 4)
    assert batch["latents"].shape == (4, 8, 4, 2, 2) and batch["motion"].shape == (4, 2, 4, 2, 2)
    # frame k of the stub holds the number k: the clip, its audio and ground truth, its motion frames and the portrait
    # are the frames drawn (audio a frame off would teach the model to move its lips out of sync)
    clip = torch.from_numpy(start[:, None] + np.arange(8)).float()
    assert torch.equal(batch["latents"][:, :, 0, 0, 0], clip)
    assert torch.equal(batch["mel"][:, :, 0, 0], clip) and torch.equal(batch["openness"], clip)
    assert torch.equal(batch["motion"][:, :, 0, 0, 0], torch.from_numpy(start[:, None] - np.array([2, 1])).float())
    assert torch.equal(batch["ref"][:, 0, 0, 0], torch.from_numpy(ref).float())


@pytest.fixture(scope="module")
def three_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    world.main([str(root), "--videos", "3", "--seconds", "0.4", "--size", "32"])
    return data.VideoFolder(root)


def test_ranks_encode_disjoint_shares_and_a_killed_encode_resumes(tmp_path, three_videos):
    vae = VAE(VAEConfig(resolution=32, factor=4, width=8)).eval()
    vae.latent_scale.fill_(3.0)  # the cache holds what the diffusion model sees: the VAE's latents times it
    assert data.encode_videos(three_videos, vae, tmp_path / "one", "cpu") == 3
    video = three_videos[0]
    cached = torch.load(tmp_path / "one" / f"{three_videos.folders[0].name}.pt")
    with torch.no_grad():
        want = vae.encode(common.to_tensor(video.frames)) * 3.0
    assert torch.allclose(cached["latents"].float(), want, rtol=2e-3, atol=2e-3)  # (fp16)
    assert torch.allclose(cached["mel"].float(), audio.audio_features(video.wav, len(video.frames)), atol=2e-2)
    assert [data.encode_videos(three_videos, vae, tmp_path / "two", "cpu", rank, 2) for rank in (0, 1)] == [2, 1]
    for name in (f.name for f in three_videos.folders):  # the ranks' union is a one-process encode
        a, b = torch.load(tmp_path / "one" / f"{name}.pt"), torch.load(tmp_path / "two" / f"{name}.pt")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = tmp_path / "one" / f"{three_videos.folders[0].name}.pt"
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "one").iterdir() if p != first}
    first.unlink()  # killed before this one was written
    assert data.encode_videos(three_videos, vae, tmp_path / "one", "cpu") == 1
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and first.exists()
    cache = data.VideoCache(tmp_path / "one", [f.name for f in three_videos.folders])
    assert list(cache.lengths) == [10, 10, 10] and cache.entries[0]["latents"].shape == (10, 4, 8, 8)
    assert cache.entries[0]["latents"].dtype == torch.float16 and "openness" in cache.entries[0]


def test_a_video_prepared_again_is_cached_again(tmp_path, capsys):
    """The cache names a file after its video: a folder rendered (or prepared) again under the same names, here
    shorter, has its videos encoded again, with a note, not read from the old files (which gave a VAE the old
    frames and a diffusion run an IndexError); the same videos copied or touched are not."""
    root, vae = tmp_path / "videos", VAE(VAEConfig(resolution=32, factor=4, width=8)).eval()
    world.main([str(root), "--videos", "2", "--seconds", "0.4", "--size", "32"])
    assert data.encode_videos(data.VideoFolder(root), vae, tmp_path / "cache", "cpu") == 2
    for path in root.rglob("*"):  # copied or touched: the same videos
        os.utime(path, (0, 0))
    assert data.encode_videos(data.VideoFolder(root), vae, tmp_path / "cache", "cpu") == 0
    shutil.rmtree(root)
    world.main([str(root), "--videos", "2", "--seconds", "0.2", "--size", "32"])
    videos = data.VideoFolder(root)
    capsys.readouterr()
    assert data.encode_videos(videos, vae, tmp_path / "cache", "cpu") == 2
    assert "2 cached videos are not those of the videos now" in capsys.readouterr().err
    assert list(data.VideoCache(tmp_path / "cache", [f.name for f in videos.folders]).lengths) == [5, 5]


def test_the_vae_stage_caches_every_eighth_frame_of_every_video(tmp_path, three_videos):
    assert [data.cache_frames(three_videos, tmp_path, rank, 2) for rank in (0, 1)] == [2, 1]
    cache = data.VideoCache(tmp_path, [f.name for f in three_videos.folders], key="frames")
    assert list(cache.lengths) == [2, 2, 2]  # 10 frames each: frames 0 and 8
    assert np.array_equal(cache.entries[1]["frames"].numpy(), three_videos[1].frames[::8])
    video, position = cache.locate(np.array([0, 1, 2, 5]))
    assert video.tolist() == [0, 0, 1, 2] and position.tolist() == [0, 1, 0, 1]


def _resident_bytes():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_opening_the_cache_does_not_read_it_into_memory(tmp_path):
    """40 encoded videos (32 MB on disk): opening them memory-mapped grows this process by under a tenth of that."""
    names = [f"v{i:03d}" for i in range(40)]
    for i, name in enumerate(names):
        torch.save({"latents": torch.full((100, 4, 32, 32), i, dtype=torch.float16),
                    "mel": torch.zeros(100, 20, 80, dtype=torch.float16)}, tmp_path / f"{name}.pt")
    on_disk = sum(p.stat().st_size for p in tmp_path.iterdir())
    before = _resident_bytes()
    cache = data.VideoCache(tmp_path, names)
    assert _resident_bytes() - before < on_disk / 10
    assert cache.entries[39]["latents"][0, 0, 0, 0] == 39  # and every entry reads back on access


def test_a_phone_video_stored_sideways_is_decoded_upright(tmp_path):
    """A phone keeps its frames as the sensor saw them and a matrix in the file (tkhd) that turns them for display:
    here 90 degrees clockwise, so the stored 64x32 frame with a bright top-left corner shows as 32x64, bright at
    the top right."""
    frames = np.zeros((5, 32, 64, 3), np.uint8)
    frames[:, :8, :8] = 255
    data.write_mp4(tmp_path / "landscape.mp4", frames)
    raw = (tmp_path / "landscape.mp4").read_bytes()
    identity = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    at = raw.index(identity, raw.index(b"tkhd"))
    clockwise = struct.pack(">9I", 0, 0x10000, 0, 0xFFFF0000, 0, 0, 0, 0, 0x40000000)
    (tmp_path / "phone.mp4").write_bytes(raw[:at] + clockwise + raw[at + 36:])
    images, _ = data.decode_frames(tmp_path / "phone.mp4", convert=np.asarray)
    assert images[0].shape == (64, 32, 3)
    assert images[0][:8, -8:].mean() > 200 and images[0][:8, :8].mean() < 50
    assert data.spread_frames(tmp_path / "phone.mp4")[0][0].shape == (64, 32, 3)


def test_a_video_of_squeezed_pixels_is_decoded_as_shown(tmp_path):
    """Broadcast and camcorder videos may store their frames squeezed, with a pixel aspect ratio that widens them
    when shown: 48x48 stored pixels of aspect 4/3 show as 64x48, and a face cropped from the stored ones came out
    narrow. A bright 24x24 square stored in the middle is 32 wide as shown. An aspect no video has (9: a damaged
    or hostile file) is refused rather than widened into a huge frame."""
    for name, aspect in (("squeezed", fractions.Fraction(4, 3)), ("absurd", fractions.Fraction(9, 1))):
        with av.open(str(tmp_path / f"{name}.mp4"), "w") as out:
            stream = out.add_stream("libx264", rate=25)
            stream.width = stream.height = 48
            stream.pix_fmt, stream.codec_context.sample_aspect_ratio = "yuv420p", aspect
            frame = np.zeros((48, 48, 3), np.uint8)
            frame[12:36, 12:36] = 255
            for _ in range(3):
                out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            out.mux(stream.encode())
    images, _ = data.decode_frames(tmp_path / "squeezed.mp4", convert=np.asarray)
    assert images[0].shape == (48, 64, 3) and data.spread_frames(tmp_path / "squeezed.mp4")[0][0].shape == (48, 64, 3)
    assert 30 <= (images[0][24, :, 0] > 128).sum() <= 34
    with pytest.raises(common.UserError, match="a pixel aspect ratio of 9, which no video has"):
        data.decode_frames(tmp_path / "absurd.mp4")


def test_prepare_on_a_folder_already_in_the_layout_says_to_train_on_it(three_videos, tmp_path, capsys):
    """world.py's output (or prepare's) is not raw material: prepare skips it, and says so, not "no video files"."""
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", str(three_videos.root), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "its 3 video(s) are already in the layout" in err and "--data" in err, err
