"""DNA data: the tokenizer's round trip and reverse complement, held-out splits that never share a
base, windows that cross records only over a separator, reverse-complement augmentation, and the
order-k Markov baseline."""

import numpy as np
import pytest

from mambakit.models.dna import DNA_COMPLEMENT, DNA_VOCAB_SIZE
from mambakit.tasks.dna import splits, tokenizer
from mambakit.tasks.dna.markov import MarkovModel, contexts
from mambakit.tasks.dna.splits import IGNORE_INDEX, Sequence, Split, Stream, held_out_split, overlaps

rng = np.random.default_rng(0)


def random_bases(n: int, alphabet: str = "ACGT") -> str:
    return "".join(rng.choice(list(alphabet), size=n))


# ---- tokenizer ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["ACGTN", "acgtn", "NNNNNNNN", random_bases(500, "ACGTNacgtn"), ""])
def test_round_trip(text):
    encoded = tokenizer.encode(text)
    assert encoded.ids.dtype == np.uint8 and len(encoded.ids) == len(text) and encoded.n_ambiguous == 0
    assert tokenizer.decode(encoded.ids) == text.upper()
    assert tokenizer.encode(text.encode()).ids.tolist() == encoded.ids.tolist()  # bytes as str


def test_ambiguity_codes_become_n_and_are_counted():
    encoded = tokenizer.encode("ARYSWKMBDHVNacgtu")
    assert tokenizer.decode(encoded.ids) == "ANNNNNNNNNNNACGTT" and encoded.n_ambiguous == 10


@pytest.mark.parametrize("bad", ["ACGTE", "ACG-T", "ACGT*", "AC GT", "AC1GT", "ACGTé"])
def test_other_characters_are_refused(bad):
    with pytest.raises(ValueError, match="record 'x' is not DNA"):
        tokenizer.encode(bad, where="record 'x'")


def test_reverse_complement():
    ids = tokenizer.encode("AACGTN").ids
    assert tokenizer.decode(tokenizer.reverse_complement(ids)) == "NACGTT"
    with_sep = np.array([0, 1, tokenizer.SEP_ID, 2], dtype=np.uint8)
    assert tokenizer.reverse_complement(with_sep).tolist() == [1, tokenizer.SEP_ID, 2, 3]
    batch = tokenizer.encode(random_bases(60, "ACGTN")).ids.reshape(3, 20)
    assert np.array_equal(tokenizer.reverse_complement(tokenizer.reverse_complement(batch)), batch)
    assert tokenizer.reverse_complement(batch)[1].tolist() == tokenizer.reverse_complement(batch[1]).tolist()


def test_the_models_complement_map_is_the_tokenizers():
    assert tuple(tokenizer.COMPLEMENT.tolist()) == DNA_COMPLEMENT and tokenizer.VOCAB_SIZE == DNA_VOCAB_SIZE


# ---- held-out splits ---------------------------------------------------------------------

def seqs(*specs) -> list[Sequence]:
    """(file, record, length) -> sequences of random bases."""
    return [Sequence(f, r, tokenizer.encode(random_bases(n)).ids) for f, r, n in specs]


def assert_disjoint(split: Split, sequences: list[Sequence]) -> None:
    assert split.train and split.valid and not overlaps(split)
    # every base of the data is in exactly one side
    covered = {}
    for s in split.train + split.valid:
        for pos in range(s.start, s.start + len(s.ids)):
            key = (s.source, s.name, pos)
            assert key not in covered
            covered[key] = True
    assert len(covered) == sum(len(s.ids) for s in sequences)


