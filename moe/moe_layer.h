// MoELayer: gate -> router -> DispatchPlan -> dispatch (all-to-all) -> local
// experts -> combine (all-to-all back) -> weighted sum, over the expert group's
// communicator, with experts placed by a ParamLayout. Split-phase like DeepEP:
// the phases are separate calls so that later strategies (token shuffling,
// attention-FFN disaggregation) can drive them; forward() chains them.
#pragma once

#include <map>
#include <string>
#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "kernels/gemm.h"
#include "comm/algorithms/alltoallv_hierarchical.h"
#include "kernels/moe.h"
#include "moe/exec_plan.h"
#include "moe/param_layout.h"
#include "moe/router.h"
#include "parallel/cost_model.h"

namespace switchyard {

struct MoEConfig {
  int64_t model_dim = 0;
  int64_t hidden_dim = 0;
  kernels::cpu::Activation activation = kernels::cpu::Activation::relu;
  RouterConfig router;  // router.experts is the global expert count
  ExecPlan plan;        // what forward(x) runs; forward(x, routing, plan) may change it per batch
  // Ranks per node for the 2D-hierarchical all-to-all (its groups are made at
  // construction); 0 or the group size: one node, 2DH unavailable.
  int node_size = 0;
  // Debug: all-reduce a hash of each batch's plan and fail when ranks differ.
  bool check_plan = false;
  // Emulation: compute phases charge the calling thread's virtual time with
  // this device's rates (GEMM FLOPs, streamed bytes). skip_compute also skips
  // the GEMMs themselves (outputs are then meaningless; for virtual timings of
  // clusters larger than this machine can compute).
  std::shared_ptr<const DeviceModel> device_model;
  bool skip_compute = false;
  bool check_finite = false;  // reject NaN/Inf inputs with a clear error
  // Expert GEMMs: f32, or bf16 operands with fp32 accumulation (weights stay
  // fp32 masters; bf16 copies are made per batch).
  DType compute = DType::f32;
  // Inference: the gate and expert GEMMs run row-wise (kernels/rowwise.h), so a
  // token's output does not depend on the batch it came in (f32 forward only).
  bool batch_invariant = false;
  void validate() const;
};

class MoELayer;

// Chooses a batch's plan inside forward() without a collective of its own:
// its local inputs ride on the all-reduce (max) that agrees the batch's expert
// capacity, and it decides from the agreed values. The Planner is one.
class PlanChooser {
 public:
  virtual ~PlanChooser() = default;
  // Values this rank contributes to the group's max-all-reduce.
  virtual std::vector<double> local_inputs(MoELayer& layer, int64_t tokens) = 0;
  // The plan, from the agreed values (same on every rank) and the agreed capacity.
  virtual ExecPlan choose(MoELayer& layer, const std::vector<double>& agreed, int64_t capacity) = 0;
};

// What the user chooses per batch: it changes the math (drops, mixing).
struct RoutingChoice {
  double capacity_factor = 1.0;  // RouterConfig::capacity_factor's meaning
  int k = 2;
};

// Where every routed copy of a token goes under one ExecPlan; built once per
// batch and used by dispatch, combine and backward alike. Rows are sent in
// blocks ordered [chunk][destination rank][destination slot], so each chunk
// is one all-to-all and each destination's rows within it are contiguous. With
// r > 1 a row goes to `copies` ranks (one per hidden piece); their partial
// outputs are summed by combine.
struct DispatchPlan {
  ExecPlan exec;
  int64_t tokens = 0;
  int k = 0;
  int copies = 1;
  int64_t capacity = 0;
  int exchange_ranks = 1;  // ranks of the all-to-all (1: r = 0, no exchange)
  int slots = 1;           // working expert slots per rank
  std::vector<int64_t> row_of_choice;       // [T*k*copies]: send row, -1 when dropped
  std::vector<int64_t> token_of_row;        // [rows]: source token, -1 for padding
  std::vector<float> weight_of_row;         // [rows]
  std::vector<int64_t> rows_per_position;   // [E]: routed (kept) rows of each expert position
  std::vector<int64_t> send_block_rows;     // [d * X * slots]
  std::vector<int64_t> recv_block_rows;     // [d * X * slots] (after exchange_layout)
  int64_t dropped = 0;                      // choices beyond capacity on this rank
  int64_t send_rows() const { return static_cast<int64_t>(token_of_row.size()); }
  int64_t recv_rows() const;
  // Rows of one chunk per peer, and where the chunk starts, on either side.
  std::vector<int64_t> send_counts(int chunk) const;
  std::vector<int64_t> recv_counts(int chunk) const;
  int64_t send_offset(int chunk) const;
  int64_t recv_offset(int chunk) const;
  int64_t recv_block(int chunk, int rank, int slot) const {
    return recv_block_rows[static_cast<size_t>((chunk * exchange_ranks + rank) * slots + slot)];
  }
};

struct ExpertParams {
  Tensor w1;  // [L, M, H1], H1 = H (2H for swiglu: gate then up)
  Tensor b1;  // [L, H1]
  Tensor w2;  // [L, H, M]
  Tensor b2;  // [L, M]
};

// What the experts computed for the received rows (kept for backward).
struct ExpertActivations {
  Tensor out;  // [R, M]
  Tensor pre;  // [R, H1] before the activation
  Tensor act;  // [R, H] after it
  // bf16 compute: the operand copies backward reuses (rows, act, w1, w2); empty for f32.
  Tensor rows16, act16, w1_16, w2_16;
};

// Where a layer's time went, summed over calls until reset (seconds), and the
// GEMMs it ran, so a benchmark can time the same shapes as its floor.
struct MoEPhaseTimes {
  // weights: gathering a plan's working weights (r = 0, or r < S when sliced).
  double gate = 0, encode = 0, dispatch_a2a = 0, weights = 0, experts = 0, combine_a2a = 0, decode = 0, backward = 0;
  double total() const { return gate + encode + dispatch_a2a + weights + experts + combine_a2a + decode + backward; }
};
struct GemmShape {
  int64_t m, n, k;
  bool transpose_a, transpose_b;
  bool bf16 = false;
  auto operator<=>(const GemmShape&) const = default;
};

struct MoEForward {
  Tensor output;  // [T, M]
  double balance_loss = 0;
  double z_loss = 0;
  int64_t dropped = 0;  // on this rank
};

class MoELayer {
 public:
  MoELayer(MoEConfig config, std::shared_ptr<Communicator> expert_group);

