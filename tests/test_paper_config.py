"""The paper config at toy size: the overrides (tests/helpers.py ``paper_toy_overrides``) swap sizes and
hardware, never the protocol: a tiny random Qwen2 (same family as the paper model, its 16:2 query-to-key/value
head ratio scaled to 8:1), a local folder in SciKnowEval's hub layout (Chemistry L3, as the config asks), hf
rollouts on CPU in place of vLLM, local benchmark files in place of the hub's, a few items and steps.
Everything else (rl.init sft, Dr. GRPO, masks, the chem probe, calibration, benchmarks, FSDP) is the file's
own. The toy twin runs end to end as a Ray job in tests/test_two_nodes.py."""

from __future__ import annotations

from dcv.config import load_config
from tests.helpers import PAPER_CONFIG, paper_toy_overrides, write_sciknoweval_layout


def test_the_overrides_change_sizes_not_the_protocol(tmp_path):
    """What the toy twin keeps of the paper config: the protocol fields are the file's own."""
    source = write_sciknoweval_layout(tmp_path / "sciknoweval")
    paper = load_config(PAPER_CONFIG)
    toy = load_config(PAPER_CONFIG, paper_toy_overrides(source, tmp_path / "store"))
    assert toy.model.tiny.architecture == "qwen2"
    assert paper.target_task.levels == toy.target_task.levels == ["L3"]
    for section, field in [
        ("rl", "init"),
        ("rl", "loss_type"),
        ("rl", "beta"),
        ("rl", "num_iterations"),
        ("sft", "distributed"),
        ("rl", "distributed"),
        ("patching", "methods"),
        ("circuits", "selection"),
        ("circuits", "noise_floor"),
        ("calibration", "enabled"),
        ("weight_change", "enabled"),
    ]:
        assert getattr(getattr(toy, section), field) == getattr(getattr(paper, section), field), field
    assert paper.rl.init == "sft" and paper.rl.loss_type == "dr_grpo" and "mask" in paper.patching.methods
    assert "chem" in [p.name for p in paper.probes] and paper.benchmarks.tasks
