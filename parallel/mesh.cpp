#include "parallel/mesh.h"

#include <set>

#include "core/error.h"

namespace switchyard {

DeviceMesh::DeviceMesh(std::shared_ptr<Communicator> world, Dims dims, Roles roles)
    : world_(std::move(world)), dims_(std::move(dims)) {
  SY_CHECK(!dims_.empty(), "a device mesh needs at least one dimension");
  int64_t product = 1;
  std::string shape;
  std::set<std::string> names;
  for (const auto& [name, size] : dims_) {
    if (size < 1) SY_THROW(InvalidArgument, "mesh dimension '", name, "' has size ", size, ", expected >= 1");
    if (!names.insert(name).second) SY_THROW(InvalidArgument, "mesh dimension '", name, "' is named twice");
    product *= size;
    shape += (shape.empty() ? "" : " x ") + name + "=" + std::to_string(size);
  }
  if (product != world_->size())
    SY_THROW(InvalidArgument, "mesh ", shape, " has ", product, " ranks but the world has ", world_->size());

  // Row-major coordinates: the last dimension varies fastest.
  const int me = world_->rank();
  coords_.resize(dims_.size());
  int stride = 1;
  std::vector<int> strides(dims_.size());
  for (size_t d = dims_.size(); d-- > 0;) {
    strides[d] = stride;
    coords_[d] = (me / stride) % dims_[d].second;
    stride *= dims_[d].second;
  }
  for (size_t d = 0; d < dims_.size(); ++d) {
    const int base = me - coords_[d] * strides[d];
    std::vector<int> members;
    for (int c = 0; c < dims_[d].second; ++c) members.push_back(base + c * strides[d]);
    groups_.push_back(world_->create_group(members, dims_[d].first));
  }

  std::set<int> assigned;
  for (const auto& [name, ranks] : roles) {
    for (int r : ranks) {
      if (r < 0 || r >= world_->size())
        SY_THROW(InvalidArgument, "role '", name, "' lists rank ", r, ", expected 0..", world_->size() - 1);
      if (!assigned.insert(r).second) SY_THROW(InvalidArgument, "rank ", r, " is given two roles (second: '", name, "')");
    }
    for (int r : ranks)
      if (r == me) {
        role_ = name;
        role_group_ = world_->create_group(ranks, name);
      }
  }
}

size_t DeviceMesh::index_of(const std::string& dim) const {
  for (size_t d = 0; d < dims_.size(); ++d)
    if (dims_[d].first == dim) return d;
  std::string known;
  for (const auto& [name, size] : dims_) known += (known.empty() ? "" : ", ") + name;
  SY_THROW(InvalidArgument, "mesh has no dimension '", dim, "' (it has ", known, ")");
}

int DeviceMesh::dim_size(const std::string& dim) const { return dims_[index_of(dim)].second; }
int DeviceMesh::coord(const std::string& dim) const { return coords_[index_of(dim)]; }
Communicator& DeviceMesh::group(const std::string& dim) const { return *groups_[index_of(dim)]; }
std::shared_ptr<Communicator> DeviceMesh::group_ptr(const std::string& dim) const { return groups_[index_of(dim)]; }

}  // namespace switchyard
