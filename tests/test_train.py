"""Tests of train.py: learning, the diffusion stage, resume, DDP and failure handling."""

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import config
import data
import letstalk as L
import metrics
import sample
import train
import world
from conftest import diffusion_args
from kernels import MAX_LENGTH
from diffusion import Diffusion
from common import to_tensor
from vae import load_vae


def test_overfitting_one_synthetic_batch():
    torch.manual_seed(0)
    frames = common.to_tensor(world.synth_video("train", 0, 0.5, 32).frames[:8])  # one clip of 8 frames
    latents = torch.nn.functional.avg_pool2d(frames, 4)[None].repeat(4, 1, 1, 1, 1) * 2  # 4x4 pooling as a VAE
    model = L.LetsTalk(L.config_for("T", latent_size=8, latent_channels=3, frames=8, motion=0))
    d, opt = Diffusion(), torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ref, mel = latents[:, 0], torch.randn(4, 8, 20, 80)
    t_eval, noise_eval = torch.tensor([100, 300, 500, 700]), torch.randn(latents.shape, generator=torch.Generator())

    def eval_loss():
        with torch.no_grad():
            return (model(d.q_sample(latents, t_eval, noise_eval), t_eval, ref, mel) - noise_eval).pow(2).mean()
    before = eval_loss()
    for _ in range(40):  # measured eval loss / before: 0.13 after 40 steps, 0.09 after 80 (the bound is 0.3)
        t, noise = torch.randint(0, 1000, (4,)), torch.randn_like(latents)
        loss = (model(d.q_sample(latents, t, noise), t, ref, mel) - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.3 * before


def test_diffusion_resumes_exactly_and_stops_on_a_time_budget(tmp_path, vae_ckpt):
    train.main(diffusion_args(tmp_path / "straight", vae_ckpt, "--steps", "6"))
    train.main(diffusion_args(tmp_path / "pieces", vae_ckpt, "--steps", "3"))
    with open(tmp_path / "pieces" / "log.jsonl", "a") as log:  # killed after logging step 4, before saving it
        log.write(json.dumps({"step": 4, "loss": 1.0}) + "\n")
    train.main(["--out", str(tmp_path / "pieces"), "--steps", "6", "--resume"])
    steps = [json.loads(line).get("step") for line in (tmp_path / "pieces" / "log.jsonl").read_text().splitlines()]
    assert [s for s in steps if s is not None] == [1, 2, 3, 4, 5, 6]  # logged once each, across the resume
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "pieces" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for key in a["model"]["weights"]:
        assert torch.allclose(a["model"]["weights"][key], b["model"]["weights"][key], atol=1e-6), key
        assert torch.allclose(a["ema"][key], b["ema"][key], atol=1e-6), key
    for key, state in a["optimizer"]["state"].items():
        assert torch.allclose(state["exp_avg"], b["optimizer"]["state"][key]["exp_avg"], atol=1e-7)
    assert sorted(p.name for p in (tmp_path / "straight" / "samples").iterdir()) == ["step0000003.png",
                                                                                    "step0000006.png"]
    result = train.main(diffusion_args(tmp_path / "budget", vae_ckpt, "--max-minutes", "0"))
    assert result["step"] == 0
    assert train.main(["--out", str(tmp_path / "budget"), "--steps", "2", "--resume"])["step"] == 2


def torchrun(out, vae_ckpt, *extra, port=29533):
    """train.py under torchrun with 2 CPU processes (gloo), the tiny diffusion run's settings plus `extra`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(train.__file__).parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           train.__file__, *diffusion_args(out, vae_ckpt, *extra)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_ddp_two_processes_stay_in_sync_and_resume_exactly(tmp_path, vae_ckpt):
    """Two ranks encode a video each (together, what one process encodes), keep identical weights, draw different
    clips and noise, count the clips both drew, and a run resumed at step 2 ends where an uninterrupted one does:
    every rank's random state is saved and restored, not only rank 0's."""
    cache = tmp_path / "cache"  # a cache of its own, so the ranks encode
    torchrun(tmp_path / "straight", vae_ckpt, "--steps", "3", "--cache", str(cache))
    torchrun(tmp_path / "pieces", vae_ckpt, "--steps", "2", "--cache", str(cache))
    torchrun(tmp_path / "pieces", vae_ckpt, "--steps", "3", "--resume", "--cache", str(cache))
    (latents,), (folder,) = cache.glob("latents_*"), cache.glob("synthetic_*")
    videos = data.VideoFolder(folder)
    assert data.encode_videos(videos, load_vae(vae_ckpt), tmp_path / "one", "cpu") == 2
    for name in (f.name for f in videos.folders):
        a, b = torch.load(latents / f"{name}.pt"), torch.load(tmp_path / "one" / f"{name}.pt")
        # equal but for fp16 rounding: a rank's one thread and this process's threads may sum in another order
        assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-2) for k in a)
    sampler = data.ClipSampler(data.VideoCache(latents, [videos.folders[0].name]), frames=4, motion=2)
    drawn = {(v, s) for rank in (0, 1) for v, s, _ in zip(*sampler.draws(0, rank, 2))}
    assert json.loads((tmp_path / "straight" / "log.jsonl").read_text().splitlines()[0])["clips_seen"] == len(drawn)
    assert [p.name for p in (tmp_path / "straight").glob("*.pt")] == ["ckpt.pt"]
    a, b = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True) for run in ("straight", "pieces"))
    assert a["step"] == b["step"] == 3
    assert a["rng"].shape[0] == 2 and not torch.equal(a["rng"][0], a["rng"][1])  # one state per rank, each its own
    for key in a["model"]["weights"]:
        assert torch.allclose(a["model"]["weights"][key], b["model"]["weights"][key], atol=1e-6), key
    for run in ("straight", "pieces"):
        final = [line for line in (tmp_path / run / "log.jsonl").read_text().splitlines() if '"final"' in line]
        assert '"rank_param_spread": 0.0' in final[-1]  # rank 1 holds exactly rank 0's parameters


def test_a_gpu_run_resumes_from_a_checkpoint_read_on_the_cpu(tmp_path, vae_ckpt, monkeypatch):
    """--resume --device cuda used to load the checkpoint onto the GPU, where torch.set_rng_state (CPU tensors
    only) raised: every GPU resume crashed. No GPU here: the run is told cuda exists and builds its stage on the
    CPU; the checkpoint must be read on the CPU, as on a GPU machine."""
    train.main(diffusion_args(tmp_path / "run", vae_ckpt, "--steps", "1"))
    monkeypatch.setattr(config, "check_device", lambda name: torch.device(name))
    build = train.DiffusionStage
    monkeypatch.setattr(train, "DiffusionStage", lambda cfg, device, resume: build(cfg, torch.device("cpu"), resume))
    # sdpa and no compiling, not the GPU's defaults for a run that continues there: the Triton kernel would run in its
    # slow CPU interpreter here (tests/test_kernels.py checks it), and compiling would take half a minute
    argv = ["--out", str(tmp_path / "run"), "--resume", "--device", "cuda", "--steps", "2", "--temporal-kernel", "sdpa",
            "--no-compile"]
    assert train.main(argv)["step"] == 2


def test_ddp_vae_stage_stays_in_sync(tmp_path):
    """The VAE stage under torchrun too: ranks see different frames, DDP averages their gradients."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(train.__file__).parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29534",
           train.__file__, "--stage", "vae", "--out", str(tmp_path / "vae"), "--cache", str(tmp_path / "cache"),
           "--videos", "2", "--resolution", "32", "--vae-width", "8", "--batch-size", "4", "--steps", "3",
           "--device", "cpu"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    final = [line for line in (tmp_path / "vae" / "log.jsonl").read_text().splitlines() if '"final"' in line]
    assert '"rank_param_spread": 0.0' in final[0]


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, vae_ckpt, monkeypatch):
    out = tmp_path / "run"
    train.main(diffusion_args(out, vae_ckpt, "--steps", "1"))
    before = (out / "ckpt.pt").read_bytes()

    def crash(obj, f, *args, **kwargs):  # f: the open temporary file (common.save_torch)
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed while saving")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(SystemExit) as e:  # Ctrl-C: one line, exit 130
        train.main(["--out", str(out), "--steps", "2", "--resume"])
    assert e.value.code == common.INTERRUPTED
    assert (out / "ckpt.pt").read_bytes() == before
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 1
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("bad", [float("nan"), 1e22])
def test_a_diverged_loss_stops_and_names_the_safe_checkpoint(bad, tmp_path, vae_ckpt, monkeypatch, capsys):
    out = tmp_path / "run"
    train.main(diffusion_args(out, vae_ckpt, "--steps", "1", "--save-minutes", "1e-9"))  # a checkpoint every step
    loss = train.DiffusionStage.loss
    monkeypatch.setattr(train.DiffusionStage, "loss", lambda self, i: (loss(self, i)[0] * bad, {}) if i >= 2 else
                        loss(self, i))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(out), "--steps", "4", "--resume"])
    err = capsys.readouterr().err.splitlines()[-1]
    assert e.value.code == 2 and "training diverged" in err and f"{out / 'ckpt.pt'}, step 2) was written" in err
    assert f"new run with a lower --lr than 0.0003 (--init {out / 'ckpt.pt'} starts" in err  # a resume keeps --lr
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
    with pytest.raises(SystemExit) as e:  # a new run that diverges before its first checkpoint
        train.main(diffusion_args(tmp_path / "new", vae_ckpt, "--steps", "4"))
    assert e.value.code == 2 and "no checkpoint was written" in capsys.readouterr().err
    assert not (tmp_path / "new" / "ckpt.pt").exists()


