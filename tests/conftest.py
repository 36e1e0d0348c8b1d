"""Shared fixtures: Hydra compose for tests, small models built from a config, tmp run dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import rmlab  # noqa: F401  registers ${rmlab.unique:} (conf/*.yaml's run dirs) for configs composed with Hydra's

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    # Tests never read or write the user's tokenization cache.
    os.environ["RMLAB_CACHE"] = str(tmp_path_factory.mktemp("rmlab_cache"))


def compose(overrides: list[str], output_dir: Path, config_name: str = "train"):
    """Compose a config the way `python train.py` would, with a fixed run dir."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hcompose(config_name=config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.data_dir = str(SHARED_DATA)
    return cfg


needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.exists(), reason="needs the real datasets in ../shared/data (CI has them)"
)

TINY_LLAMA = dict(
    model_type="llama",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


@pytest.fixture(scope="session")
def tiny_llama():
    import torch

    from rmlab.models import build_model

    torch.manual_seed(0)
    return build_model(config=TINY_LLAMA, tokenizer="byt5").eval()


@pytest.fixture(scope="session")
def minilm():
    from rmlab.models import build_model

    return build_model(name_or_path="minilm").eval()


@pytest.fixture
def one_thread():
    """One torch thread for the test: on a busy shared 2-core machine the thread pool spin-waits and
    tiny forwards run tens of times slower. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
