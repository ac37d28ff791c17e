"""Tests for the run spec (schemas/spec.py) and the deployment files under infra/ that must stay true to it.

    .venv/bin/python -m pytest tests/test_spec.py -q

Fast (no models): example.toml mirrors RunSpec field by field and in order; paper-13.toml is a valid
paper-settings spec; the run id is stable, hashes settings and input content (not [store], [compute],
allow_fallback or where prompts and models were found), and a field added later keeps old ids; bad specs give one
clear SpecError; the compose, Ray launcher and KubeRay YAML parse and hold what infra/README.md says;
every `refdir` command and flag quoted under infra/ exists in the CLI.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from refdir.schemas.spec import (ComputeSpec, RunSpec, SpecError, StoreSpec, load_spec,
                                 parse_spec)

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
EXAMPLE = INFRA / "specs" / "example.toml"
PAPER = INFRA / "specs" / "paper-13.toml"
COMPOSE = INFRA / "compose" / "docker-compose.yaml"
CLUSTER = INFRA / "ray" / "cluster.yaml"
KUBERAY = INFRA / "kuberay" / "raycluster.yaml"

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]\]?\s*(#.*)?$")
_KEY_LINE = re.compile(r"^\s*(#\s*)?([a-z_][a-z0-9_]*)\s*=\s*\S")


# ------------------------------------------------------------------ helpers: the example's shape

def _table_type(annotation) -> tuple[type[BaseModel] | None, bool]:
    """(model class, is array of tables) for a field holding a sub-model or a list of them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if typing.get_origin(annotation) is list:
        (arg,) = typing.get_args(annotation)
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg, True
    return None, False


def _blocks(text: str) -> list[dict]:
    """TOML text -> [{"table", "array", "keys": [(key, commented, line_no)]}], the top level first.

    Commented-out fields are lines like `# revision = "main"`: the spec's way to show an unset field
    (TOML has no null). Prose comments never start with `word =`.
    """
    blocks = [{"table": "", "array": False, "keys": [], "line": 0}]
    for i, line in enumerate(text.splitlines()):
        if m := _HEADER.match(line):
            blocks.append({"table": m.group(2), "array": m.group(1) == "[[", "keys": [], "line": i})
        elif m := _KEY_LINE.match(line):
            blocks[-1]["keys"].append((m.group(2), bool(m.group(1)), i))
    return blocks


def _fields(cls: type[BaseModel]) -> list[str]:
    return list(cls.model_fields)


def _is_subsequence(keys: list[str], order: list[str]) -> bool:
    it = iter(order)
    return all(k in it for k in keys)


def _spec_dict(**changes) -> dict:
    """A small valid spec as a dict; `changes` maps "table.field" (or "name") to a new value."""
    data = {"name": "t", "models": [{"key": "m", "path": "some/model"}]}
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
        node[leaf] = value
    return data


