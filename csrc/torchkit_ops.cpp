// torchkit CPU kernels: top-k selection fused with the error-feedback state update.
//
// Two passes over the vector instead of torch's add + abs + topk + gather + fill:
//   pass 1: compute v (EF14 stores it in e), histogram of |v| in 2048 bins (8 exponent + 3 mantissa
//           bits of the float: 1/8 octave per bin), per-chunk histograms merged afterwards;
//   pass 2: collect (index, v) above the k-th value's bin and the candidates inside it
//           (EControl writes e <- e + g - h here, after reading the old e);
//   resolve: exact mode picks the r largest candidates (two more radix levels, ties to the lower index),
//            approximate mode the first r in index order (a quota per chunk, no copy); a threshold bin of
//            heavy ties (zeros, g - h = 0, bf16-rounded values) is resolved by one or two refining passes over
//            the data instead of a copy of the bin; then the sparse state update.
// Bytes per element (fp32): EF14 16, EF21 16, EControl 28, top-k 8. Chunks are walked in index
// order, so results do not depend on the thread count.
//
// The one pass (top-k, EF14, EF21; docs/kernels.md design A), when the caller keeps a hint (one int per row: the
// last step's k-th largest key when exact, its threshold bin's lowest key when approximate): one pass computes v
// (EF14 stores it in e) and collects every entry whose key is at least the predicted lowest key, in index order:
// 1/16 octave below the hint (exact), or the hint's bin from its lowest key (approximate: the bin must be whole,
// as its entries are taken in index order). When they are at least k and at most 4k + 4096, the threshold and the
// resolve run on them only (EF14 12 B per element, EF21 8, top-k 4). Otherwise, and without a hint, the two passes
// run (over e as stored, after a failed one pass). The hint is then set for the next step. The selection and its
// output order are the same either way.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <cstring>
#include <vector>

namespace {

constexpr int kBins = 2048;
std::atomic<int64_t> one_pass_hits{0}, one_pass_misses{0};  // read by tests: which path the steps took

inline uint32_t key_of(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  // monotone in |v|; NaN above +inf, as torch.topk ranks it, every NaN one key: x86 keeps the payload of an add's
  // first NaN operand, and the passes that recompute v may order the operands differently, so a payload-dependent
  // key could move a NaN to another bin between the counting pass and the writing pass (writes past the output)
  const uint32_t k = u & 0x7FFFFFFFu;
  return k > 0x7F800000u ? 0x7FC00000u : k;
}
inline int bin_of(uint32_t key) { return static_cast<int>(key >> 20); }

enum Mode { kTopK = 0, kEF14 = 1, kEF21 = 2, kEControl = 3 };

struct Picked {
  std::vector<int64_t> idx;
  std::vector<float> val;
};

template <Mode mode, typename G>
struct Step {
  const G* g;     // gradient (or x for top-k)
  float* e;       // error (EF14, EControl)
  float* h;       // shift/estimate (EF21, EControl)
  float eta;
  int64_t d;
  bool stored = false;  // EF14: e holds v already (a one pass ran before the two passes)

  // v of pass 1; EF14 also stores it into e
  inline float pass1(int64_t i) const {
    if constexpr (mode == kTopK) return static_cast<float>(g[i]);
    if constexpr (mode == kEF14) {
      if (stored) return e[i];
      float v = e[i] + static_cast<float>(g[i]);
      e[i] = v;
      return v;
    }
    if constexpr (mode == kEF21) return static_cast<float>(g[i]) - h[i];
    if constexpr (mode == kEControl) { float t = static_cast<float>(g[i]) - h[i]; float a = e[i] * eta; return a + t; }
  }
  // v again without writing anything (after pass 1: EF14's e holds it); for the refining passes over ties
  inline float value(int64_t i) const {
    if constexpr (mode == kTopK) return static_cast<float>(g[i]);
    if constexpr (mode == kEF14) return e[i];
    if constexpr (mode == kEF21) return static_cast<float>(g[i]) - h[i];
    if constexpr (mode == kEControl) { float t = static_cast<float>(g[i]) - h[i]; float a = e[i] * eta; return a + t; }
  }
  // v of pass 2 (same value); EControl updates e here
  inline float pass2(int64_t i) const {
    if constexpr (mode == kTopK) return static_cast<float>(g[i]);
    if constexpr (mode == kEF14) return e[i];
    if constexpr (mode == kEF21) return static_cast<float>(g[i]) - h[i];
    if constexpr (mode == kEControl) {
      float t = static_cast<float>(g[i]) - h[i];
      float a = e[i] * eta;
      float u = a + t;
      e[i] = e[i] + t;
      return u;
    }
  }
};

// The sparse state update on the k sent entries; returns them.
template <Mode mode, typename G>
Picked finish(const Step<mode, G>& s, Picked&& out, int64_t k) {
  for (int64_t j = 0; j < k; ++j) {
    const int64_t i = out.idx[j];
    const float v = out.val[j];
    if constexpr (mode == kEF14) s.e[i] = 0.0f;
    if constexpr (mode == kEF21) s.h[i] = s.h[i] + v;
    if constexpr (mode == kEControl) { s.e[i] = s.e[i] - v; s.h[i] = s.h[i] + v; }
  }
  return std::move(out);
}

// The k entries as (values fp32, indices int32 below 2**31 entries, else int64) tensors
std::tuple<torch::Tensor, torch::Tensor> to_tensors(const Picked& out, int64_t d, const torch::Tensor& like) {
  const int64_t k = static_cast<int64_t>(out.idx.size());
  auto values = torch::empty({k}, like.options().dtype(torch::kFloat32));
  std::memcpy(values.data_ptr<float>(), out.val.data(), sizeof(float) * k);
  const auto idx_dtype = d < (int64_t(1) << 31) ? torch::kInt32 : torch::kInt64;
  auto indices = torch::empty({k}, like.options().dtype(idx_dtype));
  if (idx_dtype == torch::kInt32) {
    int32_t* p = indices.data_ptr<int32_t>();
    for (int64_t j = 0; j < k; ++j) p[j] = static_cast<int32_t>(out.idx[j]);
  } else {
    std::memcpy(indices.data_ptr<int64_t>(), out.idx.data(), sizeof(int64_t) * k);
  }
  return {values, indices};
}

constexpr uint32_t kMargin = 1u << 19;  // an exact one pass collects from 1/16 octave below the last k-th key

// The exact k-th key among a threshold bin's entries (index order) by two more radix levels (bits 9..19, then 0..8):
// the positions of every entry above it, then of the first ones equal to it (ties to the lower index); linear.
// `t`: that key.
std::vector<int64_t> resolve_bin(const Picked& all, int thr, int64_t need, uint32_t& t) {
  std::vector<int64_t> chosen;
  const int64_t n = static_cast<int64_t>(all.idx.size());
  if (n == need) {
    t = 0x7FFFFFFFu;
    for (int64_t j = 0; j < need; ++j) chosen.push_back(j), t = std::min(t, key_of(all.val[j]));
    return chosen;
  }
  std::vector<int64_t> h2(kBins, 0), h3(512, 0);
  for (int64_t j = 0; j < n; ++j) ++h2[(key_of(all.val[j]) >> 9) & 0x7FF];
  int64_t want = need, b2 = kBins - 1;
  for (; b2 > 0 && h2[b2] < want; --b2) want -= h2[b2];
  const uint32_t p3 = (static_cast<uint32_t>(thr) << 11) | static_cast<uint32_t>(b2);
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t key = key_of(all.val[j]);
    if ((key >> 9) == p3) ++h3[key & 0x1FF];
  }
  int64_t b3 = 511;
  for (; b3 > 0 && h3[b3] < want; --b3) want -= h3[b3];
  t = (p3 << 9) | static_cast<uint32_t>(b3);  // the k-th largest key; `want` of it are taken
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t key = key_of(all.val[j]);
    if (key > t || (key == t && want-- > 0)) chosen.push_back(j);
  }
  return chosen;
}

