"""Plain-torch reference for nearest-neighbour search by dot product (cosine on normalised rows).

For every query row, the index and score of the key row with the largest dot product, computed in
float32 chunk by chunk so that no more than `chunk_m x chunk_n` scores exist at once. Ties go to the
lowest key index, as torch.max does.
"""
from __future__ import annotations

import torch


def nearest_reference(query: torch.Tensor, keys: torch.Tensor, chunk_m: int = 1024,
                      chunk_n: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """query [B, M, D], keys [B, N, D] -> (index int32 [B, M], score float32 [B, M])."""
    batch, m, _ = query.shape
    n = keys.shape[1]
    index = torch.empty((batch, m), dtype=torch.int32, device=query.device)
    score = torch.empty((batch, m), dtype=torch.float32, device=query.device)
    for b in range(batch):
        for m0 in range(0, m, chunk_m):
            q = query[b, m0:m0 + chunk_m].float()
            best = torch.full((q.shape[0],), float("-inf"), device=q.device)
            best_idx = torch.zeros((q.shape[0],), dtype=torch.int64, device=q.device)
            for n0 in range(0, n, chunk_n):
                s = q @ keys[b, n0:n0 + chunk_n].float().T
                blk, arg = s.max(dim=1)
                better = blk > best  # strict: an earlier chunk wins a tie
                best = torch.where(better, blk, best)
                best_idx = torch.where(better, arg + n0, best_idx)
            index[b, m0:m0 + chunk_m] = best_idx.to(torch.int32)
            score[b, m0:m0 + chunk_m] = best
    return index, score
