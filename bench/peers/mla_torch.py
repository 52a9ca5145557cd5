#!/usr/bin/env python3
"""PyTorch peer of `KvCheck bench` for MLA decode (mla.attend, mla.decode) on the GPU.

Times what an engine without MLA kernels runs, on KvCheck's MLA shapes, in the same process as a measurement of
torch's device-to-device copy bandwidth, and writes rows in KvCheck's results-JSON row format:

    python3 bench/peers/mla_torch.py --out peer-mla_torch.json [--quick] [--op mla.decode]
    python3 bench/peers/mla_torch.py --list [--quick]      # the case list, no torch needed

DeepSeek dims: latent 512, RoPE 64, nope 128, value 128; bf16; one query token; every sequence exactly N tokens.
H in {16, 32, 64, 128}, B in {1, 16, 64, 128}, N in {1024, 4096, 16384} (--quick: H in {16, 128}, B in {1, 64},
N in {4096, 16384}). Shape strings (KvCheck builds the same): B=<b> N=<n> H=<h> q=1 page=64 bf16. The peer's cache is
contiguous (B, N, 576); KvCheck's is paged (page 64) — the bytes are the same.

Ops and backends (the row's "backend"):
    mla.attend   torch-latent: latent attention alone, q (B, H, 576) = [q_latent; q_pe], scale 1/sqrt(192):
                 s = q @ cacheᵀ (bf16 matmul, fp32 accumulate), softmax in fp32, o = p.bf16 @ cache[..., :512].
                 Bytes: B*N*576*2 + q + o; FLOPs 2*B*H*N*(576 + 512).
    mla.decode   torch-absorbed: DeepSeek's "absorb" path written from the math: q_latent = einsum(q_nope, W_UK),
                 latent attention as above, out = einsum(o_lat, W_UV).
                 torch-sdpa-decompressed: K (B, H, N, 192) = [c·W_UKᵀ ; k_pe] and V (B, H, N, 128) = c·W_UVᵀ
                 decompressed once outside the timing (an engine that caches decompressed K/V), then timed SDPA
                 (default dispatch); skipped when the decompressed cache exceeds DECOMPRESSED_LIMIT.
                 Bytes for both: the latent cache + the weights H*256*512*2 + q_nope, q_pe, output (one work
                 definition, so % of bandwidth compares); the decompressed row's note says what SDPA really read.
Each backend's output on sequence 0 is compared with a float32 reference; a difference over 5 % of max |reference|
is reported in the note. Timing, copy bandwidth and buffer sets: bench/peers/peerlib (shared with the other peers).
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

GIB = 1 << 30

LATENT, ROPE, NOPE, VALUE = 512, 64, 128, 128
ROW = LATENT + ROPE
HEADS, QUICK_HEADS = (16, 32, 64, 128), (16, 128)
BATCHES, QUICK_BATCHES = (1, 16, 64, 128), (1, 64)
TOKENS, QUICK_TOKENS = (1024, 4096, 16384), (4096, 16384)
DECOMPRESSED_LIMIT = 24 * GIB
CHECK_PERCENT = 5.0
BACKENDS = {"mla.attend": ("torch-latent",), "mla.decode": ("torch-absorbed", "torch-sdpa-decompressed")}


class Case:
    def __init__(self, op, b, n, h):
        self.op, self.b, self.n, self.h = op, b, n, h
        self.shape = f"B={b} N={n} H={h} q=1 page=64 bf16"
        cache = b * n * ROW * 2
        attention = 2 * b * h * n * (ROW + LATENT)
        if op == "mla.attend":
            self.moved = cache + b * h * (ROW + LATENT) * 2
            self.flops = attention
        else:
            self.moved = cache + h * (NOPE + VALUE) * LATENT * 2 + b * h * (NOPE + ROPE + VALUE) * 2
            self.flops = attention + 2 * b * h * (NOPE * LATENT + LATENT * VALUE)
        self.decompressed = b * h * n * (NOPE + ROPE + VALUE) * 2

    def backends(self):
        return BACKENDS[self.op]


def cases(quick=False):
    """Every case, in KvCheck's row order: mla.attend over H, B, N, then mla.decode."""
    rows = []
    for op in ("mla.attend", "mla.decode"):
        for h in (QUICK_HEADS if quick else HEADS):
            for b in (QUICK_BATCHES if quick else BATCHES):
                for n in (QUICK_TOKENS if quick else TOKENS):
                    rows.append(Case(op, b, n, h))
    return rows


