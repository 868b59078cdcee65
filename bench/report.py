"""One report writer for bench/throughput.py's single-run comparison and its arrays of runs: flat
result rows (one dict per preset x batch [x K] x variant) -> speed-up columns, a printed table,
--json, --csv and a --plot of grouped bars. What differs between the two is data (a Report: its
columns, footer and plotted value), so a new column is one Column in a list and one key in the rows.

    SINGLE = Report("results", columns=[Column("preset", "preset", 10, left=True), ...], keys=3, ...)
    add_speedups(rows, ("preset", "batch"), {"eager_fp32": ("eager_fp32",), ...})
    print(SINGLE.table(rows, cpu_note=None))
    SINGLE.write(rows, payload, json_path=..., csv_path=..., plot_path=..., env=env, device="cuda", title=...)
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
from typing import Callable, Sequence

from _common import write_csv, write_json

# The environment's keys repeated in every CSV row (the JSON holds the whole environment once).
CSV_ENVIRONMENT = ("gpu", "torch", "triton", "cuda", "commit", "dirty", "timestamp", "cpu")


def speedup(v: float) -> str:
    return f"{v:.2f}x"


def rate(v: float) -> str:
    """TFLOP/s: three decimals under 1, else one."""
    return f"{v:.3f}" if v < 1 else f"{v:.1f}"


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of the printed table: `title` over row[key], `width` characters, the value written
    with the format spec `spec` (or spec(value) -> text); None prints as '-'."""
    title: str
    key: str
    width: int
    spec: str | Callable[[object], str] = ""
    left: bool = False

    def _align(self, text: str) -> str:
        return f"{text:<{self.width}}" if self.left else f"{text:>{self.width}}"

    def head(self) -> str:
        return self._align(self.title)

    def cell(self, row: dict) -> str:
        v = row.get(self.key)
        return self._align("-" if v is None else self.spec(v) if callable(self.spec) else f"{v:{self.spec}}")


@dataclasses.dataclass(frozen=True)
class Report:
    """What one kind of result prints and plots.

    key: the JSON payload's key for the rows; columns: the table, the first `keys` of which name
    the case (the last of those is the variant; a row whose status is not ok prints them and its
    reason); footer: lines under the table; variants: the plot's bar order; plot_value, plot_label:
    the bars' height (a row key) and the y axis; tick: a group's label (the case keys but the
    variant); legend_cols: legend columns at most."""
    key: str
    columns: Sequence[Column]
    keys: int
    footer: Sequence[str]
    variants: Sequence[str]
    plot_value: str
    plot_label: str
    tick: Callable[..., str]
    legend_cols: int = 4

    @property
    def group_keys(self) -> tuple[str, ...]:
        return tuple(c.key for c in self.columns[:self.keys - 1])

    def table(self, rows: list[dict], cpu_note: str | None = None) -> str:
        """The table; a row's note (how it ran, where that differs from its variant's description)
        as [n] after it, the notes under the footer; cpu_note (a CPU run) last."""
        head = " ".join(c.head() for c in self.columns)
        lines, notes = [head, "-" * len(head)], []
        for r in rows:
            name = " ".join(c.cell(r) for c in self.columns[:self.keys])
            if r["status"] != "ok":
                lines.append(f"{name} {r['status']}: {r['reason']}")
                continue
            mark = ""
            if r.get("note"):
                if r["note"] not in notes:
                    notes.append(r["note"])
                mark = f" [{notes.index(r['note']) + 1}]"
            lines.append(" ".join([name] + [c.cell(r) for c in self.columns[self.keys:]]) + mark)
        lines += list(self.footer)
        lines += [f"[{i + 1}] {note}" for i, note in enumerate(notes)]
        if cpu_note:
            lines.append(f"*** {cpu_note} ***")
        return "\n".join(lines)

    def plot(self, rows: list[dict], path, title: str) -> None:
        """Grouped bars: plot_value of every variant that ran, one group per case (log scale when the
        values span more than 20x)."""
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        ok = [r for r in rows if r["status"] == "ok"]
        group_of = lambda r: tuple(r[k] for k in self.group_keys)  # noqa: E731
        groups = list(dict.fromkeys(group_of(r) for r in rows))
        variants = [v for v in self.variants if any(r["variant"] == v for r in ok)]
        fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(groups) * max(len(variants), 1) / 3), 4.5))
        width = 0.8 / max(len(variants), 1)
        for i, v in enumerate(variants):
            xs, ys = [], []
            for g, group in enumerate(groups):
                r = next((r for r in ok if group_of(r) == group and r["variant"] == v), None)
                if r is not None:
                    xs.append(g + (i - (len(variants) - 1) / 2) * width)
                    ys.append(r[self.plot_value])
            bars = ax.bar(xs, ys, width, label=v)
            ax.bar_label(bars, labels=[f"{y:.3g}" for y in ys], fontsize=6, rotation=90, padding=2)
        ax.set_xticks(range(len(groups)), [self.tick(*g) for g in groups])
        values = [r[self.plot_value] for r in ok]
        log_scale = bool(values) and max(values) / min(values) > 20
        if log_scale:
            ax.set_yscale("log")
        ax.margins(y=0.15)  # room for the bar labels under the legend
        ax.set_ylabel(self.plot_label + (" (log scale)" if log_scale else ""))
        ax.set_title(title, fontsize=8, wrap=True)
        ax.legend(fontsize=7, ncol=min(len(variants), self.legend_cols))
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def write(self, rows: list[dict], payload: dict, *, json_path=None, csv_path=None, plot_path=None,
              env: dict, device: str, title: str) -> None:
        """--json (payload, the rows under `key`), --csv (a row per result, with the device and the
        environment's CSV_ENVIRONMENT keys) and --plot (titled `title`); each says so on stderr."""
        if json_path:
            write_json(json_path, dict(payload, **{self.key: rows}))
            print(f"wrote {json_path}", file=sys.stderr)
        if csv_path:
            write_csv(csv_path, [dict(row, device=device, **{k: env[k] for k in CSV_ENVIRONMENT}) for row in rows])
            print(f"wrote {csv_path}", file=sys.stderr)
        if plot_path:
            self.plot(rows, plot_path, title)
            print(f"wrote {plot_path}", file=sys.stderr)


def add_speedups(rows: list[dict], group_keys: Sequence[str], against: dict[str, Sequence[str]]) -> list[dict]:
    """Add speedup_vs_NAME to every row, for each NAME: variants of `against`: the fastest row
    (ms_median) of those variants with the same group_keys, over this row's ms_median (None where
    either has no time). Where NAME stands for several variants, NAME_variant names the fastest."""
    for row in rows:
        same = [o for o in rows if o["ms_median"] is not None and all(o[k] == row[k] for k in group_keys)]
        for name, variants in against.items():
            base = min((o for o in same if o["variant"] in variants), key=lambda o: o["ms_median"], default=None)
            ok = base is not None and row["ms_median"] is not None
            row[f"speedup_vs_{name}"] = base["ms_median"] / row["ms_median"] if ok else None
            if len(variants) > 1:
                row[f"{name}_variant"] = base["variant"] if base is not None else None
    return rows


def output_problem(path) -> str | None:
    """Why `path` cannot be written (its folder is missing or not writable, or it is a folder), or None."""
    path = pathlib.Path(path)
    folder = path.parent
    if path.is_dir():
        return f"{path} is a folder"
    if not folder.is_dir():
        return f"folder {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"folder {folder} is not writable"
    if path.exists() and not os.access(path, os.W_OK):
        return f"{path} is not writable"
    return None
