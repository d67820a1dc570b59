"""A linear over packed 4/8-bit weights for a few rows (decode) on CPU: a C kernel that reads the codes.

Decode multiplies one token per sequence by every weight of the model: the step is bound by the
bytes it streams, so a 4-bit base is worth ~7x fewer bytes only if the kernel reads the packed codes
and never writes a dequantized weight. Measured on a 2-core AVX-512 CPU for every linear of
SmolLM2-135M's layers (210 distinct weights, batch 1; benchmarks/decode_gemv.py): fp32 ``F.linear``
34 ms; inductor's generated dequant-reduction 34 ms (int4), 124 ms (NF4: a code-table gather), 9 ms
(int8); torch's packed ops 99 ms (``_weight_int4pack_mm_for_cpu``), 46 ms (``_weight_int8pack_mm``);
this kernel 6.9 ms (int4), 6.8 ms (NF4), 5.3 ms (int8).

    y[m, n] = sum_k x[m, k] W[n, k]      x (M, K) fp32, M <= MAX_ROWS; W (N, K) packed as
                                         kernels/quant_formats.py stores it:
    int4  groups of ``block`` along a row, block/2 bytes each, byte j = q[j] | q[j + block/2] << 4
          (GGUF's Q4_1 for block 32); w = q * d[g] + m[g], d and m fp16. sum_g d_g (x_g . q_g) + m_g sum(x_g).
    nf4   byte i of a row = codes 2i (high nibble) | 2i + 1 (low); w = code[q] * absmax[block], absmax
          fp32 or (double quantization) int8 * step[block / 256] + mean, resolved per block in the loop.
    int8  w = q * step[n].
    int8g w = q * d[n, group] (fp16 per group of ``block``: GGUF's Q8_0 for block 32).

    and the LoRA linear's rest in the same call: y += bias + s (x A^T) B^T, h = x A^T returned.

The C source below is compiled once per machine by the system C compiler (``$CC``, else ``cc``;
inductor needs one on CPU anyway) with ``-O3 -march=native -fopenmp`` into the peftc cache
(``$PEFTC_CACHE_DIR``, else ``~/.cache/peftc``), keyed by the source, the flags, the compiler and the
CPU's features.
Each weight row is read once and used for all M rows while it sits in L1; rows are split over
``torch.get_num_threads()`` OpenMP threads. Without a compiler ``status()`` says why and
quant_linear dequantizes per call instead (its summary line names which path runs).

    >>> y, h = packed_linear(x2, (data, qscale, qscale2, qoffset), "int4", 32, bias, A, B, 2.0)  # or None
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

from peftc.kernels.quant_formats import NF4_CODE

__all__ = ["MAX_ROWS", "packed_linear", "status", "C_SOURCE"]

MAX_ROWS = 16  # above this a dequantized temporary + GEMM is cheaper per row than re-reading codes

C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* The epilogue every format shares: h = x A^T (M, R) before the rows, then per output
   y[m, n] += bias[n] + s * B[n, :] . h[m, :]. A (R, K), B (N, R), bias (N) may be null. */
typedef struct { const float *bias, *A, *B; int R; float s; float *h; } epi_t;

static void low_rank_h(const float *x, int M, int K, const epi_t *e) {
    if (!e->A) return;
    for (int m = 0; m < M; m++)
        for (int r = 0; r < e->R; r++) {
            const float *xr = x + (size_t)m * K, *ar = e->A + (size_t)r * K;
            float a = 0.f;
#pragma omp simd reduction(+ : a)
            for (int k = 0; k < K; k++) a += xr[k] * ar[k];
            e->h[(size_t)m * e->R + r] = a;
        }
}

static inline float epilogue(const epi_t *e, int m, int n) {
    float v = e->bias ? e->bias[n] : 0.f;
    if (e->A) {
        float l = 0.f;
#pragma omp simd reduction(+ : l)
        for (int r = 0; r < e->R; r++) l += e->B[(size_t)n * e->R + r] * e->h[(size_t)m * e->R + r];
        v += e->s * l;
    }
    return v;
}

void peftc_gemv_int4(const float *x, int M, int K, int N, const uint8_t *q, const _Float16 *d,
                     const _Float16 *mn, int B, float *y, int threads, const epi_t *e) {
    low_rank_h(x, M, K, e);
    const int G = K / B, hb = B / 2;
    float *xs = (float *)malloc(sizeof(float) * (size_t)M * G);  /* sum of x per group */
    for (int m = 0; m < M; m++)
        for (int g = 0; g < G; g++) {
            float s = 0.f;
            for (int j = 0; j < B; j++) s += x[(size_t)m * K + g * B + j];
            xs[(size_t)m * G + g] = s;
        }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *qr = q + (size_t)n * (K / 2);
        const _Float16 *dr = d + (size_t)n * G, *mr = mn + (size_t)n * G;
        for (int m = 0; m < M; m++) {
            const float *xr = x + (size_t)m * K, *sr = xs + (size_t)m * G;
            float acc = 0.f, off = 0.f;
#ifdef __AVX512F__
            if (hb % 16 == 0) {
                const __m512i low = _mm512_set1_epi32(15);
                __m512 a = _mm512_setzero_ps();
                for (int g = 0; g < G; g++) {
                    __m512 s = _mm512_setzero_ps();
                    for (int j = 0; j < hb; j += 16) {
                        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qr + g * hb + j)));
                        s = _mm512_fmadd_ps(_mm512_loadu_ps(xr + g * B + j),
                                            _mm512_cvtepi32_ps(_mm512_and_si512(v, low)), s);
                        s = _mm512_fmadd_ps(_mm512_loadu_ps(xr + g * B + hb + j),
                                            _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), s);
                    }
                    a = _mm512_fmadd_ps(s, _mm512_set1_ps((float)dr[g]), a);
                    off += (float)mr[g] * sr[g];
                }
                y[(size_t)m * N + n] = _mm512_reduce_add_ps(a) + off + epilogue(e, m, n);
                continue;
            }
#endif
            for (int g = 0; g < G; g++) {
                const uint8_t *qg = qr + g * hb;
                const float *xg = xr + g * B;
                float s = 0.f;
                for (int j = 0; j < hb; j++)
                    s += xg[j] * (float)(qg[j] & 15) + xg[hb + j] * (float)(qg[j] >> 4);
                acc += s * (float)dr[g];
                off += (float)mr[g] * sr[g];
            }
            y[(size_t)m * N + n] = acc + off + epilogue(e, m, n);
        }
    }
    free(xs);
}

/* absmax of block b: qs (fp32) or, double quantized, qs (int8) * s2[b / 256] + *off */
static inline float nf4_absmax(const void *qs, const float *s2, const float *off, int dq, size_t b) {
    return dq ? (float)((const int8_t *)qs)[b] * s2[b / 256] + *off : ((const float *)qs)[b];
}

void peftc_gemv_nf4(const float *x, int M, int K, int N, const uint8_t *q, const void *qs, const float *s2,
                    const float *off, int dq, int B, const float *code, float *y, int threads, const epi_t *e) {
    low_rank_h(x, M, K, e);
    const int nb = K / B, hb = B / 2, h = K / 2;
    float *xe = (float *)malloc(sizeof(float) * (size_t)M * K), *xo = xe + (size_t)M * h;
    for (int m = 0; m < M; m++)  /* x's even / odd columns: the high / low nibbles' partners */
        for (int j = 0; j < h; j++) {
            xe[(size_t)m * h + j] = x[(size_t)m * K + 2 * j];
            xo[(size_t)m * h + j] = x[(size_t)m * K + 2 * j + 1];
        }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *qr = q + (size_t)n * h;
        const size_t b0 = (size_t)n * nb;
        for (int m = 0; m < M; m++) {
            const float *er = xe + (size_t)m * h, *od = xo + (size_t)m * h;
#ifdef __AVX512F__
            if (hb % 16 == 0) {
                const __m512 lut = _mm512_loadu_ps(code);
                const __m512i low = _mm512_set1_epi32(15);
                __m512 a = _mm512_setzero_ps();
                for (int b = 0; b < nb; b++) {
                    __m512 s = _mm512_setzero_ps();
                    for (int j = b * hb; j < (b + 1) * hb; j += 16) {
                        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qr + j)));
                        s = _mm512_fmadd_ps(_mm512_loadu_ps(er + j), _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut), s);
                        s = _mm512_fmadd_ps(_mm512_loadu_ps(od + j), _mm512_permutexvar_ps(_mm512_and_si512(v, low), lut), s);
                    }
                    a = _mm512_fmadd_ps(s, _mm512_set1_ps(nf4_absmax(qs, s2, off, dq, b0 + b)), a);
                }
                y[(size_t)m * N + n] = _mm512_reduce_add_ps(a) + epilogue(e, m, n);
                continue;
            }
#endif
            float acc = 0.f;
            for (int b = 0; b < nb; b++) {
                float s = 0.f;
                for (int j = b * hb; j < (b + 1) * hb; j++)
                    s += er[j] * code[qr[j] >> 4] + od[j] * code[qr[j] & 15];
                acc += s * nf4_absmax(qs, s2, off, dq, b0 + b);
            }
            y[(size_t)m * N + n] = acc + epilogue(e, m, n);
        }
    }
    free(xe);
}

void peftc_gemv_int8(const float *x, int M, int K, int N, const int8_t *q, const float *step, float *y,
                     int threads, const epi_t *e) {
    low_rank_h(x, M, K, e);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const int8_t *qr = q + (size_t)n * K;
        for (int m = 0; m < M; m++) {
            const float *xr = x + (size_t)m * K;
            float acc = 0.f;
            int k = 0;
#ifdef __AVX512F__
            __m512 a = _mm512_setzero_ps();
            for (; k + 16 <= K; k += 16)
                a = _mm512_fmadd_ps(_mm512_loadu_ps(xr + k),
                                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qr + k)))), a);
            acc = _mm512_reduce_add_ps(a);
#endif
            for (; k < K; k++) acc += xr[k] * (float)qr[k];
            y[(size_t)m * N + n] = acc * step[n] + epilogue(e, m, n);
        }
    }
}

void peftc_gemv_int8g(const float *x, int M, int K, int N, const int8_t *q, const _Float16 *d, int B,
                      float *y, int threads, const epi_t *e) {
    low_rank_h(x, M, K, e);
    const int G = K / B;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const int8_t *qr = q + (size_t)n * K;
        const _Float16 *dr = d + (size_t)n * G;
        for (int m = 0; m < M; m++) {
            const float *xr = x + (size_t)m * K;
            float acc = 0.f;
            for (int g = 0; g < G; g++) {
                const float *xg = xr + (size_t)g * B;
                const int8_t *qg = qr + (size_t)g * B;
                float a = 0.f;
#pragma omp simd reduction(+ : a)
                for (int j = 0; j < B; j++) a += xg[j] * (float)qg[j];
                acc += a * (float)dr[g];
            }
            y[(size_t)m * N + n] = acc + epilogue(e, m, n);
        }
    }
}
"""

