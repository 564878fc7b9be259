// The fused soft-value kernel for CPUs: raw pointers and sizes only, no PyTorch headers.
//
// For each row i of hidden [N, D] and the LM head weight [V, D] (optional bias [V], softcap c):
//   z = W h_i + b, z <- c * tanh(z / c);  value = alpha * logsumexp(z / alpha);
//   target_logit = z[target_i] (left 0 where target_i < 0);  entropy = H(softmax(z / alpha)).
//   logit_sum = sum_j z_j (when asked: one more running sum in the same pass).
// fp32 accumulation; each row's arithmetic is the same whatever the other rows are (deterministic,
// row-independent); no N x V buffer: per thread one packed weight tile, one hidden micro-tile and one
// tile of logits that stays in L1.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace endokern {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// SIMD paths, best last. Chosen at run time from the CPU's features (or forced, for tests).
enum Simd : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

struct Problem {
  const void* hidden;
  int64_t hidden_row_stride;  // in elements; columns are contiguous
  const void* weight;
  int64_t weight_row_stride;
  int dtype;                 // DType of hidden and weight
  const float* bias;         // [V] fp32 or nullptr
  const int64_t* targets;    // [N], -1 for no target
  int64_t n, d, v;
  float alpha;
  float softcap;             // <= 0: none
  bool with_entropy;
  float* value;              // [N]
  float* target_logit;       // [N]
  float* entropy;            // [N] or nullptr
  bool with_logit_sum = false;  // also sum_j z_j per row (after bias and softcap, before 1/alpha)
  float* logit_sum = nullptr;   // [N] or nullptr
};

bool simd_supported(int simd);
int best_simd();
const char* simd_name(int simd);
// Runs the kernel with SIMD path `simd` on `threads` OpenMP threads (<= 0: OpenMP's default).
void soft_values(const Problem& problem, int simd, int threads);

}  // namespace endokern