// Chunks a pass over d entries walks in index order (the same split in every pass: results do not depend on the
// thread count): at least 65536 entries each, at most 8 per thread.
int64_t chunks_of(int64_t d) {
  return std::min<int64_t>(std::max<int64_t>(1, d / 65536), 8 * std::max<int64_t>(1, at::get_num_threads()));
}

// The bin holding the k-th largest key, from per-chunk histograms (`nchunks` x kBins): `total` gets the merged
// histogram, `above` the entries in the bins above it.
int threshold_bin(const std::vector<int64_t>& hist, int64_t nchunks, int64_t k, std::vector<int64_t>& total,
                  int64_t& above) {
  total.assign(kBins, 0);
  for (int64_t c = 0; c < nchunks; ++c)
    for (int b = 0; b < kBins; ++b) total[b] += hist[c * kBins + b];
  int thr = kBins - 1;
  above = 0;
  for (; thr > 0; --thr) {
    if (above + total[thr] >= k) break;
    above += total[thr];
  }
  return thr;
}

// The hint a step leaves for the next one pass: the k-th largest key (exact), or the threshold bin's lowest key
int32_t next_hint(uint32_t t, int thr, bool approx) { return static_cast<int32_t>(approx ? uint32_t(thr) << 20 : t); }

// The two passes (see the top of this file); `hint`, when given, receives what this step found (next_hint).
template <Mode mode, typename G>
Picked two_passes(const Step<mode, G>& s, int64_t k, bool approx, int32_t* hint) {
  const int64_t d = s.d;
  const int64_t nchunks = chunks_of(d), chunk = (d + nchunks - 1) / nchunks;

  std::vector<int64_t> hist(static_cast<size_t>(nchunks) * kBins, 0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      // four interleaved sub-histograms: equal neighbouring bins do not serialise on one counter
      std::vector<int32_t> sub(4 * kBins, 0);
      const int64_t begin = c * chunk, end = std::min(d, (c + 1) * chunk);
      int64_t i = begin;
      for (; i + 4 <= end; i += 4) {
        const int b0 = bin_of(key_of(s.pass1(i))), b1 = bin_of(key_of(s.pass1(i + 1)));
        const int b2 = bin_of(key_of(s.pass1(i + 2))), b3 = bin_of(key_of(s.pass1(i + 3)));
        sub[b0]++;
        sub[kBins + b1]++;
        sub[2 * kBins + b2]++;
        sub[3 * kBins + b3]++;
      }
      for (; i < end; ++i) sub[bin_of(key_of(s.pass1(i)))]++;
      int64_t* hc = hist.data() + c * kBins;
      for (int b = 0; b < kBins; ++b) hc[b] = sub[b] + sub[kBins + b] + sub[2 * kBins + b] + sub[3 * kBins + b];
    }
  });
  std::vector<int64_t> total;
  int64_t above = 0;
  const int thr = threshold_bin(hist, nchunks, k, total, above);
  const int64_t need = k - above;  // taken from the threshold bin
  const int64_t cand = total[thr];

  // How the threshold bin is resolved. Every path keeps one output order: the entries above the bin in index
  // order, then the ones taken from the bin in index order (ties to the lower index).
  //  - few candidates (exact): copied out, resolved by two more radix levels over the copies;
  //  - approximate: each chunk takes the first of its bin entries in index order up to its quota, in pass 2;
  //  - many candidates (exact; a bin of heavy ties: zeros, g - h = 0, bf16-rounded values): the exact k-th key t
  //    is found by refining passes over the data restricted to the bin (bits 9..19, then 0..8, the second only
  //    when the bin holds different keys), and pass 2 takes the keys above t and each chunk's quota of keys
  //    equal to t. No copy of the bin, so a bin of all d entries costs one or two more reading passes.
  const bool refine = !approx && cand > std::max<int64_t>(4 * need, int64_t(1) << 16);
  std::vector<int64_t> take(nchunks, 0);  // per chunk: bin entries taken (approx), or keys == t taken (refine)
  std::vector<int64_t> gt(nchunks, 0);    // refine: per chunk, the bin's keys above t
  uint32_t t_key = 0;
  if (approx) {
    int64_t left = need;
    for (int64_t c = 0; c < nchunks; ++c) {
      take[c] = std::min<int64_t>(hist[c * kBins + thr], left);
      left -= take[c];
    }
  } else if (refine) {
    // level 2: bits 9..19 of the keys in the bin (four interleaved sub-histograms, as in pass 1: a bin of equal
    // keys would otherwise serialise on one counter), and whether the chunk's keys in the bin are all one key
    std::vector<int64_t> h2(static_cast<size_t>(nchunks) * kBins, 0);
    std::vector<uint32_t> first(nchunks, 0xFFFFFFFFu);
    std::vector<char> same(nchunks, 1);
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        std::vector<int32_t> sub(4 * kBins, 0);
        const int64_t begin = c * chunk, end = std::min(d, (c + 1) * chunk);
        uint32_t one = 0xFFFFFFFFu;
        bool alike = true;
        for (int64_t i = begin; i < end; ++i) {
          const uint32_t key = key_of(s.value(i));
          if (bin_of(key) != thr) continue;
          if (one == 0xFFFFFFFFu) one = key;
          alike &= (key == one);
          ++sub[(i & 3) * kBins + static_cast<int>((key >> 9) & 0x7FF)];
        }
        int64_t* hc = h2.data() + c * kBins;
        for (int b = 0; b < kBins; ++b) hc[b] = sub[b] + sub[kBins + b] + sub[2 * kBins + b] + sub[3 * kBins + b];
        first[c] = one;
        same[c] = alike;
      }
    });
    std::vector<int64_t> t2(kBins, 0);
    for (int64_t c = 0; c < nchunks; ++c)
      for (int b = 0; b < kBins; ++b) t2[b] += h2[c * kBins + b];
    int64_t want = need;
    int b2 = kBins - 1;
    for (; b2 > 0 && t2[b2] < want; --b2) want -= t2[b2];
    uint32_t one = 0xFFFFFFFFu;
    bool uniform = true;  // the whole bin is one key (zeros, g - h = 0, a constant): no third level needed
    for (int64_t c = 0; c < nchunks; ++c) {
      if (first[c] == 0xFFFFFFFFu) continue;
      if (one == 0xFFFFFFFFu) one = first[c];
      uniform = uniform && same[c] && first[c] == one;
    }
    const uint32_t p3 = (static_cast<uint32_t>(thr) << 11) | static_cast<uint32_t>(b2);
    std::vector<int64_t> eq(nchunks, 0);
    for (int64_t c = 0; c < nchunks; ++c)
      for (int b = b2 + 1; b < kBins; ++b) gt[c] += h2[c * kBins + b];
    if (uniform) {  // one key in the bin: it is the k-th
      t_key = one;
      for (int64_t c = 0; c < nchunks; ++c) eq[c] = h2[c * kBins + b2];
    } else {  // level 3: bits 0..8 of the keys in the sub-bin
      std::vector<int64_t> h3(static_cast<size_t>(nchunks) * 512, 0);
      at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          int64_t* hc = h3.data() + c * 512;
          const int64_t end = std::min(d, (c + 1) * chunk);
          for (int64_t i = c * chunk; i < end; ++i) {
            const uint32_t key = key_of(s.value(i));
            if ((key >> 9) == p3) ++hc[key & 0x1FF];
          }
        }
      });
      std::vector<int64_t> t3(512, 0);
      for (int64_t c = 0; c < nchunks; ++c)
        for (int b = 0; b < 512; ++b) t3[b] += h3[c * 512 + b];
      int b3 = 511;
      for (; b3 > 0 && t3[b3] < want; --b3) want -= t3[b3];
      t_key = (p3 << 9) | static_cast<uint32_t>(b3);
      for (int64_t c = 0; c < nchunks; ++c) {
        eq[c] = h3[c * 512 + b3];
        for (int b = b3 + 1; b < 512; ++b) gt[c] += h3[c * 512 + b];
      }
    }
    for (int64_t c = 0; c < nchunks; ++c) {  // `want` keys equal to t, the lowest indices first
      take[c] = std::min<int64_t>(eq[c], want);
      want -= take[c];
    }
  }

  // each chunk's counts give its exact output positions: pass 2 writes straight to final positions
  std::vector<int64_t> hi_off(nchunks + 1, 0), cand_off(nchunks + 1, 0), lo_off(nchunks + 1, 0);
  for (int64_t c = 0; c < nchunks; ++c) {
    int64_t n_hi = 0;
    for (int b = thr + 1; b < kBins; ++b) n_hi += hist[c * kBins + b];
    hi_off[c + 1] = hi_off[c] + n_hi;
    cand_off[c + 1] = cand_off[c] + ((approx || refine) ? 0 : hist[c * kBins + thr]);
  }
  Picked out, all;
  out.idx.resize(k);
  out.val.resize(k);
  all.idx.resize(cand_off[nchunks]);
  all.val.resize(cand_off[nchunks]);
  if (refine) {  // the bin's entries taken per chunk: its keys above t and its quota of keys equal to t
    for (int64_t c = 0; c < nchunks; ++c) lo_off[c + 1] = lo_off[c] + gt[c] + take[c];
  } else if (approx) {
    for (int64_t c = 0; c < nchunks; ++c) lo_off[c + 1] = lo_off[c] + take[c];
  }
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t end = std::min(d, (c + 1) * chunk);
      int64_t ph = hi_off[c], pc = cand_off[c], pl = above + lo_off[c], left = take[c];
      for (int64_t i = c * chunk; i < end; ++i) {
        const float v = s.pass2(i);
        const uint32_t key = key_of(v);
        const int b = bin_of(key);
        if (b > thr) {
          out.idx[ph] = i;
          out.val[ph++] = v;
        } else if (b == thr) {
          if (refine) {
            if (key > t_key || (key == t_key && left-- > 0)) {
              out.idx[pl] = i;
              out.val[pl++] = v;
            }
          } else if (approx) {
            if (left-- > 0) {
              out.idx[pl] = i;
              out.val[pl++] = v;
            }
          } else {
            all.idx[pc] = i;
            all.val[pc++] = v;
          }
        }
      }
    }
  });
  if (!approx && !refine) {
    int64_t pos = above;
    for (int64_t j : resolve_bin(all, thr, need, t_key)) {
      out.idx[pos] = all.idx[j];
      out.val[pos++] = all.val[j];
    }
  } else {
    TORCH_CHECK(lo_off[nchunks] == need, "torchkit: internal count mismatch in the threshold bin");
  }
  TORCH_CHECK(hi_off[nchunks] == above, "torchkit: internal count mismatch");
  if (hint) *hint = next_hint(t_key, thr, approx);
  return finish(s, std::move(out), k);
}

