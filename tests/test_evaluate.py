"""Tests of evaluate.py: the whole evaluation of a checkpoint, its command line, and the fusion ablation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import inception_v3

import evaluate
import metrics
import sample
import train
import world
from audio import audio_features, frame_loudness
from conftest import diffusion_args


def test_eval_reports_every_figure(tmp_path, diffusion_ckpt, capsys, monkeypatch):
    """The whole evaluation on the tiny test checkpoint: every figure present and in its range, JSON and sheet (and
    the --speech recordings left as they were); and no portrait is one of the real frames the generated ones are
    scored against (SSIM, FID...), as in training."""
    speech = [tmp_path / "a.wav", tmp_path / "b.wav"]
    for wav, name in zip(speech, ("flite_awb.wav", "flite_slt.wav")):
        wav.write_bytes((Path("assets/unseen") / name).read_bytes())
    portraits, mels, scored, generate, ssim = [], [], [], evaluate.generate, evaluate.ssim
    monkeypatch.setattr(evaluate, "generate", lambda *args, **kw: portraits.append(args[3]) or mels.append(args[4])
                        or generate(*args, **kw))
    monkeypatch.setattr(evaluate, "ssim", lambda real, fake: scored.append(real) or ssim(real, fake))
    torch.save(metrics.Probe().state_dict(), tmp_path / "probe.pt")
    monkeypatch.setattr(metrics, "RENDER_EVALS", 5)  # the fidelity search itself is tested in test_metrics.py
    result = evaluate.main(["eval", "--ckpt", str(diffusion_ckpt), "--probe", str(tmp_path / "probe.pt"), "--videos",
                           "2", "--seconds", "0.4", "--steps", "1", "--json", str(tmp_path / "r.json"),
                           "--sheet", str(tmp_path / "sheet.png"), "--speech", *map(str, speech)])
    for key in ("sync", "sync_mismatched", "sync_real", "darkness_sync", "unseen_sync", "unseen_sync_mismatched"):
        assert -1 <= result[key] <= 1
    for key in ("fid_probe", "fvd_probe", "efid_probe", "fid_probe_floor", "blob_fraction", "motion_silent",
                "identity_skin_ratio", "head_motion_ratio", "fidelity", "fidelity_vae", "fidelity_real"):
        assert np.isfinite(result[key]) and result[key] >= 0
    assert result["blink_rate_ratio"] is None or 0 <= result["blink_rate_ratio"] < np.inf  # None: no real blink
    assert "blink rate n/a (no blink in the real videos)" in evaluate.report({**result, "blink_rate_ratio": None})
    assert "| 0.11 | 0.22 |" in evaluate.report({**result, "sync": 0.11, "sync_mismatched": 0.22})  # each its column
    assert 0 < result["ssim"] <= 1 and result["frames"] == 10
    matched, mismatched, silent = mels[0].chunk(3)  # each video: its own audio, its own shifted by half, silence
    assert torch.equal(mismatched, matched.roll(5, dims=1)) and not silent.any() and matched.std() > 0
    out = capsys.readouterr().out
    assert "NOT comparable" in out and "| generated |" in out and "floor" in out
    assert "FID and FVD: fewer samples than feature dimensions" in out  # 20 frames, 128 features
    assert "fewer samples" not in evaluate.report({**result, "fid_probe_samples": 1200, "fvd_probe_samples": 300})
    assert json.loads((tmp_path / "r.json").read_text())["sync"] == result["sync"]
    assert [wav.read_bytes() for wav in speech] == [(Path("assets/unseen") / n).read_bytes()
                                                      for n in ("flite_awb.wav", "flite_slt.wav")]
    # test videos 0 and 1 show the same person, drawn once: three rows (reference | real; generated; other audio)
    assert Image.open(tmp_path / "sheet.png").size == (2 * 9 * 32, 2 * 3 * 32)
    assert f"wrote {tmp_path / 'sheet.png'}" in out
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


def test_the_shipped_checkpoint_still_moves_its_lips_with_the_speech():
    """The README's demo, on 2 held-out people (sync 0.94 on 16): the shipped probe's reading of the mouth follows
    the ground truth of the speech, and not that of other words (the truth shifted by half its length). A change
    to the model, the sampler or the audio features that breaks the trained checkpoint fails here."""
    model, vae, diffusion, _ = sample.load_model(sample.DEFAULT_CKPT, "cpu")
    refs, real, wavs, metas = evaluate.eval_videos(2, 1.2, vae.config.resolution, "test", 0)
    mels = torch.stack([audio_features(w, real.shape[1]) for w in wavs])
    opening = metrics.probe_readings(metrics.load_probe(metrics.PROBE), sample.generate(
        model, vae, diffusion, refs, mels, progress=False))[..., 0]
    truth = [np.array(m["openness"]) for m in metas]
    assert metrics.per_clip_sync(opening, truth) > 0.8
    assert metrics.per_clip_sync(opening, [np.roll(t, len(t) // 2) for t in truth]) < 0.4


def test_unseen_speech_scores_each_recording_against_its_own_loudness_and_another_ones(monkeypatch):
    """eval --speech: the shipped model's mouth, animated by a recording, follows that recording's loudness (r 0.92
    measured). The mismatched figure pairs the same videos with the other recording's loudness (r -0.19 here; the
    recording's own, a frame off, gives 0.17)."""
    model, vae, diffusion, _ = sample.load_model(sample.DEFAULT_CKPT, "cpu")
    refs, _, wavs, _ = evaluate.eval_videos(2, 1.2, vae.config.resolution, "test", 0)
    probe, made = metrics.load_probe(metrics.PROBE), []
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: made.append(sample.generate(*a, **k)) or made[-1])
    got = evaluate.unseen_speech(model, vae, diffusion, probe, refs, wavs, 8, "dpm++", 1.0, 0, "cpu")
    assert got["unseen_files"] == 2 and got["unseen_frames"] == 30 and got["unseen_sync"] > 0.8, got
    opening = metrics.probe_readings(probe, made[0])[..., 0]
    loud = np.stack([frame_loudness(evaluate.trim_silence(w), 30) for w in wavs])
    assert got["unseen_sync"] == pytest.approx(metrics.per_clip_sync(opening, loud))
    assert got["unseen_sync_mismatched"] == pytest.approx(metrics.per_clip_sync(opening, loud[::-1]))


