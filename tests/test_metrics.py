"""Tests of metrics.py against closed forms and independent implementations."""


import numpy as np
import pytest
import torch

import common
import data
import metrics
import world


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
    frame = world.synth_video("test", 2, 0.04, 32).frames[0]
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


def test_a_frozen_mouth_counts_as_no_sync():
    """A clip whose generated mouth does not move follows none of the speech: it scores 0, it does not vanish from
    the mean (half the clips perfect, half frozen: 0.5, not 1). A clip whose truth does not move is left out."""
    truth = np.random.default_rng(0).uniform(0, 1, (10, 16))
    predicted = truth.copy()
    predicted[5:] = 0.3
    assert metrics.per_clip_sync(predicted, truth) == pytest.approx(0.5)
    assert metrics.per_clip_sync(np.concatenate([truth, truth[:2]]), np.concatenate([truth, np.zeros((2, 16))])) == \
        pytest.approx(1.0)


def test_mouth_darkness_reads_the_mouth_of_the_synthetic_faces():
    video = world.synth_video("val", 1, 4.0, 64)
    dark = metrics.mouth_darkness(video.frames, np.array(video.meta["mouth_box"]))
    assert np.corrcoef(dark, video.meta["openness"])[0, 1] > 0.8  # the check works on real frames


def test_probe_learns_to_read_the_mouth(tmp_path):
    pools = {split: data.build_frame_pool(world.SyntheticVideos(split, n, 1.0, 64), tmp_path / f"{split}.pt")
             for split, n in (("train", 24), ("val", 8))}
    probe, r = metrics.train_probe(pools["train"], pools["val"], steps=100)  # measured r: 0.88 at 100, 0.92 at 150
    assert r > 0.8  # openness read on identities the probe never saw
    assert probe.features(torch.zeros(2, 3, 32, 32)).shape == (2, 128)  # any frame size is resized to 64


def test_identity_and_blob_measures_on_real_frames():
    """On real videos the identity ratios are near 0 and no pixel is off the palette; another person's frames
    give ratios near 1 or more and many off-palette pixels."""
    videos = [world.synth_video("test", i, 0.4, 64) for i in range(4)]
    frames, ids = np.stack([v.frames for v in videos]), [v.meta["identity"] for v in videos]
    own = metrics.identity_ratio(frames, ids)
    assert max(own.values()) < 0.05
    swapped = np.roll(frames, 1, axis=0)
    assert min(metrics.identity_ratio(swapped, ids).values()) > 0.5
    _, skin = metrics.identity_regions(ids, 64)
    repainted = frames.copy()  # only the cheeks in another person's skin: only the skin ratio rises
    for v, (x0, y0, x1, y1) in enumerate(skin.round().astype(int)):
        repainted[v, :, y0:y1, x0:x1] = ids[(v + 2) % 4]["skin"]  # (videos 0 and 1 show one person)
    got = metrics.identity_ratio(repainted, ids)
    assert got["skin"] > 0.5 and got["background"] < 0.05
    assert metrics.off_palette(frames, frames).max() < 4  # within the palette's quantisation
    assert (metrics.off_palette(swapped, frames) > 30).mean() > 0.05
    # videos that all show one person are still measured against another person, not against themselves
    assert max(metrics.identity_ratio(frames[:1].repeat(2, axis=0), ids[:1] * 2).values()) < 0.05


