"""Tests of evaluate.py: the whole evaluation of a checkpoint, its command line, and the fusion ablation."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import metrics
from conftest import diffusion_args


def test_eval_reports_every_figure(tmp_path, diffusion_ckpt, capsys, monkeypatch):
    """The whole evaluation on the tiny test checkpoint: every figure present and in its range, JSON and sheet; and
    no portrait is one of the real frames the generated ones are scored against (SSIM, FID...), as in training."""
    portraits, scored, generate, ssim = [], [], evaluate.generate, evaluate.ssim
    monkeypatch.setattr(evaluate, "generate", lambda *args, **kw: portraits.append(args[3]) or generate(*args, **kw))
    monkeypatch.setattr(evaluate, "ssim", lambda real, fake: scored.append(real) or ssim(real, fake))
    torch.save(metrics.Probe().state_dict(), tmp_path / "probe.pt")
    result = evaluate.main(["eval", "--ckpt", str(diffusion_ckpt), "--probe", str(tmp_path / "probe.pt"), "--videos",
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
    real = (scored[0] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (videos x frames, H, W, 3)
    assert len(real) == 20 and not any(np.array_equal(p, f) for p in portraits[0] for f in real)


@pytest.mark.parametrize("argv, message", [
    (["eval", "--inception", "{tmp}/none.pth"], "no such file"),
    (["eval", "--videos", "0"], "--videos: 0: must be at least 1"),
    (["eval", "--seconds", "0.3"], "--seconds: 0.3: must be at least 0.4"),  # FVD needs two 8-frame clips
    (["probe", "--steps", "0"], "--steps: 0: must be at least 1"),
    (["ablation", "--budget-min", "0"], "--budget-min: 0: must be above 0"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        evaluate.main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err


def test_ablation_trains_each_scheme_once_and_caches(tmp_path, vae_ckpt, monkeypatch, capsys):
    """Five fusion settings, each trained (a few tiny steps) and evaluated; a second call reuses every result."""
    recipe = diffusion_args(tmp_path / "unused", vae_ckpt, "--steps", "2")[2:]  # the tiny run, minus --out
    monkeypatch.setattr(evaluate, "ABLATION_RECIPE", recipe)
    probe = metrics.Probe().eval()
    kwargs = dict(videos=2, seconds=0.4, steps=1)
    results = evaluate.ablation(tmp_path / "abl", 1.0, probe, **kwargs)
    assert list(results) == evaluate.ABLATION and len({r["fid_probe"] for r in results.values()}) == 5
    stamps = sorted(p.stat().st_mtime_ns for p in (tmp_path / "abl").glob("*/eval.json"))
    assert len(stamps) == 5
    again = evaluate.ablation(tmp_path / "abl", 1.0, probe, **kwargs)
    assert again == results and sorted(p.stat().st_mtime_ns for p in (tmp_path / "abl").glob("*/eval.json")) == stamps
    assert evaluate.ablation_table(results).count("\n") == 6