def test_split_by_file_trains_on_three_strains_and_holds_out_the_fourth():
    data = seqs(("s1.fa", "chr", 300), ("s1.fa", "p1", 40), ("s2.fa", "chr", 300), ("s3.fa", "chr", 280),
                ("s4.fa.xz", "chr", 310), ("s4.fa.xz", "p", 20))
    split = held_out_split(data)
    assert split.unit == "file" and {s.source for s in split.valid} == {"s4.fa.xz"}
    assert {s.source for s in split.train} == {"s1.fa", "s2.fa", "s3.fa"}
    assert_disjoint(split, data)
    named = held_out_split(data, valid=["s2"])  # by the name without its suffixes
    assert {s.source for s in named.valid} == {"s2.fa"} and "s2.fa" not in {s.source for s in named.train}
    assert_disjoint(named, data)
    with pytest.raises(ValueError, match="none of the files"):
        held_out_split(data, valid=["s9"])
    with pytest.raises(ValueError, match="every file"):
        held_out_split(data, valid=["s1", "s2", "s3", "s4"])


def test_split_by_record_and_by_tail():
    data = seqs(("g.fa", "chr", 900), ("g.fa", "p1", 60), ("g.fa", "p2", 50))
    split = held_out_split(data, valid_fraction=0.1)
    assert split.unit == "record" and [s.name for s in split.valid] == ["p1", "p2"]
    assert_disjoint(split, data)
    big_fraction = held_out_split(data, valid_fraction=0.9)  # one record always stays in training
    assert [s.name for s in big_fraction.train] == ["chr"]
    one = seqs(("g.fa", "chr", 1000))
    tail = held_out_split(one, valid_fraction=0.2)
    assert tail.unit == "tail" and len(tail.valid[0].ids) == 200 and tail.valid[0].start == 800
    assert np.array_equal(np.concatenate([tail.train[0].ids, tail.valid[0].ids]), one[0].ids)
    assert_disjoint(tail, one)


def test_overlap_check_finds_a_shared_base():
    s = seqs(("g.fa", "chr", 100))[0]
    bad = Split([Sequence("g.fa", "chr", s.ids[:60])], [Sequence("g.fa", "chr", s.ids[59:], start=59)], "tail")
    assert overlaps(bad)


# ---- windows -----------------------------------------------------------------------------

def record_of_tokens(stream: Stream) -> np.ndarray:
    """The index of the record each stream token belongs to, -1 for separators."""
    owner = np.full(len(stream), -1)
    for i, (a, b) in enumerate(stream.bounds):
        owner[a:b] = i
    return owner


def test_windows_cross_records_only_over_a_separator():
    data = seqs(("g.fa", "a", 30), ("g.fa", "b", 5), ("g.fa", "c", 40), ("g.fa", "d", 1))
    stream = Stream.of(data)
    assert len(stream) == 76 + 4 and (stream.tokens == tokenizer.SEP_ID).sum() == 4
    for seq, (a, b) in zip(data, stream.bounds):
        assert np.array_equal(stream.tokens[a:b], seq.ids) and stream.tokens[b] == tokenizer.SEP_ID
    owner = record_of_tokens(stream)
    seq_len = 16
    starts = np.arange(len(stream) - seq_len)  # every window
    windows = stream.windows(starts, seq_len)
    for start, window in zip(starts, windows):
        who = owner[start:start + seq_len + 1]
        for x, y in zip(who[:-1], who[1:]):  # two neighbouring bases are of one record
            assert x == -1 or y == -1 or x == y
        assert np.array_equal(window, stream.tokens[start:start + seq_len + 1])
    inputs, targets = splits.inputs_targets(windows)
    assert inputs.shape == targets.shape == (len(starts), seq_len)
    assert ((targets == IGNORE_INDEX) == (windows[:, 1:] == tokenizer.SEP_ID)).all()
    assert (splits.scored(targets) == (windows[:, 1:] < 4)).all()
    with pytest.raises(ValueError, match="fewer than --seq-len"):
        stream.random_starts(np.random.default_rng(0), 2, 200)


