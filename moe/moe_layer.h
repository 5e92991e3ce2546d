// MoELayer: gate -> router -> DispatchPlan -> dispatch (all-to-all) -> local
// experts -> combine (all-to-all back) -> weighted sum, over the expert group's
// communicator, with experts placed by a ParamLayout. Split-phase like DeepEP:
// a batch is a handle (MoEBatch) that the phases advance, so later strategies
// (micro-batch ping-pong, token shuffling, attention-FFN disaggregation) can
// keep several batches in flight and interleave their phases; forward() and
// backward() are composed of exactly these phases.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "comm/algorithms/alltoallv_hierarchical.h"
#include "comm/communicator.h"
#include "kernels/gemm.h"
#include "kernels/moe.h"
#include "moe/buffer_pool.h"
#include "moe/dispatch_plan.h"
#include "moe/ops.h"
#include "moe/param_layout.h"
#include "moe/router.h"
#include "parallel/cost_model.h"
#include "parallel/exec_plan.h"

namespace switchyard {

struct MoEConfig {
  int64_t model_dim = 0;
  int64_t hidden_dim = 0;
  kernels::Activation activation = kernels::Activation::relu;
  RouterConfig router;  // router.experts is the global expert count
  ExecPlan plan;        // what forward(x) runs; forward(x, routing, plan) may change it per batch
  // Ranks per node for the 2D-hierarchical all-to-all (its groups are made at
  // construction); 0 or the group size: one node, 2DH unavailable.
  int node_size = 0;
  // Debug: all-reduce a hash of each batch's plan and fail when ranks differ.
  bool check_plan = false;
  // Emulation: the layer's ops (moe/ops.h) charge the calling thread's
  // virtual time with this device's rates (GEMM FLOPs, streamed bytes).
  // skip_compute also skips the bulk work itself (outputs are then
  // meaningless; for virtual timings of clusters larger than this machine
  // can compute).
  std::shared_ptr<const DeviceModel> device_model;
  // Physical expert placement (replicas, ranks without experts, uneven slots;
  // moe/placement.h); empty: E / W experts per rank, or Tutel's sliced layout
  // when E < W. Placements other than a permutation run r = 1 plans.
  std::optional<ExpertPlacement> placement;
  // Ranks per replica domain (consecutive ranks): a token uses the replicas of
  // its expert inside its own rank's domain when there are any (expert data
  // parallelism: the expert group; a node), else all of them, in turn.
  // 0: one domain, the whole group.
  int replica_domain = 0;
  // Which replica a routed choice uses (placements with replicas):
  // in_turn: every replica (of the domain) takes every n-th kept choice, so
  // replicas share each source's rows exactly; nearest: each source splits
  // its choices by ExpertPlacement::nearest_shares (own rank's replicas
  // first, then its node's, node_size ranks, then any), balanced when
  // sources route alike and sending fewer rows across links. Not with a
  // replica_domain.
  enum class ReplicaChoice : uint8_t { in_turn, nearest };
  // rebalance() places with EPLB's hierarchical policy: router.groups expert
  // groups packed onto the nodes (node_size ranks each), replicas made
  // inside each node (the policy for group-limited routing); else global.
  // Needs router.groups > 1 and a multiple of the nodes.
  bool eplb_hierarchical = false;
  // The EPLB placement rebalance() makes (eplb_hierarchical's policy or the
  // global one) for a load per logical expert on `ranks` ranks; also the
  // placement before any load is measured (equal loads).
  ExpertPlacement eplb_placement(const std::vector<double>& load, int physical, int ranks) const;
  ReplicaChoice replica_choice = ReplicaChoice::in_turn;
  bool skip_compute = false;
  // What the phases run their bulk work on; null: the host (CpuOps), wrapped
  // in EmulatedOps when there is a device model or skip_compute. Ops with a
  // memory of their own (CudaOps, IsolatedOps) keep the layer's parameters,
  // buffers, inputs and outputs there; the expert group must move that
  // memory (MoELayer::host_group() carries the host values). Not with 2DH.
  std::shared_ptr<MoEOps> ops;
  bool check_finite = false;  // reject NaN/Inf inputs with a clear error
  // Expert GEMMs: f32, or bf16 operands with fp32 accumulation (weights stay
  // fp32 masters; bf16 copies are made per batch).
  DType compute = DType::f32;
  // Inference: the gate and expert GEMMs run row-wise (kernels/rowwise.h), so a
  // token's output does not depend on the batch it came in (f32 forward only).
  bool batch_invariant = false;
  // Dropless expert-parallel dispatch sends a token once per destination rank
  // (and chunk) even when several of its top-k experts live there (DeepEP);
  // the receiver copies it into each expert's rows. Saves bytes on the wire,
  // costs one local copy of the received rows and a small index exchange, so
  // it pays across links, not inside shared memory. Results are unchanged.
  bool send_once_per_rank = false;
  // What the exchanges carry (inference): the rows to the experts and their
  // results back, f32 (exact) or bf16 (rounded to nearest even before the
  // all-to-all, half the bytes; attention-FFN disaggregation's payloads);
  // the rows also fp8 e4m3 with one f32 scale per 128 columns (DeepEP's and
  // Step-3's dispatch, a little over a quarter of the bytes).
  // A row is rounded whichever rank it goes to, itself included, and also
  // when nothing moves (one rank, r = 0), so any placement and world size
  // give the same results; with r > 1 each of a row's r partial results is
  // rounded before they are summed. A CombineLayout's move of the combined
  // rows stays f32. Forward only: backward refuses.
  DType dispatch_payload = DType::f32;
  DType combine_payload = DType::f32;
  void validate() const;
};

class MoELayer;

// Chooses a batch's plan inside forward() without a collective of its own:
// its local inputs ride on the all-reduce (max) that agrees the batch's expert
// capacity, and it decides from the agreed values. MoEPlanner (moe/planner.h) is one.
class PlanChooser {
 public:
  virtual ~PlanChooser() = default;
  // Values this rank contributes to the group's max-all-reduce (as many on
  // every rank), from its tokens and the batch's routing (null: not known).
  virtual std::vector<double> local_inputs(MoELayer& layer, int64_t tokens, const Routing* routing) = 0;
  // The plan, from the agreed values (same on every rank) and the agreed capacity.
  virtual ExecPlan choose(MoELayer& layer, const std::vector<double>& agreed, int64_t capacity) = 0;
};

// What the user chooses per batch: it changes the math (drops, mixing).
struct RoutingChoice {
  double capacity_factor = 1.0;  // RouterConfig::capacity_factor's meaning
  int k = 2;
};

struct ExpertParams {
  Tensor w1;  // [L, M, H1], H1 = H (2H for swiglu: gate then up)
  Tensor b1;  // [L, H1]
  Tensor w2;  // [L, H, M]
  Tensor b2;  // [L, M]
};

// Whole logical experts as a checkpoint stores them (views into the layer's
// tensors, or into `keep` when gathered from slices).
struct LogicalExpertTensors {
  std::vector<std::pair<std::string, TensorView>> tensors;
  std::vector<Tensor> keep;
};
// A whole logical expert's tensor by name ("w1", "b1", "w2", "b2") and shape.
using LogicalExpertSource = std::function<Tensor(int expert, const char* name, const Shape& shape)>;

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
  // weights: gathering a plan's working weights (r = 0, or r < S when sliced);
  // convert: making the bf16 working copies of the weights (bf16 compute).
  double gate = 0, encode = 0, dispatch_a2a = 0, weights = 0, convert = 0, experts = 0, combine_a2a = 0, decode = 0,
         backward = 0;
  double total() const {
    return gate + encode + dispatch_a2a + weights + convert + experts + combine_a2a + decode + backward;
  }
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

// One batch's way through a layer (DeepEP's handle, Megatron's token
// dispatcher state): its routing and dispatch plan, its buffers (from the
// layer's pool, returned when the handle goes), and what its backward needs.
// Any number may be in flight on one layer. The phases that issue collectives
// (plan, dispatch, experts, backward, and finish with a combine layout) must
// be called in the same order on every rank of the group, whichever handles
// they advance (combine runs the chunks experts() has not run, so it counts
// as those; finish without a layout is local). With
// MoEConfig::check_plan that order is checked (a hash of the (batch, phase)
// sequence rides on the plan check).
class MoEBatch {
 public:
  MoEBatch(const MoEBatch&) = delete;
  MoEBatch& operator=(const MoEBatch&) = delete;
  ~MoEBatch();  // waits for its posted exchanges (they write into its buffers)

