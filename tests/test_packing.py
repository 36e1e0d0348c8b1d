"""Packing and prefix sharing give the rewards (and gradients) of plain padded forwards."""

from __future__ import annotations

import pytest
import torch

from rmlab.data.collate import collate
from rmlab.data.simulator import SimulatorConfig, generate
from rmlab.data.tokenize import tokenize_groups
from rmlab.data.types import DataReport
from rmlab.models import build_model
from rmlab.models.packing import pack_batch, pack_segments, plan_rows, resolve_forward_mode, unique_tokens
from tests.conftest import TINY_LLAMA

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forwards (tests/conftest.py)


def _groups(tok, k: int, n: int = 3, seed: int = 5):
    gs = generate(SimulatorConfig(num_prompts=n, k=k, seed=seed))
    return tokenize_groups(gs, tok, DataReport(), max_length=256, min_prompt_tokens=8)


def _scores(model, batch, mode: str, row_tokens: int | None = None) -> torch.Tensor:
    model.forward_mode, model.row_tokens = mode, row_tokens
    try:
        return model.score_batch(batch)
    finally:
        model.forward_mode, model.row_tokens = "padded", None


def _singles(model, groups) -> torch.Tensor:
    """One unpadded forward per response: the ground truth every layout must match."""
    out = []
    with torch.no_grad():
        for g in groups:
            for r in g.response_ids:
                ids = torch.tensor([g.prompt_ids + r])
                out.append(model(ids, torch.ones_like(ids)))
    return torch.cat(out)


def _eager_flex_attention(query, key, value, training=False, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(query, key, value, **kwargs)


@pytest.fixture(scope="module", params=["segments", "mask", pytest.param("flex_attention", marks=pytest.mark.slow)])
def llama(request):
    """The CPU attention paths: SDPA by segments (what build_model picks), one 4D boolean mask, and
    flex attention with rmlab's BlockMask (the opt-in GPU path).

    flex_attention runs uncompiled here: transformers compiles it, and on CPU with torch 2.13 the
    inductor C++ kernel fails to build when a new batch shape triggers the dynamic-shape recompile
    (a CppCompileError in the generated flex template), while one compile per static shape takes
    tens of seconds on 2 cores. The eager kernel checks the mask rule itself, which is rmlab's part.
    """
    torch.manual_seed(0)
    attn = "flex_attention" if request.param == "flex_attention" else "sdpa"
    model = build_model(
        config=TINY_LLAMA, tokenizer="byt5", forward_mode="prefix_shared", attn_implementation=attn
    ).eval()
    if request.param == "mask":
        model.config._attn_implementation = "sdpa"
    with pytest.MonkeyPatch.context() as mp:
        if attn == "flex_attention":
            import transformers.integrations.flex_attention as hf_flex

            assert model.config._attn_implementation == "flex_attention"  # not switched to attention by segments
            mp.setattr(hf_flex, "compile_friendly_flex_attention", _eager_flex_attention)
        yield model


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("k", [2, 5])
@pytest.mark.parametrize("mode", ["packed", "prefix_shared"])
def test_rewards_equal_separate_forwards(llama, side, k, mode):
    tiny_llama = llama
    groups = _groups(tiny_llama.tokenizer, k)
    batch = collate(groups, tiny_llama.tokenizer.pad_token_id, side)
    with torch.no_grad():
        padded = _scores(tiny_llama, batch, "padded")
        got = _scores(tiny_llama, batch, mode)
        several_per_row = _scores(tiny_llama, batch, mode, row_tokens=4096)  # all segments in one row
        split_groups = _scores(tiny_llama, batch, mode, row_tokens=1)  # every response its own prompt copy
    single = _singles(tiny_llama, groups)
    assert got.shape == single.shape == (sum(g.k for g in groups),)
    torch.testing.assert_close(padded, single, atol=1e-4, rtol=0)
    torch.testing.assert_close(got, single, atol=1e-4, rtol=0)
    torch.testing.assert_close(several_per_row, single, atol=1e-4, rtol=0)
    torch.testing.assert_close(split_groups, single, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["packed", "prefix_shared"])
def test_gradients_equal_padded(mode):
    torch.manual_seed(1)
    model = build_model(config=TINY_LLAMA, tokenizer="byt5", forward_mode=mode)
    assert model.config._attn_implementation == "rmlab_packed"
    groups = _groups(model.tokenizer, 3, n=2)
    batch = collate(groups, model.tokenizer.pad_token_id, "left")
    w = torch.randn(batch.input_ids.shape[0])

    def grads(m: str) -> dict[str, torch.Tensor]:
        model.zero_grad()
        (w * _scores(model, batch, m)).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref, got = grads("padded"), grads(mode)
    assert ref.keys() == got.keys() and len(ref) > 5
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-4, rtol=1e-3, msg=name)


