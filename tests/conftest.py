"""Shared fixtures: seeded tiny models, a demo tokenizer, and one real Prefect server.

The Prefect server is started once per session on 127.0.0.1 with its own
PREFECT_HOME and SQLite database, and stopped by its PID at the end.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    import urllib.request

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


def stop_pid(proc: subprocess.Popen, timeout_s: float = 20) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """A real Prefect API server on loopback; the test process points at it."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{url}/health", 120, proc)
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_HOME: str(home)}):
            os.environ["PREFECT_API_URL"] = url
            yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        stop_pid(proc)
        log.close()


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module: faster than two for these tiny models on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def seeded():
    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def demo_rows_small():
    from longshort.config import DemoTaskConfig
    from tasks.demo import demo_rows

    return demo_rows(DemoTaskConfig(n_train=64, n_heldout=16, seed=5))


@pytest.fixture(scope="session")
def demo_tokenizer(demo_rows_small):
    from tasks.base_model import tokenizer_corpus
    from models.tokenizer import build_tokenizer

    train, _ = demo_rows_small
    return build_tokenizer(tokenizer_corpus(train), vocab_size=400)


@pytest.fixture()
def tiny_model(demo_tokenizer, seeded):
    from longshort.config import TinyModelConfig
    from models.factory import build_tiny_model

    cfg = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    return build_tiny_model(cfg, demo_tokenizer, seed=0)


@pytest.fixture()
def saved_tiny(tmp_path, tiny_model, demo_tokenizer) -> Path:
    """The tiny model and its tokenizer saved as a model folder."""
    folder = tmp_path / "model"
    tiny_model.save_pretrained(folder)
    demo_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def in_tmp_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch copy of the repository's config files, as the working directory."""
    for name in ("configs", "params.yaml", "dvc.yaml"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> str:
    """A tiny model fine-tuned for a few dozen steps on short demo traces: it writes protocol-shaped
    text (``<think>`` … ``</think>``, ``<answer>…\\boxed{}…</answer>``), not correct arithmetic."""
    import torch

    from longshort.config import DemoTaskConfig, ModelConfig, SFTConfig, TinyModelConfig, TokenizerConfig
    from tasks.base_model import train_base_model
    from tasks.demo import demo_rows

    torch.manual_seed(0)
    train, _ = demo_rows(DemoTaskConfig(n_train=128, n_heldout=16, seed=5, min_ops=2, max_ops=2, max_value=12,
                                        max_operand=5, verify_rate=0.3, detour_rate=0.3))  # fmt: skip
    cfg = ModelConfig(tiny=TinyModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512))
    sft = SFTConfig(epochs=5, learning_rate=1e-2, warmup_ratio=0.1, batch_size=16, save_steps=1000, logging_steps=10)
    out = tmp_path_factory.mktemp("trained-tiny")
    result = train_base_model(train, cfg, TokenizerConfig(vocab_size=400), sft, out, seed=0)
    return result.model_dir