// The one pass: v of every entry (EF14 stores it in e) and the entries from key `lo` up, collected in index order
// with a histogram of their bins per chunk; then the threshold bin and the selection from those only, chunks in
// parallel. kTooFew or kTooMany (nothing selected; EF14's e holds v) when they are fewer than k or more than
// 4k + 4096: the caller runs the two passes. `thr`: the threshold bin found; `t`: the k-th key (exact). Collection stops (v is still
// computed and, for EF14, stored) once more than 4k + 4096 entries were found: the memory stays bounded.
enum OnePass { kHit = 0, kTooFew, kTooMany };
template <Mode mode, typename G>
OnePass one_pass(const Step<mode, G>& s, int64_t k, bool approx, uint32_t lo, Picked& out, int& thr, uint32_t& t) {
  const int64_t d = s.d;
  const int64_t nchunks = chunks_of(d), chunk = (d + nchunks - 1) / nchunks;
  const int64_t cap = 4 * k + 4096;
  std::vector<Picked> cand(nchunks);
  std::vector<int64_t> hist(static_cast<size_t>(nchunks) * kBins, 0);  // the candidates' bins, per chunk
  std::atomic<int64_t> held{0};
  std::atomic<bool> over{false};
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    // a local copy of the step and a small local buffer: the loop keeps its pointers in registers, and only the
    // rare flush into the chunk's list calls out
    const Step<mode, G> st = s;
    constexpr int kBuf = 256;
    int64_t buf_i[kBuf];
    float buf_v[kBuf];
    for (int64_t c = c0; c < c1; ++c) {
      Picked& p = cand[c];
      p.idx.reserve(static_cast<size_t>(2 * k / nchunks + kBuf));  // about 1.2-1.6 k candidates in all
      p.val.reserve(static_cast<size_t>(2 * k / nchunks + kBuf));
      auto flush = [&](int n) {
        if (over.load(std::memory_order_relaxed)) return;
        if (held.fetch_add(n, std::memory_order_relaxed) + n > cap) {
          over.store(true, std::memory_order_relaxed);
          return;
        }
        p.idx.insert(p.idx.end(), buf_i, buf_i + n);
        p.val.insert(p.val.end(), buf_v, buf_v + n);
      };
      const int64_t end = std::min(d, (c + 1) * chunk);
      int n = 0;
      for (int64_t i = c * chunk; i < end; ++i) {
        const float v = st.pass1(i);
        if (key_of(v) >= lo) {
          buf_i[n] = i;
          buf_v[n] = v;
          if (++n == kBuf) flush(n), n = 0;
        }
      }
      flush(n);
      int64_t* hc = hist.data() + c * kBins;
      for (float v : p.val) ++hc[bin_of(key_of(v))];
    }
  });
  if (over.load()) return kTooMany;
  int64_t n = 0;
  for (const Picked& p : cand) n += static_cast<int64_t>(p.idx.size());
  if (n < k) return kTooFew;
  std::vector<int64_t> total;
  int64_t above = 0;
  thr = threshold_bin(hist, nchunks, k, total, above);
  const int64_t need = k - above;
  // per chunk: where its entries above the bin go, where its bin entries go (exact: into the bin's list;
  // approximate: its quota of the remaining slots, in index order)
  std::vector<int64_t> hi_off(nchunks + 1, 0), bin_off(nchunks + 1, 0);
  for (int64_t c = 0; c < nchunks; ++c) {
    int64_t n_hi = 0;
    for (int b = thr + 1; b < kBins; ++b) n_hi += hist[c * kBins + b];
    hi_off[c + 1] = hi_off[c] + n_hi;
    bin_off[c + 1] = bin_off[c] + hist[c * kBins + thr];
  }
  out.idx.resize(k);
  out.val.resize(k);
  Picked in_bin;  // exact: the threshold bin's candidates, resolved below
  in_bin.idx.resize(approx ? 0 : bin_off[nchunks]);
  in_bin.val.resize(approx ? 0 : bin_off[nchunks]);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Picked& p = cand[c];
      int64_t ph = hi_off[c], pb = bin_off[c];
      for (size_t j = 0; j < p.idx.size(); ++j) {
        const int b = bin_of(key_of(p.val[j]));
        if (b > thr) {
          out.idx[ph] = p.idx[j];
          out.val[ph++] = p.val[j];
        } else if (b == thr) {
          if (!approx) {
            in_bin.idx[pb] = p.idx[j];
            in_bin.val[pb++] = p.val[j];
          } else if (pb < need) {  // approximate: the bin's first `need` entries in index order
            out.idx[above + pb] = p.idx[j];
            out.val[above + pb++] = p.val[j];
          }
        }
      }
    }
  });
  int64_t pl = approx ? above + std::min(need, bin_off[nchunks]) : above;
  if (!approx) {
    for (int64_t j : resolve_bin(in_bin, thr, need, t)) {
      out.idx[pl] = in_bin.idx[j];
      out.val[pl++] = in_bin.val[j];
    }
  }
  TORCH_CHECK(hi_off[nchunks] == above && pl == k, "torchkit: internal count mismatch in the one pass");
  return kHit;
}