def test_eager_attention_takes_the_float_mask():
    torch.manual_seed(2)
    model = build_model(config=TINY_LLAMA, tokenizer="byt5", attn_implementation="eager").eval()
    groups = _groups(model.tokenizer, 4, n=2)
    batch = collate(groups, model.tokenizer.pad_token_id, "right")
    with torch.no_grad():
        torch.testing.assert_close(_scores(model, batch, "prefix_shared"), _singles(model, groups), atol=1e-4, rtol=0)


def test_prefix_shared_layout_and_accounting():
    # Two groups: prompts of 3 and 2 tokens, responses of 2+1 and 2+2 tokens.
    segs = [([1, 2, 3], [[4, 5], [6]]), ([7, 8], [[9, 10], [11, 12]])]
    p = pack_segments(segs, pad_id=0)
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]  # one segment per row
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 3, 2, 3]]  # responses restart at prompt_len
    flat = p.input_ids.reshape(-1)[p.read_index].tolist()
    assert flat == [5, 6, 10, 12]  # the last token of each response, in group order
    m = p.attention_mask()[0, 0]
    assert m[5].tolist() == [True, True, True, False, False, True]  # resp 2 sees the prompt and itself only
    assert p.processed_tokens == 12 and p.real_tokens == 12
    wide = pack_segments(segs, pad_id=0, row_tokens=12)
    assert wide.input_ids.shape == (1, 12) and wide.real_tokens == 12
    assert wide.attention_mask()[0, 0, 8, :6].sum() == 0  # group 2 never sees group 1


def test_pack_batch_counts_unique_tokens_once():
    tok = build_model(config=TINY_LLAMA, tokenizer="byt5").tokenizer
    groups = _groups(tok, 3, n=4)
    batch = collate(groups, tok.pad_token_id, "right")
    expected = sum(len(g.prompt_ids) + sum(len(r) for r in g.response_ids) for g in groups)
    assert unique_tokens(batch) == expected
    shared = pack_batch(batch, "prefix_shared", tok.pad_token_id, row_tokens=10_000)
    assert shared.real_tokens == expected == shared.processed_tokens  # one row, no padding at all
    packed = pack_batch(batch, "packed", tok.pad_token_id, row_tokens=10_000)
    assert packed.real_tokens == int(batch.attention_mask.sum())  # every row's prompt, no padding


def test_plan_rows_first_fit_decreasing():
    rows = plan_rows([5, 3, 4, 2, 1], capacity=6)
    assert rows == [[0, 4], [2, 3], [1]]  # 5+1, 4+2, 3
    assert plan_rows([9, 2], capacity=6) == [[0], [1]]  # a segment wider than the capacity gets its own row


def test_encoders_and_flash_fall_back():
    bert = build_model(
        config=dict(
            model_type="bert",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=128,
        ),
        tokenizer="byt5",
        forward_mode="prefix_shared",
    )
    assert bert.forward_mode == "padded"  # bidirectional: a shared prompt would see its responses
    llama = build_model(config=TINY_LLAMA, tokenizer="byt5", forward_mode="auto")
    assert llama.forward_mode == "auto" and llama.batch_layout.mode == "auto"  # chosen per batch by the collator
    eager = build_model(config=TINY_LLAMA, tokenizer="byt5", forward_mode="auto", attn_implementation="eager")
    assert eager.forward_mode == "prefix_shared" and eager.batch_layout is None  # no collator layout to choose from
    llama.config._attn_implementation = "flash_attention_2"
    assert resolve_forward_mode(llama, "prefix_shared") == "packed"
    with pytest.raises(ValueError, match="forward_mode"):
        resolve_forward_mode(llama, "sideways")


