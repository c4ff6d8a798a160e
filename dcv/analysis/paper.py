"""The ``paper`` table: ours beside the seed paper's figures; its report section (``section``), with each
model's retention beside its chance level."""

from __future__ import annotations

import polars as pl

from dcv.analysis.inputs import Analysis
from dcv.analysis.section import Block, Page
from dcv.matched import TRAINING_METHODS
from dcv.storage import BASE_MODEL

# The seed paper's figures (Qwen2.5-3B-Instruct, 576 heads, learned masks), set beside ours (docs/method.md
# "The seed paper's protocol and numbers").
PAPER = {
    "circuit_size": {"base": 297.0, "sft": 265.0, "rl": 296.0},
    "retention_pct": {"base": 100.0, "sft": 52.0, "rl": 68.0},
    "faithfulness": {"base": 1.02, "sft": 1.04, "rl": 1.12},
}
PAPER_HEADS = 576


def final_checkpoints(summary: pl.DataFrame) -> pl.DataFrame:
    """The last evaluated step of every fine-tuned run."""
    last = summary.group_by("trial", "patching").agg(pl.col("step").max())
    return summary.filter(pl.col("step") > 0).join(last, on=["trial", "patching", "step"], how="semi")


def paper_table(summary: pl.DataFrame) -> pl.DataFrame:
    """Per discovery method, ours beside the seed paper's: circuit size, base-circuit retention (%) and
    faithfulness of the base model and of each method's final checkpoints (means over runs and probes)."""
    base = summary.filter(pl.col("model") == BASE_MODEL)
    final = final_checkpoints(summary)
    rows = []
    for patching in sorted(summary["patching"].unique().to_list()):
        models = {"base": base.filter(pl.col("patching") == patching)} | {
            t: final.filter((pl.col("patching") == patching) & (pl.col("training") == t))
            for t in TRAINING_METHODS
        }
        floor = base.filter(pl.col("patching") == patching)["noise_floor_preservation"].drop_nulls()
        for quantity, column, scale in (
            ("circuit_size", "circuit_size", 1.0),
            ("retention_pct", "preservation", 100.0),
            ("faithfulness", "faithfulness", 1.0),
        ):
            means = {m: f[column].mean() for m, f in models.items()}  # None when no value
            means = {m: None if v is None else scale * v for m, v in means.items()}
            chance = {}
            if quantity == "retention_pct":
                # A random head set of each model's circuit size: retention reads "above chance by d".
                chance = {f"chance_{m}": f["preservation_chance"].mean() for m, f in models.items()}
                chance = {k: None if v is None else 100.0 * v for k, v in chance.items()}
                chance |= {
                    f"paper_chance_{m}": 100.0 * n / PAPER_HEADS for m, n in PAPER["circuit_size"].items()
                }
            rows.append(
                {
                    "patching": patching,
                    "quantity": quantity,
                    **means,
                    "n_runs_sft": models["sft"].height,
                    "n_runs_rl": models["rl"].height,
                    "noise_floor_retention_pct": 100.0 * floor.mean()
                    if quantity == "retention_pct" and floor.len()
                    else None,
                    **{f"paper_{m}": PAPER[quantity][m] for m in ("base", "sft", "rl")},
                    **chance,
                }
            )
    schema = {
        "patching": pl.String,
        "quantity": pl.String,
        "base": pl.Float64,
        "sft": pl.Float64,
        "rl": pl.Float64,
        "n_runs_sft": pl.Int64,
        "n_runs_rl": pl.Int64,
        "noise_floor_retention_pct": pl.Float64,
        "paper_base": pl.Float64,
        "paper_sft": pl.Float64,
        "paper_rl": pl.Float64,
        # retention_pct row only: the retention (%) a random head set of the model's circuit size would score
        **{f"chance_{m}": pl.Float64 for m in ("base", "sft", "rl")},
        **{f"paper_chance_{m}": pl.Float64 for m in ("base", "sft", "rl")},
    }
    return pl.DataFrame(rows, schema=schema)


def build(a: Analysis) -> dict[str, pl.DataFrame]:
    return {"paper": paper_table(a.summary)}


def section(page: Page) -> list[Block]:
    """The paper table, read: what ours are, the noise floor and chance levels beside them."""
    return [
        ("h2", "Beside the seed paper (paper_*: Qwen2.5-3B-Instruct, 576 heads, learned masks)"),
        (
            "p",
            "Ours: the base model and the final checkpoint of every run (means over runs and probes); "
            "retention = share of the base circuit's heads in the model's own circuit; faithfulness of "
            "the model's own circuit. noise_floor_retention_pct: the base circuit against the base model's "
            "circuit on bootstrap resamples of its probe items (5th percentile); retention above it is not "
            "distinguishable from base. chance_*: the retention a random head set of the model's own "
            "circuit size would score (|C(M)| / N heads); retention is read as above chance by d.",
        ),
        *[("p", line) for line in chance_lines(page.tables["paper"])],
        ("table", page.tables["paper"]),
    ]


def chance_lines(paper: pl.DataFrame) -> list[str]:
    """Per patching method, one sentence: each model's retention, its chance level and "above chance by
    d" (percentage points), then the seed paper's the same way (docs/method.md "Chance level")."""

    def part(name: str, retention, chance) -> str | None:
        if retention is None or chance is None:
            return None
        return f"{name} {retention:.3g}% (chance {chance:.3g}%, above chance by {retention - chance:.3g} pp)"

    lines = []
    for row in paper.filter(pl.col("quantity") == "retention_pct").iter_rows(named=True):
        ours = [
            part(m if m == "base" else m.upper(), row[m], row.get(f"chance_{m}"))
            for m in ("base", "sft", "rl")
        ]
        paper_parts = [
            part(m.upper(), row[f"paper_{m}"], row.get(f"paper_chance_{m}")) for m in ("sft", "rl")
        ]
        ours, paper_parts = [p for p in ours if p], [p for p in paper_parts if p]
        if not ours:
            continue
        text = f"Retention beside chance ({row['patching']}): " + "; ".join(ours) + "."
        if paper_parts:
            text += " The seed paper: " + "; ".join(paper_parts) + "."
        lines.append(text)
    return lines
