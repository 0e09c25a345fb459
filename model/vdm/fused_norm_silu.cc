#include "model/vdm/fused_norm_silu.h"

#include <ATen/Parallel.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/passes/inliner.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace vdm {
namespace {

// Two builds of each loop below, AVX2 + FMA and the x86-64 baseline (SSE2),
// chosen by the loader from the CPU (GCC's function multi-versioning), so
// one binary runs everywhere. An AVX-512 CPU takes the AVX2 build: the
// vectors are 8 floats wide in both, and one build fewer is one untested
// build fewer. Rounding differs between the two (FMA contraction), as
// libtorch's own kernels differ between CPU capabilities.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VDM_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VDM_CLONES
#endif

// Eight floats (GCC/Clang vector extensions: one AVX register, or two SSE
// ones in the baseline build).
typedef float V8f __attribute__((vector_size(32)));
typedef int32_t V8i __attribute__((vector_size(32)));

inline __attribute__((always_inline)) V8f Splat(float f) { return V8f{} + f; }

inline __attribute__((always_inline)) V8f Load(const float* p) {
  V8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// exp(v) within ~2 ulp: Cephes' expf (range reduction by n = round(v log2
// e), a degree-6 polynomial on the remainder, 2^n built in the exponent
// bits). Clamped to [-87, 88] so 2^n stays a normal float; SiLU only needs
// exp(-v) to saturate there (v / (1 + e^88) is 0 to f32).
inline __attribute__((always_inline)) V8f ExpClamped(V8f v) {
  const V8f lo = Splat(-87.0f), hi = Splat(88.0f);
  v = v < lo ? lo : v;
  v = v > hi ? hi : v;
  const V8f round = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds
  const V8f n = (v * 1.44269504088896341f + round) - round;
  V8f r = v - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V8f p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V8f e = p * r * r + r + 1.0f;
  const V8i bits = (__builtin_convertvector(n, V8i) + 127) << 23;
  V8f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return e * scale;
}

// Mean and 1/sqrt(var + eps) of x[0, n), var the biased variance as group
// norm uses: two passes (one group is small enough to stay in cache), each
// summing in 16 float lanes (a few hundred terms per lane here), the lanes
// and the tail then in double.
VDM_CLONES void Moments(const float* x, int64_t n, double eps, float* mean,
                        float* rstd) {
  V8f s0 = {}, s1 = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 += Load(x + i);
    s1 += Load(x + i + 8);
  }
  double sum = 0;
  for (; i < n; ++i) sum += x[i];
  for (int j = 0; j < 8; ++j) sum += static_cast<double>(s0[j]) + s1[j];
  const float m = static_cast<float>(sum / static_cast<double>(n));
  V8f q0 = {}, q1 = {};
  for (i = 0; i + 16 <= n; i += 16) {
    const V8f d0 = Load(x + i) - m, d1 = Load(x + i + 8) - m;
    q0 += d0 * d0;
    q1 += d1 * d1;
  }
  double ss = 0;
  for (; i < n; ++i) ss += static_cast<double>(x[i] - m) * (x[i] - m);
  for (int j = 0; j < 8; ++j) ss += static_cast<double>(q0[j]) + q1[j];
  *mean = m;
  *rstd =
      static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
}

// y = silu(x * a + b) over n elements.
VDM_CLONES void ScaleShiftSilu(const float* x, float* y, int64_t n, float a,
                               float b) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const V8f v = Load(x + i) * a + b;
    const V8f out = v / (1.0f + ExpClamped(-v));
    std::memcpy(y + i, &out, sizeof(out));
  }
  if (i < n) {  // the last 1-7: through a zero-padded vector
    float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tail, x + i, (n - i) * sizeof(float));
    const V8f v = Load(tail) * a + b;
    const V8f out = v / (1.0f + ExpClamped(-v));
    std::memcpy(tail, &out, sizeof(out));
    std::memcpy(y + i, tail, (n - i) * sizeof(float));
  }
}

bool NeedsGrad(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
               const c10::optional<at::Tensor>& bias) {
  if (!at::GradMode::is_enabled()) return false;
  return x.requires_grad() ||
         (weight.has_value() && weight->defined() && weight->requires_grad()) ||
         (bias.has_value() && bias->defined() && bias->requires_grad());
}