@pytest.mark.parametrize(
    "kernel,call_pairs",
    [("sdpa", 0), ("sdpa", 10**9), ("varlen", None), ("flex", None)],
    ids=["sdpa-one-call-per-shape", "sdpa-one-call", "varlen-reference", "flex-eager"],
)
@pytest.mark.parametrize("mode", ["packed", "prefix_shared", "auto"])
def test_every_kernel_equals_padded(kernel, call_pairs, mode):
    """Each attention path of the collated layout gives the padded forward's rewards in fp32 on CPU:
    SDPA in padded buckets (call_pairs 0: a call per sequence shape; 10**9: one call for everything),
    the varlen layout (gathered prompt keys, bottom-right causal) through the reference kernel that
    stands in for flash-attn / torch's varlen_attn on CPU, and FlexAttention's BlockMask (eager: CPU)."""
    from rmlab.data.layout import LayoutSpec

    torch.manual_seed(3)
    model = build_model(config=TINY_LLAMA, tokenizer="byt5", forward_mode=mode, attention=kernel).eval()
    spec = LayoutSpec(mode=mode, kernel=kernel, pad_to=16, **({"call_pairs": call_pairs} if call_pairs is not None else {}))
    model.batch_layout = spec
    groups = _groups(model.tokenizer, 5, n=3)
    for side in ("right", "left"):
        batch = collate(groups, model.tokenizer.pad_token_id, side, layout=spec)
        assert batch.packed is not None and batch.packed.processed_tokens % 16 == 0
        if call_pairs == 10**9:
            assert len(batch.packed.buckets) == 1
        with torch.no_grad():
            got = model.score_batch(batch)
            model.forward_mode = "padded"
            ref = model.score_batch(batch)
            model.forward_mode = mode
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(ref, _singles(model, groups), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kernel", ["sdpa", "varlen"])
def test_collated_layout_gradients_equal_padded(kernel):
    """Training through the collated layout (what the DataLoader gives a step) has the padded gradients.
    (FlexAttention has no backward on CPU.)"""
    from rmlab.data.layout import LayoutSpec

    torch.manual_seed(4)
    model = build_model(config=TINY_LLAMA, tokenizer="byt5", forward_mode="prefix_shared", attention=kernel)
    groups = _groups(model.tokenizer, 4, n=3)
    batch = collate(groups, model.tokenizer.pad_token_id, "left", layout=LayoutSpec("prefix_shared", kernel))
    w = torch.randn(batch.input_ids.shape[0])

    def grads(m: str) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.forward_mode = m
        (w * model.score_batch(batch)).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref, got = grads("padded"), grads("prefix_shared")
    assert ref.keys() == got.keys() and len(ref) > 5
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-4, msg=name)


