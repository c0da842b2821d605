// vllm_armor::sparse24_cpu_linear: y = concat_s A_s (core_s (B_s x)) + bias on x86 CPUs with AVX-512 BF16.
//
// The 2:4 core stays compressed as the checkpoint stores it (docs/FORMAT.md): values (d_out, d_in/2) bf16,
// metadata (d_out, d_in/8) uint8 where bit b of byte m is set when input 8m+b is kept. Four metadata bytes
// are therefore the keep-mask of 32 consecutive inputs, and the 16 values they select are the next 16
// values of the row: one masked expand-load (vpexpandw) gives the 32 dense lanes, one vdpbf16ps multiplies
// them with 32 inputs. Nothing is expanded to memory on the small-M path.
//
// A and B arrive packed once at load (see bd_block) so that a block-diagonal pass adds two columns of a block
// to 16 outputs per vdpbf16ps: no horizontal sums.
//
// Small M (decode): B, core and A are three passes split over the threads vLLM's CPU worker sets
// (at::parallel_for), fp32 accumulation, bf16 between passes (as the factored reference). The core pass keeps
// 16 dot products in registers (rows x inputs = 2x8, 4x4, 8x2 or 16x1) and sums them with one shuffle
// transpose, so every expanded chunk of weights serves up to 8 inputs.
// Large M (prefill, M >= dense_min_m): the same B and A passes; the core decompressed a bounded tile of rows at
// a time into a scratch buffer and multiplied by at::mm (oneDNN/MKL); no dense copy is kept.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using bf16 = at::BFloat16;

inline __mmask32 tail_mask(int64_t n) { return n >= 32 ? 0xFFFFFFFFu : ((1u << n) - 1u); }

inline __m512 dp(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}

// The 32 dense lanes of a full chunk: its 16 kept values (one 256-bit load) expanded by the keep-mask.
inline __m512i expand32(uint32_t mk, const bf16* v) {
#ifdef ARMOR_EXPAND_FROM_MEMORY
  return _mm512_maskz_expandloadu_epi16(mk, v);
#else
  return _mm512_maskz_expand_epi16(mk, _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v))));
#endif
}

inline uint32_t meta_mask(const uint8_t* meta, int64_t bytes) {
  uint32_t mk = 0;
  std::memcpy(&mk, meta, static_cast<size_t>(bytes));
  return mk;
}

