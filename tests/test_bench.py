"""bench.py keeps working: --quick at a tiny width produces every table with finite ratios (speed is not tested)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import bench
from diffusion import Diffusion
from letstalk import LetsTalk, config_for, forward_gflops
from vae import VAE, VAEConfig


def test_quick_bench_produces_every_table(tmp_path, capsys):
    tables = bench.main(["--quick", "--width", "32", "--heads", "2", "--device", "cpu",
                         "--json", str(tmp_path / "bench.json")])
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written["attention"] == tables["attention"]
    assert written["device"] == "cpu"  # the device measured on, not the name of the last table
    assert len(tables["attention"]) == 4 and len(tables["block"]) == 4
    for row in tables["attention"]:
        assert math.isfinite(row["ratio"]) and row["eq4"] == row["F"] * row["P"] / (row["F"] + row["P"])
    for row in tables["block"]:
        assert math.isfinite(row["ratio"]) and row["flop_ratio"] > 0
    # the factorized block adds temporal projections, so it saves FLOPs only once F * P is large
    assert max(tables["block"], key=lambda r: r["F"] * r["P"])["flop_ratio"] > 1
    assert tables["throughput"][0]["clips_s"] > 0 and tables["sampling"][0]["seconds_per_video_second"] > 0
    assert tables["throughput"][0]["saved_mib"] > 0
    row = tables["throughput"][0]  # a training step counts 3 forward passes' FLOPs (the backward costs two)
    cfg = config_for(row["size"], frames=row["frames"], latent_size=row["latent"])
    assert row["tflop_s"] * row["step_s"] * 1e12 == pytest.approx(3e9 * forward_gflops(cfg, row["batch"]))
    assert [r["model"] for r in tables["sampling"]] == ["T", "shipped"]  # random weights, then the demo checkpoint
    assert not any(r["compiled"] for r in tables["throughput"] + tables["sampling"])  # a CPU compiles only if asked
    # table 1c: each temporal length (F + 2 motion frames) once per kernel, timed against SDPA's own choice
    expected = [(L, kernel) for L in (10, 18, 34) for kernel in ("sdpa", "matmul")]
    assert [(r["L"], r["kernel"]) for r in tables["temporal"]] == expected
    assert all(math.isfinite(r["speedup"]) and r["speedup"] > 0 for r in tables["temporal"])
    assert all(r["speedup"] == 1 for r in tables["temporal"] if r["kernel"] == "sdpa")
    # table 4: the sampler at the demo's and the paper's clip shapes
    assert [(r["frames"], r["latent"]) for r in tables["data"]] == [(8, 16), (16, 32)]
    assert all(r["clips_s"] > 0 and r["gpus_fed"] == r["clips_s"] / 48.5 for r in tables["data"])
    text = capsys.readouterr().out
    for title in ("1a.", "1b.", "1c.", "2.", "3.", "4."):
        assert title in text


def test_saved_for_backward_counts_activations_not_weights():
    # Linear keeps its input for the weight's gradient and GELU its input: 2 tensors of 1024 x 256 floats = 2 MiB;
    # the weight it also keeps is a parameter, and the sum keeps nothing
    layer = torch.nn.Linear(256, 256)
    for rows, mib in ((1024, 2.0), (2048, 4.0)):
        x = torch.randn(rows, 256)
        assert bench.saved_for_backward_mib(lambda: F.gelu(layer(x)).sum().backward(), layer.parameters()) == mib


def test_matmul_attention_is_the_same_attention():
    q, k, v = torch.randn(3, 6, 4, 18, 16).unbind(0)
    assert torch.allclose(bench.matmul_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-5)


def test_tables_can_be_chosen(tmp_path, capsys):
    tables = bench.main(["--quick", "--tables", "temporal", "--width", "64", "--heads", "4", "--device", "cpu",
                         "--json", str(tmp_path / "bench.json")])
    out = capsys.readouterr().out
    assert list(tables) == ["temporal"] and "1a." not in out and out.endswith(f"wrote {tmp_path / 'bench.json'}\n")
    assert ", batch 1, width 64, torch" in out.splitlines()[0]  # the header names the chosen tables' settings
    assert list(json.loads((tmp_path / "bench.json").read_text())) == [
        "device", "torch", "peak_bf16_flop_s", "batch", "width", "temporal"]
    bench.main(["--quick", "--tables", "data, temporal", "--width", "64", "--heads", "4", "--device", "cpu",
                "--json", str(tmp_path / "bench.json")])  # spaces after the commas are fine
    assert list(json.loads((tmp_path / "bench.json").read_text()))[-2:] == ["temporal", "data"]
    capsys.readouterr()
    bench.main(["--quick", "--tables", "data", "--device", "cpu", "--json", str(tmp_path / "bench.json")])
    assert "batch" not in capsys.readouterr().out.splitlines()[0]  # table 4 takes neither --batch nor --width
    for wrong in (["--tables", "attention,speed"], ["--sizes", "T,XL"], ["--device", "tpu7"], ["--batch", "0"],
                  ["--heads", "5"], ["--tables", "data", "--width", "8"], ["--tables", "temporal", "--sizes", "B"],
                  ["--tables", "block", "--width", "6", "--heads", "2"]):
        with pytest.raises(SystemExit) as e:
            bench.main(wrong)
        assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_a_measurement_that_does_not_fit_is_skipped_and_other_errors_are_not(capsys):
    def too_big():
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    def broken():
        raise RuntimeError("a bug in the measured code")
    assert bench.measured(too_big, torch.device("cpu"), 1, "table 2, size L") is None
    assert "skipped table 2, size L: out of memory" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="a bug"):
        bench.measured(broken, torch.device("cpu"), 1, "table 2, size L")


def test_a_sampling_row_that_does_not_fit_is_skipped(monkeypatch, capsys):
    """Table 3 leaves out a batch that does not fit, as tables 1-2 do, instead of ending the run (and losing the
    tables already measured, which are written at the end)."""
    model = LetsTalk(config_for("T", frames=2, latent_size=4)).eval()
    vae = VAE(VAEConfig(resolution=16, factor=4, width=4)).eval()
    real = bench.generate

    def fits_batch_1(model, vae, diffusion, image, mel, *args, **kwargs):
        if len(image) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, vae, diffusion, image, mel, *args, **kwargs)
    monkeypatch.setattr(bench, "generate", fits_batch_1)
    rows = bench.sampling_rows(torch.device("cpu"), "T", model, vae, Diffusion(), [1, 2], [("ddim", 2, 1.0)], 1, False)
    assert [r["batch"] for r in rows] == [1] and rows[0]["realtime_x"] > 0
    assert "skipped table 3, T at batch 2, ddim: out of memory" in capsys.readouterr().out
