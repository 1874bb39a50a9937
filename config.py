"""Every setting of a training run, declared once: its default, help text, range or choices, the stage it belongs
to, and whether a resumed run may change it. `python train.py --help` is generated from this file.

A default of None means "the default for this device and stage", filled in by `resolve`, the one place where the
paper's GPU settings and the CPU demo's part ways. A setting of the other stage is refused, not ignored, and so is
a change that would silently not happen when a run is resumed.

A reference more than a lesson: its help texts use the terms of letstalk.py, diffusion.py and vae.py, so read those
first (the README's reading order), then this file beside train.py.
"""

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from common import MAX_SEED, UserError, bounded, check_device
from diffusion import PREDICTIONS, SCHEDULES
from kernels import MAX_LENGTH, TEMPORAL_KERNELS
from letstalk import FUSIONS, SIZES
from vae import load_vae

STAGES = ("vae", "diffusion")


def setting(default, help, stage=None, choices=None, resumable=False, **bounds):
    """A TrainConfig field with its command-line help, the stage it belongs to (None: both), its choices or its
    bounds (low, high, above; see common.bounded), and whether --resume may change it."""
    return field(default=default, metadata=dict(help=help, stage=stage, choices=choices, bounds=bounds,
                                                 resumable=resumable))


@dataclass
class TrainConfig:
    """The settings of one run (stage 1, the VAE, or stage 2, the diffusion transformer); a checkpoint stores them
    as a dict."""
    stage: str = setting("diffusion", "vae (stage 1) or diffusion (stage 2)", choices=STAGES)
    data: str = setting("synthetic", "'synthetic' or a folder in data.py's layout")
    out: str = setting(None, "run folder (default: runs/<stage>)")
    cache: str = setting("runs/cache", "where rendered synthetic videos, cached frames and encoded latents are kept, "
                         "shared by the runs that ask for the same")
    seed: int = setting(0, "seed of the weights, the data order and the synthetic world", low=0, high=MAX_SEED)
    device: str = setting(None, "cpu, cuda or cuda:N (default: cuda if this machine has a GPU); under torchrun "
                          "each rank's own GPU", resumable=True)
    steps: int = setting(100_000, "stop after this many optimizer steps (or earlier, with --max-minutes)",
                         resumable=True, low=1, high=10**8)
    batch_size: int = setting(None, "clips (frames for the VAE) per micro-batch and rank (default: 32 VAE; "
                              "diffusion 16, or 8 for size B and 4 for L, which fit an 80 GB GPU also eagerly; "
                              "compiled, B fits 16)", low=1, high=4096)
    accum: int = setting(1, "gradient accumulation: micro-batches per optimizer step", low=1, high=1024)
    lr: float = setting(None, "peak learning rate (default: VAE 5e-4, or 1e-4 with --init; diffusion 3e-4 for "
                        "size T, 1e-4 as the official code for S, B, L)", above=0, high=1)
    warmup: int = setting(100, "steps of linear learning-rate warm-up (0: none)", low=0, high=10**8)
    cooldown: int = setting(0, "steps of linear learning-rate decay to 0 before --steps (0: none); a cooled-down "
                            "model samples cleaner images. Set --steps to a step you will reach", resumable=True,
                            low=0, high=10**8)
    grad_clip: float = setting(1.0, "clip the global gradient norm to this", above=0, high=10**6)
    eval_every: int = setting(250, "steps between evaluations (and, for diffusion, a sample grid PNG)", low=1,
                              high=10**8)
    save_minutes: float = setting(10.0, "minutes between checkpoints (one is always written at the end)", above=0,
                                 high=10**6)
    init: str = setting(None, "fine-tune this checkpoint with a fresh optimizer. Diffusion: the model and its EMA "
                        "start from the EMA weights of a diffusion run's ckpt.pt or --export; its model shape, "
                        "--prediction and --schedule must be this run's, and its VAE is the default --vae. VAE: the "
                        "decoder of the VAE in any checkpoint that holds one trains on (see --latent-noise); its "
                        "encoder and latent_scale stay, so a diffusion model trained on its latents can use it")
    # stage 1: the VAE
    resolution: int = setting(None, "frame size (default: 256 on a GPU as in the paper, 64 on a CPU)", stage="vae",
                              low=16, high=1024)
    factor: int = setting(None, "VAE downsampling (default: 8 at 256 and above, else 4: latents of 32x32 and "
                          "16x16)", stage="vae", choices=(4, 8))
    vae_width: int = setting(None, "VAE channels at full resolution (default: 32, which trains fast on a CPU; try "
                             "64-128 for real data)", stage="vae", low=4, high=1024)
    latent_noise: float = setting(0.0, "with --init: fine-tune the decoder on latents noised by a std drawn from U(0, "
                                  "this), in the diffusion model's unit-variance units, so it draws clean frames "
                                  "from a diffusion model's slightly-off latents. More is cleaner but fades small "
                                  "details: on the shipped model 0.1, 0.2, 0.3 gave re-render fidelity 24.8, 25.1, "
                                  "25.4 dB (24.4 before) and blink rates 1.06x, 1.33x, 1.6x (faded eyes read as "
                                  "closed; 0.73x before); 0: off", stage="vae", low=0, high=10)
    videos: int = setting(300, "--data synthetic: how many videos of 4 s to render (every 20th, or the last of "
                          "fewer than 20, shows held-out people and is kept for validation); 300 hold 26,000 "
                          "distinct 8-frame clips", low=2, high=100_000)
    # stage 2: the diffusion transformer
    vae: str = setting(None, "VAE checkpoint from `train.py --stage vae` (default: runs/vae/ckpt.pt, or --init's "
                       "own VAE)", stage="diffusion")
    size: str = setting(None, "model size (default: B on a GPU, T on a CPU)", stage="diffusion",
                        choices=tuple(SIZES))
    frames: int = setting(None, "F per clip (default: 16 as the paper on a GPU, 8 on a CPU)", stage="diffusion",
                          low=1, high=256)
    motion: int = setting(2, "M motion frames before each clip (0: none)", stage="diffusion", low=0,
                         high=64)
    ref_fusion: str = setting("symbiotic", "how the portrait is fused (the paper: symbiotic)", stage="diffusion",
                              choices=FUSIONS)
    audio_fusion: str = setting("direct", "how the audio is fused (the paper: direct)", stage="diffusion",
                                choices=FUSIONS)
    prediction: str = setting(None, "network target: eps (the paper's Eq. 3), v or x0 (default: eps for the GPU "
                              "sizes, as the paper; x0 for size T, see --mouth-weight)", stage="diffusion",
                              choices=PREDICTIONS)
    schedule: str = setting("linear", "noise schedule: linear (DDPM, the official code) or cosine",
                            stage="diffusion", choices=SCHEDULES)
    min_snr_gamma: float = setting(None, "min-SNR loss weighting (default: off, plain Eq. 3; 5 is the usual value)",
                                   stage="diffusion", above=0, high=1000)
    mouth_weight: float = setting(None, "loss weight inside the mouth box (synthetic) or lower face (real data); 1: "
                                  "off (default: 1 for the GPU sizes, as the paper; 5 for size T, whose short CPU "
                                  "runs learn lip sync in minutes with it, not without)", stage="diffusion",
                                  low=0, high=100)
    motion_weight: float = setting(1.0, "loss weight where each clip moves (head outline, eyes, mouth): 1 + (W - 1) "
                                   "x a latent pixel's distance from its clip's mean frame over the batch mean; 1: "
                                   "off. 3-6 moved the heads of single windows 0.59x -> 0.81-0.86x as much as real "
                                   "ones, at 0.6 dB of re-render fidelity (README, Training)", stage="diffusion",
                                   low=1, high=100)
    blink_repeat: int = setting(1, "synthetic data: clips with a blink are drawn this many times as often, since a "
                                "small model under-produces rare blinks; 1: off", stage="diffusion", resumable=True,
                                low=1, high=1000)
    drop_audio: float = setting(0.1, "probability of dropping the audio (classifier-free guidance), independent of "
                                "the reference", stage="diffusion", low=0, high=1)
    drop_ref: float = setting(0.1, "probability of dropping the reference (classifier-free guidance)",
                              stage="diffusion", low=0, high=1)
    drop_motion: float = setting(0.3, "probability of dropping the motion frames, so the model also learns to "
                                 "draw a clip from the portrait alone rather than only copy the frames before it "
                                 "(sample.py always gives motion frames: the portrait's, then its own)",
                                 stage="diffusion", low=0, high=1)
    ema: float = setting(0.999, "EMA decay of the weights sample.py uses (warmed up: min(decay, (1 + n) / (10 + "
                         "n)))", stage="diffusion", low=0, high=1)
    compile: bool = setting(None, "torch.compile the model; --no-compile for eager (default: on a GPU, where it "
                            "is faster once compiled, a minute or two in)", stage="diffusion", resumable=True)
    temporal_kernel: str = setting(None, "temporal attention's kernel: sdpa, or triton (kernels.py: one program per "
                                   "short sequence; CUDA only) (default: triton on a GPU, where a compiled size-B step "
                                   "of 16 clips took 254 ms against 274 on an H200, for --frames + --motion up to "
                                   "128; else sdpa)", stage="diffusion",
                                   choices=tuple(TEMPORAL_KERNELS), resumable=True)


