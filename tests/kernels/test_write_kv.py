"""The step's K/V write (one Triton launch for keys and values) against index_copy_."""
import pytest
import torch

# (tokens, heads, head_dim): one token, odd counts, more elements than one program writes
CASES = [(1, 1, 16), (3, 5, 24), (7, 3, 64), (17, 8, 128)]


def make(n_tok, H, D, seed, src_dtype, dst_dtype, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    n = n_tok * H * D
    k = torch.randn(n_tok, H, D, generator=g).to(src_dtype)
    v = torch.randn(n_tok, H, D, generator=g).to(src_dtype)
    size = 4 * n + 64
    dst = torch.randn(size, generator=g).to(dst_dtype)
    # scattered, non-overlapping targets: keys in the first half, values v_shift after
    idx = torch.randperm(size // 2 - 8, generator=g)[:n].to(torch.int64)
    shift = size // 2
    return dst, idx, shift, k, v


def reference(dst, idx, shift, k, v):
    want = dst.clone()
    want.index_copy_(0, idx, k.reshape(-1).to(dst.dtype))
    want.index_copy_(0, idx + shift, v.reshape(-1).to(dst.dtype))
    return want


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter variant")
@pytest.mark.parametrize("n_tok, H, D", CASES)
@pytest.mark.parametrize("src_dtype, dst_dtype", [(torch.float32, torch.float32),
                                                   (torch.float32, torch.float16),
                                                   (torch.float16, torch.float16)])
def test_write_kv_interpreted(n_tok, H, D, src_dtype, dst_dtype):
    from engine.kernels.write_kv_triton import write_kv_triton
    dst, idx, shift, k, v = make(n_tok, H, D, n_tok * 31 + H * 7 + D, src_dtype, dst_dtype)
    want = reference(dst, idx, shift, k, v)
    write_kv_triton(dst, idx, shift, k, v)
    assert torch.equal(dst, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n_tok, H, D", CASES + [(4096, 8, 128)])
def test_write_kv_cuda(n_tok, H, D):
    from engine.kernels.write_kv_triton import write_kv_triton
    dst, idx, shift, k, v = make(n_tok, H, D, n_tok + H + D, torch.bfloat16, torch.bfloat16)
    dst, idx, k, v = dst.cuda(), idx.cuda(), k.cuda(), v.cuda()
    want = reference(dst, idx, shift, k, v)
    write_kv_triton(dst, idx, shift, k.transpose(0, 1).contiguous().transpose(0, 1), v)
    assert torch.equal(dst, want)


def test_write_kv_rejects_mismatched_sizes():
    from engine.kernels.write_kv_triton import write_kv_triton
    dst, idx, shift, k, v = make(2, 2, 16, 0, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="write indices"):
        write_kv_triton(dst, idx[:-1], shift, k, v)
