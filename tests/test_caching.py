"""Stage cache keys: inputs plus the source of everything that decides a stage's record."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import flows.stages
from flows.caching import STAGE_HELPERS, STAGE_MODULES, STAGE_TASKS, stage_key, stage_sources

ROOT = Path(__file__).resolve().parent.parent
OURS = ("flows", "tasks", "models", "longshort")
# Imported by stage code, yet left out of the keys (the closure does not go through them either):
NOT_KEYED = {
    "longshort.config": "validates sections whose values, defaults included, are already in the key",
    "flows.caching": "builds the keys: keying it on itself would change every key with any list edit",
    "longshort.records": "holds what a stage returns; an old record of other fields fails to load",
    "longshort.memory": "measures the peak_rss_mb metric, which decides no output",
}


def test_every_stage_key_covers_its_modules_and_its_task_in_flows_stages():
    assert STAGE_TASKS.keys() == STAGE_MODULES.keys()
    for stage, task_name in STAGE_TASKS.items():
        task = getattr(flows.stages, task_name)
        assert task.name == stage.replace("sft_long", "sft_role").replace("sft_short", "sft_role")
        sources = stage_sources(stage)
        assert sources[f"flows.stages:{task_name}"] == inspect.getsource(task.fn)
        assert set(STAGE_MODULES[stage]) < sources.keys() and "flows.stages:_run_stage" in sources


def _module_file(module: str) -> Path | None:
    for path in (ROOT / f"{module.replace('.', '/')}.py", ROOT / module.replace(".", "/") / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(node: ast.AST, module: str) -> set[str]:
    """Our modules that ``node`` imports, at any depth (lazy imports inside functions too), except under
    ``if TYPE_CHECKING:``, which never runs. ``from pkg import name`` counts ``pkg.name`` when that is a module."""
    found: set[str] = set()
    todo = list(ast.iter_child_nodes(node))
    while todo:
        n = todo.pop()
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            continue
        todo += ast.iter_child_nodes(n)
        if isinstance(n, ast.Import):
            found |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            base = module.rsplit(".", n.level)[0] + (f".{n.module}" if n.module else "") if n.level else n.module
            found |= {base} | {f"{base}.{a.name}" for a in n.names}
    return {m for m in found if m.split(".")[0] in OURS and m not in OURS and _module_file(m)}


def _import_closure(stage: str) -> set[str]:
    """Our modules a stage's code runs: the imports of its task in flows/stages.py, of the flows.stages functions
    it calls (``_run_stage`` and what that calls) and of flows.stages itself, then theirs, transitively."""
    tree = ast.parse((ROOT / "flows/stages.py").read_text())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    top = ast.Module(body=[n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)], type_ignores=[])
    modules, called, todo = _imports(top, "flows.stages"), set(), [STAGE_TASKS[stage], *STAGE_HELPERS]
    while todo:
        name = todo.pop()
        if name not in called:
            called.add(name)
            modules |= _imports(functions[name], "flows.stages")
            todo += [n.id for n in ast.walk(functions[name]) if isinstance(n, ast.Name) and n.id in functions]
    seen, todo = set(), list(modules)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            if module not in NOT_KEYED:
                todo += _imports(ast.parse(_module_file(module).read_text()), module)
    return seen - NOT_KEYED.keys()


def test_every_stage_key_covers_the_modules_its_code_imports():
    """An edit of any module a stage runs (models.factory sets pad/eos ids and dtype for every stage that loads a
    model; longshort.io writes every jsonl) must recompute that stage, not reuse its old result."""
    closures = {stage: _import_closure(stage) for stage in STAGE_TASKS}
    missing = {stage: sorted(closure - set(STAGE_MODULES[stage])) for stage, closure in closures.items()}
    assert missing == {stage: [] for stage in STAGE_TASKS}
    assert {"models.factory", "models.generation", "longshort.io"} <= closures["synthesize"]  # data.source teacher
    assert "models.factory" in closures["evaluate"] and "models.factory" in closures["cold_start"]
    assert all("longshort.io" in c and "longshort.config" not in c for c in closures.values())


def test_a_changed_stage_task_changes_that_stage_key_only(monkeypatch):
    inputs = {"rl": {"steps_per_round": 1}, "workspace": "ws"}
    before = {s: stage_key(s, inputs) for s in ("rl", "evaluate", "baseline")}
    # stands in for an edit of rl_task's body (what its record holds): another function's source
    monkeypatch.setattr(flows.stages, "rl_task", flows.stages.baseline_task)
    after = {s: stage_key(s, inputs) for s in before}
    assert after["rl"] != before["rl"]
    assert after["evaluate"] == before["evaluate"] and after["baseline"] == before["baseline"]
    assert stage_key("rl", inputs) == after["rl"]  # deterministic


def test_files_read_by_path_are_keyed_by_their_bytes(tmp_path):
    """Editing a traces file or a benchmark in place must recompute the stages that read it."""
    from flows.stages import file_digests
    from longshort.config import load_profile

    assert not any(file_digests(load_profile("demo")).values())  # nothing read by path: the demo's keys are as before
    traces, bench = tmp_path / "traces.jsonl", tmp_path / "mine.jsonl"
    traces.write_text('{"problem": "1+1", "answer": "2", "response": "<think>1+1=2</think> \\\\boxed{2}"}\n')
    bench.write_text('{"problem": "2+2", "answer": "4"}\n')
    overrides = ["data.source=traces", f"data.path={traces}", "cold_start.compressor=verbatim",
                 f"evaluate.benchmarks=[{{source: {bench}}}]"]  # fmt: skip
    first = file_digests(load_profile("smoke", overrides))
    assert list(first["synthesize"]) == ["data_file"] and list(first["evaluate"]) == [f"benchmark_file:{bench}"]
    traces.write_text(traces.read_text().replace("1+1", "1 + 1"))
    second = file_digests(load_profile("smoke", overrides))
    assert second["synthesize"] != first["synthesize"] and second["evaluate"] == first["evaluate"]
    bench.write_text('{"problem": "2+3", "answer": "5"}\n')
    assert file_digests(load_profile("smoke", overrides))["evaluate"] != first["evaluate"]


def _keys(profile, stages=("synthesize", "sft_base", "sft_long", "sft_short", "baseline", "evaluate")):
    """Each stage's key from the parts the flow's ``_stage`` builds it of: its inputs (here the whole profile) and
    its file digests (that the flow passes them is test_the_flow_passes_each_stage_its_file_digests_and_section_dumps)."""
    from flows.pipeline import _stage_key
    from flows.stages import file_digests

    extra = file_digests(profile)
    return {s: _stage_key(s, Path("ws"), extra.get(s), {"sections": profile.model_dump(mode="json")}) for s in stages}


def test_a_deepspeed_config_edited_in_place_changes_the_keys_of_the_stages_that_train_with_it(tmp_path):
    from longshort.config import load_profile

    ds = tmp_path / "zero2.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    overrides = [f"{section}.deepspeed={ds}" for section in ("sft_base", "sft_long", "sft_short", "baseline")]
    first = _keys(load_profile("smoke", overrides))
    ds.write_text(ds.read_text().replace('"stage": 2', '"stage": 2, "overlap_comm": true'))
    second = _keys(load_profile("smoke", overrides))  # same path, other content
    assert [s for s in first if first[s] != second[s]] == ["sft_base", "sft_long", "sft_short", "baseline"]
    assert _keys(load_profile("smoke", overrides)) == second  # deterministic
    only_base = _keys(load_profile("smoke", overrides[:1]))
    ds.write_text(ds.read_text().replace("true", "false"))
    changed = _keys(load_profile("smoke", overrides[:1]))
    assert [s for s in only_base if only_base[s] != changed[s]] == ["sft_base"]


def test_a_local_model_folder_overwritten_in_place_changes_the_keys_of_the_stages_that_load_it(tmp_path):
    """base_model.name_or_path is loaded by sft_base only (later stages load its output, whose path is in their
    keys); data.teacher by synthesize. A hub id stays keyed by its id and revision, as before."""
    from longshort.config import load_profile

    model, teacher, problems = tmp_path / "base", tmp_path / "teacher", tmp_path / "problems.jsonl"
    for folder in (model, teacher):
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "llama"}')
        (folder / "model.safetensors").write_bytes(bytes(64))
    problems.write_text('{"problem": "1+1", "answer": "2"}\n')
    overrides = ["base_model.source=pretrained", f"base_model.name_or_path={model}", "data.source=teacher",
                 f"data.path={problems}", f"data.teacher={teacher}", "cold_start.compressor=verbatim"]  # fmt: skip
    first = _keys(load_profile("smoke", overrides))
    (model / "model.safetensors").write_bytes(bytes(63) + b"\1")  # same name, same size: other weights
    second = _keys(load_profile("smoke", overrides))
    assert [s for s in first if first[s] != second[s]] == ["sft_base"]
    (teacher / "tokenizer.json").write_text("{}")
    third = _keys(load_profile("smoke", overrides))
    assert [s for s in second if second[s] != third[s]] == ["synthesize"]


def test_a_hub_model_is_keyed_by_its_id_and_revision_alone():
    from flows.stages import file_digests
    from longshort.config import load_profile

    hub = ["base_model.source=pretrained", "base_model.name_or_path=Qwen/Qwen2.5-0.5B", "base_model.revision=abc123"]
    assert not any(file_digests(load_profile("smoke", hub)).values())  # nothing hashed, nothing fetched


def test_the_serving_temperature_is_in_no_stage_key():
    """generation.temperature and top_p (by default evaluate.temperature) are read by solve and the served pair
    only: changing the evaluation's temperature must not recompute synthesis, SFT and RL on a real profile."""
    from longshort.config import load_profile

    base = load_profile("qwen2.5-7b")
    for change in (["evaluate.temperature=0.9"], ["generation.top_p=0.9"], ["generation.temperature=0.3"]):
        other = load_profile("qwen2.5-7b", change)
        assert other.section_dump("generation") == base.section_dump("generation"), change
    assert load_profile("qwen2.5-7b", ["evaluate.temperature=0.9"]).generation.temperature == 0.9  # still served so
    assert load_profile("qwen2.5-7b", ["generation.batch_size=8"]).section_dump("generation") != base.section_dump("generation")


