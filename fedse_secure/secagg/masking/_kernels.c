/* The hot loops of masking: adding AEGIS-128X2 keystreams (the masks) to, or subtracting them from, a ring vector
 * in one pass; and, with AVX-512, quantising a float32 chunk into the 32-bit ring and the server's release of the
 * unmasked sum as float64 with its range check.
 *
 * Why this exists: masking a client's update adds one keystream per neighbour plus its self mask, and the
 * server regenerates the self masks, so keystream is most of a masking round. Here it never leaves registers:
 * each state update makes 64 bytes that are added to the vector while it sits in L1. AEGIS-128X2 spends 8 AES
 * rounds on those 64 bytes where AES-128-CTR (the masks before it) spends 40.
 *
 * The keystream is exactly fedse_secure/secagg/masking/aegis.py's (RFC 10032's stream-cipher use of
 * AEGIS-128X2, a nonce per 64 KiB segment), read as little-endian uint32 or uint64 ring elements; tests compare
 * the two byte for byte, on each path (tests/test_secagg_kernels.py). AES-NI/VAES run in constant time.
 *
 * The masks run on x86-64 with AES-NI (`mask_level()`: 2 with VAES and AVX-512VL, 1 with AES-NI only) and on
 * 64-bit ARM with the Armv8 Cryptographic Extension (1; tested under qemu-user, tests/test_secagg_kernels.py);
 * quantisation and release need AVX512F/BW and VAES (`supported()`). Elsewhere
 * fedse_secure/secagg/masking/prg.py and quantize.py take their numpy paths.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FEDSE_X86 1
#include <immintrin.h>
#elif defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
#define FEDSE_ARM 1
#include <arm_neon.h>
#if defined(__linux__)
#include <sys/auxv.h>
#endif
#endif

/* Zeroes key material in a way the compiler may not drop as a dead store. */
static void wipe(void *p, size_t n) {
    volatile uint8_t *z = (volatile uint8_t *)p;
    while (n--) *z++ = 0;
}

/* AEGIS-128X2 (RFC 10032): two AEGIS-128L lanes, each state eight 128-bit blocks. A mask is the keystream the
 * RFC's stream-cipher use defines (the encryption of zeros) under the mask key, in segments of
 * AEGIS_SEGMENT bytes: segment s uses the nonce s (little-endian, 16 bytes), so any segment can be started
 * without the ones before it (the server releases the last chunk first). Each update of the state makes 64
 * bytes: z0 of lanes 0 and 1, then z1 of lanes 0 and 1. One update costs 8 AES rounds for 64 bytes where
 * AES-128-CTR costs 40: on the EPYC box 43-45 GB/s of keystream a core against 21-23 for CTR with VAES. */
#define AEGIS_SEGMENT 65536
#define AEGIS_STEP 64
#define AEGIS_STATE_BYTES 256 /* 8 blocks x 2 lanes x 16 bytes */

static const uint8_t AEGIS_C0[16] = {0x00, 0x01, 0x01, 0x02, 0x03, 0x05, 0x08, 0x0d,
                                     0x15, 0x22, 0x37, 0x59, 0x90, 0xe9, 0x79, 0x62};
static const uint8_t AEGIS_C1[16] = {0xdb, 0x3d, 0x18, 0x55, 0x6d, 0xc2, 0x2f, 0xf1,
                                     0x20, 0x11, 0x31, 0x42, 0x73, 0xb5, 0x28, 0xdd};

#define ALWAYS_INLINE __attribute__((always_inline)) inline

/* The prefetches of the next chunks: one line of each every other update, while the AES rounds keep the core
 * busy. A prefetch never faults, so the last one may run past its buffer harmlessly. */
#define WARM_STEP(i)                                                                \
    do {                                                                            \
        if ((i) & 1) {                                                              \
            if (warm < warm_end) __builtin_prefetch(warm, 0, 2);                    \
            warm += 64;                                                             \
            if (warm_out < warm_out_end) __builtin_prefetch(warm_out, 1, 2);        \
            warm_out += 64;                                                         \
        }                                                                           \
    } while (0)

#ifdef FEDSE_X86

#define TARGET_VAES __attribute__((target("avx512f,avx512bw,avx512vl,vaes,aes,prfchw")))
#define TARGET_AESNI __attribute__((target("aes,sse2")))

/* ---- 256-bit path (VAES on YMM, with AVX-512VL's 32 registers so two states stay in registers) ---- */

TARGET_VAES static inline void y_update(__m256i S[8], __m256i m0, __m256i m1) {
    __m256i t7 = S[7];
    S[7] = _mm256_aesenc_epi128(S[6], S[7]);
    S[6] = _mm256_aesenc_epi128(S[5], S[6]);
    S[5] = _mm256_aesenc_epi128(S[4], S[5]);
    S[4] = _mm256_aesenc_epi128(S[3], _mm256_xor_si256(S[4], m1));
    S[3] = _mm256_aesenc_epi128(S[2], S[3]);
    S[2] = _mm256_aesenc_epi128(S[1], S[2]);
    S[1] = _mm256_aesenc_epi128(S[0], S[1]);
    S[0] = _mm256_aesenc_epi128(t7, _mm256_xor_si256(S[0], m0));
}