// out[r * MT + m] = sum_k core[row0 + r, k] * x[m, k] for R rows of a compressed 2:4 core.
template <int R, int MT>
inline void sparse_tile(const bf16* vals, const uint8_t* meta, int64_t d_in, const bf16* x, int64_t ldx,
                        float* out) {
  __m512 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
  const int64_t vstride = d_in / 2, mstride = d_in / 8;
  int64_t c = 0;
  for (; c + 32 <= d_in; c += 32) {
    __m512i xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = _mm512_loadu_si512(x + m * ldx + c);
    for (int r = 0; r < R; ++r) {
      const __m512i wv = expand32(meta_mask(meta + r * mstride + c / 8, 4), vals + r * vstride + c / 2);
      for (int m = 0; m < MT; ++m) acc[r][m] = dp(acc[r][m], wv, xv[m]);
    }
  }
  if (c < d_in) {  // 8, 16 or 24 inputs left
    const int64_t rem = d_in - c;
    __m512i xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = _mm512_maskz_loadu_epi16(tail_mask(rem), x + m * ldx + c);
    for (int r = 0; r < R; ++r) {
      const uint32_t mk = meta_mask(meta + r * mstride + c / 8, rem / 8);
      const __m512i wv = _mm512_maskz_expandloadu_epi16(mk, vals + r * vstride + c / 2);
      for (int m = 0; m < MT; ++m) acc[r][m] = dp(acc[r][m], wv, xv[m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) out[r * MT + m] = _mm512_reduce_add_ps(acc[r][m]);
}

// Sum of each of 16 vectors, all in one vector: lane 4*(i % 4) + i / 4 holds the sum of a[i] (a transpose by
// shuffles instead of 16 horizontal reductions).
inline __m512 reduce16(const __m512* a) {
  __m512 s[8], t[4], u[2];
  for (int i = 0; i < 8; ++i)
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x88), _mm512_shuffle_ps(u[0], u[1], 0xDD));
}

// 16 dot products of a compressed core, R rows x MT inputs (R * MT == 16): out[r * MT + m] = core[r] . x[m].
template <int R, int MT>
inline void sparse_tile16(const bf16* vals, const uint8_t* meta, int64_t d_in, const bf16* x, int64_t ldx,
                          float* out) {
  static_assert(R * MT == 16, "16 accumulators");
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t vstride = d_in / 2, mstride = d_in / 8;
  int64_t c = 0;
  for (; c + 32 <= d_in; c += 32) {
    __m512i xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = _mm512_loadu_si512(x + m * ldx + c);
    for (int r = 0; r < R; ++r) {
      const __m512i wv = expand32(meta_mask(meta + r * mstride + c / 8, 4), vals + r * vstride + c / 2);
      for (int m = 0; m < MT; ++m) acc[r * MT + m] = dp(acc[r * MT + m], wv, xv[m]);
    }
  }
  if (c < d_in) {  // 8, 16 or 24 inputs left
    const int64_t rem = d_in - c;
    __m512i xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = _mm512_maskz_loadu_epi16(tail_mask(rem), x + m * ldx + c);
    for (int r = 0; r < R; ++r) {
      const uint32_t mk = meta_mask(meta + r * mstride + c / 8, rem / 8);
      const __m512i wv = _mm512_maskz_expandloadu_epi16(mk, vals + r * vstride + c / 2);
      for (int m = 0; m < MT; ++m) acc[r * MT + m] = dp(acc[r * MT + m], wv, xv[m]);
    }
  }
  float lanes[16];
  _mm512_storeu_ps(lanes, reduce16(acc));
  for (int i = 0; i < 16; ++i) out[i] = lanes[4 * (i % 4) + i / 4];
}

// 8 rows x 1 input with two accumulators per row (even and odd chunks), so one input still has 16 independent
// sums in flight over 8 weight streams: out[r] = core[r] . x.
inline void sparse_tile8x1(const bf16* vals, const uint8_t* meta, int64_t d_in, const bf16* x, float* out) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t vstride = d_in / 2, mstride = d_in / 8;
  int64_t c = 0;
  for (; c + 64 <= d_in; c += 64) {
    const __m512i x0 = _mm512_loadu_si512(x + c), x1 = _mm512_loadu_si512(x + c + 32);
    for (int r = 0; r < 8; ++r) {
      const bf16* v = vals + r * vstride + c / 2;
      const uint8_t* mt = meta + r * mstride + c / 8;
      acc[2 * r] = dp(acc[2 * r], expand32(meta_mask(mt, 4), v), x0);
      acc[2 * r + 1] = dp(acc[2 * r + 1], expand32(meta_mask(mt + 4, 4), v + 16), x1);
    }
  }
  for (; c < d_in; c += 32) {  // one chunk of 32, or a tail of 8, 16 or 24
    const int64_t n = std::min<int64_t>(32, d_in - c);
    const __m512i xv = _mm512_maskz_loadu_epi16(tail_mask(n), x + c);
    for (int r = 0; r < 8; ++r) {
      const __m512i wv = _mm512_maskz_expandloadu_epi16(meta_mask(meta + r * mstride + c / 8, n / 8),
                                                        vals + r * vstride + c / 2);
      acc[2 * r] = dp(acc[2 * r], wv, xv);
    }
  }
  float lanes[16];
  _mm512_storeu_ps(lanes, reduce16(acc));
  for (int r = 0; r < 8; ++r) out[r] = lanes[4 * ((2 * r) % 4) + (2 * r) / 4] + lanes[4 * ((2 * r + 1) % 4) + (2 * r + 1) / 4];
}

// Where a pass writes: rows of an (M, ld) bf16 matrix starting at column `col0`, plus an optional bias.
struct Sink {
  bf16* y;
  int64_t ld;
  int64_t col0;
  const bf16* bias;  // indexed by the row of the pass, may be null
};

