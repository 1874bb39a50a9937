"""Tests of metrics.py against closed forms and independent implementations."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
import metrics


def _random_cov(dim, rng):
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    mu, cov = rng.normal(size=6), _random_cov(6, rng)
    assert abs(metrics.frechet_distance(mu, cov, mu, cov)) < 1e-9
    # diagonal Gaussians: |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    v1, v2, m2 = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6), rng.normal(size=6)
    want = ((mu - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert metrics.frechet_distance(mu, np.diag(v1), m2, np.diag(v2)) == pytest.approx(want, rel=1e-9)
    # full covariances: symmetric, and equal to an independent formula, tr((S1 S2)^1/2) from the eigenvalues of S1 S2
    c1, c2 = _random_cov(8, rng), _random_cov(8, rng)
    m1, m2 = rng.normal(size=8), rng.normal(size=8)
    independent = ((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.sqrt(
        np.linalg.eigvals(c1 @ c2).real.clip(min=0)).sum()
    d12, d21 = metrics.frechet_distance(m1, c1, m2, c2), metrics.frechet_distance(m2, c2, m1, c1)
    assert d12 == pytest.approx(independent, rel=1e-6) and d12 == pytest.approx(d21, rel=1e-9)


def test_streaming_statistics_equal_batch_statistics():
    x = np.random.default_rng(1).normal(size=(1000, 5)) @ np.random.default_rng(2).normal(size=(5, 5)) + 3
    stats = metrics.RunningStats(5)
    for chunk in np.array_split(x, 7):
        stats.update(chunk)
    mean, cov = stats.mean_cov()
    assert np.allclose(mean, x.mean(0), atol=1e-10) and np.allclose(cov, np.cov(x, rowvar=False), atol=1e-9)


def _ssim_reference(x, y):
    """Independent SSIM: explicit loops over 11x11 windows of one grey image, float64."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb, cv = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum(), (w * (a - ma) * (b - mb)).sum()
            values.append((2 * ma * mb + 1e-4) * (2 * cv + 9e-4) / ((ma ** 2 + mb ** 2 + 1e-4) * (va + vb + 9e-4)))
    return np.mean(values)


def test_ssim():
    frame = data.synth_video("test", 2, 0.04, 32).frames[0]
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].double() / 255
    noisy = [(x + s * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
             for s in (0.02, 0.1, 0.3)]
    assert metrics.ssim(x, x).item() == pytest.approx(1.0)
    scores = [metrics.ssim(x, n).item() for n in noisy]
    assert scores[0] > scores[1] > scores[2]
    grey_x, grey_n = x[0, 0].numpy(), noisy[1][0, 0].numpy()
    assert metrics.ssim(x[:, :1], noisy[1][:, :1]).item() == pytest.approx(_ssim_reference(grey_x, grey_n), abs=1e-9)


def test_per_clip_sync_ignores_offsets_and_shared_silence():
    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 1, (20, 16))
    assert metrics.per_clip_sync(truth, truth) == pytest.approx(1.0)
    unrelated = rng.uniform(0, 1, (20, 16))
    assert abs(metrics.per_clip_sync(unrelated, truth)) < 0.15
    # a per-clip offset shared by prediction and truth would make a pooled r high; per clip it stays at chance
    offsets = rng.normal(0, 5, (20, 1))
    assert abs(metrics.per_clip_sync(unrelated + offsets, truth + offsets)) < 0.15
    # so would whole clips of silence, where both stay closed, beside clips of unrelated speech and motion
    silent_truth = np.concatenate([truth, np.zeros((20, 16))])
    silent_pred = np.concatenate([unrelated, np.zeros((20, 16))])
    pooled = np.corrcoef(silent_pred.ravel(), silent_truth.ravel())[0, 1]
    assert pooled > 0.4 and abs(metrics.per_clip_sync(silent_pred, silent_truth)) < 0.15


def test_mouth_darkness_reads_the_mouth_of_the_synthetic_faces():
    video = data.synth_video("val", 1, 4.0, 64)
    dark = metrics.mouth_darkness(video.frames, np.array(video.meta["mouth_box"]))
    assert np.corrcoef(dark, video.meta["openness"])[0, 1] > 0.8  # the check works on real frames


def test_probe_learns_to_read_the_mouth(tmp_path):
    import train
    pools = {}
    for split, n in (("train", 24), ("val", 8)):
        train.build_frame_pool(data.SyntheticVideos(split, n, 1.0, 64), tmp_path / f"{split}.pt")
        pools[split] = data.ClipPool(tmp_path / f"{split}.pt").data
    probe, r = metrics.train_probe(pools["train"], pools["val"], steps=150)  # measured r: 0.947 at 150, 0.949 at 300
    assert r > 0.8  # openness read on identities the probe never saw
    assert probe.features(torch.zeros(2, 3, 32, 32)).shape == (2, 128)  # any frame size is resized to 64


