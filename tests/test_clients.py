"""The real downstream clients, really run, score an rmlab export exactly as rmlab does (issue 14, item 3).

Per real chat tokenizer (../shared/data/tokenizers), a session fixture trains a tiny causal reward model of that
model family for a few steps through train.py's own path (``rmlab.train.run`` on a config composed from the
command line's overrides: ``model=hf model.config=... data=local data.format=chat``) and exports it. Then each
client reads the export with its own code and must give ``rmlab.score``'s rewards within 1e-4 (fp32):

- transformers: ``AutoModelForSequenceClassification`` on ``apply_chat_template(conv, tokenize=True)``, one by one
  and in a padded batch of 4 (both padding sides), and the ``text-classification`` pipeline;
- TRL: one real ``GRPOTrainer`` step and one ``RLOOTrainer`` step on CPU with a tiny policy on the same
  tokenizer and the export path as ``reward_funcs``; the rewards TRL computed are read back from its completions
  log;
- RewardBench: the package's own ``rewardbench.rewardbench.rewardbench`` (the ``rewardbench`` CLI) on a local
  json of ``{chosen: [messages], rejected: [messages]}``, the same file ``python -m rmlab.score`` scores;
- OpenRLHF: replicated (see ``openrlhf_rewards``), because it does not import on CPU.

Every comparison is also checked to be able to fail: the reward one token earlier (or with Llama 3's extra BOS)
must differ from rmlab's by far more than the tolerance.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, SHARED_DATA, TINY_LLAMA, compose, needs_shared_data

pytestmark = [
    pytest.mark.slow,
    pytest.mark.shared_data,
    needs_shared_data,
    pytest.mark.usefixtures("one_thread"),
]

TOKENIZERS = SHARED_DATA / "tokenizers"
# tokenizer folder -> the transformers model_type of its model family (the reward model and the TRL policy)
FAMILY = {
    "qwen2_5_instruct": "qwen2",
    "llama3_1_instruct": "llama",
    "smollm2_instruct": "llama",
    "phi3_mini_instruct": "phi3",
}
NAMES = list(FAMILY)
TINY = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}  # conftest's tiny shape, in each family
TOL = 1e-4  # fp32 everywhere
SENSITIVE = 1e-3  # a reward read at another token must differ by at least this, or the comparison proves nothing


def user(s: str) -> dict:
    return {"role": "user", "content": s}


def assistant(s: str) -> dict:
    return {"role": "assistant", "content": s}


# Conversations of different lengths (a padded batch of 4 pads three of them), one with a system turn, one
# multi-turn, one with non-ASCII text and newlines inside the answer.
CONVERSATIONS = [
    [user("What is 2 plus 2?"), assistant("4")],
    [{"role": "system", "content": "You are terse."}, user("Name a colour."), assistant("Blue.")],
    [user("hi"), assistant("hello"), user("how are you?"), assistant("Well, thanks — and you? ☀️")],
    [
        user("Write a haiku about rain."),
        assistant("Soft rain on the roof,\nthe gutters hum an old song;\nthe street shines like glass."),
    ],
]
# RewardBench's pairs (it re-labels prompt turns user/assistant alternately, so no system turn here).
PAIRS = [
    {
        "chosen": [user("What is 7 plus 5?"), assistant("7 plus 5 is 12.")],
        "rejected": [user("What is 7 plus 5?"), assistant("no.")],
    },
    {
        "chosen": [user("hi"), assistant("hello"), user("how are you?"), assistant("Well, thank you!")],
        "rejected": [user("hi"), assistant("hello"), user("how are you?"), assistant("bad")],
    },
    {
        "chosen": [user("Name a fruit."), assistant("An apple.")],
        "rejected": [user("Name a fruit."), assistant("I can't say, sorry.")],
    },
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def training_records(n: int = 48) -> list[dict]:
    """Chat pairs with a learnable preference: the right sum, politely, beats a curt refusal."""
    import random

    rng = random.Random(0)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        q = user(f"What is {a} plus {b}?")
        out.append(
            {"chosen": [q, assistant(f"{a} plus {b} is {a + b}. Happy to help!")], "rejected": [q, assistant("no.")]}
        )
    return out


def train_and_export(name: str, reward_token: str, run_dir: Path) -> Path:
    """train.py's path in-process: the overrides a user types, composed by Hydra, run by rmlab.train.run."""
    from rmlab.train import run

    run_dir.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(run_dir / "chat.jsonl", training_records())
    config = "{" + ", ".join(f"{k}: {v}" for k, v in {"model_type": FAMILY[name], **TINY}.items()) + "}"
    overrides = [
        "model=hf",
        f"model.config={config}",
        f"model.tokenizer={TOKENIZERS / name}",
        "data=local",
        f"data.source={data}",
        "data.format=chat",
        f"data.reward_token={reward_token}",
        "data.val_fraction=0.25",
        "data.cache=false",
        "module.lr=3e-3",
        "trainer.max_steps=4",
        "trainer.max_epochs=4",
        "threads=1",
        "seed=0",
    ]
    summary = run(compose(overrides, run_dir))
    assert summary["train_steps"] == 4, summary
    export = run_dir / "export"
    assert (export / "config.json").is_file(), f"no export in {run_dir}"
    return export


