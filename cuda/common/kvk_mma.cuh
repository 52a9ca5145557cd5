// kvk_mma.cuh — warp-level matrix helpers: the m16n8k16 tensor-core MMA (f16 and bf16 inputs, f32
// accumulators), ldmatrix (8x8 b16 tiles from shared memory into fragments) and movmatrix (8x8
// transpose in registers). Every function here is a WARP-COLLECTIVE: all 32 lanes of the warp must
// call it together, converged, with the same arguments' shapes (PTX .sync.aligned). The host twins
// are built from __shfl_sync, so the emulator enforces the same rule (a missing lane is a reported
// deadlock or misuse, not a wrong answer).
//
// Notation (PTX ISA, "warp-level-matrix-fragment-mma-16816-float"): lane = %laneid,
// g = lane >> 2 (groupID), t = lane % 4 (threadID_in_group). A 32-bit register holds two 16-bit
// elements: the lower-indexed one in bits [15:0].
//
// mma.sync.aligned.m16n8k16.row.col.f32.{f16|bf16}.{f16|bf16}.f32  D (16x8) = A (16x16) * B (16x8) + C
//   A  a[4]: a[0] = A[g][2t, 2t+1]      a[1] = A[g+8][2t, 2t+1]
//            a[2] = A[g][2t+8, 2t+9]    a[3] = A[g+8][2t+8, 2t+9]
//   B  b[2]: b[0] = B[2t, 2t+1][g]      b[1] = B[2t+8, 2t+9][g]          (k index first)
//   C/D c[4], d[4]: c[0] = C[g][2t]  c[1] = C[g][2t+1]  c[2] = C[g+8][2t]  c[3] = C[g+8][2t+1]
// Host twin arithmetic: each of the lane's four results is the 16 exact products summed in double
// plus C, rounded once to float. NVIDIA does not document the tensor core's internal rounding (it is
// not a chain of IEEE fmas; Fasi et al., PeerJ CS 7:e330), so hardware and twin agree exactly only
// when every partial sum is exact in f32 (e.g. small integers / 8); otherwise compare with a
// tolerance relative to sum |A*B| + |C|.
//
// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{.trans}.shared.b16  r[N], [row]
//   Matrix i (i < N) is given by the 8 row addresses of lanes 8i .. 8i+7 (row j from lane 8i+j; 16
//   contiguous bytes each, 16-byte aligned, anywhere in shared memory); the other lanes' addresses
//   are ignored. Register r[i] receives matrix i:
//     plain   lane L: row L>>2, columns 2(L%4) (low half) and 2(L%4)+1 (high half)
//     .trans  lane L: (row 2(L%4), col L>>2) low half, (row 2(L%4)+1, col L>>2) high half
//   Standard uses: the A fragment of a row-major 16x16 tile is x4 with lane L pointing at
//   &A[L % 16][(L / 16) * 8]; a B fragment from B^T stored [n][k] is x2 with lane L (< 16) at
//   &Bt[L % 8][(L / 8) * 8]; from B stored [k][n] it is x2.trans with lane L (< 16) at &B[L][0].
// movmatrix.sync.aligned.m8n8.trans.b16  d, a: a holds an 8x8 matrix in the plain ldmatrix layout,
//   d its transpose in the same layout.
//
// Pointers are generic pointers to shared memory; device code converts them to the shared window
// (__cvta_generic_to_shared), the host twin dereferences them directly.
#pragma once
#include "common/kvk_types.cuh"
#include "common/kvk_index.cuh"
#include "common/kvk_fp16.cuh"

// This thread's lane in its warp.
KVK_INLINE kvk_u32 kvk_lane_id()
{
#ifdef __CUDA_ARCH__
    kvk_u32 lane;
    asm("mov.u32 %0, %%laneid;" : "=r"(lane));
    return lane;
#else
    return kvk_thread_rank() & 31u;
#endif
}

#ifndef __CUDA_ARCH__
// ---- host twin of mma.m16n8k16 -----------------------------------------------------------------
template <bool Bf16>
KVK_INLINE double kvk_mma_element(kvk_u32 reg, kvk_u32 half)
{
    const kvk_u16 bits = (kvk_u16)(half ? reg >> 16 : reg & 0xFFFFu);
    return Bf16 ? (double)kvk_bf16_bits_to_f32_soft(bits) : (double)kvk_f16_bits_to_f32_soft(bits);
}

