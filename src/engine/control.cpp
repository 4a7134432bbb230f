#include "engine/control.h"

#include <algorithm>
#include <cstring>
#include <numeric>

namespace starserve {

void ControlMessage::add_admit(SeqId id, const ContextPlan& plan, int layers_per_chunk,
                               std::span<const int32_t> context, int prompt_logprobs, int32_t after_context,
                               SeqId from) {
  begin_entry();
  if (from >= 0) context = {};
  words_.insert(words_.end(), {static_cast<int64_t>(id), static_cast<int64_t>(plan.mode), plan.block_size,
                               plan.anchor_size, plan.n_blocks, static_cast<int64_t>(plan.exact_layout),
                               layers_per_chunk, prompt_logprobs, after_context, static_cast<int64_t>(from),
                               static_cast<int64_t>(context.size())});
  words_.insert(words_.end(), context.begin(), context.end());
}

void ControlMessage::add_fork(SeqId id, SeqId child) {
  begin_entry();
  words_.insert(words_.end(), {static_cast<int64_t>(id), static_cast<int64_t>(child)});
}

void ControlMessage::add_retain(SeqId id, SeqId entry) {
  begin_entry();
  words_.insert(words_.end(), {static_cast<int64_t>(id), static_cast<int64_t>(entry)});
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
        plan.exact_layout = static_cast<ExactLayout>(m[i++]);
        s.layers_per_chunk = static_cast<int>(m[i++]);
        s.prompt_top_k = static_cast<int>(m[i++]);
        const int32_t after_context = static_cast<int32_t>(m[i++]);
        const SeqId from = m[i++];
        const int64_t n_ctx = m[i++];
        s.context.assign(m.begin() + i, m.begin() + i + n_ctx);
        i += n_ctx;
        if (from >= 0) {
          // A cached context: its KV (this rank's share) becomes the request's, phase 1 is skipped.
          const Seq& entry = seqs_.at(from);
          s.mode = entry.mode;
          s.layout = entry.layout;
          if (cache_.has(from)) SS_RETURN_IF_ERROR(cache_.fork(from, id));
          seqs_[id] = std::move(s);
          continue;
        }
        if (s.prompt_top_k >= 0 && n_ctx > 0) {
          s.next.assign(s.context.begin() + 1, s.context.end());
          s.next.push_back(after_context);
        }
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
        const ContextScoring scoring{s.next, s.prompt_top_k, &s.scores};
        const ContextScoring* score = s.prompt_top_k >= 0 ? &scoring : nullptr;
        if (s.mode == AttentionMode::kExact) {
          SS_RETURN_IF_ERROR(encoder_.encode_exact(id, s.context, s.layout, c, s.layers_per_chunk, score));
        } else if (k < static_cast<int>(s.layout.blocks_of(comm_.rank()).size())) {
          SS_RETURN_IF_ERROR(encoder_.encode_block(id, s.context, s.layout, k, c, s.layers_per_chunk, score));
        } else {
          SS_RETURN_IF_ERROR(encoder_.join_block(id, s.layout, k, c, s.layers_per_chunk));
        }
        ++phase1_steps_;
      }
      return Status();
    case ControlCommand::kDecode: {
      std::vector<std::vector<int32_t>> tokens(n), positions(n), targets(n);
      std::vector<ScoreRequest> scores(n);
      std::vector<BatchSeq> batch(n);
      for (int64_t r = 0; r < n; ++r) {
        const SeqId id = m[i++];
        const int64_t start = m[i++], count = m[i++];
        tokens[r].assign(m.begin() + i, m.begin() + i + count);
        i += count;
        positions[r].resize(count);
        std::iota(positions[r].begin(), positions[r].end(), static_cast<int32_t>(start));
        Seq& s = seqs_.at(id);
        batch[r] = BatchSeq{id, tokens[r], positions[r], false};
        if (!s.registered && s.prompt_top_k >= 0) {
          // Phase 1's scores to rank 0, which scores the query itself: query token j is followed by
          // j + 1; the last one's successor is the first generated token, not part of the prompt.
          SS_RETURN_IF_ERROR(gather_scores(s));
          if (comm_.rank() == 0) {
            targets[r].assign(tokens[r].begin() + 1, tokens[r].end());
            targets[r].push_back(-1);
            scores[r] = ScoreRequest{targets[r], s.prompt_top_k, &s.scores};
            batch[r].scores = &scores[r];
          }
        }
        if (!s.registered) {
          encoder_.finish(id);  // phase 1 over: drop the anchor's scratch KV
          // Under a sliding window a rank places its keys by their positions (its runs).
          phase2_.register_sequence(id, s.layout, comm_.rank());
          s.registered = true;
          s.context.clear();
          s.context.shrink_to_fit();
          s.next.clear();
          s.next.shrink_to_fit();
        }
      }
      if (comm_.rank() == 0 && !rows.empty()) return model_.forward_sample(batch, phase2_, rows, sampled);
      return model_.forward(batch, phase2_, comm_.rank() == 0 ? logits : nullptr);
    }
    case ControlCommand::kRetain:
      for (int64_t r = 0; r < n; ++r) {
        const SeqId id = m[i++];
        const SeqId entry = m[i++];
        const Seq& s = seqs_.at(id);
        SS_CHECK(!s.registered && seqs_.count(entry) == 0, "sequence {} retained as {} after its query", id, entry);
        encoder_.finish(id);  // the anchor's scratch is not part of it
        Seq e;
        e.mode = s.mode;
        e.layout = s.layout;
        if (cache_.has(id)) SS_RETURN_IF_ERROR(cache_.fork(id, entry));
        seqs_[entry] = std::move(e);
      }
      return Status();
    case ControlCommand::kFork:
      for (int64_t r = 0; r < n; ++r) {
        const SeqId id = m[i++];
        const SeqId child = m[i++];
        const Seq& s = seqs_.at(id);
        SS_CHECK(s.registered && seqs_.count(child) == 0, "sequence {} forked into {} before its query", id, child);
        Seq c;
        c.mode = s.mode;
        c.layout = s.layout;
        c.registered = true;
        if (cache_.has(id)) SS_RETURN_IF_ERROR(cache_.fork(id, child));
        phase2_.clone_sequence(id, child);
        seqs_[child] = std::move(c);
      }
      return Status();
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

Status StepExecutor::gather_scores(Seq& s) {
  // Fixed-size entries of int64 words: position, target, logprob bits, then top_k (token, logprob
  // bits) pairs (token -1 where a vocabulary has fewer than top_k tokens), padded to the longest rank.
  const auto bits = [](float f) {
    uint32_t u = 0;
    std::memcpy(&u, &f, sizeof(u));
    return static_cast<int64_t>(u);
  };
  const auto value = [](int64_t w) {
    const auto u = static_cast<uint32_t>(w);
    float f = 0.0f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  };
  const int64_t k = s.prompt_top_k;
  const int64_t words = 3 + 2 * k;
  const int world = comm_.world_size();
  const int64_t mine = static_cast<int64_t>(s.scores.size());
  std::vector<int64_t> counts(world);
  SS_RETURN_IF_ERROR(comm_.all_gather(&mine, counts.data(), sizeof(int64_t)));
  const int64_t longest = *std::max_element(counts.begin(), counts.end());
  std::vector<int64_t> send(static_cast<size_t>(longest * words), -1);
  for (int64_t e = 0; e < mine; ++e) {
    const ScoredToken& t = s.scores[e];
    int64_t* w = send.data() + e * words;
    w[0] = t.position;
    w[1] = t.target;
    w[2] = bits(t.logprob);
    for (size_t j = 0; j < t.top.size() && static_cast<int64_t>(j) < k; ++j) {
      w[3 + 2 * j] = t.top[j].token;
      w[4 + 2 * j] = bits(t.top[j].logprob);
    }
  }
  std::vector<int64_t> recv(static_cast<size_t>(longest * words * world));
  if (longest > 0) {
    SS_RETURN_IF_ERROR(comm_.all_gather(send.data(), recv.data(), static_cast<size_t>(longest * words) * 8));
  }
  s.scores.clear();
  if (comm_.rank() != 0) return Status();
  for (int r = 0; r < world; ++r) {
    for (int64_t e = 0; e < counts[r]; ++e) {
      const int64_t* w = recv.data() + (r * longest + e) * words;
      ScoredToken t;
      t.position = w[0];
      t.target = static_cast<int32_t>(w[1]);
      t.logprob = value(w[2]);
      for (int64_t j = 0; j < k && w[3 + 2 * j] >= 0; ++j) {
        t.top.push_back({static_cast<int32_t>(w[3 + 2 * j]), value(w[4 + 2 * j])});
      }
      s.scores.push_back(std::move(t));
    }
  }
  std::stable_sort(s.scores.begin(), s.scores.end(),
                   [](const ScoredToken& a, const ScoredToken& b) { return a.position < b.position; });
  return Status();
}

std::vector<ScoredToken> StepExecutor::take_prompt_scores(SeqId id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return {};
  return std::move(it->second.scores);
}

}  // namespace starserve
