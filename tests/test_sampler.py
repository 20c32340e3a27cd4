"""Tests for runtime.sampler (numpy only, no timing)."""

import math
import sys

import numpy as np
import pytest

from runtime.errors import SamplingError
from runtime.sampler import Sampler, SamplingParams


def logits_from_probs(probs):
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


RNG = np.random.default_rng(1234)
RANDOM_LOGITS = RNG.normal(0, 2, size=64).astype(np.float32)


# ---------------------------------------------------------------- greedy


def test_temperature_zero_is_argmax():
    s = Sampler(SamplingParams(temperature=0.0))
    for _ in range(20):
        x = RNG.normal(size=100).astype(np.float32)
        assert s.sample(x, [], []) == int(np.argmax(x))
    p = s.probs(RANDOM_LOGITS, [], [])
    assert p[np.argmax(RANDOM_LOGITS)] == 1.0 and p.sum() == 1.0


def test_greedy_ties_lowest_index():
    s = Sampler(SamplingParams(temperature=0.0))
    assert s.sample(np.array([0.0, 3.0, 1.0, 3.0], np.float32), [], []) == 1


def test_top_k_1_equals_greedy_at_temperature_1():
    x = np.zeros(50, np.float32)
    x[7] = 0.5  # close call: a random draw would often pick something else
    s = Sampler(SamplingParams(temperature=1.0, top_k=1, seed=0))
    assert all(s.sample(x, [], []) == 7 for _ in range(100))
    # control: without top_k the same logits do not always give 7
    c = Sampler(SamplingParams(temperature=1.0, seed=0))
    assert any(c.sample(x, [], []) != 7 for _ in range(100))


def test_greedy_consumes_no_randomness():
    for params in (SamplingParams(temperature=0, seed=3), SamplingParams(top_k=1, seed=3)):
        s = Sampler(params)
        before = s.rng.bit_generator.state
        assert s.sample(np.array([0.0, 3.0, 1.0, 3.0], np.float32), [], []) == 1
        assert s.rng.bit_generator.state == before


# ---------------------------------------------------------------- seeds


def test_same_seed_reproduces_and_other_seed_differs():
    seq = [RNG.normal(size=200).astype(np.float32) for _ in range(50)]

    def run(seed):
        s = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [s.sample(x, [], []) for x in seq]

    a, b, c = run(42), run(42), run(43)
    assert a == b
    assert a != c


def test_no_seed_uses_fresh_entropy():
    x = np.zeros(1000, np.float32)
    a = [Sampler(SamplingParams()).sample(x, [], []) for _ in range(5)]
    assert len(set(a)) > 1


# ---------------------------------------------------------------- temperature


@pytest.mark.parametrize("t", [0.25, 0.7, 1.0, 1.5, 3.0])
def test_temperature_matches_softmax(t):
    s = Sampler(SamplingParams(temperature=t))
    np.testing.assert_allclose(s.probs(RANDOM_LOGITS, [], []),
                               softmax(RANDOM_LOGITS.astype(np.float64) / t),
                               rtol=1e-9, atol=1e-15)


def test_temperature_changes_distribution():
    p1 = Sampler(SamplingParams(temperature=1.0)).probs(RANDOM_LOGITS, [], [])
    p2 = Sampler(SamplingParams(temperature=2.0)).probs(RANDOM_LOGITS, [], [])
    assert not np.allclose(p1, p2)


def test_tiny_temperature_is_near_greedy_without_nan():
    s = Sampler(SamplingParams(temperature=1e-300, seed=0))
    p = s.probs(RANDOM_LOGITS, [], [])
    assert p[np.argmax(RANDOM_LOGITS)] == 1.0
    assert s.sample(RANDOM_LOGITS, [], []) == int(np.argmax(RANDOM_LOGITS))


# ---------------------------------------------------------------- top_k


@pytest.mark.parametrize("k", [2, 5, 17, 63])
def test_top_k_keeps_exactly_k(k):
    s = Sampler(SamplingParams(top_k=k))
    p = s.probs(RANDOM_LOGITS, [], [])
    kept = np.flatnonzero(p > 0)
    assert kept.size == k
    expect = np.sort(np.argsort(-RANDOM_LOGITS)[:k])
    np.testing.assert_array_equal(kept, expect)
    np.testing.assert_allclose(p[kept], softmax(RANDOM_LOGITS[kept]), rtol=1e-9)


