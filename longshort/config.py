"""Typed profiles: one YAML file per profile, validated by one schema.

Every section is a pydantic model with ``extra="forbid"`` so that a typo is an
error that names the field and the file, never a silently ignored key.
Defaults live here, not in the code that reads the config.
"""

from __future__ import annotations

import json
import os
import re
import types
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from models.protocol import extract_boxed

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
REPO_DIR = CONFIG_DIR.parent
# vLLM refuses a sampling temperature above 2 (SamplingParams): a profile is refused at load, not on a GPU hours in
MAX_TEMPERATURE = 2.0


def repo_file(path: str) -> str:
    """``path`` as written when it exists from the working directory (or is absolute), else the same path
    under the repository (profiles name e.g. ``infra/deepspeed/zero3.json`` relative to it)."""
    if Path(path).is_absolute() or Path(path).exists():
        return path
    return str(REPO_DIR / path)


def _existing_file(path: str | None) -> str | None:
    if path is not None and not Path(repo_file(path)).is_file():
        raise ValueError(f"no such file {path!r} (relative paths are looked up from here, then from {REPO_DIR})")
    return path


def _expand_home(value: Any) -> Any:
    """``~/…`` in a path setting means the home folder, as in a shell (a hub id never starts with ``~``)."""
    if isinstance(value, (str, Path)) and str(value).startswith("~"):
        return type(value)(os.path.expanduser(str(value)))
    return value


LocalPath = Annotated[str | None, BeforeValidator(_expand_home)]  # a path, or a hub id where the field allows one
DeepSpeedFile = Annotated[str | None, BeforeValidator(_expand_home), AfterValidator(_existing_file)]


def zero_stage(path: str) -> int | None:
    """The ZeRO stage a DeepSpeed config file asks for (None if it names none or cannot be read)."""
    try:
        stage = json.loads(Path(repo_file(path)).read_text()).get("zero_optimization", {}).get("stage")
    except (OSError, ValueError, AttributeError):
        return None
    return stage if isinstance(stage, int) else None


class ConfigError(ValueError):
    """A profile that cannot be used, with the file and the field that are wrong."""


