// DeviceMoELayer: the MoE layer's forward and backward on one GPU per rank,
// with the expert all-to-all over a device communicator (the nccl backend).
// Same math, routing order, drops and losses as MoELayer, which is its
// reference (tests/gpu/gpu_check.cpp compares the two).
//
// The gate, routing, dispatch layout, encode, expert GEMMs (cuBLAS), decode
// and every backward step run on the device. The host steps in three times
// per forward, with small copies: the per-expert loads (losses and, dropless,
// the capacity), the group's capacity agreement, and (dropless) the exchanged
// block counts that size the all-to-all-v.
//
// Plans: expert parallel (r = 1) with whole experts per rank (E >= W), d = 1,
// flat all-to-all, padded or dropless exchange; f32 or bf16 expert GEMMs.
// Other plans (r != 1, sliced experts, d > 1, 2DH) and batch-prioritised
// routing throw NotSupported naming the field: they run on the host layer.
// CUDA builds only.
//
// Marked for removal: MoELayer on CudaOps (moe/cuda/cuda_ops.h) now keeps
// its tensors on the GPU and runs every plan but 2DH; once the GPU check
// (tests/gpu/gpu_check.cpp, check_ops_layer) has passed on a lent device,
// this second orchestration goes.
#pragma once

#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "moe/moe_layer.h"

namespace switchyard {

class DeviceMoELayer {
 public:
  // `group`'s memory is device `device` (an nccl communicator).
  DeviceMoELayer(MoEConfig config, std::shared_ptr<Communicator> group, int device);

  const MoEConfig& config() const { return config_; }
  const ParamLayout& layout() const { return layout_; }
  int device() const { return device_; }
  // Placement, gate (weight and bias) and expert parameters of a host layer
  // with the same config on the same rank of an equal-sized group.
  void copy_parameters_from(MoELayer& host);
  Tensor& gate_weight() { return gate_weight_; }  // device [M, E]
  ExpertParams& params() { return params_; }      // device, MoELayer's shapes
  Tensor& gate_grad() { return gate_grad_; }
  ExpertParams& expert_grads() { return grads_; }
  void zero_grad();
  void sgd_step(double lr);

  // x: device f32 [T, M]; runs on cuda::current_stream(). The output is a
  // device tensor; the losses are host values.
  MoEForward forward(const TensorView& x, const RoutingChoice& routing, const ExecPlan& plan);
  // Gradients of sum(dout * output) + balance_coef * balance + z_coef * z for
  // the last forward, accumulated into gate_grad() (summed over the group) and
  // expert_grads(); returns dx (device) when input_grad.
  Tensor backward(const TensorView& dout, double balance_coef = 0.0, double z_coef = 0.0, bool input_grad = true);
  // Throws NotSupported / InvalidArgument naming the field when this layer cannot run `plan`.
  void check_plan(const ExecPlan& plan) const;

  // Device time per phase from CUDA events around each phase (off by default:
  // the events cost a little). phase_times() waits for the recorded phases and
  // returns their sums since the last reset (seconds).
  void set_profiling(bool on) { profiling_ = on; }
  const MoEPhaseTimes& phase_times();
  void reset_profile();

 private:
  Tensor device_empty(Shape shape, DType dtype = DType::f32) const;
  // Rows of each (source or destination rank, local slot) block on this rank.
  struct Blocks {
    int slots = 1;              // L
    std::vector<int64_t> rows;  // [W * L], rank-major
    int64_t offset(int u, int l) const;  // first row of block (u, l)
    int64_t total() const;
  };
  Work exchange(const TensorView& in, const Blocks& send, const TensorView& out, const Blocks& recv, int64_t width);
  // Calls gemm(slot, batch, rows, first_row) for the received expert blocks of
  // every source rank: once per source with its L slots batched when padded
  // (every block has C rows), else once per block.
  template <class Gemm>
  void for_expert_blocks(int W, int L, Gemm&& gemm) const;
  int64_t largest_block() const;
  class Phase;  // records a phase's events when profiling
  void expert_forward();
  void expert_backward(const Tensor& d_out, bool input_grad, Tensor& d_rows);

  MoEConfig config_;
  std::shared_ptr<Communicator> group_;
  int device_;
  ParamLayout layout_;
  Tensor position_of_expert_;  // device i32 [E]
  Tensor gate_weight_, gate_bias_, gate_grad_;
  ExpertParams params_, grads_;
  bool profiling_ = false;
  struct Mark {
    double MoEPhaseTimes::*field;
    void* begin;  // cudaEvent_t
    void* end;
  };
  std::vector<Mark> marks_;
  MoEPhaseTimes times_;

  struct Saved {
    bool valid = false;
    int64_t tokens = 0, capacity = 0;
    int k = 0;
    bool padded = true;
    Tensor x, logits, scores, experts, weights;
    Tensor row_of_choice, token_of_row, weight_of_row;
    Tensor rows, pre, act, out, returned;
    Tensor rows16, act16, w1_16, w2_16;
    Blocks send, recv;
    std::vector<int64_t> expert_load;  // per logical expert, this rank
  } saved_;
};

}  // namespace switchyard
