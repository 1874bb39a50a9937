"""Tests of vae.py and of the VAE stage of train.py."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

import common
import train
import vae as vae_module
import world
from vae import VAE, ResBlock, VAEConfig, kl_divergence, norm, psnr, vae_loss


@pytest.mark.parametrize("factor", [4, 8])
@pytest.mark.parametrize("size", [64, 256])
def test_shapes(factor, size):
    model = VAE(VAEConfig(resolution=size, factor=factor, width=8)).eval()
    x = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        z = model.encode(x)
        mean, logvar = model.moments(x)
        y = model.decode(z)
    assert z.shape == mean.shape == logvar.shape == (2, 4, size // factor, size // factor)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    model.train()  # decode clamps in training mode too (training reconstructs through forward, unclamped)
    assert model.decode(z * 100).abs().max() <= 1


def test_every_width_train_py_accepts_builds_a_vae():
    """--vae-width takes any multiple of 4: GroupNorm's groups must divide every level's channels (36 -> 144 at the
    third level, which 32 groups do not divide); a width under 4 or not a multiple of 4 is no VAE's."""
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    for width in (4, 12, 36, 68, 100):
        model = VAE(VAEConfig(resolution=16, factor=4, width=width))
        assert model(x)[0].shape == x.shape
    for width in (1, 2, 3, 6):
        with pytest.raises(ValueError, match="no VAE has this shape"):
            VAEConfig(width=width)


def test_kl_divergence():
    zero = torch.zeros(3, 4, 5, 5)
    assert kl_divergence(zero, zero).item() == 0.0  # q = N(0, 1) is the prior itself
    mean, logvar = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    closed_form = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).mean()
    assert torch.allclose(kl_divergence(mean, logvar), closed_form, atol=1e-6)


def test_the_training_pass_samples_z_and_encode_is_the_posterior_mean():
    model = VAE(VAEConfig(resolution=32, factor=4, width=8))  # in training mode
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert not torch.equal(model(x)[0], model(x)[0])  # z ~ q(z|x), drawn afresh every pass
    assert torch.equal(model.encode(x), model.moments(x)[0])  # the latents diffusion sees: deterministic


def test_latent_noise_is_drawn_per_frame_in_the_diffusion_models_units():
    """VAE.forward(x, S): each frame's latent gets noise of a std drawn from U(0, S) / latent_scale (S in the unit-
    variance units of z * latent_scale), so the decoder sees what a diffusion model's errors look like."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig(resolution=16, factor=4, width=8))
    last = vae.encoder[-1]  # its second half is the log-variance: clamped to -30, the posterior adds next to nothing
    with torch.no_grad():
        last.weight[4:].zero_(), last.bias[4:].fill_(-100.0), vae.latent_scale.fill_(4.0)
    vae.decoder = torch.nn.Identity()  # so forward returns the latent it would decode
    x = torch.rand(512, 3, 16, 16) * 2 - 1
    z, mean, _ = vae(x, latent_noise=0.6)
    std = ((z - mean) * vae.latent_scale).flatten(1).std(1)  # each frame's noise, in diffusion units
    assert std.max() < 0.6 * 1.3 and 0.27 < std.mean() < 0.33 and std.min() < 0.05
    assert torch.allclose(vae(x)[0], mean, atol=1e-5)  # 0 (the default): the plain VAE


def test_the_posterior_is_sampled_with_its_std_and_the_loss_is_l1_plus_mse_plus_weighted_kl():
    """z = mean + eps * exp(logvar / 2): a log-variance of log 4 draws z at a std of 2 around the mean. The loss
    is the one vae_loss's docstring writes, term by term."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig(resolution=16, factor=4, width=8))
    last = vae.encoder[-1]
    with torch.no_grad():
        last.weight[4:].zero_(), last.bias[4:].fill_(math.log(4.0))
    decoder, vae.decoder = vae.decoder, torch.nn.Identity()  # forward returns the sampled latent
    x = torch.rand(256, 3, 16, 16) * 2 - 1
    z, mean, _ = vae(x)
    assert (z - mean).std().item() == pytest.approx(2.0, rel=0.03)
    vae.decoder = decoder
    loss, logs = vae_loss(vae, x, kl_weight=0.5)
    assert loss.item() == pytest.approx(logs["l1"] + logs["mse"] + 0.5 * logs["kl"], rel=1e-5)
    assert logs["l1"] > 0 and logs["mse"] > 0 and logs["kl"] > 0


