"""The external source's checks (dcv.external, the config's ``external:`` and ``comparison:``): every bad
input fails before compute, naming the run and step, in ``dcv validate`` and ``dcv run`` alike; hub
checkpoints are read offline from a cache in the hub's layout."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml

from dcv.cli import main
from dcv.config import ConfigError, parse_config
from dcv.external import ExternalCheckpointError, check_external, hub_snapshot
from tests.helpers import REPO, tiny_config_dict

REVISION = "0123456789abcdef0123456789abcdef01234567"  # a commit hash: the cache's snapshot folder name


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_model, tokenizer) -> Path:
    """The tiny model as an HF folder (weights, config, tokenizer): a fine-tune of the tiny base."""
    folder = tmp_path_factory.mktemp("external") / "tiny"
    tiny_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def config_with(tmp_path: Path, runs: list[dict], **sections) -> dict:
    raw = tiny_config_dict(tmp_path / "store")
    raw["external"] = {"runs": runs}
    raw.update(sections)
    return raw


def copy_with(folder: Path, target: Path, **config) -> Path:
    """A copy of ``folder`` whose config.json has ``config`` set."""
    shutil.copytree(folder, target)
    data = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**data, **config}))
    return target


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(ExternalCheckpointError) as caught:
        check_external(parse_config(raw))
    return caught.value.problems


def test_config_refuses_bad_runs_naming_run_and_step(tmp_path):
    good = {
        "run": "a",
        "method": "sft",
        "checkpoints": [{"step": 2, "path": "/x"}, {"step": 4, "path": "/y"}],
    }
    cases = {
        "external.runs[0].checkpoints: run 'a': step 2 comes after step 4": [
            {**good, "checkpoints": list(reversed(good["checkpoints"]))}
        ],
        "run 'b' continues from 'a@3', which is not a listed <run>@<step>": [
            good,
            {"run": "b", "method": "rl", "continued_from": "a@3", "checkpoints": [{"step": 1, "path": "/z"}]},
        ],
        "step 2 (org/name) needs a pinned revision": [
            {**good, "checkpoints": [{"step": 2, "hub": "org/name"}]}
        ],
        "step 2: give exactly one of path": [
            {**good, "checkpoints": [{"step": 2, "path": "/x", "hub": "o/n"}]}
        ],
        "run ids ['a'] appear more than once": [good, good],
        "no external run has label(s) ['rl']": [good],
    }
    for message, runs in cases.items():
        with pytest.raises(ConfigError) as caught:
            parse_config(config_with(tmp_path, runs))
        assert message in str(caught.value), (message, str(caught.value))
    # Two labels of external runs compare; the sweep alone knows only sft and rl.
    labelled = [good, {**good, "run": "b", "method": "dpo"}]
    assert parse_config(config_with(tmp_path, labelled, comparison={"methods": ["dpo", "sft"]}))
    raw = tiny_config_dict(tmp_path / "store")
    raw["comparison"] = {"methods": ["dpo", "rlvr"]}
    with pytest.raises(ConfigError, match="other labels need external runs"):
        parse_config(raw)


def bad_config(tmp_path: Path, tiny_folder: Path, tokenizer) -> tuple[dict, list[Path]]:
    """A config whose run 'bad' has one checkpoint of each kind of bad input; run 'ok' has a good one."""
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_folder / "config.json", no_weights)
    gpt2 = copy_with(tiny_folder, tmp_path / "gpt2", model_type="gpt2")
    deeper = copy_with(tiny_folder, tmp_path / "deeper", num_hidden_layers=3)
    other_tokens = copy_with(tiny_folder, tmp_path / "other-tokens")
    extended = copy.deepcopy(tokenizer)
    extended.add_tokens(["<dcv-new-token>"])
    extended.save_pretrained(other_tokens)
    steps = [no_weights, gpt2, deeper, other_tokens]
    runs = [
        {"run": "ok", "method": "sft", "checkpoints": [{"step": 1, "path": str(tiny_folder)}]},
        {
            "run": "bad",
            "method": "rl",
            "checkpoints": [
                *({"step": i + 1, "path": str(folder)} for i, folder in enumerate(steps)),
                {"step": 5, "hub": "org/missing", "revision": REVISION},
            ],
        },
    ]
    raw = config_with(tmp_path, runs)
    raw["external"]["hub_cache"] = str(tmp_path / "empty-cache")
    return raw, steps


def test_every_bad_checkpoint_is_listed_naming_run_and_step(tmp_path, tiny_folder, tokenizer):
    raw, (no_weights, gpt2, deeper, other_tokens) = bad_config(tmp_path, tiny_folder, tokenizer)
    problems = problems_of(raw)
    expected = [
        "run 'bad' step 1 (" + str(no_weights) + "): " + str(no_weights) + ": no weights file",
        "run 'bad' step 2 (" + str(gpt2) + "): architecture 'gpt2' is not supported",
        "run 'bad' step 3 ("
        + str(deeper)
        + "): llama with 3 layers x 4 heads, the base model is llama with 2 x 4",
        "run 'bad' step 4 (" + str(other_tokens) + "): its tokenizer differs from the base model's",
        f"run 'bad' step 5 (org/missing@{REVISION}): hub org/missing revision {REVISION}: not in the local "
        "hub cache",
    ]
    assert len(problems) == len(expected), problems
    for line, want in zip(problems, expected, strict=True):
        assert want in line, (want, line)
    for step in (1, 2, 3, 4, 5):  # each names its run and step
        assert sum(f"run 'bad' step {step} " in p for p in problems) == 1
    assert not any("run 'ok'" in p for p in problems)
    print("\n".join(problems))  # the bad-input list, for the README


@pytest.mark.e2e  # `dcv run` in this process: imports every stage (MLflow, Ray), though it starts neither
def test_validate_and_run_refuse_the_same_checkpoints_before_compute(
    tmp_path, tiny_folder, tokenizer, capsys
):
    raw, _ = bad_config(tmp_path, tiny_folder, tokenizer)
    problems = problems_of(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(raw))
    capsys.readouterr()
    for command in ("validate", "run"):
        assert main([command, str(path)]) == 2
        said = capsys.readouterr().err
        assert all(problem in said for problem in problems), (command, said)
    assert not (tmp_path / "store").exists()  # refused before anything was written under storage.root


def test_hub_checkpoints_are_read_offline_from_a_cache_in_the_hub_layout(tmp_path, tiny_folder, monkeypatch):
    """models--org--name/snapshots/<commit>/ and refs/<branch>, as huggingface_hub writes them."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-rl"
    shutil.copytree(tiny_folder, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    runs = [
        {"run": "sft0", "method": "sft", "checkpoints": [{"step": 2, "path": str(tiny_folder)}]},
        {
            "run": "rl0",
            "method": "rl",
            "continued_from": "sft0@2",
            "checkpoints": [
                {"step": 1, "hub": "org/tiny-rl", "revision": REVISION},
                {"step": 2, "hub": "org/tiny-rl", "revision": "main"},  # a branch the cache's refs resolve
            ],
        },
    ]
    raw = config_with(tmp_path, runs)
    raw["external"]["hub_cache"] = str(cache)
    planned = check_external(parse_config(raw))
    snapshot = str(repo / "snapshots" / REVISION)
    assert [(p.run, p.step, p.init, p.folder) for p in planned] == [
        ("sft0", 0, "base", ""),  # step 0 added: the base snapshot, once the base stage wrote it
        ("sft0", 2, "base", str(tiny_folder)),
        ("rl0", 0, "sft:sft0@2", str(tiny_folder)),  # step 0 of a continued run: its parent checkpoint
        ("rl0", 1, "sft:sft0@2", snapshot),
        ("rl0", 2, "sft:sft0@2", snapshot),
    ]
    assert hub_snapshot("org/tiny-rl", "f" * 40, cache) is None
    raw["external"]["runs"][1]["checkpoints"][1]["revision"] = "v2"  # no refs/v2, no such snapshot
    (problem,) = problems_of(raw)
    assert (
        "run 'rl0' step 2 (org/tiny-rl@v2): hub org/tiny-rl revision v2: not in the local hub cache"
        in problem
    )


def test_the_public_trajectory_config_is_checked_offline(tmp_path, monkeypatch):
    """configs/tulu3-8b-external.yaml: its schema, and offline checks only (nothing is downloaded): with an
    empty hub cache, the base and every checkpoint are reported missing, each by run, step and revision."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    raw = yaml.safe_load((REPO / "configs" / "tulu3-8b-external.yaml").read_text())
    raw["external"]["hub_cache"] = str(tmp_path / "empty-cache")
    cfg = parse_config(raw)
    assert cfg.comparison.methods == ("dpo", "rlvr")
    assert all(c.hub and c.revision for r in cfg.external.runs for c in r.checkpoints)
    problems = problems_of(raw)
    assert (
        "model.name='allenai/Llama-3.1-Tulu-3-8B-SFT' revision main: not in the local hub cache"
        in problems[0]
    )
    assert [p.split(" (")[0] for p in problems[1:]] == [
        "[external] external.runs[0] run 'tulu3-8b-dpo' step 1",
        "[external] external.runs[1] run 'tulu3-8b-rlvr-ppo' step 1",
        "[external] external.runs[2] run 'tulu3.1-8b-rlvr-grpo' step 1",
    ]