def test_standard_extractors_load_from_files(tmp_path):
    """Inception (torchvision's and pytorch-fid's class counts) and TorchScript I3D / expression networks, saved
    randomly initialised in the expected formats and loaded back: no network needed."""
    from torchvision.models import inception_v3
    frames = torch.rand(2, 3, 64, 64) * 2 - 1
    for classes in (1000, 1008):
        torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False, num_classes=classes).state_dict(),
                   tmp_path / "inception.pth")
        assert metrics.load_inception(tmp_path / "inception.pth")(frames).shape == (2, 2048)
    # torchvision's inception_v3_google weights (1000 classes) run as its pretrained builder sets them up:
    # transform_input=True, fed ImageNet-normalised input. Our frames in [-1, 1] must give the same features.
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), tmp_path / "google.pth")
    reference = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=True)
    reference.load_state_dict({k: v for k, v in torch.load(tmp_path / "google.pth").items() if "AuxLogits" not in k})
    reference.fc = torch.nn.Identity()
    x = (torch.nn.functional.interpolate(frames, size=(299, 299), mode="bilinear", align_corners=False) + 1) / 2
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])  # ImageNet's
    with torch.no_grad():
        want = reference.eval()((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    got = metrics.load_inception(tmp_path / "google.pth")(frames)
    assert (got - want).abs().max() < 1e-3 * want.abs().max()  # relative: untrained features are tiny (~1e-7)

    class I3D(torch.nn.Module):  # the call signature of the common i3d_torchscript.pt
        def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                    return_features: bool = False) -> torch.Tensor:
            return x.mean(dim=(2, 3, 4)).repeat(1, 134)[:, :400]
    torch.jit.script(I3D()).save(str(tmp_path / "i3d.pt"))
    i3d = metrics.load_torchscript(tmp_path / "i3d.pt", "--i3d", metrics.I3D_HELP)
    assert metrics.i3d_features(i3d, torch.rand(3, 16, 3, 32, 32)).shape == (3, 400)
    with pytest.raises(common.UserError, match="--i3d"):
        metrics.load_torchscript(tmp_path / "inception.pth", "--i3d", metrics.I3D_HELP)
    with pytest.raises(common.UserError, match="pytorch-fid"):
        metrics.load_inception(tmp_path / "missing.pth")


def test_rerender_fidelity_is_high_for_drawings_of_the_person_and_low_otherwise():
    """A frame the renderer drew scores far above the 30 dB of the same frame under noise of std 8, and against
    someone else's drawings it scores below both: the search finds the mouth, eyes and pose, not another face."""
    video = world.synth_video("test", 0, 0.4, 64)
    person = world.Identity.from_meta(video.meta["identity"])
    other = world.identity(person.id + 1)
    probe = metrics.load_probe(metrics.PROBE)
    frame = video.frames[5:6]
    noisy = np.clip(frame + np.random.default_rng(0).normal(0, 8, frame.shape), 0, 255).astype(np.uint8)
    clean, noise, wrong = (metrics.fidelity(probe, f[None], [p]) for f, p in ((frame, person), (noisy, person),
                                                                              (frame, other)))
    assert clean > 35 and 28 < noise < 31 and wrong < 22, (clean, noise, wrong)


def test_border_jump_is_the_change_across_window_borders_over_the_change_inside():
    t = np.arange(24, dtype=np.float32)
    smooth = np.broadcast_to((2 * t)[None, :, None, None, None], (2, 24, 4, 4, 3)).astype(np.uint8)
    assert metrics.border_jump(smooth, 8) == pytest.approx(1.0)  # a steady ramp: no seam, whatever the window
    stepped = (2 * t + 12 * (t // 8))[None, :, None, None, None]  # each window starts 12 higher: 14 at its border
    videos = np.broadcast_to(stepped, (2, 24, 4, 4, 3)).astype(np.uint8)
    assert metrics.border_jump(videos, 8) == pytest.approx(7.0)
    assert metrics.border_jump(videos, 6) == pytest.approx(2 / ((18 * 2 + 2 * 14) / 20))  # the jumps fall inside


def test_frame_change_measures_change_between_frames_not_within_them():
    still = np.random.default_rng(0).integers(0, 256, (1, 1, 8, 8, 3), dtype=np.uint8).repeat(4, axis=1)
    assert metrics.frame_change(still) == 0  # detailed, but never changing
    flicker = np.zeros((1, 4, 8, 8, 3), np.uint8)
    flicker[:, 1::2] = 255  # black, white, black, white
    assert metrics.frame_change(flicker) == 1


def test_the_probe_learns_pose_in_units_of_pose_scale():
    got = metrics.Probe.targets(torch.tensor([0.3]), torch.tensor([1.0]), torch.tensor([metrics.POSE_SCALE]))
    assert torch.allclose(got, torch.tensor([[0.3, 1.0, 1.0, 1.0, 1.0]]))