@pytest.fixture(scope="session")
def export_of(tmp_path_factory):
    """export_of(tokenizer name, reward_token="auto") -> the export dir of a tiny model trained a few steps on
    chat data with that tokenizer (trained once per session)."""
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, reward_token: str = "auto") -> Path:
        if (name, reward_token) not in cache:
            n = torch.get_num_threads()
            try:
                cache[name, reward_token] = train_and_export(
                    name, reward_token, tmp_path_factory.mktemp(f"{name}_{reward_token}")
                )
            finally:
                torch.set_num_threads(n)  # train.py's threads=1 sets the process's threads
        return cache[name, reward_token]

    return get


# --- rmlab's own rewards --------------------------------------------------------------------------------------


def rmlab_score_cli(export: Path, records: list[dict], tmp: Path, *flags: str) -> list[dict]:
    """``python -m rmlab.score in.jsonl --model <export>`` (its main(), in-process): the scored records."""
    from rmlab.score import main

    src = write_jsonl(tmp / "rmlab_in.jsonl", records)
    dst = tmp / "rmlab_out.jsonl"
    main([str(src), "--model", str(export), "-o", str(dst), "--threads", "1", "--no-progress", *flags])
    return [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]


def rmlab_scorer(export: Path):
    """The Python API as docs/eval.md writes it: ``Scorer(load_export(path), reward_token=<the export's>)``."""
    from rmlab.models import load_export, read_export_meta
    from rmlab.score import Scorer

    return Scorer(load_export(str(export)), reward_token=read_export_meta(str(export))["scoring"]["reward_token"])


def rmlab_rewards(export: Path, convs: list[list[dict]]) -> list[float]:
    """``Scorer(model).score_chat``, one reward per conversation (each its own item); the CLI must agree."""
    return [r[0] for r in rmlab_scorer(export).score_chat([[c] for c in convs])]


def assert_close(theirs, ours, what: str) -> None:
    theirs, ours = torch.tensor(theirs, dtype=torch.float64), torch.tensor(ours, dtype=torch.float64)
    assert theirs.shape == ours.shape, what
    diff = (theirs - ours).abs().max().item()
    assert diff <= TOL, (
        f"{what}: max |client - rmlab| = {diff:.3g} > {TOL} (client {theirs.tolist()}, rmlab {ours.tolist()})"
    )


def template_ids(tok, conv) -> list[int]:
    return tok.apply_chat_template(conv, tokenize=True, return_dict=False)


