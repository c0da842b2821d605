// vllm_armor::sparse24_cpu_linear: y = concat_s A_s (core_s (B_s x)) + bias on x86 CPUs with AVX-512 BF16.
//
// The 2:4 core stays compressed as the checkpoint stores it (docs/FORMAT.md): values (d_out, d_in/2) bf16,
// metadata (d_out, d_in/8) uint8 where bit b of byte m is set when input 8m+b is kept. Four metadata bytes
// are therefore the keep-mask of 32 consecutive inputs, and the 16 values they select are the next 16
// values of the row: one masked expand-load (vpexpandw) gives the 32 dense lanes, one vdpbf16ps multiplies
// them with 32 inputs. Nothing is expanded to memory on the small-M path.
//
// Small M (decode): B, core and A are three passes, each split over output rows by at::parallel_for (the
// threads vLLM's CPU worker sets), fp32 accumulation, bf16 between passes (as the factored reference).
// Large M (prefill, M >= dense_min_m): B and A as batched matmuls, the core decompressed a bounded tile of
// rows at a time into a scratch buffer and multiplied by at::mm (oneDNN/MKL); no dense copy is kept.
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
      const uint32_t mk = meta_mask(meta + r * mstride + c / 8, 4);
      const __m512i wv = _mm512_maskz_expandloadu_epi16(mk, vals + r * vstride + c / 2);
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

// out[r * MT + m] = sum_k w[r, k] * x[m, k] for R dense rows of length L (row stride L).
template <int R, int MT>
inline void dense_tile(const bf16* w, int64_t L, const bf16* x, int64_t ldx, float* out) {
  __m512 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t c = 0; c < L; c += 32) {
    const __mmask32 k = tail_mask(L - c);
    __m512i xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = _mm512_maskz_loadu_epi16(k, x + m * ldx + c);
    for (int r = 0; r < R; ++r) {
      const __m512i wv = _mm512_maskz_loadu_epi16(k, w + r * L + c);
      for (int m = 0; m < MT; ++m) acc[r][m] = dp(acc[r][m], wv, xv[m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) out[r * MT + m] = _mm512_reduce_add_ps(acc[r][m]);
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

// One pass over rows [r0, r1) of a compressed core (Sparse) or a block-diagonal matrix (dense blocks).
template <int R, int MT, bool Sparse>
inline void rows_tile(const bf16* w, const uint8_t* meta, int64_t d_in, int64_t bs, const bf16* x, int64_t ldx,
                      int64_t row, int64_t m0, const Sink& s) {
  float acc[R * MT];
  const bf16* xm = x + m0 * ldx;
  if constexpr (Sparse) {
    sparse_tile<R, MT>(w + row * (d_in / 2), meta + row * (d_in / 8), d_in, xm, ldx, acc);
  } else {
    const int64_t block = row / bs;
    dense_tile<R, MT>(w + row * bs, bs, xm + block * bs, ldx, acc);
  }
  store<R, MT>(acc, s, row, m0);
}

template <int R, bool Sparse>
inline void rows_all_m(const bf16* w, const uint8_t* meta, int64_t d_in, int64_t bs, const bf16* x, int64_t ldx,
                       int64_t M, int64_t row, const Sink& s) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) rows_tile<R, 4, Sparse>(w, meta, d_in, bs, x, ldx, row, m, s);
  for (; m + 2 <= M; m += 2) rows_tile<R, 2, Sparse>(w, meta, d_in, bs, x, ldx, row, m, s);
  for (; m < M; ++m) rows_tile<R, 1, Sparse>(w, meta, d_in, bs, x, ldx, row, m, s);
}

// Rows [r0, r1) of one matrix; dense rows are tiled inside their block (a tile never crosses blocks).
template <bool Sparse>
void run_rows(const bf16* w, const uint8_t* meta, int64_t d_in, int64_t bs, const bf16* x, int64_t ldx, int64_t M,
              int64_t r0, int64_t r1, const Sink& s) {
  constexpr int R = 4;
  int64_t row = r0;
  while (row < r1) {
    const int64_t limit = Sparse ? r1 : std::min(r1, (row / bs + 1) * bs);
    for (; row + R <= limit; row += R) rows_all_m<R, Sparse>(w, meta, d_in, bs, x, ldx, M, row, s);
    for (; row < limit; ++row) rows_all_m<1, Sparse>(w, meta, d_in, bs, x, ldx, M, row, s);
  }
}

// One matrix of a pass: its weights, input and where its rows go.
struct Job {
  const bf16* w;
  const uint8_t* meta;  // null for block-diagonal passes
  int64_t d_in;         // core input width (sparse) or block size (dense)
  const bf16* x;
  int64_t ldx;
  int64_t rows;
  Sink sink;
};

// All jobs of a pass in one parallel region, split over their concatenated rows.
void run_pass(const std::vector<Job>& jobs, int64_t M, int64_t bytes_per_row_hint) {
  std::vector<int64_t> starts(jobs.size() + 1, 0);
  for (size_t i = 0; i < jobs.size(); ++i) starts[i + 1] = starts[i] + jobs[i].rows;
  const int64_t grain = std::max<int64_t>(16, (int64_t{1} << 15) / std::max<int64_t>(1, bytes_per_row_hint));
  at::parallel_for(0, starts.back(), grain, [&](int64_t begin, int64_t end) {
    for (size_t i = 0; i < jobs.size(); ++i) {
      const int64_t lo = std::max(begin, starts[i]), hi = std::min(end, starts[i + 1]);
      if (lo >= hi) continue;
      const Job& j = jobs[i];
      if (j.meta)
        run_rows<true>(j.w, j.meta, j.d_in, 0, j.x, j.ldx, M, lo - starts[i], hi - starts[i], j.sink);
      else
        run_rows<false>(j.w, nullptr, 0, j.d_in, j.x, j.ldx, M, lo - starts[i], hi - starts[i], j.sink);
    }
  });
}

// Dense rows [r0, r1) of a compressed core, written to out (row stride d_in).
void decompress_rows(const bf16* vals, const uint8_t* meta, int64_t d_in, int64_t r0, int64_t r1, bf16* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const bf16* v = vals + r * (d_in / 2);
    const uint8_t* mt = meta + r * (d_in / 8);
    bf16* o = out + (r - r0) * d_in;
    for (int64_t c = 0; c < d_in; c += 32) {
      const int64_t n = std::min<int64_t>(32, d_in - c);
      const uint32_t mk = meta_mask(mt + c / 8, n / 8);
      _mm512_mask_storeu_epi16(o + c, tail_mask(n), _mm512_maskz_expandloadu_epi16(mk, v + c / 2));
    }
  }
}

