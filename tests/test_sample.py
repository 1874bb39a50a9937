"""Tests of sample.py: inputs of every kind, the written video, and clean failures."""

import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import audio
import common
import letstalk as L
import metrics
import sample
import world
from diffusion import Diffusion
from vae import VAE, VAEConfig
from conftest import write_float, write_pcm

ASSETS = Path(sample.__file__).resolve().parent / "assets"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    video = world.synth_video("test", 0, 0.5, 48)
    Image.fromarray(video.frames[0]).save(root / "face.png")
    audio.write_wav(root / "speech.wav", video.wav[:7000])  # 0.4375 s: 11 frames, 3 windows of 4
    return root


def test_sample_writes_a_video_as_long_as_the_audio(tmp_path, inputs, diffusion_ckpt, capsys):
    out = tmp_path / "out.mp4"
    (tmp_path / "frames").mkdir()  # as an earlier run of a longer video left it
    (tmp_path / "frames" / sample.FRAMES_MARK).touch()
    (tmp_path / "frames" / "00099.png").write_bytes(b"a frame of an earlier, longer video")
    sample.main([str(inputs / "face.png"), str(inputs / "speech.wav"), "--ckpt", str(diffusion_ckpt), "-o", str(out),
                 "--steps", "2", "--size", "64", "--frames", str(tmp_path / "frames"),
                 "--grid", str(tmp_path / "g.png")])
    n = math.ceil(7000 / 640)
    with av.open(str(out)) as c:
        v, (a,) = c.streams.video[0], c.streams.audio
        assert v.frames == n and v.codec_context.pix_fmt == "yuv420p" and v.codec_context.width == 64
        assert float(v.duration * v.time_base) == pytest.approx(n / 25)
        assert float(a.duration * a.time_base) == pytest.approx(n / 25, abs=0.01)
    assert len(list((tmp_path / "frames").glob("*.png"))) == n  # the earlier video's 00099.png is gone
    assert Image.open(tmp_path / "g.png").size == (64 * 9, 64)
    printed = capsys.readouterr().out  # every file written is named, and how the video was sampled
    assert f"{n} frames" in printed and f"{n} PNGs into {tmp_path / 'frames'}" in printed
    assert f"wrote {tmp_path / 'g.png'}" in printed and f"{diffusion_ckpt}, dpm++ in 2 steps" in printed


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16", "CMYK"])
def test_images_of_every_mode_load(tmp_path, mode):
    rgb = Image.fromarray(world.synth_video("test", 1, 0.04, 64).frames[0]).resize((90, 60))
    if mode == "I;16":  # 16-bit grey, as from a scientific camera
        img = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    else:
        img = rgb.convert(mode)
    img.save(tmp_path / ("x.tif" if mode in ("I;16", "CMYK") else "x.png"))
    got = common.load_image(tmp_path / ("x.tif" if mode in ("I;16", "CMYK") else "x.png"), 32)
    grey = mode in ("L", "I;16")
    (rgb.convert("L") if grey else rgb).save(tmp_path / "want.png")  # what the image shows, as 8-bit RGB or grey
    want = common.load_image(tmp_path / "want.png", 32)
    assert got.shape == (32, 32, 3) and got.dtype == np.uint8 and got.std() > 10
    assert np.abs(got.astype(int) - want).mean() < (5 if mode == "P" else 1)  # (P: a 216-colour palette, dithered)


def test_a_flat_16_bit_grey_keeps_its_grey_and_damaged_exif_is_ignored_quietly(tmp_path, recwarn):
    Image.fromarray(np.full((40, 40), 30000, np.uint16)).save(tmp_path / "grey.png")  # not stretched to black
    assert (common.load_image(tmp_path / "grey.png", 32) == round(30000 / 257)).all()
    Image.new("RGB", (40, 40), (100, 150, 200)).save(tmp_path / "x.jpg", exif=b"Exif\0\0II*\0" + b"\xff" * 40)
    assert abs(common.load_image(tmp_path / "x.jpg", 32).astype(int) - [100, 150, 200]).max() <= 3
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]  # PIL's "Corrupt EXIF data"