def docs_block(heading: str, n: int = 0) -> str:
    """The n-th ```python block under ``heading`` of docs/eval.md (before the next heading of its level)."""
    text = (ROOT / "docs" / "eval.md").read_text(encoding="utf-8")
    assert heading in text, f"docs/eval.md has no {heading!r}"
    level = heading.split(" ")[0]
    section = text.split(heading + "\n", 1)[1].split("\n" + level + " ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) > n, f"docs/eval.md {heading!r} has {len(blocks)} python blocks"
    return blocks[n]


# --- the export itself ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_export_carries_what_the_clients_read(name, export_of, tmp_path):
    """num_labels=1, pad != eos, the chat template with the tokenizer, OpenRLHF's mean/std, and rmlab.score's
    three chat record shapes give the Python API's rewards."""
    from transformers import AutoConfig, AutoTokenizer

    export = export_of(name)
    cfg = AutoConfig.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    original = AutoTokenizer.from_pretrained(TOKENIZERS / name)
    assert cfg.num_labels == 1
    assert cfg.pad_token_id == tok.pad_token_id != tok.eos_token_id
    assert tok.chat_template == original.chat_template
    assert cfg.mean == pytest.approx(cfg.rmlab["reward_mean"]) and cfg.std == pytest.approx(cfg.rmlab["reward_std"])
    assert cfg.std > 0

    ours = rmlab_rewards(export, CONVERSATIONS)
    assert max(ours) - min(ours) > SENSITIVE, f"rewards nearly constant {ours}: the comparisons would prove nothing"
    whole = rmlab_score_cli(export, [{"messages": c} for c in CONVERSATIONS], tmp_path)
    assert_close([r["reward"] for r in whole], ours, "rmlab.score {messages}")
    trl_style = rmlab_score_cli(export, [{"prompt": c[:-1], "completion": c[-1:]} for c in CONVERSATIONS], tmp_path)
    assert_close([r["reward"] for r in trl_style], ours, "rmlab.score {prompt, completion}")
    pairs = rmlab_score_cli(export, PAIRS, tmp_path)
    both = rmlab_scorer(export).score_chat([[p["chosen"], p["rejected"]] for p in PAIRS])
    assert_close([[r["reward_chosen"], r["reward_rejected"]] for r in pairs], both, "rmlab.score {chosen, rejected}")
    assert_close(both, [rmlab_rewards(export, [p["chosen"], p["rejected"]]) for p in PAIRS], "score_chat's nesting")


# --- transformers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_transformers_sequence_classification_on_the_chat_template(name, export_of):
    """The snippet of docs/eval.md: AutoModelForSequenceClassification on apply_chat_template(tokenize=True),
    batch 1 and a padded batch of 4 on both padding sides."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    export = export_of(name)
    ours = rmlab_rewards(export, CONVERSATIONS)
    tok = AutoTokenizer.from_pretrained(export)
    rm = AutoModelForSequenceClassification.from_pretrained(export, dtype=torch.float32).eval()

    with torch.no_grad():
        one = [rm(torch.tensor([template_ids(tok, c)])).logits[0, 0].item() for c in CONVERSATIONS]
    assert_close(one, ours, f"{name}: transformers, batch 1")
    for side in ("right", "left"):
        tok.padding_side = side
        enc = tok.apply_chat_template(CONVERSATIONS, tokenize=True, padding=True, return_tensors="pt", return_dict=True)
        assert (enc["attention_mask"] == 0).any(), "the batch of 4 must need padding"
        with torch.no_grad():
            four = rm(**enc).logits[:, 0].tolist()
        assert_close(four, ours, f"{name}: transformers, batch 4, {side} padding")

    # The comparison can fail: the same model read one token earlier gives another reward.
    with torch.no_grad():
        early = [rm(torch.tensor([template_ids(tok, c)[:-1]])).logits[0, 0].item() for c in CONVERSATIONS]
    assert min(abs(a - b) for a, b in zip(early, ours)) > SENSITIVE, (early, ours)


@pytest.mark.parametrize("name", NAMES)
def test_text_classification_pipeline(name, export_of):
    """pipeline("text-classification", function_to_apply="none") on the templated text is exact with
    add_special_tokens=False (the template already holds its special tokens). Its default adds the tokenizer's
    BOS again where the tokenizer adds one (Llama 3.1): two BOS, another reward."""
    from transformers import AutoTokenizer, pipeline

    export = export_of(name)
    ours = rmlab_rewards(export, CONVERSATIONS)
    tok = AutoTokenizer.from_pretrained(export)
    texts = [tok.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]
    pipe = pipeline("text-classification", model=str(export), function_to_apply="none")

    one = [pipe(t, add_special_tokens=False)[0]["score"] for t in texts]
    assert_close(one, ours, f"{name}: pipeline, batch 1")
    for side in ("right", "left"):
        pipe.tokenizer.padding_side = side
        four = [r["score"] for r in pipe(texts, batch_size=4, add_special_tokens=False)]
        assert_close(four, ours, f"{name}: pipeline, batch 4, {side} padding")

    default = [pipe(t)[0]["score"] for t in texts]
    adds_bos = any(tok(t)["input_ids"] != template_ids(tok, c) for t, c in zip(texts, CONVERSATIONS))
    assert adds_bos == (name == "llama3_1_instruct")  # of the four, only Llama 3.1's tokenizer adds its BOS
    if adds_bos:
        assert tok(texts[0])["input_ids"][:2] == [tok.bos_token_id] * 2  # the template's BOS and the tokenizer's
        assert min(abs(a - b) for a, b in zip(default, ours)) > SENSITIVE, (default, ours)
    else:
        assert_close(default, ours, f"{name}: pipeline, default tokenizer kwargs")


def run_docs_snippets(export: Path, prompt: str, response: str, conversations: list | None = None) -> dict:
    """docs/eval.md's "Plain transformers" snippets, executed as printed: the export's path for the placeholder,
    ``prompt``, ``response`` (and ``conversations`` for the pipeline) as the reader's own variables."""
    placeholder = '"outputs/train/runs/<run>/export"'
    first = docs_block("### Plain transformers", 0)
    assert placeholder in first, "docs/eval.md changed"
    ns = {"prompt": prompt, "response": response, "conversations": conversations}
    exec(first.replace(placeholder, repr(str(export))), ns)
    if conversations is not None:
        exec(docs_block("### Plain transformers", 1), ns)
    return ns


@pytest.mark.parametrize("name", NAMES)
def test_the_docs_transformers_snippets_verbatim_on_chat_exports(name, export_of):
    """The snippet a reader copies (its chat branch on a chat-trained export) and the pipeline snippet give
    rmlab.score's reward and normalized reward."""
    from transformers import AutoConfig

    export = export_of(name)
    conv = CONVERSATIONS[0]
    ns = run_docs_snippets(export, conv[0]["content"], conv[1]["content"], CONVERSATIONS)
    cfg = AutoConfig.from_pretrained(export)
    assert_close([ns["reward"]], rmlab_rewards(export, [conv]), f"{name}: docs snippet, chat branch")
    assert_close([ns["normalized"]], [(ns["reward"] - cfg.mean) / cfg.std], f"{name}: docs snippet, normalized")
    assert_close(ns["rewards"], rmlab_rewards(export, CONVERSATIONS), f"{name}: docs pipeline snippet")


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=minilm", "trainer.max_steps=2"],
        # Qwen2.5's tokenizer adds no eos of its own (ByT5's would, and hide a missing "+ eos")
        ["debug=fast", "export=true", f"model.tokenizer={TOKENIZERS / 'qwen2_5_instruct'}"],
    ],
    ids=["encoder", "causal_plain_text"],
)
def test_the_docs_transformers_snippet_verbatim_on_plain_text_exports(overrides, tmp_path):
    """Its other two branches, on exports ``train.py`` makes from the simulator's plain text: an encoder (MiniLM,
    [CLS] prompt [SEP] response [SEP]) and a causal LM (tokenizer(prompt + response) + eos): rmlab.score's reward."""
    from rmlab.train import run

    run(compose([*overrides, "data.simulator.num_prompts=40", "threads=1", "seed=0"], tmp_path))
    export = tmp_path / "export"
    prompt, response = "Explain why the sky is blue.", "Sunlight scatters off air molecules; blue scatters most."
    ns = run_docs_snippets(export, prompt, response)
    ours = rmlab_score_cli(export, [{"prompt": prompt, "response": response}], tmp_path)[0]["reward"]
    assert_close([ns["reward"]], [ours], f"docs snippet, {overrides[0]}")
    other = rmlab_score_cli(export, [{"prompt": prompt, "response": response + " Indeed."}], tmp_path)[0]["reward"]
    assert abs(other - ours) > 1e-6, "the export scores every text alike: the comparison proves nothing"