_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
_P, _I = ctypes.c_void_p, ctypes.c_int


class _Epilogue(ctypes.Structure):
    _fields_ = [("bias", _P), ("A", _P), ("B", _P), ("R", _I), ("s", ctypes.c_float), ("h", _P)]


_E = ctypes.POINTER(_Epilogue)
_SIGNATURES = {
    "peftc_gemv_int4": [_P, _I, _I, _I, _P, _P, _P, _I, _P, _I, _E],
    "peftc_gemv_nf4": [_P, _I, _I, _I, _P, _P, _P, _P, _I, _I, _P, _P, _I, _E],
    "peftc_gemv_int8": [_P, _I, _I, _I, _P, _P, _P, _I, _E],
    "peftc_gemv_int8g": [_P, _I, _I, _I, _P, _P, _I, _P, _I, _E],
}


def _cache_dir() -> Path:
    root = os.environ.get("PEFTC_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peftc"
    return Path(root) / "kernels"


def _compile(cc: str, flags, out: Path) -> None:
    """Source -> shared library at ``out``, written under a temporary name and renamed (a concurrent
    process compiling the same key sees a whole file or none)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, lib = Path(tmp) / "quant_gemv.c", Path(tmp) / out.name
        src.write_text(C_SOURCE)
        subprocess.run([cc, *flags, str(src), "-o", str(lib)], check=True, capture_output=True, text=True,
                       timeout=120)
        os.replace(lib, out)


def _cpu() -> str:
    """What ``-march=native`` compiles for: a library built on one CPU must not load on another
    (a shared home directory), so the CPU's feature flags are part of the cache key."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded kernel library, "") or (None, why not): compiled on first use, then from the cache."""
    if os.environ.get("PEFTC_NO_C_KERNELS"):
        return None, "PEFTC_NO_C_KERNELS is set"
    cc = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"no C compiler ({cc}: {e})"
    last = ""
    for flags in (_FLAGS, tuple(f for f in _FLAGS if f != "-fopenmp")):  # OpenMP missing: one thread
        key = hashlib.sha256("\0".join((C_SOURCE, version, _cpu(), *flags)).encode()).hexdigest()[:16]
        path = _cache_dir() / f"quant_gemv-{key}.so"
        try:
            if not path.is_file():
                _compile(cc, flags, path)
            lib = ctypes.CDLL(str(path))
        except (OSError, subprocess.SubprocessError) as e:
            last = getattr(e, "stderr", None) or str(e)
            continue
        for name, args in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, None
        return lib, ""
    return None, f"{cc} could not build it: {last.strip().splitlines()[-1] if last.strip() else 'unknown error'}"


def status() -> str:
    """One line for summaries: which path a small-batch quantized linear takes on CPU."""
    lib, why = _library()
    return "packed C kernel (reads the codes)" if lib is not None else f"dequantize per call ({why})"


@functools.cache
def _nf4_table() -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32)


