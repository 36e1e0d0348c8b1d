"""The scalar reward model: a Hugging Face backbone with a one-output head, pooled by the attention mask.

The reward of a row is the head applied to one token found through the attention mask, never
through ``pad_token_id`` (which picks the wrong token when pad == eos or under left padding):

- causal LMs read the **last real token** (the end of the response, usually <eos>);
- encoders with a [CLS] pooler (BERT, RoBERTa, MiniLM) read the **first real token** ([CLS]), where
  their classification head and pretrained pooler are trained to look. This also keeps the exported
  model equal to plain ``AutoModelForSequenceClassification``.

Position ids are computed from the mask, so left padding does not shift positions. Causal LMs can also
run packed or prefix-shared (rmlab.models.packing): every unique token forwarded once, same rewards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from rmlab.models.base import ENCODER_TYPES, RewardModel, backbone_states, pool_index, rows_at
from rmlab.models.packing import collated_states, packed_hidden


class ScalarRewardModel(RewardModel):
    """Backbone + scalar head. ``forward`` returns one reward per row, shape [N]."""

    kind = "scalar"
    # Set by build_model (configure_speed); a bare model stays padded.
    forward_mode: str = "padded"
    row_tokens: int | None = None
    lm_source: str | None = None  # the LM path for loss=grm: None = off (the default) | tied | loaded (enable_lm)

    def __init__(self, hf_model: nn.Module, tokenizer: Any = None, pooling: str = "auto", num_outputs: int = 1):
        super().__init__(hf_model, tokenizer)
        # num_outputs > 1 only for multi-output heads (rmlab.models.attributes), which combine them into one reward.
        self.num_outputs = num_outputs
        n = getattr(hf_model.config, "num_labels", 1)
        if n != num_outputs:
            raise ValueError(
                f"a reward model has a scalar head: num_labels must be {num_outputs}, got {n}. "
                "Load the backbone with num_labels=1 (rmlab does) or drop the classifier's extra outputs."
            )
        mt = getattr(hf_model.config, "model_type", "")
        self.pooling = ("first" if mt in ENCODER_TYPES else "last") if pooling == "auto" else pooling
        self.head, self.head_wants_seq, self.pre_head = self._find_head()

    def _find_head(self):
        hf = self.hf
        if hasattr(hf, "score") and isinstance(getattr(hf.score, "original_module", hf.score), nn.Linear):  # Llama, Qwen2, ...
            head = hf.score
        elif hasattr(hf, "classifier"):  # BERT-style (Linear) or RoBERTa-style (module over [CLS])
            head = hf.classifier
        else:
            raise ValueError(f"{type(hf).__name__} has no `score` or `classifier` head that rmlab knows")
        inner = getattr(head, "original_module", head)  # under LoRA the head is wrapped by peft (rmlab.models.lora)
        out = inner.out_features if isinstance(inner, nn.Linear) else getattr(getattr(inner, "out_proj", None), "out_features", 1)
        if out != self.num_outputs:
            raise ValueError(f"the reward head must have exactly {self.num_outputs} output(s), this one has {out}")
        pre = []
        pooler = getattr(hf.base_model, "pooler", None)
        if pooler is not None and self.pooling == "first":
            pre.append(("pooler", pooler))
        if isinstance(inner, nn.Linear) and isinstance(getattr(hf, "dropout", None), nn.Dropout):
            pre.append(("dropout", hf.dropout))
        return head, not isinstance(inner, nn.Linear), pre

    def backbone_replaced(self) -> None:
        # The head module object changed (LoRA merge): point at the new one.
        self.head, self.head_wants_seq, self.pre_head = self._find_head()

    def hidden_at_pool(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        h = backbone_states(self.hf, input_ids, attention_mask, position_ids)
        return rows_at(h, pool_index(attention_mask, self.pooling))

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        if self.pooling == "first":
            return self.encoder_logits(input_ids, attention_mask).reshape(-1).float()
        return self.reward_from_hidden(self.hidden_at_pool(input_ids, attention_mask, position_ids))

    def encoder_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encoders: the model's own classification path (pooler, pre-classifier, activations: whatever
        the architecture has, so DistilBERT, ALBERT, DeBERTa are exact too), on rows rotated to right
        padding so that [CLS] sits at position 0 where every encoder head reads it. Padding side then
        cannot change a reward."""
        n = input_ids.shape[-1]
        start = pool_index(attention_mask, "first")
        cols = (torch.arange(n, device=input_ids.device)[None, :] + start[:, None]) % n
        return self.hf(input_ids=input_ids.gather(1, cols), attention_mask=attention_mask.gather(1, cols)).logits

    def reward_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The head on pooled hidden states [N, H] -> rewards [N] (shared by every forward mode)."""
        return self.head_outputs(h).reshape(-1).float()

    def head_features(self, h: torch.Tensor) -> torch.Tensor:
        """Pooled hidden states [N, H] -> what the head's linear layer reads: after an encoder's pooler and the
        classifier's dropout, as the transformers model does (ODIN's second head reads the same features)."""
        for name, mod in self.pre_head:
            h = mod(h[:, None, :]) if name == "pooler" else mod(h)
        return h

    def head_outputs(self, h: torch.Tensor) -> torch.Tensor:
        """The head on pooled hidden states [N, H] -> [N, num_outputs] (multi-output heads read this)."""
        n = h.shape[0]
        h = self.head_features(h)
        r = self.head(h[:, None, :]) if self.head_wants_seq else self.head(h)
        return r.reshape(n, -1)

    def score_batch(self, batch) -> torch.Tensor:
        """Rewards [N] for a RewardBatch in ``self.forward_mode`` (padded | packed | prefix_shared).

        All modes give the same rewards (tests/test_packing.py); packed and prefix_shared forward each
        unique token once instead of padding every row to the longest (see rmlab/models/packing.py).
        """
        if self.forward_mode == "padded":
            h = self.padded_pooled(batch)
            if h is not None:
                return self.reward_from_hidden(h)
            return self(batch.input_ids, batch.attention_mask, batch.position_ids)
        return self.reward_from_hidden(packed_hidden(self, batch))

    def padded_states(self, batch) -> torch.Tensor | None:
        """Hidden states [N, L, H] of a padded forward of a causal LM on the sync-free path (``collated_states``),
        to be read at ``batch.last_token``; None where it does not apply (an encoder, no explicit mask, no
        ``last_token``)."""
        if self.pooling != "last":
            return None
        return collated_states(self, batch.input_ids, batch.attention_mask, batch.position_ids, batch.last_token)

    def padded_pooled(self, batch) -> torch.Tensor | None:
        """Pooled hidden states [N, H] of ``padded_states``, read at the collated last tokens; None as there."""
        h = self.padded_states(batch)
        return None if h is None else rows_at(h, batch.last_token)

    # ------------------------------------------------------------ the language-modelling path (loss=grm)
    def require_outputs(self, names) -> None:
        if "response_logp" in names:
            self.enable_lm()
        super().require_outputs(names)

    def enable_lm(self) -> None:
        """Turn on ``response_logp``, the log-probability of each winning response under the backbone's language
        model (GRM's regulariser, rmlab.losses.grm). Causal LMs only. The LM head (``self.lm_source``):

        - ``tied``: the input embeddings, when the backbone ties them (``tie_word_embeddings``) or has no LM head
          to load (built from a config with random weights, or a checkpoint saved without one such as an rmlab
          export); trained with the backbone;
        - ``loaded``: the checkpoint's own ``lm_head.weight``, read once from its safetensors and kept frozen (a
          non-persistent buffer: not trained, not in checkpoints, not exported), as in GRM's LoRA runs.
        """
        mt = getattr(self.config, "model_type", "")
        if mt in ENCODER_TYPES or self.pooling == "first":
            raise ValueError(
                f"loss=grm trains a language-modelling loss through the backbone, which needs a causal LM; this "
                f"backbone is an encoder ({mt}). Use model=tiny_llama, or model=hf model.name_or_path=<a causal LM>"
            )
        if self.lm_source is not None:
            return
        weight = None
        if not getattr(self.config, "tie_word_embeddings", False):
            weight = load_lm_head(getattr(self.config, "_name_or_path", "") or None)
        if weight is not None:
            emb = self.hf.get_input_embeddings().weight
            if weight.shape[1] != emb.shape[1]:
                raise ValueError(f"lm_head.weight has width {weight.shape[1]}, the backbone's hidden size is {emb.shape[1]}")
            self.register_buffer("lm_weight", weight.to(emb.dtype), persistent=False)
            self.lm_source = "loaded"
        else:
            self.lm_source = "tied"
        self.extra_outputs = (*type(self).extra_outputs, "response_logp")

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, H] -> vocabulary logits [T, V] (float32). Rows past the LM head's vocabulary (a pad
        token rmlab added to the tokenizer) are the resized input embeddings' new rows in the tied case."""
        w = self.hf.get_input_embeddings().weight if self.lm_source == "tied" else self.lm_weight
        return (h.to(w.dtype) @ w.T).float()

    def response_logp(self, h: torch.Tensor, batch) -> torch.Tensor:
        """``log pi(response | prompt)`` summed over each response token (the row's end token included), for the
        rows ``lm_chosen`` marks, from the hidden states ``h`` [N, L, H] of a padded forward; NaN for the other rows.

        The token at position p is predicted by the hidden state at p - 1, so only the response's tokens are scored
        and the prompt is context, as in supervised fine-tuning on the response. The (row, position) pairs come
        from the batch (``lm_target``, built on its host copy by ``prepare_batch``: no read-back), else here."""
        n = batch.input_ids.shape[0]
        out = torch.full((n,), float("nan"), device=h.device, dtype=torch.float32)
        if batch.prompt_len is None:
            raise ValueError("response log-probabilities need batch.prompt_len (rmlab's collator sets it)")
        chosen = lm_chosen(batch)
        target = getattr(batch, "lm_target", None)
        r, p = (target[0], target[1]) if target is not None else lm_targets(batch, chosen)
        logp = torch.log_softmax(self.lm_logits(h[r, p - 1]), -1)
        tok = logp.gather(1, batch.input_ids[r, p][:, None]).squeeze(1)
        sums = torch.zeros(n, device=h.device, dtype=tok.dtype).index_add(0, r, tok)
        return torch.where(chosen, sums, out)

    def prepare_batch(self, batch):
        if self.lm_source is None or getattr(batch, "lm_target", None) is not None or batch.prompt_len is None:
            return batch
        batch.lm_target = torch.stack(lm_targets(batch, lm_chosen(batch)))  # on the host copy: a nonzero costs nothing
        return batch

    def score_heads(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.lm_source is None:
            return super().score_heads(batch)
        # One padded forward gives both: the reward at the pooled token, the LM's log-probs at the response tokens.
        h = self.padded_states(batch)  # as score_batch's padded path
        if h is not None:
            rewards = self.reward_from_hidden(rows_at(h, batch.last_token))
        else:
            h = backbone_states(self.hf, batch.input_ids, batch.attention_mask, batch.position_ids)
            rewards = self.reward_from_hidden(rows_at(h, pool_index(batch.attention_mask, self.pooling)))
        return rewards, {"response_logp": self.response_logp(h, batch)}

    def export_meta(self) -> dict[str, Any]:
        meta = {
            "head": self.kind,
            "pooling": self.pooling,
            "read_with": "AutoModelForSequenceClassification: the reward is logits[:, 0] of the row config.rmlab.scoring "
            "describes",
        }
        if self.lm_source is not None:  # how it was trained: GRM's LM loss, with this LM head (not exported)
            meta["grm_lm_head"] = self.lm_source
        return meta


def lm_chosen(batch) -> torch.Tensor:
    """[N] bool, the rows whose response the LM loss reads: the winners of the batch's non-tie comparisons (GRM's
    y_c). Counted on the device (an integer index_add, deterministic): no read-back."""
    n = batch.input_ids.shape[0]
    hits = torch.zeros(n, dtype=torch.long, device=batch.winner.device).index_add_(0, batch.winner, (~batch.tie).long())
    return hits > 0


def lm_targets(batch, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of every response token the LM loss scores, in row-major order: the chosen rows' real
    tokens from the end of the prompt on. Its size depends on the data (a nonzero), so a training batch gets it
    on its host copy (``ScalarRewardModel.prepare_batch``)."""
    length = batch.input_ids.shape[1]
    mask = batch.attention_mask.bool()
    first = pool_index(batch.attention_mask, "first")
    start = (first + batch.prompt_len.to(first.device)).clamp_min(first + 1)  # a token needs one before it
    pos = torch.arange(length, device=mask.device)
    target = mask & (pos[None, :] >= start[:, None]) & chosen.to(mask.device)[:, None]
    return target.nonzero(as_tuple=True)


def load_lm_head(name_or_path: str | None) -> torch.Tensor | None:
    """``lm_head.weight`` of a causal LM checkpoint (a local dir or a hub name, sharded or not), or None when the
    checkpoint has none (a random-init backbone, a classification-only save)."""
    if not name_or_path:
        return None
    from transformers.utils import cached_file

    def find(fname: str) -> str | None:
        local = Path(name_or_path) / fname
        if local.exists():
            return str(local)
        if Path(name_or_path).is_dir():
            return None
        return cached_file(name_or_path, fname, _raise_exceptions_for_missing_entries=False)

    index = find("model.safetensors.index.json")
    if index is not None:
        shard = json.loads(Path(index).read_text())["weight_map"].get("lm_head.weight")
        path = find(shard) if shard else None
    else:
        path = find("model.safetensors")
    if path is None:
        return None
    with safe_open(path, framework="pt") as f:
        return f.get_tensor("lm_head.weight").detach().clone() if "lm_head.weight" in f.keys() else None

