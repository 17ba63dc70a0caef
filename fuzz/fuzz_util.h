// Shared by the harnesses: a private scratch directory (files the code under test reads by
// path), the fixture models' directory, and small byte readers.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

namespace lorc::fuzz {

// models/ of the source tree (compiled in), or $LORC_MODELS_DIR.
inline std::string ModelsDir() {
  const char* env = std::getenv("LORC_MODELS_DIR");
  return env != nullptr && *env != '\0' ? std::string(env) : std::string(LORC_MODELS_DIR);
}

// A directory of this process's own (under /dev/shm when there is one: no disk writes per
// input), removed at exit. Aborts when none can be made: the harness cannot run at all.
inline const std::string& ScratchDir() {
  static const std::string* dir = [] {
    std::string base = std::filesystem::is_directory("/dev/shm") ? "/dev/shm" : "/tmp";
    std::string tmpl = base + "/lorc-fuzz.XXXXXX";
    if (mkdtemp(tmpl.data()) == nullptr) {
      std::perror("lorc fuzz: mkdtemp");
      std::abort();
    }
    auto* d = new std::string(tmpl);
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(*dir, ec);
    });
    return d;
  }();
  return *dir;
}

// Writes `bytes` to ScratchDir()/name (replacing it) and returns the path. Aborts on failure.
inline std::string WriteScratchFile(const std::string& name, std::string_view bytes) {
  const std::string path = ScratchDir() + "/" + name;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) {
    std::fprintf(stderr, "lorc fuzz: cannot write %s\n", path.c_str());
    std::abort();
  }
  return path;
}

inline void RemoveScratchFile(const std::string& name) {
  std::error_code ec;
  std::filesystem::remove(ScratchDir() + "/" + name, ec);
}

// Copies models/<rel> into ScratchDir()/name (aborts when the fixture is missing).
inline void CopyFixture(const std::string& rel, const std::string& name) {
  std::error_code ec;
  std::filesystem::copy_file(ModelsDir() + "/" + rel, ScratchDir() + "/" + name,
                             std::filesystem::copy_options::overwrite_existing, ec);
  if (ec) {
    std::fprintf(stderr, "lorc fuzz: cannot copy fixture %s: %s\n", rel.c_str(),
                 ec.message().c_str());
    std::abort();
  }
}

// Fails the run (a finding) with a message: a broken invariant of the code under test.
[[noreturn]] inline void Fail(const std::string& what) {
  std::fprintf(stderr, "lorc fuzz: invariant broken: %s\n", what.c_str());
  std::abort();
}

// Consumes bytes from the front of an input.
class Reader {
 public:
  Reader(const uint8_t* data, size_t size) : p_(data), n_(size) {}
  uint8_t Byte() {
    if (n_ == 0) return 0;
    --n_;
    return *p_++;
  }
  uint32_t U32() {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(Byte()) << (8 * i);
    return v;
  }
  std::string_view Rest() const { return {reinterpret_cast<const char*>(p_), n_}; }
  size_t size() const { return n_; }

 private:
  const uint8_t* p_;
  size_t n_;
};

}  // namespace lorc::fuzz