template <bool Bf16>
KVK_INLINE void kvk_mma_m16n8k16_twin(float (&d)[4], const kvk_u32 (&a)[4], const kvk_u32 (&b)[2], const float (&c)[4])
{
    const unsigned full = 0xFFFFFFFFu;
    const kvk_u32 lane = kvk_lane_id();
    const kvk_u32 g = lane >> 2, t = lane & 3u;
    // Rows g and g+8 of A live in the four lanes of this lane's quad (4g + q, q = 0..3): lane 4g+q
    // holds columns 2q, 2q+1 (in a[0] for row g, a[1] for row g+8) and 2q+8, 2q+9 (a[2], a[3]).
    // Registers travel in pairs as 64-bit shuffles: {a[0], a[1]} and {a[2], a[3]}.
    const kvk_u64 a01 = (kvk_u64)a[0] | ((kvk_u64)a[1] << 32);
    const kvk_u64 a23 = (kvk_u64)a[2] | ((kvk_u64)a[3] << 32);
    kvk_u64 lowK[4], highK[4];                  // from lane 4g+q: k = 2q,2q+1 (low) and 2q+8,2q+9 (high)
    KVK_UNROLL
    for (int q = 0; q < 4; ++q) {
        lowK[q] = __shfl_sync(full, a01, (int)(4u * g + (kvk_u32)q));
        highK[q] = __shfl_sync(full, a23, (int)(4u * g + (kvk_u32)q));
    }
    // Column n of B lives in lanes 4n + q: b[0] = B[2q, 2q+1][n], b[1] = B[2q+8, 2q+9][n]. This
    // lane's D entries need columns 2t and 2t+1.
    const kvk_u64 b01 = (kvk_u64)b[0] | ((kvk_u64)b[1] << 32);
    kvk_u64 col[2][4];
    KVK_UNROLL
    for (int j = 0; j < 2; ++j) {
        KVK_UNROLL
        for (int q = 0; q < 4; ++q) col[j][q] = __shfl_sync(full, b01, (int)(4u * (2u * t + (kvk_u32)j) + (kvk_u32)q));
    }
    double acc[4];
    KVK_UNROLL
    for (int i = 0; i < 4; ++i) {
        const kvk_u32 upper = (kvk_u32)i >> 1;  // 0: row g, 1: row g+8
        const int j = i & 1;                    // column 2t + j
        double sum = 0.0;
        for (int k = 0; k < 16; ++k) {
            const int q = (k & 7) >> 1;
            const kvk_u32 half = (kvk_u32)k & 1u;
            const kvk_u64 arow = k < 8 ? lowK[q] : highK[q];
            const kvk_u32 areg = (kvk_u32)(arow >> (32u * upper));
            const kvk_u32 breg = (kvk_u32)(col[j][q] >> (k < 8 ? 0 : 32));
            sum += kvk_mma_element<Bf16>(areg, half) * kvk_mma_element<Bf16>(breg, half);
        }
        acc[i] = sum + (double)c[i];
    }
    KVK_UNROLL
    for (int i = 0; i < 4; ++i) d[i] = (float)acc[i];
}
#endif

// d = A * B + c with f16 inputs (d may be the same array as c).
KVK_INLINE void kvk_mma_m16n8k16_f16(float (&d)[4], const kvk_u32 (&a)[4], const kvk_u32 (&b)[2], const float (&c)[4])
{
#ifdef __CUDA_ARCH__
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%10, %11, %12, %13};"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                   "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#else
    kvk_mma_m16n8k16_twin<false>(d, a, b, c);
#endif
}

// d = A * B + c with bf16 inputs (d may be the same array as c).
KVK_INLINE void kvk_mma_m16n8k16_bf16(float (&d)[4], const kvk_u32 (&a)[4], const kvk_u32 (&b)[2], const float (&c)[4])
{
#ifdef __CUDA_ARCH__
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%10, %11, %12, %13};"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                   "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#else
    kvk_mma_m16n8k16_twin<true>(d, a, b, c);
#endif
}

// acc += A * B.
KVK_INLINE void kvk_mma_m16n8k16_f16(float (&acc)[4], const kvk_u32 (&a)[4], const kvk_u32 (&b)[2])
{
    kvk_mma_m16n8k16_f16(acc, a, b, acc);
}

KVK_INLINE void kvk_mma_m16n8k16_bf16(float (&acc)[4], const kvk_u32 (&a)[4], const kvk_u32 (&b)[2])
{
    kvk_mma_m16n8k16_bf16(acc, a, b, acc);
}

// ---- ldmatrix --------------------------------------------------------------------------------------

