"""Evaluation: the paper's tables for a checkpoint, measured in the synthetic world.

  python evaluate.py probe                  # train the probe, the instrument that reads mouths, blinks and poses
  python evaluate.py eval                   # FID / FVD / SSIM / E-FID, lip sync and diversity of a checkpoint
  python evaluate.py ablation               # Tables 3-4 at toy scale: one short run per fusion scheme

The formulas live in metrics.py; this file generates the videos they are applied to (with sample.generate) and,
for the ablation, trains the models (with train.main). Every held-out video is animated three times: with its own
audio, with mismatched audio and with silence, from a portrait taken outside the frames it is scored against.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import train
from audio import FPS, SAMPLES_PER_FRAME, audio_features, frame_loudness, load_audio
from common import (MAX_NAME, HelpFormatter, Parser, UserError, add_device, atomic_write, bounded, brief,
                    check_device, contents_of, file_name, load_checkpoint, out_of_memory, replaceable_checkpoint,
                    save_torch, to_tensor, to_uint8, user_errors, writable_file, writable_folder)
from data import VideoFolder, build_frame_pool, load_frame_pool
from diffusion import SAMPLERS, STEPS
from metrics import (EXPRESSION_HELP, I3D_HELP, PROBE, RunningStats, border_jump, clip_windows, fidelity,
                     frame_change, frechet, frechet_distance, i3d_features, identity_ratio, load_inception, load_probe,
                     load_torchscript, mouth_darkness, off_palette, per_clip_sync, probe_readings, ssim, train_probe)
from sample import AUDIO_SCALE, DEFAULT_CKPT, MAX_SCALE, SAMPLER, SAMPLER_STEPS, generate, load_model
from world import Identity, SyntheticVideos, synth_video

PORTRAIT_LEAD = 10  # frames rendered before each evaluated video; the portrait is the first of them
SHEET_PEOPLE = 3  # videos on eval's contact sheet
FIDELITY_FRAMES = 3  # frames per video whose re-render fidelity is measured (about a second each)


def eval_videos(n, seconds, resolution, split, seed):
    """n synthetic test videos of `split`, each `seconds` long after PORTRAIT_LEAD frames that hold its portrait,
    so that the portrait is never one of the frames it is scored against (as in training, where the reference
    comes from outside the clip). Returns portraits uint8 (n, H, W, 3), frames uint8 (n, T, H, W, 3), wavs (T *
    640,) and metas (the per-frame ground truth of those T frames)."""
    lead = PORTRAIT_LEAD
    videos = [synth_video(split, i, seconds + lead / FPS, resolution, seed) for i in tqdm(range(n), desc="videos",
                                                                                          leave=False)]
    frames = np.stack([v.frames for v in videos])
    metas = [{k: value[lead:] if isinstance(value, list) and len(value) == len(frames[0]) else value
              for k, value in v.meta.items()} for v in videos]
    for meta in metas:
        meta["num_frames"] = frames.shape[1] - lead
    return frames[:, 0], frames[:, lead:], [v.wav[lead * SAMPLES_PER_FRAME:] for v in videos], metas


@torch.no_grad()
def evaluate(ckpt, probe, videos=12, seconds=3.0, steps=SAMPLER_STEPS, sampler=SAMPLER, audio_scale=AUDIO_SCALE,
             split="test", seed=0, inception=None, i3d=None, expression=None, speech=(), sheet=None, device="cpu"):
    """Evaluate a checkpoint on `videos` synthetic videos of `split` (held-out identities and sentences): each is
    animated from one of its frames with its own audio, with mismatched audio (the same recording shifted by half
    its length: the same voice, other words) and with silence. Returns a dict of every figure (see README)."""
    model, vae, diffusion, _ = load_model(ckpt, device)
    extractors = standard_extractors(vae.config.resolution, inception, i3d, expression)  # fails now, not later
    res = vae.config.resolution
    refs, real, wavs, metas = eval_videos(videos, seconds, res, split, seed)
    _, other_real, _, _ = eval_videos(videos, seconds, res, split, seed + 1)  # the floor: other real videos
    N, T = real.shape[:2]
    mels = torch.stack([audio_features(w, T) for w in wavs])
    conditions = {"matched": mels, "mismatched": mels.roll(T // 2, dims=1), "silent": torch.zeros_like(mels)}
    gen = generate(model, vae, diffusion, np.concatenate([refs] * 3), torch.cat(list(conditions.values())),
                   steps=steps, sampler=sampler, audio_scale=audio_scale, seed=seed, device=device)
    gen = dict(zip(conditions, np.split(gen, 3)))
    fake = gen["matched"]
    truth = np.array([m["openness"] for m in metas])
    result = {"checkpoint": str(ckpt), "videos": N, "frames": T, "sampler": sampler, "steps": steps,
              "audio_scale": audio_scale, "split": split, "resolution": res}

    # Fréchet distances on the probe's features: frames (FID), 8-frame clips of readings (FVD), expression (E-FID)
    feats = {k: probe_readings(probe, v, features=True) for k, v in (("real", real), ("other", other_real),
                                                                       ("fake", fake))}
    reads = {k: probe_readings(probe, v) for k, v in (("real", real), ("other", other_real), ("fake", fake),
                                                      ("mismatched", gen["mismatched"]), ("silent", gen["silent"]))}
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    clip = lambda x: clip_windows(x).reshape(-1, 8 * 5)  # noqa: E731
    for name, get in (("fid", lambda k: flat(feats[k])), ("fvd", lambda k: clip(reads[k])),
                      ("efid", lambda k: flat(reads[k][..., :2]))):
        result[f"{name}_probe"] = frechet(get("real"), get("fake"))
        result[f"{name}_probe_floor"] = frechet(get("real"), get("other"))
        result[f"{name}_probe_dim"] = get("real").shape[1]
    result["fid_probe_samples"], result["fvd_probe_samples"] = N * T, len(clip(reads["real"]))
    to01 = lambda v: torch.from_numpy(v).flatten(0, 1).permute(0, 3, 1, 2).double() / 255  # noqa: E731
    result["ssim"] = ssim(to01(real), to01(fake)).mean().item()

    # lip sync: the probe's openness against the ground truth, per video (its mean removed)
    result["sync"] = per_clip_sync(reads["fake"][..., 0], truth)
    result["sync_mismatched"] = per_clip_sync(reads["mismatched"][..., 0], truth)
    result["sync_real"] = per_clip_sync(reads["real"][..., 0], truth)
    boxes = [np.array(m["mouth_box"]) for m in metas]
    result["darkness_sync"] = per_clip_sync([mouth_darkness(f, b) for f, b in zip(fake, boxes)], truth)
    result["darkness_sync_real"] = per_clip_sync([mouth_darkness(f, b) for f, b in zip(real, boxes)], truth)

    result.update(diversity(reads["fake"], reads["real"]))
    result["motion_real"], result["motion_speech"] = frame_change(real), frame_change(fake)
    result["motion_silent"] = frame_change(gen["silent"])
    if T > model.cfg.frames:
        result["border_jump"] = border_jump(fake, model.cfg.frames)

    # identity and artefacts
    identities = [m["identity"] for m in metas]
    result.update({f"identity_{key}_ratio": ratio for key, ratio in identity_ratio(fake, identities).items()})
    reconstructed = np.stack([_decode_uint8(vae, v, device) for v in real])
    threshold = np.percentile(off_palette(reconstructed, real), 99.9)
    result["blob_threshold"] = float(threshold)
    result["blob_fraction"] = float((off_palette(fake, real) > threshold).mean())
    # re-render fidelity: how cleanly frames are drawings of their person; the VAE's reconstructions set the ceiling
    picks = np.linspace(0, T - 1, FIDELITY_FRAMES).round().astype(int)
    people = [Identity.from_meta(m["identity"]) for m in metas]
    for name, videos in (("fidelity_real", real), ("fidelity_vae", reconstructed), ("fidelity", fake)):
        result[name] = fidelity(probe, videos[:, picks], people)

    # the standard extractors, where the user passed them
    for name, features in extractors.items():
        f_real = features(real)
        result[name], result[f"{name}_floor"] = frechet(f_real, features(fake)), frechet(f_real, features(other_real))
    if speech:
        result.update(unseen_speech(model, vae, diffusion, probe, refs, speech, steps, sampler, audio_scale, seed,
                                    device))
    if sheet is not None:  # the first videos of different people (a split's people can come back in later videos)
        shown = [i for i, m in enumerate(metas) if m["identity"] not in [n["identity"] for n in metas[:i]]]
        shown = shown[:SHEET_PEOPLE]
        write_sheet(sheet, refs[shown], real[shown], fake[shown], gen["mismatched"][shown])
    return result


def standard_extractors(resolution, inception=None, i3d=None, expression=None):
    """The standard feature extractors whose files the user passed, as {metric: features}, each features(videos
    uint8 (N, T, H, W, 3)) -> (M, d): FID's Inception pool features per frame, FVD's I3D features per 16-frame clip
    (stride 8), E-FID's expression coefficients per frame. Each is tried on a blank 16-frame video at `resolution`
    first, so a network that is not what its flag asks for fails now, not after the generation."""
    frames = lambda v: to_tensor(v).flatten(0, 1)  # noqa: E731
    found = {}  # metric: (flag, file, features, feature vectors of a 16-frame video)
    if inception is not None:
        inception_net = load_inception(inception)
        found["fid_inception"] = ("--inception", inception, lambda v: torch.cat(
            [inception_net(c) for c in frames(v).split(32)]).numpy(), 16)
    if i3d is not None:
        i3d_net = load_torchscript(i3d, "--i3d", I3D_HELP)
        found["fvd_i3d"] = ("--i3d", i3d, lambda v: i3d_features(i3d_net, to_tensor(clip_windows(v, 16, 8))).numpy(),
                            1)
    if expression is not None:
        expression_net = load_torchscript(expression, "--expression", EXPRESSION_HELP)
        found["efid_expression"] = ("--expression", expression, lambda v: torch.cat(
            [expression_net((c + 1) / 2) for c in frames(v).split(64)]).numpy(), 16)
    for flag, path, features, rows in found.values():
        try:
            got = tuple(features(np.zeros((1, 16, resolution, resolution, 3), np.uint8)).shape)
        except Exception as e:  # noqa: BLE001  (a network of another kind can fail in any way)
            if out_of_memory(e):
                raise
            got = f"{type(e).__name__} ({brief(e)})"
        if not (isinstance(got, tuple) and len(got) == 2 and got[0] == rows):
            raise UserError(f"{flag} {path}: a blank 16-frame video gave {got}, not {rows} feature vectors; see "
                            "--help for the network it takes")
    return {metric: features for metric, (_, _, features, _) in found.items()}


@torch.no_grad()
def evaluate_folder(ckpt, folder, videos=12, seconds=3.0, steps=SAMPLER_STEPS, sampler=SAMPLER,
                    audio_scale=AUDIO_SCALE, seed=0, inception=None, i3d=None, expression=None, device="cpu"):
    """The paper's Tables 1-2 on real held-out videos: those VideoFolder holds out of a prepared folder (every 20th).
    Each video's first frame is its portrait; the `seconds` after PORTRAIT_LEAD frames are generated from their
    audio and scored against the real ones: SSIM, and FID / FVD / E-FID with the extractors passed. The statistics
    grow video by video (RunningStats), so no feature set is ever held whole. Returns a dict of the figures."""
    model, vae, diffusion, _ = load_model(ckpt, device)
    held_out = VideoFolder(folder, "val")
    if held_out.size != vae.config.resolution:
        raise UserError(f"--data {folder}: its frames are {held_out.size} px, the checkpoint's "
                        f"{vae.config.resolution} px (prepare it with --size {vae.config.resolution})")
    if len(VideoFolder(folder)) == 1:
        print(f"note: {folder} holds one video, which a run on this folder also trained on", file=sys.stderr)
    extractors = standard_extractors(vae.config.resolution, inception, i3d, expression)
    stats, ssims, lead, T = {}, [], PORTRAIT_LEAD, round(seconds * FPS)
    n = min(videos, len(held_out))
    short = next((i for i in range(n) if held_out.num_frames(i) < lead + T), None)  # from meta.json, before any work
    if short is not None:
        frames = held_out.num_frames(short)
        raise UserError(f"{held_out.folders[short]}: {frames} frames, but a video is scored on --seconds {seconds:g} "
                        f"({T} frames) after {lead} frames that hold its portrait; "
                        + (f"pass --seconds {(frames - lead) / FPS:g} or less" if frames - lead >= 10 else
                           "too short to score: replace it with a longer video"))
    for i in tqdm(range(n), desc="videos", unit="video"):
        video = held_out[i]
        real = video.frames[None, lead:lead + T]
        mel = audio_features(video.wav[lead * SAMPLES_PER_FRAME:(lead + T) * SAMPLES_PER_FRAME], T)[None]
        fake = generate(model, vae, diffusion, video.frames[:1], mel, steps=steps, sampler=sampler,
                        audio_scale=audio_scale, seed=seed, device=device, progress=False)
        ssims.append(ssim(*(torch.from_numpy(v[0]).permute(0, 3, 1, 2).double() / 255 for v in (real, fake))))
        for name, features in extractors.items():
            for k, v in enumerate((real, fake)):
                f = features(v)
                stats.setdefault(name, [RunningStats(f.shape[1]), RunningStats(f.shape[1])])[k].update(f)
    result = {"checkpoint": str(ckpt), "data": str(folder), "videos": len(ssims), "frames": T, "sampler": sampler,
              "steps": steps, "audio_scale": audio_scale, "ssim": torch.cat(ssims).mean().item()}
    for name, (real_stats, fake_stats) in stats.items():
        result[name] = frechet_distance(*real_stats.mean_cov(), *fake_stats.mean_cov())
    return result


def _decode_uint8(vae, frames, device):
    """The VAE's reconstruction of frames uint8 (T, H, W, 3), as uint8."""
    x = to_tensor(frames).to(device)
    return to_uint8(torch.cat([vae.decode(vae.encode(c)) for c in x.split(64)]))


