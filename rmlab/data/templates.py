"""Judge templates: how a generative reward model's rows are built from a text group.

A generative model (rmlab.models.generative) reads each response inside a text template. The data module
applies the model's ``GroupTemplate`` to each ``PreferenceGroup`` *after* the train/val split and *before*
tokenization. The template is split at the first response placeholder, so the part before it is the group's
shared prefix (prefix sharing and the truncation policy keep working: a row keeps its end, where the answer
cue is).

Judge rows: each comparison (w, l) becomes two rows, (A=w, B=l) with label 1 and (A=l, B=w) with label 0
(0.5 each for a tie), and a comparison ``winner=row(w,l), loser=row(l,w)``.
"""

from __future__ import annotations

import dataclasses
import string

from rmlab.data.types import PreferenceGroup

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
        return dataclasses.replace(
            g, prompt=prefix, responses=[r + suffix for r in g.responses], templated=False, critiques=None
        )

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
            spurious=None,  # a feature of one response, not of the judged pair
            scores=None,
            attributes=None,
            critiques=None,  # read by reasoning judges only (rmlab.models.reasoning)
            templated=False,  # the judge's own text around the conversation: tokenized as plain text
        )


# The cue between a response and its critique (CLoud) or rationale (reasoning judges): where generation starts.
CRITIQUE_CUE = "\nCritique:"
REASONING_CUE = "\nReasoning:"
RESPONSE_SLOT = {"verifier": "{response}", "judge": "{response_b}"}


class ReasoningTemplate:
    """Rows of a model that writes before it scores (rmlab.models.reasoning). Picklable, no model inside.

    - ``cloud``: ``response + cue + critique``; the reward head reads the row's end (the eos after the critique).
    - ``verifier`` / ``judge``: the judge template with ``cue + rationale`` inserted before its answer cue (the
      template's text after the last response slot), so the answer is read after the rationale.

    The critique (rationale) is the data's (``data.fields.critique``; a judge row shows "Response A: ..." and
    "Response B: ..." of its two responses), cut to its first ``max_tokens`` tokens so that training critiques are
    no longer than generated ones. The output group's ``critiques`` hold the text that ends each row (critique +
    answer cue), which tokenization counts as ``critique_len``; an empty critique of a CLoud row counts 0.
    """

    def __init__(self, kind: str, cue: str, template: str | None = None, max_tokens: int | None = None, tokenizer=None):
        if kind not in ("cloud", *RESPONSE_SLOT):
            raise ValueError(f"reasoning template kind must be cloud|verifier|judge, got {kind!r}")
        if not cue or cue != cue.rstrip():
            raise ValueError(f"the reasoning cue must be non-empty and not end with whitespace, got {cue!r}")
        self.kind, self.cue, self.template, self.max_tokens, self.tokenizer = kind, cue, template, max_tokens, tokenizer
        self.base = None
        if kind != "cloud":
            check_template(template, kind)
            slot = RESPONSE_SLOT[kind]
            head, self.answer_cue = template.rsplit(slot, 1)
            self.base = GroupTemplate(kind, head + slot)  # the rows without the answer cue

    def __repr__(self) -> str:
        tok = self.tokenizer
        tok_id = (type(tok).__name__, getattr(tok, "name_or_path", ""), len(tok)) if tok is not None else None
        return (
            f"ReasoningTemplate(kind={self.kind!r}, cue={self.cue!r}, template={self.template!r}, "
            f"max_tokens={self.max_tokens!r}, tokenizer={tok_id!r})"
        )

    def suffix(self, prompt: str = "") -> str:
        """The text after the rationale: the answer cue (none for CLoud, whose reward is read at the eos)."""
        return "" if self.base is None else self.answer_cue.format(prompt=prompt)

    def cut(self, text: str) -> str:
        """The critique's first ``max_tokens`` tokens (as text)."""
        if not text or self.max_tokens is None or self.tokenizer is None:
            return text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= self.max_tokens else self.tokenizer.decode(ids[: self.max_tokens])

    def __call__(self, g: PreferenceGroup) -> PreferenceGroup | None:
        crit = list(g.critiques) if g.critiques is not None else [""] * len(g.responses)
        if self.kind == "cloud":
            tails = [self.cut(c) for c in crit]
            return dataclasses.replace(g, responses=[r + self.cue + t for r, t in zip(g.responses, tails)], critiques=tails)
        rows = self.base(dataclasses.replace(g, critiques=None))
        if rows is None:
            return None
        if self.kind == "verifier":
            texts = crit
        else:  # the judge's rows are (w, l) and (l, w) per comparison, in order (GroupTemplate.judge_rows)
            pairs = [p for c in g.comparisons for p in ((c.winner, c.loser), (c.loser, c.winner))]
            texts = [f"Response A: {crit[a]}\nResponse B: {crit[b]}" if crit[a] or crit[b] else "" for a, b in pairs]
        suffix = self.suffix(g.prompt)
        tails = [self.cut(t) + suffix for t in texts]  # an empty rationale still ends with the answer cue
        return dataclasses.replace(rows, responses=[r + self.cue + t for r, t in zip(rows.responses, tails)], critiques=tails)
