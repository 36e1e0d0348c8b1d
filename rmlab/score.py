"""Score a jsonl file with a trained reward model; write jsonl with rewards.

    python -m rmlab.score data.jsonl --model outputs/train/runs/<run>/export --output scored.jsonl
    python -m rmlab.score data.jsonl --ckpt <run>/checkpoints/last.ckpt --fields prompt=question,response=answer
    python -m rmlab.score data.jsonl --model a/export --model b/export --combine min   # an ensemble

Records are either ``{prompt, response}`` (gets ``reward``) or ``{prompt, chosen, rejected}`` (gets
``reward_chosen``, ``reward_rejected`` and ``p_chosen = sigmoid(reward_chosen - reward_rejected)``), as text
or as chat messages: ``{messages: [...]}`` (one conversation), ``{chosen: [...], rejected: [...]}`` (two;
a ``prompt`` field, text or messages, goes first when they hold no user turn) or TRL's
``{prompt: [...], completion: [...]}``. A conversation is scored as exactly
``apply_chat_template(messages, tokenize=True)`` (docs/eval.md, the scoring contract).
``--fields`` maps those names to a file's own. Every input field is kept; output order = input order.

It streams: at most ``--buffer`` records are held at a time. Inside the buffer the responses are
sorted by length and cut into batches of at most ``--batch-size`` rows and ``--max-tokens`` padded
tokens, so little compute goes to padding. Memory stays flat whatever the file size. Tokenization is
the training one (same special tokens, same truncation), so scores equal those seen in training.

Several ``--model`` / ``--ckpt`` score as one ensemble (rmlab.models.ensemble): each member's reward is
normalized by its val statistics, then combined by ``--combine`` mean | min | uwo (mean - lam * std).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rmlab.data.chat import DEFAULT_FALLBACK_TEMPLATE, check_messages, split_conversations, with_prompt
from rmlab.data.sources import DataError, read_records
from rmlab.data.tokenize import contract_drift, format_drift, subgroup, tokenize_groups
from rmlab.data.types import Comparison, DataReport, PreferenceGroup

NAN = float("nan")
# (prompt, responses) of plain text, or (prompt, responses, True) where prompt + response is a chat template's text
Item = tuple


NAMES = ("prompt", "response", "chosen", "rejected", "messages", "completion")


def parse_fields(spec: str | None) -> dict[str, str]:
    """'prompt=question,response=answer' -> {'prompt': 'question', 'response': 'answer'}."""
    out = {}
    for part in filter(None, (spec or "").split(",")):
        k, _, v = part.partition("=")
        if k.strip() not in NAMES or not v.strip():
            raise SystemExit(f"--fields: {part!r} must be one of {'|'.join(NAMES)}=<your field>")
        out[k.strip()] = v.strip()
    return out


def record_item(rec: dict, where: str, fields: dict[str, str], scorer: Scorer) -> tuple[Item, bool]:
    """(item, is_pair) of one record: plain text {prompt, response} / {prompt, chosen, rejected}, or chat
    messages {messages} / {chosen: [..], rejected: [..]} (with an optional prompt) / {prompt: [..], completion}."""
    f = {k: fields.get(k, k) for k in NAMES}
    if not isinstance(rec, dict):
        raise DataError(where, f"a record must be an object, got {type(rec).__name__}")
    if isinstance(rec.get(f["messages"]), list):
        return scorer.chat_items([[check_messages(rec[f["messages"]], where, f["messages"])]], [where])[0], False
    is_pair = f["chosen"] in rec and f["rejected"] in rec
    names = ["chosen", "rejected"] if is_pair else ["completion" if f["completion"] in rec else "response"]
    if any(isinstance(rec.get(f[k]), list) for k in names) or isinstance(rec.get(f["prompt"]), list):
        convs = []
        for k in names:
            v = rec.get(f[k])
            if v is None:
                raise DataError(where, f"missing field {f[k]!r}", f"fields present: {', '.join(map(str, rec))}")
            tail = [{"role": "assistant", "content": v}] if isinstance(v, str) else check_messages(v, where, f[k])
            convs.append(with_prompt(rec.get(f["prompt"]), tail, where, f["prompt"]))
        return scorer.chat_items([convs], [where])[0], is_pair
    missing = [f[k] for k in ["prompt", *names] if not isinstance(rec.get(f[k]), str)]
    if missing:
        raise DataError(
            where,
            f"missing or non-text field(s) {missing}",
            f"fields present: {', '.join(map(str, rec))}; map them with --fields prompt=..,response=.. (or "
            "chosen=..,rejected=..), or give chat messages (messages=.. or chosen/rejected message lists)",
        )
    return (rec[f["prompt"]], [rec[f[k]] for k in names]), is_pair


def batches_by_length(lengths: list[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Indices sorted by length, cut into batches of <= batch_size rows and <= max_tokens padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out, cur = [], []
    for i in order:
        # rows are ascending, so the newest row is the longest: padded size = rows x its length
        if cur and (len(cur) + 1 > batch_size or (len(cur) + 1) * lengths[i] > max_tokens):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


class Scorer:
    """Rewards for (prompt, response) rows, independent of batch size and padding side.

    Every head rmlab trains scores here, with training's rows:
    - scalar head: one row per response;
    - generative verifier: the judge template around each response, reward = log P(yes) - log P(no);
    - attribute head: the combined reward, plus each attribute's output (``attributes``);
    - pairwise judge: pairs only; each pair is read in both orders (``judge``), see ``score_file``.
    """

    def __init__(
        self,
        model: Any,
        max_length: int = 512,
        min_prompt_tokens: int = 16,
        padding_side: str = "right",
        batch_size: int = 32,
        max_tokens: int = 16384,
        device: str = "cpu",
        reward_token: str | None = None,
        progress: bool = False,
    ):
        """``reward_token``: the scoring contract's option (rmlab.data.tokenize); None = what the model's export
        recorded (``config.rmlab.scoring``), else ``auto``. ``progress``: a tqdm bar over the batches of each
        ``rows`` call."""
        if reward_token is None:
            reward_token = model.recorded_scoring().get("reward_token") or "auto"
        self.model, self.tok = model.eval().to(device), model.tokenizer
        drift = contract_drift(self.tok, model.recorded_scoring(), reward_token)
        if drift:  # once, on stderr (a logger warning as well printed it twice: Hydra's handler, or logging's last resort)
            print(f"rmlab: {drift}", file=sys.stderr, flush=True)
        self.progress = progress
        self.max_length, self.min_prompt_tokens, self.reward_token = max_length, min_prompt_tokens, reward_token
        self.padding_side, self.batch_size, self.max_tokens, self.device = padding_side, batch_size, max_tokens, device
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self.template, self.kind = model.group_template, model.kind
        self.attribute_names = list(model.output_names)
        self._plain_text_warned = False  # format_drift is said once per Scorer

    def chat_items(
        self, conversations: list[list[list[dict[str, str]]]], wheres: list[str] | None = None
    ) -> list[Item]:
        """Items of chat conversations (per item, its K conversations), rendered as training renders them: the
        rows are then exactly ``apply_chat_template(conversation, tokenize=True)`` (docs/eval.md). ``wheres``: each
        item's location, named when the tokenizer's template refuses its messages (a ``DataError``)."""
        template = DEFAULT_FALLBACK_TEMPLATE  # used only when the tokenizer has no template of its own
        out = []
        for i, convs in enumerate(conversations):
            where = wheres[i] if wheres else f"conversation {i}"
            prompt, responses = split_conversations(convs, self.tok, template, where)
            out.append((prompt, responses, True))
        return out

    def score_chat(
        self, conversations: list[list[list[dict[str, str]]]], wheres: list[str] | None = None
    ) -> list[list[float]]:
        """[[conversation, ...], ...] -> rewards in the same nesting; a conversation is a list of {role, content}.
        ``wheres``: each item's location, for the error when a chat template refuses its messages."""
        return self.rows(self.chat_items(conversations, wheres))[0]

    def _groups(self, items: list[Item]):

        # Unlabelled pointwise groups (labels NaN, no comparisons): tokenize_groups keeps them as they
        # are, truncated by the training policy, instead of dropping "groups without a comparison".
        out = []
        for p, rs, *chat in items:
            g = PreferenceGroup(
                prompt=p, responses=list(rs), comparisons=[], labels=[NAN] * len(rs), templated=bool(chat and chat[0])
            )
            if self.kind == "judge":
                # rows (A=chosen, B=rejected) and (A=rejected, B=chosen), exactly as in training
                g = self.template(dataclasses.replace(g, comparisons=[Comparison(0, 1)]))
                g = dataclasses.replace(g, comparisons=[], labels=[NAN, NAN], true_rewards=None)
            elif self.template is not None:
                g = self.template(g)
            out.append(g)
        return out

    def rows(
        self, items: list[Item], texts: list[list[str]] | None = None
    ) -> tuple[list[list[float]], list[list[list[float]]] | None]:
        """Each group's row outputs: rewards [group][row] and, for the attribute head, attributes
        [group][row][attribute] (else None). A judge's rows are its two orders of a (chosen, rejected) item.
        ``texts`` (a list) receives [group][row] the critique a writing model (CLoud) generated before scoring."""
        from rmlab.data.collate import collate  # torch: loaded once scoring starts, not for --help
        from rmlab.models import score_batches  # torch + transformers, likewise

        if self.kind == "judge" and any(len(it[1]) != 2 for it in items):
            raise ValueError("a pairwise judge scores pairs (chosen, rejected), not single responses")
        if not self._plain_text_warned:
            drift = format_drift(self.model.recorded_scoring(), all(len(it) > 2 and it[2] for it in items))
            if drift:  # once, on stderr, as contract_drift
                print(f"rmlab: {drift}", file=sys.stderr, flush=True)
                self._plain_text_warned = True
        toks = tokenize_groups(
            self._groups(items), self.tok, DataReport(), self.max_length, self.min_prompt_tokens, self.reward_token
        )
        rows = [(gi, ri) for gi, t in enumerate(toks) for ri in range(t.k)]
        lens = [len(toks[gi].prompt_ids) + len(toks[gi].response_ids[ri]) for gi, ri in rows]
        out = [[NAN] * t.k for t in toks]
        attrs = [[[] for _ in range(t.k)] for t in toks] if "attributes" in self.model.extra_outputs else None
        order = batches_by_length(lens, self.batch_size, self.max_tokens)

        def single(gi: int, ri: int):
            return subgroup(toks[gi], [ri], [], toks[gi].group_id, parent=gi)

        # One row per response: each batch holds single-response groups, so no row waits on its group.
        batches = (collate([single(*rows[i]) for i in idx], self.pad_id, self.padding_side) for idx in order)
        if texts is not None:
            texts[:] = [[""] * t.k for t in toks]
        scored = score_batches(self.model, batches, device=self.device, progress=self.progress, total=len(order))
        for idx, s in zip(order, scored):
            a = s.heads["attributes"].tolist() if attrs is not None else None
            written = s.heads.get("critique")  # generated before the reward was read (rmlab.models.reasoning)
            for j, (i, v) in enumerate(zip(idx, s.rewards.tolist())):
                gi, ri = rows[i]
                out[gi][ri] = v
                if a is not None:
                    attrs[gi][ri] = a[j]
                if written is not None and texts is not None:
                    texts[gi][ri] = written[j]
        return out, attrs

    def score(self, items: list[Item]) -> list[list[float]]:
        """[(prompt, [response, ...]), ...] -> rewards in the same nesting (a judge: its two order logits)."""
        return self.rows(items)[0]


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if abs(x) < 700 else float(x > 0)


