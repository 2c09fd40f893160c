/* The hot loops of masking, with AVX-512: quantising a float32 chunk into the 32-bit ring, adding AES-128-CTR
 * keystreams to (or subtracting them from) a ring vector in one pass with VAES, and the server's release of the
 * unmasked sum as float64 with its range check.
 *
 * Why this exists: masking a client's update adds one keystream per neighbour plus its self mask, and the
 * server regenerates the self masks. Through the `cryptography` package each keystream is written to a scratch
 * buffer (OpenSSL's AES-NI CTR, ~11 GB/s on one core here) and then added by numpy: that was most of the
 * masking round. Here the keystream never leaves registers: 4 x 4 AES blocks are encrypted at once with 512-bit
 * VAES and added to the vector while it sits in L1.
 *
 * The keystream is exactly the `cryptography` package's AES-128 in CTR mode with an all-zero 16-byte initial
 * counter block (a 128-bit big-endian counter), read as little-endian uint32 or uint64 ring elements; tests
 * compare the two byte for byte (tests/test_secagg_primitives.py). AES-NI/VAES run in constant time.
 *
 * Only x86-64 with VAES, AVX512F and AVX512BW is accelerated; `supported()` says whether this CPU qualifies,
 * and fedse_secure/secagg/masking/prg.py falls back to `cryptography` + numpy otherwise.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FEDSE_X86 1
#include <immintrin.h>
#endif

/* Zeroes key material in a way the compiler may not drop as a dead store. */
static void wipe(void *p, size_t n) {
    volatile uint8_t *z = (volatile uint8_t *)p;
    while (n--) *z++ = 0;
}

#ifdef FEDSE_X86

#define KEY_STEP(rk, i, rcon)                                                         \
    do {                                                                             \
        __m128i t_ = _mm_shuffle_epi32(_mm_aeskeygenassist_si128(k, rcon), 0xff);    \
        k = _mm_xor_si128(k, _mm_slli_si128(k, 4));                                  \
        k = _mm_xor_si128(k, _mm_slli_si128(k, 4));                                  \
        k = _mm_xor_si128(k, _mm_slli_si128(k, 4));                                  \
        k = _mm_xor_si128(k, t_);                                                    \
        rk[i] = k;                                                                   \
    } while (0)

/* FIPS-197 AES-128 key expansion. */
__attribute__((target("aes,sse2"))) static void expand_key(const uint8_t *key, __m128i rk[11]) {
    __m128i k = _mm_loadu_si128((const __m128i *)key);
    rk[0] = k;
    KEY_STEP(rk, 1, 0x01);
    KEY_STEP(rk, 2, 0x02);
    KEY_STEP(rk, 3, 0x04);
    KEY_STEP(rk, 4, 0x08);
    KEY_STEP(rk, 5, 0x10);
    KEY_STEP(rk, 6, 0x20);
    KEY_STEP(rk, 7, 0x40);
    KEY_STEP(rk, 8, 0x80);
    KEY_STEP(rk, 9, 0x1b);
    KEY_STEP(rk, 10, 0x36);
}

typedef struct {
    __m512i rk[11];
} round_keys;

#define TARGET_VAES __attribute__((target("avx512f,avx512bw,vaes,aes,prfchw")))

/* Each round key broadcast to the four 128-bit lanes of a 512-bit register. */
TARGET_VAES static void load_key(const uint8_t *key, round_keys *out) {
    __m128i rk[11];
    expand_key(key, rk);
    for (int r = 0; r < 11; r++) out->rk[r] = _mm512_broadcast_i32x4(rk[r]);
    wipe(rk, sizeof rk);
}

/* Four 128-bit lanes of counters in little-endian form (low qword = block index, high qword = 0), byte-swapped
 * per lane into the big-endian 128-bit counter blocks CTR mode encrypts. */
TARGET_VAES static inline __m512i encrypt4(__m512i ctr_le, const __m512i *rk, __m512i bswap) {
    __m512i x = _mm512_xor_si512(_mm512_shuffle_epi8(ctr_le, bswap), rk[0]);
    for (int r = 1; r < 10; r++) x = _mm512_aesenc_epi128(x, rk[r]);
    return _mm512_aesenclast_epi128(x, rk[10]);
}

TARGET_VAES static inline __m512i ring_op(__m512i v, __m512i ks, int subtract, int elem64) {
    if (elem64) return subtract ? _mm512_sub_epi64(v, ks) : _mm512_add_epi64(v, ks);
    return subtract ? _mm512_sub_epi32(v, ks) : _mm512_add_epi32(v, ks);
}

/* 8 registers of 4 blocks in flight: AES rounds have a latency of several cycles. On the 2-core EPYC box, 4 in
 * flight made 26-31 GB/s of keystream and 8 make 39-40. */