def test_extreme_pixels_load_as_what_they_show(tmp_path):
    """16-bit white is white (65535 / 256 would round to 256 and wrap to black); fully transparent pixels are white
    whatever colour they hold, with or without colour channels; a 32-bit grey far from 0 spans black to white in
    order."""
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "white16.png")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "clear_grey.png")
    for name in ("white16.png", "clear.png", "clear_grey.png"):
        assert (common.load_image(tmp_path / name, 8) == 255).all(), name
    Image.fromarray(1000 + 10 * np.arange(64, dtype=np.int32).reshape(8, 8), mode="I").save(tmp_path / "ramp.tif")
    ramp = common.load_image(tmp_path / "ramp.tif", 8)[..., 0].ravel().astype(int)
    assert ramp[0] == 0 and ramp[-1] == 255 and (np.diff(ramp) > 0).all()


def test_frames_go_to_tensors_and_back_exactly_and_overshoot_is_clipped():
    frames = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=-1)
    assert np.array_equal(common.to_uint8(common.to_tensor(frames)), frames)
    assert common.to_uint8(torch.tensor([-1.5, 1.5]).view(1, 2, 1).expand(3, 2, 1)).tolist() == [[[0] * 3], [[255] * 3]]


def test_a_phone_photo_stored_sideways_loads_upright(tmp_path):
    """A camera stores the sensor's pixels and an EXIF orientation (6: turn 90 degrees clockwise to show it)."""
    upright = Image.fromarray(world.synth_video("test", 1, 0.04, 64).frames[0])
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    upright.rotate(90, expand=True).save(tmp_path / "phone.jpg", exif=exif, quality=95)  # stored turned left
    got, want = common.load_image(tmp_path / "phone.jpg", 64), np.asarray(upright)
    assert np.abs(got.astype(int) - want).mean() < 8  # JPEG's loss; sideways would differ by tens


@pytest.mark.parametrize("case", ["missing image", "bad image", "missing audio", "bad audio", "empty audio",
                                  "short audio", "not our checkpoint", "missing checkpoint", "no such device",
                                  "no such GPU", "no output folder", "no grid folder", "frames is a file",
                                  "zero steps", "negative size"])
