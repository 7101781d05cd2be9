"""The scaling benchmark's figure and table: time and memory against the number of nodes.

Reads the JSON files ``python -m simulations.bench_scale --json F`` writes (a list of points
each) and draws, per model, the FedTAN round's wall time, the ratio to Flower's floor
(FedAvg + 2L x empty exchange) and the run's peak memory (PSS) against the nodes; with
``--markdown`` prints the Markdown table of docs/benchmarks.md and the README. Several files
(repeated runs) are allowed: a point measured more than once shows every run's figures in
the table, each run its own line on the plot.

Run::

    python -m simulations.plot_scale docs/results/scale/run-*.json --out docs/results/scale/scale.png --markdown
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

MODEL_NAMES = {"cnn": "CNN", "resnet20": "ResNet-20"}
Key = tuple[str, int, int]  # model, nodes, batch size


def load_points(paths: Iterable[Path]) -> dict[Key, list[dict]]:
    """Every measured point, grouped by (model, nodes, batch size), in file order."""
    grouped: dict[Key, list[dict]] = defaultdict(list)
    for path in paths:
        points = json.loads(Path(path).read_text())
        if not isinstance(points, list):
            raise ValueError(f"{path}: expected the list of points bench_scale --json writes")
        for point in points:
            point = {**point, "source": Path(path).stem}
            grouped[(point["model"], int(point["nodes"]), int(point["batch-size"]))].append(point)
    return dict(sorted(grouped.items(), key=lambda item: (item[0][0], item[0][1], -item[0][2])))


def _runs(points: Sequence[Mapping[str, Any]], field: str, scale: float = 1.0, digits: int = 2) -> str:
    return " / ".join(f"{p[field] * scale:.{digits}f}" for p in points)


def _replays(points: Sequence[Mapping[str, Any]]) -> str:
    worst = max(max(p["client-replays"]) for p in points)
    return "0" if worst == 0 else f"≤ {worst:.2f}"


def markdown_table(grouped: Mapping[Key, list[dict]]) -> str:
    """One row per point; repeated runs separated by slashes."""
    rows = ["| model | nodes | batch | FedTAN round (s) | ratio | replays per client per round | "
            "paused rounds (MB) | peak PSS (GB) | peak RSS (GB) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (model, nodes, batch), points in grouped.items():
        paused = max(max(p["live-bytes"]) for p in points) / 1e6
        rows.append(f"| {MODEL_NAMES.get(model, model)} | {nodes} | {batch} | {_runs(points, 'fedtan-round-seconds')} "
                    f"| {_runs(points, 'ratio')} | {_replays(points)} | {paused:.0f} "
                    f"| {_runs(points, 'peak-pss-bytes', 1e-9)} | {_runs(points, 'peak-rss-bytes', 1e-9)} |")
    return "\n".join(rows)


def nodes_table(grouped: Mapping[Key, list[dict]]) -> str:
    """The README's compact table: one row per model and figure, one column per node count
    (medians of repeated runs; a point not measured is a dash)."""
    nodes = sorted({n for _, n, _ in grouped})
    models = sorted({(m, b) for m, _, b in grouped}, key=lambda mb: (mb[0], -mb[1]))
    figures = (("FedTAN round (s)", "fedtan-round-seconds", 1.0, 1), ("ratio", "ratio", 1.0, 2),
               ("peak PSS (GB)", "peak-pss-bytes", 1e-9, 1))
    rows = ["| model | figure | " + " | ".join(f"{n} nodes" for n in nodes) + " |",
            "|---|---|" + "---:|" * len(nodes)]
    for model, batch in models:
        for title, field, scale, digits in figures:
            cells = []
            for n in nodes:
                points = grouped.get((model, n, batch))
                cells.append("-" if not points else f"{statistics.median(p[field] * scale for p in points):.{digits}f}")
            rows.append(f"| {MODEL_NAMES.get(model, model)} (batch {batch}) | {title} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(grouped: Mapping[Key, list[dict]], out: Path) -> None:
    """Round time, ratio and peak memory against nodes, one line per model, batch size and
    file (a run); a file whose name says ``loaded`` (a run on a busy machine) is dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple[str, int, str], list[tuple[int, list[dict]]]] = defaultdict(list)
    for (model, nodes, batch), points in grouped.items():
        for source in dict.fromkeys(p["source"] for p in points):
            lines[(model, batch, source)].append((nodes, [p for p in points if p["source"] == source]))
    figure, (time_axes, ratio_axes, memory_axes) = plt.subplots(1, 3, figsize=(15, 4.5))
    for (model, batch, source), series in sorted(lines.items()):
        series.sort(key=lambda item: item[0])
        counts = [n for n, _ in series]
        label = f"{MODEL_NAMES.get(model, model)}, batch {batch} ({source})"
        style = {"marker": "o", "label": label, "linestyle": "--" if "loaded" in source else "-"}

        def median(field: str, scale: float = 1.0) -> list[float]:
            return [statistics.median(p[field] * scale for p in points) for _, points in series]

        time_axes.plot(counts, median("fedtan-round-seconds"), **style)
        ratio_axes.plot(counts, median("ratio"), **style)
        memory_axes.plot(counts, median("peak-pss-bytes", 1e-9), **style)
    ratio_axes.axhline(1.2, color="grey", linestyle="--", linewidth=1, label="target 1.2")
    for axes, title in ((time_axes, "FedTAN round wall time (s)"),
                        (ratio_axes, "FedTAN / (FedAvg + 2L x empty exchange)"),
                        (memory_axes, "peak memory of the run, PSS (GB)")):
        axes.set_xlabel("simulated nodes (2 ClientAppActors)")
        axes.set_title(title)
        axes.grid(True, alpha=0.3)
        axes.set_ylim(bottom=0)
    time_axes.legend(fontsize="small")
    ratio_axes.legend(fontsize="small")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", type=Path, help="files written by bench_scale --json")
    parser.add_argument("--out", type=Path, default=None, help="write the figure here (PNG)")
    parser.add_argument("--markdown", action="store_true", help="print the Markdown table")
    parser.add_argument("--compact", action="store_true", help="print the README's compact table")
    args = parser.parse_args()
    grouped = load_points(args.json)
    if args.out is not None:
        plot(grouped, args.out)
        print(f"wrote {args.out}")
    if args.compact:
        print(nodes_table(grouped))
    if args.markdown or (args.out is None and not args.compact):
        print(markdown_table(grouped))


if __name__ == "__main__":
    main()
