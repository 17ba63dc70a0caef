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
  std::cerr << "lorcserve: unknown command '" << cmd << "'\n\n" << kUsage;
  return 2;
}