  const MoEConfig& config() const { return config_; }
  const ParamLayout& layout() const { return layout_; }
  Tensor& gate_weight() { return gate_weight_; }  // [M, E], replicated on every rank
  // Per-expert selection bias of the sigmoid_bias gate (DeepSeek-V3's
  // auxiliary-loss-free balancing); not trained by gradients.
  Tensor& gate_bias() { return gate_bias_; }
  // After a step: raise the bias of experts the group under-used in the last
  // forward by `rate`, lower the over-used ones (collective over the group).
  void update_gate_bias(double rate);
  ExpertParams& params() { return params_; }
  // Deterministic initialisation keyed by logical expert id, so any placement
  // and any number of ranks hold the same weights.
  void init_parameters(uint64_t seed);
  // Where each logical expert lives (a permutation of positions rank * L + slot;
  // the same on every rank). Changes which experts this rank's slots hold, so
  // call it before init_parameters() or load(): stored weights do not move.
  void set_placement(std::vector<int> position_of_expert);

  // Keeps what backward needs (one batch in flight per layer). The plan and
  // the routing may change on every call; all ranks must pass the same plan.
  MoEForward forward(const TensorView& x);
  MoEForward forward(const TensorView& x, const RoutingChoice& routing, const ExecPlan& plan);
  MoEForward forward(const TensorView& x, const RoutingChoice& routing, PlanChooser& chooser);
  // Throws naming the field when this layer cannot run `plan` (r not 0 or a
  // divisor of S, d < 1, 2DH without node groups).
  void check_plan(const ExecPlan& plan) const;

  // Checkpoints keyed by logical expert id: every rank writes
  // `prefix.rank<r>-of-<W>.safetensors` with its experts ("experts.<e>.w1", ...)
  // and rank 0 also the gate ("gate.weight"). load() reads every shard of a
  // prefix and takes the experts this rank holds now, whatever W saved them, so
  // a checkpoint moves between layouts. Collective (ends with a barrier).
  void save(const std::string& prefix) const;
  void load(const std::string& prefix);

