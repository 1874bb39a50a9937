"""Tests of sample.py: inputs of every kind, the written video, and clean failures."""

import math

import av
import numpy as np
import pytest
from PIL import Image

import data
import sample


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    video = data.synth_video("test", 0, 0.5, 48)
    Image.fromarray(video.frames[0]).save(root / "face.png")
    data.write_wav(root / "speech.wav", video.wav[:7000])  # 0.4375 s: 11 frames, 3 windows of 4
    return root


def test_sample_writes_a_video_as_long_as_the_audio(tmp_path, inputs, diffusion_ckpt, capsys):
    out = tmp_path / "out.mp4"
    sample.main([str(inputs / "face.png"), str(inputs / "speech.wav"), "--ckpt", str(diffusion_ckpt), "-o", str(out),
                 "--steps", "2", "--size", "64", "--frames", str(tmp_path / "frames"), "--grid", str(tmp_path / "g.png")])
    n = math.ceil(7000 / 640)
    with av.open(str(out)) as c:
        v, (a,) = c.streams.video[0], c.streams.audio
        assert v.frames == n and v.codec_context.pix_fmt == "yuv420p" and v.codec_context.width == 64
        assert float(v.duration * v.time_base) == pytest.approx(n / 25)
        assert float(a.duration * a.time_base) == pytest.approx(n / 25, abs=0.01)
    assert len(list((tmp_path / "frames").glob("*.png"))) == n
    assert Image.open(tmp_path / "g.png").size == (64 * 9, 64)
    assert f"{n} frames" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16", "CMYK"])
def test_images_of_every_mode_load(tmp_path, mode):
    rgb = Image.fromarray(data.synth_video("test", 1, 0.04, 64).frames[0]).resize((90, 60))
    if mode == "I;16":  # 16-bit grey, as from a scientific camera
        img = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    else:
        img = rgb.convert(mode)
    img.save(tmp_path / ("x.tif" if mode in ("I;16", "CMYK") else "x.png"))
    got = sample.load_image(tmp_path / ("x.tif" if mode in ("I;16", "CMYK") else "x.png"), 32)
    assert got.shape == (32, 32, 3) and got.dtype == np.uint8 and got.std() > 10


@pytest.mark.parametrize("case", ["missing image", "bad image", "missing audio", "bad audio", "empty audio",
                                  "short audio", "not our checkpoint", "missing checkpoint"])
def test_bad_inputs_exit_2_with_one_line_and_no_file(tmp_path, inputs, diffusion_ckpt, vae_ckpt, capsys, case):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00")
    data.write_wav(tmp_path / "empty.wav", np.zeros(0, np.float32))
    data.write_wav(tmp_path / "short.wav", np.zeros(300, np.float32))
    image, audio, ckpt = inputs / "face.png", inputs / "speech.wav", diffusion_ckpt
    image = {"missing image": tmp_path / "none.png", "bad image": tmp_path / "bad.png"}.get(case, image)
    audio = {"missing audio": tmp_path / "none.wav", "bad audio": tmp_path / "bad.wav",
             "empty audio": tmp_path / "empty.wav", "short audio": tmp_path / "short.wav"}.get(case, audio)
    ckpt = {"not our checkpoint": vae_ckpt, "missing checkpoint": tmp_path / "none.pt"}.get(case, ckpt)
    out = tmp_path / "out.mp4"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sample.main([str(image), str(audio), "--ckpt", str(ckpt), "-o", str(out), "--steps", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
