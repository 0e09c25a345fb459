// SiLU(GroupNorm(x)) in one operator (issue 25, docs/performance.md, "Fused
// group norm + SiLU"): libtorch runs the network's 21 group-norm-then-SiLU
// pairs as two operators, three passes over memory and a separate SiLU
// pass; this reads each group once for its statistics and once more to
// write the output, with a vectorised exp (an AVX2 + FMA build and a
// baseline one, picked at run time). Registered for TorchScript as vdm::group_norm_silu, and put
// into a loaded module by a graph rewrite (FuseGroupNormSilu); the exported
// files stay plain TorchScript. Includes torch: keep it out of torch-free
// headers.
#ifndef VDM_MODEL_VDM_FUSED_NORM_SILU_H_
#define VDM_MODEL_VDM_FUSED_NORM_SILU_H_

#include <torch/script.h>

#include <cstdint>
#include <c10/util/Optional.h>

namespace vdm {

// silu(group_norm(x, groups, weight, bias, eps)) for x of shape [N, C, ...]
// with C divisible by groups. The fused kernel runs for a CPU float or
// bfloat16 x (bf16 in, computed and returned in f32, as autocast runs group
// norm) when no gradient is needed; anything else (CUDA, other dtypes, x
// requiring grad under grad mode) computes the two libtorch operators, so
// autograd and every device keep working. Invalid shapes fail as
// at::group_norm fails.
at::Tensor GroupNormSilu(const at::Tensor& x, int64_t groups,
                         const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& bias, double eps);

// The two libtorch operators, unfused (the reference for tests).
at::Tensor GroupNormSiluReference(const at::Tensor& x, int64_t groups,
                                  const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& bias,
                                  double eps);

// Inlines `module`'s forward and replaces each aten::silu whose only input
// is an aten::group_norm used nowhere else with vdm::group_norm_silu.
// Returns how many pairs it fused. Call before the first forward.
int FuseGroupNormSilu(torch::jit::Module& module);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_FUSED_NORM_SILU_H_
