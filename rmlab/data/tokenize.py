"""Tokenization of preference groups: the scoring contract, an explicit truncation policy and a cache.

The scoring contract (docs/eval.md): the tokens of a row are the ones a downstream tool builds from the
same text, so an export scores the same sequence in plain transformers, TRL, RewardBench or OpenRLHF.

- Encoder (BERT-style: the tokenizer has [CLS] and [SEP]): the text pair, ``[CLS] prompt [SEP] response
  [SEP]``, as ``tokenizer(prompt, response)`` gives it; the reward is read at [CLS].
- Causal LM, chat data (``data.format=chat``): ``apply_chat_template(messages, tokenize=True)`` of the whole
  conversation, nothing added (no extra bos, no extra eos), as TRL's reward functions, RewardBench and hub
  reward models such as Skywork-Reward read it; the reward is read at its last token.
- Causal LM, plain text: ``tokenizer(prompt + response)`` (with the specials the tokenizer itself adds,
  e.g. Llama's bos) followed by eos unless it already ends with one; the reward is read at that eos.

``data.reward_token`` makes the other choice explicit: ``eos`` is OpenRLHF's row for chat and plain text
alike: the text (templated or not) with its trailing newlines stripped, tokenized without added specials
(OpenRLHF never adds them: no bos unless the template writes one), then eos unless it is already the last
token. OpenRLHF's own reward-model dataset writes ``" " + eos`` as text, which puts a space token before the
eos where the text does not already end with it; its PPO scores the prompt's ids and the policy's ids up to the
eos it stopped at, with no space, and that is the row ``eos`` builds. ``last`` appends nothing to plain text
either (what a text-classification pipeline reads).

Each row is encoded whole and split at the longest token prefix all rows of a group share (the prompt, at
most): the shared prefix is what lets a causal LM encode the prompt once, and a token that merges across
the prompt/response boundary stays merged, so the rows are exact.

Truncation policy (never silent; every cut is counted in the data report):
1. the reward is read at the end of the response, so a response keeps its *end*;
2. the prompt is left-truncated first (its end, next to the response, is kept), down to
   ``min_prompt_tokens``; a leading bos stays;
3. only then is a response left-truncated to fit;
4. a comparison whose two sides are identical after truncation is dropped and counted.
A truncated row is no longer the downstream tool's row; the data report counts them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import field, make_dataclass
from pathlib import Path

from rmlab.data.types import COMPARISON_FIELDS, RESPONSE_FIELDS, DataReport, PreferenceGroup

NAN = float("nan")


class _TokenizedGroupMethods:
    @property
    def num_tokens(self) -> int:
        p = len(self.prompt_ids)
        return sum(p + len(r) for r in self.response_ids)

    @property
    def max_row(self) -> int:
        return len(self.prompt_ids) + max(len(r) for r in self.response_ids)

    @property
    def k(self) -> int:
        return len(self.response_ids)

    def to_dict(self) -> dict:
        return self.__dict__.copy()


# A tokenized group: the shared prefix, the responses, the comparisons (winner/loser indices) and one list per
# declared field (rmlab.data.types): per comparison (margin, strength, ...) and per response (ranks, scores, ...).
# An empty list means "none given": collate fills it with the field's missing value.
TokenizedGroup = make_dataclass(
    "TokenizedGroup",
    [
        ("prompt_ids", list),  # start specials + prompt + mid specials: the shared prefix
        ("response_ids", list),  # response + end specials, one per response
        ("winner", list, field(default_factory=list)),
        ("loser", list, field(default_factory=list)),
        *[(f.group_name, list, field(default_factory=list)) for f in COMPARISON_FIELDS + RESPONSE_FIELDS],
        ("group_id", str, field(default="")),
        ("attributes", list, field(default_factory=list)),  # [K][A] per-attribute ratings, NaN = missing
        ("subset", str, field(default="")),
        ("parent", int, field(default=-1)),  # the original group's index when this is a sub-group of a split group
        ("n_records", int, field(default=1)),  # source records behind this group, for the data report
    ],
    bases=(_TokenizedGroupMethods,),
)
TokenizedGroup.__module__ = __name__  # picklable (DataLoader workers) under its module-level name


REWARD_TOKENS = ("auto", "eos", "last")


def special_tokens(tokenizer) -> tuple[list[int], list[int], list[int]]:
    """(start, mid, end) special tokens around prompt and response: an encoder's ``[CLS]``, ``[SEP]``,
    ``[SEP]``; for a causal LM at most a bos and an eos (an upper bound of what a row adds to its text)."""
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls is not None and sep is not None:  # BERT-style encoder
        return [cls], [sep], [sep]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return ([bos] if bos is not None else []), [], ([eos] if eos is not None else [])


def is_encoder_tokenizer(tokenizer) -> bool:
    return tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None


def appends_eos(tokenizer, templated: bool, reward_token: str = "auto") -> bool:
    """Whether a causal row gets an eos after its text (the contract in this module's docstring)."""
    if reward_token not in REWARD_TOKENS:
        raise ValueError(f"data.reward_token must be one of {REWARD_TOKENS}, got {reward_token!r}")
    if tokenizer.eos_token_id is None:
        return False
    return reward_token == "eos" or (reward_token == "auto" and not templated)


def adds_specials(templated: bool, reward_token: str = "auto") -> bool:
    """Whether the tokenizer adds its own specials (e.g. Llama's bos) to a causal row's text: for plain text
    under the default contract; never for templated text (the template writes them) nor for OpenRLHF's rows."""
    return not templated and reward_token != "eos"


def causal_rows(tokenizer, texts: list[str], templated: bool, reward_token: str = "auto") -> list[list[int]]:
    """The contract's token rows of whole texts (prompt + response) for a causal LM."""
    if not texts:
        return []
    eos = appends_eos(tokenizer, templated, reward_token)
    if reward_token == "eos":  # OpenRLHF: the text without its trailing newlines, then eos
        texts = [t.rstrip("\n") for t in texts]
    rows = tokenizer(texts, add_special_tokens=adds_specials(templated, reward_token))["input_ids"]
    if eos:
        e = tokenizer.eos_token_id
        rows = [r if r and r[-1] == e else r + [e] for r in rows]
    return rows


def contract(tokenizer, reward_token: str = "auto") -> dict[str, str]:
    """The scoring contract of this tokenizer in words, for the export's config.json (docs/eval.md)."""
    if is_encoder_tokenizer(tokenizer):
        return {"rows": "tokenizer(prompt, response): [CLS] prompt [SEP] response [SEP]", "reward_at": "[CLS]"}
    eos = tokenizer.eos_token
    chat = "apply_chat_template(messages, tokenize=True)"
    if appends_eos(tokenizer, True, reward_token):
        chat = f"apply_chat_template(messages, tokenize=False).rstrip('\\n'), tokenized without added specials, + {eos}"
    if reward_token == "eos":
        text = f"tokenizer((prompt + response).rstrip('\\n'), add_special_tokens=False) + {eos} unless it ends with it"
    else:
        text = "tokenizer(prompt + response)" + (f" + {eos} unless it ends with it" if appends_eos(tokenizer, False, reward_token) else "")
    return {"reward_token": reward_token, "chat": chat, "text": text, "reward_at": "the last token (the last non-pad token)"}


def common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


def contract_drift(tokenizer, recorded: dict, reward_token: str) -> str | None:
    """Why rows built now under ``reward_token`` differ from those an export recorded training on
    (``config.rmlab.scoring``), or None. The one case: plain text under ``reward_token=eos``, which was the
    tokenizer's own row (its specials, e.g. Llama's bos, and trailing newlines kept) + eos before it became
    OpenRLHF's row; ``auto`` builds that older plain-text row exactly."""
    old = recorded.get("text")
    if reward_token != "eos" or recorded.get("reward_token") != "eos" or not old or recorded.get("format") == "chat":
        return None
    now = contract(tokenizer, "eos")["text"]
    if old == now:
        return None
    return (f"this export was trained on plain-text rows built as {old} (its config.rmlab.scoring.text); rmlab now "
            f"builds reward_token=eos rows as {now}, so its plain-text rewards are not the trained ones (chat rows are "
            "unchanged): train it again for plain text, or score plain text with Scorer(model, reward_token='auto'), "
            "which builds that older row exactly")


def format_drift(recorded: dict, chat: bool) -> str | None:
    """Why plain-text rows of a model trained on chat conversations are not its trained rows, or None: the
    export recorded ``format: chat`` (``config.rmlab.scoring``) and is given plain text (``chat`` False), which
    is scored by the plain-text rule, not through the chat template. The reward is then not the one the model
    learned, and nothing else would say so."""
    if chat or recorded.get("format") != "chat":
        return None
    return (f"this model was trained on chat conversations (config.rmlab.scoring.format=chat: rows "
            f"{recorded.get('chat') or 'apply_chat_template(messages, tokenize=True)'}), but it is given plain text, "
            f"scored as {recorded.get('text') or recorded.get('rows') or 'plain-text rows'}: these rewards are not on "
            "the rows it was trained on. Give chat records instead ({messages}, or prompt/completion or "
            "chosen/rejected as message lists; eval.py: data.format=chat)")


def causal_groups(tokenizer, groups: list[PreferenceGroup], reward_token: str = "auto"):
    """Per group: (start, prompt body, [response ids]) such that start + body + response is the row.

    The rows are encoded whole; the split is the longest prefix the rows and the prompt's own encoding share,
    so that each response keeps at least one token. ``start`` is a leading bos, kept by prompt truncation."""
    out: list = [None] * len(groups)
    bos = tokenizer.bos_token_id
    for templated in (False, True):
        idx = [i for i, g in enumerate(groups) if g.templated == templated]
        if not idx:
            continue
        add = adds_specials(templated, reward_token)
        prompts = tokenizer([groups[i].prompt for i in idx], add_special_tokens=add)["input_ids"]
        rows = causal_rows(tokenizer, [groups[i].prompt + r for i in idx for r in groups[i].responses], templated, reward_token)
        pos = 0
        for i, p in zip(idx, prompts):
            k = len(groups[i].responses)
            rs, pos = rows[pos : pos + k], pos + k
            cut = min(common_prefix([p, *rs]), min(len(r) for r in rs) - 1)
            start = 1 if cut > 0 and bos is not None and rs[0][0] == bos else 0
            out[i] = (rs[0][:start], rs[0][start:cut], [r[cut:] for r in rs])
    return out


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encoder_groups(tokenizer, groups: list[PreferenceGroup]):
    """Per group: (start, prompt body, [response ids]) of ``[CLS] prompt [SEP] response [SEP]``; mid [SEP] is
    added after the body."""
    start, _, end = special_tokens(tokenizer)
    prompts = _encode(tokenizer, [g.prompt for g in groups])
    flat = _encode(tokenizer, [r for g in groups for r in g.responses])
    out, pos = [], 0
    for g, p in zip(groups, prompts):
        k = len(g.responses)
        out.append((start, p, [r + end for r in flat[pos : pos + k]]))
        pos += k
    return out


CASTS = {"float": float, "long": int, "bool": bool}


def record_value(f, value):
    """A per-comparison value as the batch stores it: the field's missing value for None, else cast."""
    return f.missing if value is None else CASTS[f.dtype](value)


def critique_lengths(
    tokenizer, g: PreferenceGroup, prefix: list[int], responses: list[list[int]], reward_token: str = "auto"
) -> list[int]:
    """Tokens of each row's critique: ``g.critiques[i]`` is the text that ends ``g.responses[i]`` (a reasoning
    model's template put it there, rmlab.models.reasoning). The row is encoded whole, as every row is; its
    critique is what follows the longest prefix it shares with the encoding of the text without the critique,
    the row's end tokens (eos) included. An empty critique counts 0."""
    if is_encoder_tokenizer(tokenizer):
        raise ValueError("critiques end a causal LM's row; an encoder (BERT-style) tokenizer cannot hold one")
    if len(g.critiques) != len(g.responses):
        raise ValueError(f"group {g.group_id!r}: {len(g.critiques)} critiques for {len(g.responses)} responses")
    for r, c in zip(g.responses, g.critiques):
        if c and not r.endswith(c):
            raise ValueError(f"group {g.group_id!r}: a critique must end its response text (the template appends it)")
    heads = [g.prompt + r[: len(r) - len(c)] for r, c in zip(g.responses, g.critiques)]
    enc = tokenizer(heads, add_special_tokens=adds_specials(g.templated, reward_token))["input_ids"]
    out = []
    for c, head, r in zip(g.critiques, enc, responses):
        row = prefix + r
        out.append(len(row) - common_prefix([head, row]) if c else 0)
    return out


def _pad(values, k, fill):
    return list(values) if values is not None else [fill] * k


def tokenize_groups(
    groups: list[PreferenceGroup],
    tokenizer,
    report: DataReport,
    max_length: int = 512,
    min_prompt_tokens: int = 16,
    reward_token: str = "auto",
) -> list[TokenizedGroup]:
    encoder = is_encoder_tokenizer(tokenizer)
    start, mid, end = special_tokens(tokenizer)
    if not encoder:
        appends_eos(tokenizer, False, reward_token)  # checks the value
        mid = []
    fixed = len(start) + len(mid) + len(end)
    if max_length <= fixed + min_prompt_tokens:
        raise ValueError(
            f"data.max_length={max_length} leaves no room for a response after {fixed} special tokens and "
            f"data.min_prompt_tokens={min_prompt_tokens}; raise max_length or lower min_prompt_tokens"
        )
    parts = encoder_groups(tokenizer, groups) if encoder else causal_groups(tokenizer, groups, reward_token)
    out = []
    for g, (start, p, resp) in zip(groups, parts):
        crit = critique_lengths(tokenizer, g, start + p, resp, reward_token) if g.critiques is not None else None
        budget = max_length - len(start) - len(mid)
        longest = max(len(r) for r in resp)
        if len(p) + longest > budget:
            keep = max(min_prompt_tokens, budget - longest)
            if keep < len(p):
                p = p[len(p) - keep :] if keep > 0 else []
                report.truncated["prompt_left_truncated"] += 1
            room = budget - len(p)
            for i, r in enumerate(resp):
                if len(r) > room:
                    # Keep the end of the response: that is where the reward is read.
                    resp[i] = r[len(r) - room :]
                    report.truncated["response_left_truncated"] += 1
        if crit is not None:  # a cut reaching into the critique leaves what is left of it
            crit = [min(c, len(r)) for c, r in zip(crit, resp)]
        keep_c = []
        report.comparisons_loaded += len(g.comparisons)
        for c in g.comparisons:
            if resp[c.winner] == resp[c.loser]:
                same_text = g.responses[c.winner] == g.responses[c.loser]
                report.drop_comparison("identical_responses" if same_text else "identical_after_truncation")
            else:
                keep_c.append(c)
        has_pointwise = g.labels is not None or g.attributes is not None
        if not keep_c and not has_pointwise:
            report.drop("no_comparison_left_after_truncation", g.n_records)
            report.kept -= g.n_records
            continue
        report.comparisons_kept += len(keep_c)
        n_orig = max(len(g.comparisons), 1)
        k = len(resp)
        out.append(
            TokenizedGroup(
                prompt_ids=list(start) + p + mid,
                response_ids=resp,
                winner=[c.winner for c in keep_c],
                loser=[c.loser for c in keep_c],
                **{f.group_name: [record_value(f, getattr(c, f.name)) for c in keep_c] for f in COMPARISON_FIELDS if f.from_record},
                group_weight=[1.0 / n_orig] * len(keep_c),
                group_id=g.group_id,
                **{f.group_name: _pad(getattr(g, f.group_name), k, f.missing) for f in RESPONSE_FIELDS if f.from_record},
                critique_lens=crit or [],
                attributes=list(g.attributes) if g.attributes is not None else [],
                subset=g.subset or "",
                n_records=g.n_records,
            )
        )
    return out


def subgroup(tg: TokenizedGroup, members: list[int], cis: list[int], group_id: str, parent: int) -> TokenizedGroup:
    """The responses ``members`` of ``tg`` (in that order) with its comparisons ``cis``, re-indexed."""
    local = {r: i for i, r in enumerate(members)}

    def pick(xs):
        return [xs[r] for r in members] if xs else []

    return TokenizedGroup(
        prompt_ids=tg.prompt_ids,
        response_ids=[tg.response_ids[r] for r in members],
        winner=[local[tg.winner[c]] for c in cis],
        loser=[local[tg.loser[c]] for c in cis],
        **{f.group_name: [getattr(tg, f.group_name)[c] for c in cis] if getattr(tg, f.group_name) else [] for f in COMPARISON_FIELDS},
        group_id=group_id,
        **{f.group_name: pick(getattr(tg, f.group_name)) for f in RESPONSE_FIELDS},
        attributes=pick(tg.attributes),
        subset=tg.subset,
        parent=parent,
    )


def split_group(tg: TokenizedGroup, max_responses: int, parent: int = -1) -> list[TokenizedGroup]:
    """Split a group with more than ``max_responses`` responses into sub-groups that fit a batch.

    Responses are cut into blocks of ``max_responses // 2``; each pair of blocks forms a sub-group, and
    every comparison is assigned to exactly one sub-group (the first that holds both its sides). No
    comparison is lost; a response may be forwarded in several sub-groups. ``group_weight`` keeps the
    original 1 / C so eq 6 balancing still weighs the whole prompt as one.
    """
    if tg.k <= max_responses:
        return [tg]
    if max_responses < 2:
        raise ValueError("a batch must hold at least 2 responses (data.max_responses >= 2)")
    half = max(1, max_responses // 2)
    blocks = [list(range(i, min(i + half, tg.k))) for i in range(0, tg.k, half)]
    block_of = {r: b for b, blk in enumerate(blocks) for r in blk}
    pairs = [(a, b) for a in range(len(blocks)) for b in range(a, len(blocks)) if a != b or len(blocks) == 1]
    assigned: dict[tuple[int, int], list[int]] = {}
    for ci, (w, lo) in enumerate(zip(tg.winner, tg.loser)):
        a, b = sorted((block_of[w], block_of[lo]))
        key = (a, b) if a != b else (a, a + 1 if a + 1 < len(blocks) else a - 1)
        key = tuple(sorted(key))
        assigned.setdefault(key, []).append(ci)
    subs = []
    for key in pairs:
        cis = assigned.get(key)
        if not cis:
            continue
        members = blocks[key[0]] + blocks[key[1]]
        subs.append(subgroup(tg, members, cis, f"{tg.group_id}#{key[0]}-{key[1]}", parent))
    return subs


def explode_pairs(tg: TokenizedGroup) -> list[TokenizedGroup]:
    """One K=2 group per comparison: the "shuffled comparisons" baseline InstructGPT compares eq 6 to.

    Each comparison becomes its own sample, so a prompt's comparisons scatter across batches and a
    response is forwarded once per comparison it is in (2 * C(K,2) forwards instead of K).
    ``group_weight`` keeps 1/C(K,2), so loss=grouped still weighs prompts alike.
    """
    return [
        subgroup(tg, [w, lo], [ci], f"{tg.group_id}/c{ci}", tg.parent)
        for ci, (w, lo) in enumerate(zip(tg.winner, tg.loser))
    ]


# What RewardDataModule.setup reads from a cached report: a cache without them is rebuilt, not trusted.
CACHED_REPORT_KEYS = ("n_train_groups", "one_line", "train", "val")


def cache_key(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_dir() -> Path:
    return Path(os.environ.get("RMLAB_CACHE", Path.home() / ".cache" / "rmlab")) / "tokenized"


def load_cached(key: str):
    import torch

    path = cache_dir() / f"{key}.pt"
    if not path.exists():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        groups = [TokenizedGroup(**d) for d in blob["groups"]]
        report = blob["report"]
        if not isinstance(report, dict) or not all(k in report for k in CACHED_REPORT_KEYS):
            return None  # a cache file of another shape (written by hand, or by another tool): rebuilt
        return groups, report
    except Exception:  # a stale or partial cache is rebuilt, never trusted
        return None


def save_cached(key: str, groups: list[TokenizedGroup], report: dict) -> None:
    import torch

    path = cache_dir() / f"{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"groups": [g.to_dict() for g in groups], "report": report}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file


def is_nan(x: float) -> bool:
    return isinstance(x, float) and math.isnan(x)
