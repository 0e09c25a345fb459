#ifndef VDM_MODEL_VDM_AUTOCAST_H_
#define VDM_MODEL_VDM_AUTOCAST_H_

// Autocast to bf16 for one scope, shared by the server's forward pass
// (torchscript_model.cc, --precision=bf16) and the trainer's
// (model/train/vlb.cc, vdm-train --precision=bf16). Includes ATen: keep it
// out of torch-free headers.

#include <ATen/autocast_mode.h>
#include <c10/core/DeviceType.h>

namespace vdm {

// Autocast to bf16 on this thread while alive (autocast state is
// thread-local), restoring what was there before; a no-op unless `enable`.
// Like Python's torch.autocast it clears the cast-weight cache on the
// outermost exit. Autograd works through it: the backward of each op runs
// in the dtype its forward ran in, and gradients reach fp32 leaves (the
// weights) in fp32.
class Bf16Autocast {
 public:
  Bf16Autocast(bool enable, c10::DeviceType type)
      : enable_(enable), cuda_(type == c10::DeviceType::CUDA) {
    if (!enable_) return;
    if (cuda_) {
      was_enabled_ = at::autocast::is_enabled();
      was_dtype_ = at::autocast::get_autocast_gpu_dtype();
      at::autocast::set_enabled(true);
      at::autocast::set_autocast_gpu_dtype(at::kBFloat16);
    } else {
      was_enabled_ = at::autocast::is_cpu_enabled();
      was_dtype_ = at::autocast::get_autocast_cpu_dtype();
      at::autocast::set_cpu_enabled(true);
      at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
    }
    at::autocast::increment_nesting();
  }
  ~Bf16Autocast() {
    if (!enable_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    if (cuda_) {
      at::autocast::set_enabled(was_enabled_);
      at::autocast::set_autocast_gpu_dtype(was_dtype_);
    } else {
      at::autocast::set_cpu_enabled(was_enabled_);
      at::autocast::set_autocast_cpu_dtype(was_dtype_);
    }
  }
  Bf16Autocast(const Bf16Autocast&) = delete;
  Bf16Autocast& operator=(const Bf16Autocast&) = delete;

 private:
  const bool enable_, cuda_;
  bool was_enabled_ = false;
  at::ScalarType was_dtype_ = at::kBFloat16;
};

}  // namespace vdm

#endif  // VDM_MODEL_VDM_AUTOCAST_H_