  const DispatchPlan& plan() const { return plan_; }
  const Routing& routing() const { return routing_; }
  int chunks() const { return plan_.exec.d; }
  // Per layer, counting from 0: the order in which batches were planned.
  uint64_t sequence() const { return sequence_; }
  // The combined output, once finish() ran.
  const MoEForward& result() const { return result_; }

  enum class Stage : uint8_t { planned, dispatched, combining, finished };
  Stage stage() const { return stage_; }

 private:
  friend class MoELayer;
  MoEBatch() = default;
  struct Working {  // a plan's working weights (aliases of the stored ones when nothing is gathered)
    int r = -1;
    ExpertParams p;
    bool gathered = false;
    bool adds_bias = true;  // the first hidden piece adds fc2's bias, the others add 0
  };
  uint64_t sequence_ = 0;
  uint64_t placement_generation_ = 0;  // the layer's placement it was planned on
  RouterConfig router_;  // the layer's, with this batch's routing choice
  Stage stage_ = Stage::planned;
  Tensor x_, logits_, send_, rows_, returned_;
  Tensor arrived_;  // sent once per rank: the distinct rows as received, before each expert's copy
  Tensor send16_, rows16_, out16_, returned16_;  // payloads as sent and received (bf16; the rows also packed fp8)
  Routing routing_;
  DispatchPlan plan_;
  // The plan's index arrays in the ops' memory (device ops; uploaded when a phase first needs one).
  struct OpsIndex {
    Tensor token_of_row, unique_token, recv_row_source, row_of_choice, weight_of_row, combine_scale, result_index,
        result_send_order;
  } index_;
  Working weights_;
  bool weights_ready_ = false;
  ExpertActivations experts_;
  std::vector<Work> to_experts_, back_;  // per chunk
  int experts_done_ = 0;                 // chunks computed (each posts its return exchange)
  MoEForward result_;
  // The layer let go of the buffers (a later forward(x) replaced this batch);
  // plan and routing stay readable, backward is refused.
  bool released_ = false;
  bool replayed_ = false;  // routed by replay_routing: no gate logits to train
  void wait_posted() noexcept;
  void release_buffers();
};
using MoEHandle = std::shared_ptr<MoEBatch>;

// The busiest rank's routed rows (padding not counted) over the mean, for
// these plans of one group's batches (whole experts). Collective over `group`.
double rank_load_max_over_mean(Communicator& group, const std::vector<const DispatchPlan*>& plans);

class MoELayer {
 public:
  // host_group: the same ranks in the same order over host memory, for the
  // layer's small host values (capacity, plan agreement, counts, loads) when
  // expert_group moves device memory; null: expert_group itself on host
  // memory, else a host-buffer view of it (each value then crosses to the
  // device and back, and over nccl queues behind the bulk traffic).
  MoELayer(MoEConfig config, std::shared_ptr<Communicator> expert_group,
           std::shared_ptr<Communicator> host_group = nullptr);