#define WIDE 8
#define WIDE_BYTES (64 * WIDE)

/* vec (nbytes, a multiple of the element size) += or -= each key's keystream, the keystream starting at
 * counter block `first_block`. Work is blocked in 16 KiB pieces so every key's pass finds the piece in L1.
 * Meanwhile `warm` (warm_bytes, may be NULL) is prefetched into L2 for reading and `warm_out` (warm_out_bytes, may
 * be NULL) for writing, two lines of each a step: the AES rounds are compute-bound, so the memory traffic
 * overlaps them for free. Measured over the 10 clients' masking pass, 10 x 8M parameters: `warm` 137 -> 126 ms;
 * `warm_out`, whose first writes then find their lines in cache, 156-164 -> 141 ms. A prefetch never faults, so
 * the last one may run past its buffer harmlessly. */
TARGET_VAES static void add_keystreams_vaes(uint8_t *vec, size_t nbytes, const round_keys *keys,
                                            const uint8_t *subtract, Py_ssize_t nkeys, uint64_t first_block,
                                            int elem64, const uint8_t *warm, size_t warm_bytes,
                                            const uint8_t *warm_out, size_t warm_out_bytes) {
    const uint8_t *warm_end = warm + warm_bytes, *warm_out_end = warm_out + warm_out_bytes;
    const __m512i bswap = _mm512_broadcast_i32x4(
        _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512i step4 = _mm512_set_epi64(0, 4, 0, 4, 0, 4, 0, 4);
    const size_t PIECE = 16384; /* a multiple of WIDE_BYTES */
    for (size_t s = 0; s < nbytes; s += PIECE) {
        size_t e = s + PIECE < nbytes ? s + PIECE : nbytes;
        uint64_t b0 = first_block + s / 16;
        size_t full = (e - s) / WIDE_BYTES * WIDE_BYTES;
        size_t quads = (e - s - full) / 64; /* then 64 at a time */
        size_t tail = e - s - full - quads * 64;
        for (Py_ssize_t k = 0; k < nkeys; k++) {
            const __m512i *rk = keys[k].rk;
            const int sub = subtract[k];
            __m512i ctr = _mm512_set_epi64(0, (long long)(b0 + 3), 0, (long long)(b0 + 2), 0,
                                           (long long)(b0 + 1), 0, (long long)b0);
            uint8_t *p = vec + s;
            for (size_t j = 0; j < full; j += WIDE_BYTES, p += WIDE_BYTES) {
                __m512i x[WIDE];
#pragma GCC unroll 8
                for (int w = 0; w < WIDE; w++) {
                    x[w] = _mm512_xor_si512(_mm512_shuffle_epi8(ctr, bswap), rk[0]);
                    ctr = _mm512_add_epi64(ctr, step4);
                }
                /* Two lines a step into L2 while the AES rounds keep the core busy. */
                if (warm < warm_end) {
                    _mm_prefetch((const char *)warm, _MM_HINT_T1);
                    _mm_prefetch((const char *)warm + 64, _MM_HINT_T1);
                    warm += 128;
                }
                if (warm_out < warm_out_end) {
                    __builtin_prefetch(warm_out, 1, 2);
                    __builtin_prefetch(warm_out + 64, 1, 2);
                    warm_out += 128;
                }
#pragma GCC unroll 9
                for (int r = 1; r < 10; r++) {
#pragma GCC unroll 8
                    for (int w = 0; w < WIDE; w++) x[w] = _mm512_aesenc_epi128(x[w], rk[r]);
                }
#pragma GCC unroll 8
                for (int w = 0; w < WIDE; w++) {
                    x[w] = _mm512_aesenclast_epi128(x[w], rk[10]);
                    uint8_t *q = p + 64 * w;
                    _mm512_storeu_si512(q, ring_op(_mm512_loadu_si512(q), x[w], sub, elem64));
                }
            }
            for (size_t q = 0; q < quads; q++, p += 64) {
                __m512i x = encrypt4(ctr, rk, bswap);
                ctr = _mm512_add_epi64(ctr, step4);
                _mm512_storeu_si512(p, ring_op(_mm512_loadu_si512(p), x, sub, elem64));
            }
            if (tail) {
                uint8_t ks[64];
                _mm512_storeu_si512(ks, encrypt4(ctr, rk, bswap));
                if (elem64) {
                    for (size_t i = 0; i < tail; i += 8) {
                        uint64_t v, w;
                        memcpy(&v, p + i, 8);
                        memcpy(&w, ks + i, 8);
                        v = sub ? v - w : v + w;
                        memcpy(p + i, &v, 8);
                    }
                } else {
                    for (size_t i = 0; i < tail; i += 4) {
                        uint32_t v, w;
                        memcpy(&v, p + i, 4);
                        memcpy(&w, ks + i, 4);
                        v = sub ? v - w : v + w;
                        memcpy(p + i, &v, 4);
                    }
                }
                wipe(ks, sizeof ks);
            }
        }
    }
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

#else
static int cpu_supported(void) { return 0; }
#endif

static PyObject *supported(PyObject *self, PyObject *unused) { return PyBool_FromLong(cpu_supported()); }

/* add_keystreams(vec, keys, subtract, first_block, elem_bytes)
 *   vec: writable C-contiguous buffer of ring elements (uint32 or uint64, little-endian)
 *   keys: bytes, 16 per AES-128 key; subtract: bytes, one 0/1 per key (1: the keystream is subtracted)
 *   first_block: the counter block at which vec[0] sits (its byte offset in the stream / 16)
 *   elem_bytes: 4 or 8
 *   warm (optional, may be None): a buffer to bring into L2 while the keystreams are added (the client passes
 *     the next chunk of its float update, so quantising that chunk does not wait on memory); only read
 *   warm_out (optional, may be None): a buffer to bring into L2 ready to be written (the next chunk of the
 *     vector); only prefetched, never read or written here */
static PyObject *add_keystreams(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 5 || nargs > 7) {
        PyErr_SetString(PyExc_TypeError,
                        "add_keystreams(vec, keys, subtract, first_block, elem_bytes[, warm[, warm_out]])");
        return NULL;
    }
    if (!cpu_supported()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU lacks VAES/AVX-512; use the cryptography fallback");
        return NULL;
    }
    unsigned long long first_block = PyLong_AsUnsignedLongLong(args[3]);
    if (first_block == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    long elem_bytes = PyLong_AsLong(args[4]);
    if (elem_bytes == -1 && PyErr_Occurred()) return NULL;
    if (elem_bytes != 4 && elem_bytes != 8) {
        PyErr_SetString(PyExc_ValueError, "elem_bytes must be 4 or 8");
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
    } else if (first_block > UINT64_MAX - (uint64_t)buf[VEC].len / 16 - 4) {
        PyErr_SetString(PyExc_OverflowError, "counter block out of range");
    } else {
#ifdef FEDSE_X86
        round_keys *rks = NULL;
        if (nkeys > 0 && posix_memalign((void **)&rks, 64, (size_t)nkeys * sizeof(round_keys)) != 0) {
            PyErr_NoMemory();
        } else {
            for (Py_ssize_t k = 0; k < nkeys; k++) load_key((const uint8_t *)buf[KEYS].buf + 16 * k, &rks[k]);
            Py_BEGIN_ALLOW_THREADS
            add_keystreams_vaes((uint8_t *)buf[VEC].buf, (size_t)buf[VEC].len, rks, (const uint8_t *)buf[SUB].buf,
                                nkeys, (uint64_t)first_block, elem_bytes == 8,
                                held[WARM] ? (const uint8_t *)buf[WARM].buf : NULL,
                                held[WARM] ? (size_t)buf[WARM].len : 0,
                                held[WARM_OUT] ? (const uint8_t *)buf[WARM_OUT].buf : NULL,
                                held[WARM_OUT] ? (size_t)buf[WARM_OUT].len : 0);
            Py_END_ALLOW_THREADS
            if (rks != NULL) {
                /* Round keys are key material: do not leave them in freed heap memory. */
                wipe(rks, (size_t)nkeys * sizeof(round_keys));
                free(rks);
            }
            Py_INCREF(Py_None);
            result = Py_None;
        }
#else
        PyErr_SetString(PyExc_RuntimeError, "not built for this CPU; use the cryptography fallback");
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
    {"add_keystreams", (PyCFunction)(void (*)(void))add_keystreams, METH_FASTCALL,
     "add_keystreams(vec, keys, subtract, first_block, elem_bytes[, warm[, warm_out]]): vec +/-= AES-128-CTR "
     "keystreams."},
    {"quantise_f32_i32", (PyCFunction)(void (*)(void))quantise_f32_i32, METH_FASTCALL,
     "quantise_f32_i32(x, out, clip, scale) -> (clipped, nonfinite): out = rint(clip(x) * scale) as int32."},
    {"dequantise_i32_f64", (PyCFunction)(void (*)(void))dequantise_i32_f64, METH_FASTCALL,
     "dequantise_i32_f64(v, out, scale) -> (min, max): out = v * scale as float64, with v's extremes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels",
                                    "AVX-512 kernels of masking: quantisation, fused AES-128-CTR masks and the release.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
