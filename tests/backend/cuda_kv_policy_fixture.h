// Device copies of KV policy states for the GPU policy kernel tests (cuda_kv_policy_test.cc,
// cuda_kv_policy_latent_test.cc): host arrays in kernels/kv_policy.cuh KvPolicySeq's layout
// uploaded with the inverse slot map, and reads of whole device buffers. CHECK-fails on a backend
// error (tests only).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "common/check.h"
#include "kernels/kv_policy.cuh"
#include "tests/backend/cuda_parity_fixture.h"

namespace lorc::policy_test {

using kernels::KvPolicySeq;
using parity::PutRaw;

inline cudaStream_t Stream(Backend& be) { return static_cast<cudaStream_t>(be.stream_handle()); }

// The device copy of some sequences' policy arrays ([layers][kv_heads][capacity] each) and the
// KvPolicySeq array pointing into them.
struct DeviceStates {
  DeviceBuffer state, slot, last_hit, pos, seqs;
  std::vector<KvPolicySeq> host_seqs;
  std::vector<size_t> offsets;  // per sequence: its arrays' first position
  int layers = 0, kv_heads = 0;
};

inline DeviceStates Upload(Backend& be, const std::vector<std::vector<uint8_t>>& state,
                    const std::vector<std::vector<int32_t>>& slot, const std::vector<std::vector<int32_t>>& last_hit,
                    std::vector<KvPolicySeq> seqs, int layers, int kv_heads) {
  DeviceStates d;
  d.layers = layers;
  d.kv_heads = kv_heads;
  std::vector<uint8_t> st;
  std::vector<int32_t> sl, lh, ps;
  for (size_t s = 0; s < seqs.size(); ++s) {
    d.offsets.push_back(st.size());
    st.insert(st.end(), state[s].begin(), state[s].end());
    sl.insert(sl.end(), slot[s].begin(), slot[s].end());
    lh.insert(lh.end(), last_hit[s].begin(), last_hit[s].end());
    // pos: the inverse of the slot map over the sequence's positions (kFull keys last, so a slot
    // a dead key left to a kept one maps to the kept one); -9 elsewhere.
    const int cap = seqs[s].capacity, len = seqs[s].seq_len;
    std::vector<int32_t> inv(state[s].size(), -9);
    for (int pass = 0; pass < 2; ++pass) {
      for (int lg = 0; lg < layers * kv_heads; ++lg) {
        for (int p = 0; p < len; ++p) {
          const size_t i = static_cast<size_t>(lg) * cap + p;
          if ((state[s][i] == 1) == (pass == 1) && slot[s][i] >= 0 && slot[s][i] < cap) {
            inv[static_cast<size_t>(lg) * cap + slot[s][i]] = p;
          }
        }
      }
    }
    ps.insert(ps.end(), inv.begin(), inv.end());
  }
  d.state = PutRaw(be, st);
  d.slot = PutRaw(be, sl);
  d.last_hit = PutRaw(be, lh);
  d.pos = PutRaw(be, ps);
  for (size_t s = 0; s < seqs.size(); ++s) {
    seqs[s].state = d.state.as<uint8_t>() + d.offsets[s];
    seqs[s].slot = d.slot.as<int32_t>() + d.offsets[s];
    seqs[s].last_hit = d.last_hit.as<int32_t>() + d.offsets[s];
    seqs[s].pos = d.pos.as<int32_t>() + d.offsets[s];
  }
  d.host_seqs = seqs;
  d.seqs = PutRaw(be, seqs);
  return d;
}

template <typename T>
inline std::vector<T> GetAll(Backend& be, const DeviceBuffer& b) {
  std::vector<T> out(b.bytes() / sizeof(T));
  CHECK_OK(be.CopyToHost(out.data(), b.data(), out.size() * sizeof(T)));
  CHECK_OK(be.Synchronize());
  return out;
}

}  // namespace lorc::policy_test
