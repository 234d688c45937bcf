"""``visiontune classify compare``: every strategy on the same data under the same epoch budget.

Each strategy trains into ``OUT/<strategy>/`` (a normal run, with its own report). Then ``OUT/compare.csv``,
``compare.json`` and ``compare.md`` hold one row per strategy, ``compare.png`` plots validation accuracy
against wall time, and the table is printed.
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

from .config import ClassifyConfig
from .data.splits import find_splits
from .errors import UserError
from .runs import check_out_dir, create_out_dir, write_json
from .strategies import STRATEGIES

DEFAULT_EPOCHS = STRATEGIES["full"].recipe.epochs  # the default recipe's epochs of the strategies that train the base
COLUMNS = (
    "strategy",
    "best_val_accuracy",
    "best_epoch",
    "final_val_accuracy",
    "epochs",
    "train_seconds",
    "trainable_params",
    "total_params",
)


def markdown_table(rows: list[dict]) -> str:
    def cell(v):
        return (
            f"{v:.4f}"
            if isinstance(v, float) and v <= 1
            else (f"{v:.1f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v))
        )

    lines = ["| " + " | ".join(c.replace("_", " ") for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def _plot(path: Path, runs: dict[str, list[dict]], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = {r["strategy"]: r["trainable_params"] for r in rows}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for strategy, history in runs.items():
        ax.plot(
            [h["elapsed_seconds"] for h in history],
            [h["val_accuracy"] for h in history],
            marker="o",
            label=f"{strategy} ({params[strategy]:,} trainable params)",
        )
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("strategies under the same epoch budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(cfg: ClassifyConfig, strategies: tuple[str, ...] = tuple(STRATEGIES)) -> list[dict]:
    """Train each strategy with ``cfg``'s settings and the same number of epochs; write and print the table."""
    from .tasks.classify import fit

    cfg = replace(cfg, strategy="linear").validate()
    if cfg.labels:
        raise UserError("--labels: compare ranks single-label runs by accuracy; train each multi-label strategy with classify train")
    out = check_out_dir(cfg.out, cfg.overwrite)
    find_splits(cfg.data, cfg.val_data, cfg.val_split, cfg.seed, cache_dir=cfg.cache_dir)  # a bad --data fails before anything is written
    create_out_dir(out, cfg.overwrite)
    epochs = cfg.epochs or DEFAULT_EPOCHS
    rows, runs = [], {}
    for strategy in strategies:
        if not cfg.quiet:
            print(f"=== {strategy} ({epochs} epochs) ===", flush=True)
        m = fit(replace(cfg, strategy=strategy, epochs=epochs, out=str(out / strategy), overwrite=True))
        rows.append({"strategy": strategy, **{c: m[c] for c in COLUMNS if c != "strategy"}})
        runs[strategy] = [json.loads(line) for line in (out / strategy / "log.jsonl").read_text().splitlines() if line.strip()]
    with open(out / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    write_json(out / "compare.json", {"epochs": epochs, "data": cfg.data, "model": cfg.model, "rows": rows})
    table = markdown_table(rows)
    (out / "compare.md").write_text(f"Strategies on {cfg.data}, {cfg.model}, {epochs} epochs each\n\n{table}\n")
    _plot(out / "compare.png", runs, rows)
    print(table)
    print(f"outputs in {out}/: compare.csv compare.json compare.md compare.png, and one run per strategy", flush=True)
    return rows
