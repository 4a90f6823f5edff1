"""Table and plot of interleaved ``sluice bench --mode step`` runs of two builds.

Reads ``DIR/step_before_N.json`` and ``DIR/step_after_N.json`` (one round is
a before run then an after run, alternated so drift in the machine's load
hits both alike), prints per transport the step's msg/s, its ratio to the
bare loop and to the Faust agent, round by round with the median, and plots
them (one dot per round, the median as a bar)::

    python benchmarks/step_before_after.py benchmarks/results/issue20
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SIDES = ("before", "after")
# Issue 20's budgets, drawn as dashed lines.
BUDGETS = {"step / bare loop": 0.5, "native / Faust": 5.0}


def figures(run: dict[str, Any], transport: str) -> dict[str, float | None]:
    t = run["transports"][transport]
    return {
        "step msg/s": t["step_msgs_per_s"],
        "step / bare loop": t["ratio"],
        "native / Faust": t.get("native_vs_faust"),
    }


def load(folder: Path) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for side in SIDES:
        paths = sorted(folder.glob(f"step_{side}_*.json"))
        runs[side] = [json.loads(p.read_text()) for p in paths]
    if not runs["before"] or len(runs["before"]) != len(runs["after"]):
        raise SystemExit(f"{folder}: need as many step_before_N.json as step_after_N.json")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--plot", type=Path, default=None, help="default: FOLDER/step.png")
    args = parser.parse_args()
    runs = load(args.folder)
    transports = list(runs["before"][0]["transports"])
    metrics = ("step msg/s", "step / bare loop", "native / Faust")
    fig, axes = plt.subplots(len(transports), len(metrics), figsize=(12, 3.2 * len(transports)))
    for row, transport in enumerate(transports):
        for col, metric in enumerate(metrics):
            ax = axes[row][col] if len(transports) > 1 else axes[col]
            if all(figures(r, transport)[metric] is None for r in runs["after"]):
                ax.axis("off")
                ax.set_title(f"{transport}: {metric} (not measured)", fontsize=10)
                continue
            if metric in BUDGETS:
                ax.axhline(BUDGETS[metric], color="#c44e52", linestyle="--", linewidth=1)
            for x, side in enumerate(SIDES):
                values = [figures(r, transport)[metric] for r in runs[side]]
                got = [v for v in values if v is not None]
                if not got:
                    continue
                median = statistics.median(got)
                ax.bar(x, median, color="#bbbbbb" if side == "before" else "#4c72b0", width=0.6)
                ax.plot([x] * len(got), got, "o", color="black", markersize=4)
                rounds = ", ".join(f"{v:,.0f}" if v >= 100 else f"{v:.2f}" for v in got)
                shown = f"{median:,.0f}" if median >= 100 else f"{median:.2f}"
                print(f"{transport:6} {metric:17} {side:6} median {shown:>7}  rounds {rounds}")
            ax.set_xticks(range(len(SIDES)), SIDES)
            ax.set_title(f"{transport}: {metric}", fontsize=10)
    machine = runs["after"][0].get("machine", {})
    fig.suptitle(
        f"sluice bench --mode step, {runs['after'][0]['settings']['messages']:,} events, "
        f"{len(runs['after'])} interleaved rounds; {machine.get('cores')} cores "
        f"{machine.get('cpu_model')} (bars: median, dots: rounds)",
        fontsize=10,
    )
    fig.tight_layout()
    out = args.plot or args.folder / "step.png"
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
