"""The real profiles' path, on the CPU: what `qwen2.5-7b` and `llama3.1-8b` do, with checkpoints small enough
for a test.

The base is a hub-style checkpoint loaded by path: a tiny Qwen2 model saved with a Qwen2.5-style ChatML
tokenizer and a generation config that samples (as Qwen2.5-Instruct ships them), or a tiny Llama model with a
Llama-3.1-style tokenizer. The traces come from a jsonl file or from a teacher model answering a jsonl of
problems, and the model itself compresses the unimportant thoughts. Unlike the demo tokenizer, these split
every protocol tag into several tokens and end a turn with their own token; the ChatML one has no BOS and adds a
default system prompt, the Llama one adds BOS both in its template and on its own and has no pad token.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from prefect.logging.handlers import APILogHandler

from conftest import SHARED_DATA, STAGES, fit_completions

pytestmark = pytest.mark.slow

CHATML = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _byte_bpe(texts: list[str], special: list[str]):
    """A 500-token byte-level BPE trained on ``texts``, with ``special`` as its special tokens (no tags)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _save_checkpoint(folder: Path, tok, architecture: str, generation_config) -> Path:
    """A tiny model of ``architecture`` for ``tok``, saved with it the way a hub checkpoint is."""
    from longshort.config import TinyModelConfig
    from models.factory import build_tiny_model

    tiny = TinyModelConfig(architecture=architecture, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048)  # fmt: skip
    model = build_tiny_model(tiny, tok)
    model.generation_config = generation_config
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _pipeline_in(work: Path, profile: str, overrides: list[str]) -> dict:
    """The flow run from ``work`` (its workspace is the profile's relative ``workspace``)."""
    from flows.pipeline import pipeline

    old = os.getcwd()
    os.chdir(work)
    try:
        return pipeline(profile=profile, overrides=overrides)
    finally:
        os.chdir(old)
        APILogHandler().flush()  # send the run's logs while the server is up, not at exit after it stopped


def _chatml_tokenizer(texts: list[str]):
    from transformers import PreTrainedTokenizerFast

    tok = _byte_bpe(texts, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML,
        clean_up_tokenization_spaces=False, model_max_length=32768,
    )  # fmt: skip