def test_non_finite_weights_are_never_saved(tmp_path, vae_ckpt, monkeypatch, capsys):
    out = tmp_path / "run"
    train.main(diffusion_args(out, vae_ckpt, "--steps", "1"))
    before = (out / "ckpt.pt").read_bytes()
    monkeypatch.setattr(train.DiffusionStage, "after_step", lambda self, step: next(self.model.parameters())
                        .data.fill_(float("inf")))
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(out), "--steps", "2", "--resume"])
    assert e.value.code == 2 and "weights are not finite" in capsys.readouterr().err
    assert (out / "ckpt.pt").read_bytes() == before


def test_user_errors_exit_2(tmp_path, vae_ckpt, capsys):
    cases = [(["--size", "B", "--device", "cpu", "--out", str(tmp_path / "b")], "needs a GPU"),
             (["--temporal-kernel", "triton", "--device", "cpu", "--out", str(tmp_path / "k")], "a GPU kernel"),
             (["--vae", str(tmp_path / "none.pt"), "--out", str(tmp_path / "v"), "--device", "cpu"], "--stage vae"),
             (["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "m")], "not a folder"),
             (["--resume", "--out", str(tmp_path / "nothing")], "nothing to resume"),
             (["--device", "tpu7", "--out", str(tmp_path / "t")], "not a device"),
             (["--resume", "--out", str(tmp_path / "run"), "--size", "S", "--lr", "1", "--frames", "4"],
              "--lr, --size: a resumed run"),  # --frames 4 is the run's own: repeating a setting is fine
             (["--resume", "--out", str(tmp_path / "run"), "--device", "tpu7"], "not a device"),
             (["--resume", "--out", str(tmp_path / "run"), "--temporal-kernel", "triton"], "a GPU kernel"),
             # numbers out of range stop at the command line, not minutes later in the data or the first step
             # (a run that would start if a check were missing is kept short: the test then fails, not hangs)
             (["--batch-size", "0", "--out", str(tmp_path / "z")], "--batch-size: 0: must be at least 1"),
             (["--drop-audio", "1.5", "--out", str(tmp_path / "z")], "must be at least 0 and at most 1"),
             (["--lr", "0", "--out", str(tmp_path / "z")], "--lr: 0: must be above 0"),
             (["--resume", "--out", str(tmp_path / "run"), "--steps", "-3"], "--steps: -3: must be at least 1"),
             (["--stage", "vae", "--resolution", "60", "--videos", "2", "--steps", "1", "--out",
              str(tmp_path / "z")], "a multiple of 8"),
             (["--stage", "vae", "--vae-width", "6", "--videos", "2", "--steps", "1", "--out",
              str(tmp_path / "z")], "a multiple of 4"),
             # a setting of the other stage would be silently ignored: it is refused
             (["--stage", "vae", "--size", "T", "--prediction", "v", "--out", str(tmp_path / "z")],
              "--size, --prediction: not a setting of the vae stage; --stage diffusion takes them"),
             (["--vae-width", "16", "--out", str(tmp_path / "z")],
              "--vae-width: not a setting of the diffusion stage; --stage vae takes it")]
    train.main(diffusion_args(tmp_path / "run", vae_ckpt, "--steps", "1"))
    capsys.readouterr()
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "z").exists()


def test_warmup_0_starts_at_the_full_learning_rate(tmp_path, vae_ckpt):
    train.main(diffusion_args(tmp_path / "run", vae_ckpt, "--steps", "1", "--warmup", "0", "--lr", "0.001"))
    first = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["lr"] == 0.001 and math.isfinite(first["loss"])


def _vae_run(out, *extra):
    """A tiny VAE run (its log's step lines, its stage): the cheapest way through train.train's loop."""
    stages, loss = [], train.VAEStage.loss
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.VAEStage, "loss", lambda self, i: stages.append(self) or loss(self, i))
        train.main(["--stage", "vae", "--out", str(out), "--cache", str(out.parent / "cache"), "--videos", "2",
                    "--resolution", "32", "--vae-width", "8", "--device", "cpu", "--eval-every", "100", *extra])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in log if "final" not in r], stages[0]


