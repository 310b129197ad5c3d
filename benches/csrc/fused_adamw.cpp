// libtorch's fused AdamW (`at::_fused_adamw_`, what `torch.optim.AdamW(fused=True)` runs), for
// the optimizer benchmark. tch 0.24 binds no `_fused_adamw_`, so this one call goes through a
// small C shim over the tensors tch hands out (`tch::Tensor::as_mut_ptr` is an `at::Tensor*`).
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>

#include <cstdio>
#include <exception>

extern "C" int stowage_fused_adamw(void *param, void *grad, void *exp_avg, void *exp_avg_sq,
                                   void *step, double lr, double beta1, double beta2,
                                   double weight_decay, double eps, char *err, size_t err_len) {
  try {
    at::Tensor &p = *static_cast<at::Tensor *>(param);
    at::Tensor &g = *static_cast<at::Tensor *>(grad);
    at::Tensor &m = *static_cast<at::Tensor *>(exp_avg);
    at::Tensor &v = *static_cast<at::Tensor *>(exp_avg_sq);
    at::Tensor &s = *static_cast<at::Tensor *>(step);
    at::_fused_adamw_({p}, {g}, {m}, {v}, {}, {s}, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
    return 0;
  } catch (const std::exception &e) {
    std::snprintf(err, err_len, "%s", e.what());
    return 1;
  }
}