/* The update of a keystream step: the message is zeros (the XORs with it fold away once inlined). */
TARGET_VAES static inline void y_advance(__m256i S[8]) { y_update(S, _mm256_setzero_si256(), _mm256_setzero_si256()); }

TARGET_VAES static void y_init(__m256i S[8], const uint8_t *key, uint64_t segment) {
    const __m256i k = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)key));
    const __m256i n = _mm256_broadcastsi128_si256(_mm_set_epi64x(0, (long long)segment));
    const __m256i c0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)AEGIS_C0));
    const __m256i c1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)AEGIS_C1));
    /* ctx: lane i's block starts with the bytes i, D - 1 (D = 2 lanes). */
    const __m256i ctx = _mm256_set_epi64x(0, 0x0101, 0, 0x0100);
    const __m256i kn = _mm256_xor_si256(k, n);
    S[0] = kn, S[1] = c1, S[2] = c0, S[3] = c1;
    S[4] = kn, S[5] = _mm256_xor_si256(k, c0), S[6] = _mm256_xor_si256(k, c1), S[7] = _mm256_xor_si256(k, c0);
    for (int i = 0; i < 10; i++) {
        S[3] = _mm256_xor_si256(S[3], ctx);
        S[7] = _mm256_xor_si256(S[7], ctx);
        y_update(S, n, k);
    }
}

TARGET_VAES static inline __m256i y_z0(const __m256i S[8]) {
    return _mm256_xor_si256(_mm256_xor_si256(S[6], S[1]), _mm256_and_si256(S[2], S[3]));
}

TARGET_VAES static inline __m256i y_z1(const __m256i S[8]) {
    return _mm256_xor_si256(_mm256_xor_si256(S[2], S[5]), _mm256_and_si256(S[6], S[7]));
}

TARGET_VAES static ALWAYS_INLINE __m256i y_add(__m256i a, __m256i b, const int elem64) {
    return elem64 ? _mm256_add_epi64(a, b) : _mm256_add_epi32(a, b);
}

TARGET_VAES static ALWAYS_INLINE __m256i y_sub(__m256i a, __m256i b, const int elem64) {
    return elem64 ? _mm256_sub_epi64(a, b) : _mm256_sub_epi32(a, b);
}

TARGET_VAES static void y_load(__m256i S[8], const uint8_t *mem) {
    for (int i = 0; i < 8; i++) S[i] = _mm256_loadu_si256((const __m256i *)(mem + 32 * i));
}

TARGET_VAES static void y_store(uint8_t *mem, const __m256i S[8]) {
    for (int i = 0; i < 8; i++) _mm256_storeu_si256((__m256i *)(mem + 32 * i), S[i]);
}

TARGET_VAES static void y_start(uint8_t *state, const uint8_t *key, uint64_t offset) {
    __m256i S[8];
    y_init(S, key, offset / AEGIS_SEGMENT);
    for (uint64_t i = 0; i < offset % AEGIS_SEGMENT / AEGIS_STEP; i++) y_advance(S);
    y_store(state, S);
}

TARGET_VAES static void y_keystream64(uint8_t *state, uint8_t out[64]) {
    __m256i S[8];
    y_load(S, state);
    _mm256_storeu_si256((__m256i *)out, y_z0(S));
    _mm256_storeu_si256((__m256i *)(out + 32), y_z1(S));
    y_advance(S);
    y_store(state, S);
    wipe(S, sizeof S);
}

/* vec[pos, end) (whole updates, inside one segment) += (or -= with `sub`) the keystreams of the state `a`, and of
 * `b` too when `pair` (both with the same sign, so their sum enters the vector in one operation). Inlined with
 * constant `elem64`, `sub` and `pair` into one loop each, so no branch or sign fix-up stays in the loop. */