def test_the_learning_rate_warms_up_and_cools_down_and_accumulation_averages(tmp_path):
    """--warmup 2 --cooldown 2 over 5 steps: lr/2, lr, lr, lr, lr/2. Two micro-batches of 2 accumulate the gradient
    of one batch of 4 (the same frames: consecutive slices of one permutation), its mean, not its sum."""
    log, stage = _vae_run(tmp_path / "a", "--batch-size", "4", "--steps", "5", "--warmup", "2", "--cooldown", "2",
                          "--lr", "0.001")
    assert [r["lr"] for r in log] == [0.0005, 0.001, 0.001, 0.001, 0.0005]
    accumulated, _ = _vae_run(tmp_path / "b", "--batch-size", "2", "--accum", "2", "--steps", "1", "--lr", "0.001")
    assert accumulated[0]["grad_norm"] == pytest.approx(log[0]["grad_norm"], rel=1e-4)
    assert accumulated[0]["loss"] == pytest.approx(log[0]["loss"], rel=1e-4)
    # the checkpoint's latent_scale makes the latents of the training frames unit-variance, as the noise schedule
    # assumes
    with torch.no_grad():
        z = stage.model.encode(to_tensor(stage.frames(stage.train, 512))) * stage.model.latent_scale
    assert z.std().item() == pytest.approx(1.0, abs=1e-3)


