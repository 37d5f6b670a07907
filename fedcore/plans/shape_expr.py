"""Shape expressions: fedcore's own grammar, so only what it parsed ever reaches sympy.

torch's deserializer hands every ``expr_str`` of a graph to ``sympy.sympify``, which
*evaluates* it: ``s0*10**10**7`` costs seconds of CPU under a global lock, ``10**10**9``
hours. A plan has one dynamic dimension (the batch), so its sizes are linear forms in that
one symbol. :func:`parse_expression` accepts exactly sympy's ``srepr`` printing of those::

    expr   := Symbol('s<digits>', <assumption>=True, ...) | Integer(<int>)
            | Add(expr, expr, ...) | Mul(expr, expr, ...) | Min(expr, expr) | Max(expr, expr)

where a ``Mul`` has at most one factor that is not a literal (no powers, no products of
symbols), literals stay within :data:`MAX_LITERAL`, and nesting within :data:`MAX_DEPTH`.
It refuses anything else in time linear in the text's length (which is bounded), and
:meth:`Expr.srepr` prints the canonical text that replaces the plan's before torch sees it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedcore.errors import PlanRejectedError

__all__ = [
    "MAX_DEPTH",
    "MAX_LITERAL",
    "SYMBOL_NAME",
    "Expr",
    "parse_expression",
]

#: The largest absolute value of an integer literal (sizes are far below it).
MAX_LITERAL = 1 << 40
#: The deepest nesting of Add/Mul/Min/Max.
MAX_DEPTH = 6
#: The longest expression text read at all.
MAX_LENGTH = 2000
#: What a size symbol may be called (torch names the batch ``s<number>``).
SYMBOL_NAME = re.compile(r"s[0-9]{1,6}")

_ASSUMPTIONS = frozenset({"positive", "integer", "nonnegative"})
_TOKEN = re.compile(r"\s*(?:([A-Za-z]+)|'([^']{0,16})'|(-?[0-9]+)|([(),=]))")
_FUNCTIONS = frozenset({"Symbol", "Integer", "Add", "Mul", "Min", "Max"})


@dataclass(frozen=True)
class Expr:
    """A parsed expression: a linear form ``const + coeff * symbol``, or Min/Max of two."""

    const: int = 0
    coeff: int = 0
    symbol: str | None = None
    op: str | None = None  # "Min" / "Max" of ``args``
    args: tuple[Expr, ...] = ()

    def evaluate(self, value: int) -> int:
        """The expression's value with its symbol set to ``value``."""
        if self.op is not None:
            values = [a.evaluate(value) for a in self.args]
            return min(values) if self.op == "Min" else max(values)
        return self.const + self.coeff * value

    def symbols(self) -> frozenset[str]:
        own = frozenset({self.symbol}) if self.symbol is not None and self.coeff else frozenset()
        return own.union(*(a.symbols() for a in self.args))

    def srepr(self) -> str:
        """sympy's ``srepr`` of the expression, printed by fedcore."""
        if self.op is not None:
            return f"{self.op}({', '.join(a.srepr() for a in self.args)})"
        if not self.coeff or self.symbol is None:
            return f"Integer({self.const})"
        term = f"Symbol('{self.symbol}', positive=True, integer=True)"
        if self.coeff != 1:
            term = f"Mul(Integer({self.coeff}), {term})"
        return term if not self.const else f"Add(Integer({self.const}), {term})"


def _fail(where: str, text: str, why: str) -> PlanRejectedError:
    return PlanRejectedError(f"{where}: shape expression {text[:80]!r} refused: {why}")


