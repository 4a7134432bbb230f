#include "model/jinja.h"
#include "model/tokenizer_unicode.h"

#include <algorithm>
#include <cmath>
#include <ctime>
#include <functional>
#include <map>
#include <set>

#include <fmt/format.h>

namespace starserve::jinja {
namespace {

// Errors travel inside this file as exceptions and leave it as a Status (render / parse catch them).
struct Error {
  int line;
  std::string message;
};
[[noreturn]] void fail(int line, std::string message) { throw Error{line, std::move(message)}; }

// ---------------------------------------------------------------------------------------------------------------
// Text with an origin per byte.

struct Text {
  std::string s;
  std::vector<int32_t> o;  // o.size() == s.size()

  Text() = default;
  Text(std::string_view str, int32_t origin) : s(str), o(str.size(), origin) {}
  void append(const Text& t) {
    s += t.s;
    o.insert(o.end(), t.o.begin(), t.o.end());
  }
  void append(std::string_view str, int32_t origin) {
    s += str;
    o.insert(o.end(), str.size(), origin);
  }
  Text sub(size_t pos, size_t len) const {
    Text t;
    t.s = s.substr(pos, len);
    t.o.assign(o.begin() + static_cast<ptrdiff_t>(pos), o.begin() + static_cast<ptrdiff_t>(pos + t.s.size()));
    return t;
  }
  // The origin that covers all of [pos, pos+len): kLiteral only when every byte is literal, else the first data
  // origin (the conservative side).
  int32_t origin_of(size_t pos, size_t len) const {
    for (size_t i = pos; i < pos + len && i < o.size(); ++i) {
      if (o[i] != kLiteral) return o[i];
    }
    return kLiteral;
  }
};

// Byte offsets of each code point's start, plus s.size() (an ill-formed byte counts as one code point).
std::vector<size_t> code_points(std::string_view s) {
  std::vector<size_t> at;
  for (size_t i = 0; i < s.size();) {
    at.push_back(i);
    const auto c = static_cast<uint8_t>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    if (i + n > s.size()) n = 1;
    for (size_t k = 1; k < n; ++k) {
      if ((static_cast<uint8_t>(s[i + k]) & 0xC0) != 0x80) {
        n = 1;
        break;
      }
    }
    i += n;
  }
  at.push_back(s.size());
  return at;
}

// Length of the whitespace character (Python's str.isspace) at s[i], or 0.
size_t space_len(std::string_view s, size_t i) {
  const auto b = [&](size_t k) { return i + k < s.size() ? static_cast<uint8_t>(s[i + k]) : 0; };
  const uint8_t c = b(0);
  if (c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F)) return 1;
  if (c == 0xC2 && (b(1) == 0x85 || b(1) == 0xA0)) return 2;
  if (c == 0xE1 && b(1) == 0x9A && b(2) == 0x80) return 3;
  if (c == 0xE2 && b(1) == 0x80 && (b(2) <= 0x8A || b(2) == 0xA8 || b(2) == 0xA9 || b(2) == 0xAF)) return 3;
  if (c == 0xE2 && b(1) == 0x81 && b(2) == 0x9F) return 3;
  if (c == 0xE3 && b(1) == 0x80 && b(2) == 0x80) return 3;
  return 0;
}

// Python's strip / lstrip / rstrip: whitespace, or the characters of `chars` (ASCII or whole code points).
Text strip_text(const Text& t, bool left, bool right, const std::string* chars) {
  const std::string_view s = t.s;
  const auto strip_len_at = [&](size_t i) -> size_t {
    if (chars == nullptr) return space_len(s, i);
    const std::vector<size_t> cps = code_points(s.substr(i, std::min<size_t>(4, s.size() - i)));
    const std::string_view one = s.substr(i, cps.size() > 1 ? cps[1] : 1);
    return chars->find(one) != std::string::npos ? one.size() : 0;
  };
  size_t begin = 0, end = s.size();
  if (left) {
    while (begin < end) {
      const size_t n = strip_len_at(begin);
      if (n == 0) break;
      begin += n;
    }
  }
  if (right) {
    while (end > begin) {
      size_t found = 0;
      for (size_t n = 1; n <= 4 && n <= end - begin; ++n) {
        if (strip_len_at(end - n) == n) {
          found = n;
          break;
        }
      }
      if (found == 0) break;
      end -= found;
    }
  }
  return t.sub(begin, end - begin);
}

// ---------------------------------------------------------------------------------------------------------------
// Values.

struct V;
struct Ctx;
using VList = std::vector<V>;
struct VDict;
using Kwargs = std::vector<std::pair<std::string, V>>;
using Fn = std::function<V(Ctx&, std::vector<V>&, Kwargs&, int line)>;

struct V {
  enum class K { kUndef, kNone, kBool, kInt, kFloat, kStr, kList, kDict, kFunc };
  K k = K::kNone;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  Text s;
  std::shared_ptr<VList> l;
  std::shared_ptr<VDict> d;
  std::shared_ptr<Fn> fn;
  std::string why;  // kUndef: what is undefined, for messages; kFunc: its name

  static V undef(std::string why) {
    V v;
    v.k = K::kUndef;
    v.why = std::move(why);
    return v;
  }
  static V boolean(bool x) {
    V v;
    v.k = K::kBool;
    v.b = x;
    return v;
  }
  static V integer(int64_t x) {
    V v;
    v.k = K::kInt;
    v.i = x;
    return v;
  }
  static V real(double x) {
    V v;
    v.k = K::kFloat;
    v.f = x;
    return v;
  }
  static V str(Text t) {
    V v;
    v.k = K::kStr;
    v.s = std::move(t);
    return v;
  }
  static V lit(std::string_view s) { return str(Text(s, kLiteral)); }
  static V list(VList items = {}) {
    V v;
    v.k = K::kList;
    v.l = std::make_shared<VList>(std::move(items));
    return v;
  }
  static V dict();
  static V func(std::string name, Fn f) {
    V v;
    v.k = K::kFunc;
    v.why = std::move(name);
    v.fn = std::make_shared<Fn>(std::move(f));
    return v;
  }
  bool is(K kind) const { return k == kind; }
  bool number() const { return k == K::kInt || k == K::kFloat || k == K::kBool; }
};

struct VDict {
  std::vector<std::pair<std::string, V>> items;
  bool is_namespace = false;
  const V* find(std::string_view key) const {
    for (const auto& [k, v] : items) {
      if (k == key) return &v;
    }
    return nullptr;
  }
  void set(std::string_view key, V v) {
    for (auto& [k, old] : items) {
      if (k == key) {
        old = std::move(v);
        return;
      }
    }
    items.emplace_back(std::string(key), std::move(v));
  }
};

V V::dict() {
  V v;
  v.k = K::kDict;
  v.d = std::make_shared<VDict>();
  return v;
}

// Dict keys are plain strings; as values they are data (they may have come from the caller).
V key_value(const std::string& key) { return V::str(Text(key, kData)); }

std::string type_name(const V& v) {
  switch (v.k) {
    case V::K::kUndef: return "undefined";
    case V::K::kNone: return "none";
    case V::K::kBool: return "bool";
    case V::K::kInt: return "int";
    case V::K::kFloat: return "float";
    case V::K::kStr: return "string";
    case V::K::kList: return "list";
    case V::K::kDict: return v.d->is_namespace ? "namespace" : "dict";
    case V::K::kFunc: return "function";
  }
  return "?";
}

[[noreturn]] void fail_undefined(int line, const V& v) { fail(line, v.why); }

bool truthy(const V& v) {
  switch (v.k) {
    case V::K::kUndef:
    case V::K::kNone: return false;
    case V::K::kBool: return v.b;
    case V::K::kInt: return v.i != 0;
    case V::K::kFloat: return v.f != 0;
    case V::K::kStr: return !v.s.s.empty();
    case V::K::kList: return !v.l->empty();
    case V::K::kDict: return !v.d->items.empty();
    case V::K::kFunc: return true;
  }
  return false;
}

double as_double(const V& v) { return v.k == V::K::kFloat ? v.f : v.k == V::K::kBool ? (v.b ? 1 : 0) : double(v.i); }
int64_t as_int(const V& v) { return v.k == V::K::kBool ? (v.b ? 1 : 0) : v.i; }

std::string float_repr(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  std::string s = fmt::format("{}", x);
  if (s.find_first_of(".en") == std::string::npos) s += ".0";
  return s;
}

void append_repr(Text& out, const V& v);

// Python's str().
Text to_text(const V& v) {
  switch (v.k) {
    case V::K::kUndef: return Text();
    case V::K::kNone: return Text("None", kLiteral);
    case V::K::kBool: return Text(v.b ? "True" : "False", kLiteral);
    case V::K::kInt: return Text(fmt::format("{}", v.i), kLiteral);
    case V::K::kFloat: return Text(float_repr(v.f), kLiteral);
    case V::K::kStr: return v.s;
    default: {
      Text t;
      append_repr(t, v);
      return t;
    }
  }
}

// Python's repr() of lists and dicts, strings in single quotes (escapes of quotes and backslashes).
void append_repr(Text& out, const V& v) {
  switch (v.k) {
    case V::K::kStr: {
      out.append("'", kLiteral);
      for (size_t i = 0; i < v.s.s.size(); ++i) {
        const char c = v.s.s[i];
        const int32_t o = v.s.o[i];
        if (c == '\'' || c == '\\') out.append(std::string{'\\', c}, o);
        else if (c == '\n') out.append("\\n", o);
        else if (c == '\t') out.append("\\t", o);
        else if (c == '\r') out.append("\\r", o);
        else out.append(std::string_view(&c, 1), o);
      }
      out.append("'", kLiteral);
      break;
    }
    case V::K::kList:
      out.append("[", kLiteral);
      for (size_t i = 0; i < v.l->size(); ++i) {
        if (i) out.append(", ", kLiteral);
        append_repr(out, (*v.l)[i]);
      }
      out.append("]", kLiteral);
      break;
    case V::K::kDict:
      out.append("{", kLiteral);
      for (size_t i = 0; i < v.d->items.size(); ++i) {
        if (i) out.append(", ", kLiteral);
        append_repr(out, key_value(v.d->items[i].first));
        out.append(": ", kLiteral);
        append_repr(out, v.d->items[i].second);
      }
      out.append("}", kLiteral);
      break;
    case V::K::kFunc: out.append("<function " + v.why + ">", kLiteral); break;
    default: out.append(to_text(v));
  }
}

// json.dumps(v, ensure_ascii=False, indent=indent) as Hugging Face's tojson filter does; separators ", " / ": "
// without indent, "," / ": " with it.
void append_json(Text& out, const V& v, int indent, int depth, int line) {
  const auto newline = [&](int d) {
    if (indent < 0) return;
    out.append("\n" + std::string(static_cast<size_t>(indent * d), ' '), kLiteral);
  };
  const std::string_view item_sep = indent < 0 ? ", " : ",";
  switch (v.k) {
    case V::K::kUndef: fail_undefined(line, v);
    case V::K::kNone: out.append("null", kLiteral); break;
    case V::K::kBool: out.append(v.b ? "true" : "false", kLiteral); break;
    case V::K::kInt: out.append(fmt::format("{}", v.i), kLiteral); break;
    case V::K::kFloat:
      out.append(std::isnan(v.f) ? "NaN" : std::isinf(v.f) ? (v.f > 0 ? "Infinity" : "-Infinity") : float_repr(v.f),
                 kLiteral);
      break;
    case V::K::kStr: {
      out.append("\"", kLiteral);
      for (size_t i = 0; i < v.s.s.size(); ++i) {
        const auto c = static_cast<unsigned char>(v.s.s[i]);
        const int32_t o = v.s.o[i];
        switch (c) {
          case '"': out.append("\\\"", o); break;
          case '\\': out.append("\\\\", o); break;
          case '\n': out.append("\\n", o); break;
          case '\r': out.append("\\r", o); break;
          case '\t': out.append("\\t", o); break;
          case '\b': out.append("\\b", o); break;
          case '\f': out.append("\\f", o); break;
          default:
            if (c < 0x20) out.append(fmt::format("\\u{:04x}", c), o);
            else out.append(std::string_view(&v.s.s[i], 1), o);
        }
      }
      out.append("\"", kLiteral);
      break;
    }
    case V::K::kList:
      out.append("[", kLiteral);
      for (size_t i = 0; i < v.l->size(); ++i) {
        if (i) out.append(item_sep, kLiteral);
        newline(depth + 1);
        append_json(out, (*v.l)[i], indent, depth + 1, line);
      }
      if (!v.l->empty()) newline(depth);
      out.append("]", kLiteral);
      break;
    case V::K::kDict:
      out.append("{", kLiteral);
      for (size_t i = 0; i < v.d->items.size(); ++i) {
        if (i) out.append(item_sep, kLiteral);
        newline(depth + 1);
        append_json(out, key_value(v.d->items[i].first), indent, depth + 1, line);
        out.append(": ", kLiteral);
        append_json(out, v.d->items[i].second, indent, depth + 1, line);
      }
      if (!v.d->items.empty()) newline(depth);
      out.append("}", kLiteral);
      break;
    case V::K::kFunc: fail(line, "a function is not JSON serializable");
  }
}

bool equal(const V& a, const V& b) {
  if (a.number() && b.number()) {
    if (a.k == V::K::kFloat || b.k == V::K::kFloat) return as_double(a) == as_double(b);
    return as_int(a) == as_int(b);
  }
  if (a.k != b.k) return false;
  switch (a.k) {
    case V::K::kUndef:
    case V::K::kNone: return true;
    case V::K::kStr: return a.s.s == b.s.s;
    case V::K::kList:
      if (a.l->size() != b.l->size()) return false;
      for (size_t i = 0; i < a.l->size(); ++i) {
        if (!equal((*a.l)[i], (*b.l)[i])) return false;
      }
      return true;
    case V::K::kDict:
      if (a.d->items.size() != b.d->items.size()) return false;
      for (const auto& [k, v] : a.d->items) {
        const V* w = b.d->find(k);
        if (w == nullptr || !equal(v, *w)) return false;
      }
      return true;
    case V::K::kFunc: return a.fn == b.fn;
    default: return false;
  }
}

// <0, 0, >0 as Python orders numbers, strings (by code point: UTF-8 byte order) and lists.
int compare(const V& a, const V& b, int line, std::string_view op) {
  if (a.number() && b.number()) {
    const double x = as_double(a), y = as_double(b);
    return x < y ? -1 : x > y ? 1 : 0;
  }
  if (a.is(V::K::kStr) && b.is(V::K::kStr)) return a.s.s.compare(b.s.s) < 0 ? -1 : a.s.s == b.s.s ? 0 : 1;
  if (a.is(V::K::kList) && b.is(V::K::kList)) {
    for (size_t i = 0; i < a.l->size() && i < b.l->size(); ++i) {
      if (!equal((*a.l)[i], (*b.l)[i])) return compare((*a.l)[i], (*b.l)[i], line, op);
    }
    return a.l->size() < b.l->size() ? -1 : a.l->size() > b.l->size() ? 1 : 0;
  }
  if (a.is(V::K::kUndef)) fail_undefined(line, a);
  if (b.is(V::K::kUndef)) fail_undefined(line, b);
  fail(line, fmt::format("'{}' is not supported between {} and {}", op, type_name(a), type_name(b)));
}

// Elements of an iterable value: list items, dict keys, string characters; undefined iterates as empty.
VList iterate(const V& v, int line) {
  switch (v.k) {
    case V::K::kUndef: return {};
    case V::K::kList: return *v.l;
    case V::K::kDict: {
      VList out;
      for (const auto& kv : v.d->items) out.push_back(key_value(kv.first));
      return out;
    }
    case V::K::kStr: {
      VList out;
      const std::vector<size_t> cps = code_points(v.s.s);
      for (size_t i = 0; i + 1 < cps.size(); ++i) out.push_back(V::str(v.s.sub(cps[i], cps[i + 1] - cps[i])));
      return out;
    }
    default: fail(line, fmt::format("{} is not iterable", type_name(v)));
  }
}

bool contains(const V& container, const V& item, int line) {
  switch (container.k) {
    case V::K::kStr:
      if (!item.is(V::K::kStr)) fail(line, fmt::format("'in <string>' needs a string, not {}", type_name(item)));
      return container.s.s.find(item.s.s) != std::string::npos;
    case V::K::kList:
      return std::any_of(container.l->begin(), container.l->end(), [&](const V& x) { return equal(x, item); });
    case V::K::kDict: return item.is(V::K::kStr) && container.d->find(item.s.s) != nullptr;
    case V::K::kUndef: fail_undefined(line, container);
    default: fail(line, fmt::format("'in' needs a string, list or dict, not {}", type_name(container)));
  }
}

// Python slicing indices over n elements.
std::vector<size_t> slice_indices(int64_t n, const V& start, const V& stop, const V& step, int line) {
  const auto given = [](const V& v) { return !(v.is(V::K::kNone) || v.is(V::K::kUndef)); };
  int64_t st = given(step) ? as_int(step) : 1;
  if (st == 0) fail(line, "slice step cannot be zero");
  const auto clamp = [&](const V& v, int64_t dflt) {
    if (!given(v)) return dflt;
    int64_t x = as_int(v);
    if (x < 0) x += n;
    if (st > 0) return std::clamp<int64_t>(x, 0, n);
    return std::clamp<int64_t>(x, -1, n - 1);
  };
  const int64_t a = clamp(start, st > 0 ? 0 : n - 1);
  const int64_t b = clamp(stop, st > 0 ? n : -1);
  std::vector<size_t> out;
  for (int64_t x = a; st > 0 ? x < b : x > b; x += st) out.push_back(static_cast<size_t>(x));
  return out;
}

// ASCII case mappings (bytes outside ASCII are kept: the templates change the case of their own markers).
char upper_c(char c) { return c >= 'a' && c <= 'z' ? static_cast<char>(c - 32) : c; }
char lower_c(char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c + 32) : c; }
bool alpha_c(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || static_cast<unsigned char>(c) >= 0x80;
}

