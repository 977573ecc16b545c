/* Fused CPU loops for the 16-bit fast paths of dmq.formats.grid (built and loaded by dmq/native.py).
 *
 * Each function is one pass over its input that does what the eager path does in several whole-tensor passes, with
 * the same roundings in the same order, so the results are bit for bit the eager ones (tests/dmq/test_native.py
 * compares them over every 16-bit pattern):
 *   - bfloat16 values widen to float32 exactly (a 16-bit shift);
 *   - a float32 result narrows to bfloat16 round-to-nearest-even, as torch's conversion does (a NaN becomes the
 *     pattern 0xFFFF, as torch's does on x86; the rounding loops leave non-finite inputs to the eager path);
 *   - float32 arithmetic is IEEE single precision with round-to-nearest-even: built without -ffast-math, and with
 *     -ffp-contract=off so that no multiply and add fuse into one rounding, except where the eager path fuses them
 *     itself (fmaf in the integer epilogue, as PyTorch's addcmul).
 * Indices are 16-bit bit patterns, so no table read is out of bounds.
 *
 * Each exported loop takes `threads`, the caller's thread count (torch.get_num_threads()), and splits its
 * independent rows or elements into at most that many contiguous parts run on their own threads (dmq_parallel). An
 * element's result never depends on the split, so every thread count gives the same bits. */
#include <pthread.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#define DMQ_MAX_THREADS 64
/* the least work a part takes, in elements: below it a thread's start (tens of microseconds) costs more than the
 * part */
#define DMQ_GRAIN 32768

typedef void (*dmq_range_fn)(const void *ctx, int64_t lo, int64_t hi);

#ifndef _OPENMP
typedef struct {
    dmq_range_fn fn;
    const void *ctx;
    int64_t lo, hi;
} dmq_part;

static void *dmq_part_main(void *p) {
    const dmq_part *t = p;
    t->fn(t->ctx, t->lo, t->hi);
    return NULL;
}
#endif

/* fn(ctx, lo, hi) over [0, n) in at most `threads` contiguous parts of at least `grain` items. Built with OpenMP,
 * the parts run on the OpenMP runtime's thread team, which PyTorch's own loops use too (one libgomp per process): its
 * threads are awake, spinning after PyTorch's last operation, where threads of our own would have to share their
 * cores with them. Without OpenMP each part but the first starts a thread (one that cannot start runs its part on
 * the calling thread). */
static void dmq_parallel(dmq_range_fn fn, const void *ctx, int64_t n, int64_t grain, int threads) {
    int64_t parts = n / (grain > 0 ? grain : 1);
    parts = parts < threads ? parts : threads;
    parts = parts < DMQ_MAX_THREADS ? parts : DMQ_MAX_THREADS;
    if (parts <= 1) {
        if (n > 0) fn(ctx, 0, n);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads(parts) schedule(static, 1)
    for (int64_t i = 0; i < parts; i++) fn(ctx, n * i / parts, n * (i + 1) / parts);
#else
    pthread_t th[DMQ_MAX_THREADS];
    dmq_part part[DMQ_MAX_THREADS];
    int started[DMQ_MAX_THREADS];
    for (int64_t i = 0; i < parts; i++) part[i] = (dmq_part){fn, ctx, n * i / parts, n * (i + 1) / parts};
    for (int64_t i = 1; i < parts; i++) started[i] = pthread_create(th + i, NULL, dmq_part_main, part + i) == 0;
    fn(ctx, part[0].lo, part[0].hi);
    for (int64_t i = 1; i < parts; i++) {
        if (started[i])
            pthread_join(th[i], NULL);
        else
            fn(ctx, part[i].lo, part[i].hi);
    }
#endif
}

/* items of `per` elements each: the least items a part takes */
static inline int64_t dmq_grain(int64_t per) {
    return per >= DMQ_GRAIN ? 1 : DMQ_GRAIN / (per > 0 ? per : 1);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint16_t r = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? 0xFFFFu : r;  /* NaN: the pattern torch's conversion gives here */
}

/* bf16_to_f32(f32_to_bf16(f)) in 32-bit operations only, so that loops over it vectorize */
static inline float round_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    r = (u & 0x7FFFFFFFu) > 0x7F800000u ? 0xFFFF0000u : r;
    float o;
    memcpy(&o, &r, 4);
    return o;
}

/* out[i] = table[bits[i] ^ flip] for 2-byte table entries (flip = 0x8000: the pattern read as int16, offset by
 * 32768); dmq_gather16_1 and dmq_gather16_4 the same for 1-byte (activation-code tables) and 4-byte entries (float32
 * or int32 tables). */