TARGET_VAES static ALWAYS_INLINE void y_run_impl(uint8_t *vec, size_t pos, size_t end, uint8_t *a, uint8_t *b,
                                                 const int elem64, const int sub, const int pair,
                                                 const uint8_t **warm_p, const uint8_t *warm_end,
                                                 const uint8_t **warm_out_p, const uint8_t *warm_out_end) {
    const uint8_t *warm = *warm_p, *warm_out = *warm_out_p;
    __m256i A[8], B[8];
    y_load(A, a);
    if (pair) y_load(B, b);
    for (size_t i = 0; pos < end; pos += AEGIS_STEP, i++) {
        __m256i *p = (__m256i *)(vec + pos);
        __m256i d0 = y_z0(A), d1 = y_z1(A);
        if (pair) {
            d0 = y_add(d0, y_z0(B), elem64);
            d1 = y_add(d1, y_z1(B), elem64);
        }
        y_advance(A);
        if (pair) y_advance(B);
        WARM_STEP(i);
        __m256i v0 = _mm256_loadu_si256(p), v1 = _mm256_loadu_si256(p + 1);
        _mm256_storeu_si256(p, sub ? y_sub(v0, d0, elem64) : y_add(v0, d0, elem64));
        _mm256_storeu_si256(p + 1, sub ? y_sub(v1, d1, elem64) : y_add(v1, d1, elem64));
    }
    y_store(a, A);
    if (pair) y_store(b, B);
    *warm_p = warm;
    *warm_out_p = warm_out;
}

TARGET_VAES static void y_run(uint8_t *vec, size_t pos, size_t end, uint8_t *a, uint8_t *b, int elem64, int sub,
                              const uint8_t **warm_p, const uint8_t *warm_end, const uint8_t **warm_out_p,
                              const uint8_t *warm_out_end) {
#define Y_RUN(E, S, P) y_run_impl(vec, pos, end, a, b, E, S, P, warm_p, warm_end, warm_out_p, warm_out_end)
    switch ((elem64 ? 4 : 0) | (sub ? 2 : 0) | (b != NULL)) {
    case 0: Y_RUN(0, 0, 0); break;
    case 1: Y_RUN(0, 0, 1); break;
    case 2: Y_RUN(0, 1, 0); break;
    case 3: Y_RUN(0, 1, 1); break;
    case 4: Y_RUN(1, 0, 0); break;
    case 5: Y_RUN(1, 0, 1); break;
    case 6: Y_RUN(1, 1, 0); break;
    default: Y_RUN(1, 1, 1); break;
    }
#undef Y_RUN
}

/* ---- The 128-bit path's primitives on x86-64: AES-NI (every x86-64 CPU since about 2010) ---- */

typedef __m128i v128;
#define TARGET_128 TARGET_AESNI
#define V_XOR _mm_xor_si128
#define V_AND _mm_and_si128
#define V_ZERO _mm_setzero_si128
#define V_LOAD(p) _mm_loadu_si128((const __m128i *)(p))
#define V_STORE(p, v) _mm_storeu_si128((__m128i *)(p), (v))

TARGET_128 static inline v128 v_round(v128 x, v128 rk) { return _mm_aesenc_si128(x, rk); }

/* v + z or v - z, element-wise in the ring of 32- or 64-bit elements. */
TARGET_128 static inline v128 v_ring(v128 v, v128 z, int sub, int elem64) {
    if (elem64) return sub ? _mm_sub_epi64(v, z) : _mm_add_epi64(v, z);
    return sub ? _mm_sub_epi32(v, z) : _mm_add_epi32(v, z);
}

#elif defined(FEDSE_ARM)

/* ---- The 128-bit path's primitives on 64-bit ARM: the Armv8 Cryptographic Extension ---- */

#if defined(__clang__)
#define TARGET_128 __attribute__((target("aes")))
#else
#define TARGET_128 __attribute__((target("+crypto")))
#endif

typedef uint8x16_t v128;
#define V_XOR veorq_u8
#define V_AND vandq_u8
#define V_ZERO() vdupq_n_u8(0)
#define V_LOAD(p) vld1q_u8((const uint8_t *)(p))
#define V_STORE(p, v) vst1q_u8((uint8_t *)(p), (v))

/* AESRound: AESE is AddRoundKey, SubBytes, ShiftRows; with a zero key and AESMC after it, the x86 AESENC
 * without its key, which is added last. */
TARGET_128 static inline v128 v_round(v128 x, v128 rk) { return veorq_u8(vaesmcq_u8(vaeseq_u8(x, V_ZERO())), rk); }

TARGET_128 static inline v128 v_ring(v128 v, v128 z, int sub, int elem64) {
    if (elem64) {
        uint64x2_t a = vreinterpretq_u64_u8(v), b = vreinterpretq_u64_u8(z);
        return vreinterpretq_u8_u64(sub ? vsubq_u64(a, b) : vaddq_u64(a, b));
    }
    uint32x4_t a = vreinterpretq_u32_u8(v), b = vreinterpretq_u32_u8(z);
    return vreinterpretq_u8_u32(sub ? vsubq_u32(a, b) : vaddq_u32(a, b));
}

#endif

#if defined(FEDSE_X86) || defined(FEDSE_ARM)

/* ---- 128-bit path (x86 AES-NI or ARM AES, on the primitives above), the same keystream as the 256-bit one ---- */

typedef struct {
    v128 s[2][8]; /* [lane][block] */
} x_state;

