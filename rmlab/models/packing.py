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

With SDPA (the default), ``build_model`` switches the backbone to rmlab's own attention
(``packed_attention``, registered as ``rmlab_packed``) and asks the collator for the batch's layout
(``model.batch_layout``; rmlab.data.layout builds it in the DataLoader workers): all tokens in one
row, each once, and the attention *sequences* over it. The forward reads no device value back. The
layout's kernel (``model.attention``):

- ``sdpa`` (CPU): sequences stacked into a few padded SDPA calls per layer, masks precomputed;
- ``varlen`` (CUDA): flash-attn's ``flash_attn_varlen_func`` when installed, else torch's
  ``varlen_attn``: the prompt's keys and values gathered beside each response, one call per layer;
- ``flex``: one FlexAttention BlockMask per batch (compiled on CUDA).

Other attention implementations (``eager``, transformers' ``flex_attention``, ``flash_attention_2``)
keep the older path below: rows packed on the fly from the batch (a host read-back), with a 4D mask,
a BlockMask or restarted position ids. The dense mask costs T x T per row, so a shared-prefix segment
is capped there (``row_tokens``, default twice the batch's longest row).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from dataclasses import dataclass

import torch

from rmlab.data.layout import KERNELS, LayoutSpec, build_layout
from rmlab.models.base import ENCODER_TYPES, backbone_states

log = logging.getLogger(__name__)
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
    attention makes a shared prefix depend on its responses); flash attention through transformers
    cannot take a custom mask, so it packs (varlen, from restarted position ids) instead of sharing
    prefixes. ``auto`` stays ``auto`` where the collator can choose per batch (rmlab's attention);
    elsewhere it is prefix_shared."""
    if mode not in (*MODES, "auto"):
        raise ValueError(f"model.forward_mode must be one of {(*MODES, 'auto')}, got {mode!r}")
    causal = (
        getattr(model, "pooling", "last") == "last" and getattr(model.config, "model_type", "") not in ENCODER_TYPES
    )
    if not causal:
        return "padded"
    attn = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    if mode == "auto" and attn not in ("sdpa", PACKED_ATTN):
        mode = "prefix_shared"
    if mode in ("prefix_shared", "auto") and attn.startswith("flash_attention"):
        return "packed"
    return mode


PACKED_ATTN = "rmlab_packed"
# flash-attn's varlen kernel when installed (the optional extra), else torch's own, else neither.
VARLEN_BACKENDS = ("flash_attn", "torch")


def varlen_backend() -> str | None:
    """The varlen kernel this install has: flash-attn, torch's ``varlen_attn``, or None. Both need CUDA."""
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attn"
    if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
        return "torch"
    return None


def flex_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def default_kernel(device: str | None = None) -> str:
    """``model.attention=auto``: on a GPU a varlen kernel (flash-attn or torch's), else FlexAttention,
    else SDPA; on CPU SDPA in a few padded calls (the only one that is fast there)."""
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if not cuda:
        return "sdpa"
    if varlen_backend() is not None:
        return "varlen"
    return "flex" if flex_available() else "sdpa"


def _sdpa(query, key, value, mask, dropout, scaling, gqa):
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa
    )


def bucket_attention(q, k, v, layout, dropout, scaling):
    """The CPU path: the layout's sequences stacked into a few padded SDPA calls, each with its
    precomputed mask; q [T, H, D], k and v [T, Hkv, D] -> [T, H, D]. One gather per tensor for all
    buckets and a split (views): backward then scatters once, not once per bucket."""
    gqa = q.shape[1] != k.shape[1]
    h, d = q.shape[1], q.shape[2]
    qs = q[layout.bucket_q].split([b * lq for (b, lq, _) in (x.shape for x in layout.buckets)])
    k_sizes = [b * lk for (b, _, lk) in (x.shape for x in layout.buckets)]
    ks, vs = k[layout.bucket_k].split(k_sizes), v[layout.bucket_k].split(k_sizes)
    outs = []
    for bucket, qb, kb, vb in zip(layout.buckets, qs, ks, vs):
        b, lq, lk = bucket.shape
        o = _sdpa(
            qb.view(b, lq, h, d).transpose(1, 2),
            kb.view(b, lk, -1, d).transpose(1, 2),
            vb.view(b, lk, -1, v.shape[2]).transpose(1, 2),
            bucket.mask,
            dropout,
            scaling,
            gqa,
        )  # [B, H, Lq, D]
        outs.append(o.transpose(1, 2).reshape(b * lq, h, -1))
    outs.append(q.new_zeros(1, h, v.shape[2]))  # what padding tokens read
    return torch.cat(outs)[layout.out_index]


def varlen_reference(q, k, v, cu_q: list[int], cu_k: list[int], dropout, scaling):
    """What the varlen kernels compute, one SDPA call per sequence: queries aligned to the end of their
    keys (bottom-right causal, as flash-attn with separate query and key lengths). For tests and CPU."""
    gqa = q.shape[1] != k.shape[1]
    out = []
    for i in range(len(cu_q) - 1):
        qs, ks = q[cu_q[i] : cu_q[i + 1]], k[cu_k[i] : cu_k[i + 1]]
        nq, nk = qs.shape[0], ks.shape[0]
        allowed = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        o = _sdpa(qs.transpose(0, 1), ks.transpose(0, 1), v[cu_k[i] : cu_k[i + 1]].transpose(0, 1), allowed, dropout, scaling, gqa)
        out.append(o.transpose(0, 1))
    return torch.cat(out)


def varlen_attention(q, k, v, layout, dropout, scaling):
    """Prefix sharing and packing as one varlen call: the prompt's keys and values gathered beside each
    response (``layout.k_index``), separate query and key lengths, causal aligned bottom-right."""
    kg, vg = k[layout.k_index], v[layout.k_index]
    # The varlen kernels take fp16/bf16 only (bf16-mixed training gives them bf16): fp32 takes the reference.
    half = q.dtype in (torch.float16, torch.bfloat16)
    backend = varlen_backend() if q.is_cuda and half else None
    if q.is_cuda and not half and "fp32_varlen" not in _WARNED:
        _WARNED.add("fp32_varlen")
        log.warning("model.attention=varlen in fp32 on CUDA runs one SDPA call per sequence: train in bf16 "
                    "(trainer=gpu) or set model.attention=flex")
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            q, kg, vg, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k, dropout_p=dropout,
            softmax_scale=scaling, causal=True,
        )
    if backend == "torch" and dropout == 0.0:
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(
            q, kg, vg, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k, scale=scaling, window_size=(-1, 0),
            enable_gqa=q.shape[1] != k.shape[1],
        )
    # No kernel here (CPU, or attention dropout that torch's varlen cannot apply): the same sums per sequence.
    return varlen_reference(q, kg, vg, layout.cu_q_host, layout.cu_k_host, dropout, scaling)


