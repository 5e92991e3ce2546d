// Training the decoder of model/model.h (examples/tiny_lm's architecture):
// forward and backward of the embedding, RMSNorms, causal rotary attention,
// LM head and cross-entropy over the host GEMMs, the FFNs as MoE layers
// (their own forward and backward, the plan chosen per batch or fixed),
// AdamW with warm-up and cosine decay, gradient clipping, and checkpoints in
// the sharded format of parallel/checkpoint.h that model/model.h also loads.
//
// Parallelism: embeddings, attention, norms, the head and the gates are
// replicated on every rank and trained data-parallel (each rank its own
// sequences; gradients summed over the world); experts are expert-parallel
// (each rank stores moe.experts / W whole experts). The loss is the mean over
// every rank's targets, so the summed gradients are the global ones.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/tensor.h"
#include "model/blocks.h"
#include "model/model_config.h"
#include "moe/moe_layer.h"

namespace switchyard {

struct LmTrainOptions {
  // The experts' GEMMs: f32, or bf16 operands with fp32 accumulation (fp32
  // master weights). The dense layers' GEMMs are fp32 either way.
  DType compute = DType::f32;
  double capacity_factor = 0;  // RouterConfig's meaning; 0 with a dropless plan: nothing drops
  CapacityRounding capacity_rounding = CapacityRounding::switchyard;
  BalanceLoss balance_loss = BalanceLoss::all_choices;
  ExecPlan plan;               // the fixed plan, used where a layer has no chooser
  int node_size = 0;           // ranks per node (2DH plans); 0: one node
};

enum class ParamKind : uint8_t { replicated, gate, expert };

// A trained tensor and its gradient. Expert tensors hold this rank's slots
// ([L, ...]); the checkpoint splits them by logical expert.
struct TrainParam {
  std::string name;
  Tensor value, grad;
  ParamKind kind = ParamKind::replicated;
  int layer = -1;
};

class TrainableLM {
 public:
  // Collective over `world` (the expert group): its size must divide the
  // expert count (whole experts per rank).
  TrainableLM(const ModelConfig& config, std::shared_ptr<Communicator> world, LmTrainOptions options = {});
  const ModelConfig& config() const { return config_; }
  Communicator& world() { return *world_; }
  MoELayer& moe(int layer) { return *moe_.at(static_cast<size_t>(layer)); }
  // The same weights on every rank for the same seed (experts keyed by
  // logical id, so any world size draws the same model).
  void init_parameters(uint64_t seed);
  // Per layer, who picks each batch's plan (nullptr: options.plan).
  void set_plan_choosers(std::vector<PlanChooser*> choosers) { choosers_ = std::move(choosers); }
  void set_fixed_plan(const ExecPlan& plan) { options_.plan = plan; }

  struct Loss {
    double ce_sum = 0;    // summed cross-entropy of this rank's targets (nats)
    int64_t targets = 0;  // how many
    double balance = 0;   // this rank's load-balancing loss, mean over layers
  };
  // tokens and targets: [sequences, seq] row-major, this rank's (sequences
  // may be 0: the rank still joins every MoE collective). Accumulates the
  // gradients of sum(CE) / global_targets + balance_coef / W * balance into
  // the parameters' gradients (replicated ones this rank's share: sum them
  // with all_reduce_gradients()). Collective.
  Loss forward_backward(const std::vector<int>& tokens, const std::vector<int>& targets, int sequences, int seq,
                        double global_targets, double balance_coef, double z_coef = 0.0);
  // The same forward without gradients.
  Loss evaluate(const std::vector<int>& tokens, const std::vector<int>& targets, int sequences, int seq);
  // Logits [sequences * seq, vocab] of a forward (tests, sampling).
  Tensor logits(const std::vector<int>& tokens, int sequences, int seq);

  void zero_grad();
  // Sums the replicated parameters' gradients over the world (the gates' are
  // summed inside their layers). Collective.
  void all_reduce_gradients();
  // The global gradient's L2 norm (experts summed over the ranks). Collective.
  double gradient_norm();
  // Every trained tensor, with its gradient as it is now (the MoE layers'
  // gradient tensors are replaced by zero_grad()).
  std::vector<TrainParam> parameters();
  // Logical expert held in a layer's local slot, and the slots of a layer.
  int expert_at_slot(int layer, int slot) const;
  int local_experts(int layer) const;

