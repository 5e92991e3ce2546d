#include "launch/cluster_presets.h"

#include <yaml-cpp/yaml.h>

#include <cstdlib>
#include <filesystem>
#include <set>

#include "core/error.h"

namespace switchyard {
namespace {
namespace fs = std::filesystem;

std::vector<fs::path> preset_dirs() {
  std::vector<fs::path> dirs;
  if (const char* d = std::getenv("SWITCHYARD_CLUSTER_DIR")) dirs.emplace_back(d);
  dirs.emplace_back(fs::path(SWITCHYARD_SOURCE_DIR) / "configs" / "clusters");
  dirs.emplace_back(fs::path(SWITCHYARD_INSTALL_DATADIR) / "clusters");
  return dirs;
}

double number(const YAML::Node& parent, const std::string& key, const std::string& file, const std::string& path) {
  const YAML::Node n = parent[key];
  if (!n) SY_THROW(ConfigError, file, ": ", path, key, " is missing; expected a number");
  try {
    const double v = n.as<double>();
    if (!(v > 0)) throw YAML::Exception(n.Mark(), "not positive");
    return v;
  } catch (const YAML::Exception&) {
    SY_THROW(ConfigError, file, ":", n.Mark().line + 1, ": ", path, key, " = '", n.Scalar(),
             "', expected a positive number");
  }
}

LinkClass link(const YAML::Node& links, const std::string& key, const std::string& file) {
  const YAML::Node n = links[key];
  if (!n || !n.IsMap()) SY_THROW(ConfigError, file, ": links.", key, " is missing; expected {latency_us, bandwidth_gbps_peak, efficiency}");
  const std::string path = "links." + key + ".";
  return {number(n, "latency_us", file, path) * 1e-6,
          number(n, "bandwidth_gbps_peak", file, path) * 1e9 * number(n, "efficiency", file, path)};
}
}  // namespace

ClusterModel load_cluster_preset(const std::string& name_or_path) {
  fs::path file;
  if (name_or_path.find('/') != std::string::npos || name_or_path.ends_with(".yaml")) {
    file = name_or_path;
  } else {
    for (const auto& dir : preset_dirs())
      if (fs::exists(dir / (name_or_path + ".yaml"))) {
        file = dir / (name_or_path + ".yaml");
        break;
      }
    if (file.empty()) {
      std::string known;
      for (const auto& n : cluster_preset_names()) known += (known.empty() ? "" : ", ") + n;
      SY_THROW(ConfigError, "cluster preset '", name_or_path, "' not found; expected one of ", known,
               " or a path to a .yaml file");
    }
  }
  YAML::Node root;
  try {
    root = YAML::LoadFile(file.string());
  } catch (const YAML::Exception& e) {
    SY_THROW(ConfigError, file.string(), ": ", e.what());
  }
  const std::string f = file.string();
  ClusterModel m;
  m.name = root["name"] ? root["name"].as<std::string>() : file.stem().string();
  m.description = f;
  const YAML::Node dev = root["device"];
  if (!dev || !dev.IsMap()) SY_THROW(ConfigError, f, ": device is missing; expected a map");
  const double gemm_eff = number(dev, "gemm_efficiency", f, "device.");
  m.device.gemm_flops_f32 = number(dev, "gemm_tflops_f32_peak", f, "device.") * 1e12 * gemm_eff;
  m.device.gemm_flops_bf16 = number(dev, "gemm_tflops_bf16_peak", f, "device.") * 1e12 * gemm_eff;
  if (dev["gemm_tflops_fp8_peak"]) m.device.gemm_flops_fp8 = number(dev, "gemm_tflops_fp8_peak", f, "device.") * 1e12 * gemm_eff;
  m.device.memory_bandwidth =
      number(dev, "memory_gbps_peak", f, "device.") * 1e9 * number(dev, "memory_efficiency", f, "device.");
  // Optional: a preset without it bounds nothing (decode then admits any batch).
  if (dev["memory_gb"]) m.device.memory_capacity = number(dev, "memory_gb", f, "device.") * 1e9;
  const YAML::Node links = root["links"];
  if (!links || !links.IsMap()) SY_THROW(ConfigError, f, ": links is missing; expected a map with intra and inter");
  m.link.intra = link(links, "intra", f);
  m.link.inter = link(links, "inter", f);
  m.link.ranks_per_node = static_cast<int>(number(root, "ranks_per_node", f, ""));
  // Optional: GPUs of a node sharing one inter-node NIC (links.inter is the NIC's bandwidth).
  if (root["ranks_per_nic"]) {
    m.link.ranks_per_nic = static_cast<int>(number(root, "ranks_per_nic", f, ""));
    if (m.link.ranks_per_nic < 1 || m.link.ranks_per_node % m.link.ranks_per_nic != 0)
      SY_THROW(ConfigError, f, ": ranks_per_nic = ", m.link.ranks_per_nic, ", expected a divisor of ranks_per_node (",
               m.link.ranks_per_node, ")");
  }
  return m;
}

std::vector<std::string> cluster_preset_names() {
  std::set<std::string> names;
  for (const auto& dir : preset_dirs())
    if (fs::is_directory(dir))
      for (const auto& e : fs::directory_iterator(dir))
        if (e.path().extension() == ".yaml") names.insert(e.path().stem().string());
  return {names.begin(), names.end()};
}

}  // namespace switchyard
