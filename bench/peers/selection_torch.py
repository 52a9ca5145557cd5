#!/usr/bin/env python3
"""PyTorch peer of `KvCheck bench` for token selection (selection.topk, selection.global_topk) on the GPU.

Times torch's top-k on exactly the shapes of KvCheck's GPU selection rows, in the same process as a measurement of
torch's device-to-device copy bandwidth, and writes rows in KvCheck's results-JSON row format:

    python3 bench/peers/selection_torch.py --out peer-selection_torch.json [--quick] [--op selection.topk]
    python3 bench/peers/selection_torch.py --list      # the case list, no torch needed

Scores are fp32 Normal(0, 1) [B*Hkv, n], every row at its full length n, no protected ranges, top-k (largest).
Shape strings (KvCheck builds the same, tools/KvCheck/Benchmarks/SelectionBenchCases.cs):
    selection.topk:         B=<b> Hkv=<h> n=<n> k=<k> fp32
    selection.global_topk:  B=<b> Hkv=<h> n=<n> budget=<budget> alpha=0.2 fp32

Backends (the row's "backend"):
    selection.topk  torch-topk:         torch.topk(scores, k, dim=-1, sorted=False) (values and int64 indices, the
                                        order torch leaves them in; ties unspecified).
                    torch-topk-sorted:  the same plus indices.sort(dim=-1): ascending positions, as KvKernels writes
                                        them. This is the row the goal (KvKernels >= 3x faster for k=2048 of n=128k,
                                        8 x 32 rows) is measured against.
    selection.global_topk  torch-adakv: kvpress's AdaKV safeguard written in torch: s = scores.view(B, H, n);
                                        the floor = int(0.2 * budget / H) best per head get finfo.max
                                        (s.scatter(-1, s.topk(floor).indices, max), out of place, the input is
                                        not modified); then topk(budget) over the flattened (B, H*n) and a sort of
                                        the flat positions (each head's kept tokens are then one ascending run; the
                                        per-head split and -1 padding that KvKernels also writes are not done).
Bytes (what the op must move, identical to KvCheck's): the scores read once (rows*n*4) + the indices written
(rows*k*4; global: rows*min(n, budget)*4) + the counts (rows*4).

Check: row 0's kept set is compared with a float64 CPU reference (sorted by value, ties to the lower index); on
Normal(0, 1) scores ties are practically absent, so a mismatch is reported in the note.
Timing, copy bandwidth and buffer sets: bench/peers/peerlib (shared with the other peers).
"""

import argparse
import gc
import math
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peerlib.rows import Results, describe_error, error_row, timed_row  # noqa: E402 - after the path setup
from peerlib.timing import MIB, GpuTimer, buffer_sets, load_torch  # noqa: E402

ALPHA = 0.2


class Case:
    def __init__(self, op, b, h, n, k):
        self.op, self.b, self.h, self.n, self.k = op, b, h, n, k
        rows = b * h
        if op == "selection.topk":
            self.shape = f"B={b} Hkv={h} n={n} k={k} fp32"
            self.moved = rows * n * 4 + rows * k * 4 + rows * 4
        else:
            self.shape = f"B={b} Hkv={h} n={n} budget={k} alpha={ALPHA} fp32"
            self.moved = rows * n * 4 + rows * min(n, k) * 4 + rows * 4

    def backends(self):
        return ("torch-topk", "torch-topk-sorted") if self.op == "selection.topk" else ("torch-adakv",)


def cases():
    """Every case, in KvCheck's row order."""
    return [
        Case("selection.topk", 8, 32, 131072, 2048),
        Case("selection.topk", 32, 8, 32768, 1024),
        Case("selection.topk", 1, 8, 262144, 16384),
        Case("selection.topk", 8, 32, 131072, 64),
        Case("selection.global_topk", 8, 32, 131072, 32 * 2048),
    ]


