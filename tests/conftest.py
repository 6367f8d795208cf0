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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
# the pipeline's stages, as its summary names them (tests/test_pipeline.py, tests/test_real_path.py)
STAGES = {"synthesize", "sft_base", "evaluate_base", "chunk", "score_shard", "merge_scores", "cold_start",
          "sft_long", "sft_short", "rl", "baseline", "evaluate"}  # fmt: skip

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# One OpenMP (torch intra-op) thread per process, children included: these models are tiny, and two threads
# spin-wait for each other whenever anything else wants a core (the Prefect server, a flow-run process, a
# service, a busy CI host). tests/test_real_path.py took 71 s with two threads and 77 s with one on an idle
# 2-core machine, but 466 s and 128 s beside two busy-looping processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# The checkout under test, first, for this process and every child (the kill -9 pipelines, the `longshort`
# command, dvc repro's stages): with a copy of the package installed elsewhere, a child would run that copy.
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])

# Property tests draw the same examples on every run and write no .hypothesis/ database;
# a test's own @settings(max_examples=...) still applies on top of this profile.
settings.register_profile("longshort", derandomize=True, database=None, deadline=None)
settings.load_profile("longshort")

# Where the tests' MLflow and S3 clients would otherwise be pointed from outside (the developer's shell, CI):
# a test sets these itself, through monkeypatch, when it wants a store or a bucket.
SERVICE_ENV_PREFIXES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_")


def service_env_names() -> list[str]:
    return [k for k in os.environ if k.startswith(SERVICE_ENV_PREFIXES)]


@pytest.fixture(scope="session", autouse=True)
def tests_import_this_checkout() -> None:
    import importlib.util

    for package in ("flows", "longshort", "models", "tasks"):
        spec = importlib.util.find_spec(package)
        where = Path(next(iter(spec.submodule_search_locations))).resolve().parent if spec else None
        assert where == REPO, f"{package} is imported from {where}, not the checkout {REPO}: run pytest from the checkout"


@pytest.fixture(scope="session", autouse=True)
def dvc_site_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """DVC keeps a per-repository site cache (state and index databases) in /var/tmp/dvc/repo/<hash>: one
    folder per scratch repository the tests create. ``DVC_SITE_CACHE_DIR`` (dvc/dirs.py) moves it under the
    session's temporary folder, for this process and the ``dvc`` commands it starts."""
    path = tmp_path_factory.mktemp("dvc-site-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DVC_SITE_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="session", autouse=True)
def no_outside_services() -> Iterator[None]:
    """No MLflow store or S3 credentials from the calling shell reach the session's module fixtures
    (a pipeline run would log to that store)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in service_env_names():
            mp.delenv(name)
        yield


def _mlflow_uris() -> tuple[str | None, str | None]:
    """MLflow's process-wide tracking and registry URIs (None, the defaults, while MLflow is not imported)."""
    tracking = sys.modules.get("mlflow.tracking._tracking_service.utils")
    registry = sys.modules.get("mlflow.tracking._model_registry.utils")
    return getattr(tracking, "_tracking_uri", None), getattr(registry, "_registry_uri", None)


@contextmanager
def mlflow_state_restored() -> Iterator[None]:
    """Put MLflow's tracking and registry URIs, and the service variables of ``os.environ``, back as they were.

    ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into ``os.environ`` (and
    ``set_registry_uri(None)`` leaves ``MLFLOW_REGISTRY_URI`` there), where the next
    ``longshort.tracking.tracking_uri`` would read it as the user's choice.
    """
    tracking, registry = _mlflow_uris()
    env = {k: os.environ[k] for k in service_env_names()}
    try:
        yield
    finally:
        if _mlflow_uris()[0] != tracking:
            from mlflow.tracking._tracking_service import utils as tracking_utils

            tracking_utils.set_tracking_uri(tracking)  # through the setter: it also resets MLflow's tracer
        if _mlflow_uris()[1] != registry:
            from mlflow.tracking._model_registry import utils as registry_utils

            registry_utils._registry_uri = registry
        for name in service_env_names():
            if name not in env:
                del os.environ[name]
        os.environ.update(env)


@pytest.fixture(scope="module", autouse=True)
def mlflow_state_per_module() -> Iterator[None]:
    """What a module's fixtures set (a pipeline run points MLflow at its workspace) ends with the module."""
    with mlflow_state_restored():
        yield


@pytest.fixture(autouse=True)
def mlflow_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts without MLflow/S3 service variables and leaves MLflow's URIs as it found them."""
    with mlflow_state_restored():
        for name in service_env_names():
            monkeypatch.delenv(name)
        yield


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
    """Stop a process started in its own session, and what it started: also when it has exited itself and left
    children behind (its group lives on while they do)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # the group is gone: nothing of it is left
        proc.wait()
        return
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


def chat_prompt(tokenizer, role: str, problem: str) -> str:
    """The chat prompt a model of ``role`` (long, short, base) gets for ``problem``."""
    from models.protocol import SYSTEM_PROMPTS

    messages = [{"role": "system", "content": SYSTEM_PROMPTS[role]}, {"role": "user", "content": problem}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def fit_completions(model_dir: str, examples, steps: int, out: Path) -> tuple[str, float]:
    """Plain next-token fitting (AdamW, lr 1e-2, full batch, seeded) of the model in ``model_dir`` on
    ``examples(tokenizer)``'s (prompt, completion) pairs, loss on the completions; saved to ``out``.
    Returns the folder and the last step's loss."""
    import torch

    from longshort.config import ModelConfig
    from models.factory import load_model

    model, tok = load_model(ModelConfig(), path=model_dir)
    seqs = []
    for prompt, completion in examples(tok):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(completion + tok.eos_token, add_special_tokens=False)["input_ids"]
        seqs.append((p + c, [0] * len(p) + [1] * len(c)))
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width))
    for k, (s, m) in enumerate(seqs):
        ids[k, : len(s)], attn[k, : len(s)], mask[k, : len(s)] = torch.tensor(s), 1, torch.tensor(m, dtype=torch.float)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1], -1)
        nll = -(logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]).sum() / mask[:, 1:].sum()
        opt.zero_grad()
        nll.backward()
        opt.step()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out), float(nll.detach())


def protocol_turns(rows):
    """(prompt, completion) pairs of protocol-shaped turns: long writes a terse thought, short the boxed answer."""
    from models.protocol import TURN_SEP, format_long_turn, format_short_turn

    def examples(tok):
        out = []
        for row in rows:
            long_turn = format_long_turn(row["thoughts"][1]["terse"])
            short_turn = format_short_turn(f"\\boxed{{{row['answer']}}}", final=True)
            out.append((chat_prompt(tok, "long", row["problem"]), long_turn))
            out.append((chat_prompt(tok, "short", row["problem"]) + long_turn + TURN_SEP, short_turn))
        return out

    return examples


@pytest.fixture(scope="session")
def protocol_pair(trained_tiny, demo_rows_small, tmp_path_factory) -> str:
    """``trained_tiny`` after a few seconds of plain next-token fitting on protocol-shaped turns.

    ``trained_tiny`` is fitted on whole long-CoT responses and never opens a ``<think>``
    turn under the long system prompt, so the short model would never get to play.
    """
    train, _ = demo_rows_small
    return fit_completions(trained_tiny, protocol_turns(train[:8]), 25, tmp_path_factory.mktemp("protocol-pair"))[0]
