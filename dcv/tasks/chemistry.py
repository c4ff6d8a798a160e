"""Chemistry multiple-choice QA generated from real element data (``periodictable``).

Every question kind is a pure function of the element (or compound) and a seeded RNG, so the same seed
gives the same items, options and option order on every machine. The pool of distinct questions is
shuffled once and cut into test (first) and train (next), so no question text is in both splits.

For circuit discovery on the task itself, each question the model is not trained on has counterfactuals:
the same question about another entity of its kind whose answer is another of its options, so only the
entity and the gold letter change (the ``chem`` probe in ``dcv.tasks.probes``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import periodictable

from dcv.config import TargetTaskConfig
from dcv.tasks.items import LETTERS, QAItem, build_messages

# Period p spans atomic numbers PERIOD_STARTS[p-1] .. PERIOD_STARTS[p] - 1.
PERIOD_STARTS = (1, 3, 11, 19, 37, 55, 87, 119)
# La, Ac, Lu, Lr sit in group 3 or in the f block depending on the table; ask nothing about them.
AMBIGUOUS_POSITION = {57, 71, 89, 103}
MAX_Z = 103  # heavier elements have no chemistry a QA item could ask about

# (name, formula) of common compounds; molar masses come from periodictable's formula parser.
COMPOUNDS = (
    ("water", "H2O"),
    ("carbon dioxide", "CO2"),
    ("methane", "CH4"),
    ("ammonia", "NH3"),
    ("sodium chloride", "NaCl"),
    ("sulfuric acid", "H2SO4"),
    ("nitric acid", "HNO3"),
    ("hydrogen chloride", "HCl"),
    ("glucose", "C6H12O6"),
    ("ethanol", "C2H6O"),
    ("calcium carbonate", "CaCO3"),
    ("sodium hydroxide", "NaOH"),
    ("potassium permanganate", "KMnO4"),
    ("sodium bicarbonate", "NaHCO3"),
    ("hydrogen peroxide", "H2O2"),
    ("ozone", "O3"),
    ("benzene", "C6H6"),
    ("acetic acid", "C2H4O2"),
    ("magnesium oxide", "MgO"),
    ("iron(III) oxide", "Fe2O3"),
    ("aluminium oxide", "Al2O3"),
    ("copper(II) sulfate", "CuSO4"),
    ("silver nitrate", "AgNO3"),
    ("potassium chloride", "KCl"),
    ("calcium chloride", "CaCl2"),
    ("phosphoric acid", "H3PO4"),
    ("sucrose", "C12H22O11"),
    ("propane", "C3H8"),
    ("butane", "C4H10"),
    ("ethylene", "C2H4"),
    ("acetylene", "C2H2"),
    ("carbon monoxide", "CO"),
    ("nitrogen dioxide", "NO2"),
    ("sulfur dioxide", "SO2"),
    ("urea", "CH4N2O"),
    ("methanol", "CH4O"),
    ("acetone", "C3H6O"),
    ("sodium sulfate", "Na2SO4"),
    ("potassium nitrate", "KNO3"),
    ("ammonium chloride", "NH4Cl"),
    ("calcium hydroxide", "Ca(OH)2"),
    ("barium sulfate", "BaSO4"),
    ("zinc oxide", "ZnO"),
    ("lithium hydroxide", "LiOH"),
    ("hydrogen fluoride", "HF"),
    ("nitrous oxide", "N2O"),
    ("silicon dioxide", "SiO2"),
    ("potassium hydroxide", "KOH"),
    ("magnesium sulfate", "MgSO4"),
    ("sodium carbonate", "Na2CO3"),
)
# Distractor masses: the correct mass with one O, H, C or N atom too many or too few (a miscount).
MISCOUNT_OFFSETS = (15.999, -15.999, 1.008, -1.008, 12.011, -12.011, 14.007, -14.007)
# A pool entry: (kind, question, make_options(rng) -> (correct answer, distractors)).
PoolEntry = tuple[str, str, Callable]


@dataclass(frozen=True)
class Element:
    number: int
    symbol: str
    name: str
    period: int
    group: int | None  # None for the f block
    block: str


def table_position(z: int) -> tuple[int, int | None, str]:
    """(period, group, block) of atomic number ``z`` in the 18-column table (La-Yb / Ac-No as f block)."""
    if not 1 <= z < PERIOD_STARTS[-1]:
        raise ValueError(f"atomic number {z} is outside 1..118")
    period = next(p for p in range(1, 8) if z < PERIOD_STARTS[p])
    k = z - PERIOD_STARTS[period - 1] + 1  # 1-based column within the period's row
    if period == 1:
        return (1, 1, "s") if z == 1 else (1, 18, "s")
    if k <= 2:
        return period, k, "s"
    if period <= 3:
        return period, k + 10, "p"
    if period <= 5:
        return period, k, ("d" if k <= 12 else "p")
    if k <= 16:
        return period, None, "f"
    group = k - 14
    return period, group, ("d" if group <= 12 else "p")


def load_elements() -> list[Element]:
    elements = []
    for el in periodictable.elements:
        if 1 <= el.number <= MAX_Z:
            period, group, block = table_position(el.number)
            elements.append(Element(el.number, el.symbol, el.name.capitalize(), period, group, block))
    return elements


def molar_mass(formula: str) -> float:
    return float(periodictable.formula(formula).mass)


def formula_atoms(formula: str) -> dict[str, int]:
    """Element name -> number of its atoms in ``formula``: {"hydrogen": 2, "oxygen": 1} for H2O."""
    return {element.name: int(count) for element, count in periodictable.formula(formula).atoms.items()}


def _choose_options(correct: str, distractors: list[str], rng: random.Random) -> tuple[tuple[str, ...], str]:
    """Four distinct options (correct + 3 distractors) in a seeded order, and the gold letter."""
    unique = [d for d in dict.fromkeys(distractors) if d != correct][:3]
    if len(unique) < 3:
        raise ValueError(f"not enough distinct distractors for {correct!r}: {distractors}")
    options = [correct, *unique]
    rng.shuffle(options)
    return tuple(options), LETTERS[options.index(correct)]


def _shuffled(rng: random.Random, values: list) -> list:
    values = list(values)
    rng.shuffle(values)
    return values


def _near(
    elements: list[Element], el: Element, rng: random.Random, key: Callable[[Element], str]
) -> list[str]:
    """Values of ``key`` for other elements near ``el`` in the table: plausible, not random, distractors."""
    pool = [e for e in elements if e.number != el.number and abs(e.number - el.number) <= 8]
    rng.shuffle(pool)
    return [key(e) for e in pool]


def _count_options(rng: random.Random, count: int) -> tuple[str, list[str]]:
    """A count and nearby positive counts as distractors (off by one to four)."""
    near = [count + d for d in (-4, -3, -2, -1, 1, 2, 3, 4) if count + d >= 1]
    return str(count), [str(n) for n in _shuffled(rng, near)]


@dataclass(frozen=True)
class ElementKind:
    """One kind of question about an element: its text, and its answer with distractors."""

    name: str  # a CHEMISTRY_KINDS entry
    question: Callable[[Element], str]
    # (elements, element, rng) -> (correct, distractors)
    options: Callable[[list[Element], Element, random.Random], tuple[str, list[str]]]
    asked: Callable[[Element], bool] = lambda el: True  # of which elements


ELEMENT_KINDS = (
    ElementKind(
        "symbol_to_name",
        lambda el: f"Which element has the chemical symbol {el.symbol}?",
        lambda els, el, rng: (el.name, _near(els, el, rng, lambda e: e.name)),
    ),
    ElementKind(
        "name_to_symbol",
        lambda el: f"What is the chemical symbol of {el.name.lower()}?",
        lambda els, el, rng: (el.symbol, _near(els, el, rng, lambda e: e.symbol)),
    ),
    ElementKind(
        "atomic_number",
        lambda el: f"What is the atomic number of {el.name.lower()}?",
        lambda els, el, rng: _count_options(rng, el.number),
    ),
    ElementKind(
        "element_from_number",
        lambda el: f"Which element has atomic number {el.number}?",
        lambda els, el, rng: (el.name, _near(els, el, rng, lambda e: e.name)),
    ),
    ElementKind(
        "period",
        lambda el: f"In which period of the periodic table is {el.name.lower()}?",
        lambda els, el, rng: (
            f"Period {el.period}",
            [f"Period {p}" for p in _shuffled(rng, [p for p in range(1, 8) if p != el.period])],
        ),
    ),
    ElementKind(
        "group",
        lambda el: f"In which group of the periodic table is {el.name.lower()}?",
        lambda els, el, rng: (
            f"Group {el.group}",
            [
                f"Group {g}"
                for g in _shuffled(rng, [g for g in range(1, 19) if g != el.group and abs(g - el.group) <= 5])
            ],
        ),
        asked=lambda el: el.number not in AMBIGUOUS_POSITION and el.group is not None,
    ),
    ElementKind(
        "block",
        lambda el: f"In which block of the periodic table is {el.name.lower()}?",
        lambda els, el, rng: (f"{el.block}-block", [f"{b}-block" for b in "spdf" if b != el.block]),
        asked=lambda el: el.number not in AMBIGUOUS_POSITION,
    ),
)


def _element_questions(elements: list[Element], kinds: set[str]) -> Iterator[tuple[str, str, Callable]]:
    """(kind, question, make_options(rng)) for every element and requested kind, element by element."""
    for el in elements:
        for kind in ELEMENT_KINDS:
            if kind.name in kinds and kind.asked(el):
                yield kind.name, kind.question(el), partial(kind.options, elements, el)


def _reading_questions(elements: list[Element], kinds: set[str]) -> Iterator[tuple[str, str, Callable]]:
    """Questions whose answer can be read from the question itself, given one rule of chemistry.

    A model that knows no element data (SmolLM2-135M does not: its answers on the fact kinds are at chance)
    can still learn the rule from the train split and apply it to unseen elements and formulas.
    """
    if "electrons" in kinds:
        for el in elements:
            # A neutral atom has as many electrons as protons: the atomic number.
            yield (
                "electrons",
                f"How many electrons does a neutral atom of {el.name.lower()} "
                f"(atomic number {el.number}) have?",
                (lambda rng, el=el: _count_options(rng, el.number)),
            )
    if "atom_count" in kinds:
        for name, formula in COMPOUNDS:
            for element, count in formula_atoms(formula).items():
                yield (
                    "atom_count",
                    f"How many {element} atoms does the formula {formula} ({name}) contain?",
                    (lambda rng, count=count: _count_options(rng, count)),
                )


def _compound_questions(kinds: set[str]) -> Iterator[tuple[str, str, Callable]]:
    if "molar_mass" not in kinds:
        return
    for name, formula in COMPOUNDS:
        mass = molar_mass(formula)
        yield (
            "molar_mass",
            f"What is the molar mass of {name} ({formula})?",
            (
                lambda rng, mass=mass: (
                    f"{mass:.2f} g/mol",
                    [
                        f"{mass + d:.2f} g/mol"
                        for d in _shuffled(rng, [d for d in MISCOUNT_OFFSETS if mass + d > 0])
                    ],
                )
            ),
        )


def question_pool(kinds: list[str]) -> list[PoolEntry]:
    """Every distinct (kind, question, option maker) the requested kinds can generate, in table order."""
    kind_set = set(kinds)
    elements = load_elements()
    pool = [
        *_element_questions(elements, kind_set),
        *_compound_questions(kind_set),
        *_reading_questions(elements, kind_set),
    ]
    seen: set[str] = set()
    return [q for q in pool if not (q[1] in seen or seen.add(q[1]))]


def split_order(cfg: TargetTaskConfig, pool_size: int) -> tuple[list[int], list[int], list[int]]:
    """Pool indices of (test, train, unused): one seeded shuffle, cut into test first, then train.

    Raises a ValueError naming the fields when the pool is too small.
    """
    needed = cfg.n_train + cfg.n_test
    if needed > pool_size:
        raise ValueError(
            f"target_task.n_train + target_task.n_test = {needed} exceeds the {pool_size} distinct chemistry "
            f"questions of kinds {list(cfg.kinds)}; lower them or add kinds"
        )
    order = list(range(pool_size))
    random.Random(cfg.seed).shuffle(order)
    return order[: cfg.n_test], order[cfg.n_test : needed], order[needed:]


def build_item(cfg: TargetTaskConfig, pool: list[PoolEntry], index: int) -> QAItem:
    kind, question, make_options = pool[index]
    # One RNG per question, seeded by its text: an item's options don't depend on which others were drawn.
    rng = random.Random(f"{cfg.seed}:{question}")
    correct, distractors = make_options(rng)
    options, gold = _choose_options(correct, distractors, rng)
    return QAItem(
        id=f"chem-{index:04d}",
        kind=kind,
        question=question,
        options=options,
        gold=gold,
        messages=build_messages(cfg.system_prompt, question, options),
        answer_format=cfg.answer_format,
    )


def build_chemistry_splits(cfg: TargetTaskConfig) -> tuple[list[QAItem], list[QAItem]]:
    """(train, test) items; raises a ValueError naming the fields when the pool is too small."""
    pool = question_pool(list(cfg.kinds))
    test, train, _ = split_order(cfg, len(pool))
    return [build_item(cfg, pool, i) for i in train], [build_item(cfg, pool, i) for i in test]


def counterfactual_items(
    item: QAItem, questions_by_answer: dict[tuple[str, str], list[tuple[int, str]]], system_prompt: str
) -> list[QAItem]:
    """The item's question about other entities of its kind whose answer is another of its options.

    The options stay as they are, so only the entity in the question and the gold letter change. An
    item none of whose distractors is another entity's answer (most molar masses) has none.
    """
    counterfactuals = []
    for letter, option in zip(LETTERS, item.options, strict=False):
        if letter == item.gold:
            continue
        # Every pool question has one answer, so a question answered by a distractor is another entity's.
        for index, question in questions_by_answer.get((item.kind, option), []):
            counterfactuals.append(
                QAItem(
                    id=f"{item.id}-cf-{index:04d}",
                    kind=item.kind,
                    question=question,
                    options=item.options,
                    gold=letter,
                    messages=build_messages(system_prompt, question, item.options),
                )
            )
    return counterfactuals


def build_counterfactual_pairs(cfg: TargetTaskConfig) -> list[tuple[QAItem, list[QAItem]]]:
    """(item, its counterfactuals) for every question the model is not trained on, in the split order.

    Those are the test split and then the pool questions neither split drew; train questions never
    appear as items (a counterfactual question may be any pool question of the same kind).
    """
    pool = question_pool(list(cfg.kinds))
    test, _, unused = split_order(cfg, len(pool))
    questions_by_answer: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for index, (kind, question, make_options) in enumerate(pool):
        # The correct answer is the first value an option maker returns; it does not depend on the RNG.
        answer = make_options(random.Random(0))[0]
        questions_by_answer.setdefault((kind, answer), []).append((index, question))
    pairs = []
    for index in test + unused:
        item = build_item(cfg, pool, index)
        pairs.append((item, counterfactual_items(item, questions_by_answer, cfg.system_prompt)))
    return pairs