template <int R, int MT>
inline void store(const float* acc, const Sink& s, int64_t row, int64_t m0) {
  for (int r = 0; r < R; ++r) {
    const float b = s.bias ? static_cast<float>(s.bias[row + r]) : 0.f;
    for (int m = 0; m < MT; ++m) s.y[(m0 + m) * s.ld + s.col0 + row + r] = bf16(acc[r * MT + m] + b);
  }
}

// Rows [row, row + R) of a compressed core against every input: 16 dot products at a time, inputs in tiles of
// 16 / R (8, 4, 2 or 1), so every expanded chunk of weights serves up to 8 inputs from registers.
template <int R>
inline void core_rows16(const bf16* vals, const uint8_t* meta, int64_t d_in, const bf16* x, int64_t ldx,
                        int64_t M, int64_t row, const Sink& s) {
  constexpr int MT = 16 / R;
  float acc[16];
  const bf16* v = vals + row * (d_in / 2);
  const uint8_t* mt = meta + row * (d_in / 8);
  for (int64_t m = 0; m + MT <= M; m += MT) {
    sparse_tile16<R, MT>(v, mt, d_in, x + m * ldx, ldx, acc);
    store<R, MT>(acc, s, row, m);
  }
}

// Rows [r0, r1) of a compressed core: groups of 16 rows take the 16-accumulator tiles (8 inputs per tile while
// 8 are left, then 4, 2, 1); rows past the last full group take one row at a time.
void core_rows(const bf16* vals, const uint8_t* meta, int64_t d_in, const bf16* x, int64_t ldx, int64_t M,
               int64_t r0, int64_t r1, const Sink& s) {
  const int64_t m8 = M / 8 * 8, m4 = m8 + (M - m8) / 4 * 4, m2 = m4 + (M - m4) / 2 * 2;
  int64_t row = r0;
  for (; row + 16 <= r1; row += 16) {
    for (int64_t g = 0; g < 16; g += 2) core_rows16<2>(vals, meta, d_in, x, ldx, m8, row + g, s);
    const Sink s4{s.y + m8 * s.ld, s.ld, s.col0, s.bias};
    for (int64_t g = 0; g < 16; g += 4) core_rows16<4>(vals, meta, d_in, x + m8 * ldx, ldx, m4 - m8, row + g, s4);
    const Sink s2{s.y + m4 * s.ld, s.ld, s.col0, s.bias};
    for (int64_t g = 0; g < 16; g += 8) core_rows16<8>(vals, meta, d_in, x + m4 * ldx, ldx, m2 - m4, row + g, s2);
    const Sink s1{s.y + m2 * s.ld, s.ld, s.col0, s.bias};
    if (M > m2) {
      float acc[8];
      for (int64_t g = 0; g < 16; g += 8) {
        sparse_tile8x1(vals + (row + g) * (d_in / 2), meta + (row + g) * (d_in / 8), d_in, x + m2 * ldx, acc);
        store<8, 1>(acc, s1, row + g, 0);
      }
    }
  }
  for (; row < r1; ++row) {
    for (int64_t m = 0; m < M; ++m) {
      float acc;
      sparse_tile<1, 1>(vals + row * (d_in / 2), meta + row * (d_in / 8), d_in, x + m * ldx, ldx, &acc);
      store<1, 1>(&acc, s, row, m);
    }
  }
}

inline __m512 bf16x16_to_f32(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }

// Packed block-diagonal layout (`pack_blocks` in sparse24_cpu.py): block J of M (bs x bs) as
// (ceil(bs/16), ceil(bs/2), 16, 2) bf16, packed[c][p][l][t] = M_J[16c + l, 2p + t] (zero past bs), so one
// vdpbf16ps adds the input pair (x[2p], x[2p+1]) times two columns to 16 outputs: no horizontal sums.
inline int64_t packed_block_elems(int64_t bs) { return (bs + 15) / 16 * ((bs + 1) / 2) * 32; }