class Peer(GpuTimer):
    def __init__(self, torch):
        torch.manual_seed(1234)
        super().__init__(torch)

    def scores(self, case, sets):
        return [self.torch.randn(case.b * case.h, case.n, device=self.dev, dtype=self.torch.float32) for _ in range(sets)]

    def call_for(self, case, backend, sets_):
        torch = self.torch
        if backend == "torch-topk":
            def call(i):
                return torch.topk(sets_[i], case.k, dim=-1, sorted=False).indices
        elif backend == "torch-topk-sorted":
            def call(i):
                return torch.topk(sets_[i], case.k, dim=-1, sorted=False).indices.sort(dim=-1).values
        else:
            floor = int(ALPHA * case.k / case.h)
            big = torch.finfo(torch.float32).max

            def call(i):
                s = sets_[i].view(case.b, case.h, case.n)
                if floor > 0:
                    s = s.scatter(-1, s.topk(floor, dim=-1).indices, big)
                return s.reshape(case.b, case.h * case.n).topk(case.k, dim=-1, sorted=False).indices.sort(dim=-1).values
        return call

    def check(self, case, backend, scores, out):
        """None when row 0 (sequence 0 for global) keeps the reference set, else a note."""
        torch = self.torch
        if case.op == "selection.topk":
            row = scores[0].double().cpu()
            got = set(out[0].cpu().tolist())
            # The k-th largest value bounds the set (Normal scores have no ties in practice).
            kth = torch.topk(row, case.k).values[-1].item()
            want = set(torch.nonzero(row >= kth).flatten().tolist())
        else:
            s = scores.view(case.b, case.h, case.n)[0].double().cpu()
            floor = int(ALPHA * case.k / case.h)
            forced = torch.zeros_like(s, dtype=torch.bool)
            if floor > 0:
                forced.scatter_(-1, torch.topk(s, floor, dim=-1).indices, True)
            rest = torch.where(forced, torch.tensor(-math.inf, dtype=s.dtype), s).flatten()
            remaining = case.k - int(forced.sum().item())
            kth = torch.topk(rest, remaining).values[-1].item()
            want = set(torch.nonzero(forced.flatten() | (rest >= kth)).flatten().tolist())
            got = set(out[0].cpu().tolist())
        if got == want:
            return None
        return f"check failed: row 0 keeps {len(got ^ want)} tokens differently from the float64 reference"

    def row(self, case, backend, sets_, wanted):
        call = self.call_for(case, backend, sets_)
        out = call(0)
        notes = [self.check(case, backend, sets_[0], out)]
        del out
        self.torch.cuda.synchronize()
        seconds, samples, k, note = self.time(call, len(sets_), wanted)
        return seconds, samples, k, notes + [note]


def run_case(peer, case, results, wanted):
    torch = peer.torch
    sets = buffer_sets(case.moved, peer.l2)
    for backend in case.backends():
        sets_ = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                sets_ = peer.scores(case, sets)
                seconds, samples, k, notes = peer.row(case, backend, sets_, wanted)
                row = timed_row(case, backend, seconds, samples, k, sets, notes, peer.copy_gbs, goal_percent=None)
            except Exception as e:  # noqa: BLE001 - a backend that fails gets an error row
                row = error_row(case, backend, sets, describe_error(e, caught), peer.copy_gbs)
        sets_ = None
        gc.collect()
        torch.cuda.empty_cache()
        results.add((case, backend), row)
        if "error" in row:
            print(f"  {backend} {case.op} {case.shape}: error - {row['error']}", flush=True)
        else:
            print(f"  {backend} {case.op} {case.shape}: {row['us']:.1f} us, {row['gbps']:.1f} GB/s, "
                  f"{math.floor(row['pctOfBandwidth'] * 10) / 10:.1f} %" + (f" - {row['note']}" if "note" in row else ""), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results JSON (KvCheck row format) to this file")
    parser.add_argument("--quick", action="store_true", help="fewer samples (smoke run)")
    parser.add_argument("--op", help="only ops whose name starts with this (e.g. selection.topk)")
    parser.add_argument("--list", action="store_true", help="print every case (backend, op, shape, bytes) and exit")
    args = parser.parse_args()
    selected = [c for c in cases() if not args.op or c.op.startswith(args.op)]
    if args.list:
        for case in selected:
            print(f"cuda\t{case.op}\t{case.shape}\t{case.moved}")
        return 0
    torch = load_torch("selection_torch")
    if torch is None:
        return 2
    peer = Peer(torch)
    runs = 10 if args.quick else 20
    copy_gbs, copy_bytes = peer.measure_copy(runs)
    print(f"device: {peer.name}, torch {torch.__version__} (CUDA {torch.version.cuda}), L2 {peer.l2 / MIB:.1f} MiB")
    print(f"copy bandwidth: {copy_gbs:.1f} GB/s (dst.copy_(src), {copy_bytes / MIB:.0f} MiB, median of {runs})")
    header = {"device": peer.name, "torch": torch.__version__, "cuda": torch.version.cuda, "bandwidthGBs": round(copy_gbs, 2),
              "bandwidthKind": f"dst.copy_(src), {copy_bytes // MIB} MiB buffers, median of {runs}", "quick": args.quick}
    order = {(case, backend): (ci, bi) for ci, case in enumerate(selected) for bi, backend in enumerate(case.backends())}
    results = Results(args.out, header, order)
    results.write(False)
    for case in selected:
        run_case(peer, case, results, 10 if args.quick else 30)
    results.write(True)
    if args.out:
        print(f"wrote {args.out}")
    return 0 if all("error" not in row for row in results.ordered()) else 3


if __name__ == "__main__":
    sys.exit(main())