def test_diversity_reads_each_kind_of_motion_from_its_own_channels():
    """Readings (N, T, 5): openness, blink, pose dx, dy, roll. Twice the blinks, mouth motion or head motion of the
    real videos is 2x on its own ratio and leaves the others at 1x."""
    rng = np.random.default_rng(0)
    real = rng.normal(0, 1, (3, 20, 5))
    real[..., 1] = 0
    real[:, ::10, 1] = 1  # eyes closed in 2 frames of 20
    fake = real.copy()
    fake[:, 5::10, 1] = 1  # twice as many
    assert evaluate.diversity(fake, real) == {"blink_rate_ratio": 2.0, "mouth_motion_ratio": 1.0,
                                              "head_motion_ratio": 1.0}
    for channels, key in ((0, "mouth_motion_ratio"), (slice(2, None), "head_motion_ratio")):
        fake = real.copy()
        fake[..., channels] *= 2
        got = evaluate.diversity(fake, real)
        assert got.pop(key) == pytest.approx(2.0) and set(got.values()) == {1.0}
    assert evaluate.diversity(real, real * [1, 0, 1, 1, 1])["blink_rate_ratio"] is None  # no real blink: no ratio


def test_trim_silence_keeps_the_frames_within_40_db_of_the_loudest():
    wav = np.zeros(30 * 640, np.float32)
    wav[10 * 640:20 * 640] = 0.5 * np.sin(np.arange(10 * 640) * 0.3)  # silence, 10 frames of tone, silence
    wav[5 * 640:6 * 640] = 0.001  # a breath 54 dB down: cut with the silence
    assert np.array_equal(evaluate.trim_silence(wav), wav[10 * 640:20 * 640])


