"""Padding-free packing and prefix sharing for causal LMs: every unique token forwarded once.

A padded batch forwards ``prompt + response`` once per response, padded to the longest row. Two
layouts remove that waste, and both give the same rewards as the padded forward (tests/test_packing.py):

- ``packed``: each ``prompt + response`` sequence is a *segment*; several segments share one row.
  Position ids restart at 0 in each segment, and a block-diagonal causal mask stops a segment from
  seeing its neighbours. Removes padding, keeps one prompt copy per response.
- ``prefix_shared``: one segment per group, ``[prompt][resp 1][resp 2]...[resp K]``. The prompt is
  encoded once; each response attends to the prompt and to itself only, and its position ids restart
  at ``prompt_len``, so every response sees exactly what it would see alone (Llama 3 paper, sec 4.1.2).

Both are one mechanism: a segment is ``(shared prefix, parts)``; ``packed`` uses an empty prefix and
one part per sequence. A token may attend to an earlier token of the same segment that lies in the
shared prefix or in its own part. Rewards are read at the last token of each part.

An encoder (bidirectional attention) cannot share a prefix exactly: the prompt's states would depend
on every response. ``ScalarRewardModel.score_batch`` keeps encoders on the padded path.

On CPU the mask is a 4D boolean tensor that transformers passes to SDPA as is (``masking_utils``
returns a 4D mask unchanged). It costs full T x T attention per row, masked blocks included, so a
shared-prefix segment is capped (``row_tokens``, default twice the batch's longest row; a longer group
goes on in a second segment with its own prompt copy) and segments are laid first-fit-decreasing into
rows as wide as the widest segment. On GPU, ``attn_implementation=flex_attention`` skips the masked
blocks instead. It is opt-in, never picked automatically: it has not been measured or tested on a GPU
here, and transformers compiles it per shape (on CPU with torch 2.13 the dynamic-shape recompile fails
to build; tests/test_packing.py checks its mask uncompiled).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from rmlab.models.base import ENCODER_TYPES

MODES = ("padded", "packed", "prefix_shared")


@dataclass
class PackedRows:
    """A packed layout of one batch. ``read_index`` maps it back to the batch's response order."""

    input_ids: torch.Tensor  # [R, T]
    position_ids: torch.Tensor  # [R, T]
    segment: torch.Tensor  # [R, T] segment within its row, -1 = padding
    part: torch.Tensor  # [R, T] 0 = shared prefix, i >= 1 = part i of the segment
    read_index: torch.Tensor  # [N] flat index (row * T + col) of each response's last token, batch order
    # Per segment: (row, first column, prefix length, part lengths), for attention by segments.
    spans: list[tuple[int, int, int, list[int]]] | None = None

    @property
    def processed_tokens(self) -> int:
        """Tokens the backbone runs over, padding included."""
        return int(self.input_ids.numel())

    @property
    def real_tokens(self) -> int:
        return int((self.segment >= 0).sum())

    def to(self, device: torch.device | str) -> PackedRows:
        moved = (
            t.to(device, non_blocking=True)
            for t in (self.input_ids, self.position_ids, self.segment, self.part, self.read_index)
        )
        return PackedRows(*moved, spans=self.spans)

    def attention_mask(self, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """[R, 1, T, T]: True (or 0.0 for a float dtype) where a query may attend to a key.

        Padding queries attend to themselves only, so no softmax row is empty (an all-masked row
        gives NaN, whose gradient would poison the real tokens through the shared weights).
        """
        seg, part = self.segment, self.part
        t = seg.shape[1]
        idx = torch.arange(t, device=seg.device)
        causal = idx[None, :, None] >= idx[None, None, :]  # [1, Tq, Tk]
        same = seg[:, :, None] == seg[:, None, :]
        visible = (part[:, None, :] == 0) | (part[:, :, None] == part[:, None, :])
        real = (seg >= 0)[:, :, None]
        eye = torch.eye(t, dtype=torch.bool, device=seg.device)[None]
        allowed = torch.where(real, same & causal & visible, eye)[:, None]
        if dtype == torch.bool:
            return allowed
        zero = torch.zeros((), dtype=dtype, device=seg.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)


Segment = tuple[list[int], list[list[int]]]  # (shared prefix ids, parts' ids)


def plan_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: segment indices per row, no row over ``capacity`` (a longer segment gets
    a row of its own). Long segments first, so short ones fill the gaps they leave."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        n = lengths[i]
        for r, f in enumerate(free):
            if n <= f:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(max(0, capacity - n))
    return rows


def pack_segments(segments: list[Segment], pad_id: int, row_tokens: int | None = None) -> PackedRows:
    """Lay segments into rows. Parts are numbered in segment order, which is the reward order.

    row_tokens: the row width to fill up to; None = the longest segment (no row is wider than the
    widest thing it must hold, so attention costs no more than the padded batch's longest row).
    """
    lengths = [len(p) + sum(len(x) for x in parts) for p, parts in segments]
    if not lengths or min(lengths) == 0:
        raise ValueError("pack_segments needs at least one non-empty segment")
    capacity = max(max(lengths), row_tokens or 0)
    rows = plan_rows(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in rows)
    n_rows = len(rows)
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    pos = torch.zeros((n_rows, width), dtype=torch.long)
    seg = torch.full((n_rows, width), -1, dtype=torch.long)
    part = torch.zeros((n_rows, width), dtype=torch.long)
    first_part = [0]
    for _, parts in segments:
        first_part.append(first_part[-1] + len(parts))
    read = torch.empty(first_part[-1], dtype=torch.long)
    spans = []
    for r, row in enumerate(rows):
        col = 0
        for s_local, s in enumerate(row):
            prefix, parts = segments[s]
            p = len(prefix)
            spans.append((r, col, p, [len(x) for x in parts]))
            if p:
                ids[r, col : col + p] = torch.tensor(prefix)
                pos[r, col : col + p] = torch.arange(p)
                seg[r, col : col + p] = s_local
                col += p
            for j, x in enumerate(parts):
                n = len(x)
                if n == 0:
                    raise ValueError(f"segment {s} has an empty part {j}: a response needs at least one token")
                ids[r, col : col + n] = torch.tensor(x)
                pos[r, col : col + n] = torch.arange(p, p + n)  # every part restarts right after the prefix
                seg[r, col : col + n] = s_local
                part[r, col : col + n] = j + 1
                col += n
                read[first_part[s] + j] = r * width + col - 1
    return PackedRows(ids, pos, seg, part, read, spans)


def segments_from_rows(
    prompts: list[list[int]],
    responses: list[list[int]],
    group_of: list[int],
    mode: str,
    max_segment: int | None = None,
) -> list[Segment]:
    """Segments for ``mode`` from per-response rows (``prompts[i] + responses[i]`` is row i).

    prefix_shared: consecutive rows of one group share one segment (their prompts are equal by
    construction: collate writes the group's prompt into each of its rows). A segment stops growing at
    ``max_segment`` tokens and the group goes on in a new one with its own prompt copy: with a dense
    mask, attention costs T^2 per row, and a long prompt-plus-K-responses row would spend more on the
    blocks it masks out than sharing the prompt saves. packed: one segment per row.
    """
    if mode == "packed":
        return [([], [p + r]) for p, r in zip(prompts, responses)]
    if mode != "prefix_shared":
        raise ValueError(f"forward_mode must be one of {MODES}, got {mode!r}")
    segments: list[Segment] = []
    last = None
    for p, r, g in zip(prompts, responses, group_of):
        cur = segments[-1] if segments else None
        fits = cur is not None and (max_segment is None or len(p) + sum(map(len, cur[1])) + len(r) <= max_segment)
        if g == last and fits and cur[0] == p:
            cur[1].append(r)
        else:
            segments.append((p, [r]))
            last = g
    return segments


def pack_batch(batch, mode: str, pad_id: int = 0, row_tokens: int | None = None, one_row: bool = False) -> PackedRows:
    """The packed layout of a ``RewardBatch`` (padded rows, either padding side).

    Reads the real tokens of each row through the attention mask and splits them at
    ``batch.prompt_len`` (no prompt_len: the whole row is the response, so only ``packed`` gains).
    one_row: every segment in a single row with no padding at all (attention by segments needs no
    mask, so a wide row costs nothing extra); otherwise rows are capped for the dense-mask path.
    """
    ids = batch.input_ids.detach().cpu()
    mask = batch.attention_mask.detach().cpu().bool()
    n = ids.shape[0]
    plen = batch.prompt_len.tolist() if getattr(batch, "prompt_len", None) is not None else [0] * n
    group = batch.group_index.tolist() if getattr(batch, "group_index", None) is not None else list(range(n))
    prompts, responses = [], []
    for i in range(n):
        toks = ids[i][mask[i]].tolist()
        prompts.append(toks[: plen[i]])
        responses.append(toks[plen[i] :])
    if one_row:
        segments = segments_from_rows(prompts, responses, group, mode, row_tokens)
        return pack_segments(segments, pad_id, row_tokens=sum(len(p) + sum(map(len, x)) for p, x in segments))
    # Dense mask: cap a segment at twice the batch's longest row. A K = 2 group always fits whole (its
    # prompt is shared), and no row's attention costs more than 4x the padded batch's longest row.
    cap = row_tokens or 2 * max(len(p) + len(r) for p, r in zip(prompts, responses))
    return pack_segments(segments_from_rows(prompts, responses, group, mode, cap), pad_id, row_tokens)


def padded_tokens(batch) -> int:
    """Tokens a padded forward of the batch runs over (rows x longest row)."""
    return int(batch.input_ids.numel())


def unique_tokens(batch) -> int:
    """Real tokens a batch holds once each: every group's prompt once plus each response once."""
    plen = batch.prompt_len.tolist() if batch.prompt_len is not None else [0] * len(batch.response_len)
    seen, total = set(), 0
    for g, p, r in zip(batch.group_index.tolist(), plen, batch.response_len.tolist()):
        if g not in seen:
            seen.add(g)
            total += p
        total += r
    return total


def resolve_forward_mode(model, mode: str) -> str:
    """The mode a model really runs: encoders and first-token pooling stay padded (bidirectional
    attention makes a shared prefix depend on its responses), flash attention cannot take a custom
    mask, so it packs (varlen, from restarted position ids) instead of sharing prefixes."""
    if mode not in (*MODES, "auto"):
        raise ValueError(f"model.forward_mode must be one of {(*MODES, 'auto')}, got {mode!r}")
    causal = (
        getattr(model, "pooling", "last") == "last" and getattr(model.config, "model_type", "") not in ENCODER_TYPES
    )
    if not causal:
        return "padded"
    attn = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    if mode == "auto":
        mode = "prefix_shared"
    if mode == "prefix_shared" and attn.startswith("flash_attention"):
        return "packed"
    return mode


SEGMENTS_ATTN = "rmlab_sdpa_segments"
# What one extra SDPA call costs (forward + backward, CPU), in (query, key) pairs of attention work:
# about 1 ms of overhead against about 0.25 us a pair for a 128-wide model (measured on 2 cores).
CALL_COST_PAIRS = 4096


def segment_attention(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, rmlab_spans=None, **kwargs
):
    """Attention by segments: exact, no mask over the whole row, no masked-out work.

    For each segment, the prefix attends causally to itself, and each part attends to the whole
    prefix plus itself causally: one SDPA call per prefix and per part, on exactly the blocks a
    token may see. Without ``rmlab_spans`` (the padded path) it is plain SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if rmlab_spans is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # Attention dropout as the padded path applies it (the caller passes 0.0 in eval mode).
    sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, dropout_p=dropout)
    gqa = query.shape[1] != key.shape[1]
    rows: dict[int, list[torch.Tensor]] = {}
    for r, col, p, parts in rmlab_spans:
        out = rows.setdefault(r, [])
        q, k, v = query[r : r + 1], key[r : r + 1], value[r : r + 1]
        if p:
            sl = slice(col, col + p)
            out.append(sdpa(q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True, scale=scaling, enable_gqa=gqa))
        start = col + p
        total = sum(parts)
        extra = total * (p + total) - sum(n * (p + n) for n in parts)
        if len(parts) > 1 and extra < CALL_COST_PAIRS * (len(parts) - 1):
            # Short parts: one masked call for all of them beats one call each (the masked-out
            # cross-part blocks cost less than the calls they save).
            sl = slice(start, start + total)
            owner = torch.repeat_interleave(
                torch.arange(len(parts), device=query.device), torch.tensor(parts, device=query.device)
            )
            idx = torch.arange(total, device=query.device)
            own = (owner[:, None] == owner[None, :]) & (idx[None, :] <= idx[:, None])
            allowed = torch.cat([own.new_ones(total, p), own], dim=1)
            out.append(
                sdpa(
                    q[:, :, sl],
                    k[:, :, col : col + p + total],
                    v[:, :, col : col + p + total],
                    attn_mask=allowed,
                    scale=scaling,
                    enable_gqa=gqa,
                )
            )
            continue
        for n in parts:
            sl = slice(start, start + n)
            if p:
                keys = torch.cat([k[:, :, col : col + p], k[:, :, sl]], dim=2)
                vals = torch.cat([v[:, :, col : col + p], v[:, :, sl]], dim=2)
                # The whole prefix, then causal within the part (SDPA's is_causal aligns top-left: wrong here).
                allowed = torch.ones(n, p + n, dtype=torch.bool, device=query.device)
                allowed[:, p:] = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
                out.append(sdpa(q[:, :, sl], keys, vals, attn_mask=allowed, scale=scaling, enable_gqa=gqa))
            else:
                out.append(sdpa(q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True, scale=scaling, enable_gqa=gqa))
            start += n
    t = query.shape[2]
    full = []
    for r in range(query.shape[0]):
        pieces = rows.get(r, [])
        used = sum(x.shape[2] for x in pieces)
        if used < t:  # row padding: its outputs are never read
            pieces = pieces + [query.new_zeros(1, query.shape[1], t - used, value.shape[-1])]
        full.append(torch.cat(pieces, dim=2))
    return torch.cat(full, dim=0).transpose(1, 2).contiguous(), None


def _register_segments_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SEGMENTS_ATTN, segment_attention)
    AttentionMaskInterface.register(SEGMENTS_ATTN, sdpa_mask)  # the padded path still builds SDPA's mask


def configure_speed(model, forward_mode: str = "padded", row_tokens: int | None = None, compile: bool = False):
    """Set the forward mode (resolved for this backbone) and optionally compile the backbone.

    With SDPA, a packed mode switches the backbone to attention by segments (``segment_attention``),
    which is plain SDPA whenever no segments are given, so padded forwards and exports are unchanged.
    """
    model.forward_mode = resolve_forward_mode(model, forward_mode)
    model.row_tokens = row_tokens
    if model.forward_mode != "padded" and model.config._attn_implementation == "sdpa":
        _register_segments_attention()
        model.config._attn_implementation = SEGMENTS_ATTN
    if compile:
        # dynamic=True: every batch has another shape, and recompiling per shape would cost more than it saves.
        base = model.hf.base_model
        base.forward = torch.compile(base.forward, dynamic=True)
    return model


def backbone_mask(packed: PackedRows, attn: str, dtype: torch.dtype):
    """The attention mask argument for this attention implementation.

    sdpa: the 4D boolean mask. eager: the same as an additive float mask. flex_attention: a BlockMask,
    whose empty blocks are skipped (the GPU path). flash_attention_*: None, and transformers reads the
    restarted position ids as varlen sequence boundaries (``packed`` only).
    """
    if attn in ("sdpa", SEGMENTS_ATTN):
        return packed.attention_mask(torch.bool)
    if attn.startswith("flash_attention"):
        if bool((packed.part > 1).any()):
            raise ValueError("flash attention cannot share a prefix (no custom mask); use forward_mode=packed")
        return None
    if attn == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        seg, part = packed.segment, packed.part

        def allowed(b, h, q, k):
            same = (seg[b, q] == seg[b, k]) & (k <= q) & ((part[b, k] == 0) | (part[b, k] == part[b, q]))
            return (same & (seg[b, q] >= 0)) | (q == k)

        r, t = seg.shape
        return create_block_mask(allowed, r, None, t, t, device=seg.device)
    return packed.attention_mask(dtype)


def packed_hidden(model, batch) -> torch.Tensor:
    """Hidden states [N, H] at each response's last token, from the packed layout of ``batch``."""
    attn = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    # On CPU, attention by segments wins (no masked-out work, and an SDPA call costs microseconds).
    # On a GPU, hundreds of small calls per layer cost more in launches than one masked call wastes.
    by_segments = attn == SEGMENTS_ATTN and batch.input_ids.device.type == "cpu"
    pad = getattr(model.tokenizer, "pad_token_id", None) or 0
    packed = pack_batch(batch, model.forward_mode, pad, model.row_tokens, one_row=by_segments)
    packed = packed.to(batch.input_ids.device)
    kw = {}
    if by_segments:
        # A 4D placeholder: transformers passes a 4D mask through untouched, and segment_attention
        # reads the spans instead, so no [T, T] mask is ever built.
        mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=packed.input_ids.device)
        kw["rmlab_spans"] = packed.spans
    else:
        mask = backbone_mask(packed, attn, next(model.parameters()).dtype)
    out = model.hf.base_model(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids, **kw)
    h = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return h.reshape(-1, h.shape[-1])[packed.read_index]
