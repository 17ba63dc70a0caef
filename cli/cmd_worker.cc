// lorcserve worker: one tensor-parallel rank, serving lorcserve.internal.Worker.
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <optional>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "backend/cuda_backend.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "cli/security_flags.h"
#include "cli/session.h"
#include "cli/process_memory.h"
#include "cli/signals.h"
#include "common/defaults.h"
#include "step/coordinator_ref.h"
#include "common/status_macros.h"
#include "grpcpp/grpcpp.h"
#include "coordinator/local_workers.h"
#include "worker/comm/internal_grpc.h"
#include "worker/join_client.h"
#include "worker/worker_service.h"

namespace lorc::cli {
namespace {

// How this worker joins its coordinator; `coordinator` empty: it does not (listed in --workers,
// or started by a coordinator's --local-workers).
struct JoinSetup {
  std::string coordinator;                  // the internal port, HOST:PORT
  lorcserve::internal::JoinRequest request;  // without the address, filled once serving
  int local_workers = 0;                    // > 0: spawn this many joined workers, one per device
  int32_t rank = -1;                        // --rank (explicit)
  LwsEnv lws;
};

absl::StatusOr<JoinSetup> ParseJoin(const Args& args) {
  JoinSetup j;
  ASSIGN_OR_RETURN(j.lws, ReadLwsEnv([](const char* name) { return std::getenv(name); }));
  j.coordinator = args.Get("join");
  // A worker started by a coordinator's --local-workers (--parent-pid, no --join) is its local
  // rank, even in a LeaderWorkerSet pod.
  if (j.coordinator.empty() && !j.lws.leader_address.empty() && !args.Has("parent-pid")) {
    j.coordinator = absl::StrCat(j.lws.leader_address, ":", defaults::kInternalPort);
  }
  if (j.coordinator.empty()) {
    for (const char* f : {"rank", "local-workers", "advertise-address", "tensor-parallel-size"}) {
      if (args.Has(f)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--", f, " needs --join HOST:PORT (or the LeaderWorkerSet environment)"));
      }
    }
    return j;
  }
  // The syntax only: a name that does not resolve yet (a LeaderWorkerSet leader pod still pending,
  // its DNS record not there) is waited for, as the join waits for the coordinator to answer.
  if (!IsHostPort(j.coordinator, 1)) {
    return absl::InvalidArgumentError(absl::StrCat(args.Has("join") ? "--join" : "LWS_LEADER_ADDRESS", ": '",
                                                   j.coordinator, "' is not HOST:PORT with a port in [1, 65535]"));
  }
  if (args.Has("local-workers")) {
    ASSIGN_OR_RETURN(j.local_workers, args.GetInt32("local-workers", 1, 1, 64));
  }
  if (args.Has("rank")) {
    ASSIGN_OR_RETURN(j.rank, args.GetInt32("rank", 0, 0, 1 << 20));
  }
  ASSIGN_OR_RETURN(const int32_t local_index, args.GetInt32("local-index", 0, 0, 63));
  ASSIGN_OR_RETURN(const int32_t local_count, args.GetInt32("local-count", 1, 1, 64));
  int32_t tp = 0;
  if (args.Has("tensor-parallel-size")) {
    ASSIGN_OR_RETURN(tp, args.GetInt32("tensor-parallel-size", 1, 1, 1024));
  }
  if (j.rank < 0 && j.lws.leader_address.empty()) {
    return absl::InvalidArgumentError("--join needs --rank R (or the LeaderWorkerSet environment)");
  }
  // Refused here, not by the coordinator after the join's retries (a tester's worker retried
  // --rank 5 of 2 until killed).
  const int32_t joined = j.local_workers > 0 ? j.local_workers : 1;
  if (tp > 0 && j.rank >= 0 && j.rank + joined > tp) {
    const std::string local = joined > 1 ? absl::StrCat(" + --local-workers ", joined) : "";
    return absl::InvalidArgumentError(absl::StrCat("--rank ", j.rank, local, " exceeds --tensor-parallel-size ", tp,
                                                   " (ranks are 0 to ", tp - 1, ")"));
  }
  j.request.set_tensor_parallel_size(tp);
  if (j.rank >= 0) {
    j.request.set_rank(j.rank);
  } else {
    lorcserve::internal::LwsSlot* slot = j.request.mutable_lws();
    slot->set_worker_index(j.lws.worker_index);
    slot->set_group_size(j.lws.group_size);
    slot->set_local_index(local_index);
    slot->set_local_count(local_count);
  }
  return j;
}

// This machine's address on the route to the coordinator (LocalAddressTowards), waiting while its
// name does not resolve (UNAVAILABLE): said once, then once a minute; backoff 200 ms to 5 s. A
// termination signal during the wait ends the process (exit 0: nothing was served yet).
absl::StatusOr<std::string> AwaitLocalAddressTowards(const std::string& coordinator) {
  TerminationSignalWatcher signals([](int sig) {
    std::cerr << absl::StrCat("lorcserve worker: ", TerminationSignalName(sig),
                              " while waiting for the coordinator's address: exiting\n");
    std::_Exit(0);
  });
  absl::Duration backoff = absl::Milliseconds(200);
  absl::Time next_report = absl::InfinitePast();
  for (;;) {
    absl::StatusOr<std::string> local = LocalAddressTowards(coordinator);
    if (local.ok() || !absl::IsUnavailable(local.status())) return local;
    if (absl::Now() >= next_report) {
      std::cerr << absl::StrCat("lorcserve worker: ", local.status().message(),
                                "; waiting for it (the coordinator may not be up yet)\n");
      next_report = absl::Now() + absl::Minutes(1);
    }
    absl::SleepFor(backoff);
    backoff = std::min(backoff * 2, absl::Seconds(5));
  }
}

// `lorcserve worker --join ... --local-workers N`: one joined worker process per local device
// (device i, rank --rank + i or LWS device i), restarted with a backoff when one exits; a child
// the coordinator refused for good (exit code 2) ends this process with code 2.
int RunJoinedWorkers(const Args& args, const JoinSetup& j) {
  LocalWorkersOptions o;
  o.count = j.local_workers;
  o.backend = args.Get("backend", "cpu");
  absl::StatusOr<int32_t> threads = ParseThreads(args);
  absl::StatusOr<int32_t> device = args.GetInt32("device", 0, 0);
  if (!threads.ok()) return Fail("worker", threads.status());
  if (!device.ok()) return Fail("worker", device.status());
  o.threads_per_worker = *threads;
  o.first_device = *device;
  o.listen = args.Get("listen", "0.0.0.0:0");
  o.extra_args = [&](int r) {
    std::vector<std::string> extra = {"--join", j.coordinator};
    if (j.rank >= 0) {
      extra.insert(extra.end(), {"--rank", std::to_string(j.rank + r)});
    } else {
      extra.insert(extra.end(), {"--local-index", std::to_string(r), "--local-count", std::to_string(o.count)});
    }
    for (const char* f : {"tensor-parallel-size", "owner-lease-s"}) {
      if (args.Has(f)) extra.insert(extra.end(), {absl::StrCat("--", f), args.Get(f)});
    }
    for (std::string& a : InternalTlsArgs(ParseInternalTls(args))) extra.push_back(std::move(a));
    return extra;
  };
  absl::Mutex mu;
  bool stop = false;
  int exit_code = 0;
  absl::StatusOr<std::unique_ptr<LocalWorkers>> workers =
      LocalWorkers::Start(o, [&](int rank, pid_t pid, const std::string& how) {
        std::cerr << absl::StrCat("lorcserve worker: local worker ", rank, " (pid ", pid, ") ", how, "\n");
        if (how == "exited with code 2") {
          absl::MutexLock lock(&mu);
          stop = true;
          exit_code = 2;
        }
      });
  if (!workers.ok()) return Fail("worker", workers.status());
  std::cout << "LISTENING";
  for (const std::string& a : (*workers)->addresses()) std::cout << " " << a;
  std::cout << std::endl;
  TerminationSignalWatcher signals([&](int) {
    absl::MutexLock lock(&mu);
    stop = true;
  });
  absl::Duration backoff = absl::Seconds(1);
  for (;;) {
    {
      absl::MutexLock lock(&mu);
      auto done = [&]() { return stop; };
      if (mu.AwaitWithTimeout(absl::Condition(&done), absl::Milliseconds(200))) break;
    }
    const std::vector<int> exited = (*workers)->exited();
    if (exited.empty()) continue;
    absl::SleepFor(backoff);
    backoff = std::min(backoff * 2, absl::Seconds(30));
    for (int r : exited) {
      if (absl::Status st = (*workers)->Restart(r); !st.ok()) {
        std::cerr << absl::StrCat("lorcserve worker: restarting local worker ", r, ": ", st.message(), "\n");
      }
    }
  }
  workers->reset();
  absl::MutexLock lock(&mu);
  return exit_code;
}

}  // namespace

int RunWorker(int argc, char** argv) {
  std::vector<FlagSpec> flags = {
      {"listen", true, "address to serve on (default 127.0.0.1:0, with --join 0.0.0.0:0; port 0: pick one; printed as "
                       "'LISTENING host:port')", "ADDR"},
      {"backend", true, "cpu (default) or cuda", "KIND"},
      {"device", true, "CUDA device ordinal (default 0)", "K"},
      {"threads", true, "CPU backend: BLAS threads (default: all cores)", "N"},
      {"comm-address", true, "address peers reach this worker at for Gloo (default: the listen host)", "HOST"},
      {"rank-hint", true, "rank, for log messages only", "R"},
      {"parent-pid", true, "exit when this process (the supervising coordinator) is gone", "PID"},
      {"join", true,
       absl::StrCat("join the coordinator's internal port instead of being listed in its --workers (default "
                    "under LeaderWorkerSet: $LWS_LEADER_ADDRESS:", defaults::kInternalPort, ")"),
       "HOST:PORT"},
      {"rank", true, "with --join: this worker's rank (the first one with --local-workers)", "R"},
      {"tensor-parallel-size", true, "with --join: the group size this worker expects (checked by the coordinator)", "N"},
      {"advertise-address", true,
       "with --join: how the coordinator reaches this worker (default: the listen host, or when that is a "
       "wildcard this machine's address on the route to the coordinator, with the bound port)",
       "HOST:PORT"},
      {"local-workers", true, "with --join: start N joined worker processes, one per device from --device", "N"},
      {"local-index", true, "(set by --local-workers) this process's device among the pod's, for LWS ranks", "I"},
      {"local-count", true, "(set by --local-workers) worker processes per pod, for LWS ranks", "N"},
      {"owner-lease-s", true,
       absl::StrCat("seconds the coordinator serving this worker may stay silent (no call open, or its "
                    "connection not answering keepalive pings) before another may take it (default ",
                    absl::FormatDuration(WorkerOptions().owner_lease), ")"),
       "S"},
      {"help", false, "show this help"},
  };
  for (const FlagSpec& f : InternalTlsFlags()) flags.insert(flags.end() - 1, f);  // before --help
  const char* synopsis = "[--listen ADDR] [--backend cpu|cuda] [--device K] [--join HOST:PORT --rank R]";
  int exit_code = 0;
  const std::optional<Args> args = ParseCommand("worker", synopsis, flags, argc, argv, &exit_code);
  if (!args.has_value()) return exit_code;
  InstallTerminationHandlers();
  UseFixedMmapThreshold();  // before the weights and the KV cache (process_memory.h)
  const absl::StatusOr<JoinSetup> join = ParseJoin(*args);
  if (!join.ok()) return Fail("worker", join.status());
  // Before any internal server or channel (worker/comm/internal_grpc.h); bad files end here.
  if (absl::Status tls = ConfigureInternalTls(ParseInternalTls(*args)); !tls.ok()) return Fail("worker", tls);
  if (join->local_workers > 0) return RunJoinedWorkers(*args, *join);
  if (args->Has("parent-pid")) {
    // Started by a coordinator: die with it, even when it is killed outright.
    absl::StatusOr<int64_t> parent = args->GetIntInRange("parent-pid", 0, 1, std::numeric_limits<pid_t>::max());
    if (!parent.ok()) return Fail("worker", parent.status());
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    // Spawned through /proc/self/exe (the coordinator's own binary, even if replaced on disk
    // since), which names the process "exe": `pgrep lorcserve` missed the workers (a tester).
    prctl(PR_SET_NAME, "lorcserve");
    if (getppid() != static_cast<pid_t>(*parent)) {
      return Fail("worker", absl::AbortedError(
                                absl::StrCat("--parent-pid ", *parent, ": not this process's parent (gone already?)")));
    }
  }
  WorkerOptions wo;
  absl::StatusOr<BackendKind> kind = ParseBackendKind(args->Get("backend", "cpu"));
  absl::StatusOr<int32_t> device = args->GetInt32("device", 0, 0);
  absl::StatusOr<int32_t> threads = ParseThreads(*args);
  absl::StatusOr<double> lease_s =
      args->GetDouble("owner-lease-s", absl::ToDoubleSeconds(wo.owner_lease));
  for (const absl::Status& s : {kind.status(), device.status(), threads.status(), lease_s.status()}) {
    if (!s.ok()) return Fail("worker", s);
  }
  // Up to a day: inf was accepted and refusals then said "free after about inf" (a tester).
  if (!(*lease_s > 0 && *lease_s <= 86400)) {
    return Fail("worker", absl::InvalidArgumentError(absl::StrCat(
                              "--owner-lease-s: ", args->Get("owner-lease-s"), " is not in (0, 86400] seconds")));
  }
  wo.owner_lease = absl::Seconds(*lease_s);
  if (*kind == BackendKind::kCuda) {
    // The devices checked at start (their count and properties; no context is made): a GPU-less
    // machine said "serving (cuda)" and failed only when a coordinator attached (a tester).
    absl::StatusOr<std::vector<CudaDeviceInfo>> gpus = ListCudaDevices();
    if (!gpus.ok()) {
      return Fail("worker", absl::InvalidArgumentError(absl::StrCat("--backend cuda: ", gpus.status().message())));
    }
    if (*device >= static_cast<int32_t>(gpus->size())) {
      return Fail("worker", absl::InvalidArgumentError(absl::StrCat("--device ", *device, ": this machine has ",
                                                                   gpus->size(), " CUDA device(s)")));
    }
  }
  wo.backend.kind = *kind;
  wo.backend.device = static_cast<int>(*device);
  wo.backend.threads = static_cast<int>(*threads);
  const bool joining = !join->coordinator.empty();
  // A joined worker must be reachable from another host: all interfaces by default.
  const absl::StatusOr<std::string> listen_or =
      args->GetListenAddress("listen", joining ? "0.0.0.0:0" : "127.0.0.1:0");
  if (!listen_or.ok()) return Fail("worker", listen_or.status());
  const std::string& listen = *listen_or;
  std::string host = listen.substr(0, listen.rfind(':'));
  const bool wildcard = host == "0.0.0.0" || host.empty() || host == "[::]";
  std::string advertise = args->Get("advertise-address");
  if (joining) {
    if (!advertise.empty()) {
      if (advertise.rfind(':') == std::string::npos) {
        return Fail("worker", absl::InvalidArgumentError(absl::StrCat(
                                  "--advertise-address: '", advertise, "' is not HOST:PORT")));
      }
    } else if (wildcard) {
      absl::StatusOr<std::string> local = AwaitLocalAddressTowards(join->coordinator);
      if (!local.ok()) return Fail("worker", local.status());
      host = *local;
    }
    wo.rendezvous_address = join->coordinator;
  }
  std::string comm_host = advertise.empty() ? host : advertise.substr(0, advertise.rfind(':'));
  if (comm_host.size() > 2 && comm_host.front() == '[') comm_host = comm_host.substr(1, comm_host.size() - 2);
  wo.comm_address = args->Get("comm-address", (!joining && wildcard) ? "" : comm_host);

  WorkerService service(wo);
  grpc::ServerBuilder builder;
  int port = 0;
  AddInternalListeningPort(builder, listen, &port);
  AddOwnerKeepalive(builder, wo.owner_lease);
  builder.SetMaxReceiveMessageSize(256 << 20);
  builder.SetMaxSendMessageSize(256 << 20);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return Fail("worker", absl::UnavailableError(absl::StrCat(
        "--listen: cannot listen on ", listen,
        " (the port is in use, or the host is not an address of this machine)")));
  }
  if (advertise.empty()) advertise = absl::StrCat(host, ":", port);
  std::cout << "LISTENING " << advertise << std::endl;
  // "lorcserve worker 1" for a coordinator's local worker; a worker started by hand has no rank yet.
  const std::string label =
      args->Has("rank-hint") ? absl::StrCat("lorcserve worker ", args->Get("rank-hint")) : "lorcserve worker";
  std::cerr << absl::StrCat(label, ": serving on ", advertise, " (", args->Get("backend", "cpu"), ")\n");
  std::atomic<bool> refused{false};
  {
    std::unique_ptr<JoinLoop> joiner;
    if (joining) {
      lorcserve::internal::JoinRequest req = join->request;
      req.set_worker_address(advertise);
      req.set_instance_id(service.instance_id());  // this process's, as its Ping reports
      char hostname[256] = {};
      gethostname(hostname, sizeof(hostname) - 1);
      req.set_hostname(hostname);
      joiner = std::make_unique<JoinLoop>(join->coordinator, req, [&, s = server.get()](const absl::Status& st) {
        std::cerr << absl::StrCat("lorcserve worker: ", st.ToString(), "\n");
        refused = true;
        s->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
      });
    }
    // Joined before `server` is destroyed (it was detached, racing the destructor). A signal
    // during a load (or the communicator's rendezvous) ends the process at once: the load does
    // not stop early and a coordinator gone or going needs none of it (its LocalWorkers would
    // wait 5 s, then SIGKILL; Kubernetes its grace period).
    // A coordinator's local worker (its own process group) hears a signal from that coordinator,
    // as it exits or dies, or from someone signalling the worker itself.
    const bool local = args->Has("parent-pid");
    TerminationSignalWatcher signals([s = server.get(), &service, &label, local](int sig) {
      if (service.setting_up()) {
        std::cerr << absl::StrCat(label, ": ", TerminationSignalName(sig), " during the model load: exiting\n");
        std::_Exit(0);
      }
      // No drain here: a step in flight fails, and the coordinator recovers without this worker.
      // One string, one write: the local workers share the coordinator's stderr and stop together.
      std::cerr << absl::StrCat(label, ": ", TerminationSignalName(sig),
                                local ? ": stopping (the coordinator is exiting or gone, or this worker was "
                                        "signalled: steps in flight fail)\n"
                                      : ": stopping (steps in flight fail; the coordinator re-forms its group)\n");
      s->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    });
    server->Wait();
  }
  return refused ? 2 : 0;
}

}  // namespace lorc::cli
