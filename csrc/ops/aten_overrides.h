// Opt-in replacements of ATen CPU kernels (ipex_lite.enable_aten_overrides).
#pragma once

#include <string>
#include <vector>

namespace ipex_lite {

// Names of the aten ops ipex_lite can take over, in a fixed order.
std::vector<std::string> aten_override_names();
// Those currently installed.
std::vector<std::string> active_aten_overrides();
// Installs (on) or removes (off) ours for `name`; returns whether it was
// installed before.  Removing restores ATen's kernel exactly: the
// dispatcher keeps the kernel we displaced and falls back to it.
// Throws std::invalid_argument for an unknown name.
bool set_aten_override(const std::string& name, bool on);

}  // namespace ipex_lite