_FLEX = {}
_WARNED: set[str] = set()


def flex_block_mask(layout, device):
    """One BlockMask per batch (built on the device the first time a layer asks): a token sees earlier
    tokens of its own segment that are in the shared prompt or in its own part; padding sees itself."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc, part = layout.doc, layout.part

    def allowed(b, h, q, kv):
        same = (doc[q] == doc[kv]) & (kv <= q) & ((part[kv] == 0) | (part[kv] == part[q])) & (doc[q] >= 0)
        return same | (q == kv)

    t = doc.shape[0]
    return create_block_mask(allowed, 1, None, t, t, device=device, _compile=device.type == "cuda")


def flex_attention_fn(device):
    """FlexAttention: compiled on CUDA (its fast form), eager elsewhere (correct, slow: tests only)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if "compiled" not in _FLEX:
        # dynamic=None: after a second row length dynamo compiles one kernel for all lengths (the rows are
        # padded to multiples of 128, FlexAttention's block size, so few lengths are seen anyway).
        _FLEX["compiled"] = torch.compile(flex_attention, dynamic=None)
    return _FLEX["compiled"]


def packed_attention(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, rmlab_layout=None, **kwargs
):
    """rmlab's attention implementation (registered as ``rmlab_packed``): plain SDPA without a layout
    (padded forwards, exports), else the layout's kernel over the one packed row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if rmlab_layout is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return layout_attention(module, query, key, value, rmlab_layout, dropout, scaling)


@torch.compiler.disable
def layout_attention(module, query, key, value, layout, dropout, scaling):
    """The layout's kernel over the packed row: [1, H, T, D] in, ([1, T, H, D], None) out. Kept out of
    ``torch.compile``'s graphs (``model.compile=true``): each batch has its own buckets, sequence counts and
    lengths, and a graph that read them would be guarded on them and recompiled at every step
    (tests/test_packing.py). The compiled graphs hold the projections, norms and MLP around it, whose only
    changing shape is the packed row's bucketed width; the kernels are opaque calls either way."""
    if layout.kernel == "flex":
        if layout.block_mask is None:
            layout.block_mask = flex_block_mask(layout, query.device)
        gqa = query.shape[1] != key.shape[1]
        out = flex_attention_fn(query.device)(query, key, value, block_mask=layout.block_mask, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    # [1, H, T, D] -> [T, H, D]: varlen kernels' token-major layout.
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)
    rows = read_rows_of(module)
    if rows is not None and layout.read_mask is not None:
        return read_attention(q, k, v, rows, layout.read_mask, dropout, scaling)[None], None
    if layout.kernel == "varlen":
        out = varlen_attention(q, k, v, layout, dropout, scaling)
    else:
        out = bucket_attention(q, k, v, layout, dropout, scaling)
    return out[None], None


