import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.factory import ModelLoadError, load_pretrained
from models.generation import TransformersBackend, single_token_id
from models.protocol import SYSTEM_PROMPTS, TAGS


def test_tokenizer_round_trip_on_demo_text(demo_tokenizer, demo_rows_small):
    for row in demo_rows_small[0][:20]:
        text = row["problem"] + "\n" + row["response"]
        assert demo_tokenizer.decode(demo_tokenizer(text)["input_ids"]) == text


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_tokenizer_round_trip_on_any_text(demo_tokenizer, text):
    assert demo_tokenizer.decode(demo_tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_tags_are_single_tokens_and_template_prompt_is_a_prefix(demo_tokenizer):
    for tag in TAGS:
        assert len(demo_tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1
    msgs = [{"role": "system", "content": SYSTEM_PROMPTS["base"]}, {"role": "user", "content": "Start with 3."}]
    prompt = demo_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = demo_tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": "<think>\nx"}], tokenize=False)
    assert full.startswith(prompt)
    assert demo_tokenizer(full)["input_ids"][: len(demo_tokenizer(prompt)["input_ids"])] == demo_tokenizer(prompt)["input_ids"]


def test_saved_tokenizer_and_model_load_back(tmp_path, tiny_model, demo_tokenizer):
    tiny_model.save_pretrained(tmp_path, safe_serialization=True)
    demo_tokenizer.save_pretrained(tmp_path)
    model, tok = load_pretrained(tmp_path)
    assert tok.chat_template == demo_tokenizer.chat_template
    ids = torch.tensor([demo_tokenizer("Start with 5.")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, tiny_model.eval()(ids).logits, atol=1e-5)


def test_pickle_weights_are_refused_unless_allowed(tmp_path, tiny_model, demo_tokenizer):
    from safetensors.torch import load_file

    tiny_model.save_pretrained(tmp_path)
    demo_tokenizer.save_pretrained(tmp_path)
    (weights,) = tmp_path.glob("*.safetensors")
    torch.save(load_file(weights), tmp_path / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelLoadError, match="pickle"):
        load_pretrained(tmp_path)
    model, _ = load_pretrained(tmp_path, allow_pickle=True)
    assert model.num_parameters() == tiny_model.num_parameters()


def test_empty_folder_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="no model weights"):
        load_pretrained(tmp_path)


def test_batched_generation_equals_one_at_a_time(tiny_model, demo_tokenizer):
    backend = TransformersBackend(tiny_model, demo_tokenizer, batch_size=8, device="cpu")
    prompts = [backend.chat_prompt("s", f"Start with {i}. Then (1) add {i + 1}.") for i in range(5)]
    prompts[2] += "<think>\nOkay, so we start"  # different lengths exercise left padding
    batched = backend.generate(prompts, max_new_tokens=12)
    single = [backend.generate([p], max_new_tokens=12)[0] for p in prompts]
    assert [b[0].text for b in batched] == [s[0].text for s in single]
    for (c,) in batched:
        assert c.n_tokens == 12 and c.finish_reason == "length"


def test_completion_cuts_at_stop_and_counts_model_tokens(demo_tokenizer, tiny_model):
    backend = TransformersBackend(tiny_model, demo_tokenizer, device="cpu")
    tok = demo_tokenizer
    ids = tok("Okay, so we start</think> with 3", add_special_tokens=False)["input_ids"]
    think_close = tok.convert_tokens_to_ids("</think>")
    c = backend._completion(ids, {tok.eos_token_id, think_close}, [], cap=50)
    assert c.text == "Okay, so we start</think>" and c.n_tokens == ids.index(think_close) + 1
    c = backend._completion(ids, {tok.eos_token_id}, ["we st"], cap=50)
    assert c.text == "Okay, so we st" and c.finish_reason == "stop"
    assert tok.decode(ids[: c.n_tokens]).startswith(c.text) and not tok.decode(ids[: c.n_tokens - 1]).startswith(c.text)
    eos = ids[:3] + [tok.eos_token_id] + ids[3:]
    c = backend._completion(eos, {tok.eos_token_id}, [], cap=50)
    assert c.text == tok.decode(ids[:3]) and c.n_tokens == 4
    c = backend._completion(ids[:5], {tok.eos_token_id}, [], cap=5)
    assert c.finish_reason == "length"


@pytest.mark.slow
def test_trained_model_stops_on_one_token_and_multi_token_stops(trained_tiny):
    """Greedy decoding is deterministic, so a stop taken from the free run must end the rerun exactly there:
    a one-token stop (a protocol tag is one token) through the EOS ids, a longer one through stop_strings."""
    from models.generation import make_backend
    from longshort.config import GenerationConfig, ModelConfig

    backend = make_backend(trained_tiny, ModelConfig(), GenerationConfig(backend="transformers"))
    prompt = backend.chat_prompt(SYSTEM_PROMPTS["base"], "Start with 4. Then (1) add 3, (2) subtract 2. What is the final number?")
    (free,) = backend.generate([prompt], max_new_tokens=40)[0]
    ids = list(free.token_ids)
    assert free.n_tokens == len(ids) == 40 and free.finish_reason == "length"
    tok = backend.tokenizer
    k = next(i for i in range(5, 40) if tok.decode(ids[:i]).count(tok.decode([ids[i]])) == 0)
    one = tok.decode([ids[k]])
    (stopped,) = backend.generate([prompt], max_new_tokens=40, stop=[one])[0]
    assert stopped.finish_reason == "stop" and stopped.n_tokens == k + 1 and stopped.text.endswith(one)
    assert free.text.startswith(stopped.text)
    multi = tok.decode(ids[k : k + 3])
    (cut,) = backend.generate([prompt], max_new_tokens=40, stop=[multi])[0]
    assert cut.finish_reason == "stop" and cut.text.endswith(multi) and free.text.startswith(cut.text)
    assert cut.n_tokens <= k + 3


def test_each_prompt_can_have_its_own_cap_and_gets_its_uncapped_turn_cut_there(tiny_model, demo_tokenizer):
    """One cap per prompt (an RL episode's remaining budget): each row is what the uncapped call would
    have written, cut at its own cap, greedy or sampled, with one or n samples per prompt."""
    backend = TransformersBackend(tiny_model, demo_tokenizer, batch_size=8, device="cpu")
    prompts = [backend.chat_prompt("s", f"Start with {i}. Then (1) add {i + 1}.") for i in range(3)]
    caps = [3, 12, 7]
    for sampling in ({}, {"temperature": 1.0, "n": 2, "seed": 5}):
        free = backend.generate(prompts, max_new_tokens=12, **sampling)
        capped = backend.generate(prompts, max_new_tokens=caps, **sampling)
        for f_row, c_row, cap in zip(free, capped, caps, strict=True):
            for f, c in zip(f_row, c_row, strict=True):
                assert c.token_ids == f.token_ids[:cap] and c.n_tokens == min(cap, f.n_tokens)
                assert c.finish_reason == ("length" if f.n_tokens >= cap else f.finish_reason)
    with pytest.raises(ValueError, match="2 max_new_tokens values for 3 prompts"):
        backend.generate(prompts, max_new_tokens=[3, 4])
    with pytest.raises(ValueError, match="at least 1"):
        backend.generate(prompts, max_new_tokens=[3, 0, 4])


def test_the_models_own_end_ids_end_a_turn_and_a_sampled_pad_id_is_kept(tiny_model, demo_tokenizer):
    """A hub model's generation_config may list several end ids (Qwen2.5-Instruct: <|im_end|> and
    <|endoftext|>); vLLM stops on each of them, so the transformers backend does too, counting the id. A special
    token's text is left out (vLLM skips special tokens); another's stays: the baseline's GRPO saves </answer>
    as an end id, and its responses must still end with it. Only trailing padding is dropped from a row: a pad
    id the model wrote is its own."""
    backend = TransformersBackend(tiny_model, demo_tokenizer, device="cpu")
    tok = demo_tokenizer
    prompt = backend.chat_prompt("s", "Start with 4. Then (1) add 3.")
    sampled = dict(max_new_tokens=20, temperature=1.0, seed=3)  # seeded: the rerun draws the same ids up to its end
    (free,) = backend.generate([prompt], **sampled)[0]
    ids = list(free.token_ids)
    k = next(i for i in range(1, 20) if ids[i] not in ids[:i] and ids[i] != tok.eos_token_id)
    tiny_model.generation_config.eos_token_id = [tok.eos_token_id, ids[k]]
    (ended,) = backend.generate([prompt], **sampled)[0]
    assert ended.token_ids == tuple(ids[: k + 1]) and ended.n_tokens == k + 1 and ended.finish_reason == "stop"
    assert ids[k] not in tok.all_special_ids and ended.text == tok.decode(ids[: k + 1], skip_special_tokens=False)
    answer_close = tok.convert_tokens_to_ids("</answer>")  # not a special token in the demo tokenizer
    c = backend._completion(ids[:3] + [answer_close, 7], {tok.eos_token_id, answer_close}, [], 50, silent={tok.eos_token_id})
    assert c.text.endswith("</answer>") and c.n_tokens == 4
    special = tok.convert_tokens_to_ids("<|system|>")  # a special end id: counted, no text
    c = backend._completion(ids[:3] + [special], {tok.eos_token_id, special}, [], 50, silent={tok.eos_token_id, special})
    assert c.text == tok.decode(ids[:3]) and c.n_tokens == 4
    pad = tok.pad_token_id
    assert pad != tok.eos_token_id
    written = ids[:3] + [pad] + ids[3:6]
    c = backend._completion(written + [pad, pad], {tok.eos_token_id}, [], cap=50)
    assert c.token_ids == tuple(written) and c.n_tokens == len(written)


def test_sampling_is_seeded_and_gives_n_samples(tiny_model, demo_tokenizer):
    backend = TransformersBackend(tiny_model, demo_tokenizer, batch_size=8, device="cpu")
    prompt = backend.chat_prompt("s", "Start with 9.")
    a = backend.generate([prompt], max_new_tokens=8, temperature=1.0, n=4, seed=1)
    b = backend.generate([prompt], max_new_tokens=8, temperature=1.0, n=4, seed=1)
    assert len(a[0]) == 4 and [c.text for c in a[0]] == [c.text for c in b[0]]
    assert len({c.text for c in a[0]}) > 1


def test_sampling_from_two_threads_at_once_gives_what_each_gets_alone(tiny_model, demo_tokenizer):
    """A thread task runner scores shards in threads; each call seeds torch's one global generator."""
    import threading

    backend = TransformersBackend(tiny_model, demo_tokenizer, batch_size=2, device="cpu")
    prompts = {s: [backend.chat_prompt("s", f"Start with {i}.") for i in range(4)] for s in (1, 2)}
    alone = {s: backend.generate(p, max_new_tokens=10, temperature=1.0, seed=s) for s, p in prompts.items()}
    for _ in range(3):
        got: dict[int, list] = {}
        threads = [
            threading.Thread(target=lambda s=s, p=p: got.__setitem__(s, backend.generate(p, max_new_tokens=10, temperature=1.0, seed=s)))
            for s, p in prompts.items()
        ]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == alone


def test_a_multi_token_stop_is_built_once_per_backend_and_ends_the_turn_where_transformers_does(
    demo_tokenizer, tiny_model, monkeypatch
):
    """generate(stop_strings=...) builds its criterion on every call, reading the whole vocabulary (1.3 s with
    Qwen2.5's tokenizer); the backend builds it once per set of stops, and stops where generate's own does."""
    import models.generation as gen

    built = []

    class Counted(gen.StopStringCriteria):
        def __init__(self, *args, **kwargs):
            built.append(args[1])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gen, "StopStringCriteria", Counted)
    backend = TransformersBackend(tiny_model, demo_tokenizer, batch_size=2, device="cpu")
    prompts = [backend.chat_prompt("s", f"Start with {i}. Then (1) add {i + 1}.") for i in range(3)]
    sampled = {"temperature": 1.0, "seed": 3}  # the untrained model's greedy text repeats one token
    (free,) = backend.generate(prompts[:1], max_new_tokens=24, **sampled)[0]
    ids, tok = list(free.token_ids), demo_tokenizer
    k = next(i for i in range(2, 22) if tok.decode(ids[i : i + 2]) not in tok.decode(ids[: i + 1]))
    multi = tok.decode(ids[k : k + 2])
    assert single_token_id(demo_tokenizer, multi) is None
    (cut,) = backend.generate(prompts[:1], max_new_tokens=24, stop=[multi], **sampled)[0]
    assert cut.finish_reason == "stop" and cut.text.endswith(multi) and free.text.startswith(cut.text)
    assert cut.token_ids == tuple(ids[: k + 2])  # at its first occurrence, as generate's own criterion stops
    rows = backend.generate(prompts, max_new_tokens=24, stop=[multi])
    assert len(rows) == 3 and built == [[multi]]  # one build for three calls (four batches)


def test_a_stop_string_wins_over_the_padding_when_pad_is_eos(demo_tokenizer, tiny_model):
    """A tokenizer without a pad token gets pad = eos (Llama-3.1): a row that stopped on a multi-token stop
    string is then padded with "eos" while the batch goes on; that padding is not the model's token."""
    import copy

    tok = copy.deepcopy(demo_tokenizer)
    tok.pad_token = tok.eos_token
    backend = TransformersBackend(tiny_model, tok, device="cpu")
    body = tok("Okay, so we start with 3", add_special_tokens=False)["input_ids"]
    c = backend._completion(body + [tok.pad_token_id] * 3, {tok.eos_token_id}, ["we st"], cap=50)
    assert c.text == "Okay, so we st" and tok.eos_token_id not in c.token_ids and c.n_tokens < len(body)
    c = backend._completion(body + [tok.eos_token_id], {tok.eos_token_id}, ["never"], cap=50)  # a real eos
    assert c.n_tokens == len(body) + 1 and c.text == tok.decode(body)


def test_sampling_ignores_extra_settings_in_the_models_generation_config(demo_tokenizer, tiny_model):
    """RL scores samples as log_softmax(logits / T): settings saved with a model (a hub model's
    repetition_penalty, here suppress_tokens, whose effect is plain to see) must not shape them."""
    backend = TransformersBackend(tiny_model, demo_tokenizer, device="cpu")
    plain = backend.generate(["Start with 3."], max_new_tokens=12, temperature=1.0, seed=4)
    saved = tiny_model.generation_config
    saved.suppress_tokens = [i for i in range(len(demo_tokenizer)) if i != 7]  # only token 7 could be sampled
    try:
        assert backend.generate(["Start with 3."], max_new_tokens=12, temperature=1.0, seed=4) == plain
        assert tiny_model.generation_config is saved  # put back after the call
    finally:
        saved.suppress_tokens = None
