// Cluster presets for the emulated backend: YAML files (configs/clusters/)
// naming a device model and two link classes. A preset is found by name in
// SWITCHYARD_CLUSTER_DIR, then the source tree's configs/clusters and the
// installed share/switchyard/clusters, or given as a path to a .yaml file.
#pragma once

#include <string>
#include <vector>

#include "parallel/cost_model.h"

namespace switchyard {

ClusterModel load_cluster_preset(const std::string& name_or_path);
std::vector<std::string> cluster_preset_names();

}  // namespace switchyard