def _write(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------ example.toml mirrors RunSpec

def test_example_and_paper_specs_load():
    example = load_spec(EXAMPLE)
    paper = load_spec(PAPER)
    assert example.name == "example" and [m.key for m in example.models] == ["qwen2.5-0.5b", "smollm2-135m"]
    assert example.models[0].path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert paper.name == "paper-13" and len(paper.models) == 13


def test_example_top_level_and_tables_in_field_order():
    blocks = _blocks(EXAMPLE.read_text())
    scalars = [f for f, info in RunSpec.model_fields.items() if _table_type(info.annotation)[0] is None]
    tables = [f for f, info in RunSpec.model_fields.items() if _table_type(info.annotation)[0] is not None]
    assert [k for k, _, _ in blocks[0]["keys"]] == scalars
    seen = [b["table"] for b in blocks[1:]]
    dedup = [t for i, t in enumerate(seen) if i == 0 or seen[i - 1] != t]
    assert dedup == tables, "example.toml tables must appear once each, in RunSpec field order"


def test_example_every_field_present_in_class_order():
    blocks = _blocks(EXAMPLE.read_text())
    checked_array_head = set()
    for block in blocks[1:]:
        cls, is_array = _table_type(RunSpec.model_fields[block["table"]].annotation)
        keys = [k for k, _, _ in block["keys"]]
        if is_array and block["table"] in checked_array_head:
            # Later entries of an array of tables may be shorter, but keep the order.
            assert _is_subsequence(keys, _fields(cls)), f"[[{block['table']}]] at line {block['line'] + 1}: {keys}"
            continue
        checked_array_head.add(block["table"])
        assert keys == _fields(cls), f"[{block['table']}] in example.toml: {keys} != {_fields(cls)}"


def test_example_commented_fields_are_exactly_the_unset_defaults():
    """A field is commented out iff TOML cannot write its default (None); all other tables use defaults."""
    blocks = _blocks(EXAMPLE.read_text())
    first = {}
    for block in blocks[1:]:
        first.setdefault(block["table"], block)
    for table, block in first.items():
        cls, _ = _table_type(RunSpec.model_fields[table].annotation)
        for key, commented, line in block["keys"]:
            info = cls.model_fields[key]
            unset_default = not info.is_required() and info.default is None
            assert commented == unset_default, f"example.toml line {line + 1}: {table}.{key} commented={commented}"
    spec = load_spec(EXAMPLE)
    for table in ("prompts", "extraction", "selection", "generation", "evaluation", "store", "compute"):
        default = RunSpec.model_fields[table].default
        assert getattr(spec, table) == default, f"[{table}] in example.toml differs from the class defaults"


def test_example_uncommented_fields_are_valid_values():
    """Uncommenting every commented field still gives a valid spec (the examples have the right types)."""
    lines = EXAMPLE.read_text().splitlines()
    for block in _blocks(EXAMPLE.read_text()):
        for _, commented, i in block["keys"]:
            if commented:
                lines[i] = lines[i].split("#", 1)[1].strip()
    spec = parse_spec(tomllib.loads("\n".join(lines)), "example.toml uncommented")
    assert spec.models[0].revision == "main" and spec.models[0].family == "qwen2"
    assert spec.store.endpoint_url and spec.store.secret.get_secret_value()
    assert spec.compute.ray_address.startswith("ray://") and spec.compute.num_workers == 1


def test_example_comment_above_each_field_matches_its_description():
    text = EXAMPLE.read_text().splitlines()
    blocks = _blocks(EXAMPLE.read_text())
    first = {}
    for block in blocks:
        first.setdefault(block["table"], block)
    for table, block in first.items():
        cls = RunSpec if table == "" else _table_type(RunSpec.model_fields[table].annotation)[0]
        for key, _, i in block["keys"]:
            above = []
            j = i - 1
            while j >= 0 and text[j].lstrip().startswith("#") and not _KEY_LINE.match(text[j]):
                above.insert(0, text[j].lstrip("# ").strip())
                j -= 1
            want = cls.model_fields[key].description[:25].lower()
            assert want in " ".join(above).lower(), f"example.toml line {i + 1}: comment for {key} lacks {want!r}"


# ------------------------------------------------------------------ paper-13.toml

def test_paper_spec_has_paper_settings():
    spec = load_spec(PAPER)
    p = spec.prompts
    assert (p.n_train, p.n_val, p.n_test, p.seed) == (128, 32, 100, 42)
    assert spec.generation.max_new_tokens == 512
    assert spec.selection.max_layer_fraction == 0.8 and spec.selection.kl_threshold == 0.1
    assert spec.store.uri.startswith("s3://")
    big = {m.key for m in spec.models if "70b" in m.key or "72b" in m.key}
    assert len(big) == 3 and all(spec.compute.gpus_per_model[k] >= 4 for k in big)
    assert set(spec.compute.gpus_per_model) <= {m.key for m in spec.models}
    paths = {m.path for m in spec.models}
    assert {"Qwen/Qwen-1_8B-Chat", "Qwen/Qwen-72B-Chat", "01-ai/Yi-34B-Chat", "google/gemma-7b-it",
            "meta-llama/Llama-2-70b-chat-hf", "meta-llama/Meta-Llama-3-70B-Instruct"} <= paths
    for src in (p.harmful_train, p.harmless_train, p.harmful_val, p.harmless_val, p.harmful_test, p.harmless_test):
        assert src.startswith("file:refusal_direction/dataset/") and src.endswith(".json"), src


def test_paper_families_exist_and_remote_code_matches():
    from refdir.workers.families import get_family

    for m in load_spec(PAPER).models:
        fam = get_family(m.family)
        assert m.trust_remote_code == fam.trust_remote_code, f"{m.key}: trust_remote_code must match family {fam.name}"
    assert sum(m.family == "qwen" for m in load_spec(PAPER).models) == 4


def test_paper_spec_states_the_papers_dtype_format_and_refusal_ids():
    """pipeline/model_utils/*_model.py of the paper's code: fp16 for Qwen, Yi, Llama-2, bf16 for Gemma,
    Llama-3; YI_REFUSAL_TOKS = [59597], GEMMA_REFUSAL_TOKS = [235285]."""
    from refdir.workers.families import get_family

    paper_dtype = {"qwen": "float16", "yi": "float16", "llama2": "float16", "gemma": "bfloat16", "llama3": "bfloat16"}
    for m in load_spec(PAPER).models:
        fam = get_family(m.family)
        assert m.dtype == paper_dtype[m.family] == fam.gpu_dtype, m.key
        assert m.chat_format in (None, "paper") and fam.default_chat_format == "paper", m.key
        assert m.refusal_token_ids == {"yi": [59597], "gemma": [235285]}.get(m.family), m.key


def test_paper_split_file_names_draw_with_the_official_data():
    """The split file names of paper-13.toml are the official ones: draw train/val from the real files."""
    env = os.environ.get("REFDIR_DATASETS")
    folder = Path(env) if env else REPO / ".." / "shared" / "datasets" / "refusal_direction"
    if not (folder / "harmful_train.json").is_file():
        pytest.skip(f"official refusal_direction splits not found under {folder}")
    from refdir.workers.prompts import draw_prompts

    prompts = load_spec(PAPER).prompts.model_dump()
    for field in ("harmful_train", "harmless_train", "harmful_val", "harmless_val"):
        prompts[field] = "file:" + str(folder / Path(prompts[field]).name)
    prompts.update(harmful_test="builtin:harmful_test", harmless_test="builtin:harmless_val", n_test=10)
    draw = draw_prompts(parse_spec(_spec_dict(prompts=prompts)).prompts)
    assert len(draw.split("train", "harmful")) == 128 and len(draw.split("val", "harmless")) == 32


# ------------------------------------------------------------------ run id

INPUTS = {"prompts": "sha256:" + "1" * 64, "models": {"m": "sha256:" + "2" * 64}}


def _run_id(spec: RunSpec, inputs: dict = INPUTS) -> str:
    return spec.with_inputs(inputs).run_id


def test_run_id_is_stable_and_named():
    a, b = load_spec(EXAMPLE), load_spec(EXAMPLE)
    inputs = {"prompts": INPUTS["prompts"], "models": {m.key: "sha256:x" for m in a.models}}
    assert _run_id(a, inputs) == _run_id(b, inputs) and re.fullmatch(r"example-[0-9a-f]{10}", _run_id(a, inputs))
    assert _run_id(parse_spec(json.loads(a.model_dump_json())), inputs) == _run_id(a, inputs)


def test_run_id_needs_resolved_inputs_and_a_stored_id_wins():
    spec = parse_spec(_spec_dict())
    with pytest.raises(SpecError, match="not resolved"):
        spec.run_id
    assert spec.with_inputs(INPUTS, "t-stored").run_id == "t-stored"
    assert not spec.with_inputs(INPUTS).model_copy(update={"name": "u"}).is_resolved, \
        "a changed copy must not keep the old inputs"


@pytest.mark.parametrize("field, value", [
    ("prompts.seed", 7), ("prompts.n_train", 64), ("selection.kl_threshold", 0.2), ("generation.max_new_tokens", 64),
    ("extraction.activation_dtype", "float32"), ("evaluation.judges", ["substring", "llamaguard:/models/guard"]),
    ("evaluation.prompts_per_job", 50), ("models.0.dtype", "bfloat16"), ("models.0.key", "m2"), ("name", "other"),
])
def test_run_id_changes_with_result_fields(field, value):
    inputs = {**INPUTS, "models": {"m2" if value == "m2" else "m": INPUTS["models"]["m"]}}
    assert _run_id(parse_spec(_spec_dict(**{field: value})), inputs) != _run_id(parse_spec(_spec_dict()))


def test_a_run_made_with_50_prompts_per_evaluation_job_keeps_its_id_when_its_spec_says_50():
    """evaluation.prompts_per_job's default went from 50 to 100: a spec that leaves it unset gets a new run id,
    one that sets 50 gets the id it had before. The id is the one refdir computed for this spec at commit
    13f8d84, when 50 was the default (the spec unchanged, prompts_per_job unset)."""
    old = parse_spec(_spec_dict(**{"evaluation.prompts_per_job": 50}))
    assert _run_id(old) == "t-585f54d4e8"
    assert _run_id(parse_spec(_spec_dict())) != "t-585f54d4e8"


def test_evaluation_plans_one_job_per_test_set_and_intervention_at_the_papers_sizes():
    """The paper's test sets hold 100 prompts each (JailbreakBench's 100 behaviours; 100 harmless, n_test = 100 in
    andyrdt/refusal_direction's config): by default each (test set, intervention) is one job holding all 100;
    at 50 per job (the SmolLM2 organism's spec) two jobs of 50."""
    from refdir.flows import plan
    from refdir.schemas.jobs import Prompt

    paper_test_prompts = 100

    class Draw:
        def split(self, split, label):
            assert split == "test"
            return [Prompt(prompt_id=i, instruction=f"{label} {i}") for i in range(paper_test_prompts)]

    for per_job, sizes in ((None, [100]), (50, [50, 50])):
        changes = {} if per_job is None else {"evaluation.prompts_per_job": per_job}
        spec = parse_spec(_spec_dict(**changes)).with_inputs(INPUTS)
        jobs = plan.eval_jobs(spec, spec.models[0], Draw())
        pairs = {(j.dataset, j.intervention) for j in jobs}
        assert {d for d, _ in pairs} == {"harmful_test", "harmless_test"}
        for pair in pairs:
            mine = sorted((j for j in jobs if (j.dataset, j.intervention) == pair), key=lambda j: j.index)
            assert [len(j.prompts) for j in mine] == sizes, (per_job, pair)
            assert [p.prompt_id for j in mine for p in j.prompts] == list(range(paper_test_prompts))


def test_run_id_changes_with_the_inputs_content():
    spec = parse_spec(_spec_dict())
    assert _run_id(spec, {**INPUTS, "prompts": "sha256:" + "3" * 64}) != _run_id(spec)
    assert _run_id(spec, {**INPUTS, "models": {"m": "hub:some/model@" + "4" * 40}}) != _run_id(spec)


@pytest.mark.parametrize("field, value", [
    ("store.uri", "s3://bucket/prefix"), ("store.endpoint_url", "http://127.0.0.1:9000"), ("store.key", "k"),
    ("store.secret", "s"), ("compute.ray_address", "ray://head:10001"), ("compute.num_workers", 8),
    ("compute.gpus_per_worker", 4.0), ("compute.batch_size", 8), ("compute.max_retries", 0),
    ("selection.allow_fallback", True),                       # a resume option of the same run
    ("generation.max_batch_size", 32),                        # GPU batches from free memory: hardware
    ("optimize.enabled", True), ("optimize.trials", 8),      # the search re-keys its own markers
    ("prompts.harmful_train", "file:/elsewhere/harmful.json"),  # where prompts were found: their text is hashed
    ("models.0.path", "/moved/folder"), ("models.0.revision", "main"),   # the model's content digest is hashed
])
def test_run_id_ignores_location_hardware_policy_and_names(field, value):
    assert _run_id(parse_spec(_spec_dict(**{field: value}))) == _run_id(parse_spec(_spec_dict()))


def test_store_compute_and_optimize_are_the_only_top_level_fields_outside_the_identity():
    # optimize: the search's markers and manifest carry the digest of its settings (flows/optimize.py)
    outside = set(RunSpec.model_fields) - set(parse_spec(_spec_dict()).settings())
    assert outside == {"store", "compute", "optimize"}
    assert RunSpec.model_fields["store"].annotation is StoreSpec
    assert RunSpec.model_fields["compute"].annotation is ComputeSpec


def test_a_field_added_after_identity_v1_keeps_old_ids_at_its_default():
    from pydantic import create_model

    from refdir.schemas.spec import settings_identity

    v1 = {"S": ("a",)}
    old = create_model("S", a=(int, 1))
    new = create_model("S", a=(int, 1), b=(int, 2))     # b added later, with a default
    assert settings_identity(new(), v1=v1) == settings_identity(old(), v1=v1) == {"a": 1}
    assert settings_identity(new(b=3), v1=v1) == {"a": 1, "b": 3}
    assert settings_identity(old(a=1), v1={"S": ()}) == {}, "an unlisted field is hashed only off its default"


def test_every_spec_field_is_v1_or_has_a_default():
    """A field outside IDENTITY_V1_FIELDS is hashed only off its default: it must have one."""
    from refdir.schemas.spec import IDENTITY_V1_FIELDS, NOT_IDENTITY

    def walk(cls, where=""):
        for name, info in cls.model_fields.items():
            path = f"{where}{name}"
            if path in NOT_IDENTITY:
                continue
            if name not in IDENTITY_V1_FIELDS.get(cls.__name__, ()):
                assert not info.is_required(), f"{path} was added after identity v1 and has no default"
            sub = typing.get_args(info.annotation) or (info.annotation,)
            for t in sub:
                if isinstance(t, type) and issubclass(t, BaseModel):
                    walk(t, f"{path}.")

    walk(RunSpec)


# ------------------------------------------------------------------ bad input: one clear SpecError

def _spec_error(path_or_data) -> str:
    with pytest.raises(SpecError) as info:
        if isinstance(path_or_data, dict):
            parse_spec(path_or_data, "test.toml")
        else:
            load_spec(path_or_data)
    assert info.value.__cause__ is None, "SpecError should not chain pydantic/tomllib tracebacks"
    return str(info.value)


def test_unknown_key_names_its_path(tmp_path):
    text = EXAMPLE.read_text().replace("kl_threshold = 0.1", "kl_treshold = 0.1")
    msg = _spec_error(_write(tmp_path, text))
    assert "selection.kl_treshold" in msg and "unknown key" in msg and "spec.toml" in msg


def test_unknown_keys_are_listed_in_one_error(tmp_path):
    data = _spec_dict(**{"models.0.dtyp": "auto", "compute.gpus": 1, "colour": "blue"})
    msg = _spec_error(data)
    assert all(p in msg for p in ("models.0.dtyp", "compute.gpus", "colour")), msg


def test_missing_model_path(tmp_path):
    msg = _spec_error(_write(tmp_path, 'name = "t"\n[[models]]\nkey = "m"\n'))
    assert "models.0.path" in msg and "required" in msg.lower()


def test_duplicate_model_keys(tmp_path):
    text = 'name = "t"\n[[models]]\npath = "a/llama"\n[[models]]\npath = "b/llama"\n'
    msg = _spec_error(_write(tmp_path, text))
    assert "duplicate model keys" in msg and "'llama'" in msg


@pytest.mark.parametrize("field, value", [
    ("prompts.n_train", -1), ("prompts.n_val", 0), ("extraction.prompts_per_job", -5),
    ("compute.batch_size", 0), ("compute.gpus_per_worker", -1.0), ("generation.max_new_tokens", 0),
    ("compute.max_retries", -1),
])
def test_negative_or_zero_sizes(field, value):
    msg = _spec_error(_spec_dict(**{field: value}))
    assert field in msg, msg


@pytest.mark.parametrize("table, line, field", [
    ("selection", "kl_threshold = nan", "selection.kl_threshold"),
    ("selection", "prune_norm = inf", "selection.prune_norm"),
    ("compute", "batch_size = true", "compute.batch_size"),
    ("compute", "cpus_per_worker = false", "compute.cpus_per_worker"),
    ("prompts", 'n_train = "128"', "prompts.n_train"),
    ("generation", "max_new_tokens = 1.5", "generation.max_new_tokens"),
    ("prompts", "filter_val = 1", "prompts.filter_val"),
])
def test_strict_types_from_toml(tmp_path, table, line, field):
    """TOML's own nan/inf/booleans/strings never pass as numbers (no coercion, no NaN-poisoned runs)."""
    text = f'name = "t"\n[[models]]\npath = "some/model"\n[{table}]\n{line}\n'
    msg = _spec_error(_write(tmp_path, text))
    assert field in msg and len(msg.splitlines()) == 2, msg


def test_huge_error_message_is_capped_on_the_terminal(tmp_path):
    """An 8 MB bad value quoted in an error reaches the terminal as a few kB, exit 2 (flows/cli.py caps it)."""
    import subprocess
    import sys

    path = _write(tmp_path, f'name = "{"x" * 8_000_000}!"\n[[models]]\npath = "some/model"\n')
    proc = subprocess.run([sys.executable, "-m", "refdir.flows.cli", "run", str(path)], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "invalid spec" in proc.stderr and "more characters not shown" in proc.stderr
    assert len(proc.stderr) + len(proc.stdout) < 6000, len(proc.stderr)


def test_bad_toml_syntax(tmp_path):
    path = _write(tmp_path, 'name = "t"\n[[models]\npath = "x"\n')
    msg = _spec_error(path)
    assert "not valid TOML" in msg and str(path) in msg


def test_missing_file(tmp_path):
    msg = _spec_error(tmp_path / "nope.toml")
    assert "not found" in msg and "nope.toml" in msg


def test_bad_model_key_and_name():
    assert "model key" in _spec_error(_spec_dict(**{"models.0.key": "has space"}))
    assert "name" in _spec_error(_spec_dict(name="../escape"))


# ------------------------------------------------------------------ infra YAML

def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_compose_services_healthchecks_and_volumes():
    doc = _yaml(COMPOSE)
    svc = doc["services"]
    assert {"minio", "create-bucket", "prefect", "ray-head"} <= set(svc)
    for name in ("minio", "prefect", "ray-head"):
        assert "test" in svc[name]["healthcheck"], f"{name} needs a healthcheck"
    assert "mc mb" in " ".join(svc["create-bucket"]["command"]) and svc["create-bucket"]["image"].startswith("minio/mc")
    assert svc["prefect"]["command"][:5] == ["prefect", "server", "start", "--host", "0.0.0.0"]
    assert {"ray", "start", "--head", "--block"} <= set(svc["ray-head"]["command"])
    env = svc["ray-head"]["environment"]
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PREFECT_API_URL", "RAY_ADDRESS"} <= set(env)
    assert svc["ray-head"]["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"
    used = {v.split(":")[0] for s in svc.values() for v in s.get("volumes", []) if not v.startswith((".", "/"))}
    assert used <= set(doc["volumes"]), f"undeclared named volumes: {used - set(doc['volumes'])}"


def test_compose_variables_are_in_env_example():
    example = (INFRA / "compose" / "env.example").read_text()
    defined = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", example, re.M))
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE.read_text()))
    assert used <= defined, f"add to env.example: {sorted(used - defined)}"


def test_dockerfile_copies_every_package_folder():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    docker = (INFRA / "compose" / "Dockerfile").read_text()
    copied = {line.split()[1] for line in docker.splitlines() if line.startswith("COPY ")}
    assert folders <= copied, f"Dockerfile must COPY {sorted(folders - copied)}"
    assert all((REPO / c).exists() for c in copied), "Dockerfile copies a path that does not exist"


def test_ray_cluster_yaml_matches_the_launcher_schema():
    import jsonschema
    import ray.autoscaler

    doc = _yaml(CLUSTER)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(doc, schema)
    assert doc["head_node_type"] in doc["available_node_types"]
    assert any('pip install -q -e "~/refdir[gguf,hf]"' in c for c in doc["worker_setup_commands"])
    assert any("torch==" in c and "/whl/cu" in c for c in doc["worker_setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(doc[key])
        assert "RAY_USAGE_STATS_ENABLED=0" in start and "RAY_AUTH_MODE=token" in start


def test_kuberay_cluster_has_head_gpu_workers_and_secret_credentials():
    doc = _yaml(KUBERAY)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    head = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    (group,) = doc["spec"]["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] >= 1   # sized against paper-13 in tests/test_cluster.py
    for container in (head, worker):
        env = {e["name"]: e for e in container["env"]}
        for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"):
            assert "secretKeyRef" in env[var]["valueFrom"], var
        assert env["RAY_AUTH_MODE"]["value"] == "token" and env["RAY_USAGE_STATS_ENABLED"]["value"] == "0"


# ------------------------------------------------------------------ docs quote the real CLI

def _cli_commands() -> dict[str, set[str]]:
    import typer.main

    from refdir.flows.cli import app

    group = typer.main.get_command(app)
    return {name: {o for p in cmd.params for o in getattr(p, "opts", []) if o.startswith("--")} | {"--help"}
            for name, cmd in group.commands.items()}


def _refdir_invocations(text: str) -> list[tuple[str, list[str]]]:
    """Every `refdir CMD ...` written as a command, with the --flags that follow it on the same line.

    A command starts a line (or a `#` comment line), opens a `code span`, or follows `&&`, `exec [svc]`,
    a `VAR=value` prefix or a quote; prose such as "the refdir image" is not a command.
    """
    found = []
    start = r"(?:^[ \t]*(?:#[ \t]*)?|`|&&[ \t]+|\bexec[ \t]+(?:[a-z][\w-]*[ \t]+)?|\b[A-Z_]+=\S+[ \t]+|[\"'])"
    for m in re.finditer(start + r"refdir ([a-z][a-z-]*)([^\n`|&;)]*)", text, re.M):
        try:
            words = shlex.split(m.group(2), comments=True)
        except ValueError:
            words = m.group(2).split()
        found.append((m.group(1), [w.split("=")[0] for w in words if w.startswith("--")]))
    return found


@pytest.mark.parametrize("path", [INFRA / "README.md", COMPOSE, CLUSTER, KUBERAY, EXAMPLE, PAPER],
                         ids=lambda p: p.name)
def test_infra_files_quote_real_commands_and_flags(path):
    commands = _cli_commands()
    calls = _refdir_invocations(path.read_text())
    for cmd, flags in calls:
        assert cmd in commands, f"{path.name}: `refdir {cmd}` is not a CLI command ({sorted(commands)})"
        unknown = [f for f in flags if f not in commands[cmd]]
        assert not unknown, f"{path.name}: `refdir {cmd}` has no option {unknown}"
    if path.name == "README.md":
        assert {c for c, _ in calls} >= {"run", "schedule", "status", "resume", "sql", "export", "export-official"}


def test_readme_env_vars_exist_in_the_code():
    readme = (INFRA / "README.md").read_text()
    source = "\n".join(p.read_text() for d in ("flows", "workers", "schemas") for p in (REPO / d).glob("*.py"))
    for var in sorted(set(re.findall(r"\bREFDIR_[A-Z_]+\b", readme))):
        if var != "REFDIR_BUCKET":   # a compose variable, not read by refdir
            assert var in source, f"infra/README.md mentions {var}, which no module reads"
    assert len(readme.splitlines()) <= 200