def trim_silence(wav):
    """Cut the leading and trailing silence (video frames 40 dB below the loudest) of a 16 kHz waveform: every
    recording starts and ends quiet, and those shared edges alone would correlate mismatched pairs."""
    n = len(wav) // SAMPLES_PER_FRAME
    loud = np.flatnonzero(frame_loudness(wav, n) > frame_loudness(wav, n).max() - 40)
    return wav[loud[0] * SAMPLES_PER_FRAME:(loud[-1] + 1) * SAMPLES_PER_FRAME]


def diversity(fake, real):
    """Sec. 4.4's diversity, generated over real, from the probe's readings (N, T, 5) of both (openness, blink, pose
    dx, dy, roll): the blink rate (the fraction of frames with the eyes mostly closed; None when the real videos
    hold no blink, as short clips of few videos may), and how much the mouth and the head move (std over time)."""
    rate = lambda r: (r[..., 1] > 0.5).mean()  # noqa: E731
    motion = lambda r, channels: r[..., channels].std(1).mean()  # noqa: E731
    return {"blink_rate_ratio": float(rate(fake) / rate(real)) if rate(real) > 0 else None,
            "mouth_motion_ratio": float(motion(fake, 0) / motion(real, 0)),
            "head_motion_ratio": float(motion(fake, slice(2, None)) / motion(real, slice(2, None)))}