// Small vectors with few entries to select (a bias or a norm's weight in a per-tensor bucket, a chunk of a chunked
// TopK), where the two passes' setup (about 80 KB of counters cleared per call, 2.5-3 us) costs more than the
// selection: one pass computes v (EF14 stores it in e), keeps keys and values in a per-thread buffer and the k
// largest keys seen so far in a heap whose root is the k-th (an equal key never displaces an earlier index: ties go
// to the lower index); then the output in the two passes' order: the entries above the k-th key's bin, then those
// taken from the bin (exact: the heap's; approximate: the bin's first in index order), each in index order, and
// the state update. The same result as the two passes, bit for bit (tests/test_ops.py turns this path off to
// compare); no hint is read or written (a vector of this size always comes here). Taken while the heap's expected
// replacements, k (1 + ln(d / k)) for keys in random order, stay under 64 (at about 50 ns each): on the 2-core
// development CPU, EF14's step per segment of 100 / 512 / 1024 entries at 1% took 0.25 / 1.2 / 2.5 us against
// 2.8 / 3.4 / 4.0 us; at 1024 entries and k = 32 the heap lost (5.7 against 4.3 us).
int64_t small_limit = 1 << 12;
bool small_takes(int64_t d, int64_t k) {
  return d <= small_limit && static_cast<double>(k) * (1.0 + std::log(static_cast<double>(d) / k)) <= 64.0;
}

