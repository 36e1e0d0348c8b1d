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
on every response. ``RewardModel.score_batch`` keeps encoders on the padded path.

On CPU the mask is a 4D boolean tensor that transformers passes to SDPA as is (``masking_utils``
returns a 4D mask unchanged). It costs full T x T attention per row, masked blocks included, so a
shared-prefix segment is capped (``row_tokens``, default twice the batch's longest row; a longer group
goes on in a second segment with its own prompt copy) and segments are laid first-fit-decreasing into
rows as wide as the widest segment. On GPU, ``attn_implementation=flex_attention`` skips the masked
blocks instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("padded", "packed", "prefix_shared")


@dataclass
class PackedRows:
    """A packed layout of one batch. ``read_index`` maps it back to the batch's response order."""

    input_ids: torch.Tensor  # [R, T]
    position_ids: torch.Tensor  # [R, T]
    segment: torch.Tensor  # [R, T] segment within its row, -1 = padding
    part: torch.Tensor  # [R, T] 0 = shared prefix, i >= 1 = part i of the segment
    read_index: torch.Tensor  # [N] flat index (row * T + col) of each response's last token, batch order

    @property
    def processed_tokens(self) -> int:
        """Tokens the backbone runs over, padding included."""
        return int(self.input_ids.numel())

    @property
    def real_tokens(self) -> int:
        return int((self.segment >= 0).sum())

    def to(self, device: torch.device | str) -> PackedRows:
        return PackedRows(*(t.to(device, non_blocking=True) for t in (
            self.input_ids, self.position_ids, self.segment, self.part, self.read_index)))

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
    for r, row in enumerate(rows):
        col = 0
        for s_local, s in enumerate(row):
            prefix, parts = segments[s]
            p = len(prefix)
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
    return PackedRows(ids, pos, seg, part, read)


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


def pack_batch(batch, mode: str, pad_id: int = 0, row_tokens: int | None = None) -> PackedRows:
    """The packed layout of a ``RewardBatch`` (padded rows, either padding side).

    Reads the real tokens of each row through the attention mask and splits them at
    ``batch.prompt_len`` (no prompt_len: the whole row is the response, so only ``packed`` gains).
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
    # Default cap: twice the batch's longest row. A K = 2 group always fits whole (its prompt is shared),
    # and no row's attention costs more than 4x the padded batch's longest row.
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
    causal = getattr(model, "pooling", "last") == "last" and getattr(model.config, "model_type", "") not in _encoder_types()
    if not causal:
        return "padded"
    attn = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    if mode == "auto":
        mode = "prefix_shared"
    if mode == "prefix_shared" and attn.startswith("flash_attention"):
        return "packed"
    return mode


def _encoder_types() -> set[str]:
    from rmlab.model import ENCODER_TYPES

    return ENCODER_TYPES


def configure_speed(model, forward_mode: str = "padded", row_tokens: int | None = None, compile: bool = False):
    """Set the forward mode (resolved for this backbone) and optionally compile the backbone."""
    model.forward_mode = resolve_forward_mode(model, forward_mode)
    model.row_tokens = row_tokens
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
    if attn == "sdpa":
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
    packed = getattr(batch, "packed", None)
    if packed is None:
        pad = getattr(model.tokenizer, "pad_token_id", None) or 0
        packed = pack_batch(batch, model.forward_mode, pad, model.row_tokens)
    device = batch.input_ids.device
    packed = packed.to(device)
    attn = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    dtype = next(model.parameters()).dtype
    out = model.hf.base_model(
        input_ids=packed.input_ids,
        attention_mask=backbone_mask(packed, attn, dtype),
        position_ids=packed.position_ids,
    )
    h = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return h.reshape(-1, h.shape[-1])[packed.read_index]