  const MoEConfig& config() const { return config_; }
  MoEOps& ops() const { return *ops_; }
  const ParamLayout& layout() const { return layout_; }
  Tensor& gate_weight() { return gate_weight_; }  // [M, E], replicated on every rank
  // Per-expert selection bias of the sigmoid_bias gate (DeepSeek-V3's
  // auxiliary-loss-free balancing); not trained by gradients.
  Tensor& gate_bias() { return gate_bias_; }
  // After a step: raise the bias of experts the group under-used in the last
  // planned batch by `rate`, lower the over-used ones (collective over the group).
  void update_gate_bias(double rate);
  // The stored experts. Taking them mutably marks them changed (the bf16
  // working copies are made again by the next batch); read through the const
  // overload to keep the copies.
  ExpertParams& params() {
    parameters_changed();
    return params_;
  }
  const ExpertParams& params() const { return params_; }
  // bf16 compute keeps bf16 copies of the stored weights while they are
  // unchanged: always in inference; in training the next batch after a
  // backward (an optimizer step follows it) makes them again. Whoever writes
  // the weights another way (through a reference taken earlier, a DLPack
  // view) calls this; the PyTorch module does it when torch's version
  // counters say the weights changed.
  void parameters_changed() { ++parameters_version_; }
  uint64_t parameters_version() const { return parameters_version_; }
  // How often the stored weights were converted to bf16 so far (once per version while batches use them).
  int64_t bf16_weight_conversions() const { return bf16_conversions_; }
  // Deterministic initialisation keyed by logical expert id, so any placement
  // and any number of ranks hold the same weights.
  void init_parameters(uint64_t seed);
  // Where each logical expert lives (a permutation of positions rank * L + slot;
  // the same on every rank). Only before the parameters exist (init_parameters
  // or load): afterwards it would relabel the stored weights, so it throws;
  // migrate() moves them.
  void set_placement(std::vector<int> position_of_expert);
  // Moves the stored experts to a new physical placement (whole experts only),
  // collectively: every rank's new slots receive their logical expert's
  // weights from its current primary replica, and the same for each
  // per-expert state given (an optimizer's moments, shaped like params()), so
  // training continues as if the experts had always lived there. Gradients
  // are zeroed; batches planned before are refused afterwards.
  void migrate(const ExpertPlacement& placement, const std::vector<ExpertParams*>& per_expert_state = {});
  // Redundant experts: the group's loads (each rank's `local_load` per logical
  // expert, summed) placed by EPLB on `physical` slots, then migrate().
  // Collective; returns the new placement and the summed loads.
  struct Rebalanced {
    ExpertPlacement placement;
    std::vector<double> load;
  };
  Rebalanced rebalance(const std::vector<double>& local_load, int physical,
                       const std::vector<ExpertParams*>& per_expert_state = {});

