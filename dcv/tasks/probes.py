"""Prior-capability probes: contrast pairs the base model can already solve.

Each item has a clean prompt, a corrupted prompt of exactly the same token length, and a correct and a
wrong answer token; the metric is LD = logit(correct) - logit(wrong) at the last position.

- ``ioi``: indirect-object identification. "When Mary and John went to the store, John gave a drink to"
  -> " Mary" vs " John". Corruption ABC: the second mention of the subject becomes a third name.
- ``capitals``: "The capital of France is" -> " Paris"; the corrupted prompt names another country whose
  prompt has the same token length, and the wrong answer is that country's capital.
- ``greater_than``: "The war lasted from the year 1732 to the year 17" -> tens digit "4" (later) vs "2"
  (earlier). Corruption: the start year's tens digit becomes 0 ("1702"), as in Hanna et al. 2023.
- ``induction``: a random token sequence and its repeat, cut mid-way -> the next token of the repeat vs
  the token at that place in a different random prefix, which the corrupted prompt uses instead.
- ``chem``: the target task's own counterfactual pairs (with SciKnowEval: pairs of dcv's generated chemistry
  questions, in the target task's prompt). The chat-templated prompt of a chemistry question the model is
  not trained on, followed by ``<answer>`` -> its gold letter vs the gold letter of a
  counterfactual: the same question about another entity whose answer is another of the same options
  ("symbol Na?" vs "symbol Mg?" with options A. Sodium B. Magnesium ...), which the corrupted prompt asks.

Candidates are generated in a seeded order; a candidate whose answers are not single tokens or whose two
prompts differ in token length under the model's tokenizer is dropped, and the count is kept.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from transformers import PreTrainedTokenizerBase

from dcv.config import ProbeConfig, TargetTaskConfig
from dcv.evaluation import chat_prompts
from dcv.tasks.chemistry import build_counterfactual_pairs
from dcv.tasks.items import LETTERS, ProbeItem, ProbeSet

# (clean text, corrupted text, correct answer, wrong answer); answers carry their leading space.
Candidate = tuple[str, str, str, str]

NAMES = (
    "Mary",
    "John",
    "Tom",
    "James",
    "Sarah",
    "Michael",
    "David",
    "Lisa",
    "Emma",
    "Anna",
    "Paul",
    "Mark",
    "Kate",
    "Laura",
    "Peter",
    "Daniel",
    "Jessica",
    "Robert",
    "Susan",
    "Emily",
    "George",
    "Alice",
    "Henry",
    "Rachel",
    "Steven",
    "Linda",
    "Kevin",
    "Helen",
    "Frank",
    "Amy",
)
PLACES = (
    "store",
    "park",
    "school",
    "hospital",
    "office",
    "restaurant",
    "station",
    "garden",
    "beach",
    "market",
)
OBJECTS = ("drink", "book", "gift", "ring", "letter", "bottle", "ball", "key", "snack", "flower")
IOI_TEMPLATES = (
    "When {a} and {b} went to the {place}, {c} gave a {obj} to",
    "After {a} and {b} went to the {place}, {c} gave a {obj} to",
    "Then, {a} and {b} had a long day at the {place}. {c} gave a {obj} to",
    "While {a} and {b} were working at the {place}, {c} gave a {obj} to",
    "Friends {a} and {b} found a {obj} at the {place}. {c} gave the {obj} to",
)
EVENTS = (
    "war",
    "drought",
    "reign",
    "expedition",
    "project",
    "dynasty",
    "famine",
    "siege",
    "journey",
    "strike",
)
# A two-shot prefix fixes the answer format; its countries are excluded from the items.
CAPITALS_SHOTS = (("Japan", "Tokyo"), ("Italy", "Rome"))
CAPITALS_PREFIX = "".join(f"The capital of {c} is {cap}. " for c, cap in CAPITALS_SHOTS)
INDUCTION_PREFIX_LEN = 10
INDUCTION_REPEAT_LEN = 5
# The chem prompts end where the model writes its letter: right after the opening tag it is asked for.
ANSWER_OPEN = "<answer>"
MAX_CANDIDATES_PER_ITEM = 20


def ioi_candidates(rng: random.Random) -> Iterator[Candidate]:
    while True:
        a, b, c = rng.sample(NAMES, 3)
        template = rng.choice(IOI_TEMPLATES)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        if rng.random() < 0.5:  # ABBA and BABA orders, so the answer is not always the first name
            first, second = a, b
        else:
            first, second = b, a
        clean = template.format(a=first, b=second, place=place, obj=obj, c=b)
        corrupt = template.format(a=first, b=second, place=place, obj=obj, c=c)
        yield clean, corrupt, f" {a}", f" {b}"


def capital_pairs() -> list[tuple[str, str]]:
    """(country, capital) from ``countryinfo``, sorted by country, for sovereign-looking entries."""
    from countryinfo import all_countries

    pairs = set()
    for country in all_countries():
        try:
            name, capital = country.name(), country.capital()
        except (KeyError, AttributeError):
            continue
        if isinstance(name, str) and isinstance(capital, str) and "," not in name and "/" not in capital:
            pairs.add((name, capital))
    return sorted(pairs)


def capitals_candidates(rng: random.Random, tokenizer: PreTrainedTokenizerBase) -> Iterator[Candidate]:
    # Only countries whose capital is one token can give an LD; grouping by prompt length lets us pair
    # each country with a same-length corrupting country.
    def prompt(country: str) -> str:
        return f"{CAPITALS_PREFIX}The capital of {country} is"

    usable = [
        (c, cap)
        for c, cap in capital_pairs()
        if _single_token(tokenizer, f" {cap}") is not None and (c, cap) not in CAPITALS_SHOTS
    ]
    by_length: dict[int, list[tuple[str, str]]] = {}
    for country, capital in usable:
        by_length.setdefault(len(_ids(tokenizer, prompt(country))), []).append((country, capital))
    order = list(usable)
    rng.shuffle(order)
    for country, capital in order:
        partners = [p for p in by_length[len(_ids(tokenizer, prompt(country)))] if p[1] != capital]
        if not partners:
            continue
        other, other_capital = rng.choice(partners)
        yield prompt(country), prompt(other), f" {capital}", f" {other_capital}"


def greater_than_candidates(rng: random.Random) -> Iterator[Candidate]:
    while True:
        century = rng.choice((15, 16, 17, 18))
        tens, units = rng.randint(2, 8), rng.randint(0, 9)
        event = rng.choice(EVENTS)
        template = "The {event} lasted from the year {century}{tens}{units} to the year {century}"
        clean = template.format(event=event, century=century, tens=tens, units=units)
        corrupt = template.format(event=event, century=century, tens=0, units=units)
        yield clean, corrupt, str(tens + 1), str(tens - 1)


def induction_items(rng: random.Random, tokenizer: PreTrainedTokenizerBase, n: int) -> Iterator[ProbeItem]:
    """Built in token space: random word tokens, so lengths match by construction."""
    vocab = _word_tokens(tokenizer)
    for _ in range(n):
        first = rng.sample(vocab, INDUCTION_PREFIX_LEN)
        other = rng.sample([t for t in vocab if t not in first], INDUCTION_PREFIX_LEN)
        clean = first + first[:INDUCTION_REPEAT_LEN]
        corrupt = other + first[:INDUCTION_REPEAT_LEN]
        yield ProbeItem(
            probe="induction",
            clean_ids=tuple(clean),
            corrupt_ids=tuple(corrupt),
            correct_id=first[INDUCTION_REPEAT_LEN],
            wrong_id=other[INDUCTION_REPEAT_LEN],
            clean_text=tokenizer.decode(clean),
            corrupt_text=tokenizer.decode(corrupt),
        )


def chem_items(
    rng: random.Random, tokenizer: PreTrainedTokenizerBase, target_task: TargetTaskConfig, n_items: int
) -> tuple[list[ProbeItem], int]:
    """Up to ``n_items`` chem items and the number of (item, counterfactual) pairs tried to find them.

    Items are taken in a seeded order; for each, its counterfactuals are tried in a seeded order until one
    tokenizes to the same length. Prompts are exactly what evaluation feeds the model, plus ``<answer>``.
    """
    letter_ids = {letter: _single_token(tokenizer, letter) for letter in LETTERS}
    if None in letter_ids.values():
        raise ValueError(f"probes[chem]: the letters {LETTERS} are not single tokens for this tokenizer")
    pairs = build_counterfactual_pairs(target_task)
    rng.shuffle(pairs)
    items: list[ProbeItem] = []
    n_candidates = 0
    for item, counterfactuals in pairs:
        if len(items) == n_items or n_candidates >= n_items * MAX_CANDIDATES_PER_ITEM:
            break
        clean = chat_prompts(tokenizer, [item])[0] + ANSWER_OPEN
        clean_ids = _ids(tokenizer, clean)
        for counterfactual in rng.sample(counterfactuals, len(counterfactuals)):
            n_candidates += 1
            corrupt = chat_prompts(tokenizer, [counterfactual])[0] + ANSWER_OPEN
            corrupt_ids = _ids(tokenizer, corrupt)
            if len(corrupt_ids) == len(clean_ids):
                items.append(
                    ProbeItem(
                        probe="chem",
                        clean_ids=tuple(clean_ids),
                        corrupt_ids=tuple(corrupt_ids),
                        correct_id=letter_ids[item.gold],
                        wrong_id=letter_ids[counterfactual.gold],
                        clean_text=clean,
                        corrupt_text=corrupt,
                    )
                )
                break
    return items, n_candidates


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _single_token(tokenizer: PreTrainedTokenizerBase, text: str) -> int | None:
    ids = _ids(tokenizer, text)
    return ids[0] if len(ids) == 1 else None


def _word_tokens(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that decode to a space and 3+ lowercase letters and re-encode to themselves, in id order.

    Decoded and re-encoded in batches: one call per token took 2-6 s on SmolLM2's 49k tokens, in every
    trial's start-up (the evaluation kit's probes), and batching halves it."""
    texts = tokenizer.batch_decode([[token_id] for token_id in range(len(tokenizer))])
    words = [
        (token_id, text)
        for token_id, text in enumerate(texts)
        if text.startswith(" ") and len(text) >= 4 and text[1:].isalpha() and text[1:].islower()
    ]
    encoded = tokenizer([text for _, text in words], add_special_tokens=False)["input_ids"]
    return [token_id for (token_id, _), ids in zip(words, encoded, strict=True) if ids == [token_id]]


