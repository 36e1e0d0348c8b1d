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

How rows are built: the data module calls ``model.group_template`` (a picklable ``GroupTemplate``) on
each text group *after* the train/val split and *before* tokenization. The template is split at the
first response placeholder, so the part before it is the group's shared prefix (prefix sharing and the
truncation policy keep working: a row keeps its end, where the answer cue is). Rows then end with the
tokenizer's end specials (<eos>); a causal LM's earlier positions never see them, so the answer is read
``len(end)`` tokens before the last real token.

Judge rows: each comparison (w, l) becomes two rows, (A=w, B=l) with label 1 and (A=l, B=w) with
label 0 (0.5 each for a tie), and a comparison ``winner=row(w,l), loser=row(l,w)``. With ``r1, r2`` the
two rows' outputs, the order-averaged ``P(chosen) = (sigmoid(r1) + sigmoid(-r2)) / 2`` exceeds 1/2 iff
``r1 > r2``: the shared pairwise accuracy metric *is* the order-averaged verdict.
"""

from __future__ import annotations

import dataclasses
import os
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rmlab.data.tokenize import special_tokens
from rmlab.data.types import PreferenceGroup
from rmlab.model import _set_dropout, build_tokenizer, pool_index

VERIFIER_TEMPLATE = "Question: {prompt}\nResponse: {response}\nIs this response good? Answer Yes or No:"
JUDGE_TEMPLATE = (
    "Question: {prompt}\nResponse A: {response_a}\nResponse B: {response_b}\nWhich response is better? Answer A or B:"
)
FIELDS = {"verifier": ("prompt", "response"), "judge": ("prompt", "response_a", "response_b")}


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def check_template(template: str, kind: str) -> None:
    """Each placeholder of the kind exactly once, no other; the first response slot after {prompt}
    would still work, but a response placeholder must exist or the model never sees what it judges."""
    want = FIELDS[kind]
    got = template_fields(template)
    bad = [f for f in got if f not in want]
    missing = [f for f in want if got.count(f) != 1]
    if bad or missing:
        raise ValueError(
            f"{kind} template must contain each of {{{'}, {'.join(want)}}} exactly once and nothing else "
            f"(write a literal brace as {{{{ or }}}}); got placeholders {got}"
        )
    if kind == "judge" and template.index("{response_a}") > template.index("{response_b}"):
        raise ValueError("the judge template must show {response_a} before {response_b}")
    if template != template.rstrip():
        # A trailing space becomes its own token in most BPE vocabularies, and the answer token then
        # usually starts without one: the cue the LM was trained on is lost.
        raise ValueError("the template must not end with whitespace; put the space in the answer token (' Yes')")


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


class GroupTemplate:
    """Re-templates a text group into the rows a generative model reads. Picklable, no model inside.

    The data module calls it on each ``PreferenceGroup`` before tokenization; ``None`` drops the group
    (a judge needs at least one comparison). ``repr`` keys the tokenization cache. A plain class, not a
    dataclass: Hydra's ``instantiate`` would turn a dataclass argument into a dict.
    """

    def __init__(self, kind: str, template: str):
        if kind not in FIELDS:
            raise ValueError(f"template kind must be one of {sorted(FIELDS)}, got {kind!r}")
        check_template(template, kind)
        self.kind, self.template = kind, template

    def __repr__(self) -> str:
        return f"GroupTemplate(kind={self.kind!r}, template={self.template!r})"

    def _split(self, slot: str) -> tuple[str, str]:
        head, tail = self.template.split("{" + slot + "}", 1)
        return head, tail

    def __call__(self, g: PreferenceGroup) -> PreferenceGroup | None:
        return self.verifier_rows(g) if self.kind == "verifier" else self.judge_rows(g)

    def verifier_rows(self, g: PreferenceGroup) -> PreferenceGroup:
        head, tail = self._split("response")
        prefix, suffix = head.format(prompt=g.prompt), tail.format(prompt=g.prompt)
        return dataclasses.replace(g, prompt=prefix, responses=[r + suffix for r in g.responses])

    def judge_rows(self, g: PreferenceGroup) -> PreferenceGroup | None:
        if not g.comparisons:
            return None
        head, tail = self._split("response_a")
        prefix = head.format(prompt=g.prompt)
        truth = g.true_rewards
        rows, labels, true, comps = [], [], [], []
        for c in g.comparisons:
            for a, b, label in ((c.winner, c.loser, 1.0), (c.loser, c.winner, 0.0)):
                rows.append(g.responses[a] + tail.format(prompt=g.prompt, response_b=g.responses[b]))
                labels.append(0.5 if c.tie else label)
                # Truth of "A beats B": the gap, so the oracle baseline still reads r_w > r_l.
                true.append(truth[a] - truth[b] if truth is not None else float("nan"))
            i = len(rows) - 2
            comps.append(dataclasses.replace(c, winner=i, loser=i + 1))
        return dataclasses.replace(
            g,
            prompt=prefix,
            responses=rows,
            comparisons=comps,
            labels=labels,
            true_rewards=true if truth is not None else None,
            ranks=None,
            scores=None,
            attributes=None,
        )


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


class GenerativeVerifier(nn.Module):
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
        super().__init__()
        self.hf, self.tokenizer = hf_model, tokenizer
        self.group_template = GroupTemplate(self.kind, template or self.default_template)
        self.answers = tuple(answers or self.default_answers)
        self.answer_ids = answer_token_ids(tokenizer, self.answers, answer_ids)
        # Rows end with the tokenizer's end specials; the answer cue sits just before them.
        self.n_end = len(special_tokens(tokenizer)[2])
        self.lm_head = hf_model.get_output_embeddings()
        if self.lm_head is None:
            raise ValueError(f"{type(hf_model).__name__} has no LM head; load it with AutoModelForCausalLM")

    @property
    def config(self):
        return self.hf.config

    def answer_index(self, attention_mask: torch.Tensor) -> torch.Tensor:
        idx = pool_index(attention_mask, "last") - self.n_end
        if (idx < 0).any():
            raise ValueError("a row is shorter than its end tokens; it holds no template")
        return idx

    def hidden_at(self, input_ids, attention_mask, index, position_ids=None) -> torch.Tensor:
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.hf.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        h = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return h[torch.arange(h.shape[0], device=h.device), index]

    def head_diff(self, h: torch.Tensor) -> torch.Tensor:
        """z_yes - z_no from the two LM-head rows only (= log P(yes) - log P(no))."""
        ids = torch.tensor(self.answer_ids, device=h.device)
        w = self.lm_head.weight[ids]  # [2, H]
        z = h.to(w.dtype) @ w.T
        if getattr(self.lm_head, "bias", None) is not None:
            z = z + self.lm_head.bias[ids]
        return (z[:, 0] - z[:, 1]).float()

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        h = self.hidden_at(input_ids, attention_mask, self.answer_index(attention_mask), position_ids)
        return self.head_diff(h)

    def save_pretrained(self, out_dir: str | os.PathLike, extra: dict | None = None) -> Path:
        """A plain causal LM (AutoModelForCausalLM loads it) + tokenizer; the template and answer ids
        sit in ``config.rmlab`` so ``build_generative(name_or_path=out_dir)`` rebuilds the same scorer."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = self.hf.config
        if getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = self.tokenizer.pad_token_id
        cfg.rmlab = {
            "head": self.kind,
            "template": self.group_template.template,
            "answers": list(self.answers),
            "answer_ids": list(self.answer_ids),
            **(extra or {}),
        }
        self.hf.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        return out