template <Mode mode, typename G>
Picked small_step(const Step<mode, G>& s, int64_t k, bool approx) {
  const int64_t d = s.d;
  thread_local std::vector<uint32_t> keys;
  thread_local std::vector<float> vals;
  thread_local std::vector<std::pair<uint32_t, int64_t>> heap;  // (key, index), root: the smallest, latest
  if (static_cast<int64_t>(keys.size()) < d) keys.resize(d), vals.resize(d);
  heap.clear();
  // the root is the entry the next larger key displaces: the smallest key, and among equal keys the latest index
  auto worse = [](const std::pair<uint32_t, int64_t>& a, const std::pair<uint32_t, int64_t>& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  };
  uint32_t* kp = keys.data();  // local pointers: the state writes of pass1 may not alias them
  float* vp = vals.data();
  const Step<mode, G> st = s;
  int64_t i = 0;
  for (; i < std::min(d, k); ++i) {
    const float v = st.pass1(i);
    kp[i] = key_of(v);
    vp[i] = v;
    heap.emplace_back(kp[i], i);
  }
  std::make_heap(heap.begin(), heap.end(), worse);
  uint32_t root = heap.front().first;
  for (; i < d; ++i) {
    const float v = st.pass1(i);
    const uint32_t key = key_of(v);
    kp[i] = key;
    vp[i] = v;
    if (key > root) {
      std::pop_heap(heap.begin(), heap.end(), worse);
      heap.back() = {key, i};
      std::push_heap(heap.begin(), heap.end(), worse);
      root = heap.front().first;
    }
  }
  if constexpr (mode == kEControl) {
    for (int64_t j = 0; j < d; ++j) st.pass2(j);  // e <- e + g - h (the value is the one pass 1 computed)
  }
  const int thr = bin_of(root);
  Picked out;
  out.idx.reserve(k);
  out.val.reserve(k);
  for (int64_t j = 0; j < d; ++j) {
    if (bin_of(kp[j]) > thr) out.idx.push_back(j), out.val.push_back(vp[j]);
  }
  if (approx) {
    for (int64_t j = 0; j < d && static_cast<int64_t>(out.idx.size()) < k; ++j) {
      if (bin_of(kp[j]) == thr) out.idx.push_back(j), out.val.push_back(vp[j]);
    }
  } else {
    std::vector<int64_t> chosen;
    for (const auto& [key, j] : heap) {
      if (bin_of(key) == thr) chosen.push_back(j);
    }
    std::sort(chosen.begin(), chosen.end());
    for (int64_t j : chosen) out.idx.push_back(j), out.val.push_back(vp[j]);
  }
  TORCH_CHECK(static_cast<int64_t>(out.idx.size()) == k, "torchkit: internal count mismatch in the small path");
  return finish(s, std::move(out), k);
}

// The lowest key the one pass collects from a hint: kMargin below it (exact), or its bin's lowest key (approximate)
uint32_t lowest(uint32_t hint, bool approx) { return approx ? hint >> 20 << 20 : (hint > kMargin ? hint - kMargin : 0u); }

// One step: the one pass when a hint is kept (not EControl, whose pass 2 writes e), else, or after it failed, the
// two passes; the hint then holds what this step found. A hint from which the one pass would collect everything
// (lowest key 0: more than d - k zeros) goes straight to the two passes; after a one pass that found more entries
// than it may hold from where this step's own hint would start (a threshold bin of heavy ties), the next kBackOff
// steps do; after one that found too few (the threshold fell by more than the margin), the next starts 3 margins
// below this step's threshold.
constexpr int32_t kBackOff = 16;
template <Mode mode, typename G>
Picked run(const Step<mode, G>& s, int64_t k, bool approx, int32_t* hint) {
  if (small_takes(s.d, k)) return small_step(s, k, approx);
  if (mode == kEControl || !hint) return two_passes(s, k, approx, nullptr);
  if (*hint < -1) {  // backing off: the two passes, counting down to a cold start
    ++*hint;
    return two_passes(s, k, approx, nullptr);
  }
  const uint32_t lo = lowest(static_cast<uint32_t>(*hint), approx);
  if (*hint < 0 || lo == 0) return two_passes(s, k, approx, hint);
  Picked out;
  int thr = 0;
  uint32_t t = 0;
  const OnePass got = one_pass(s, k, approx, lo, out, thr, t);
  if (got == kHit) {
    ++one_pass_hits;
    *hint = next_hint(t, thr, approx);
    return finish(s, std::move(out), k);
  }
  ++one_pass_misses;
  Step<mode, G> stored = s;  // EF14's e holds v now
  stored.stored = true;
  Picked result = two_passes(stored, k, approx, hint);
  const uint32_t now = static_cast<uint32_t>(*hint);  // what this step found
  if (got == kTooMany && lo >= lowest(now, approx)) {
    *hint = -1 - kBackOff;  // too many from where this step's own hint would start: a bin of ties
  } else if (got == kTooFew && now > 2 * kMargin) {
    *hint = static_cast<int32_t>(now - 2 * kMargin);  // the threshold fell past the margin: start wider next step
  }
  return result;
}