@pytest.fixture(scope="module")
def stage(tmp_path_factory, vae_ckpt):
    """The DiffusionStage of a one-step tiny run, as train.train builds it (tests restore what they change)."""
    stages, loss = [], train.DiffusionStage.loss
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.DiffusionStage, "loss", lambda self, i: stages.append(self) or loss(self, i))
        train.main(diffusion_args(tmp_path_factory.mktemp("stage") / "run", vae_ckpt, "--steps", "1"))
    return stages[0]


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_the_loss_is_eq3_on_the_target_the_model_predicts(stage, prediction):
    """L_simple: the mean squared error between the model's output on x_t and the target of its prediction, the
    noise (Eq. 3), v or x0, each recovered here from the x_t the model saw and the clean clip of the step."""
    cfg, diffusion = stage.cfg, stage.diffusion
    seen = []
    hook = stage.model.register_forward_hook(lambda module, args, out: seen.append((args, out)))
    try:
        stage.cfg = replace(cfg, mouth_weight=1.0, motion_weight=1.0, min_snr_gamma=None)
        stage.diffusion = Diffusion(schedule=cfg.schedule, prediction=prediction)
        with torch.no_grad():
            loss, _ = stage.loss(7)
    finally:
        stage.cfg, stage.diffusion = cfg, diffusion
        hook.remove()
    ((x_t, t, *_), out), = seen
    x0 = stage.sampler.batch(7, 0, cfg.batch_size)["latents"]
    ab = diffusion.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    noise = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
    want = (out - Diffusion(schedule=cfg.schedule, prediction=prediction).target(x0, noise, t)).pow(2).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)


def test_each_condition_is_dropped_at_its_own_rate_and_never_in_evaluation(stage):
    cfg = stage.cfg
    batch = stage.sampler.batch(0, 0, cfg.batch_size)
    stage.cfg = replace(cfg, drop_ref=0.2, drop_audio=0.5, drop_motion=0.8)
    try:
        drops = [stage.conditions(batch, train=True)[4] for _ in range(300)]
    finally:
        stage.cfg = cfg
    for key, rate in (("ref", 0.2), ("audio", 0.5), ("motion", 0.8)):
        got = torch.cat([d[f"drop_{key}"] for d in drops]).float().mean().item()
        assert abs(got - rate) < 0.07, key  # 600 draws: 3 standard deviations at most
    _, ref, _, _, drops = stage.conditions(batch, train=False)
    assert set(drops.values()) == {None} and torch.equal(ref, batch["ref"])  # nor any noise on the portrait


def test_each_validation_clip_is_drawn_beside_the_portrait_its_reference_latent_encodes(stage):
    """The sample grids and the lip-sync figures start each validation clip from val_portraits: the frame whose
    cached latent is the clip's reference (each held-out video is decoded once for all of its clips)."""
    assert len({tuple(r.flatten()[:4].tolist()) for r in stage.val["ref"]}) > 1  # clips of different frames
    with torch.no_grad():
        latents = stage.vae.encode(to_tensor(stage.val_portraits)) * stage.vae.latent_scale
    assert torch.allclose(latents, stage.val["ref"], atol=1e-2)  # (cached in fp16)


def test_the_ema_follows_the_weights_with_a_warm_up():
    """ema <- d ema + (1 - d) weights after each step, d = min(decay, (1 + step) / (10 + step))."""
    for step, d in ((0, 0.1), (5, 0.4), (10 ** 6, 0.999)):
        model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
        before = [p.detach().clone() for p in ema.parameters()]
        train.DiffusionStage.after_step(SimpleNamespace(cfg=SimpleNamespace(ema=0.999), model=model, ema=ema), step)
        for e, b, p in zip(ema.parameters(), before, model.parameters()):
            assert torch.allclose(e, d * b + (1 - d) * p, atol=1e-6)


def test_batches_are_consecutive_slices_of_one_permutation_per_epoch():
    """Every frame once per epoch, also when a batch spans two epochs (steps 0-4 of 4 out of 10 frames)."""
    drawn = [i for step in range(5) for i in train.batch_indices(step, 4, 10, seed=0)]
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:]) == list(range(10))
    assert drawn[:10] != drawn[10:]  # each epoch its own order