// Input pair p of an input row, as the 32-bit lane vdpbf16ps broadcasts (the odd tail's second half is 0).
inline __m512i input_pair(const bf16* x, int64_t p, int64_t bs) {
  const uint16_t* u = reinterpret_cast<const uint16_t*>(x) + 2 * p;
  const uint32_t lo = u[0], hi = 2 * p + 1 < bs ? u[1] : 0u;
  return _mm512_set1_epi32(static_cast<int>(lo | (hi << 16)));
}

// Block J applied to MT inputs: y[m, J*bs + i] = sum_k M_J[i, k] x[m, J*bs + k] (+ bias); x and y point at
// column J*bs of their rows.
template <int MT>
inline void bd_block(const bf16* packed, int64_t bs, const bf16* x, int64_t ldx, bf16* y, int64_t ldy,
                     const bf16* bias) {
  const int64_t np = (bs + 1) / 2;
  for (int64_t c = 0; c < bs; c += 16) {
    const __mmask16 mask = static_cast<__mmask16>(bs - c >= 16 ? 0xFFFF : (1u << (bs - c)) - 1u);
    const bf16* w = packed + (c / 16) * np * 32;
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    const int64_t full = bs / 2;
    for (int64_t p = 0; p < full; ++p) {
      const __m512i wv = _mm512_loadu_si512(w + p * 32);
      for (int m = 0; m < MT; ++m) {
        int32_t pair;
        std::memcpy(&pair, x + m * ldx + 2 * p, sizeof pair);
        acc[m] = dp(acc[m], wv, _mm512_set1_epi32(pair));
      }
    }
    if (full < np) {
      const __m512i wv = _mm512_loadu_si512(w + full * 32);
      for (int m = 0; m < MT; ++m) acc[m] = dp(acc[m], wv, input_pair(x + m * ldx, full, bs));
    }
    if (bias) {
      const __m512 b = bf16x16_to_f32(_mm256_maskz_loadu_epi16(mask, bias + c));
      for (int m = 0; m < MT; ++m) acc[m] = _mm512_add_ps(acc[m], b);
    }
    for (int m = 0; m < MT; ++m)
      _mm256_mask_storeu_epi16(y + m * ldy + c, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(acc[m])));
  }
}

// One matrix of a pass: its weights, input and where its rows go.
struct Job {
  const bf16* w;        // compressed core values, or the packed blocks of a block-diagonal pass
  const uint8_t* meta;  // null for block-diagonal passes
  int64_t d_in;         // core input width (sparse) or block size (block-diagonal)
  const bf16* x;
  int64_t ldx;
  int64_t rows;
  Sink sink;
};

constexpr int64_t kBdTile = 8;  // inputs per block-diagonal tile

template <int MT>
void bd_tile(const bf16* packed, int64_t bs, const bf16* x, int64_t ldx, bf16* y, int64_t ldy, const bf16* bias,
             int64_t mt) {
  if constexpr (MT > 1) {
    if (mt < MT) return bd_tile<MT - 1>(packed, bs, x, ldx, y, ldy, bias, mt);
  }
  bd_block<MT>(packed, bs, x, ldx, y, ldy, bias);
}

// A block-diagonal pass: items are (block, tile of up to 8 inputs), parallel over all items of all jobs.
void bd_pass(const std::vector<Job>& jobs, int64_t M) {
  const int64_t tiles = (M + kBdTile - 1) / kBdTile;
  std::vector<int64_t> starts(jobs.size() + 1, 0);
  for (size_t i = 0; i < jobs.size(); ++i) starts[i + 1] = starts[i] + tiles * (jobs[i].rows / jobs[i].d_in);
  at::parallel_for(0, starts.back(), 1, [&](int64_t begin, int64_t end) {
    for (size_t i = 0; i < jobs.size(); ++i) {
      const Job& j = jobs[i];
      const int64_t bs = j.d_in;
      for (int64_t it = std::max(begin, starts[i]); it < std::min(end, starts[i + 1]); ++it) {
        const int64_t blk = (it - starts[i]) / tiles, m0 = (it - starts[i]) % tiles * kBdTile;
        bd_tile<kBdTile>(j.w + blk * packed_block_elems(bs), bs, j.x + m0 * j.ldx + blk * bs, j.ldx,
                         j.sink.y + m0 * j.sink.ld + j.sink.col0 + blk * bs, j.sink.ld,
                         j.sink.bias ? j.sink.bias + blk * bs : nullptr, std::min(kBdTile, M - m0));
      }
    }
  });
}

