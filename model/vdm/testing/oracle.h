// Exact oracle Denoisers for testing the VDM maths (issue 3): data whose
// distribution is known in closed form, so the optimal network is known too.
//
// Given a class c, every pixel is independent with the pmf p_c over a small
// set of 8-bit values v_j (model space f_j). The posterior mean of one pixel
// given z = alpha f + sigma eps is the finite mixture
//   E[f | z, c] = sum_j w_j f_j,  w_j ∝ p_cj exp(-(z - alpha f_j)^2 / 2
//   sigma^2),
// and without a label ("no label" = the mixture over classes with prior pi)
// the class posterior P(c | z) ∝ pi_c prod_i sum_j p_cj N(z_i; alpha f_j,
// sigma^2) couples the pixels of an image. eps_hat = (z - alpha x_hat) /
// sigma is then the MMSE-optimal prediction. Everything is computed in
// float64 with log-sum-exp.
#ifndef VDM_MODEL_VDM_TESTING_ORACLE_H_
#define VDM_MODEL_VDM_TESTING_ORACLE_H_

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "model/vdm/denoiser.h"

namespace vdm {

// The oracle's noise schedule. Both shapes share the endpoints.
enum class OracleSchedule {
  kLinear,  // gamma = g0 + (g1 - g0) t
  kWarped,  // gamma = g0 + (g1 - g0) expm1(a t) / expm1(a), a = 3
};

struct OracleOptions {
  ImageShape shape{1, 4, 4};
  // The support of each pixel (distinct 8-bit values).
  std::vector<int> values{40, 100, 150, 220};
  // One pmf over `values` per class; one pmf = unconditional (num_classes 0).
  std::vector<std::vector<double>> pmfs{{0.1, 0.2, 0.3, 0.4}};
  // Class prior pi for "no label" (empty = uniform).
  std::vector<double> class_prior;
  OracleSchedule schedule = OracleSchedule::kLinear;
  double gamma_min = -13.3;  // gamma(0)
  double gamma_max = 5.0;    // gamma(1)
};

// The exact eps-prediction network. Thread-compatible; const methods are
// thread-safe.
class OracleDenoiser : public Denoiser {
 public:
  static absl::StatusOr<std::unique_ptr<OracleDenoiser>> Create(
      const OracleOptions& options);

  ImageShape shape() const override { return options_.shape; }
  int num_classes() const override { return num_classes_; }
  // eps_hat (float32, as a network returns it) for any float z.
  absl::StatusOr<at::Tensor> Denoise(const at::Tensor& z,
                                     const at::Tensor& gamma,
                                     const at::Tensor& label) override;
  // eps_hat and v^T d eps_hat / d z by autograd through OptimalEps (float64,
  // returned as float32).
  absl::StatusOr<EpsVjp> DenoiseVjp(const at::Tensor& z,
                                    const at::Tensor& gamma,
                                    const at::Tensor& label,
                                    const at::Tensor& v) override;
  // gamma(t) and gamma'(t) in the dtype of t (float64 t gives float64).
  absl::StatusOr<GammaValues> Gamma(const at::Tensor& t) override;

  // E[f | z] in model space, float64 [B,C,H,W]. label [B]: 0..n-1, n = none
  // (ignored when unconditional).
  at::Tensor PosteriorMean(const at::Tensor& z, const at::Tensor& gamma,
                           const at::Tensor& label) const;
  // The exact marginal log-density log p_gamma(z) of z = alpha f + sigma eps
  // under the data distribution (given the label): [B] float64 nats.
  at::Tensor LogMarginal(const at::Tensor& z, const at::Tensor& gamma,
                         const at::Tensor& label) const;
  // The optimal eps_hat in float64.
  at::Tensor OptimalEps(const at::Tensor& z, const at::Tensor& gamma,
                        const at::Tensor& label) const;