def test_reverse_complement_augmentation_reads_the_other_strand():
    stream = Stream.of(seqs(("g.fa", "a", 50), ("g.fa", "b", 50)))
    windows = stream.windows(np.arange(0, 80, 5), 20)
    out = splits.augment_reverse_complement(windows, np.random.default_rng(1))
    flipped = [not np.array_equal(o, w) for o, w in zip(out, windows)]
    assert 0 < sum(flipped) < len(windows)
    for o, w, f in zip(out, windows, flipped):
        assert np.array_equal(o, tokenizer.reverse_complement(w) if f else w)
        assert np.array_equal(o == tokenizer.SEP_ID, (w == tokenizer.SEP_ID)[::-1] if f else w == tokenizer.SEP_ID)


# ---- Markov baseline ---------------------------------------------------------------------

def test_markov_contexts_and_fit():
    tokens = np.array([0, 1, 2, 3, 0], dtype=np.uint8)
    sep = tokenizer.SEP_ID
    assert contexts(tokens, 2).tolist() == [sep * 6 + sep, sep * 6 + 0, 0 * 6 + 1, 1 * 6 + 2, 2 * 6 + 3]
    # an order-1 chain A->C->G->T->A... is learnt exactly: one bit per base is far below 2
    cycle = np.tile(np.arange(4, dtype=np.uint8), 500)
    model = MarkovModel.fit(cycle, 1)
    assert model.bits(cycle, np.arange(1, len(cycle))).mean() < 0.01
    assert MarkovModel.fit(cycle, 0).bits(cycle, np.arange(len(cycle))).mean() == pytest.approx(2.0, abs=1e-3)
    with pytest.raises(ValueError, match="bases"):
        model.bits(np.array([0, 4], dtype=np.uint8), np.array([1]))


def test_markov_samples_keep_the_statistics():
    gen = np.random.default_rng(0)
    genome = np.tile(np.array([0, 0, 1, 2, 3, 3], dtype=np.uint8), 400)  # AACGTT repeated
    model = MarkovModel.fit(genome, 2, alpha=1e-9)  # (almost) no smoothing
    samples = model.sample(np.tile(genome[:2], (8, 1)), 60, gen)
    assert samples.shape == (8, 60) and samples.dtype == np.uint8
    assert (samples == np.tile(genome[:60], (8, 1))).all()  # an order-2 chain of a period-6 sequence is deterministic
    with pytest.raises(ValueError, match="seed contexts"):
        model.sample(genome[None, :1], 10, gen)


# ---- the classifier's negatives: windows cut from Markov chains drawn once -----------------------

def _sampler(seq_len: int, pool_bases: int, genome: np.ndarray | None = None, alpha: float = 1e-9, **kw):
    from mambakit.tasks.dna.classify import Sampler
    if genome is None:
        genome = np.tile(np.array([0, 0, 1, 2, 3, 3], dtype=np.uint8), 1000)  # AACGTT repeated
    stream = Stream.of([Sequence("a.fa", "chr", genome)])
    return Sampler(stream, MarkovModel.fit(genome, 2, alpha=alpha), seq_len, pool_bases=pool_bases, **kw)


def test_classifier_samples_are_windows_of_the_markov_chains():
    """Each random sample is a run of one of the chains drawn once (at varying offsets), not a
    fresh draw: on a random genome an order-2 model is far from deterministic, so a fresh
    50-base draw would match no chain."""
    genome = np.random.default_rng(3).integers(0, 4, 6000).astype(np.uint8)
    sampler = _sampler(seq_len=50, pool_bases=4000, genome=genome, alpha=1.0)
    chains = sampler.chains()
    assert chains.shape[1] >= 50 and chains.shape[0] * chains.shape[1] >= 4000
    samples = sampler.samples(32, np.random.default_rng(1))
    assert samples.shape == (32, 50) and samples.dtype == np.uint8
    flat = [bytes(c) for c in chains]
    found = [[(i, c.find(bytes(r))) for i, c in enumerate(flat) if bytes(r) in c] for r in samples]
    assert all(found)  # every sample lies in a chain
    assert len({at for f in found for _, at in f}) > 8  # at many offsets
    assert sampler.chains() is chains  # drawn once