# --- TRL ------------------------------------------------------------------------------------------------------


def tiny_policy(name: str, tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        FAMILY[name],
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def rmlab_reward_function(export_dir: str, device: str = "cpu"):
    """docs/eval.md's TRL reward function, its text executed as the docs print it (only ``device="cuda"`` becomes
    this machine's): rmlab's own scoring of conversational completions, normalized with the export's val
    statistics. The docs' trainer call that follows it must pass the export's path and this function."""
    code, trainer = docs_block("### TRL (GRPO, RLOO; PPO)", 1).split("\ntrainer = ")
    assert 'device="cuda"' in code and "reward_funcs=[export_dir, rmlab_reward]" in trainer, "docs/eval.md changed"
    ns = {"export_dir": export_dir}
    exec(code.replace('device="cuda"', f"device={device!r}"), ns)
    return ns["rmlab_reward"]


def trl_step(export: Path, name: str, out: Path, algo: str = "grpo"):
    """One real GRPOTrainer (or RLOOTrainer) step on CPU with a tiny policy on the same tokenizer and two reward
    functions, as docs/eval.md shows them: the export's path (TRL loads it with
    AutoModelForSequenceClassification and scores the chat template's text) and rmlab's own scoring as a function.
    ``log_completions`` makes TRL write every completion and each reward it computed for it to
    ``<output_dir>/completions/completions_00001.parquet``; returns that table."""
    import pandas as pd
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer

    Config, Trainer = {"grpo": (trl.GRPOConfig, trl.GRPOTrainer), "rloo": (trl.RLOOConfig, trl.RLOOTrainer)}[algo]

    tok = AutoTokenizer.from_pretrained(TOKENIZERS / name)
    prompts = [
        [user("What is 3 plus 4?")],
        [{"role": "system", "content": "Answer briefly."}, user("hi"), assistant("hello"), user("What is 10 plus 20?")],
    ]
    args = Config(
        output_dir=str(out),
        per_device_train_batch_size=8,  # both prompts, 4 completions each
        num_generations=4,
        max_completion_length=8,
        max_steps=1,
        use_cpu=True,
        bf16=False,
        report_to=[],
        log_completions=True,
        logging_steps=1,
        save_strategy="no",
        seed=0,
    )
    policy = out / "policy"  # a path, as users pass it: RLOO (beta > 0) loads its reference model from it
    tiny_policy(name, tok).save_pretrained(policy)
    tok.save_pretrained(policy)
    trainer = Trainer(
        model=str(policy),
        processing_class=tok,
        reward_funcs=[str(export), rmlab_reward_function(str(export))],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
    )
    trainer.train()
    if algo == "rloo":  # RLOOTrainer 1.16 logs the same table but writes no parquet: read what it logged
        logs = trainer._logs
        assert logs["prompt"], "RLOOTrainer logged no completions (log_completions=True)"
        return pd.DataFrame({"prompt": logs["prompt"], "completion": logs["completion"], **logs["rewards"]})
    tables = sorted((out / "completions").glob("*.parquet"))
    assert tables, f"TRL wrote no completions table under {out}"
    return pd.concat([pd.read_parquet(t) for t in tables], ignore_index=True)


def messages(column) -> list[dict]:
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in column]


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
@pytest.mark.parametrize("name", NAMES)
def test_trl_rewards_equal_rmlab_score(name, algo, export_of, tmp_path):
    """The rewards TRL computed in a GRPO (and an RLOO) step, with the export's path as reward_funcs, equal
    rmlab.score's (CLI and Python) for the same conversations; the rmlab reward function gives the normalized
    ones."""
    from transformers import AutoConfig

    export = export_of(name)
    table = trl_step(export, name, tmp_path / algo, algo)
    assert len(table) == 8 and {export.name, "rmlab_reward"} <= set(table.columns), table.columns
    prompts, completions = [messages(p) for p in table["prompt"]], [messages(c) for c in table["completion"]]
    assert len({json.dumps(p) for p in prompts}) == 2  # both prompts, the multi-turn one with its system turn
    trl_rewards = table[export.name].tolist()
    assert max(trl_rewards) - min(trl_rewards) > SENSITIVE, f"TRL's rewards nearly constant: {trl_rewards}"

    convs = [p + c for p, c in zip(prompts, completions)]
    assert_close(trl_rewards, rmlab_rewards(export, convs), f"{name}: TRL {algo} vs Scorer.score_chat")
    scored = rmlab_score_cli(export, [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)], tmp_path)
    assert_close(trl_rewards, [r["reward"] for r in scored], f"{name}: TRL {algo} vs python -m rmlab.score")
    cfg = AutoConfig.from_pretrained(export)
    normalized = [(r - cfg.mean) / cfg.std for r in trl_rewards]
    assert_close(table["rmlab_reward"].tolist(), normalized, f"{name}: the rmlab reward function in TRL")


