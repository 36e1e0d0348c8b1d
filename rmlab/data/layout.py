"""The packed layout of a batch, built on the host when the batch is collated (DataLoader workers).

A training step must not wait for the host: everything the packed forward needs is computed here,
from the token lists the collator already holds, and travels with the batch (pinned memory,
``non_blocking`` copies). The forward then reads no device value back (no ``.cpu()``, ``.tolist()``,
``.item()``; tests/test_no_host_sync.py).

All of a batch's tokens go into one row, each once, in group order: ``[prompt][resp 1]..[resp K]``
per group for ``prefix_shared`` (the prompt once), ``[prompt + resp]`` per response for ``packed``
(no padding). Attention is described as *sequences*, the unit every varlen kernel takes:

- ``prefix_shared``: per group, the prompt attends causally to itself (queries = keys = the prompt),
  and each response is one sequence whose queries are its own tokens and whose keys are the prompt's
  tokens gathered beside its own (``k_index``), causal aligned bottom-right: response token i sees the
  whole prompt and response tokens 0..i. This is flash-preference's layout (the prompt's keys and
  values gathered next to each response, one varlen call with separate query and key lengths).
- ``packed``: one sequence per response, queries = keys = ``prompt + response``, causal.

From that one description each kernel takes what it needs (``LayoutSpec.kernel``):

- ``varlen``: ``cu_q``/``cu_k``/``max_q``/``max_k`` and ``k_index`` (flash-attn's
  ``flash_attn_varlen_func`` or torch's ``varlen_attn``, on CUDA);
- ``sdpa``: sequences of similar shape stacked into a few padded SDPA calls per layer (``buckets``),
  each with its precomputed boolean mask: the CPU path. Buckets are chosen by a small dynamic program
  that trades masked-out work against calls (``CALL_PAIRS``);
- ``flex``: ``doc``/``part`` per token, from which the forward builds one FlexAttention BlockMask per
  batch (torchtune's document masking, with the prompt-visible rule of prefix sharing).

``mode=auto`` picks ``packed`` or ``prefix_shared`` per batch by an estimated cost (``choose_mode``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

LAYOUT_MODES = ("packed", "prefix_shared", "auto")
KERNELS = ("sdpa", "varlen", "flex")
# One more SDPA call (forward + backward, CPU) costs about as much as this many (query, key) pairs of
# attention work: ~1 ms of call overhead against ~0.25 us a pair for a 128-wide, 2-layer model (2 cores).
CALL_PAIRS = 4096
# A token's forward + backward outside attention (embedding, projections, MLP), in pairs of attention
# work: what ``auto`` weighs a prompt copy by. 330 us a token / 0.25 us a pair on the CPU model above.
TOKEN_PAIRS = 1300


@dataclass(frozen=True)
class LayoutSpec:
    """What the model asks the collator to prepare (``RewardModel.batch_layout``); picklable."""

    mode: str = "prefix_shared"  # packed | prefix_shared | auto
    kernel: str = "sdpa"  # sdpa | varlen | flex: which attention will read the layout
    pad_to: int = 1  # round the packed row up to a multiple of this (bucketed lengths: fewer recompiles)
    call_pairs: int = CALL_PAIRS  # sdpa buckets: what one more call costs, in attention pairs
    token_pairs: int = TOKEN_PAIRS  # auto: what one more token costs, in attention pairs

    def __post_init__(self):
        if self.mode not in LAYOUT_MODES:
            raise ValueError(f"layout mode must be one of {LAYOUT_MODES}, got {self.mode!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"layout kernel must be one of {KERNELS}, got {self.kernel!r}")


@dataclass
class Bucket:
    """Sequences of similar shape, stacked for one padded SDPA call. Their query and key slots are runs of
    the layout's ``bucket_q``/``bucket_k`` (one gather per layer for all buckets, then a split)."""

    shape: tuple[int, int, int]  # (sequences B, query slots Lq, key slots Lk)
    mask: torch.Tensor  # [B, 1, Lq, Lk] bool: may this query see this key (a padding query sees one key)