@torch.no_grad()
def unseen_speech(model, vae, diffusion, probe, refs, speech, steps, sampler, audio_scale, seed, device):
    """Speech the model never heard (16 kHz waveforms, audio.load_audio's; e.g. another TTS engine): the probe's
    openness on the generated frames against the speech's loudness envelope in dB, per recording; mismatched: the
    envelope of the next one."""
    wavs = [trim_silence(w) for w in speech]
    T = min(len(w) for w in wavs) // SAMPLES_PER_FRAME
    mels = torch.stack([audio_features(w, T) for w in wavs])
    loud = np.stack([frame_loudness(w, T) for w in wavs])
    gen = generate(model, vae, diffusion, refs[np.arange(len(wavs)) % len(refs)], mels, steps=steps,
                   sampler=sampler, audio_scale=audio_scale, seed=seed, device=device)
    opening = probe_readings(probe, gen)[..., 0]
    return {"unseen_sync": per_clip_sync(opening, loud), "unseen_sync_mismatched":
            per_clip_sync(opening, np.roll(loud, -1, axis=0)), "unseen_files": len(wavs), "unseen_frames": T}


def write_sheet(path, refs, real, fake, mismatched):
    """Contact sheet, per video three rows: reference | ground truth; generated; generated with other audio (8
    evenly spaced frames each)."""
    pick = np.linspace(0, real.shape[1] - 1, 8).round().astype(int)
    rows = []
    for ref, *videos in zip(refs, real, fake, mismatched):
        for j, v in enumerate(videos):
            first = ref if j == 0 else np.full_like(ref, 255)
            rows.append(np.concatenate([first, *v[pick]], axis=1))
    sheet = Image.fromarray(np.concatenate(rows)).resize((rows[0].shape[1] * 2, len(rows) * rows[0].shape[0] * 2),
                                                        Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))