# --- RewardBench ----------------------------------------------------------------------------------------------

# rewardbench 0.1.4 (the newest on PyPI) pins transformers 4.51; under transformers 5 and TRL 1 three of its
# custom-architecture modules fail at import (beaver, qrm: transformers' removed docstring constants; skyvl:
# TRL's removed AutoModelForCausalLMWithValueHead), and its CLI module imports pkg_resources (gone from
# setuptools >= 81) for the hub upload only. None of them is on the path of a sequence-classification model
# (REWARD_MODEL_CONFIG["default"], asserted below), so they are stood in for by placeholders that refuse to be used.
BROKEN_RB_MODULES = {
    "beaver": ["BeaverCostPipeline", "BeaverPipeline", "LlamaForScore"],
    "qrm": ["LlamaForRewardModelWithGating3", "LlamaForRewardModelWithGating31"],
    "skyvl": ["SkyVLPipeline"],
}


def import_rewardbench():
    """``rewardbench.rewardbench`` (the module of the ``rewardbench`` CLI), importable on transformers 5."""
    if "rewardbench.rewardbench" in sys.modules:
        return sys.modules["rewardbench.rewardbench"]
    try:
        import fastchat.conversation  # noqa: F401  rewardbench's own dependency (pure Python)
    except ImportError:
        pytest.fail("RewardBench needs: pip install --no-deps rewardbench==0.1.4 fschat==0.2.36")

    def placeholder(cls: str):
        def refuse(*_a, **_k):
            raise ImportError(f"rewardbench's {cls} does not import under transformers 5 (not used by rmlab's tests)")

        return type(cls, (), {"__init__": refuse, "from_pretrained": staticmethod(refuse)})

    for module, classes in BROKEN_RB_MODULES.items():
        stand_in = types.ModuleType(f"rewardbench.models.{module}")
        for cls in classes:
            setattr(stand_in, cls, placeholder(cls))
        sys.modules.setdefault(stand_in.__name__, stand_in)
    stub = None
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        stub = sys.modules["pkg_resources"] = types.ModuleType("pkg_resources")
        stub.working_set = []  # read only when pushing results to the hub
    try:
        import rewardbench.rewardbench as rb
    except ImportError as e:
        pytest.fail(f"rewardbench does not import ({e}); pip install --no-deps rewardbench==0.1.4 fschat==0.2.36")
    finally:
        if stub is not None:
            del sys.modules["pkg_resources"]
    return rb