def test_chains_follow_the_fitted_model():
    """An order-2 chain of a period-6 sequence is deterministic: every chain is a shift of it."""
    sampler = _sampler(seq_len=50, pool_bases=4000)
    period = np.tile(np.array([0, 0, 1, 2, 3, 3], dtype=np.uint8), 20)
    shifts = {bytes(period[i:i + 50]) for i in range(6)}
    assert {bytes(r) for r in sampler.samples(16, np.random.default_rng(0))} <= shifts


def test_held_out_rows_take_one_chain_each():
    """held_out_rows: alternating labels, and the k-th sample row is the start of chain k, so
    no two held-out samples share a base."""
    from mambakit.tasks.dna.classify import GENOME, SAMPLE, held_out_rows
    genome = np.random.default_rng(4).integers(0, 4, 6000).astype(np.uint8)
    sampler = _sampler(seq_len=40, pool_bases=5 * 40, chain_len=40, genome=genome, alpha=1.0)
    rows, labels = held_out_rows(sampler, 9, seed=0)
    assert list(labels) == [GENOME, SAMPLE] * 4 + [GENOME]
    assert (rows[labels == SAMPLE] == sampler.chains()[:4]).all()


def test_markov_sampling_equals_the_per_step_context_recomputation():
    """sample() carries the context code from step to step; the spec recomputes it from the
    `order` tokens before every position. Same random numbers, same sequences."""
    from mambakit.tasks.dna.tokenizer import VOCAB_SIZE
    genome = np.random.default_rng(5).integers(0, 5, 3000).astype(np.uint8)  # with some N
    for order in (0, 1, 3, 5):
        model = MarkovModel.fit(genome, order)
        cum = np.cumsum(np.exp2(model.log2_probs), axis=1)
        cum[:, -1] = 1.0
        for k, length in ((order, 40), (order + 2, 40), (order + 3, order + 1)):
            seeds = np.random.default_rng(order).integers(0, 4, (6, k)).astype(np.uint8)
            got = model.sample(seeds, length, np.random.default_rng(9))
            want = np.zeros((6, length), dtype=np.uint8)
            want[:, :min(k, length)] = seeds[:, :length]
            rng = np.random.default_rng(9)
            for t in range(k, length):
                ctx = np.zeros(6, dtype=np.int64)
                for j in range(t - order, t):
                    ctx = ctx * VOCAB_SIZE + want[:, j]
                want[:, t] = (rng.random(6)[:, None] > cum[ctx]).sum(1)
            assert (got == want).all(), (order, k, length)


def test_held_out_samples_are_distinct_chains_and_a_short_pool_is_refused():
    sampler = _sampler(seq_len=40, pool_bases=5 * 40, chain_len=40)
    distinct = sampler.samples(5, np.random.default_rng(0), distinct=True)
    assert (distinct == sampler.chains()[:5]).all()  # row i is the start of chain i
    with pytest.raises(ValueError, match="distinct samples"):
        sampler.samples(6, np.random.default_rng(0), distinct=True)
    with pytest.raises(ValueError, match="chain_len"):
        _sampler(seq_len=40, pool_bases=400, chain_len=20).chains()


def test_a_long_window_batch_costs_one_draw_of_the_chains(monkeypatch):
    """The Markov model is sampled once per sampler (a loop over positions for all chains at
    once), not once per batch: drawing each batch's samples base by base made the long windows'
    steps host-bound."""
    sampler = _sampler(seq_len=3000, pool_bases=6000)
    calls = []
    original = MarkovModel.sample
    monkeypatch.setattr(MarkovModel, "sample", lambda self, *a: calls.append(a[1]) or original(self, *a))
    rng = np.random.default_rng(0)
    for _ in range(4):
        sampler.rows(np.zeros(4, dtype=np.int64), np.array([0, 1, 0, 1]), rng)
    assert len(calls) == 1 and calls[0] >= 3000  # one draw, of chains at least a window long