at::Tensor blockdiag_apply(const at::Tensor& x, const at::Tensor& blocks) {
  const int64_t M = x.size(0), n = blocks.size(0), bs = blocks.size(1);
  auto xb = x.view({M, n, bs}).transpose(0, 1);                   // (n, M, bs)
  return at::bmm(xb, blocks.transpose(1, 2)).transpose(0, 1).reshape({M, n * bs});
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
      TORCH_CHECK(a[i].scalar_type() == at::kBFloat16 && a[i].is_contiguous() && a[i].dim() == 3 &&
                      a[i].size(0) * a[i].size(1) == values[i].size(0),
                  "sparse24_cpu_linear: A must be contiguous bf16 blocks tiling d_out");
      TORCH_CHECK(b[i].scalar_type() == at::kBFloat16 && b[i].is_contiguous() && b[i].dim() == 3 &&
                      b[i].size(0) * b[i].size(1) == d_in,
                  "sparse24_cpu_linear: B must be contiguous bf16 blocks tiling d_in");
    }
    rows += values[i].size(0);
  }
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() && bias->numel() == rows,
                "sparse24_cpu_linear: bias must be contiguous bf16 of the total output size");
  }
}

void small_m(const at::Tensor& x, at::TensorList values, at::TensorList metas, at::TensorList a,
             at::TensorList b, const bf16* bias, at::Tensor& y) {
  const int64_t M = x.size(0), d_in = x.size(1), ld = y.size(1);
  const size_t S = values.size();
  const bool ab = !a.empty();
  std::vector<at::Tensor> xb(S), mid(S);
  std::vector<Job> jobs;
  if (ab) {
    for (size_t i = 0; i < S; ++i) {
      xb[i] = at::empty({M, d_in}, x.options());
      jobs.push_back({b[i].data_ptr<bf16>(), nullptr, b[i].size(1), x.data_ptr<bf16>(), d_in, d_in,
                      {xb[i].data_ptr<bf16>(), d_in, 0, nullptr}});
    }
    run_pass(jobs, M, 2 * b[0].size(1));
    jobs.clear();
  }
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
  run_pass(jobs, M, d_in + d_in / 8);
  if (!ab) return;
  jobs.clear();
  col = 0;
  for (size_t i = 0; i < S; ++i) {
    const int64_t rows = values[i].size(0);
    jobs.push_back({a[i].data_ptr<bf16>(), nullptr, a[i].size(1), mid[i].data_ptr<bf16>(), rows, rows,
                    {y.data_ptr<bf16>(), ld, col, bias ? bias + col : nullptr}});
    col += rows;
  }
  run_pass(jobs, M, 2 * a[0].size(1));
}

at::Tensor& scratch(int64_t numel) {
  thread_local at::Tensor buf;
  if (!buf.defined() || buf.numel() < numel) buf = at::empty({numel}, at::TensorOptions().dtype(at::kBFloat16));
  return buf;
}

constexpr int64_t kTileBytes = int64_t{2} << 20;  // dense scratch tile of the large-M path

void large_m(const at::Tensor& x, at::TensorList values, at::TensorList metas, at::TensorList a, at::TensorList b,
             const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t M = x.size(0), d_in = x.size(1);
  const int64_t tile_rows = std::max<int64_t>(16, (kTileBytes / (2 * d_in)) / 16 * 16);
  int64_t col = 0;
  for (size_t i = 0; i < values.size(); ++i) {
    const int64_t rows = values[i].size(0);
    const at::Tensor xin = a.empty() ? x : blockdiag_apply(x, b[i]);
    at::Tensor core_out = at::empty({M, rows}, x.options());
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
    y.narrow(1, col, rows).copy_(a.empty() ? core_out : blockdiag_apply(core_out, a[i]));
    col += rows;
  }
  if (bias) y.add_(*bias);
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
  m.def("sparse24_cpu_linear(Tensor x, Tensor[] values, Tensor[] metas, Tensor[] a_blocks, Tensor[] b_blocks, "
        "Tensor? bias, int dense_min_m) -> Tensor");
  m.def("sparse24_cpu_decompress(Tensor values, Tensor meta) -> Tensor");
}

TORCH_LIBRARY_IMPL(vllm_armor, CPU, m) {
  m.impl("sparse24_cpu_linear", &sparse24_cpu_linear);
  m.impl("sparse24_cpu_decompress", &sparse24_cpu_decompress);
}