@contextlib.contextmanager
def rewardbench_on_cpu(monkeypatch):
    """RewardBench's CLI on a CPU machine, unchanged in what it computes. RewardBenchPipeline moves its inputs with ``.to("cuda")`` unconditionally: on a machine without CUDA they
    stay on the CPU, with the model. And RewardBench turns transformers' logging to INFO: restored after."""
    import datasets
    import transformers
    from transformers import BatchEncoding

    to = BatchEncoding.to

    def to_cpu_without_cuda(self, device, *a, **k):
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"
        return to(self, device, *a, **k)

    monkeypatch.setattr(BatchEncoding, "to", to_cpu_without_cuda)
    # Its dataset maps ask for num_proc=8: worker processes that only parallelise (same rows), and cost ~20 s
    # of start-up on 2 shared cores for 3 records. They run in this process instead.
    map_ = datasets.Dataset.map
    monkeypatch.setattr(datasets.Dataset, "map", lambda self, *a, num_proc=None, **k: map_(self, *a, **k))
    level = transformers.logging.get_verbosity()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        transformers.logging.reset_format()


@pytest.mark.parametrize("name", NAMES)
def test_rewardbench_scores_equal_rmlab_score(name, export_of, tmp_path, monkeypatch):
    """``rewardbench --model <export> --dataset pairs.json --load_json --not_quantized --torch_dtype float32``:
    its chat formatting (prepare_dialogue_from_tokenizer: apply_chat_template(tokenize=False)), its model loading
    (AutoModelForSequenceClassification), its pipeline (tokenizer with special tokens, left padding, the
    double-BOS fix) give rmlab.score's rewards on the same file."""
    import datasets
    from transformers import AutoModelForSequenceClassification

    rb = import_rewardbench()
    from rewardbench.models import REWARD_MODEL_CONFIG, RewardBenchPipeline

    default = REWARD_MODEL_CONFIG["default"]  # the path a plain sequence classifier takes: no placeholder on it
    assert default["model_builder"] == AutoModelForSequenceClassification.from_pretrained
    assert default["pipeline_builder"] is RewardBenchPipeline

    export = export_of(name)
    pairs = write_jsonl(tmp_path / "pairs.json", PAIRS)
    monkeypatch.chdir(tmp_path)  # RewardBench writes results/<model>.json under the working directory
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    args = rb.Args(
        model=str(export),
        dataset=str(pairs),
        load_json=True,
        not_quantized=True,
        torch_dtype="float32",
        batch_size=2,
        output_dir=str(tmp_path / "results") + "/",
    )
    with rewardbench_on_cpu(monkeypatch):
        rb.rewardbench(args)
    out = Path(f"{export}_outputs.jsonl")  # os.path.join(output_dir, f"{model}_outputs.jsonl"), model absolute
    theirs = [json.loads(line) for line in out.read_text().splitlines()]
    out.unlink()
    assert len(theirs) == len(PAIRS)

    ours = rmlab_score_cli(export, PAIRS, tmp_path)  # the very records RewardBench read
    assert_close(
        [[r["scores_chosen"], r["scores_rejected"]] for r in theirs],
        [[r["reward_chosen"], r["reward_rejected"]] for r in ours],
        f"{name}: RewardBench vs python -m rmlab.score",
    )
    # RewardBench scored the text rmlab scores: its chat formatting is the template's text.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export)
    assert [r["text_chosen"] for r in theirs] == [tok.apply_chat_template(p["chosen"], tokenize=False) for p in PAIRS]


