"""``python -m rmlab.bench``: rmlab's training step against TRL's RewardTrainer, side by side.

For every (model, workload) it builds one set of initial weights and one set of comparisons, then
runs TRL and each rmlab forward mode one after the other, each in its own process (separate peak
RSS, same threads, same seconds of measurement), and writes ``bench.json`` and ``bench.md``.
See docs/bench.md for what each column means and the last recorded numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# A causal LM of 4.3M parameters (3.9M of them the embedding of the 30k-word BERT vocabulary): big
# enough that matrix work, not Python, sets the pace on 2 CPU cores (about 3k tokens/s per thread,
# forward + backward); small enough that the whole benchmark runs in minutes.
MODELS: dict[str, dict[str, Any]] = {
    "llama-small": dict(
        model_type="llama",
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    ),
    # Qwen2-0.5B's shape (random weights): for the GPU run.
    "qwen2-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    # Qwen2-1.5B's shape (random weights): the GPU preset's larger model.
    "qwen2-1.5b": dict(
        model_type="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    # CI size: the smoke preset runs the whole pipeline in seconds.
    "llama-tiny": dict(
        model_type="llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    ),
    "minilm": {},  # the bundled all-MiniLM-L6-v2 (an encoder: rmlab falls back to padded rows)
}
# One call each (docs/bench.md). smoke: the same code as gpu, on CPU at CI size (tests/test_bench.py).
# gpu: from a bare GPU machine with the repo and the prepared .gpu/ folder (``--preset gpu --prepare-only``
# here builds it: the workloads tokenized with Qwen2.5's tokenizer, and that tokenizer), in under 8 minutes.
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        models="llama-tiny", workloads="hh,alpaca", modes="prefix_shared", hh_pairs=64, alpaca_prompts=8, k=4,
        max_length=256, seconds=1.0, warmup=1, trl_sizes="2,4", rmlab_sizes="1024,2048", measure_peak=True,
        minilm_workloads="", timeout=300.0,
    ),
    "gpu": dict(
        models="qwen2-0.5b,qwen2-1.5b", workloads="hh,alpaca", modes="prefix_shared", k=8, device="cuda", bf16=True,
        threads=8, seconds=5.0, warmup=3, trl_sizes="8,16,32", rmlab_sizes="16384,32768,65536", mem_cap_gb=60.0,
        measure_peak=True, minilm_workloads="", work=".gpu/work", tokenizer=".gpu/tokenizer", reuse=True,
        out="outputs/bench/gpu", timeout=240.0,
        # The Liger rows (--liger) are opt-in: 4 sides more would take the preset past its 8 minutes (`--preset gpu
        # --liger` runs them too, about 3 minutes more; the wheel is fetched by --prepare-only).
        liger=False,
    ),
}
GPU_TOKENIZER = "tokenizers/qwen2_5_instruct"  # under --data-dir: the vocabulary of the Qwen2 shapes
CAUSAL_MODES = ("prefix_shared", "packed", "padded")
# Opt-in rmlab rows with one technique switched off, to show its share against the same forward mode.
ABLATIONS: dict[str, dict[str, Any]] = {
    # data.pair_batching=shuffled: each comparison its own K = 2 sample, so a response is forwarded
    # once per comparison it is in (TRL's layout) instead of once per batch.
    "pairs_expanded": {"pair_batching": "shuffled"},
    # data.sort_by_length=false: token-budget batches drawn from the shuffled order, not length-sorted pools.
    "no_sort": {"sort_by_length": False},
    # model.last_layer_at_reads=false: the last layer computes every row (its share shrinks as 1/layers).
    "full_last_layer": {"last_layer_at_reads": False},
}
# The figures each rmlab row is divided by TRL's (same model and workload): ``vs_trl`` in the JSON.
RATIOS = (
    "comparisons_per_s",
    "comparisons_per_s_aggregate",
    "processed_tokens_per_comparison",
    "unique_tokens_per_comparison",
    "useful_token_fraction",
    "peak_rss_mb",
)


def with_liger(spec: dict[str, Any], plain: dict[str, Any] | None) -> dict[str, Any]:
    """The ``--liger`` row of an rmlab side: the same spec with ``model.liger=true``. When the plain row searched
    batch sizes, the Liger row runs only the budget that won there (one size: the GPU preset's time budget), so the
    two rows differ by the kernels alone."""
    out = dict(spec, liger=True)
    if spec.get("sizes") and plain and "error" not in plain and plain.get("max_tokens"):
        out["sizes"] = [int(plain["max_tokens"])]
    return out


def fetch_liger_wheel(folder: Path) -> None:
    """The liger-kernel wheel (pure Python, a few hundred kB) into ``folder`` for a GPU machine with no package
    index: there, ``pip install --no-deps .gpu/wheels/liger_kernel-*.whl`` before ``--preset gpu`` (Triton comes
    with CUDA builds of torch). Without it the Liger rows are error rows that say so; the rest of the run is kept."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "liger-kernel>=0.5", "-d", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(folder.glob("liger_kernel-*.whl"))
    if proc.returncode == 0 and wheels:
        print(f"liger-kernel wheel: {wheels[-1]}; on the GPU machine: pip install --no-deps {wheels[-1]}")
    else:
        print(f"could not download the liger-kernel wheel ({proc.stderr.strip()[-300:]}); the Liger rows will be "
              "error rows unless liger-kernel is installed there (run without --liger)")


def non_embedding_params(model) -> int:
    emb = sum(p.numel() for n, p in model.named_parameters() if "embed" in n)
    return sum(p.numel() for p in model.parameters()) - emb


def prepare(args, work: Path) -> dict[str, Any]:
    """Tokenizer, workloads (JSON) and initial weights (one directory per model), built once."""
    import torch
    from transformers import AutoTokenizer

    from rmlab.bench import workloads as W
    from rmlab.models import build_model, minilm_path

    tok = AutoTokenizer.from_pretrained(args.tokenizer or minilm_path())
    loads = {}
    makers = {
        "hh": lambda: W.hh_groups(tok, args.data_dir, args.hh_pairs, args.max_length),
        "alpaca": lambda: W.alpaca_groups(tok, args.data_dir, args.alpaca_prompts, args.k, args.max_length, args.seed),
        "simulator": lambda: W.simulator_groups(tok, args.sim_prompts, 3, args.max_length, args.seed),
    }
    for name in args.workloads:
        path = work / f"{name}.json"
        if args.reuse and path.exists():  # e.g. on a GPU machine without ../shared/data
            groups = [W.TokenizedGroup(**d) for d in json.loads(path.read_text())]
        else:
            groups = makers[name]()
            path.write_text(json.dumps([g.to_dict() for g in groups]))
        loads[name] = {"path": str(path), **W.describe(groups)}
    models = {}
    for name in args.models:
        torch.manual_seed(args.seed)
        if name == "minilm":
            m = build_model(name_or_path="minilm")
        else:
            m = build_model(config=MODELS[name], tokenizer=args.tokenizer or minilm_path())
        path = work / f"model-{name}"
        m.save_pretrained(path)
        models[name] = {
            "path": str(path),
            "params": sum(p.numel() for p in m.parameters()),
            "non_embedding_params": non_embedding_params(m),
            "causal": m.pooling == "last",
            "layers": m.config.num_hidden_layers,
            "hidden": m.config.hidden_size,
        }
    return {"workloads": loads, "models": models}


def run_side(spec: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    tag = f"{spec['model']}-{spec['workload_name']}-{spec['side']}-{spec.get('mode', '')}-{spec.get('ablation', '')}"
    tag += "-liger" if spec.get("liger") else ""
    tag += "-compiled" if spec.get("compile") else ""
    spec_path, out_path = work / f"{tag}.spec.json", work / f"{tag}.out.json"
    spec_path.write_text(json.dumps(spec))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(spec["threads"]),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    t = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "rmlab.bench.sides", str(spec_path), str(out_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0 or not out_path.exists():
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        return {
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}",
            "side": spec["side"],
            "mode": spec.get("mode", ""),
            "ablation": spec.get("ablation", ""),
            **({"liger_requested": True} if spec.get("liger") else {}),
        }
    res = json.loads(out_path.read_text())
    res["wall_s"] = time.time() - t
    return res


def add_ratios(
    rows: list[dict[str, Any]], peak_tflops: float | None, models: dict[str, Any], workloads: dict | None = None
) -> None:
    """rmlab / TRL ratio of each figure, against the TRL row of the same model and workload."""
    for r in rows:
        if "error" in r:
            continue
        cps_unique = r["comparisons_per_s"] * r["unique_tokens_per_comparison"]
        if peak_tflops:
            info = models[r["model"]]
            # 6 N flops per token for forward + backward, over the unique real tokens (model FLOPs, not the
            # padding or prompt copies a side chose to compute), plus attention: 12 x layers x hidden per
            # (query, key) pair a causal forward needs with each prompt once (QK^T and PV, x3 for backward).
            pairs = ((workloads or {}).get(r["workload"]) or {}).get("attention_pairs_per_comparison", 0.0)
            attn = 12 * info.get("layers", 0) * info.get("hidden", 0) * pairs * r["comparisons_per_s"]
            r["mfu"] = (6 * info["non_embedding_params"] * cps_unique + attn) / (peak_tflops * 1e12)
        base = next(
            (
                b
                for b in rows
                if b["side"] == "trl"
                and b["model"] == r["model"]
                and b["workload"] == r["workload"]
                and "error" not in b
            ),
            None,
        )
        if base is None or r["side"] == "trl":
            continue
        r["vs_trl"] = {k: r[k] / base[k] for k in RATIOS}


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    mfu = bool(m.get("peak_tflops"))
    head = [
        "model",
        "workload",
        "side",
        "comparisons/s (median)",
        "aggregate",
        "tokens processed / comparison",
        "unique real tokens / comparison",
        "useful fraction",
        "peak RSS MB",
        "speed vs TRL",
        "processed vs TRL",
        "unique vs TRL",
        "useful vs TRL",
        "RSS vs TRL",
    ] + (["MFU"] if mfu else [])
    gpu = any("peak_gpu_mem_gb" in r for r in result["runs"])
    searched = any("batch" in r for r in result["runs"])
    graphs = gpu or bool(m.get("compile"))  # the compiled-graph count: on GPU runs, and wherever rmlab compiled
    head += (["peak GPU GB"] if gpu else []) + (["compiled graphs"] if graphs else []) + (["batch"] if searched else [])
    lines = [
        f"Command: `{m['command']}`  ",
        f"Date: {m['date']}; machine: {m['machine']}; torch {m['torch']}, transformers {m['transformers']}, "
        f"trl {m['trl']}; {m['threads']} thread(s); {m['precision']}; {m['seconds']} s measured per side "
        f"after {m['warmup']} warm-up steps."
        + (f" Matmul peak: {m['peak_tflops']:.3g} TFLOP/s ({'measured' if m.get('peak_measured') else 'given'})." if m.get("peak_tflops") else "")
        + (f" Batch sizes searched under a {m['mem_cap_gb']} GB GPU memory cap." if m.get("mem_cap_gb") else ""),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in result["runs"]:
        side = r["side"] if r["side"] == "trl" else f"rmlab {r.get('forward_mode') or r['mode']}"
        if r.get("ablation"):
            side += f", {r['ablation']}"
        if r.get("liger") or r.get("liger_requested"):
            side += ", liger"
        if r["side"] == "rmlab" and m.get("compile"):
            side += ", compiled"
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['workload']} | {side} | error: {r['error'][:80]} |" + "|" * (len(head) - 4)
            )
            continue
        v = r.get("vs_trl") or dict.fromkeys(RATIOS, 1.0)  # the TRL row is its own baseline
        cells = [
            r["model"],
            r["workload"],
            side,
            f"{r['comparisons_per_s']:.1f}",
            f"{r['comparisons_per_s_aggregate']:.1f}",
            f"{r['processed_tokens_per_comparison']:.0f}",
            f"{r['unique_tokens_per_comparison']:.0f}",
            f"{r['useful_token_fraction']:.2f}",
            f"{r['peak_rss_mb']:.0f}",
            f"{v['comparisons_per_s']:.2f}x",
            f"{v['processed_tokens_per_comparison']:.2f}",
            f"{v['unique_tokens_per_comparison']:.2f}",
            f"{v['useful_token_fraction']:.2f}",
            f"{v['peak_rss_mb']:.2f}",
        ] + ([f"{100 * r['mfu']:.1f}%"] if mfu else [])
        if gpu:
            cells.append(f"{r.get('peak_gpu_mem_gb', float('nan')):.1f}")
        if graphs:
            cells.append(str(r.get("compiled_graphs", 0)))
        if searched:
            cells.append(r.get("batch", ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render(path: str | Path) -> str:
    """Recompute the ratios of a recorded ``bench.json`` and rewrite it and its markdown table (same
    name, ``.md``) without running anything: for a new column or a fixed ratio."""
    path = Path(path)
    text = path.read_text()
    result = json.loads(text)
    add_ratios(result["runs"], result["meta"].get("peak_tflops"), result["models"], result.get("workloads"))
    path.write_text(json.dumps(result, indent=2) + ("\n" if text.endswith("\n") else ""))
    md = markdown(result)
    path.with_suffix(".md").write_text(md)
    return md


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rmlab.bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="smoke: the whole benchmark at CI size on CPU; gpu: Qwen2-0.5B/1.5B shapes, HH and AlpacaEval K=8, "
        "batch sizes searched under one memory cap, measured peak, MFU (docs/bench.md). Other flags still override",
    )
    p.add_argument("--prepare-only", action="store_true", help="build the workloads (and --preset gpu's tokenizer) in --work, run nothing")
    p.add_argument("--trl-sizes", default="", help="comma list of TRL batch sizes to search (pairs per step)")
    p.add_argument("--rmlab-sizes", default="", help="comma list of rmlab token budgets to search")
    p.add_argument("--mem-cap-gb", type=float, default=None, help="the GPU memory cap a searched size must stay under")
    p.add_argument("--measure-peak", action="store_true", help="measure the matmul peak first and report MFU against it")
    p.add_argument("--out", default="outputs/bench", help="folder for bench.json, bench.md and the work files")
    p.add_argument("--data-dir", default=os.environ.get("RMLAB_DATA_DIR", "../shared/data"))
    p.add_argument("--work", default=None, help="folder for workloads, weights and per-side files (default OUT/work)")
    p.add_argument("--reuse", action="store_true", help="reuse workload files already in --work")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer directory (default: the bundled MiniLM's BERT tokenizer)"
    )
    p.add_argument("--models", default="llama-small,minilm", help=f"comma list of {sorted(MODELS)}")
    p.add_argument("--workloads", default="hh,alpaca,simulator")
    p.add_argument("--modes", default=",".join(CAUSAL_MODES), help="rmlab forward modes on causal models")
    p.add_argument(
        "--ablations",
        default="",
        help=f"comma list of {sorted(ABLATIONS)}: extra rmlab rows, each with one technique off "
        "(docs/bench.md); none by default",
    )
    p.add_argument(
        "--ablation-modes",
        default=None,
        help="forward modes the ablation rows run with (default: --modes); an encoder runs padded",
    )
    p.add_argument(
        "--render",
        default=None,
        metavar="BENCH_JSON",
        help="run nothing: recompute the ratios of a recorded bench.json and rewrite it and its .md",
    )
    p.add_argument(
        "--minilm-workloads",
        default="simulator",
        help="workloads for the encoder: 22M parameters are ~50x the causal model's compute per "
        "token, so only the short simulator rows fit the time budget on CPU; it runs padded",
    )
    p.add_argument("--seconds", type=float, default=15.0, help="measured seconds per side, after warm-up")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the figures")
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for both sides")
    p.add_argument("--max-length", type=int, default=512, help="tokens per row; pairs that do not fit are left out")
    p.add_argument("--hh-pairs", type=int, default=1500)
    p.add_argument("--alpaca-prompts", type=int, default=120)
    p.add_argument("--k", type=int, default=8, help="AlpacaEval responses per prompt (all C(K,2) comparisons)")
    p.add_argument("--sim-prompts", type=int, default=1000)
    p.add_argument("--trl-batch-size", type=int, default=8, help="pairs per TRL step (its default)")
    p.add_argument(
        "--max-tokens", type=int, default=None, help="rmlab padded-token budget per batch (default 8 x max-length)"
    )
    p.add_argument(
        "--rmlab-workers", type=int, default=0,
        help="DataLoader workers on the rmlab side (they collate and build the packed layout); TRL runs its default 0",
    )
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision on both sides (GPU)")
    p.add_argument(
        "--compile", action="store_true",
        help="rmlab's sides with model.compile=true (torch.compile of the backbone); the table adds each side's "
        "compiled graphs (a run that recompiled at every step would show one per step)",
    )
    p.add_argument("--attn", default="sdpa", help="attention implementation for both sides")
    p.add_argument(
        "--liger", action=argparse.BooleanOptionalAction, default=False,
        help="add an rmlab row per forward mode with model.liger=true (Liger's RMSNorm/RoPE/SwiGLU: a GPU and "
        "pip install 'rmlab[liger]'). Causal models only",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="the chip's dense peak, to report MFU")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a side is killed")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    preset = pre.parse_known_args(argv)[0].preset
    if preset in PRESETS:
        p.set_defaults(**PRESETS[preset])
    a = p.parse_args(argv)
    if a.ablation_modes is None:
        a.ablation_modes = a.modes
    for k in ("models", "workloads", "modes", "minilm_workloads", "ablations", "ablation_modes"):
        setattr(a, k, [x for x in getattr(a, k).split(",") if x])
    for k in ("trl_sizes", "rmlab_sizes"):
        setattr(a, k, [int(x) for x in str(getattr(a, k)).split(",") if x])
    bad = [x for x in a.ablations if x not in ABLATIONS]
    if bad:
        p.error(f"unknown ablation(s) {bad}; choose from {sorted(ABLATIONS)}")
    a.max_tokens = a.max_tokens or 8 * a.max_length
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.render:
        md = render(args.render)
        print(md)
        print(f"rewrote {args.render} and {Path(args.render).with_suffix('.md')}")
        return json.loads(Path(args.render).read_text())
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)  # also when --work is elsewhere (bench.json goes here)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.tokenizer and not Path(args.tokenizer).exists() and args.preset == "gpu":
        # The GPU preset's tokenizer: Qwen2.5's, copied next to the workloads so the GPU machine needs nothing else.
        shutil.copytree(Path(args.data_dir) / GPU_TOKENIZER, args.tokenizer)
    if args.prepare_only:
        args.models = []
        prep = prepare(args, work)
        print(f"prepared {sorted(prep['workloads'])} in {work} ({time.time() - t0:.0f}s); carry it to the GPU machine")
        if args.preset == "gpu":
            fetch_liger_wheel(work.parent / "wheels")
        return prep
    peak = args.peak_tflops
    if args.measure_peak and not peak:
        spec = dict(side="peak", device=args.device, bf16=args.bf16, threads=args.threads, seed=args.seed)
        peak = run_side({**spec, "model": "", "workload_name": ""}, work, args.timeout).get("peak_tflops")
        print(f"measured matmul peak: {peak} TFLOP/s ({'bf16' if args.bf16 else 'fp32'}, {args.device})", flush=True)
    prep = prepare(args, work)
    print(f"prepared in {time.time() - t0:.0f}s: " + json.dumps(prep["workloads"], default=str)[:600], flush=True)
    common = dict(
        threads=args.threads,
        seconds=args.seconds,
        warmup=args.warmup,
        seed=args.seed,
        lr=args.lr,
        device=args.device,
        bf16=args.bf16,
        attn=args.attn,
        max_length=args.max_length,
    )
    runs = []
    for wl in args.workloads:
        for model in args.models:
            info = prep["models"][model]
            if not info["causal"] and wl not in args.minilm_workloads:
                continue
            base = dict(
                common, model=model, workload=prep["workloads"][wl]["path"], workload_name=wl, model_dir=info["path"]
            )
            search = dict(mem_cap_gb=args.mem_cap_gb) if args.mem_cap_gb else {}
            sides = [dict(base, side="trl", batch_size=args.trl_batch_size, sizes=args.trl_sizes, **search)]
            rmlab = dict(
                base, side="rmlab", max_tokens=args.max_tokens, max_responses=64, sizes=args.rmlab_sizes,
                num_workers=args.rmlab_workers, **search, **({"compile": True} if args.compile else {}),
            )
            for mode in args.modes if info["causal"] else ["padded"]:
                sides.append(dict(rmlab, mode=mode))
                if args.liger and info["causal"]:
                    sides.append(dict(rmlab, mode=mode, liger=True))
            for ablation in args.ablations:
                for mode in args.ablation_modes if info["causal"] else ["padded"]:
                    sides.append(dict(rmlab, mode=mode, ablation=ablation, **ABLATIONS[ablation]))
            plain: dict[str, Any] = {}  # mode -> the plain rmlab row (its winning budget sizes the Liger row)
            for spec in sides:  # TRL and rmlab one after the other: the same minute of a noisy machine
                if spec.get("liger"):
                    spec = with_liger(spec, plain.get(spec["mode"]))
                res = run_side(spec, work, args.timeout)
                if spec["side"] == "rmlab" and not spec.get("liger") and not spec.get("ablation"):
                    plain[spec["mode"]] = res
                res.update(model=model, workload=wl, ablation=spec.get("ablation", ""))  # the name, not the file
                runs.append(res)
                print(
                    json.dumps(
                        {
                            k: res.get(k)
                            for k in (
                                "model",
                                "workload",
                                "side",
                                "mode",
                                "ablation",
                                "liger",
                                "comparisons_per_s",
                                "useful_token_fraction",
                                "peak_rss_mb",
                                "error",
                            )
                        }
                    ),
                    flush=True,
                )
    add_ratios(runs, peak, prep["models"], prep["workloads"])
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "missing"
    meta = {
        "command": "python -m rmlab.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores"
        + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ", no GPU"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl_version,
        "threads": args.threads,
        "precision": "bf16 mixed" if args.bf16 else "fp32",
        "seconds": args.seconds,
        "warmup": args.warmup,
        "peak_tflops": peak,
        "peak_measured": bool(args.measure_peak and not args.peak_tflops),
        "mem_cap_gb": args.mem_cap_gb,
        "preset": args.preset,
        "liger": bool(args.liger),
        "compile": bool(args.compile),
        "total_s": time.time() - t0,
    }
    result = {"meta": meta, "models": prep["models"], "workloads": prep["workloads"], "runs": runs}
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    (out / "bench.md").write_text(markdown(result))
    print(markdown(result))
    print(f"total {time.time() - t0:.0f}s; wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return result
