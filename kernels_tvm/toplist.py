"""The selection's bookkeeping in TIR, shared by the CPU (select.py) and GPU (gpu_kernels.py) kernels.

Why here: after the chunk scores, both kernels run the same three steps per (KV head, query
chunk) row, and their results must agree bit for bit with each other and with
:func:`edgeattn.dhsa.select_for`: an insertion top-list of capacity M (descending score, ties:
lower chunk id first), the greedy prefix of that order under the token budget, and the kept ids
sorted ascending with the own chunk last.  No TVM sort/topk: these are plain loops that lower on
every target.

``iv`` is an int32 local buffer of 5: count, position, flag, tokens used, chunks kept.
"""

from __future__ import annotations

from typing import Any

from tvm.script import tirx as T


def toplist_macros(budget: int, sinks: int) -> tuple[Any, Any]:
    """``(insert, finish)`` TVMScript macros for one selection spec."""

    @T.macro
    def insert(topv, SEL, h, c, M, score, x, iv):
        # chunk x with ``score`` into the top-list of row (h, c); iv[0] = entries so far
        if iv[0] < M or score > topv[h, c, M - 1]:
            iv[1] = T.min(iv[0], M - 1)
            iv[2] = 1
            while iv[2] == 1:
                if iv[1] > 0:
                    if topv[h, c, iv[1] - 1] < score:
                        topv[h, c, iv[1]] = topv[h, c, iv[1] - 1]
                        SEL[h, c, iv[1]] = SEL[h, c, iv[1] - 1]
                        iv[1] = iv[1] - 1
                    else:
                        iv[2] = 0
                else:
                    iv[2] = 0
            topv[h, c, iv[1]] = score
            SEL[h, c, iv[1]] = x
            iv[0] = T.min(iv[0] + 1, M)

    @T.macro
    def finish(B, SEL, NSEL, h, c, M, own, ks, ke, iv):
        # greedy prefix of the order under the budget (own chunk and sinks are free)
        iv[3] = 0
        iv[4] = 0
        iv[2] = 1
        for i in range(iv[0]):
            if iv[2] == 1:
                xs = B[SEL[h, c, i]]
                xe = B[SEL[h, c, i] + 1]
                charge = (xe - xs) - T.max(T.min(xe, sinks) - T.min(xs, sinks), 0)
                if iv[3] + charge <= budget - (ke - ks) - T.min(ks, sinks):
                    iv[3] = iv[3] + charge
                    iv[4] = iv[4] + 1
                else:
                    iv[2] = 0
        if iv[4] >= M:
            NSEL[h, c] = -1
            for i in range(M):
                SEL[h, c, i] = -1
        else:
            # kept ids ascending (insertion sort of the first iv[4] entries), then own, then -1
            for i in range(1, iv[4]):
                iv[1] = i
                iv[0] = SEL[h, c, i]
                iv[2] = 1
                while iv[2] == 1:
                    if iv[1] > 0:
                        if SEL[h, c, iv[1] - 1] > iv[0]:
                            SEL[h, c, iv[1]] = SEL[h, c, iv[1] - 1]
                            iv[1] = iv[1] - 1
                        else:
                            iv[2] = 0
                    else:
                        iv[2] = 0
                SEL[h, c, iv[1]] = iv[0]
            SEL[h, c, iv[4]] = own
            for i in range(iv[4] + 1, M):
                SEL[h, c, i] = -1
            NSEL[h, c] = iv[4] + 1

    return insert, finish


def vertical_pin_macro(vertical: int, sinks: int, insert: Any) -> Any:
    """``pin`` TVMScript macro: one KV head's vertical chunks (``edgeattn.dhsa.vertical_chunks``).

    Runs on one thread per head, on the CPU and GPU kernels alike: the candidates (chunks ending by
    ``first``, the window's first query) go through the rows' top-list in ``vscore`` order, and the
    greedy prefix of that order under ``vertical`` tokens gets ``pinned[h, x] = 1``.
    """

    @T.macro
    def pin(B, Nc1, vscore, vtop, vsel, pinned, h, M, first, iv):
        iv[0] = 0
        for x in range(Nc1 - 1):
            if B[x + 1] <= first:
                insert(vtop, vsel, h, 0, M, vscore[h, x], x, iv)
        iv[3] = 0
        iv[2] = 1
        for i in range(iv[0]):  # the greedy prefix under the vertical tokens
            if iv[2] == 1:
                xs = B[vsel[h, 0, i]]
                xe = B[vsel[h, 0, i] + 1]
                charge = (xe - xs) - T.max(T.min(xe, sinks) - T.min(xs, sinks), 0)
                if iv[3] + charge <= vertical:
                    iv[3] = iv[3] + charge
                    pinned[h, vsel[h, 0, i]] = 1
                else:
                    iv[2] = 0

    return pin