class _Parser:
    def __init__(self, text: str, where: str) -> None:
        self.text = text
        self.where = where
        self.tokens = self._tokenize()
        self.pos = 0

    def _tokenize(self) -> list[tuple[str, str]]:
        tokens: list[tuple[str, str]] = []
        pos = 0
        while pos < len(self.text):
            if self.text[pos:].isspace():
                break
            match = _TOKEN.match(self.text, pos)
            if match is None:
                raise self.fail(f"unexpected {self.text[pos : pos + 10]!r}")
            name, quoted, number, punct = match.groups()
            if name is not None:
                tokens.append(("name", name))
            elif quoted is not None:
                tokens.append(("quoted", quoted))
            elif number is not None:
                tokens.append(("int", number))
            else:
                tokens.append(("punct", punct))
            pos = match.end()
        return tokens

    def fail(self, why: str) -> PlanRejectedError:
        return _fail(self.where, self.text, why)

    def next(self, kind: str, value: str | None = None) -> str:
        if self.pos >= len(self.tokens):
            raise self.fail("it ends too early")
        got_kind, got = self.tokens[self.pos]
        if got_kind != kind or (value is not None and got != value):
            raise self.fail(f"expected {value or kind}, found {got!r}")
        self.pos += 1
        return got

    def peek(self) -> str | None:
        return self.tokens[self.pos][1] if self.pos < len(self.tokens) else None

    def expr(self, depth: int) -> Expr:
        if depth > MAX_DEPTH:
            raise self.fail(f"nested deeper than {MAX_DEPTH}")
        function = self.next("name")
        if function not in _FUNCTIONS:
            raise self.fail(f"{function!r} is not allowed (sizes are linear in the batch)")
        self.next("punct", "(")
        if function == "Symbol":
            result = self.symbol()
        elif function == "Integer":
            result = Expr(const=self.literal())
        else:
            args = [self.expr(depth + 1)]
            while self.peek() == ",":
                self.next("punct", ",")
                args.append(self.expr(depth + 1))
            result = self.combine(function, args)
        self.next("punct", ")")
        return result

    def symbol(self) -> Expr:
        name = self.next("quoted")
        if not SYMBOL_NAME.fullmatch(name):
            raise self.fail(f"symbol {name!r} is not a size symbol")
        while self.peek() == ",":
            self.next("punct", ",")
            assumption = self.next("name")
            self.next("punct", "=")
            if assumption not in _ASSUMPTIONS or self.next("name") != "True":
                raise self.fail(f"assumption {assumption!r} is not allowed")
        return Expr(coeff=1, symbol=name)

    def literal(self) -> int:
        text = self.next("int")
        if len(text.lstrip("-")) > 16:
            raise self.fail(f"literal {text[:20]}... is too long")
        value = int(text)
        if abs(value) > MAX_LITERAL:
            raise self.fail(f"literal {value} is above {MAX_LITERAL}")
        return value

    def combine(self, function: str, args: list[Expr]) -> Expr:
        if function in ("Min", "Max"):
            if len(args) != 2:
                raise self.fail(f"{function} takes two arguments")
            return Expr(op=function, args=tuple(args))
        if any(a.op is not None for a in args):
            raise self.fail(f"{function} of Min/Max is not a linear form")
        symbols = {a.symbol for a in args if a.coeff}
        if len(symbols) > 1:
            raise self.fail("more than one symbol")
        symbol = next(iter(symbols), None)
        if function == "Add":
            const, coeff = sum(a.const for a in args), sum(a.coeff for a in args)
        else:
            linear = [a for a in args if a.coeff]
            if len(linear) > 1:
                raise self.fail("a product of symbols is not a linear form")
            factor = 1
            for a in args:
                if not a.coeff:
                    factor *= a.const
            const, coeff = (
                (factor * linear[0].const, factor * linear[0].coeff)
                if linear
                else (
                    factor,
                    0,
                )
            )
        if max(abs(const), abs(coeff)) > MAX_LITERAL:
            raise self.fail(f"a coefficient is above {MAX_LITERAL}")
        return Expr(const=const, coeff=coeff, symbol=symbol if coeff else None)


def parse_expression(text: object, where: str) -> Expr:
    """Parse a serialized shape expression, or refuse it (see the module's grammar).

    Raises:
        PlanRejectedError: the text is not in the grammar; says where and why.
    """
    if not isinstance(text, str) or len(text) > MAX_LENGTH:
        raise PlanRejectedError(f"{where}: shape expression is not a short string")
    parser = _Parser(text, where)
    result = parser.expr(0)
    if parser.pos != len(parser.tokens):
        raise parser.fail("text after the expression")
    return result
