"""The shared token subsets (`depth/dispatch.py`): a chosen set of a call's tokens gathered with
their own positions, so a block runs on them alone, and put back."""

from __future__ import annotations

import torch
from test_cache import backbone, close, tokens

from adadepth.depth.dispatch import Subset


def test_rows_layout_packs_each_row_and_leaves_empty_rows_out() -> None:
    bb = backbone("ours")
    x, ctx = bb.prepare(tokens(3, 6))
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 1]]).bool()
    sub = Subset.of(ctx, mask)
    assert sub is not None and sub.count == 2 * 3  # the empty row dropped, padded to 3
    assert sub.rows.tolist() == [0, 2] and sub.pad.tolist() == [[False] * 3, [False, False, True]]
    positions = sub.ctx.positions.tolist()
    assert positions[0] == [0, 2, 3] and positions[1][:2] == [1, 5]
    y = sub.gather(x) + 1
    out = sub.scatter(x, y)
    close(out[mask], x[mask] + 1)
    close(out[~mask], x[~mask])
    added = sub.add(x, torch.ones_like(y))  # a residual update: padding entries add nothing
    close(added, out)
    assert sub.flat().tolist() == [0, 2, 3, 13, 17]
    assert Subset.of(ctx, torch.zeros(3, 6, dtype=torch.bool)) is None


def test_whole_rows_and_the_whole_call_need_no_index() -> None:
    bb = backbone("ours")
    x, ctx = bb.prepare(tokens(3, 5))
    everyone = Subset.of(ctx, torch.ones(3, 5, dtype=torch.bool))
    assert everyone.is_whole and everyone.ctx is ctx and everyone.gather(x) is x
    rows = torch.zeros(3, 5, dtype=torch.bool)
    rows[1] = True
    sub = Subset.of(ctx, rows)
    assert sub.index is None and sub.rows.tolist() == [1] and sub.count == 5
    close(sub.scatter(x, sub.gather(x) * 2)[1], x[1] * 2)
    close(sub.add(x, sub.gather(x))[0], x[0])
    one = Subset.of(bb.prepare(tokens(3, 1))[1], torch.tensor([[True], [False], [True]]))
    assert one.rows.tolist() == [0, 2] and one.index is None  # decoding: whole rows


def test_pieces_layout_cuts_a_long_row_rather_than_padding_every_row() -> None:
    bb = backbone("ours")
    x, ctx = bb.prepare(tokens(3, 64))
    mask = torch.zeros(3, 64, dtype=torch.bool)
    mask[0], mask[1, [5, 9]], mask[2, 40] = True, True, True
    rows = Subset.of(ctx, mask)
    sub = Subset.of(ctx, mask, layout="pieces")
    assert sub.count < rows.count == 3 * 64 and int((sub.rows == 0).sum()) > 1
    out = sub.scatter(x, sub.gather(x) * 2)
    close(out[mask], x[mask] * 2)
    close(out[~mask], x[~mask])
