// The point-to-point transport of a communicator seen by a subset of its
// ranks: member i is parent rank members[i]. Lets an algorithm (a barrier, say)
// run among the members of a group before the group's communicator exists.
#pragma once

#include <vector>

#include "comm/transport.h"

namespace switchyard {

class MemberTransport : public Transport {
 public:
  MemberTransport(Transport& parent, const std::vector<int>& members, int my_index)
      : parent_(parent), members_(members), my_index_(my_index) {}
  int rank() const override { return my_index_; }
  int size() const override { return static_cast<int>(members_.size()); }
  void post_send(int peer, const void* data, size_t bytes, uint32_t tag) override {
    parent_.post_send(members_[static_cast<size_t>(peer)], data, bytes, tag);
  }
  void post_recv(int peer, void* data, size_t bytes, uint32_t tag) override {
    parent_.post_recv(members_[static_cast<size_t>(peer)], data, bytes, tag);
  }
  void wait_all(Deadline deadline) override { parent_.wait_all(deadline); }

 private:
  Transport& parent_;
  const std::vector<int>& members_;
  int my_index_;
};

}  // namespace switchyard