  // ---- one batch at a time: the layer keeps the last forward's handle for
  // backward(dout); a new forward(x) releases it first (its buffers are
  // reused) ----
  MoEForward forward(const TensorView& x);
  MoEForward forward(const TensorView& x, const RoutingChoice& routing, const ExecPlan& plan);
  MoEForward forward(const TensorView& x, const RoutingChoice& routing, PlanChooser& chooser);
  // Throws naming the field when this layer cannot run `plan` (r not 0 or a
  // divisor of S, d < 1, 2DH without node groups).
  void check_plan(const ExecPlan& plan) const;

  // Checkpoints keyed by logical expert id, in the sharded format of
  // parallel/checkpoint.h (a directory of generations, manifest last): every
  // rank's shard holds its experts ("experts.<e>.w1", ...; a sliced expert
  // whole, from its first slice's rank) and rank 0's also the gate
  // ("gate.weight"). load() takes the experts this rank holds now from
  // whichever shard has them, whatever W saved them, so a checkpoint moves
  // between layouts. Collective.
  void save(const std::string& dir) const;
  void load(const std::string& dir);
  // The pieces of save and load, for callers that write their own checkpoint
  // (the PyTorch module, training state with moments shaped like the
  // parameters): the whole logical experts this rank saves from `p`, keyed
  // prefix + "experts.<e>.w1" (collective over the slices when experts are
  // sliced), and this rank's slots of `into` filled from whole logical experts.
  LogicalExpertTensors logical_expert_tensors(const ExpertParams& p, const std::string& prefix = "") const;
  void assign_logical_experts(const LogicalExpertSource& get, ExpertParams& into) const;

  // Gradients of sum(dout * output) + balance_coef * balance_loss + z_coef * z_loss
  // for the last forward(x): accumulated into gate_grad() and expert_grads();
  // returns dx [T, M] when input_grad (skipping it also skips the return
  // all-to-all, as Tutel does for inputs without gradient). The gate gradient is
  // summed over the expert group (data-parallel replicas of the gate); expert
  // gradients are not reduced (each expert lives on one rank).
  Tensor backward(const TensorView& dout, double balance_coef = 0.0, double z_coef = 0.0, bool input_grad = true);