def record_outputs(kind: str, is_pair: bool, rs: list[float], attrs: list[list[float]] | None, names: list[str]) -> dict:
    """The fields ``score_file`` adds to one record."""
    if kind == "judge":
        # r1: log P(A)/P(B) with chosen as A; r2: with chosen as B. P(chosen), averaged over both orders.
        r1, r2 = rs
        return {
            "p_chosen": 0.5 + 0.5 * (_sigmoid(r1) - _sigmoid(r2)),
            "judge_logit_chosen_first": r1,
            "judge_logit_chosen_second": r2,
            "position_flip": (r1 > 0) == (r2 > 0),  # the verdict follows the position, not the response
        }
    named = [dict(zip(names, a)) for a in attrs] if attrs is not None else None
    if is_pair:
        out = {"reward_chosen": rs[0], "reward_rejected": rs[1], "p_chosen": _sigmoid(rs[0] - rs[1])}
        if named:
            out.update(attributes_chosen=named[0], attributes_rejected=named[1])
        return out
    return {"reward": rs[0], **({"attributes": named[0]} if named else {})}


def critique_outputs(kind: str, is_pair: bool, texts: list[str]) -> dict:
    """The generated critiques ``score_file`` adds beside the rewards of a writing model."""
    if kind == "judge":
        return {"rationale_chosen_first": texts[0], "rationale_chosen_second": texts[1]}
    if is_pair:
        return {"critique_chosen": texts[0], "critique_rejected": texts[1]}
    return {"critique": texts[0]}


