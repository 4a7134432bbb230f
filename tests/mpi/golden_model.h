// The model of a golden folder (tests/golden/<name>/hf: safetensors + config.json, made by
// scripts/reference/starref golden.py) on a one-thread CPU backend, loaded once per process: the
// tiny KV-shifting and Attamba models the MPI tests run on every rank.
#pragma once

#include <memory>
#include <string>

#include "backend/backend.h"
#include "common/check.h"
#include "model/hf_source.h"
#include "model/model.h"
#include "../unit/family_golden.h"

namespace starserve {

struct GoldenModel {
  std::unique_ptr<Backend> backend = make_cpu_backend(1);
  std::unique_ptr<WeightSource> source;
  std::unique_ptr<Model> model;
};

// One golden per test program: the first call names it and loads it.
inline GoldenModel& golden_model(const std::string& name) {
  static GoldenModel* g = [&] {
    auto* x = new GoldenModel;
    auto s = HfWeightSource::open(family_golden::family_dir(name) + "/hf");
    SS_CHECK(s.ok(), "{}", s.status().to_string());
    x->source = std::move(s).value();
    auto m = create_model(*x->source, *x->backend);
    SS_CHECK(m.ok(), "{}", m.status().to_string());
    x->model = std::move(m).value();
    return x;
  }();
  return *g;
}

}  // namespace starserve
