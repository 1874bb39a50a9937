"""Hostile and clumsy input to every command, run in-process: each case ends with exit status 2 (Ctrl-C: 130), one
line on stderr, no traceback, and no new file. Grouped by the kind of mistake (the classes of issue #28)."""

import argparse
import fcntl
import json
import math
import multiprocessing
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import audio
import bench
import common
import config
import data
import evaluate
import letstalk
import sample
import train
import vae
import world
from common import INTERRUPTED, UserError, atomic_write
from conftest import diffusion_args

ROOT = Path(__file__).resolve().parent.parent
FACE, SPEECH = ROOT / "assets" / "face.png", ROOT / "assets" / "speech.wav"
MAINS = {"bench": bench.main, "data": data.main, "evaluate": evaluate.main, "letstalk": letstalk.main,
         "sample": sample.main, "train": train.main, "vae": vae.main, "world": world.main}


@pytest.fixture
def here(tmp_path, monkeypatch):
    """An empty working folder, so that a file a command leaves anywhere by default is seen."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a folder")
    return tmp_path


def refuse(command, argv, capsys, folder, words="", code=2, during_work=False):
    """Run `command` with argv; check it ends with `code`, one line holding `words`, and no new file. A mistake
    only the work can find (during_work) may follow its progress bars and leave the work done before it."""
    before = sorted(folder.rglob("*"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        MAINS[command]([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().replace("\r", "\n").splitlines()
    assert e.value.code == code, err
    assert "Traceback" not in err and (during_work or len(lines) == 1), err
    assert words in lines[-1] and lines[-1].startswith(("error: ", "interrupted")), err
    assert during_work or sorted(folder.rglob("*")) == before
    return err


# ---------------------------------------------------------------------------------------------------------------
# 1. Output paths: checked before any work


@pytest.mark.parametrize("command, argv, words", [
    ("sample", [FACE, SPEECH, "-o", "."], "a folder"),
    ("sample", [FACE, SPEECH, "-o", "out.avi"], "must end in .mp4"),
    ("sample", [FACE, SPEECH, "-o", "a_file/out.mp4"], "does not exist"),
    ("sample", [FACE, SPEECH, "-o", "out.mp4/"], "a folder name (it ends in /)"),
    ("sample", [FACE, SPEECH, "-o", "/proc/out.mp4"], "cannot write in /proc"),  # even as root
    ("sample", [FACE, SPEECH, "--frames", "/proc/frames"], "cannot write in /proc"),
    ("sample", [FACE, SPEECH, "--grid", "sheet.xyz"], "must end in .png"),
    ("sample", [FACE, SPEECH, "--frames", "a_file"], "a file of that name exists"),
    ("vae", ["--ckpt", sample.DEFAULT_CKPT, "--image", FACE, "--out", "."], "a folder"),
    ("vae", ["--ckpt", sample.DEFAULT_CKPT, "--image", FACE, "--out", "recon.xyz"], "must end in .png"),
    ("evaluate", ["eval", "--json", "."], "a folder"),
    ("evaluate", ["eval", "--json", "a_file/r.json"], "does not exist"),
    ("evaluate", ["eval", "--sheet", "sheet.gif"], "must end in .png"),
    ("evaluate", ["probe", "--out", "."], "a folder"),
    ("evaluate", ["probe", "--cache", "a_file"], "a file of that name exists"),
    ("evaluate", ["ablation", "--out", "a_file/runs"], "is a file"),
    ("bench", ["--json", "."], "a folder"),
    ("bench", ["--json", "tables.csv"], "must end in .json"),
    ("bench", ["--json", "tables.json/"], "a folder name (it ends in /)"),
    ("train", ["--out", "a_file"], "a file of that name exists"),
    ("train", ["--export", "."], "a folder"),
    ("train", ["--export", "/proc/demo.pt"], "cannot write in /proc"),
    ("world", ["a_file"], "a file of that name exists"),
    ("data", ["prepare", ".", "a_file"], "a file of that name exists"),
])
def test_an_output_that_cannot_be_written_is_refused_first(command, argv, words, here, capsys):
    assert refuse(command, argv, capsys, here, words)


def test_the_output_may_not_overwrite_an_input(here, capsys):
    data.write_mp4(here / "talk.mp4", np.zeros((3, 16, 16, 3), np.uint8), np.zeros(1920, np.float32))
    assert refuse("sample", [FACE, "talk.mp4", "-o", "talk.mp4"], capsys, here, "an input of this command")


def test_a_failed_write_removes_its_temporary_file_and_names_the_path(tmp_path):
    def disk_full(tmp):
        Path(tmp).write_bytes(b"half")
        raise OSError(28, "No space left on device")
    with pytest.raises(UserError, match="out.pt: cannot write .No space left on device"):
        atomic_write(tmp_path / "out.pt", disk_full)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("made", [False, True])
def test_a_full_disk_before_the_first_video_leaves_no_empty_output_folder(made, here, capsys, monkeypatch):
    def disk_full(path, frames, wav):
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(data, "write_mp4", disk_full)
    if made:  # a folder the user made is theirs: it stays
        (here / "new" / "out").mkdir(parents=True)
    refuse("world", ["new/out/videos", "--videos", "2", "--size", "16"], capsys, here, "no space left",
           during_work=True)  # the folders made on the way to it go too
    assert sorted(p.relative_to(here).as_posix() for p in here.rglob("*")) == ["a_file", *(["new", "new/out"] if made
                                                                                           else [])]


def test_a_refused_run_leaves_no_empty_run_folder(here, capsys, folder32, vae_ckpt):
    refuse("train", ["--data", str(folder32), "--vae", str(vae_ckpt), "--frames", "64", "--out", "new/deep/run",
                     "--cache", str(vae_ckpt.parent.parent / "cache")], capsys, here, "no video of", during_work=True)
    assert [p.name for p in here.iterdir()] == ["a_file"]


# ---------------------------------------------------------------------------------------------------------------
# 2. Numbers: every numeric option of every command is finite and bounded


class _Parsed(Exception):
    """Raised instead of parsing, carrying the parser a main built."""


def _numeric_options(parser, words=()):
    """(subcommand words, option, action) of every option that takes a number, subcommands included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _numeric_options(sub, (*words, name))
        elif action.option_strings and (action.type in (int, float) or hasattr(action.type, "bounds")):
            yield words, action.option_strings[-1], action


BASE = {"data": ["prepare", ".", "out"], "sample": [FACE, SPEECH], "world": ["out"],
        "vae": ["--ckpt", sample.DEFAULT_CKPT, "--image", FACE]}  # positionals each command needs


def test_every_numeric_option_refuses_nan_infinity_and_absurd_sizes(here, capsys, monkeypatch):
    options = []
    for command, main in MAINS.items():
        def capture(self, args=None, namespace=None):
            raise _Parsed(self)
        with monkeypatch.context() as m:
            m.setattr(argparse.ArgumentParser, "parse_args", capture)
            with pytest.raises(_Parsed) as e:
                main([])
        options += [(command, words, option) for words, option, _ in _numeric_options(e.value.args[0])]
    assert len(options) > 40  # every script's, train.py's settings included
    for command, words, option in options:
        for value in ("nan", "inf", "-inf", "1e300", "99999999999999999999"):
            base = [*words, *BASE.get(command, [])] if command != "data" else BASE["data"]
            refuse(command, [*base, option, value], capsys, here, option.lstrip("-").split("-")[0])


# ---------------------------------------------------------------------------------------------------------------
# 3. Inputs that would cost more than they weigh


def _png_header_only(path, width, height, extra=b""):
    """A PNG file that claims width x height pixels and holds almost nothing (a decompression bomb's header), with
    the chunks `extra` before its pixels."""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + extra + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))