typedef struct {
    const void *table;
    const uint16_t *bits;
    void *out;
    uint32_t flip;
} dmq_gather_args;

#define DMQ_GATHER(NAME, T)                                                                                     \
    static void NAME##_range(const void *ctx, int64_t lo, int64_t hi) {                                       \
        const dmq_gather_args *g = ctx;                                                                         \
        const T *table = g->table;                                                                              \
        T *out = g->out;                                                                                        \
        for (int64_t i = lo; i < hi; i++) out[i] = table[(uint16_t)(g->bits[i] ^ g->flip)];                     \
    }                                                                                                           \
    void NAME(const T *table, const uint16_t *bits, T *out, int64_t n, uint32_t flip, int threads) {           \
        const dmq_gather_args g = {table, bits, out, flip};                                                     \
        dmq_parallel(NAME##_range, &g, n, DMQ_GRAIN, threads);                                                  \
    }

DMQ_GATHER(dmq_gather16_1, uint8_t)
DMQ_GATHER(dmq_gather16_2, uint16_t)
DMQ_GATHER(dmq_gather16_4, uint32_t)

/* out[r] = max_j (x[r, j] & 0x7FFF) over rows of k 16-bit patterns: the magnitude pattern of each row's largest
 * absolute value (NaN patterns order above inf). */
static void absmax_rows(const uint16_t *restrict x, uint16_t *restrict out, int64_t r0, int64_t r1, int64_t k) {
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *p = x + r * k;
        uint16_t m = 0;
        for (int64_t j = 0; j < k; j++) {
            uint16_t v = p[j] & 0x7FFFu;
            m = v > m ? v : m;
        }
        out[r] = m;
    }
}

typedef struct {
    const uint16_t *x;
    uint16_t *out;
    int64_t k;
} dmq_absmax_args;

static void absmax_range(const void *ctx, int64_t lo, int64_t hi) {
    const dmq_absmax_args *a = ctx;
    absmax_rows(a->x, a->out, lo, hi, a->k);
}

void dmq_absmax16(const uint16_t *x, uint16_t *out, int64_t rows, int64_t k, int threads) {
    const dmq_absmax_args a = {x, out, k};
    dmq_parallel(absmax_range, &a, rows, dmq_grain(k), threads);
}

/* The arithmetic grid rounding of dmq.formats.grid._round_kernel on one float32 value, for a grid with scale 1:
 * saturate to [lo, hi] (NaN stays NaN), add and subtract S = 2^(max(e, emin) + 23 - man_bits) so that the float
 * unit's round-to-nearest-even lands on the grid, and restore the sign. s_min and s_add are the exponent-field
 * constants (emin + 127) << 23 and (23 - man_bits) << 23. */
static inline float round_grid(float w, float lo, float hi, int32_t s_min, int32_t s_add, int sign) {
    w = w < lo ? lo : (w > hi ? hi : w);
    int32_t b;
    memcpy(&b, &w, 4);
    int32_t e = b & 0x7F800000;
    e = (e < s_min ? s_min : e) + s_add;
    float step;
    memcpy(&step, &e, 4);
    const float a = (fabsf(w) + step) - step;
    return sign ? copysignf(a, w) : a;
}

/* the block quantizers' modes (dmq_quant_blocks_bf16 below) and a grid's constants for round_grid */
enum { DMQ_NVFP4 = 0, DMQ_MX = 1, DMQ_TOKEN = 2 };

typedef struct {
    float lo, hi;
    int32_t s_min, s_add;
} dmq_grid;

static inline float grid_at(float w, const dmq_grid *g, int sign) {
    return round_grid(w, g->lo, g->hi, g->s_min, g->s_add, sign);
}

/* One element with its block's constants a and b: NVFP4 out = bf16(grid(x / a) * a); MX out =
 * bf16(bf16(grid(bf16(x * b))) * a), b = 1 / a; TOKEN the same with the quotient bf16(x / a). */
static inline uint16_t quant_one(uint16_t h, int mode, float a, float b, const dmq_grid *g, int sign) {
    const float v = bf16_to_f32(h);
    if (mode == DMQ_NVFP4) return f32_to_bf16(grid_at(v / a, g, sign) * a);
    const float q = round_to_bf16(mode == DMQ_MX ? v * b : v / a);
    return f32_to_bf16(round_to_bf16(grid_at(q, g, sign)) * a);
}

