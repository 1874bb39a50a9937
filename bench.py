"""Speed and memory: what Eq. 4 saves, training throughput, sampling speed. Ratios on any device; absolute times
only mean something on the device that measured them (say which).

  python bench.py --quick                          # a few minutes on a CPU
  python bench.py --device cuda                    # the full tables on a GPU (bf16 autocast, eager and compiled)
  python bench.py --device cuda --tables sampling  # one table again

Tables (also written as JSON, --json):
  1a attention alone: full attention over F*P tokens vs spatial (P per frame) + temporal (F per position), beside
     Eq. 4's prediction (F*P)^2 / (F*P^2 + P*F^2) = F*P / (F + P);
  1b whole blocks: a full-attention block vs our spatial-temporal block (with the portrait's symbiotic tokens, without
     the audio's cross-attention: the same in both), beside the ratio of their FLOP counts
     (projections and MLP cost the same in both, so the block saves far less than attention alone);
  1c temporal attention alone at its short lengths (F + 2 motion frames): SDPA's default kernel against each kernel
     forced and kernels.py's Triton kernel (CUDA), and a plain batched-matmul softmax;
  2  training throughput (clips/s, tokens/s, and MFU on CUDA) per model size, eager and (--compile) compiled, the
     compiled step on CUDA once per temporal kernel (train.py --temporal-kernel);
  3  sampling speed: seconds of compute per second of video (and its inverse, x real time): DDIM 25 with audio
     guidance x2 (2 model passes per step, the old default) and sample.py's default
     (DPM-Solver++ in 8 steps, no guidance: 1 pass), per model size and batch, and for the shipped checkpoint.
     On CUDA at the paper's shape (16 frames of 256x256), on a CPU at the demo's (8 frames of 64x64);
  4  data: clips per second the training sampler assembles on one CPU core from memory-mapped latents, at the
     demo's shape and the paper's (16 frames of 32x32x4 latents + 2 motion frames + mel windows), beside what the
     official code's best consumes (48.5 clips/s per H100, the README's measurement of the official code): a GPU
     must never wait for it.
Peak memory is measured on CUDA (torch.cuda.max_memory_allocated); on a CPU it is not tracked ("-"). Table 2 also
counts the activations a training step saves for its backward (saved_mib), on any device.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import (Parser, add_device, atomic_write, bounded, check_device, file_name, out_of_memory, user_errors,
                    writable_file)
from data import ClipSampler, VideoCache
from diffusion import Diffusion
from kernels import MAX_LENGTH, TEMPORAL_KERNELS, temporal_attention
from letstalk import SIZES, Block, LetsTalk, config_for, forward_flops, forward_gflops
from sample import AUDIO_SCALE, DEFAULT_CKPT, SAMPLER, SAMPLER_STEPS, generate, load_model
from vae import VAE, VAEConfig

# dense bf16 tensor-core peaks (FLOP/s, NVIDIA's data sheets), the denominator of MFU. The first name contained
# in torch.cuda.get_device_name wins, so the PCIe and NVL cards come before the SXM ones of the same chip.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12,
             "A100": 312e12}


def gpu_peak(device):
    """The dense bf16 peak (FLOP/s) of a CUDA device from PEAK_BF16, or None for a GPU not listed."""
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def measure(fn, device, repeats):
    """Median wall time (s) of fn() over `repeats` runs after one warm-up, and peak memory (MiB, CUDA only), on
    `device` (not the current GPU: --device cuda:1 waits for and measures cuda:1)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    memory = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return statistics.median(times), memory


def measured(fn, device, repeats, what):
    """measure(fn, device, repeats), or None when it does not fit in memory (CPU or GPU): then it says which
    measurement was skipped (its row is left out of the table) and frees what the attempt left behind."""
    try:
        return measure(fn, device, repeats)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not out_of_memory(e):
            raise
    print(f"skipped {what}: out of memory")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return None


