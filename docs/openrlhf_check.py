"""OpenRLHF's own reward-model class vs the replica in tests/test_clients.py, on an rmlab export (docs/eval.md).

OpenRLHF does not import on a CPU machine (openrlhf/models/model.py imports deepspeed, its ring_attn_utils
flash_attn), so the test suite replicates its pooling. This one-off check runs OpenRLHF's real
``get_llm_for_sequence_regression`` on CPU with those two imports stood in for by empty modules (only its
ZeRO-3 and sequence-packing paths use them) and compares it with the replica, raw and with --normalize_reward:

    pip download openrlhf==0.11.2 --no-deps -d /tmp/orl && (cd /tmp/orl && unzip -qo openrlhf-*.whl)
    python train.py model=hf model.config='{model_type: qwen2, hidden_size: 32, intermediate_size: 64,
      num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2}' \\
      model.tokenizer=../shared/data/tokenizers/qwen2_5_instruct data=local data.source=chat.jsonl \\
      data.format=chat data.reward_token=eos trainer.max_steps=4 hydra.run.dir=/tmp/orl_run
    PYTHONPATH=. python docs/openrlhf_check.py /tmp/orl/openrlhf-0.11.2.data/purelib/openrlhf /tmp/orl_run/export

It does not put OpenRLHF on sys.path (its wheel ships a top-level ``tests`` package): the packages
``openrlhf``, ``openrlhf.models`` and ``openrlhf.utils`` are registered by path, without their __init__.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path


def load_openrlhf(root: Path):
    """openrlhf.models.model from an unpacked wheel, with deepspeed and flash_attn stood in for."""
    import transformers.integrations.deepspeed  # noqa: F401  imported before the stand-ins: it probes deepspeed

    for name in [
        "deepspeed",
        "flash_attn",
        "flash_attn.bert_padding",
        "flash_attn.utils",
        "flash_attn.utils.distributed",
    ]:
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = m
    for n in ["index_first_axis", "pad_input", "rearrange", "unpad_input"]:
        setattr(sys.modules["flash_attn.bert_padding"], n, None)
    sys.modules["flash_attn.utils.distributed"].all_gather = None
    for pkg, sub in [("openrlhf", ""), ("openrlhf.models", "models"), ("openrlhf.utils", "utils")]:
        m = types.ModuleType(pkg)
        m.__path__ = [str(root / sub)]
        sys.modules[pkg] = m
    import openrlhf.models.model as model
    import openrlhf.utils.utils as utils
    import torch

    known = utils.convert_to_torch_dtype
    utils.convert_to_torch_dtype = lambda d: torch.float32 if d == "fp32" else known(d)  # it knows bf16/fp16 only
    return model


def main(root: str, export: str) -> None:
    import torch
    from transformers import AutoTokenizer

    from tests.test_clients import CONVERSATIONS, openrlhf_rewards, openrlhf_tokens

    torch.set_num_threads(1)
    orl = load_openrlhf(Path(root))
    export_dir = Path(export)
    tok = AutoTokenizer.from_pretrained(export_dir)
    rows = [openrlhf_tokens(tok, c) for c in CONVERSATIONS]
    n, pad = max(map(len, rows)), tok.pad_token_id
    for normalize in (False, True):
        real = orl.get_llm_for_sequence_regression(
            str(export_dir), "reward", param_dtype="fp32", normalize_reward=normalize, attn_implementation="sdpa"
        ).eval()
        if normalize:
            print(
                f"OpenRLHF's mean/std buffers after loading: {real.mean.item():.6g} / {real.std.item():.6g} "
                f"(config.json: {real.config.mean:.6g} / {real.config.std:.6g})"
            )
        for side in ("right", "left"):
            fill = [[pad] * (n - len(r)) for r in rows]
            ids = torch.tensor([f + r if side == "left" else r + f for f, r in zip(fill, rows)])
            mask = torch.tensor(
                [
                    [0] * len(f) + [1] * len(r) if side == "left" else [1] * len(r) + [0] * len(f)
                    for f, r in zip(fill, rows)
                ]
            )
            with torch.no_grad():
                theirs = real(ids, attention_mask=mask).tolist()
            ours = openrlhf_rewards(export_dir, rows, side, normalize)
            diff = max(abs(a - b) for a, b in zip(theirs, ours))
            print(
                f"normalize={normalize} {side} padding: OpenRLHF {[round(x, 6) for x in theirs]} "
                f"replica {[round(x, 6) for x in ours]} max |diff| {diff:.2e}"
            )


if __name__ == "__main__":
    main(*sys.argv[1:3])