RESUMABLE = tuple(f.name for f in fields(TrainConfig) if f.metadata["resumable"])  # what --resume may change
PATHS = ("data", "cache", "vae", "init")  # settings that name files or folders
# the paths a resume may give anew, naming where the run's files are now (train.py checks that the videos and the
# VAE there are the ones the run trained on); --init is not read again on a resume, so it never needs to
MOVABLE = ("data", "cache", "vae")


def full_path(name, value):
    """A path setting's value as a full path (None and --data synthetic as they are)."""
    return value if value is None or (name == "data" and value == "synthetic") else str(Path(value).resolve())


def flag(name):
    """The command-line flag of a setting: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def add_settings(parser):
    """Add one option per TrainConfig field to an argparse parser, every default None (= not given), in one group
    per stage."""
    groups = {None: parser.add_argument_group("settings of both stages"),
              "vae": parser.add_argument_group("stage 1, the VAE (--stage vae)"),
              "diffusion": parser.add_argument_group("stage 2, the diffusion transformer (--stage diffusion)")}
    for f in fields(TrainConfig):
        meta = f.metadata
        text = meta["help"] if "default" in meta["help"] else f"{meta['help']} (default: {f.default})"
        group = groups[meta["stage"]]
        if f.type is bool:
            group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = bounded(f.type, **meta["bounds"]) if meta["bounds"] else f.type
            group.add_argument(flag(f.name), type=kind, default=None, choices=meta["choices"], help=text)


def given(args):
    """The settings the command line gave: {name: value}, those left out omitted."""
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}


def resolve(cfg):
    """Fill in the settings left at None for this device and stage, in place, and check the combinations a single
    flag cannot: the paper's settings on a GPU, a CPU demo's otherwise. Returns cfg."""
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = check_device(cfg.device).type == "cuda"
    cfg.out = cfg.out or f"runs/{cfg.stage}"
    if cfg.data != "synthetic" and not Path(cfg.data).is_dir():
        raise UserError(f"--data {cfg.data}: not a folder (make one with `python world.py` or `python data.py "
                        "prepare`), or use --data synthetic")
    if cfg.init:
        checkpoint_file(cfg.init, "--init", "no such checkpoint")
    if cfg.stage == "vae":
        if cfg.init:  # a decoder fine-tune keeps the VAE's shape
            theirs = load_vae(cfg.init).config
            shape = {"resolution": theirs.resolution, "factor": theirs.factor, "vae_width": theirs.width}
            differ = [flag(k) for k, v in shape.items() if getattr(cfg, k) not in (None, v)]
            if differ:
                theirs = ", ".join(f"{flag(k)} {v}" for k, v in shape.items())
                raise UserError(f"--init {cfg.init}: its VAE has {theirs}; a fine-tune keeps them (drop "
                                f"{', '.join(differ)})")
            cfg.resolution, cfg.factor, cfg.vae_width = shape.values()
        elif cfg.latent_noise:
            raise UserError("--latent-noise fine-tunes the decoder of a trained VAE: pass the checkpoint that holds "
                            "it with --init")
        cfg.resolution = cfg.resolution or (256 if gpu else 64)
        cfg.factor = cfg.factor or (8 if cfg.resolution >= 256 else 4)
        cfg.vae_width = cfg.vae_width or 32
        # a fine-tune starts from trained weights: 1e-4, a fifth of a new VAE's (README: the --latent-noise table)
        cfg.batch_size, cfg.lr = cfg.batch_size or 32, cfg.lr or (1e-4 if cfg.init else 5e-4)
        if cfg.resolution % (2 * cfg.factor):
            raise UserError(f"--resolution {cfg.resolution}: must be a multiple of {2 * cfg.factor}, twice --factor "
                            "(the diffusion model cuts the latents into 2x2 patches)")
        if cfg.vae_width % 4:
            raise UserError(f"--vae-width {cfg.vae_width}: must be a multiple of 4 (GroupNorm splits the channels "
                            "into equal groups of at least 4)")
        return cfg
    cfg.size = cfg.size or ("B" if gpu else "T")
    cfg.frames = cfg.frames or (16 if gpu else 8)
    # B and L at the paper's clip keep about 4.6 and 12 GiB of bf16 activations per clip for the backward (bench.py's
    # saved_mib, README): batch 16 of B would not fit an 80 GB GPU eagerly (--no-compile; compiled it would)
    cfg.batch_size = cfg.batch_size or {"B": 8, "L": 4}.get(cfg.size, 16)
    cfg.lr = cfg.lr or (3e-4 if cfg.size == "T" else 1e-4)
    # a short CPU run's recipe, measured on the README's first-model commands (about 220 steps): x0 and x5 draws faces
    # (val sync 0.92); v and x5 only coloured speckle around a moving mouth (0.88); v and x1 the same speckle (0.30);
    # eps and x1, 366 steps on two cores, noise (0.06). The GPU sizes keep the paper's eps loss, which a long run on
    # real data can afford
    cfg.prediction = cfg.prediction or ("x0" if cfg.size == "T" else "eps")
    cfg.mouth_weight = cfg.mouth_weight if cfg.mouth_weight is not None else (5.0 if cfg.size == "T" else 1.0)
    device_defaults(cfg, gpu)
    if cfg.size in ("B", "L") and not gpu:
        raise UserError(f"--size {cfg.size} needs a GPU (one step on this CPU would take minutes). On a CPU, train "
                        "the tiny model: `python train.py --size T`; on GPUs: `torchrun --nproc_per_node=N train.py "
                        f"--size {cfg.size} --data DIR` with DIR from `python data.py prepare`.")
    cfg.vae = cfg.vae or cfg.init or "runs/vae/ckpt.pt"  # a diffusion checkpoint holds the VAE of its latents
    checkpoint_file(cfg.vae, "--vae", "no VAE checkpoint; train one first with `python train.py --stage vae`")
    return cfg


def checkpoint_file(path, option, missing):
    """Refuse, before any work, a checkpoint option naming a folder (a run's: its file is ckpt.pt inside) or
    nothing (`missing` says what to do)."""
    if Path(path).is_dir():
        raise UserError(f"{option} {path}: a folder; pass the checkpoint in it, e.g. {Path(path) / 'ckpt.pt'}")
    if not Path(path).is_file():
        raise UserError(f"{option} {path}: {missing}")


def device_defaults(cfg, gpu):
    """Fill in, in place, the diffusion settings whose default is the device's: --compile (on a GPU) and
    --temporal-kernel (triton on a GPU, for clips its programs can hold); refuse triton where it cannot run."""
    cfg.compile = gpu if cfg.compile is None else cfg.compile
    too_long = cfg.frames + cfg.motion > MAX_LENGTH
    cfg.temporal_kernel = cfg.temporal_kernel or ("triton" if gpu and not too_long else "sdpa")
    if cfg.temporal_kernel == "triton" and not gpu:
        raise UserError("--temporal-kernel triton: a GPU kernel; on a CPU use sdpa (the default there)")
    if cfg.temporal_kernel == "triton" and too_long:
        raise UserError(f"--temporal-kernel triton: holds sequences of at most {MAX_LENGTH} frames, and --frames "
                        f"{cfg.frames} + --motion {cfg.motion} are more; use sdpa")


def refuse_other_stage(stage, settings):
    """A setting of the other stage is a UserError: it would be silently ignored."""
    other = [flag(f.name) for f in fields(TrainConfig)
             if f.name in settings and f.metadata["stage"] not in (None, stage)]
    if other:
        raise UserError(f"{', '.join(other)}: not a setting of the {stage} stage; --stage "
                        f"{'diffusion' if stage == 'vae' else 'vae'} takes {'it' if len(other) == 1 else 'them'}")


def new_config(settings):
    """The TrainConfig of a new run from the settings given on the command line ({name: value}), defaults
    resolved, paths made absolute. A setting that would be silently ignored (one of the other stage, --videos with
    --data DIR) is a UserError."""
    refuse_other_stage(settings.get("stage", TrainConfig.stage), settings)
    if "videos" in settings and settings.get("data", TrainConfig.data) != "synthetic":
        raise UserError("--videos: how many synthetic videos to render; with --data DIR its videos are used, so drop "
                        "--videos")
    cfg = resolve(TrainConfig(**settings))
    for name in PATHS:  # saved as full paths: a resume or an --export from another folder names the same files
        setattr(cfg, name, full_path(name, getattr(cfg, name)))
    return cfg


# the settings a saved run may leave at None: optional ones, and those a resume fills in (device_defaults)
OPTIONAL = ("out", "init", "min_snr_gamma", "compile", "temporal_kernel")


def check_saved(saved):
    """A checkpoint's settings (a dict) must be what the command line and `resolve` could have made: each setting of
    its stage present, of its type, and within its bounds or among its choices. An edited checkpoint, or one of
    another version, fails here with a ValueError naming the setting, not in the middle of a step."""
    if saved.get("stage") not in STAGES:
        raise ValueError(f"its stage is {saved.get('stage')!r}")
    for f in fields(TrainConfig):  # a setting newer than the checkpoint: its default, as TrainConfig(**saved) fills in
        value, meta = saved.get(f.name, f.default), f.metadata
        optional = f.name in OPTIONAL or f.name not in saved
        if meta["stage"] not in (None, saved["stage"]) or (value is None and optional):
            continue
        kinds = {bool: bool, int: int, float: (int, float), str: str}[f.type]
        fine = isinstance(value, kinds) and (f.type is bool or not isinstance(value, bool))
        if fine and meta["bounds"]:
            try:
                fine = bounded(f.type, **meta["bounds"])(str(value)) == value
            except (argparse.ArgumentTypeError, ValueError):
                fine = False
        if not fine or (meta["choices"] and value not in meta["choices"]):
            raise ValueError(f"its setting {flag(f.name)} is {value!r}")


def resumed_config(saved, settings, out):
    """The TrainConfig of a resumed run: the settings its checkpoint saved (a dict, checked by check_saved), with the
    resumable ones the command line changed, the MOVABLE paths it gave (where the run's files are now) and the run
    folder where it is now. Repeating a saved setting is fine; changing one that is not resumable, giving one of the
    other stage, or swapping synthetic videos for a folder (or back) is a UserError (it would silently not happen).
    A path the run still needs that is gone, and was not given anew, is a UserError that says how to give it."""
    def same(name, a, b):  # paths compare as the files they name: runs/vae/ckpt.pt is /home/me/runs/vae/ckpt.pt
        return a == b or (name in PATHS and b is not None and Path(a).resolve() == Path(b).resolve())
    check_saved(saved)
    refuse_other_stage(saved["stage"], settings)
    moved = {name: full_path(name, value) for name, value in settings.items() if name in MOVABLE}
    fixed = sorted(name for name, value in settings.items()
                   if name not in (*RESUMABLE, *moved, "out") and not same(name, value, saved.get(name)))
    was = saved.get("data", TrainConfig.data)
    if "data" in moved and (moved["data"] == "synthetic") != (was == "synthetic"):
        raise UserError(f"--data {moved['data']}: the run trained on "
                        f"{'synthetic videos' if was == 'synthetic' else f'the videos of {was}'}; a resumed run "
                        "keeps its kind of data (start a new run from it with --init)")
    if fixed:
        raise UserError(f"{', '.join(flag(k) for k in fixed)}: a resumed run keeps the settings in its checkpoint; "
                        f"only {', '.join(flag(k) for k in RESUMABLE)} and --max-minutes may change (and "
                        f"{', '.join(flag(k) for k in MOVABLE)} may name where the run's files are now)")
    cfg = TrainConfig(**{**saved, "out": str(out), **moved, **{k: v for k, v in settings.items() if k in RESUMABLE}})
    for name, what, it in (("data", "training videos", "they"), ("vae", "VAE", "it")):
        path = getattr(cfg, name)
        if name not in moved and path not in (None, "synthetic") and not Path(path).exists():
            raise UserError(f"{flag(name)} {path}: no longer there (the run's {what}); if {it} moved, pass "
                            f"{flag(name)} with the new place")
    try:  # a run from a GPU machine may be continued on a CPU with --device cpu
        gpu = check_device(cfg.device).type == "cuda"
    except UserError as e:
        raise UserError(f"{e} (the run was saved with --device {saved['device']})") from None
    if cfg.stage == "diffusion":  # compiling and the kernel change the speed, not the run: on another kind of
        # device, unless given, the defaults of the one the run continues on
        if torch.device(saved["device"]).type != torch.device(cfg.device).type:
            cfg.compile, cfg.temporal_kernel = settings.get("compile"), settings.get("temporal_kernel")
        device_defaults(cfg, gpu)
    return cfg

