"""kernels.py's Triton temporal attention against SDPA, run by Triton's interpreter on the CPU (conftest.py)."""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from kernels import MAX_LENGTH, temporal_attention
from letstalk import LetsTalk, config_for


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("N, H, L, d, layout", [(6, 2, 18, 16, "projections"),  # 18 frames padded to 32
                                                (3, 4, 16, 32, "projections"),  # no padding
                                                (2, 3, 5, 64, "contiguous"),    # heads not packed: copied first
                                                (1, 1, MAX_LENGTH, 16, "contiguous")])  # the longest it holds
def test_forward_and_backward_match_sdpa(N, H, L, d, layout):
    torch.manual_seed(L)
    if layout == "projections":  # as Attention hands them over: views of the q and kv projections' outputs
        q = rearrange(torch.randn(N, L, H * d), "n l (h d) -> n h l d", h=H).requires_grad_()
        k, v = rearrange(torch.randn(N, L, 2 * H * d), "n l (two h d) -> two n h l d", two=2, h=H)
    else:
        q, k, v = (torch.randn(N, H, L, d) for _ in range(3))
        q.requires_grad_()
    k, v = k.detach().requires_grad_(), v.detach().requires_grad_()
    grad = torch.randn(N, H, L, d)
    out = temporal_attention(q, k, v)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    ref = F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)))
    theirs = torch.autograd.grad(ref, (q, k, v), grad.double())
    assert out.shape == (N, H, L, d) and relative_error(out, ref) < 1e-5
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and relative_error(a, b) < 1e-5
    assert rearrange(out, "n h l d -> n l (h d)").is_contiguous()  # the output projection reads it without a copy


def test_the_model_trains_the_same_with_the_kernel():
    cfg = config_for("T", depth=2, latent_size=8, frames=4)
    torch.manual_seed(0)
    sdpa, triton = LetsTalk(cfg), LetsTalk(cfg)
    for p in sdpa.parameters():  # a new model is the identity (adaLN-Zero): give every branch a say in the output
        torch.nn.init.normal_(p, std=0.1)
    triton.load_state_dict(sdpa.state_dict())
    triton.set_temporal_kernel(temporal_attention)
    inputs = (torch.randn(2, 4, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 20, 80),
              torch.randn(2, 2, 4, 8, 8))
    grads = []
    for model in (sdpa, triton):
        model(*inputs).square().mean().backward()
        grads.append(model.blocks[0].temporal_attn.q.weight.grad)
    assert grads[0].abs().sum() > 0 and relative_error(grads[1], grads[0]) < 1e-4


def test_long_sequences_and_odd_head_dims_are_refused():
    with pytest.raises(ValueError, match="at most"):
        temporal_attention(*(torch.randn(1, 1, MAX_LENGTH + 1, 16) for _ in range(3)))
    for d in (24, 8):  # not a power of two; below the 16 that tl.dot needs
        with pytest.raises(ValueError, match="power"):
            temporal_attention(*(torch.randn(1, 1, 8, d) for _ in range(3)))