def test_eval_reports_every_figure(tmp_path, diffusion_ckpt, capsys):
    """The whole evaluation on the tiny test checkpoint: every figure present and in its range, JSON and sheet."""
    torch.save(metrics.Probe().state_dict(), tmp_path / "probe.pt")
    result = metrics.main(["eval", "--ckpt", str(diffusion_ckpt), "--probe", str(tmp_path / "probe.pt"), "--videos",
                           "2", "--seconds", "0.4", "--steps", "1", "--json", str(tmp_path / "r.json"),
                           "--sheet", str(tmp_path / "sheet.png")])
    for key in ("sync", "sync_mismatched", "sync_real", "darkness_sync"):
        assert -1 <= result[key] <= 1
    for key in ("fid_probe", "fvd_probe", "efid_probe", "fid_probe_floor", "blob_fraction", "motion_silent",
                "identity_skin_ratio", "blink_rate_ratio", "head_motion_ratio"):
        assert np.isfinite(result[key]) and result[key] >= 0
    assert 0 < result["ssim"] <= 1 and result["frames"] == 10
    out = capsys.readouterr().out
    assert "NOT comparable" in out and "| generated |" in out and "floor" in out
    assert json.loads((tmp_path / "r.json").read_text())["sync"] == result["sync"]
    assert Image.open(tmp_path / "sheet.png").size == (2 * 9 * 32, 2 * 6 * 32)


def test_identity_and_blob_measures_on_real_frames():
    """On real videos the identity ratios are near 0 and no pixel is off the palette; another person's frames
    give ratios near 1 or more and many off-palette pixels."""
    videos = [data.synth_video("test", i, 0.4, 64) for i in range(4)]
    frames, ids = np.stack([v.frames for v in videos]), [v.meta["identity"] for v in videos]
    own = metrics.identity_ratio(frames, ids)
    assert max(own) < 0.05
    swapped = np.roll(frames, 1, axis=0)
    assert min(metrics.identity_ratio(swapped, ids)) > 0.5
    assert metrics.off_palette(frames, frames).max() < 4  # within the palette's quantisation
    assert (metrics.off_palette(swapped, frames) > 30).mean() > 0.05
    # videos that all show one person are still measured against another person, not against themselves
    assert max(metrics.identity_ratio(frames[:1].repeat(2, axis=0), ids[:1] * 2)) < 0.05


def test_standard_extractors_load_from_files(tmp_path):
    """Inception (torchvision's and pytorch-fid's class counts) and TorchScript I3D / expression networks, saved
    randomly initialised in the expected formats and loaded back: no network needed."""
    from torchvision.models import inception_v3
    frames = torch.rand(2, 3, 64, 64) * 2 - 1
    for classes in (1000, 1008):
        torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False, num_classes=classes).state_dict(),
                   tmp_path / "inception.pth")
        assert metrics.load_inception(tmp_path / "inception.pth")(frames).shape == (2, 2048)

    class I3D(torch.nn.Module):  # the call signature of the common i3d_torchscript.pt
        def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                    return_features: bool = False) -> torch.Tensor:
            return x.mean(dim=(2, 3, 4)).repeat(1, 134)[:, :400]
    torch.jit.script(I3D()).save(str(tmp_path / "i3d.pt"))
    i3d = metrics.load_torchscript(tmp_path / "i3d.pt", "--i3d", metrics.I3D_HELP)
    assert metrics.i3d_features(i3d, torch.rand(3, 16, 3, 32, 32)).shape == (3, 400)
    with pytest.raises(data.DataError, match="--i3d"):
        metrics.load_torchscript(tmp_path / "inception.pth", "--i3d", metrics.I3D_HELP)
    with pytest.raises(data.DataError, match="pytorch-fid"):
        metrics.load_inception(tmp_path / "missing.pth")


@pytest.mark.parametrize("argv, message", [
    (["eval", "--inception", "{tmp}/none.pth"], "no such file"),
    (["eval", "--videos", "0"], "--videos: 0: must be at least 1"),
    (["eval", "--seconds", "0.3"], "--seconds: 0.3: must be at least 0.4"),  # FVD needs two 8-frame clips
    (["probe", "--steps", "0"], "--steps: 0: must be at least 1"),
    (["ablation", "--budget-min", "0"], "--budget-min: 0: must be above 0"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        metrics.main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err


def test_ablation_trains_each_scheme_once_and_caches(tmp_path, vae_ckpt, monkeypatch, capsys):
    """Five fusion settings, each trained (a few tiny steps) and evaluated; a second call reuses every result."""
    from conftest import diffusion_args
    recipe = diffusion_args(tmp_path / "unused", vae_ckpt, "--steps", "2")[2:]  # the tiny run, minus --out
    monkeypatch.setattr(metrics, "ABLATION_RECIPE", recipe)
    probe = metrics.Probe().eval()
    kwargs = dict(videos=2, seconds=0.4, steps=1)
    results = metrics.ablation(tmp_path / "abl", 1.0, probe, **kwargs)
    assert list(results) == metrics.ABLATION and len({r["fid_probe"] for r in results.values()}) == 5
    stamps = sorted(p.stat().st_mtime_ns for p in (tmp_path / "abl").glob("*/eval.json"))
    assert len(stamps) == 5
    again = metrics.ablation(tmp_path / "abl", 1.0, probe, **kwargs)
    assert again == results and sorted(p.stat().st_mtime_ns for p in (tmp_path / "abl").glob("*/eval.json")) == stamps
    assert metrics.ablation_table(results).count("\n") == 6
