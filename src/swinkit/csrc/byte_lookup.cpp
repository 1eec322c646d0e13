// out[i] = table[x[i]] for uint8 x and a 256-entry uint8 table: any function of a uint8-quantized value
// whose result is uint8-quantized again, as one pass. The INT8 inference path uses it for GELU between
// the MLP's two int8 linears where oneDNN's fused GELU is slow (its AVX2 int8 kernels, no VNNI).
//
// Built with window_attention.cpp by `swinkit.native`; registered as torch.ops.swinkit.byte_lookup.
// AVX2: the table widened to 32-bit entries, eight entries fetched by one gather, packed back to bytes.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

void lookup(const uint8_t* in, uint8_t* out, int64_t n, const uint8_t* table) {
  int64_t i = 0;
#if defined(__AVX2__)
  alignas(64) int32_t wide[256];
  for (int j = 0; j < 256; ++j) wide[j] = table[j];
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleaving
  for (; i + 32 <= n; i += 32) {
    __m256i g[4];
    for (int k = 0; k < 4; ++k) {
      const __m256i index = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(in + i + 8 * k)));
      g[k] = _mm256_i32gather_epi32(wide, index, 4);
    }
    const __m256i words = _mm256_packus_epi32(g[0], g[1]), words2 = _mm256_packus_epi32(g[2], g[3]);
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(words, words2), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), bytes);
  }
#endif
  for (; i < n; ++i) out[i] = table[in[i]];
}

at::Tensor byte_lookup(const at::Tensor& x, const at::Tensor& table) {
  TORCH_CHECK(x.scalar_type() == at::kByte && x.device().is_cpu(),
              "swinkit.byte_lookup: x must be a uint8 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(table.scalar_type() == at::kByte && table.device().is_cpu() && table.numel() == 256,
              "swinkit.byte_lookup: table must be 256 uint8 values on the CPU, got ", table.numel(), " ",
              table.scalar_type(), " on ", table.device());
  const at::Tensor in = x.contiguous(), t = table.contiguous();
  at::Tensor out = at::empty_like(in);
  const uint8_t* src = in.data_ptr<uint8_t>();
  const uint8_t* lut = t.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, (in.numel() + 31) / 32, 1024, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * 32, last = std::min<int64_t>(end * 32, in.numel());
    lookup(src + first, dst + first, last - first, lut);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(swinkit, m) {
  m.def("byte_lookup(Tensor x, Tensor table) -> Tensor");
}

TORCH_LIBRARY_IMPL(swinkit, CPU, m) {
  m.impl("byte_lookup", &byte_lookup);
}