#define TK_CHECK_CPU_VEC(t) \
  TORCH_CHECK((t).device().is_cpu() && ((t).dim() == 1 || (t).dim() == 2) && (t).is_contiguous(), \
              #t " must be a contiguous 1-D (or [rows, d]) CPU tensor")
#define TK_CHECK_F32(t) TORCH_CHECK((t).scalar_type() == torch::kFloat32, #t " must be float32, got ", (t).scalar_type())

template <Mode mode, typename G>
std::tuple<torch::Tensor, torch::Tensor> run_rows(const torch::Tensor& g, float* ep, float* hp, float eta, int64_t k,
                                                  bool approx, int32_t* hint) {
  const G* gp = g.data_ptr<G>();
  if (g.dim() == 1) return to_tensors(run(Step<mode, G>{gp, ep, hp, eta, g.numel()}, k, approx, hint), g.numel(), g);
  // [rows, d]: every row its own top-k (a chunked TopK's full chunks, the simulator's workers), k per row; rows
  // in parallel when there are enough of them (each row then runs serially: a nested parallel_for runs inline),
  // else one after the other, each in parallel. Row-local indices.
  const int64_t rows = g.size(0), d = g.size(1);  // k in [1, d]: checked by dispatch
  std::vector<std::tuple<torch::Tensor, torch::Tensor>> out(static_cast<size_t>(rows));
  auto one = [&](int64_t r) {
    out[r] = to_tensors(run(Step<mode, G>{gp + r * d, ep ? ep + r * d : nullptr, hp ? hp + r * d : nullptr, eta, d}, k,
                            approx, hint ? hint + r : nullptr),
                        d, g);
  };
  if (rows >= at::get_num_threads()) {
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) { for (int64_t r = r0; r < r1; ++r) one(r); });
  } else {
    for (int64_t r = 0; r < rows; ++r) one(r);
  }
  std::vector<torch::Tensor> vals, idxs;
  for (auto& [v, i] : out) { vals.push_back(v); idxs.push_back(i); }
  return {torch::stack(vals), torch::stack(idxs)};
}

// The one pass's hint (one int32 per row or segment: what its last step found, -1 for none), or null without one
int32_t* checked_hint(const c10::optional<torch::Tensor>& hint, int64_t n, const char* what) {
  if (!hint.has_value() || !hint->defined()) return nullptr;
  TORCH_CHECK(hint->device().is_cpu() && hint->scalar_type() == torch::kInt32 && hint->is_contiguous() &&
                  hint->numel() == n,
              "hint must be a contiguous CPU int32 tensor of ", what, " (", n, ")");
  return hint->data_ptr<int32_t>();
}

template <Mode mode>
std::tuple<torch::Tensor, torch::Tensor> dispatch(const torch::Tensor& g, torch::Tensor e, torch::Tensor h,
                                                  int64_t k, double eta, bool approx,
                                                  const c10::optional<torch::Tensor>& hint = c10::nullopt) {
  TK_CHECK_CPU_VEC(g);
  const int64_t d = g.size(-1);
  TORCH_CHECK(k >= 1 && k <= d, "k must be in [1, d], got k=", k, " for d=", d);
  for (const auto& t : {e, h})
    TORCH_CHECK(!t.defined() || t.sizes() == g.sizes(), "the state must be shaped as grad, ", g.sizes());
  int32_t* hint_p = checked_hint(hint, g.dim() == 1 ? 1 : g.size(0), "one entry per row");
  float* ep = e.defined() ? e.data_ptr<float>() : nullptr;
  float* hp = h.defined() ? h.data_ptr<float>() : nullptr;
  const float f = static_cast<float>(eta);
  switch (g.scalar_type()) {
    case torch::kFloat32:
      return run_rows<mode, float>(g, ep, hp, f, k, approx, hint_p);
    case torch::kBFloat16:
      return run_rows<mode, c10::BFloat16>(g, ep, hp, f, k, approx, hint_p);
    case torch::kHalf:
      return run_rows<mode, c10::Half>(g, ep, hp, f, k, approx, hint_p);
    default:
      TORCH_CHECK(false, "grad must be float32, bfloat16 or float16, got ", g.scalar_type());
  }
}

