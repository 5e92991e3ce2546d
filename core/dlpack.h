// DLPack (v0.6) import and export, zero-copy. The dlpack header stays private:
// callers see only the opaque DLManagedTensor pointer.
#pragma once

#include "core/tensor.h"

struct DLManagedTensor;

namespace switchyard {

// Export: the returned tensor shares `t`'s storage and keeps it alive until its
// deleter runs. The consumer owns the result and must call its deleter once.
DLManagedTensor* to_dlpack(const Tensor& t);

// Import: takes ownership of `managed`; its deleter runs when the last Tensor
// sharing the storage goes. Rejects dtypes we do not have (lanes != 1, complex, ...).
Tensor from_dlpack(DLManagedTensor* managed);

}  // namespace switchyard
