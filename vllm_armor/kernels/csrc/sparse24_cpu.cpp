// vllm_armor::sparse24_cpu_linear: y = concat_s A_s (core_s (B_s x)) + bias on x86 CPUs with AVX-512 BF16.
//
// The 2:4 core is held in a layout derived once at load from the checkpoint's values and keep-masks
// (`pack_core` in sparse24_cpu.py), as compact as the checkpoint (values + 4 bits per group of 4 inputs):
// rows in blocks of 32 (zero-padded), and for block q and group g (inputs 4g..4g+3)
//   vals[q][g][h][l][t]  bf16   the t-th kept value of row 32q + 16h + l in group g,
//   pats[q][g][l]        uint8  the pattern (which 2 of the 4 inputs are kept, 0..5) of row 32q + l in the
//                               low nibble and of row 32q + 16 + l in the high nibble.
// Per input row x, every group's 6 possible input pairs are tabulated once (`pair_tables`); one vpermd then
// gives 16 rows their own pair of inputs and one vdpbf16ps adds both kept products to 16 outputs: only the
// kept weights are multiplied and no horizontal sums are needed.
//
// A and B arrive packed the same way (16 outputs x an input pair per vector; see bd_block).
//
// Every M (decode and prefill) takes the same three passes, B, core and A, split over the threads vLLM's CPU
// worker sets (at::parallel_for), fp32 accumulation, bf16 between passes (as the factored reference); tokens go
// through the core in chunks of kTokenChunk (their pair tables stay in cache). Measured against the GEMM vLLM
// runs for a dense model (oneDNN, prepacked weight) this path was as fast or faster up to M = 512 than
// decompressing the core into tiles for oneDNN, so there is no separate prefill path.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using bf16 = at::BFloat16;

inline __m512 bf16x16_to_f32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

inline __m512 dp(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}

// The kept input positions (p0 < p1) of the 6 patterns, in the order pack_core numbers them.
constexpr int kP0[6] = {0, 0, 0, 1, 1, 2};
constexpr int kP1[6] = {1, 2, 3, 2, 3, 3};

// tab[m][g][k] (8 dwords, 6 used) = x[m, 4g + p0_k] | x[m, 4g + p1_k] << 16: the input pair of pattern k.
// 32 inputs (8 groups) at a time: four vpermw, each writing the tables of two groups.
struct PairIndex {
  __m512i idx[4];
  PairIndex() {
    alignas(64) uint16_t w[4][32];
    for (int i = 0; i < 4; ++i)
      for (int lane = 0; lane < 32; ++lane) {
        const int group = 2 * i + lane / 16, k = (lane % 16) / 2, t = lane % 2;
        w[i][lane] = k < 6 ? static_cast<uint16_t>(4 * group + (t ? kP1[k] : kP0[k])) : 0;
      }
    for (int i = 0; i < 4; ++i) idx[i] = _mm512_load_si512(w[i]);
  }
};

void pair_tables(const bf16* x, int64_t ldx, int64_t M, int64_t G, uint32_t* tab) {
  static const PairIndex pi;
  for (int64_t m = 0; m < M; ++m) {
    const bf16* xm = x + m * ldx;
    uint32_t* t = tab + m * G * 8;
    for (int64_t g = 0; g < G; g += 8) {  // G is even (d_in is a multiple of 8)
      const int64_t left = std::min<int64_t>(8, G - g);
      const __m512i chunk = _mm512_maskz_loadu_epi16(left == 8 ? 0xFFFFFFFFu : (1u << (4 * left)) - 1u, xm + 4 * g);
      for (int i = 0; 2 * i < left; ++i)
        _mm512_storeu_si512(t + (g + 2 * i) * 8, _mm512_permutexvar_epi16(pi.idx[i], chunk));
    }
  }
}

// Where a pass writes: rows of an (M, ld) bf16 matrix starting at column `col0`, plus an optional bias.
struct Sink {
  bf16* y;
  int64_t ld;
  int64_t col0;
  const bf16* bias;  // indexed by the row of the pass, may be null
};

