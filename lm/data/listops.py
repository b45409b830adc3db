"""ListOps (Nangia & Bowman 2018; the Long Range Arena version, Tay et al. 2021, Sec. 3.1).

A ListOps expression is a tree of list operations over the digits 0-9::

    [MAX 2 9 [MIN 4 7 ] 0 ]  ->  9

with four operators (LRA's set): ``MAX``, ``MIN``, ``MED`` (median; for an even count the floor of
the mean of the two middle values, the original generator's ``int(np.median(...))``) and ``SM``
(``SUM_MOD``: the sum modulo 10). The answer is always a digit (10 classes, chance 10%).

Causal-LM formulation (LRA classifies with a bidirectional encoder): the expression is
right-aligned in the sequence (left-padded with blanks), followed by one answer cue (token 1) at
the last position ``T - 1``, whose label is the answer digit; no other position is scored
(``labels[t]`` scores ``logits[t]``, as in ``lm.data.synthetic``). The cue is where a causal model
has read the whole expression, the analogue of LRA's ``[CLS]`` read-out.

Vocabulary (17 tokens): 0 blank, 1 answer cue, 2-11 the digits 0-9, 12-15 ``[MAX [MIN [MED [SM``,
16 ``]``. LRA's token set without the parentheses of the original tree dump.

Generation follows the original generator: below ``max_depth`` a node is an operator with
probability ``op_prob`` (0.25 in LRA) and a digit otherwise; an operator takes 2..``max_args``
arguments; the root is always an operator. Trees whose token count is outside
``[min_length, seq_len - 1]`` are rejected and redrawn (LRA keeps lengths 500-2000 the same way).
"""
from __future__ import annotations

import numpy as np

from lm.data.synthetic import _KEY, MARKER, TASKS, SyntheticTask, _positive_int, _require

OPS = ("MAX", "MIN", "MED", "SM")
DIGIT0 = 2  # token of digit 0
OP0 = DIGIT0 + 10  # token of the first operator
CLOSE = OP0 + len(OPS)  # "]"
VOCAB = CLOSE + 1
MAX_TRIES = 1000  # rejection-sampling draws per sample before giving up


class _TooLong(Exception):
    """A draw outgrew the sequence (rejected)."""


def apply_op(op: str, args: list[int]) -> int:
    """The value of ``[op args... ]`` for digit arguments."""
    if op == "MAX":
        return max(args)
    if op == "MIN":
        return min(args)
    if op == "MED":
        s = sorted(args)
        n = len(s)
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2
    if op == "SM":
        return sum(args) % 10
    raise ValueError(f"unknown ListOps operator {op!r} (choose from {', '.join(OPS)})")


def evaluate(tree) -> int:
    """Value of a tree: a digit, or ``(op, [children])``."""
    if isinstance(tree, (int, np.integer)):
        return int(tree)
    op, children = tree
    return apply_op(op, [evaluate(c) for c in children])


def tokens(tree) -> list[int]:
    """Token ids of a tree, e.g. ``("MAX", [2, 9])`` -> ``[MAX] 2 9 ]``."""
    out: list[int] = []

    def walk(t):
        if isinstance(t, (int, np.integer)):
            out.append(DIGIT0 + int(t))
        else:
            out.append(OP0 + OPS.index(t[0]))
            for c in t[1]:
                walk(c)
            out.append(CLOSE)

    walk(tree)
    return out


def to_string(ids) -> str:
    """Readable text of token ids (blanks dropped, the cue shown as ``=``)."""
    words = []
    for i in (int(x) for x in ids):
        if i == MARKER:
            words.append("=")
        elif DIGIT0 <= i < OP0:
            words.append(str(i - DIGIT0))
        elif OP0 <= i < CLOSE:
            words.append("[" + OPS[i - OP0])
        elif i == CLOSE:
            words.append("]")
    return " ".join(words)


def parse(text: str):
    """Tree of an expression written as text (``"[MAX 2 [MIN 4 7 ] ]"``); errors name the token."""
    words = text.split()
    pos = 0

    def node():
        nonlocal pos
        if pos >= len(words):
            raise ValueError(f"ListOps: expression ends early: {text!r}")
        w = words[pos]
        pos += 1
        if w.isdigit() and len(w) == 1:
            return int(w)
        if not (w.startswith("[") and w[1:] in OPS):
            raise ValueError(f"ListOps: unexpected token {w!r} in {text!r}")
        children = []
        while pos < len(words) and words[pos] != "]":
            children.append(node())
        if pos >= len(words):
            raise ValueError(f"ListOps: missing ']' in {text!r}")
        pos += 1
        if not children:
            raise ValueError(f"ListOps: operator {w!r} without arguments in {text!r}")
        return w[1:], children

    tree = node()
    if pos != len(words):
        raise ValueError(f"ListOps: trailing tokens {words[pos:]} in {text!r}")
    return tree


