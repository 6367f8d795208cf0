"""``longshort-pair``: the two models and the turn protocol as one MLflow pyfunc (DESIGN §4).

``mlflow models serve -m models:/longshort-pair@production`` loads this class with
three artifacts: the long-thought model folder (``long``), the short-thought model
folder (``short``) and ``pair_config`` (a JSON :class:`PairSettings`). ``predict``
takes problems and runs :func:`models.protocol.run_episodes` on them, so the
served model answers exactly as ``longshort solve`` does.

Input through ``mlflow.pyfunc.load_model``: a DataFrame with a string ``problem`` column, a list of
``{"problem": str}`` records, or a ``{"problem": str | list[str]}`` dict. MLflow checks it against
:func:`signature` (a named ``problem`` column) before ``predict`` runs, so a bare string or a list of
strings is refused there ("Model is missing inputs ['problem']"); those work only when
:meth:`LongShortPair.predict` is called directly. Over HTTP (``mlflow models serve``):
``{"dataframe_records": [{"problem": …}]}``, ``{"dataframe_split": …}`` or ``{"inputs": {"problem": […]}}``.
Output: one row per problem with ``answer``, ``stop_reason``, tokens per role and the transcript.
"""

from __future__ import annotations

import json
import statistics
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from longshort.config import GenerationConfig, ModelConfig, ProtocolConfig
from models.protocol import Episode, run_episodes

LONG_ARTIFACT, SHORT_ARTIFACT, CONFIG_ARTIFACT = "long", "short", "pair_config"
OUTPUT_COLUMNS = ("problem", "answer", "stop_reason", "tokens", "long_tokens", "short_tokens", "n_turns", "transcript")
# The metrics a pair is judged and promoted on (longshort.registry's gate reads them from the candidate's run).
ACCURACY_METRIC = "pair_accuracy"
TOKENS_METRIC = "pair_mean_tokens"
ACCEPTED_INPUTS = (
    "a DataFrame with a 'problem' column, a {'problem': str | list[str]} dict or, called directly, "
    "a str or a list of str / {'problem': str} dicts"
)


