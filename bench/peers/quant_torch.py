#!/usr/bin/env python3
"""PyTorch peer of `KvCheck bench` for decode attention over a quantized KV cache (quant.attention) on the GPU.

Times what an engine without fused dequant kernels runs — dequantize the cache to bf16, then SDPA — on KvCheck's shapes,
in the same process as a measurement of torch's device-to-device copy bandwidth, and writes rows in KvCheck's
results-JSON row format:

    python3 bench/peers/quant_torch.py --out peer-quant_torch.json [--quick]
    python3 bench/peers/quant_torch.py --list [--quick]      # the case list, no torch needed

Shapes (KvCheck builds the same strings): B=8, Hq=32, Hkv=8, D=128, one bf16 query token, N in {8192, 32768}
(--quick: 32768): B=8 N=<n> Hq=32 Hkv=8 D=128 page=32 kv=<format> bf16. Formats as in KvCheck: bf16 (no
quantization: SDPA straight), fp8e4m3/token (codes * per-(token, head) fp32 scale), int8/token, kivi4/g32 and kivi2/g32
(keys: codes packed along 32-token groups per channel with a bf16 (scale, min) per group and channel; values: codes
packed along the channels of a token with a (scale, min) per 32 channels). The peer's cache is contiguous
(B, Hkv, N, ...); KvCheck's is paged (page 32) — the bytes are the same. Bytes (one work definition with KvCheck): the
quantized cache (codes + scales + parameters) + q + o.
Backend: torch-dequant-sdpa (dequantize K and V to bf16 in torch ops, then F.scaled_dot_product_attention with GQA).
Each output on sequence 0 is compared with a float32 reference over the same dequantized values; a difference over
5 % of max |reference| is reported in the note.
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

B, HQ, HKV, D, PAGE, G = 8, 32, 8, 128, 32, 32
TOKENS, QUICK_TOKENS = (8192, 32768), (32768,)
FORMATS = ("bf16", "fp8e4m3/token", "int8/token", "kivi4/g32", "kivi2/g32")
CHECK_PERCENT = 5.0


def bits_of(fmt):
    return {"bf16": 16, "fp8e4m3/token": 8, "int8/token": 8, "kivi4/g32": 4, "kivi2/g32": 2}[fmt]


class Case:
    op = "quant.attention"

    def __init__(self, n, fmt):
        self.n, self.fmt = n, fmt
        self.shape = f"B={B} N={n} Hq={HQ} Hkv={HKV} D={D} page={PAGE} kv={fmt} bf16"
        rows = B * n * HKV
        if fmt == "bf16":
            cache = 2 * rows * D * 2
        elif fmt in ("fp8e4m3/token", "int8/token"):
            cache = 2 * (rows * D + rows * 4)
        else:
            bits = bits_of(fmt)
            codes = rows * D * bits // 8
            cache = 2 * codes + rows * D * 2 * 2 // G + rows * (D // G) * 2 * 2   # keys: per channel per group; values: per token per group
        self.moved = cache + 2 * B * HQ * D * 2

    def backends(self):
        return ("torch-dequant-sdpa",)


def cases(quick=False):
    return [Case(n, fmt) for n in (QUICK_TOKENS if quick else TOKENS) for fmt in FORMATS]


class Peer(GpuTimer):
    def __init__(self, torch):
        torch.manual_seed(1234)
        super().__init__(torch)
        self.scale = 1.0 / math.sqrt(D)

    def tensor(self, n, fmt):
        """One quantized K or V tensor (a dict of device tensors) and its kind ('k' keys, 'v' values)."""
        torch, dev = self.torch, self.dev
        if fmt == "bf16":
            return {"x": torch.randn(B, HKV, n, D, device=dev).to(torch.bfloat16)}
        if fmt == "fp8e4m3/token":
            x = torch.randn(B, HKV, n, D, device=dev)
            return {"codes": x.to(torch.float8_e4m3fn), "scale": torch.full((B, HKV, n, 1), 0.01, device=dev)}
        if fmt == "int8/token":
            return {"codes": torch.randint(-127, 128, (B, HKV, n, D), device=dev, dtype=torch.int8),
                    "scale": torch.full((B, HKV, n, 1), 0.01, device=dev)}
        raise ValueError(fmt)

    def kivi(self, n, bits, keys):
        torch, dev = self.torch, self.dev
        per_byte = 8 // bits
        if keys:   # codes along 32-token groups of each channel: (B, Hkv, n/G, D, G*bits/8), params (B, Hkv, n/G, D)
            codes = torch.randint(0, 256, (B, HKV, n // G, D, G // per_byte), device=dev, dtype=torch.uint8)
            shape = (B, HKV, n // G, D)
        else:      # codes along the channels of a token: (B, Hkv, n, D*bits/8), params (B, Hkv, n, D/G)
            codes = torch.randint(0, 256, (B, HKV, n, D // per_byte), device=dev, dtype=torch.uint8)
            shape = (B, HKV, n, D // G)
        return {"codes": codes, "s": torch.full(shape, 0.01, device=dev).to(torch.bfloat16),
                "mn": torch.full(shape, -0.5, device=dev).to(torch.bfloat16), "bits": bits, "keys": keys}

    def unpack(self, codes, bits):
        """uint8 (..., m) -> (..., m * 8/bits) codes, low bits first."""
        torch = self.torch
        per_byte = 8 // bits
        shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.uint8)
        return ((codes.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)

    def dequantize(self, t):
        torch = self.torch
        if "x" in t:
            return t["x"]
        if "scale" in t:
            return (t["codes"].to(torch.float32) * t["scale"]).to(torch.bfloat16)
        q = self.unpack(t["codes"], t["bits"]).to(torch.float32)
        s, mn = t["s"].float(), t["mn"].float()
        if t["keys"]:   # (B, Hkv, n/G, D, G) -> (B, Hkv, n, D)
            x = q * s.unsqueeze(-1) + mn.unsqueeze(-1)
            return x.permute(0, 1, 2, 4, 3).reshape(B, HKV, -1, D).to(torch.bfloat16)
        x = q.view(*q.shape[:-1], D // G, G) * s.unsqueeze(-1) + mn.unsqueeze(-1)
        return x.reshape(B, HKV, -1, D).to(torch.bfloat16)

    def data(self, case, sets):
        out = []
        for _ in range(sets):
            if case.fmt.startswith("kivi"):
                bits = bits_of(case.fmt)
                k, v = self.kivi(case.n, bits, True), self.kivi(case.n, bits, False)
            else:
                k, v = self.tensor(case.n, case.fmt), self.tensor(case.n, case.fmt)
            out.append((self.torch.randn(B, HQ, 1, D, device=self.dev).to(self.torch.bfloat16), k, v))
        return out

    def attend(self, q, k, v):
        import torch.nn.functional as F
        try:
            return F.scaled_dot_product_attention(q, k, v, scale=self.scale, enable_gqa=True)
        except TypeError:   # torch without enable_gqa
            g = HQ // HKV
            return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), scale=self.scale)

    def check(self, out, q, k, v):
        torch = self.torch
        g = HQ // HKV
        kf, vf = k[0].float().repeat_interleave(g, 0), v[0].float().repeat_interleave(g, 0)
        p = torch.softmax(q[0].float() @ kf.transpose(-1, -2) * self.scale, dim=-1)
        ref = p @ vf
        err = (out[0].float() - ref).abs().max().item()
        scale = max(ref.abs().max().item(), 1e-6)
        if math.isfinite(err) and 100.0 * err / scale <= CHECK_PERCENT:
            return None
        return f"output check failed: max |o - float32 reference| = {err:.3g} ({100.0 * err / scale:.1f} % of max |reference|)"


def run_case(peer, case, results, wanted):
    torch = peer.torch
    sets = buffer_sets(case.moved, peer.l2)
    backend = "torch-dequant-sdpa"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            sets_ = peer.data(case, sets)

            def call(i):
                q, k, v = sets_[i]
                return peer.attend(q, peer.dequantize(k), peer.dequantize(v))
            q0, k0, v0 = sets_[0]
            note = peer.check(call(0), q0, peer.dequantize(k0), peer.dequantize(v0))
            torch.cuda.synchronize()
            seconds, samples, k, timing_note = peer.time(call, sets, wanted)
            row = timed_row(case, backend, seconds, samples, k, sets, [note, timing_note], peer.copy_gbs, goal_percent=None)
        except Exception as e:  # noqa: BLE001 - a backend that fails gets an error row
            row = error_row(case, backend, sets, describe_error(e, caught), peer.copy_gbs)
    sets_ = None
    gc.collect()
    torch.cuda.empty_cache()
    results.add((case, backend), row)
    if "error" in row:
        print(f"  {backend} {case.shape}: error - {row['error']}", flush=True)
    else:
        print(f"  {backend} {case.shape}: {row['us']:.1f} us, {row['gbps']:.1f} GB/s, {row['pctOfBandwidth']:.1f} %"
              + (f" - {row['note']}" if "note" in row else ""), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results JSON (KvCheck row format) to this file")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and samples (smoke run)")
    parser.add_argument("--op", help="only ops whose name starts with this")
    parser.add_argument("--list", action="store_true", help="print every case (backend, op, shape, bytes) and exit")
    args = parser.parse_args()
    selected = [c for c in cases(args.quick) if not args.op or c.op.startswith(args.op)]
    if args.list:
        for case in selected:
            print(f"cuda\t{case.op}\t{case.shape}\t{case.moved}")
        return 0
    torch = load_torch("quant_torch")
    if torch is None:
        return 2
    peer = Peer(torch)
    runs = 10 if args.quick else 20
    copy_gbs, copy_bytes = peer.measure_copy(runs)
    print(f"device: {peer.name}, torch {torch.__version__} (CUDA {torch.version.cuda}), L2 {peer.l2 / MIB:.1f} MiB")
    print(f"copy bandwidth: {copy_gbs:.1f} GB/s (dst.copy_(src), {copy_bytes / MIB:.0f} MiB, median of {runs})")
    header = {"device": peer.name, "torch": torch.__version__, "cuda": torch.version.cuda, "bandwidthGBs": round(copy_gbs, 2),
              "bandwidthKind": f"dst.copy_(src), {copy_bytes // MIB} MiB buffers, median of {runs}", "quick": args.quick}
    order = {(case, b): (ci, bi) for ci, case in enumerate(selected) for bi, b in enumerate(case.backends())}
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
