"""``dsa-run``: a small end-to-end forward/backward of the reference DSA layer, printing what it did.

A smoke test of the reference ops for a new machine: FP8 indexer → causal top-k → sparse MLA-style attention →
indexer KL, with backward, compared against dense attention.
"""

from __future__ import annotations

import time

import torch

from dsa_dist.ops import (
    dense_attention,
    indexer_kl_loss_sparse,
    lightning_indexer_topk,
    prepare_indexer_qk,
    sparse_attention,
)


def main() -> None:
    torch.manual_seed(0)
    b, L, heads, d_qk, d_v, hi, di, topk = 1, 1024, 8, 96, 64, 4, 64, 128
    start = time.perf_counter()
    latent = torch.randn(b, L, 1, d_qk, requires_grad=True)  # one MLA latent per token: K, and V = K[..., :d_v]
    q = torch.randn(b, L, heads, d_qk, requires_grad=True)
    q_index = torch.randn(b, L, hi, di, requires_grad=True)
    k_index = torch.randn(b, L, di, requires_grad=True)
    weights = torch.randn(b, L, hi, requires_grad=True)

    fp8 = prepare_indexer_qk(q_index.detach(), k_index.detach(), weights.detach(), rope_dim=32, fp8=True)
    _, topk_indices = lightning_indexer_topk(fp8.q_index, fp8.k_index, fp8.weights, topk, fp8.k_scale)
    out, lse = sparse_attention(q, latent, latent[..., :d_v], topk_indices)
    kl = indexer_kl_loss_sparse(q, latent, q_index, k_index, weights, topk_indices, attn_lse=lse)
    (out.sum() + kl).backward()

    dense_out, _ = dense_attention(q.detach(), latent.detach(), latent.detach()[..., :d_v])
    early = slice(0, topk)  # rows with t < k see every causal key, so sparse == dense there
    err_early = (out.detach()[:, early] - dense_out[:, early]).abs().max().item()
    err_late = (out.detach()[:, topk:] - dense_out[:, topk:]).norm().item() / dense_out[:, topk:].norm().item()
    print(f"DSA reference layer: L={L}, heads={heads}, d_qk/d_v={d_qk}/{d_v}, indexer {hi}x{di} FP8, top-k={topk}")
    print(f"  selected keys per query: {int((topk_indices >= 0).sum(-1).float().mean())} of up to {topk}")
    print(f"  sparse vs dense, rows t<k (all keys selected): max |diff| = {err_early:.2e}")
    print(f"  sparse vs dense, rows t>=k (random inputs, top-{topk} of up to {L}): rel diff = {err_late:.3f}")
    print(f"  indexer KL on the top-k set: {kl.item():.4f}; grads: |dq|={q.grad.norm():.3f} "
          f"|dlatent|={latent.grad.norm():.3f} |dq_index|={q_index.grad.norm():.3f}")
    print(f"  done in {time.perf_counter() - start:.2f}s")


if __name__ == "__main__":
    main()
