// kvk_index.cuh — thread/grid ranks and division-free index arithmetic for grid-stride loops.
//
//   kvk_thread_rank / kvk_block_size   linear thread index within a (1-, 2- or 3-D) block
//   kvk_grid_span_xz / _xyz            this thread's flat index and the stride of a grid-stride loop
//   kvk_umulhi, kvk_mad_wide_u32       32-bit multiply-high and widening multiply-add
//   kvk_fastdiv                        n / d and n % d for a launch-constant d by multiply-high
//   kvk_grid_walker                    walks a 2-D space [units) x [perUnit) in grid-stride order
//                                      with adds and compares only
// Only the two multiply helpers have a device/host split; the rest is plain C++.
#pragma once
#include "common/kvk_types.cuh"

// Linear rank of this thread in its block, x fastest: the order in which warps are formed, so
// consecutive ranks are consecutive lanes and accesses indexed by rank coalesce.
KVK_INLINE kvk_u32 kvk_thread_rank()
{
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

KVK_INLINE kvk_u32 kvk_block_size() { return blockDim.x * blockDim.y * blockDim.z; }

// A grid-stride loop visits start, start + stride, start + 2*stride, ...
struct kvk_grid_span {
    kvk_u64 start;
    kvk_u64 stride;
};

// Threads of all blocks that share one blockIdx.y (blocks along x, and along z if a launch uses
// it), for kernels whose y dimension strides over independent items (sequences, page pairs).
KVK_INLINE kvk_grid_span kvk_grid_span_xz()
{
    const kvk_u64 block = blockIdx.x + (kvk_u64)gridDim.x * blockIdx.z;
    const kvk_u64 blocks = (kvk_u64)gridDim.x * gridDim.z;
    const kvk_u64 size = kvk_block_size();
    return kvk_grid_span{block * size + kvk_thread_rank(), blocks * size};
}

// All threads of the grid, for kernels with no role for y.
KVK_INLINE kvk_grid_span kvk_grid_span_xyz()
{
    const kvk_u64 block = blockIdx.x + (kvk_u64)gridDim.x * (blockIdx.y + (kvk_u64)gridDim.y * blockIdx.z);
    const kvk_u64 blocks = (kvk_u64)gridDim.x * gridDim.y * gridDim.z;
    const kvk_u64 size = kvk_block_size();
    return kvk_grid_span{block * size + kvk_thread_rank(), blocks * size};
}

// High 32 bits of the 64-bit product a * b (mul.hi.u32).
KVK_INLINE kvk_u32 kvk_umulhi(kvk_u32 a, kvk_u32 b)
{
#ifdef __CUDA_ARCH__
    return __umulhi(a, b);
#else
    return (kvk_u32)(((kvk_u64)a * b) >> 32);
#endif
}

// a * b + c with a 32 x 32 -> 64-bit product (mad.wide.u32: one IMAD.WIDE.U32). Spelled out in
// PTX because the compiler emits a full 64 x 64 multiply when the zero-extension of a loop
// invariant operand was hoisted out of the loop.
KVK_INLINE kvk_u64 kvk_mad_wide_u32(kvk_u32 a, kvk_u32 b, kvk_u64 c)
{
#ifdef __CUDA_ARCH__
    kvk_u64 d;
    asm("mad.wide.u32 %0, %1, %2, %3;" : "=l"(d) : "r"(a), "r"(b), "l"(c));
    return d;
#else
    return (kvk_u64)a * b + c;
#endif
}

// Unsigned division by a divisor fixed for the whole launch, exact for every n < 2^32 and
// 1 <= d < 2^32, at the cost of a wide multiply, a multiply-high and an add.
//
// With m = floor(2^64 / d) + 1 = 2^64/d + e, 0 < e <= 1:  n*m / 2^64 = n/d + n*e/2^64, and the
// error term n*e/2^64 < 2^-32 <= 1/d is smaller than the gap between n/d and the next integer
// (n/d = q + r/d with r <= d - 1), so floor(n*m / 2^64) = q. m needs 64 bits, so the product is
// split: floor(n*m / 2^64) = (n*m_hi + mulhi(n, m_lo)) >> 32. d = 1 (m = 2^64 + 1) is a select.
// The constructor divides once (64-bit); build it once per thread, outside loops.
struct kvk_fastdiv {
    kvk_u32 d;
    kvk_u32 mlo, mhi;

    KVK_INLINE explicit kvk_fastdiv(kvk_u32 divisor) : d(divisor), mlo(0), mhi(0)
    {
        if (divisor >= 2) {
            // floor(2^64 / d) from floor((2^64 - 1) / d): one more exactly when d divides 2^64.
            const kvk_u64 all = ~0ull;
            kvk_u64 q = all / divisor;
            if (all - q * divisor == (kvk_u64)divisor - 1) ++q;
            const kvk_u64 m = q + 1;
            mlo = (kvk_u32)m;
            mhi = (kvk_u32)(m >> 32);
        }
    }

    KVK_INLINE kvk_u32 div(kvk_u32 n) const
    {
        const kvk_u64 t = kvk_mad_wide_u32(n, mhi, kvk_umulhi(n, mlo));
        return d == 1 ? n : (kvk_u32)(t >> 32);
    }

    KVK_INLINE void divmod(kvk_u32 n, kvk_u32& q, kvk_u32& r) const
    {
        q = div(n);
        r = n - q * d;
    }
};

// Walks the flat index space  i = unit * perUnit + sub  (0 <= sub < perUnit) from a thread's start
// in steps of the grid stride, keeping (unit, sub) up to date with adds and one compare per step
// instead of dividing a 64-bit flat index every time. Positions with unit >= unitLimit are past
// the end; unit saturates at unitLimit so any number of extra steps cannot wrap around.
// Requires 1 <= perUnit and unitLimit <= 2^31 - 1 (both are products/values of int32 arguments).
struct kvk_grid_walker {
    kvk_u32 unit, sub;            // current position
    kvk_u32 stepUnit, stepSub;    // the stride, decomposed the same way (stepUnit clamped to the limit)
    kvk_u32 perUnit, unitLimit;

    KVK_INLINE kvk_grid_walker(kvk_grid_span span, kvk_u32 perUnit_, kvk_u32 unitLimit_)
        : perUnit(perUnit_), unitLimit(unitLimit_)
    {
        // Two 64-bit divisions per thread, once: start and stride may exceed 2^32.
        const kvk_u64 u0 = span.start / perUnit_;
        sub = (kvk_u32)(span.start - u0 * perUnit_);
        unit = (kvk_u32)kvk_min<kvk_u64>(u0, unitLimit_);
        const kvk_u64 s = span.stride / perUnit_;
        stepSub = (kvk_u32)(span.stride - s * perUnit_);
        stepUnit = (kvk_u32)kvk_min<kvk_u64>(s, unitLimit_);
    }

    KVK_INLINE void advance()
    {
        sub += stepSub;
        const kvk_u32 carry = sub >= perUnit ? 1u : 0u;
        sub -= carry ? perUnit : 0u;
        // unit <= limit < 2^31 and stepUnit <= limit, so the sum cannot overflow 32 bits.
        unit = kvk_min(unit + stepUnit + carry, unitLimit);
    }
};
