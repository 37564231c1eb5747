// Opt-in ATen overrides: each one is a torch::Library fragment for the aten
// namespace at the CPU key, created when the user turns it on and destroyed
// (which deregisters it) when they turn it off.  Nothing is registered on
// aten when ipex_lite loads.
#include "ops/aten_overrides.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>

#include "ops/embedding_bag.h"

namespace ipex_lite {
namespace {

struct Entry {
  const char* name;
  void (*install)(torch::Library&);
};

const Entry kEntries[] = {
    {"_embedding_bag_backward", [](torch::Library& m) { m.impl("_embedding_bag_backward", &aten_embedding_bag_backward); }},
};

std::mutex mu;
std::map<std::string, std::unique_ptr<torch::Library>> installed;

// Putting a second kernel on a CPU key that ATen already fills makes the
// dispatcher warn once per process; here that is the requested behaviour,
// so that one message is dropped and any other is passed on.
class QuietOverrideWarning : public c10::WarningHandler {
 public:
  explicit QuietOverrideWarning(c10::WarningHandler* next) : next_(next) {}
  void process(const c10::Warning& w) override {
    if (w.msg().find("Overriding a previously registered kernel") == std::string::npos) next_->process(w);
  }

 private:
  c10::WarningHandler* next_;
};

}  // namespace

std::vector<std::string> aten_override_names() {
  std::vector<std::string> names;
  for (const Entry& e : kEntries) names.emplace_back(e.name);
  return names;
}

std::vector<std::string> active_aten_overrides() {
  std::lock_guard<std::mutex> lock(mu);
  std::vector<std::string> names;
  for (const Entry& e : kEntries)
    if (installed.count(e.name) != 0) names.emplace_back(e.name);
  return names;
}

bool set_aten_override(const std::string& name, bool on) {
  const Entry* entry = nullptr;
  for (const Entry& e : kEntries)
    if (name == e.name) entry = &e;
  if (entry == nullptr) throw std::invalid_argument("unknown ATen override '" + name + "'");
  std::lock_guard<std::mutex> lock(mu);
  const bool was_on = installed.count(name) != 0;
  if (on && !was_on) {
    QuietOverrideWarning quiet(c10::WarningUtils::get_warning_handler());
    c10::WarningUtils::WarningHandlerGuard guard(&quiet);
    auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "aten", c10::DispatchKey::CPU, __FILE__,
                                                __LINE__);
    entry->install(*lib);
    installed.emplace(name, std::move(lib));
  } else if (!on && was_on) {
    installed.erase(name);
  }
  return was_on;
}

}  // namespace ipex_lite
