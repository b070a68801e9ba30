"""Tables and plots per level. Reads result rows, draws; computes nothing about models."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["cpu_name", "format_table", "plot_pareto", "read_eval"]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the platform's: for benchmark metadata."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform  # noqa: PLC0415

    return platform.processor() or platform.machine() or "unknown"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """Fixed-width text table of ``rows`` (dicts), one line per row, columns right-aligned."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def read_json(path: str | os.PathLike):
    """A JSON file's content; a file that is not JSON is a ``ValueError`` naming it (a one-line CLI error)."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def read_eval(path: str | os.PathLike) -> dict:
    """Load an ``eval.json`` (a run folder or the file itself) and check its shape."""
    p = Path(path)
    if p.is_dir():
        p = p / "eval.json"
    if not p.is_file():
        run = p.parent if p.name == "eval.json" else p
        raise FileNotFoundError(f"no eval.json at {p}; run `nestedsparse eval {run}` first")
    data = read_json(p)
    if not isinstance(data, dict) or not isinstance(data.get("levels"), list):
        raise ValueError(f"{p} is not an eval.json: expected an object with a 'levels' list")
    return data


def plot_pareto(evals: Sequence[dict], out: str | os.PathLike, x: str = "macs", labels: Sequence[str] | None = None,
                title: str | None = None) -> Path:
    """Accuracy against ``x`` (``macs``, ``params`` or a latency key), one point per level, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for i, ev in enumerate(evals):
        lv = sorted(ev["levels"], key=lambda r: r[x])
        label = labels[i] if labels else f"{ev.get('model', 'model')} ({ev.get('dataset', '')})"
        fine = [r for r in lv if not r.get("coarse")]  # a coarse level (hierarchy) is scored on superclasses
        line = ax.plot([r[x] for r in fine], [100 * r["accuracy"] for r in fine], marker="o", label=label)[0]
        coarse = [r for r in lv if r.get("coarse") and r.get("coarse_accuracy") is not None]
        if coarse:
            ax.plot([r[x] for r in coarse], [100 * r["coarse_accuracy"] for r in coarse], marker="s", ls="none",
                    color=line.get_color(), mfc="none", label=f"{label}: superclass accuracy")
        for r in fine + coarse:
            yv = 100 * (r["coarse_accuracy"] if r in coarse else r["accuracy"])
            ax.annotate(f"L{r['level']} d={r['density']:.2f}", (r[x], yv), textcoords="offset points",
                        xytext=(4, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel({"macs": "MACs per sample (active weights only)", "params": "non-zero parameters"}.get(x, x))
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "accuracy per nested level")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