def test_layout_by_hand():
    """Two groups: prompts [1, 2, 3] and [7, 8] with responses [4, 5], [6] and [9], [10, 11]."""
    from rmlab.data.layout import LayoutSpec, build_layout, plan_buckets

    prompts, responses, group = [[1, 2, 3], [1, 2, 3], [7, 8], [7, 8]], [[4, 5], [6], [9], [10, 11]], [0, 0, 1, 1]
    v = build_layout(prompts, responses, group, LayoutSpec("prefix_shared", "varlen"), pad_id=0)
    assert v.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    assert v.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 2, 3]]  # responses restart after their prompt
    assert v.read_index.tolist() == [4, 5, 8, 10]
    # sequences: prompt 1, resp 1.1, resp 1.2, prompt 2, resp 2.1, resp 2.2
    assert v.cu_q.tolist() == [0, 3, 5, 6, 8, 9, 11]
    assert v.cu_k.tolist() == [0, 3, 8, 12, 14, 17, 21]  # a response's keys: its prompt's, then its own
    assert v.k_index.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 6, 7, 8, 6, 7, 9, 10]
    assert (v.max_q, v.max_k) == (3, 5)
    p = build_layout(prompts, responses, group, LayoutSpec("packed", "sdpa"), pad_id=0)
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5, 1, 2, 3, 6, 7, 8, 9, 7, 8, 10, 11]]  # a prompt per response
    auto = build_layout(prompts, responses, group, LayoutSpec("auto", "sdpa"), pad_id=0)
    assert auto.mode == "prefix_shared"  # fewer tokens and fewer pairs
    # Buckets: shapes (q, k); one call costs 10 pairs here. (2, 2) and (2, 3) together cost 2*2*3 = 12 + 10,
    # apart 4 + 10 + 6 + 10 = 30; the (9, 9) one alone.
    assert plan_buckets([(2, 2), (9, 9), (2, 3)], call_pairs=10) == [[0, 2], [1]]
    assert plan_buckets([(2, 2), (9, 9), (2, 3)], call_pairs=10**6) == [[0, 2, 1]]
    flex = build_layout(prompts, responses, group, LayoutSpec("prefix_shared", "flex", pad_to=4), pad_id=0)
    assert flex.doc.tolist() == [0] * 6 + [1] * 5 + [-1]
    assert flex.part.tolist() == [0, 0, 0, 1, 1, 2, 0, 0, 1, 2, 2, 0]


def test_attention_dropout_acts_in_the_prefix_shared_path_and_not_in_eval():
    """model.dropout must mean the same in every forward mode: attention by segments applies the attention
    dropout in training (it used to drop it silently) and none in eval."""
    from tests.conftest import TINY_LLAMA

    torch.manual_seed(0)
    model = build_model(config=TINY_LLAMA, tokenizer="byt5", forward_mode="prefix_shared", dropout=0.5)
    assert model.forward_mode == "prefix_shared"
    batch = collate(_groups(model.tokenizer, k=3), model.tokenizer.pad_token_id)
    model.train()
    torch.manual_seed(1)
    a = model.score_batch(batch)
    torch.manual_seed(2)
    b = model.score_batch(batch)
    assert not torch.allclose(a, b)  # dropout drew different masks
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.score_batch(batch), model.score_batch(batch), atol=0, rtol=0)


def test_packed_budget_counts_the_packed_row():
    """data.budget=packed: max_tokens caps the tokens of the packed row (each prompt once), so a batch holds
    more groups than under the default padded count (rows x longest row), and never more tokens than allowed."""
    from rmlab.data.datamodule import build_datamodule

    model = build_model(config=TINY_LLAMA, tokenizer="byt5", forward_mode="prefix_shared")
    sizes = {}
    for budget in ("padded", "packed"):
        dm = build_datamodule(tokenizer=model.tokenizer, layout=model.batch_layout, cache=False, budget=budget,
                              simulator={"num_prompts": 40, "k": 3, "seed": 2}, max_tokens=1024, max_groups=None,
                              max_length=128, min_prompt_tokens=8)
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        assert sum(b.num_groups for b in batches) == len(dm.train_groups)  # every group once
        for b in batches:
            if budget == "packed":
                assert b.packed.processed_tokens <= 1024  # the packed row itself (no pad_to on CPU)
            else:
                assert b.input_ids.numel() <= 1024
        sizes[budget] = len(batches)
    assert sizes["packed"] < sizes["padded"]
    with pytest.raises(ValueError, match="data.budget"):
        build_datamodule(tokenizer=model.tokenizer, layout=model.batch_layout, budget="rows").packed_budget()


TINY_QWEN2_GQA = dict(  # Qwen2: biases on q/k/v, two query heads per key head
    model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, vocab_size=384,
)


