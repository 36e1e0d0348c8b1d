"""Name the valid keys when Hydra refuses an override of a key that is not in the config.

``python train.py model.poolng=last`` stops in Hydra's composition, before any rmlab code runs, with "Key
'poolng' is not in struct" and the advice to append it with ``+``. The keys that are valid there go unnamed.
``train.py`` and ``eval.py`` call ``report_unknown_keys`` when Hydra exits with status 1: it composes the
config again without the key overrides and, for each one whose key is not there, prints the keys of its parent
node and the closest match. This runs only after a failure, so start-up is unchanged.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf


def _key(override: str, groups: Mapping[str, frozenset[str]] = MappingProxyType({})) -> str | None:
    """The key a plain ``a.b=c`` (or top-level ``a=c``) override sets; None for a group choice (``groups``: the
    config groups' names), ``+``/``~``/``++`` keys and flags."""
    if override.startswith(("-", "+", "~")) or "=" not in override:
        return None
    key = override.split("=", 1)[0]
    return None if "/" in key or key.startswith("hydra.") or key == "hydra" or key in groups else key


def owning_group(key: str, cfg: Mapping) -> list[str]:
    """``[group.key]`` for the first top-level node of ``cfg`` that has ``key`` (``lr`` -> ``module.lr``), else []."""
    return [f"{g}.{key}" for g, v in cfg.items() if isinstance(v, Mapping) and key in v][:1]


def unknown_keys(cfg: dict, overrides: list[str], groups: Mapping[str, frozenset[str]] = MappingProxyType({})) -> list[str]:
    """One line per override whose key ``cfg`` (the composed config as plain, unresolved containers) lacks:
    the key, the closest valid one, the valid keys. ``groups``: each config group's name and its options."""
    lines = []
    for override in overrides:
        key = _key(override, groups)
        if key is None:
            continue
        value = override.split("=", 1)[1]
        parts = key.split(".")
        node, depth = cfg, 0
        while depth < len(parts) - 1 and isinstance(node, dict) and parts[depth] in node:
            node, depth = node[parts[depth]], depth + 1
        if not isinstance(node, dict) or parts[depth] in node:
            continue  # the key exists (or its parent is a value): not this kind of error
        where = ".".join(parts[:depth]) or "the top level"
        valid = sorted(str(k) for k in node.keys())
        prefix = ".".join(parts[:depth]) + "." if depth else ""
        close = [f"{g}={value}" for g in sorted(groups) if not depth and value in groups[g]][:1]  # modle=tiny_llama
        close = close or [prefix + k for k in difflib.get_close_matches(parts[depth], valid, n=1)]
        if not depth and not close:  # `lr=1e-5`: a key of one of the groups (module.lr)
            close = owning_group(parts[0], node)
        guess = f" (did you mean {close[0]}?)" if close else ""
        plus = f" To add a key the yaml does not list (another argument of its class): +{key}=..." if depth else ""
        lines.append(
            f"rmlab: {key} is not a key of {where}{guess}; its keys: {', '.join(valid)}.{plus}"
        )
    return lines


def _first_option(override: str) -> str:
    """``model=tiny_llama,minilm`` (a ``-m`` sweep over a group) -> ``model=tiny_llama``: compose takes one choice."""
    key, _, value = override.partition("=")
    if "," in value and not any(ch in value for ch in "[]{}()'\""):
        return f"{key}={value.split(',', 1)[0]}"
    return override


def name_unknown_keys(config_dir: str | Path, config_name: str, argv: list[str]) -> list[str]:
    """After Hydra refused ``argv``: the unknown-key lines of ``unknown_keys``, [] when composing fails anyway."""
    plain = [a for a in argv if not a.startswith("-")]
    groups = {p.name: frozenset(f.stem for f in p.glob("*.yaml")) for p in Path(config_dir).iterdir() if p.is_dir()}
    kept = [_first_option(a) for a in plain if _key(a, groups) is None and not a.split("=", 1)[0].startswith("hydra.")]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            cfg = compose(config_name, overrides=kept)
    except Exception:  # a group choice that does not exist, ...: Hydra's own message already says which
        return []
    return unknown_keys(OmegaConf.to_container(cfg, resolve=False), plain, groups)


def report_unknown_keys(config_dir: str | Path, config_name: str) -> None:
    """Print ``name_unknown_keys`` for this command line to stderr (called when Hydra exited with status 1)."""
    for line in name_unknown_keys(config_dir, config_name, sys.argv[1:]):
        print(line, file=sys.stderr)


def main_naming_unknown_keys(main: Callable[[], object], entry_file: str, config_name: str) -> None:
    """Run a Hydra entry point (``train.py``, ``eval.py``); when Hydra refuses the command line (exit status 1),
    name the valid keys of each override whose key is unknown, then exit as Hydra did."""
    try:
        main()
    except SystemExit as e:
        if e.code == 1:
            report_unknown_keys(Path(entry_file).parent / "conf", config_name)
        raise