// QT blocks of 32 rows x MT inputs of a packed core: 2 * QT * MT accumulators of 16 rows each.
template <int QT, int MT>
inline void core_tile(const bf16* vals, const uint8_t* pats, int64_t G, const uint32_t* tab, int64_t q0,
                      int64_t m0, int64_t rows, const Sink& s) {
  __m512 acc[QT][2][MT];
  for (int q = 0; q < QT; ++q)
    for (int h = 0; h < 2; ++h)
      for (int m = 0; m < MT; ++m) acc[q][h][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i t[MT];
    for (int m = 0; m < MT; ++m)
      t[m] = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tab + ((m0 + m) * G + g) * 8)));
    for (int q = 0; q < QT; ++q) {
      const int64_t qg = (q0 + q) * G + g;
      const __m512i id0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pats + qg * 16)));
      const __m512i id1 = _mm512_srli_epi32(id0, 4);  // vpermd reads the low 4 bits: id0 needs no mask
      const __m512i w0 = _mm512_loadu_si512(vals + qg * 64), w1 = _mm512_loadu_si512(vals + qg * 64 + 32);
      for (int m = 0; m < MT; ++m) {
        acc[q][0][m] = dp(acc[q][0][m], w0, _mm512_permutexvar_epi32(id0, t[m]));
        acc[q][1][m] = dp(acc[q][1][m], w1, _mm512_permutexvar_epi32(id1, t[m]));
      }
    }
  }
  for (int q = 0; q < QT; ++q)
    for (int h = 0; h < 2; ++h) {
      const int64_t r = (q0 + q) * 32 + h * 16;
      if (r >= rows) continue;
      const __mmask16 k = rows - r >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (rows - r)) - 1u);
      const __m512 b = s.bias ? bf16x16_to_f32(_mm256_maskz_loadu_epi16(k, s.bias + r)) : _mm512_setzero_ps();
      for (int m = 0; m < MT; ++m)
        _mm256_mask_storeu_epi16(s.y + (m0 + m) * s.ld + s.col0 + r, k,
                                 reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_add_ps(acc[q][h][m], b))));
    }
}

// Row blocks [q0, q1) against inputs [m0, m0 + MT): QT blocks at a time while they last.
template <int QT, int MT>
inline void core_blocks(const bf16* vals, const uint8_t* pats, int64_t G, const uint32_t* tab, int64_t q0,
                        int64_t q1, int64_t m0, int64_t rows, const Sink& s) {
  int64_t q = q0;
  for (; q + QT <= q1; q += QT) core_tile<QT, MT>(vals, pats, G, tab, q, m0, rows, s);
  for (; q < q1; ++q) core_tile<1, MT>(vals, pats, G, tab, q, m0, rows, s);
}

// Row blocks [q0, q1) against all M inputs: tiles of 8 inputs (1 block), then 4 (2 blocks), 2 and 1 (4 blocks),
// so every tile keeps 8 or 16 independent sums in flight.
void core_rows(const bf16* vals, const uint8_t* pats, int64_t G, const uint32_t* tab, int64_t M, int64_t q0,
               int64_t q1, int64_t rows, const Sink& s) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) core_blocks<1, 8>(vals, pats, G, tab, q0, q1, m, rows, s);
  for (; m + 4 <= M; m += 4) core_blocks<2, 4>(vals, pats, G, tab, q0, q1, m, rows, s);
  for (; m + 2 <= M; m += 2) core_blocks<4, 2>(vals, pats, G, tab, q0, q1, m, rows, s);
  for (; m < M; ++m) core_blocks<4, 1>(vals, pats, G, tab, q0, q1, m, rows, s);
}


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
  const bf16* w;         // packed core values, or the packed blocks of a block-diagonal pass
  const uint8_t* pats;   // packed core patterns; null for block-diagonal passes
  int64_t d_in;          // core input width (core) or block size (block-diagonal)
  const bf16* x;
  int64_t ldx;
  int64_t rows;          // output rows (the core's real d_out, without padding)
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

constexpr int64_t kTokenChunk = 64;  // tokens whose pair tables are built and used together