#ifndef __CUDA_ARCH__
template <int N, bool Trans>
KVK_INLINE void kvk_ldmatrix_twin(kvk_u32 (&r)[N], const void* row)
{
    const unsigned full = 0xFFFFFFFFu;
    const kvk_u32 lane = kvk_lane_id();
    const kvk_u64 mine = kvk_address(row);
    // Only the addresses of lanes 0 .. 8N-1 are used; each must be 16-byte aligned.
    if (lane < 8u * (kvk_u32)N && (mine & 15u) != 0) {
#ifdef KVK_EMULATION
        kvk_emu_misaligned(row, 16u, "ldmatrix row address");
#else
        __builtin_trap();
#endif
    }
    const kvk_u32 g = lane >> 2, t = lane & 3u;
    KVK_UNROLL
    for (int i = 0; i < N; ++i) {
        const kvk_u32 base = 8u * (kvk_u32)i;
        if (!Trans) {
            // Row g of matrix i comes from lane 8i + g; this lane takes its columns 2t, 2t+1.
            const kvk_u64 p = __shfl_sync(full, mine, (int)(base + g));
            kvk_u32 v;
            __builtin_memcpy(&v, reinterpret_cast<const void*>(p + 4u * t), 4);
            r[i] = v;
        } else {
            // Elements (2t, g) and (2t+1, g): column g of rows 2t and 2t+1.
            const kvk_u64 p0 = __shfl_sync(full, mine, (int)(base + 2u * t));
            const kvk_u64 p1 = __shfl_sync(full, mine, (int)(base + 2u * t + 1u));
            kvk_u16 lo, hi;
            __builtin_memcpy(&lo, reinterpret_cast<const void*>(p0 + 2u * g), 2);
            __builtin_memcpy(&hi, reinterpret_cast<const void*>(p1 + 2u * g), 2);
            r[i] = (kvk_u32)lo | ((kvk_u32)hi << 16);
        }
    }
}
#endif

// r[i] <- matrix i (N = 1, 2 or 4), plain or transposed; `row` is this lane's row address in shared memory.
template <int N, bool Trans>
KVK_INLINE void kvk_ldmatrix(kvk_u32 (&r)[N], const void* row)
{
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
#ifdef __CUDA_ARCH__
    const kvk_u32 s = (kvk_u32)__cvta_generic_to_shared(row);
    if constexpr (N == 1 && !Trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(s) : "memory");
    else if constexpr (N == 1 && Trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(s) : "memory");
    else if constexpr (N == 2 && !Trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(s) : "memory");
    else if constexpr (N == 2 && Trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(s) : "memory");
    else if constexpr (N == 4 && !Trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s) : "memory");
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s) : "memory");
#else
    kvk_ldmatrix_twin<N, Trans>(r, row);
#endif
}

KVK_INLINE void kvk_ldmatrix_x1(kvk_u32 (&r)[1], const void* row) { kvk_ldmatrix<1, false>(r, row); }
KVK_INLINE void kvk_ldmatrix_x2(kvk_u32 (&r)[2], const void* row) { kvk_ldmatrix<2, false>(r, row); }
KVK_INLINE void kvk_ldmatrix_x4(kvk_u32 (&r)[4], const void* row) { kvk_ldmatrix<4, false>(r, row); }
KVK_INLINE void kvk_ldmatrix_x1_trans(kvk_u32 (&r)[1], const void* row) { kvk_ldmatrix<1, true>(r, row); }
KVK_INLINE void kvk_ldmatrix_x2_trans(kvk_u32 (&r)[2], const void* row) { kvk_ldmatrix<2, true>(r, row); }
KVK_INLINE void kvk_ldmatrix_x4_trans(kvk_u32 (&r)[4], const void* row) { kvk_ldmatrix<4, true>(r, row); }

// ---- movmatrix -------------------------------------------------------------------------------------

// The transpose of the 8x8 b16 matrix held in the plain ldmatrix layout (sm_75+).
KVK_INLINE kvk_u32 kvk_movmatrix_trans(kvk_u32 a)
{
#ifdef __CUDA_ARCH__
    kvk_u32 d;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(d) : "r"(a));
    return d;
#else
    // Output lane L holds T[g][2t], T[g][2t+1] = M[2t][g], M[2t+1][g]; M[r][c] is in lane 4r + c/2,
    // half c % 2. So both halves come from half g % 2 of lanes 8t + g/2 and 8t + 4 + g/2.
    const unsigned full = 0xFFFFFFFFu;
    const kvk_u32 lane = kvk_lane_id();
    const kvk_u32 g = lane >> 2, t = lane & 3u;
    const kvk_u32 r0 = __shfl_sync(full, a, (int)(8u * t + (g >> 1)));
    const kvk_u32 r1 = __shfl_sync(full, a, (int)(8u * t + 4u + (g >> 1)));
    const kvk_u32 shift = 16u * (g & 1u);
    return ((r0 >> shift) & 0xFFFFu) | (((r1 >> shift) & 0xFFFFu) << 16);
#endif
}