  // ---- many batches in flight: the phases on handles. forward(x) is
  // plan -> forward(handle); forward(handle) is dispatch -> experts(chunk)
  // for every chunk -> combine -> finish, pipelined: chunk i's all-to-all
  // runs on the executor while chunk i-1's experts compute ----
  // Gate, routing, capacity (agreed over the group: a collective) and the
  // dispatch plan, with its counts exchanged (dropless: a collective).
  // With a CombineLayout (on every rank, or on none) the results go where it
  // says: finish() then moves them (a collective) and backward() takes dout
  // in that layout.
  MoEHandle plan(const TensorView& x, const RoutingChoice& routing, const ExecPlan& plan,
                 const CombineLayout* combine_layout = nullptr);
  MoEHandle plan(const TensorView& x, const RoutingChoice& routing, PlanChooser& chooser,
                 const CombineLayout* combine_layout = nullptr);
  // Encodes the routed rows and posts every chunk's all-to-all; returns the
  // last chunk's Work (the executor is FIFO: it done means all are).
  Work dispatch(MoEBatch& batch);
  // One chunk's experts (the first gathers the plan's working weights, a
  // collective when sliced); waits for the chunk's rows and posts its return
  // all-to-all. Chunks in order 0, 1, ...
  void experts(MoEBatch& batch, int chunk);
  // Runs the chunks experts() has not run, then returns the Work of the
  // return exchange (the last chunk's).
  Work combine(MoEBatch& batch);
  // Waits for the return exchange; out[t] = sum_j weight * row(t, j), then
  // (with a combine layout) each result to its rank and row.
  const MoEForward& finish(MoEBatch& batch);
  // The phases the batch has not run yet, up to finish().
  const MoEForward& forward(MoEBatch& batch);
  // Gradients of the finished batch (see backward(dout) above); may run for
  // any finished handle, in any order, also after later batches.
  Tensor backward(MoEBatch& batch, const TensorView& dout, double balance_coef = 0.0, double z_coef = 0.0,
                  bool input_grad = true);

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
  // The group for small host values (capacity, plan agreement, loads): group()
  // itself, or, when group() moves device memory (device ops), a host-buffer
  // view of it (comm/backends/staged).
  const std::shared_ptr<Communicator>& host_group() const { return host_group_; }
  // The ranks a batch's all-to-alls span: the whole group, or, when each
  // replica domain (MoEConfig::replica_domain) holds every expert, as expert
  // data parallelism's groups do, this rank's domain, so tokens never leave
  // it and the exchanges post no empty message to another domain (the
  // all-reduces and a CombineLayout's moves stay group-wide). exchange_first() is the
  // group rank of its rank 0. It follows the placement (migrate).
  const std::shared_ptr<Communicator>& exchange_group() const { return exchange_group_; }
  int exchange_first() const { return exchange_first_; }
  // The physical slots a source rank's choices of an expert go to, in turn:
  // its domain's replicas when the domain has any, else every replica.
  std::vector<int> replicas_used_by(int source_rank, int expert) const;
  // What share of a source rank's kept choices of an expert each physical
  // slot takes (MoEConfig::replica_choice; whole experts).
  std::vector<std::pair<int, double>> replica_shares(int source_rank, int expert) const;
  // 2DH over the exchange's nodes (node_size ranks each); none within one node.
  bool has_hierarchical() const { return hierarchical_ != nullptr; }
  // The same phases in virtual (emulated) seconds; zeros without emulation.
  const MoEPhaseTimes& virtual_phase_times() const { return virtual_times_; }
  // The dispatch plan of the last planned batch (empty before the first). Its
  // capacity is the group's, except under uncapped dropless plans (capacity
  // factor 0, dropless exchange): there nothing drops and it is this rank's
  // largest expert load.
  const DispatchPlan& last_plan() const;
  // The routing of the last planned batch: experts [T, k] (best first), weights, scores.
  const Routing& last_routing() const;
  // The next batch planned routes its tokens to these choices instead of the
  // gate's (a recorded trace replayed: replayed_routing in moe/router.h),
  // once; its token count must match (checked on each rank before any
  // collective: every rank must replay alike). For benchmarks at shapes a
  // trace was not recorded at, timing-only included (the gate's GEMM is
  // skipped and not charged). Inference only: backward on such a batch throws.
  void replay_routing(Tensor experts, Tensor weights);
  RoutingChoice routing_choice() const { return {config_.router.capacity_factor, config_.router.k}; }
  // GEMMs run since the last reset, with how often each shape ran.
  const std::map<GemmShape, int64_t>& gemms() const { return gemms_; }
  double gemm_flops() const;
  void reset_profile();
  // The pool the batches' buffers come from.
  const BufferPool& buffers() const { return pool_; }

