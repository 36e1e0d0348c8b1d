"""One side of the benchmark (rmlab or TRL), run in its own process so that its peak RSS is its own.

``python -m rmlab.bench.sides SPEC.json OUT.json``. Both sides are timed the same way: the wall time
between the ends of consecutive optimizer steps (data loading, forward, backward, optimizer step and
the framework's own bookkeeping all included), minus the time the counters themselves take. The
tokens a step processes are read from the ``input_ids`` that reach the backbone, padding included.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from rmlab.bench.workloads import unique_tokens as workload_unique_tokens
from rmlab.data.tokenize import TokenizedGroup


class StepClock:
    """Per-step wall time and token counts; stops a run ``seconds`` after the warm-up steps."""

    def __init__(self, seconds: float, warmup: int, cuda: bool = False):
        self.seconds, self.warmup, self.cuda = seconds, warmup, cuda
        self.steps: list[dict[str, float]] = []
        self.pending = {"comparisons": 0.0, "unique": 0.0, "processed": 0.0}
        self.overhead = 0.0
        self.t_last = self.t_measure = 0.0

    def start(self) -> None:
        self.t_last = time.perf_counter()

    def add(self, **counts: float) -> None:
        for k, v in counts.items():
            self.pending[k] += v

    def step(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()  # a step is over when its kernels are, not when they are queued
        t = time.perf_counter()
        self.steps.append({"seconds": t - self.t_last - self.overhead, **self.pending})
        self.pending = dict.fromkeys(self.pending, 0.0)
        self.overhead, self.t_last = 0.0, t
        if len(self.steps) == self.warmup:
            self.t_measure = t

    def done(self) -> bool:
        return len(self.steps) > self.warmup and time.perf_counter() - self.t_measure >= self.seconds

    def summary(self) -> dict[str, Any]:
        m = self.steps[self.warmup :] or self.steps
        secs = sum(s["seconds"] for s in m)
        comps = sum(s["comparisons"] for s in m)
        processed = sum(s["processed"] for s in m)
        unique = sum(s["unique"] for s in m)
        return {
            "steps_measured": len(m),
            "warmup_steps": min(self.warmup, len(self.steps)),
            "comparisons_per_s": statistics.median(s["comparisons"] / s["seconds"] for s in m),
            "comparisons_per_s_aggregate": comps / secs,
            "median_step_s": statistics.median(s["seconds"] for s in m),
            "comparisons_per_step": comps / len(m),
            "processed_tokens_per_comparison": processed / comps,
            "unique_tokens_per_comparison": unique / comps,
            "useful_token_fraction": unique / processed,
            "processed_tokens_per_s": processed / secs,
        }


class Timed:
    """A context that charges its time to the clock's overhead (subtracted from the step)."""

    def __init__(self, clock: StepClock):
        self.clock = clock

    def __enter__(self):
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        self.clock.overhead += time.perf_counter() - self.t