TARGET_128 static inline void x_update(v128 S[8], v128 m0, v128 m1) {
    v128 t7 = S[7];
    S[7] = v_round(S[6], S[7]);
    S[6] = v_round(S[5], S[6]);
    S[5] = v_round(S[4], S[5]);
    S[4] = v_round(S[3], V_XOR(S[4], m1));
    S[3] = v_round(S[2], S[3]);
    S[2] = v_round(S[1], S[2]);
    S[1] = v_round(S[0], S[1]);
    S[0] = v_round(t7, V_XOR(S[0], m0));
}

TARGET_128 static void x_load(x_state *X, const uint8_t *mem) {
    for (int i = 0; i < 8; i++)
        for (int l = 0; l < 2; l++) X->s[l][i] = V_LOAD(mem + 32 * i + 16 * l);
}

TARGET_128 static void x_store(uint8_t *mem, const x_state *X) {
    for (int i = 0; i < 8; i++)
        for (int l = 0; l < 2; l++) V_STORE(mem + 32 * i + 16 * l, X->s[l][i]);
}

TARGET_128 static void x_start(uint8_t *state, const uint8_t *key, uint64_t offset) {
    uint8_t nonce[16] = {0}, ctx_bytes[16] = {0};
    uint64_t segment = offset / AEGIS_SEGMENT;
    for (int i = 0; i < 8; i++) nonce[i] = (uint8_t)(segment >> (8 * i));
    const v128 k = V_LOAD(key), n = V_LOAD(nonce), zero = V_ZERO();
    const v128 c0 = V_LOAD(AEGIS_C0), c1 = V_LOAD(AEGIS_C1);
    x_state X;
    for (int l = 0; l < 2; l++) {
        v128 *S = X.s[l];
        /* ctx: lane l's block starts with the bytes l, D - 1 (D = 2 lanes). */
        ctx_bytes[0] = (uint8_t)l, ctx_bytes[1] = 1;
        const v128 ctx = V_LOAD(ctx_bytes);
        S[0] = V_XOR(k, n), S[1] = c1, S[2] = c0, S[3] = c1;
        S[4] = V_XOR(k, n), S[5] = V_XOR(k, c0), S[6] = V_XOR(k, c1), S[7] = V_XOR(k, c0);
        for (int i = 0; i < 10; i++) {
            S[3] = V_XOR(S[3], ctx);
            S[7] = V_XOR(S[7], ctx);
            x_update(S, n, k);
        }
        for (uint64_t i = 0; i < offset % AEGIS_SEGMENT / AEGIS_STEP; i++) x_update(S, zero, zero);
    }
    x_store(state, &X);
    wipe(&X, sizeof X);
}

/* The next 64 bytes of keystream, as [z0 lane 0, z0 lane 1, z1 lane 0, z1 lane 1]; the state advances. */
TARGET_128 static inline void x_next(x_state *X, v128 z[4]) {
    const v128 zero = V_ZERO();
    for (int l = 0; l < 2; l++) {
        v128 *S = X->s[l];
        z[l] = V_XOR(V_XOR(S[6], S[1]), V_AND(S[2], S[3]));
        z[2 + l] = V_XOR(V_XOR(S[2], S[5]), V_AND(S[6], S[7]));
        x_update(S, zero, zero);
    }
}

TARGET_128 static void x_keystream64(uint8_t *state, uint8_t out[64]) {
    x_state X;
    v128 z[4];
    x_load(&X, state);
    x_next(&X, z);
    for (int j = 0; j < 4; j++) V_STORE(out + 16 * j, z[j]);
    x_store(state, &X);
    wipe(&X, sizeof X);
    wipe(z, sizeof z);
}

TARGET_128 static void x_run(uint8_t *vec, size_t pos, size_t end, uint8_t *a, int sub, int elem64,
                             const uint8_t **warm_p, const uint8_t *warm_end, const uint8_t **warm_out_p,
                             const uint8_t *warm_out_end) {
    const uint8_t *warm = *warm_p, *warm_out = *warm_out_p;
    x_state X;
    v128 z[4];
    x_load(&X, a);
    for (size_t i = 0; pos < end; pos += AEGIS_STEP, i++) {
        x_next(&X, z);
        WARM_STEP(i);
        for (int j = 0; j < 4; j++) {
            uint8_t *p = vec + pos + 16 * j;
            V_STORE(p, v_ring(V_LOAD(p), z[j], sub, elem64));
        }
    }
    x_store(a, &X);
    wipe(&X, sizeof X);
    wipe(z, sizeof z);
    *warm_p = warm;
    *warm_out_p = warm_out;
}

/* A key's state at byte `offset` of its mask, on the 256-bit path (`wide`, x86 only) or the 128-bit one. */
static void start_state(int wide, uint8_t *state, const uint8_t *key, uint64_t offset) {
#ifdef FEDSE_X86
    if (wide) {
        y_start(state, key, offset);
        return;
    }
#endif
    x_start(state, key, offset);
}

