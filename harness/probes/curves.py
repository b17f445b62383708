"""Training and validation curves: a tidy CSV and a PNG plot written next to the result record.

CSV columns: ``iter, kind, head, name, value`` with kind ``train`` (name ``loss`` or ``lr``) or ``val``
(name = a metric such as ``mIoU`` or ``rmse``). The plot has one panel for the training loss and one
per validation metric, one line per head (the ``fast`` protocol trains several).
"""
from __future__ import annotations

import csv
import io
from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

from ..io_safety import atomic_write, atomic_write_text

Row = Tuple[int, str, str, str, float]
COLUMNS = ("iter", "kind", "head", "name", "value")


class Curves:
    """In-memory curve rows (saved in checkpoints, so a resumed run keeps its history)."""

    def __init__(self, rows: Sequence[Sequence] = ()) -> None:
        self.rows: List[Row] = [(int(r[0]), str(r[1]), str(r[2]), str(r[3]), float(r[4])) for r in rows]

    def add(self, it: int, kind: str, head: str, name: str, value: float) -> None:
        self.rows.append((int(it), kind, head, name, float(value)))

    def state(self) -> List[Row]:
        return list(self.rows)

    def series(self, kind: str, name: str) -> Dict[str, Tuple[List[int], List[float]]]:
        out: Dict[str, Tuple[List[int], List[float]]] = defaultdict(lambda: ([], []))
        for it, k, head, n, v in self.rows:
            if k == kind and n == name:
                out[head][0].append(it)
                out[head][1].append(v)
        return dict(out)

    def write_csv(self, path: str) -> str:
        """Atomically; the folder is created when missing (:func:`harness.io_safety.atomic_write`)."""
        buf = io.StringIO(newline="")
        w = csv.writer(buf)
        w.writerow(COLUMNS)
        w.writerows(self.rows)
        return atomic_write_text(path, buf.getvalue(), "training curves")

    def plot(self, path: str, title: str) -> str:
        """PNG with the loss panel and one panel per validation metric (matplotlib Agg, no display)."""
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        val_names = sorted({n for _, k, _, n, _ in self.rows if k == "val"})
        fig, axes = plt.subplots(1, 1 + len(val_names), figsize=(5 * (1 + len(val_names)), 3.6), squeeze=False)
        ax = axes[0][0]
        for head, (xs, ys) in sorted(self.series("train", "loss").items()):
            ax.plot(xs, ys, label=head, lw=1)
        ax.set_xlabel("iteration")
        ax.set_ylabel("training loss")
        if any(y > 0 for _, (_, ys) in self.series("train", "loss").items() for y in ys):
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        for j, name in enumerate(val_names, start=1):
            ax = axes[0][j]
            for head, (xs, ys) in sorted(self.series("val", name).items()):
                ax.plot(xs, ys, marker="o", ms=3, label=head, lw=1)
            ax.set_xlabel("iteration")
            ax.set_ylabel(name)
            ax.legend(fontsize=7)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=90)
        plt.close(fig)
        return atomic_write(path, lambda f: f.write(png.getvalue()), "training curves plot")
