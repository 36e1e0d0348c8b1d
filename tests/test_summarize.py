"""rmlab.summarize: the varying overrides against the final metrics, mean ± std over seeds, a PNG."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from rmlab.summarize import collect, main, summarize, to_markdown

ROOT = Path(__file__).resolve().parents[1]


def _fake_sweep(root: Path) -> None:
    # 2 losses x 2 seeds; model=tiny_llama is the same in every run, so it must not be a column.
    accs = {("bt", 1): 0.60, ("bt", 2): 0.70, ("margin", 1): 0.80, ("margin", 2): 0.84}
    for i, ((loss, seed), acc) in enumerate(accs.items()):
        d = root / f"{i}_loss={loss},seed={seed}"
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- loss={loss}\n- seed={seed}\n- model=tiny_llama\n")
        (d / "metrics.json").write_text(json.dumps({"val_acc": acc, "metrics": {"val/acc": acc, "val/loss": 1 - acc}}))


def test_summary_of_a_2x2_sweep_by_hand(tmp_path):
    _fake_sweep(tmp_path)
    s = summarize(collect(tmp_path), ["val/acc", "val/loss", "val/missing"])
    assert s["keys"] == ["loss", "seed"] and s["config_keys"] == ["loss"]
    assert s["metrics"] == ["val/acc", "val/loss"]  # a metric no run has is dropped, not a column of n/a
    by = {g["config"]["loss"]: g for g in s["groups"]}
    assert by["bt"]["n"] == 2 and by["bt"]["val/acc"][0] == pytest.approx(0.65)
    assert by["bt"]["val/acc"][1] == pytest.approx(statistics.stdev([0.6, 0.7]))  # sample std: 0.0707
    assert by["margin"]["val/acc"] == pytest.approx((0.82, statistics.stdev([0.8, 0.84])))
    md = to_markdown(s)
    assert "| bt | 2 | 0.6500 ± 0.0707 |" in md and "tiny_llama" not in md


def test_cli_writes_table_csv_and_png(tmp_path, capsys):
    _fake_sweep(tmp_path)
    main([str(tmp_path), "--metrics", "val/acc"])
    assert "| margin | 2 | 0.8200 ± 0.0283 |" in capsys.readouterr().out
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (tmp_path / "summary.csv").read_text().splitlines()
    assert rows[0] == "run,loss,seed,val/acc" and len(rows) == 5


def test_a_runs_own_outputs_are_not_runs(tmp_path):
    """rmlab.bon writes <run>/bon/metrics.json into a job dir; the sweep still has its 4 runs and 2 configurations."""
    _fake_sweep(tmp_path)
    bon = tmp_path / "0_loss=bt,seed=1" / "bon"
    bon.mkdir()
    (bon / "metrics.json").write_text(json.dumps({"info": {"prompts": 32}, "summary": {}, "curves": []}))
    runs = collect(tmp_path)
    assert [r["dir"] for r in runs] == ["0_loss=bt,seed=1", "1_loss=bt,seed=2", "2_loss=margin,seed=1",
                                        "3_loss=margin,seed=2"]
    s = summarize(runs, ["val/acc"])
    assert s["keys"] == ["loss", "seed"] and [g["n"] for g in s["groups"]] == [2, 2]


def test_a_sweep_with_nested_job_dirs_names_each_run_by_its_path(tmp_path):
    """Sweeps written before job dirs were flat nest at every '/' of an override; each run keeps its full name."""
    for i, model in enumerate(["runs/a/export", "runs/b/export"]):
        d = tmp_path / f"{i}_model.name_or_path={model}"
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- model.name_or_path={model}\n")
        (d / "metrics.json").write_text(json.dumps({"metrics": {"acc": 0.5 + i / 10}}))
    runs = collect(tmp_path)
    assert [r["dir"] for r in runs] == ["0_model.name_or_path=runs/a/export", "1_model.name_or_path=runs/b/export"]
    assert [r["overrides"]["model.name_or_path"] for r in runs] == ["runs/a/export", "runs/b/export"]


def test_no_runs_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no run dirs"):
        summarize(collect(tmp_path))


@pytest.mark.slow
def test_real_2x2_multirun(tmp_path):
    """python train.py -m loss=bt,logexp seed=1,2 ..., then rmlab.summarize on the sweep dir."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "offline", "RMLAB_CACHE": str(tmp_path / "cache")}
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "loss=bt,logexp",
        "seed=1,2",
        "model=tiny_llama",
        "trainer.max_steps=2",
        "data.simulator.num_prompts=60",
        "export=false",
        "threads=1",
        f"hydra.sweep.dir={sweep}",
    ]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=400)
    out = subprocess.run(
        [sys.executable, "-m", "rmlab.summarize", str(sweep)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    s = summarize(collect(sweep))
    assert s["config_keys"] == ["loss"] and [g["n"] for g in s["groups"]] == [2, 2]
    by = {g["config"]["loss"]: g for g in s["groups"]}
    # logexp is BT written another way: same seeds, same data -> the same numbers
    assert by["bt"]["val/acc"][0] == pytest.approx(by["logexp"]["val/acc"][0], abs=1e-6)
    assert "val/ece" in s["metrics"]  # the eval callback's metrics reach the sweep table
    assert "| bt | 2 |" in out and (sweep / "summary.png").stat().st_size > 1000


def test_job_dir_name_is_one_flat_component():
    from rmlab.rundir import MAX_DIR_NAME, job_dir_name

    assert job_dir_name(0, "loss=bt,seed=1") == "0_loss=bt,seed=1"  # plain overrides: Hydra's name, unchanged
    assert job_dir_name(3, "model.name_or_path=/runs/a/export") == "3_model.name_or_path=_runs_a_export"
    assert job_dir_name(1, "") == "1_"
    long_a, long_b = (job_dir_name(2, f"model.name_or_path={'x/' * 150}{end}") for end in "ab")
    assert len(long_a.encode()) <= MAX_DIR_NAME and "/" not in long_a and long_a != long_b  # the hash tells them apart


@pytest.mark.slow
def test_benchmark_multirun_over_exports_with_slashes(tmp_path):
    """The documented leaderboard: eval.py -m benchmark=rewardbench model.name_or_path=<export a>,<export b>, both
    paths with '/', then rmlab.summarize: each job one flat dir under the sweep, one row per model."""
    env = {**os.environ, "WANDB_MODE": "offline", "RMLAB_CACHE": str(tmp_path / "cache")}
    exports = []
    for seed in (1, 2):  # the cheapest documented training (debug=fast), with its export on
        run = tmp_path / "runs" / f"seed{seed}"
        cmd = [sys.executable, "train.py", "debug=fast", "export=true", f"seed={seed}", "threads=1",
               "trainer.max_steps=3", f"hydra.run.dir={run}"]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
        exports.append(run / "export")
    sweep = tmp_path / "rb"
    cmd = [sys.executable, "eval.py", "-m", "benchmark=rewardbench", f"model.name_or_path={exports[0]},{exports[1]}",
           "benchmark.source=tests/fixtures/benchmarks/rewardbench_filtered.jsonl", "threads=1",
           f"hydra.sweep.dir={sweep}"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"], [p.name for p in jobs]  # two jobs, no nested folders
    for job, export in zip(jobs, exports):
        assert (job / "metrics.json").is_file() and (job / "report.md").is_file()
        assert f"model.name_or_path={export}" in (job / ".hydra" / "overrides.yaml").read_text()
        assert str(export).replace("/", "_")[:30] in job.name and len(job.name.encode()) <= 200  # long: cut, with a hash
    out = subprocess.run([sys.executable, "-m", "rmlab.summarize", str(sweep)], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    assert "## Leaderboard: rewardbench" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 2 and all(sum(str(e) in r for r in rows) == 1 for e in exports)  # each model once
    import csv

    with open(sweep / "summary.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert sorted(r["run"] for r in csv_rows) == [p.name for p in jobs]  # the run column names the flat job dirs
    assert (sweep / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_leaderboard_chart_names_each_model_by_rank_and_keeps_the_legend_off_the_bars(tmp_path, monkeypatch):
    """The chart of the benchmark leaderboard: bars in percent like the table, each model labelled by its rank and
    its name (a long path cut at its start behind an ellipsis, not mid-word), the legend below the axes. Before,
    labels were the name's last 40 characters ("l.name_or_path=/tmp/...") and the legend sat on the bars of the best
    models, which reach the top of the axes."""
    import matplotlib.figure

    from rmlab.summarize import leaderboard_chart

    long_a = "model.name_or_path=/tmp/some/where/deep/down/the/tree/run_qwen2_5_instruct/export"
    lb = {"benchmark": "rewardbench", "columns": ["score", "section/Chat"],
          "rows": [{"name": long_a, "score": 0.955, "section/Chat": 1.0},
                   {"name": "model.name_or_path=b", "score": 0.367, "section/Chat": 0.179}]}
    seen = {}
    save = matplotlib.figure.Figure.savefig

    def capture(fig, *a, **k):
        ax = fig.axes[0]
        fig.canvas.draw()
        seen["labels"] = [t.get_text() for t in ax.get_legend().get_texts()]
        seen["heights"] = [round(b.get_height(), 6) for b in ax.patches]
        seen["legend_top"] = ax.get_legend().get_window_extent().y1
        seen["axes_bottom"] = ax.get_window_extent().y0
        return save(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    out = leaderboard_chart(lb, tmp_path / "summary.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert seen["labels"] == ["1. \u2026" + long_a[-59:], "2. model.name_or_path=b"]
    assert seen["labels"][0].endswith("run_qwen2_5_instruct/export") and len(seen["labels"][0]) == 3 + 60
    assert seen["heights"] == [95.5, 100.0, 36.7, 17.9]  # percent, as summary.md
    assert seen["legend_top"] < seen["axes_bottom"]  # the legend is below the axes, off the bars


def test_a_finished_sweep_prints_the_summarize_command(tmp_path):
    """A -m sweep ended on its last job's summary (whose next: lines are about that one run): Hydra's
    on_multirun_end now prints how many runs finished and `python -m rmlab.summarize <sweep dir>`, which runs as
    printed on the sweep's flat job dirs."""
    import shlex

    from omegaconf import OmegaConf

    train_yaml = OmegaConf.load(ROOT / "conf" / "train.yaml")
    assert OmegaConf.select(train_yaml, "hydra.callbacks.sweep_hint._target_") == "rmlab.summarize.SweepHint"
    sweep = tmp_path / "multiruns" / "2026-12-05_20-07-29"
    for i, (loss, seed, acc) in enumerate([("bt", 1, 0.7), ("margin", 1, 0.6)]):
        job = sweep / f"{i}_loss={loss},seed={seed}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- loss={loss}\n- seed={seed}\n")
        (job / "metrics.json").write_text(json.dumps({"val_acc": acc, "metrics": {"val/acc": acc}}))
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from omegaconf import OmegaConf; from rmlab.summarize import SweepHint; "
         "SweepHint().on_multirun_end(OmegaConf.create({'hydra': {'sweep': {'dir': sys.argv[1]}}}))", str(sweep)],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert f"rmlab sweep finished: 2 run(s) in {sweep}" in out
    cmd = shlex.split(out.split("next: ", 1)[1])
    assert cmd[1:3] == ["-m", "rmlab.summarize"] and cmd[3] == str(sweep)
    from rmlab.summary import python_command

    assert cmd[0] == shlex.split(python_command())[0]  # the python that has rmlab (make test: .venv/bin/python)
    subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, check=True, capture_output=True)
    table = (sweep / "summary.md").read_text()
    assert "| bt |" in table and "| margin |" in table  # the command compared the sweep's two runs