# --- OpenRLHF (replicated) ------------------------------------------------------------------------------------


def openrlhf_tokens(tok, conv) -> list[int]:
    """OpenRLHF 0.11.2's reward-model row (openrlhf/datasets/reward_dataset.py, RewardDataset.__getitem__): the
    templated text, trailing "\\n" stripped, `" " + eos_token` appended unless it already ends with eos,
    tokenized without special tokens, and the last id forced to eos. In PPO the row is the prompt's ids plus
    the generated ids up to and including the eos the policy stopped at, the same ids for these templates."""
    text = tok.apply_chat_template(conv, tokenize=False).rstrip("\n")
    if not text.endswith(tok.eos_token):
        text += " " + tok.eos_token
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids[-1] = tok.eos_token_id
    return ids


def openrlhf_rewards(export: Path, rows: list[list[int]], side: str, normalize: bool) -> list[float]:
    """OpenRLHF's reward model, replicated from openrlhf/models/model.py (0.11.2, ``_get_reward_model``), because
    OpenRLHF does not import on CPU (model.py imports deepspeed, and its ring_attn_utils flash_attn, both CUDA
    builds). What it does, step by step: load ``AutoModel`` of the config's class (the base model, under
    ``base_model_prefix``) and a bias-free ``nn.Linear(hidden, 1)`` named by ``value_head_prefix`` (default
    "score", or the config's ``value_head_prefix``); position ids = cumsum(attention_mask) - 1; the reward is the
    value at ``eos_indices = T - 1 - fliplr(mask).argmax()``, the last attended token; with --normalize_reward
    (eval mode) ``(reward - config.mean) / config.std``."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(export)
    head = getattr(config, "value_head_prefix", "score")
    base = AutoModel.from_pretrained(export, dtype=torch.float32).eval()
    weights = load_file(str(export / "model.safetensors"))
    value_head = torch.nn.Linear(config.hidden_size, 1, bias=False)
    value_head.weight.data.copy_(weights[f"{head}.weight"])
    n = max(map(len, rows))
    pad = config.pad_token_id
    ids = torch.tensor([[pad] * (n - len(r)) + r if side == "left" else r + [pad] * (n - len(r)) for r in rows])
    mask = torch.tensor(
        [[0] * (n - len(r)) + [1] * len(r) if side == "left" else [1] * len(r) + [0] * (n - len(r)) for r in rows]
    )
    eos_indices = mask.size(1) - 1 - mask.long().fliplr().argmax(dim=1, keepdim=True)
    position_ids = mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(mask == 0, 1)
    with torch.no_grad():
        hidden = base(ids, attention_mask=mask, position_ids=position_ids)["last_hidden_state"]
        reward = value_head(hidden).squeeze(-1).gather(dim=1, index=eos_indices).squeeze(1)
    if normalize:
        reward = (reward - config.mean) / config.std
    return reward.tolist()


@pytest.mark.parametrize("name", NAMES)
def test_openrlhf_replicated_reads_rmlabs_rewards_under_reward_token_eos(name, export_of, tmp_path):
    """Trained with data.reward_token=eos (OpenRLHF's convention), the export gives OpenRLHF's pooling rmlab's
    rewards, raw and --normalize_reward (config.mean/std = rmlab.score --normalize)."""
    from transformers import AutoTokenizer

    export = export_of(name, "eos")
    tok = AutoTokenizer.from_pretrained(export)
    rows = [openrlhf_tokens(tok, c) for c in CONVERSATIONS]
    assert all(r[-1] == tok.eos_token_id for r in rows)
    records = [{"messages": c} for c in CONVERSATIONS]
    raw = [r["reward"] for r in rmlab_score_cli(export, records, tmp_path)]
    normalized = [r["reward"] for r in rmlab_score_cli(export, records, tmp_path, "--normalize")]
    for side in ("right", "left"):
        assert_close(openrlhf_rewards(export, rows, side, False), raw, f"{name}: OpenRLHF (replicated), {side}")
        assert_close(openrlhf_rewards(export, rows, side, True), normalized, f"{name}: OpenRLHF normalized, {side}")


@pytest.mark.parametrize("name", NAMES)
def test_openrlhf_reads_another_token_than_the_default_contract_where_the_template_ends_after_eos(name, export_of):
    """Why data.reward_token=eos exists: under the default contract the reward is read at the template's last
    token, which is OpenRLHF's eos only where the template ends with it (Llama 3.1, Phi-3); Qwen2.5 and SmolLM2
    end a turn with "<|im_end|>\\n", and OpenRLHF reads at <|im_end|>."""
    from transformers import AutoTokenizer

    export = export_of(name)
    tok = AutoTokenizer.from_pretrained(export)
    ours = rmlab_rewards(export, CONVERSATIONS)
    theirs = openrlhf_rewards(export, [openrlhf_tokens(tok, c) for c in CONVERSATIONS], "right", False)
    ends_with_eos = all(template_ids(tok, c)[-1] == tok.eos_token_id for c in CONVERSATIONS)
    assert ends_with_eos == (name in ("llama3_1_instruct", "phi3_mini_instruct"))
    if ends_with_eos:
        assert_close(theirs, ours, f"{name}: OpenRLHF on an export trained with reward_token=auto")
    else:
        assert min(abs(a - b) for a, b in zip(theirs, ours)) > SENSITIVE, (theirs, ours)


def test_python_scorer_follows_the_exports_reward_token_by_default(export_of, tmp_path):
    """An export trained with data.reward_token=eos, scored through the Python API without naming it, must read
    the rows it was trained on, as the CLI does (on Qwen2.5 the rows differ: the trailing "\\n" is stripped)."""
    from rmlab.models import load_export
    from rmlab.score import Scorer

    export = export_of("qwen2_5_instruct", "eos")
    cli = [r["reward"] for r in rmlab_score_cli(export, [{"messages": c} for c in CONVERSATIONS], tmp_path)]
    default = [r[0] for r in Scorer(load_export(str(export))).score_chat([[c] for c in CONVERSATIONS])]
    assert_close(default, cli, "Scorer(load_export(eos export)) vs python -m rmlab.score")