@cache
def _scalar_kind(annotation: Any) -> tuple[str | None, bool]:
    """``("bool" | "int" | "float" | None, is_list)`` for a field's annotation (``int | None``, ``list[int]`` count)."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        kinds = {_scalar_kind(a) for a in get_args(annotation) if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else (None, False)
    if origin is list:
        (item,) = get_args(annotation) or (Any,)
        kind, nested = _scalar_kind(item)
        return (kind, True) if not nested else (None, False)
    if annotation in (bool, int, float):
        return annotation.__name__, False
    return None, False


def _check_bool_number(kind: str | None, value: Any) -> None:
    if kind in ("int", "float") and isinstance(value, bool):
        what = "an integer" if kind == "int" else "a number"
        raise PydanticCustomError(f"{kind}_from_bool", f"Input should be {what}, not true/false")
    if kind == "bool" and isinstance(value, int | float) and not isinstance(value, bool):
        raise PydanticCustomError("bool_from_number", "Input should be true or false, not a number")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `rounds: true` as 1 and `bf16: 1` as true; YAML gives numbers and booleans
        # their own types, so either one where the other belongs is a mistake. Text ("1e-5": PyYAML reads it as
        # a string) still converts to a float, as strict mode would not allow.
        kind, is_list = _scalar_kind(cls.model_fields[info.field_name].annotation)
        if kind is not None:
            for item in value if is_list and isinstance(value, list) else [] if is_list else [value]:
                _check_bool_number(kind, item)
        return value


class RunConfig(Section):
    name: str = "demo"  # load_profile gives a profile that names none its file's stem
    seed: int = 0
    workspace: Annotated[Path, BeforeValidator(_expand_home)] = Path("workspace")
    # Prefect task runner for mapped stages (MC scoring shards): local threads, or a Dask/Ray
    # cluster through prefect-dask / prefect-ray (installed separately) at ``cluster_address``.
    task_runner: Literal["threads", "dask", "ray"] = "threads"
    max_workers: int = Field(1, ge=1)  # threads; >1 only helps when shards do not share the cores
    cluster_address: str | None = None


class DemoTaskConfig(Section):
    """The built-in arithmetic-chain task (DESIGN §6)."""

    n_train: int = Field(3000, ge=1)
    n_heldout: int = Field(300, ge=1)
    min_ops: int = Field(3, ge=1, le=8)
    max_ops: int = Field(4, ge=1, le=8)
    max_value: int = Field(19, ge=5, le=99)
    max_operand: int = Field(9, ge=1, le=20)
    seed: int = 1234
    verify_rate: float = Field(0.7, ge=0.0, le=1.0)  # each step is double-checked with this probability
    detour_rate: float = Field(0.5, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ops_range(self) -> DemoTaskConfig:
        if self.min_ops > self.max_ops:
            raise ValueError("min_ops must be <= max_ops")
        return self


class DataConfig(Section):
    """Where training problems and their long-CoT traces come from."""

    source: Literal["demo", "traces", "teacher"] = "demo"
    # traces: a jsonl of {problem, answer, response}; teacher: a jsonl of {problem, answer}
    path: LocalPath = None
    hub_id: str | None = None
    # the hub dataset's git revision (a commit, tag or branch): pin a commit, since the cache key holds the id
    # and this pin, not the data, so an unpinned id that changes upstream keeps the rows read the first time
    revision: str | None = None
    split: str = "train"
    heldout_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    max_examples: int | None = Field(None, ge=1)
    demo: DemoTaskConfig = DemoTaskConfig()
    # teacher model for source == "teacher" (e.g. deepseek-ai/DeepSeek-R1-Distill-Qwen-7B)
    teacher: LocalPath = None
    # the teacher hub id's git revision (commit, tag or branch), as base_model.revision: the cache key holds the id
    # and this pin, not the weights, so an unpinned teacher that changes upstream keeps the traces it wrote first
    teacher_revision: str | None = None
    teacher_max_new_tokens: int = Field(16384, ge=16)
    # DeepSeek's advice for R1 models: sample at 0.5-0.7 (0.6, top-p 0.95); greedy decoding loops
    teacher_temperature: float = Field(0.6, ge=0.0, le=MAX_TEMPERATURE)
    teacher_top_p: float = Field(0.95, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _source_needs(self) -> DataConfig:
        if self.source in ("traces", "teacher") and not (self.path or self.hub_id):
            raise ValueError(f"source '{self.source}' needs 'path' or 'hub_id'")
        if self.source == "teacher" and not self.teacher:
            raise ValueError("source 'teacher' needs 'teacher' (a hub id or a local path)")
        if self.teacher_revision is not None and not self.teacher:
            raise ValueError("teacher_revision pins the teacher's hub id: it needs 'teacher'")
        return self

    @field_validator("revision")
    @classmethod
    def _revision_needs_hub_id(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not (info.data.get("hub_id") and not info.data.get("path")):
            raise ValueError("pins a hub dataset: it needs 'hub_id' (and no 'path', which is read instead)")
        return value


class TokenizerConfig(Section):
    """A tokenizer built from the task's text (tiny models) or the base model's own."""

    vocab_size: int = Field(600, ge=300, le=65536)


class TinyModelConfig(Section):
    architecture: Literal["llama", "qwen2"] = "llama"
    hidden_size: int = Field(128, ge=8)
    intermediate_size: int = Field(512, ge=8)
    num_hidden_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(4, ge=1)
    max_position_embeddings: int = Field(1024, ge=64)

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


class ModelConfig(Section):
    """A model to start from: a tiny one built from a config, or a pretrained one."""

    source: Literal["tiny", "pretrained"] = "tiny"
    name_or_path: LocalPath = None  # hub id or local directory (pretrained)
    revision: str | None = None
    tiny: TinyModelConfig = TinyModelConfig()
    trust_remote_code: bool = False
    allow_pickle: bool = False  # .bin/.pt weights run arbitrary code on load
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="after")
    def _pretrained_needs_path(self) -> ModelConfig:
        if self.source == "pretrained" and not self.name_or_path:
            raise ValueError("source 'pretrained' needs 'name_or_path'")
        return self


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)  # [] would adapt nothing


class SFTConfig(Section):
    epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, ge=-1)  # -1: train for `epochs`
    learning_rate: float = Field(3e-3, gt=0)
    lr_scheduler: str = "cosine"  # a transformers SchedulerType value
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(512, ge=16)
    save_steps: int = Field(100, ge=1)
    logging_steps: int = Field(10, ge=1)
    bf16: bool = False
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None
    deepspeed: DeepSpeedFile = None  # path to a ZeRO config in infra/, used on CUDA only

    @field_validator("max_steps")
    @classmethod
    def _steps_or_epochs(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be -1 (train for `epochs`) or a positive number of steps")
        return value

    @model_validator(mode="after")
    def _lora_needs_whole_weights(self) -> SFTConfig:
        if self.lora is not None and self.deepspeed and zero_stage(self.deepspeed) == 3:
            raise ValueError(
                f"lora with the ZeRO-3 config {self.deepspeed!r}: merging the adapters needs whole weights, "
                "use infra/deepspeed/zero2.json (or no deepspeed) with LoRA"
            )
        return self

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, name: str) -> str:
        from transformers.trainer_utils import SchedulerType  # noqa: PLC0415 - only when a section is validated

        known = [s.value for s in SchedulerType]
        if name not in known:
            raise ValueError(f"unknown scheduler, expected one of {known}")
        return name


class GenerationConfig(Section):
    backend: Literal["auto", "transformers", "vllm"] = "auto"
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    # `longshort solve` and the served pair (a profile's default: evaluate.temperature); stages sample at their own
    temperature: float = Field(0.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)  # vLLM's share of the GPU (a pair splits it)
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = Field(1, ge=1)  # vLLM: GPUs one engine spreads a model over
    max_model_len: int | None = Field(None, ge=1)  # vLLM: context to reserve KV cache for (None: the model's)


# fields only `longshort solve` and the served pair read (per section): not part of any stage's cache key
SERVING_ONLY: dict[str, set[str]] = {"generation": {"temperature", "top_p"}}


class ProtocolConfig(Section):
    """The Long⊗Short turn protocol (DESIGN §2)."""

    max_turns: int = Field(6, ge=2)  # the long model opens and only a short turn answers: 1 could never answer
    max_new_tokens_long: int = Field(512, ge=1)
    max_new_tokens_short: int = Field(128, ge=1)


class BenchmarkSource(Section):
    """A benchmark: a jsonl path (or folder with ``<split>.jsonl``) or a hub dataset id."""

    source: str
    name: str | None = None  # default: the file stem / known hub id
    split: str = "test"
    limit: int | None = Field(None, ge=1)
    revision: str | None = None  # a hub id's git revision (commit, tag or branch); as data.revision

    @field_validator("revision")
    @classmethod
    def _revision_needs_hub_id(cls, value: str | None, info: ValidationInfo) -> str | None:
        from tasks.benchmarks import is_local_source  # noqa: PLC0415 - the one rule for path vs hub id

        source = info.data.get("source")
        if value is not None and source is not None and is_local_source(source):
            raise ValueError(f"pins a hub dataset, but source {source!r} is a local path")
        return value


HELDOUT = "heldout"  # the evaluation's name for the held-out split of the run's own problems (demo task or data)
_METRIC_NAME = re.compile(r"[\w\-. :/]+")  # what MLflow accepts in a metric name (mlflow.utils.validation)


class EvaluateConfig(Section):
    """Systems side by side on the same problems and seeds (DESIGN §3, Evaluate)."""

    n_problems: int = Field(300, ge=1)  # of the held-out split
    max_new_tokens: int = Field(512, ge=1)  # a single long-CoT model's whole response
    k: int = Field(1, ge=1)  # samples per problem (Mean@k, Pass@k)
    temperature: float = Field(0.0, ge=0.0, le=MAX_TEMPERATURE)  # > 0 when k > 1
    budgets: list[int] = [2048, 4096, 8192, 16384, 32768]  # token budgets for budget accuracy
    benchmarks: list[BenchmarkSource] = []

    @model_validator(mode="after")
    def _sampling(self) -> EvaluateConfig:
        if self.k > 1 and self.temperature == 0:
            raise ValueError("k > 1 samples need temperature > 0")
        if not self.budgets or any(b < 1 for b in self.budgets):
            raise ValueError("budgets must be positive token counts")
        if any(a >= b for a, b in zip(self.budgets, self.budgets[1:])):  # the table's columns, the plot's x axis
            raise ValueError(f"budgets must be increasing, each once, got {self.budgets}")
        if self.benchmarks:
            from tasks.benchmarks import benchmark_name  # noqa: PLC0415 - only when benchmarks are listed

            names = [b.name or benchmark_name(b.source) for b in self.benchmarks]
            if dupes := sorted({n for n in names if names.count(n) > 1}):
                raise ValueError(f"benchmarks share the name(s) {dupes}: give each a distinct `name`")
            if HELDOUT in names:
                raise ValueError(f"a benchmark is named {HELDOUT!r}, the name of the run's held-out split: give it another `name`")
            if bad := [n for n in names if not _METRIC_NAME.fullmatch(n)]:  # found out at track, after every stage
                raise ValueError(
                    f"benchmark name(s) {bad} cannot start an MLflow metric name: give each a `name` of letters, "
                    "digits, spaces and _ - . : /"
                )
        return self


class ChunkConfig(Section):
    """How traces are cut into thoughts (DESIGN §3, Chunk; tasks/chunking.py)."""

    method: Literal["rules", "llm"] = "rules"
    # None: the built-in discourse markers (tasks.chunking.MARKER_TYPES)
    markers: list[str] | None = None
    # A thought with fewer non-blank-edged characters joins its neighbour. The demo
    # teacher's shortest thought ("So the answer is 7.") is 19 characters.
    min_chars: int = Field(16, ge=0)
    llm_max_retries: int = Field(5, ge=0)  # tries after the first, each with a new seed
    # per answer; a trace of n steps gets at least 32·n (a block takes ~25 tokens of JSON), so a long trace's
    # block list is not cut off. An answer cut off at its cap is not retried (a retry would end the same way).
    llm_max_new_tokens: int = Field(2048, ge=16)
    llm_temperature: float = Field(0.6, gt=0.0, le=MAX_TEMPERATURE)  # > 0 so that a retry can answer differently

    @field_validator("markers")
    @classmethod
    def _markers_not_blank(cls, markers: list[str] | None) -> list[str] | None:
        blank = [m for m in markers or [] if not m.strip()]
        if blank:
            raise ValueError(f"markers must be non-blank strings, got {blank!r}")
        return markers


class ScoreConfig(Section):
    """Monte Carlo rollouts per prefix and the length decay (DESIGN §3, Score; tasks/importance.py)."""

    n_train_traces: int = Field(400, ge=1)  # training traces scored for the cold-start data
    n_heldout_traces: int = Field(100, ge=0)  # held-out traces scored for evaluation (AUROC on the demo)

    n_rollouts: int = Field(4, ge=1)  # N rollouts per prefix
    # δ(c) = exp(−c / L_delta), c in tokens. The demo's thinking is ~260 tokens (median, 600-token
    # vocabulary), so 512 keeps a whole trace at δ ≈ 0.6; real profiles should scale it with their
    # trace length (about twice the median thinking tokens, e.g. 8192 for R1-style traces).
    L_delta: float = Field(512.0, gt=0)
    temperature: float = Field(0.7, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(32, ge=1)  # the forced answer turn (and the probe's completion)
    # The start of the forced answer turn after P_k: "" lets the model open it; the demo uses
    # "<answer>The final number is \\boxed{" so that its tiny model answers from partial thinking
    answer_probe: str = ""
    shard_size: int = Field(32, ge=1)  # traces per generate call (and per Prefect map task)
    seed: int = 0


# The demo teacher's closing sentence (tasks.demo.answer_text); ``{answer}`` is the reference answer.
DEFAULT_FINAL_ANSWER_TEMPLATE = "The final number is \\boxed{{{answer}}}."


class ColdStartConfig(Section):
    """How scored traces become D_long and D_short (DESIGN §3, Cold start; tasks/cold_start.py)."""

    # s_k ∈ [−1, 1] is the discounted accuracy a thought adds (tasks/importance). 0.1 keeps a
    # thought that adds at least 10 points of discounted accuracy; restatements and checks add
    # ~0 and pay for their tokens, so they score slightly below 0 and go to the short model.
    # With few rollouts per prefix (N), Monte Carlo noise is ~1/sqrt(N): raise theta for small N.
    theta: float = Field(0.1, ge=-1.0, le=1.0)
    compressor: Literal["demo_terse", "model", "verbatim"] = "demo_terse"
    compressor_prompt: str | None = None  # None: tasks.cold_start.COMPRESSOR_PROMPT
    max_new_tokens: int = Field(256, ge=1)  # per compressed thought, model compressor only
    # The text that ends every episode; real profiles may say "The final answer is \\boxed{...}".
    final_answer_template: str = DEFAULT_FINAL_ANSWER_TEMPLATE

    @field_validator("final_answer_template")
    @classmethod
    def _template_boxes_answer(cls, template: str) -> str:
        try:
            text = template.format(answer="X")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"must be a format string with only {{answer}}: {exc}") from None
        if extract_boxed(text) != "X":
            raise ValueError(f"must put {{answer}} inside \\boxed{{}}, got {template!r}")
        return template


Efficiency = Literal["kimi", "truncation", "laser", "laser-d", "none"]


class RLConfig(Section):
    """GRPO settings for the alternating long/short RL stage (DESIGN §3, Multi-turn RL; tasks/rl.py)."""

    rounds: int = Field(1, ge=1)  # R: each round trains long, then short
    steps_per_round: int = Field(10, ge=1)  # optimizer steps per model per round
    prompts_per_step: int = Field(8, ge=1)
    group_size: int = Field(8, ge=2)  # G rollouts per problem
    learning_rate: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)  # AdamW; 0 as TRL's GRPO default (a zero-advantage step still moves the
    # weights by AdamW's momentum, as in TRL)
    kl_coef: float = Field(0.0, ge=0)  # β; 0 disables the reference model
    efficiency: Efficiency = "laser"
    length_target: int = Field(512, ge=1)  # L_T, in tokens
    alpha: float = Field(0.5, ge=0)
    length_of: Literal["episode", "trained"] = "episode"  # L = long+short tokens, or the trained model's
    correctness_weight: float = Field(1.0, ge=0)
    format_weight: float = Field(0.1, ge=0)
    efficiency_weight: float = Field(1.0, ge=0)
    easy_filter: bool = False  # keep problems whose pass rate under the starting pair is > 0.5
    cap_rollout_at_length_target: bool = False  # L_R = L_T: an episode stops generating there (cut off: wrong)
    temperature: float = Field(1.0, gt=0, le=MAX_TEMPERATURE)
    max_grad_norm: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(16, ge=1)  # sequences per forward pass
    # with β = 0, turns of episodes whose advantage is 0 (a group whose G rewards are all equal) add nothing to the
    # gradient: leave them out of the forward/backward (the same update; ``entropy`` is then over the turns kept)
    skip_zero_advantage: bool = True
    checkpoint_every: int = Field(10, ge=1)  # steps
    keep_checkpoints: int = Field(2, ge=1)
    n_problems: int = Field(512, ge=1)  # training problems the pool is drawn from (before the easy filter)
    probe_problems: int = Field(0, ge=0)  # the next training problems, a fixed batch the reward curve is measured on
    probe_every: int = Field(8, ge=1)  # steps between probes (also before the first step and after the last)
    lora: LoraConfig | None = None  # train LoRA adapters (fp32) on frozen weights, merged into the saved models
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (long episodes, big models)
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1)  # each of the two rollout engines' share of the GPU
    # vLLM rollouts: weight each trained token by min(π_train/π_vLLM, cap) (truncated importance sampling, Yao et
    # al. 2025), correcting for the engine's kernels sampling from a slightly different distribution; None: off
    vllm_importance_sampling_cap: float | None = Field(2.0, ge=1)
    seed: int = 0

    @field_validator("lora", mode="before")
    @classmethod
    def _adapters_without_dropout(cls, value: Any) -> Any:
        # the loss scores the sampled tokens in train mode: adapter dropout would score them under another policy
        # than the one that sampled them, so RL's adapters default to no dropout (a dropout written down stays)
        if isinstance(value, dict) and "dropout" not in value:
            return {**value, "dropout": 0.0}
        if isinstance(value, LoraConfig) and "dropout" not in value.model_fields_set:
            return value.model_copy(update={"dropout": 0.0})
        return value


class BaselineConfig(Section):
    """The single-model baseline trained with the truncation recipe (tasks/baseline.py): GRPO from the
    long-CoT base, reward = correct and length <= L_T, easy prompts, rollouts capped at L_R = L_T."""

    enabled: bool = True
    steps: int = Field(20, ge=1)  # optimizer steps
    prompts_per_step: int = Field(8, ge=1)
    group_size: int = Field(8, ge=2)  # G rollouts per problem
    learning_rate: float = Field(1e-6, gt=0)
    kl_coef: float = Field(0.0, ge=0)  # beta; 0 as TRL's default
    length_target: int = Field(4096, ge=1)  # L_T = L_R, in tokens
    easy_filter: bool = True  # keep problems the base model solves > half the time
    easy_samples: int = Field(4, ge=2)  # draws per problem to estimate that pass rate
    temperature: float = Field(1.0, gt=0, le=MAX_TEMPERATURE)
    checkpoint_every: int = Field(10, ge=1)  # steps
    n_problems: int = Field(512, ge=1)  # training problems the pool is drawn from (before the easy filter)
    micro_batch_size: int | None = Field(None, ge=1)  # sequences per forward/backward (None: the whole step's batch)
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1)  # TRL's colocated engine's share of the GPU
    bf16: bool = True  # on CUDA only
    deepspeed: DeepSpeedFile = None  # path to a ZeRO config in infra/, used on CUDA only
    seed: int = 0

    @model_validator(mode="after")
    def _micro_divides_batch(self) -> BaselineConfig:
        batch = self.prompts_per_step * self.group_size
        if self.micro_batch_size is not None and batch % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size={self.micro_batch_size} must divide prompts_per_step x group_size = {batch}"
            )
        return self


# MLflow stores with a registry (MLflow 3 refuses the ./mlruns file store); "+driver" suffixes are allowed
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")


def check_tracking_uri(uri: str) -> str:
    """``uri`` if MLflow can track and register models there, else ValueError saying what to use."""
    scheme = (uri.split("://", 1)[0] if "://" in uri else uri).split("+", 1)[0].lower()  # also bare `databricks`
    if scheme not in TRACKING_SCHEMES:
        raise ValueError(
            f"{uri!r} is not an MLflow store with a model registry: use http(s)://HOST:PORT, "
            "sqlite:///PATH/mlflow.db or postgresql://… (MLflow 3 no longer accepts a ./mlruns folder)"
        )
    return uri


class TrackingConfig(Section):
    tracking_uri: str | None = None  # default: sqlite:///<workspace>/mlflow.db
    artifact_location: str | None = None  # default: <workspace>/mlartifacts
    experiment: str = Field("longshort", min_length=1)  # MLflow refuses an empty name, at the end of a run
    register_models: bool = True
    base_model_name: str = "longshort-base"

    @field_validator("tracking_uri")
    @classmethod
    def _usable_store(cls, uri: str | None) -> str | None:
        return None if uri is None else check_tracking_uri(uri)


class Profile(Section):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    base_model: ModelConfig = ModelConfig()
    sft_base: SFTConfig = SFTConfig()
    sft_long: SFTConfig = SFTConfig()
    sft_short: SFTConfig = SFTConfig()
    generation: GenerationConfig = GenerationConfig()
    protocol: ProtocolConfig = ProtocolConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    chunk: ChunkConfig = ChunkConfig()
    score: ScoreConfig = ScoreConfig()
    cold_start: ColdStartConfig = ColdStartConfig()
    rl: RLConfig = RLConfig()
    baseline: BaselineConfig = BaselineConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _decode_as_evaluated(cls, data: Any) -> Any:
        # `longshort solve` and the served pair decode at generation.temperature; unless a profile sets it, that is
        # evaluate.temperature, the setting the promotion gate's accuracy was measured at (greedy decoding of an
        # R1-style model is also where it repeats itself)
        if not isinstance(data, dict):
            return data
        ev, gen = data.get("evaluate"), data.get("generation") or {}
        temperature = ev.temperature if isinstance(ev, EvaluateConfig) else ev.get("temperature") if isinstance(ev, dict) else None
        if temperature is None:
            return data
        if isinstance(gen, GenerationConfig) and "temperature" not in gen.model_fields_set:
            return {**data, "generation": gen.model_copy(update={"temperature": temperature})}
        if isinstance(gen, dict) and gen.get("temperature") is None:
            return {**data, "generation": {**gen, "temperature": temperature}}
        return data

    @model_validator(mode="after")
    def _rl_updates_survive(self) -> Profile:
        # AdamW on half-precision weights rounds an update of ~lr away (bf16 keeps 8 bits of mantissa): the
        # RL loop has no fp32 master copy, so it trains fp32 LoRA adapters on such weights instead.
        if self.base_model.dtype != "float32" and self.rl.lora is None:
            raise ValueError(
                f"rl.lora: base_model.dtype is {self.base_model.dtype}, and full-weight RL on half-precision "
                "weights loses its updates; set rl.lora (adapters train in float32) or base_model.dtype: float32"
            )
        if self.cold_start.compressor == "demo_terse" and self.data.source != "demo":
            raise ValueError(
                f"cold_start.compressor: 'demo_terse' reads the terse forms the demo teacher writes, and data.source is "
                f"'{self.data.source}'; use 'model' (the base model rewrites each thought) or 'verbatim'"
            )
        return self

    def section_dump(self, name: str) -> dict[str, Any]:
        """A JSON-able view of one section: the unit that cache keys hash. The generation section's
        :data:`SERVING_ONLY` fields are left out: no stage reads them, and keying on them would make a change of
        ``evaluate.temperature`` (their default) recompute every stage from synthesize on."""
        return getattr(self, name).model_dump(mode="json", exclude=SERVING_ONLY.get(name))


def profile_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix.lower() in (".yaml", ".yml"):
        return path
    return CONFIG_DIR / f"{name_or_path}.yaml"


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{key}' is not a section")
    node[keys[-1]] = value


def _split_override(item: str) -> tuple[str, str]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or "" in key.strip().split("."):
        raise ConfigError(f"override '{item}' must look like section.field=value")
    return key.strip(), raw


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a mapping that names a key twice is an error: PyYAML would keep the
    last value silently, so a second ``evaluate:`` section appended to a profile would replace the first."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._refuse_duplicate_keys(node, (), set())
        return super().construct_document(node)

    def _refuse_duplicate_keys(self, node: yaml.Node, where: tuple[str, ...], seen: set[int]) -> None:
        # on the composed nodes, before construction flattens `<<` merges (whose keys a mapping may override)
        if id(node) in seen:  # an alias to a node already checked (or to one of its ancestors)
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._refuse_duplicate_keys(item, (*where, str(i)), seen)
        elif isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    self._refuse_duplicate_keys(value_node, where, seen)
                    continue
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                if isinstance(key_node, yaml.ScalarNode):
                    key = self.construct_object(key_node)
                    if key in first:  # `yes` and `true`, `1` and `0x1` are the same key too
                        raise yaml.constructor.ConstructorError(
                            None, None,
                            f"duplicate key '{'.'.join((*where, name))}' (first at line {first[key].start_mark.line + 1}): "
                            "a key may appear once per mapping",
                            key_node.start_mark,
                        )  # fmt: skip
                    first[key] = key_node
                self._refuse_duplicate_keys(value_node, (*where, str(name)), seen)


def load_yaml(text: str) -> Any:
    """``text`` read as YAML by :class:`UniqueKeyLoader`: yaml.safe_load, refusing a key given twice."""
    loader = UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_overrides(overrides: list[str] | None, as_text: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``["sft_base.epochs=1", "run.seed=3"]`` -> nested dict (values parsed as YAML; keys in ``as_text`` kept
    as the text written)."""
    out: dict[str, Any] = {}
    for item in overrides or []:
        key, raw = _split_override(item)
        try:
            value = raw if key in as_text else load_yaml(raw)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
            raise ConfigError(f"override '{item}': not valid YAML: {problem}") from None
        _set_dotted(out, key, value)
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """``FILE:LINE:COLUMN: not valid YAML: problem`` in one line (PyYAML's own message spans several)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    return f"{where}: not valid YAML: {problem}"


def _field(section: str, e: Any) -> str:
    return ".".join(str(p) for p in (*(section.split(".") if section else ()), *e["loc"]))


def format_validation_error(
    path: Path, err: ValidationError, section: str = "", origins: list[str] | None = None
) -> str:
    """One line per error: ``FILE: field 'SECTION.FIELD': reason (got VALUE)``; ``origins`` (one per error, as
    :func:`load_profile` works them out) replaces ``FILE`` where an error is not the file's doing."""
    lines = []
    for i, e in enumerate(err.errors()):
        field = _field(section, e) or "(profile)"
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        else:
            msg = e["msg"]
            if "input" in e and not isinstance(e["input"], dict):
                msg += f" (got {e['input']!r})"
        lines.append(f"{origins[i] if origins else path}: field '{field}': {msg}")
    return "\n".join(lines)