class PairwiseJudge(GenerativeVerifier):
    """A causal LM that reads two responses and answers A or B; a row's output is log P(A) - log P(B)."""

    kind = "judge"
    default_template, default_answers = JUDGE_TEMPLATE, ("A", "B")

    @torch.no_grad()
    def head_report(self, batches: Iterable) -> dict[str, float]:
        """Order-averaged accuracy and the position-bias rate over the batches (see ``judge_stats``)."""
        from lightning.fabric.utilities.apply_func import move_data_to_device

        was = self.training
        self.eval()
        parts = []
        dev = self.lm_head.weight.device
        for b in batches:
            b = move_data_to_device(b, dev)
            parts.append(
                (self(b.input_ids, b.attention_mask, b.position_ids).cpu(), b.winner.cpu(), b.loser.cpu(), b.tie.cpu())
            )
        self.train(was)
        if not parts:
            return {}
        offs, r, w, lo, t = 0, [], [], [], []
        for ri, wi, li, ti in parts:  # rows are per batch: shift indices into one flat tensor
            r.append(ri), w.append(wi + offs), lo.append(li + offs), t.append(ti)
            offs += ri.numel()
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
    acc = torch.where(r1 > r2, 1.0, torch.where(r1 == r2, 0.5, 0.0))
    return {
        "p_chosen": float(p.mean()),
        "acc": float(acc.mean()),
        "acc_chosen_first": float((r1 > 0).double().mean()),
        "acc_chosen_second": float((r2 < 0).double().mean()),
        "position_bias_rate": float(((r1 > 0) == (r2 > 0)).double().mean()),
        "comparisons": int(r1.numel()),
    }


def build_generative(
    kind: str = "verifier",
    name_or_path: str | None = None,
    config: dict | None = None,
    tokenizer: str | None = None,
    template: str | None = None,
    answers: list[str] | None = None,
    answer_ids: list[int] | None = None,
    dropout: bool | float = False,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = "sdpa",
    **_: Any,
) -> GenerativeVerifier:
    """Build a ``GenerativeVerifier`` (kind=verifier) or ``PairwiseJudge`` (kind=judge) on a causal LM.

    name_or_path: a hub name or local dir (an rmlab export restores its template and answer ids);
    config: build from this config with random weights (``model_type`` plus fields), as ``build_model``.
    template/answers/answer_ids: null = the export's, else the kind's default.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if kind not in ("verifier", "judge"):
        raise ValueError(f"generative kind must be verifier|judge, got {kind!r}")
    tok = build_tokenizer(tokenizer, name_or_path, trust_remote_code)
    kw: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if config is not None:
        cfg = dict(config)
        hf_cfg = AutoConfig.for_model(
            cfg.pop("model_type"), pad_token_id=tok.pad_token_id, **{"vocab_size": len(tok), **cfg}
        )
        _set_dropout(nn.Module(), hf_cfg, dropout)
        hf = AutoModelForCausalLM.from_config(hf_cfg, **kw)
    elif name_or_path:
        hf = AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kw)
    else:
        raise ValueError("set model.name_or_path (hub name or local dir) or model.config (build from a config)")
    _set_dropout(hf, hf.config, dropout)
    if gradient_checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    meta = getattr(hf.config, "rmlab", None) or {}
    cls = GenerativeVerifier if kind == "verifier" else PairwiseJudge
    saved = meta if meta.get("head") == cls.kind else {}  # an rmlab export of the same kind: its settings
    model = cls(
        hf,
        tok,
        template=template or saved.get("template"),
        answers=answers or saved.get("answers"),
        answer_ids=answer_ids or (saved.get("answer_ids") if not answers else None),
    )
    check_restricted_head(model)
    return model