def test_bad_inputs_exit_2_with_one_line_and_no_file(tmp_path, inputs, diffusion_ckpt, vae_ckpt, capsys, case):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00")
    audio.write_wav(tmp_path / "empty.wav", np.zeros(0, np.float32))
    audio.write_wav(tmp_path / "short.wav", np.zeros(300, np.float32))
    image, speech, ckpt = inputs / "face.png", inputs / "speech.wav", diffusion_ckpt
    image = {"missing image": tmp_path / "none.png", "bad image": tmp_path / "bad.png"}.get(case, image)
    speech = {"missing audio": tmp_path / "none.wav", "bad audio": tmp_path / "bad.wav",
              "empty audio": tmp_path / "empty.wav", "short audio": tmp_path / "short.wav"}.get(case, speech)
    ckpt = {"not our checkpoint": vae_ckpt, "missing checkpoint": tmp_path / "none.pt"}.get(case, ckpt)
    out = tmp_path / ("none/out.mp4" if case == "no output folder" else "out.mp4")
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    # each is refused before the generation starts, not after it
    extra = {"no such device": ["--device", "tpu7"], "no such GPU": ["--device", "cuda:99"],
             "no grid folder": ["--grid", str(tmp_path / "none" / "g.png")],
             "frames is a file": ["--frames", str(tmp_path / "notes.txt")], "zero steps": ["--steps", "0"],
             "negative size": ["--size", "-2"]}.get(case, [])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sample.main([str(image), str(speech), "--ckpt", str(ckpt), "-o", str(out), "--steps", "1", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("encoding, rate, channels", [(8, 16000, 1), (16, 16000, 1), (24, 16000, 1), (32, 16000, 1),
                                                       ("float", 16000, 1), (16, 44100, 2), (24, 48000, 2)])
def test_every_wav_encoding_animates_its_whole_length(tmp_path, inputs, diffusion_ckpt, encoding, rate, channels):
    t = np.arange(int(0.3 * rate)) / rate
    x = np.stack([0.5 * np.sin(2 * np.pi * 220 * t) * (t > 0.1)] * channels, axis=1)
    path = tmp_path / "a.wav"
    if encoding == "float":
        write_float(path, x, rate)
    else:
        write_pcm(path, x, rate, encoding)
    out = tmp_path / "out.mp4"
    sample.main([str(inputs / "face.png"), str(path), "--ckpt", str(diffusion_ckpt), "-o", str(out), "--steps", "1",
                 "--size", "0"])
    with av.open(str(out)) as c:
        assert c.streams.video[0].frames == math.ceil(0.3 * 25)


def test_shipped_demo_runs_without_arguments(tmp_path, capsys):
    """The default checkpoint and assets: one video stream and one audio stream of the same duration."""
    out = tmp_path / "demo.mp4"
    sample.main([str(ASSETS / "face.png"), str(ASSETS / "speech.wav"), "-o", str(out), "--steps", "2"])
    assert "note:" not in capsys.readouterr().err  # the demo portrait is in the checkpoint's domain
    with av.open(str(out)) as c:
        (v,), (a,) = c.streams.video, c.streams.audio
        assert v.codec_context.width == 256 and float(v.duration * v.time_base) == pytest.approx(
            float(a.duration * a.time_base), abs=0.03)


def test_a_real_photo_gets_the_domain_note(tmp_path, capsys):
    rng = np.random.default_rng(0)  # a photo-like texture nothing in the synthetic world looks like
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    model, vae, _, domain = sample.load_model(sample.DEFAULT_CKPT, "cpu")
    assert sample.out_of_domain(vae, common.load_image(tmp_path / "photo.png", 64), domain).startswith("note:")
    assert sample.out_of_domain(vae, common.load_image(ASSETS / "face.png", 64), domain) is None


def test_no_jump_at_window_borders():
    """Three windows of the shipped size-T model, sampled as sample.py does by default: the frame-to-frame change
    across a window border is within 1.5x of the change inside windows (the motion frames carry the previous window
    over)."""
    model, vae, diffusion, _ = sample.load_model(sample.DEFAULT_CKPT, "cpu")
    F_ = model.cfg.frames
    videos = [world.synth_video("test", i, 3 * F_ / 25, 64) for i in range(3)]
    mels = torch.stack([audio.audio_features(v.wav, 3 * F_) for v in videos])
    frames = sample.generate(model, vae, diffusion, np.stack([v.frames[0] for v in videos]), mels, progress=False)
    assert metrics.border_jump(frames, F_) <= 1.5


def test_windows_shorter_than_the_motion_frames_continue_the_last_m_latents():
    """With F = 1 frame per window and M = 2 motion frames, every window is conditioned on the last two latents so
    far, which span windows; before the first window the portrait stands still for two frames."""
    torch.manual_seed(0)
    model = L.LetsTalk(L.config_for("T", depth=1, width=32, heads=2, latent_size=4, frames=1, motion=2,
                                    audio_layers=1)).eval()
    vae = VAE(VAEConfig(resolution=16, factor=4, width=8)).eval()
    vae.latent_scale.fill_(2.0)  # (not 1: the model's latents are the VAE's times it, in and out)
    motions, refs, latents, decode = [], [], [], vae.decode
    model.register_forward_pre_hook(lambda module, args: motions.append(args[4].clone()) or refs.append(args[2]))
    vae.decode = lambda z: latents.append(z * vae.latent_scale) or decode(z)
    steps = 2
    portrait = np.random.default_rng(0).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    sample.generate(model, vae, Diffusion(), portrait, torch.randn(1, 4, 20, 80), steps=steps, audio_scale=1.0,
                    progress=False)  # one model pass per step
    z, ref = torch.cat(latents), refs[0]  # the 4 generated latents (one per window) and the portrait's
    assert torch.allclose(ref, vae.encode(sample.to_tensor(portrait)) * vae.latent_scale)
    assert len(latents) == 4 and [m.shape[1] for m in motions] == [2] * 4 * steps
    for w, want in ((0, torch.cat([ref, ref])), (1, torch.cat([ref, z[:1]])), (2, z[[0, 1]]), (3, z[[1, 2]])):
        assert torch.allclose(motions[w * steps][0], want, atol=1e-6), f"window {w}"


def test_windows_come_as_they_are_made_and_the_last_stops_at_the_audio():
    """sample.py writes each window while the next is sampled, so a long video is never held whole: the first window
    arrives after its own denoising steps only, and 10 frames in windows of 4 come as 4, 4 and 2. Each window hears
    its own frames' audio; the last, past the audio's end, its last frame's."""
    torch.manual_seed(0)
    model = L.LetsTalk(L.config_for("T", depth=1, width=32, heads=2, latent_size=4, frames=4, motion=2,
                                    audio_layers=1)).eval()
    vae = VAE(VAEConfig(resolution=16, factor=4, width=8)).eval()
    heard = []
    model.register_forward_pre_hook(lambda module, args: heard.append(args[3]))
    portrait = np.random.default_rng(0).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    mels = torch.randn(1, 10, 20, 80)
    made = sample.windows(model, vae, Diffusion(), portrait, mels, steps=2, progress=False)
    first = next(made)
    assert first.shape == (1, 4, 16, 16, 3) and first.dtype == np.uint8 and len(heard) == 2
    assert [w.shape[1] for w in made] == [4, 2] and len(heard) == 6
    padded = torch.cat([mels, mels[:, -1:], mels[:, -1:]], dim=1)  # 12 frames: 3 windows of 4
    for w in range(3):
        assert torch.equal(heard[2 * w], padded[:, 4 * w:4 * w + 4]) and torch.equal(heard[2 * w + 1], heard[2 * w])


class OneStep(Diffusion):
    """A Diffusion whose sampling is one call of the guided denoiser at a given (x, t), whose eps it keeps."""

    def __init__(self, x, t):
        super().__init__()
        self.x, self.t = x, t

    def sample(self, denoise, shape, steps, sampler, **kwargs):
        self.eps = denoise(self.x, self.t)[1]
        return torch.zeros(shape)


@pytest.mark.parametrize("audio_scale, ref_scale, passes", [(1, 1, 1), (2.5, 1, 2), (1, 3, 3), (2.5, 3, 3)])
def test_guidance_combines_the_passes_as_the_docstring_says(audio_scale, ref_scale, passes):
    """eps = eps(none) + s_ref (eps(ref) - eps(none)) + s_audio (eps(ref, audio) - eps(ref)), each eps a pass of the
    model with those conditions, in as many batched passes as the scales need."""
    torch.manual_seed(0)
    model = L.LetsTalk(L.config_for("T", depth=1, width=32, heads=2, latent_size=4, frames=4, motion=2,
                                    audio_layers=1)).eval()
    with torch.no_grad():
        for p in model.parameters():  # random weights everywhere: the zero-initialised output layer would give 0
            p.copy_(torch.randn_like(p) * 0.1)
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    x, t = torch.randn(1, 4, 4, 4, 4), torch.tensor([500])
    diffusion = OneStep(x, t)
    portrait = np.random.default_rng(0).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    vae = VAE(VAEConfig(resolution=16, factor=4, width=8)).eval()
    list(sample.windows(model, vae, diffusion, portrait, torch.randn(1, 4, 20, 80), audio_scale=audio_scale,
                        ref_scale=ref_scale, progress=False))
    (args, _), = calls
    assert len(args[0]) == passes  # one batched model call: a batch of 1 per pass
    ref, mel, motion = (a[:1] for a in args[2:5])
    with torch.no_grad():
        eps = {name: diffusion.split(x, t, model(x, t, ref, mel, motion, drop_ref=torch.tensor([no_ref]),
                                                 drop_audio=torch.tensor([no_audio])))[1]
               for name, no_ref, no_audio in (("none", True, True), ("ref", False, True), ("both", False, False))}
    want = eps["none"] + ref_scale * (eps["ref"] - eps["none"]) + audio_scale * (eps["both"] - eps["ref"])
    assert torch.allclose(diffusion.eps, want, atol=1e-5)
    assert not torch.allclose(eps["both"], eps["ref"], atol=1e-3)  # the terms differ: a wrong scale would show
    assert not torch.allclose(eps["ref"], eps["none"], atol=1e-3)


def test_a_default_output_name_too_long_is_not_blamed_on_out(tmp_path, inputs, diffusion_ckpt, capsys, monkeypatch):
    """Without -o the video is named <image>_<audio>.mp4, which two long names can push past the file system's
    limit: the error says so and how to choose a name, instead of naming an --out the user never passed."""
    long = "a" * 150
    for name in ("face.png", "speech.wav"):
        (tmp_path / f"{long}{Path(name).suffix}").write_bytes((inputs / name).read_bytes())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        sample.main([f"{long}.png", f"{long}.wav", "--ckpt", str(diffusion_ckpt)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "choose one with -o" in err and "--out" not in err