def test_a_res_block_adds_its_branch_to_a_skip_and_norms_split_channels_into_groups_of_4_to_32():
    block = ResBlock(8, 16)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        block.conv2.weight.zero_(), block.conv2.bias.zero_()  # no branch: the skip alone
        assert torch.allclose(block(x), block.skip(x))
        assert torch.equal(ResBlock(8, 8).skip(x), x)  # the same width: the identity
    assert [norm(c).num_groups for c in (8, 32, 36, 128, 256)] == [2, 8, 9, 32, 32]


def test_vae_overfits_one_small_batch():
    torch.manual_seed(0)
    frames = [world.render_frame(world.identity(i), 64, i / 4, 0.3, 0.0, (0.0, 0.0, 0.0))[0] for i in range(4)]
    x = common.to_tensor(np.stack(frames))
    model = VAE(VAEConfig(resolution=64, factor=4, width=16))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.eval()
    with torch.no_grad():
        before = psnr(model.decode(model.encode(x)), x).mean().item()
    model.train()
    for _ in range(150):
        loss, _ = vae_loss(model, x, model.config.kl_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = psnr(model.decode(model.encode(x)), x).mean().item()
    assert after > before + 10 and after > 20


def _train(tmp_path, name, *extra):
    argv = ["--stage", "vae", "--out", str(tmp_path / name), "--cache", str(tmp_path / "cache"), "--videos", "2",
            "--resolution", "32", "--vae-width", "8", "--batch-size", "4", "--warmup", "2", "--eval-every", "2",
            "--device", "cpu", *extra]
    return train.main(argv)


def test_train_resumes_exactly_and_stops_on_a_time_budget(tmp_path):
    _train(tmp_path, "straight", "--steps", "6")
    _train(tmp_path, "pieces", "--steps", "3")
    (tmp_path / "pieces" / "log.jsonl").unlink()
    _train(tmp_path, "pieces", "--steps", "6", "--resume")
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "pieces" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for key, value in a["vae"]["weights"].items():
        assert torch.allclose(value, b["vae"]["weights"][key], atol=1e-6), key
    for key, state in a["optimizer"]["state"].items():
        assert torch.allclose(state["exp_avg_sq"], b["optimizer"]["state"][key]["exp_avg_sq"], atol=1e-8)
    assert 0 < a["vae"]["weights"]["latent_scale"].item() < 100
    # a zero time budget stops before the first step, still leaving a checkpoint that resumes
    result = _train(tmp_path, "budget", "--max-minutes", "0")
    assert result["step"] == 0 and (tmp_path / "budget" / "ckpt.pt").exists()
    assert _train(tmp_path, "budget", "--steps", "2", "--resume")["step"] == 2


def test_vae_cli_reconstructs_an_image(tmp_path, capsys, monkeypatch):
    _train(tmp_path, "run", "--steps", "2")
    (tmp_path / "faces").mkdir()
    image = tmp_path / "faces" / "face.png"
    Image.fromarray(world.synth_video("test", 0, 0.04, 48).frames[0]).convert("RGBA").save(image)
    monkeypatch.chdir(tmp_path)
    vae_module.main(["--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--image", str(image)])
    assert "PSNR" in capsys.readouterr().out
    # written here, as sample.py writes its video, not next to the image
    assert Image.open(tmp_path / "face_recon.png").size == (64, 32)  # original | reconstruction at 32x32


@pytest.mark.parametrize("case", ["missing ckpt", "garbage ckpt", "bad image", "no output folder"])
def test_vae_cli_user_errors_exit_2(tmp_path, capsys, case):
    _train(tmp_path, "run", "--steps", "1")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    ckpt = {"missing ckpt": tmp_path / "none.pt", "garbage ckpt": tmp_path / "junk.pt"}.get(case,
                                                                                       tmp_path / "run" / "ckpt.pt")
    image = tmp_path / ("junk.png" if case == "bad image" else "ok.png")
    capsys.readouterr()  # forget the training run's output
    with pytest.raises(SystemExit) as e:
        vae_module.main(["--ckpt", str(ckpt), "--image", str(image),
                         *(["--out", str(tmp_path / "none" / "r.png")] if case == "no output folder" else [])])
    assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_train_user_errors_exit_2(tmp_path, capsys):
    for argv in (["--resume", "--out", str(tmp_path / "none")], ["--data", str(tmp_path / "missing")]):
        with pytest.raises(SystemExit) as e:
            train.main(["--stage", "vae", *argv])
        assert e.value.code == 2 and "error:" in capsys.readouterr().err
    _train(tmp_path, "run", "--steps", "1")
    with pytest.raises(SystemExit) as e:
        _train(tmp_path, "run", "--steps", "1")  # the run exists: refuse to overwrite it
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
