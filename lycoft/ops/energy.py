"""Hyperspherical energy of a layer's neurons: the quantity orthogonal finetuning keeps.

A layer's neurons are the rows of its weight (each output channel's vector of input weights, a conv
kernel flattened). Their hyperspherical energy is the sum over pairs of ``1 / ||u_i - u_j||`` with the
rows scaled to unit length, as defined in Qiu et al., "Controlling Text-to-Image Diffusion by
Orthogonal Finetuning" (2023): it is small when the neurons spread evenly over the sphere. Rotating
every neuron by the same orthogonal matrix (OFT on the input side) keeps every angle between them, so
the energy of the rows does not move; rotating the output channels (OFT on the output side, the
LyCORIS layout) keeps the angles between the columns instead. Fine-tuning that adds to the weight
(LoRA) keeps neither.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK = 1024  # rows compared at a time: memory stays at CHUNK x rows, whatever the layer's width


def hyperspherical_energy(weight: Tensor, columns: bool = False) -> float:
    """Sum over pairs of rows (or columns) of `weight` of 1 / distance, the vectors scaled to unit length.

    weight: `(out, in)` or a conv `(out, in, *k)` (rows are flattened kernels; columns its `in * prod(k)`
    input positions). Computed in float64 in blocks of `CHUNK` rows. Zero rows count as the zero vector
    (unit-scaled to zero, distance 1 from every unit vector); equal rows give a distance clamped at 1e-12.
    """
    w = weight.detach().reshape(weight.shape[0], -1).double()
    if columns:
        w = w.T
    u = F.normalize(w, dim=1)
    n = u.shape[0]
    total = 0.0
    for start in range(0, n, CHUNK):
        block = u[start:start + CHUNK]
        gram = block @ u.T  # cosine of every pair; |a - b|^2 = |a|^2 + |b|^2 - 2 a.b
        sq = (block.pow(2).sum(1, keepdim=True) + u.pow(2).sum(1) - 2 * gram).clamp_min(0.0)
        inv = sq.clamp_min(1e-24).rsqrt()
        rows = torch.arange(start, start + len(block))
        inv[torch.arange(len(block)), rows] = 0.0  # a neuron and itself
        total += float(inv.sum())
    return total / 2  # every pair was counted from both ends