@pytest.mark.parametrize("k", [0, -1, 64, 1000])
def test_top_k_off(k):
    p = Sampler(SamplingParams(top_k=k)).probs(RANDOM_LOGITS, [], [])
    np.testing.assert_allclose(p, softmax(RANDOM_LOGITS), rtol=1e-9)


def test_top_k_samples_only_kept():
    x = np.zeros(100, np.float32)
    x[[3, 50, 99]] = 0.1
    s = Sampler(SamplingParams(top_k=3, seed=5))
    assert {s.sample(x, [], []) for _ in range(300)} == {3, 50, 99}


# ---------------------------------------------------------------- top_p


P4 = [0.5, 0.3, 0.15, 0.05]


@pytest.mark.parametrize("top_p,kept", [
    (0.3, [0]), (0.5, [0]),              # top-1 alone reaches it (boundary included)
    (0.5 + 1e-4, [0, 1]),
    (0.8 - 1e-4, [0, 1]), (0.8, [0, 1]),  # 0.5 + 0.3 == 0.8 exactly -> 2 tokens
    (0.8 + 1e-4, [0, 1, 2]),
    (0.95, [0, 1, 2]), (0.95 + 1e-4, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3]),
])
def test_top_p_minimal_nucleus(top_p, kept):
    # shuffle positions so the nucleus is not just a prefix
    perm = np.array([2, 0, 3, 1])  # token perm[i] has prob P4[i]
    probs = np.zeros(4)
    probs[perm] = P4
    s = Sampler(SamplingParams(top_p=top_p))
    p = s.probs(logits_from_probs(probs), [], [])
    kept_tokens = sorted(perm[kept].tolist())
    assert np.flatnonzero(p > 0).tolist() == kept_tokens
    np.testing.assert_allclose(p[kept_tokens], probs[kept_tokens] / probs[kept_tokens].sum(),
                               rtol=1e-6)


def test_top_p_tiny_keeps_top_one():
    p = Sampler(SamplingParams(top_p=1e-9)).probs(RANDOM_LOGITS, [], [])
    assert np.flatnonzero(p).tolist() == [int(np.argmax(RANDOM_LOGITS))]


def test_top_p_after_top_k_uses_renormalized_probs():
    # top_k=2 leaves [0.5, 0.3] -> renormalized [0.625, 0.375]; top_p=0.6 keeps 1
    s = Sampler(SamplingParams(top_k=2, top_p=0.6))
    p = s.probs(logits_from_probs(P4), [], [])
    assert np.flatnonzero(p).tolist() == [0]


# ---------------------------------------------------------------- min_p


def test_min_p_drops_exactly_below_threshold():
    probs = np.array([0.05, 0.4, 0.2, 0.1, 0.25])
    # threshold 0.5 * 0.4 = 0.2: keep 0.4, 0.25 and 0.2 (equal kept), drop 0.1, 0.05
    p = Sampler(SamplingParams(min_p=0.5)).probs(logits_from_probs(probs), [], [])
    assert np.flatnonzero(p > 0).tolist() == [1, 2, 4]
    np.testing.assert_allclose(p[[1, 2, 4]], np.array([0.4, 0.2, 0.25]) / 0.85, rtol=1e-6)
    # threshold 0.26 * 0.4 = 0.104: only 0.1 and 0.05 below
    p = Sampler(SamplingParams(min_p=0.26)).probs(logits_from_probs(probs), [], [])
    assert np.flatnonzero(p > 0).tolist() == [1, 2, 4]
    p = Sampler(SamplingParams(min_p=0.24)).probs(logits_from_probs(probs), [], [])
    assert np.flatnonzero(p > 0).tolist() == [1, 2, 3, 4]
    p = Sampler(SamplingParams(min_p=1.0)).probs(logits_from_probs(probs), [], [])
    assert np.flatnonzero(p > 0).tolist() == [1]


# ---------------------------------------------------------------- penalties


def test_repetition_penalty_ctrl_style():
    x = np.array([2.0, -2.0, 3.0, -1.0, 0.0], np.float32)
    s = Sampler(SamplingParams(repetition_penalty=2.0))
    out = s.apply_penalties(x, prompt_ids=[0], output_ids=[1, 1, 4])
    assert out.dtype == np.float32
    assert out[0] == 1.0      # positive: divided (prompt token)
    assert out[1] == -4.0     # negative: multiplied (output token, counted once)
    assert out[2] == 3.0      # not seen: unchanged
    assert out[3] == -1.0
    assert out[4] == 0.0
    assert x[0] == 2.0        # input not modified