def test_a_zero_mouth_weight_stays_zero_the_cooldown_may_change_and_triton_takes_128_frames(vae_ckpt):
    """Defaults fill in only what was not given (0 is given); --cooldown is a resumable setting; the kernel holds
    sequences of up to MAX_LENGTH frames, motion frames included."""
    cfg = config.new_config({"vae": str(vae_ckpt), "mouth_weight": 0.0, "device": "cpu"})
    assert cfg.size == "T" and cfg.mouth_weight == 0.0
    assert config.resumed_config(asdict(cfg), {"cooldown": 50}, "run").cooldown == 50
    for frames, kernel in ((MAX_LENGTH - 2, "triton"), (MAX_LENGTH - 1, "sdpa")):
        cfg = config.TrainConfig(frames=frames, motion=2)
        config.device_defaults(cfg, gpu=True)
        assert cfg.temporal_kernel == kernel


def test_a_decoder_fine_tune_defaults_to_a_fifth_of_the_learning_rate(vae_ckpt):
    assert config.new_config({"stage": "vae", "device": "cpu"}).lr == 5e-4
    assert config.new_config({"stage": "vae", "init": str(vae_ckpt), "device": "cpu"}).lr == 1e-4


def test_a_new_run_saves_its_paths_in_full_and_export_writes_only_its_file(tmp_path, vae_ckpt, diffusion_ckpt,
                                                                           monkeypatch, capsys):
    """Resumed or exported from another folder, a run names the files it was started with: a relative --cache
    read from there would render and encode its videos again, unannounced."""
    monkeypatch.chdir(vae_ckpt.parent)
    cfg = config.new_config({"vae": "ckpt.pt", "cache": "c", "data": ".", "device": "cpu"})
    assert (cfg.vae, cfg.cache, cfg.data) == (str(vae_ckpt.resolve()), str(vae_ckpt.parent.resolve() / "c"),
                                              str(vae_ckpt.parent.resolve()))
    assert config.new_config({"stage": "vae", "device": "cpu"}).data == "synthetic"
    monkeypatch.chdir(tmp_path)
    train.main(["--out", str(diffusion_ckpt.parent), "--export", "model.pt"])
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"] and "wrote model.pt" in capsys.readouterr().out


def test_cuda_defaults_are_the_papers_and_fit_an_80gb_gpu(tmp_path, vae_ckpt, monkeypatch):
    # no GPU here: the device check reports one, and train() hands back the settings instead of training
    monkeypatch.setattr(config, "check_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(train, "train", lambda cfg, **kw: cfg)
    for size, batch in (("S", 16), ("B", 8), ("L", 4)):
        cfg = train.main(["--size", size, "--vae", str(vae_ckpt), "--out", str(tmp_path / size), "--device", "cuda"])
        assert (cfg.frames, cfg.batch_size, cfg.lr, cfg.compile, cfg.temporal_kernel) == (16, batch, 1e-4, True,
                                                                                          "triton")
        assert (cfg.prediction, cfg.mouth_weight) == ("eps", 1.0)  # the paper's loss (size T on a CPU: x0, x5)
    cfg = train.main(["--stage", "vae", "--out", str(tmp_path / "vae"), "--device", "cuda"])
    assert (cfg.resolution, cfg.factor) == (256, 8)


def test_the_cpu_demo_defaults_to_the_recipe_that_learns_lip_sync_in_minutes(tmp_path, vae_ckpt, monkeypatch):
    monkeypatch.setattr(train, "train", lambda cfg, **kw: cfg)
    cfg = train.main(["--vae", str(vae_ckpt), "--out", str(tmp_path / "t"), "--device", "cpu"])
    assert (cfg.size, cfg.prediction, cfg.mouth_weight, cfg.temporal_kernel) == ("T", "x0", 5.0, "sdpa")
    cfg = train.main(["--vae", str(vae_ckpt), "--out", str(tmp_path / "e"), "--prediction", "eps", "--mouth-weight",
                      "1"])
    assert (cfg.prediction, cfg.mouth_weight) == ("eps", 1.0)  # what the command line gives wins


def test_a_gpu_run_continues_on_a_cpu_with_the_cpus_kernel_and_no_compiling(tmp_path, vae_ckpt, monkeypatch):
    monkeypatch.setattr(train, "train", lambda cfg, **kw: cfg)
    saved = asdict(train.main(diffusion_args(tmp_path / "run", vae_ckpt)))
    saved.update(device="cuda", temporal_kernel="triton", compile=True)  # as a GPU run saves it
    cfg = config.resumed_config(saved, {"device": "cpu"}, tmp_path / "run")
    assert (cfg.temporal_kernel, cfg.compile) == ("sdpa", False)  # not minutes of compiling on a CPU
    assert config.resumed_config(saved, {"device": "cpu", "compile": True}, tmp_path / "run").compile  # if asked
    del saved["temporal_kernel"]  # a checkpoint from before the setting existed
    assert config.resumed_config(saved, {"device": "cpu"}, tmp_path / "run").temporal_kernel == "sdpa"
    # on the same kind of device the run keeps what it was started with: --no-compile stays
    gpu_run = {**saved, "compile": False, "temporal_kernel": "sdpa"}
    monkeypatch.setattr(config, "check_device", lambda name: torch.device(name))  # this machine has no GPU
    cfg = config.resumed_config(gpu_run, {}, tmp_path / "run")
    assert (cfg.compile, cfg.temporal_kernel) == (False, "sdpa")


def test_settings_that_would_silently_not_apply_are_refused(tmp_path):
    vae_run = asdict(config.resolve(config.TrainConfig(stage="vae", device="cpu")))
    with pytest.raises(common.UserError, match="--blink-repeat: not a setting of the vae stage"):
        config.resumed_config(vae_run, {"blink_repeat": 5}, tmp_path / "run")  # resumable, but not the VAE's
    with pytest.raises(common.UserError, match="--videos: how many synthetic videos"):
        config.new_config({"data": str(tmp_path), "videos": 40})
    # the Triton kernel holds a whole sequence in one program: longer clips get SDPA by default, and are refused it
    # when asked for
    clip = config.TrainConfig(frames=120, motion=16)
    config.device_defaults(clip, gpu=True)
    assert clip.temporal_kernel == "sdpa" and clip.compile
    with pytest.raises(common.UserError, match="at most 128 frames"):
        config.device_defaults(config.TrainConfig(frames=120, motion=16, temporal_kernel="triton"), gpu=True)


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--stage", "--size", "--max-minutes", "--resume", "--prediction", "--min-snr-gamma", "--cache",
                 "--mouth-weight", "--drop-audio", "--accum", "--compile"):
        assert flag in text