def chunks(it: Iterable, n: int) -> Iterator[list]:
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


def score_file(
    scorer: Scorer,
    src: str,
    dst: str,
    fields: dict[str, str] | None = None,
    buffer: int = 2048,
    normalize: tuple[float, float] | None = None,
    progress: bool = True,
) -> int:
    """Stream ``src`` -> ``dst``; returns the number of records written."""

    fields = fields or {}
    total = None
    if progress and src.endswith(".jsonl"):
        with open(src, "rb") as f:  # one cheap pass, so the bar shows an ETA
            total = sum(1 for line in f if line.strip())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="rec", desc="scoring", file=sys.stderr)
    n = 0
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", encoding="utf-8") as out:
        for chunk in chunks(read_records(src), buffer):
            recs, items, pair = [], [], []
            for where, rec in chunk:
                if isinstance(rec, DataError):
                    raise rec
                item, is_pair = record_item(rec, where, fields, scorer)
                if scorer.kind == "judge" and not is_pair:
                    raise DataError(
                        where,
                        "a pairwise judge compares two responses; this record has one",
                        "give {prompt, chosen, rejected} records (map them with --fields chosen=..,rejected=..), "
                        "or score single responses with a scalar-head or verifier model",
                    )
                recs.append(rec)
                items.append(item)
                pair.append(is_pair)
            texts: list[list[str]] = []  # a writing model's critiques, filled by rows
            rewards, attrs = scorer.rows(items, texts) if scorer.model.writes_critiques else scorer.rows(items)
            for j, (rec, rs, is_pair) in enumerate(zip(recs, rewards, pair)):
                if normalize:
                    rs = [(r - normalize[0]) / normalize[1] for r in rs]
                rec.update(record_outputs(scorer.kind, is_pair, rs, attrs[j] if attrs else None, scorer.attribute_names))
                if scorer.model.writes_critiques:  # the critique each reward was read after
                    rec.update(critique_outputs(scorer.kind, is_pair, texts[j]))
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += len(recs)
            if bar is not None:
                bar.update(len(recs))
    if bar is not None:
        bar.close()
    if n == 0:  # a file of blank lines (or an empty list): scoring nothing is not a success
        raise DataError(src, "the file has no records to score", "give a file with one JSON record per line")
    return n


