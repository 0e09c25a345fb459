// Network rows: the unit of work everything above the network is built
// from. A row is one image-sized input of the denoiser, the noisy image z at
// log-noise gamma with a class label. A sampler hands out the rows of its
// next step, a likelihood plan the rows of its K times per image, and the
// engine concatenates rows of many requests into one forward pass (see
// docs/design.md, "Rows").
#ifndef VDM_MODEL_VDM_ROWS_H_
#define VDM_MODEL_VDM_ROWS_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "model/vdm/denoiser.h"

namespace vdm {

// m rows for one forward pass. All tensors live on the CPU.
struct Rows {
  at::Tensor z;      // [m, C, H, W] float32
  at::Tensor gamma;  // [m] float32
  // [m] int64: 0..num_classes-1, or num_classes for "no label". A bare
  // Sampler (samplers.h) leaves it undefined; SamplingPlan and
  // LikelihoodPlan always set it.
  at::Tensor label;
  // [m, C, H, W] float32: the cotangent v of a row that also needs
  // v^T d eps_hat / d z (EvaluateVjp); undefined for plain rows.
  at::Tensor probe;

  int64_t size() const { return z.defined() ? z.size(0) : 0; }
  bool empty() const { return size() == 0; }
  // Rows [begin, begin + count).
  Rows Slice(int64_t begin, int64_t count) const;
  // The rows of `parts`, in order (parts must all have labels or none, and
  // probes or none).
  static Rows Cat(const std::vector<Rows>& parts);
};

// What the network gives back for rows, in their order: eps_hat [m, C, H, W]
// float32, and for rows with probes (a forward + backward pass) vjp =
// v^T d eps_hat / d z; with the engine's background model (the likelihood
// ratio), that model's eps_hat of the same rows. Undefined when absent.
struct Evaluation {
  at::Tensor eps;
  at::Tensor vjp;
  at::Tensor background;

  // Rows [begin, begin + count) of every defined part.
  Evaluation Slice(int64_t begin, int64_t count) const;
};

// What every plan of network rows has in common (SamplingPlan, EncodePlan,
// LikelihoodPlan, OdeLikelihoodPlan): it hands out the rows of its next
// evaluation and advances when the network's outputs for all of them come
// back. A plan that needs VJPs sets Rows::probe and reads Evaluation::vjp.
// The engine's tasks hand the rows out in chunks (server/tasks.cc), so a
// plan never sees how they were batched.
class RowPlan {
 public:
  virtual ~RowPlan() = default;
  // Rows of the next evaluation (Next() is not called once done()).
  virtual int64_t rows_per_evaluation() const = 0;
  virtual Rows Next() = 0;
  // The outputs for every row of the last Next(), in its order.
  virtual absl::Status Consume(const Evaluation& out) = 0;
  virtual bool done() const = 0;
};

// eps_hat [m, C, H, W] for `rows`; rows without labels get "no label".
// With `fp32`, in full fp32 whatever the model's precision()
// (Denoiser::DenoiseFp32).
absl::StatusOr<at::Tensor> Evaluate(Denoiser& model, const Rows& rows,
                                    bool fp32 = false);

// eps_hat and v^T d eps_hat / d z with v = rows.probe (which must be set).
absl::StatusOr<EpsVjp> EvaluateVjp(Denoiser& model, const Rows& rows);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_ROWS_H_
