"""Rows and result files shared by the PyTorch peers (bench/peers/*_torch.py): KvCheck's BenchRow format, a result file
rewritten after every row ("complete": false until the end), and error descriptions. Importing it does not import torch.
"""

import json
import math
import os

from .timing import GOAL_BYTES


def first_line(text, limit=400):
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def describe_error(e, caught):
    """The exception's type and first line, plus the distinct warning lines raised meanwhile (SDPA's reasons)."""
    text = f"{type(e).__name__}: {first_line(e)}"
    reasons = []
    for w in caught:
        line = first_line(w.message, 300)
        if line and line not in reasons:
            reasons.append(line)
    if reasons:
        text += " | warnings: " + " / ".join(reasons[:6])
    return text[:1500]


class Results:
    """Rows in case order, rewritten to --out after every row."""

    def __init__(self, path, header, order):
        self.path, self.header, self.order = path, header, order
        self.rows = {}

    def add(self, key, row):
        self.rows[key] = row
        self.write(False)

    def ordered(self):
        return [self.rows[key] for key in sorted(self.rows, key=lambda key: self.order[key])]

    def write(self, complete):
        if not self.path:
            return
        report = dict(self.header)
        report["complete"] = complete
        report["rows"] = self.ordered()
        temp = self.path + ".tmp"
        with open(temp, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        os.replace(temp, self.path)


def timed_row(case, backend, seconds, samples, k, sets, notes, copy_gbs, goal_percent=90.0):
    """A row in KvCheck's BenchRow format. `case` has op, shape, moved (bytes) and optionally flops; rows moving
    >= 256 MiB are held to `goal_percent` of the copy bandwidth."""
    gbps = case.moved / seconds / 1e9
    pct = 100.0 * gbps / copy_gbs
    row = {
        "op": case.op, "shape": case.shape, "backend": backend,
        "us": round(seconds * 1e6, 2), "gbps": round(gbps, 2),
        "pctOfBandwidth": math.floor(pct * 100) / 100,
        "bytes": case.moved, "samples": samples, "opsPerSample": k, "bufferSets": sets,
        "bandwidthGBs": round(copy_gbs, 2),
    }
    if getattr(case, "flops", 0):
        row["tflops"] = round(case.flops / seconds / 1e12, 3)
    if goal_percent is not None and case.moved >= GOAL_BYTES:
        row["goal"] = "met" if pct >= goal_percent else "missed"
    note = "; ".join(n for n in notes if n)
    if note:
        row["note"] = note
    return row


def error_row(case, backend, sets, message, copy_gbs):
    """A failed backend: the error and no time."""
    return {"op": case.op, "shape": case.shape, "backend": backend, "bytes": case.moved, "bufferSets": sets,
            "bandwidthGBs": round(copy_gbs, 2), "error": message}
