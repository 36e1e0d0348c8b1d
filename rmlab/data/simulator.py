"""A preference simulator with a known true reward.

Prompts and responses are plain English built from templates. Each response has qualities a model
must *read* to judge:

- ``on_topic``: it answers the question that was asked (or, for arithmetic, gives the right sum);
- ``format_ok``: it follows the format the prompt requested (a bulleted list, a required opening
  word, one sentence); every format is visible to an uncased tokenizer such as MiniLM's;
- ``polite``: its tone is courteous rather than dismissive.

The true reward is a weighted sum of these qualities plus a small unobserved term. Filler sentences
("I hope this helps.") are added independently of quality, so length alone does not explain the
reward (the run reports a length-only baseline to prove it).

**The hackable option** (``hack_rate`` > 0; off by default, and then the data is byte-identical to the
simulator without it): a share ``hack_rate`` of the responses *flatter instead of answering*: their body
is 1-3 flattering sentences ("What a great question to ask") in the requested format, so they are never
on topic. The annotators who write the labels add ``hack_strength`` per flattering sentence to what they
perceive; the true reward ignores flattery. Flattery is therefore rewarded by the labels and, because it
takes the place of an answer, negatively correlated with the true reward: a reward model that learns
the annotators' taste can be hacked by best-of-n sampling (``rmlab.bon``). ``spurious_feature_report``
measures both correlations; the data report carries them.

Labels follow Bradley-Terry: an annotator perceives ``gap + Logistic(0, temperature)`` and prefers
the side the perceived gap favours, which is exactly ``P(a > b) = sigmoid((r_a - r_b) / T)``. When
``|perceived| < tie_band`` the annotator reports a tie. The strength (0..3, Llama 2's 4-level scale)
comes from ``|perceived|``, so it is noisy the way human strength labels are. Everything is a pure
function of the seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import combinations

from rmlab.data.types import Comparison, PreferenceGroup

# (question, on-topic answer sentences). Off-topic answers are drawn from another topic.
TOPICS: list[tuple[str, list[str]]] = [
    ("What should I wear when it rains", ["Wear a waterproof coat", "Bring an umbrella", "Choose boots that keep your feet dry"]),
    ("How can I sleep better at night", ["Keep a regular bedtime", "Avoid screens before bed", "Keep your bedroom cool and dark"]),
    ("How do I water a houseplant", ["Water when the top soil feels dry", "Use a pot with drainage holes", "Do not let the roots sit in water"]),
    ("How can I save money on groceries", ["Plan your meals for the week", "Buy store brands", "Make a shopping list and stick to it"]),
    ("How do I make a good cup of tea", ["Use freshly boiled water", "Steep the leaves for three minutes", "Warm the cup first"]),
    ("What helps when learning a new language", ["Practice speaking every day", "Learn the most common words first", "Listen to native speakers"]),
    ("How do I keep my laptop battery healthy", ["Avoid draining it to zero", "Keep it away from heat", "Unplug it once it is full"]),
    ("How can I stay focused while studying", ["Study in short timed sessions", "Put your phone in another room", "Take a short break every hour"]),
    ("How do I clean a cast iron pan", ["Rinse it with hot water", "Dry it right away", "Rub a thin layer of oil on it"]),
    ("What should I pack for a day hike", ["Bring plenty of water", "Pack a map and snacks", "Carry a light rain jacket"]),
    ("How do I care for a new puppy", ["Feed it at the same times each day", "Take it outside often", "Give it a quiet place to rest"]),
    ("How can I reduce stress at work", ["Write down your tasks", "Take short walks", "Say no to extra work when you are full"]),
]
FORMATS = {
    "none": "",
    "list": " Answer as a bulleted list.",
    "tag": " Start your answer with 'Answer:'.",
    "one": " Answer in one sentence.",
}
POLITE = ["Happy to help!", "Good question.", "Sure, here are some ideas.", "Thanks for asking."]
RUDE = ["Ugh, obviously.", "That is a silly question.", "Figure it out yourself, but fine.", "Whatever."]
# The hackable option's spurious feature: sentences that praise the asker and answer nothing.
FLATTERY = [
    "What a great question to ask",
    "You clearly have excellent taste",
    "I can tell you are very thoughtful",
    "Only a smart person would think of this",
]
FILLER = ["I hope this helps.", "Let me know if you have more questions.", "Good luck with it.", "Take care."]
ATTRIBUTES = ("on_topic", "format_ok", "polite")


@dataclass
class SimulatorConfig:
    num_prompts: int = 2000  # groups to generate (train + val, split later by prompt)
    k: int = 3  # responses per prompt (lower bound when k_max is set)
    k_max: int | None = None  # if set, K is drawn uniformly from [k, k_max] per prompt
    comparisons: str = "all"  # all | adjacent | one | ranking (the pairs the PL ranking implies)
    temperature: float = 0.5  # BT temperature of the annotator (lower = less label noise)
    tie_band: float = 0.15  # |perceived gap| below this is reported as a tie
    arithmetic_fraction: float = 0.15  # share of prompts that are sums (on_topic = correct sum)
    weights: tuple[float, float, float] = (1.5, 1.0, 1.0)  # true-reward weights of on_topic, format_ok, polite
    noise: float = 0.2  # std of the unobserved part of the true reward
    hack_rate: float = 0.0  # share of responses that flatter instead of answering; 0 = off (no extra draws)
    hack_strength: float = 1.0  # annotators' bonus per flattering sentence; the true reward gives 0
    seed: int = 0


@dataclass
class SimPrompt:
    """One simulated prompt and what its responses are judged against."""

    text: str
    topic: int  # index into TOPICS (unused for arithmetic)
    fmt: str  # key of FORMATS
    arith: tuple[int, int] | None  # the two addends of an arithmetic prompt

    @property
    def subset(self) -> str:
        return "arithmetic" if self.arith else f"format_{self.fmt}"


@dataclass
class SimResponse:
    """One simulated response: its text, qualities, true reward and what the annotators perceive."""

    text: str
    qualities: tuple[float, float, float]  # on_topic, format_ok, polite
    true_reward: float
    flattery: int  # flattering sentences (the spurious feature); 0 unless the hack is on
    perceived: float  # the annotators' reward: true_reward + hack_strength * flattery


def _render(
    rng: random.Random, topic: int, fmt: str, on_topic: bool, follow: bool, polite: bool, arith, flattery: int = 0
) -> tuple[str, bool]:
    """Build one response; returns (text, format_ok) where format_ok is judged on the final text.
    ``flattery`` > 0: the body is that many flattering sentences instead of an answer."""
    if flattery:
        body = rng.sample(FLATTERY, k=flattery)
    elif arith is not None:
        a, b = arith
        ans = a + b if on_topic else a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        body = [f"The answer is {ans}"]
    else:
        src = topic if on_topic else rng.choice([t for t in range(len(TOPICS)) if t != topic])
        body = rng.sample(TOPICS[src][1], k=rng.randint(1, 3))
    opener = rng.choice(POLITE if polite else RUDE)
    filler = rng.sample(FILLER, k=rng.randint(0, 2))
    if fmt == "list" and follow:
        text = opener + "\n" + "\n".join(f"- {s}." for s in body)
    elif fmt == "one" and follow:
        text = opener + " " + " and ".join(body) + "."
        filler = []  # one sentence means no filler
    else:
        text = opener + " " + " ".join(f"{s}." for s in body)
    if filler:
        text += " " + " ".join(filler)
    if fmt == "tag" and follow:
        text = "Answer: " + text
    ok = {
        "none": True,
        "list": "\n- " in text,
        "tag": text.startswith("Answer:"),
        "one": follow or (len(body) == 1 and not filler),
    }[fmt]
    return text, ok


def draw_prompt(rng: random.Random, cfg: SimulatorConfig) -> SimPrompt:
    """One prompt from the simulator's distribution (a topic question or a sum, with a format request)."""
    fmt = rng.choice(list(FORMATS))
    topic = rng.randrange(len(TOPICS))
    arith = None
    if rng.random() < cfg.arithmetic_fraction:
        arith = (rng.randint(1, 9), rng.randint(1, 9))  # single digits: checkable by a small model
        question = f"What is {arith[0]} plus {arith[1]}"
    else:
        question = TOPICS[topic][0]
    return SimPrompt(question + "?" + FORMATS[fmt], topic, fmt, arith)


