"""Tests of letstalk.py: shapes, the factorized attention, adaLN-Zero, condition drops and the fusion schemes."""

import pytest
import torch

import letstalk as L

S, F, C = 8, 4, 4  # latent size, frames, channels of the small inputs


def inputs(B=2, frames=F, motion=2, size=S, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(B, frames, C, size, size, generator=g), t=torch.randint(0, 1000, (B,), generator=g),
                ref=torch.randn(B, C, size, size, generator=g),
                mel=torch.randn(B, frames, 20, 80, generator=g),
                motion=torch.randn(B, motion, C, size, size, generator=g) if motion else None)


def tiny(**overrides):
    return L.config_for("T", latent_size=S, frames=F, **overrides)


def randomize(model, seed=0):
    """Give every parameter random values, so no zero-initialised layer hides a path through the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("ref_fusion", L.FUSIONS)
@pytest.mark.parametrize("audio_fusion", L.FUSIONS)
@pytest.mark.parametrize("motion", [0, 2])
def test_output_shape_equals_input_shape(ref_fusion, audio_fusion, motion):
    model = randomize(L.LetsTalk(tiny(ref_fusion=ref_fusion, audio_fusion=audio_fusion, motion=motion)))
    batch = inputs(motion=motion)
    out = model(**batch, drop_ref=torch.tensor([True, False]), drop_audio=torch.tensor([False, True]))
    assert out.shape == batch["x"].shape and torch.isfinite(out).all()


@pytest.mark.parametrize("size", ["B", "L"])
def test_big_sizes_run_one_forward_pass(size):
    # L runs on the meta device: every layer and reshape of its forward runs on shapes only. Initialising its 713M
    # parameters on the CPU would take 15 s, and B already runs the same code with real numbers.
    device = "meta" if size == "L" else "cpu"
    x = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs(B=1, frames=2).items()}
    with torch.device(device), torch.no_grad():
        model = L.LetsTalk(L.config_for(size, latent_size=8, frames=2))
        if not device == "meta":
            randomize(model.final)  # zero-initialised (adaLN-Zero): without this B's output is 0 whatever comes in
        out = model(**x)
    assert out.shape == (1, 2, C, 8, 8)
    assert out.is_meta or (torch.isfinite(out).all() and out.std() > 0.01)
    print(f"LetsTalk-{size}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


def test_forward_makes_every_tensor_on_the_input_device():
    # A GPU run fails if forward builds a tensor on the CPU (torch.arange without device=...). The meta device
    # stands in for the GPU: a model moved there (outside any `with torch.device`) with inputs there raises on
    # any CPU tensor it meets. Every fusion scheme, motion frames and condition drops, so each path runs.
    meta = torch.device("meta")
    for ref_fusion, audio_fusion in (("symbiotic", "direct"), ("siamese", "siamese"), ("direct", "symbiotic")):
        model = L.LetsTalk(tiny(ref_fusion=ref_fusion, audio_fusion=audio_fusion)).to(meta)
        x = {k: v.to(meta) for k, v in inputs().items()}
        drop = torch.tensor([True, False], device=meta)
        out = model(**x, drop_ref=drop, drop_audio=drop, drop_motion=drop)
        assert out.device == meta and out.shape == x["x"].shape


def _block_streams(cfg, B=2):
    torch.manual_seed(0)
    block = randomize(L.LetsTalk(cfg)).blocks[0]
    P = (S // 2) ** 2
    x = torch.randn(B * F, P, cfg.width)
    c = torch.randn(B, cfg.width)
    return block, x, c, P


def test_spatial_attention_never_mixes_frames_and_full_attention_does():
    block, x, c, P = _block_streams(tiny(motion=0))
    y0, _ = block.spatial(x, c)
    x1 = x.clone()
    x1[1] += torch.randn(x1[1].shape)  # frame 1 of the first clip (random: LayerNorm would erase a constant)
    y1, _ = block.spatial(x1, c)
    changed = (y1 - y0).abs().flatten(1).amax(1) > 1e-6
    assert changed.tolist() == [False, True] + [False] * (len(x) - 2)
    full, x, c, P = _block_streams(tiny(motion=0, attention="full"))
    x1 = x.clone()
    x1[1] += torch.randn(x1[1].shape)
    y0, _ = full.spatial(x, c)
    y1, _ = full.spatial(x1, c)
    changed = (y1 - y0).abs().flatten(1).amax(1) > 1e-6
    assert changed.tolist() == [True] * F + [False] * F  # every frame of that clip, no frame of the other clip


def test_temporal_attention_never_mixes_patch_positions():
    block, x, c, P = _block_streams(tiny(motion=2))
    motion = torch.randn(2, 2, P, x.shape[-1])
    y0, m0 = block.temporal(x, motion, 2)
    x1 = x.clone()
    x1[0, 5] += torch.randn(x1.shape[-1])  # patch 5 of frame 0 of the first clip
    y1, m1 = block.temporal(x1, motion, 2)
    changed = (y1 - y0).abs().amax(-1) > 1e-6  # (B*F, P)
    assert changed[:F, 5].all() and changed.sum() == F  # patch 5 of every frame of that clip, nothing else
    assert (m1 - m0)[0, :, 5].abs().amax() > 1e-6 and (m1 - m0).abs().amax(-1).gt(1e-6).sum() == 2


def test_motion_frames_act_only_through_temporal_attention():
    model = randomize(L.LetsTalk(tiny(motion=2)))
    a, b = inputs(), inputs()
    b["motion"] = b["motion"] + 1.0
    assert (model(**a) - model(**b)).abs().max() > 1e-4
    with torch.no_grad():
        for block in model.blocks:
            block.temporal_fc.weight.zero_()
            block.temporal_fc.bias.zero_()
    assert torch.allclose(model(**a), model(**b))


def test_every_block_is_the_identity_at_initialisation():
    for ref_fusion, audio_fusion in [("symbiotic", "direct"), ("direct", "symbiotic"), ("siamese", "siamese")]:
        model = L.LetsTalk(tiny(ref_fusion=ref_fusion, audio_fusion=audio_fusion))
        P, D = (S // 2) ** 2, model.cfg.width
        x, c = torch.randn(2 * F, P, D), torch.randn(2, D)
        motion, sym = torch.randn(2, 2, P, D), torch.randn(2 * F, P, D)
        guides = torch.randn(2 * F, 7, D)
        for block in model.blocks:
            contexts = {name: torch.randn(2 * F, 5, D) for name in block.cross_attn}
            y, m, s = block(x, c, motion, sym, contexts, guides)
            assert torch.equal(y, x) and torch.equal(m, motion) and torch.equal(s, sym)


@pytest.mark.parametrize("ref_fusion, audio_fusion", [("symbiotic", "direct"), ("siamese", "siamese"),
                                                      ("direct", "symbiotic")])
def test_training_with_condition_drops_changes_every_parameter(ref_fusion, audio_fusion):
    torch.manual_seed(0)
    model = L.LetsTalk(tiny(ref_fusion=ref_fusion, audio_fusion=audio_fusion, depth=2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    for step in range(4):
        batch = inputs(B=4, seed=step)
        drops = torch.tensor([True, False, True, False])  # forced drops reach the null embeddings
        out = model(**batch, drop_ref=drops, drop_audio=drops.roll(1), drop_motion=drops.roll(2))
        loss = (out - batch["x"]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


@pytest.mark.parametrize("ref_fusion, audio_fusion", [("symbiotic", "direct"), ("siamese", "siamese")])
def test_a_dropped_condition_is_ignored_only_by_the_samples_it_is_dropped_for(ref_fusion, audio_fusion):
    """drop_* (B,) swaps a sample's condition for its learned null (classifier-free guidance): sample 0 drops it and
    must not see another value of it, sample 1 keeps it and must. The timestep conditions every output too."""
    model = randomize(L.LetsTalk(tiny(ref_fusion=ref_fusion, audio_fusion=audio_fusion, motion=2))).eval()
    b = inputs()
    drops = {"drop_ref": torch.tensor([True, False]), "drop_audio": torch.tensor([True, False]),
             "drop_motion": torch.tensor([True, False])}
    with torch.no_grad():
        out = model(**b, **drops)
        for key in ("ref", "mel", "motion"):
            other = model(**{**b, key: torch.randn_like(b[key])}, **drops)
            assert torch.allclose(other[0], out[0], atol=1e-5), key  # dropped: the null, whatever came in
            assert not torch.allclose(other[1], out[1], atol=1e-3), key  # kept: read
        later = model(**{**b, "t": (b["t"] + 400) % 1000}, **drops)
    assert not torch.allclose(later, out, atol=1e-3)


def test_each_token_carries_its_own_place_in_space_and_time():
    """The 2D embedding: half the channels the row, half the column (so no two patches share one); clip frame j sits
    at temporal position M + j, after the M motion frames at 0..M-1, so attention can tell history from clip."""
    e = L.sincos_2d(8, 3)
    for r in range(3):
        for c in range(3):
            want = torch.cat([L.sincos_1d(4, torch.tensor([r])), L.sincos_1d(4, torch.tensor([c]))], dim=1)[0]
            assert torch.allclose(e[r * 3 + c], want)
    model = L.LetsTalk(tiny(motion=2)).eval()
    b = inputs()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args))
    with torch.no_grad():
        model(**b)
        (h, _, m, *_), = seen
        h = h.view(2, F, *h.shape[1:])
        for j in range(F):
            assert torch.allclose(h[:, j] - model.patchify(b["x"][:, j]), model.pos_time[2 + j], atol=1e-5)
        for j in range(2):
            assert torch.allclose(m[:, j] - model.patchify(b["motion"][:, j]), model.pos_time[j], atol=1e-5)


def test_the_audio_tokens_of_a_frame_keep_the_order_of_its_window():
    """K tokens pooled from the window's 10 steps, each step with its sin-cos position: even a window of silence
    gives K different tokens (one pooled token repeated, or steps without positions, would not)."""
    encoder = L.LetsTalk(tiny()).audio_encoder
    with torch.no_grad():
        tokens = encoder(torch.zeros(1, 1, 20, 80))[0, 0]  # (K, D)
    assert len(tokens) == 5 and (tokens[1:] - tokens[:-1]).abs().amax(1).min() > 1e-4


def test_parameter_counts_of_the_fusion_schemes():
    def fusion_params(**kw):
        return L.count_parameters(L.LetsTalk(tiny(**kw)))["fusion"]
    P, D, K = (S // 2) ** 2, 128, 5
    null = P * D + K * D  # null reference and audio tokens (the null motion frame is the backbone's)
    assert fusion_params(ref_fusion="symbiotic", audio_fusion="symbiotic") == null  # nothing beyond embeddings
    direct = fusion_params(ref_fusion="direct", audio_fusion="symbiotic") - null
    siamese = fusion_params(ref_fusion="siamese", audio_fusion="symbiotic") - null
    assert 0 < direct < siamese  # a cross-attention per block < a whole parallel transformer
    assert fusion_params(ref_fusion="siamese", audio_fusion="siamese") - null == 2 * siamese


def _toy_batch(which, seed, B=8, frames=2, size=4):
    """A denoising toy whose clean signal x0 depends on one condition only: the reference latent itself (in every
    frame), or a level set per frame by that frame's mel window. The input is x = 0.3 x0 + 0.954 eps (a noisy
    diffusion step) and the target is eps, so only a model that reads the condition can remove x0 from x.

    (A plain copy task, x pure noise and target x0, stalls symbiotic fusion: its attention output is multiplied by
    an adaLN-Zero gate that starts at 0 and gets no consistent gradient; measured, symbiotic copy stayed at loss
    0.78 after 400 steps, and reached 0.0007 with the gate opened at 1.)"""
    b = inputs(B=B, frames=frames, size=size, motion=0, seed=seed)
    b["mel"] = b["mel"] + 2 * torch.randn(B, frames, 1, 1, generator=torch.Generator().manual_seed(seed))
    if which == "ref":
        x0 = b["ref"][:, None].expand_as(b["x"])
    else:
        x0 = b["mel"].mean(dim=(2, 3))[:, :, None, None, None].expand_as(b["x"])
    eps = b["x"]
    b["x"] = 0.3 * x0 + 0.954 * eps
    return b, eps


@pytest.mark.parametrize("which", ["ref", "audio"])
@pytest.mark.parametrize("scheme", L.FUSIONS)
def test_each_fusion_scheme_carries_its_condition(which, scheme):
    torch.manual_seed(0)
    model = L.LetsTalk(L.config_for("T", latent_size=4, frames=2, depth=2, motion=0, **{f"{which}_fusion": scheme}))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, fused=True)
    # measured true/shuffled error ratios: ref 0.04-0.17 after 150 steps (0.35-0.38 after 100), audio 0.05-0.11
    # after 100; the bound is 0.5
    for step in range(150 if which == "ref" else 100):
        b, eps = _toy_batch(which, step)
        loss = (model(**b) - eps).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        b, eps = _toy_batch(which, 10_000)
        key = "ref" if which == "ref" else "mel"
        true = (model(**b) - eps).pow(2).mean()
        shuffled = (model(**{**b, key: b[key].roll(1, dims=0)}) - eps).pow(2).mean()
    assert true < 0.5 * shuffled, (true.item(), shuffled.item())


def test_unknown_fusion_or_attention_is_refused():
    with pytest.raises(ValueError, match="fusion"):
        L.LetsTalk(tiny(ref_fusion="concat"))
    with pytest.raises(ValueError, match="motion"):
        L.LetsTalk(tiny(attention="full", motion=2))
    for width, heads in ((6, 2), (10, 1)):  # divisible by the heads, not by 4: the 2D sin-cos embedding's quarters
        with pytest.raises(ValueError, match="no model has this shape"):
            tiny(width=width, heads=heads)


def test_size_table_prints_every_fusion_choice(capsys):
    L.main(["--size", "T", "--frames", "2", "--latent-size", "8"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.split()[0] in L.FUSIONS]
    assert len(rows) == 9 and all(float(r.split()[-1]) > 0 for r in rows)


def test_forward_refuses_motion_frames_of_the_wrong_length():
    model = L.LetsTalk(L.config_for("T", depth=1, width=32, heads=2, latent_size=4, frames=2, motion=2,
                                    audio_layers=1))
    x, t, ref, mel = torch.randn(1, 2, 4, 4, 4), torch.zeros(1, dtype=torch.long), torch.randn(1, 4, 4, 4), \
        torch.randn(1, 2, 20, 80)
    assert model(x, t, ref, mel, torch.randn(1, 2, 4, 4, 4)).shape == x.shape
    for motion in (torch.randn(1, 1, 4, 4, 4), None):  # one motion frame would broadcast silently onto two
        with pytest.raises(ValueError, match="2 motion frames"):
            model(x, t, ref, mel, motion)