def evaluate_text(text: str) -> int:
    return evaluate(parse(text))


@TASKS.register("listops")
class ListOps(SyntheticTask):
    """ListOps expressions (LRA), answer digit predicted at the final cue position.

    Options: ``max_depth`` (operator nesting, LRA 10), ``max_args`` (arguments per operator,
    2..max_args, LRA 10), ``op_prob`` (probability that a node below ``max_depth`` is an operator,
    LRA 0.25), ``min_length`` (shortest expression in tokens; longest: ``seq_len - 1``).
    """

    def __init__(self, seq_len: int, vocab_size: int, *, max_depth: int = 4, max_args: int = 5,
                 op_prob: float = 0.25, min_length: int = 1):
        super().__init__(seq_len, vocab_size)
        self.max_depth = _positive_int(max_depth, f"{_KEY}.max_depth")
        self.max_args = _positive_int(max_args, f"{_KEY}.max_args")
        self.min_length = _positive_int(min_length, f"{_KEY}.min_length")
        _require(self.max_args >= 2, f"{_KEY}.max_args", f"an operator takes at least 2 arguments, got {max_args}")
        _require(isinstance(op_prob, (int, float)) and not isinstance(op_prob, bool) and 0.0 <= op_prob <= 1.0,
                 f"{_KEY}.op_prob", f"must be a probability in [0, 1], got {op_prob!r}")
        self.op_prob = float(op_prob)
        _require(vocab_size >= VOCAB, "data.vocab_size", f"listops needs vocab_size >= {VOCAB}, got {vocab_size}")
        _require(seq_len >= 5, "data.seq_len", f"listops needs seq_len >= 5 (one operator, two digits, ']' "
                 f"and the cue), got {seq_len}")
        self.max_length = seq_len - 1
        _require(self.min_length <= self.max_length, f"{_KEY}.min_length",
                 f"{min_length} is longer than the room for an expression (seq_len - 1 = {self.max_length})")
        # a fixed probe draw: options that (almost) never yield a fitting tree fail now, not in a worker
        self.sample(np.random.default_rng(0))

    def tree(self, rng: np.random.Generator, depth: int = 1, budget: list[int] | None = None):
        """One random tree (the original generator's recursion). ``budget[0]`` counts the tokens
        still allowed; past it the draw is abandoned (``_TooLong``): the same distribution as
        rejecting it once complete, without growing huge trees first."""
        budget = [self.max_length] if budget is None else budget
        if depth > 1 and (depth > self.max_depth or rng.random() >= self.op_prob):
            budget[0] -= 1
            if budget[0] < 0:
                raise _TooLong
            return int(rng.integers(0, 10))
        op = OPS[int(rng.integers(0, len(OPS)))]
        n = int(rng.integers(2, self.max_args + 1))
        budget[0] -= 2
        if budget[0] < 0:
            raise _TooLong
        return op, [self.tree(rng, depth + 1, budget) for _ in range(n)]

    def draw(self, rng: np.random.Generator):
        """A tree whose expression length is in ``[min_length, seq_len - 1]`` (rejection sampling)."""
        for _ in range(MAX_TRIES):
            budget = [self.max_length]
            try:
                t = self.tree(rng, budget=budget)
            except _TooLong:
                continue
            if self.max_length - budget[0] >= self.min_length:
                return t
        raise ValueError(f"{_KEY}.min_length: no expression of {self.min_length}..{self.max_length} tokens in "
                         f"{MAX_TRIES} draws with max_depth={self.max_depth}, max_args={self.max_args}, "
                         f"op_prob={self.op_prob}; lower min_length or raise op_prob/max_depth")

    def sample(self, rng):
        ids, labels = self._empty()
        t = self.draw(rng)
        toks = tokens(t)
        T = self.seq_len
        ids[T - 1 - len(toks):T - 1] = toks
        ids[T - 1], labels[T - 1] = MARKER, DIGIT0 + evaluate(t)
        return ids, labels