class PairSettings(BaseModel):
    """How the served pair loads its models and runs the protocol (the profile's sections, frozen at registration)."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = ModelConfig()  # dtype and safety flags; the weights come from the artifacts
    generation: GenerationConfig = GenerationConfig(backend="transformers")
    protocol: ProtocolConfig = ProtocolConfig()
    seed: int = 0

    @classmethod
    def from_profile(cls, profile: Any) -> PairSettings:
        """The settings a profile evaluated the pair with, so the served pair answers the same way (its
        ``generation.temperature`` is ``evaluate.temperature`` unless the profile sets it)."""
        return cls(
            model=profile.base_model, generation=profile.generation, protocol=profile.protocol, seed=profile.run.seed
        )


def problems_of(model_input: Any) -> list[str]:
    """The problem texts in a pyfunc input.

    Accepted: a DataFrame with a ``problem`` column (a cell may hold a list of str), a
    ``{"problem": str | list[str]}`` dict, and, when
    ``predict`` is called directly (MLflow's signature refuses them first, see the module docstring),
    a str or a list / Series / 1-D array of str or ``{"problem": str}`` dicts. Every problem must be
    a non-empty string. Raises ValueError naming the accepted forms and what was received.
    """
    if isinstance(model_input, pd.DataFrame):
        if "problem" not in model_input.columns:
            raise ValueError(f"input DataFrame needs a 'problem' column, got columns {list(model_input.columns)}")
        # a cell holding a list of str counts as that many problems: MLflow makes {"problem": [...]} one such row
        values = [x for v in model_input["problem"] for x in (v if isinstance(v, (list, tuple, np.ndarray)) else [v])]
    elif isinstance(model_input, str):
        values = [model_input]
    elif isinstance(model_input, dict):
        if "problem" not in model_input:
            raise ValueError(f"input dict needs a 'problem' key, got keys {list(model_input)}; pass {ACCEPTED_INPUTS}")
        given = model_input["problem"]
        values = list(given) if isinstance(given, (list, tuple, pd.Series, np.ndarray)) else [given]
    elif isinstance(model_input, (list, tuple, pd.Series)) or (
        isinstance(model_input, np.ndarray) and model_input.ndim == 1
    ):
        values = [v.get("problem") if isinstance(v, dict) else v for v in model_input]
    else:
        raise ValueError(f"cannot read problems from type {type(model_input).__name__}; pass {ACCEPTED_INPUTS}")
    if not values:
        raise ValueError(f"the input holds no problems; pass {ACCEPTED_INPUTS}")
    bad = [i for i, v in enumerate(values) if not (isinstance(v, str) and v.strip())]
    if bad:
        shown = ", ".join(f"{i}: {type(values[i]).__name__} {values[i]!r:.40}" for i in bad[:5])
        raise ValueError(f"each input row needs a non-empty string 'problem'; rows {bad} do not ({shown})")
    return [str(v) for v in values]


def episode_rows(episodes: Sequence[Episode]) -> pd.DataFrame:
    """One output row per episode (the pyfunc's output schema, :data:`OUTPUT_COLUMNS`)."""
    rows = [
        {
            "problem": e.problem,
            "answer": e.answer if e.answer is not None else "",
            "stop_reason": e.stop_reason,
            "tokens": e.tokens(),
            "long_tokens": e.tokens("long"),
            "short_tokens": e.tokens("short"),
            "n_turns": len(e.turns),
            "transcript": e.transcript,
        }
        for e in episodes
    ]
    return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


def pair_metrics(episodes: Sequence[Episode], references: Sequence[str]) -> dict[str, float]:
    """``pair_accuracy`` (final answer math-verified against the reference; no answer is wrong),
    ``pair_mean_tokens`` (long + short tokens per episode), ``pair_well_formed`` and ``pair_n``."""
    from tasks.answers import is_correct  # noqa: PLC0415 - math-verify is only needed to score

    if len(episodes) != len(references) or not episodes:
        raise ValueError(f"need one reference per episode, got {len(references)} for {len(episodes)} episodes")
    correct = [is_correct(e.answer, ref) for e, ref in zip(episodes, references, strict=True)]
    return {
        ACCURACY_METRIC: sum(correct) / len(correct),
        TOKENS_METRIC: statistics.fmean(e.tokens() for e in episodes),
        "pair_well_formed": sum(e.well_formed for e in episodes) / len(episodes),
        "pair_n": float(len(episodes)),
    }


class LongShortPair(mlflow.pyfunc.PythonModel):
    """Loads the long and short models from the model's artifacts; ``predict`` runs whole episodes."""

    def load_context(self, context: Any) -> None:
        artifacts = context.artifacts
        self.load(artifacts[LONG_ARTIFACT], artifacts[SHORT_ARTIFACT], artifacts[CONFIG_ARTIFACT])

    def load(self, long_dir: str | Path, short_dir: str | Path, settings_file: str | Path) -> LongShortPair:
        """Load outside MLflow too (tests, ``longshort solve``-like use); returns self."""
        from longshort.io import same_tree  # noqa: PLC0415
        from models.generation import make_pair_backends  # noqa: PLC0415 - torch only when loading

        path = Path(settings_file)
        try:
            self.settings = PairSettings.model_validate(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a valid pair configuration: {exc}") from exc
        s = self.settings
        same = Path(long_dir).resolve() == Path(short_dir).resolve() or same_tree(Path(long_dir), Path(short_dir))
        self.long, self.short = make_pair_backends(long_dir, short_dir, s.model, s.generation, s.seed, same=same)
        # MLflow's scoring server runs each request in a thread of its own: one vLLM engine is not safe to call
        # from two threads, and the transformers backend seeds torch's global generator per call, so requests
        # take turns (a request's problems are one batched generation per turn anyway)
        self._solving = threading.Lock()
        return self

    def close(self) -> None:
        """Release both models (a vLLM engine's GPU memory); the pair cannot solve afterwards."""
        from models.generation import close_backend  # noqa: PLC0415

        backends = (getattr(self, "long", None), getattr(self, "short", None))
        for backend in {id(b): b for b in backends if b is not None}.values():
            close_backend(backend)

    def solve(self, problems: Sequence[str]) -> list[Episode]:
        p, g = self.settings.protocol, self.settings.generation
        with self._solving:
            return run_episodes(
                list(problems), self.long, self.short,
                max_turns=p.max_turns, max_new_tokens_long=p.max_new_tokens_long,
                max_new_tokens_short=p.max_new_tokens_short, temperature=g.temperature, top_p=g.top_p,
                seed=self.settings.seed,
            )  # fmt: skip

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:  # noqa: ANN001
        """Run one episode per problem in ``model_input``; returns :func:`episode_rows`.

        The hint is a DataFrame because the served model's signature (:func:`signature`) makes every input one;
        MLflow infers no schema from it, so the signature stays the one that validates requests."""
        return episode_rows(self.solve(problems_of(model_input)))


def signature() -> Any:
    """The pyfunc's input/output schema: a named string ``problem`` column in; :data:`OUTPUT_COLUMNS` out.

    MLflow 3 enforces it before ``predict``: a DataFrame, records or a ``{"problem": …}`` dict pass; a bare
    str or a list of str has no ``problem`` column and is refused (an unnamed column would admit them, but
    also any other column name, so the name stays)."""
    from mlflow.models.signature import ModelSignature  # noqa: PLC0415
    from mlflow.types.schema import ColSpec, Schema  # noqa: PLC0415

    types = {"tokens": "long", "long_tokens": "long", "short_tokens": "long", "n_turns": "long"}
    return ModelSignature(
        inputs=Schema([ColSpec("string", "problem")]),
        outputs=Schema([ColSpec(types.get(c, "string"), c) for c in OUTPUT_COLUMNS]),
    )
