"""Hand-built operator graphs with chosen costs, shared by the tests (and handy in a REPL)."""

from __future__ import annotations

from pipetrain.graphpipe import OpGraph


def chain(works, act=1.0, params=1.0) -> OpGraph:
    """op0 -> op1 -> ...; forward = w/3, backward = 2w/3 (work w)."""
    return OpGraph.chain([(w / 3, 2 * w / 3, act, params) for w in works])


def _op(g, name, w, inputs=(), act=1.0, params=1.0):
    g.add(name, w / 3, 2 * w / 3, act, params, inputs=inputs)


def two_towers(a=(3, 3, 3), b=(4, 2), head=1.0, src=1.0) -> OpGraph:
    """src -> tower a (len(a) ops) and tower b (len(b) ops) -> head."""
    g = OpGraph()
    _op(g, "src", src)
    for name, ws in (("a", a), ("b", b)):
        prev = "src"
        for i, w in enumerate(ws):
            _op(g, f"{name}{i}", w, [prev])
            prev = f"{name}{i}"
    _op(g, "head", head, [f"a{len(a) - 1}", f"b{len(b) - 1}"])
    return g


def four_branches(widths=(4, 3, 2, 1), src=0.5, head=0.5) -> OpGraph:
    """src -> 4 single-op branches of work widths[i] -> head."""
    g = OpGraph()
    _op(g, "src", src)
    for i, w in enumerate(widths):
        _op(g, f"br{i}", w, ["src"])
    _op(g, "head", head, [f"br{i}" for i in range(len(widths))])
    return g


def fan_out(w=(1, 2, 3, 2, 1, 1)) -> OpGraph:
    """x -> y; y feeds two later ops p, q; p, q -> z (a branch feeding two later ops) -> out."""
    g = OpGraph()
    _op(g, "x", w[0])
    _op(g, "y", w[1], ["x"])
    _op(g, "p", w[2], ["y"])
    _op(g, "q", w[3], ["y"])
    _op(g, "z", w[4], ["p", "q"])
    _op(g, "out", w[5], ["z", "y"])  # a skip edge too (transitive: does not change the order)
    return g


def n_shape() -> OpGraph:
    """Not series-parallel: s -> a, b; a -> c; b -> c, d; c, d -> t (the "N" a-c-b-d)."""
    g = OpGraph()
    for n, w in zip("sabcdt", (1, 2, 3, 2, 2, 1)):
        _op(g, n, w)
    for e in ("sa", "sb", "ac", "bc", "bd", "ct", "dt"):
        g.add_edge(*e)
    return g