def _same_error(e: Any) -> tuple[Any, ...]:
    """What makes two validation errors the same one: where, what, and the value unless it is a section's."""
    value = e.get("input")
    return tuple(e["loc"]), e["type"], e["msg"], None if isinstance(value, dict) else repr(value)


def _validate(data: dict[str, Any], overrides: list[str] | None, as_text: frozenset[str]) -> Profile:
    return Profile.model_validate(_merge(data, parse_overrides(overrides, as_text)))


def _blame(
    path: Path, data: dict[str, Any], items: dict[str, str], as_text: frozenset[str], err: ValidationError
) -> list[str]:
    """Who each error of the profile ``data`` with the overrides ``items`` ({dotted key: "key=value"}) is due to,
    first match wins: the override that set the field itself; the file, when the file alone has that error; an
    override that wrote the field's section; the overrides that each alone bring it about (a cross-field rule,
    such as base_model.dtype against rl.lora); the overrides without each of which it goes away (two that bring
    it about together); the overrides under the field; all of them."""
    if not items:
        return [str(path)] * len(err.errors())

    def errors_with(overrides: list[str]) -> set[tuple[Any, ...]]:
        try:
            _validate(data, overrides, as_text & {_split_override(o)[0] for o in overrides})
        except ValidationError as exc:
            return {_same_error(e) for e in exc.errors()}
        return set()

    def named(keys: list[str]) -> str:
        return ", ".join(f"--set {items[k]}" for k in keys)

    def _goes_away_without(key: str, e: Any) -> bool:
        # and no other error comes instead: an override that repairs a field of the file also "removes" a
        # cross-field error, which the field's error hid (the model's checks run once the fields are valid)
        rest = errors_with([v for k, v in items.items() if k != key])
        return _same_error(e) not in rest and rest <= all_errors

    all_errors = {_same_error(e) for e in err.errors()}
    file_errors = errors_with([])
    origins = []
    for e in err.errors():
        field = _field("", e)
        if field in items:
            origins.append(named([field]))
        elif _same_error(e) in file_errors:
            origins.append(str(path))
        elif above := [k for k in items if f"{field}.".startswith(f"{k}.")]:  # the override wrote its section
            origins.append(named(above))
        elif alone := [k for k in items if _same_error(e) in errors_with([items[k]])]:
            origins.append(named(alone))
        elif needed := [k for k in items if _goes_away_without(k, e)]:
            origins.append(named(needed))
        else:
            under = [k for k in items if not field or f"{k}.".startswith(f"{field}.")]
            origins.append(named(under or list(items)))
    return origins