/* Rows of k bfloat16 values, each row with its own scale, rounded onto a grid:
 *   dmq_round_div_bf16: one bfloat16 scale s per row, out = bf16(bf16(grid(bf16(x / s))) * s), the eager path of
 *   dmq.formats.grid.round_div16 (its table holds bf16(grid(v)) for every bfloat16 v). With pow2 set every scale is
 *   a power of two with an exact reciprocal, and the quotient is x * bf16(1 / s), as the eager path computes it.
 *   dmq_round_scaled_bf16: one float32 denominator d per row, out = bf16(grid(float32(x) / d) * d), the eager path
 *   of dmq.formats.grid.round_scaled16 (which rounds the quotient to odd at 16 bits and looks it up: the same point
 *   for grids of at most 5 mantissa bits, as that module shows).
 * Both return 1, with `out` not to be used, when a value or scale is not finite (or a denominator is zero): the
 * eager path handles those. */
typedef struct {
    const uint16_t *x;
    const void *scale;
    uint16_t *out;
    int64_t k;
    int mode; /* DMQ_MX: a power-of-two bfloat16 scale, DMQ_TOKEN: a bfloat16 scale, DMQ_NVFP4: a float32 one */
    dmq_grid g;
    int bad;
} dmq_rows_args;

static void round_rows_range(const void *ctx, int64_t lo, int64_t hi) {
    const dmq_rows_args *a = ctx;
    const int sign = a->g.lo < 0.0f;
    const int64_t k = a->k;
    unsigned bad = 0;
    for (int64_t r = lo; r < hi; r++) {
        const uint16_t *restrict p = a->x + r * k;
        uint16_t *restrict o = a->out + r * k;
        for (int64_t j = 0; j < k; j++) bad |= (p[j] & 0x7F80u) == 0x7F80u;
        if (a->mode == DMQ_NVFP4) {
            const float d = ((const float *)a->scale)[r];
            bad |= !isfinite(d) || d == 0.0f;
            for (int64_t j = 0; j < k; j++) o[j] = quant_one(p[j], DMQ_NVFP4, d, 0.0f, &a->g, sign);
            continue;
        }
        const uint16_t sh = ((const uint16_t *)a->scale)[r];
        const float s = bf16_to_f32(sh);
        bad |= (sh & 0x7F80u) == 0x7F80u;
        if (a->mode == DMQ_MX) {
            const float inv = bf16_to_f32(f32_to_bf16(1.0f / s));
            for (int64_t j = 0; j < k; j++) o[j] = quant_one(p[j], DMQ_MX, s, inv, &a->g, sign);
        } else {
            for (int64_t j = 0; j < k; j++) o[j] = quant_one(p[j], DMQ_TOKEN, s, 0.0f, &a->g, sign);
        }
    }
    if (bad) __atomic_store_n(&((dmq_rows_args *)a)->bad, 1, __ATOMIC_RELAXED);
}

int dmq_round_div_bf16(const uint16_t *x, const uint16_t *scale, uint16_t *out, int64_t rows, int64_t k, int pow2,
                       float lo, float hi, int32_t s_min, int32_t s_add, int threads) {
    dmq_rows_args a = {x, scale, out, k, pow2 ? DMQ_MX : DMQ_TOKEN, {lo, hi, s_min, s_add}, 0};
    dmq_parallel(round_rows_range, &a, rows, dmq_grain(k), threads);
    return a.bad;
}

int dmq_round_scaled_bf16(const uint16_t *x, const float *denom, uint16_t *out, int64_t rows, int64_t k, float lo,
                          float hi, int32_t s_min, int32_t s_add, int threads) {
    dmq_rows_args a = {x, denom, out, k, DMQ_NVFP4, {lo, hi, s_min, s_add}, 0};
    dmq_parallel(round_rows_range, &a, rows, dmq_grain(k), threads);
    return a.bad;
}

/* The block constants from the blocks' largest magnitudes m (bf16 patterns), one loop per mode so that each
 * vectorizes: a (NVFP4: d; MX and TOKEN: s) and b (MX: 1 / s). MX's floor(log2 amax) is the exponent field of the
 * float32 amax: a subnormal or zero amax has floor(log2) <= -127, which the clamp takes to -127 whatever emax >= 0,
 * and 2^-127 and 2^127 are exact in bfloat16. */
