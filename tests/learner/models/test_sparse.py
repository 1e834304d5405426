"""RowwiseTable: sparse row-wise Adagrad against a dense reference, exact state, O(batch) work."""

from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import load, save
from torch.nn import functional as F

from learner.models.sparse import RowwiseTable

N, DIM, LR, EPS = 20, 4, 0.1, 1e-8


def reference_step(weight: torch.Tensor, sum_sq: torch.Tensor, rows: torch.Tensor, upstream: torch.Tensor):
    """Row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD) on a dense copy: a dense gradient over the whole
    table, then the update on the rows whose gradient is non-zero, written per row as the paper does."""
    w = weight.clone().requires_grad_(True)
    (F.embedding(rows, w) * upstream).sum().backward()
    new_w, new_s = weight.clone(), sum_sq.clone()
    for r in rows.unique().tolist():
        g = w.grad[r]
        new_s[r] = sum_sq[r] + g.pow(2).mean()
        new_w[r] = weight[r] - LR * g / (new_s[r].sqrt() + EPS)
    return new_w, new_s


def step(table: RowwiseTable, rows: torch.Tensor, upstream: torch.Tensor) -> None:
    (table.lookup(rows) * upstream).sum().backward()
    table.apply_gradients()


def batch(seed: int, shape=(6, 2)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, N // 2 + 1, shape, generator=g), torch.randn(*shape, DIM, generator=g)


def test_update_matches_dense_reference_and_leaves_untouched_rows_bit_identical():
    table = RowwiseTable(N, DIM, lr=LR, eps=EPS)
    for seed in range(3):  # several steps so the accumulator is non-zero going in
        rows, up = batch(seed)
        before_w, before_s = table.weight.clone(), table.sum_sq.clone()
        want_w, want_s = reference_step(before_w, before_s, rows, up)
        step(table, rows, up)
        touched = torch.zeros(N + 1, dtype=torch.bool)
        touched[rows.unique()] = True
        torch.testing.assert_close(table.weight[touched], want_w[touched], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(table.sum_sq[touched], want_s[touched], rtol=1e-6, atol=1e-7)
        assert torch.equal(table.weight[~touched], before_w[~touched])
        assert torch.equal(table.sum_sq[~touched], before_s[~touched])
        assert (table.weight[touched] != before_w[touched]).any(dim=1).all()
    # rows N//2+1.. were never drawn: still their initial values, accumulator exactly zero
    assert torch.equal(table.weight[N // 2 + 1 :], RowwiseTable(N, DIM, lr=LR).weight[N // 2 + 1 :])
    assert torch.equal(table.sum_sq[N // 2 + 1 :], torch.zeros(N - N // 2))


def test_dense_adam_moves_untouched_rows_where_rowwise_does_not():
    """The reason for this module, held as a test: Adam's momentum moves a row the batch did not touch."""
    emb = torch.nn.Embedding(N + 1, DIM)
    opt = torch.optim.Adam(emb.parameters(), lr=LR)
    for rows in (torch.tensor([1, 2]), torch.tensor([3])):
        opt.zero_grad()
        emb(rows).sum().backward()
        before = emb.weight.detach().clone()
        opt.step()
    assert not torch.equal(emb.weight[1], before[1])  # row 1 moved in a step that only looked up row 3

    table = RowwiseTable(N, DIM, lr=LR)
    step(table, torch.tensor([1, 2]), torch.ones(2, DIM))
    before = table.weight.clone()
    step(table, torch.tensor([3]), torch.ones(1, DIM))
    assert torch.equal(table.weight[1], before[1])


def test_duplicates_in_a_batch_sum():
    a, b = RowwiseTable(N, DIM, lr=LR), RowwiseTable(N, DIM, lr=LR)
    up = torch.randn(3, DIM, generator=torch.Generator().manual_seed(0))
    step(a, torch.tensor([5, 5, 5]), up)
    step(b, torch.tensor([5]), up.sum(dim=0, keepdim=True))
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-7)
    torch.testing.assert_close(a.sum_sq, b.sum_sq, rtol=0, atol=1e-7)


def test_two_lookups_before_one_update_sum_like_one_lookup():
    """Two fields reading one table: one update from both lookups, duplicates across them summed."""
    a, b = RowwiseTable(N, DIM, lr=LR), RowwiseTable(N, DIM, lr=LR)
    rows, up = batch(7)
    ((a.lookup(rows[:, 0]) * up[:, 0]).sum() + (a.lookup(rows[:, 1]) * up[:, 1]).sum()).backward()
    a.apply_gradients()
    step(b, rows, up)
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.sum_sq, b.sum_sq, rtol=0, atol=1e-6)


def test_leaf_gradient_has_one_row_per_unique_row_whatever_the_table_size():
    """Work is O(batch): the graph holds (U, dim) of the table, not (n_rows, dim). Counted, not timed."""
    rows = torch.tensor([[3, 9], [3, 0], [9, 9]])
    for n_rows in (10, 100_000):
        table = RowwiseTable(n_rows, DIM, lr=LR)
        table.lookup(rows).sum().backward()
        ((unique, leaf),) = table._pending
        assert leaf.shape == (3, DIM) and leaf.grad.shape == (3, DIM)
        assert unique.tolist() == [0, 3, 9]
        got_rows, grads = table.gradients()
        assert got_rows.tolist() == [0, 3, 9] and grads.shape == (3, DIM)
        assert table.apply_gradients() == 0  # gradients() took them: nothing left to apply
    assert not any(p.requires_grad for p in table.parameters())  # the dense optimizer sees nothing
    assert list(table.parameters()) == []


def test_default_row_is_trained_like_any_row():
    table = RowwiseTable(N, DIM, lr=LR)
    before = table.weight[0].clone()
    step(table, torch.tensor([0, 0]), torch.ones(2, DIM))
    assert not torch.equal(table.weight[0], before) and table.sum_sq[0] > 0


def test_reset_rows_reinitialises_weights_and_zeroes_accumulator_only_there():
    table = RowwiseTable(N, DIM, lr=LR, init_std=0.5)
    step(table, torch.tensor([1, 2, 3]), torch.ones(3, DIM))
    before_w, before_s = table.weight.clone(), table.sum_sq.clone()
    table.reset_rows(torch.tensor([2, 3, 3]))
    assert torch.equal(table.sum_sq[[2, 3]], torch.zeros(2))
    assert (table.weight[[2, 3]] != before_w[[2, 3]]).all()
    keep = torch.ones(N + 1, dtype=torch.bool)
    keep[[2, 3]] = False
    assert torch.equal(table.weight[keep], before_w[keep]) and torch.equal(table.sum_sq[keep], before_s[keep])
    assert 0.2 < table.weight[[2, 3]].std() < 1.0  # drawn at init_std, not left at zero
    # the next reset of the same rows draws new values; a twin table draws the same ones (replicas agree)
    twin = RowwiseTable(N, DIM, lr=LR, init_std=0.5)
    step(twin, torch.tensor([1, 2, 3]), torch.ones(3, DIM))
    twin.reset_rows(torch.tensor([3, 2]))
    assert torch.equal(twin.weight, table.weight)
    first = table.weight[[2, 3]].clone()
    table.reset_rows(torch.tensor([2, 3]))
    assert not torch.equal(table.weight[[2, 3]], first)


def test_state_dict_round_trip_gives_identical_outputs_and_next_updates():
    table = RowwiseTable(N, DIM, lr=LR)
    for seed in range(3):
        step(table, *batch(seed))
    table.reset_rows(torch.tensor([4]))
    blob = save(table.state_dict())  # what a snapshot carries: tensors only
    restored = RowwiseTable(N, DIM, lr=LR, seed=123)  # different initial values, all overwritten
    restored.load_state_dict(load(blob))
    assert set(table.state_dict()) == {"weight", "sum_sq", "seed", "resets"}
    rows, up = batch(9)
    with torch.no_grad():
        assert torch.equal(table.lookup(rows), restored.lookup(rows))
    step(table, rows, up)
    step(restored, rows, up)
    table.reset_rows(torch.tensor([5]))
    restored.reset_rows(torch.tensor([5]))  # the reset counter came along: same fresh values
    for key, value in table.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    buf = io.BytesIO()
    torch.save(table.state_dict(), buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf)["weight"], table.weight)


def test_replicas_applying_all_gathered_gradients_stay_identical():
    """Data-parallel contract: every worker applies the concatenation of every worker's gradients."""
    workers = [RowwiseTable(N, DIM, lr=LR) for _ in range(2)]
    single = RowwiseTable(N, DIM, lr=LR)
    for seed in range(3):
        shards = [batch(10 * seed + rank, shape=(4,)) for rank in range(2)]
        local = []
        for table, (rows, up) in zip(workers, shards):
            (table.lookup(rows) * up).sum().backward()
            local.append(table.gradients())
        rows_all = torch.cat([r for r, _ in local])
        grads_all = torch.cat([g for _, g in local])
        for table in workers:
            table.update(rows_all, grads_all)
        step(single, torch.cat([r for r, _ in shards]), torch.cat([u for _, u in shards]))
    assert torch.equal(workers[0].weight, workers[1].weight)
    assert torch.equal(workers[0].sum_sq, workers[1].sum_sq)
    torch.testing.assert_close(workers[0].weight, single.weight, rtol=0, atol=1e-6)  # = one big batch


def test_no_grad_lookup_records_nothing_and_eval_reads_the_same_rows():
    table = RowwiseTable(N, DIM, lr=LR)
    rows = torch.tensor([[1, 0], [7, 7]])
    with torch.no_grad():
        out = table.lookup(rows)
    assert table._pending == [] and out.shape == (2, 2, DIM)
    assert torch.equal(out, table.weight[rows])
    assert table.apply_gradients() == 0


def test_bad_rows_are_refused_with_a_clear_error():
    table = RowwiseTable(N, DIM, lr=LR)
    with pytest.raises(IndexError, match=r"\[0, 20\]"):
        table.lookup(torch.tensor([1, N + 1]))
    with pytest.raises(IndexError):
        table.lookup(torch.tensor([-1]))
    with torch.no_grad(), pytest.raises(IndexError):
        table.lookup(torch.tensor([N + 1]))
    with pytest.raises(TypeError):
        table.lookup(torch.tensor([1.0]))
    with pytest.raises(ValueError):
        table.update(torch.tensor([1, 2]), torch.zeros(1, DIM))
    with pytest.raises(ValueError):
        RowwiseTable(N, DIM, lr=0.0)
    empty = table.lookup(torch.zeros(0, 2, dtype=torch.long))
    assert empty.shape == (0, 2, DIM)
    assert table.apply_gradients() == 0


def test_module_apply_still_walks_the_table():
    """``update`` is not named ``apply``: nn.Module.apply(fn) must keep working on a model holding a table."""
    model = torch.nn.Sequential(RowwiseTable(N, DIM, lr=LR), torch.nn.Linear(DIM, 1))
    seen: list[str] = []
    model.apply(lambda m: seen.append(type(m).__name__))
    assert seen == ["RowwiseTable", "Linear", "Sequential"]


def test_seeded_construction_is_reproducible():
    assert torch.equal(RowwiseTable(N, DIM, lr=LR, seed=3).weight, RowwiseTable(N, DIM, lr=LR, seed=3).weight)
    assert not torch.equal(RowwiseTable(N, DIM, lr=LR, seed=3).weight, RowwiseTable(N, DIM, lr=LR, seed=4).weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine")
def test_cuda_matches_cpu():
    cpu = RowwiseTable(N, DIM, lr=LR)
    gpu = RowwiseTable(N, DIM, lr=LR).to("cuda")
    for seed in range(3):
        rows, up = batch(seed)
        step(cpu, rows, up)
        step(gpu, rows, up.cuda())  # rows follow the table to its device
    gpu.reset_rows(torch.tensor([1]))
    cpu.reset_rows(torch.tensor([1]))
    assert gpu.weight.device.type == "cuda" and gpu.sum_sq.device.type == "cuda"
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu.sum_sq.cpu(), cpu.sum_sq, rtol=1e-5, atol=1e-6)


def test_an_initial_accumulator_makes_first_steps_proportional_to_the_gradient_and_survives_growth_and_reset():
    """With 0 the first step is lr · g / rms(g), as long for a faint gradient as for a strong one; with a start
    ``a0`` above g² it is lr · g / sqrt(a0 + mean g²): in proportion."""
    steps = {}
    for a0 in (0.0, 1.0):
        table = RowwiseTable(N, DIM, lr=LR, eps=EPS, initial_accumulator=a0, allocated=2)
        assert torch.equal(table.sum_sq, torch.full((3,), a0))
        before = table.weight.clone()
        step(table, torch.tensor([1, 2]), torch.stack([torch.full((DIM,), 1e-3), torch.full((DIM,), 1e-1)]))
        steps[a0] = (before - table.weight)[1:3].norm(dim=1)
        table.ensure_rows(6)
        assert torch.equal(table.sum_sq[3:], torch.full((table.allocated - 2,), a0))  # grown rows start there
        table.reset_rows(torch.tensor([1]))
        assert table.sum_sq[1] == a0  # a reused row starts over there too
    torch.testing.assert_close(steps[0.0][0], steps[0.0][1])  # faint and strong: the same step
    torch.testing.assert_close(steps[1.0][1] / steps[1.0][0], torch.tensor(100.0), rtol=1e-2, atol=0)


def test_groups_are_separate_rows_side_by_side_through_updates_growth_reset_and_state():
    """A table of ``groups`` groups updates each group as its own table of ``dim / groups`` columns would."""
    grouped = RowwiseTable(N, 3 * DIM, lr=LR, eps=EPS, groups=3, initial_accumulator=0.5)
    alone = [RowwiseTable(N, DIM, lr=LR, eps=EPS, initial_accumulator=0.5) for _ in range(3)]
    for j, table in enumerate(alone):
        table.weight.copy_(grouped.weight[:, j * DIM:(j + 1) * DIM])
    scale = torch.tensor([1.0, 100.0, 0.0])  # one group's gradients far larger, one group's none
    for seed in range(3):
        rows, up = batch(seed)
        step(grouped, rows, torch.cat([up * s for s in scale], dim=-1))
        for table, s in zip(alone, scale):
            step(table, rows, up * s)
    assert grouped.sum_sq.shape == (N + 1, 3)
    for j, table in enumerate(alone):
        torch.testing.assert_close(grouped.weight[:, j * DIM:(j + 1) * DIM], table.weight, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grouped.sum_sq[:, j], table.sum_sq, rtol=1e-6, atol=1e-9)
    grouped.reset_rows(torch.tensor([1]))
    assert torch.equal(grouped.sum_sq[1], torch.full((3,), 0.5))
    growing = RowwiseTable(N, 3 * DIM, lr=LR, groups=3, allocated=2, initial_accumulator=0.5)
    growing.ensure_rows(N)
    assert growing.sum_sq.shape == (N + 1, 3) and torch.equal(growing.sum_sq, torch.full((N + 1, 3), 0.5))
    restored = RowwiseTable(N, 3 * DIM, lr=LR, eps=EPS, groups=3, allocated=0)
    restored.load_state_dict(grouped.state_dict())
    assert torch.equal(restored.sum_sq, grouped.sum_sq) and torch.equal(restored.weight, grouped.weight)
    with pytest.raises(ValueError, match="groups must divide dim"):
        RowwiseTable(N, 5, lr=LR, groups=2)


# ---- changed rows (delta publishing) ------------------------------------------------------------------------

def _moved(table: RowwiseTable, weight: torch.Tensor, sum_sq: torch.Tensor) -> set[int]:
    """The rows whose weights or accumulator differ from a copy (rows added since count as moved)."""
    shared = weight.shape[0]
    differ = (table.weight[:shared] != weight).any(1) | (table.sum_sq[:shared] != sum_sq)
    return set(differ.nonzero().flatten().tolist()) | set(range(shared, table.weight.shape[0]))


def test_changed_rows_are_those_an_update_a_reset_or_a_growth_touched_since_the_mark():
    table = RowwiseTable(N, DIM, lr=LR, allocated=6)
    assert table.changed_rows().tolist() == list(range(7))  # nothing published yet: every row
    table.mark_published()
    assert table.changed_rows().tolist() == []
    weight, sum_sq = table.weight.clone(), table.sum_sq.clone()
    step(table, torch.tensor([[4, 2], [2, 0]]), torch.randn(2, 2, DIM))
    table.reset_rows(torch.tensor([5, 5]))
    table.ensure_rows(8)  # grows by half: rows 7..10
    changed = table.changed_rows()
    assert changed.dtype == torch.int64 and changed.tolist() == [0, 2, 4, 5, 7, 8, 9, 10]
    assert _moved(table, weight, sum_sq) <= set(changed.tolist())
    assert table.changed_rows().tolist() == changed.tolist()  # reading does not clear
    table.mark_published()
    assert table.changed_rows().tolist() == []
    step(table, torch.tensor([9]), torch.ones(1, DIM))
    assert table.changed_rows().tolist() == [9]


def test_a_load_changes_every_row_and_many_changes_are_read_from_the_bits():
    table = RowwiseTable(4000, DIM, lr=LR)
    table.mark_published()
    rows = torch.randperm(4001)[:1500]  # past an eighth of the table: the list gives way to the bits
    step(table, rows, torch.randn(1500, DIM))
    assert table.changed_rows().tolist() == sorted(rows.tolist())
    table.mark_published()
    assert table.changed_rows().tolist() == []
    step(table, torch.tensor([7, 3]), torch.ones(2, DIM))
    assert table.changed_rows().tolist() == [3, 7]
    table.mark_published()
    other = RowwiseTable(10, DIM, lr=LR, seed=5)
    table.load_state_dict(other.state_dict())  # a table of another size: all its rows are new
    assert table.changed_rows().tolist() == list(range(11))


def test_load_rows_writes_a_versions_rows_and_grows_into_room_it_keeps():
    source = RowwiseTable(N, DIM, lr=LR, allocated=3)
    replica = RowwiseTable(N, DIM, lr=LR, allocated=3, seed=9)
    replica.load_state_dict(source.state_dict())
    for seed, grow_to in ((0, 4), (1, 6), (2, 6)):
        source.mark_published()
        source.ensure_rows(grow_to)  # 3 rows -> 5 -> 8, as the trainer grows them
        step(source, torch.randint(0, grow_to + 1, (3,), generator=torch.Generator().manual_seed(seed)),
             torch.randn(3, DIM))
        rows = source.changed_rows()
        room = replica._room
        replica.load_rows(rows, source.weight[rows], source.sum_sq[rows], source.weight.shape[0])
        for key, value in source.state_dict().items():
            assert torch.equal(replica.state_dict()[key], value), key
        if seed == 1:  # the first growth kept room for the trainer's next: the second grew into it, no copy
            assert replica._room is room
    assert replica.weight.shape == (source.allocated + 1, DIM) and replica.weight.is_contiguous()
    with torch.no_grad():
        assert torch.equal(replica.lookup(torch.arange(source.allocated + 1)), source.weight)


def test_staged_rows_are_served_before_they_are_written_and_never_half_written():
    """A replica stages a version's rows under its lock (O(1)) and writes them beside its requests: from the stage
    on, lookups and ``state_dict`` give the new values while the table still holds the old ones, and a row the
    settle has half written is read from the staged copy; after the settle the table holds them."""
    source = RowwiseTable(N, DIM, lr=LR, seed=1)
    replica = RowwiseTable(N, DIM, lr=LR, seed=2)
    replica.load_state_dict(source.state_dict())
    replica.eval()
    source.mark_published()
    step(source, torch.tensor([9, 2, 5, 2]), torch.randn(4, DIM))
    rows = source.changed_rows()
    assert rows.tolist() == [2, 5, 9]
    old = replica.weight.clone()
    replica.stage_rows(*replica.staging(rows, source.weight[rows], source.sum_sq[rows]), source.weight.shape[0])
    assert torch.equal(replica.weight, old), "staging writes nothing into the table"
    everything = torch.arange(N + 1)
    with torch.no_grad():
        assert torch.equal(replica.lookup(everything), source.weight)
        assert torch.equal(replica.lookup(torch.tensor([[5, 0], [9, 9]])), source.weight[torch.tensor([[5, 0], [9, 9]])])
        for key, value in source.state_dict().items():
            assert torch.equal(replica.state_dict()[key], value), key
        replica.weight[5, : DIM // 2] = float("nan")  # a row the settle has half written
        assert torch.equal(replica.lookup(everything), source.weight)
    replica.settle_rows()
    assert replica._staged is None and torch.equal(replica.weight, source.weight)
    assert torch.equal(replica.sum_sq, source.sum_sq)
    with torch.no_grad():
        assert torch.equal(replica.lookup(everything), source.weight)

