"""A small interpreter of Go's text/template language over JSON values.

Templates are written by namespace tenants and run inside a daemon that holds the Vault
token of every pod on the node, so this is deliberately not a general engine:

- It only ever sees JSON values (maps with string keys, lists, strings, numbers, booleans,
  null). A field is a map key; there is no attribute, method or import to reach, and the
  only functions are the ones in ``FUNCTIONS``, each written here.
- Every evaluation step, every byte of output and every intermediate string is counted:
  ``Limits`` bounds them and the wall time, so a hostile template (a huge ``range``, a
  string doubled in a loop) fails its own render and nothing else. There is no
  ``define``/``template``/``block``, hence no recursion; nesting is bounded at parse time.
- A missing key is an error naming the key, never an empty string (Go's
  ``missingkey=error``). Errors name the template line and never include a value.

Syntax is Go's: ``{{ .a.b }}``, ``$`` and variables (``:=``, ``=``), pipelines with ``|``,
parentheses, ``if``/``else if``/``else``, ``range`` (lists, maps in key order, integers;
``$i, $v :=``; ``break``/``continue``), ``with``/``else with``, trim markers ``{{-``
``-}}`` and comments ``{{/* */}}``. Output: a string as itself, anything else as JSON.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, NamedTuple

from provider import gojson

# Parsing bounds. A template is one field of one object: 64 KiB is pages of text.
MAX_TEMPLATE_BYTES = 64 * 1024
# Nested control structures and parentheses; real templates use a handful.
MAX_NESTING = 50
# Tokens and text pieces of one template: a 100-line .env is about 600; parsing costs about
# 10 microseconds each, so this bounds a parse to about 0.1 s (and the ParseGate bounds how
# many run at once).
MAX_TOKENS = 10_000
# ... and of all the templates of one class together.
MAX_CLASS_TOKENS = 20_000
# Work on data is charged by size: a function touching N bytes costs N / BYTES_PER_STEP
# steps more, so one call on a megabyte string is not one step.
BYTES_PER_STEP = 64
# Digits of an integer the functions accept (Python refuses to convert past 4300).
MAX_DIGITS = 30


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What one render may cost. Defaults: far above any real template (a few hundred
    steps, a few KiB), far below what would hurt the node."""

    # Nodes evaluated, loop iterations, function calls, and a step per 64 bytes a function
    # reads or builds: about 0.05-0.15 s, so this deterministic limit (remembered against
    # the class) comes before the CPU-time one (not remembered: it depends on the machine).
    steps: int = 50_000
    output_bytes: int = 1024 * 1024  # the rendered file
    value_bytes: int = 1024 * 1024  # any string a function builds
    # CPU time of the rendering thread (waiting for the GIL is not the template's): a
    # backstop, above what the steps allow on a slow machine.
    seconds: float = 0.5
    # Called once when a render passes `light_steps` (it may block, or raise TemplateError):
    # how a caller makes heavy renders take turns. The time limit counts from its return.
    light_steps: int = 0
    on_heavy: Callable[[], None] | None = field(default=None, compare=False)


class TemplateError(Exception):
    """A template that does not parse or cannot render; the message names the line.
    `over_limit` marks a render stopped by its Limits (not by its data or syntax)."""

    def __init__(self, message: str, line: int = 0, *, over_limit: bool = False) -> None:
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line
        self.over_limit = over_limit