static void block_scales(const uint16_t *restrict m, int64_t nb, int mode, float elem_max, float s_t,
                         const dmq_grid *sg, float smin, int emax, float *restrict a, float *restrict b) {
    const float lo = smin, hi = sg->hi;
    const int32_t s_min = sg->s_min, s_add = sg->s_add;
    if (mode == DMQ_NVFP4) {
        for (int64_t i = 0; i < nb; i++) {
            float t = (bf16_to_f32(m[i]) / elem_max) / s_t;
            t = t < lo ? lo : (t > hi ? hi : t);
            a[i] = round_grid(t, sg->lo, hi, s_min, s_add, 0) * s_t;
            b[i] = 0.0f;
        }
    } else if (mode == DMQ_MX) {
        for (int64_t i = 0; i < nb; i++) {
            const int32_t field = (int32_t)((uint32_t)m[i] >> 7) & 0xFF;  /* the float32 exponent field */
            int32_t e = field == 0 ? -127 : field - 127 - emax;
            e = e < -127 ? -127 : (e > 127 ? 127 : e);
            /* 2^e and 2^-e as float32 bit patterns (2^-127 is the subnormal 0x00400000) */
            const uint32_t pe = e == -127 ? 0x00400000u : (uint32_t)(e + 127) << 23;
            const uint32_t pi = e == 127 ? 0x00400000u : (uint32_t)(127 - e) << 23;
            memcpy(a + i, &pe, 4);
            memcpy(b + i, &pi, 4);
        }
    } else {
        for (int64_t i = 0; i < nb; i++) {
            const float s = round_to_bf16(bf16_to_f32(m[i]) / elem_max);
            a[i] = s > 0.0f ? s : 1.0f;
            b[i] = 0.0f;
        }
    }
}

#define DMQ_FLAT 2048 /* elements a chunk of the short-row loop holds at most (DMQ_FLAT / block whole rows) */

/* the arguments of dmq_quant_blocks_bf16's three parallel steps; a unit of work is a block when inner == 1 and
 * else a run of `block` rows of `inner` positions (ob) */
typedef struct {
    const uint16_t *x;
    uint16_t *out, *amax;
    float *sa, *sb;
    int64_t inner, block;
    int mode, emax;
    float elem_max, s_t, smin;
    dmq_grid g, sg;
} dmq_blocks_args;

/* the blocks' largest magnitudes, as 16-bit patterns (they order like the magnitudes) */
static void blocks_amax_range(const void *ctx, int64_t lo, int64_t hi) {
    const dmq_blocks_args *a = ctx;
    const int64_t inner = a->inner, block = a->block;
    if (inner == 1) {
        absmax_rows(a->x, a->amax, lo, hi, block);
        return;
    }
    for (int64_t ob = lo; ob < hi; ob++) {
        uint16_t *restrict m = a->amax + ob * inner;
        for (int64_t i = 0; i < inner; i++) m[i] = 0;
        for (int64_t j = 0; j < block; j++) {
            const uint16_t *restrict p = a->x + (ob * block + j) * inner;
            for (int64_t i = 0; i < inner; i++) {
                const uint16_t v = p[i] & 0x7FFFu;
                m[i] = v > m[i] ? v : m[i];
            }
        }
    }
}

static void blocks_scales_range(const void *ctx, int64_t lo, int64_t hi) {
    const dmq_blocks_args *a = ctx;
    block_scales(a->amax + lo, hi - lo, a->mode, a->elem_max, a->s_t, &a->sg, a->smin, a->emax, a->sa + lo,
                 a->sb + lo);
}

/* the quantization loops over units lo .. hi, one copy per mode so that each inner loop is branch-free and
 * vectorizes */
#define DMQ_QUANT_LOOPS(MODE)                                                                                   \
    if (inner == 1 && block < 64) { /* short rows: spread the scales over a chunk, then one flat loop */         \
        float ea[DMQ_FLAT], eb[DMQ_FLAT];                                                                       \
        const int64_t per = DMQ_FLAT / block;                                                                   \
        for (int64_t b0 = lo; b0 < hi; b0 += per) {                                                             \
            const int64_t b1 = b0 + per < hi ? b0 + per : hi;                                                   \
            int64_t m = 0;                                                                                      \
            for (int64_t blk = b0; blk < b1; blk++)                                                             \
                for (int64_t j = 0; j < block; j++, m++) {                                                      \
                    ea[m] = sa[blk];                                                                            \
                    eb[m] = sb[blk];                                                                            \
                }                                                                                               \
            const uint16_t *restrict p = x + b0 * block;                                                        \
            uint16_t *restrict o = out + b0 * block;                                                            \
            for (int64_t i = 0; i < m; i++) o[i] = quant_one(p[i], MODE, ea[i], eb[i], g, sign);                \
        }                                                                                                       \
    } else if (inner == 1) {                                                                                    \
        for (int64_t blk = lo; blk < hi; blk++) {                                                               \
            const float a = sa[blk], b = sb[blk];                                                               \
            const uint16_t *restrict p = x + blk * block;                                                       \
            uint16_t *restrict o = out + blk * block;                                                           \
            for (int64_t j = 0; j < block; j++) o[j] = quant_one(p[j], MODE, a, b, g, sign);                    \
        }                                                                                                       \
    } else {                                                                                                    \
        for (int64_t ob = lo; ob < hi; ob++) {                                                                  \
            const float *restrict ra = sa + ob * inner, *restrict rb = sb + ob * inner;                         \
            for (int64_t j = 0; j < block; j++) {                                                               \
                const uint16_t *restrict p = x + (ob * block + j) * inner;                                      \
                uint16_t *restrict o = out + (ob * block + j) * inner;                                          \
                for (int64_t i = 0; i < inner; i++) o[i] = quant_one(p[i], MODE, ra[i], rb[i], g, sign);        \
            }                                                                                                   \
        }                                                                                                       \
    }