def packed_linear(x2: torch.Tensor, q, fmt: str, block_size: int, bias=None, lora_A=None, lora_B=None,
                  scale: float = 1.0):
    """(y, h): y = x2 W^T [+ bias] [+ scale (x2 A^T) B^T] for a packed ``q = (data, qscale, qscale2,
    qoffset)``, h = x2 A^T (empty without LoRA), fp32; None when the kernel does not apply (not CPU, more
    than MAX_ROWS rows, no library) so the caller dequantizes instead. Bias and adapters in another float
    dtype are read in fp32 (h comes back in the adapters' dtype)."""
    if x2.device.type != "cpu" or not 0 < x2.shape[0] <= MAX_ROWS:
        return None
    lib, _ = _library()
    if lib is None:
        return None
    data, qscale, qscale2, qoffset = (t.contiguous() for t in q)
    want = {"int4": (torch.uint8, torch.float16), "nf4": (torch.uint8, None), "int8": (torch.int8, torch.float32),
            "int8g": (torch.int8, torch.float16)}
    if fmt not in want:
        raise ValueError(f"packed_linear: format {fmt!r}, want one of {sorted(want)}")
    if data.dtype != want[fmt][0] or want[fmt][1] not in (None, qscale.dtype):
        raise ValueError(f"packed_linear: a {fmt} weight stores {want[fmt][0]} codes and {want[fmt][1]} scales "
                         f"(kernels/quant_formats.py); got {data.dtype} and {qscale.dtype}")
    x2, bias, a, b = (t if t is None else t.to(torch.float32).contiguous() for t in (x2, bias, lora_A, lora_B))
    epi = _Epilogue(None if bias is None else bias.data_ptr(), None if a is None else a.data_ptr(),
                    None if b is None else b.data_ptr(), 0, float(scale), None)
    m, k = x2.shape
    n = data.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    h = y.new_empty(0) if a is None else y.new_empty(m, a.shape[0])
    if a is not None:
        epi.R, epi.h = a.shape[0], h.data_ptr()
    threads, ref = torch.get_num_threads(), ctypes.byref(epi)
    if fmt == "int4":  # (nf4: qscale int8 with double quantization, else fp32; the kernel reads either)
        lib.peftc_gemv_int4(x2.data_ptr(), m, k, n, data.data_ptr(), qscale.data_ptr(), qoffset.data_ptr(),
                            block_size, y.data_ptr(), threads, ref)
    elif fmt == "nf4":
        dq = qscale2.numel() > 0
        lib.peftc_gemv_nf4(x2.data_ptr(), m, k, n, data.data_ptr(), qscale.data_ptr(),
                           qscale2.data_ptr() if dq else None, qoffset.data_ptr() if dq else None, int(dq),
                           block_size, _nf4_table().data_ptr(), y.data_ptr(), threads, ref)
    elif fmt == "int8":
        lib.peftc_gemv_int8(x2.data_ptr(), m, k, n, data.data_ptr(), qscale.data_ptr(), y.data_ptr(), threads, ref)
    elif fmt == "int8g":
        lib.peftc_gemv_int8g(x2.data_ptr(), m, k, n, data.data_ptr(), qscale.data_ptr(), block_size, y.data_ptr(),
                             threads, ref)
    return y, h if lora_A is None else h.to(lora_A.dtype)