def _chunk(kind, body):
    """One PNG chunk: length, kind, body, CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _float_wav(path, samples, rate):
    raw = np.asarray(samples, "<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4 % 2**32, 4, 32)  # the byte rate wraps, as a broken writer's
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(raw)) + b"WAVE" + b"fmt "
                     + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(raw)) + raw)


def test_a_huge_image_is_refused_from_its_header(here, capsys, monkeypatch):
    _png_header_only(here / "bomb.png", 40_000, 40_000)  # 1.6 gigapixels in 100 bytes: PIL refuses it on opening
    assert refuse("sample", ["bomb.png", SPEECH], capsys, here, "bomb.png: over 178 megapixels")
    assert refuse("vae", ["--ckpt", sample.DEFAULT_CKPT, "--image", "bomb.png"], capsys, here, "scale it down first")
    monkeypatch.setattr(common, "MAX_PIXELS", 100)  # below PIL's own limit, ours: a real image, refused undecoded
    assert refuse("sample", [FACE, SPEECH], capsys, here, "scale it down first")


def test_a_text_chunk_that_unpacks_to_megabytes_is_refused(here, capsys):
    text = _chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"a" * 20_000_000))  # 20 MB of text in 20 KB
    _png_header_only(here / "text.png", 8, 8, extra=text)
    assert refuse("sample", ["text.png", SPEECH], capsys, here, "text.png: cannot read image")


def test_an_absurd_sample_rate_and_non_finite_samples_are_refused(here, capsys):
    _float_wav(here / "fast.wav", np.zeros(16_000), 2_000_000_000)
    assert refuse("sample", [FACE, "fast.wav"], capsys, here, "sample rate of 2000000000 Hz")
    samples = (np.random.default_rng(0).standard_normal(20_000) * 3000).astype(">i2").tobytes()
    (here / "slow.au").write_bytes(b".snd" + struct.pack(">5I", 24, len(samples), 3, 1, 1) + samples)  # 1 Hz
    assert refuse("sample", [FACE, "slow.au"], capsys, here, "sample rate of 1 Hz")  # read by FFmpeg, not by us
    _float_wav(here / "nan.wav", np.r_[np.zeros(8000), np.nan, np.zeros(8000)], 16_000)
    assert refuse("sample", [FACE, "nan.wav"], capsys, here, "NaN or infinite")


# ---------------------------------------------------------------------------------------------------------------
# 4. Damaged files the user points at


@pytest.fixture(scope="module")
def folder32(tmp_path_factory):
    """Two synthetic videos at 32x32."""
    root = tmp_path_factory.mktemp("videos32")
    world.main([str(root), "--videos", "2", "--seconds", "0.4", "--size", "32"])
    return root


def test_damaged_checkpoints_are_named(here, capsys):
    (here / "run").mkdir()
    good = torch.load(sample.DEFAULT_CKPT, weights_only=True)
    whole = Path(sample.DEFAULT_CKPT).read_bytes()
    for content in (b"", b"garbage" * 100, whole[:len(whole) // 2]):
        (here / "run" / "ckpt.pt").write_bytes(content)
        assert refuse("train", ["--out", "run", "--resume"], capsys, here, "ckpt.pt")
        assert refuse("train", ["--out", "run", "--export", "x.pt"], capsys, here, "ckpt.pt")
        assert refuse("sample", [FACE, SPEECH, "--ckpt", "run/ckpt.pt"], capsys, here,
                      "ckpt.pt: not a letstalk diffusion checkpoint (not a whole file written by torch.save)")
    torch.save({"ema": argparse.Namespace(steps=1)}, here / "code.pt")  # loading would run code: refused
    assert refuse("sample", [FACE, SPEECH, "--ckpt", "code.pt"], capsys, here, "only running code could load")
    torch.save({"head.weight": torch.zeros(3, 3)}, here / "probe.pt")  # the right key, the wrong shape
    assert refuse("evaluate", ["eval", "--probe", "probe.pt"], capsys, here, "probe.pt")
    torch.save({k: v for k, v in good.items() if k != "ema"}, here / "no_ema.pt")
    assert refuse("sample", [FACE, SPEECH, "--ckpt", "no_ema.pt"], capsys, here, "no_ema.pt")


def _with(ckpt, part, **changes):
    """A copy of a checkpoint whose `part` config (vae, model or diffusion) has `changes`."""
    if part == "diffusion":
        return {**ckpt, "diffusion": {**ckpt["diffusion"], **changes}}
    return {**ckpt, part: {**ckpt[part], "config": {**ckpt[part]["config"], **changes}}}


def test_the_right_keys_with_wrong_contents_are_named(here, capsys):
    good = torch.load(sample.DEFAULT_CKPT, weights_only=True)
    for i, bad in enumerate([{**good, "ema": [1, 2]}, {**good, "ema": torch.zeros(3)}, {**good, "ema": {"x": 5}},
                             _with(good, "vae", resolution=0), _with(good, "vae", resolution=200_000),
                             _with(good, "model", frames=0), _with(good, "diffusion", steps=0),
                             {**good, "domain": {"wrong": 1}}, {**good, "domain": {"vae_min_psnr": "x"}}]):
        torch.save(bad, here / f"bad{i}.pt")
        assert refuse("sample", [FACE, SPEECH, "--ckpt", f"bad{i}.pt"], capsys, here,
                      f"bad{i}.pt: not a letstalk diffusion checkpoint")


@pytest.mark.parametrize("damage, words, during_work", [
    (lambda meta: "{not json", "meta.json: cannot read", False),
    (lambda meta: json.dumps({k: v for k, v in meta.items() if k != "num_frames"}), "no frame count", False),
    (lambda meta: json.dumps({**{k: v for k, v in meta.items() if k not in data.GROUND_TRUTH},
                              "num_frames": meta["num_frames"] + 50}), "video.mp4 holds", True),
    # fewer frames counted (ground truth cut to match): its ground truth and sound would end before its picture
    (lambda meta: json.dumps({**{k: v[:-3] if k in data.GROUND_TRUTH else v for k, v in meta.items()},
                              "num_frames": meta["num_frames"] - 3}), "meta.json counts 7 frames, video.mp4 holds 10",
     True),
    (lambda meta: json.dumps({**meta, "source": None}), "the source None is not a video's path", False),
    (lambda meta: json.dumps({**meta, "source": ""}), "the source '' is not a video's path", False),
    # per-frame ground truth edited by hand: found before any work, not at the first step after the encoding
    (lambda meta: json.dumps({**meta, "openness": meta["openness"][:-1]}), "its openness ground truth is not a "
     "number for each of its 10 frames", False),
    (lambda meta: json.dumps({**meta, "mouth_box": [box[:3] for box in meta["mouth_box"]]}), "its mouth_box ground "
     "truth is not 4 numbers for each", False),
    (lambda meta: json.dumps({**meta, "pose": [[str(v) for v in p] for p in meta["pose"]]}), "its pose ground", False),
    (lambda meta: json.dumps({**meta, "blink": [None] * meta["num_frames"]}), "its blink ground", False),
    (lambda meta: json.dumps({**meta, "roundness": [math.nan] * meta["num_frames"]}), "its roundness ground", False),
])
def test_a_damaged_video_folder_is_named(damage, words, during_work, folder32, here, capsys):
    root = here / "videos"
    root.mkdir()
    for video in folder32.iterdir():
        (root / video.name).mkdir()
        for f in video.iterdir():
            (root / video.name / f.name).write_bytes(f.read_bytes())
    meta_file = sorted(root.glob("*/meta.json"))[0]
    meta_file.write_text(damage(json.loads(meta_file.read_text())))
    assert refuse("train", ["--stage", "vae", "--data", "videos", "--resolution", "32", "--out", "run", "--cache", "c",
                            "--vae-width", "8", "--batch-size", "4", "--steps", "1"],  # unrefused, it ends soon
                  capsys, here, words, during_work=during_work)


def test_a_video_folder_whose_sound_was_cut_is_named(folder32, here, capsys):
    """A folder edited by hand, its audio.wav cut to 0.2 s: its videos trained with silence from there on."""
    shutil.copytree(folder32, here / "videos")
    audio.write_wav(sorted((here / "videos").glob("*/audio.wav"))[0], np.zeros(3200, np.float32))
    assert refuse("train", ["--stage", "vae", "--data", "videos", "--resolution", "32", "--out", "run", "--cache", "c",
                            "--vae-width", "8", "--batch-size", "4", "--steps", "1"],  # unrefused, it ends soon
                  capsys, here, "audio.wav holds 0.20 s, the video", during_work=True)


def test_data_and_vae_of_different_sizes_are_refused(folder32, here, capsys):
    assert refuse("train", ["--data", folder32, "--vae", sample.DEFAULT_CKPT, "--out", "run", "--cache", "c"],
                  capsys, here, "32x32 frames, but the VAE")
    assert refuse("train", ["--stage", "vae", "--data", folder32, "--resolution", "16", "--out", "run", "--cache", "c"],
                  capsys, here, "32x32 frames, but the VAE works at 16x16; pass --resolution 32")


# ---------------------------------------------------------------------------------------------------------------
# 6. Preparation must not lose videos silently


def _video(path, seconds=1.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.zeros((int(25 * seconds), 64, 64, 3), np.uint8)
    frames[:, 16:48, 16:48] = 200
    data.write_mp4(path, frames, 0.3 * np.sin(np.arange(int(16000 * seconds)) * 0.05).astype(np.float32))


@pytest.mark.parametrize("names", [("a.mp4", "a.mov"), ("x/y.mp4", "x__y.mp4")])
def test_sources_that_would_share_a_folder_are_refused(names, here, capsys):
    for name in names:
        _video(here / "raw" / name, 0.2)
    assert refuse("data", ["prepare", "raw", "out", "--size", "32"], capsys, here, "would both be prepared")


def test_synthetic_and_prepared_videos_are_not_written_into_one_folder(folder32, here, capsys):
    """Training refuses a folder that mixes the two kinds (one batch stacks one kind of ground truth): each writer
    refuses to start one, before any work. And a --boxes file that is not there is said to be missing."""
    _video(here / "raw" / "a.mp4", 0.2)
    shutil.copytree(folder32, here / "synthetic")
    err = refuse("data", ["prepare", "raw", "synthetic", "--size", "32"], capsys, here,
                 "synthetic holds synthetic videos (world.py's) (train_0000")  # (either of its two)
    assert "), which training does not mix with prepared videos" in err
    (here / "prepared" / "a").mkdir(parents=True)
    (here / "prepared" / "a" / "meta.json").write_text(json.dumps({"num_frames": 5, "size": 32}))
    assert refuse("world", ["prepared", "--videos", "1", "--size", "32"], capsys, here,
                  "holds prepared videos (data.py prepare's) (a), which training does not mix with synthetic")
    assert refuse("data", ["prepare", "raw", "out", "--boxes", "nope.json"], capsys, here,
                  "nope.json: cannot read crop boxes (no such file)")


@pytest.mark.parametrize("box", ["[30, 0, 10, 20]", "[NaN, 0, 10, 10]", "[0, 0, Infinity, 10]", "[0, 0, 1e9, 1e9]",
                                 "[-5, 0, 10, 15]", "[5, 5, 5, 5]", "[0, 0, 10]", '["a", 0, 10, 10]',
                                 "[0, 0, 40, 20]"])
def test_bad_crop_boxes_are_refused_before_any_work(box, here, capsys):
    _video(here / "raw" / "a.mp4", 0.2)
    (here / "boxes.json").write_text('{"a": %s}' % box)
    assert refuse("data", ["prepare", "raw", "out", "--boxes", "boxes.json"], capsys, here, "the box of a")


def test_prepare_skips_its_own_output_a_box_outside_the_frame_and_fails_when_nothing_was_prepared(here, capsys):
    _video(here / "raw" / "a.mp4")
    (here / "boxes.json").write_text('{"a": [32, 32, 96, 96]}')  # the frame is 64x64
    assert refuse("data", ["prepare", "raw", "out", "--size", "32", "--boxes", "boxes.json"], capsys, here,
           "not inside the 64x64 frame", during_work=True)
    assert not (here / "out").exists()  # nothing prepared, no folder left
    (here / "boxes.json").write_text('{"a": [0, 0, 64, 64]}')
    for _ in range(2):  # an output folder inside the raw one: its videos are not raw videos
        data.main(["prepare", "raw", "raw/out", "--size", "32", "--boxes", "boxes.json"])
    assert "prepared 0, already done 1, skipped 0" in capsys.readouterr().out
    assert [p.name for p in (here / "raw" / "out").iterdir()] == ["a"]
    assert refuse("data", ["prepare", "raw", "."], capsys, here, "inside the output folder")  # raw videos in out


def test_a_hidden_video_is_prepared_where_training_sees_it(here, capsys):
    _video(here / "raw" / ".one.mp4", 0.4)  # a folder named .one would be skipped as unfinished
    (here / "boxes.json").write_text('{".one": [0, 0, 64, 64]}')
    data.main(["prepare", "raw", "out", "--size", "32", "--boxes", "boxes.json"])
    assert [f.name for f in data.VideoFolder(here / "out").folders] == ["one"]


def test_a_half_written_video_folder_is_not_a_video(folder32, tmp_path):
    root = tmp_path / "videos"
    for video in folder32.iterdir():
        (root / video.name).mkdir(parents=True)
        for f in video.iterdir():
            (root / video.name / f.name).write_bytes(f.read_bytes())
    (root / ".late.partial").mkdir()
    (root / ".late.partial" / "meta.json").write_text('{"num_frames": 10}')
    assert len(data.VideoFolder(root)) == 2


# ---------------------------------------------------------------------------------------------------------------
# 7. Litter and noise


def test_ctrl_c_is_one_line(here, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(sample, "load_model", interrupt)
    assert refuse("sample", [FACE, SPEECH], capsys, here, "interrupted", code=INTERRUPTED)


def test_a_request_to_terminate_is_an_interruption(tmp_path, capsys):
    """SIGTERM (`kill`, a job scheduler) ends the work as Ctrl-C does: a file being written is cleaned up, no traceback
    (it ended the process on the spot, leaving a hidden temporary file)."""
    def killed_while_writing(tmp):
        Path(tmp).write_text("the first half")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    with pytest.raises(SystemExit) as e, common.user_errors():
        atomic_write(tmp_path / "out.txt", killed_while_writing)
    assert e.value.code == INTERRUPTED and capsys.readouterr().err == "interrupted\n"
    assert not list(tmp_path.iterdir()) and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_an_error_is_one_line_whatever_the_path_holds(here, capsys):
    err = refuse("sample", ["no\nsuch.png", SPEECH], capsys, here, "no such file")
    assert "no\\nsuch.png" in err
    (here / "nowhere").symlink_to(here / "gone" / "dir")  # a link to nothing is no folder to write in
    assert refuse("world", ["nowhere"], capsys, here, "a file of that name exists")


def test_a_file_name_that_is_not_utf8_is_written_and_printed(tmp_path, capsys):
    out = tmp_path / os.fsdecode(b"videos\xff")  # Linux names are bytes; this one is no UTF-8
    world.main([str(out), "--videos", "1", "--seconds", "0.04", "--size", "16"])
    assert (out / "train_00000" / "meta.json").exists() and "videos\\udcff" in capsys.readouterr().out


def test_running_out_of_memory_is_one_line():
    for error in (MemoryError(), RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: 12 GB")):
        with pytest.raises(SystemExit) as e, common.user_errors():
            raise error
        assert e.value.code == 2
    with pytest.raises(RuntimeError), common.user_errors():  # any other RuntimeError is a bug: its traceback shows
        raise RuntimeError("shapes do not match")


def test_a_closed_output_ends_quietly(monkeypatch, capsys):
    read, write = os.pipe()
    os.close(read)  # the reader (`| head`) is gone
    monkeypatch.setattr("sys.stdout", open(write, "w", buffering=1))
    with pytest.raises(SystemExit) as e, common.user_errors():
        print("a table row")
    assert e.value.code == common.BROKEN_PIPE and capsys.readouterr().err == ""


def test_ctrl_c_is_for_the_parent_and_a_failed_job_stops_every_worker():
    """Workers ignore Ctrl-C (the parent stops them; interrupted while they import torch, they printed tracebacks)."""
    assert common.parallel_map(signal.getsignal, [signal.SIGINT] * 8, 2, "jobs") == [signal.SIG_IGN] * 8
    start = time.time()
    with pytest.raises(TypeError):  # the job "x" fails at once, beside one that would sleep 30 s
        common.parallel_map(time.sleep, ["x", 30, 0, 0, 0, 0, 0, 0], 2, "jobs")
    assert time.time() - start < 15 and not multiprocessing.active_children()  # stopped, not waited for


def test_frames_never_overwrite_a_folder_of_the_users(here, capsys):
    (here / "myphotos").mkdir()
    (here / "myphotos" / "00000.png").write_text("mine")  # named as sample.py names its frames (as ffmpeg does)
    assert refuse("sample", [FACE, SPEECH, "--frames", "myphotos"], capsys, here, "sample.py did not write it")
    assert (here / "myphotos" / "00000.png").read_text() == "mine"


def test_a_machine_without_a_compiler_is_told_to_pass_no_compile(capsys):
    from torch._inductor.exc import InductorError  # imported here only: it costs the suite's start ~1 s otherwise
    with pytest.raises(SystemExit) as e, common.user_errors():
        raise InductorError(RuntimeError("InvalidCxxCompiler: No working C++ compiler found"), None)
    assert e.value.code == 2 and "pass --no-compile" in capsys.readouterr().err


def test_ctrl_c_while_torch_save_writes_is_an_interruption(capsys):
    """Ctrl-C while torch.save writes a tensor: its zip writer, closed by the interruption, fails with a
    RuntimeError ("unexpected pos ...") that replaces the KeyboardInterrupt; it is still an interruption."""
    with pytest.raises(SystemExit) as e, common.user_errors():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 29885568 vs 29885456")
    assert e.value.code == common.INTERRUPTED and capsys.readouterr().err == "interrupted\n"
    with pytest.raises(RuntimeError, match="a bug"), common.user_errors():  # any other RuntimeError: its traceback
        raise RuntimeError("a bug")


def test_what_the_machine_refuses_is_one_line(capsys):
    for error, words in ((PermissionError(13, "Permission denied", "speech.wav"), "speech.wav: permission denied"),
                         (OSError(28, "No space left on device", "ckpt.pt"), "ckpt.pt: no space left"),
                         (FileNotFoundError(2, "No such file or directory", "/proc/x"), "/proc/x: No such file")):
        with pytest.raises(SystemExit) as e, common.user_errors():
            raise error
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {words}") and err.count("\n") == 1
    with pytest.raises(OSError), common.user_errors():  # one that names no file is a bug: its traceback is wanted
        raise OSError(5, "Input/output error")


def test_distributed_variables_set_by_hand_are_refused(here, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # RANK and the rest missing: not torchrun
    assert refuse("train", ["--out", "run"], capsys, here, "start distributed runs with torchrun")


def test_more_torchrun_processes_than_gpus_are_refused(here, capsys, monkeypatch):
    """torchrun --nproc_per_node 2 on a machine of one GPU: the second rank's GPU does not exist (torch's own
    "invalid device ordinal" came as a traceback). The machine is told it has one GPU; nothing runs on it."""
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2"),
                        ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert refuse("train", ["--out", "run", "--device", "cuda"], capsys, here,
                  "torchrun started 2 processes on a machine of 1 GPU(s); pass --nproc_per_node 1 or fewer")


def test_a_cpu_index_is_refused(here, capsys):
    assert refuse("sample", [FACE, SPEECH, "--device", "cpu:5"], capsys, here, "the CPU has no index")


def test_a_killed_writers_temporary_files_are_removed_by_the_next_write(tmp_path):
    dead = next(pid for pid in range(4_000_000, 4_100_000) if not Path(f"/proc/{pid}").exists())
    stale = tmp_path / f".ckpt.{dead}-0badf00d.pt"
    stale.write_bytes(b"x" * 1000)
    mine = tmp_path / f".ckpt.{os.getpid()}-00000000.pt"  # a live writer's is left alone, ours or another's
    mine.write_bytes(b"y")
    other = subprocess.Popen(["sleep", "30"])
    theirs = tmp_path / f".ckpt.{other.pid}-0000abcd.pt"
    theirs.write_bytes(b"w")
    users = tmp_path / ".ckpt.2023-01-05.pt"  # and so is a file of the user's that merely looks alike
    users.write_bytes(b"u")
    try:
        atomic_write(tmp_path / "ckpt.pt", lambda tmp: Path(tmp).write_bytes(b"z"))
    finally:
        other.kill()
        other.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt.pt", mine.name, theirs.name, users.name])


def test_an_infinite_weight_is_damage_too_and_a_missing_gpu_index_is_named(tmp_path, monkeypatch):
    torch.save({"w": torch.tensor([1.0, float("inf")])}, tmp_path / "inf.pt")
    with pytest.raises(UserError, match="its w holds NaN or infinite values"):
        common.load_checkpoint(tmp_path / "inf.pt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="--device cuda:1: this machine has 1 GPU"):
        common.check_device("cuda:1")


def test_an_upper_case_suffix_is_the_format_it_names(tmp_path):
    assert common.writable_file(tmp_path / "TALK.MP4", "--out", (".mp4",)) == tmp_path / "TALK.MP4"


def test_a_resume_takes_the_same_path_spelled_another_way(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = asdict(config.TrainConfig(vae="runs/vae/ckpt.pt", device="cpu", frames=8, size="T", batch_size=16, lr=3e-4,
                                      prediction="x0", mouth_weight=5.0))  # resolved, as a run saves it
    (tmp_path / "runs" / "vae").mkdir(parents=True)
    (tmp_path / "runs" / "vae" / "ckpt.pt").touch()
    same = config.resumed_config(saved, {"vae": str(tmp_path / "runs/vae/../vae/ckpt.pt")}, "run").vae
    assert Path(same).samefile(saved["vae"])
    saved["init"] = "runs/vae/ckpt.pt"  # not movable: a resume never reads it
    spelled = {"init": str(tmp_path / "runs/vae/../vae/ckpt.pt")}
    assert config.resumed_config(saved, spelled, "run").init == "runs/vae/ckpt.pt"
    with pytest.raises(UserError, match="--init: a resumed run keeps"):
        config.resumed_config(saved, {"init": "runs/other/ckpt.pt"}, "run")


# ---------------------------------------------------------------------------------------------------------------
# Found by a second sweep (294 tries): one case of each cause it found, as the command would meet it


def test_an_output_never_overwrites_an_input(here, capsys):
    (here / "speech.png").write_bytes(SPEECH.read_bytes())  # speech behind an image's suffix
    assert refuse("sample", [FACE, "speech.png", "--grid", "speech.png"], capsys, here, "an input of this command")
    (here / "frames").mkdir()
    (here / "frames" / "00000.png").write_bytes(FACE.read_bytes())
    assert refuse("sample", ["frames/00000.png", SPEECH, "--frames", "frames"], capsys, here, "holds an input")
    (here / "ck.png").write_bytes(Path(sample.DEFAULT_CKPT).read_bytes())
    assert refuse("vae", ["--ckpt", "ck.png", "--image", FACE, "--out", "ck.png"], capsys, here,
                  "an input of this command")


@pytest.mark.parametrize("command, argv", [
    ("sample", [FACE, SPEECH, "-o", "x" * 300 + ".mp4"]), ("sample", [FACE, SPEECH, "-o", "x" * 240 + ".mp4"]),
    ("world", ["x" * 300]), ("train", ["--out", "x" * 300]), ("bench", ["--json", "x" * 300 + ".json"])])
def test_a_name_too_long_for_the_file_system_is_refused(command, argv, here, capsys):
    assert refuse(command, argv, capsys, here, "more than 235 bytes")


def test_a_pipe_or_a_device_is_not_read_as_a_file(here, capsys):
    os.mkfifo(here / "pipe.png")
    assert refuse("sample", ["pipe.png", SPEECH], capsys, here, "not a regular file")
    assert refuse("sample", [FACE, SPEECH, "--ckpt", "pipe.png"], capsys, here, "pipe.png: not a regular file")
    _video(here / "raw" / "a.mp4", 0.2)
    assert refuse("data", ["prepare", "raw", "out", "--boxes", "/dev/zero"], capsys, here, "not a regular file")


def test_absurd_values_inside_files_are_refused(here, capsys):
    _float_wav(here / "loud.wav", np.full(16_000, 1e30), 16_000)
    assert refuse("sample", [FACE, "loud.wav"], capsys, here, "far outside [-1, 1]")
    ckpt = torch.load(sample.DEFAULT_CKPT, weights_only=True)
    next(v for v in ckpt["ema"].values() if v.is_floating_point()).fill_(float("nan"))
    torch.save(ckpt, here / "nan.pt")
    assert refuse("sample", [FACE, SPEECH, "--ckpt", "nan.pt"], capsys, here, "holds NaN or infinite values")
    ckpt = torch.load(sample.DEFAULT_CKPT, weights_only=True)
    del ckpt["ema"]["final.linear.bias"]
    torch.save(ckpt, here / "edited.pt")  # the error's detail is on its second line: it is kept
    assert refuse("sample", [FACE, SPEECH, "--ckpt", "edited.pt"], capsys, here,
                  "Error(s) in loading state_dict for LetsTalk: Missing key(s) in state_dict: \"final.linear.bias\"")
    _video(here / "raw" / "a.mp4", 0.2)
    (here / "boxes.json").write_text('{"a": [0, 0, 1%s, 10]}' % ("0" * 400))
    assert refuse("data", ["prepare", "raw", "out", "--boxes", "boxes.json"], capsys, here, "the box of a")
    assert refuse("data", ["prepare", "raw", "out", "--shard", "\u00b2/3"], capsys, here, "--shard")


@pytest.mark.parametrize("train_config", [7, {"bogus": 1}])
def test_a_resume_from_a_damaged_run_names_its_checkpoint(train_config, here, capsys):
    (here / "run").mkdir()
    torch.save({"train_config": train_config}, here / "run" / "ckpt.pt")
    assert refuse("train", ["--out", "run", "--resume"], capsys, here, "ckpt.pt: not a letstalk run's checkpoint")


def test_what_the_work_would_find_late_is_found_first(here, capsys):
    assert refuse("train", ["--vae", sample.DEFAULT_CKPT, "--frames", "256", "--motion", "64", "--out", "run",
                            "--cache", "c"], capsys, here, "span 320 frames")
    assert refuse("evaluate", ["eval", "--speech", "missing.wav"], capsys, here, "missing.wav")
    (here / "text.pt").write_text("not weights")
    assert refuse("evaluate", ["eval", "--inception", "text.pt", "--videos", "1"], capsys, here, "text.pt")


def test_what_eval_reads_is_checked_before_it_generates(here, capsys):
    quick = ["--videos", "1", "--seconds", "0.4", "--steps", "1", "--json", "r.json"]
    audio.write_wav(here / "short.wav", np.zeros(100, np.float32))
    assert refuse("evaluate", ["eval", "--speech", "short.wav", SPEECH, *quick], capsys, here,
                  "short.wav: shorter than two video frames")
    click = np.zeros(16_000, np.float32)
    click[8000:8300] = 0.5  # a second of silence around a click: one frame of sound
    audio.write_wav(here / "click.wav", click)
    assert refuse("evaluate", ["eval", "--speech", SPEECH, "click.wav", *quick], capsys, here,
                  "click.wav: shorter than two video frames (80 ms) of sound once its silence is trimmed")
    assert refuse("evaluate", ["eval", "--speech", SPEECH, *quick], capsys, here, "give two or more recordings")
    audio.write_wav(here / "silence.wav", np.zeros(16_000))
    assert refuse("evaluate", ["eval", "--speech", SPEECH, "silence.wav", *quick], capsys, here,
                  "--speech silence.wav: silent")
    shutil.copy(SPEECH, here / "copy.wav")
    assert refuse("evaluate", ["eval", "--speech", SPEECH, "copy.wav", *quick], capsys, here,
                  f"--speech copy.wav: the same recording as {SPEECH}")
    (here / "runs" / "eval").mkdir(parents=True)
    shutil.copy(SPEECH, here / "runs" / "eval" / "letstalk-tiny_test.json")  # a recording where the results go
    assert refuse("evaluate", ["eval", "--speech", SPEECH, "runs/eval/letstalk-tiny_test.json", *quick[:-2]], capsys,
                  here, "letstalk-tiny_test.json: the results file would overwrite an input")
    (here / "data" / "v").mkdir(parents=True)
    assert refuse("evaluate", ["eval", "--data", "data", "--json", "data/v/meta.json"], capsys, here,
                  "would be written into the data folder data")
    assert refuse("evaluate", ["eval", "--data", SPEECH, *quick], capsys, here,
                  f"{SPEECH}: a file; pass the folder of prepared videos")
    torch.save({"fc.weight": torch.zeros(10, 2048)}, here / "resnet.pt")  # another network's classifier
    assert refuse("evaluate", ["eval", "--inception", "resnet.pt", *quick], capsys, here,
                  "resnet.pt: not Inception-v3 weights")
    for name, net in (("identity.pt", torch.nn.Identity()), ("flatten.pt", torch.nn.Flatten(0))):
        torch.jit.script(net).save(str(here / name))  # TorchScript, but no network of expression coefficients
        assert refuse("evaluate", ["eval", "--expression", name, *quick], capsys, here,
                      f"--expression {name}: a blank 16-frame video gave")
    (here / "ckpt.json").symlink_to(sample.DEFAULT_CKPT)  # an output may not overwrite an input, whatever its name
    assert refuse("evaluate", ["eval", "--ckpt", "ckpt.json", "--json", "ckpt.json"], capsys, here, "an input")
    long = here / ("y" * 230 + ".pt")
    long.symlink_to(sample.DEFAULT_CKPT)
    assert refuse("evaluate", ["eval", "--ckpt", long.name, "--videos", "1"], capsys, here, "pass --json")


def test_damaged_caches_of_evaluate_are_named(here, capsys):
    (here / "abl" / "ref-symbiotic_audio-direct").mkdir(parents=True)
    (here / "abl" / "ref-symbiotic_audio-direct" / "eval.json").write_text('{"sync": 1}')
    assert refuse("evaluate", ["ablation", "--out", "abl", "--videos", "1"], capsys, here,
                  "eval.json: not an evaluation's results; delete it")
    (here / "pools").mkdir()
    torch.save({"frames": torch.zeros(4, 1, 64, 64, 3, dtype=torch.uint8)}, here / "pools" / "frames_train_300.pt")
    assert refuse("evaluate", ["probe", "--out", "p.pt", "--cache", "pools"], capsys, here,
                  "frames_train_300.pt: a frame pool without openness, blink, pose")
    n = 4  # the right keys, the wrong contents: each would end in a traceback inside the probe's training
    good = {"frames": torch.zeros(n, 64, 64, 3, dtype=torch.uint8), "openness": torch.zeros(n),
            "blink": torch.zeros(n), "pose": torch.zeros(n, 3)}
    for damage in ({"frames": torch.tensor(5)}, {"frames": torch.zeros(0, 64, 64, 3, dtype=torch.uint8)},
                   {"frames": torch.zeros(n, 3, 64, 64, dtype=torch.uint8)}, {"openness": torch.zeros(n - 1)},
                   {"pose": torch.zeros(n)}):
        torch.save({**good, **damage}, here / "pools" / "frames_train_300.pt")
        assert refuse("evaluate", ["probe", "--out", "p.pt", "--cache", "pools"], capsys, here,
                      "frames_train_300.pt: not a frame pool of uint8 frames"), damage
    torch.save({**good, "openness": torch.full((n,), float("nan"))}, here / "pools" / "frames_train_300.pt")
    assert refuse("evaluate", ["probe", "--out", "p.pt", "--cache", "pools"], capsys, here,
                  "frames_train_300.pt: damaged: its openness holds NaN")
    assert refuse("evaluate", ["probe", "--out", "pools/frames_train_300.pt", "--cache", "pools"], capsys, here,
                  "a frame pool this command reads from --cache")


def test_an_export_whose_training_videos_moved_says_why_it_needs_them_and_takes_their_place(here, capsys,
                                                                                           diffusion_ckpt):
    ckpt = torch.load(diffusion_ckpt, weights_only=True)
    (here / "run").mkdir()
    torch.save({**ckpt, "train_config": {**ckpt["train_config"], "data": str(here / "gone")}}, here / "run" / "ckpt.pt")
    assert refuse("train", ["--out", "run", "--export", "e.pt"], capsys, here,
                  "--export measures the VAE on the run's training videos, which it cannot read: "
                  f"{here / 'gone'}: no prepared videos")
    assert refuse("train", ["--out", "run", "--export", "e.pt", "--data", "synthetic"], capsys, here,
                  f"this run trained on {here / 'gone'}")
    shutil.copytree(diffusion_ckpt.parent.parent / "cache" / "synthetic_2x4s_32px_seed0", here / "moved")
    world.main([str(here / "other"), "--videos", "2", "--seconds", "1", "--size", "32", "--seed", "5"])
    assert refuse("train", ["--out", "run", "--export", "e.pt", "--data", "other"], capsys, here,
                  "/other: not the training videos of run/ckpt.pt")  # its VAE figure would be of other faces
    train.main(["--out", "run", "--export", "e.pt", "--data", "moved"])
    assert sample.load_model(here / "e.pt", "cpu")[3]["vae_min_psnr"] > 0
    # a damaged EMA (one weight of another shape) is refused before an export sample.py could not load is written
    ema = ckpt["ema"]
    first = next(iter(ema))
    torch.save({**ckpt, "ema": {**ema, first: ema[first][:1]}}, here / "run" / "ckpt.pt")
    assert refuse("train", ["--out", "run", "--export", "bad.pt"], capsys, here,
                  "run/ckpt.pt: not a letstalk diffusion checkpoint (RuntimeError")


def test_an_export_is_not_resumed_and_a_new_run_starts_a_new_log(here, capsys, vae_ckpt):
    (here / "run").mkdir()
    (here / "run" / "ckpt.pt").symlink_to(sample.DEFAULT_CKPT)
    assert refuse("train", ["--out", "run", "--resume"], capsys, here, "an export (train.py --export)")
    (here / "killed").mkdir()  # a run stopped before its first checkpoint leaves only its log
    (here / "killed" / "log.jsonl").write_text('{"step": 633, "loss": 0.5}\n')
    train.main(diffusion_args(here / "killed", vae_ckpt, "--steps", "1"))
    assert '"step": 633' not in (here / "killed" / "log.jsonl").read_text()


def test_a_resume_survives_a_damaged_log_and_refuses_changed_data(here, capsys, folder32, vae_ckpt):
    shutil.copytree(folder32, here / "videos")
    args = ["--out", "run", "--cache", "c", "--vae", vae_ckpt, "--size", "T", "--frames", "4", "--batch-size", "2",
            "--eval-every", "100", "--device", "cpu", "--data", "videos"]
    train.main([str(a) for a in [*args, "--steps", "1"]])
    with open(here / "run" / "log.jsonl", "a") as log:  # what a crash, a full disk or another program leaves
        log.write('{"note": 1}\n\0\0\0\n{"step": 3, "loss"')
    train.main([str(a) for a in [*args, "--resume", "--steps", "2"]])
    steps = [json.loads(line) for line in (here / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "step" in r] == [1, 2]
    shutil.copytree(here / "videos" / sorted(p.name for p in (here / "videos").iterdir())[0], here / "videos" / "zz")
    assert refuse("train", [*args, "--resume", "--steps", "3"], capsys, here, "an exact resume needs the same videos",
                  during_work=True)
    vae_args = ["--stage", "vae", "--out", "vae", "--cache", "c", "--data", "videos", "--resolution", "32",
                "--vae-width", "8", "--batch-size", "4", "--device", "cpu"]
    train.main([*vae_args, "--steps", "1"])
    shutil.copytree(here / "videos" / "zz", here / "videos" / "zzz")
    assert refuse("train", [*vae_args, "--resume", "--steps", "2"], capsys, here, "training frames cached, but",
                  during_work=True)


def test_a_resume_refuses_other_videos_of_the_same_count_and_another_vae(here, capsys, folder32, vae_ckpt):
    """Found by a sweep of training on prepared folders: a resume compared only counts, so a video prepared again
    from other material (the same length) was trained on silently, and a --vae file replaced since the run started
    was used silently (after encoding every video with it). A decoder fine-tuned from the run's VAE may replace it:
    its latents are the same."""
    shutil.copytree(folder32, here / "videos")
    shutil.copy(vae_ckpt, here / "v.pt")
    args = ["--out", "run", "--cache", "c", "--vae", "v.pt", "--size", "T", "--frames", "4", "--batch-size", "2",
            "--eval-every", "100", "--device", "cpu", "--data", "videos"]
    vae_args = ["--stage", "vae", "--out", "vae", "--cache", "c", "--data", "videos", "--resolution", "32",
                "--vae-width", "8", "--batch-size", "4", "--device", "cpu"]
    train.main([*args, "--steps", "1"])
    train.main([*vae_args, "--steps", "1"])
    train.main(["--stage", "vae", "--init", "v.pt", "--out", "decoder", "--cache", "c", "--data", "videos",
                "--batch-size", "4", "--device", "cpu", "--steps", "1"])
    shutil.copy(here / "decoder" / "ckpt.pt", here / "v.pt")  # a fine-tuned decoder, the same encoder: resumes
    train.main([*args, "--resume", "--steps", "2"])
    world.main(["other", "--videos", "1", "--seconds", "0.4", "--size", "32", "--seed", "1"])  # other face and words
    shutil.rmtree(here / "videos" / "train_00000")  # a training video, prepared again: as long, other content
    shutil.copytree(here / "other" / "train_00000", here / "videos" / "train_00000")
    for argv, steps in ((args, "3"), (vae_args, "2")):
        assert refuse("train", [*argv, "--resume", "--steps", steps], capsys, here,
                      "its training videos are not the ones the run's checkpoint was trained on", during_work=True)
    train.main([*args, "--out", "run2", "--steps", "1"])
    shutil.copy(here / "vae" / "ckpt.pt", here / "v.pt")  # the file --vae names, replaced by another VAE
    assert refuse("train", [*args, "--out", "run2", "--resume", "--steps", "2"], capsys, here,
                  f"--vae {(here / 'v.pt').resolve()}: not the VAE the run was trained with")  # before any work


def test_a_synthetic_run_resumes_after_its_rendered_videos_are_rendered_again(here, capsys, vae_ckpt):
    """The cache records what a video was made from by its meta.json, not by video.mp4's bytes, which differ from
    one H.264 encode of the same frames to the next (threads): a synthetic run whose rendered videos were deleted,
    and are rendered again, resumes. Here the same frames are encoded again at another quality, so that the bytes
    surely differ."""
    args = diffusion_args(here / "run", vae_ckpt, "--cache", "c")
    train.main([*args, "--steps", "1"])
    for video in (here / "c").glob("synthetic_*/*/video.mp4"):
        data.write_mp4(video, data.read_video(video), audio.load_audio(video.parent / "audio.wav"), crf=30)
    capsys.readouterr()
    train.main([*args, "--resume", "--steps", "2"])
    assert "cached videos are not those" not in capsys.readouterr().err


def test_training_videos_too_short_are_named(here, capsys, folder32, vae_ckpt):
    """Only the held-out video is long enough for a clip: "no video is long enough" was untrue."""
    world.main([str(here / "videos"), "--videos", "2", "--seconds", "0.12", "--size", "32"])  # 3 frames each
    shutil.copytree(folder32 / "train_00000", here / "videos" / "zz")  # 10 frames, sorted last: held out
    assert refuse("train", ["--out", "run", "--cache", "c", "--vae", vae_ckpt, "--size", "T", "--frames", "4",
                            "--device", "cpu", "--data", "videos"], capsys, here,
                  "only its held-out videos (every 20th by name, here zz) span --frames 4 + --motion 2",
                  during_work=True)


def test_training_videos_too_short_for_a_clip_are_noted(here, capsys, folder32, vae_ckpt):
    shutil.copytree(folder32, here / "videos")
    world.main([str(here / "short"), "--videos", "1", "--seconds", "0.12", "--size", "32"])  # 3 frames
    shutil.copytree(here / "short" / "train_00000", here / "videos" / "a_short")  # sorted first: trained on
    train.main(["--out", "run", "--cache", "c", "--vae", str(vae_ckpt), "--size", "T", "--frames", "4", "--steps",
                "1", "--batch-size", "2", "--eval-every", "100", "--device", "cpu", "--data", "videos"])
    assert ("note: 1 of 2 training videos are shorter than --frames 4 + --motion 2: no clip is drawn from them"
            in capsys.readouterr().err)


def test_held_out_videos_too_short_are_named(here, capsys, folder32, vae_ckpt):
    shutil.copytree(folder32, here / "videos")
    world.main([str(here / "short"), "--videos", "1", "--seconds", "0.12", "--size", "32"])  # 3 frames
    shutil.copytree(here / "short" / "train_00000", here / "videos" / "zz")  # sorted last: held out
    assert refuse("train", ["--out", "run", "--cache", "c", "--vae", vae_ckpt, "--size", "T", "--frames", "4",
                            "--device", "cpu", "--data", "videos"], capsys, here,
                  "held-out videos (every 20th by name, here zz) are all shorter", during_work=True)


def test_a_second_run_into_a_folder_in_use_stops_at_once(here, capsys):
    (here / "run").mkdir()
    busy = os.open(here / "run", os.O_RDONLY)  # as a run training into it holds it
    fcntl.flock(busy, fcntl.LOCK_EX)
    try:
        assert refuse("train", ["--out", "run", "--vae", sample.DEFAULT_CKPT, "--cache", "c"], capsys, here,
                      "another run is training into this folder")
    finally:
        os.close(busy)


def test_a_wav_of_an_encoding_ffmpeg_cannot_decode_is_one_line(here, capsys):
    fmt = (0).to_bytes(2, "little") + (1).to_bytes(2, "little") + (16000).to_bytes(4, "little")  # format tag 0
    fmt += (32000).to_bytes(4, "little") + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
    body = b"WAVE" + b"fmt " + len(fmt).to_bytes(4, "little") + fmt + b"data" + (3200).to_bytes(4, "little")
    (here / "unknown.wav").write_bytes(b"RIFF" + (len(body) + 3200).to_bytes(4, "little") + body + bytes(3200))
    assert refuse("sample", [FACE, "unknown.wav", "-o", "o.mp4"], capsys, here, "unknown.wav: cannot decode audio")


def test_frames_and_grid_do_not_collide_with_what_the_frames_folder_holds(here, capsys, diffusion_ckpt):
    (here / "fr").mkdir()
    assert refuse("sample", [FACE, SPEECH, "-o", "o.mp4", "--frames", "fr", "--grid", "fr/00003.png"], capsys, here,
                  "--grid fr/00003.png: the name of one of --frames' frames")
    (here / "fr" / "00099.png").mkdir()  # a folder of that name, not an earlier video's frame: left alone
    (here / "fr" / sample.FRAMES_MARK).touch()
    short = here / "short.wav"
    audio.write_wav(short, audio.load_audio(SPEECH)[:3000])
    sample.main([str(FACE), str(short), "--ckpt", str(diffusion_ckpt), "-o", "o.mp4", "--steps", "1", "--size", "64",
                 "--frames", "fr"])
    assert (here / "fr" / "00099.png").is_dir() and (here / "fr" / "00004.png").is_file()


def test_an_error_while_the_video_is_written_ends_below_the_progress_bar(here, capsys, diffusion_ckpt, monkeypatch):
    """The windows are sampled while the mp4 is written: a failure there (a full disk) must close the bar before
    its message, or the bar is drawn again below it when the paused sampling is cleaned up."""
    def full_disk(path, frames, wav=None):
        next(iter(frames))
        raise common.UserError(f"{path}: cannot write (No space left on device)")
    monkeypatch.setattr(sample, "write_mp4", full_disk)
    (here / "fr").mkdir()  # an earlier video's frames, which must not stay beside the few new ones
    (here / "fr" / sample.FRAMES_MARK).touch()
    for i in (0, 7, 99):
        (here / "fr" / f"{i:05d}.png").write_bytes(b"an earlier frame")
    argv = [FACE, SPEECH, "--ckpt", diffusion_ckpt, "-o", "o.mp4", "--steps", "1", "--size", "64", "--frames", "fr"]
    refuse("sample", argv, capsys, here, "o.mp4: cannot write (No space left on device)", during_work=True)
    assert [p.name for p in sorted((here / "fr").glob("*.png"))] == ["00000.png"]  # the one new frame written
    assert (here / "fr" / "00000.png").read_bytes().startswith(b"\x89PNG")


# ---------------------------------------------------------------------------------------------------------------
# Found by a third sweep (270 tries, of train, evaluate, world and data): one case of each cause


@pytest.mark.parametrize("command, argv, where", [
    ("train", ["--init", ""], "after --init"), ("train", ["--out="], "--out="), ("world", [""], "first"),
    ("sample", [FACE, ""], "after"), ("bench", ["--sizes", ""], "after --sizes"),
    ("sample", [FACE, SPEECH, "-o="], "-o=")])
def test_an_empty_argument_is_refused_not_read_as_the_current_folder(command, argv, where, here, capsys):
    assert refuse(command, argv, capsys, here, f"an empty argument ({where}")


def test_a_value_that_ends_in_an_equals_sign_is_not_empty():
    parser = common.Parser()
    parser.add_argument("--json")
    assert parser.parse_args(["--json=a="]).json == "a="


def test_a_run_folder_with_something_else_in_its_places_is_refused_first(here, capsys):
    (here / "f" / "log.jsonl").mkdir(parents=True)
    assert refuse("train", ["--out", "f"], capsys, here, "a file named log.jsonl there")
    (here / "g").mkdir()
    (here / "g" / "samples").write_text("mine")  # found after training, before: no checkpoint was written
    assert refuse("train", ["--out", "g"], capsys, here, "a folder named samples there")


def test_export_refuses_the_settings_it_would_ignore(here, capsys):
    assert refuse("train", ["--out", "run", "--export", "e.pt", "--size", "S", "--resume"], capsys, here,
                  "--size, --resume: --export only writes")
    assert refuse("train", ["--out", "run", "--export", "e.pt", "--max-minutes", "0"], capsys, here,
                  "--max-minutes: --export only writes")


def test_checkpoint_options_naming_a_folder_or_damaged_weights_are_refused(here, capsys, vae_ckpt):
    (here / "run").mkdir()
    assert refuse("train", ["--init", "run"], capsys, here, "--init run: a folder; pass the checkpoint in it")
    ckpt = torch.load(vae_ckpt, weights_only=True)
    next(iter(ckpt["vae"]["weights"].values())).fill_(float("nan"))
    torch.save(ckpt, here / "nan_vae.pt")
    assert refuse("train", ["--vae", "nan_vae.pt", "--out", "x", "--device", "cpu"], capsys, here,
                  "nan_vae.pt: damaged: its vae.weights.")


@pytest.mark.parametrize("edit, words", [
    (lambda c: c["train_config"].update(eval_every=0), "its setting --eval-every is 0"),
    (lambda c: c["train_config"].update(size="Q"), "its setting --size is 'Q'"),
    (lambda c: c["train_config"].update(lr="abc"), "its setting --lr is 'abc'"),
    (lambda c: c.update(step="3"), "its step is '3'"),
    (lambda c: c.pop("elapsed"), "it holds no elapsed)"),
    # found before the videos are encoded (the test's --steps 5 would train on, were it missed)
    (lambda c: [c.pop("optimizer"), c.pop("model")], "it holds no optimizer, model)")])
def test_a_resume_checks_what_its_checkpoint_holds(edit, words, here, capsys, diffusion_ckpt):
    ckpt = torch.load(diffusion_ckpt, weights_only=True)
    edit(ckpt)
    (here / "run").mkdir()
    torch.save(ckpt, here / "run" / "ckpt.pt")
    assert refuse("train", ["--out", "run", "--resume", "--steps", "5"], capsys, here,
                  f"run/ckpt.pt: not a letstalk run's checkpoint (ValueError: {words}" if "holds no" not in words else
                  f"run/ckpt.pt: not a letstalk run's checkpoint ({words}")


def test_a_checkpoint_from_before_a_setting_existed_still_resumes(diffusion_ckpt, tmp_path):
    saved = torch.load(diffusion_ckpt, weights_only=True)["train_config"]
    del saved["motion_weight"]  # as runs saved before --motion-weight existed
    assert config.resumed_config(saved, {}, tmp_path / "run").motion_weight == 1.0  # the default they trained with


def test_a_resume_that_would_train_nothing_is_refused(here, capsys, diffusion_ckpt):
    (here / "run").mkdir()
    shutil.copy(diffusion_ckpt, here / "run" / "ckpt.pt")  # at step 2
    assert refuse("train", ["--out", "run", "--resume", "--steps", "1"], capsys, here,
                  "the run is at step 2 of --steps 1; pass a larger --steps")


def test_a_folder_mixing_synthetic_and_real_videos_is_refused(here, capsys, vae_ckpt):
    rendered = next((vae_ckpt.parent.parent / "cache").glob("synthetic_2x*_32px_seed0"))
    shutil.copytree(rendered, here / "mixed")
    meta = here / "mixed" / "00000" / "meta.json"  # as data.py prepare writes it: no per-frame ground truth
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k not in data.GROUND_TRUTH}))
    assert refuse("train", ["--data", "mixed", "--vae", vae_ckpt, "--size", "T", "--frames", "4", "--out", "run",
                            "--device", "cpu"], capsys, here, "mixes videos with the synthetic world's")


def test_a_machine_whose_shard_holds_no_video_has_nothing_to_do(here, capsys):
    _video(here / "raw" / "a.mp4", 0.2)
    data.main(["prepare", "raw", "out", "--shard", "1/2"])  # two machines, one video: the second prepares none
    assert "prepared 0, already done 0, skipped 0" in capsys.readouterr().out and not (here / "out").exists()


def _stat(proc):
    """(state, parent pid) of a /proc/<pid> entry, or None if it is no process (any more)."""
    try:
        state, ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        return state, int(ppid)
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid):
    return (_stat(Path(f"/proc/{pid}")) or ("Z",))[0] != "Z"  # a zombie has ended, only not been reaped


def test_workers_end_when_their_parent_is_killed(tmp_path):
    """kill -9 of a command gives it no chance to stop its worker processes: they must notice and end."""
    script = tmp_path / "pool.py"
    script.write_text(f"import sys, time\nsys.path.insert(0, {str(ROOT)!r})\nimport common\n"
                      "if __name__ == '__main__':\n    common.parallel_map(time.sleep, [60] * 8, 2, 'sleep')\n")
    parent = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.DEVNULL)
    workers, deadline = [], time.time() + 60
    while len(workers) < 3 and time.time() < deadline:  # two workers and the resource tracker
        time.sleep(0.2)
        workers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                   and (_stat(p) or (None, None))[1] == parent.pid]
    parent.kill()
    parent.wait()
    deadline = time.time() + 15
    while any(map(_alive, workers)) and time.time() < deadline:
        time.sleep(0.2)
    assert len(workers) == 3 and not any(map(_alive, workers))


def test_outputs_that_collide_are_refused_before_the_work(here, capsys):
    assert refuse("sample", [FACE, SPEECH, "-o", "x.mp4", "--frames", "x.mp4"], capsys, here,
                  "--frames x.mp4: also the name of another output")
    assert refuse("sample", [FACE, SPEECH, "--frames", "s.png", "--grid", "s.png"], capsys, here,
                  "--frames s.png: also the name of another output")


def test_a_full_disk_under_the_frames_ends_below_the_progress_bar(here, capsys, diffusion_ckpt, monkeypatch):
    def full_after_one(path, image):
        if path.name != "00000.png":
            raise common.UserError(f"{path}: cannot write (No space left on device)")
        Path(path).write_bytes(b"frame")
    monkeypatch.setattr(sample, "save_png", full_after_one)
    argv = [FACE, SPEECH, "--ckpt", diffusion_ckpt, "-o", "o.mp4", "--steps", "1", "--size", "64", "--frames", "fr"]
    err = refuse("sample", argv, capsys, here, "fr/00001.png: cannot write (No space left on device)", during_work=True)
    assert err.rstrip().endswith("(No space left on device)")  # the last line: no bar drawn again below it
    assert (here / "fr" / "00000.png").read_bytes() == b"frame"


def test_what_eval_and_probe_are_pointed_at_is_what_they_take(here, capsys):
    shutil.copy(sample.DEFAULT_CKPT, here / "model.pt")  # the probe's --out would replace a model
    assert refuse("evaluate", ["probe", "--out", "model.pt", "--steps", "1", "--videos", "1"], capsys, here,
                  "--out model.pt: holds something other than a probe")
    torch.save(torch.randn(3), here / "features.pt")  # a user's tensor, and notes: neither is replaced
    (here / "notes.pt").write_text("my notes")
    for name in ("features.pt", "notes.pt"):
        assert refuse("evaluate", ["probe", "--out", name, "--steps", "1", "--videos", "1"], capsys, here,
                      f"--out {name}: holds something other than a probe")
    evaluate.main(["probe", "--out", "old_probe.pt", "--steps", "1", "--videos", "1", "--cache", "pools"])
    evaluate.main(["probe", "--out", "old_probe.pt", "--steps", "1", "--videos", "1", "--cache", "pools"])
    assert "head.weight" in torch.load(here / "old_probe.pt", weights_only=True)  # a probe is replaced
    (here / "weights").mkdir()
    assert refuse("evaluate", ["eval", "--inception", "weights"], capsys, here, "--inception weights: a folder")
    ckpt = torch.load(sample.DEFAULT_CKPT, weights_only=True)
    ckpt["domain"]["vae_min_psnr"] = float("nan")
    torch.save(ckpt, here / "nan_domain.pt")
    assert refuse("sample", [FACE, SPEECH, "--ckpt", "nan_domain.pt"], capsys, here, "vae_min_psnr is NaN")


def test_held_out_videos_too_short_for_eval_say_what_would_do(here, capsys, diffusion_ckpt):
    world.main(["short", "--videos", "2", "--seconds", "0.8", "--size", "32"])  # 20 frames each
    argv = ["eval", "--ckpt", diffusion_ckpt, "--data", "short", "--json", "r.json", "--seconds"]
    assert refuse("evaluate", [*argv, "0.6"], capsys, here, "20 frames, but a video is scored on --seconds 0.6 (15 "
                  "frames) after 10 frames that hold its portrait; pass --seconds 0.4 or less")
    world.main(["tiny", "--videos", "2", "--seconds", "0.6", "--size", "32"])
    assert refuse("evaluate", [*argv[:4], "tiny", *argv[5:], "0.4"], capsys, here, "too short to score")


# ----------------------------------------------------------------------------------------------------------------
# Found by a fourth sweep (190 tries of data.py prepare on odd real-world files): one case of each cause


def test_prepare_takes_each_raw_video_once_and_names_it_as_a_folder_can(here, capsys):
    """An earlier output inside the raw folder is not raw material (its videos were prepared again, re-cropped),
    nor is a second name (a link) of a video; a name that is not UTF-8 text or too long for its cache file is
    refused before any work, naming the source; adding videos at another --size is refused, not mixed."""
    _video(here / "raw" / "a.mp4", 0.2)
    (here / "raw" / "b.mp4").symlink_to("a.mp4")
    (here / "boxes.json").write_text('{"a": [0, 0, 64, 64]}')  # the test video shows no face
    data.main(["prepare", "raw", "raw/prepared", "--size", "32", "--boxes", "boxes.json"])
    assert "prepared 1, already done 0, skipped 0" in capsys.readouterr().out
    data.main(["prepare", "raw", "elsewhere", "--size", "32", "--boxes", "boxes.json"])
    assert "prepared 1, already done 0, skipped 0" in capsys.readouterr().out
    assert [p.name for p in (here / "elsewhere").iterdir()] == ["a"]
    assert refuse("data", ["prepare", "raw", "elsewhere", "--size", "16"], capsys, here,
                  "elsewhere holds videos of 32 px (a); add to it with --size 32")
    _video(here / "odd" / os.fsdecode(b"bad\xff.mp4"), 0.2)
    assert refuse("data", ["prepare", "odd", "out", "--size", "32"], capsys, here, "a name that is not UTF-8 text")
    shutil.rmtree(here / "odd")
    _video(here / "odd" / ("x" * 120) / ("y" * 120 + ".mp4"), 0.2)
    assert refuse("data", ["prepare", "odd", "out", "--size", "32"], capsys, here, "makes a folder name of 242 bytes")


def test_export_replaces_only_an_export_and_a_new_log_is_never_written_through_a_link(here, capsys, vae_ckpt,
                                                                                      diffusion_ckpt):
    """Found by a sweep: --export onto another run's ckpt.pt replaced it (that run could no longer resume), and a
    new run wrote its log through a log.jsonl link into the file it pointed to."""
    shutil.copy(vae_ckpt, here / "vae_run.pt")
    before = (here / "vae_run.pt").read_bytes()
    assert refuse("train", ["--out", str(diffusion_ckpt.parent), "--export", "vae_run.pt"], capsys, here,
                  "--export vae_run.pt: holds something other than an export")
    assert (here / "vae_run.pt").read_bytes() == before
    train.main(["--out", str(diffusion_ckpt.parent), "--export", "model.pt"])
    train.main(["--out", str(diffusion_ckpt.parent), "--export", "model.pt"])  # an export: replaced
    (here / "run").mkdir()
    (here / "important.txt").write_text("mine")
    (here / "run" / "log.jsonl").symlink_to(here / "important.txt")
    train.main(diffusion_args(here / "run", vae_ckpt, "--steps", "1"))
    assert (here / "important.txt").read_text() == "mine" and not (here / "run" / "log.jsonl").is_symlink()