/* vec (nbytes, a multiple of the element size) += or -= each key's mask, vec[0] sitting at byte `offset` (a
 * multiple of AEGIS_STEP) of the masks. `states` holds AEGIS_STATE_BYTES of scratch per key. Work is blocked in
 * 16 KiB pieces so every key's pass finds the piece in L1; keys go two at a time on the 256-bit path (the two
 * state updates interleave: 43 GB/s a core against 33-36 for one at a time). Meanwhile `warm` (may be NULL) is
 * prefetched into L2 for reading and `warm_out` (may be NULL) for writing: measured with the CTR kernel over
 * the 10 clients' masking pass, `warm` 137 -> 126 ms, `warm_out` 156-164 -> 141 ms. */
static void add_masks(int wide, uint8_t *vec, size_t nbytes, const uint8_t *keys, const uint8_t *subtract,
                      Py_ssize_t nkeys, uint64_t offset, int elem64, uint8_t *states, const uint8_t *warm,
                      size_t warm_bytes, const uint8_t *warm_out, size_t warm_out_bytes) {
    const uint8_t *warm_end = warm + warm_bytes, *warm_out_end = warm_out + warm_out_bytes;
    const size_t PIECE = 16384, full = nbytes / AEGIS_STEP * AEGIS_STEP;
    for (Py_ssize_t k = 0; k < nkeys; k++) {
        start_state(wide, states + AEGIS_STATE_BYTES * k, keys + 16 * k, offset);
    }
    for (size_t s = 0; s < full; s += PIECE) {
        size_t e = s + PIECE < full ? s + PIECE : full;
        /* A segment may end inside the piece: run up to it, start the next segment's states, go on. */
        for (size_t pos = s; pos < e;) {
            uint64_t at = offset + pos;
            if (pos > 0 && at % AEGIS_SEGMENT == 0)
                for (Py_ssize_t k = 0; k < nkeys; k++)
                    start_state(wide, states + AEGIS_STATE_BYTES * k, keys + 16 * k, at);
            size_t to_boundary = (size_t)(AEGIS_SEGMENT - at % AEGIS_SEGMENT);
            size_t stop = e - pos < to_boundary ? e : pos + to_boundary;
            if (!wide) {
                for (Py_ssize_t k = 0; k < nkeys; k++)
                    x_run(vec, pos, stop, states + AEGIS_STATE_BYTES * k, subtract[k], elem64, &warm, warm_end,
                          &warm_out, warm_out_end);
            } else {
#ifdef FEDSE_X86
                /* Two keys of the same sign at a time; a key left without a partner of its sign goes alone. */
                for (int sign = 0; sign < 2; sign++) {
                    Py_ssize_t waiting = -1;
                    for (Py_ssize_t k = 0; k < nkeys; k++) {
                        if ((subtract[k] != 0) != sign) continue;
                        if (waiting < 0) {
                            waiting = k;
                            continue;
                        }
                        y_run(vec, pos, stop, states + AEGIS_STATE_BYTES * waiting, states + AEGIS_STATE_BYTES * k,
                              elem64, sign, &warm, warm_end, &warm_out, warm_out_end);
                        waiting = -1;
                    }
                    if (waiting >= 0)
                        y_run(vec, pos, stop, states + AEGIS_STATE_BYTES * waiting, NULL, elem64, sign, &warm,
                              warm_end, &warm_out, warm_out_end);
                }
#endif
            }
            pos = stop;
        }
    }
    if (full < nbytes) {
        /* The last, partial update: its keystream through a buffer, added element by element. */
        uint8_t ks[64];
        uint64_t at = offset + full;
        for (Py_ssize_t k = 0; k < nkeys; k++) {
            uint8_t *st = states + AEGIS_STATE_BYTES * k;
            if (full > 0 && at % AEGIS_SEGMENT == 0) start_state(wide, st, keys + 16 * k, at);
#ifdef FEDSE_X86
            if (wide)
                y_keystream64(st, ks);
            else
#endif
                x_keystream64(st, ks);
            uint8_t *p = vec + full;
            size_t tail = nbytes - full;
            if (elem64) {
                for (size_t i = 0; i < tail; i += 8) {
                    uint64_t v, w;
                    memcpy(&v, p + i, 8);
                    memcpy(&w, ks + i, 8);
                    v = subtract[k] ? v - w : v + w;
                    memcpy(p + i, &v, 8);
                }
            } else {
                for (size_t i = 0; i < tail; i += 4) {
                    uint32_t v, w;
                    memcpy(&v, p + i, 4);
                    memcpy(&w, ks + i, 4);
                    v = subtract[k] ? v - w : v + w;
                    memcpy(p + i, &v, 4);
                }
            }
        }
        wipe(ks, sizeof ks);
    }
}