def test_region_weights_cover_the_mouth_box():
    boxes = torch.tensor([[[8.0, 16.0, 24.0, 24.0]]])  # x0, y0, x1, y1 in pixels of a 32x32 frame
    w = train.loss_region(boxes, 32, 8, 5.0, (1, 1, 4, 8, 8))
    inside = w[0, 0, 0] == 5.0
    assert inside.sum() == 4 * 2 and inside[4:6, 2:6].all()  # latent rows 4-5, columns 2-5
    lower_face = train.loss_region(None, 32, 8, 3.0, (1, 1, 4, 8, 8))[0, 0, 0]
    assert lower_face[:4].eq(1).all() and lower_face[5:7, 2:6].eq(3).all()


def test_motion_weights_follow_what_moves_in_each_clip():
    x0 = torch.randn(2, 1, 4, 8, 8).repeat(1, 6, 1, 1, 1)  # two still clips of 6 frames
    x0[0, ::2, :, 3, 5] += 2.0  # clip 0: one latent pixel flickers
    w = train.motion_region(x0, 4.0)
    assert w.shape == (2, 6, 1, 8, 8)
    assert torch.allclose(w.mean(), torch.tensor(4.0))  # mean W over the batch
    moving = torch.zeros(8, 8, dtype=torch.bool)
    moving[3, 5] = True
    assert w[0, :, 0][:, moving].gt(100).all()
    assert torch.allclose(w[0, :, 0][:, ~moving], torch.tensor(1.0), atol=1e-3)  # still: 1 (up to rounding)
    assert torch.allclose(w[1], torch.tensor(1.0), atol=1e-3)


def test_blink_repeat_draws_the_clips_with_a_blink_more_often(tmp_path, vae_ckpt, monkeypatch):
    stages, loss = [], train.DiffusionStage.loss
    monkeypatch.setattr(train.DiffusionStage, "loss", lambda self, i: stages.append(self) or loss(self, i))
    train.main(diffusion_args(tmp_path / "a", vae_ckpt, "--steps", "1", "--blink-repeat", "3"))
    sampler = stages[0].sampler
    weight = np.diff(sampler.cumulative, prepend=0)  # of each (video, start) of the training videos
    entry = sampler.cache.entries[0]
    blinks = (entry["blink"] > 0.5).numpy()
    for start in range(2, sampler.cache.lengths[0] - 3):  # a 4-frame clip after 2 motion frames
        assert weight[start] == (3 if blinks[start:start + 4].any() else 1)
    assert 0 < (weight == 3).sum() < (weight > 0).sum()


def test_latents_are_encoded_once_and_reused(tmp_path, vae_ckpt):
    cache = vae_ckpt.parent.parent / "cache"
    train.main(diffusion_args(tmp_path / "a", vae_ckpt, "--steps", "1"))
    stamp = {p: p.stat().st_mtime_ns for p in cache.rglob("*.pt")}
    assert any(p.parent.name.startswith("latents_") for p in stamp)
    train.main(diffusion_args(tmp_path / "b", vae_ckpt, "--steps", "1"))
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.pt")} == stamp