@dataclass
class PackedLayout:
    """One batch as a single packed row, and the attention sequences over it (module docstring)."""

    mode: str  # packed | prefix_shared: what this batch runs (auto resolved)
    kernel: str
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T] restarting per sequence; a response starts at its prompt's length
    read_index: torch.Tensor  # [N] token index of each response's last token, batch order
    real_tokens: int  # tokens before padding to ``pad_to``
    cu_q: torch.Tensor | None = None  # [S + 1] int32
    cu_k: torch.Tensor | None = None  # [S + 1] int32
    k_index: torch.Tensor | None = None  # [sum of key lengths] token of each gathered key
    max_q: int = 0
    max_k: int = 0
    cu_q_host: list[int] = field(default_factory=list)  # the same offsets on the host, for the reference kernel
    cu_k_host: list[int] = field(default_factory=list)
    buckets: list[Bucket] = field(default_factory=list)
    bucket_q: torch.Tensor | None = None  # [sum B x Lq] token of each query slot (padding slots repeat one)
    bucket_k: torch.Tensor | None = None  # [sum B x Lk] token of each key slot
    out_index: torch.Tensor | None = None  # [T] row of each token in the buckets' stacked outputs
    doc: torch.Tensor | None = None  # [T] sequence group (segment) of each token, -1 = padding
    part: torch.Tensor | None = None  # [T] 0 = shared prompt, i >= 1 = response i of the segment
    n_sequences: int = 0
    read_mask: torch.Tensor | None = None  # sdpa: [N, T] bool, the keys each read token sees (last layer at reads)
    block_mask: object = None  # flex: built on the device by the forward, once per batch

    @property
    def processed_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def _map(self, fn) -> PackedLayout:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = fn(v)
            elif f.name == "buckets":
                v = [Bucket(b.shape, fn(b.mask)) for b in v]
            elif f.name == "block_mask":
                v = None
            out[f.name] = v
        return PackedLayout(**out)

    def to(self, device, non_blocking: bool = False) -> PackedLayout:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedLayout:
        return self._map(lambda t: t.pin_memory())


def sequences(
    prompts: list[list[int]], responses: list[list[int]], group_of: list[int], mode: str
) -> tuple[list[int], list[int], list[tuple[int, int, int, int]], list[int], list[int], list[int]]:
    """Lay the batch out as one row. Returns (ids, positions, sequences, read index, doc, part).

    A sequence is ``(q_start, q_len, prefix_start, prefix_len)``: queries are the tokens
    ``q_start .. q_start + q_len``, keys are the prefix's tokens then the queries' own (empty prefix:
    keys = queries). Consecutive rows of one group share their prompt under ``prefix_shared``.
    """
    ids: list[int] = []
    pos: list[int] = []
    seqs: list[tuple[int, int, int, int]] = []
    read: list[int] = []
    doc: list[int] = []
    part: list[int] = []
    last_group, p_start, p_len, n_part, seg = None, 0, 0, 0, -1
    for p, r, g in zip(prompts, responses, group_of):
        if not r:
            raise ValueError("a response needs at least one token")
        if mode == "prefix_shared":
            if g != last_group or len(p) != p_len or ids[p_start : p_start + p_len] != p:
                seg += 1
                last_group, p_start, p_len, n_part = g, len(ids), len(p), 0
                ids += p
                pos += range(len(p))
                doc += [seg] * len(p)
                part += [0] * len(p)
                if p:
                    seqs.append((p_start, len(p), 0, 0))
            n_part += 1
            start = len(ids)
            ids += r
            pos += range(p_len, p_len + len(r))
            doc += [seg] * len(r)
            part += [n_part] * len(r)
            seqs.append((start, len(r), p_start, p_len))
        elif mode == "packed":
            seg += 1
            start = len(ids)
            ids += p + r
            pos += range(len(p) + len(r))
            doc += [seg] * (len(p) + len(r))
            part += [1] * (len(p) + len(r))
            seqs.append((start, len(p) + len(r), 0, 0))
        else:
            raise ValueError(f"layout mode must be packed or prefix_shared here, got {mode!r}")
        read.append(len(ids) - 1)
    return ids, pos, seqs, read, doc, part