static void blocks_quant_range(const void *ctx, int64_t lo, int64_t hi) {
    const dmq_blocks_args *args = ctx;
    const uint16_t *restrict x = args->x;
    uint16_t *restrict out = args->out;
    const float *restrict sa = args->sa, *restrict sb = args->sb;
    const int64_t inner = args->inner, block = args->block;
    const dmq_grid *g = &args->g;
    const int sign = g->lo < 0.0f;
    if (args->mode == DMQ_NVFP4) {
        DMQ_QUANT_LOOPS(DMQ_NVFP4)
    } else if (args->mode == DMQ_MX) {
        DMQ_QUANT_LOOPS(DMQ_MX)
    } else {
        DMQ_QUANT_LOOPS(DMQ_TOKEN)
    }
}

/* Dynamic block quantization of a dense bfloat16 tensor viewed as (outer, c, inner), in blocks of `block` consecutive
 * indices along c (block == c: one scale per position of outer x inner, a per-token or per-pixel scale). Each block
 * takes its scale from its largest magnitude, as the eager quantizers compute it:
 *   DMQ_NVFP4: s_t = amax / (scale_max * elem_max) over the whole tensor, d = e4m3(clamp(amax_b / elem_max / s_t,
 *              smin, scale_max)) * s_t, out = bf16(grid(x / d) * d)                 (dmq.formats.block.NVFP4Format)
 *   DMQ_MX:    s = 2^clamp(floor(log2 amax_b) - emax, -127, 127) (2^-127 for a zero block),
 *              out = bf16(bf16(grid(bf16(x * (1 / s)))) * s)                         (dmq.formats.block.MXFormat)
 *   DMQ_TOKEN: s = bf16(amax_b / elem_max) (1 where that is 0), out = bf16(bf16(grid(bf16(x / s))) * s)
 *              (dmq.fake_quant.quantize_rows_dynamic, symmetric float formats)
 * Returns 0, or 1 when a value is not finite and 2 when an NVFP4 tensor is all zeros: the caller then takes the
 * eager path, which handles both, and `out` is not written. */
int dmq_quant_blocks_bf16(const uint16_t *x, uint16_t *out, uint16_t *amax, float *sa, float *sb, int64_t outer,
                          int64_t c, int64_t inner, int64_t block, int mode, float elem_max, const dmq_grid *g,
                          const dmq_grid *sg, float smin, int emax, int threads) {
    const int64_t nb = outer * (c / block) * inner;  /* blocks, in (outer, c / block, inner) order */
    const int64_t units = inner == 1 ? nb : outer * (c / block), per = inner == 1 ? block : block * inner;
    dmq_blocks_args a = {x, out, amax, sa, sb, inner, block, mode, emax, elem_max, 0.0f, smin, *g, *sg};
    dmq_parallel(blocks_amax_range, &a, units, dmq_grain(per), threads);
    uint16_t top = 0;
    for (int64_t blk = 0; blk < nb; blk++) top = amax[blk] > top ? amax[blk] : top;
    if (top >= 0x7F80u) return 1;
    a.s_t = mode == DMQ_NVFP4 ? bf16_to_f32(top) / (sg->hi * elem_max) : 0.0f;
    if (mode == DMQ_NVFP4 && a.s_t == 0.0f) return 2;
    dmq_parallel(blocks_scales_range, &a, nb, DMQ_GRAIN, threads);
    dmq_parallel(blocks_quant_range, &a, units, dmq_grain(per), threads);
    return 0;
}

/* Both nibbles of 16 code bytes at once (AVX-512): the 16-entry value table sits in one register and each nibble
 * indexes it with a permute; the products are interleaved back into column order (low nibble first) and stored as
 * 32 float32 values, rounded to bfloat16 first for kind 1. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline __m512 round_bf16_ps(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd);
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xFFFF0000u)));
}

/* bytes b0 .. of one row (columns 2 b0 ..) while whole 16-byte steps fit below b1; every 16 columns share a scale
 * (group a multiple of 16, columns counted from the row start). Returns the first byte not done. */
