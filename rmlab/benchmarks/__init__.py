"""The benchmarks people report, scored as their authors score them: ``python eval.py benchmark=<name>``.

- ``rewardbench``: RewardBench v1 (allenai/reward-bench, ``filtered``): Chat, Chat Hard, Safety, Reasoning;
- ``rewardbench2``: RewardBench 2 (allenai/reward-bench-2): best-of-4 and Ties;
- ``rm_bench``: RM-Bench (THU-KEG/RM-Bench): easy / normal / hard by domain, the style-bias gap;
- ``best_of_k``: PPE-style best-of-K on any ratings or rankings data config.

``runner.run(cfg)`` is the entry; ``common`` reads rows and scores items through ``rmlab.score.Scorer``; one
module per benchmark holds its rules; ``report`` writes report.md, metrics.json, scores.jsonl and PNGs.
(``rmlab.bench`` is something else: the training-speed benchmark.)
"""