# The last layer at the read tokens only. The reward reads one hidden state per response, at its last token,
# so past the last layer's keys and values nothing else of that layer is needed: its attention is computed for
# the read queries (one SDPA call over ``layout.read_mask``), its output projection and MLP on those rows. The
# other rows of the last layer's output are the residual stream alone, and never read. Exact: the rows read are
# computed as before (tests/test_packing.py). Saves up to the last layer's attention, output projection and MLP:
# about half the compute of a 2-layer model, 1/L of an L-layer one (``ReadRows``: activation checkpointing too).
READ_ROWS = "_rmlab_read_rows"


class ReadRows:
    """The rows the last layer computes, shared by its attention, o_proj and MLP (a plain object, not a module or a
    tensor: no state-dict entry). Set from the ``rmlab_layout`` kwarg when the attention is called, which happens
    inside the layer's forward and so also in activation checkpointing's recompute; cleared after the MLP."""

    rows: torch.Tensor | None = None
    enabled: bool = True  # model.last_layer_at_reads (false: the last layer runs every row, as before)


def read_rows_of(module) -> torch.Tensor | None:
    slot = getattr(module, READ_ROWS, None)
    return None if slot is None else slot.rows


def read_attention(q, k, v, rows, mask, dropout, scaling):
    """Attention of the read queries only: q [T, H, D], k/v [T, Hkv, D], rows [N], mask [N, T] ->
    [T, H, Dv] with the read rows filled and the others zero (their o_proj and MLP are skipped too)."""
    gqa = q.shape[1] != k.shape[1]
    o = _sdpa(q[rows].transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask[None, None],
              dropout, scaling, gqa)  # [1, H, N, Dv]
    return q.new_zeros(q.shape[0], q.shape[1], v.shape[2]).index_copy(0, rows, o[0].transpose(0, 1))


def _attn_enter(module, args, kwargs):
    layout, slot = kwargs.get("rmlab_layout"), getattr(module, READ_ROWS)
    slot.rows = None if layout is None or not slot.enabled else layout.read_index


def _rows_in(module, args):
    rows = read_rows_of(module)
    if rows is None:
        return None
    x = args[0]
    module._rmlab_width = x.shape[-2]
    return (x[..., rows, :], *args[1:])


def _rows_out(module, args, out):
    rows = read_rows_of(module)
    if rows is None:
        return None
    full = out.new_zeros(*out.shape[:-2], module._rmlab_width, out.shape[-1])
    return full.index_copy(full.dim() - 2, rows, out)