// A core pass: parallel over groups of 16 rows of all jobs.
void core_pass(const std::vector<Job>& jobs, int64_t M) {
  std::vector<int64_t> starts(jobs.size() + 1, 0);
  for (size_t i = 0; i < jobs.size(); ++i) starts[i + 1] = starts[i] + (jobs[i].rows + 15) / 16;
  const int64_t grain = std::max<int64_t>(1, 8 / std::max<int64_t>(1, M));
  at::parallel_for(0, starts.back(), grain, [&](int64_t begin, int64_t end) {
    for (size_t i = 0; i < jobs.size(); ++i) {
      const int64_t lo = std::max(begin, starts[i]), hi = std::min(end, starts[i + 1]);
      if (lo >= hi) continue;
      const Job& j = jobs[i];
      core_rows(j.w, j.meta, j.d_in, j.x, j.ldx, M, (lo - starts[i]) * 16,
                std::min(j.rows, (hi - starts[i]) * 16), j.sink);
    }
  });
}

// Dense rows [r0, r1) of a compressed core, written to out (row stride d_in).
void decompress_rows(const bf16* vals, const uint8_t* meta, int64_t d_in, int64_t r0, int64_t r1, bf16* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const bf16* v = vals + r * (d_in / 2);
    const uint8_t* mt = meta + r * (d_in / 8);
    bf16* o = out + (r - r0) * d_in;
    int64_t c = 0;
    for (; c + 32 <= d_in; c += 32)
      _mm512_storeu_si512(o + c, expand32(meta_mask(mt + c / 8, 4), v + c / 2));
    if (c < d_in) {
      const int64_t n = d_in - c;
      _mm512_mask_storeu_epi16(o + c, tail_mask(n), _mm512_maskz_expandloadu_epi16(meta_mask(mt + c / 8, n / 8), v + c / 2));
    }
  }
}

// A or B of a shard: packed blocks (n, ceil(bs/16), ceil(bs/2), 16, 2) bf16 tiling `dim` (bs = dim / n).
void check_packed(const at::Tensor& t, int64_t dim, const char* which) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous() && t.dim() == 5 && t.size(0) > 0 &&
                  dim % t.size(0) == 0 && t.size(3) == 16 && t.size(4) == 2,
              "sparse24_cpu_linear: ", which, " must be contiguous bf16 packed blocks (pack_blocks) tiling ", dim);
  const int64_t bs = dim / t.size(0);
  TORCH_CHECK(t.size(1) == (bs + 15) / 16 && t.size(2) == (bs + 1) / 2, "sparse24_cpu_linear: ", which,
              " packed blocks do not match block size ", bs);
}

void check_inputs(const at::Tensor& x, const at::TensorList& values, const at::TensorList& metas,
                  const at::TensorList& a, const at::TensorList& b, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16, "sparse24_cpu_linear: x must be CPU bf16");
  TORCH_CHECK(!values.empty() && values.size() == metas.size(), "sparse24_cpu_linear: one meta per values");
  TORCH_CHECK(a.size() == b.size() && (a.empty() || a.size() == values.size()),
              "sparse24_cpu_linear: A and B for every shard or for none");
  const int64_t d_in = x.size(-1);
  TORCH_CHECK(d_in % 8 == 0, "sparse24_cpu_linear: d_in must be a multiple of 8");
  int64_t rows = 0;
  for (size_t i = 0; i < values.size(); ++i) {
    TORCH_CHECK(values[i].scalar_type() == at::kBFloat16 && values[i].is_contiguous() &&
                    values[i].dim() == 2 && values[i].size(1) * 2 == d_in,
                "sparse24_cpu_linear: values must be contiguous bf16 (d_out, d_in/2)");
    TORCH_CHECK(metas[i].scalar_type() == at::kByte && metas[i].is_contiguous() && metas[i].dim() == 2 &&
                    metas[i].size(0) == values[i].size(0) && metas[i].size(1) * 8 == d_in,
                "sparse24_cpu_linear: meta must be contiguous uint8 (d_out, d_in/8)");
    if (!a.empty()) {
      check_packed(a[i], values[i].size(0), "A");
      check_packed(b[i], d_in, "B");
    }
    rows += values[i].size(0);
  }
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() && bias->numel() == rows,
                "sparse24_cpu_linear: bias must be contiguous bf16 of the total output size");
  }
}