// A core pass: per chunk of tokens, the pair tables of every distinct input, then parallel over the 32-row
// blocks of all jobs.
void core_pass(const std::vector<Job>& jobs, int64_t M) {
  std::vector<size_t> first(jobs.size());  // the job whose input (and tables) job i shares
  std::vector<int64_t> starts(jobs.size() + 1, 0);
  for (size_t i = 0; i < jobs.size(); ++i) {
    first[i] = 0;
    while (jobs[first[i]].x != jobs[i].x) ++first[i];
    starts[i + 1] = starts[i] + (jobs[i].rows + 31) / 32;
  }
  std::vector<std::vector<uint32_t>> tabs(jobs.size());
  for (int64_t m0 = 0; m0 < M; m0 += kTokenChunk) {
    const int64_t mc = std::min(kTokenChunk, M - m0);
    for (size_t i = 0; i < jobs.size(); ++i) {
      if (first[i] != i) continue;
      const int64_t G = jobs[i].d_in / 4;
      tabs[i].resize(static_cast<size_t>(kTokenChunk * G * 8));
      pair_tables(jobs[i].x + m0 * jobs[i].ldx, jobs[i].ldx, mc, G, tabs[i].data());
    }
    at::parallel_for(0, starts.back(), 1, [&](int64_t begin, int64_t end) {
      for (size_t i = 0; i < jobs.size(); ++i) {
        const int64_t lo = std::max(begin, starts[i]), hi = std::min(end, starts[i + 1]);
        if (lo >= hi) continue;
        const Job& j = jobs[i];
        const Sink s{j.sink.y + m0 * j.sink.ld, j.sink.ld, j.sink.col0, j.sink.bias};
        core_rows(j.w, j.pats, j.d_in / 4, tabs[first[i]].data(), mc, lo - starts[i], hi - starts[i], j.rows, s);
      }
    });
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

// A packed core (pack_core): vals (ceil(rows/32), d_in/4, 2, 16, 2) bf16, pats (ceil(rows/32), d_in/4, 16) uint8.
void check_core(const at::Tensor& vals, const at::Tensor& pats, int64_t rows, int64_t d_in) {
  const int64_t Q = (rows + 31) / 32;
  TORCH_CHECK(rows > 0 && vals.scalar_type() == at::kBFloat16 && vals.is_contiguous() && vals.dim() == 5 &&
                  vals.size(0) == Q && vals.size(1) * 4 == d_in && vals.size(2) == 2 && vals.size(3) == 16 &&
                  vals.size(4) == 2,
              "sparse24_cpu_linear: core values must be contiguous bf16 packed by pack_core for ", rows, " x ", d_in);
  TORCH_CHECK(pats.scalar_type() == at::kByte && pats.is_contiguous() && pats.dim() == 3 && pats.size(0) == Q &&
                  pats.size(1) * 4 == d_in && pats.size(2) == 16,
              "sparse24_cpu_linear: core patterns must be contiguous uint8 packed by pack_core for ", rows, " x ",
              d_in);
}

void check_inputs(const at::Tensor& x, const at::TensorList& vals, const at::TensorList& pats, at::IntArrayRef rows,
                  const at::TensorList& a, const at::TensorList& b, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16, "sparse24_cpu_linear: x must be CPU bf16");
  TORCH_CHECK(!vals.empty() && vals.size() == pats.size() && vals.size() == rows.size(),
              "sparse24_cpu_linear: one values, patterns and row count per shard");
  TORCH_CHECK(a.size() == b.size() && (a.empty() || a.size() == vals.size()),
              "sparse24_cpu_linear: A and B for every shard or for none");
  const int64_t d_in = x.size(-1);
  TORCH_CHECK(d_in % 8 == 0, "sparse24_cpu_linear: d_in must be a multiple of 8");
  int64_t total = 0;
  for (size_t i = 0; i < vals.size(); ++i) {
    check_core(vals[i], pats[i], rows[i], d_in);
    if (!a.empty()) {
      check_packed(a[i], rows[i], "A");
      check_packed(b[i], d_in, "B");
    }
    total += rows[i];
  }
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() && bias->numel() == total,
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

void passes(const at::Tensor& x, at::TensorList vals, at::TensorList pats, at::IntArrayRef rows,
             at::TensorList a_t, at::TensorList b_t, const bf16* bias, at::Tensor& y) {
  const int64_t M = x.size(0), d_in = x.size(1), ld = y.size(1);
  const size_t S = vals.size();
  const bool ab = !a_t.empty();
  const std::vector<at::Tensor> xb = ab ? apply_b(x, b_t) : std::vector<at::Tensor>{};
  std::vector<at::Tensor> mid(S);
  std::vector<Job> jobs;
  int64_t col = 0;
  for (size_t i = 0; i < S; ++i) {
    const bf16* xin = ab ? xb[i].data_ptr<bf16>() : x.data_ptr<bf16>();
    Sink sink{y.data_ptr<bf16>(), ld, col, bias ? bias + col : nullptr};
    if (ab) {
      mid[i] = at::empty({M, rows[i]}, x.options());
      sink = {mid[i].data_ptr<bf16>(), rows[i], 0, nullptr};
    }
    jobs.push_back({vals[i].data_ptr<bf16>(), pats[i].data_ptr<uint8_t>(), d_in, xin, d_in, rows[i], sink});
    col += rows[i];
  }
  core_pass(jobs, M);
  if (ab) apply_a(mid, a_t, bias, y);
}

at::Tensor sparse24_cpu_linear(const at::Tensor& x, at::TensorList vals, at::TensorList pats, at::IntArrayRef rows,
                               at::TensorList a, at::TensorList b, const std::optional<at::Tensor>& bias) {
  check_inputs(x, vals, pats, rows, a, b, bias);
  const int64_t d_in = x.size(-1);
  at::Tensor x2 = x.reshape({-1, d_in}).contiguous();
  int64_t total = 0;
  for (const int64_t r : rows) total += r;
  at::Tensor y = at::empty({x2.size(0), total}, x.options());
  if (x2.size(0) > 0) passes(x2, vals, pats, rows, a, b, bias ? bias->data_ptr<bf16>() : nullptr, y);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = total;
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vllm_armor, m) {
  m.def("sparse24_cpu_linear(Tensor x, Tensor[] core_vals, Tensor[] core_pats, int[] rows, Tensor[] a_packed, "
        "Tensor[] b_packed, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(vllm_armor, CPU, m) {
  m.impl("sparse24_cpu_linear", &sparse24_cpu_linear);
}