def _mlp_leave(module, args, out):
    getattr(module, READ_ROWS).rows = None  # the layer is done: nothing else runs at the read rows


def read_rows_modules(model) -> tuple[torch.nn.Module, ...]:
    """The last decoder layer's attention, output projection and MLP, hooked so that a packed forward runs them at
    the read tokens only; () where the backbone does not have that shape (then nothing changes)."""
    layers = getattr(model.hf.base_model, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        return ()
    last = layers[-1]
    attn, mlp = getattr(last, "self_attn", None), getattr(last, "mlp", None)
    o_proj = getattr(attn, "o_proj", None)
    if not all(isinstance(m, torch.nn.Module) for m in (attn, mlp, o_proj)):
        return ()
    slot = ReadRows()
    for m in (attn, o_proj, mlp):
        setattr(m, READ_ROWS, slot)
    attn.register_forward_pre_hook(_attn_enter, with_kwargs=True)
    for m in (o_proj, mlp):
        m.register_forward_pre_hook(_rows_in)
        m.register_forward_hook(_rows_out)
    mlp.register_forward_hook(_mlp_leave, always_call=True)
    return attn, o_proj, mlp


def _register_packed_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTN, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTN, sdpa_mask)  # a padded forward without rmlab's mask still gets SDPA's


def configure_speed(
    model,
    forward_mode: str = "padded",
    row_tokens: int | None = None,
    compile: bool = False,
    attention: str = "auto",
    last_layer_at_reads: bool = True,
):
    """Set the forward mode (resolved for this backbone), the attention kernel, and optionally compile.

    With SDPA, a packed mode switches the backbone to rmlab's attention (``packed_attention``), which is
    plain SDPA whenever no layout is given, so padded forwards and exports are unchanged, and asks the
    collator for the layout it reads (``model.batch_layout``, rmlab.data.layout).
    """
    model.forward_mode = resolve_forward_mode(model, forward_mode)
    model.row_tokens = row_tokens
    model.batch_layout = None
    if attention not in ("auto", *KERNELS):
        raise ValueError(f"model.attention must be auto or one of {KERNELS}, got {attention!r}")
    attn = model.config._attn_implementation
    if model.forward_mode != "padded" and attn not in ("sdpa", PACKED_ATTN):
        log.warning(
            "model.attn_implementation=%s with model.forward_mode=%s packs each batch inside the forward, which "
            "reads the batch back to the host at every step (the GPU waits for it). For speed, set "
            "model.attn_implementation=sdpa: rmlab's attention then reads a layout built in the DataLoader, "
            "through flash-attn or torch's varlen kernel (model.attention=varlen) or FlexAttention "
            "(model.attention=flex) on a GPU", attn, model.forward_mode,
        )
    if model.forward_mode != "padded" and attn in ("sdpa", PACKED_ATTN):
        _register_packed_attention()
        model.config._attn_implementation = PACKED_ATTN
        kernel = default_kernel() if attention == "auto" else attention
        # torch.compile sees one shape per bucket of 256 tokens instead of one per batch; FlexAttention works
        # in blocks of 128 (and is compiled on CUDA).
        pad_to = 256 if compile else 128 if kernel == "flex" else 1
        model.batch_layout = LayoutSpec(mode=model.forward_mode, kernel=kernel, pad_to=pad_to)
        if not compile and not getattr(model, "read_rows", ()):
            model.read_rows = read_rows_modules(model)  # not under compile: the hooks would be traced per batch
        if getattr(model, "read_rows", ()):
            getattr(model.read_rows[0], READ_ROWS).enabled = bool(last_layer_at_reads)  # one slot for the three
    if compile:
        # Bucketed lengths (pad_to) keep the packed row's shapes few; dynamic=None lets dynamo mark a
        # dimension dynamic once it has seen two sizes instead of recompiling for each.
        base = model.hf.base_model
        base.forward = torch.compile(base.forward, dynamic=None)
    return model