def count_backbone_tokens(module: torch.nn.Module, clock: StepClock) -> None:
    """Count the tokens of every forward through ``module``: rows x width, padding included."""

    def hook(_mod, args, kwargs):
        with Timed(clock):
            ids = kwargs.get("input_ids", args[0] if args else None)
            clock.add(processed=ids.numel())

    module.register_forward_pre_hook(hook, with_kwargs=True)


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def inherited_rss_mb() -> float:
    """``ru_maxrss``: on Linux it survives ``execve``, and ``subprocess`` starts a side with vfork + exec, so a
    side's ``ru_maxrss`` starts at the peak of the benchmark process that spawned it (2.6 GB on the GPU run of
    2026-11-26, after it built the 0.5B weights; 0.55 GB on CPU), whatever the side does."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_rss_mb() -> float:
    """This process's own peak RSS (``VmHWM``: the high-water mark of its own address space, which exec
    starts afresh); ``ru_maxrss`` where /proc is missing (not Linux)."""
    own = _status_mb("VmHWM")
    return inherited_rss_mb() if own is None else own


def rss_mb() -> float:
    """Resident memory now (``VmRSS``), or the peak where /proc is missing."""
    now = _status_mb("VmRSS")
    return peak_rss_mb() if now is None else now


PHASES: list[dict[str, Any]] = []  # host memory after each phase of a side (``rss_phases`` in the JSON)


def mark(phase: str) -> None:
    row = {"phase": phase, "rss_mb": round(rss_mb()), "peak_mb": round(peak_rss_mb())}
    if torch.cuda.is_initialized():
        row["gpu_allocated_mb"] = round(torch.cuda.memory_allocated() / 2**20)
    PHASES.append(row)


def load_groups(path: str) -> list[TokenizedGroup]:
    return [TokenizedGroup(**d) for d in json.loads(Path(path).read_text())]


def share_per_comparison(groups: list[TokenizedGroup]) -> dict[tuple[tuple[int, ...], tuple[int, ...]], float]:
    """Each comparison's share of its group's unique tokens, keyed by its (chosen, rejected) rows."""
    out = {}
    for g in groups:
        share = workload_unique_tokens([g]) / len(g.winner)
        for w, lo in zip(g.winner, g.loser):
            out[(tuple(g.prompt_ids + g.response_ids[w]), tuple(g.prompt_ids + g.response_ids[lo]))] = share
    return out


def expand_pairs(groups: list[TokenizedGroup]) -> tuple[list[TokenizedGroup], dict[str, float]]:
    """The ``pairs_expanded`` ablation: each comparison its own K = 2 sample (``data.pair_batching=shuffled``).

    A response is then forwarded once per comparison it is in. Returns the samples and, keyed by
    the original group's id, each comparison's share of that group's unique tokens, so that
    "unique real tokens" keeps the workload's meaning (each prompt and response once) and the
    repeats show up as processed tokens only.
    """
    from rmlab.data.tokenize import explode_pairs

    groups = [dataclasses.replace(g, group_id=str(i)) for i, g in enumerate(groups)]
    share = {g.group_id: workload_unique_tokens([g]) / len(g.winner) for g in groups if g.winner}
    return [p for g in groups for p in explode_pairs(g)], share


def run_rmlab(spec: dict[str, Any]) -> dict[str, Any]:
    import lightning as L

    from rmlab.data.datamodule import build_datamodule
    from rmlab.losses import BTLoss
    from rmlab.models import build_model
    from rmlab.models.liger import liger_report
    from rmlab.models.packing import unique_tokens
    from rmlab.module import RewardModule

    cuda = spec["device"] == "cuda"
    clock = StepClock(spec["seconds"], spec["warmup"], cuda)
    model = build_model(
        name_or_path=spec["model_dir"],
        tokenizer=spec["model_dir"],
        forward_mode=spec["mode"],
        row_tokens=spec.get("row_tokens"),
        attn_implementation=spec.get("attn", "sdpa"),
        gradient_checkpointing=spec.get("gradient_checkpointing", False),
        compile=spec.get("compile", False),
        last_layer_at_reads=spec.get("last_layer_at_reads", True),
        liger=spec.get("liger", False),  # Liger's RMSNorm/RoPE/SwiGLU kernels (GPU, rmlab[liger])
    )
    mark("model built")
    count_backbone_tokens(model.hf.base_model, clock)
    groups = load_groups(spec["workload"])
    share = None
    if spec.get("pair_batching", "grouped") == "shuffled":
        groups, share = expand_pairs(groups)

    def batch_unique(batch) -> float:
        if share is None:
            return unique_tokens(batch)
        return sum(share[gid.rsplit("/c", 1)[0]] for gid in batch.group_ids)  # one comparison per sample

    dm = build_datamodule(
        tokenizer=model.tokenizer,
        max_tokens=spec["max_tokens"],
        max_responses=spec["max_responses"],
        max_groups=None,
        sort_by_length=spec.get("sort_by_length", True),
        seed=spec["seed"],
        cache=False,
        layout=model.batch_layout,
        budget=spec.get("budget", "packed"),  # max_tokens counts the tokens the forward runs over
        num_workers=spec.get("num_workers", 0),
    )
    dm.train_groups, dm.val_groups = groups, []  # setup() is skipped: the workload is already tokenized
    module = RewardModule(model, BTLoss(), lr=spec["lr"], weight_decay=0.0, warmup_ratio=0.0, scheduler="constant")
    mark("data and module built")

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            with Timed(clock):
                clock.add(comparisons=batch.num_comparisons, unique=batch_unique(batch))
            clock.step()
            if len(clock.steps) == 1:
                with Timed(clock):
                    mark("first step")
            if clock.done():
                trainer.should_stop = True

    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if spec.get("bf16") else "32-true",
        max_epochs=10_000,
        max_steps=spec.get("max_steps", -1),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        use_distributed_sampler=False,
        callbacks=[Clock()],
    )
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    mark("last step")
    liger = liger_report(model)
    return {
        "forward_mode": model.forward_mode,
        "liger": liger["kernels"] if liger else [],
        "pair_batching": spec.get("pair_batching", "grouped"),
        "sort_by_length": spec.get("sort_by_length", True),
        **clock.summary(),
    }


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from rmlab.bench.workloads import trl_pairs

    cuda = spec["device"] == "cuda"
    clock = StepClock(spec["seconds"], spec["warmup"], cuda)
    groups = load_groups(spec["workload"])
    shares = share_per_comparison(groups)
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForSequenceClassification.from_pretrained(
        spec["model_dir"], num_labels=1, attn_implementation=spec.get("attn", "sdpa"), dtype=torch.float32
    )
    mark("model built")

    def count(_mod, args, kwargs):
        # TRL's rows are [chosen..., rejected...]: pair row i with row B + i to find each comparison.
        with Timed(clock):
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"].bool()
            rows = [tuple(r[m].tolist()) for r, m in zip(ids.cpu(), mask.cpu())]
            b = len(rows) // 2
            clock.add(comparisons=b, unique=sum(shares[(rows[i], rows[b + i])] for i in range(b)))

    model.register_forward_pre_hook(count, with_kwargs=True)
    count_backbone_tokens(model.base_model, clock)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.start()

        def on_step_end(self, args, state, control, **kw):
            clock.step()
            if len(clock.steps) == 1:
                with Timed(clock):
                    mark("first step")
            if clock.done():
                control.should_training_stop = True

    with tempfile.TemporaryDirectory() as out:
        args = RewardConfig(
            output_dir=out,
            per_device_train_batch_size=spec["batch_size"],
            learning_rate=spec["lr"],
            weight_decay=0.0,
            lr_scheduler_type="constant",
            optim="adamw_torch",
            max_grad_norm=1.0,
            num_train_epochs=10_000,
            max_steps=spec.get("max_steps", -1),
            bf16=bool(spec.get("bf16")),  # TRL's default is bf16; off for the fp32 CPU comparison
            gradient_checkpointing=spec.get("gradient_checkpointing", False),  # TRL's default is on
            max_length=spec["max_length"],
            eos_token=tok.sep_token or tok.eos_token,  # a BERT tokenizer has no eos; rows are pre-tokenized anyway
            logging_steps=10**9,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
            use_cpu=not cuda,
            seed=spec["seed"],
        )
        ds = Dataset.from_list(trl_pairs(groups))
        trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
        if len(trainer.train_dataset) != len(ds):
            raise RuntimeError(f"TRL dropped {len(ds) - len(trainer.train_dataset)} pairs: the pre-filter failed")
        mark("data and trainer built")
        trainer.train()
        mark("last step")
    return clock.summary()


def recompiles() -> int:
    """Graphs torch.compile has built so far in this process (a recompile is a graph more)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - torch without dynamo
        return 0
    return int(counters["stats"].get("unique_graphs", 0))


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    cuda = spec["device"] == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    graphs = recompiles()
    res = run_trl(spec) if spec["side"] == "trl" else run_rmlab(spec)
    res["compiled_graphs"] = recompiles() - graphs
    if cuda:
        res["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def search(spec: dict[str, Any]) -> dict[str, Any]:
    """Each batch size of ``spec["sizes"]`` in turn (TRL: pairs per step; rmlab: the token budget), in this
    one process; the fastest whose peak GPU memory stays under ``mem_cap_gb`` wins. A size that runs out of
    memory ends the search (larger ones would too)."""
    key = "batch_size" if spec["side"] == "trl" else "max_tokens"
    tried, best = [], None
    for size in spec["sizes"]:
        gc.collect()
        mark(f"before {key}={size}")
        if spec["device"] == "cuda":
            torch.cuda.empty_cache()
        try:
            res = run_one({**spec, key: size})
        except torch.OutOfMemoryError:
            tried.append({key: size, "error": "out of memory"})
            torch.cuda.empty_cache()
            break
        cap = spec.get("mem_cap_gb")
        fits = cap is None or res.get("peak_gpu_mem_gb", 0.0) <= cap
        tried.append({key: size, "comparisons_per_s": res["comparisons_per_s"], "fits": fits,
                      "peak_gpu_mem_gb": res.get("peak_gpu_mem_gb")})
        if fits and (best is None or res["comparisons_per_s"] > best["comparisons_per_s"]):
            best = {**res, key: size}
        if not fits:
            break
    if best is None:
        raise RuntimeError(f"no batch size fits under {spec.get('mem_cap_gb')} GB: {tried}")
    return {**best, "search": tried, "batch": f"{key}={best[key]}"}


def measure_peak_tflops(device: str, bf16: bool, seconds: float = 3.0) -> float:
    """The chip's dense matmul rate, measured: square matmuls (8192 on a GPU, 1024 on CPU) repeated for
    ``seconds``; MFU is reported against this, not a datasheet figure."""
    n = 8192 if device == "cuda" else 1024
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        a @ b
    sync()
    t0, iters = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
        if iters % 10 == 0:
            sync()
    sync()
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def main(argv: list[str] | None = None) -> None:
    spec_path, out_path = (argv or sys.argv[1:])[:2]
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    inherited = inherited_rss_mb()
    mark("imports")
    if spec["side"] == "peak":
        Path(out_path).write_text(json.dumps({"peak_tflops": measure_peak_tflops(spec["device"], spec["bf16"])}))
        return
    res = search(spec) if spec.get("sizes") else run_one(spec)
    res.update(
        peak_rss_mb=peak_rss_mb(),  # this side's own peak
        inherited_peak_rss_mb=inherited,  # the spawning process's, which ru_maxrss would have added
        rss_phases=PHASES,
        side=spec["side"],
        mode=spec.get("mode", ""),
    )
    Path(out_path).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
