"""Plain-torch reference for copying runs of rows between [B, H, N, d] tensors ("row blocks").

ISA's split path moves whole blocks of tokens: the sharp query blocks into one packed tensor, the kept KV
blocks into another, and the attention result back to the blocks' places. Each (batch, head) copies its
own list of runs: run i moves rows src_start[i] .. src_start[i] + count[i] - 1 of src to rows dst_start[i]
onwards of dst. `row_blocks.py` is the Triton twin.
"""
from __future__ import annotations

import torch


def copy_row_blocks_reference(src: torch.Tensor, src_start: torch.Tensor, dst: torch.Tensor,
                              dst_start: torch.Tensor, count: torch.Tensor, block: int, *,
                              zero_fill: bool = False) -> torch.Tensor:
    """Copy runs of at most `block` rows: src, dst [B, H, *, d]; src_start, dst_start, count int [B, H, n].

    zero_fill: also write zeros to rows count .. block - 1 of each run's destination, so that a packed
    tensor of whole blocks holds no uninitialised rows. Returns dst."""
    batch, heads, n = count.shape
    offs = torch.arange(block, device=src.device)
    valid = offs < count.unsqueeze(-1)  # [B, H, n, block]
    b_index = torch.arange(batch, device=src.device).view(-1, 1, 1, 1).expand_as(valid)
    h_index = torch.arange(heads, device=src.device).view(1, -1, 1, 1).expand_as(valid)
    src_rows = src_start.unsqueeze(-1) + offs
    dst_rows = dst_start.unsqueeze(-1) + offs
    if zero_fill:
        rows = src[b_index, h_index, torch.where(valid, src_rows, src_start.unsqueeze(-1))]
        dst[b_index, h_index, dst_rows] = rows.masked_fill(~valid.unsqueeze(-1), 0).to(dst.dtype)
    else:
        dst[b_index[valid], h_index[valid], dst_rows[valid]] = src[b_index[valid], h_index[valid],
                                                                   src_rows[valid]].to(dst.dtype)
    return dst