#endif

#ifdef FEDSE_X86

/* 2: VAES and AVX-512VL (the 256-bit path); 1: AES-NI (the 128-bit path); 0: neither. */
static int mask_level(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("aes")) return 0;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("vaes"))
        return 2;
    return 1;
}

static int cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("aes") && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("vaes");
}

/* out[i] = rint(clamp(x[i], -c, c) * scale) as int32, round half to even: numpy's
 * rint(clip(x, -c, c) * scale).astype(int32) in float32. Counts the values outside [-c, c] and the NaN/Inf ones
 * (the caller raises on any NaN/Inf: `out` is then unspecified). */
TARGET_VAES static void quantise_f32_i32_avx512(const float *x, int32_t *out, size_t n, float c, float scale,
                                                 size_t *clipped, size_t *nonfinite) {
    const __m512 vc = _mm512_set1_ps(c), vnc = _mm512_set1_ps(-c), vs = _mm512_set1_ps(scale);
    const __m512 inf = _mm512_set1_ps(__builtin_inff());
    const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
    size_t out_of_range = 0, bad = 0;
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
        __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        __m512 a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), absmask));
        __mmask16 inside = _mm512_mask_cmp_ps_mask(m, a, vc, _CMP_LE_OQ);     /* false for NaN */
        __mmask16 finite = _mm512_mask_cmp_ps_mask(m, a, inf, _CMP_LT_OQ);    /* false for NaN and Inf */
        if (inside != m) {
            out_of_range += (size_t)__builtin_popcount((unsigned)(finite & (__mmask16)~inside));
            bad += (size_t)__builtin_popcount((unsigned)(m & (__mmask16)~finite));
        }
        __m512 q = _mm512_mul_ps(_mm512_min_ps(_mm512_max_ps(v, vnc), vc), vs);
        _mm512_mask_storeu_epi32(out + i, m,
                                 _mm512_cvt_roundps_epi32(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    *clipped = out_of_range;
    *nonfinite = bad;
}

/* out[i] = (double)v[i] * scale for int32 v, and the smallest and largest v: the server's release of an unmasked
 * chunk (numpy's int32 -> float64 multiply goes through a buffered cast, and min and max are two more passes).
 * A power-of-two scale makes every product exact, so this is bit-identical to numpy's. Measured in the 10 x 8M
 * round: 15 -> 13 ms, the rest being the first writes to the fresh 64 MB result. Streaming stores were no
 * faster. */
TARGET_VAES static void dequantise_i32_f64_avx512(const int32_t *v, double *out, size_t n, double scale,
                                                  int32_t *lo_out, int32_t *hi_out) {
    const __m512d vs = _mm512_set1_pd(scale);
    __m512i lo = _mm512_set1_epi32(INT32_MAX), hi = _mm512_set1_epi32(INT32_MIN);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i x = _mm512_loadu_si512(v + i);
        lo = _mm512_min_epi32(lo, x);
        hi = _mm512_max_epi32(hi, x);
        __m512d a = _mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(x)), vs);
        __m512d b = _mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(x, 1)), vs);
        _mm512_storeu_pd(out + i, a);
        _mm512_storeu_pd(out + i + 8, b);
    }
    int32_t l = _mm512_reduce_min_epi32(lo), h = _mm512_reduce_max_epi32(hi);
    for (; i < n; i++) {
        l = v[i] < l ? v[i] : l;
        h = v[i] > h ? v[i] : h;
        out[i] = (double)v[i] * scale;
    }
    *lo_out = l;
    *hi_out = h;
}

#elif defined(FEDSE_ARM)
static int cpu_supported(void) { return 0; }

/* 1: the Armv8 Cryptographic Extension (the 128-bit path); 0: without it. */
static int mask_level(void) {
#if defined(__APPLE__)
    return 1; /* every Apple arm64 CPU has it */
#elif defined(__linux__) && defined(HWCAP_AES)
    return (getauxval(AT_HWCAP) & HWCAP_AES) ? 1 : 0;
#else
    return 0;
#endif
}
#else
static int cpu_supported(void) { return 0; }
static int mask_level(void) { return 0; }
#endif

static PyObject *supported(PyObject *self, PyObject *unused) { return PyBool_FromLong(cpu_supported()); }

static PyObject *mask_level_py(PyObject *self, PyObject *unused) { return PyLong_FromLong(mask_level()); }

/* add_keystreams(vec, keys, subtract, offset, elem_bytes[, warm[, warm_out[, level]]])
 *   vec: writable C-contiguous buffer of ring elements (uint32 or uint64, little-endian)
 *   keys: bytes, 16 per mask key; subtract: bytes, one 0/1 per key (1: the mask is subtracted)
 *   offset: the byte of the masks at which vec[0] sits (a multiple of 64)
 *   elem_bytes: 4 or 8
 *   warm (optional, may be None): a buffer to bring into L2 while the masks are added (the client passes
 *     the next chunk of its float update, so quantising that chunk does not wait on memory); only read
 *   warm_out (optional, may be None): a buffer to bring into L2 ready to be written (the next chunk of the
 *     vector); only prefetched, never read or written here
 *   level (optional, may be None): 1 or 2, the path to take (tests compare them); default the best this CPU
 *     runs */