  // Gradients of sum(dout * output) + balance_coef * balance_loss + z_coef * z_loss
  // for the last forward: accumulated into gate_grad() and expert_grads();
  // returns dx [T, M] when input_grad (skipping it also skips the return
  // all-to-all, as Tutel does for inputs without gradient). The gate gradient is
  // summed over the expert group (data-parallel replicas of the gate); expert
  // gradients are not reduced (each expert lives on one rank).
  Tensor backward(const TensorView& dout, double balance_coef = 0.0, double z_coef = 0.0, bool input_grad = true);
  Tensor& gate_grad() { return gate_grad_; }
  ExpertParams& expert_grads() { return grads_; }
  // New zeroed gradient tensors (the old ones are left to whoever still holds them).
  void zero_grad();
  // Plain SGD on the gate and every local expert parameter: p -= lr * grad.
  void sgd_step(double lr);

  const MoEPhaseTimes& phase_times() const { return times_; }
  // Seconds the layer's communicators spent running all-to-alls (dispatch,
  // combine, counts; 2DH phases included) and weight gathers/scatters, summed
  // since construction: virtual seconds with a device model, else executor wall
  // time. Ops overlap compute, so these are busy times, not exposed times.
  struct CommBusy {
    double exchange = 0;
    double weights = 0;
  };
  CommBusy comm_busy() const;
  const std::shared_ptr<Communicator>& group() const { return group_; }
  bool has_hierarchical() const { return hierarchical_ != nullptr; }
  // The same phases in virtual (emulated) seconds; zeros without emulation.
  const MoEPhaseTimes& virtual_phase_times() const { return virtual_times_; }
  // The dispatch plan of the last forward (empty before the first). Its
  // capacity is the group's, except under uncapped dropless plans (capacity
  // factor 0, dropless exchange): there nothing drops and it is this rank's
  // largest expert load.
  const DispatchPlan& last_plan() const { return saved_.plan; }
  // The routing of the last forward: experts [T, k] (best first), weights, scores.
  const Routing& last_routing() const { return saved_.routing; }
  RoutingChoice routing_choice() const { return {config_.router.capacity_factor, config_.router.k}; }
  // GEMMs run since the last reset, with how often each shape ran.
  const std::map<GemmShape, int64_t>& gemms() const { return gemms_; }
  double gemm_flops() const;
  void reset_profile();

  // ---- phases (forward() chains them); their results live in the layer's
  // reusable buffers until the same phase runs for the next batch ----
  Routing route_tokens(const TensorView& x, Tensor& logits);
  DispatchPlan plan(const Routing& routing, int64_t tokens);  // with config().plan
  // capacity >= 0: already agreed across the group (no collective here).
  DispatchPlan plan(const Routing& routing, int64_t tokens, const ExecPlan& exec, int64_t capacity = -1);
  // Exchanges per-block row counts (dropless; padded needs none).
  void exchange_layout(DispatchPlan& plan);
  // Rows for the working experts, grouped by chunk, source rank, then slot.
  // The async form returns as soon as the all-to-alls are posted on the
  // group's executor: the caller overlaps work and waits on `done` (the last
  // chunk's; the executor is FIFO) before reading `rows`.
  struct Exchange {
    Tensor rows;
    Work done;
  };
  Exchange dispatch_async(const DispatchPlan& plan, const TensorView& x);
  Tensor dispatch(const DispatchPlan& plan, const TensorView& x);
  // Gathers the plan's working weights first (all-gather in the sharding group).
  ExpertActivations run_experts(const DispatchPlan& plan, const TensorView& rows);
  // Expert outputs back to their source rows (send order).
  Exchange combine_exchange_async(const DispatchPlan& plan, const TensorView& expert_out);
  Tensor combine_exchange(const DispatchPlan& plan, const TensorView& expert_out);
  // out[t] = sum_j weight * row(t, j).
  Tensor combine(const DispatchPlan& plan, const TensorView& returned);