def test_export_writes_what_sample_needs(tmp_path, diffusion_ckpt, capsys):
    """--export: the EMA weights, VAE and diffusion settings in fp16, and the VAE's worst PSNR on training frames,
    which sample.load_model reads back."""
    train.main(["--out", str(diffusion_ckpt.parent), "--export", str(tmp_path / "model.pt")])
    assert "wrote" in capsys.readouterr().out
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    assert {v.dtype for v in exported["ema"].values() if v.is_floating_point()} == {torch.float16}
    model, vae, diffusion, domain = sample.load_model(tmp_path / "model.pt", "cpu")
    assert diffusion.config() == exported["diffusion"] and 0 < domain["vae_min_psnr"] < 100
    run = torch.load(diffusion_ckpt, weights_only=True)
    assert all(torch.allclose(p.float(), run["ema"][k], atol=1e-2) for k, p in model.state_dict().items()
               if k in run["ema"])
    assert all(torch.equal(exported["ema"][k], v.half()) for k, v in run["ema"].items())  # the EMA, not the weights
    assert not all(torch.equal(run["ema"][k], v) for k, v in run["model"]["weights"].items())


def test_init_fine_tunes_a_checkpoint_only_on_its_own_vae_and_shape(tmp_path, diffusion_ckpt, capsys):
    """--init: the run starts from an export's EMA weights, with the export's VAE unless --vae names the same one;
    another shape, prediction or VAE is refused before any work."""
    export = tmp_path / "model.pt"
    train.main(["--out", str(diffusion_ckpt.parent), "--export", str(export)])
    cache = str(diffusion_ckpt.parent.parent / "cache")
    small = ["--cache", cache, "--size", "T", "--frames", "4", "--videos", "2", "--device", "cpu",
             "--init", str(export)]
    train.main(["--out", str(tmp_path / "ft"), *small, "--max-minutes", "0"])  # its own VAE: no --vae
    saved = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)
    wanted = torch.load(export, weights_only=True)["ema"]
    for weights in (saved["ema"], saved["model"]["weights"]):
        assert all(torch.equal(weights[k], v.float()) for k, v in wanted.items())
    other_vae = torch.load(diffusion_ckpt.parent.parent / "vae" / "ckpt.pt", weights_only=True)
    next(iter(other_vae["vae"]["weights"].values())).add_(0.1)
    torch.save(other_vae, tmp_path / "other_vae.pt")
    capsys.readouterr()
    for extra, message in ((["--frames", "8"], "frames 4, here 8"), (["--prediction", "v"], "prediction x0, here v"),
                           (["--vae", str(tmp_path / "other_vae.pt")], "another VAE")):
        with pytest.raises(SystemExit) as e:
            train.main(["--out", str(tmp_path / "bad"), *small, *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err


def test_a_decoder_fine_tune_keeps_the_latents_and_replaces_the_exported_decoder(tmp_path, diffusion_ckpt, capsys):
    """--stage vae --init: only the decoder of the checkpoint's VAE trains (encoder and latent_scale exactly kept);
    --export --vae puts it in the export, and a diffusion --init accepts it beside the VAE it came from, whose cached
    latents a run with it reuses. An encoder that differs, a shape change or --latent-noise without --init are
    refused."""
    cache = str(diffusion_ckpt.parent.parent / "cache")
    run = tmp_path / "decoder" / "ckpt.pt"
    train.main(["--stage", "vae", "--init", str(diffusion_ckpt), "--latent-noise", "0.3", "--out", str(run.parent),
                "--cache", cache, "--videos", "2", "--batch-size", "4", "--steps", "2", "--device", "cpu"])
    before, after = load_vae(diffusion_ckpt), load_vae(run)
    assert all(torch.equal(v, after.encoder.state_dict()[k]) for k, v in before.encoder.state_dict().items())
    assert torch.equal(before.latent_scale, after.latent_scale)
    assert not torch.equal(before.decoder[0].weight, after.decoder[0].weight)
    assert "val_psnr_noised" in json.loads((run.parent / "log.jsonl").read_text().splitlines()[-1])["final"]
    train.main(["--out", str(diffusion_ckpt.parent), "--export", str(tmp_path / "model.pt"), "--vae", str(run)])
    _, exported, _, _ = sample.load_model(tmp_path / "model.pt", "cpu")
    assert torch.equal(exported.decoder[0].weight, after.decoder[0].weight.half().float())
    small = ["--cache", cache, "--size", "T", "--frames", "4", "--videos", "2", "--device", "cpu", "--max-minutes", "0"]
    cached = sorted(Path(cache).glob("latents_*"))  # encoded by the run behind diffusion_ckpt
    train.main(["--out", str(tmp_path / "ft"), *small, "--init", str(tmp_path / "model.pt"),
                "--vae", str(diffusion_ckpt)])  # the same latents: accepted, and not encoded anew
    assert sorted(Path(cache).glob("latents_*")) == cached
    other = torch.load(run, weights_only=True)
    other["vae"]["weights"]["encoder.0.weight"].add_(0.1)
    torch.save(other, tmp_path / "other.pt")
    capsys.readouterr()
    for argv, message in (
            (["--out", str(diffusion_ckpt.parent), "--export", str(tmp_path / "x.pt"), "--vae",
              str(tmp_path / "other.pt")], "its encoder is not the one"),
            (["--stage", "vae", "--init", str(run), "--resolution", "64", "--out", str(tmp_path / "z")],
             "a fine-tune keeps them (drop --resolution)"),
            (["--stage", "vae", "--latent-noise", "0.3", "--out", str(tmp_path / "z")], "pass the checkpoint")):
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "z").exists()


def test_a_run_resumes_with_its_files_where_they_moved_to(tmp_path, diffusion_ckpt, capsys):
    """A resume may name where the run's videos and VAE are now (the run checks they hold what it trained on); a
    moved one not given is named, with what to do. --init only starts a run: a resume never reads it again."""
    cache = diffusion_ckpt.parent.parent / "cache"
    shutil.copytree(cache / "synthetic_2x4s_32px_seed0", tmp_path / "videos")
    shutil.copy(diffusion_ckpt, tmp_path / "init.pt")  # --init without --vae: its VAE is the run's
    run = ["--out", str(tmp_path / "run"), "--cache", str(cache), "--steps", "2"]
    train.main([*run, "--init", str(tmp_path / "init.pt"), "--data", str(tmp_path / "videos"), "--size", "T",
                "--frames", "4", "--batch-size", "2", "--device", "cpu", "--max-minutes", "0"])
    (tmp_path / "videos").rename(tmp_path / "moved")
    (tmp_path / "init.pt").rename(tmp_path / "vae.pt")
    train.main(["--stage", "vae", "--init", str(tmp_path / "vae.pt"), "--out", str(tmp_path / "decoder"),
                "--cache", str(cache), "--videos", "2", "--batch-size", "4", "--max-minutes", "0", "--device", "cpu"])
    capsys.readouterr()
    for extra, message in (([], f"--data {tmp_path / 'videos'}: no longer there (the run's training videos); if "
                                "they moved, pass --data with the new place"),
                           (["--data", str(tmp_path / "moved")], f"--vae {tmp_path / 'init.pt'}: no longer there"),
                           (["--data", "synthetic", "--vae", str(tmp_path / "vae.pt")],
                            f"--data synthetic: the run trained on the videos of {tmp_path / 'videos'}; a resumed run "
                            "keeps its kind of data")):
        with pytest.raises(SystemExit) as e:
            train.main([*run, "--resume", *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert train.main([*run, "--resume", "--data", str(tmp_path / "moved"), "--vae", str(tmp_path / "vae.pt")])[
        "step"] == 2
    (tmp_path / "vae.pt").unlink()  # the decoder fine-tune's --init
    assert train.main(["--out", str(tmp_path / "decoder"), "--steps", "1", "--resume"])["step"] == 1


def test_mismatched_audio_comes_from_another_video():
    """Validation clips are drawn with replacement from few held-out videos: the next clip may be a clip of the same
    video, overlapping in time, whose audio would not be mismatched at all."""
    video = np.array([0, 0, 1, 0, 1, 1, 0, 0])
    partner = train.mismatched_partners(video)
    assert partner.tolist() == [2, 2, 3, 4, 6, 6, 2, 2] and (video[partner] != video).all()
    assert train.mismatched_partners(np.zeros(4, int)).tolist() == [1, 2, 3, 0]  # one video: the next clip

def test_probe_figures_read_sync_from_the_own_audio_half_and_fidelity_from_its_people():
    """Clips drawn with the true mouth openness score sync near 1 against it and a clean re-render fidelity; the
    mismatched half, drawn opening where the truth closes and as the other person, scores sync near -1. Either half
    read in place of the other fails."""
    people = [world.identity(0), world.identity(1)]
    truth = 0.5 + 0.4 * np.sin(np.arange(8) * 0.8 + np.arange(2)[:, None])  # (n, F)

    def draw(person, track):
        return np.stack([world.render_frame(person, 64, o, 0.3, 0.0, (0.0, 0.0, 0.0))[0] for o in track])
    own = [draw(p, t) for p, t in zip(people, truth)]
    videos = np.stack(own + [draw(p, 1 - t) for p, t in zip(people[::-1], truth)])
    got = train.probe_figures(metrics.load_probe(metrics.PROBE), videos, truth, people)
    assert got["val_sync"] > 0.9 and got["val_sync_mismatched"] < -0.9 and got["val_fidelity"] > 35, got