static PyObject *add_keystreams(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 5 || nargs > 8) {
        PyErr_SetString(PyExc_TypeError,
                        "add_keystreams(vec, keys, subtract, offset, elem_bytes[, warm[, warm_out[, level]]])");
        return NULL;
    }
    int level = mask_level();
    if (nargs == 8 && args[7] != Py_None) {
        long want = PyLong_AsLong(args[7]);
        if (want == -1 && PyErr_Occurred()) return NULL;
        if (want != 1 && want != 2) {
            PyErr_SetString(PyExc_ValueError, "level must be 1 (AES-NI) or 2 (VAES)");
            return NULL;
        }
        if (want > level) {
            PyErr_SetString(PyExc_RuntimeError, "this CPU cannot run that level");
            return NULL;
        }
        level = (int)want;
    }
    if (level == 0) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU lacks AES-NI; use the numpy reference");
        return NULL;
    }
    unsigned long long offset = PyLong_AsUnsignedLongLong(args[3]);
    if (offset == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    long elem_bytes = PyLong_AsLong(args[4]);
    if (elem_bytes == -1 && PyErr_Occurred()) return NULL;
    if (elem_bytes != 4 && elem_bytes != 8) {
        PyErr_SetString(PyExc_ValueError, "elem_bytes must be 4 or 8");
        return NULL;
    }
    if (offset % AEGIS_STEP != 0) {
        PyErr_SetString(PyExc_ValueError, "offset must be a multiple of 64 bytes");
        return NULL;
    }
    /* vec, keys, subtract, then warm and warm_out where given (not None); each one acquired is released. */
    enum { VEC, KEYS, SUB, WARM, WARM_OUT, NBUF };
    Py_buffer buf[NBUF];
    int held[NBUF] = {0};
    PyObject *result = NULL;
    for (int i = 0; i < NBUF; i++) {
        PyObject *obj = i < WARM ? args[i] : (nargs > i + 2 ? args[i + 2] : Py_None);
        if (i >= WARM && obj == Py_None) continue;
        int flags = i == VEC ? PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS : PyBUF_C_CONTIGUOUS;
        if (PyObject_GetBuffer(obj, &buf[i], flags) < 0) goto done;
        held[i] = 1;
    }
    Py_ssize_t nkeys = buf[KEYS].len / 16;
    if (buf[KEYS].len % 16 != 0 || buf[SUB].len != nkeys) {
        PyErr_SetString(PyExc_ValueError, "keys must be 16 bytes each, with one subtract flag per key");
    } else if (buf[VEC].len % elem_bytes != 0) {
        PyErr_SetString(PyExc_ValueError, "vec's length is not a whole number of ring elements");
    } else if (offset > UINT64_MAX - (uint64_t)buf[VEC].len - AEGIS_STEP) {
        PyErr_SetString(PyExc_OverflowError, "offset out of range");
    } else {
#if defined(FEDSE_X86) || defined(FEDSE_ARM)
        uint8_t *states = NULL;
        if (nkeys > 0 && posix_memalign((void **)&states, 64, (size_t)nkeys * AEGIS_STATE_BYTES) != 0) {
            PyErr_NoMemory();
        } else {
            Py_BEGIN_ALLOW_THREADS
            add_masks(level == 2, (uint8_t *)buf[VEC].buf, (size_t)buf[VEC].len, (const uint8_t *)buf[KEYS].buf,
                      (const uint8_t *)buf[SUB].buf, nkeys, (uint64_t)offset, elem_bytes == 8, states,
                      held[WARM] ? (const uint8_t *)buf[WARM].buf : NULL, held[WARM] ? (size_t)buf[WARM].len : 0,
                      held[WARM_OUT] ? (const uint8_t *)buf[WARM_OUT].buf : NULL,
                      held[WARM_OUT] ? (size_t)buf[WARM_OUT].len : 0);
            Py_END_ALLOW_THREADS
            if (states != NULL) {
                /* The states are key material: do not leave them in freed heap memory. */
                wipe(states, (size_t)nkeys * AEGIS_STATE_BYTES);
                free(states);
            }
            Py_INCREF(Py_None);
            result = Py_None;
        }
#else
        PyErr_SetString(PyExc_RuntimeError, "not built for this CPU; use the numpy reference");
#endif
    }
done:
    for (int i = 0; i < NBUF; i++)
        if (held[i]) PyBuffer_Release(&buf[i]);
    return result;
}