Text map_case(const Text& t, int mode) {  // 0 upper, 1 lower, 2 title, 3 capitalize
  Text out = t;
  bool prev_alpha = false;
  for (size_t i = 0; i < out.s.size(); ++i) {
    char& c = out.s[i];
    switch (mode) {
      case 0: c = upper_c(c); break;
      case 1: c = lower_c(c); break;
      case 2:
        c = prev_alpha ? lower_c(c) : upper_c(c);
        prev_alpha = alpha_c(c);
        break;
      case 3: c = i == 0 ? upper_c(c) : lower_c(c); break;
    }
  }
  return out;
}

// str.replace: unmatched bytes keep their origin; each inserted copy of `to` keeps its own origin, made data where
// the replaced bytes were data.
Text replace_text(const Text& s, const Text& from, const Text& to, int64_t count) {
  Text out;
  size_t pos = 0;
  int64_t done = 0;
  if (from.s.empty()) {
    // Python inserts `to` between characters and at both ends.
    const std::vector<size_t> cps = code_points(s.s);
    for (size_t i = 0; i + 1 <= cps.size(); ++i) {
      if (count < 0 || done < count) {
        out.append(to);
        ++done;
      }
      if (i + 1 < cps.size()) out.append(s.sub(cps[i], cps[i + 1] - cps[i]));
    }
    return out;
  }
  while (count < 0 || done < count) {
    const size_t at = s.s.find(from.s, pos);
    if (at == std::string::npos) break;
    out.append(s.sub(pos, at - pos));
    Text piece = to;
    const int32_t replaced = s.origin_of(at, from.s.size());
    if (replaced != kLiteral) std::replace(piece.o.begin(), piece.o.end(), kLiteral, replaced);
    out.append(piece);
    pos = at + from.s.size();
    ++done;
  }
  out.append(s.sub(pos, s.s.size() - pos));
  return out;
}

VList split_text(const Text& s, const V& sep, int64_t maxsplit) {
  VList out;
  if (sep.is(V::K::kNone) || sep.is(V::K::kUndef)) {
    size_t i = 0;
    while (true) {
      while (i < s.s.size() && space_len(s.s, i) > 0) i += space_len(s.s, i);
      if (i >= s.s.size()) break;
      if (maxsplit >= 0 && static_cast<int64_t>(out.size()) == maxsplit) {
        out.push_back(V::str(strip_text(s.sub(i, s.s.size() - i), false, true, nullptr)));
        break;
      }
      size_t j = i;
      while (j < s.s.size() && space_len(s.s, j) == 0) ++j;
      out.push_back(V::str(s.sub(i, j - i)));
      i = j;
    }
    return out;
  }
  const std::string& d = sep.s.s;
  size_t pos = 0;
  while (maxsplit < 0 || static_cast<int64_t>(out.size()) < maxsplit) {
    const size_t at = s.s.find(d, pos);
    if (at == std::string::npos || d.empty()) break;
    out.push_back(V::str(s.sub(pos, at - pos)));
    pos = at + d.size();
  }
  out.push_back(V::str(s.sub(pos, s.s.size() - pos)));
  return out;
}