def _tokenize_candidate(
    name: str, tokenizer: PreTrainedTokenizerBase, candidate: Candidate
) -> ProbeItem | None:
    clean, corrupt, correct, wrong = candidate
    correct_id, wrong_id = _single_token(tokenizer, correct), _single_token(tokenizer, wrong)
    clean_ids, corrupt_ids = _ids(tokenizer, clean), _ids(tokenizer, corrupt)
    if correct_id is None or wrong_id is None or correct_id == wrong_id or len(clean_ids) != len(corrupt_ids):
        return None
    return ProbeItem(name, tuple(clean_ids), tuple(corrupt_ids), correct_id, wrong_id, clean, corrupt)


def _kept_candidates(
    cfg: ProbeConfig, tokenizer: PreTrainedTokenizerBase, candidates: Iterator[Candidate]
) -> tuple[list[ProbeItem], int]:
    items: list[ProbeItem] = []
    seen: set[str] = set()
    n_candidates = 0
    for candidate in candidates:
        if len(items) == cfg.n_items or n_candidates >= cfg.n_items * MAX_CANDIDATES_PER_ITEM:
            break
        n_candidates += 1
        item = _tokenize_candidate(cfg.name, tokenizer, candidate)
        if item is not None and item.clean_text not in seen:
            seen.add(item.clean_text)
            items.append(item)
    return items, n_candidates


