// DeviceMesh: the world as a named Cartesian grid (e.g. dp x ep x tp, last
// dimension fastest) with one communicator per dimension among the ranks that
// differ only in that coordinate, plus role groups that are not Cartesian
// (attention ranks vs FFN ranks). Every group is created at construction.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "comm/communicator.h"

namespace switchyard {

class DeviceMesh {
 public:
  using Dims = std::vector<std::pair<std::string, int>>;
  using Roles = std::vector<std::pair<std::string, std::vector<int>>>;

  // The product of the dimension sizes must equal the world size. Each role
  // lists the world ranks that hold it; roles may not overlap.
  DeviceMesh(std::shared_ptr<Communicator> world, Dims dims, Roles roles = {});

  const Dims& dims() const { return dims_; }
  int dim_size(const std::string& dim) const;
  int coord(const std::string& dim) const;
  // Ranks that differ from this one only in `dim`, ordered by that coordinate.
  Communicator& group(const std::string& dim) const;
  std::shared_ptr<Communicator> group_ptr(const std::string& dim) const;
  // This rank's role and its group; empty / nullptr when the rank holds none.
  const std::string& role() const { return role_; }
  std::shared_ptr<Communicator> role_group() const { return role_group_; }
  Communicator& world() const { return *world_; }

 private:
  size_t index_of(const std::string& dim) const;
  std::shared_ptr<Communicator> world_;
  Dims dims_;
  std::vector<int> coords_;
  std::vector<std::shared_ptr<Communicator>> groups_;
  std::string role_;
  std::shared_ptr<Communicator> role_group_;
};

}  // namespace switchyard