static int64_t nibbles_avx512(const uint8_t *restrict c, int64_t b0, int64_t b1, __m512 t16,
                              const float *restrict s, int64_t group, float *o, int round) {
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    int64_t b = b0;
    for (; b + 16 <= b1; b += 16) {
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + b)));
        const __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)), t16);
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), t16);
        __m512 v0 = _mm512_mul_ps(_mm512_permutex2var_ps(lo, first, hi), _mm512_set1_ps(s[(2 * b) / group]));
        __m512 v1 = _mm512_mul_ps(_mm512_permutex2var_ps(lo, second, hi), _mm512_set1_ps(s[(2 * b + 16) / group]));
        if (round) {
            v0 = round_bf16_ps(v0);
            v1 = round_bf16_ps(v1);
        }
        _mm512_storeu_ps(o + 2 * b, v0);
        _mm512_storeu_ps(o + 2 * b + 16, v1);
    }
    return b;
}
#endif

/* the value of code j in a row (vpb codes a byte) times the scale: the loops below spell it per case, so that the
 * one-code-a-byte loops vectorize with gathers */
#define DMQ_DEQUANT_LOOP(STORE)                                                                                 \
    if (vpb == 0) {                                                                                             \
        for (int64_t j = j0; j < j1; j++) STORE(j, (float)(int8_t)c[j] * sg);                                 \
    } else if (vpb == -1) {                                                                                     \
        for (int64_t j = j0; j < j1; j++) STORE(j, (float)c[j] * sg);                                         \
    } else if (vpb == 1) {                                                                                      \
        for (int64_t j = j0; j < j1; j++) STORE(j, table[c[j]] * sg);                                         \
    } else {                                                                                                    \
        for (int64_t b = j0 >> 1; b < j1 >> 1; b++) {                                                           \
            const float *restrict t = table + 2 * c[b];                                                         \
            STORE(2 * b, t[0] * sg);                                                                            \
            STORE(2 * b + 1, t[1] * sg);                                                                        \
        }                                                                                                       \
        if (j1 & 1) STORE(j1 - 1, table[2 * c[(j1 - 1) >> 1]] * sg);                                            \
    }

/* Rows of a packed weight, dequantized for the tiled GEMM (dmq.packed.RowDequantizer): each stored byte holds vpb
 * (1 or 2) codes, whose float32 values are table[byte * vpb + i] (low nibble first); vpb 0 and -1 mark INT8 and
 * UINT8 codes, which are their own values (an exact conversion, no table); each value is multiplied by its
 * group's float32 scale (scales: n x groups, `group` columns each), then written as float32 (kind 0), as float32
 * rounded to bfloat16 (kind 1: the reference's bfloat16 weight held in float32 for the GEMM), or as bfloat16 (kind
 * 2). `cols` columns of each row are written; a row's codes start every `nbytes` bytes. */
static void dequant_rows(const uint8_t *restrict codes, int64_t nbytes, const float *restrict table, int vpb,
                         const float *restrict scales, int64_t groups, int64_t group, void *restrict out, int64_t n,
                         int64_t cols, int kind) {
#if defined(__AVX512F__)
    /* a 4-bit byte's two values are the 16-entry table of its nibbles (the caller checks that the table is so) */
    float nib[16];
    for (int i = 0; i < 16; i++) nib[i] = vpb == 2 ? table[2 * i] : 0.0f;
    const __m512 t16 = _mm512_loadu_ps(nib);
#endif
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *restrict c = codes + r * nbytes;
        const float *restrict s = scales + r * groups;
        float *restrict of = (float *)out + r * cols;
        uint16_t *restrict oh = (uint16_t *)out + r * cols;
        int64_t g = 0;
#if defined(__AVX512F__)
        if (vpb == 2 && kind != 2 && group % 16 == 0)  /* whole 32-column steps, then the groups left */
            g = nibbles_avx512(c, 0, cols >> 1, t16, s, group, of, kind == 1) * 2 / group;
#endif
        for (; g < groups && g * group < cols; g++) {
            const int64_t j0 = g * group, j1 = (g + 1) * group < cols ? (g + 1) * group : cols;
            const float sg = s[g];
#define DMQ_F32(j, v) of[j] = (v)
#define DMQ_F32_BF16(j, v) of[j] = round_to_bf16(v)
#define DMQ_BF16(j, v) oh[j] = f32_to_bf16(v)
            if (kind == 0) {
                DMQ_DEQUANT_LOOP(DMQ_F32)
            } else if (kind == 1) {
                DMQ_DEQUANT_LOOP(DMQ_F32_BF16)
            } else {
                DMQ_DEQUANT_LOOP(DMQ_BF16)
            }
        }
    }
}

