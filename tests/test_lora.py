"""LoRA via peft on tiny_llama: the head is trained and saved (modules_to_save), the backbone stays frozen,
and the merged export loads in plain transformers with the same rewards."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import compose


@pytest.mark.slow
def test_lora_trains_head_and_merged_export_matches(tmp_path):
    import lightning as L
    from hydra.utils import instantiate
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from rmlab.train import run

    overrides = ["model=tiny_llama", "model.lora.r=8", "module.lr=5e-3", "data.simulator.num_prompts=200", "trainer.max_steps=8",
                 "callbacks.model_checkpoint.every_n_train_steps=4", "~callbacks.progress_bar", "threads=1"]
    cfg = compose(overrides, tmp_path)
    summary = run(cfg)

    # The same init as the run's (run() seeds, then builds the model first): the frozen weights must match it.
    L.seed_everything(cfg.seed, verbose=False)
    fresh = instantiate(cfg.model, _convert_="all")
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable), sorted(trainable)[:5]

    sd = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    head, head0 = sd["model.hf.score.modules_to_save.default.weight"], sd["model.hf.score.original_module.weight"]
    assert (head - head0).abs().max() > 1e-3  # the head trained
    q = "model.hf.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert torch.equal(sd[q], fresh.hf.model.layers[0].self_attn.q_proj.base_layer.weight)  # backbone frozen
    # The adapters trained too: peft starts every lora_B at zero, so each one away from zero has moved.
    lora_b = {k: v for k, v in sd.items() if "lora_B" in k}
    assert lora_b and all(v.abs().max() > 0 for v in lora_b.values()), [k for k, v in lora_b.items() if not v.any()]
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in fresh.state_dict().items() if "lora_B" in k)

    # The adapter folder holds the LoRA weights and the trained head.
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("lora_A" in k for k in adapter)
    saved_head = [v for k, v in adapter.items() if "score" in k and k.endswith("weight")]
    assert len(saved_head) == 1 and torch.equal(saved_head[0], head)

    # The merged export is plain transformers (no peft keys) and scores like the LoRA model.
    fresh.load_state_dict({k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")})
    fresh.eval()
    plain = AutoModelForSequenceClassification.from_pretrained(summary["export_dir"]).eval()
    assert not any("lora" in k or "modules_to_save" in k for k in plain.state_dict())
    texts = ["Q: name a colour. A: blue", "Q: 2+2? A: four, since two and two make four.", "x", "a longer answer " * 5]
    enc = fresh.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = fresh(enc["input_ids"], enc["attention_mask"])
        got = plain(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, 0]
    assert want.std() > 1e-4  # distinct rewards, so equality means something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
