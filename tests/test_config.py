"""Config validation: every malformed file exits 2 from `dcv validate` and names the field and file;
every field has a description, which `dcv validate --explain` prints with its type and default."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
import yaml
from pydantic import BaseModel

from dcv.cli import main
from dcv.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    explain_config,
    load_config,
    parse_config,
)
from tests.helpers import DEMO_CONFIG

REPO = Path(__file__).resolve().parents[1]


def demo_raw() -> dict:
    return yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())


def edit(path: str, value):
    def apply(raw: dict) -> dict:
        *parents, leaf = path.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = value
        return raw

    return apply


def delete(path: str):
    def apply(raw: dict) -> dict:
        *parents, leaf = path.split(".")
        node = raw
        for part in parents:
            node = node[part]
        del node[leaf]
        return raw

    return apply


MALFORMED = [
    # (case id, change to the demo config, text the error must contain)
    ("wrong type", edit("sft.max_steps", "many"), "sft.max_steps"),
    ("unknown top-level key", edit("sfft", {"max_steps": 3}), "sfft: unknown key"),
    ("unknown nested key", edit("sft.learning_rat", 1e-5), "sft.learning_rat: unknown key"),
    ("missing model", delete("model"), "model: required field is missing"),
    ("missing model name", delete("model.name"), "model.name: required field is missing"),
    ("bad model path", edit("model.name", "./no/such/folder"), "model.name"),
    ("not a hub id", edit("model.name", "not a model!"), "model.name"),
    ("negative lr", edit("sft.learning_rate", -1e-5), "sft.learning_rate"),
    ("zero rl lr", edit("rl.learning_rate", 0), "rl.learning_rate"),
    ("empty seed list", edit("sweep.seeds", []), "sweep.seeds"),
    ("duplicate seeds", edit("sweep.seeds", [1, 1]), "sweep.seeds"),
    ("empty probes", edit("probes", []), "probes: List should have at least 1"),
    ("unknown probe", edit("probes", [{"name": "sarcasm"}]), "probes[0].name"),
    (
        "duplicate probe",
        edit("probes", [{"name": "ioi"}, {"name": "ioi"}]),
        "probes: each probe may appear once",
    ),
    ("probe n_items zero", edit("probes", [{"name": "ioi", "n_items": 0}]), "probes[0].n_items"),
    ("unknown chemistry kind", edit("target_task.kinds", ["alchemy"]), "target_task.kinds[0]"),
    ("unknown answer format", edit("target_task.answer_format", "essay"), "target_task.answer_format"),
    (
        "chem probe with option answers",
        lambda r: {
            **r,
            "probes": [{"name": "chem"}],
            "target_task": {**r["target_task"], "answer_format": "option"},
        },
        "probes: the chem probe compares answer letters",
    ),
    ("sciknoweval without source", edit("target_task.name", "sciknoweval"), "target_task.source"),
    (
        "missing sciknoweval file",
        lambda r: {
            **r,
            "target_task": {**r["target_task"], "name": "sciknoweval", "source": "./missing.jsonl"},
        },
        "target_task.source: no file",
    ),
    ("group larger than batch", edit("rl.num_generations", 3), "rl.num_generations"),
    ("unknown rollout backend", edit("rl.rollout.backend", "sglang"), "rl.rollout.backend"),
    ("unknown patching method", edit("patching.methods", ["guess"]), "patching.methods[0]"),
    ("tau out of range", edit("circuits.tau", 3.0), "circuits.tau"),
    (
        "cmap heads fewer than the circuit",
        edit("patching.cmap_top_heads", 5),  # demo.yaml: selection top_k, top_k 10
        "patching.cmap_top_heads: 5 is smaller than the largest base circuit (selection top_k: "
        "circuits.top_k 10)",
    ),
    ("gpu without gpus", edit("resources.use_gpu", True), "resources.gpus_per_worker"),
    ("credentials in tracking uri", edit("tracking.uri", "http://alice:s3cret@mlflow:5000"), "tracking.uri"),
    ("negative eval batch", edit("evaluation.batch_size", -4), "evaluation.batch_size"),
    ("section is a list", edit("sft", [1, 2]), "sft: Input should be"),
    ("name unsafe for paths", edit("name", "../etc"), "name: String should match pattern"),
    ("empty sweep grid values", edit("sweep.grid", {"sft.max_steps": []}), "sweep.grid.sft.max_steps: empty"),
    (
        "evaluation shorter than GRPO completions",
        edit("evaluation.max_new_tokens", 8),  # demo.yaml: rl.max_completion_length 12
        "evaluation.max_new_tokens: 8 is shorter than rl.max_completion_length=12",
    ),
    (
        "rl after sft with no chosen SFT rate",
        lambda r: edit("sweep.sft_learning_rates", [1e-5, 3e-5])(edit("rl.init", "sft")(r)),
        "rl.init_sft_learning_rate: rl.init=sft and sweep.sft_learning_rates=[1e-05, 3e-05] has several",
    ),
    (
        "rl after sft at a rate the sweep lacks",
        lambda r: edit("rl.init_sft_learning_rate", 2e-5)(edit("rl.init", "sft")(r)),
        "rl.init_sft_learning_rate: 2e-05 is not one of sweep.sft_learning_rates=[0.0005]",
    ),
    (
        "an SFT rate for rl from the base model",
        edit("rl.init_sft_learning_rate", 5e-4),
        "rl.init_sft_learning_rate: only meaningful with rl.init=sft",
    ),
]


@pytest.mark.parametrize("change,expected", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_config_exits_2_and_names_field(tmp_path, capsys, change, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(change(demo_raw())))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert str(path) in err


def test_not_yaml_and_not_mapping_and_missing_file(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    assert main(["validate", str(broken)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    assert main(["validate", str(scalar)]) == 2
    assert "top level must be a mapping" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "absent.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_every_problem_is_reported_at_once():
    raw = demo_raw()
    raw["sft"]["learning_rate"] = -1
    raw["sweep"]["seeds"] = []
    raw["bogus"] = 1
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "x.yaml")
    text = str(info.value)
    assert all(field in text for field in ("sft.learning_rate", "sweep.seeds", "bogus"))
    assert len(info.value.problems) == 3


def test_valid_config_exits_0(capsys):
    assert main(["validate", str(REPO / "configs" / "demo.yaml")]) == 0
    assert "ok" in capsys.readouterr().out


def test_overrides_set_dotted_fields_and_are_validated(tmp_path):
    raw = apply_overrides(demo_raw(), ["sft.max_steps=7", "sweep.seeds=[3, 4]", "model.name=tiny"])
    cfg = parse_config(raw)
    assert (cfg.sft.max_steps, cfg.sweep.seeds, cfg.model.name) == (7, [3, 4], "tiny")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(demo_raw()))
    with pytest.raises(ConfigError, match="sft.max_steps"):
        load_config(path, ["sft.max_steps=-1"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(path, ["sft.max_steps"])


def test_config_is_frozen():
    cfg = parse_config(demo_raw())
    with pytest.raises(ValueError):
        cfg.sft.max_steps = 3


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.probes


def test_a_relative_storage_root_is_made_absolute_where_the_config_is_loaded(tmp_path, monkeypatch):
    (tmp_path / "configs" / "benchmarks").mkdir(parents=True)  # benchmarks.include_path resolves alike
    monkeypatch.chdir(tmp_path)
    cfg = load_config(DEMO_CONFIG, ["storage.root=runs/x"])
    assert cfg.storage.root == str(tmp_path / "runs" / "x")
    assert cfg.benchmarks.include_path == str(tmp_path / "configs" / "benchmarks")
    assert load_config(DEMO_CONFIG, ["storage.root=s3://bucket/runs"]).storage.root == "s3://bucket/runs"


def test_an_object_store_root_with_credentials_or_options_is_refused():
    from dcv.config import ConfigError

    for root in ("s3://KEY:SECRET@bucket/runs", "s3://bucket/runs?endpoint_override=x"):
        with pytest.raises(ConfigError, match=r"storage\.root: .*carries credentials or options"):
            load_config(DEMO_CONFIG, [f"storage.root={root}"])


def test_calibration_probes_must_be_configured_probes(tmp_path):
    from dcv.config import ConfigError, parse_config
    from tests.helpers import tiny_config_dict

    raw = tiny_config_dict(tmp_path)
    raw["calibration"] = {"enabled": True, "probes": ["ioi", "chem"], "k": [1, 3]}
    with pytest.raises(ConfigError, match=r"calibration: probes \['chem'\] are not in the config's probes"):
        parse_config(raw)
    raw["calibration"]["probes"] = ["ioi"]
    assert parse_config(raw).calibration.k == [1, 3]


def config_sections() -> list[type[BaseModel]]:
    """Every pydantic model reachable from ExperimentConfig through its fields' types (lists included)."""

    def types_in(annotation):
        yield annotation
        for arg in get_args(annotation):
            yield from types_in(arg)

    found, todo = [], [ExperimentConfig]
    while todo:
        section = todo.pop()
        if section in found:
            continue
        found.append(section)
        for field in section.model_fields.values():
            todo += [
                t for t in types_in(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)
            ]
    return found