def cli_message(e: DataError) -> str:
    """A reader's ``DataError`` as rmlab.score says it. The reader's hints name train.py's and eval.py's keys;
    rmlab.score has no ``data.on_error=skip`` (it stops at the first bad record) and takes its input and field
    names as arguments, so those parts of the hint are said in its own terms."""
    hint = re.sub(r",? or set data\.on_error=skip", "", e.hint)
    hint = re.sub(r"data\.fields\.(\w+)=", r"--fields \1=", hint)
    hint = hint.replace("point data.source at", "give rmlab.score").replace("and data.source", "and the input path")
    hint = hint.replace("data.source", "the input path")
    if "or set data.on_error=skip" in e.hint:
        hint += " (rmlab.score stops at the first bad record; eval.py can skip and count them)"
    return f"{e.where}: {e.problem}" + (f"\n  -> {hint}" if hint else "")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m rmlab.score",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "input", help="a .jsonl / .jsonl.gz file of {prompt, response} or {prompt, chosen, rejected} records"
    )
    ap.add_argument(
        "--model", action="append", default=[],
        help="an exported model dir (<run>/export), an HF reward model, or `minilm`; repeat for an ensemble",
    )
    ap.add_argument(
        "--ckpt", action="append", default=[],
        help="a Lightning checkpoint inside a run dir (its config.yaml gives the architecture); repeatable",
    )
    ap.add_argument(
        "--combine", default="mean", choices=["mean", "min", "uwo"],
        help="with several models: mean, min (worst case) or uwo (mean - lam * std) of the normalized rewards",
    )
    ap.add_argument("--lam", type=float, default=1.0, help="uwo's lambda (normalized reward units)")
    ap.add_argument("--output", "-o", help="output jsonl (default: <input stem>.scored.jsonl)")
    ap.add_argument("--fields", help="your field names: prompt=question,response=answer or chosen=a,rejected=b")
    ap.add_argument("--batch-size", type=int, default=32, help="rows per forward at most")
    ap.add_argument("--max-tokens", type=int, default=16384, help="padded tokens per forward at most (rows x longest)")
    ap.add_argument("--buffer", type=int, default=2048, help="records held at once; length-sorting happens inside it")
    ap.add_argument(
        "--max-length", type=int, default=None,
        help="tokens per row; the prompt is cut first (default: the training run's data.max_length, else 512)",
    )
    ap.add_argument(
        "--min-prompt-tokens", type=int, default=None,
        help="the prompt keeps at least this many tokens (default: the training run's, else 16)",
    )
    ap.add_argument("--padding-side", default="right", choices=["right", "left"], help="rewards do not depend on it")
    ap.add_argument("--normalize", action="store_true", help="(r - mean) / std with the export's val statistics")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 is best on busy shared cores)"
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    paths = [*a.model, *a.ckpt]
    if not paths:
        ap.error("give a model: --model <run>/export or --ckpt <run>/checkpoints/last.ckpt (repeat for an ensemble)")

    import torch
    import transformers

    from rmlab.checkpoint import CheckpointError  # likewise
    from rmlab.evaluate import load_ensemble, load_member, trained_rows  # torch, lightning: after the arguments parse

    transformers.logging.set_verbosity_error()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:  # a broken or foreign checkpoint or export: the file and what to do, without a traceback
        if len(paths) == 1:
            model, meta, run_cfg = load_member(paths[0])
        else:
            if a.normalize:
                raise SystemExit("rmlab.score: --normalize does not apply to an ensemble: its members are already "
                                 "normalized by their val statistics before they are combined")
            try:
                model, run_cfgs = load_ensemble(paths, a.combine, a.lam)
            except ValueError as e:  # members that cannot combine (no val statistics, another tokenizer or head)
                raise SystemExit(f"rmlab.score: {e}") from None
            meta, run_cfg = {}, run_cfgs[0]
    except CheckpointError as e:
        raise SystemExit(f"rmlab.score: {e}") from None
    # Training's rows by default (the scoring contract, training's truncation), so a row scores as it was trained on.
    rows = trained_rows(paths[0], run_cfg)  # an ensemble: its members share a tokenizer and, by default, rows
    a.max_length = a.max_length or rows["max_length"]
    a.min_prompt_tokens = a.min_prompt_tokens if a.min_prompt_tokens is not None else rows["min_prompt_tokens"]
    norm = None
    if a.normalize:
        if "reward_mean" not in meta:
            raise SystemExit(
                "--normalize needs reward_mean/reward_std in the export's config.json (rmlab train writes them)"
            )
        norm = (float(meta["reward_mean"]), float(meta["reward_std"]) or 1.0)
        if model.kind == "judge":
            raise SystemExit("--normalize does not apply to a pairwise judge: it outputs P(chosen), not rewards")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    scorer = Scorer(
        model, a.max_length, a.min_prompt_tokens, a.padding_side, a.batch_size, a.max_tokens, device, rows["reward_token"]
    )
    dst = a.output or str(Path(a.input).with_suffix("")).removesuffix(".jsonl") + ".scored.jsonl"

    try:
        n = score_file(scorer, a.input, dst, parse_fields(a.fields), a.buffer, norm, progress=not a.no_progress)
    except DataError as e:  # a bad record: its file, line and what to do, without a traceback
        if Path(dst).is_file() and Path(dst).stat().st_size == 0:  # nothing scored: leave no empty output
            Path(dst).unlink()
        raise SystemExit(f"rmlab.score: {cli_message(e)}") from None
    print(f"scored {n} records -> {dst}", file=sys.stderr)


if __name__ == "__main__":
    main()
