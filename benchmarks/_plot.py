"""Bar charts for the benchmarks, run in the ``plot`` venv (see ``peers.plot``).

Reads a JSON spec on stdin and writes a PNG to ``argv[1]``::

    {"title": "...", "panels": [{"title": "...", "ylabel": "...", "log": true,
      "groups": ["same key", "1,000 keys"], "series": {"tieredcache": [612, 640], ...},
      "highlight": "tieredcache"}]}
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    spec = json.load(sys.stdin)
    panels = spec["panels"]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False, layout="constrained"
    )
    for ax, panel in zip(axes[0], panels, strict=True):
        groups = panel["groups"]
        series = panel["series"]
        width = 0.8 / max(1, len(series))
        for i, (name, values) in enumerate(series.items()):
            xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
            bold = name == panel.get("highlight")
            bars = ax.bar(
                xs,
                [v if v is not None else 0 for v in values],
                width,
                label=name,
                edgecolor="black" if bold else None,
                linewidth=1.5 if bold else 0,
            )
            labels = [panel.get("fmt", "{:,.0f}").format(v) if v else "n/a" for v in values]
            ax.bar_label(bars, labels=labels, fontsize=7, rotation=90, padding=2)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_title(panel.get("title", ""), fontsize=10)
        ax.set_ylabel(panel.get("ylabel", ""))
        top = max((v for vals in series.values() for v in vals if v), default=1)
        if panel.get("log"):
            ax.set_yscale("log")
            ax.set_ylim(top=top * 8)
        else:
            ax.set_ylim(top=top * 1.3)
        ax.legend(fontsize=7, ncols=2)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(spec.get("title", ""), fontsize=11)
    if spec.get("note"):
        fig.text(0.01, 0.005, spec["note"], fontsize=7, va="bottom")
    fig.savefig(sys.argv[1], dpi=110)


if __name__ == "__main__":
    main()