  // -log P(x) in nats per image [B] float64 (x uint8 on the support).
  at::Tensor ExactNll(const at::Tensor& x_uint8, const at::Tensor& label) const;
  // The per-pixel marginal pmf over 0..255 [256] float64 for one label.
  at::Tensor PixelPmf(int64_t label) const;
  // P(c | x) for images x [B,C,H,W] uint8: [B, classes] float64 (pixels
  // off the support are ignored).
  at::Tensor ClassPosterior(const at::Tensor& x_uint8) const;
  // The expected VLB per pixel value, in nats [J] float64 (prior +
  // reconstruction + diffusion), by quadrature: pixels are independent given
  // a class, so expectations over eps factorize into 1-D Gaussian integrals.
  // discrete_steps = 0: continuous time, 0.5 int mse(gamma) dgamma over
  // [gamma(0), gamma(1)] (independent of the schedule's shape); T > 0: the
  // discrete-time VLB with T steps of the oracle's schedule. `label` must
  // name a class (anything when unconditional). Deterministic.
  at::Tensor ExpectedVlbPerValue(int64_t label, int discrete_steps = 0);
  // The sum over the pixels of x of ExpectedVlbPerValue: [B] nats.
  at::Tensor ExpectedVlb(const at::Tensor& x_uint8, int64_t label,
                         int discrete_steps = 0);
  // E_eps (eps - eps_hat)^2 of one pixel of value j at gamma: [J, G].
  at::Tensor PixelMmse(const at::Tensor& gamma, int64_t label) const;
  // The expected prior + reconstruction terms per pixel value [J] nats.
  at::Tensor EndpointTermsPerValue() const;
  // n exact samples of the data for one label, uint8 [n,C,H,W].
  at::Tensor Sample(int64_t n, int64_t label, at::Generator& gen) const;

  const OracleOptions& options() const { return options_; }

 private:
  explicit OracleDenoiser(const OracleOptions& options);
  // log pmf [classes, values] and the label -> class-weight rows.
  at::Tensor LogClassWeights(const at::Tensor& label) const;  // [B, classes]
  at::Tensor ValueIndex(const at::Tensor& x_uint8) const;     // [B, D] -> j
  // sum_i log P(x_i | c) [B, classes]; pixels off the support add
  // `off_support` (-inf for likelihoods, 0 to ignore them).
  at::Tensor LogLikelihoodPerClass(const at::Tensor& x_uint8,
                                   double off_support) const;

  const OracleOptions options_;
  const int num_classes_;  // 0 when unconditional
  at::Tensor f_values_;    // [J] float64, model space
  at::Tensor log_pmf_;     // [classes, J] float64
  at::Tensor log_prior_;   // [classes] float64
};

// Serves the oracle as a network with another parameterization: its output
// is the oracle's answer expressed as "eps", "v" or "x" in float32 (as a
// network would return it), converted back to eps_hat with ToEps exactly as
// TorchScriptModel does. Thread-compatible.
class ParameterizedOracle : public Denoiser {
 public:
  // `oracle` must outlive this object.
  ParameterizedOracle(OracleDenoiser* oracle, std::string prediction)
      : oracle_(oracle), prediction_(std::move(prediction)) {}

  ImageShape shape() const override { return oracle_->shape(); }
  int num_classes() const override { return oracle_->num_classes(); }
  absl::StatusOr<at::Tensor> Denoise(const at::Tensor& z,
                                     const at::Tensor& gamma,
                                     const at::Tensor& label) override;
  absl::StatusOr<GammaValues> Gamma(const at::Tensor& t) override {
    return oracle_->Gamma(t);
  }

 private:
  OracleDenoiser* oracle_;
  const std::string prediction_;
};

// Total-variation distance between the histogram of the pixel values of
// images x (uint8) and a pmf over 0..255 [256] float64.
double PixelTvDistance(const at::Tensor& x_uint8, const at::Tensor& pmf);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_TESTING_ORACLE_H_