def test_the_flow_passes_each_stage_its_file_digests_and_section_dumps():
    """The tests above check the digests and sections the keys are made of; this one checks that the flow hands
    them to its stages: every `_stage(...)` call of a stage that reads files by path passes `key_extra=files[<its
    name>]`, and no stage gets a section as `model_dump` (which keys on serving-only fields) instead of
    `section_dump`. (Before: dropping a key_extra from flows/pipeline.py left every caching test green.)"""
    import ast
    import inspect

    from flows import pipeline
    from flows.stages import file_digests
    from longshort.config import load_profile

    tree = ast.parse(inspect.getsource(pipeline._run_stages))
    calls = [c for c in ast.walk(tree) if isinstance(c, ast.Call) and getattr(c.func, "id", None) == "_stage"]
    extras = {}
    for call in calls:
        stage = ast.unparse(call.args[1])  # "'sft_base'", or "f'sft_{role}'" for sft_long and sft_short
        dumps = [n for n in ast.walk(call) if isinstance(n, ast.Attribute) and n.attr == "model_dump"]
        assert not dumps, f"{stage}: passes a model_dump, not section_dump"
        extra = next((k.value for k in call.keywords if k.arg == "key_extra"), None)
        if extra is not None:
            assert ast.unparse(extra) == f"files[{stage}]", (stage, ast.unparse(extra))
            extras[stage] = extra
    stages = {eval(s, {}, {"role": r}) for s in extras for r in ("long", "short")}  # noqa: S307 - our own literals
    assert stages == set(file_digests(load_profile("smoke")))  # every stage that reads files by path gets them