def test_every_config_field_has_a_description():
    sections = config_sections()
    assert {"ProbeConfig", "TinyModelConfig", "RolloutConfig", "MaskConfig"} <= {s.__name__ for s in sections}
    missing = [
        f"{section.__name__}.{name}"
        for section in sections
        for name, field in section.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert not missing, f"fields without Field(description=...): {missing}"


def field_line(lines: list[str], path: str) -> str:
    return next(line for line in lines if line.split()[0] == path)


def test_explain_gives_every_field_its_type_default_description_and_changed_value():
    # The demo config with the values this test reads pinned, so that tuning the demo does not break it.
    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    raw["sft"].update(max_steps=12)
    raw["sft"].pop("warmup_ratio", None)
    raw["rl"].update(loss_type="dapo")
    raw["probes"] = [{"name": n, "n_items": 16} for n in ("ioi", "capitals", "greater_than", "induction")]
    lines = explain_config(parse_config(raw))
    # One line per field (sections included); each section class appears once in the tree.
    assert len(lines) == sum(len(s.model_fields) for s in config_sections())
    assert all(" # " in line and line.split(" # ", 1)[1].strip() for line in lines)
    loss = field_line(lines, "rl.loss_type")
    assert "{grpo,dr_grpo,dapo,bnpo}  default dapo  #" in loss  # demo.yaml sets dapo: no config value
    assert "TRL's default" in loss
    assert "int>0  default 100  config 12  # optimizer steps" in field_line(lines, "sft.max_steps")
    assert "float in [0, 1]  default 0  #" in field_line(lines, "sft.warmup_ratio")
    # A list of sections: its item's fields once, every item's value in one list.
    assert "default required  config [ioi, capitals, greater_than, induction]" in field_line(
        lines, "probes[].name"
    )
    assert "default 64  config [16, 16, 16, 16]" in field_line(lines, "probes[].n_items")
    assert field_line(lines, "rl.rollout").split()[1] == "#"  # a section: path and description
    assert "config 0.45" in field_line(lines, "rl.rollout.num_cpus")


def test_dcv_validate_explain_prints_the_tree_and_plain_validate_one_line(capsys):
    assert main(["validate", str(DEMO_CONFIG)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert main(["validate", str(DEMO_CONFIG), "--explain", "--set", "rl.loss_type=dr_grpo"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "with rl.loss_type=dr_grpo: ok" in out[0]
    assert "default dapo  config dr_grpo  # how token losses" in field_line(out[1:], "rl.loss_type")
    assert out[1:] == explain_config(load_config(DEMO_CONFIG, ["rl.loss_type=dr_grpo"]))


def test_dcv_run_refuses_what_dcv_validate_refuses(tmp_path, capsys):
    """The evaluation-length rule is the config's, so `dcv run` exits 2 with the same line, before Ray."""
    path = tmp_path / "short-eval.yaml"
    path.write_text(yaml.safe_dump(edit("evaluation.max_new_tokens", 8)(demo_raw())))
    expected = "evaluation.max_new_tokens: 8 is shorter than rl.max_completion_length=12"
    assert main(["validate", str(path)]) == 2
    assert expected in capsys.readouterr().err
    assert main(["run", str(path)]) == 2
    assert expected in capsys.readouterr().err


def test_rollout_python_is_an_absolute_path(tmp_path):
    from dcv.config import RolloutConfig

    with pytest.raises(ValueError, match=r"python[\s\S]*'venv/bin/python' is not an absolute path"):
        RolloutConfig(python="venv/bin/python")
    assert RolloutConfig(python="~/dcv/.venv-vllm/bin/python").python == str(
        Path("~/dcv/.venv-vllm/bin/python").expanduser()
    )
    assert RolloutConfig().python is None