// Consecutive segments of one 1-D vector, each its own top-k_s (a bucket of many tensors compressed tensor by
// tensor), in one call: segments in parallel when there are enough of them (each then runs serially), else one
// after the other, each in parallel. Values and indices concatenated in segment order, indices into the vector.
template <Mode mode, typename G>
std::tuple<torch::Tensor, torch::Tensor> run_segments(const torch::Tensor& g, float* ep, float* hp, float eta,
                                                      const std::vector<int64_t>& sizes,
                                                      const std::vector<int64_t>& ks, bool approx, int32_t* hint) {
  const G* gp = g.data_ptr<G>();
  const int64_t n = static_cast<int64_t>(sizes.size()), d = g.numel();
  std::vector<int64_t> start(n + 1, 0), at(n + 1, 0);
  for (int64_t s = 0; s < n; ++s) start[s + 1] = start[s] + sizes[s], at[s + 1] = at[s] + ks[s];
  auto values = torch::empty({at[n]}, g.options().dtype(torch::kFloat32));
  const bool narrow = d < (int64_t(1) << 31);
  auto indices = torch::empty({at[n]}, g.options().dtype(narrow ? torch::kInt32 : torch::kInt64));
  float* vp = values.data_ptr<float>();
  auto one = [&](int64_t s) {
    const int64_t a = start[s];
    const Picked p = run(Step<mode, G>{gp + a, ep ? ep + a : nullptr, hp ? hp + a : nullptr, eta, sizes[s]}, ks[s],
                         approx, hint ? hint + s : nullptr);
    std::memcpy(vp + at[s], p.val.data(), sizeof(float) * ks[s]);
    const int64_t* ip = p.idx.data();  // segment-local indices
    auto copy = [&](auto* out) {
      for (int64_t j = 0; j < ks[s]; ++j) out[at[s] + j] = static_cast<std::remove_pointer_t<decltype(out)>>(a + ip[j]);
    };
    if (narrow) copy(indices.data_ptr<int32_t>());
    else copy(indices.data_ptr<int64_t>());
  };
  if (n >= at::get_num_threads()) {
    at::parallel_for(0, n, 1, [&](int64_t s0, int64_t s1) { for (int64_t s = s0; s < s1; ++s) one(s); });
  } else {
    for (int64_t s = 0; s < n; ++s) one(s);
  }
  return {values, indices};
}

template <Mode mode>
std::tuple<torch::Tensor, torch::Tensor> dispatch_segments(const torch::Tensor& g, torch::Tensor e, torch::Tensor h,
                                                           const std::vector<int64_t>& sizes,
                                                           const std::vector<int64_t>& ks, double eta, bool approx,
                                                           const c10::optional<torch::Tensor>& hint) {
  TORCH_CHECK(g.device().is_cpu() && g.dim() == 1 && g.is_contiguous(), "grad must be a contiguous 1-D CPU tensor");
  TORCH_CHECK(sizes.size() == ks.size() && !sizes.empty(), "one k per segment, at least one segment");
  int64_t total = 0;
  for (size_t s = 0; s < sizes.size(); ++s) {
    TORCH_CHECK(ks[s] >= 1 && ks[s] <= sizes[s], "segment ", s, ": k must be in [1, ", sizes[s], "], got ", ks[s]);
    total += sizes[s];
  }
  TORCH_CHECK(total == g.numel(), "the segments hold ", total, " entries, grad ", g.numel());
  for (const auto& t : {e, h}) {
    if (!t.defined()) continue;
    TK_CHECK_CPU_VEC(t); TK_CHECK_F32(t);
    TORCH_CHECK(t.sizes() == g.sizes(), "the state must be shaped as grad, ", g.sizes());
  }
  float* ep = e.defined() ? e.data_ptr<float>() : nullptr;
  float* hp = h.defined() ? h.data_ptr<float>() : nullptr;
  int32_t* hint_p = checked_hint(hint, static_cast<int64_t>(sizes.size()), "one entry per segment");
  const float f = static_cast<float>(eta);
  switch (g.scalar_type()) {
    case torch::kFloat32:
      return run_segments<mode, float>(g, ep, hp, f, sizes, ks, approx, hint_p);
    case torch::kBFloat16:
      return run_segments<mode, c10::BFloat16>(g, ep, hp, f, sizes, ks, approx, hint_p);
    case torch::kHalf:
      return run_segments<mode, c10::Half>(g, ep, hp, f, sizes, ks, approx, hint_p);
    default:
      TORCH_CHECK(false, "grad must be float32, bfloat16 or float16, got ", g.scalar_type());
  }
}

}  // namespace

// `hint` (optional): the one pass's per-row int32 prediction, read and updated (see the top of this file)
std::tuple<torch::Tensor, torch::Tensor> topk(torch::Tensor x, int64_t k, c10::optional<torch::Tensor> hint) {
  return dispatch<kTopK>(x, {}, {}, k, 0.0, false, hint);
}

std::tuple<torch::Tensor, torch::Tensor> ef14_step(torch::Tensor g, torch::Tensor e, int64_t k, bool approx,
                                                   c10::optional<torch::Tensor> hint) {
  TK_CHECK_CPU_VEC(e); TK_CHECK_F32(e);
  return dispatch<kEF14>(g, e, {}, k, 0.0, approx, hint);
}

std::tuple<torch::Tensor, torch::Tensor> ef21_step(torch::Tensor g, torch::Tensor h, int64_t k, bool approx,
                                                   c10::optional<torch::Tensor> hint) {
  TK_CHECK_CPU_VEC(h); TK_CHECK_F32(h);
  return dispatch<kEF21>(g, {}, h, k, 0.0, approx, hint);
}

std::tuple<torch::Tensor, torch::Tensor> econtrol_step(torch::Tensor g, torch::Tensor e, torch::Tensor h, int64_t k,
                                                       double eta, bool approx) {
  TK_CHECK_CPU_VEC(e); TK_CHECK_F32(e);
  TK_CHECK_CPU_VEC(h); TK_CHECK_F32(h);
  return dispatch<kEControl>(g, e, h, k, eta, approx);
}