 private:
  using Working = MoEBatch::Working;
  int64_t hidden_in() const;  // H1 of a whole expert
  Tensor fresh(Shape shape) const;  // zeros (untouched memory when timing only)
  // Tensors in the ops' memory: plain host tensors when the ops run on the
  // host (zeros even when timing only), else allocated by the ops.
  Tensor ops_empty(Shape shape, DType dtype = DType::f32) const;
  Tensor ops_zeros(Shape shape, DType dtype = DType::f32) const;
  // The experts on the host (themselves on host ops): MoEOps::copy_out of each tensor.
  ExpertParams to_host(const ExpertParams& p) const;
  // A host array as the ops read it: its own data on host ops, else uploaded
  // once into `slot` (the batch keeps it).
  template <class T>
  const T* ops_array(const std::vector<T>& v, Tensor& slot) const;
  TensorView ops_view(void* data, DType dtype, Shape shape) const {
    return TensorView(data, dtype, std::move(shape), ops_->device());
  }
  // The host-value view of a group (itself when the ops run on the host).
  std::shared_ptr<Communicator> host_side(const std::shared_ptr<Communicator>& group) const;
  mutable std::map<const Communicator*, std::shared_ptr<Communicator>> host_side_cache_;
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
  // What a plan's sharding degree makes of the placement; cached per r (the
  // placement changes only in migrate()).
  const DispatchGeometry& geometry(int r);
  DispatchGeometry make_geometry(const PlanShape& shape, int r) const;
  std::map<int, DispatchGeometry> geometries_;
  // Groups of the ranks holding each replicated expert (made per placement),
  // and the replica gradient sum over them after each backward.
  void make_replica_groups();
  void sum_replica_gradients(ExpertParams& grads);
  struct ReplicaGroup {
    std::vector<int> slots;               // my local slots holding the expert
    std::shared_ptr<Communicator> group;  // the ranks holding it; null when they are all mine
  };
  std::vector<ReplicaGroup> replica_groups_;
  // Groups by member list, kept across migrations: a rebalance that keeps an
  // expert's holders reuses its group instead of creating one more.
  std::map<std::vector<int>, std::shared_ptr<Communicator>> replica_group_cache_;
  uint64_t placement_generation_ = 0;
  MoEHandle plan_impl(const TensorView& x, const RoutingChoice& routing, const ExecPlan* fixed, PlanChooser* chooser,
                      const CombineLayout* combine_layout);
  // The combine layout's counts and rows, exchanged at plan time.
  void exchange_result_layout(DispatchPlan& plan, const CombineLayout& layout);
  // Rows [n, M] of `from` in `order` to their ranks (counts), received into a new tensor.
  Tensor move_rows(const float* from, const std::vector<int64_t>& order, Tensor& order_slot,
                   const std::vector<int64_t>& send_counts, const std::vector<int64_t>& recv_counts);
  Routing route_tokens(const RouterConfig& router, const TensorView& x, Tensor& logits);
  // Exchanges per-block row counts (dropless; padded needs none).
  void exchange_layout(DispatchPlan& plan);
  void load_here(const std::string& dir);  // load() without the agreement
  void gather_weights(const DispatchPlan& plan, Working& into);
  // Working-weight gradients back to the stored slices (reduce-scatter) and fc2's
  // bias gradient over the S ranks of each expert.
  void scatter_gradients(const PlanShape& shape, const ExpertParams& working_grads, bool gathered);
  void run_chunk(MoEBatch& batch, int chunk);
  void backward_chunk(const MoEBatch& batch, int chunk, const Tensor& d_out, bool input_grad, ExpertParams& grads,
                      Tensor& d_rows, Tensor& dy16, Tensor& dp16);
  // per_row: elements a row takes in `in` and `out` (0: model_dim; a packed fp8 payload's bytes).
  Work exchange(const DispatchPlan& plan, int chunk, const TensorView& in, const TensorView& out, bool to_experts,
                int64_t per_row = 0);
  // The dispatch payload: its elements per row and dtype (f32 rows, bf16 rows, packed fp8 bytes), the
  // conversion of rows into it and back.
  int64_t payload_row() const;
  DType payload_storage() const;
  void to_payload(const float* rows, int64_t n, void* out);
  void from_payload(const void* in, int64_t n, float* rows);
  // The routed rows in send order (or, sent once per rank, the distinct ones).
  Tensor encode(MoEBatch& batch, const TensorView& x);
  Work exchange_distinct(const DispatchPlan& plan, int chunk, const TensorView& in, const TensorView& out);
  ExpertActivations allocate_activations(const DispatchPlan& plan, const Working& weights);
  // The plan check, with the (batch, phase) order that came before it.
  void verify_plan_agreement(const ExecPlan& plan, bool moves_results);
  enum class Phase : uint8_t { plan, dispatch, experts, combine, finish, backward };
  void record(const MoEBatch& batch, Phase phase, int chunk = 0);
  void require(const MoEBatch& batch, MoEBatch::Stage stage, const char* phase) const;
  MoEConfig config_;
  std::shared_ptr<Communicator> group_;
  std::shared_ptr<Communicator> host_group_;
  bool host_group_given_ = false;  // a host communicator of its own, not a view of group_
  ParamLayout layout_;
  int64_t local_hidden_;  // hidden width stored per rank (H / S)
  bool parameters_exist_ = false;
  // Sub-communicators every plan may need, made once at construction.
  std::shared_ptr<Communicator> shard_group_;                    // the S ranks of my expert
  std::map<int, std::shared_ptr<Communicator>> gather_groups_;   // per r >= 1 with S / r > 1
  // The exchange's communicator and 2DH, per placement; groups made once are
  // kept (a migration back reuses them, and in-flight work keeps its own).
  bool domains_hold_every_expert() const;
  A2AAlgorithm requested_a2a_ = A2AAlgorithm::flat;  // config.plan.a2a as given (migrate may fall back from it)
  void make_exchange_group();
  std::shared_ptr<Communicator> exchange_group_;
  std::shared_ptr<Communicator> exchange_host_;  // its host-value view (counts, row maps)
  int exchange_first_ = 0;
  std::map<std::vector<int>, std::shared_ptr<Communicator>> domain_group_cache_, host_domain_cache_;
  // ExpertPlacement::nearest_shares of an expert under this placement, made once (the geometry and the
  // planner's replica_shares read it); the layer is one rank's, so no other thread fills it.
  const std::vector<int64_t>& nearest_quanta(int expert) const;
  mutable std::map<int, std::vector<int64_t>> nearest_share_cache_;
  std::map<const Communicator*, std::unique_ptr<algorithms::HierarchicalAlltoall>> hierarchical_cache_;
  algorithms::HierarchicalAlltoall* hierarchical_ = nullptr;