def blink_ratio(r):
    """The blink rate ratio of results r as the tables print it."""
    return "n/a (no blink in the real videos)" if r["blink_rate_ratio"] is None else f"{r['blink_rate_ratio']:.2f}x"


def report(r):
    """The evaluation as markdown: the paper's columns (Tables 1-2) on the probe's features, then what the paper
    lacks (lip sync, diversity, identity, artefacts)."""
    extra = [f"{name} ({r[key]:.3f}, floor {r[key + '_floor']:.3f})" for name, key in
             (("FID Inception", "fid_inception"), ("FVD I3D", "fvd_i3d"), ("E-FID expression", "efid_expression"))
             if key in r]
    lines = [
        f"{r['videos']} videos x {r['frames']} frames of held-out identities and sentences ({r['split']} split), "
        f"{r['sampler']} {r['steps']} steps, audio guidance {r['audio_scale']}. Synthetic world, probe features: NOT "
        "comparable to the paper's Tables 1-2 (other data, other extractor).",
        "",
        "| | FID (probe) | FVD (probe) | SSIM | E-FID (probe) | Sync | Sync, mismatched audio |",
        "|---|---|---|---|---|---|---|",
        f"| generated | {r['fid_probe']:.3f} | {r['fvd_probe']:.3f} | {r['ssim']:.3f} | {r['efid_probe']:.4f} | "
        f"{r['sync']:.2f} | {r['sync_mismatched']:.2f} |",
        f"| floor / ceiling: real vs other real | {r['fid_probe_floor']:.3f} | {r['fvd_probe_floor']:.3f} | 1 | "
        f"{r['efid_probe_floor']:.4f} | {r['sync_real']:.2f} | |",
        "",
        f"Feature dimensions: FID {r['fid_probe_dim']} ({r['fid_probe_samples']} frames), FVD {r['fvd_probe_dim']} "
        f"({r['fvd_probe_samples']} clips), E-FID {r['efid_probe_dim']}. "
        + (("Standard extractors: " + "; ".join(extra) + ".") if extra else
           "Standard FID / FVD / E-FID: not computed (pass --inception, --i3d, --expression)."),
        f"Probe-free lip sync (mouth-box darkness): {r['darkness_sync']:.2f} "
        f"(real frames {r['darkness_sync_real']:.2f}).",
        f"Diversity, generated / real: blink rate {blink_ratio(r)}, mouth motion "
        f"{r['mouth_motion_ratio']:.2f}x, head motion {r['head_motion_ratio']:.2f}x. Frame-to-frame change: real "
        f"{r['motion_real']:.4f}, generated {r['motion_speech']:.4f}, generated from silence {r['motion_silent']:.4f}"
        + (f"; across window borders {r['border_jump']:.2f}x the change inside windows." if "border_jump" in r
           else "."),
        f"Identity (colour distance to own / to another identity): background {r['identity_background_ratio']:.3f}, "
        f"skin {r['identity_skin_ratio']:.3f}. Off-palette pixels: {100 * r['blob_fraction']:.2f}% (colours "
        f"farther than {r['blob_threshold']:.1f} from every colour of the real video; 0.1% of the VAE's "
        "reconstructions are).",
        f"Re-render fidelity (median PSNR to the closest drawing of the person, {FIDELITY_FRAMES} frames a video): "
        f"generated {r['fidelity']:.1f} dB, VAE reconstructions {r['fidelity_vae']:.1f} dB (the ceiling), real "
        f"frames {r['fidelity_real']:.1f} dB (the search's own limit)."]
    few = [name for name in ("FID", "FVD") if r[f"{name.lower()}_probe_samples"] < r[f"{name.lower()}_probe_dim"]]
    if few:  # a covariance of n < d samples is singular: the distance then mostly measures n
        lines.append(f"{' and '.join(few)}: fewer samples than feature dimensions, so these distances and their floors "
                     "say more about the sample size than about the model; evaluate more --videos or --seconds.")
    if "unseen_sync" in r:
        lines.append(f"Unseen speech ({r['unseen_files']} files): openness vs loudness r = {r['unseen_sync']:.2f}, "
                     f"mismatched {r['unseen_sync_mismatched']:.2f}.")
    return "\n".join(lines)