// A per-channel parameter as C contiguous floats, or `fill` when absent.
std::vector<float> Channels(const c10::optional<at::Tensor>& p, int64_t c,
                            float fill) {
  if (!p.has_value() || !p->defined()) return std::vector<float>(c, fill);
  const at::Tensor f = p->to(at::kCPU, at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + c);
}

bool Fusable(const at::Tensor& x, int64_t groups,
             const c10::optional<at::Tensor>& weight,
             const c10::optional<at::Tensor>& bias) {
  if (!x.defined() || !x.device().is_cpu() || x.dim() < 2) return false;
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kBFloat16) {
    return false;
  }
  const int64_t c = x.size(1);
  if (groups <= 0 || c % groups != 0 || x.numel() == 0) return false;
  for (const auto* p : {&weight, &bias}) {
    if (p->has_value() && p->value().defined() &&
        (!p->value().device().is_cpu() || p->value().numel() != c)) {
      return false;
    }
  }
  return !NeedsGrad(x, weight, bias);
}

at::Tensor GroupNormSiluOp(const at::Tensor& x, int64_t groups,
                           const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias, double eps) {
  return GroupNormSilu(x, groups, weight, bias, eps);
}

}  // namespace

at::Tensor GroupNormSiluReference(const at::Tensor& x, int64_t groups,
                                  const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& bias,
                                  double eps) {
  return at::silu(at::group_norm(x, groups, weight, bias, eps));
}

at::Tensor GroupNormSilu(const at::Tensor& x, int64_t groups,
                         const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& bias, double eps) {
  if (!Fusable(x, groups, weight, bias)) {
    return GroupNormSiluReference(x, groups, weight, bias, eps);
  }
  const at::Tensor in = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options());
  const int64_t n = in.size(0), c = in.size(1);
  const int64_t inner = in.numel() / (n * c);  // elements per channel
  const int64_t per_group = c / groups;
  const std::vector<float> gamma = Channels(weight, c, 1.0f);
  const std::vector<float> beta = Channels(bias, c, 0.0f);
  const float* src = in.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, n * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t offset = ng * per_group * inner;
      float mean, rstd;
      Moments(src + offset, per_group * inner, eps, &mean, &rstd);
      const int64_t c0 = (ng % groups) * per_group;
      for (int64_t k = 0; k < per_group; ++k) {
        const float a = rstd * gamma[c0 + k];
        const float b = beta[c0 + k] - mean * a;
        ScaleShiftSilu(src + offset + k * inner, dst + offset + k * inner,
                       inner, a, b);
      }
    }
  });
  return out;
}

namespace {

int FuseBlock(torch::jit::Block* block) {
  static const c10::Symbol kSilu = c10::Symbol::fromQualString("aten::silu");
  static const c10::Symbol kGroupNorm =
      c10::Symbol::fromQualString("aten::group_norm");
  static const c10::Symbol kFused =
      c10::Symbol::fromQualString("vdm::group_norm_silu");
  int fused = 0;
  for (auto it = block->nodes().begin(); it != block->nodes().end();) {
    torch::jit::Node* node = *it;
    ++it;  // before node may be destroyed
    for (torch::jit::Block* sub : node->blocks()) fused += FuseBlock(sub);
    if (node->kind() != kSilu || node->inputs().size() != 1) continue;
    torch::jit::Node* norm = node->input(0)->node();
    if (norm->kind() != kGroupNorm || norm->inputs().size() != 6 ||
        norm->output()->uses().size() != 1) {
      continue;
    }
    torch::jit::Graph* graph = node->owningGraph();
    torch::jit::WithInsertPoint guard(node);
    torch::jit::Value* out = graph->insert(
        kFused, {norm->input(0), norm->input(1), norm->input(2),
                 norm->input(3), norm->input(4)});
    out->setType(node->output()->type());
    node->output()->replaceAllUsesWith(out);
    node->destroy();
    norm->destroy();
    ++fused;
  }
  return fused;
}

}  // namespace

int FuseGroupNormSilu(torch::jit::Module& module) {
  std::shared_ptr<torch::jit::Graph> graph =
      module.get_method("forward").graph();
  torch::jit::Inline(*graph);
  return FuseBlock(graph->block());
}

}  // namespace vdm

TORCH_LIBRARY(vdm, m) {
  m.def(
      "group_norm_silu(Tensor x, int groups, Tensor? weight, Tensor? bias, "
      "float eps) -> Tensor",
      &vdm::GroupNormSiluOp);
}
