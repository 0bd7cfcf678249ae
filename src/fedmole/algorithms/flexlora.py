"""FlexLoRA: average the full LoRA products, redistribute their best rank-r_i factors.

Bai, Chen, Qian, Yao, Li. "Federated Fine-tuning of Large Language Models
under Heterogeneous Tasks and Client Resources", NeurIPS 2024 (arXiv:2402.11505).

Server, per module: dW = sum_i p_i (alpha/r_i) B_i A_i with p_i = |D_i| / sum |D|,
then dW = U S V^T. The global state holds the top r_max components as factors
split evenly, B = U sqrt(S r_max/alpha), A = sqrt(S r_max/alpha) V^T, so that
(alpha/r_max) B A is the rank-r_max truncation of dW. A client of rank r_i gets
the first r_i components rescaled by sqrt(r_i/r_max) in both factors, which
undoes the alpha/r scaling: (alpha/r_i) B_i A_i is then the best rank-r_i
approximation of dW (Eckart-Young). Until the first aggregation the global
state is the common LoRA init and clients get plain truncations of it.

The SVD is taken of the product in factored form (QR of both stacked factors,
then the SVD of an R x R core, R = sum_i r_i), which is exact and much cheaper
than a dense SVD when R is below the layer width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedmole.adapters.lora import pair_keys, truncate_lora
from fedmole.algorithms.aggregate import State
from fedmole.algorithms.base import ClientRuntime
from fedmole.algorithms.lora_common import LoRAMethod, stack_lora
from fedmole.messages import Reply


@dataclass
class FlexLoRAOptions:
    """Options of FlexLoRA (`[flexlora]` table); it has none beyond [adapter] and [fed]."""


def factored_svd(A_s: torch.Tensor, B_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of B_s A_s without forming it when R is small: (U (..., d_out, k), S (..., k), Vh (..., k, d_in)).

    A_s: (..., R, d_in), B_s: (..., d_out, R), leading dims batched (experts); k = min(R, d_out, d_in).
    Singular values descending.
    """
    R, (d_out, d_in) = A_s.shape[-2], (B_s.shape[-2], A_s.shape[-1])
    if R >= min(d_out, d_in):
        return torch.linalg.svd(B_s @ A_s, full_matrices=False)
    qb, rb = torch.linalg.qr(B_s)  # (..., d_out, R), (..., R, R)
    qa, ra = torch.linalg.qr(A_s.transpose(-2, -1))  # (..., d_in, R), (..., R, R)
    u, s, vh = torch.linalg.svd(rb @ ra.transpose(-2, -1))  # B_s A_s = qb (rb ra^T) qa^T
    return qb @ u, s, vh @ qa.transpose(-2, -1)


def svd_factors(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (..., rank, d_in), B (..., d_out, rank)) with (alpha/rank) B A = the rank-`rank` truncation of U S Vh.

    The singular values are split as sqrt into both factors; missing components are zero.
    """
    k = min(rank, S.shape[-1])
    c = (S[..., :k].clamp_min(0) * (rank / alpha)).sqrt()  # (..., k)
    A = torch.zeros(*Vh.shape[:-2], rank, Vh.shape[-1], dtype=Vh.dtype)
    B = torch.zeros(*U.shape[:-1], rank, dtype=U.dtype)
    A[..., :k, :] = c[..., :, None] * Vh[..., :k, :]
    B[..., :k] = U[..., :k] * c[..., None, :]
    return A, B


def aggregate_flexlora(states: Sequence[State], sizes: Sequence[int], alpha: float, max_rank: int,
                       like: State) -> State:
    """Global factors (rank `max_rank`, alpha/max_rank frame) of sum_i p_i (alpha/r_i) B_i A_i (pure).

    `like` gives the output dtypes (the previous global state).
    """
    new: State = {}
    keys = pair_keys(like)
    for pid, (A_s, B_s) in stack_lora(states, sizes, alpha).items():
        A, B = svd_factors(*factored_svd(A_s, B_s), max_rank, alpha)
        a_key, b_key = keys[pid]
        new[a_key] = A.to(like[a_key].dtype)
        new[b_key] = B.to(like[b_key].dtype)
    return new


def client_factors(global_state: State, rank: int, max_rank: int) -> State:
    """The rank-`rank` view of global factors, rescaled from the alpha/max_rank to the alpha/rank frame."""
    scale = (rank / max_rank) ** 0.5
    return {k: v * scale for k, v in truncate_lora(global_state, rank).items()}


class FlexLoRA(LoRAMethod):
    """FlexLoRA (Bai et al., NeurIPS 2024, arXiv:2402.11505): data-weighted average of the clients'
    full LoRA products, SVD, best rank-r_i factors back to each client."""

    name = "flexlora"
    Options = FlexLoRAOptions
    keep_optimizer_refused = ("every round re-factorises the adapter by SVD, so last round's moments describe "
                              "other coordinates")

    def __init__(self, options, adapter, tiers, seed):
        super().__init__(options, adapter, tiers, seed)
        self.factored = False  # whether the global state holds SVD factors yet (else: the common init)

    def tier_view(self, global_state: State, tier: int) -> State:
        if not self.factored:
            return truncate_lora(global_state, self.rank_of(tier))
        return client_factors(global_state, self.rank_of(tier), self.max_rank)

    def global_view(self, rt: ClientRuntime, global_state: State, tier: int) -> State:
        """Always the rescaled factors: before the first aggregation every B is zero, so rescaling
        changes nothing, and a Flower node's method (which never aggregates) evaluates like the server."""
        return client_factors(global_state, self.rank_of(tier), self.max_rank)

    def aggregate(self, rnd: int, replies: list[Reply], previous: State) -> State:
        if not replies:
            return {k: v.clone() for k, v in previous.items()}
        self.factored = True
        return aggregate_flexlora([r.state for r in replies], [r.num_examples for r in replies], self.alpha,
                                  self.max_rank, previous)

    def load_final_state(self, saved: State) -> State:
        """A saved final state holds SVD factors: every finished run aggregated at least once."""
        self.factored = True
        return dict(saved)

    def state_dict(self) -> dict:
        return {"factored": self.factored}

    def load_state_dict(self, state: dict) -> None:
        self.factored = bool(state["factored"])
