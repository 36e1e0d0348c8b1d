"""Generative reward models: the causal LM itself judges, through a text template.

Two kinds share one class family and the shared data module:

- ``GenerativeVerifier`` (GenRM / generative verifiers, Zhang et al. 2024): each response is shown in a
  judge template such as ``"{prompt} ... {response} ... Is this response good? Answer Yes or No:"`` and
  its reward is ``log P(Yes) - log P(No)`` at the answer position (the last template token).
- ``PairwiseJudge`` (RLHFlow's pairwise preference model, LLM-as-a-judge): one row shows *two* responses
  and the target is ``A`` or ``B``; a row's output is ``log P(A) - log P(B)``.

Why only two rows of the LM head: ``log_softmax(z)[y] - log_softmax(z)[n] = z_y - z_n`` because the
normaliser cancels, so the reward is ``h @ (W[y] - W[n])`` (+ the bias difference). No full-vocabulary
logits are ever materialised; ``check_restricted_head`` proves the identity numerically at start-up
(an architecture that post-processes its logits, e.g. soft-capping, is caught there).

How rows are built: the data module applies ``model.group_template`` (rmlab.data.templates) to each text
group before tokenization. Rows then end with the tokenizer's end specials (<eos>); a causal LM's earlier
positions never see them, so the answer is read ``len(end)`` tokens before the last real token.

Judge rows: each comparison (w, l) becomes two rows, (A=w, B=l) with label 1 and (A=l, B=w) with
label 0 (0.5 each for a tie), and a comparison ``winner=row(w,l), loser=row(l,w)``. With ``r1, r2`` the
two rows' outputs, the order-averaged ``P(chosen) = (sigmoid(r1) + sigmoid(-r2)) / 2`` exceeds 1/2 iff
``r1 > r2``: the shared pairwise accuracy metric *is* the order-averaged verdict.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from rmlab.data.templates import JUDGE_TEMPLATE, VERIFIER_TEMPLATE, GroupTemplate
from rmlab.data.tokenize import special_tokens
from rmlab.models.base import RewardModel, backbone_states, pool_index, rows_at
from rmlab.models.packing import collated_states


def answer_token_ids(
    tokenizer: Any, answers: tuple[str, str], answer_ids: tuple[int, int] | None = None
) -> tuple[int, int]:
    """The two answer tokens' ids. Each answer must encode as exactly one token, or the config names the ids."""
    if answer_ids is not None:
        ids = tuple(int(i) for i in answer_ids)
        if len(ids) != 2 or ids[0] == ids[1] or not all(0 <= i < len(tokenizer) for i in ids):
            raise ValueError(
                f"answer_ids must be two distinct ids below the vocabulary size {len(tokenizer)}, got {answer_ids}"
            )
        return ids  # type: ignore[return-value]
    out = []
    for a in answers:
        enc = tokenizer(a, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise ValueError(
                f"answer {a!r} encodes as {len(enc)} tokens {enc} with this tokenizer; a generative reward reads "
                f"one token. Pick single-token answers (with BPE vocabularies often ' Yes' / ' No', with a byte "
                f"tokenizer 'Y' / 'N'), or name the ids with model.answer_ids=[yes_id,no_id]"
            )
        out.append(enc[0])
    if out[0] == out[1]:
        raise ValueError(f"the two answers {answers} map to the same token {out[0]}")
    return out[0], out[1]


def check_restricted_head(model: GenerativeVerifier, atol: float = 1e-4) -> None:
    """Start-up proof that the two-row head equals log P(yes) - log P(no) from the full LM logits."""
    tok = model.tokenizer
    ids = tok("check", add_special_tokens=False)["input_ids"][:4] or [model.answer_ids[0]]
    x = torch.tensor([ids], device=model.lm_head.weight.device)
    mask = torch.ones_like(x)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model.hf(input_ids=x, attention_mask=mask).logits[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            full = lp[model.answer_ids[0]] - lp[model.answer_ids[1]]
            h = model.hidden_at(x, mask, torch.tensor([len(ids) - 1], device=x.device))
            fast = model.head_diff(h)[0]
    finally:
        model.train(was)
    if not torch.allclose(full, fast, atol=atol):
        raise ValueError(
            f"{type(model.hf).__name__}: the two-row LM head gives {fast.item():.6f} but the full logits give "
            f"{full.item():.6f}; this architecture post-processes its logits (soft-capping, scaling), which rmlab's "
            f"generative head does not reproduce"
        )


class GenerativeVerifier(RewardModel):
    """A causal LM read as a verifier: ``forward`` returns ``log P(yes) - log P(no)`` per row, shape [N]."""

    kind = "verifier"
    default_template, default_answers = VERIFIER_TEMPLATE, ("Yes", "No")

    def __init__(
        self,
        hf_model: nn.Module,
        tokenizer: Any,
        template: str | None = None,
        answers: tuple[str, str] | None = None,
        answer_ids: tuple[int, int] | None = None,
    ):
        super().__init__(hf_model, tokenizer)
        self.group_template = GroupTemplate(self.kind, template or self.default_template)
        self.answers = tuple(answers or self.default_answers)
        self.answer_ids = answer_token_ids(tokenizer, self.answers, answer_ids)
        # Rows end with the tokenizer's end specials; the answer cue sits just before them.
        self.n_end = len(special_tokens(tokenizer)[2])
        self.lm_head = hf_model.get_output_embeddings()
        if self.lm_head is None:
            raise ValueError(f"{type(hf_model).__name__} has no LM head; load it with AutoModelForCausalLM")

    def answer_index(self, attention_mask: torch.Tensor) -> torch.Tensor:
        idx = pool_index(attention_mask, "last") - self.n_end
        if (idx < 0).any():
            raise ValueError("a row is shorter than its end tokens; it holds no template")
        return idx

    def hidden_at(self, input_ids, attention_mask, index, position_ids=None) -> torch.Tensor:
        return rows_at(backbone_states(self.hf, input_ids, attention_mask, position_ids), index)

    def head_diff(self, h: torch.Tensor) -> torch.Tensor:
        """z_yes - z_no from the two LM-head rows only (= log P(yes) - log P(no))."""
        ids = torch.tensor(self.answer_ids, device=h.device)
        w = self.lm_head.weight[ids]  # [2, H]
        z = h.to(w.dtype) @ w.T
        if getattr(self.lm_head, "bias", None) is not None:  # not every LM head has a bias attribute
            z = z + self.lm_head.bias[ids]
        return (z[:, 0] - z[:, 1]).float()

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        h = self.hidden_at(input_ids, attention_mask, self.answer_index(attention_mask), position_ids)
        return self.head_diff(h)

    def score_batch(self, batch) -> torch.Tensor:
        if getattr(batch, "host_checked", False):
            # A training batch, its rows checked on the host (prepare_batch): the collated read positions and a mask
            # built on the device, so the step reads nothing back.
            h = collated_states(self, batch.input_ids, batch.attention_mask, batch.position_ids, batch.last_token)
            if h is not None:
                return self.head_diff(rows_at(h, batch.last_token - self.n_end))
        return self(batch.input_ids, batch.attention_mask, batch.position_ids)

    def prepare_batch(self, batch):
        """The row-length check of ``answer_index``, on the host copy of a training batch."""
        if batch.last_token is not None and bool((batch.last_token < self.n_end).any()):
            raise ValueError("a row is shorter than its end tokens; it holds no template")
        return batch

    def export_meta(self) -> dict[str, Any]:
        """A plain causal LM (AutoModelForCausalLM loads it) + tokenizer; the template and answer ids sit in
        ``config.rmlab`` so ``rmlab.models.load_export`` rebuilds the same scorer."""
        return {
            "head": self.kind,
            "template": self.group_template.template,
            "answers": list(self.answers),
            "answer_ids": list(self.answer_ids),
            "read_with": (
                "AutoModelForCausalLM: fill template (plain text, tokenizer(text) + eos), then "
                f"logits[answer_ids[0]] - logits[answer_ids[1]] at the token before the final eos = log P({self.answers[0]}) "
                f"- log P({self.answers[1]})"
                + ("; a row shows (response_a, response_b): > 0 prefers A" if self.kind == "judge" else "")
            ),
        }


class PairwiseJudge(GenerativeVerifier):
    """A causal LM that reads two responses and answers A or B; a row's output is log P(A) - log P(B)."""

    kind = "judge"
    default_template, default_answers = JUDGE_TEMPLATE, ("A", "B")

    def head_report(self, scored: Iterable) -> dict[str, float]:
        """Order-averaged accuracy and the position-bias rate over scored batches (see ``judge_stats``)."""
        offs, r, w, lo, t = 0, [], [], [], []
        for s in scored:  # rows are per batch: shift indices into one flat tensor
            b = s.batch
            r.append(s.rewards), w.append(b.winner.cpu() + offs), lo.append(b.loser.cpu() + offs), t.append(b.tie.cpu())
            offs += s.rewards.numel()
        if not r:
            return {}
        return judge_stats(torch.cat(r), torch.cat(w), torch.cat(lo), torch.cat(t))


def judge_stats(
    rewards: torch.Tensor, first: torch.Tensor, second: torch.Tensor, tie: torch.Tensor | None = None
) -> dict[str, float]:
    """Order-averaged judge metrics over comparisons on non-tie labels.

    ``first`` rows show the chosen response as A (output r1 = log P(A)/P(B)); ``second`` rows show it as B (r2).
    - ``p_chosen``: mean of (sigmoid(r1) + sigmoid(-r2)) / 2, P(chosen) averaged over both orders;
    - ``acc``: that average above 1/2 scores 1, exactly 1/2 scores 0.5 (a tie), below scores 0;
    - ``acc_chosen_first`` / ``acc_chosen_second``: one order only (r1 > 0 / r2 < 0); their gap shows the bias;
    - ``position_bias_rate``: share of comparisons whose single-order verdict flips when the order is
      swapped, i.e. the judge picks the same *position* both times (sign(r1) == sign(r2)).
    """
    keep = ~tie if tie is not None else torch.ones_like(first, dtype=torch.bool)
    r1, r2 = rewards[first][keep].double(), rewards[second][keep].double()
    if r1.numel() == 0:
        return {}
    # (s(r1) + s(-r2)) / 2 written as 1/2 + (s(r1) - s(r2)) / 2: exactly 1/2 when r1 == r2. The verdict is
    # read from r1 vs r2 (the same order, but no sigmoid saturation can turn a win into a tie).
    p = 0.5 + 0.5 * (torch.sigmoid(r1) - torch.sigmoid(r2))
    acc = torch.where(r1 > r2, 1.0, torch.where(r1 == r2, 0.5, 0.0)).double()  # the mean in float64, as p
    return {
        "p_chosen": float(p.mean()),
        "acc": float(acc.mean()),
        "acc_chosen_first": float((r1 > 0).double().mean()),
        "acc_chosen_second": float((r2 < 0).double().mean()),
        "position_bias_rate": float(((r1 > 0) == (r2 > 0)).double().mean()),
        "comparisons": int(r1.numel()),
    }


