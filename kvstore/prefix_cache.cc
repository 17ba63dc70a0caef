#include "kvstore/prefix_cache.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/check.h"
#include "openssl/evp.h"

namespace lorc {
namespace {

BlockHash Sha256Prefix(const unsigned char* data, size_t size) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  CHECK(EVP_Digest(data, size, md, &n, EVP_sha256(), nullptr) == 1 && n >= 16) << "SHA-256 failed";
  BlockHash h;
  std::memcpy(&h.hi, md, 8);
  std::memcpy(&h.lo, md + 8, 8);
  return h;
}

void AppendLe64(std::string* out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

}  // namespace

std::string KvFormatIdentity(const ModelConfig& c, const KvCacheSpec& s) {
  std::string rope;
  for (int l = 0; l < s.num_layers(); ++l) rope += s.rope_at(l) == KvRope::kBeforeCache ? 'b' : 'a';
  std::string lorc = "none";
  if (c.lorc) {
    lorc = absl::StrCat(c.lorc->method, "/", c.lorc->schedule, "/", c.lorc->calibration_source, "/",
                        c.lorc->source_config_sha256);
  }
  return absl::StrCat(
      "model=", c.model_type, " vocab=", c.vocab_size, " hidden=", c.hidden_size,
      " layers=", c.num_layers, " heads=", c.num_heads, "/", c.num_kv_heads, " head_dim=", c.head_dim,
      " rope_theta=", c.rope.theta, " lorc=", lorc, "; block_size=", s.block_size,
      " kv_cache_dtype=", KvCacheDtypeName(s.kv_cache_dtype), " dtype=", DTypeName(s.dtype),
      " kv_heads=", s.num_kv_heads, " k_width=", absl::StrJoin(s.k_width, ","),
      " v_width=", absl::StrJoin(s.v_width, ","), " rope=", rope, " method=", s.latent_method,
      " k_rank=", absl::StrJoin(s.k_rank, ","), " v_rank=", absl::StrJoin(s.v_rank, ","));
}

BlockHash PrefixRootHash(std::string_view format_identity, std::string_view cache_salt) {
  std::string buf = "lorcserve prefix v1";
  AppendLe64(&buf, format_identity.size());
  buf.append(format_identity);
  AppendLe64(&buf, cache_salt.size());
  buf.append(cache_salt);
  return Sha256Prefix(reinterpret_cast<const unsigned char*>(buf.data()), buf.size());
}

BlockHash HashBlock(const BlockHash& parent, absl::Span<const int32_t> tokens) {
  std::vector<unsigned char> buf(16 + 4 * tokens.size());
  std::memcpy(buf.data(), &parent.hi, 8);
  std::memcpy(buf.data() + 8, &parent.lo, 8);
  for (size_t i = 0; i < tokens.size(); ++i) {
    const uint32_t t = static_cast<uint32_t>(tokens[i]);
    for (int k = 0; k < 4; ++k) buf[16 + 4 * i + k] = static_cast<unsigned char>((t >> (8 * k)) & 0xff);
  }
  return Sha256Prefix(buf.data(), buf.size());
}

void ExtendBlockHashes(const BlockHash& root, absl::Span<const int32_t> tokens, int32_t block_size,
                       std::vector<BlockHash>* hashes) {
  const size_t full = tokens.size() / static_cast<size_t>(block_size);
  while (hashes->size() < full) {
    const size_t i = hashes->size();
    const BlockHash& parent = i == 0 ? root : (*hashes)[i - 1];
    hashes->push_back(HashBlock(parent, tokens.subspan(i * block_size, block_size)));
  }
}

int32_t PrefixCache::Find(const BlockHash& h) const {
  auto it = index_.find(h);
  return it == index_.end() ? -1 : it->second;
}

bool PrefixCache::Insert(const BlockHash& h, int32_t block) {
  CHECK(block >= 0 && block < static_cast<int32_t>(hash_of_.size())) << "block " << block;
  if (hash_of_[block].indexed || index_.contains(h)) return false;
  index_.emplace(h, block);
  hash_of_[block] = {true, h};
  return true;
}

void PrefixCache::Evict(int32_t block) {
  Entry& e = hash_of_[block];
  if (!e.indexed) return;
  index_.erase(e.hash);
  e.indexed = false;
  ++stats_.evictions;
}

void PrefixCache::Clear() {
  index_.clear();
  for (Entry& e : hash_of_) e.indexed = false;
  ++stats_.resets;
}

}  // namespace lorc