@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_QWEN2_GQA], ids=["llama", "qwen2-gqa-bias"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_last_layer_runs_at_the_read_tokens_only(config, checkpointing):
    """The packed forward runs the last layer's attention, o_proj and MLP at the N read tokens only (its other
    rows are never read), with the padded forward's rewards and gradients; under activation checkpointing too (the
    recompute replays the layer's kwargs, from which the hooks take the rows)."""
    from rmlab.data.layout import LayoutSpec
    from rmlab.models.packing import read_rows_of

    torch.manual_seed(6)
    model = build_model(
        config=config, tokenizer="byt5", forward_mode="prefix_shared", attention="sdpa", gradient_checkpointing=checkpointing
    )
    attn, o_proj, mlp = model.read_rows
    assert attn is model.hf.base_model.layers[-1].self_attn and mlp is model.hf.base_model.layers[-1].mlp
    groups = _groups(model.tokenizer, 3, n=3)
    batch = collate(groups, model.tokenizer.pad_token_id, "left", layout=LayoutSpec("prefix_shared", "sdpa"))
    n, tokens = batch.input_ids.shape[0], batch.packed.processed_tokens
    seen = []
    handles = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[-2])) for m in (o_proj, mlp)]
    w = torch.randn(n)

    def grads(mode: str):
        model.zero_grad()
        model.forward_mode = mode
        r = model.score_batch(batch)
        (w * r).sum().backward()
        return r.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    r_ref, g_ref = grads("padded")
    seen.clear()
    r_got, g_got = grads("prefix_shared")
    for h in handles:
        h.remove()
    assert tokens > 2 * n and seen[:2] == [n, n]  # what o_proj and the MLP computed (forward; then the recompute)
    assert seen[2:] == ([n, n] if checkpointing else [])
    assert read_rows_of(attn) is None and read_rows_of(o_proj) is None  # cleared after the layer
    torch.testing.assert_close(r_got, r_ref, atol=1e-5, rtol=0)
    assert g_ref.keys() == g_got.keys() and len(g_ref) > 5
    for k in g_ref:
        torch.testing.assert_close(g_got[k], g_ref[k], atol=1e-5, rtol=1e-4, msg=k)