def chem_questions(target_task: TargetTaskConfig) -> TargetTaskConfig:
    """The generated chemistry questions the chem probe asks, in the target task's prompt.

    With the chemistry task they are its own held-out questions. With SciKnowEval (the paper config) the
    model trains on none of the generated questions, so the whole element-table pool is held out: a
    chemistry task of one train and one test question (the smallest split) stands for it.
    """
    if target_task.name == "chemistry":
        return target_task
    return TargetTaskConfig(
        name="chemistry", seed=target_task.seed, n_train=1, n_test=1, system_prompt=target_task.system_prompt
    )


def build_probe(
    cfg: ProbeConfig, tokenizer: PreTrainedTokenizerBase, target_task: TargetTaskConfig
) -> ProbeSet:
    """``cfg.n_items`` items (fewer if the generator runs dry), deterministic by ``cfg.seed``.

    ``target_task`` matters only to ``chem``, whose items are that task's questions (`chem_questions`).
    """
    rng = random.Random(f"{cfg.name}:{cfg.seed}")
    if cfg.name == "induction":
        return ProbeSet(cfg.name, tuple(induction_items(rng, tokenizer, cfg.n_items)), cfg.n_items)
    if cfg.name == "chem":
        items, n_candidates = chem_items(rng, tokenizer, chem_questions(target_task), cfg.n_items)
    else:
        generators: dict[str, Callable[[], Iterator[Candidate]]] = {
            "ioi": lambda: ioi_candidates(rng),
            "capitals": lambda: capitals_candidates(rng, tokenizer),
            "greater_than": lambda: greater_than_candidates(rng),
        }
        items, n_candidates = _kept_candidates(cfg, tokenizer, generators[cfg.name]())
    if not items:
        raise ValueError(
            f"probes[{cfg.name}]: no candidate tokenizes to single-token answers and equal lengths"
        )
    return ProbeSet(cfg.name, tuple(items), n_candidates)


def build_probes(
    cfgs: list[ProbeConfig], tokenizer: PreTrainedTokenizerBase, target_task: TargetTaskConfig
) -> list[ProbeSet]:
    return [build_probe(cfg, tokenizer, target_task) for cfg in cfgs]