 private:
  struct Dense {  // a layer's replicated tensors
    Tensor attn_norm, wq, wk, wv, wo, ffn_norm;
  };
  struct LayerCache {
    Tensor x_in, rstd1, a, q, k, v, p, o, x_mid, rstd2, xn2;
  };
  Loss run(const std::vector<int>& tokens, const std::vector<int>* targets, int sequences, int seq, bool backward,
           double global_targets, double balance_coef, double z_coef, Tensor* logits_out);
  void attention_forward(const Dense& w, LayerCache& c, int sequences, int seq);
  void attention_backward(const Dense& w, Dense& g, const LayerCache& c, int sequences, int seq, Tensor& dx);
  ModelConfig config_;
  std::shared_ptr<Communicator> world_;
  LmTrainOptions options_;
  RotaryTable rope_;  // the inference blocks' rotation (and its transpose for the backward)
  Tensor embed_, norm_, lm_head_, g_embed_, g_norm_, g_lm_head_;
  std::vector<Dense> dense_, grads_;
  std::vector<std::unique_ptr<MoELayer>> moe_;
  std::vector<PlanChooser*> choosers_;
};

// AdamW (decoupled weight decay), moments per parameter name. Every rank
// steps its own tensors; replicated ones stay identical because their
// gradients are.
class AdamW {
 public:
  struct Options {
    double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.0;
  };
  AdamW() = default;
  explicit AdamW(Options options) : options_(options) {}
  void step(std::vector<TrainParam>& params, double lr);
  int64_t steps() const { return steps_; }
  void set_steps(int64_t steps) { steps_ = steps; }
  // The moments of a parameter (created zero on first use).
  struct Moments {
    Tensor m, v;
  };
  Moments& moments(const TrainParam& p);
  const std::map<std::string, Moments>& state() const { return state_; }

 private:
  Options options_;
  int64_t steps_ = 0;
  std::map<std::string, Moments> state_;
};

// Linear warm-up over `warmup` steps, then cosine decay to min_ratio * lr at
// `steps` (step counts from 0).
double warmup_cosine_lr(double lr, int64_t step, int64_t warmup, int64_t steps, double min_ratio = 0.1);

// Byte-level text for training: the Debian "fortunes" files of `dir`
// (without the ASCII-art ones), every 10th fortune held out, each fortune
// followed by a blank line: examples/tiny_lm/tinylm.py's corpus() exactly.
struct TextCorpus {
  std::string train, held_out;
  std::vector<std::string> held_out_documents;  // held_out, fortune by fortune (each ends in "\n\n")
  // IoError naming the folder (and the package to install) when it has none.
  static TextCorpus fortunes(const std::string& dir = "/usr/share/games/fortunes");
  // Nats per byte of held_out under train's byte frequencies (add-one smoothed).
  double unigram_nats() const;
};

struct LmTrainSchedule {
  int batch = 16;  // sequences per step over all ranks (split as evenly as the ranks allow)
  int seq = 128;   // tokens per sequence
  int64_t steps = 100;
  double lr = 3e-3, min_lr_ratio = 0.1;
  int64_t warmup = 20;
  double clip = 1.0;  // global gradient L2 norm limit; 0: none
  double balance_coef = 0.01, z_coef = 0.0;
  uint64_t seed = 1;  // the data order (the weights are the model's own seed)
  AdamW::Options adam;
};

// The training loop over a model: each step draws the global batch from the
// step number alone (so a resumed run sees the data an uninterrupted one
// would), computes, sums and clips the gradients, and steps AdamW.
class LmTrainer {
 public:
  LmTrainer(TrainableLM& model, const TextCorpus& corpus, LmTrainSchedule schedule);
  struct Step {
    int64_t step = 0;        // the one just run (from 0)
    double loss = 0;         // mean cross-entropy over every rank's targets, nats/byte
    double balance = 0;      // load-balancing loss, mean over ranks and layers
    double grad_norm = 0;    // before clipping
    double lr = 0;
  };
  Step step();  // collective
  int64_t next_step() const { return next_; }
  // The sequences (their starts in the training text) of a step, this rank's share.
  std::vector<int64_t> starts(int64_t step) const;
  // Mean cross-entropy in nats/byte over the first `sequences` non-overlapping
  // windows of the held-out text, spread over the ranks. Collective.
  double held_out_loss(int sequences);
  // Checkpoint: the model and optimizer, the next step, the data seed.
  uint64_t save(const std::string& dir, std::map<std::string, std::string> extra = {});
  // Continue from a checkpoint (any world size): weights, moments, the step.
  // Refuses one whose batches were drawn differently (batch, seq, data seed).
  std::map<std::string, std::string> resume(const std::string& dir);
  TrainableLM& model() { return model_; }
  const LmTrainSchedule& schedule() const { return schedule_; }

 private:
  std::vector<int> window(const std::string& text, int64_t start, int offset) const;
  TrainableLM& model_;
  const TextCorpus& corpus_;
  LmTrainSchedule schedule_;
  AdamW optimizer_;
  int64_t next_ = 0;
};

// Training state in the format of parallel/checkpoint.h: every parameter and
// its AdamW moments, experts split by logical expert
// ("layers.<i>.ffn.experts.<e>.w1", "adamw.m.<name>", ...), replicated ones
// from rank 0, plus `metadata` and DIR/config.json (the architecture, so
// model/model.h and `switchyard generate --model DIR` load it). Collective.
uint64_t save_lm_checkpoint(TrainableLM& model, const AdamW& optimizer, const std::string& dir,
                            std::map<std::string, std::string> metadata);
// Loads parameters (and, with an optimizer, its moments and step count) saved
// at any world size. Collective only in that every rank reads. Returns the
// checkpoint's metadata, with "generation" and "world_size" (the saving world's) added.
std::map<std::string, std::string> load_lm_checkpoint(TrainableLM& model, AdamW* optimizer, const std::string& dir);
// config.json text of a model architecture (model/model_config.h's keys).
std::string model_config_json(const ModelConfig& config);

}  // namespace switchyard