  Tensor gate_weight_;
  Tensor gate_bias_;
  Rng noise_{0};  // router noise (router.noise_std > 0), seeded by init_parameters per rank
  Tensor replay_experts_, replay_weights_;  // replay_routing's, until the next plan
  // bf16 copies of the stored w1, w2 and the parameters_version_ they were made at (a new pair per version:
  // a batch in flight keeps the pair it computed with).
  uint64_t parameters_version_ = 0, bf16_version_ = ~uint64_t{0};
  Tensor bf16_w1_, bf16_w2_;
  int64_t bf16_conversions_ = 0;
  ExpertParams params_;
  Tensor gate_grad_;
  ExpertParams grads_;
  // The ops' GEMMs, counted in gemms(). weights_read: an earlier block of
  // the same expert read this weight matrix (see MoEOps::gemm).
  void gemm(const kernels::GemmArgs& args, OpData data = OpData::bulk, bool weights_read = false);
  void gemm_bf16(const kernels::GemmBf16Args& args, bool weights_read = false);
  std::shared_ptr<MoEOps> ops_;
  // The kinds of pooled buffer: a batch holds its forward ones until its handle
  // goes; backward's are temporaries of the call.
  enum class Buffer : uint8_t { input, send, recv, arrived, pre, act, expert_out, back, d_returned, d_out, d_rows, d_act, d_pre,
                                d_sent, recv_bf16, act_bf16, w1_bf16, w2_bf16, d_out_bf16, d_pre_bf16,
                                gathered, gw1, gb1, gw2, gb2, dw1, db1, dw2, db2, grad_blocks, grad_mine, replica_sum,
                                send_payload, recv_payload, out_payload, back_payload, count };
  Tensor buffer(Buffer which, Shape shape, DType dtype = DType::f32);
  BufferPool pool_;
  MoEPhaseTimes times_, virtual_times_;
  std::map<GemmShape, int64_t> gemms_;
  uint64_t batches_planned_ = 0;
  uint64_t phase_hash_ = 0;  // of the (batch, phase) sequence so far
  MoEHandle last_;           // the last planned batch (last_plan, last_routing)
  MoEHandle current_;        // forward(x)'s batch, for backward(dout)
};

}  // namespace switchyard