// mode 1 EF14 (error), 2 EF21 (shift), 3 EControl (error, shift): as torchkit/ops/_select.py numbers them
std::tuple<torch::Tensor, torch::Tensor> segments_step(int64_t mode, torch::Tensor g, c10::optional<torch::Tensor> e,
                                                       c10::optional<torch::Tensor> h, std::vector<int64_t> sizes,
                                                       std::vector<int64_t> ks, double eta, bool approx,
                                                       c10::optional<torch::Tensor> hint) {
  const torch::Tensor ee = e.has_value() ? *e : torch::Tensor(), hh = h.has_value() ? *h : torch::Tensor();
  switch (mode) {
    case 1:
      TORCH_CHECK(ee.defined() && !hh.defined(), "EF14 takes error only");
      return dispatch_segments<kEF14>(g, ee, hh, sizes, ks, 0.0, approx, hint);
    case 2:
      TORCH_CHECK(!ee.defined() && hh.defined(), "EF21 takes shift only");
      return dispatch_segments<kEF21>(g, ee, hh, sizes, ks, 0.0, approx, hint);
    case 3:
      TORCH_CHECK(ee.defined() && hh.defined(), "EControl takes error and shift");
      return dispatch_segments<kEControl>(g, ee, hh, sizes, ks, eta, approx, c10::nullopt);
    default:
      TORCH_CHECK(false, "mode must be 1 (EF14), 2 (EF21) or 3 (EControl), got ", mode);
  }
}

// out[idx[w, j]] += scale[w] * val[w, j], worker rows in order; indices are unique within a row,
// so the entries of one row are updated in parallel without races. The decode of a round in one call:
// `zero` starts out from zeros, and a non-finite sum of the `poison` checks (each finite exactly when its
// worker's message was; see torchkit.ops.nonfinite_check) makes every entry NaN instead.
void accumulate(torch::Tensor out, torch::Tensor values, torch::Tensor indices, const std::vector<double>& scales, bool zero,
                c10::optional<torch::Tensor> poison) {
  TK_CHECK_CPU_VEC(out); TK_CHECK_F32(out);
  TORCH_CHECK(values.dim() == 2 && indices.sizes() == values.sizes(), "values and indices must be [rows, k]");
  const int64_t rows = values.size(0), k = values.size(1), d = out.numel();
  TORCH_CHECK(static_cast<int64_t>(scales.size()) == rows, "one scale per worker row");
  // rows may sit apart (the rows of gathered wire bytes, read in place); each row's entries are contiguous
  auto rowwise = [](const torch::Tensor& t, torch::ScalarType type) {
    return t.scalar_type() == type && t.stride(1) == 1 ? t : t.to(type).contiguous();
  };
  auto v = rowwise(values, torch::kFloat32);  // no copy for fp32 values and int32/int64 indices
  auto ix = rowwise(indices, indices.scalar_type() == torch::kInt32 ? torch::kInt32 : torch::kInt64);
  const float* vp = v.data_ptr<float>();
  const int64_t vs = v.stride(0), is = ix.stride(0);
  // every index within out before anything changes (ValueError in Python; the adds would stop half-way)
  auto in_range = [&](const auto* ip) {
    std::atomic<bool> outside{false};
    for (int64_t w = 0; w < rows; ++w) {
      at::parallel_for(0, k, 1 << 16, [&](int64_t j0, int64_t j1) {
        bool any = false;  // no early exit: the loop vectorises
        for (int64_t j = j0; j < j1; ++j) any |= (ip[w * is + j] < 0) | (ip[w * is + j] >= d);
        if (any) outside.store(true, std::memory_order_relaxed);
      });
    }
    for (int64_t w = 0; outside.load() && w < rows; ++w)  // the first one, for the message
      for (int64_t j = 0; j < k; ++j) {
        const int64_t i = ip[w * is + j];
        TORCH_CHECK_VALUE(i >= 0 && i < d, "indices must be in [0, ", d, ") (the length of out), got ", i);
      }
  };
  if (ix.scalar_type() == torch::kInt32) in_range(ix.data_ptr<int32_t>());
  else in_range(ix.data_ptr<int64_t>());
  float* o = out.data_ptr<float>();
  if (poison.has_value()) {
    auto checks = poison->to(torch::kFloat64).reshape({-1});  // the rows' checks in place: one stride apart
    const double* cp = checks.data_ptr<double>();
    double sum = 0.0;
    for (int64_t i = 0; i < checks.numel(); ++i) sum += cp[i * checks.stride(0)];
    if (!std::isfinite(sum)) {  // a worker's message held NaN or Inf: the whole estimate is NaN, nothing to add
      const float nan = std::numeric_limits<float>::quiet_NaN();
      at::parallel_for(0, d, 1 << 16, [&](int64_t a, int64_t b) { std::fill(o + a, o + b, nan); });
      return;
    }
  }
  if (zero) at::parallel_for(0, d, 1 << 16, [&](int64_t a, int64_t b) { std::fill(o + a, o + b, 0.0f); });
  auto add_rows = [&](const auto* ip) {
    for (int64_t w = 0; w < rows; ++w) {
      const float s = static_cast<float>(scales[w]);
      at::parallel_for(0, k, 16384, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t i = ip[w * is + j];  // (in range: checked above)
          o[i] = o[i] + vp[w * vs + j] * s;
        }
      });
    }
  };
  if (ix.scalar_type() == torch::kInt32) add_rows(ix.data_ptr<int32_t>());
  else add_rows(ix.data_ptr<int64_t>());
}

// (hits, misses) of the one pass since the module was loaded
std::vector<int64_t> one_pass_counts() { return {one_pass_hits.load(), one_pass_misses.load()}; }

// Vectors of at most this many entries take the small path (0: none; tests compare it with the two passes);
// returns the previous limit
int64_t set_small_limit(int64_t n) {
  TORCH_CHECK(n >= 0, "the small path's limit must be >= 0, got ", n);
  const int64_t was = small_limit;
  small_limit = n;
  return was;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("one_pass_counts", &one_pass_counts, "(hits, misses) of the one pass so far");
  m.def("set_small_limit", &set_small_limit, "the largest vector the small path takes (0: none); the old limit");
  m.def("topk", &topk, "exact top-|x| (values, indices)");
  m.def("ef14_step", &ef14_step, "fused EF14 step");
  m.def("ef21_step", &ef21_step, "fused EF21 step");
  m.def("econtrol_step", &econtrol_step, "fused EControl step");
  m.def("accumulate", &accumulate, "scatter-add of worker messages");
  m.def("segments_step", &segments_step, "fused step on consecutive segments, each its own top-k");
}