def backbone_mask(packed: PackedRows, attn: str, dtype: torch.dtype):
    """The attention mask argument for this attention implementation.

    sdpa: the 4D boolean mask. eager: the same as an additive float mask. flex_attention: a BlockMask,
    whose empty blocks are skipped (the GPU path). flash_attention_*: None, and transformers reads the
    restarted position ids as varlen sequence boundaries (``packed`` only).
    """
    if attn in ("sdpa", PACKED_ATTN):
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


def host_layout(batch, spec: LayoutSpec, pad_id: int):
    """The layout of a batch collated without one (eval helpers, tests): built here from the batch's
    tensors, which reads them back to the host. Training batches come with theirs (``batch.packed``)."""
    ids = batch.input_ids.detach().cpu()
    mask = batch.attention_mask.detach().cpu().bool()
    n = ids.shape[0]
    plen = batch.prompt_len.tolist() if getattr(batch, "prompt_len", None) is not None else [0] * n
    group = batch.group_index.tolist() if getattr(batch, "group_index", None) is not None else list(range(n))
    rows = [ids[i][mask[i]].tolist() for i in range(n)]
    return build_layout([r[: plen[i]] for i, r in enumerate(rows)], [r[plen[i] :] for i, r in enumerate(rows)], group, spec, pad_id)


def packed_hidden(model, batch) -> torch.Tensor:
    """Hidden states [N, H] at each response's last token, from the packed layout of ``batch``."""
    attn = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    pad = getattr(model.tokenizer, "pad_token_id", None) or 0
    spec = model.batch_layout
    if attn == PACKED_ATTN and spec is not None:
        if spec.mode != model.forward_mode:  # the mode was switched after the build (tests, eval helpers)
            spec = dataclasses.replace(spec, mode=model.forward_mode)
        layout = getattr(batch, "packed", None)
        if layout is None or layout.kernel != spec.kernel or spec.mode not in ("auto", layout.mode):
            layout = host_layout(batch, spec, pad).to(batch.input_ids.device)
        # A 4D placeholder: transformers passes a 4D mask through untouched, and packed_attention reads
        # the layout instead, so no [T, T] mask is ever built.
        mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=layout.input_ids.device)
        out = model.hf.base_model(
            input_ids=layout.input_ids,
            attention_mask=mask,
            position_ids=layout.position_ids,
            rmlab_layout=layout,  # the attention reads it, and the last layer's hooks (READ_ROWS)
            use_cache=False,  # no KV cache to fill in a training forward
        )
        h = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return h[0][layout.read_index]
    # Other attention implementations (eager, transformers' flex_attention, flash_attention_2): rows
    # packed on the fly with a mask of their kind.
    mode = "prefix_shared" if model.forward_mode == "auto" else model.forward_mode
    packed = pack_batch(batch, mode, pad, model.row_tokens).to(batch.input_ids.device)
    mask = backbone_mask(packed, attn, next(model.parameters()).dtype)
    out = model.hf.base_model(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids)
    h = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return h.reshape(-1, h.shape[-1])[packed.read_index]


def collated_states(model, input_ids, attention_mask, position_ids, last_token) -> torch.Tensor | None:
    """Hidden states [N, L, H] of a padded causal forward of a collated batch (its read positions ``last_token``
    known), under a mask built on the device (``padded_causal_mask``): nothing is read back. None where that path
    does not apply: no ``last_token``, or an attention implementation that takes no explicit boolean mask."""
    attn = getattr(model.config, "_attn_implementation", None)
    if last_token is None or attn not in ("sdpa", PACKED_ATTN):
        return None
    return backbone_states(model.hf, input_ids, padded_causal_mask(attention_mask), position_ids, use_cache=False)


def padded_causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[N, 1, L, L] bool for a padded causal forward, built on the device with no read-back (transformers'
    own builder asks ``padding_mask.all()`` to skip the mask: a host sync). A padding query sees itself
    only, so no softmax row is empty; real queries see exactly what transformers' mask shows them."""
    n, length = attention_mask.shape
    idx = torch.arange(length, device=attention_mask.device)
    causal = idx[:, None] >= idx[None, :]
    allowed = attention_mask.bool()[:, None, None, :] & causal
    return allowed | torch.eye(length, dtype=torch.bool, device=attention_mask.device)
