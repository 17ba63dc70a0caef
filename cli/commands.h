// The `lorcserve` subcommands. Each returns the process exit code and prints errors itself.
#pragma once

namespace lorc::cli {

int RunGenerate(int argc, char** argv);
int RunEval(int argc, char** argv);
int RunTokenize(int argc, char** argv);
int RunInfo(int argc, char** argv);
int RunWorker(int argc, char** argv);
int RunCoordinator(int argc, char** argv);
int RunClient(int argc, char** argv);
int RunBench(int argc, char** argv);
// compress: the offline LoRC compressor (compress/).
int RunCompress(int argc, char** argv);
// bench --model DIR: the offline engine benchmark (cli/bench_engine.cc).
int RunEngineBench(int argc, char** argv);

}  // namespace lorc::cli