def autocast(device):
    """bf16 autocast on CUDA; a disabled context (fp32) on a CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def attention_table(device, frames, patches, width, heads, batch, repeats):
    """Table 1a: forward + backward of the attention operation alone."""
    rows = []
    d = width // heads
    for F_ in frames:
        for P in patches:
            qkv = [torch.randn(batch, heads, F_ * P, d, device=device, requires_grad=True) for _ in range(3)]

            def full():
                with autocast(device):
                    F.scaled_dot_product_attention(*qkv).sum().backward()

            def factorized():
                with autocast(device):
                    s = [rearrange(t, "b h (f p) d -> (b f) h p d", f=F_) for t in qkv]  # spatial: P per frame
                    out = rearrange(F.scaled_dot_product_attention(*s), "(b f) h p d -> b h (f p) d", f=F_)
                    t_ = [rearrange(t, "b h (f p) d -> (b p) h f d", f=F_) for t in qkv]  # temporal: F per position
                    out = out + rearrange(F.scaled_dot_product_attention(*t_), "(b p) h f d -> b h (f p) d", p=P)
                    out.sum().backward()
            full_timed = measured(full, device, repeats, f"table 1a at F={F_}, P={P}, full attention")
            factorized_timed = full_timed and measured(factorized, device, repeats, f"table 1a at F={F_}, P={P}")
            if not factorized_timed:
                continue
            (t_full, m_full), (t_fact, m_fact) = full_timed, factorized_timed
            rows.append({"F": F_, "P": P, "full_s": t_full, "factorized_s": t_fact, "ratio": t_full / t_fact,
                         "eq4": F_ * P / (F_ + P), "full_mib": m_full, "factorized_mib": m_fact})
    return rows


def block_table(device, frames, patches, width, heads, batch, repeats):
    """Table 1b: forward + backward of one whole block, full attention vs spatial-temporal, with the portrait's
    symbiotic tokens and no direct-fusion context (the audio's cross-attention costs the same in both)."""
    rows = []
    for F_ in frames:
        for P in patches:
            side = int(P ** 0.5) * 2
            result = {"F": F_, "P": P}
            for kind in ("full", "factorized"):
                cfg = config_for("T", width=width, heads=heads, frames=F_, latent_size=side, motion=0,
                                 attention=kind)
                block = Block(cfg).to(device)
                x = torch.randn(batch * F_, P, width, device=device, requires_grad=True)
                c = torch.randn(batch, width, device=device)
                ref = torch.randn(batch * F_, P, width, device=device)  # the symbiotic reference tokens

                def step():
                    with autocast(device):
                        out, _, sym = block(x, c, None, ref)
                        (out.float().sum() + sym.float().sum()).backward()
                timed = measured(step, device, repeats, f"table 1b at F={F_}, P={P}, {kind} attention")
                if timed is None:
                    break
                result[f"{kind}_s"], result[f"{kind}_mib"] = timed
                with torch.device("meta"):
                    meta_block, meta_x = Block(cfg), torch.randn(batch * F_, P, width)
                    meta_c, meta_ref = torch.randn(batch, width), torch.randn(batch * F_, P, width)
                result[f"{kind}_gflop"] = forward_flops(meta_block, meta_x, meta_c, None, meta_ref) / 1e9
            else:
                result["ratio"] = result["full_s"] / result["factorized_s"]
                result["flop_ratio"] = result["full_gflop"] / result["factorized_gflop"]
                rows.append(result)
    return rows


KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
           "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def matmul_attention(q, k, v):
    """softmax(Q K^T / sqrt(d)) V as two batched matrix products: (N, h, L, d) -> (N, h, L, d)."""
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v


def forced_sdpa(backend):
    """scaled_dot_product_attention restricted to one of its kernels (it raises if that kernel cannot run)."""
    def attend(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return attend


def temporal_kernel_table(device, frames, motion, patches, width, heads, batch, repeats):
    """Table 1c: forward + backward of temporal attention alone, batch * P sequences of F + motion frames, with
    SDPA's own choice of kernel, each SDPA kernel forced and kernels.temporal_attention (CUDA only: a CPU has one
    fused SDPA kernel and the math one), and matmul_attention. The heads are laid out as the model's projections
    lay them out, (N, L, H, d) seen as (N, H, L, d). speedup = default time / this kernel's time (above 1: faster
    than the default)."""
    kernels = {"sdpa": F.scaled_dot_product_attention, "matmul": matmul_attention}
    d = width // heads
    if device.type == "cuda":
        kernels.update({name: forced_sdpa(backend) for name, backend in KERNELS.items()})
        if d >= 16 and not d & (d - 1):
            kernels["triton"] = temporal_attention
        else:
            print(f"table 1c: no triton rows (kernels.py takes a head dim that is a power of two >= 16, here {d})")
    rows = []
    for F_ in frames:
        L = F_ + motion
        # bf16 on CUDA, as the model's projections hand them over under autocast: autocast casts SDPA's inputs but
        # not a custom op's, so fp32 inputs would time the Triton kernel in fp32 against SDPA in bf16
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        qkv = [torch.randn(batch * patches, L, heads, d, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3)]
        times = {}
        for name, attend in kernels.items():
            if name == "triton" and L > MAX_LENGTH:  # a whole sequence no longer fits one program
                continue

            def step():
                with autocast(device):
                    attend(*(t.transpose(1, 2) for t in qkv)).float().sum().backward()
            try:
                timed = measured(step, device, repeats, f"table 1c at L={L}, {name}")
            except RuntimeError:
                if name not in KERNELS:
                    raise
                continue  # this forced SDPA kernel does not take these shapes or dtype
            if timed is None:
                continue
            times[name], memory = timed
            rows.append({"L": L, "sequences": batch * patches, "kernel": name, "seconds": times[name],
                         "speedup": times["sdpa"] / times[name] if "sdpa" in times else None, "peak_mib": memory})
    return rows


def throughput_table(device, shapes, sizes, batch, repeats, compile_shape=None):
    """Table 2: a full training step (forward, backward, AdamW) on random latents, per size and shape, plus the
    same step torch.compile'd at compile_shape (None: no compiled rows), on CUDA once per temporal kernel."""
    runs = [(size, shape, False, "sdpa") for size in sizes for shape in shapes]
    temporal = TEMPORAL_KERNELS if device.type == "cuda" else ["sdpa"]
    runs += [(size, compile_shape, True, kernel) for size in sizes for kernel in temporal] if compile_shape else []
    rows = [throughput_row(device, size, frames, latent, batch, repeats, compiled, kernel)
            for size, (frames, latent), compiled, kernel in runs]
    return [row for row in rows if row is not None]


def saved_for_backward_mib(step, params):
    """MiB of the tensors autograd keeps for the backward while step() runs, the weights themselves excluded (their
    bf16 copies under autocast included): the activation memory of a training step, counted on any device, where
    CUDA's peak_mib also holds weights, gradients, AdamW state and temporaries. Tensors are told apart by the
    address of their storage, so several views of one count once."""
    storages = {}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        step()
    weights = {p.untyped_storage().data_ptr() for p in params}
    return sum(n for address, n in storages.items() if address not in weights) / 2 ** 20


def throughput_row(device, size, frames, latent, batch, repeats, compiled=False, temporal="sdpa"):
    """One row of table 2 (None if it does not fit in memory), temporal attention computed by
    TEMPORAL_KERNELS[temporal]; the model is freed on return, before the next."""
    cfg = config_for(size, frames=frames, latent_size=latent)
    model = LetsTalk(cfg).to(device)
    model.set_temporal_kernel(TEMPORAL_KERNELS[temporal])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as train.py
    net = compiled_model(model) if compiled else model
    s = latent
    x = torch.randn(batch, frames, 4, s, s, device=device)
    args = (torch.randint(0, 1000, (batch,), device=device), torch.randn(batch, 4, s, s, device=device),
            torch.randn(batch, frames, 20, 80, device=device), torch.randn(batch, 2, 4, s, s, device=device))

    def step():
        with autocast(device):
            loss = (net(x, *args).float() - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    timed = measured(step, device, repeats,
                     f"table 2, size {size} at {frames}x{latent}x{latent}x4{', compiled' if compiled else ''}")
    if timed is None:
        return None
    seconds, memory = timed
    step_flops = 3 * forward_gflops(cfg, batch) * 1e9  # backward costs about twice the forward
    row = {"size": size, "frames": frames, "latent": s, "batch": batch, "compiled": compiled, "temporal": temporal,
           "step_s": seconds,
           "clips_s": batch / seconds, "tokens_s": batch * frames * (s // 2) ** 2 / seconds,
           "tflop_s": step_flops / seconds / 1e12, "peak_mib": memory,
           "peak_mib_per_clip": None if memory is None else memory / batch,
           # counted in an eager step (the hooks would only see what a compiled graph chooses to save)
           "saved_mib": None if compiled else saved_for_backward_mib(step, model.parameters())}
    if device.type == "cuda":
        peak = gpu_peak(device)
        row["mfu"] = step_flops / seconds / peak if peak else None
    return row


def compiled_model(model):
    """torch.compile(model) with a fresh compile cache (each measured model compiles on its own, in the warm-up run
    of measure) and static shapes (a second batch size recompiles rather than falling back to dynamic shapes)."""
    torch._dynamo.reset()
    return torch.compile(model, dynamic=False)


def sampling_table(device, sizes, shape, batches, samplers, repeats, compiled=False):
    """Table 3: sample.generate for one window with each of `samplers` ((name, steps, audio guidance scale):
    a scale of 1 runs the model once per step, any other twice) and random weights per size (and a random VAE for
    the portrait and the decoding) at each batch size, eager and (compiled) torch.compile'd, plus the shipped
    checkpoint on a CPU."""
    frames, latent = shape
    factor = 8 if latent >= 32 else 4  # 256x256 frames for the paper's 32x32 latents, 64x64 for the CPU demo's

    def random_weights(size):  # (model, VAE, the paper's diffusion: epsilon target, linear schedule)
        return (LetsTalk(config_for(size, frames=frames, latent_size=latent)).to(device).eval(),
                VAE(VAEConfig(resolution=latent * factor, factor=factor)).to(device).eval(), Diffusion())
    models = [(size, random_weights) for size in sizes]
    if device.type == "cpu" and DEFAULT_CKPT.exists():
        models.append(("shipped", lambda _: load_model(DEFAULT_CKPT, device)[:3]))
    return [row for name, build in models
            for row in sampling_rows(device, name, *build(name), batches, samplers, repeats, compiled)]


def sampling_rows(device, name, model, vae, diffusion, batches, samplers, repeats, compiled):
    """Table 3's rows for one model, per batch size, eager then (compiled) compiled, each sampler (a row that does
    not fit in memory is left out); the model is freed on return."""
    F_, res = model.cfg.frames, vae.config.resolution
    rows = []
    for batch in batches:
        for use_compile in (False, True) if compiled else (False,):
            net = compiled_model(model) if use_compile else model
            image = torch.zeros(batch, res, res, 3, dtype=torch.uint8).numpy()
            mel = torch.randn(batch, F_, model.cfg.mel_window, model.cfg.n_mels)
            for sampler, steps, audio_scale in samplers:
                timed = measured(lambda: generate(net, vae, diffusion, image, mel, steps, sampler, audio_scale,
                                                  progress=False, device=device), device, repeats,
                                 f"table 3, {name} at batch {batch}{', compiled' if use_compile else ''}, {sampler}")
                if timed is None:
                    continue
                seconds, memory = timed
                video_seconds = batch * F_ / 25
                rows.append({"model": name, "batch": batch, "compiled": use_compile, "frames": F_,
                             "resolution": res, "sampler": sampler, "steps": steps, "audio_scale": audio_scale,
                             "passes_per_step": 1 if audio_scale == 1 else 2,
                             "seconds_per_video_second": seconds / video_seconds,
                             "realtime_x": video_seconds / seconds, "peak_mib": memory})
    return rows


OFFICIAL_BEST_CLIPS_S = 48.5  # the official VDT-B/2 at its best on one H100: flash attention, torch.compile, batch 8


def data_table(shapes, batch, repeats, videos=20, frames_per_video=250):
    """Table 4: ClipSampler.batch on one CPU thread, from a VideoCache of random fp16 latents and mel windows
    (`videos` videos of `frames_per_video` frames, written to a temporary folder and memory-mapped), per shape:
    clips per second, and how many GPUs at the official best of 48.5 clips/s each one core keeps fed."""
    rows, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for frames, latent in shapes:
            with tempfile.TemporaryDirectory() as folder:
                names = [f"video{i:03d}" for i in range(videos)]
                for name in names:
                    torch.save({"latents": torch.randn(frames_per_video, 4, latent, latent).half(),
                                "mel": torch.randn(frames_per_video, 20, 80).half()}, Path(folder) / f"{name}.pt")
                sampler = ClipSampler(VideoCache(folder, names), frames, motion=2)
                steps = iter(range(10 ** 9))  # a new step, so new clips, every call
                seconds, _ = measure(lambda: sampler.batch(next(steps), 0, batch), torch.device("cpu"), repeats)
            rows.append({"frames": frames, "latent": latent, "batch": batch, "clips_s": batch / seconds,
                         "gpus_fed": batch / seconds / OFFICIAL_BEST_CLIPS_S})
    finally:
        torch.set_num_threads(threads)
    return rows


def show(title, rows, columns):
    """Print a table: the title, then `columns` of each row dict (floats to 3 digits, None as "-")."""
    print(f"\n{title}")
    print(" | ".join(f"{c:>10}" for c in columns))
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append(f"{'-':>10}" if v is None else f"{v:>10.3g}" if isinstance(v, float) else f"{v!s:>10}")
        print(" | ".join(cells))


TABLES = ("attention", "block", "temporal", "throughput", "sampling", "data")
USED_BY = {"width": TABLES[:3], "heads": TABLES[:3], "batch": TABLES[:5], "sizes": TABLES[3:5],
           "compile": TABLES[3:5]}  # the tables each option sets: one no chosen table uses would be silently ignored


def some_of(choices):
    """An argparse `type`: a comma-separated list of some of `choices`, spaces around the commas allowed -> list."""
    def parse(text):
        chosen = [name.strip() for name in text.split(",")]
        if not set(chosen) <= set(choices):
            raise argparse.ArgumentTypeError(f"{text}: choose from {','.join(choices)}")
        return chosen
    return parse


def main(argv=None):
    """`python bench.py`: measure and print tables 1a-4, write them as JSON, return them (argv=None: sys.argv)."""
    parser = Parser(prog="bench.py", description=__doc__.split("\n\n")[0])
    add_device(parser)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats (CPU: a few minutes)")
    parser.add_argument("--tables", type=some_of(TABLES), default=list(TABLES), help="which tables to measure, "
                        "comma-separated: attention (1a), block (1b), temporal (1c), throughput (2), sampling (3), "
                        "data (4) (default: all of them)")
    parser.add_argument("--width", type=bounded(int, 1, 8192),
                        help="width of tables 1a-1c, a multiple of --heads and of 4 (default: 768, size B's)")
    parser.add_argument("--heads", type=bounded(int, 1, 256), help="attention heads of tables 1a-1c (default: 12)")
    parser.add_argument("--batch", type=bounded(int, 1, 4096), help="batch size of tables 1-3 (table 4 assembles "
                        "batches of 8); sampling also runs at batch 1 (default: 8 on CUDA, 1 on CPU)")
    parser.add_argument("--sizes", type=some_of(tuple(SIZES)), help="model sizes for tables 2-3, comma-separated "
                        "(default: T,S,B on CUDA, T on CPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure tables 2-3 torch.compile'd (default: on CUDA; a CPU compiles for minutes)")
    parser.add_argument("--json", type=file_name, default=Path("bench.json"),
                        help="where to write the tables (default: bench.json)")
    args = parser.parse_args(argv)
    unused = [f"--{name}" for name, tables in USED_BY.items()
              if getattr(args, name) is not None and not set(args.tables) & set(tables)]
    if unused:
        parser.error(f"{', '.join(unused)}: not used by --tables {','.join(args.tables)}")
    args.width, args.heads = args.width or 768, args.heads or 12
    if args.width % args.heads or args.width % 4:  # 4: the 2D sin-cos position embedding's quarters
        parser.error(f"--width {args.width} must be a multiple of --heads {args.heads} and of 4")
    with user_errors():  # Ctrl-C, out of memory, a closed output: one line, or none
        return run(args)


def run(args):
    """bench.py's work for the parsed command line: measure the chosen tables, print them, write the JSON."""
    device = check_device(args.device)
    writable_file(args.json, "--json", (".json",))
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    compiled = gpu if args.compile is None else args.compile
    batch = args.batch or (8 if gpu else 1)
    frames = [16, 32] if args.quick else [4, 8, 16, 32]
    patches = [64, 256] if args.quick else [64, 256, 1024]
    repeats = 2 if args.quick else 5
    sizes = args.sizes or (["T", "S", "B"] if gpu else ["T"])
    paper, demo = (16, 32), (8, 16)  # the paper's clip (16 frames of 32x32x4 latents) and the CPU demo's (8 of 16x16x4)
    shapes = [demo] if args.quick else [paper, demo]
    device_name = torch.cuda.get_device_name(device) if gpu else "cpu"
    peak = gpu_peak(device) if gpu else None
    peak_text = f" (dense bf16 peak {peak / 1e12:.0f} TFLOP/s, the MFU denominator)" if peak else ""
    shape = "".join(f", {name} {value}" for name, value in (("batch", batch), ("width", args.width))
                    if set(args.tables) & set(USED_BY[name]))  # the settings of the chosen tables only
    print(f"device: {device_name}{peak_text}, {'bf16 autocast' if gpu else 'fp32'}{shape}, torch {torch.__version__}")
    measure_table = {
        "attention": lambda: attention_table(device, frames, patches, args.width, args.heads, batch, repeats),
        "block": lambda: block_table(device, frames, patches, args.width, args.heads, batch, repeats),
        "temporal": lambda: temporal_kernel_table(device, [8, 16, 32], 2, 256, args.width, args.heads, batch,
                                                  repeats),
        "throughput": lambda: throughput_table(device, shapes, sizes, batch, repeats,
                                               compile_shape=shapes[0] if compiled else None),
        "sampling": lambda: sampling_table(device, sizes, paper if gpu else demo, sorted({1, batch}),
                                           [(SAMPLER, SAMPLER_STEPS, AUDIO_SCALE)] if args.quick else
                                           [("ddim", 25, 2.0), (SAMPLER, SAMPLER_STEPS, AUDIO_SCALE)],
                                           1 if args.quick else 2, compiled),
        "data": lambda: data_table([demo, paper], 8, 5 if args.quick else 50),
    }
    tables = {name: measure_table[name]() for name in TABLES if name in args.tables}
    columns = {
        "attention": ("1a. attention alone, forward + backward: full / (spatial + temporal)",
                      ["F", "P", "full_s", "factorized_s", "ratio", "eq4", "full_mib", "factorized_mib"]),
        "block": ("1b. whole block, forward + backward: full-attention block / spatial-temporal block",
                  ["F", "P", "full_s", "factorized_s", "ratio", "flop_ratio", "full_mib", "factorized_mib"]),
        "temporal": ("1c. temporal attention alone, forward + backward: speedup over SDPA's default kernel",
                     ["L", "sequences", "kernel", "seconds", "speedup", "peak_mib"]),
        "throughput": ("2. training step (forward, backward, AdamW)",
                       ["size", "frames", "latent", "batch", "compiled", "temporal", "clips_s", "tokens_s", "tflop_s",
                        "mfu", "peak_mib", "peak_mib_per_clip", "saved_mib"]),
        "sampling": ("3. sampling one window",
                     ["model", "batch", "compiled", "frames", "resolution", "sampler", "steps", "audio_scale",
                      "passes_per_step", "seconds_per_video_second", "realtime_x", "peak_mib"]),
        "data": ("4. data: clips assembled per second on one CPU core (memory-mapped latents)",
                 ["frames", "latent", "batch", "clips_s", "gpus_fed"]),
    }
    for name, rows in tables.items():
        show(columns[name][0], rows, columns[name][1])
    result = {"device": device_name, "torch": torch.__version__, "peak_bf16_flop_s": peak, "batch": batch,
              "width": args.width, **tables}
    atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    print(f"wrote {args.json}")
    return tables


if __name__ == "__main__":
    main()