def test_repetition_penalty_changes_sampling():
    x = np.array([5.0, 4.0], np.float32)
    prompt = [0]
    assert Sampler(SamplingParams(temperature=0)).sample(x, prompt, []) == 0
    assert Sampler(SamplingParams(temperature=0, repetition_penalty=2.0)).sample(x, prompt, []) == 1


def test_presence_and_frequency_penalties():
    x = np.array([1.0, 1.0, 1.0, 1.0, 1.0], np.float32)
    s = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    out = s.apply_penalties(x, prompt_ids=[3, 3, 3, 4], output_ids=[0, 1, 1, 1, 4])
    np.testing.assert_allclose(out, [1.0 - 0.5 - 0.25,      # count 1
                                     1.0 - 0.5 - 3 * 0.25,  # count 3
                                     1.0,                   # never seen
                                     1.0,                   # prompt only: ignored
                                     1.0 - 0.5 - 0.25],     # prompt + output: output count 1
                               rtol=0, atol=1e-6)


def test_presence_only_and_frequency_only():
    x = np.zeros(3, np.float32)
    out = Sampler(SamplingParams(presence_penalty=1.5)).apply_penalties(x, [2], [0, 0, 0, 1])
    np.testing.assert_allclose(out, [-1.5, -1.5, 0.0], atol=1e-6)
    out = Sampler(SamplingParams(frequency_penalty=-0.5)).apply_penalties(x, [2], [0, 0, 0, 1])
    np.testing.assert_allclose(out, [1.5, 0.5, 0.0], atol=1e-6)


def test_penalties_flow_into_probs():
    x = np.zeros(4, np.float32)
    s = Sampler(SamplingParams(frequency_penalty=1.0))
    p = s.probs(x, [], [2, 2])
    np.testing.assert_allclose(p, softmax([0, 0, -2, 0]), rtol=1e-6)


def test_no_penalties_is_identity_copy():
    x = RANDOM_LOGITS.copy()
    out = Sampler(SamplingParams()).apply_penalties(x, [1, 2, 3], [1, 1])
    np.testing.assert_array_equal(out, x)
    assert out is not x


# ---------------------------------------------------------------- padding


def test_padding_rows_never_sampled():
    x = np.zeros(12, np.float32)
    x[10] = 50.0  # padding row, largest logit
    x[11] = 40.0
    x[3] = 1.0
    assert Sampler(SamplingParams(temperature=0), vocab_size=10).sample(x, [], []) == 3
    assert Sampler(SamplingParams(top_k=1), vocab_size=10).sample(x, [], []) == 3
    s = Sampler(SamplingParams(temperature=2.0, seed=0), vocab_size=10)
    draws = {s.sample(x, [], []) for _ in range(500)}
    assert draws and max(draws) < 10
    p = s.probs(x, [], [])
    assert p[10:].sum() == 0.0
    np.testing.assert_allclose(p[:10], softmax(x[:10] / 2.0), rtol=1e-9)
    # control: without vocab_size the padding row wins
    assert Sampler(SamplingParams(temperature=0)).sample(x, [], []) == 10


def test_padding_with_top_k_larger_than_vocab():
    x = np.zeros(6, np.float32)
    x[4:] = 100.0
    p = Sampler(SamplingParams(top_k=5), vocab_size=4).probs(x, [], [])
    np.testing.assert_allclose(p, [0.25, 0.25, 0.25, 0.25, 0, 0])


# ---------------------------------------------------------------- stop


def test_stop_token_ids_and_eos():
    s = Sampler(SamplingParams(stop_token_ids=[7, 9]))
    assert s.is_stop_token(7, eos_ids=[2])
    assert s.is_stop_token(9, eos_ids=[])
    assert s.is_stop_token(2, eos_ids=[2])
    assert not s.is_stop_token(3, eos_ids=[2])


def test_ignore_eos():
    s = Sampler(SamplingParams(stop_token_ids=[7], ignore_eos=True))
    assert not s.is_stop_token(2, eos_ids=[2])
    assert s.is_stop_token(7, eos_ids=[2])  # stop_token_ids still stop


