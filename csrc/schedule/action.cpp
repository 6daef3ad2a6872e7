// Naming, printing and parsing of schedule actions (see action.h for the text form).
#include "schedule/action.h"

#include <cctype>
#include <cstdint>
#include <limits>
#include <stdexcept>

namespace pipetrain::schedule {

namespace {

constexpr const char* kNames[kNumKinds] = {"F", "B", "I", "W", "U", "SF", "RF", "SB", "RB"};

const char* const kForms =
    "expected <stage><kind><index> like '1F3' (kinds F, B, I, W; '@<version>' after them, "
    "'1F3@2'; a W may cover micro-batches 3..5 as '1W3-5'), '1U0' (update after mini-batch 0) or '1SF3>2' / '2RF3<1' (transfers)";

[[noreturn]] void bad(std::string_view text, const std::string& why) {
  throw std::invalid_argument("cannot parse action '" + std::string(text) + "'; " + why);
}

// Reads the decimal number at text[*pos] into *out; false if there is none. A number that
// does not fit int32 is an error naming `field`, checked digit by digit (no overflow).
bool read_number(std::string_view text, size_t* pos, const char* field, std::int32_t* out) {
  size_t i = *pos;
  std::int64_t v = 0;
  while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) {
    v = v * 10 + (text[i] - '0');
    if (v > std::numeric_limits<std::int32_t>::max())
      throw std::invalid_argument(std::string(field) + " in action '" + std::string(text) +
                                  "' is too large: numbers must be < 2**31");
    ++i;
  }
  if (i == *pos) return false;
  *out = static_cast<std::int32_t>(v);
  *pos = i;
  return true;
}

}  // namespace

const char* kind_name(Kind k) { return kNames[static_cast<int>(k)]; }

bool kind_from_name(std::string_view name, Kind* out) {
  for (Kind k : kAllKinds) {
    if (name == kind_name(k)) {
      *out = k;
      return true;
    }
  }
  return false;
}

std::string to_string(const Action& a) {
  std::string s = std::to_string(a.stage);
  s += kind_name(a.kind);
  s += std::to_string(a.microbatch);
  if (a.count != 1) {
    s += '-';
    s += std::to_string(a.last_microbatch());
  }
  if (is_transfer(a.kind)) {
    s += is_send(a.kind) ? '>' : '<';
    s += std::to_string(a.peer);
  } else if (a.version != kLiveWeights) {
    s += '@';
    s += std::to_string(a.version);
  }
  return s;
}

Action parse_action(std::string_view text) {
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.front())))
    text.remove_prefix(1);
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back())))
    text.remove_suffix(1);
  Action a;
  size_t pos = 0;
  if (!read_number(text, &pos, "stage", &a.stage)) bad(text, kForms);
  size_t k0 = pos;
  while (pos < text.size() && std::isupper(static_cast<unsigned char>(text[pos]))) ++pos;
  if (!kind_from_name(text.substr(k0, pos - k0), &a.kind)) bad(text, kForms);
  const char* index_field = is_update(a.kind) ? "mini-batch" : "micro-batch";
  if (!read_number(text, &pos, index_field, &a.microbatch)) bad(text, kForms);
  if (pos < text.size() && text[pos] == '-') {
    ++pos;
    std::int32_t last = 0;
    if (!read_number(text, &pos, "last micro-batch", &last)) bad(text, kForms);
    if (a.kind != Kind::W)
      bad(text, "a micro-batch range '<first>-<last>' is allowed only on W (a batched W)");
    if (last < a.microbatch)
      bad(text, "the range ends (" + std::to_string(last) + ") before it starts (" +
                    std::to_string(a.microbatch) + ")");
    a.count = last - a.microbatch + 1;
  }
  if (pos == text.size()) {
    if (is_transfer(a.kind))
      bad(text, std::string("transfer needs '") + (is_send(a.kind) ? '>' : '<') + "<peer stage>'");
    return a;
  }
  const char mark = text[pos++];
  std::int32_t number = 0;
  const char* field = mark == '@' ? "version" : "peer";
  if (!read_number(text, &pos, field, &number) || pos != text.size()) bad(text, kForms);
  if (mark == '>' || mark == '<') {
    if (!is_transfer(a.kind)) bad(text, std::string(kind_name(a.kind)) + " action takes no peer");
    if (mark != (is_send(a.kind) ? '>' : '<'))
      bad(text, std::string("transfer needs '") + (is_send(a.kind) ? '>' : '<') + "<peer stage>'");
    a.peer = number;
    return a;
  }
  if (mark != '@') bad(text, kForms);
  if (!takes_version(a.kind))
    bad(text, "a version suffix '@<v>' is allowed only on F, B, I and W");
  a.version = number;
  return a;
}

}  // namespace pipetrain::schedule