class Peer(GpuTimer):
    def __init__(self, torch):
        torch.manual_seed(1234)
        super().__init__(torch)
        self.scale = 1.0 / math.sqrt(NOPE + ROPE)

    def randn(self, *shape, scale=1.0):
        return (self.torch.randn(*shape, device=self.dev) * scale).to(self.torch.bfloat16)

    def data(self, case, sets):
        """Per set: (q_nope, q_pe, packed q, cache); shared weights (H, 256, 512)."""
        weights = self.randn(case.h, NOPE + VALUE, LATENT, scale=LATENT ** -0.5)
        sets_ = [(self.randn(case.b, case.h, NOPE), self.randn(case.b, case.h, ROPE), self.randn(case.b, case.h, ROW),
                  self.randn(case.b, case.n, ROW)) for _ in range(sets)]
        return weights, sets_

    def latent_attention(self, q, cache):
        """q (B, H, 576), cache (B, N, 576) -> o_lat (B, H, 512) in bf16 (fp32 softmax)."""
        torch = self.torch
        s = torch.matmul(q, cache.transpose(1, 2)).float() * self.scale
        p = torch.softmax(s, dim=-1).to(torch.bfloat16)
        return torch.matmul(p, cache[..., :LATENT])

    def absorbed(self, q_nope, q_pe, weights, cache):
        torch = self.torch
        q_latent = torch.einsum("bhd,hdc->bhc", q_nope, weights[:, :NOPE, :])
        o_lat = self.latent_attention(torch.cat([q_latent, q_pe], dim=-1), cache)
        return torch.einsum("bhc,hdc->bhd", o_lat, weights[:, NOPE:, :])

    def decompress(self, cache, weights):
        """K (B, H, N, 192), V (B, H, N, 128) from the latent cache."""
        torch = self.torch
        c, pe = cache[..., :LATENT], cache[..., LATENT:]
        k_nope = torch.einsum("bnc,hdc->bhnd", c, weights[:, :NOPE, :])
        v = torch.einsum("bnc,hdc->bhnd", c, weights[:, NOPE:, :])
        k = torch.cat([k_nope, pe.unsqueeze(1).expand(-1, weights.shape[0], -1, -1)], dim=-1)
        return k.contiguous(), v.contiguous()

    def reference(self, case, weights, q_nope, q_pe, q, cache):
        """float32 result of sequence 0: (H, 512) for mla.attend, (H, 128) for mla.decode."""
        torch = self.torch
        w, c = weights.float(), cache[0].float()
        if case.op == "mla.attend":
            qf = q[0].float()
        else:
            qf = torch.cat([torch.einsum("hd,hdc->hc", q_nope[0].float(), w[:, :NOPE, :]), q_pe[0].float()], dim=-1)
        p = torch.softmax(qf @ c.T * self.scale, dim=-1)
        o = p @ c[:, :LATENT]
        return o if case.op == "mla.attend" else torch.einsum("hc,hdc->hd", o, w[:, NOPE:, :])

    def check(self, out, ref):
        err = (out.float() - ref).abs().max().item()
        scale = max(ref.abs().max().item(), 1e-6)
        if math.isfinite(err) and 100.0 * err / scale <= CHECK_PERCENT:
            return None
        return f"output check failed: max |o - float32 reference| = {err:.3g} ({100.0 * err / scale:.1f} % of max |reference|)"

    def row(self, case, backend, weights, sets_, ref, wanted):
        """(seconds, samples, k, notes) of one backend."""
        torch = self.torch
        import torch.nn.functional as F
        notes = []
        if backend == "torch-latent":
            def call(i):
                return self.latent_attention(sets_[i][2], sets_[i][3])
        elif backend == "torch-absorbed":
            def call(i):
                q_nope, q_pe, _, cache = sets_[i]
                return self.absorbed(q_nope, q_pe, weights, cache)
        else:
            kv = [self.decompress(s[3], weights) for s in sets_]
            queries = [torch.cat([s[0], s[1]], dim=-1).unsqueeze(2) for s in sets_]   # (B, H, 1, 192)
            notes.append(f"SDPA over decompressed K/V read {case.decompressed / GIB:.2f} GiB per call "
                         f"({case.decompressed / max(case.b * case.n * ROW * 2, 1):.0f}x the latent cache)")

            def call(i):
                return F.scaled_dot_product_attention(queries[i], kv[i][0], kv[i][1], scale=self.scale).squeeze(2)
        out = call(0)
        notes.append(self.check(out[0], ref))
        del out
        torch.cuda.synchronize()
        seconds, samples, k, note = self.time(call, len(sets_), wanted)
        return seconds, samples, k, notes + [note]


def run_case(peer, case, results, wanted):
    torch = peer.torch
    sets = buffer_sets(case.moved, peer.l2)
    for backend in case.backends():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if backend == "torch-sdpa-decompressed" and case.decompressed * sets > DECOMPRESSED_LIMIT:
                    sets = max(1, DECOMPRESSED_LIMIT // case.decompressed)
                    if case.decompressed > DECOMPRESSED_LIMIT:
                        raise MemoryError(f"skipped: the decompressed K/V would take {case.decompressed / GIB:.1f} GiB "
                                          f"(limit {DECOMPRESSED_LIMIT / GIB:.0f} GiB)")
                weights, sets_ = peer.data(case, sets)
                ref = peer.reference(case, weights, *sets_[0])
                seconds, samples, k, notes = peer.row(case, backend, weights, sets_, ref, wanted)
                row = timed_row(case, backend, seconds, samples, k, sets, notes, peer.copy_gbs, goal_percent=None)
            except Exception as e:  # noqa: BLE001 - a backend that fails gets an error row
                row = error_row(case, backend, sets, describe_error(e, caught), peer.copy_gbs)
        weights = sets_ = ref = None
        gc.collect()
        torch.cuda.empty_cache()
        results.add((case, backend), row)
        if "error" in row:
            print(f"  {backend} {case.op} {case.shape}: error - {row['error']}", flush=True)
        else:
            print(f"  {backend} {case.op} {case.shape}: {row['us']:.1f} us, {row['gbps']:.1f} GB/s, "
                  f"{math.floor(row['pctOfBandwidth'] * 10) / 10:.1f} %, {row.get('tflops', 0):.1f} TFLOP/s"
                  + (f" - {row['note']}" if "note" in row else ""), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results JSON (KvCheck row format) to this file")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and samples (smoke run)")
    parser.add_argument("--op", help="only ops whose name starts with this (e.g. mla.decode)")
    parser.add_argument("--list", action="store_true", help="print every case (backend, op, shape, bytes) and exit")
    args = parser.parse_args()
    selected = [c for c in cases(args.quick) if not args.op or c.op.startswith(args.op)]
    if args.list:
        for case in selected:
            print(f"cuda\t{case.op}\t{case.shape}\t{case.moved}")
        return 0
    torch = load_torch("mla_torch")
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