/* The input and output buffers of a kernel call: `in` C-contiguous, `out` writable and C-contiguous. On failure
 * nothing is held and -1 is returned with the Python error set. */
static int get_in_out(PyObject *in_obj, PyObject *out_obj, Py_buffer *in, Py_buffer *out) {
    if (PyObject_GetBuffer(in_obj, in, PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (PyObject_GetBuffer(out_obj, out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(in);
        return -1;
    }
    return 0;
}

/* quantise_f32_i32(x, out, clip, scale) -> (clipped, nonfinite)
 *   x: C-contiguous float32 buffer; out: writable C-contiguous buffer of as many 4-byte ring elements */
static PyObject *quantise_f32_i32(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "quantise_f32_i32(x, out, clip, scale)");
        return NULL;
    }
    if (!cpu_supported()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU lacks AVX-512; use the numpy fallback");
        return NULL;
    }
    double clip = PyFloat_AsDouble(args[2]);
    if (clip == -1.0 && PyErr_Occurred()) return NULL;
    double scale = PyFloat_AsDouble(args[3]);
    if (scale == -1.0 && PyErr_Occurred()) return NULL;
    Py_buffer x, out;
    if (get_in_out(args[0], args[1], &x, &out) < 0) return NULL;
    PyObject *result = NULL;
    if (x.len % 4 != 0 || out.len != x.len) {
        PyErr_SetString(PyExc_ValueError, "x must be float32 and out the same number of 4-byte elements");
    } else {
#ifdef FEDSE_X86
        size_t clipped = 0, nonfinite = 0;
        Py_BEGIN_ALLOW_THREADS
        quantise_f32_i32_avx512((const float *)x.buf, (int32_t *)out.buf, (size_t)x.len / 4, (float)clip,
                                (float)scale, &clipped, &nonfinite);
        Py_END_ALLOW_THREADS
        result = Py_BuildValue("(nn)", (Py_ssize_t)clipped, (Py_ssize_t)nonfinite);
#else
        PyErr_SetString(PyExc_RuntimeError, "not built for this CPU; use the numpy fallback");
#endif
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return result;
}

/* dequantise_i32_f64(v, out, scale) -> (min, max)
 *   v: C-contiguous buffer of int32 (a signed reading of 32-bit ring elements), at least one element;
 *   out: writable C-contiguous buffer of as many float64 */
static PyObject *dequantise_i32_f64(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "dequantise_i32_f64(v, out, scale)");
        return NULL;
    }
    if (!cpu_supported()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU lacks AVX-512; use the numpy fallback");
        return NULL;
    }
    double scale = PyFloat_AsDouble(args[2]);
    if (scale == -1.0 && PyErr_Occurred()) return NULL;
    Py_buffer v, out;
    if (get_in_out(args[0], args[1], &v, &out) < 0) return NULL;
    PyObject *result = NULL;
    if (v.len % 4 != 0 || v.len == 0 || out.len != 2 * v.len) {
        PyErr_SetString(PyExc_ValueError, "v must hold at least one int32 and out as many float64");
    } else {
#ifdef FEDSE_X86
        int32_t lo = 0, hi = 0;
        Py_BEGIN_ALLOW_THREADS
        dequantise_i32_f64_avx512((const int32_t *)v.buf, (double *)out.buf, (size_t)v.len / 4, scale, &lo, &hi);
        Py_END_ALLOW_THREADS
        result = Py_BuildValue("(ii)", (int)lo, (int)hi);
#else
        PyErr_SetString(PyExc_RuntimeError, "not built for this CPU; use the numpy fallback");
#endif
    }
    PyBuffer_Release(&v);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"supported", supported, METH_NOARGS, "Whether this CPU has VAES, AVX512F and AVX512BW."},
    {"mask_level", mask_level_py, METH_NOARGS,
     "The mask path this CPU runs: 2 (VAES, AVX-512VL), 1 (AES-NI) or 0 (neither)."},
    {"add_keystreams", (PyCFunction)(void (*)(void))add_keystreams, METH_FASTCALL,
     "add_keystreams(vec, keys, subtract, offset, elem_bytes[, warm[, warm_out[, level]]]): vec +/-= "
     "AEGIS-128X2 masks."},
    {"quantise_f32_i32", (PyCFunction)(void (*)(void))quantise_f32_i32, METH_FASTCALL,
     "quantise_f32_i32(x, out, clip, scale) -> (clipped, nonfinite): out = rint(clip(x) * scale) as int32."},
    {"dequantise_i32_f64", (PyCFunction)(void (*)(void))dequantise_i32_f64, METH_FASTCALL,
     "dequantise_i32_f64(v, out, scale) -> (min, max): out = v * scale as float64, with v's extremes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels",
                                    "Kernels of masking: AEGIS-128X2 masks; with AVX-512, quantisation and release.",
                                    -1,
                                    methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
