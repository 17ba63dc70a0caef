#include "bench/src/allreduce_bench_engine.h"

#include <memory>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/comm/communicator.h"
#include "worker/comm/rendezvous.h"

namespace lorc::bench {

struct EngineComms {
  InProcessStore store;
  std::vector<std::unique_ptr<Communicator>> comms;
};

EngineComms* CreateEngineComms(int n, void* const* streams, size_t custom_max_bytes,
                               std::string* description, std::string* error) {
  auto e = std::make_unique<EngineComms>();
  e->comms.resize(n);
  std::vector<absl::Status> status(n);
  std::vector<std::thread> threads;
  for (int g = 0; g < n; ++g) {
    threads.emplace_back([&, g] {
      CommOptions o;
      o.group = "bench-engine";
      o.custom_all_reduce_max_bytes = custom_max_bytes;
      o.op_timeout = absl::Seconds(60);
      absl::StatusOr<std::unique_ptr<Communicator>> c =
          CreateNcclCommunicator({g, n}, &e->store, g, streams[g], o);
      if (c.ok()) {
        e->comms[g] = *std::move(c);
      } else {
        status[g] = c.status();
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (const absl::Status& s : status) {
    if (!s.ok()) {
      *error = s.ToString();
      return nullptr;
    }
  }
  *description = e->comms[0]->AllReduceDescription();
  return e.release();
}

std::string EngineAllReduceBf16(EngineComms* comms, int g, void* data, size_t count) {
  const absl::Status s = comms->comms[g]->AllReduceSum(data, count, DType::kBF16);
  return s.ok() ? std::string() : s.ToString();
}

void DestroyEngineComms(EngineComms* comms) {
  // Each communicator's destructor finalizes NCCL with its peers: destroy them concurrently.
  std::vector<std::thread> threads;
  for (auto& c : comms->comms) threads.emplace_back([&c] { c.reset(); });
  for (std::thread& t : threads) t.join();
  delete comms;
}

}  // namespace lorc::bench