def report_folder(r):
    """evaluate_folder's figures as markdown: the paper's Table 1-2 columns that real videos allow."""
    cell = lambda key: f"{r[key]:.3f}" if key in r else "-"  # noqa: E731
    return "\n".join([
        f"{r['videos']} held-out videos x {r['frames']} frames of {r['data']}, {r['sampler']} {r['steps']} steps, "
        f"audio guidance {r['audio_scale']}.", "", "| | SSIM | FID (Inception) | FVD (I3D) | E-FID (expression) |",
        "|---|---|---|---|---|",
        f"| generated | {r['ssim']:.3f} | {cell('fid_inception')} | {cell('fvd_i3d')} | {cell('efid_expression')} |"])


def ablation_table(results):
    """Tables 3 and 4 at toy scale: one row per fusion setting."""
    lines = ["| portrait | audio | FID (probe) | FVD (probe) | SSIM | E-FID (probe) | Sync | Blink | Head motion | "
             "Motion in silence |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (ref, audio), r in results.items():
        lines.append(f"| {ref} | {audio} | {r['fid_probe']:.3f} | {r['fvd_probe']:.3f} | {r['ssim']:.3f} | "
                     f"{r['efid_probe']:.4f} | {r['sync']:.2f} | {blink_ratio(r)} | "
                     f"{r['head_motion_ratio']:.2f}x | {r['motion_silent']:.4f} |")
    return "\n".join(lines)


# Tables 3 and 4: each portrait scheme with direct audio, each audio scheme with symbiotic portrait
ABLATION = [("symbiotic", "direct"), ("direct", "direct"), ("siamese", "direct"), ("symbiotic", "siamese"),
            ("symbiotic", "symbiotic")]
ABLATION_RECIPE = ["--size", "T", "--prediction", "v", "--mouth-weight", "5", "--seed", "0",
                   "--eval-every", "1000000"]  # the demo's recipe; no evaluations inside the budget


def results_path(ckpt, split, data=None):
    """Where `eval` writes its results by default: runs/eval/NAME_SPLIT.json, NAME the checkpoint's file name, or its
    run folder's for a run's ckpt.pt, so that evaluating runs/a/ckpt.pt and runs/b/ckpt.pt keeps both; for --data,
    NAME_data-FOLDER-HASH.json, HASH of the folder's full path (two folders named hdtf, or one named test, keep
    their own)."""
    name = ckpt.resolve().parent.name if ckpt.stem == "ckpt" else ckpt.stem
    if data is None:
        return Path("runs/eval") / f"{name}_{split}.json"
    return Path("runs/eval") / f"{name}_data-{data.resolve().name}-{train.short_hash(str(data.resolve()))}.json"


def ablation(root, budget_min, probe, vae, device="cpu", **eval_args):
    """Train size T on the VAE of checkpoint `vae` once per fusion setting for the same budget on `device`
    (resuming an interrupted run, on its own VAE), evaluate each once (cached in its eval.json) and return
    {(portrait, audio): result}."""
    root = Path(root)
    results = {}
    for ref, audio in ABLATION:
        out = root / f"ref-{ref}_audio-{audio}"
        done = out / "eval.json"
        if not done.exists():
            ckpt = out / "ckpt.pt"
            spent = 0.0
            if ckpt.exists():
                with contents_of(ckpt, "a letstalk run's checkpoint"):
                    spent = train.progress(load_checkpoint(ckpt, needs=("step", "elapsed")))[1] / 60
            if spent < budget_min:
                args = ["--resume"] if ckpt.exists() else [*ABLATION_RECIPE, "--vae", str(vae), "--ref-fusion", ref,
                                                           "--audio-fusion", audio]
                train.main(["--out", str(out), "--max-minutes", str(budget_min - spent), "--device", device, *args])
            result = evaluate(ckpt, probe, device=device, **eval_args)
            atomic_write(done, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
        with contents_of(done, "an evaluation's results; delete it to evaluate again"):
            results[(ref, audio)] = json.loads(done.read_text())
            ablation_table({(ref, audio): results[(ref, audio)]})  # every figure the table shows is there
    return results


def main(argv=None):
    """`python evaluate.py probe|eval|ablation`: train the probe, evaluate a checkpoint, or run the fusion ablation
    (argv=None: sys.argv)."""
    parser = Parser(prog="evaluate.py", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="train the synthetic-world probe (mouth, blink, pose reader)",
                       formatter_class=HelpFormatter)
    p.add_argument("--out", type=file_name, default=PROBE, help="where to write it (the default replaces the shipped "
                   "probe, which train.py's lip-sync logging and eval read)")
    p.add_argument("--videos", type=bounded(int, 1, 100_000), default=300, help="training videos (16 frames each)")
    p.add_argument("--steps", type=bounded(int, 1, 10**6), default=1500, help="optimizer steps of 64 frames")
    p.add_argument("--cache", type=Path, default=Path("runs/probe"), help="where the frame pools are cached")
    evaluation = Parser(add_help=False)  # the options eval and ablation share
    evaluation.add_argument("--probe", type=Path, default=PROBE,
                            help="the synthetic-world probe (`python evaluate.py probe` trains one)")
    evaluation.add_argument("--videos", type=bounded(int, 1, 10_000), default=12, help="test videos generated")
    evaluation.add_argument("--seconds", type=bounded(float, (8 + 2) / FPS, 600), default=3.0,
                            help="length of each test video, at least two of FVD's 8-frame clips (stride 2)")
    evaluation.add_argument("--steps", type=bounded(int, 1, STEPS), default=SAMPLER_STEPS,
                            help="denoising steps per window (default: sample.py's)")
    evaluation.add_argument("--sampler", choices=SAMPLERS, default=SAMPLER, help="as sample.py's (default: its own)")
    evaluation.add_argument("--audio-scale", type=bounded(float, 0, MAX_SCALE), default=AUDIO_SCALE,
                            help="classifier-free guidance on the audio (default: sample.py's)")
    evaluation.add_argument("--split", choices=["test", "val"], default="test",
                            help="held-out identities and sentences to evaluate on")
    add_device(evaluation)
    p = sub.add_parser("eval", parents=[evaluation], formatter_class=HelpFormatter,
                       help="FID / FVD / SSIM / E-FID, lip sync and diversity of a checkpoint")
    p.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT, help="checkpoint from train.py (default: the shipped "
                   "demo)")
    p.add_argument("--inception", type=Path, help="Inception-v3 weights for the standard FID (see load_inception)")
    p.add_argument("--i3d", type=Path, help="I3D TorchScript for the standard FVD: " + I3D_HELP)
    p.add_argument("--expression", type=Path, help="expression extractor for the standard E-FID: " + EXPRESSION_HELP)
    p.add_argument("--speech", type=Path, nargs="*", default=[], help="WAV files of speech never trained on "
                   "(e.g. assets/unseen/*.wav), two or more: lip sync against their loudness, over the length of "
                   "the shortest once silence is trimmed")
    p.add_argument("--sheet", type=file_name, help=f"write a contact sheet PNG of the first {SHEET_PEOPLE} people's "
                   "videos: reference | real; generated; generated with other audio")
    p.add_argument("--data", type=Path, help="a folder from `data.py prepare`: evaluate on its held-out videos (SSIM, "
                   "and FID / FVD / E-FID with the extractors passed) instead of the synthetic world")
    p.add_argument("--json", type=file_name, help="write the results here (default: runs/eval/NAME_SPLIT.json, NAME "
                   "the checkpoint's, or for a run's ckpt.pt its run folder's; with --data, "
                   "NAME_data-FOLDER-HASH.json)")
    p = sub.add_parser("ablation", parents=[evaluation], formatter_class=HelpFormatter,
                       help="Tables 3-4 at toy scale: train and evaluate each fusion scheme for the same budget",
                       description="Train size T (the demo's recipe: " + " ".join(ABLATION_RECIPE) + ") once per "
                       "fusion setting (each portrait scheme with direct audio, each audio scheme with symbiotic "
                       "portrait) for the same budget and seed, then evaluate each. Interrupted runs resume; "
                       "finished ones are read from their eval.json.")
    p.add_argument("--budget-min", type=bounded(float, above=0, high=10_080), default=15.0,
                   help="training minutes per fusion setting")
    p.add_argument("--out", type=Path, default=Path("runs/ablation"), help="one run folder per setting, resumable")
    p.add_argument("--vae", type=Path, default=DEFAULT_CKPT, help="the VAE every setting trains on: a checkpoint "
                   "holding one (default: the shipped demo's, whose recipe this is; or `train.py --stage vae`'s)")
    args = parser.parse_args(argv)
    with user_errors():
        return run(args)


def run(args):
    """evaluate.py's work for the parsed command line; every output is checked before any work."""
    if args.command == "probe":
        sizes = {"train": args.videos, "val": max(8, args.videos // 10)}
        paths = {split: args.cache / f"frames_{split}_{n}.pt" for split, n in sizes.items()}  # --videos changes them
        writable_file(args.out, "--out", (".pt",))
        if args.out.resolve() in {p.resolve() for p in paths.values()}:
            raise UserError(f"--out {args.out}: a frame pool this command reads from --cache; pass another name")
        replaceable_checkpoint(args.out, "--out", "a probe", lambda ckpt: "head.weight" in ckpt)
        writable_folder(args.cache, "--cache")
        args.cache.mkdir(parents=True, exist_ok=True)
        pools = {split: load_frame_pool(path) if path.exists() else
                 build_frame_pool(SyntheticVideos(split, sizes[split], 1.0, 64), path)
                 for split, path in paths.items()}
        probe, r = train_probe(pools["train"], pools["val"], args.steps)
        save_torch(args.out, probe.state_dict())
        print(f"probe: openness r = {r:.3f} on held-out identities; wrote {args.out}")
        return r
    probe = None if getattr(args, "data", None) else load_probe(args.probe)  # real videos need no probe
    check_device(args.device)
    shared = dict(videos=args.videos, seconds=args.seconds, steps=args.steps, sampler=args.sampler,
                  audio_scale=args.audio_scale, split=args.split, device=args.device)
    if args.command == "ablation":
        writable_folder(args.out, "--out")
        results = ablation(args.out, args.budget_min, probe, args.vae, **shared)
        print(ablation_table(results))
        return results
    for flag in ("inception", "i3d", "expression"):  # a missing file fails now, not after generating
        if getattr(args, flag) is not None and not getattr(args, flag).is_file():
            raise UserError(f"--{flag} {getattr(args, flag)}: "
                            + ("a folder; pass the weights file" if getattr(args, flag).is_dir() else "no such file"))
    if args.i3d is not None and args.seconds * FPS < 24:  # FVD's statistics need at least two clips
        raise UserError(f"--seconds {args.seconds}: FVD takes 16-frame clips every 8 frames; pass at least 0.96 "
                        "for two per video")
    if args.data is not None and (args.speech or args.sheet):
        raise UserError("--speech and --sheet measure the synthetic world; drop them with --data")
    inputs = [p for p in (args.ckpt, args.probe, args.inception, args.i3d, args.expression, *args.speech) if p]
    if args.sheet:
        writable_file(args.sheet, "--sheet", (".png",), inputs=inputs)
    path = args.json or results_path(args.ckpt, args.split, args.data)
    if args.data is not None and args.data.resolve() in path.resolve().parents:
        raise UserError(f"{path}: the results file would be written into the data folder {args.data}; pass another "
                        "--json")
    if args.json:  # a folder the user names must exist; the default one is made when the results are written
        writable_file(path, "--json", (".json",), inputs=inputs)
    else:
        writable_folder(path.parent, "--json")
        if len(os.fsencode(path.name)) > MAX_NAME:
            raise UserError(f"{path}: the default results file's name is too long; pass --json")
        if path.exists() and any(Path(p).exists() and path.samefile(p) for p in inputs):
            raise UserError(f"{path}: the results file would overwrite an input of this command; pass --json")
    speech = [load_audio(p) for p in args.speech]  # read now: a bad file fails before the generation
    if len(speech) == 1:
        raise UserError("--speech: give two or more recordings (each is also scored against the next one's loudness: "
                        "the mismatched figure)")
    for i, (wav_path, wav) in enumerate(zip(args.speech, speech)):
        if len(wav) < 2 * SAMPLES_PER_FRAME or len(trim_silence(wav)) < 2 * SAMPLES_PER_FRAME:
            raise UserError(f"--speech {wav_path}: shorter than two video frames (80 ms) of sound once its silence is "
                            "trimmed, too short to follow")
        if np.sqrt(np.mean(wav ** 2)) < 1e-4:  # (trim_silence keeps a recording silent throughout whole)
            raise UserError(f"--speech {wav_path}: silent; pass recordings of speech")
        twin = next((p for p, w in zip(args.speech[:i], speech) if np.array_equal(w, wav)), None)
        if twin is not None:  # its mismatched pairing would be a matched one
            raise UserError(f"--speech {wav_path}: the same recording as {twin}; pass different ones")
    extractors = dict(inception=args.inception, i3d=args.i3d, expression=args.expression)
    if args.data is not None:
        shared.pop("split")
        result = evaluate_folder(args.ckpt, args.data, **extractors, **shared)
    else:
        result = evaluate(args.ckpt, probe, speech=speech, sheet=args.sheet, **extractors, **shared)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    print(report(result) if args.data is None else report_folder(result))
    print(f"wrote {path}")
    if args.sheet:
        print(f"wrote {args.sheet}")
    return result


if __name__ == "__main__":
    main()