def draw_response(rng: random.Random, cfg: SimulatorConfig, prompt: SimPrompt) -> SimResponse:
    """One response to ``prompt`` from the simulator's generator: each quality is a coin flip, and with the
    hack on a share ``hack_rate`` flatters instead of answering (never on topic). ``rmlab.bon`` samples
    best-of-n candidates here."""
    on, follow, pol = (rng.random() < 0.5 for _ in range(3))
    flattery = 0
    if cfg.hack_rate > 0:  # off: no extra draw, so the default data stays byte-identical
        if rng.random() < cfg.hack_rate:
            flattery = rng.randint(1, len(FLATTERY) - 1)
    text, ok = _render(rng, prompt.topic, prompt.fmt, on, follow, pol, prompt.arith, flattery)
    q = (float(on and not flattery), float(ok), float(pol))
    r = sum(w * x for w, x in zip(cfg.weights, q)) + rng.gauss(0.0, cfg.noise)
    return SimResponse(text, q, r, flattery, r + cfg.hack_strength * flattery)


def generate(cfg: SimulatorConfig) -> list[PreferenceGroup]:
    if not 0 <= cfg.hack_rate <= 1:
        raise ValueError(f"simulator.hack_rate must be in [0, 1], got {cfg.hack_rate!r}")
    rng = random.Random(cfg.seed)
    groups = []
    for g in range(cfg.num_prompts):
        k = cfg.k if cfg.k_max is None else rng.randint(cfg.k, cfg.k_max)
        prompt = draw_prompt(rng, cfg)
        drawn = [draw_response(rng, cfg, prompt) for _ in range(k)]
        responses = [d.text for d in drawn]
        attrs = [list(d.qualities) for d in drawn]
        # Every label below comes from the annotators' perception: the true reward plus, with the hack on,
        # their bonus for flattery. ``true_rewards`` keeps the truth.
        rewards = [d.perceived for d in drawn]
        pairs = list(combinations(range(k), 2))
        if cfg.comparisons == "adjacent":
            pairs = [(i, i + 1) for i in range(k - 1)]
        elif cfg.comparisons == "one":
            pairs = [tuple(rng.sample(range(k), 2))]
        elif cfg.comparisons not in ("all", "ranking"):
            raise ValueError(f"simulator.comparisons must be all|adjacent|one|ranking, got {cfg.comparisons!r}")
        # A full ranking drawn from the Plackett-Luce model of the same annotator (Gumbel-max trick).
        noisy = [r / cfg.temperature - math.log(-math.log(max(rng.random(), 1e-12))) for r in rewards]
        order = sorted(range(k), key=lambda i: -noisy[i])
        ranks = [0.0] * k
        for pos, i in enumerate(order):
            ranks[i] = float(pos)
        comps = []
        if cfg.comparisons == "ranking":  # the C(K,2) pairs the ranking implies: the same labels PL sees
            pairs = []
            comps = [Comparison(winner=i, loser=j) for i, j in combinations(order, 2)]
        for i, j in pairs:
            u = rng.random()
            perceived = rewards[i] - rewards[j] + cfg.temperature * math.log(u / (1.0 - u))
            w, lo = (i, j) if perceived > 0 else (j, i)
            a = abs(perceived)
            strength = 0 if a < 0.25 else 1 if a < 0.75 else 2 if a < 1.5 else 3
            comps.append(Comparison(winner=w, loser=lo, strength=strength, tie=a < cfg.tie_band))
        mid = sum(cfg.weights) / 2
        labels = [float(rng.random() < 1 / (1 + math.exp(-(r - mid) / cfg.temperature))) for r in rewards]
        # A noisy 1-5 rating per response (for the ratings path and regression losses).
        lo_r, hi_r = -3 * cfg.noise, sum(cfg.weights) + 3 * cfg.noise
        scores = [
            float(min(5, max(1, round(1 + 4 * (r - lo_r) / (hi_r - lo_r) + rng.gauss(0, 0.3))))) for r in rewards
        ]
        groups.append(
            PreferenceGroup(
                prompt=prompt.text,
                responses=responses,
                comparisons=comps,
                group_id=f"sim-{cfg.seed}-{g}",
                ranks=ranks,
                scores=scores,
                true_rewards=[d.true_reward for d in drawn],
                # The spurious feature, with the hack on (off: no field, so the default data are unchanged).
                spurious=[float(d.flattery) for d in drawn] if cfg.hack_rate > 0 else None,
                attributes=attrs,
                labels=labels,
                subset=prompt.subset,
                source=f"simulator:{g}",
            )
        )
    return groups