// B x for every shard (block-diagonal pass), into new (M, d_in) tensors.
std::vector<at::Tensor> apply_b(const at::Tensor& x, at::TensorList b_t) {
  const int64_t M = x.size(0), d_in = x.size(1);
  std::vector<at::Tensor> xb;
  std::vector<Job> jobs;
  for (const auto& bt : b_t) {
    xb.push_back(at::empty({M, d_in}, x.options()));
    jobs.push_back({bt.data_ptr<bf16>(), nullptr, d_in / bt.size(0), x.data_ptr<bf16>(), d_in, d_in,
                    {xb.back().data_ptr<bf16>(), d_in, 0, nullptr}});
  }
  bd_pass(jobs, M);
  return xb;
}

// A (core x) of every shard into its columns of y, plus the bias.
void apply_a(const std::vector<at::Tensor>& mid, at::TensorList a_t, const bf16* bias, at::Tensor& y) {
  std::vector<Job> jobs;
  int64_t col = 0;
  for (size_t i = 0; i < mid.size(); ++i) {
    const int64_t rows = mid[i].size(1);
    jobs.push_back({a_t[i].data_ptr<bf16>(), nullptr, rows / a_t[i].size(0), mid[i].data_ptr<bf16>(), rows, rows,
                    {y.data_ptr<bf16>(), y.size(1), col, bias ? bias + col : nullptr}});
    col += rows;
  }
  bd_pass(jobs, y.size(0));
}

void small_m(const at::Tensor& x, at::TensorList values, at::TensorList metas, at::TensorList a_t,
             at::TensorList b_t, const bf16* bias, at::Tensor& y) {
  const int64_t M = x.size(0), d_in = x.size(1), ld = y.size(1);
  const size_t S = values.size();
  const bool ab = !a_t.empty();
  const std::vector<at::Tensor> xb = ab ? apply_b(x, b_t) : std::vector<at::Tensor>{};
  std::vector<at::Tensor> mid(S);
  std::vector<Job> jobs;
  int64_t col = 0;
  for (size_t i = 0; i < S; ++i) {
    const int64_t rows = values[i].size(0);
    const bf16* xin = ab ? xb[i].data_ptr<bf16>() : x.data_ptr<bf16>();
    Sink sink{y.data_ptr<bf16>(), ld, col, bias ? bias + col : nullptr};
    if (ab) {
      mid[i] = at::empty({M, rows}, x.options());
      sink = {mid[i].data_ptr<bf16>(), rows, 0, nullptr};
    }
    jobs.push_back({values[i].data_ptr<bf16>(), metas[i].data_ptr<uint8_t>(), d_in, xin, d_in, rows, sink});
    col += rows;
  }
  core_pass(jobs, M);
  if (ab) apply_a(mid, a_t, bias, y);
}

at::Tensor& scratch(int64_t numel) {
  thread_local at::Tensor buf;
  if (!buf.defined() || buf.numel() < numel) buf = at::empty({numel}, at::TensorOptions().dtype(at::kBFloat16));
  return buf;
}

constexpr int64_t kTileBytes = int64_t{2} << 20;  // dense scratch tile of the large-M path