def seq_pairs(s: tuple[int, int, int, int]) -> int:
    """(query, key) pairs a causal sequence really needs."""
    _, n, _, p = s
    return n * p + n * (n + 1) // 2


def choose_mode(prompts, responses, group_of, spec: LayoutSpec) -> str:
    """``auto``: the cheaper of packed and prefix_shared for this batch, by tokens, attention pairs and
    (on the bucketed CPU path) the extra sequences prefix sharing costs."""
    costs = {}
    for mode in ("packed", "prefix_shared"):
        ids, _, seqs, _, _, _ = sequences(prompts, responses, group_of, mode)
        calls = len(seqs) * (spec.call_pairs // 64 if spec.kernel == "sdpa" else 0)
        costs[mode] = spec.token_pairs * len(ids) + sum(seq_pairs(s) for s in seqs) + calls
    return min(costs, key=lambda m: (costs[m], m != "prefix_shared"))


def plan_buckets(shapes: list[tuple[int, int]], call_pairs: int) -> list[list[int]]:
    """Group sequences (query length, key length) into padded calls, minimising
    sum over calls of (sequences x max query x max key) + call_pairs per call. Sequences are sorted by
    key length and cut into contiguous runs by dynamic programming (exact for that order)."""
    order = sorted(range(len(shapes)), key=lambda i: (shapes[i][1], shapes[i][0]))
    n = len(order)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        mq = 0
        for i in range(j - 1, -1, -1):  # run order[i:j]; its longest key is order[j-1]'s
            mq = max(mq, shapes[order[i]][0])
            c = best[i] + (j - i) * mq * shapes[order[j - 1]][1] + call_pairs
            if c < best[j]:
                best[j], cut[j] = c, i
    runs, j = [], n
    while j > 0:
        runs.append(order[cut[j] : j])
        j = cut[j]
    return runs[::-1]


def build_layout(prompts, responses, group_of, spec: LayoutSpec, pad_id: int) -> PackedLayout:
    """The packed layout of one batch (rows ``prompts[i] + responses[i]``, in batch order)."""
    mode = choose_mode(prompts, responses, group_of, spec) if spec.mode == "auto" else spec.mode
    ids, pos, seqs, read, doc, part = sequences(prompts, responses, group_of, mode)
    real = len(ids)
    width = -(-real // spec.pad_to) * spec.pad_to
    if width > real:  # padding tokens: their own sequence-free tail, attending to themselves
        ids += [pad_id] * (width - real)
        pos += [0] * (width - real)
        doc += [-1] * (width - real)
        part += [0] * (width - real)
    out = PackedLayout(
        mode=mode,
        kernel=spec.kernel,
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.tensor([pos], dtype=torch.long),
        read_index=torch.tensor(read, dtype=torch.long),
        real_tokens=real,
        n_sequences=len(seqs),
    )
    if spec.kernel == "varlen":
        if width > real:
            seqs = seqs + [(real, width - real, 0, 0)]  # the padding tail attends causally to itself
        q_len = [n for _, n, _, _ in seqs]
        k_len = [n + p for _, n, _, p in seqs]
        k_index: list[int] = []
        for q0, n, p0, p in seqs:
            k_index += list(range(p0, p0 + p)) + list(range(q0, q0 + n))
        out.cu_q_host, out.cu_k_host = [0, *_cumsum(q_len)], [0, *_cumsum(k_len)]
        out.cu_q = torch.tensor(out.cu_q_host, dtype=torch.int32)
        out.cu_k = torch.tensor(out.cu_k_host, dtype=torch.int32)
        out.k_index = torch.tensor(k_index, dtype=torch.long)
        out.max_q, out.max_k = max(q_len), max(k_len)
    elif spec.kernel == "flex":
        out.doc = torch.tensor(doc, dtype=torch.long)
        out.part = torch.tensor(part, dtype=torch.long)
    else:
        out.buckets, out.bucket_q, out.bucket_k, out.out_index = _buckets(seqs, width, real, spec.call_pairs)
        out.read_mask = read_mask(seqs, read, width)
    return out


def read_mask(seqs, read: list[int], width: int) -> torch.Tensor:
    """[N, width] bool: the keys each response's read token (its last) attends to: its prompt and its own
    tokens. The last layer's attention for the reward needs these rows only (rmlab.models.packing)."""
    by_end = {s[0] + s[1] - 1: s for s in seqs}  # a sequence by its last token
    q0, n, p0, p = torch.tensor([by_end[r] for r in read], dtype=torch.long).reshape(-1, 4).unbind(1)
    k = torch.arange(width)[None, :]
    own = (k >= q0[:, None]) & (k < (q0 + n)[:, None])
    return own | ((k >= p0[:, None]) & (k < (p0 + p)[:, None]))


def _cumsum(xs: list[int]) -> list[int]:
    out, t = [], 0
    for x in xs:
        t += x
        out.append(t)
    return out


def _buckets(seqs, width: int, real: int, call_pairs: int):
    """Per bucket: the query and key slots of each sequence and the mask, built with a few vectorised ops
    (per-sequence tensor ops cost more than the step saves in a DataLoader that shares the CPU)."""
    shapes = [(n, n + p) for _, n, _, p in seqs]
    buckets, qs, ks = [], [], []
    out_index = torch.full((width,), -1, dtype=torch.long)
    offset = 0
    for run in plan_buckets(shapes, call_pairs):
        b = len(run)
        lq = max(shapes[i][0] for i in run)
        lk = max(shapes[i][1] for i in run)
        q0 = torch.tensor([seqs[i][0] for i in run])[:, None]
        n = torch.tensor([seqs[i][1] for i in run])[:, None]
        p0 = torch.tensor([seqs[i][2] for i in run])[:, None]
        p = torch.tensor([seqs[i][3] for i in run])[:, None]
        qi, ki = torch.arange(lq)[None, :], torch.arange(lk)[None, :]  # slot numbers
        q_real = qi < n  # [B, Lq]
        # Query slots: the sequence's own tokens; padding slots repeat its first token (outputs never read).
        q_index = torch.where(q_real, q0 + qi, q0)
        # Key slots: the prompt's tokens, then the sequence's own, then padding (its first token, masked).
        k_index = torch.where(ki < p, p0 + ki, torch.where(ki < p + n, q0 + ki - p, q0))
        # A real query i sees the whole prompt and its own tokens 0..i; a padding query sees key 0 only
        # (no empty softmax row).
        own = (ki[:, None, :] >= p[:, :, None]) & (ki[:, None, :] - p[:, :, None] <= qi[:, :, None])
        seen = (ki[:, None, :] < p[:, :, None]) | own  # [B, Lq, Lk]
        mask = torch.where(q_real[:, :, None], seen, ki[:, None, :] == 0)[:, None]
        slots = offset + torch.arange(b)[:, None] * lq + qi  # [B, Lq] row of each slot in the stacked outputs
        out_index[q_index[q_real]] = slots[q_real]
        buckets.append(Bucket((b, lq, lk), mask))
        qs.append(q_index.reshape(-1))
        ks.append(k_index.reshape(-1))
        offset += b * lq
    out_index[real:] = offset  # padding tokens read a zero row appended after the buckets
    return buckets, torch.cat(qs), torch.cat(ks), out_index