def test_ablation_trains_each_scheme_once_and_caches(tmp_path, vae_ckpt, monkeypatch, capsys):
    """Five fusion settings, each trained (a few tiny steps) on the device asked for and evaluated; a second call
    reuses every result."""
    recipe = diffusion_args(tmp_path / "unused", vae_ckpt, "--steps", "2")[2:]  # the tiny run, minus --out
    for flag in ("--device", "--vae"):  # and minus what ablation passes
        at = recipe.index(flag)
        recipe = recipe[:at] + recipe[at + 2:]
    monkeypatch.setattr(evaluate, "ABLATION_RECIPE", recipe)
    real, argvs = train.main, []
    monkeypatch.setattr(train, "main", lambda argv: argvs.append(argv) or real(argv))
    monkeypatch.setattr(metrics, "RENDER_EVALS", 5)
    probe = metrics.Probe().eval()
    kwargs = dict(videos=2, seconds=0.4, steps=1)
    results = evaluate.ablation(tmp_path / "abl", 1.0, probe, vae_ckpt, **kwargs)
    assert list(results) == evaluate.ABLATION and len({r["fid_probe"] for r in results.values()}) == 5
    assert len(argvs) == 5 and all(argv[argv.index("--device") + 1] == "cpu" for argv in argvs)
    assert all(argv[argv.index("--vae") + 1] == str(vae_ckpt) for argv in argvs)
    stamps = sorted(p.stat().st_mtime_ns for p in (tmp_path / "abl").glob("*/eval.json"))
    assert len(stamps) == 5
    again = evaluate.ablation(tmp_path / "abl", 1.0, probe, vae_ckpt, **kwargs)
    assert again == results and sorted(p.stat().st_mtime_ns for p in (tmp_path / "abl").glob("*/eval.json")) == stamps
    assert evaluate.ablation_table(results).count("\n") == 6


def test_eval_on_a_prepared_folder_scores_its_held_out_videos(tmp_path, diffusion_ckpt, capsys, monkeypatch):
    """--data DIR: SSIM, FID, FVD and E-FID on the videos VideoFolder holds out, with extractors in each format
    (random weights: the figures are not meaningful, their presence and range are), written to the folder's own
    default results file."""
    monkeypatch.chdir(tmp_path)  # the default results file lies under ./runs/eval
    world.main([str(tmp_path / "real"), "--videos", "2", "--seconds", "1.4", "--size", "32"])
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), tmp_path / "fid.pth")

    class I3D(torch.nn.Module):  # the call signature of the common i3d_torchscript.pt
        def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                    return_features: bool = False) -> torch.Tensor:
            return torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))], dim=1)

    class Expression(torch.nn.Module):  # frames in [0, 1] -> 3 "coefficients"
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))
    torch.jit.script(I3D()).save(str(tmp_path / "i3d.pt"))
    torch.jit.script(Expression()).save(str(tmp_path / "expression.pt"))
    result = evaluate.main(["eval", "--ckpt", str(diffusion_ckpt), "--data", str(tmp_path / "real"), "--seconds",
                            "0.96", "--steps", "1", "--inception", str(tmp_path / "fid.pth"), "--i3d",
                            str(tmp_path / "i3d.pt"), "--expression", str(tmp_path / "expression.pt")])
    assert result["videos"] == 1 and result["frames"] == 24 and -1 <= result["ssim"] <= 1  # the tiny model: noise
    assert all(np.isfinite(result[k]) and result[k] >= 0 for k in ("fid_inception", "fvd_i3d", "efid_expression"))
    written = tmp_path / evaluate.results_path(diffusion_ckpt, "test", tmp_path / "real")
    assert "| generated |" in capsys.readouterr().out and json.loads(written.read_text()) == result
    world.main([str(tmp_path / "big"), "--videos", "2", "--seconds", "1.2", "--size", "64"])
    with pytest.raises(SystemExit) as e:
        evaluate.main(["eval", "--ckpt", str(diffusion_ckpt), "--data", str(tmp_path / "big")])
    assert e.value.code == 2 and "prepare it with --size 32" in capsys.readouterr().err


def test_two_runs_evaluated_by_default_keep_both_results():
    """Every run saves ckpt.pt: the default results file is named after the run's folder, so evaluating two runs
    (EXERCISES.md, exercise 13) does not overwrite the first one's figures."""
    a, b = evaluate.results_path(Path("runs/a/ckpt.pt"), "test"), evaluate.results_path(Path("runs/b/ckpt.pt"), "test")
    assert a != b and a.parent == b.parent == Path("runs/eval")
    assert evaluate.results_path(Path("checkpoints/letstalk-tiny.pt"), "val").name == "letstalk-tiny_val.json"
    # a data folder named like a split, or like another one, has results of its own
    ckpt = Path("checkpoints/letstalk-tiny.pt")
    test, hdtf, other = (evaluate.results_path(ckpt, "test", Path(d)) for d in ("data/test", "a/hdtf", "b/hdtf"))
    assert len({test, hdtf, other, evaluate.results_path(ckpt, "test")}) == 4
    assert hdtf.name.startswith("letstalk-tiny_data-hdtf-") and hdtf.parent == Path("runs/eval")
