// Checks of csrc/cpu_rows.h's vector paths against plain loops, built and run by
// tests/test_native.py::test_cpu_row_machinery_matches_plain_loops once per ISA (the host's, which
// takes the AVX2 or AVX-512 paths, and x86-64, which takes the portable ones). Prints one line per
// failure and "ok <isa>" at the end; exits 1 on any failure.
#include "cpu_rows.h"

#include <cinttypes>
#include <cstdio>
#include <random>

using namespace hk;

namespace {

int failures = 0;

void fail(const char* what, const std::string& detail) {
  ++failures;
  if (failures <= 20) std::printf("FAIL %s: %s\n", what, detail.c_str());
}

std::string fmt(const char* f, double a, double b = 0.0, double c = 0.0) {
  char buf[256];
  std::snprintf(buf, sizeof buf, f, a, b, c);
  return buf;
}

#if defined(HK_AVX2)
// exp8 against std::exp: within 3e-7 + |d| * 1.2e-7 relative (the polynomial, then the rounding of
// d * log2 e), and for d below the clamp (2^-125) a result under 2^-124; exp8(0) is exactly 1.
void check_exp8() {
  std::vector<float> ds;
  for (float d = 0.0f; d > -120.0f; d -= 0.00731f) ds.push_back(d);
  for (float d : {-0.0f, -1e-30f, -1e-7f, -86.5f, -87.3f, -87.4f, -88.0f, -103.0f, -104.0f, -150.0f, -1e30f, -kInf, kNaN})
    ds.push_back(d);
  while (ds.size() % 8) ds.push_back(0.0f);
  for (size_t i = 0; i < ds.size(); i += 8) {
    float e[8];
    _mm256_storeu_ps(e, exp8(_mm256_loadu_ps(ds.data() + i)));
    for (int l = 0; l < 8; ++l) {
      const double d = ds[i + l], want = d == d ? std::exp(d) : 0.0;
      const double tiny = std::ldexp(1.0, -124);
      const double tol = want * (3e-7 + 1.2e-7 * std::fabs(d == d && d > -1e30 ? d : 0.0));
      const bool ok = (want < std::ldexp(1.0, -125) || d != d) ? (e[l] >= 0.0f && e[l] < tiny)
                                                               : std::fabs(e[l] - want) <= tol;
      if (!ok) fail("exp8", fmt("d=%.9g exp8=%.9g exp=%.9g", d, e[l], want));
      if (d == 0.0 && e[l] != 1.0f) fail("exp8(0)", fmt("%.9g", e[l]));
    }
  }
}
#endif

// greedy_scan: the max, its first index and the mass sum exp(x - max) (within 2e-6 relative).
void check_greedy(const std::vector<float>& x, const char* what) {
  const int64_t V = static_cast<int64_t>(x.size());
  const GreedyScan g = greedy_scan<kFloat32>(x.data(), V);
  float m = -kInf;
  for (float v : x) m = checked_max(m, v);
  if (g.scan.bad != max_is_bad(m) || (!g.scan.bad && g.scan.max != m))
    return fail(what, fmt("max %g bad %g, want %g", g.scan.max, g.scan.bad, m));
  if (g.scan.bad) return;
  int64_t arg = 0;
  while (x[arg] != m) ++arg;
  double mass = 0.0;
  for (float v : x) mass += std::exp(static_cast<double>(v) - m);
  if (g.token != arg) fail(what, fmt("argmax %g, want %g (V %g)", double(g.token), double(arg), double(V)));
  if (std::fabs(g.mass - mass) > 2e-6 * mass) fail(what, fmt("mass %.9g, want %.9g (V %g)", g.mass, mass, double(V)));
}

// scan_chunks: each chunk's max exactly, and the total sum exp((x - max) / t) within 2e-6 relative.
void check_scan_chunks(const std::vector<float>& x, float t, const char* what) {
  const int64_t V = static_cast<int64_t>(x.size());
  Scratch& s = scratch();
  double total = -1.0;
  const RowScan r = scan_chunks<kFloat32>(x.data(), V, s, t, &total);
  float m = -kInf;
  for (int64_t c = 0; c * kChunk < V; ++c) {
    float cm = -kInf;
    for (int64_t i = c * kChunk; i < std::min(V, (c + 1) * kChunk); ++i) cm = checked_max(cm, x[i]);
    if (!(s.vals[c] == cm)) fail(what, fmt("chunk %g max %g, want %g", double(c), s.vals[c], cm));
    m = checked_max(m, cm);
  }
  if (r.bad != max_is_bad(m) || (!r.bad && r.max != m)) return fail(what, fmt("max %g, want %g", r.max, m));
  if (r.bad) return;
  double want = 0.0;
  for (float v : x) want += std::exp(static_cast<double>((v - m) / t));
  if (std::fabs(total - want) > 2e-6 * want) fail(what, fmt("total %.9g, want %.9g (V %g)", total, want, double(V)));
}

// gather_candidates: exactly the tokens with z = (x - m) / t >= bound, in index order, their z bit
// for bit.
void check_gather(const std::vector<float>& x, float t, float bound, const char* what) {
  const int64_t V = static_cast<int64_t>(x.size());
  Scratch& s = scratch();
  const RowScan r = scan_chunks<kFloat32>(x.data(), V, s, t, nullptr);
  Candidates& c = candidates();
  std::vector<int64_t> idx;
  std::vector<float> z;
  for (int64_t i = 0; i < V; ++i) {
    const float zi = (x[i] - r.max) / t;
    if (zi >= bound) idx.push_back(i), z.push_back(zi);
  }
  const bool ok = gather_candidates<kFloat32>(x.data(), V, r.max, t, bound, s, c);
  if (ok != (idx.size() <= kMaxCandidates)) return fail(what, fmt("ok %g with %g candidates", ok, double(idx.size())));
  if (!ok) return;
  if (c.n != idx.size()) return fail(what, fmt("%g candidates, want %g (V %g)", double(c.n), double(idx.size()), double(V)));
  for (size_t j = 0; j < c.n; ++j)
    if (c.idx[j] != idx[j] || float_bits(c.z[j]) != float_bits(z[j]))
      return fail(what, fmt("candidate %g: token %g, want %g", double(j), double(c.idx[j]), double(idx[j])));
}

// gather_keys: the order keys of the tokens with z >= floor, in index order.
void check_gather_keys(const std::vector<float>& z, float floor, const char* what) {
  std::vector<uint32_t> want, got;
  for (float v : z)
    if (v >= floor) want.push_back(order_key(v));
  gather_keys(z.data(), static_cast<int64_t>(z.size()), floor, got);
  if (got != want) fail(what, fmt("%g keys, want %g (V %g)", double(got.size()), double(want.size()), double(z.size())));
}

// kept_mass_sum over each chunk of 64, as mass_and_draw calls it: the sum of exp(z) over z >= tau
// within 1e-6 relative.
void check_kept_mass(const std::vector<float>& z, float tau, const char* what) {
  const int64_t n = static_cast<int64_t>(z.size());
  double want = 0.0, got = 0.0;
  for (float v : z)
    if (v >= tau) want += std::exp(static_cast<double>(v));
  for (int64_t base = 0; base < n; base += kChunk) got += kept_mass_sum(z.data() + base, std::min(kChunk, n - base), tau);
  if (std::fabs(got - want) > 1e-6 * want + 1e-30) fail(what, fmt("%.9g, want %.9g (n %g)", got, want, double(n)));
}

// dot_block: a row's dot products are the same bits whatever block shape computes them.
void check_dot_blocks() {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  for (int64_t n : {1, 7, 8, 9, 63, 64, 100, 4098}) {
    const int64_t xs = n + 5, ws = n + 3;
    std::vector<float> x(4 * xs), w(4 * ws);
    for (auto& v : x) v = nd(rng);
    for (auto& v : w) v = nd(rng);
    float o44[16], o11[1], o41[4], o14[4], o24[8];
    dot_block<4, 4>(x.data(), xs, w.data(), ws, n, o44);
    dot_block<4, 1>(x.data(), xs, w.data() + 2 * ws, ws, n, o41);
    dot_block<2, 4>(x.data() + 2 * xs, xs, w.data(), ws, n, o24);
    for (int i = 0; i < 4; ++i) {
      dot_block<1, 4>(x.data() + i * xs, xs, w.data(), ws, n, o14);
      for (int u = 0; u < 4; ++u) {
        dot_block<1, 1>(x.data() + i * xs, xs, w.data() + u * ws, ws, n, o11);
        double want = 0.0;
        for (int64_t k = 0; k < n; ++k) want += double(x[i * xs + k]) * w[u * ws + k];
        const float b = o44[i * 4 + u];
        if (float_bits(o11[0]) != float_bits(b) || float_bits(o14[u]) != float_bits(b) ||
            (u == 2 && float_bits(o41[i]) != float_bits(b)) || (i >= 2 && float_bits(o24[(i - 2) * 4 + u]) != float_bits(b)))
          fail("dot_block", fmt("row %g unit %g differs between block shapes (n %g)", i, u, double(n)));
        if (std::fabs(b - want) > 1e-4 * (1.0 + std::sqrt(double(n)))) fail("dot_block", fmt("%.9g, want %.9g", b, want));
      }
    }
  }
}

}  // namespace

