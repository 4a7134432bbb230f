// A Jinja2 template engine for chat templates (the language of GGUF tokenizer.chat_template and of
// tokenizer_config.json / chat_template.jinja), rendering as Hugging Face's apply_chat_template does: a sandboxed
// environment with trim_blocks and lstrip_blocks on, autoescape off, the loopcontrols extension (break, continue),
// raise_exception(msg) and strftime_now(fmt) as globals and a tojson that does not HTML-escape.
//
// Provenance: every byte of a string value carries an origin, kLiteral for text written by the template itself
// (its literals, and numbers or booleans it prints) and the caller's tag for data it passes in (a message's
// content). The origin follows the bytes through concatenation, slicing, trim, replace, case changes, join, split
// and tojson, so the rendering is a sequence of segments saying where each byte came from; the chat code parses
// control tokens only in kLiteral segments (model/chat_prompt.h). Where a result cannot be traced byte by byte it is
// marked data (the safe side: data is tokenized as plain text).
//
// Covered: {{ }} {% %} {# #}, '-' and '+' whitespace control; if/elif/else, for (tuple targets, `if` filter,
// else, loop.index/index0/revindex/revindex0/first/last/length/previtem/nextitem), break/continue, set (also
// ns.attr and tuple targets; block set), macro with defaults and call, filter blocks, generation blocks (rendered
// as their body); Python-like values (none, bool, int, float, str, list, dict), operators with Jinja's
// precedence (or and not, in / not in, comparison chains, ~ + - * / // % **, unary -), conditional expressions,
// subscripts and slices of strings (by code point) and lists, attribute and method calls (str: startswith,
// endswith, strip/lstrip/rstrip, split, upper, lower, title, capitalize, replace, find, count, join, format;
// dict: get, items, keys, values), the common filters and tests (listed at apply_filter / apply_test in jinja.cpp),
// globals range, namespace, dict, raise_exception, strftime_now.
// Not covered: template inheritance and includes, autoescape, call blocks, recursive loops, i18n; case mappings
// change ASCII letters only; '%' formatting knows %s %d %i %r; of Python's line ends only \r\n and \r become \n.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/status.h"

namespace starserve::jinja {

constexpr int32_t kLiteral = -1;  // origin of bytes the template wrote itself
constexpr int32_t kData = -2;     // origin of data without a more specific tag

// A run of the rendering with one origin.
struct Segment {
  std::string text;
  int32_t origin = kLiteral;
};

struct ValueData;  // jinja.cpp

// A value passed into a template: built by the caller from these factories.
class Value {
 public:
  Value();  // none
  static Value none();
  static Value boolean(bool b);
  static Value integer(int64_t i);
  static Value string(std::string_view s, int32_t origin);  // every byte with `origin`
  static Value list();
  static Value dict();
  // list: appends; dict: sets key (insertion order kept, as Python dicts).
  void push_back(Value v);
  void set(std::string_view key, Value v);

  std::shared_ptr<ValueData> data_;
};

class Template {
 public:
  // trim_blocks / lstrip_blocks default to Hugging Face's settings. A syntax error is kInvalidArgument with the
  // template line.
  static Result<Template> parse(std::string_view source, bool trim_blocks = true, bool lstrip_blocks = true);

  // `context` is a dict of the template's variables. Errors (raise_exception, an undefined value used in an
  // operation, a type error) are kInvalidArgument with the template line. Adjacent segments have different origins.
  Result<std::vector<Segment>> render(const Value& context) const;

  struct Program;  // jinja.cpp

 private:
  explicit Template(std::shared_ptr<const Program> program) : program_(std::move(program)) {}
  std::shared_ptr<const Program> program_;
};

// The segments' text concatenated.
std::string join_segments(const std::vector<Segment>& segments);

}  // namespace starserve::jinja