def load_profile(name_or_path: str | Path, overrides: list[str] | None = None) -> Profile:
    """Load and validate a profile by name (``configs/NAME.yaml``) or path."""
    path = profile_path(name_or_path)
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"profile '{name_or_path}' not found ({path}); known profiles: {known}")
    try:
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_error(path, exc)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a profile must be a mapping of sections")
    if not data:  # the schema's defaults alone would run a pipeline nobody wrote down, recorded as "demo"
        raise ConfigError(f"{path}: the profile is empty; start from a copy of configs/demo.yaml")
    run = data.get("run")
    if run is None or (isinstance(run, dict) and "name" not in run):
        # the run's name is what MLflow records as its profile: a profile that names none is its file's
        data = {**data, "run": {**(run or {}), "name": path.stem}}
    items = {_split_override(item)[0]: item for item in overrides or []}
    as_text: frozenset[str] = frozenset()
    try:
        return _validate(data, overrides, as_text)
    except ValidationError as exc:
        # YAML reads `run.name=2024` or `revision=0123` as numbers: a text field takes the text as written
        as_text = frozenset(
            key for e in exc.errors() if e["type"] == "string_type"
            for key in [".".join(str(p) for p in e["loc"])] if key in items
        )  # fmt: skip
        error = exc
    if as_text:
        try:
            return _validate(data, overrides, as_text)
        except ValidationError as exc:
            error = exc
    raise ConfigError(format_validation_error(path, error, origins=_blame(path, data, items, as_text, error))) from None
