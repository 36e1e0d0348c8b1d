"""Peak GPU memory and step time of one forward+backward+AdamW step of a 189M-parameter Llama reward model,
per memory option: the table in docs/scaling.md. Run on a GPU from the repo root:
python docs/scaling_memory.py [rows] [out.json]"""

import json
import sys
import time

import torch

sys.path.insert(0, ".")
from rmlab.models import build_model  # noqa: E402

CFG = dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
           num_key_value_heads=8, max_position_embeddings=4096)
ROWS, LEN = int(sys.argv[1]) if len(sys.argv) > 1 else 32, 1024


def measure(name, gc=False, bf16=False, lora=None):
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = build_model(config=CFG, tokenizer="byt5", gradient_checkpointing=gc, lora=lora).cuda().train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(3, 250, (ROWS, LEN), device="cuda")
    mask = torch.ones_like(ids)
    times = []
    for i in range(4):
        if i == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            r = model(ids, mask)
        loss = torch.nn.functional.logsigmoid(r[0::2] - r[1::2]).neg().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    n_all = sum(p.numel() for p in model.parameters())
    out = dict(name=name, params_M=round(n_all / 1e6, 1), trainable_M=round(sum(p.numel() for p in params) / 1e6, 2),
               peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2), step_ms=round(1000 * sum(times[1:]) / 3, 1))
    print(json.dumps(out), flush=True)
    del model, opt
    return out


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), f"rows={ROWS} x {LEN} tokens", flush=True)
    runs = [("fp32", {}), ("bf16-mixed", dict(bf16=True)), ("fp32 + gradient checkpointing", dict(gc=True)),
            ("bf16-mixed + gradient checkpointing", dict(gc=True, bf16=True)),
            ("bf16-mixed + LoRA r=16", dict(bf16=True, lora={"r": 16})),
            ("bf16-mixed + LoRA r=16 + gradient checkpointing", dict(gc=True, bf16=True, lora={"r": 16}))]
    res = []
    for name, kw in runs:
        try:
            res.append(measure(name, **kw))
        except Exception as e:  # one failure must not cost the rest of the measurements
            print(name, "FAILED", repr(e)[:300], flush=True)
    json.dump(res, open(sys.argv[2] if len(sys.argv) > 2 else "gpu_mem.json", "w"), indent=1)