def test_the_last_layer_hooks_copy_and_pickle_with_the_model():
    """A deep copy (ensembles, EMA) gets its own row slot, shared by its own three modules; the model pickles
    (spawned DDP workers); and the copy gives the original's packed rewards."""
    import copy
    import pickle

    from rmlab.data.layout import LayoutSpec
    from rmlab.models.packing import READ_ROWS

    torch.manual_seed(7)
    model = build_model(config=TINY_LLAMA, tokenizer="byt5", forward_mode="prefix_shared", attention="sdpa").eval()
    clone = copy.deepcopy(model)
    slots = [getattr(m, READ_ROWS) for m in clone.read_rows]
    assert slots[0] is slots[1] is slots[2] and slots[0] is not getattr(model.read_rows[0], READ_ROWS)
    restored = pickle.loads(pickle.dumps(model))
    batch = collate(_groups(model.tokenizer, 3, n=2), model.tokenizer.pad_token_id, "left",
                    layout=LayoutSpec("prefix_shared", "sdpa"))
    with torch.no_grad():
        want = model.score_batch(batch)
        torch.testing.assert_close(clone.score_batch(batch), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(restored.score_batch(batch), want, atol=1e-6, rtol=0)


def test_last_layer_at_reads_can_be_turned_off():
    """model.last_layer_at_reads=false: the last layer's MLP runs every row of the packed forward again, same rewards."""
    from rmlab.data.layout import LayoutSpec

    torch.manual_seed(8)
    on = build_model(config=TINY_LLAMA, tokenizer="byt5", forward_mode="prefix_shared", attention="sdpa").eval()
    off = build_model(config=TINY_LLAMA, tokenizer="byt5", forward_mode="prefix_shared", attention="sdpa",
                      last_layer_at_reads=False).eval()
    off.load_state_dict(on.state_dict())
    batch = collate(_groups(on.tokenizer, 3, n=2), on.tokenizer.pad_token_id, "left",
                    layout=LayoutSpec("prefix_shared", "sdpa"))
    seen = {}
    for name, m in (("on", on), ("off", off)):
        m.read_rows[2].register_forward_pre_hook(lambda mod, args, name=name: seen.update({name: args[0].shape[-2]}))
    with torch.no_grad():
        torch.testing.assert_close(off.score_batch(batch), on.score_batch(batch), atol=1e-5, rtol=0)
    assert seen == {"on": batch.input_ids.shape[0], "off": batch.packed.processed_tokens}


@pytest.mark.parametrize("kernel", ["sdpa", "varlen"])
def test_compiled_backbone_stops_recompiling(kernel, monkeypatch):
    """``model.compile=true``: the packed row is padded to multiples of 256, and the layout's per-batch structure
    (SDPA buckets, varlen sequence counts and lengths) stays out of the compiled graphs, so after the first widths
    a run compiles nothing more, although every batch has its own buckets. Dynamo's guards and recompiles are the
    same whatever the backend; the eager backend spares the test inductor's C++ builds (~5 s a graph here)."""
    import functools

    import lightning as L

    from rmlab.bench.sides import recompiles
    from rmlab.data.datamodule import build_datamodule
    from rmlab.losses import BTLoss
    from rmlab.module import RewardModule

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch.manual_seed(0)
    model = build_model(config=TINY_LLAMA, tokenizer="byt5", forward_mode="auto", attention=kernel, compile=True)
    assert model.batch_layout.pad_to == 256
    dm = build_datamodule(tokenizer=model.tokenizer, layout=model.batch_layout, cache=False, max_tokens=1024,
                          simulator={"num_prompts": 64, "k": 3, "k_max": 5, "seed": 3}, max_length=256,
                          min_prompt_tokens=8)
    dm.setup("fit")
    seen, graphs = [], []

    class Count(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            p = batch.packed
            seen.append((p.processed_tokens, tuple(b.shape for b in p.buckets), tuple(p.cu_q_host), tuple(p.cu_k_host)))
            graphs.append(recompiles())

    module = RewardModule(model, BTLoss(), lr=1e-3, warmup_ratio=0.0, scheduler="constant")
    g0 = recompiles()
    L.Trainer(accelerator="cpu", max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
              callbacks=[Count()]).fit(module, train_dataloaders=dm.train_dataloader())
    widths = [w for w, *_ in seen]
    assert len(set(widths)) <= 3, widths  # bucketed lengths: a few row widths
    # dynamic=None: a graph for the first width, one more (with that dimension dynamic) at the second, then none
    firsts = [i for i, w in enumerate(widths) if w not in widths[:i]]
    settled = firsts[1] if len(firsts) > 1 else 0
    assert len(seen) == 10 and len(set(seen[settled + 1 :])) >= 3  # the batches' layouts differ step after step
    assert graphs[0] > g0  # it compiled
    assert graphs[settled] == graphs[-1], (widths, [g - g0 for g in graphs])  # and then stopped compiling


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_packed_mode_on_the_older_path_says_it_reads_back(attn, caplog):
    """Packed modes under eager (or transformers' flex_attention / flash_attention_2) pack each batch inside the
    forward: a host read-back every step, which the no-host-sync test does not cover. The build says so, and what
    to set instead; SDPA (rmlab's attention, the layout collated in the DataLoader) says nothing."""
    import logging

    with caplog.at_level(logging.WARNING, logger="rmlab.models.packing"):
        model = build_model(config=TINY_LLAMA, tokenizer="byt5", forward_mode="auto", attn_implementation=attn)
    said = [r.getMessage() for r in caplog.records if "reads the batch back" in r.getMessage()]
    if attn == "sdpa":
        assert said == [] and model.batch_layout is not None
    else:
        assert model.forward_mode == "prefix_shared" and len(said) == 1, said
        assert "model.attn_implementation=eager" in said[0] and "set model.attn_implementation=sdpa" in said[0]
        with caplog.at_level(logging.WARNING, logger="rmlab.models.packing"):
            caplog.clear()
            build_model(config=TINY_LLAMA, tokenizer="byt5", forward_mode="padded", attn_implementation=attn)
        assert not [r for r in caplog.records if "reads the batch back" in r.getMessage()]  # padded: no packing
