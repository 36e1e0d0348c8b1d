"""Multi-attribute reward heads (ArmoRM, Wang et al. 2024): ``model.head=attributes``.

The backbone's head has one output per attribute (helpfulness, correctness, ... or the simulator's
``on_topic``, ``format_ok``, ``polite``). Two things are trained, as ArmoRM's two stages:

1. **attribute regression**: each output regresses its rating, with missing ratings (NaN) masked
   (``rmlab.losses.heads.AttributeLoss``);
2. **combination** to one scalar reward, ``r = sum_i w_i * a_i``:
   - ``combine=fixed``: ``w`` from the config (a prior on what matters);
   - ``combine=gating``: ``w = softmax(gate(prompt embedding))``, a small MLP on the hidden state at the
     prompt's last token, trained with BT on preference pairs. The gate reads a *detached* prompt
     embedding and (in ``AttributeLoss``) detached attribute scores, so the preference loss trains the
     gate only and never pulls the attribute outputs away from their ratings (ArmoRM's stage 2 on a
     frozen stage 1, run in the same steps).

Export: the backbone and its ``A``-output head save as a plain ``AutoModelForSequenceClassification``
(``problem_type=regression``, ``id2label`` = attribute names), so transformers returns the attribute
scores. ``config.rmlab`` holds the names, the combine mode and the fixed weights; the gate's weights sit
next to it in ``rmlab_gating.safetensors``. ``rmlab.models.load_export(<export>)`` rebuilds the combined scorer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rmlab.metrics import pearson
from rmlab.models.backbone import read_export_meta
from rmlab.models.base import RewardModel, backbone_states, pool_index, rows_at
from rmlab.models.packing import collated_states
from rmlab.models.scalar import ScalarRewardModel

GATING_FILE = "rmlab_gating.safetensors"
OPTION_KEYS = ("attributes", "combine", "weights", "gating_hidden")


def attribute_options(head_options: dict | None, name_or_path: str | None) -> dict:
    """The head's options: the config's, over what an rmlab export saved."""
    meta = read_export_meta(name_or_path) if name_or_path and Path(name_or_path).is_dir() else {}
    saved = (
        {k: meta[k] for k in OPTION_KEYS if k in meta}
        if meta.get("head") == "attributes"
        else {}
    )
    opts = {**saved, **{k: v for k, v in (head_options or {}).items() if v is not None}}
    if not opts.get("attributes"):
        raise ValueError("head=attributes needs model.head_options.attributes: the list of attribute names")
    return opts


class AttributeRewardModel(ScalarRewardModel):
    """A reward model with one output per attribute and a combination to one reward.

    ``score_batch(batch)`` -> rewards [N]; ``score_heads(batch)`` -> (rewards, {"attributes": [N, A],
    "weights": [N, A]}) for losses that train the attributes. The gate needs ``batch.prompt_len``.
    """

    kind = "attributes"
    extra_outputs = ("attributes", "weights")

    def __init__(
        self,
        hf_model: nn.Module,
        tokenizer: Any = None,
        pooling: str = "auto",
        attributes: list[str] = (),
        combine: str = "gating",
        weights: list[float] | None = None,
        gating_hidden: int = 64,
    ):
        names = list(attributes)
        super().__init__(hf_model, tokenizer, pooling, num_outputs=len(names))
        if combine not in ("fixed", "gating"):
            raise ValueError(f"head_options.combine must be fixed|gating, got {combine!r}")
        a = len(names)
        w = [1.0 / a] * a if weights is None else [float(x) for x in weights]
        if len(w) != a:
            raise ValueError(f"head_options.weights has {len(w)} values for {a} attributes {names}")
        self.attributes, self.combine, self.gating_hidden = names, combine, int(gating_hidden)
        self.output_names = tuple(names)
        self.register_buffer("fixed_weights", torch.tensor(w))
        hsz = hf_model.config.hidden_size
        self.gate = (
            nn.Sequential(nn.Linear(hsz, gating_hidden), nn.ReLU(), nn.Linear(gating_hidden, a))
            if combine == "gating"
            else None
        )
        # transformers then reads the head as A named regression outputs.
        cfg = hf_model.config
        cfg.id2label = dict(enumerate(names))
        cfg.label2id = {n: i for i, n in enumerate(names)}
        cfg.problem_type = "regression"

    # The LM path of the scalar head (loss=grm) is not wired into the attribute forward: refuse it, named.
    require_outputs = RewardModel.require_outputs

    def prompt_hidden(self, h: torch.Tensor, input_ids, attention_mask, prompt_len, check: bool = True) -> torch.Tensor:
        """Hidden state at the prompt's last token. A causal LM's is already in ``h`` (it never sees the
        response); an encoder's would, so it gets a second, prompt-only forward."""
        if prompt_len is None:
            raise ValueError("combine=gating reads the prompt embedding: the batch needs prompt_len")
        first = pool_index(attention_mask, "first", check=check)
        end = first + prompt_len.to(first.device) - 1
        if self.pooling == "last":
            return rows_at(h, end)
        pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        pmask = attention_mask * (pos[None] <= end[:, None])
        hp = backbone_states(self.hf, input_ids, pmask)
        return rows_at(hp, pool_index(pmask, self.pooling))

    def heads(
        self, input_ids, attention_mask, position_ids=None, prompt_len=None, last_token=None
    ) -> dict[str, torch.Tensor]:
        """``last_token``: a collated batch's read positions. With them a causal LM reads the rewards as the scalar
        head's padded forward does (a mask built on the device, no row check): the step reads nothing back."""
        h = collated_states(self, input_ids, attention_mask, position_ids, last_token) if self.pooling == "last" else None
        collated = h is not None
        if collated:
            pooled = rows_at(h, last_token)
        else:
            h = backbone_states(self.hf, input_ids, attention_mask, position_ids)
            pooled = rows_at(h, pool_index(attention_mask, self.pooling))
        attrs = self.head_outputs(pooled).float()
        if self.gate is None:
            w = self.fixed_weights.to(attrs).expand_as(attrs)
        else:
            # Detached: the preference signal shapes the gate, not the embedding the attributes read.
            ph = self.prompt_hidden(h, input_ids, attention_mask, prompt_len, check=not collated).detach()
            w = torch.softmax(self.gate(ph.to(self.gate[0].weight.dtype)).float(), -1)
        return {"attributes": attrs, "weights": w}

    def score_heads(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.heads(batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_len, batch.last_token)
        return (out["weights"] * out["attributes"]).sum(-1), out

    def score_batch(self, batch) -> torch.Tensor:
        return self.score_heads(batch)[0]

    def forward(self, input_ids, attention_mask, position_ids=None, prompt_len=None) -> torch.Tensor:
        out = self.heads(input_ids, attention_mask, position_ids, prompt_len)
        return (out["weights"] * out["attributes"]).sum(-1)

    def head_report(self, scored: Iterable) -> dict[str, float]:
        """Pearson correlation of each attribute output with its rating (the simulator's true quality),
        and of the combined reward with the true reward, over scored batches (rmlab.models.scoring)."""
        pred, truth, rew, true_r = [], [], [], []
        for s in scored:
            b, attrs = s.batch, s.heads["attributes"]
            pred.append(attrs)
            truth.append(
                b.attributes.cpu() if b.attributes.shape[1] == len(self.attributes) else torch.full_like(attrs, float("nan"))
            )
            rew.append(s.rewards)
            true_r.append(b.true_reward.cpu())
        if not pred:
            return {}
        p, t = torch.cat(pred), torch.cat(truth)
        rep = {f"attr_corr/{n}": pearson(p[:, i], t[:, i], min_n=3) for i, n in enumerate(self.attributes)}
        rep["reward_true_corr"] = pearson(torch.cat(rew), torch.cat(true_r), min_n=3)
        return rep

    def export_meta(self) -> dict[str, Any]:
        return {
            **super().export_meta(),
            "attributes": self.attributes,
            "combine": self.combine,
            "weights": self.fixed_weights.tolist(),
            "gating_hidden": self.gating_hidden,
            "read_with": "AutoModelForSequenceClassification: logits[:, i] is attribute i (id2label); the reward is "
            + (
                "sum_i weights[i] * logits[:, i]"
                if self.combine == "fixed"
                else "the gate's softmax weights (rmlab_gating.safetensors, on the hidden state at the prompt's last "
                "token) times logits: rmlab.models.load_export rebuilds it; plain tools get the attributes only"
            ),
        }

    def save_extra(self, out: Path) -> None:
        if self.gate is not None:
            save_file({k: v.contiguous() for k, v in self.gate.state_dict().items()}, str(out / GATING_FILE))

    def load_gate(self, name_or_path: str | None) -> None:
        """The gate's weights from an export dir, when it has them."""
        gfile = Path(name_or_path) / GATING_FILE if name_or_path else None
        if self.gate is not None and gfile is not None and gfile.exists():
            self.gate.load_state_dict(load_file(str(gfile)))