void large_m(const at::Tensor& x, at::TensorList values, at::TensorList metas, at::TensorList a_t,
             at::TensorList b_t, const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t M = x.size(0), d_in = x.size(1);
  const int64_t tile_rows = std::max<int64_t>(16, (kTileBytes / (2 * d_in)) / 16 * 16);
  const bool ab = !a_t.empty();
  const std::vector<at::Tensor> xb = ab ? apply_b(x, b_t) : std::vector<at::Tensor>{};
  std::vector<at::Tensor> mid;
  int64_t col = 0;
  for (size_t i = 0; i < values.size(); ++i) {
    const int64_t rows = values[i].size(0);
    const at::Tensor& xin = ab ? xb[i] : x;
    at::Tensor core_out = ab ? at::empty({M, rows}, x.options()) : y.narrow(1, col, rows);
    const bf16* vals = values[i].data_ptr<bf16>();
    const uint8_t* meta = metas[i].data_ptr<uint8_t>();
    for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
      const int64_t n = std::min(tile_rows, rows - r0);
      at::Tensor tile = scratch(tile_rows * d_in).narrow(0, 0, n * d_in).view({n, d_in});
      bf16* dst = tile.data_ptr<bf16>();
      at::parallel_for(r0, r0 + n, 8, [&](int64_t lo, int64_t hi) {
        decompress_rows(vals, meta, d_in, lo, hi, dst + (lo - r0) * d_in);
      });
      core_out.narrow(1, r0, n).copy_(at::mm(xin, tile.t()));
    }
    if (ab) mid.push_back(core_out);
    col += rows;
  }
  if (ab)
    apply_a(mid, a_t, bias ? bias->data_ptr<bf16>() : nullptr, y);
  else if (bias)
    y.add_(*bias);
}

at::Tensor sparse24_cpu_linear(const at::Tensor& x, at::TensorList values, at::TensorList metas, at::TensorList a,
                               at::TensorList b, const std::optional<at::Tensor>& bias, int64_t dense_min_m) {
  check_inputs(x, values, metas, a, b, bias);
  const int64_t d_in = x.size(-1);
  at::Tensor x2 = x.reshape({-1, d_in}).contiguous();
  int64_t rows = 0;
  for (const auto& v : values) rows += v.size(0);
  at::Tensor y = at::empty({x2.size(0), rows}, x.options());
  if (x2.size(0) > 0) {
    if (x2.size(0) >= dense_min_m)
      large_m(x2, values, metas, a, b, bias, y);
    else
      small_m(x2, values, metas, a, b, bias ? bias->data_ptr<bf16>() : nullptr, y);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = rows;
  return y.view(shape);
}

at::Tensor sparse24_cpu_decompress(const at::Tensor& values, const at::Tensor& meta) {
  TORCH_CHECK(values.scalar_type() == at::kBFloat16 && values.is_contiguous() && meta.is_contiguous() &&
                  meta.scalar_type() == at::kByte && meta.size(0) == values.size(0) &&
                  meta.size(1) * 4 == values.size(1),
              "sparse24_cpu_decompress: bf16 values (d_out, d_in/2) and uint8 meta (d_out, d_in/8)");
  const int64_t d_out = values.size(0), d_in = values.size(1) * 2;
  at::Tensor out = at::empty({d_out, d_in}, values.options());
  at::parallel_for(0, d_out, 8, [&](int64_t lo, int64_t hi) {
    decompress_rows(values.data_ptr<bf16>(), meta.data_ptr<uint8_t>(), d_in, lo, hi,
                    out.data_ptr<bf16>() + lo * d_in);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vllm_armor, m) {
  m.def("sparse24_cpu_linear(Tensor x, Tensor[] values, Tensor[] metas, Tensor[] a_packed, Tensor[] b_packed, "
        "Tensor? bias, int dense_min_m) -> Tensor");
  m.def("sparse24_cpu_decompress(Tensor values, Tensor meta) -> Tensor");
}

TORCH_LIBRARY_IMPL(vllm_armor, CPU, m) {
  m.impl("sparse24_cpu_linear", &sparse24_cpu_linear);
  m.impl("sparse24_cpu_decompress", &sparse24_cpu_decompress);
}
