// lorcserve: one binary, several subcommands.
#include <cstring>
#include <iostream>
#include <string>

#include "cli/commands.h"

namespace {

constexpr char kUsage[] =
    "Usage: lorcserve <command> [flags]\n"
    "\n"
    "Commands:\n"
    "  generate   generate text from a prompt with an in-process engine\n"
    "  eval       perplexity and pass-key retrieval accuracy of a model\n"
    "  tokenize   print the token ids of a text\n"
    "  info       versions, compiled backends and the devices this machine has\n"
    "  compress   write a low-rank (LoRC) KV-compressed copy of a model directory\n"
    "  coordinator  serve the gRPC API in front of tensor-parallel workers\n"
    "  worker     one tensor-parallel rank (started by hand or by the coordinator)\n"
    "  client     stream a generation from a running server\n"
    "  bench      load-test a running server (--server), or the engine in-process (--model)\n"
    "\n"
    "Run 'lorcserve <command> --help' for a command's flags.\n";

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0) {
    std::cout << kUsage;
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  if (cmd == "generate") return lorc::cli::RunGenerate(argc, argv);
  if (cmd == "eval") return lorc::cli::RunEval(argc, argv);
  if (cmd == "tokenize") return lorc::cli::RunTokenize(argc, argv);
  if (cmd == "info") return lorc::cli::RunInfo(argc, argv);
  if (cmd == "compress") return lorc::cli::RunCompress(argc, argv);
#ifdef LORC_WITH_GRPC
  if (cmd == "coordinator") return lorc::cli::RunCoordinator(argc, argv);
  if (cmd == "worker") return lorc::cli::RunWorker(argc, argv);
  if (cmd == "client") return lorc::cli::RunClient(argc, argv);
  if (cmd == "bench") return lorc::cli::RunBench(argc, argv);
#endif
  std::cerr << "lorcserve: unknown command '" << cmd << "'\n\n" << kUsage;
  return 2;
}