def flattery_count(text: str) -> int:
    """The spurious feature of a response: how many of the simulator's flattering sentences it holds."""
    return sum(s in text for s in FLATTERY)


def _pearson(x: list[float], y: list[float]) -> float | None:
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def spurious_feature_report(groups: list[PreferenceGroup]) -> dict:
    """How the spurious feature (flattering sentences) relates to the labels and to the true reward.

    - ``corr_feature_true_reward``: Pearson over responses of the feature and the true reward;
    - ``corr_feature_label``: Pearson over non-tie comparisons (a, b) of f_a - f_b and the label (+1 when a
      won, -1 when b won), with (a, b) in index order so the label is not always +1;
    - ``corr_feature_true_gap``: the same pairs, f_a - f_b against the true-reward gap t_a - t_b;
    - ``feature_wins``: among non-tie comparisons whose sides differ in the feature, the share won by the side
      with more of it (0.5 = the labels ignore it); ``feature_truly_better``: the share where that side has
      the higher true reward.
    """
    feats = [[flattery_count(r) for r in g.responses] for g in groups]
    f_all = [f for fs in feats for f in fs]
    t_all = [t for g in groups for t in (g.true_rewards or [])]
    dx, lab, dt, wins, truly, differ = [], [], [], 0, 0, 0
    for g, fs in zip(groups, feats):
        for c in g.comparisons:
            if c.tie:
                continue
            a, b = sorted((c.winner, c.loser))
            dx.append(float(fs[a] - fs[b]))
            lab.append(1.0 if c.winner == a else -1.0)
            dt.append(g.true_rewards[a] - g.true_rewards[b])
            if fs[a] != fs[b]:
                more = a if fs[a] > fs[b] else b
                other = b if more == a else a
                differ += 1
                wins += c.winner == more
                truly += g.true_rewards[more] > g.true_rewards[other]
    return {
        "feature": "flattering sentences in the response (0-3): the annotators reward each, the true reward does not",
        "responses": len(f_all),
        "share_with_feature": sum(f > 0 for f in f_all) / max(1, len(f_all)),
        "corr_feature_true_reward": _pearson([float(f) for f in f_all], t_all) if len(t_all) == len(f_all) else None,
        "corr_feature_label": _pearson(dx, lab),
        "corr_feature_true_gap": _pearson(dx, dt),
        "comparisons_differing_in_feature": differ,
        "feature_wins": wins / differ if differ else None,
        "feature_truly_better": truly / differ if differ else None,
    }