typedef struct {
    const uint8_t *codes;
    const float *table, *scales;
    void *out;
    int64_t nbytes, groups, group, cols;
    int vpb, kind;
} dmq_dequant_args;

static void dequant_range(const void *ctx, int64_t lo, int64_t hi) {
    const dmq_dequant_args *a = ctx;
    const int64_t size = a->kind == 2 ? 2 : 4;
    dequant_rows(a->codes + lo * a->nbytes, a->nbytes, a->table, a->vpb, a->scales + lo * a->groups, a->groups,
                 a->group, (char *)a->out + lo * a->cols * size, hi - lo, a->cols, a->kind);
}

void dmq_dequant_rows(const uint8_t *codes, int64_t nbytes, const float *table, int vpb, const float *scales,
                      int64_t groups, int64_t group, void *out, int64_t n, int64_t cols, int kind, int threads) {
    const dmq_dequant_args a = {codes, table, scales, out, nbytes, groups, group, cols, vpb, kind};
    dmq_parallel(dequant_range, &a, n, dmq_grain(cols), threads);
}

/* A shortcut split's input through two tables (dmq.kernels._split_lookup): x is dense (outer, c, inner) 16-bit
 * patterns, and channels below `split` read table a, the rest table b (2-byte entries). */
typedef struct {
    const uint16_t *ta, *tb, *x;
    uint16_t *out;
    int64_t c, inner, split;
} dmq_split_args;

static void split_range(const void *ctx, int64_t lo, int64_t hi) {
    const dmq_split_args *a = ctx;
    for (int64_t oc = lo; oc < hi; oc++) { /* oc: one (outer, channel) pair */
        const uint16_t *t = oc % a->c < a->split ? a->ta : a->tb;
        const uint16_t *restrict p = a->x + oc * a->inner;
        uint16_t *restrict o = a->out + oc * a->inner;
        for (int64_t i = 0; i < a->inner; i++) o[i] = t[p[i]];
    }
}

void dmq_gather16_split_2(const uint16_t *ta, const uint16_t *tb, const uint16_t *x, uint16_t *out, int64_t outer,
                          int64_t c, int64_t inner, int64_t split, int threads) {
    const dmq_split_args a = {ta, tb, x, out, c, inner, split};
    dmq_parallel(split_range, &a, outer * c, dmq_grain(inner), threads);
}

/* Two's complement 4-bit codes, two a byte (low nibble first), sign-extended to int8: rows of `nbytes` bytes in,
 * rows of `cols` codes out (dmq.packed.int_codes). */
typedef struct {
    const uint8_t *q;
    int8_t *out;
    int64_t nbytes, cols;
} dmq_unpack_args;

static void unpack_range(const void *ctx, int64_t lo, int64_t hi) {
    const dmq_unpack_args *a = ctx;
    const int64_t cols = a->cols, whole = cols >> 1;
    for (int64_t r = lo; r < hi; r++) {
        const uint8_t *restrict p = a->q + r * a->nbytes;
        int8_t *restrict o = a->out + r * cols;
        for (int64_t b = 0; b < whole; b++) {
            o[2 * b] = (int8_t)((int8_t)(p[b] << 4) >> 4);
            o[2 * b + 1] = (int8_t)((int8_t)p[b] >> 4);
        }
        if (cols & 1) o[cols - 1] = (int8_t)((int8_t)(p[whole] << 4) >> 4);
    }
}

void dmq_unpack_s4(const uint8_t *q, int8_t *out, int64_t rows, int64_t nbytes, int64_t cols, int threads) {
    const dmq_unpack_args a = {q, out, nbytes, cols};
    dmq_parallel(unpack_range, &a, rows, dmq_grain(cols), threads);
}

/* y = x W^T + bias for a few input rows (m <= 8, the per-sample layers at small batch), W the weight rows of
 * dmq_dequant_rows (kind 0 or 1), without building a tile: each weight row is dequantized once into a buffer that
 * stays in L1 and multiplied by every input row. The float32 sums run in 64 partial sums a row, then added: another
 * summation order than a GEMM's, with the same bound. x is float32 (m, k), y float32 (m, n). Returns
 * 1 (nothing written) for a shape it does not take. */
enum { DMQ_GEMV_MAX_M = 8, DMQ_GEMV_MAX_K = 16384 };

typedef struct {
    const float *x, *table, *scales, *bias;
    const uint8_t *codes;
    float *y;
    int64_t m, k, nbytes, groups, group, n;
    int vpb, kind;
} dmq_gemv_args;