// Python's '%' formatting of %s, %d, %i, %r and %%.
Text percent_format(const Text& f, const V& args, int line) {
  VList items = args.is(V::K::kList) ? *args.l : VList{args};
  size_t next = 0;
  Text out;
  for (size_t i = 0; i < f.s.size(); ++i) {
    if (f.s[i] != '%' || i + 1 == f.s.size()) {
      out.append(f.sub(i, 1));
      continue;
    }
    const char c = f.s[++i];
    if (c == '%') {
      out.append("%", f.o[i]);
      continue;
    }
    if (next >= items.size()) fail(line, "not enough arguments for format string");
    const V& a = items[next++];
    if (c == 's') out.append(to_text(a));
    else if (c == 'd' || c == 'i') {
      out.append(fmt::format("{}", a.is(V::K::kFloat) ? static_cast<int64_t>(a.f) : as_int(a)), kLiteral);
    }
    else if (c == 'r') append_repr(out, a);
    else fail(line, fmt::format("format character '%{}' is not supported", c));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Lexing: the template into text and tags.

struct Chunk {
  enum class K { kText, kExpr, kStmt } kind;
  std::string body;  // text, or the tag's inside without delimiters and whitespace-control signs
  int line;
};

bool is_space_c(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

std::vector<Chunk> lex(std::string_view raw, bool trim_blocks, bool lstrip_blocks) {
  // Newlines as Jinja normalizes them: \r\n and \r become \n; one trailing newline is dropped
  // (keep_trailing_newline=False).
  std::string src;
  src.reserve(raw.size());
  for (size_t i = 0; i < raw.size(); ++i) {
    if (raw[i] == '\r') {
      src.push_back('\n');
      if (i + 1 < raw.size() && raw[i + 1] == '\n') ++i;
    } else {
      src.push_back(raw[i]);
    }
  }
  if (!src.empty() && src.back() == '\n') src.pop_back();

  std::vector<Chunk> out;
  size_t pos = 0;
  int line = 1;
  bool strip_next = false;    // the previous tag ended with '-'
  bool line_starting = true;  // the previous tag ended a line (lstrip_blocks applies to a tag at position 0)
  const auto count_lines = [](std::string_view s) { return static_cast<int>(std::count(s.begin(), s.end(), '\n')); };
  while (pos <= src.size()) {
    size_t open = pos;
    while (true) {
      open = src.find('{', open);
      if (open == std::string::npos || open + 1 >= src.size()) {
        open = std::string::npos;
        break;
      }
      const char c = src[open + 1];
      if (c == '{' || c == '%' || c == '#') break;
      ++open;
    }
    std::string text = src.substr(pos, open == std::string::npos ? std::string::npos : open - pos);
    const int text_line = line;
    if (strip_next) {
      size_t k = 0;
      while (k < text.size() && is_space_c(text[k])) ++k;
      text.erase(0, k);
    }
    if (open == std::string::npos) {
      if (!text.empty()) out.push_back({Chunk::K::kText, text, text_line});
      break;
    }
    line += count_lines(src.substr(pos, open - pos));
    const char kind = src[open + 1];
    const char sign = open + 2 < src.size() ? src[open + 2] : '\0';
    if (sign == '-') {
      while (!text.empty() && is_space_c(text.back())) text.pop_back();
    } else if (lstrip_blocks && kind != '{' && sign != '+') {
      const size_t nl = text.rfind('\n');
      const size_t from = nl == std::string::npos ? 0 : nl + 1;
      if (nl != std::string::npos || line_starting) {
        bool blank = true;
        for (size_t k = from; k < text.size(); ++k) blank = blank && is_space_c(text[k]);
        if (blank) text.erase(from);
      }
    }
    if (!text.empty()) out.push_back({Chunk::K::kText, text, text_line});

    // The end of the tag, skipping string literals inside expressions and statements.
    const std::string close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
    size_t i = open + 2 + ((sign == '-' || sign == '+') ? 1 : 0);
    const size_t body_begin = i;
    size_t end = std::string::npos;
    if (kind == '#') {
      end = src.find(close, i);
    } else {
      char quote = 0;
      for (; i + 1 < src.size(); ++i) {
        const char c = src[i];
        if (quote) {
          if (c == '\\') ++i;
          else if (c == quote) quote = 0;
          continue;
        }
        if (c == '\'' || c == '"') quote = c;
        else if (c == close[0] && src[i + 1] == '}') {
          end = i;
          break;
        }
      }
    }
    if (end == std::string::npos) {
      fail(line, kind == '{' ? "unclosed '{{'" : kind == '%' ? "unclosed '{%'" : "unclosed comment");
    }
    size_t body_end = end;
    bool strip_after = false, keep_newline = false;
    if (body_end > body_begin && src[body_end - 1] == '-') {
      strip_after = true;
      --body_end;
    } else if (body_end > body_begin && src[body_end - 1] == '+' && kind != '{') {
      keep_newline = true;
      --body_end;
    }
    std::string body = src.substr(body_begin, body_end - body_begin);
    const int tag_line = line;
    line += count_lines(src.substr(open, end + 2 - open));
    pos = end + 2;
    if (kind != '{' && trim_blocks && !strip_after && !keep_newline && pos < src.size() && src[pos] == '\n') {
      ++pos;
      ++line;
      line_starting = true;
    } else {
      line_starting = false;
    }
    strip_next = strip_after;

    if (kind == '#') continue;
    if (kind == '%') {
      // {% raw %} ... {% endraw %}: the inside is text.
      std::string_view b = body;
      while (!b.empty() && is_space_c(b.front())) b.remove_prefix(1);
      while (!b.empty() && is_space_c(b.back())) b.remove_suffix(1);
      if (b == "raw") {
        size_t search = pos;
        while (true) {
          const size_t at = src.find("{%", search);
          if (at == std::string::npos) fail(tag_line, "'raw' without 'endraw'");
          size_t k = at + 2;
          if (k < src.size() && (src[k] == '-' || src[k] == '+')) ++k;
          while (k < src.size() && is_space_c(src[k])) ++k;
          if (src.compare(k, 6, "endraw") == 0) {
            const size_t close_at = src.find("%}", k);
            if (close_at == std::string::npos) fail(tag_line, "unclosed 'endraw'");
            std::string inner = src.substr(pos, at - pos);
            if (src[at + 2] == '-') {
              while (!inner.empty() && is_space_c(inner.back())) inner.pop_back();
            }
            if (!inner.empty()) out.push_back({Chunk::K::kText, inner, line});
            line += count_lines(src.substr(pos, close_at + 2 - pos));
            pos = close_at + 2;
            strip_next = src[close_at - 1] == '-';
            if (!strip_next && trim_blocks && pos < src.size() && src[pos] == '\n') {
              ++pos;
              ++line;
            }
            break;
          }
          search = at + 2;
        }
        continue;
      }
    }
    out.push_back({kind == '{' ? Chunk::K::kExpr : Chunk::K::kStmt, std::move(body), tag_line});
  }
  return out;
}

// Tokens inside a tag.
struct Tok {
  enum class K { kName, kStr, kInt, kFloat, kOp, kEnd } kind = K::kEnd;
  std::string text;  // name, operator, or the unescaped string
  int64_t i = 0;
  double f = 0;
  int line = 0;
};

std::vector<Tok> tokenize(const std::string& s, int line) {
  std::vector<Tok> out;
  size_t i = 0;
  static const std::vector<std::string> kOps = {"**", "//", "==", "!=", "<=", ">=", "<", ">", "+", "-", "*", "/",
                                                "%",  "~",  "(",  ")",  "[",  "]",  "{", "}", ",", ".", ":", "|", "="};
  while (i < s.size()) {
    const char c = s[i];
    if (c == '\n') {
      ++line;
      ++i;
      continue;
    }
    if (is_space_c(c)) {
      ++i;
      continue;
    }
    Tok t;
    t.line = line;
    if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t j = i;
      while (j < s.size() && (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == '_')) ++j;
      t.kind = Tok::K::kName;
      t.text = s.substr(i, j - i);
      i = j;
    } else if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t j = i;
      while (j < s.size() && (std::isdigit(static_cast<unsigned char>(s[j])) || s[j] == '_')) ++j;
      bool is_float = false;
      if (j + 1 < s.size() && s[j] == '.' && std::isdigit(static_cast<unsigned char>(s[j + 1]))) {
        is_float = true;
        ++j;
        while (j < s.size() && std::isdigit(static_cast<unsigned char>(s[j]))) ++j;
      }
      if (j < s.size() && (s[j] == 'e' || s[j] == 'E')) {
        size_t k = j + 1;
        if (k < s.size() && (s[k] == '+' || s[k] == '-')) ++k;
        if (k < s.size() && std::isdigit(static_cast<unsigned char>(s[k]))) {
          is_float = true;
          j = k;
          while (j < s.size() && std::isdigit(static_cast<unsigned char>(s[j]))) ++j;
        }
      }
      std::string num = s.substr(i, j - i);
      num.erase(std::remove(num.begin(), num.end(), '_'), num.end());
      if (is_float) {
        t.kind = Tok::K::kFloat;
        t.f = std::stod(num);
      } else {
        t.kind = Tok::K::kInt;
        t.i = std::stoll(num);
      }
      i = j;
    } else if (c == '\'' || c == '"') {
      // Python string escapes (Jinja decodes literals with 'unicode-escape'); an unknown escape stays as written.
      t.kind = Tok::K::kStr;
      size_t j = i + 1;
      for (;; ++j) {
        if (j >= s.size()) fail(line, "unterminated string literal");
        const char d = s[j];
        if (d == c) break;
        if (d == '\n') ++line;
        if (d != '\\' || j + 1 >= s.size()) {
          t.text.push_back(d);
          continue;
        }
        const char e = s[++j];
        const auto hex = [&](size_t n) {
          uint32_t v = 0;
          for (size_t k = 1; k <= n; ++k) {
            const char h = j + k < s.size() ? s[j + k] : '\0';
            if (!std::isxdigit(static_cast<unsigned char>(h))) fail(line, "bad \\x/\\u escape in string literal");
            const int digit = std::isdigit(static_cast<unsigned char>(h)) ? h - '0' : std::tolower(h) - 'a' + 10;
            v = v * 16 + static_cast<uint32_t>(digit);
          }
          j += n;
          return v;
        };
        switch (e) {
          case 'n': t.text.push_back('\n'); break;
          case 't': t.text.push_back('\t'); break;
          case 'r': t.text.push_back('\r'); break;
          case 'a': t.text.push_back('\a'); break;
          case 'b': t.text.push_back('\b'); break;
          case 'f': t.text.push_back('\f'); break;
          case 'v': t.text.push_back('\v'); break;
          case '\\': t.text.push_back('\\'); break;
          case '\'': t.text.push_back('\''); break;
          case '"': t.text.push_back('"'); break;
          case '\n': ++line; break;  // a line continuation
          case 'x': tokenizer_unicode::append_utf8(hex(2), t.text); break;
          case 'u': tokenizer_unicode::append_utf8(hex(4), t.text); break;
          case 'U': tokenizer_unicode::append_utf8(hex(8), t.text); break;
          default:
            if (e >= '0' && e <= '7') {
              uint32_t v = static_cast<uint32_t>(e - '0');
              for (int k = 0; k < 2 && j + 1 < s.size() && s[j + 1] >= '0' && s[j + 1] <= '7'; ++k) {
                v = v * 8 + static_cast<uint32_t>(s[++j] - '0');
              }
              tokenizer_unicode::append_utf8(v, t.text);
            } else {
              t.text.push_back('\\');
              t.text.push_back(e);
            }
        }
      }
      i = j + 1;
    } else {
      bool found = false;
      for (const std::string& op : kOps) {
        if (s.compare(i, op.size(), op) == 0) {
          t.kind = Tok::K::kOp;
          t.text = op;
          i += op.size();
          found = true;
          break;
        }
      }
      if (!found) fail(line, fmt::format("unexpected character '{}'", c));
    }
    out.push_back(std::move(t));
  }
  Tok end;
  end.line = line;
  out.push_back(end);
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Syntax tree.

struct Node;
using NodeP = std::unique_ptr<Node>;
using Body = std::vector<NodeP>;

struct Node {
  enum class K {
    // expressions
    kConst, kName, kAttr, kItem, kSlice, kCall, kFilter, kTest, kNeg, kBinary, kCompare, kAnd, kOr, kNot, kCond,
    kList, kDict,
    // statements
    kText, kOutput, kIf, kFor, kSet, kSetAttr, kSetBlock, kMacro, kBreak, kContinue, kFilterBlock, kBodyBlock,
  };
  K kind;
  int line = 0;
  std::string name;                // name, attribute, operator, filter / test name
  V value;                         // kConst
  std::vector<NodeP> kids;         // operands / arguments / conditions
  std::vector<std::string> names;  // keyword-argument names (parallel to the tail of kids), targets, parameters
  std::vector<Body> bodies;        // kIf: one per condition, then else; kFor: body, else; others: body
  bool negated = false;            // kTest: 'is not'
  size_t n_positional = 0;         // kCall / kFilter / kTest: kids[0] is the callee or subject; then positional
                                   // args, then keyword args named by names
  std::vector<std::string> ops;    // kCompare
};

NodeP make(Node::K k, int line) {
  auto n = std::make_unique<Node>();
  n->kind = k;
  n->line = line;
  return n;
}

class Parser {
 public:
  explicit Parser(std::vector<Chunk> chunks) : chunks_(std::move(chunks)) {}

  Body parse_all() {
    Body body = parse_body({});
    return body;
  }

 private:
  std::vector<Chunk> chunks_;
  size_t ci_ = 0;
  std::vector<Tok> toks_;
  size_t ti_ = 0;
  std::string end_tag_;  // the keyword that ended the last parse_body
  int end_line_ = 0;

  const Tok& peek(size_t k = 0) const { return toks_[std::min(ti_ + k, toks_.size() - 1)]; }
  Tok next() { return toks_[std::min(ti_++, toks_.size() - 1)]; }
  bool at_op(std::string_view op) const { return peek().kind == Tok::K::kOp && peek().text == op; }
  bool at_name(std::string_view n) const { return peek().kind == Tok::K::kName && peek().text == n; }
  bool skip_op(std::string_view op) {
    if (!at_op(op)) return false;
    ++ti_;
    return true;
  }
  bool skip_name(std::string_view n) {
    if (!at_name(n)) return false;
    ++ti_;
    return true;
  }
  void expect_op(std::string_view op) {
    if (!skip_op(op)) fail(peek().line, fmt::format("expected '{}', found {}", op, describe(peek())));
  }
  std::string expect_name() {
    if (peek().kind != Tok::K::kName) fail(peek().line, fmt::format("expected a name, found {}", describe(peek())));
    return next().text;
  }
  void expect_end() {
    if (peek().kind != Tok::K::kEnd) fail(peek().line, fmt::format("unexpected {} in tag", describe(peek())));
  }
  static std::string describe(const Tok& t) {
    switch (t.kind) {
      case Tok::K::kEnd: return "end of tag";
      case Tok::K::kStr: return "a string";
      case Tok::K::kInt:
      case Tok::K::kFloat: return "a number";
      default: return "'" + t.text + "'";
    }
  }

  // Statements until a tag whose keyword is in `ends` (left in toks_ after the keyword) or the end of the template.
  Body parse_body(const std::set<std::string>& ends) {
    Body body;
    while (ci_ < chunks_.size()) {
      const Chunk& c = chunks_[ci_++];
      if (c.kind == Chunk::K::kText) {
        auto n = make(Node::K::kText, c.line);
        n->value = V::lit(c.body);
        body.push_back(std::move(n));
        continue;
      }
      toks_ = tokenize(c.body, c.line);
      ti_ = 0;
      if (c.kind == Chunk::K::kExpr) {
        auto n = make(Node::K::kOutput, c.line);
        n->kids.push_back(parse_tuple_or_expr());
        expect_end();
        body.push_back(std::move(n));
        continue;
      }
      if (peek().kind != Tok::K::kName) fail(c.line, "expected a tag name after '{%'");
      const std::string kw = peek().text;
      if (ends.count(kw)) {
        ++ti_;
        end_tag_ = kw;
        end_line_ = c.line;
        return body;
      }
      ++ti_;
      body.push_back(parse_statement(kw, c.line));
    }
    if (!ends.empty()) {
      const int last_line = chunks_.empty() ? 1
                                            : chunks_.back().line +
                                                  static_cast<int>(std::count(chunks_.back().body.begin(),
                                                                              chunks_.back().body.end(), '\n'));
      fail(last_line,
           fmt::format("unexpected end of template, expected '{}'", *ends.rbegin()));
    }
    return body;
  }

  NodeP parse_statement(const std::string& kw, int line) {
    if (kw == "if") {
      auto n = make(Node::K::kIf, line);
      n->kids.push_back(parse_expr());
      expect_end();
      while (true) {
        n->bodies.push_back(parse_body({"elif", "else", "endif"}));
        if (end_tag_ == "elif") {
          n->kids.push_back(parse_expr());
          expect_end();
          continue;
        }
        if (end_tag_ == "else") {
          expect_end();
          n->bodies.push_back(parse_body({"endif"}));
        }
        expect_end();
        break;
      }
      return n;
    }
    if (kw == "for") {
      auto n = make(Node::K::kFor, line);
      do {
        n->names.push_back(expect_name());
      } while (skip_op(","));
      if (!skip_name("in")) fail(peek().line, "expected 'in' in for");
      n->kids.push_back(parse_tuple_or_expr(/*with_cond=*/false));
      if (skip_name("if")) n->kids.push_back(parse_expr());
      if (skip_name("recursive")) fail(line, "recursive for loops are not supported");
      expect_end();
      n->bodies.push_back(parse_body({"else", "endfor"}));
      if (end_tag_ == "else") {
        expect_end();
        n->bodies.push_back(parse_body({"endfor"}));
      } else {
        n->bodies.emplace_back();
      }
      expect_end();
      return n;
    }
    if (kw == "set") {
      std::vector<std::string> targets{expect_name()};
      if (skip_op(".")) {
        auto n = make(Node::K::kSetAttr, line);
        n->names = {targets[0], expect_name()};
        expect_op("=");
        n->kids.push_back(parse_tuple_or_expr());
        expect_end();
        return n;
      }
      while (skip_op(",")) targets.push_back(expect_name());
      if (skip_op("=")) {
        auto n = make(Node::K::kSet, line);
        n->names = targets;
        n->kids.push_back(parse_tuple_or_expr());
        expect_end();
        return n;
      }
      if (targets.size() != 1) fail(line, "a block set takes one name");
      auto n = make(Node::K::kSetBlock, line);
      n->names = targets;
      while (skip_op("|")) n->kids.push_back(parse_filter_call(nullptr));
      expect_end();
      n->bodies.push_back(parse_body({"endset"}));
      expect_end();
      return n;
    }
    if (kw == "macro") {
      auto n = make(Node::K::kMacro, line);
      n->name = expect_name();
      expect_op("(");
      while (!at_op(")")) {
        n->names.push_back(expect_name());
        n->kids.push_back(skip_op("=") ? parse_expr() : nullptr);
        if (!skip_op(",")) break;
      }
      expect_op(")");
      expect_end();
      n->bodies.push_back(parse_body({"endmacro"}));
      expect_end();
      return n;
    }
    if (kw == "break" || kw == "continue") {
      expect_end();
      return make(kw == "break" ? Node::K::kBreak : Node::K::kContinue, line);
    }
    if (kw == "filter") {
      auto n = make(Node::K::kFilterBlock, line);
      do {
        n->kids.push_back(parse_filter_call(nullptr));
      } while (skip_op("|"));
      expect_end();
      n->bodies.push_back(parse_body({"endfilter"}));
      expect_end();
      return n;
    }
    if (kw == "generation") {
      expect_end();
      auto n = make(Node::K::kBodyBlock, line);
      n->bodies.push_back(parse_body({"endgeneration"}));
      expect_end();
      return n;
    }
    fail(line, fmt::format("unknown tag '{}'", kw));
  }

  // Expressions, lowest precedence first (Jinja's parser order).
  NodeP parse_tuple_or_expr(bool with_cond = true) {
    const int line = peek().line;
    NodeP first = with_cond ? parse_expr() : parse_or();
    if (!at_op(",")) return first;
    auto n = make(Node::K::kList, line);
    n->kids.push_back(std::move(first));
    while (skip_op(",")) {
      if (peek().kind == Tok::K::kEnd || at_op(")")) break;
      n->kids.push_back(with_cond ? parse_expr() : parse_or());
    }
    return n;
  }

  NodeP parse_expr() {
    NodeP e = parse_or();
    while (at_name("if")) {
      const int line = next().line;
      auto n = make(Node::K::kCond, line);
      NodeP cond = parse_or();
      NodeP other = skip_name("else") ? parse_expr() : nullptr;
      n->kids.push_back(std::move(cond));
      n->kids.push_back(std::move(e));
      n->kids.push_back(std::move(other));
      e = std::move(n);
    }
    return e;
  }
  NodeP parse_or() {
    NodeP e = parse_and();
    while (at_name("or")) {
      auto n = make(Node::K::kOr, next().line);
      n->kids.push_back(std::move(e));
      n->kids.push_back(parse_and());
      e = std::move(n);
    }
    return e;
  }
  NodeP parse_and() {
    NodeP e = parse_not();
    while (at_name("and")) {
      auto n = make(Node::K::kAnd, next().line);
      n->kids.push_back(std::move(e));
      n->kids.push_back(parse_not());
      e = std::move(n);
    }
    return e;
  }
  NodeP parse_not() {
    if (at_name("not")) {
      auto n = make(Node::K::kNot, next().line);
      n->kids.push_back(parse_not());
      return n;
    }
    return parse_compare();
  }
  NodeP parse_compare() {
    const int line = peek().line;
    NodeP e = parse_binary(0);
    NodeP cmp;
    while (true) {
      std::string op;
      if (peek().kind == Tok::K::kOp &&
          (at_op("==") || at_op("!=") || at_op("<") || at_op("<=") || at_op(">") || at_op(">="))) {
        op = next().text;
      } else if (at_name("in")) {
        ++ti_;
        op = "in";
      } else if (at_name("not") && peek(1).kind == Tok::K::kName && peek(1).text == "in") {
        ti_ += 2;
        op = "not in";
      } else {
        break;
      }
      if (!cmp) {
        cmp = make(Node::K::kCompare, line);
        cmp->kids.push_back(std::move(e));
      }
      cmp->ops.push_back(op);
      cmp->kids.push_back(parse_binary(0));
    }
    return cmp ? std::move(cmp) : std::move(e);
  }
  // Levels: 0 '+' '-', 1 '~', 2 '*' '/' '//' '%', 3 '**'.
  NodeP parse_binary(int level) {
    if (level == 4) return parse_unary(true);
    static const std::vector<std::vector<std::string>> kLevels = {{"+", "-"}, {"~"}, {"*", "/", "//", "%"}, {"**"}};
    NodeP e = parse_binary(level + 1);
    while (true) {
      const auto& ops = kLevels[static_cast<size_t>(level)];
      if (peek().kind != Tok::K::kOp || std::find(ops.begin(), ops.end(), peek().text) == ops.end()) break;
      auto n = make(Node::K::kBinary, peek().line);
      n->name = next().text;
      n->kids.push_back(std::move(e));
      n->kids.push_back(parse_binary(level + 1));
      e = std::move(n);
    }
    return e;
  }
  NodeP parse_unary(bool with_filter) {
    NodeP e;
    if (at_op("-") || at_op("+")) {
      const Tok t = next();
      NodeP x = parse_unary(false);
      if (t.text == "-") {
        e = make(Node::K::kNeg, t.line);
        e->kids.push_back(std::move(x));
      } else {
        e = std::move(x);
      }
    } else {
      e = parse_primary();
    }
    e = parse_postfix(std::move(e));
    if (with_filter) e = parse_filters(std::move(e));
    return e;
  }
  NodeP parse_primary() {
    const Tok t = next();
    switch (t.kind) {
      case Tok::K::kName: {
        auto n = make(Node::K::kConst, t.line);
        if (t.text == "true" || t.text == "True") n->value = V::boolean(true);
        else if (t.text == "false" || t.text == "False") n->value = V::boolean(false);
        else if (t.text == "none" || t.text == "None") n->value = V();
        else {
          n->kind = Node::K::kName;
          n->name = t.text;
        }
        return n;
      }
      case Tok::K::kStr: {
        std::string s = t.text;
        while (peek().kind == Tok::K::kStr) s += next().text;  // adjacent literals concatenate
        auto n = make(Node::K::kConst, t.line);
        n->value = V::lit(s);
        return n;
      }
      case Tok::K::kInt: {
        auto n = make(Node::K::kConst, t.line);
        n->value = V::integer(t.i);
        return n;
      }
      case Tok::K::kFloat: {
        auto n = make(Node::K::kConst, t.line);
        n->value = V::real(t.f);
        return n;
      }
      case Tok::K::kOp:
        if (t.text == "(") {
          if (skip_op(")")) return make(Node::K::kList, t.line);
          NodeP e = parse_tuple_or_expr();
          expect_op(")");
          return e;
        }
        if (t.text == "[") {
          auto n = make(Node::K::kList, t.line);
          while (!at_op("]")) {
            n->kids.push_back(parse_expr());
            if (!skip_op(",")) break;
          }
          expect_op("]");
          return n;
        }
        if (t.text == "{") {
          auto n = make(Node::K::kDict, t.line);
          while (!at_op("}")) {
            n->kids.push_back(parse_expr());
            expect_op(":");
            n->kids.push_back(parse_expr());
            if (!skip_op(",")) break;
          }
          expect_op("}");
          return n;
        }
        break;
      default: break;
    }
    fail(t.line, fmt::format("unexpected {}", describe(t)));
  }
  // Arguments after '(' (consumed): positional then keyword ones, into n->kids / n->names.
  void parse_args(Node* n) {
    while (!at_op(")")) {
      if (peek().kind == Tok::K::kName && peek(1).kind == Tok::K::kOp && peek(1).text == "=") {
        n->names.push_back(next().text);
        ++ti_;
        n->kids.push_back(parse_expr());
      } else {
        if (!n->names.empty()) fail(peek().line, "positional argument after keyword argument");
        n->kids.push_back(parse_expr());
        ++n->n_positional;
      }
      if (!skip_op(",")) break;
    }
    expect_op(")");
  }
  NodeP parse_postfix(NodeP e) {
    while (true) {
      if (at_op(".")) {
        const int line = next().line;
        auto n = make(Node::K::kAttr, line);
        if (peek().kind == Tok::K::kInt) {
          n->kind = Node::K::kItem;
          auto idx = make(Node::K::kConst, line);
          idx->value = V::integer(next().i);
          n->kids.push_back(std::move(e));
          n->kids.push_back(std::move(idx));
        } else {
          n->name = expect_name();
          n->kids.push_back(std::move(e));
        }
        e = std::move(n);
      } else if (at_op("[")) {
        const int line = next().line;
        NodeP parts[3];
        bool slice = false;
        for (int k = 0; k < 3; ++k) {
          if (!at_op(":") && !at_op("]")) parts[k] = parse_expr();
          if (k < 2 && skip_op(":")) {
            slice = true;
            continue;
          }
          break;
        }
        expect_op("]");
        auto n = make(slice ? Node::K::kSlice : Node::K::kItem, line);
        n->kids.push_back(std::move(e));
        if (slice) {
          for (auto& p : parts) n->kids.push_back(std::move(p));
        } else {
          if (!parts[0]) fail(line, "empty subscript");
          n->kids.push_back(std::move(parts[0]));
        }
        e = std::move(n);
      } else if (at_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }
  NodeP parse_call(NodeP callee) {
    auto n = make(Node::K::kCall, next().line);
    n->kids.push_back(std::move(callee));
    parse_args(n.get());
    return n;
  }
  // A filter after '|' (consumed): name[.name] [(args)], applied to `subject` (null for filter blocks).
  NodeP parse_filter_call(NodeP subject) {
    auto n = make(Node::K::kFilter, peek().line);
    n->name = expect_name();
    while (skip_op(".")) n->name += "." + expect_name();
    n->kids.push_back(std::move(subject));
    if (skip_op("(")) parse_args(n.get());
    return n;
  }
  NodeP parse_filters(NodeP e) {
    while (true) {
      if (skip_op("|")) {
        e = parse_filter_call(std::move(e));
      } else if (at_name("is")) {
        auto n = make(Node::K::kTest, next().line);
        n->negated = skip_name("not");
        n->name = expect_name();
        n->kids.push_back(std::move(e));
        if (skip_op("(")) {
          parse_args(n.get());
        } else if ((peek().kind == Tok::K::kName && peek().text != "else" && peek().text != "or" &&
                    peek().text != "and" && peek().text != "if" && peek().text != "in" && peek().text != "not" &&
                    peek().text != "is") ||
                   peek().kind == Tok::K::kStr || peek().kind == Tok::K::kInt || peek().kind == Tok::K::kFloat ||
                   at_op("[") || at_op("{")) {
          n->kids.push_back(parse_postfix(parse_primary()));
          n->n_positional = 1;
        }
        e = std::move(n);
      } else if (at_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Evaluation.

struct Frame {
  std::vector<std::pair<std::string, V>> vars;
  bool barrier = false;  // a macro's frame: names not found here resolve at the top level
};

struct Macro {
  const Node* node;
};

struct Ctx {
  const V* globals;
  std::vector<Frame> frames;
  Text out;
  enum class Jump { kNone, kBreak, kContinue } jump = Jump::kNone;
  int depth = 0;
};

constexpr int kMaxDepth = 200;  // macro recursion

V eval(Ctx& c, const Node& n);
void exec(Ctx& c, const Body& body);

const V* find_var(const Ctx& c, std::string_view name) {
  for (size_t k = c.frames.size(); k-- > 0;) {
    for (const auto& [n, v] : c.frames[k].vars) {
      if (n == name) return &v;
    }
    if (c.frames[k].barrier && k > 0) {
      for (const auto& [n, v] : c.frames[0].vars) {
        if (n == name) return &v;
      }
      break;
    }
  }
  return c.globals->d->find(name);
}

void set_var(Ctx& c, const std::string& name, V v) {
  auto& vars = c.frames.back().vars;
  for (auto& [n, old] : vars) {
    if (n == name) {
      old = std::move(v);
      return;
    }
  }
  vars.emplace_back(name, std::move(v));
}

const V* kwarg(const Kwargs& kw, std::string_view name) {
  for (const auto& [n, v] : kw) {
    if (n == name) return &v;
  }
  return nullptr;
}
// Argument k, by position or by keyword; `dflt` when absent.
V arg(const std::vector<V>& args, const Kwargs& kw, size_t k, std::string_view name, V dflt = V()) {
  if (k < args.size()) return args[k];
  if (const V* v = kwarg(kw, name)) return *v;
  return dflt;
}
const V& need_str(const V& v, int line, std::string_view what) {
  if (v.is(V::K::kUndef)) fail_undefined(line, v);
  if (!v.is(V::K::kStr)) fail(line, fmt::format("{} must be a string, not {}", what, type_name(v)));
  return v;
}

V str_method(const V& self, const std::string& name) {
  static const std::set<std::string> kNames = {"startswith", "endswith", "strip", "lstrip", "rstrip", "split",
                                               "upper",      "lower",    "title", "capitalize", "replace", "find",
                                               "count",      "join",     "format", "rsplit", "isspace", "isalpha",
                                               "isdigit", "isalnum", "islower", "isupper"};
  if (!kNames.count(name)) return V::undef(fmt::format("'str object' has no attribute '{}'", name));
  return V::func("str." + name, [self, name](Ctx&, std::vector<V>& args, Kwargs& kw, int ln) -> V {
    const Text& s = self.s;
    if (name == "startswith" || name == "endswith") {
      const V p = arg(args, kw, 0, "prefix");
      const VList options = p.is(V::K::kList) ? *p.l : VList{p};
      for (const V& o : options) {
        const std::string& x = need_str(o, ln, name + " argument").s.s;
        const bool hit = name == "startswith" ? s.s.starts_with(x) : s.s.ends_with(x);
        if (hit) return V::boolean(true);
      }
      return V::boolean(false);
    }
    if (name == "strip" || name == "lstrip" || name == "rstrip") {
      const V chars = arg(args, kw, 0, "chars");
      const std::string* set = chars.is(V::K::kStr) ? &chars.s.s : nullptr;
      return V::str(strip_text(s, name != "rstrip", name != "lstrip", set));
    }
    if (name == "split" || name == "rsplit") {
      if (name == "rsplit" && !args.empty() && args.size() > 1) fail(ln, "rsplit with maxsplit is not supported");
      return V::list(split_text(s, arg(args, kw, 0, "sep"), as_int(arg(args, kw, 1, "maxsplit", V::integer(-1)))));
    }
    if (name == "upper") return V::str(map_case(s, 0));
    if (name == "lower") return V::str(map_case(s, 1));
    if (name == "title") return V::str(map_case(s, 2));
    if (name == "capitalize") return V::str(map_case(s, 3));
    if (name == "replace") {
      return V::str(replace_text(s, need_str(arg(args, kw, 0, "old"), ln, "old").s,
                                 need_str(arg(args, kw, 1, "new"), ln, "new").s,
                                 as_int(arg(args, kw, 2, "count", V::integer(-1)))));
    }
    if (name == "find") {
      const size_t at = s.s.find(need_str(arg(args, kw, 0, "sub"), ln, "sub").s.s);
      if (at == std::string::npos) return V::integer(-1);
      return V::integer(static_cast<int64_t>(code_points(s.s.substr(0, at)).size() - 1));
    }
    if (name == "count") {
      const std::string& x = need_str(arg(args, kw, 0, "sub"), ln, "sub").s.s;
      int64_t n = 0;
      if (x.empty()) return V::integer(static_cast<int64_t>(code_points(s.s).size()));
      for (size_t at = s.s.find(x); at != std::string::npos; at = s.s.find(x, at + x.size())) ++n;
      return V::integer(n);
    }
    if (name == "join") {
      Text out;
      const VList items = iterate(arg(args, kw, 0, "iterable"), ln);
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) out.append(s);
        out.append(need_str(items[i], ln, "join item").s);
      }
      return V::str(out);
    }
    if (name == "format") {
      // '{}' and '{0}' fields only.
      Text out;
      size_t next = 0;
      for (size_t i = 0; i < s.s.size(); ++i) {
        if (s.s[i] == '{' && i + 1 < s.s.size() && s.s[i + 1] == '{') {
          out.append(s.sub(i, 1));
          ++i;
        } else if (s.s[i] == '}' && i + 1 < s.s.size() && s.s[i + 1] == '}') {
          out.append(s.sub(i, 1));
          ++i;
        } else if (s.s[i] == '{') {
          const size_t close = s.s.find('}', i);
          if (close == std::string::npos) fail(ln, "unmatched '{' in format string");
          const std::string field = s.s.substr(i + 1, close - i - 1);
          V v;
          if (field.empty()) v = arg(args, kw, next++, "");
          else if (std::all_of(field.begin(), field.end(), ::isdigit)) v = arg(args, kw, std::stoul(field), "");
          else if (const V* k = kwarg(kw, field)) v = *k;
          else fail(ln, fmt::format("format field '{}' has no argument", field));
          out.append(to_text(v));
          i = close;
        } else {
          out.append(s.sub(i, 1));
        }
      }
      return V::str(out);
    }
    // Character-class predicates, ASCII.
    if (s.s.empty()) return V::boolean(false);
    const auto all = [&](auto pred) { return V::boolean(std::all_of(s.s.begin(), s.s.end(), pred)); };
    if (name == "isspace") return all([](char ch) { return is_space_c(ch); });
    if (name == "isalpha") return all([](char ch) { return std::isalpha(static_cast<unsigned char>(ch)) != 0; });
    if (name == "isdigit") return all([](char ch) { return std::isdigit(static_cast<unsigned char>(ch)) != 0; });
    if (name == "isalnum") return all([](char ch) { return std::isalnum(static_cast<unsigned char>(ch)) != 0; });
    if (name == "islower") return V::boolean(map_case(s, 1).s == s.s && map_case(s, 0).s != s.s);
    return V::boolean(map_case(s, 0).s == s.s && map_case(s, 1).s != s.s);  // isupper
  });
}

V items_of(const V& d) {
  VList out;
  for (const auto& [k, v] : d.d->items) out.push_back(V::list({key_value(k), v}));
  return V::list(std::move(out));
}

V dict_method(const V& self, const std::string& name) {
  if (name != "get" && name != "items" && name != "keys" && name != "values") return V::undef("");
  return V::func("dict." + name, [self, name](Ctx&, std::vector<V>& args, Kwargs& kw, int ln) -> V {
    if (name == "get") {
      const V key = arg(args, kw, 0, "key");
      const V* v = key.is(V::K::kStr) ? self.d->find(key.s.s) : nullptr;
      return v ? *v : arg(args, kw, 1, "default");
    }
    if (name == "items") return items_of(self);
    VList out;
    for (const auto& [k, v] : self.d->items) out.push_back(name == "keys" ? key_value(k) : v);
    (void)ln;
    return V::list(std::move(out));
  });
}

V get_attr(const V& obj, const std::string& name, int line) {
  switch (obj.k) {
    case V::K::kUndef: fail_undefined(line, obj);
    case V::K::kDict: {
      if (!obj.d->is_namespace) {
        V m = dict_method(obj, name);
        if (m.is(V::K::kFunc)) return m;
      }
      if (const V* v = obj.d->find(name)) return *v;
      return V::undef(fmt::format("'{} object' has no attribute '{}'", type_name(obj), name));
    }
    case V::K::kStr: return str_method(obj, name);
    default: return V::undef(fmt::format("'{} object' has no attribute '{}'", type_name(obj), name));
  }
}

V get_item(const V& obj, const V& key, int line) {
  switch (obj.k) {
    case V::K::kUndef: fail_undefined(line, obj);
    case V::K::kDict:
      if (key.is(V::K::kStr)) {
        if (const V* v = obj.d->find(key.s.s)) return *v;
        return get_attr(obj, key.s.s, line).is(V::K::kFunc)
                   ? get_attr(obj, key.s.s, line)
                   : V::undef(fmt::format("'dict object' has no attribute '{}'", key.s.s));
      }
      return V::undef("dict key is not a string");
    case V::K::kList:
    case V::K::kStr: {
      if (key.is(V::K::kStr)) return get_attr(obj, key.s.s, line);
      if (!key.is(V::K::kInt) && !key.is(V::K::kBool)) {
        if (key.is(V::K::kUndef)) fail_undefined(line, key);
        fail(line, fmt::format("{} indices must be integers, not {}", type_name(obj), type_name(key)));
      }
      int64_t i = as_int(key);
      if (obj.is(V::K::kList)) {
        const auto n = static_cast<int64_t>(obj.l->size());
        if (i < 0) i += n;
        if (i < 0 || i >= n) return V::undef(fmt::format("list index {} out of range", as_int(key)));
        return (*obj.l)[static_cast<size_t>(i)];
      }
      const std::vector<size_t> cps = code_points(obj.s.s);
      const auto n = static_cast<int64_t>(cps.size() - 1);
      if (i < 0) i += n;
      if (i < 0 || i >= n) return V::undef(fmt::format("string index {} out of range", as_int(key)));
      const auto u = static_cast<size_t>(i);
      return V::str(obj.s.sub(cps[u], cps[u + 1] - cps[u]));
    }
    default:
      return V::undef(fmt::format("'{} object' is not subscriptable", type_name(obj)));
  }
}

V arith(const std::string& op, const V& a, const V& b, int line) {
  if (op == "~") {
    Text t = to_text(a);
    t.append(to_text(b));
    return V::str(std::move(t));
  }
  if (a.is(V::K::kUndef)) fail_undefined(line, a);
  if (b.is(V::K::kUndef)) fail_undefined(line, b);
  if (a.number() && b.number()) {
    const bool real = a.is(V::K::kFloat) || b.is(V::K::kFloat);
    if (op == "+") return real ? V::real(as_double(a) + as_double(b)) : V::integer(as_int(a) + as_int(b));
    if (op == "-") return real ? V::real(as_double(a) - as_double(b)) : V::integer(as_int(a) - as_int(b));
    if (op == "*") return real ? V::real(as_double(a) * as_double(b)) : V::integer(as_int(a) * as_int(b));
    if (op == "/") {
      if (as_double(b) == 0) fail(line, "division by zero");
      return V::real(as_double(a) / as_double(b));
    }
    if (op == "//" || op == "%") {
      if (as_double(b) == 0) fail(line, op == "%" ? "modulo by zero" : "division by zero");
      if (real) {
        const double q = std::floor(as_double(a) / as_double(b));
        return op == "//" ? V::real(q) : V::real(as_double(a) - q * as_double(b));
      }
      const int64_t x = as_int(a), y = as_int(b);
      int64_t q = x / y;
      if ((x % y != 0) && ((x < 0) != (y < 0))) --q;
      return op == "//" ? V::integer(q) : V::integer(x - q * y);
    }
    if (op == "**") {
      if (!real && as_int(b) >= 0) {
        int64_t r = 1;
        for (int64_t k = 0; k < as_int(b); ++k) r *= as_int(a);
        return V::integer(r);
      }
      return V::real(std::pow(as_double(a), as_double(b)));
    }
  }
  if (op == "+" && a.is(V::K::kStr) && b.is(V::K::kStr)) {
    Text t = a.s;
    t.append(b.s);
    return V::str(std::move(t));
  }
  if (op == "+" && a.is(V::K::kList) && b.is(V::K::kList)) {
    VList l = *a.l;
    l.insert(l.end(), b.l->begin(), b.l->end());
    return V::list(std::move(l));
  }
  if (op == "*" && (a.is(V::K::kStr) || a.is(V::K::kList)) && (b.is(V::K::kInt) || b.is(V::K::kBool))) {
    if (a.is(V::K::kStr)) {
      Text t;
      for (int64_t k = 0; k < as_int(b); ++k) t.append(a.s);
      return V::str(std::move(t));
    }
    VList l;
    for (int64_t k = 0; k < as_int(b); ++k) l.insert(l.end(), a.l->begin(), a.l->end());
    return V::list(std::move(l));
  }
  if (op == "*" && (b.is(V::K::kStr) || b.is(V::K::kList)) && (a.is(V::K::kInt) || a.is(V::K::kBool))) {
    return arith(op, b, a, line);
  }
  if (op == "%" && a.is(V::K::kStr)) return V::str(percent_format(a.s, b, line));
  fail(line, fmt::format("unsupported operand types for {}: {} and {}", op, type_name(a), type_name(b)));
}

// Tests: defined, undefined, none, boolean, true, false, integer, float, number, string, mapping, iterable,
// sequence, callable, equalto/eq/==/sameas, ne/!=, lt, le, gt, ge, in, odd, even, divisibleby, lower, upper.
bool apply_test(Ctx& c, const std::string& name, const V& v, std::vector<V>& args, int line) {
  (void)c;
  const auto a0 = [&]() -> const V& {
    if (args.empty()) fail(line, fmt::format("test '{}' needs an argument", name));
    return args[0];
  };
  if (name == "defined") return !v.is(V::K::kUndef);
  if (name == "undefined") return v.is(V::K::kUndef);
  if (name == "none") return v.is(V::K::kNone);
  if (name == "boolean") return v.is(V::K::kBool);
  if (name == "true") return v.is(V::K::kBool) && v.b;
  if (name == "false") return v.is(V::K::kBool) && !v.b;
  if (name == "integer") return v.is(V::K::kInt);
  if (name == "float") return v.is(V::K::kFloat);
  if (name == "number") return v.number();
  if (name == "string") return v.is(V::K::kStr);
  if (name == "mapping") return v.is(V::K::kDict);
  if (name == "iterable" || name == "sequence") {
    return v.is(V::K::kStr) || v.is(V::K::kList) || v.is(V::K::kDict);
  }
  if (name == "callable") return v.is(V::K::kFunc);
  if (name == "equalto" || name == "eq" || name == "==" || name == "sameas") return equal(v, a0());
  if (name == "ne" || name == "!=") return !equal(v, a0());
  if (name == "lt" || name == "lessthan") return compare(v, a0(), line, "<") < 0;
  if (name == "le") return compare(v, a0(), line, "<=") <= 0;
  if (name == "gt" || name == "greaterthan") return compare(v, a0(), line, ">") > 0;
  if (name == "ge") return compare(v, a0(), line, ">=") >= 0;
  if (name == "in") return contains(a0(), v, line);
  if (name == "odd" || name == "even" || name == "divisibleby") {
    if (v.is(V::K::kUndef)) fail_undefined(line, v);
    if (!v.is(V::K::kInt)) fail(line, fmt::format("test '{}' needs an integer", name));
    if (name == "divisibleby") return as_int(a0()) != 0 && v.i % as_int(a0()) == 0;
    return (v.i % 2 != 0) == (name == "odd");
  }
  if (name == "lower") return v.is(V::K::kStr) && map_case(v.s, 1).s == v.s.s;
  if (name == "upper") return v.is(V::K::kStr) && map_case(v.s, 0).s == v.s.s;
  fail(line, fmt::format("unknown test '{}'", name));
}

V apply_filter(Ctx& c, const std::string& name, const V& v, std::vector<V>& args, Kwargs& kw, int line);

// The attribute path "a.b" of an item, as the attribute= arguments of filters take it.
V attribute_path(const V& item, const V& path, int line) {
  const std::string& p = need_str(path, line, "attribute").s.s;
  V cur = item;
  size_t pos = 0;
  while (true) {
    const size_t dot = p.find('.', pos);
    const std::string part = p.substr(pos, dot == std::string::npos ? std::string::npos : dot - pos);
    if (cur.is(V::K::kUndef)) return cur;
    if (!part.empty() && std::all_of(part.begin(), part.end(), ::isdigit)) {
      cur = get_item(cur, V::integer(std::stoll(part)), line);
    } else {
      cur = get_item(cur, V::lit(part), line);
    }
    if (dot == std::string::npos) return cur;
    pos = dot + 1;
  }
}

// Filters: default/d, trim/strip, length/count, upper, lower, title, capitalize, string, safe, tojson(indent), join(d,
// attribute), first, last, items, list, reverse, replace, int, float, abs, select/reject, selectattr/rejectattr,
// map(name | attribute=), unique, sort(reverse, attribute), min, max, sum, indent, format, dictsort.
V apply_filter(Ctx& c, const std::string& name, const V& v, std::vector<V>& args, Kwargs& kw, int line) {
  const auto need_defined = [&]() {
    if (v.is(V::K::kUndef)) fail_undefined(line, v);
  };
  if (name == "default" || name == "d") {
    const bool boolean = truthy(arg(args, kw, 1, "boolean", V::boolean(false)));
    if (v.is(V::K::kUndef) || (boolean && !truthy(v))) return arg(args, kw, 0, "default_value", V::lit(""));
    return v;
  }
  if (name == "trim" || name == "strip") {
    const V chars = arg(args, kw, 0, "chars");
    return V::str(strip_text(to_text(v), true, true, chars.is(V::K::kStr) ? &chars.s.s : nullptr));
  }
  if (name == "length" || name == "count") {
    switch (v.k) {
      case V::K::kUndef: return V::integer(0);
      case V::K::kStr: return V::integer(static_cast<int64_t>(code_points(v.s.s).size() - 1));
      case V::K::kList: return V::integer(static_cast<int64_t>(v.l->size()));
      case V::K::kDict: return V::integer(static_cast<int64_t>(v.d->items.size()));
      default: fail(line, fmt::format("object of type {} has no length", type_name(v)));
    }
  }
  if (name == "upper") return V::str(map_case(to_text(v), 0));
  if (name == "lower") return V::str(map_case(to_text(v), 1));
  if (name == "title") return V::str(map_case(to_text(v), 2));
  if (name == "capitalize") return V::str(map_case(to_text(v), 3));
  if (name == "string") return V::str(to_text(v));
  if (name == "safe" || name == "e" || name == "escape" || name == "forceescape") {
    if (name != "safe") fail(line, "autoescaping filters are not supported (the chat environment does not escape)");
    return v;
  }
  if (name == "tojson") {
    const V indent = arg(args, kw, 0, "indent");
    Text t;
    append_json(t, v, indent.is(V::K::kInt) ? static_cast<int>(indent.i) : -1, 0, line);
    return V::str(std::move(t));
  }
  if (name == "join") {
    need_defined();
    const V sep = arg(args, kw, 0, "d", V::lit(""));
    const V attr = arg(args, kw, 1, "attribute");
    Text out;
    const VList items = iterate(v, line);
    for (size_t i = 0; i < items.size(); ++i) {
      if (i) out.append(to_text(sep));
      out.append(to_text(attr.is(V::K::kNone) ? items[i] : attribute_path(items[i], attr, line)));
    }
    return V::str(std::move(out));
  }
  if (name == "first" || name == "last") {
    need_defined();
    const VList items = iterate(v, line);
    if (items.empty()) return V::undef(fmt::format("'{}' of an empty sequence", name));
    return name == "first" ? items.front() : items.back();
  }
  if (name == "items") {
    if (v.is(V::K::kUndef)) return V::list();
    if (!v.is(V::K::kDict)) fail(line, fmt::format("items needs a dict, not {}", type_name(v)));
    return items_of(v);
  }
  if (name == "list") {
    need_defined();
    return V::list(iterate(v, line));
  }
  if (name == "reverse") {
    need_defined();
    VList items = iterate(v, line);
    std::reverse(items.begin(), items.end());
    if (!v.is(V::K::kStr)) return V::list(std::move(items));
    Text t;
    for (const V& x : items) t.append(x.s);
    return V::str(std::move(t));
  }
  if (name == "replace") {
    return V::str(replace_text(to_text(v), to_text(arg(args, kw, 0, "old")), to_text(arg(args, kw, 1, "new")),
                               as_int(arg(args, kw, 2, "count", V::integer(-1)))));
  }
  if (name == "int") {
    if (v.number()) return V::integer(v.is(V::K::kFloat) ? static_cast<int64_t>(v.f) : as_int(v));
    if (v.is(V::K::kStr)) {
      try {
        return V::integer(std::stoll(strip_text(v.s, true, true, nullptr).s));
      } catch (...) {
        return arg(args, kw, 0, "default", V::integer(0));
      }
    }
    return arg(args, kw, 0, "default", V::integer(0));
  }
  if (name == "float") {
    if (v.number()) return V::real(as_double(v));
    if (v.is(V::K::kStr)) {
      try {
        return V::real(std::stod(v.s.s));
      } catch (...) {
      }
    }
    return arg(args, kw, 0, "default", V::real(0));
  }
  if (name == "abs") {
    need_defined();
    if (v.is(V::K::kFloat)) return V::real(std::fabs(v.f));
    if (v.number()) return V::integer(std::llabs(as_int(v)));
    fail(line, "abs needs a number");
  }
  if (name == "selectattr" || name == "rejectattr" || name == "select" || name == "reject") {
    const bool by_attr = name == "selectattr" || name == "rejectattr";
    const bool keep_if = name == "selectattr" || name == "select";
    VList out;
    const size_t first_test_arg = by_attr ? 1 : 0;
    for (const V& item : iterate(v, line)) {
      const V subject = by_attr ? attribute_path(item, arg(args, kw, 0, "attribute"), line) : item;
      bool ok;
      if (args.size() > first_test_arg) {
        std::vector<V> test_args(args.begin() + static_cast<ptrdiff_t>(first_test_arg + 1), args.end());
        ok = apply_test(c, need_str(args[first_test_arg], line, "test name").s.s, subject, test_args, line);
      } else {
        ok = truthy(subject);
      }
      if (ok == keep_if) out.push_back(item);
    }
    return V::list(std::move(out));
  }
  if (name == "map") {
    VList out;
    const V* attr = kwarg(kw, "attribute");
    for (const V& item : iterate(v, line)) {
      if (attr) {
        V x = attribute_path(item, *attr, line);
        if (x.is(V::K::kUndef)) {
          if (const V* d = kwarg(kw, "default")) x = *d;
        }
        out.push_back(std::move(x));
      } else {
        if (args.empty()) fail(line, "map needs a filter name or attribute=");
        std::vector<V> rest(args.begin() + 1, args.end());
        Kwargs none;
        out.push_back(apply_filter(c, need_str(args[0], line, "filter name").s.s, item, rest, none, line));
      }
    }
    return V::list(std::move(out));
  }
  if (name == "unique") {
    VList out;
    for (const V& item : iterate(v, line)) {
      if (std::none_of(out.begin(), out.end(), [&](const V& x) { return equal(x, item); })) out.push_back(item);
    }
    return V::list(std::move(out));
  }
  if (name == "sort") {
    VList items = iterate(v, line);
    const bool reverse = truthy(arg(args, kw, 0, "reverse", V::boolean(false)));
    const V attr = arg(args, kw, 2, "attribute");
    const auto key = [&](const V& x) { return attr.is(V::K::kNone) ? x : attribute_path(x, attr, line); };
    std::stable_sort(items.begin(), items.end(), [&](const V& a, const V& b) {
      const int r = compare(key(a), key(b), line, "<");
      return reverse ? r > 0 : r < 0;
    });
    return V::list(std::move(items));
  }
  if (name == "min" || name == "max" || name == "sum") {
    const VList items = iterate(v, line);
    if (name == "sum") {
      V acc = arg(args, kw, 1, "start", V::integer(0));
      for (const V& x : items) acc = arith("+", acc, x, line);
      return acc;
    }
    if (items.empty()) return V::undef(fmt::format("'{}' of an empty sequence", name));
    V best = items[0];
    for (const V& x : items) {
      const int r = compare(x, best, line, "<");
      if (name == "min" ? r < 0 : r > 0) best = x;
    }
    return best;
  }
  if (name == "indent") {
    const V width = arg(args, kw, 0, "width", V::integer(4));
    const bool first = truthy(arg(args, kw, 1, "first", V::boolean(false)));
    const bool blank = truthy(arg(args, kw, 2, "blank", V::boolean(false)));
    const Text pad =
        width.is(V::K::kStr) ? width.s : Text(std::string(static_cast<size_t>(as_int(width)), ' '), kLiteral);
    const Text s = to_text(v);
    Text out;
    size_t pos = 0;
    bool first_line = true;
    while (pos <= s.s.size()) {
      size_t nl = s.s.find('\n', pos);
      const size_t end = nl == std::string::npos ? s.s.size() : nl;
      const bool empty_line = end == pos;
      if ((!first_line || first) && (!empty_line || blank)) out.append(pad);
      out.append(s.sub(pos, end - pos + (nl == std::string::npos ? 0 : 1)));
      if (nl == std::string::npos) break;
      pos = nl + 1;
      first_line = false;
    }
    return V::str(std::move(out));
  }
  if (name == "format") {
    VList fargs(args.begin(), args.end());
    return V::str(percent_format(to_text(v), V::list(std::move(fargs)), line));
  }
  if (name == "dictsort") {
    need_defined();
    V pairs = items_of(v);
    std::stable_sort(pairs.l->begin(), pairs.l->end(),
                     [&](const V& a, const V& b) { return compare((*a.l)[0], (*b.l)[0], line, "<") < 0; });
    return pairs;
  }
  fail(line, fmt::format("unknown filter '{}'", name));
}

// Positional and keyword arguments of a call / filter / test node (kids after the subject).
void eval_args(Ctx& c, const Node& n, std::vector<V>& args, Kwargs& kw) {
  const size_t first = 1;
  for (size_t k = 0; k < n.n_positional; ++k) args.push_back(eval(c, *n.kids[first + k]));
  for (size_t k = 0; k < n.names.size(); ++k) {
    kw.emplace_back(n.names[k], eval(c, *n.kids[first + n.n_positional + k]));
  }
}

V call_macro(Ctx& c, const Node& m, std::vector<V>& args, Kwargs& kw, int line) {
  if (++c.depth > kMaxDepth) fail(line, fmt::format("macro '{}' recursion deeper than {}", m.name, kMaxDepth));
  if (args.size() > m.names.size()) fail(line, fmt::format("macro '{}' takes {} arguments", m.name, m.names.size()));
  Frame f;
  f.barrier = true;
  for (size_t k = 0; k < m.names.size(); ++k) {
    V v;
    if (k < args.size()) v = args[k];
    else if (const V* x = kwarg(kw, m.names[k])) v = *x;
    else if (m.kids[k]) v = eval(c, *m.kids[k]);
    else v = V::undef(fmt::format("'{}' is undefined (macro argument)", m.names[k]));
    f.vars.emplace_back(m.names[k], std::move(v));
  }
  for (const auto& [name, v] : kw) {
    if (std::find(m.names.begin(), m.names.end(), name) == m.names.end()) {
      fail(line, fmt::format("macro '{}' has no argument '{}'", m.name, name));
    }
  }
  Text saved = std::move(c.out);
  c.out = Text();
  c.frames.push_back(std::move(f));
  exec(c, m.bodies[0]);
  c.frames.pop_back();
  Text result = std::move(c.out);
  c.out = std::move(saved);
  c.jump = Ctx::Jump::kNone;
  --c.depth;
  return V::str(std::move(result));
}

V builtin_global(const std::string& name) {
  if (name == "range") {
    return V::func("range", [](Ctx&, std::vector<V>& args, Kwargs&, int line) -> V {
      int64_t start = 0, stop = 0, step = 1;
      for (const V& a : args) {
        if (!a.is(V::K::kInt)) fail(line, "range needs integers");
      }
      if (args.size() == 1) stop = args[0].i;
      else if (args.size() >= 2) {
        start = args[0].i;
        stop = args[1].i;
        if (args.size() == 3) step = args[2].i;
      } else {
        fail(line, "range needs 1 to 3 arguments");
      }
      if (step == 0) fail(line, "range step cannot be zero");
      VList out;
      for (int64_t x = start; step > 0 ? x < stop : x > stop; x += step) {
        out.push_back(V::integer(x));
        if (out.size() > 100000) fail(line, "range longer than 100000");
      }
      return V::list(std::move(out));
    });
  }
  if (name == "namespace" || name == "dict") {
    const bool ns = name == "namespace";
    return V::func(name, [ns](Ctx&, std::vector<V>& args, Kwargs& kw, int line) -> V {
      V d = V::dict();
      d.d->is_namespace = ns;
      for (const V& a : args) {
        if (!a.is(V::K::kDict)) fail(line, "namespace()/dict() takes a dict or keyword arguments");
        for (const auto& [k, v] : a.d->items) d.d->set(k, v);
      }
      for (const auto& [k, v] : kw) d.d->set(k, v);
      return d;
    });
  }
  if (name == "raise_exception") {
    return V::func(name, [](Ctx&, std::vector<V>& args, Kwargs&, int line) -> V {
      fail(line, "raise_exception: " + (args.empty() ? std::string() : to_text(args[0]).s));
    });
  }
  if (name == "strftime_now") {
    return V::func(name, [](Ctx&, std::vector<V>& args, Kwargs&, int line) -> V {
      if (args.empty() || !args[0].is(V::K::kStr)) fail(line, "strftime_now needs a format string");
      const std::time_t now = std::time(nullptr);
      std::tm tm{};
      localtime_r(&now, &tm);
      char buf[256];
      const size_t n = std::strftime(buf, sizeof(buf), args[0].s.s.c_str(), &tm);
      return V::lit(std::string_view(buf, n));
    });
  }
  return V::undef(fmt::format("'{}' is undefined", name));
}

V eval(Ctx& c, const Node& n) {
  switch (n.kind) {
    case Node::K::kConst: return n.value;
    case Node::K::kName: {
      if (const V* v = find_var(c, n.name)) return *v;
      return builtin_global(n.name);
    }
    case Node::K::kAttr: return get_attr(eval(c, *n.kids[0]), n.name, n.line);
    case Node::K::kItem: return get_item(eval(c, *n.kids[0]), eval(c, *n.kids[1]), n.line);
    case Node::K::kSlice: {
      const V obj = eval(c, *n.kids[0]);
      V parts[3];
      for (int k = 0; k < 3; ++k) {
        if (n.kids[static_cast<size_t>(k) + 1]) parts[k] = eval(c, *n.kids[static_cast<size_t>(k) + 1]);
      }
      if (obj.is(V::K::kUndef)) fail_undefined(n.line, obj);
      if (obj.is(V::K::kList)) {
        VList out;
        for (size_t i : slice_indices(static_cast<int64_t>(obj.l->size()), parts[0], parts[1], parts[2], n.line)) {
          out.push_back((*obj.l)[i]);
        }
        return V::list(std::move(out));
      }
      if (obj.is(V::K::kStr)) {
        const std::vector<size_t> cps = code_points(obj.s.s);
        Text out;
        for (size_t i : slice_indices(static_cast<int64_t>(cps.size() - 1), parts[0], parts[1], parts[2], n.line)) {
          out.append(obj.s.sub(cps[i], cps[i + 1] - cps[i]));
        }
        return V::str(std::move(out));
      }
      fail(n.line, fmt::format("{} cannot be sliced", type_name(obj)));
    }
    case Node::K::kCall: {
      const V fn = eval(c, *n.kids[0]);
      std::vector<V> args;
      Kwargs kw;
      eval_args(c, n, args, kw);
      if (fn.is(V::K::kUndef)) fail_undefined(n.line, fn);
      if (!fn.is(V::K::kFunc)) fail(n.line, fmt::format("{} is not callable", type_name(fn)));
      return (*fn.fn)(c, args, kw, n.line);
    }
    case Node::K::kFilter: {
      const V v = eval(c, *n.kids[0]);
      std::vector<V> args;
      Kwargs kw;
      eval_args(c, n, args, kw);
      return apply_filter(c, n.name, v, args, kw, n.line);
    }
    case Node::K::kTest: {
      const V v = eval(c, *n.kids[0]);
      std::vector<V> args;
      Kwargs kw;
      eval_args(c, n, args, kw);
      return V::boolean(apply_test(c, n.name, v, args, n.line) != n.negated);
    }
    case Node::K::kNeg: {
      const V v = eval(c, *n.kids[0]);
      if (v.is(V::K::kUndef)) fail_undefined(n.line, v);
      if (v.is(V::K::kFloat)) return V::real(-v.f);
      if (v.number()) return V::integer(-as_int(v));
      fail(n.line, fmt::format("bad operand type for unary -: {}", type_name(v)));
    }
    case Node::K::kBinary: return arith(n.name, eval(c, *n.kids[0]), eval(c, *n.kids[1]), n.line);
    case Node::K::kCompare: {
      V left = eval(c, *n.kids[0]);
      for (size_t k = 0; k < n.ops.size(); ++k) {
        V right = eval(c, *n.kids[k + 1]);
        const std::string& op = n.ops[k];
        bool ok;
        if (op == "==") ok = equal(left, right);
        else if (op == "!=") ok = !equal(left, right);
        else if (op == "in") ok = contains(right, left, n.line);
        else if (op == "not in") ok = !contains(right, left, n.line);
        else {
          const int r = compare(left, right, n.line, op);
          ok = op == "<" ? r < 0 : op == "<=" ? r <= 0 : op == ">" ? r > 0 : r >= 0;
        }
        if (!ok) return V::boolean(false);
        left = std::move(right);
      }
      return V::boolean(true);
    }
    case Node::K::kAnd: {
      V a = eval(c, *n.kids[0]);
      return truthy(a) ? eval(c, *n.kids[1]) : a;
    }
    case Node::K::kOr: {
      V a = eval(c, *n.kids[0]);
      return truthy(a) ? a : eval(c, *n.kids[1]);
    }
    case Node::K::kNot: return V::boolean(!truthy(eval(c, *n.kids[0])));
    case Node::K::kCond:
      if (truthy(eval(c, *n.kids[0]))) return eval(c, *n.kids[1]);
      return n.kids[2] ? eval(c, *n.kids[2]) : V::undef("the conditional expression has no else");
    case Node::K::kList: {
      VList out;
      for (const auto& k : n.kids) out.push_back(eval(c, *k));
      return V::list(std::move(out));
    }
    case Node::K::kDict: {
      V d = V::dict();
      for (size_t k = 0; k + 1 < n.kids.size(); k += 2) {
        const V key = eval(c, *n.kids[k]);
        if (!key.is(V::K::kStr)) fail(n.line, "dict literal keys must be strings");
        d.d->set(key.s.s, eval(c, *n.kids[k + 1]));
      }
      return d;
    }
    default: fail(n.line, "internal: statement evaluated as an expression");
  }
}

void assign_targets(Ctx& c, const std::vector<std::string>& targets, const V& v, int line) {
  if (targets.size() == 1) {
    set_var(c, targets[0], v);
    return;
  }
  const VList items = iterate(v, line);
  if (items.size() != targets.size()) {
    fail(line, fmt::format("cannot unpack {} values into {} names", items.size(), targets.size()));
  }
  for (size_t k = 0; k < targets.size(); ++k) set_var(c, targets[k], items[k]);
}

void exec(Ctx& c, const Body& body) {
  for (const NodeP& np : body) {
    const Node& n = *np;
    switch (n.kind) {
      case Node::K::kText: c.out.append(n.value.s); break;
      case Node::K::kOutput: c.out.append(to_text(eval(c, *n.kids[0]))); break;
      case Node::K::kIf: {
        size_t k = 0;
        for (; k < n.kids.size(); ++k) {
          if (truthy(eval(c, *n.kids[k]))) break;
        }
        if (k < n.bodies.size()) exec(c, n.bodies[k]);
        break;
      }
      case Node::K::kFor: {
        const V seq = eval(c, *n.kids[0]);
        if (seq.is(V::K::kUndef)) fail_undefined(n.line, seq);
        VList items = iterate(seq, n.line);
        if (n.kids.size() > 1) {
          // `for x in xs if cond`: filtered before the loop, so loop.length counts what remains.
          VList kept;
          for (const V& item : items) {
            c.frames.emplace_back();
            assign_targets(c, n.names, item, n.line);
            const bool keep = truthy(eval(c, *n.kids[1]));
            c.frames.pop_back();
            if (keep) kept.push_back(item);
          }
          items = std::move(kept);
        }
        const auto len = static_cast<int64_t>(items.size());
        for (int64_t i = 0; i < len; ++i) {
          c.frames.emplace_back();
          V loop = V::dict();
          loop.d->set("index", V::integer(i + 1));
          loop.d->set("index0", V::integer(i));
          loop.d->set("revindex", V::integer(len - i));
          loop.d->set("revindex0", V::integer(len - i - 1));
          loop.d->set("first", V::boolean(i == 0));
          loop.d->set("last", V::boolean(i == len - 1));
          loop.d->set("length", V::integer(len));
          loop.d->set("depth", V::integer(1));
          loop.d->set("depth0", V::integer(0));
          loop.d->set("previtem", i > 0 ? items[static_cast<size_t>(i - 1)] : V::undef("there is no previous item"));
          loop.d->set("nextitem", i + 1 < len ? items[static_cast<size_t>(i + 1)] : V::undef("there is no next item"));
          loop.d->set("cycle", V::func("loop.cycle", [i](Ctx&, std::vector<V>& args, Kwargs&, int line) -> V {
                        if (args.empty()) fail(line, "loop.cycle needs arguments");
                        return args[static_cast<size_t>(i) % args.size()];
                      }));
          set_var(c, "loop", loop);
          assign_targets(c, n.names, items[static_cast<size_t>(i)], n.line);
          exec(c, n.bodies[0]);
          c.frames.pop_back();
          const Ctx::Jump j = c.jump;
          c.jump = Ctx::Jump::kNone;
          if (j == Ctx::Jump::kBreak) break;
        }
        if (len == 0) exec(c, n.bodies[1]);
        break;
      }
      case Node::K::kSet: assign_targets(c, n.names, eval(c, *n.kids[0]), n.line); break;
      case Node::K::kSetAttr: {
        const V* ns = find_var(c, n.names[0]);
        if (ns == nullptr) fail(n.line, fmt::format("'{}' is undefined", n.names[0]));
        if (!ns->is(V::K::kDict) || !ns->d->is_namespace) {
          fail(n.line, fmt::format("cannot assign attribute on non-namespace object '{}'", n.names[0]));
        }
        ns->d->set(n.names[1], eval(c, *n.kids[0]));
        break;
      }
      case Node::K::kSetBlock:
      case Node::K::kFilterBlock: {
        Text saved = std::move(c.out);
        c.out = Text();
        exec(c, n.bodies[0]);
        V v = V::str(std::move(c.out));
        c.out = std::move(saved);
        for (const NodeP& f : n.kids) {
          std::vector<V> args;
          Kwargs kw;
          eval_args(c, *f, args, kw);
          v = apply_filter(c, f->name, v, args, kw, f->line);
        }
        if (n.kind == Node::K::kSetBlock) set_var(c, n.names[0], v);
        else c.out.append(to_text(v));
        break;
      }
      case Node::K::kMacro: {
        const Node* m = &n;
        set_var(c, n.name, V::func(n.name, [m](Ctx& cc, std::vector<V>& args, Kwargs& kw, int line) {
                  return call_macro(cc, *m, args, kw, line);
                }));
        break;
      }
      case Node::K::kBreak: c.jump = Ctx::Jump::kBreak; return;
      case Node::K::kContinue: c.jump = Ctx::Jump::kContinue; return;
      case Node::K::kBodyBlock: exec(c, n.bodies[0]); break;
      default: fail(n.line, "internal: expression executed as a statement");
    }
    if (c.jump != Ctx::Jump::kNone) return;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------

struct ValueData {
  V v;
};

Value::Value() : data_(std::make_shared<ValueData>()) {}
Value Value::none() { return Value(); }
Value Value::boolean(bool b) {
  Value v;
  v.data_->v = V::boolean(b);
  return v;
}
Value Value::integer(int64_t i) {
  Value v;
  v.data_->v = V::integer(i);
  return v;
}
Value Value::string(std::string_view s, int32_t origin) {
  Value v;
  v.data_->v = V::str(Text(s, origin));
  return v;
}
Value Value::list() {
  Value v;
  v.data_->v = V::list();
  return v;
}
Value Value::dict() {
  Value v;
  v.data_->v = V::dict();
  return v;
}
void Value::push_back(Value x) {
  if (data_->v.is(V::K::kList)) data_->v.l->push_back(x.data_->v);
}
void Value::set(std::string_view key, Value x) {
  if (data_->v.is(V::K::kDict)) data_->v.d->set(key, x.data_->v);
}

struct Template::Program {
  Body body;
};

Result<Template> Template::parse(std::string_view source, bool trim_blocks, bool lstrip_blocks) {
  try {
    auto program = std::make_shared<Program>();
    Parser parser(lex(source, trim_blocks, lstrip_blocks));
    program->body = parser.parse_all();
    return Template(std::move(program));
  } catch (const Error& e) {
    return invalid_argument("chat template syntax error at line {}: {}", e.line, e.message);
  }
}

Result<std::vector<Segment>> Template::render(const Value& context) const {
  if (!context.data_->v.is(V::K::kDict)) return invalid_argument("the template context must be a dict");
  Ctx c;
  c.globals = &context.data_->v;
  c.frames.emplace_back();
  try {
    exec(c, program_->body);
  } catch (const Error& e) {
    return invalid_argument("chat template error at line {}: {}", e.line, e.message);
  }
  std::vector<Segment> out;
  for (size_t i = 0; i < c.out.s.size();) {
    size_t j = i;
    while (j < c.out.s.size() && c.out.o[j] == c.out.o[i]) ++j;
    out.push_back({c.out.s.substr(i, j - i), c.out.o[i]});
    i = j;
  }
  return out;
}

std::string join_segments(const std::vector<Segment>& segments) {
  std::string out;
  for (const Segment& s : segments) out += s.text;
  return out;
}

}  // namespace starserve::jinja