# --- Lexing -------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<char>'(?:[^'\\\n]|\\.)+')
  | (?P<declare>:=)
  | (?P<punct>[|(),=])
  | (?P<variable>\$[A-Za-z0-9_]*)
  | (?P<field>\.[A-Za-z_][A-Za-z0-9_]*)
  | (?P<dot>\.)
  | (?P<number>[-+]?(?:0[xX][0-9a-fA-F_]+|[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?|\.[0-9]+(?:[eE][-+]?[0-9]+)?))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    """,
    re.VERBOSE,
)
_TRIM_SPACE = " \t\r\n"


class _Token(NamedTuple):  # a tuple: thousands are made per parse, frozen dataclasses cost more
    kind: str
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class _Action:
    tokens: tuple[_Token, ...]
    line: int


def _lex(source: str, max_tokens: int = MAX_TOKENS) -> list[str | _Action]:
    """Text pieces and actions, trim markers applied, comments dropped."""
    items: list[str | _Action] = []
    budget = [max_tokens]
    pos = 0
    trim_next = False
    line, counted = 1, 0
    while True:
        start = source.find("{{", pos)
        text = source[pos:] if start < 0 else source[pos:start]
        if trim_next:
            text = text.lstrip(_TRIM_SPACE)
        if start < 0:
            if text:
                items.append(text)
            return items
        line += source.count("\n", counted, start)
        counted = start
        inner_start = start + 2
        if source.startswith("-", inner_start) and source[inner_start + 1 : inner_start + 2] in tuple(_TRIM_SPACE):
            text = text.rstrip(_TRIM_SPACE)
            inner_start += 2
        if text:
            items.append(text)
        close, inner_end, trim_next = _find_close(source, inner_start, line)
        inner = source[inner_start:inner_end]
        pos = close
        stripped = inner.strip(_TRIM_SPACE)
        if stripped.startswith("/*"):
            if not stripped.endswith("*/"):
                raise TemplateError("unclosed comment", line)
            continue
        tokens = _tokens(inner, line, budget)
        if not tokens:
            raise TemplateError("missing value for command", line)
        items.append(_Action(tokens, line))


def _find_close(source: str, pos: int, line: int) -> tuple[int, int, bool]:
    """Where the action ends: (index after "}}", end of its inside, whether it trims)."""
    quote = ""
    i = pos
    n = len(source)
    while i < n:
        ch = source[i]
        if quote:
            if ch == "\\" and quote != "`":
                i += 2
                continue
            if ch == quote:
                quote = ""
            elif ch == "\n" and quote != "`":
                raise TemplateError("unterminated quoted string", line)
        elif ch in "\"'`":
            quote = ch
        elif source.startswith("/*", i):
            end = source.find("*/", i + 2)
            if end < 0:
                raise TemplateError("unclosed comment", line)
            i = end + 2
            continue
        elif source.startswith("}}", i):
            if i - 2 >= pos and source[i - 1] == "-" and source[i - 2] in _TRIM_SPACE:
                return i + 2, i - 1, True
            return i + 2, i, False
        i += 1
    raise TemplateError("unterminated quoted string" if quote else "unclosed action (no matching }})", line)


def _tokens(inner: str, line: int, budget: list[int]) -> tuple[_Token, ...]:
    tokens: list[_Token] = []
    pos = 0
    budget[0] -= 1  # the text before the action
    for match in _TOKEN.finditer(inner):  # matches must follow one another: a gap is a stray character
        start, end = match.span()
        if start != pos:
            break
        kind = match.lastgroup or ""
        if kind == "number" and end < len(inner) and (inner[end].isalnum() or inner[end] == "_"):
            raise TemplateError(f"bad number syntax: {inner[start : end + 1]!r}", line)
        if kind != "space":
            budget[0] -= 1
            if budget[0] < 0:
                raise TemplateError(
                    f"the template has more than {MAX_TOKENS} tokens (or the class's templates together)", line
                )
            tokens.append(_Token(kind, match.group(), start, end))
        pos = end
    if pos < len(inner):
        raise TemplateError(f"unexpected {inner[pos]!r} in action", line)
    return tuple(tokens)


# --- The tree -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Literal:
    value: Any


@dataclass(frozen=True)
class _Dot:
    pass


@dataclass(frozen=True)
class _Variable:
    name: str


@dataclass(frozen=True)
class _Function:
    name: str


@dataclass(frozen=True)
class _Chain:
    """A term followed by field names: .a.b (on dot), $x.a, (pipeline).a"""

    base: Any
    fields: tuple[str, ...]


@dataclass(frozen=True)
class _Pipeline:
    declared: tuple[str, ...]
    assign: bool  # "=" rather than ":="
    commands: tuple[tuple[Any, ...], ...]
    line: int


@dataclass(frozen=True)
class _Text:
    text: str


@dataclass(frozen=True)
class _Output:
    pipeline: _Pipeline


@dataclass(frozen=True)
class _Branch:
    """if / else if ... / else, with / else with ... / else, or range / else: the first
    arm whose pipeline is true runs (range has one arm, run per item), else `otherwise`."""

    kind: str  # if, with, range
    arms: tuple[tuple[_Pipeline, tuple[Any, ...]], ...]
    otherwise: tuple[Any, ...]


@dataclass(frozen=True)
class _Jump:
    kind: str  # break, continue
    line: int


class _Parser:
    def __init__(self, items: list[str | _Action]) -> None:
        self._items = items
        self._pos = 0
        self._depth = 0
        self._loops = 0

    def parse(self) -> tuple[Any, ...]:
        body, stop = self._list()
        if stop is not None:
            raise TemplateError(f"unexpected {{{{{stop[0]}}}}}", stop[1].line)
        return body

    def _list(self) -> tuple[tuple[Any, ...], tuple[str, _Action] | None]:
        """Nodes up to an {{end}} or {{else}} (returned, not consumed past)."""
        nodes: list[Any] = []
        while self._pos < len(self._items):
            item = self._items[self._pos]
            self._pos += 1
            if isinstance(item, str):
                nodes.append(_Text(item))
                continue
            first = item.tokens[0]
            word = first.text if first.kind == "ident" else ""
            if word in ("end", "else"):
                return tuple(nodes), (word, item)
            if word in ("if", "with", "range"):
                nodes.append(self._branch(word, item, item.tokens[1:]))
            elif word in ("break", "continue"):
                if len(item.tokens) > 1:
                    raise TemplateError(f"unexpected {item.tokens[1].text!r} after {word}", item.line)
                if not self._loops:
                    raise TemplateError(f"{{{{{word}}}}} outside {{{{range}}}}", item.line)
                nodes.append(_Jump(word, item.line))
            elif word in ("define", "template", "block"):
                raise TemplateError(f"{{{{{word}}}}} is not supported (one template per object)", item.line)
            else:
                nodes.append(_Output(self._action_pipeline(item.tokens, item.line)))
        return tuple(nodes), None

    def _branch(self, kind: str, action: _Action, tokens: Sequence[_Token]) -> _Branch:
        self._depth += 1
        if self._depth > MAX_NESTING:
            raise TemplateError(f"control structures nested deeper than {MAX_NESTING}", action.line)
        arms: list[tuple[_Pipeline, tuple[Any, ...]]] = []
        otherwise: tuple[Any, ...] = ()
        line = action.line
        while True:  # one arm per {{else if}} / {{else with}}: a chain is not nesting
            if not tokens:
                raise TemplateError(f"missing value for {kind}", line)
            pipeline = self._action_pipeline(tokens, line, pair=kind == "range")
            self._loops += kind == "range"
            body, stop = self._list()
            self._loops -= kind == "range"
            if stop is None:
                raise TemplateError(f"unexpected end of template: {{{{{kind}}}}} has no {{{{end}}}}", action.line)
            arms.append((pipeline, body))
            if stop[0] != "else":
                break
            rest = stop[1].tokens[1:]
            if rest and rest[0].kind == "ident" and rest[0].text in ("if", "with"):
                if rest[0].text != kind or kind == "range":
                    raise TemplateError(f"{{{{else {rest[0].text}}}}} inside {{{{{kind}}}}}", stop[1].line)
                tokens, line = rest[1:], stop[1].line
                continue
            if rest:
                raise TemplateError(f"unexpected {rest[0].text!r} after else", stop[1].line)
            otherwise, stop = self._list()
            if stop is not None and stop[0] == "else":
                raise TemplateError(f"unexpected {{{{else}}}}: this {{{{{kind}}}}} already has one", stop[1].line)
            if stop is None:
                raise TemplateError(f"{{{{{kind}}}}} has no {{{{end}}}} after its {{{{else}}}}", action.line)
            break
        if len(stop[1].tokens) > 1:
            raise TemplateError(f"unexpected {stop[1].tokens[1].text!r} after end", stop[1].line)
        self._depth -= 1
        return _Branch(kind, tuple(arms), otherwise)

    def _action_pipeline(self, tokens: Sequence[_Token], line: int, *, pair: bool = False) -> _Pipeline:
        """The pipeline of one action, its parentheses matched in one pass."""
        self._close: dict[int, int] = {}
        opened: list[int] = []
        for index, token in enumerate(tokens):
            if token.kind == "punct" and token.text == "(":
                opened.append(index)
            elif token.kind == "punct" and token.text == ")":
                if not opened:
                    raise TemplateError("unexpected right paren", line)
                self._close[opened.pop()] = index
        if opened:
            raise TemplateError("unclosed left paren", line)
        return self._pipeline(tokens, 0, len(tokens), line, declare=True, pair=pair)

    def _pipeline(
        self, tokens: Sequence[_Token], start: int, end: int, line: int, *, declare: bool, pair: bool = False
    ) -> _Pipeline:
        declared: list[str] = []
        assign = False
        if declare:
            for operator in (":=", "="):
                names = _declaration(tokens, start, end, operator, pair)
                if names:
                    declared, assign = names, operator == "="
                    start += len(names) * 2
                    break
        commands: list[tuple[Any, ...]] = []
        command: list[Any] = []
        i = start
        while i < end:
            token = tokens[i]
            if token.text == "|" and token.kind == "punct":
                if not command:
                    raise TemplateError("missing command before '|'", line)
                commands.append(tuple(command))
                command = []
                i += 1
                continue
            operand, i = self._operand(tokens, i, end, line)
            command.append(operand)
        if not command:
            raise TemplateError("missing command" + (" after '|'" if commands else ""), line)
        commands.append(tuple(command))
        return _Pipeline(tuple(declared), assign, tuple(commands), line)

    def _operand(self, tokens: Sequence[_Token], i: int, end: int, line: int) -> tuple[Any, int]:
        token = tokens[i]
        kind = token.kind
        if kind == "punct" and token.text == "(":
            self._depth += 1
            if self._depth > MAX_NESTING:
                raise TemplateError(f"parentheses nested deeper than {MAX_NESTING}", line)
            close = self._close[i]
            term: Any = self._pipeline(tokens, i + 1, close, line, declare=False)
            self._depth -= 1
            i = close + 1
        elif kind == "field":
            term = _Dot()  # .a.b: fields of dot, read below
        elif kind == "dot":
            term, i = _Dot(), i + 1
        elif kind == "variable":
            term, i = _Variable(token.text), i + 1
        elif kind in ("string", "raw", "char", "number"):
            term, i = _Literal(_literal(token, line)), i + 1
        elif kind == "ident":
            if token.text in ("true", "false"):
                term = _Literal(token.text == "true")
            elif token.text == "nil":
                term = _Literal(None)
            elif token.text in FUNCTIONS or token.text in _LAZY:
                term = _Function(token.text)
            else:
                raise TemplateError(f"function {token.text!r} not defined (see the allowed functions)", line)
            i += 1
        else:
            raise TemplateError(f"unexpected {token.text!r} in command", line)
        fields: list[str] = []
        if kind == "field":
            fields.append(token.text[1:])
            i += 1
        previous_end = tokens[i - 1].end
        # Fields bind to the term they touch: $x.a and (f).a, but $x .a is two operands.
        while i < end and tokens[i].kind == "field" and tokens[i].start == previous_end:
            if isinstance(term, _Function | _Literal):
                raise TemplateError(f"cannot take a field of {tokens[i - 1].text!r}", line)
            fields.append(tokens[i].text[1:])
            previous_end = tokens[i].end
            i += 1
        return (_Chain(term, tuple(fields)) if fields else term), i


def _declaration(tokens: Sequence[_Token], start: int, end: int, operator: str, pair: bool) -> list[str]:
    """The variables before := or = at the start of a pipeline, if any."""
    if end - start >= 2 and tokens[start].kind == "variable" and tokens[start + 1].text == operator:
        return [tokens[start].text]
    if (
        pair
        and end - start >= 4
        and tokens[start].kind == "variable"
        and tokens[start + 1].text == ","
        and tokens[start + 2].kind == "variable"
        and tokens[start + 3].text == operator
    ):
        return [tokens[start].text, tokens[start + 2].text]
    return []


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


_INTEGER = re.compile(r"[-+]?(0[xX][0-9a-fA-F]+|[0-9]+)")
_OCTAL = re.compile(r"[-+]?0[0-9]+")


def _literal(token: _Token, line: int) -> Any:
    text = token.text
    if token.kind == "raw":
        return text[1:-1]
    if token.kind in ("string", "char"):
        value = _unescape(text[1:-1], line)
        if token.kind == "char":
            if len(value) != 1:
                raise TemplateError(f"malformed character constant {text}", line)
            return ord(value)
        return value
    digits = text.replace("_", "")
    if len(digits) > MAX_DIGITS:
        raise TemplateError(f"a number constant of more than {MAX_DIGITS} characters", line)
    try:
        if _INTEGER.fullmatch(digits):
            number = int(digits, 0) if not _OCTAL.fullmatch(digits) else int(digits, 8)
            if not -(2**63) <= number < 2**64:  # Go's constants: int64 or uint64
                raise TemplateError(f"integer constant {text} overflows 64 bits", line)
            return number
        return float(digits)
    except ValueError:
        raise TemplateError(f"bad number syntax: {text!r}", line) from None


def _unescape(body: str, line: int) -> str:
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        code = body[i + 1 : i + 2]
        if code in _ESCAPES:
            out.append(_ESCAPES[code])
            i += 2
        elif code in ("x", "u", "U"):
            width = {"x": 2, "u": 4, "U": 8}[code]
            digits = body[i + 2 : i + 2 + width]
            if len(digits) != width or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise TemplateError(f"invalid escape \\{code} in string", line)
            value = int(digits, 16)
            if value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
                raise TemplateError("escape is not a valid Unicode code point", line)
            out.append(chr(value))
            i += 2 + width
        elif code in "01234567" and code:
            digits = body[i + 1 : i + 4]
            if len(digits) != 3 or not all(c in "01234567" for c in digits):
                raise TemplateError("invalid octal escape in string", line)
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            raise TemplateError(f"unknown escape \\{code} in string", line)
    return "".join(out)


# --- Evaluating ---------------------------------------------------------------------------


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


@dataclass
class _Run:
    limits: Limits
    root: Any = None
    started: float = field(default_factory=time.thread_time)
    steps: int = 0
    size: int = 0
    out: list[str] = field(default_factory=list)
    variables: list[tuple[str, Any]] = field(default_factory=list)
    heavy: bool = False

    def step(self, line: int, count: int = 1) -> None:
        self.steps += count
        if not self.heavy and self.limits.on_heavy is not None and self.steps > self.limits.light_steps:
            self.heavy = True
            self.limits.on_heavy()
            self.started = time.thread_time()
        if self.steps > self.limits.steps:
            raise TemplateError(
                f"the template takes more than {self.limits.steps} steps; simplify it", line, over_limit=True
            )
        if self.steps & 0xFF < count:
            self.check_time(line)

    def check_time(self, line: int) -> None:
        if time.thread_time() - self.started > self.limits.seconds:
            raise TemplateError(f"the template took longer than {self.limits.seconds:g} s of CPU to render", line)

    def room(self, size: int, what: str, line: int) -> None:
        """Refuse, before building it, a string larger than the limit."""
        if size > self.limits.value_bytes:
            raise TemplateError(
                f"{what} would build a string larger than {self.limits.value_bytes} bytes", line, over_limit=True
            )

    def write(self, text: str, line: int) -> None:
        self.size += len(text.encode("utf-8", "surrogatepass")) if not text.isascii() else len(text)
        if self.size > self.limits.output_bytes:
            raise TemplateError(
                f"the rendered file is larger than {self.limits.output_bytes} bytes", line, over_limit=True
            )
        self.out.append(text)

    def lookup(self, name: str, line: int) -> Any:
        for known, value in reversed(self.variables):
            if known == name:
                return value
        raise TemplateError(f"undefined variable {name}", line)

    def assign(self, name: str, value: Any, line: int) -> None:
        for index in range(len(self.variables) - 1, -1, -1):
            if self.variables[index][0] == name:
                self.variables[index] = (name, value)
                return
        raise TemplateError(f"undefined variable {name}", line)


@dataclass(frozen=True)
class Template:
    """A parsed template; render it as often as needed (it holds no state)."""

    nodes: tuple[Any, ...]
    tokens: int = 0  # what parsing it took, for a class's token budget

    def render(self, data: Mapping[str, Any], *, limits: Limits | None = None, spent: list[int] | None = None) -> str:
        """The text; `spent`, if given, gets the steps taken (also when rendering fails)."""
        run = _Run(limits or Limits(), root=data)
        run.variables.append(("$", data))
        try:
            _walk(run, self.nodes, data)
        except (_Break, _Continue):  # the parser only allows them inside range
            raise TemplateError("break or continue outside range") from None
        except RecursionError:
            raise TemplateError("the data is nested too deeply to render") from None
        except (ValueError, ArithmeticError, UnicodeError, MemoryError, TypeError) as e:
            # Never the exception's text: it may quote a value.
            raise TemplateError(f"the template failed on a value it cannot handle ({type(e).__name__})") from None
        finally:
            if spent is not None:
                spent[0] += run.steps
        return "".join(run.out)

    def field_paths(self) -> Iterator[tuple[Any, ...]]:
        """Each field chain on the root (.a.b, $.a.b) and each `index` of one with literal
        keys, as tuples of names: what `check` looks at to find unknown object names."""
        yield from _paths(self.nodes, top=True)


def parse(source: str, *, max_tokens: int = MAX_TOKENS) -> Template:
    """Parse a template of at most MAX_TEMPLATE_BYTES and `max_tokens` tokens."""
    if len(source.encode("utf-8", "surrogatepass")) > MAX_TEMPLATE_BYTES:
        raise TemplateError(f"the template is larger than {MAX_TEMPLATE_BYTES} bytes")
    items = _lex(source, min(max_tokens, MAX_TOKENS))
    tokens = sum(len(item.tokens) + 1 if isinstance(item, _Action) else 1 for item in items)  # as _lex counts
    return Template(_Parser(items).parse(), tokens)


def _walk(run: _Run, nodes: Sequence[Any], dot: Any) -> None:
    for node in nodes:
        kind = type(node)  # exact types: the nodes are ours, and this loop is the hot path
        if kind is _Text:
            run.step(0)
            run.write(node.text, 0)
        elif kind is _Output:
            value = _pipeline(run, node.pipeline, dot)
            if not node.pipeline.declared:
                if type(value) is not str and _is_collection(value):  # JSON: sized before it is built
                    room = run.limits.output_bytes - run.size
                    size = gojson.encoded_size(value, room)
                    if size > room:
                        raise TemplateError(
                            f"the rendered file would be larger than {run.limits.output_bytes} bytes",
                            node.pipeline.line,
                            over_limit=True,
                        )
                    # Paid by what it writes, nested values and all (not by its top-level
                    # items: a map holding one list of 99,000 values was one step).
                    run.step(node.pipeline.line, size // BYTES_PER_STEP)
                run.write(_printed(value), node.pipeline.line)
                run.check_time(node.pipeline.line)  # printing is work a step count does not see
        elif kind is _Branch:
            _branch(run, node, dot)
        else:
            raise _Break() if node.kind == "break" else _Continue()


def _is_collection(value: Any) -> bool:
    kind = type(value)
    return kind is dict or kind is list or kind is tuple or (kind not in _SCALARS and isinstance(value, Mapping))


def _branch(run: _Run, node: _Branch, dot: Any) -> None:
    mark = len(run.variables)
    try:
        if node.kind == "range":
            _range(run, node, dot)
            return
        for pipeline, body in node.arms:
            value = _pipeline(run, pipeline, dot)
            if _truth(value):
                _walk(run, body, value if node.kind == "with" else dot)
                return
        _walk(run, node.otherwise, dot)
    finally:
        del run.variables[mark:]


def _range(run: _Run, node: _Branch, dot: Any) -> None:
    pipeline, body = node.arms[0]
    value = _pipeline(run, _Pipeline((), False, pipeline.commands, pipeline.line), dot)
    items: Iterator[tuple[Any, Any]]
    if isinstance(value, Mapping):
        run.step(pipeline.line, len(value) // BYTES_PER_STEP)  # the sort
        items = ((key, value[key]) for key in sorted(value))
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    elif _is_int(value):
        count = _integer(value, pipeline.line)
        if count > run.limits.steps:
            raise TemplateError(
                f"range over {count}: more than {run.limits.steps} steps", pipeline.line, over_limit=True
            )
        items = ((i, i) for i in range(max(count, 0)))
    elif value is None:
        items = iter(())
    else:
        raise TemplateError(f"range can't iterate over {_kind(value)}", pipeline.line)
    mark = len(run.variables)
    ran = False
    for key, item in items:
        ran = True
        run.step(pipeline.line)
        del run.variables[mark:]
        if len(pipeline.declared) == 2:
            run.variables += [(pipeline.declared[0], key), (pipeline.declared[1], item)]
        elif pipeline.declared:
            run.variables.append((pipeline.declared[0], item))
        try:
            _walk(run, body, item)
        except _Break:
            break
        except _Continue:
            continue
    del run.variables[mark:]
    if not ran:
        _walk(run, node.otherwise, dot)


def _pipeline(run: _Run, pipeline: _Pipeline, dot: Any) -> Any:
    value: Any = _MISSING
    for command in pipeline.commands:
        value = _command(run, command, dot, value, pipeline.line)
    if pipeline.declared:
        name = pipeline.declared[0]
        if pipeline.assign:
            run.assign(name, value, pipeline.line)
        else:
            run.variables.append((name, value))
    return value


_MISSING = object()


def _command(run: _Run, command: tuple[Any, ...], dot: Any, final: Any, line: int) -> Any:
    run.step(line)
    head = command[0]
    if isinstance(head, _Function):
        if head.name in _LAZY:
            return _LAZY[head.name](run, command[1:], dot, final, line)
        args = [_operand(run, arg, dot, line) for arg in command[1:]]
        if final is not _MISSING:
            args.append(final)
        return _call(run, head.name, args, line)
    if len(command) > 1 or final is not _MISSING:
        raise TemplateError(f"can't give an argument to a non-function {_describe(head)}", line)
    return _operand(run, head, dot, line)


def _call(run: _Run, name: str, args: list[Any], line: int) -> Any:
    """Call a function: its work charged before (by the size of what it reads, and what
    it would build, refused if too large), its time checked after."""
    run.step(line, sum(_size(arg) for arg in args) // BYTES_PER_STEP)
    estimate = _ESTIMATES.get(name)
    if estimate is not None:
        run.room(estimate(args, run.limits.value_bytes), name, line)
    try:
        result = FUNCTIONS[name](*args)
    except TemplateError as e:
        raise TemplateError(f"{name}: {e}", line, over_limit=e.over_limit) from None
    except TypeError:
        raise TemplateError(f"wrong number or kind of arguments to {name} ({len(args)})", line) from None
    except RecursionError:
        raise TemplateError(f"{name}: the value is nested too deeply", line) from None
    except (ValueError, ArithmeticError, UnicodeError) as e:  # never the text: it may quote a value
        raise TemplateError(f"{name}: a value it cannot handle ({type(e).__name__})", line) from None
    if isinstance(result, str):
        run.room(len(result), name, line)
        run.step(line, len(result) // BYTES_PER_STEP)
    run.check_time(line)
    return result


def _size(value: Any) -> int:
    """What a function may have to read of a value, cheaply: a string's length, a
    collection's item count, a number's digits."""
    if isinstance(value, str | Mapping | list | tuple):
        return len(value)
    if isinstance(value, gojson.Number):
        return len(value.text)
    return 0


def _printed_size(values: Sequence[Any], limit: int) -> int:
    """The printed size of values (a string as itself, the rest as JSON), counted without
    printing them, stopping once past limit."""
    total = 0
    for value in values:
        total += len(value) if isinstance(value, str) else gojson.encoded_size(value, limit)
        if total > limit:
            break
    return total


def _estimate_replace(args: Sequence[Any], limit: int) -> int:
    if len(args) != 3 or not all(isinstance(a, str) for a in args):
        return 0
    old, new, text = args
    count = len(text) + 1 if not old else text.count(old)
    return len(text) + count * max(0, len(new) - len(old))


def _estimate_indent(args: Sequence[Any], limit: int) -> int:
    if len(args) != 2 or not isinstance(args[1], str) or not _is_int(args[0]):
        return 0
    width = min(max(_integer(args[0]), 0), 1024)
    return len(args[1]) + (args[1].count("\n") + 2) * width


def _estimate_join(args: Sequence[Any], limit: int) -> int:
    if len(args) != 2 or not isinstance(args[0], str) or not isinstance(args[1], list | tuple):
        return 0
    return _printed_size(args[1], limit) + len(args[0]) * len(args[1])


def _estimate_printf(args: Sequence[Any], limit: int) -> int:
    if not args or not isinstance(args[0], str):
        return 0
    verbs = args[0].count("%")
    quoted = 10 if any(verb.endswith("q") for verb in _VERB.findall(args[0])) else 1  # %q escapes
    return len(args[0]) + quoted * _printed_size(args[1:], limit) + verbs * 4097


# What the functions that build strings out of their arguments would build, in bytes.
_ESTIMATES: dict[str, Callable[[Sequence[Any], int], int]] = {
    "replace": _estimate_replace,
    "indent": _estimate_indent,
    "nindent": _estimate_indent,
    "join": _estimate_join,
    "print": lambda args, limit: _printed_size(args, limit) + len(args),
    "println": lambda args, limit: _printed_size(args, limit) + len(args),
    "printf": _estimate_printf,
    "quote": lambda args, limit: 10 * _printed_size(args, limit),
    "squote": lambda args, limit: _printed_size(args, limit) + 2,
    "toJson": lambda args, limit: _printed_size(args, limit),
    "b64enc": lambda args, limit: 2 * _printed_size(args, limit),
}


def _operand(run: _Run, node: Any, dot: Any, line: int) -> Any:
    if isinstance(node, _Literal):
        return node.value
    if isinstance(node, _Dot):
        return dot
    if isinstance(node, _Variable):
        return run.lookup(node.name, line)
    if isinstance(node, _Pipeline):
        return _pipeline(run, node, dot)
    if isinstance(node, _Function):
        return _command(run, (node,), dot, _MISSING, line)
    assert isinstance(node, _Chain)
    value = _operand(run, node.base, dot, line)
    where = _describe(node.base)
    from_root = value is run.root
    for depth, name in enumerate(node.fields):
        run.step(line)
        if not isinstance(value, Mapping):
            raise TemplateError(f"can't read field {name!r} of {where}: it is {_kind(value)}, not a map", line)
        if name not in value:
            listed = _known_keys(value) if from_root and _names_keys(node.fields[:depth]) else ""
            raise TemplateError(f"no key {name!r} in {where}{listed}", line)
        value = value[name]
        where = f"{where}.{name}" if where not in (".", "$") else f"{where.rstrip('.')}.{name}"
    return value


def _describe(node: Any) -> str:
    if isinstance(node, _Dot):
        return "."
    if isinstance(node, _Variable):
        return node.name
    if isinstance(node, _Chain):
        base = _describe(node.base)
        return (base.rstrip(".") if base == "." else base) + "".join(f".{name}" for name in node.fields)
    if isinstance(node, _Function):
        return node.name
    if isinstance(node, _Pipeline):
        return "(...)"
    return "a constant"


def _names_keys(walked: tuple[str, ...]) -> bool:
    """Whether the keys of the map at this path from the root are names, safe to list in
    an error: the root's, object names, an object's parts, a secret's top-level keys.
    Deeper maps may be keyed by data (usernames, hosts), which an error must not show."""
    if len(walked) <= 1:
        return True
    return walked[0] == "Objects" and (len(walked) == 2 or (len(walked) == 3 and walked[2] in ("Secrets", "Metadata")))


def _known_keys(value: Mapping[str, Any]) -> str:
    """The keys that do exist (names only, never values), to spot a typo."""
    keys = sorted(str(key) for key in value)
    if not keys:
        return " (it is empty)"
    shown = ", ".join(keys[:10]) + (", ..." if len(keys) > 10 else "")
    return f" (keys: {shown})"


# --- Values -------------------------------------------------------------------------------


def _truth(value: Any) -> bool:
    if value is None or value is False or value is _MISSING:
        return False
    if isinstance(value, gojson.Number):
        return not value.is_zero()
    if isinstance(value, str | Mapping | list | tuple | int | float):
        return bool(value)
    return True


def _kind(value: Any) -> str:
    if value is None or value is _MISSING:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, gojson.Number | int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a map"
    if isinstance(value, list | tuple):
        return "a list"
    return "a value"


_SCALARS = (str, int, float, bool, type(None), gojson.Number)


def _printed(value: Any) -> str:
    """What {{ value }} writes: a string as itself, anything else as JSON."""
    kind = type(value)
    if kind is str:
        return value  # type: ignore[no-any-return]
    if kind is gojson.Number:
        return value.text  # type: ignore[no-any-return]
    if kind is int:
        return str(value)
    if value is _MISSING:
        return ""
    return _json(value)


def _json(value: Any) -> str:
    try:
        return gojson.dumps(value).decode("utf-8")
    except UnicodeError:
        raise TemplateError("the value is not valid UTF-8 text (decoded binary?)") from None
    except ValueError:
        raise TemplateError("a number that is not finite cannot be written as JSON") from None


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, gojson.Number) and re.fullmatch(r"-?[0-9]+", value.text) is not None


def _integer(value: Any, line: int = 0) -> int:
    if isinstance(value, bool) or not _is_int(value):
        raise TemplateError(f"expected an integer, got {_kind(value)}", line)
    if isinstance(value, gojson.Number) and len(value.text) > MAX_DIGITS:
        raise TemplateError(f"an integer of more than {MAX_DIGITS} digits", line)
    return value if isinstance(value, int) else int(value.text)


def _number(value: Any) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, gojson.Number):
        if len(value.text) > MAX_DIGITS:
            raise TemplateError(f"a number of more than {MAX_DIGITS} characters cannot be compared or formatted")
        return Decimal(value.text)
    if isinstance(value, int | float):
        return Decimal(value)
    return None


def _comparable(a: Any, b: Any) -> tuple[Any, Any]:
    first, second = _number(a), _number(b)
    if first is not None and second is not None:
        return first, second
    if (type(a) is type(b) and isinstance(a, str | bool)) or (a is None and b is None):
        return a, b
    raise TemplateError(f"incompatible types for comparison: {_kind(a)} and {_kind(b)}")


def _eq(first: Any, *others: Any) -> bool:
    if not others:
        raise TemplateError("missing argument for comparison")
    for other in others:
        a, b = _comparable(first, other)
        if a == b:
            return True
    return False


def _ordered(a: Any, b: Any) -> tuple[Any, Any]:
    a, b = _comparable(a, b)
    if isinstance(a, bool) or a is None:
        raise TemplateError(f"invalid type for comparison: {_kind(a)}")
    return a, b


def _lazy_index(run: _Run, args: Sequence[Any], dot: Any, final: Any, line: int) -> Any:
    """index X K1 K2...: a key or position that is not written in the template comes from
    data or a variable, so a miss does not show it (errors reach the pod's events)."""
    if not args:
        raise TemplateError("wrong number of arguments to index (0)", line)
    value = _operand(run, args[0], dot, line)
    keys = [(_operand(run, arg, dot, line), isinstance(arg, _Literal)) for arg in args[1:]]
    if final is not _MISSING:
        keys.append((final, False))
    for key, literal in keys:
        run.step(line)
        shown = repr(key) if literal else "(a value from the data or a variable)"
        if isinstance(value, Mapping):
            if not isinstance(key, str):
                raise TemplateError(f"index: a map key must be a string, got {_kind(key)}", line)
            if key not in value:
                raise TemplateError(f"index: no key {shown}", line)
            value = value[key]
        elif isinstance(value, list | tuple):
            position = _integer(key, line)
            if not 0 <= position < len(value):
                raise TemplateError(f"index: {shown} out of range (the list has {len(value)} items)", line)
            value = value[position]
        else:
            raise TemplateError(f"index: can't index {_kind(value)}", line)
    return value


def _len(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, Mapping | list | tuple):
        return len(value)
    raise TemplateError(f"len of {_kind(value)}")


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise TemplateError(f"expected a string, got {_kind(value)}")


def _print(*values: Any) -> str:
    # Go's fmt.Sprint: a space between operands when neither is a string.
    out: list[str] = []
    for i, value in enumerate(values):
        if i and not isinstance(value, str) and not isinstance(values[i - 1], str):
            out.append(" ")
        out.append(_printed(value))
    return "".join(out)


_VERB = re.compile(r"%(?:%|[-+# 0]*[0-9]*(?:\.[0-9]+)?[vsdqxXtfe])")


def _printf(form: Any, *values: Any) -> str:
    """Go's Sprintf for the verbs templates use: %s %v %d %q %x %X %t %f %e and %%."""
    pattern = _text(form)
    remaining = list(values)
    out: list[str] = []
    position = 0
    for match in _VERB.finditer(pattern):
        out.append(pattern[position : match.start()])
        position = match.end()
        verb = match.group()
        if verb == "%%":
            out.append("%")
            continue
        if not remaining:
            out.append(f"%!{verb[-1]}(MISSING)")
            continue
        out.append(_format(verb, remaining.pop(0)))
    out.append(pattern[position:])
    if remaining:
        out.append("%!(EXTRA " + ", ".join(_kind(v) for v in remaining) + ")")
    return "".join(out)


def _format(verb: str, value: Any) -> str:
    code, spec = verb[-1], verb[1:-1]
    if any(len(n) > 4 or int(n) > 4096 for n in re.findall(r"[0-9]+", spec)):
        raise TemplateError("a width or precision over 4096")
    flags = spec[: len(spec) - len(spec.lstrip("-+# 0"))]
    text_spec = flags.replace("0", "").replace("#", "") + spec[len(flags) :]  # Python pads text with spaces only
    if code in ("s", "v", "q"):
        text = _printed(value)
        return ("%" + text_spec + "s") % (_quote(text) if code == "q" else text)
    if code in ("d", "x", "X"):
        if code != "d" and isinstance(value, str):
            raw = value.encode("utf-8", "surrogateescape")  # b64dec's bytes, as they were
            return ("%" + spec + "s") % (raw.hex().upper() if code == "X" else raw.hex())
        return ("%" + spec + code) % _integer(value)
    if code == "t":
        return ("%" + text_spec + "s") % ("true" if value is True else "false")
    number = _number(value)
    if number is None:
        raise TemplateError(f"%{code} needs a number, got {_kind(value)}")
    return ("%" + spec + code) % float(number)


_QUOTE_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


_QUOTE_TABLE = str.maketrans({'"': '\\"', "\\": "\\\\", **_QUOTE_ESCAPES})
_NOT_PRINTABLE = re.compile(r"[^ -~]")


def _quote(value: Any) -> str:
    """Go's strconv.Quote (Sprig's quote): printable text kept, the rest escaped. In C for
    printable text (str.translate); a regex visits only the characters that are not."""
    text = _printed(value).translate(_QUOTE_TABLE)
    if not text.isprintable():
        text = _NOT_PRINTABLE.sub(_escape_unprintable, text)
    return f'"{text}"'


def _escape_unprintable(match: re.Match[str]) -> str:
    ch = match.group()
    if ch.isprintable():
        return ch
    code = ord(ch)
    if code < 0x80:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _squote(value: Any) -> str:
    return "'" + _printed(value) + "'"


def _default(fallback: Any, value: Any = _MISSING) -> Any:
    return value if _truth(value) else fallback


def _join(separator: Any, items: Any) -> str:
    if not isinstance(items, list | tuple):
        raise TemplateError(f"join needs a list, got {_kind(items)}")
    return _text(separator).join(_printed(item) for item in items)


def _indent(width: Any, text: Any) -> str:
    spaces = " " * min(_integer(width), 1024)
    return spaces + _text(text).replace("\n", "\n" + spaces)


def _b64enc(text: Any) -> str:
    return base64.b64encode(_text(text).encode("utf-8", "surrogatepass")).decode("ascii")


def _b64dec(text: Any) -> str:
    try:
        raw = base64.b64decode(_text(text), validate=True)
    except binascii.Error:
        raise TemplateError("the value is not valid base64") from None
    return raw.decode("utf-8", "surrogateescape")


def _pem_to_b64(text: Any) -> str:
    """The first PEM block's body as one line of base64 (its DER, e.g. for a JKS tool)."""
    pem = _text(text)
    begin = pem.find("-----BEGIN ")
    label_end = pem.find("-----", begin + 11) if begin >= 0 else -1
    end = pem.find(f"-----END {pem[begin + 11 : label_end]}-----", label_end) if label_end >= 0 else -1
    if end < 0:
        raise TemplateError("the value holds no PEM block")
    return "".join(pem[label_end + 5 : end].split())


def _b64_to_pem(kind: Any, text: Any) -> str:
    """base64 DER as a PEM block of the given type ("CERTIFICATE"), 64 columns."""
    label = _text(kind)
    if not re.fullmatch(r"[A-Z0-9 ]{1,64}", label):
        raise TemplateError("the PEM type must be upper-case letters, digits and spaces")
    try:
        der = base64.b64decode("".join(_text(text).split()), validate=True)
    except binascii.Error:
        raise TemplateError("the value is not valid base64") from None
    body = base64.b64encode(der).decode("ascii")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n"


def _has_key(value: Any, key: Any) -> bool:
    if not isinstance(value, Mapping):
        raise TemplateError(f"hasKey needs a map, got {_kind(value)}")
    return _text(key) in value


def _keys(value: Any) -> list[str]:
    if not isinstance(value, Mapping):
        raise TemplateError(f"keys needs a map, got {_kind(value)}")
    return sorted(value)


def _lazy_and(run: _Run, args: Sequence[Any], dot: Any, final: Any, line: int) -> Any:
    return _short_circuit(run, args, dot, final, line, stop_when=False)


def _lazy_or(run: _Run, args: Sequence[Any], dot: Any, final: Any, line: int) -> Any:
    return _short_circuit(run, args, dot, final, line, stop_when=True)


def _short_circuit(run: _Run, args: Sequence[Any], dot: Any, final: Any, line: int, *, stop_when: bool) -> Any:
    """Go's and/or: the first argument that decides, evaluated left to right, lazily."""
    if not args and final is _MISSING:
        raise TemplateError(f"wrong number of arguments to {'or' if stop_when else 'and'} (0)", line)
    value: Any = None
    for arg in args:
        run.step(line)  # each argument is evaluated and tested: `and $a $a ...` is many steps
        value = _operand(run, arg, dot, line)
        if _truth(value) is stop_when:
            return value
    if final is not _MISSING:
        value = final
    return value


_LAZY: dict[str, Callable[[_Run, Sequence[Any], Any, Any, int], Any]] = {
    "and": _lazy_and,
    "or": _lazy_or,
    "index": _lazy_index,
}

# Every function a template can call. Go's builtins, then the helpers Kubernetes users know
# from Sprig (Helm, the Vault Secrets Operator, External Secrets).
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "not": lambda value: not _truth(value),
    "len": _len,
    "eq": _eq,
    "ne": lambda a, b: not _eq(a, b),
    "lt": lambda a, b: (lambda x, y: x < y)(*_ordered(a, b)),
    "le": lambda a, b: (lambda x, y: x <= y)(*_ordered(a, b)),
    "gt": lambda a, b: (lambda x, y: x > y)(*_ordered(a, b)),
    "ge": lambda a, b: (lambda x, y: x >= y)(*_ordered(a, b)),
    "print": _print,
    "println": lambda *values: " ".join(_printed(v) for v in values) + "\n",
    "printf": _printf,
    "b64enc": _b64enc,
    "b64dec": _b64dec,
    "toJson": _json,
    "quote": _quote,
    "squote": _squote,
    "default": _default,
    "join": _join,
    "upper": lambda text: _text(text).upper(),
    "lower": lambda text: _text(text).lower(),
    "trim": lambda text: _text(text).strip(),
    "trimSuffix": lambda suffix, text: _text(text).removesuffix(_text(suffix)),
    "trimPrefix": lambda prefix, text: _text(text).removeprefix(_text(prefix)),
    "replace": lambda old, new, text: _text(text).replace(_text(old), _text(new)),
    "contains": lambda part, text: _text(part) in _text(text),
    "indent": _indent,
    "nindent": lambda width, text: "\n" + _indent(width, text),
    "hasKey": _has_key,
    "keys": _keys,
    "pemToB64": _pem_to_b64,
    "b64ToPem": _b64_to_pem,
}


def _paths(nodes: Sequence[Any], *, top: bool) -> Iterator[tuple[Any, ...]]:
    for node in nodes:
        if isinstance(node, _Output):
            yield from _pipeline_paths(node.pipeline, top)
        elif isinstance(node, _Branch):
            for pipeline, body in node.arms:
                yield from _pipeline_paths(pipeline, top)
                # Inside with/range the dot moves: only $-rooted chains are certain there.
                yield from _paths(body, top=top and node.kind == "if")
            yield from _paths(node.otherwise, top=top)


def _pipeline_paths(pipeline: _Pipeline, top: bool) -> Iterator[tuple[Any, ...]]:
    for command in pipeline.commands:
        head = command[0]
        if isinstance(head, _Function) and head.name == "index" and len(command) > 2:
            base = command[1]
            keys = [a.value for a in command[2:] if isinstance(a, _Literal) and isinstance(a.value, str)]
            if len(keys) == len(command) - 2:
                prefix = _chain_path(base, top)
                if prefix is not None:
                    yield (*prefix, *keys)
        for operand in command:
            if isinstance(operand, _Pipeline):
                yield from _pipeline_paths(operand, top)
            path = _chain_path(operand, top)
            if path:
                yield path


def _chain_path(node: Any, top: bool) -> tuple[str, ...] | None:
    if isinstance(node, _Chain) and (
        (isinstance(node.base, _Dot) and top) or (isinstance(node.base, _Variable) and node.base.name == "$")
    ):
        return node.fields
    if (isinstance(node, _Dot) and top) or (isinstance(node, _Variable) and node.name == "$"):
        return ()
    return None


__all__ = ["FUNCTIONS", "Limits", "Template", "TemplateError", "parse"]