 private:
  int64_t hidden_in() const;  // H1 of a whole expert
  Tensor fresh(Shape shape) const;  // zeros, or untouched memory when timing only
  // What a sharding degree makes each rank compute (see ExecPlan::r).
  struct PlanShape {
    int exchange_ranks;   // 1 for r = 0
    int slots;            // working experts per rank
    int pieces;           // stored slices assembled into one working expert
    int piece;            // which 1/r hidden piece this rank computes (r > 1), else 0
    int copies;           // ranks every routed row goes to
    int replicas;         // rank sets an expert's rows are split over (S / r when sliced)
    int64_t hidden;       // working hidden width
    Communicator* gather; // all-gathers the working weights; nullptr: stored weights are used as they are
  };
  PlanShape shape_of(int r) const;
  // Working weights of a plan (aliases of params_ when nothing is gathered).
  struct Working {
    int r = -1;
    ExpertParams p;
    bool gathered = false;
    bool adds_bias = true;  // the first hidden piece adds fc2's bias, the others add 0
  };
  void gather_weights(const DispatchPlan& plan, Working& into);
  // Working-weight gradients back to the stored slices (reduce-scatter) and fc2's
  // bias gradient over the S ranks of each expert.
  void scatter_gradients(const PlanShape& shape, const ExpertParams& working_grads, bool gathered);
  void run_chunk(const DispatchPlan& plan, int chunk, const Working& w, const TensorView& rows, ExpertActivations& a);
  void backward_chunk(const DispatchPlan& plan, int chunk, const Working& w, const Tensor& d_out, bool input_grad,
                      ExpertParams& grads, Tensor& d_rows, Tensor& dy16, Tensor& dp16);
  Work exchange(const DispatchPlan& plan, int chunk, const TensorView& in, const TensorView& out, bool to_experts);
  Work exchange_all(const DispatchPlan& plan, const TensorView& in, const TensorView& out, bool to_experts);
  Tensor encode(const DispatchPlan& plan, const TensorView& x);  // the routed rows in send order
  ExpertActivations allocate_activations(const DispatchPlan& plan);
  void verify_plan_agreement(const ExecPlan& plan);
  MoEForward forward_impl(const TensorView& x, const RoutingChoice& routing, const ExecPlan* fixed,
                          PlanChooser* chooser);
  MoEConfig config_;
  RouterConfig router_;  // config_.router with the batch's routing choice
  std::shared_ptr<Communicator> group_;
  ParamLayout layout_;
  int64_t local_hidden_;  // hidden width stored per rank (H / S)
  // Sub-communicators every plan may need, made once at construction.
  std::shared_ptr<Communicator> shard_group_;                    // the S ranks of my expert
  std::map<int, std::shared_ptr<Communicator>> gather_groups_;   // per r >= 1 with S / r > 1
  std::unique_ptr<algorithms::HierarchicalAlltoall> hierarchical_;

  Tensor gate_weight_;
  Tensor gate_bias_;
  Rng noise_{0};  // router noise (router.noise_std > 0), seeded by init_parameters per rank
  ExpertParams params_;
  Tensor gate_grad_;
  ExpertParams grads_;
  void gemm(const kernels::cpu::GemmArgs& args, bool always = false);  // always: even when skip_compute
  // Per-layer buffers reused from batch to batch: a fresh 100 MB tensor per
  // phase costs page faults inside the GEMMs that first touch it. Phase results
  // live in them until the next batch (one batch in flight per layer).
  enum class Scratch : uint8_t { input, send, recv, pre, act, expert_out, back, d_returned, d_out, d_rows, d_act, d_pre,
                                 d_sent, recv_bf16, act_bf16, w1_bf16, w2_bf16, d_out_bf16, d_pre_bf16,
                                 gathered, gw1, gb1, gw2, gb2, dw1, db1, dw2, db2, grad_blocks, grad_mine, count };
  Tensor scratch(Scratch which, Shape shape, DType dtype = DType::f32);
  void gemm_bf16(const kernels::cpu::GemmBf16Args& args);
  std::vector<std::shared_ptr<void>> scratch_storage_;
  std::vector<size_t> scratch_bytes_;
  MoEPhaseTimes times_, virtual_times_;
  void charge_memory(double bytes) const;
  std::map<GemmShape, int64_t> gemms_;
  struct Saved {
    Tensor x, logits, rows, returned;
    Routing routing;
    Working weights;
    DispatchPlan plan;
    ExpertActivations experts;
    bool valid = false;
  } saved_;
};

}  // namespace switchyard
