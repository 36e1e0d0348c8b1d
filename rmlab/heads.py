"""Multi-attribute reward heads (ArmoRM, Wang et al. 2024): ``model.head=attributes``.

The backbone's head has one output per attribute (helpfulness, correctness, ... or the simulator's
``on_topic``, ``format_ok``, ``polite``). Two things are trained, as ArmoRM's two stages:

1. **attribute regression**: each output regresses its rating, with missing ratings (NaN) masked
   (``rmlab.losses.generative.AttributeLoss``);
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
next to it in ``rmlab_gating.safetensors``. ``build_model(name_or_path=<export>, head="attributes")``
rebuilds the combined scorer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rmlab.model import RewardModel, pool_index, read_export_meta

GATING_FILE = "rmlab_gating.safetensors"
HEADS = ("scalar", "attributes")


def _options(head_options: dict | None, name_or_path: str | None) -> dict:
    meta = read_export_meta(name_or_path) if name_or_path and Path(name_or_path).is_dir() else {}
    saved = (
        {k: meta[k] for k in ("attributes", "combine", "weights", "gating_hidden") if k in meta}
        if meta.get("head") == "attributes"
        else {}
    )
    opts = {**saved, **{k: v for k, v in (head_options or {}).items() if v is not None}}
    if not opts.get("attributes"):
        raise ValueError("head=attributes needs model.head_options.attributes: the list of attribute names")
    return opts


def head_size(head: str, head_options: dict | None, name_or_path: str | None = None) -> int:
    """Outputs of the head: the number of attributes (read from an export when not configured)."""
    if head not in HEADS:
        raise ValueError(f"model.head must be one of {HEADS}, got {head!r}")
    return 1 if head == "scalar" else len(_options(head_options, name_or_path)["attributes"])


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation over the finite pairs; NaN when fewer than 3 or either side is constant."""
    keep = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[keep].double(), y[keep].double()
    if x.numel() < 3:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    den = (x.norm() * y.norm()).item()
    return float((x @ y).item() / den) if den > 0 else float("nan")


class AttributeRewardModel(RewardModel):
    """A reward model with one output per attribute and a combination to one reward.

    ``score_batch(batch)`` -> rewards [N]; ``score_heads(batch)`` -> (rewards, {"attributes": [N, A],
    "weights": [N, A]}) for losses that train the attributes. The gate needs ``batch.prompt_len``.
    """

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

    def prompt_hidden(self, h: torch.Tensor, input_ids, attention_mask, prompt_len) -> torch.Tensor:
        """Hidden state at the prompt's last token. A causal LM's is already in ``h`` (it never sees the
        response); an encoder's would, so it gets a second, prompt-only forward."""
        if prompt_len is None:
            raise ValueError("combine=gating reads the prompt embedding: the batch needs prompt_len")
        first = pool_index(attention_mask, "first")
        end = first + prompt_len.to(first.device) - 1
        if self.pooling == "last":
            return h[torch.arange(h.shape[0], device=h.device), end]
        pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        pmask = attention_mask * (pos[None] <= end[:, None])
        hp = self.hidden_states(input_ids, pmask)
        return hp[torch.arange(hp.shape[0], device=hp.device), pool_index(pmask, self.pooling)]

    def hidden_states(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.hf.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state

    def heads(self, input_ids, attention_mask, position_ids=None, prompt_len=None) -> dict[str, torch.Tensor]:
        h = self.hidden_states(input_ids, attention_mask, position_ids)
        pooled = h[torch.arange(h.shape[0], device=h.device), pool_index(attention_mask, self.pooling)]
        attrs = self.head_outputs(pooled).float()
        if self.gate is None:
            w = self.fixed_weights.to(attrs).expand_as(attrs)
        else:
            # Detached: the preference signal shapes the gate, not the embedding the attributes read.
            ph = self.prompt_hidden(h, input_ids, attention_mask, prompt_len).detach()
            w = torch.softmax(self.gate(ph.to(self.gate[0].weight.dtype)).float(), -1)
        return {"attributes": attrs, "weights": w}

    def score_heads(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.heads(batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_len)
        return (out["weights"] * out["attributes"]).sum(-1), out

    def score_batch(self, batch) -> torch.Tensor:
        return self.score_heads(batch)[0]

    def forward(self, input_ids, attention_mask, position_ids=None, prompt_len=None) -> torch.Tensor:
        out = self.heads(input_ids, attention_mask, position_ids, prompt_len)
        return (out["weights"] * out["attributes"]).sum(-1)

    @torch.no_grad()
    def head_report(self, batches: Iterable) -> dict[str, float]:
        """Pearson correlation of each attribute output with its rating (the simulator's true quality),
        and of the combined reward with the true reward, over the batches."""
        from lightning.fabric.utilities.apply_func import move_data_to_device

        was = self.training
        self.eval()
        pred, truth, rew, true_r = [], [], [], []
        for b in batches:
            b = move_data_to_device(b, self.fixed_weights.device)
            r, out = self.score_heads(b)
            pred.append(out["attributes"].cpu())
            truth.append(
                b.attributes.cpu()
                if b.attributes.shape[1] == len(self.attributes)
                else torch.full_like(out["attributes"].cpu(), float("nan"))
            )
            rew.append(r.cpu())
            true_r.append(b.true_reward.cpu())
        self.train(was)
        if not pred:
            return {}
        p, t = torch.cat(pred), torch.cat(truth)
        rep = {f"attr_corr/{n}": pearson(p[:, i], t[:, i]) for i, n in enumerate(self.attributes)}
        rep["reward_true_corr"] = pearson(torch.cat(rew), torch.cat(true_r))
        return rep

    def save_pretrained(self, out_dir: str | os.PathLike, extra: dict | None = None) -> Path:
        meta = {
            "head": "attributes",
            "attributes": self.attributes,
            "combine": self.combine,
            "weights": self.fixed_weights.tolist(),
            "gating_hidden": self.gating_hidden,
            **(extra or {}),
        }
        out = super().save_pretrained(out_dir, extra=meta)
        if self.gate is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.gate.state_dict().items()}, str(out / GATING_FILE))
        return out


def build_head(
    head: str, hf: nn.Module, tokenizer: Any, pooling: str, head_options: dict | None, name_or_path: str | None = None
) -> RewardModel:
    """The multi-output model around a built backbone (called by ``rmlab.model.build_model``)."""
    if head != "attributes":
        raise ValueError(f"model.head must be one of {HEADS}, got {head!r}")
    opts = _options(head_options, name_or_path)
    model = AttributeRewardModel(hf, tokenizer, pooling, **opts)
    gfile = Path(name_or_path) / GATING_FILE if name_or_path else None
    if model.gate is not None and gfile is not None and gfile.exists():
        from safetensors.torch import load_file

        model.gate.load_state_dict(load_file(str(gfile)))
    return model
