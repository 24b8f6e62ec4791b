from __future__ import annotations

import pytest

from qrunlearn.data.muse import MuseCorpus
from qrunlearn.errors import UserError
from qrunlearn.models.train import collate
from qrunlearn.unlearn.data import (
    MicroBatch,
    UnlearnData,
    chunk_documents,
    epoch_schedule,
    load_unlearn_data,
    row_groups,
)


class _Tok:
    """Whitespace tokenizer: word i -> id i + 10; BOS 1."""

    bos_token_id = 1

    def __call__(self, docs, add_special_tokens=False):
        assert not add_special_tokens
        return {"input_ids": [[10 + i for i, _ in enumerate(d.split())] for d in docs]}


def test_chunks_are_bos_plus_max_length_minus_one_tokens():
    chunks = chunk_documents(_Tok(), ["a b c d e f g", "x"], max_length=4)
    assert chunks == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16], [1, 10]]


def test_collate_pads_right_and_masks_labels():
    batch = collate([[1, 5, 6], [1, 7]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["labels"].tolist() == [[1, 5, 6], [1, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_one_process_and_two_processes_see_the_same_global_batches():
    one = epoch_schedule(10, 4, epoch=3, seed=7, batch_size=4, grad_accum=1)
    two = [epoch_schedule(10, 4, epoch=3, seed=7, batch_size=2, grad_accum=1, rank=r, world_size=2) for r in (0, 1)]
    assert len(one) == len(two[0]) == len(two[1]) == 3
    for s, step in enumerate(one):
        assert step.global_forget == two[0][s].global_forget == two[1][s].global_forget
        merged = two[0][s].micro_batches[0].forget + two[1][s].micro_batches[0].forget
        assert merged == step.micro_batches[0].forget
    # last global batch has 2 chunks: rank 1's share is empty (the loop runs it with weight 0)
    assert two[1][-1].micro_batches[0].forget == []


def test_epoch_covers_forget_once_and_retain_is_cycled():
    steps = epoch_schedule(10, 3, epoch=0, seed=0, batch_size=2, grad_accum=2)
    forget = [i for st in steps for mb in st.micro_batches for i in mb.forget]
    retain = [i for st in steps for mb in st.micro_batches for i in mb.retain]
    assert sorted(forget) == list(range(10))
    assert len(retain) == 10 and set(retain) == {0, 1, 2}
    assert [len(st.micro_batches) for st in steps] == [2, 2, 1]  # the short last step drops an empty micro-batch
    assert epoch_schedule(10, 3, 0, 0, 2, 2)[0].global_forget != epoch_schedule(10, 3, 1, 0, 2, 2)[0].global_forget


def test_empty_forget_and_missing_retain_are_user_errors(tmp_path):
    corpus = MuseCorpus(root=tmp_path, raw={"forget": ["  "], "retain1": ["a b"]})
    with pytest.raises(UserError, match="empty forget set"):
        load_unlearn_data(corpus, _Tok(), "forget", "retain1", needs_retain=False, max_length=8)
    corpus = MuseCorpus(root=tmp_path, raw={"forget": ["a b c"]})
    with pytest.raises(UserError, match="retain1.json: missing"):
        load_unlearn_data(corpus, _Tok(), "forget", "retain1", needs_retain=True, max_length=8)
    data = load_unlearn_data(corpus, _Tok(), "forget", "retain1", needs_retain=False, max_length=8)
    assert data.forget == [[1, 10, 11, 12]] and data.retain == []


def test_row_groups_keep_forget_and_retain_rows_apart():
    data = UnlearnData(forget=[[1] * 5, [1] * 100, [1] * 7], retain=[[1] * 98, [1] * 6, [1] * 40])
    micro = MicroBatch(forget=[0, 1, 2], retain=[0, 1, 2])
    groups = row_groups(micro, data, pass_cost=8)
    assert sorted(i for g in groups for i in g.forget) == [0, 1, 2]
    assert sorted(i for g in groups for i in g.retain) == [0, 1, 2]
    for g in groups:  # the lengths in a group are close: no 5-token chunk padded to 100
        lengths = [len(data.forget[i]) for i in g.forget] + [len(data.retain[i]) for i in g.retain]
        assert max(lengths) - min(lengths) <= 2 or len(lengths) == 1
    assert row_groups(micro, data, None) == [micro]
