"""The checks students run, one per exercise of EXERCISES.md: `python -m pytest tests/exercises -k NAME`.

Each test hands the project's real function (the one the student rewrote in place) to its check in checks.py.
"""

import audio
import checks
import diffusion
import letstalk
import metrics
import vae


def test_psnr():
    checks.check_psnr(vae.psnr)


def test_kl():
    checks.check_kl(vae.kl_divergence)


def test_q_sample():
    checks.check_q_sample(diffusion.Diffusion.q_sample)


def test_sincos():
    checks.check_sincos(letstalk.sincos_1d)


def test_mel_windows():
    checks.check_mel_windows(audio.mel_windows)


def test_unpatchify():
    checks.check_unpatchify(letstalk.LetsTalk.unpatchify)


def test_temporal():
    checks.check_temporal(letstalk.Block.temporal)


def test_model_size():
    checks.check_model_size(letstalk.SIZES)


def test_mel_filterbank():
    checks.check_mel_filterbank(audio.mel_filterbank)


def test_split():
    checks.check_split(diffusion.Diffusion.split)


def test_ddim_step():
    checks.check_ddim_step(diffusion.Diffusion.ddim_step)


def test_frechet():
    checks.check_frechet(metrics.frechet_distance)


def test_spatial():
    checks.check_spatial(letstalk.Block.spatial)


def test_motion():
    checks.check_motion(letstalk.Block.temporal)