def test_stop_normalization():
    assert SamplingParams().stop == []
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams().stop_token_ids == []
    assert SamplingParams(stop_token_ids=(np.int64(3), 4)).stop_token_ids == [3, 4]


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf),
    ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", math.nan), ("top_p", -0.5),
    ("min_p", -0.01), ("min_p", 1.5), ("min_p", math.nan),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("repetition_penalty", math.nan),
    ("top_k", -2), ("top_k", 2.5),
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 1.5),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("presence_penalty", math.nan),
    ("frequency_penalty", 3.0), ("frequency_penalty", -2.5), ("frequency_penalty", math.nan),
    ("stop_token_ids", [1, 2.0]), ("stop_token_ids", ["a"]), ("stop_token_ids", 5),
    ("stop_token_ids", [-1]),
    ("stop", [1]), ("stop", 3),
    ("seed", 1.5), ("seed", "x"),
    ("n", 2), ("n", 0),
])
def test_invalid_params_raise_naming_field(field, value):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**{field: value})
    assert field in str(e.value)


def test_valid_boundaries_accepted():
    SamplingParams(temperature=0, top_p=1.0, min_p=0.0, top_k=-1, max_tokens=1,
                   presence_penalty=-2, frequency_penalty=2, repetition_penalty=0.01)
    SamplingParams(min_p=1.0, top_p=1e-6, top_k=0, presence_penalty=2,
                   frequency_penalty=-2, seed=0, n=1)


def test_nan_logits_raise():
    x = np.zeros(4, np.float32)
    x[2] = np.nan
    with pytest.raises(SamplingError):
        Sampler(SamplingParams()).sample(x, [], [])


# ---------------------------------------------------------------- empirical


def test_empirical_frequencies_match_probs():
    x = np.array([2.0, 1.0, 0.5, 0.0, -1.0, 1.5, 3.0, -0.5], np.float32)
    s = Sampler(SamplingParams(temperature=0.8, top_k=6, top_p=0.95, min_p=0.05, seed=2024))
    p = s.probs(x, [], [])
    n = 20000
    counts = np.bincount([s.sample(x, [], []) for _ in range(n)], minlength=x.size)
    assert counts[p == 0].sum() == 0
    kept = p > 0
    expected = n * p[kept]
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    dof = int(kept.sum()) - 1
    # ~5 sigma above the chi-square mean (var = 2*dof)
    assert chi2 < dof + 5 * math.sqrt(2 * dof) + 5, (chi2, dof, counts, expected)
    # and each frequency within 5 sigma of its binomial expectation
    sigma = np.sqrt(n * p[kept] * (1 - p[kept]))
    assert np.all(np.abs(counts[kept] - expected) < 5 * sigma + 1)


# ---------------------------------------------------------------- misc


def test_large_vocab_runs():
    x = np.random.default_rng(0).normal(size=151_936).astype(np.float32)
    s = Sampler(SamplingParams(temperature=0.7, top_k=50, top_p=0.9, seed=1), vocab_size=151_000)
    t = s.sample(x, list(range(100)), [5, 6])
    assert 0 <= t < 151_000


def test_cpu_path_does_not_import_torch():
    import subprocess
    code = "import sys, runtime.sampler; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))


@pytest.mark.parametrize("params", [SamplingParams(temperature=0),
                                    SamplingParams(temperature=0.7, seed=1),
                                    SamplingParams(temperature=0, repetition_penalty=1.3)],
                         ids=["greedy", "sampled", "penalized"])
def test_nan_logits_are_an_error_and_logits_are_never_written(params):
    x = np.linspace(-1, 1, 12).astype(np.float32)
    x[7], x[5] = np.nan, np.nan
    with pytest.raises(SamplingError, match=r"logits contain NaN \(first at index 5\)"):
        Sampler(params).sample(x.copy(), [1, 2], [3])
    # a NaN in the padding rows past vocab_size is never looked at
    y = np.linspace(-1, 1, 12).astype(np.float32)
    y[10] = np.nan
    before = y.copy()
    tok = Sampler(params, vocab_size=10).sample(y, [1, 2], [3])
    assert 0 <= tok < 10
    np.testing.assert_array_equal(y, before)   # the caller's logits are untouched
