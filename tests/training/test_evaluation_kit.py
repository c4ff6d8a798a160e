"""The evaluation kit: on the device it is asked for, built once per worker process, its KL reference
sampled once per storage root. (Inside Ray Train workers: tests/training/test_fsdp.py.)"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dcv.config import parse_config
from dcv.evaluation import sample_kl_reference
from dcv.storage import CORRUPT_MARK, SetAsideWarning
from dcv.training.checkpoints import (
    evaluation_kit,
    kits_built,
    kl_reference,
    kl_reference_file,
    read_kl_reference,
)
from tests.helpers import tiny_config_dict


@pytest.fixture
def cfg(tmp_path):
    raw = tiny_config_dict(tmp_path / "store")
    # One text probe: induction's items take seconds to build (every token of the vocabulary decoded).
    raw["probes"] = [{"name": "ioi", "n_items": 4, "seed": 0}]
    return parse_config(raw)


def same_reference(a, b) -> bool:
    return all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(vars(a).values(), vars(b).values(), strict=True))


def test_a_process_builds_its_kit_once_and_reuses_it(cfg, tokenizer):
    before = kits_built()
    kit = evaluation_kit(cfg, tokenizer, "cpu", step=0)
    assert kits_built() == before + 1 and kit.built_at_step == 0
    # A later evaluation, or a later trial in the same process (another learning rate: nothing that
    # decides the kit), gets the same kit without building anything.
    other_trial = cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"learning_rate": 1.0})})
    assert evaluation_kit(cfg, tokenizer, "cpu", step=4) is kit
    assert evaluation_kit(other_trial, tokenizer, torch.device("cpu"), step=0) is kit
    assert kits_built() == before + 1 and kit.built_at_step == 0
    # What decides it changed: a new kit.
    changed = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"kl_seed": 1})})
    assert evaluation_kit(changed, tokenizer, "cpu") is not kit
    assert kits_built() == before + 2


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_the_kit_lives_on_the_device_it_is_given(cfg, tokenizer):
    # On this CPU-only machine the one other device is "meta" (no data): the KL reference is read back
    # from the file the CPU kit wrote, so building on meta computes nothing there.
    on_cpu = evaluation_kit(cfg, tokenizer, "cpu")
    kit = evaluation_kit(cfg, tokenizer, "meta")
    assert kit is not on_cpu and kit.device == torch.device("meta")
    assert {p.device.type for p in kit.base_model.parameters()} == {"meta"}
    assert {t.device.type for t in vars(kit.kl_reference).values()} == {"meta"}
    state = {k: torch.empty_like(v, device="cpu") for k, v in on_cpu.base_model.state_dict().items()}
    assert {p.device.type for p in kit.plain_model(state).parameters()} == {"meta"}


def test_the_kl_reference_is_sampled_once_per_storage_root(cfg, tokenizer, tiny_model):
    from dcv.tasks import load_target_splits

    _, items = load_target_splits(cfg.target_task)
    path = kl_reference_file(cfg)
    first = kl_reference(cfg, tiny_model, tokenizer, items)
    assert path.is_file() and same_reference(read_kl_reference(path), first)
    # Read back, not sampled again: another base model samples other tokens.
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(4)  # tied to the LM head: sharper, other samples
    assert not same_reference(sample_kl_reference(other, tokenizer, items, cfg.evaluation), first)
    assert same_reference(kl_reference(cfg, other, tokenizer, items), first)
    # A file that is no reference is moved aside and sampled again.
    path.write_text(json.dumps({"input_ids": [[1, 2]], "attention_mask": [[1]], "completion_mask": [[1]]}))
    with pytest.warns(SetAsideWarning, match="do not fit together"):
        again = kl_reference(cfg, tiny_model, tokenizer, items)
    assert same_reference(again, first) and len(list(path.parent.glob(f"*{CORRUPT_MARK}*"))) == 1