static void gemv_range(const void *ctx, int64_t lo, int64_t hi) {
    const dmq_gemv_args *a = ctx;
    const int64_t k = a->k, n = a->n;
    float w[DMQ_GEMV_MAX_K];
    for (int64_t r = lo; r < hi; r++) {
        dequant_rows(a->codes + r * a->nbytes, a->nbytes, a->table, a->vpb, a->scales + r * a->groups, a->groups,
                     a->group, w, 1, k, a->kind);
        for (int64_t i = 0; i < a->m; i++) {
            const float *restrict xi = a->x + i * k;
            /* four independent 16-lane partial sums, so that the additions do not wait on each other */
            float p0[16] = {0}, p1[16] = {0}, p2[16] = {0}, p3[16] = {0};
            int64_t j = 0;
            for (; j + 64 <= k; j += 64)
                for (int l = 0; l < 16; l++) {
                    p0[l] += xi[j + l] * w[j + l];
                    p1[l] += xi[j + 16 + l] * w[j + 16 + l];
                    p2[l] += xi[j + 32 + l] * w[j + 32 + l];
                    p3[l] += xi[j + 48 + l] * w[j + 48 + l];
                }
            for (; j + 16 <= k; j += 16)
                for (int l = 0; l < 16; l++) p0[l] += xi[j + l] * w[j + l];
            float acc = 0.0f;
            for (int l = 0; l < 16; l++) acc += (p0[l] + p1[l]) + (p2[l] + p3[l]);
            for (; j < k; j++) acc += xi[j] * w[j];
            a->y[i * n + r] = a->bias ? acc + a->bias[r] : acc;
        }
    }
}

int dmq_dequant_gemv(const float *x, int64_t m, int64_t k, const uint8_t *codes, int64_t nbytes, const float *table,
                     int vpb, const float *scales, int64_t groups, int64_t group, const float *bias, float *y,
                     int64_t n, int kind, int threads) {
    if (m < 1 || m > DMQ_GEMV_MAX_M || k > DMQ_GEMV_MAX_K || kind > 1) return 1;
    const dmq_gemv_args a = {x, table, scales, bias, codes, y, m, k, nbytes, groups, group, n, vpb, kind};
    dmq_parallel(gemv_range, &a, n, dmq_grain(k), threads);
    return 0;
}

/* The epilogue of the integer GEMM (dmq.kernels.int_linear) on a chunk of rows: acc is its int32 (m, n) result,
 * and out[r, j] = round(float32(acc[r, j] + c_r * rowsum_j) * (s_r * ws_j) + bias_j) with float32 products and
 * sums rounded once each, as the PyTorch form's passes do (int32 add, conversion, the product of the scales,
 * addcmul), then to bfloat16 round-to-nearest-even (kind 1) or kept float32 (kind 0). s and c hold one value per
 * row, or one for all rows (row stride 0); rowsum and bias may be NULL (no correction, no bias). */
typedef struct {
    const int32_t *acc, *c, *rowsum;
    const float *s, *ws, *bias;
    void *out;
    int64_t n, stride;
    int kind;
} dmq_epilogue_args;

static void epilogue_range(const void *ctx, int64_t lo, int64_t hi) {
    const dmq_epilogue_args *a = ctx;
    const int64_t n = a->n;
    for (int64_t r = lo; r < hi; r++) {
        const int32_t *restrict acc = a->acc + r * n;
        const int32_t cr = a->c ? a->c[r * a->stride] : 0;
        const float sr = a->s[r * a->stride];
        const int32_t *restrict rs = a->rowsum;
        const float *restrict ws = a->ws, *restrict b = a->bias;
        float *restrict of = (float *)a->out + r * n;
        uint16_t *restrict oh = (uint16_t *)a->out + r * n;
#define DMQ_EPI(STORE)                                                                                          \
    for (int64_t j = 0; j < n; j++) {                                                                           \
        const float f = (float)(rs ? acc[j] + cr * rs[j] : acc[j]);                                             \
        STORE(j, b ? fmaf(f, sr * ws[j], b[j]) : f * (sr * ws[j]));                                              \
    }
        if (a->kind == 1) {
            DMQ_EPI(DMQ_BF16)
        } else {
            DMQ_EPI(DMQ_F32)
        }
#undef DMQ_EPI
    }
}

void dmq_int_epilogue(const int32_t *acc, int64_t m, int64_t n, const float *s, const int32_t *c, int64_t stride,
                      const float *ws, const int32_t *rowsum, const float *bias, void *out, int kind, int threads) {
    const dmq_epilogue_args a = {acc, c, rowsum, s, ws, bias, out, n, stride, kind};
    dmq_parallel(epilogue_range, &a, m, dmq_grain(n), threads);
}
