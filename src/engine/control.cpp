#include "engine/control.h"

#include <numeric>

namespace starserve {

void ControlMessage::add_admit(SeqId id, const ContextPlan& plan, int layers_per_chunk,
                               std::span<const int32_t> context) {
  begin_entry();
  words_.insert(words_.end(), {static_cast<int64_t>(id), static_cast<int64_t>(plan.mode), plan.block_size,
                               plan.anchor_size, plan.n_blocks, layers_per_chunk,
                               static_cast<int64_t>(context.size())});
  words_.insert(words_.end(), context.begin(), context.end());
}

void ControlMessage::add_encode(SeqId id, int k) {
  begin_entry();
  words_.insert(words_.end(), {static_cast<int64_t>(id), k});
}

void ControlMessage::add_decode(SeqId id, int64_t first_position, std::span<const int32_t> tokens) {
  begin_entry();
  words_.insert(words_.end(), {static_cast<int64_t>(id), first_position, static_cast<int64_t>(tokens.size())});
  words_.insert(words_.end(), tokens.begin(), tokens.end());
}

void ControlMessage::add_release(SeqId id) {
  begin_entry();
  words_.push_back(static_cast<int64_t>(id));
}

Status broadcast_control(Communicator& comm, std::vector<int64_t>& msg) {
  // The _idle forms: a worker waits here for as long as the server has nothing to do, without spinning.
  int64_t n = static_cast<int64_t>(msg.size());
  SS_RETURN_IF_ERROR(comm.broadcast_idle(&n, sizeof(n), 0));
  msg.resize(n);
  if (n > 0) SS_RETURN_IF_ERROR(comm.broadcast_idle(msg.data(), n * sizeof(int64_t), 0));
  return Status();
}

StepExecutor::StepExecutor(Model& model, KvCache& cache, Communicator& comm)
    : model_(model),
      cache_(cache),
      comm_(comm),
      encoder_(model, cache, comm),
      phase2_(model.backend(), cache, model.hparams(), comm, MergeAlgo::kAuto) {}

Status StepExecutor::execute(const std::vector<int64_t>& msg, std::vector<float>* logits,
                             std::span<const SampleRow> rows, std::span<int32_t> sampled) {
  SS_RETURN_IF_ERROR(execute_command(msg, logits, rows, sampled));
  const int64_t used = cache_.pages_total() - cache_.pages_free();
  pages_used_.resize(comm_.world_size());
  return comm_.all_gather(&used, pages_used_.data(), sizeof(int64_t));
}

Status StepExecutor::execute_command(const std::vector<int64_t>& m, std::vector<float>* logits,
                                     std::span<const SampleRow> rows, std::span<int32_t> sampled) {
  size_t i = 0;
  const auto cmd = static_cast<ControlCommand>(m[i++]);
  const int64_t n = m.size() > 1 ? m[i++] : 0;
  switch (cmd) {
    case ControlCommand::kStop: return Status();
    case ControlCommand::kAdmit:
      for (int64_t r = 0; r < n; ++r) {
        const SeqId id = m[i++];
        SS_CHECK(!cache_.has(id) && seqs_.count(id) == 0, "sequence {} admitted twice", id);
        Seq s;
        s.mode = static_cast<AttentionMode>(m[i++]);
        ContextPlan plan;
        plan.mode = s.mode;
        plan.block_size = static_cast<int>(m[i++]);
        plan.anchor_size = static_cast<int>(m[i++]);
        plan.n_blocks = static_cast<int>(m[i++]);
        s.layers_per_chunk = static_cast<int>(m[i++]);
        const int64_t n_ctx = m[i++];
        s.context.assign(m.begin() + i, m.begin() + i + n_ctx);
        i += n_ctx;
        SS_ASSIGN_OR_RETURN(s.layout, encoder_.layout_for(n_ctx, plan));
        seqs_[id] = std::move(s);
      }
      return Status();
    case ControlCommand::kEncode:
      for (int64_t r = 0; r < n; ++r) {
        const SeqId id = m[i++];
        const int step = static_cast<int>(m[i++]);
        Seq& s = seqs_.at(id);
        // Step `step` of phase 1: chunk c of block k (exact: chunk c of the one collective forward).
        const int per_block = encoder_.chunks_per_block(s.layers_per_chunk);
        const int k = step / per_block, c = step % per_block;
        if (s.mode == AttentionMode::kExact) {
          SS_RETURN_IF_ERROR(encoder_.encode_exact(id, s.context, s.layout, c, s.layers_per_chunk));
        } else if (k < static_cast<int>(s.layout.blocks_of(comm_.rank()).size())) {
          SS_RETURN_IF_ERROR(encoder_.encode_block(id, s.context, s.layout, k, c, s.layers_per_chunk));
        } else {
          SS_RETURN_IF_ERROR(encoder_.join_block(id, s.layout, k, c, s.layers_per_chunk));
        }
        ++phase1_steps_;
      }
      return Status();
    case ControlCommand::kDecode: {
      std::vector<std::vector<int32_t>> tokens(n), positions(n);
      std::vector<BatchSeq> batch(n);
      for (int64_t r = 0; r < n; ++r) {
        const SeqId id = m[i++];
        const int64_t start = m[i++], count = m[i++];
        tokens[r].assign(m.begin() + i, m.begin() + i + count);
        i += count;
        positions[r].resize(count);
        std::iota(positions[r].begin(), positions[r].end(), static_cast<int32_t>(start));
        Seq& s = seqs_.at(id);
        if (!s.registered) {
          encoder_.finish(id);  // phase 1 over: drop the anchor's scratch KV
          // Under a sliding window a context-only rank places its keys by their first position.
          phase2_.register_sequence(id, comm_.rank() == s.layout.query_host, s.layout.n_context,
                                    s.layout.first_position_of(comm_.rank()));
          s.registered = true;
          s.context.clear();
          s.context.shrink_to_fit();
        }
        batch[r] = BatchSeq{id, tokens[r], positions[r], false};
      }
      if (comm_.rank() == 0 && !rows.empty()) return model_.forward_sample(batch, phase2_, rows, sampled);
      return model_.forward(batch, phase2_, comm_.rank() == 0 ? logits : nullptr);
    }
    case ControlCommand::kRelease:
      for (int64_t r = 0; r < n; ++r) {
        const SeqId id = m[i++];
        phase2_.forget_sequence(id);
        encoder_.finish(id);
        cache_.free_sequence(id);
        seqs_.erase(id);
      }
      return Status();
  }
  return internal_error("unknown control command {}", static_cast<int64_t>(cmd));
}

}  // namespace starserve