@pytest.fixture(scope="module")
def hub_style(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint folder, traces file)."""
    from transformers import GenerationConfig

    from longshort.config import DemoTaskConfig
    from tasks.demo import demo_rows

    root = tmp_path_factory.mktemp("hub-style")
    train, heldout = demo_rows(DemoTaskConfig(n_train=72, n_heldout=8, min_ops=2, max_ops=3, max_value=12,
                                              max_operand=5, seed=7))  # fmt: skip
    traces = root / "traces.jsonl"
    traces.write_text("".join(json.dumps({k: r[k] for k in ("problem", "answer", "response")}) + "\n"
                              for r in train + heldout))  # fmt: skip
    tok = _chatml_tokenizer([r["problem"] + "\n" + r["response"] for r in train + heldout])
    end = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    sampling = GenerationConfig(eos_token_id=end, pad_token_id=tok.pad_token_id, do_sample=True, temperature=0.7,
                                top_p=0.8, top_k=20, repetition_penalty=1.05)  # fmt: skip
    return _save_checkpoint(root / "Qwen2.5-tiny", tok, "qwen2", sampling), traces


LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def llama_style(hub_style) -> Path:
    """A Llama-3.1-style checkpoint: the tokenizer adds BOS on its own (a post-processor) and the chat template
    writes it too, ``<|eot_id|>`` ends a turn, and there is no pad token."""
    from tokenizers import processors
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    _, traces = hub_style
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = _byte_bpe([r["problem"] + "\n" + r["response"] for r in _jsonl(traces)], special)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                 chat_template=LLAMA3, clean_up_tokenization_spaces=False)  # fmt: skip
    end = [hf.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    sampling = GenerationConfig(bos_token_id=bos, eos_token_id=end, do_sample=True, temperature=0.6, top_p=0.9)
    return _save_checkpoint(traces.parent / "Llama-3.1-tiny", hf, "llama", sampling)


# The real profile's sizes cut to seconds; everything else (bf16 weights, LoRA RL, the DeepSpeed file, which
# is skipped without CUDA, k samples per problem, benchmark files) is the profile as written.
SCALED_DOWN = [
    "generation.backend=transformers", "generation.batch_size=16", "generation.max_new_tokens=64",
    *(f"{s}.{k}" for s in ("sft_base", "sft_long", "sft_short") for k in ("epochs=1", "grad_accum=2")),
    "score.n_train_traces=12", "score.n_heldout_traces=4", "score.n_rollouts=2", "score.shard_size=8",
    "score.max_new_tokens=16", "protocol.max_new_tokens_long=48", "protocol.max_new_tokens_short=24",
    "rl.steps_per_round=1", "rl.rounds=1", "rl.prompts_per_step=2", "rl.group_size=2", "rl.n_problems=8",
    "rl.probe_problems=2", "rl.probe_every=1", "rl.length_target=64", "rl.micro_batch_size=2", "rl.checkpoint_every=1",
    "rl.easy_filter=false", "baseline.steps=1", "baseline.prompts_per_step=2", "baseline.group_size=2",
    "baseline.n_problems=8", "baseline.easy_filter=false", "baseline.micro_batch_size=2", "baseline.length_target=64",
    "baseline.checkpoint_every=1", "evaluate.n_problems=4", "evaluate.max_new_tokens=64", "evaluate.k=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def real_run(prefect_server, hub_style, tmp_path_factory):
    checkpoint, traces = hub_style
    return _pipeline_in(tmp_path_factory.mktemp("real-path"), "smoke", [
        "base_model.source=pretrained", f"base_model.name_or_path={checkpoint}",
        "data.source=traces", f"data.path={traces}", "cold_start.compressor=model",
    ])  # fmt: skip


@pytest.fixture(scope="module")
def teacher_run(prefect_server, hub_style, tmp_path_factory):
    """``data.source: teacher``: a teacher (the checkpoint fitted to 8 problems' traces, so that it answers most
    of them) writes the training traces; the held-out problems get none."""
    from models.protocol import SYSTEM_PROMPTS

    checkpoint, traces = hub_style
    rows = _jsonl(traces)[:8]
    work = tmp_path_factory.mktemp("teacher-path")
    problems = work / "problems.jsonl"
    problems.write_text("".join(json.dumps({"problem": r["problem"], "answer": r["answer"]}) + "\n" for r in rows))

    def examples(tok):
        system = {"role": "system", "content": SYSTEM_PROMPTS["base"]}
        return [(tok.apply_chat_template([system, {"role": "user", "content": r["problem"]}], tokenize=False,
                                         add_generation_prompt=True), r["response"]) for r in rows]  # fmt: skip

    teacher, _ = fit_completions(str(checkpoint), examples, 300, work / "teacher")
    return _pipeline_in(work, "smoke", [
        "base_model.source=pretrained", f"base_model.name_or_path={checkpoint}", "data.source=teacher",
        f"data.path={problems}", f"data.teacher={teacher}", "data.teacher_max_new_tokens=400",
        "data.heldout_fraction=0.25", "cold_start.compressor=model",
    ])  # fmt: skip


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_stage_runs_on_a_hub_style_checkpoint(real_run, hub_style):
    from transformers import AutoTokenizer

    assert real_run["cache_hits"] == 0 and set(real_run["recomputed"]) == STAGES
    # the trained models keep the checkpoint's own tokenizer, template and end-of-turn token
    for stage, sub in (("sft_base", "model"), ("rl", "long"), ("rl", "short")):
        tok = AutoTokenizer.from_pretrained(Path(real_run["stage_dirs"][stage]) / sub)
        assert (tok.eos_token, tok.bos_token, tok.chat_template) == ("<|im_end|>", None, CHATML), (stage, sub)
    assert len(tok("</rethink>", add_special_tokens=False)["input_ids"]) > 1  # a tag is several tokens here


def test_the_cold_start_data_are_in_the_checkpoints_protocol_shape(real_run, hub_style):
    from models.protocol import parse_transcript

    answers = {r["problem"]: r["answer"] for r in _jsonl(hub_style[1])}
    folder = Path(real_run["stage_dirs"]["cold_start"])
    d_long, d_short = _jsonl(folder / "d_long.jsonl"), _jsonl(folder / "d_short.jsonl")
    assert d_long and d_short and real_run["metrics"]["cold_start_n_episodes"] == len({r["id"] for r in d_long})
    assert all(r["completion"].startswith("<think>\n") and r["completion"].endswith("\n</think>") for r in d_long)
    assert all(r["completion"].startswith("<answer>") for r in d_short)
    finals = [r for r in d_short if r["completion"].endswith("</answer>")]
    assert len(finals) == real_run["metrics"]["cold_start_n_episodes"]
    for row in finals:  # every episode parses and ends with the trace's answer
        turns = parse_transcript(row["history"] + row["completion"])
        assert turns[-1].kind == "final" and turns[-1].answer == answers[row["problem"]]


def test_evaluation_records_every_system_and_the_registered_pair_answers(real_run):
    import mlflow
    import pandas as pd

    folder = Path(real_run["stage_dirs"]["evaluate"])
    records = _jsonl(folder / "records.jsonl")
    assert {r["system"] for r in records} == {"long-CoT base", "truncation baseline", "Long⊗Short SFT",
                                              "Long⊗Short RL"}  # fmt: skip
    assert all(r["tokens_long"] + r["tokens_short"] > 0 for r in records)
    mlflow.set_tracking_uri(real_run["tracking_uri"])
    pair = mlflow.pyfunc.load_model(f"models:/longshort-pair/{real_run['pair_version']}")
    out = pair.predict(pd.DataFrame({"problem": ["Start with 3. Then (1) add 2. What is the final number?"]}))
    row = out.iloc[0]
    assert int(row["tokens"]) == int(row["long_tokens"]) + int(row["short_tokens"]) > 0
    # the smoke budget trains nothing useful: what matters is that the protocol ran and ended the episode, with
    # each turn inside its cap in this tokenizer's tokens (smoke: 48 per long turn, 4 turns)
    assert row["stop_reason"] in ("answer", "turn_cap", "malformed") and 1 <= int(row["n_turns"]) <= 4
    assert int(row["long_tokens"]) <= 48 * 2


def test_a_teacher_writes_the_training_traces_and_the_held_out_problems_are_evaluated(teacher_run):
    assert teacher_run["cache_hits"] == 0 and set(teacher_run["recomputed"]) == STAGES
    data = Path(teacher_run["stage_dirs"]["synthesize"])
    train, heldout = _jsonl(data / "train.jsonl"), _jsonl(data / "heldout.jsonl")
    assert train and heldout and len(train) + len(heldout) <= 8
    assert all(r["response"].startswith("<think>\n") and r["response"].endswith("</answer>") for r in train)
    assert all("response" not in r for r in heldout)  # the teacher answers the training problems only
    m = teacher_run["metrics"]
    assert m["chunk_train_traces"] == len(train) and m["chunk_heldout_traces"] == 0
    records = _jsonl(Path(teacher_run["stage_dirs"]["evaluate"]) / "records.jsonl")
    assert sorted(r["problem_id"] for r in records if r["system"] == "long-CoT base") == sorted(r["id"] for r in heldout)


def test_a_teacher_that_answers_nothing_right_stops_synthesis_with_a_data_error(hub_style, tmp_path):
    """Before, an empty training split went on to SFT, where TRL failed with a bare StopIteration."""
    from longshort.config import load_profile
    from longshort.io import DataError
    from tasks.synthesize import synthesize

    checkpoint, traces = hub_style
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"problem": r["problem"], "answer": r["answer"]}) + "\n"
                                for r in _jsonl(traces)[:6]))  # fmt: skip
    cfg = load_profile("smoke", ["base_model.source=pretrained", f"base_model.name_or_path={checkpoint}",
                                 "data.source=teacher", f"data.path={problems}", f"data.teacher={checkpoint}",
                                 "data.teacher_max_new_tokens=24", "cold_start.compressor=model"])  # fmt: skip
    with pytest.raises(DataError, match=rf"data.teacher {checkpoint}: none of its \d+ traces for {problems} ended with "
                                        r"the right boxed answer within data.teacher_max_new_tokens=24"):  # fmt: skip
        synthesize(cfg.data, tmp_path / "out", cfg.generation, cfg.base_model)
    assert not (tmp_path / "out" / "train.jsonl").exists()
    everything_held_out = cfg.data.model_copy(update={"heldout_fraction": 0.999})
    with pytest.raises(DataError, match="all 6 problems fell in the held-out split"):
        synthesize(everything_held_out, tmp_path / "out", cfg.generation, cfg.base_model)


def test_the_llama_profile_scaled_down_runs_every_stage_with_one_bos(prefect_server, llama_style, hub_style, tmp_path):
    from transformers import AutoTokenizer

    from models.generation import prompt_token_ids
    from models.protocol import SYSTEM_PROMPTS

    _, traces = hub_style
    amc = SHARED_DATA / "benchmarks" / "amc23.jsonl"
    run = _pipeline_in(tmp_path, "llama3.1-8b", [
        f"base_model.name_or_path={llama_style}", "data.source=traces", f"data.path={traces}",
        "data.max_examples=60", *SCALED_DOWN, f"evaluate.benchmarks=[{{source: {amc}, limit: 2}}]",
    ])  # fmt: skip
    assert run["cache_hits"] == 0 and set(run["recomputed"]) == STAGES
    records = _jsonl(Path(run["stage_dirs"]["evaluate"]) / "records.jsonl")
    assert {r["benchmark"] for r in records} == {"heldout", "amc23"}
    assert {r["sample"] for r in records} == {0, 1}  # k = 2
    tok = AutoTokenizer.from_pretrained(Path(run["stage_dirs"]["rl"]) / "long")
    assert (tok.bos_token, tok.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    prompt = tok.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPTS["long"]},
                                      {"role": "user", "content": "1+1?"}], tokenize=False, add_generation_prompt=True)  # fmt: skip
    assert tok(prompt)["input_ids"].count(tok.bos_token_id) == 2  # what a default tokenize would feed the model
    assert prompt_token_ids(tok, [prompt])[0].count(tok.bos_token_id) == 1  # what every backend feeds it