int main() {
#if defined(HK_AVX2)
  const char* isa = "avx2";
  check_exp8();
#elif defined(__AVX512F__)
  const char* isa = "avx512";
#else
  const char* isa = "portable";
#endif
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  // Lengths around the 8- and 16-lane vectors and the 64-token chunks, and a vocabulary.
  for (int64_t V : {1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 127, 128, 129, 200, 1000, 4099, 32000}) {
    std::vector<float> x(V);
    for (auto& v : x) v = 4.0f * nd(rng);
    check_greedy(x, "greedy random");
    check_scan_chunks(x, 0.8f, "scan_chunks random");
    check_scan_chunks(x, 4.0f, "scan_chunks hot");
    for (float bound : {-0.5f, -3.0f, -10.0f, -kInf}) check_gather(x, 0.8f, bound, "gather random");
    std::vector<float> z(V);
    for (int64_t i = 0; i < V; ++i) z[i] = -std::fabs(x[i]);
    check_kept_mass(z, -2.0f, "kept_mass random");
    check_kept_mass(z, -kInf, "kept_mass all");
    for (float floor : {-kInf, -8.0f, -2.0f, 0.0f}) check_gather_keys(z, floor, "gather_keys");
    for (int64_t i = 0; i < V; i += 3) z[i] = -2.0f;  // tokens exactly at the threshold are kept
    check_kept_mass(z, -2.0f, "kept_mass ties");
    // The max in the last token (in the tail after the last full vector/chunk), and tied maxima.
    std::vector<float> y = x;
    y[V - 1] = 100.0f;
    check_greedy(y, "greedy max last");
    check_scan_chunks(y, 0.8f, "scan_chunks max last");
    check_gather(y, 0.8f, -1.0f, "gather max last");
    for (int64_t i = 0; i < V; i += 3) y[i] = 100.0f;
    check_greedy(y, "greedy ties");
    // Flat rows (every token the same) and rows with -inf entries, a NaN, an +inf.
    std::vector<float> flat(V, 1.5f);
    check_greedy(flat, "greedy flat");
    check_scan_chunks(flat, 4.0f, "scan_chunks flat");
    check_gather(flat, 4.0f, -1e-3f, "gather flat");
    std::vector<float> neg = x;
    for (int64_t i = 0; i < V; i += 2) neg[i] = -kInf;
    check_greedy(neg, "greedy -inf");
    check_scan_chunks(neg, 0.8f, "scan_chunks -inf");
    check_gather(neg, 0.8f, -5.0f, "gather -inf");
    for (float bad : {kNaN, kInf, -kInf}) {
      std::vector<float> b = bad == -kInf ? std::vector<float>(V, -kInf) : x;
      b[V / 2] = bad;
      check_greedy(b, "greedy bad row");
      check_scan_chunks(b, 0.8f, "scan_chunks bad row");
    }
  }
  check_dot_blocks();
  if (failures) {
    std::printf("%d failures (%s)\n", failures, isa);
    return 1;
  }
  std::printf("ok %s\n", isa);
  return 0;
}
