"""K-wise losses over a ranking of a prompt's responses: Plackett-Luce."""

from __future__ import annotations

import torch

from rmlab.losses.base import LossOutput, RewardLoss, group_sums, num_groups

PL_TIES = ("breslow", "efron")


class PlackettLuceLoss(RewardLoss):
    """Plackett-Luce negative log-likelihood of each prompt's ranking (Plackett 1975; Luce 1959), the
    K-wise loss of Zhu, Jordan & Jiao 2023 ("Principled RLHF from Pairwise or K-wise Comparisons"), as
    used for Starling-RM. For a ranking r_0 > r_1 > ... > r_{K-1} (best to worst):

        L_group = 1/(K-1) * sum_{j=0}^{K-2} [ logsumexp(r_j, ..., r_{K-1}) - r_j ]

    and the loss is the mean of L_group over the batch's ranked prompts, so every prompt weighs the
    same whatever its K (the 1/(K-1) plays the role of eq 6's 1/C(K,2)). At K = 2 it is BT (eq 3):
    logsumexp(r_0, r_1) - r_0 = -log sigmoid(r_0 - r_1).

    Ranks come from ``batch.rank`` (0 = best) within ``batch.group_index``.

    Partial rankings: a NaN rank leaves that response out of the ranking. The loss is then the PL
    likelihood of the order of the ranked subset, which is exact: PL's marginal over a subset is PL
    over that subset. A prompt with fewer than 2 ranked responses contributes nothing (its entry of the
    logged ``terms`` [G] is NaN); a batch with no ranked prompt gives 0 (still attached to the graph). K is
    the number of ranked responses.

    Ties in the ranking (equal ranks) are treated as in Cox regression with tied event times:
    - ``breslow`` (default): every tied response shares the same risk set, all responses ranked at or
      below the tie, so each tied response pays ``logsumexp(risk set) - r_i``. The risk set of the
      worst block is the block itself, so tied worst responses are pulled together too.
    - ``efron``: the l-th of m tied responses (l = 0..m-1) sees the risk set with l/m of the tie
      block's mass removed: ``log(sum_risk e^r - (l/m) sum_tie e^r) - r_i``. Closer to averaging over
      the m! orders the tie hides; at K = 2 a tie costs exactly 2x BT-at-target-1/2 minus log 2.
    Without ties both are the plain PL above. Both are invariant to a shift of a prompt's rewards.
    """

    response_field = "rank"
    response_field_hint = ("use ranked data (data.format=rankings, or data.simulator.comparisons=ranking), or a "
                           "pairwise loss such as loss=bt (at K = 2 it is plackett_luce)")

    def __init__(self, ties: str = "breslow", center_coef: float = 0.0, center: str = "pair"):
        super().__init__(center_coef, center)
        if ties not in PL_TIES:
            raise ValueError(f"plackett_luce ties must be one of {PL_TIES}, got {ties!r}")
        self.ties = ties

    def objective(self, rewards: torch.Tensor, batch) -> LossOutput:
        if batch.rank is None or batch.group_index is None:
            raise ValueError("plackett_luce needs batch.rank and batch.group_index (one per response)")
        g, rank = batch.group_index, batch.rank.to(rewards.dtype)
        n = rewards.numel()
        ranked = ~torch.isnan(rank)
        eye = torch.eye(n, dtype=torch.bool, device=rewards.device)
        same = (g[:, None] == g[None, :]) & ranked[:, None] & ranked[None, :]
        # risk[i, j]: j is still "in the urn" when i is drawn. NaN ranks compare False, so unranked
        # rows only see themselves (the diagonal): their term is 0 and is masked out below.
        risk = (same & (rank[None, :] >= rank[:, None])) | eye
        neg_inf = torch.finfo(rewards.dtype).min  # not -inf: keeps logsumexp's backward free of NaN
        row = rewards[None, :].expand(n, n)
        log_risk = torch.logsumexp(row.masked_fill(~risk, neg_inf), dim=1)
        if self.ties == "efron":
            tied = (same & (rank[None, :] == rank[:, None])) | eye
            m = tied.sum(1).to(rewards.dtype)
            idx = torch.arange(n, device=rewards.device)
            before = (tied & (idx[None, :] < idx[:, None])).sum(1).to(rewards.dtype)
            log_tied = torch.logsumexp(row.masked_fill(~tied, neg_inf), dim=1)
            # log(S - (l/m) S_T) = log S + log1p(-(l/m) S_T / S); S_T <= S and l/m < 1 keep it finite.
            log_risk = log_risk + torch.log1p(-(before / m) * torch.exp(log_tied - log_risk))
        terms = torch.where(ranked, log_risk - rewards, torch.zeros_like(rewards))
        size = num_groups(batch)
        per_group, counts = group_sums(terms, g, size), group_sums(ranked.to(rewards.dtype), g, size)
        valid = counts >= 2
        # The mean over valid prompts as a masked sum over all of them: no branch on the device's values and no
        # boolean indexing, so a training step reads nothing back. No valid prompt: 0, still attached.
        group_loss = torch.where(valid, per_group / (counts - 1).clamp_min(1), 0.0)
        loss = group_loss.sum() / valid.sum().clamp_min(1)
        return LossOutput(loss, torch.where(valid, group_loss, float("nan")).detach())
