"""What a checkpoint can do: target accuracy, prior-capability probe scores, and KL to the base model.

- **Target accuracy**: greedy generation on the chat-templated test prompts, scored by the same parser
  and reward RL trains with (`dcv.tasks.answers`).
- **Probe scores**: accuracy (LD > 0) and mean logit difference at the last position of the clean prompts.
  Items are batched by length, so no prompt is padded and every LD is exact.
- **Per-item scores**: the vectors behind those means (1.0/0.0 per target test item, LD_clean per probe
  item, each in item order), for the analysis' bootstrap over items. ``evaluate_model_scores`` returns
  them with the metrics; each mean is ``statistics.fmean`` of its vector, so the two agree exactly.
- **KL(base || model)**: continuations sampled once from the base model on target prompts, then the
  token-mean of the full-vocabulary forward KL over those continuation tokens (RL's Razor's forgetting
  predictor). The samples are a `KLReference`, built once per experiment and reused for every checkpoint.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from statistics import fmean

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from dcv.config import EvaluationConfig
from dcv.tasks.answers import has_answer_tag, score_answer
from dcv.tasks.items import ProbeItem, ProbeSet, QAItem


@dataclass(frozen=True)
class TargetScore:
    accuracy: float
    format_rate: float  # share of answers inside <answer></answer> tags
    n_items: int
    correct: tuple[float, ...]  # [n_items] 1.0 / 0.0 per test item, in item order


@dataclass(frozen=True)
class ProbeScore:
    probe: str
    accuracy: float
    mean_ld: float
    n_items: int
    ld: tuple[float, ...]  # [n_items] LD_clean per probe item, in item order


@dataclass(frozen=True)
class ModelScores:
    """A checkpoint's scores: flat scalar ``metrics`` (MLflow / Ray Train names, all floats) and the
    per-item vectors behind them, ``item_scores``: ``target/correct`` [n_test] and ``probe/<name>/ld``
    [n_probe], each in item order."""

    metrics: dict[str, float]
    item_scores: dict[str, list[float]]


@dataclass(frozen=True)
class KLReference:
    """Base-model samples on target prompts: left-padded prompt + right-padded continuation."""

    input_ids: torch.Tensor  # [n, prompt_len + completion_len]
    attention_mask: torch.Tensor  # [n, prompt_len + completion_len]
    completion_mask: torch.Tensor  # [n, completion_len], 1 on continuation tokens up to and including EOS


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a padded row computes what the unpadded row would."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def last_position_logits(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """[batch, vocab] logits at the last position of unpadded, equal-length prompts [batch, pos]."""
    return model(input_ids=input_ids.to(_device(model)), logits_to_keep=1).logits[:, -1].float()


@dataclass(frozen=True)
class ContrastBatch:
    """Equal-length items: clean and corrupted ids [n, pos], answer ids [n], their indices in the probe."""

    clean: torch.Tensor
    corrupt: torch.Tensor
    correct: torch.Tensor
    wrong: torch.Tensor
    index: torch.Tensor

    @property
    def first_difference(self) -> int:
        """The first position where any item's clean and corrupted prompts differ."""
        differs = (self.clean != self.corrupt).any(dim=0).nonzero()
        if len(differs) == 0:
            raise ValueError("clean and corrupted prompts are identical: no contrast to patch")
        return int(differs[0])

    def logit_diff(self, logits: torch.Tensor) -> torch.Tensor:
        """LD per row of last-position logits [rows, vocab]; rows repeat the batch's items."""
        n = len(self.correct)
        rows = torch.arange(logits.shape[0])
        correct = self.correct.repeat(logits.shape[0] // n).to(logits.device)
        wrong = self.wrong.repeat(logits.shape[0] // n).to(logits.device)
        return logits[rows, correct] - logits[rows, wrong]


def contrast_batches(items: Sequence[ProbeItem], batch_size: int) -> Iterator[ContrastBatch]:
    """Items grouped by token length (no padding anywhere) and cut into batches of at most ``batch_size``."""
    if not items:
        raise ValueError("no probe items: head effects need at least one contrast pair")
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_length[len(item.clean_ids)].append(index)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            part = [items[i] for i in indices[start : start + batch_size]]
            yield ContrastBatch(
                clean=torch.tensor([it.clean_ids for it in part]),
                corrupt=torch.tensor([it.corrupt_ids for it in part]),
                correct=torch.tensor([it.correct_id for it in part]),
                wrong=torch.tensor([it.wrong_id for it in part]),
                index=torch.tensor(indices[start : start + batch_size]),
            )


def probe_logit_diffs(
    model: PreTrainedModel, items: Sequence[ProbeItem], batch_size: int, corrupted: bool = False
) -> torch.Tensor:
    """LD = logit(correct) - logit(wrong) per item, in item order: [n_items]."""
    out = torch.empty(len(items))
    for batch in contrast_batches(items, batch_size):
        logits = last_position_logits(model, batch.corrupt if corrupted else batch.clean)
        out[batch.index] = batch.logit_diff(logits).cpu()
    return out


def evaluate_probe(model: PreTrainedModel, probe: ProbeSet, batch_size: int) -> ProbeScore:
    ld = tuple(probe_logit_diffs(model, probe.items, batch_size).tolist())
    return ProbeScore(probe.name, fmean(v > 0 for v in ld), fmean(ld), len(probe), ld)


def chat_prompts(tokenizer: PreTrainedTokenizerBase, conversations: Sequence) -> list[str]:
    """Chat-templated prompt strings ending where the assistant answers; QAItems or message lists."""
    return [
        tokenizer.apply_chat_template(
            list(c.messages if isinstance(c, QAItem) else c), tokenize=False, add_generation_prompt=True
        )
        for c in conversations
    ]


def _left_padded(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> dict[str, torch.Tensor]:
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side


@torch.inference_mode()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[QAItem],
    batch_size: int,
    max_new_tokens: int,
    do_sample: bool = False,
    num_return_sequences: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Generate for every item; returns (padded prompt+completion ids, their attention masks, texts).

    Greedy unless ``do_sample`` (then plain ancestral sampling at temperature 1, no top-k/top-p, so the
    samples follow the model's own distribution). Callers seed the RNG.
    """
    prompts = chat_prompts(tokenizer, items)
    stop_ids = stop_token_ids(tokenizer, model.generation_config)
    sequences, masks, texts = [], [], []
    for part in tqdm(list(_batches(len(prompts), batch_size)), desc="generate", leave=False):
        enc = _left_padded(tokenizer, prompts[part])
        enc = {k: v.to(_device(model)) for k, v in enc.items()}
        sampling = (
            {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
            if do_sample
            else {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
        )
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_return_sequences,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop_ids,
            **sampling,
        ).cpu()
        prompt_len = enc["input_ids"].shape[1]
        prompt_mask = enc["attention_mask"].cpu().repeat_interleave(num_return_sequences, dim=0)
        completion = out[:, prompt_len:]
        completion_mask = until_stop(completion, stop_ids)
        sequences.append(F.pad(out, (0, max_new_tokens - completion.shape[1]), value=tokenizer.pad_token_id))
        masks.append(
            F.pad(torch.cat([prompt_mask, completion_mask], dim=1), (0, max_new_tokens - completion.shape[1]))
        )
        texts += [
            tokenizer.decode(row[:length], skip_special_tokens=True)
            for row, length in zip(completion, completion_mask.sum(-1).tolist(), strict=True)
        ]
    width = max(s.shape[1] for s in sequences)
    # Batches differ in prompt length: left-pad them all to one width.
    ids = torch.cat([F.pad(s, (width - s.shape[1], 0), value=tokenizer.pad_token_id) for s in sequences])
    mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in masks])
    return ids, mask, texts


def stop_token_ids(
    tokenizer: PreTrainedTokenizerBase, generation_config: GenerationConfig | None
) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's.

    Qwen2.5-Instruct's generation config lists ``<|im_end|>`` and ``<|endoftext|>``; a completion that
    stops on either must be cut there, or its padding is trained on (GRPO) and counted (KL). TRL's
    GRPOTrainer joins the same two lists.
    """
    ids = {tokenizer.eos_token_id}
    config_ids = getattr(generation_config, "eos_token_id", None)
    ids |= set(config_ids) if isinstance(config_ids, (list, tuple)) else {config_ids}
    return sorted(i for i in ids if i is not None)


def until_stop(completion: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """1 on tokens up to and including the first stop id of each row, 0 after it: [batch, new_tokens]."""
    is_stop = torch.isin(
        completion, torch.tensor(list(stop_ids), dtype=completion.dtype, device=completion.device)
    ).long()
    after_stop = (is_stop.cumsum(-1) - is_stop) > 0
    return (~after_stop).long()


def evaluate_target(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[QAItem],
    batch_size: int,
    max_new_tokens: int,
) -> TargetScore:
    _, _, texts = generate_completions(model, tokenizer, items, batch_size, max_new_tokens)
    correct = tuple(
        score_answer(text, item.gold, options=item.options, answer_format=item.answer_format)
        for text, item in zip(texts, items, strict=True)
    )
    tagged = [has_answer_tag(text) for text in texts]
    return TargetScore(fmean(correct), sum(tagged) / len(items), len(items), correct)


def sample_kl_reference(
    base_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[QAItem],
    cfg: EvaluationConfig,
) -> KLReference:
    """Sample ``cfg.kl_samples_per_prompt`` continuations per prompt from the base model (seeded)."""
    items = list(items)[: cfg.kl_prompts]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.kl_seed)
        ids, mask, _ = generate_completions(
            base_model,
            tokenizer,
            items,
            cfg.batch_size,
            cfg.kl_max_new_tokens,
            do_sample=True,
            num_return_sequences=cfg.kl_samples_per_prompt,
        )
    completion_mask = mask[:, -cfg.kl_max_new_tokens :]
    return KLReference(ids, mask, completion_mask)


@torch.inference_mode()
def _continuation_log_probs(model: PreTrainedModel, ref: KLReference, rows: slice) -> torch.Tensor:
    """Log-probs [batch, completion_len, vocab] the model assigns to each continuation position, on the
    model's device."""
    n_new = ref.completion_mask.shape[1]
    mask = ref.attention_mask[rows].to(_device(model))
    logits = model(
        input_ids=ref.input_ids[rows].to(_device(model)),
        attention_mask=mask,
        position_ids=position_ids_for(mask),
        logits_to_keep=n_new + 1,
    ).logits[:, :-1]  # position t predicts token t + 1
    return torch.log_softmax(logits.float(), dim=-1)


def kl_to_base(
    base_model: PreTrainedModel, model: PreTrainedModel, ref: KLReference, batch_size: int
) -> float:
    """Token-mean forward KL(base || model) over the base model's sampled continuations, computed on the
    base model's device (full-vocabulary log-probs never leave it: 5 GB per batch of the paper config)."""
    total, count = 0.0, 0.0
    for rows in _batches(ref.input_ids.shape[0], batch_size):
        base_lp = _continuation_log_probs(base_model, ref, rows)
        model_lp = _continuation_log_probs(model, ref, rows).to(base_lp.device)
        kl = (base_lp.exp() * (base_lp - model_lp)).sum(-1)  # [batch, completion_len]
        weight = ref.completion_mask[rows].to(kl.device).float()
        total += float((kl * weight).sum())
        count += float(weight.sum())
    return total / max(count, 1.0)


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: EvaluationConfig,
    target_items: Sequence[QAItem],
    probes: Sequence[ProbeSet],
    base_model: PreTrainedModel | None = None,
    kl_reference: KLReference | None = None,
) -> ModelScores:
    """All of a checkpoint's scores: flat metrics (``target/accuracy``, ``probe/ioi/mean_ld``, ...) and
    per-item vectors (``target/correct``, ``probe/ioi/ld``)."""
    target = evaluate_target(model, tokenizer, target_items, cfg.batch_size, cfg.max_new_tokens)
    metrics = {
        "target/accuracy": target.accuracy,
        "target/format_rate": target.format_rate,
        "target/n_items": float(target.n_items),
    }
    item_scores = {"target/correct": list(target.correct)}
    for probe in tqdm(probes, desc="probes", leave=False):
        score = evaluate_probe(model, probe, cfg.batch_size)
        metrics[f"probe/{probe.name}/accuracy"] = score.accuracy
        metrics[f"probe/{probe.name}/mean_ld"] = score.mean_ld
        metrics[f"probe/{probe.name}/n_items"] = float(score.n_items)
        item_scores[f"probe/{probe.name}/ld"] = list(score.ld)
    if base_model is not None and kl_reference is not None:
        metrics["kl_to_base"] = kl_to_base(base_model, model, kl_reference, cfg.batch_size)
    return ModelScores(metrics, item_scores)
