"""Token sampling: parameters, penalties, filtering and the random draw.

NumPy only (no torch), so the CPU backend and tests run anywhere.

One :class:`Sampler` is made per request. It owns a ``numpy.random.Generator``
seeded from ``SamplingParams.seed``; the same seed and the same sequence of
logits give the same tokens.

Pipeline applied by :meth:`Sampler.sample` / :meth:`Sampler.probs`, in order:

1. penalties (:meth:`Sampler.apply_penalties`):
   repetition penalty over prompt+output tokens (CTRL / HF style), then
   presence and frequency penalties over output tokens (OpenAI / vLLM style);
2. padding mask: logits at index >= ``vocab_size`` (checkpoint padding rows)
   are set to -inf, so they are never chosen, greedy included;
3. greedy: if ``temperature == 0`` or ``top_k == 1`` return the argmax
   (ties -> lowest index); nothing below runs and no randomness is consumed;
4. temperature: ``logits / temperature`` (float64 from here on);
5. top_k: keep the ``k`` largest logits (``np.argpartition``; exactly k kept);
6. softmax over the kept tokens;
7. top_p: keep the smallest set of most-probable tokens whose cumulative
   probability (of the post-top_k, renormalized distribution) is >= top_p;
   the most probable token is always kept. Skipped (no sort) when top_p == 1;
8. min_p: drop tokens whose probability is < ``min_p * max_prob``;
9. renormalize and draw one token with the request's generator.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import SamplingError

__all__ = ["SamplingParams", "Sampler"]

# Relative slack for the top_p / min_p boundary comparisons. Logits arrive as
# float32, so a probability is only known to ~1e-7 relative; without slack a
# nucleus whose exact cumulative probability equals top_p (or a token exactly at
# min_p * max_prob) could land a few ulps short and flip the boundary.
_BOUNDARY_EPS = 1e-6


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _nucleus(probs: np.ndarray, target: float) -> np.ndarray:
    """Sorted positions of the smallest most-probable set with sum >= target.

    The top-1 is always kept; ties are taken lowest position first. To avoid
    sorting a 250k vocab every token, the top ``m`` are selected with
    ``argpartition`` (m = 256, 1024, ...) and only those are sorted; the full
    sort is the fallback when the nucleus is wider than that.
    """
    n = probs.size
    m = 256
    while True:
        if m >= n // 2:
            cand = np.arange(n)
        else:
            cand = np.argpartition(-probs, m - 1)[:m]
            cand.sort()  # so the stable sort below breaks ties by position
            if probs[cand].sum() < target:
                m *= 4
                continue
        order = cand[np.argsort(-probs[cand], kind="stable")]
        cum = np.cumsum(probs[order])
        cut = int(np.searchsorted(cum, target, side="left"))
        return np.sort(order[:min(cut + 1, order.size)])


@dataclass
class SamplingParams:
    """How to pick tokens for one request.

    Attributes:
        temperature: Float that controls randomness. Logits are divided by it
            before the softmax; lower is more deterministic, 0 means greedy
            (argmax). Must be >= 0.
        top_k: Integer number of most likely tokens to keep. 0 or -1 disables
            it; 1 is greedy.
        top_p: Float in (0, 1]: keep the smallest set of most likely tokens
            whose cumulative probability is >= top_p. 1 disables it.
        min_p: Float in [0, 1]: drop tokens whose probability is less than
            ``min_p`` times the probability of the most likely token.
            0 disables it.
        repetition_penalty: Float > 0 applied to every token already in the
            prompt or the output (CTRL / HF style): positive logits are divided
            by it, others multiplied. > 1 discourages repeats, 1 disables it.
        presence_penalty: Float in [-2, 2] subtracted once from the logit of
            every token that appears in the output so far. Positive values
            encourage new tokens. Prompt tokens are not counted.
        frequency_penalty: Float in [-2, 2] multiplied by how many times a
            token appears in the output so far and subtracted from its logit.
            Prompt tokens are not counted.
        max_tokens: Maximum number of tokens to generate (>= 1).
        stop: Strings that stop generation when they appear in the output
            text (handled by the streaming detokenizer). A single string or
            None is normalized to a list.
        stop_token_ids: Token ids that stop generation when sampled, whatever
            ``ignore_eos`` says. None is normalized to an empty list.
        ignore_eos: Whether to keep generating after the model's EOS token.
        seed: Seed for the request's random generator; same seed, same
            params, same model => same output. None draws fresh entropy.
        n: Number of completions per prompt. Only 1 is supported.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        def bad(field: str, value, why: str) -> SamplingError:
            return SamplingError(f"SamplingParams.{field}={value!r}: {why}")

        # -- floats ---------------------------------------------------------
        for field in ("temperature", "top_p", "min_p", "repetition_penalty",
                      "presence_penalty", "frequency_penalty"):
            value = getattr(self, field)
            if not _is_real(value):
                raise bad(field, value, "must be a number")
            if math.isnan(value):
                raise bad(field, value, "must not be NaN")
            setattr(self, field, float(value))

        if not self.temperature >= 0.0 or math.isinf(self.temperature):
            raise bad("temperature", self.temperature,
                      "must be a finite number >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", self.top_p, "must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", self.min_p, "must be in [0, 1]")
        if not 0.0 < self.repetition_penalty < math.inf:
            raise bad("repetition_penalty", self.repetition_penalty,
                      "must be a finite number > 0 (1 = off)")
        for field in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, field)
            if not -2.0 <= value <= 2.0:
                raise bad(field, value, "must be in [-2, 2]")

        # -- ints -----------------------------------------------------------
        for field in ("top_k", "max_tokens", "n"):
            value = getattr(self, field)
            if not _is_int(value):
                raise bad(field, value, "must be an integer")
            setattr(self, field, int(value))
        if self.top_k < -1:
            raise bad("top_k", self.top_k, "must be >= -1 (0 or -1 = off)")
        if self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, "must be >= 1")
        if self.n != 1:
            raise bad("n", self.n, "only n=1 is supported")
        if self.seed is not None:
            if not _is_int(self.seed):
                raise bad("seed", self.seed, "must be an integer or None")
            if self.seed < 0:
                raise bad("seed", self.seed, "must be >= 0")
            self.seed = int(self.seed)
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise bad("ignore_eos", self.ignore_eos, "must be True or False")
        self.ignore_eos = bool(self.ignore_eos)

        # -- stop strings ---------------------------------------------------
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            try:
                stop = list(self.stop)
            except TypeError:
                raise bad("stop", self.stop,
                          "must be a string, a list of strings or None") from None
            for s in stop:
                if not isinstance(s, str):
                    raise bad("stop", self.stop, f"entry {s!r} is not a string")
                if s == "":
                    raise bad("stop", self.stop, "stop strings must be non-empty")
            self.stop = stop

        # -- stop token ids -------------------------------------------------
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        else:
            if isinstance(self.stop_token_ids, (str, bytes)) or _is_int(self.stop_token_ids):
                raise bad("stop_token_ids", self.stop_token_ids,
                          "must be a list of integer token ids or None")
            try:
                ids = list(self.stop_token_ids)
            except TypeError:
                raise bad("stop_token_ids", self.stop_token_ids,
                          "must be a list of integer token ids or None") from None
            for t in ids:
                if not _is_int(t):
                    raise bad("stop_token_ids", self.stop_token_ids,
                              f"entry {t!r} is not an integer token id")
                if t < 0:
                    raise bad("stop_token_ids", self.stop_token_ids,
                              f"entry {t!r} is negative")
            self.stop_token_ids = [int(t) for t in ids]

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0.0 or self.top_k == 1


class Sampler:
    """Samples the next token of one request. See the module docstring for the order.

    Args:
        params: the request's :class:`SamplingParams`.
        vocab_size: number of real tokenizer pieces. Logits at index >=
            vocab_size (checkpoint padding rows) are never sampled. None means
            every logit is a real token.
    """

    def __init__(self, params: SamplingParams, vocab_size: int | None = None):
        if not isinstance(params, SamplingParams):
            raise SamplingError(
                f"Sampler needs a SamplingParams, got {type(params).__name__}")
        if vocab_size is not None:
            if not _is_int(vocab_size) or vocab_size < 1:
                raise SamplingError(
                    f"Sampler vocab_size={vocab_size!r}: must be a positive integer or None")
            vocab_size = int(vocab_size)
        self.params = params
        self.vocab_size = vocab_size
        self.rng = np.random.default_rng(params.seed)
        self._stop_ids = frozenset(params.stop_token_ids)

    # ------------------------------------------------------------------ stop

    def is_stop_token(self, token_id: int, eos_ids: Sequence[int]) -> bool:
        """Whether generation ends after ``token_id``.

        ``stop_token_ids`` always stop; EOS ids stop unless ``ignore_eos``.
        """
        token_id = int(token_id)
        if token_id in self._stop_ids:
            return True
        if not self.params.ignore_eos and token_id in {int(e) for e in eos_ids}:
            return True
        return False

    # ------------------------------------------------------------- penalties

    @staticmethod
    def _check_logits(logits) -> np.ndarray:
        logits = np.asarray(logits)
        if logits.ndim != 1 or logits.size == 0:
            raise SamplingError(
                f"sampler expects a non-empty 1-D logits vector, got shape {logits.shape}")
        return logits

    @staticmethod
    def _ids(ids: Sequence[int], n: int) -> np.ndarray:
        """Token ids as int64, dropping any outside [0, n)."""
        arr = np.asarray(ids if ids is not None else [], dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= n):
            arr = arr[(arr >= 0) & (arr < n)]
        return arr

    def apply_penalties(self, logits: np.ndarray, prompt_ids: Sequence[int],
                        output_ids: Sequence[int]) -> np.ndarray:
        """Return a new float32 array with the penalties applied.

        - repetition_penalty over the set of prompt + output tokens:
          logit > 0 -> logit / penalty, else logit * penalty;
        - then, over output tokens only:
          logit -= presence_penalty * (count > 0) + frequency_penalty * count.

        Ids outside the logits vector are ignored.
        """
        logits = self._check_logits(logits)
        out = np.array(logits, dtype=np.float32, copy=True)
        p = self.params
        n = out.shape[0]
        out_ids = self._ids(output_ids, n)

        if p.repetition_penalty != 1.0:
            seen = np.unique(np.concatenate([self._ids(prompt_ids, n), out_ids]))
            if seen.size:
                vals = out[seen]
                out[seen] = np.where(vals > 0, vals / np.float32(p.repetition_penalty),
                                     vals * np.float32(p.repetition_penalty))

        if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and out_ids.size:
            tokens, counts = np.unique(out_ids, return_counts=True)
            delta = p.presence_penalty + p.frequency_penalty * counts.astype(np.float64)
            out[tokens] = (out[tokens].astype(np.float64) - delta).astype(np.float32)
        return out

    # -------------------------------------------------------------- sampling

    def _prepare(self, logits, prompt_ids, output_ids) -> np.ndarray:
        """Penalties applied, padding rows past vocab_size cut off: a float32 vector.

        Without penalties the logits are not copied (nothing below writes to
        them): a batch's step samples every sequence, and copying 50k logits
        each was most of a greedy step's sampling time."""
        p = self.params
        if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            x = self.apply_penalties(logits, prompt_ids, output_ids)
        else:
            x = np.asarray(self._check_logits(logits), dtype=np.float32)
        if self.vocab_size is not None and self.vocab_size < x.shape[0]:
            x = x[:self.vocab_size]
        return x

    def _distribution(self, logits, prompt_ids, output_ids):
        """Return (greedy_token, None, None) or (None, token_indices, probs).

        In the sampling case ``probs`` is float64, >= 0, sums to 1, and lines
        up with ``token_indices`` (None means all tokens, in order). Entries
        may be 0 (filtered out); they are never drawn.
        """
        p = self.params
        x = self._prepare(logits, prompt_ids, output_ids)
        best = int(np.argmax(x))  # first max -> lowest index on ties; the first NaN if any
        if np.isnan(x[best]):
            raise SamplingError(f"logits contain NaN (first at index {best}); "
                                "the model produced non-finite output")
        if x[best] == -np.inf:
            raise SamplingError("every logit is -inf; nothing can be sampled")
        if p.greedy:
            return best, None, None

        if x[best] == np.inf:
            raise SamplingError(f"logit {best} is +inf; the model produced non-finite output")
        n = x.shape[0]
        # shift so the max is 0 before dividing: a tiny temperature cannot
        # overflow to inf (and inf - inf = NaN); -inf stays -inf
        scaled = (x.astype(np.float64) - float(x[best])) / p.temperature

        # top_k: the k largest (exactly k; ties at the boundary broken by argpartition)
        k = p.top_k
        if 0 < k < n:
            idx = np.argpartition(-scaled, k - 1)[:k]
            idx.sort()  # ascending token id: deterministic order, lowest id first on ties
            vals = scaled[idx]
        else:
            idx, vals = None, scaled  # None = every token, in order (no copy)

        # softmax (float64; max of vals is 0); -inf entries get probability 0
        probs = np.exp(vals)
        probs /= probs.sum()

        # top_p: minimal nucleus with cumulative prob >= top_p, top-1 always kept
        if p.top_p < 1.0:
            keep = _nucleus(probs, p.top_p * (1.0 - _BOUNDARY_EPS))
            idx = keep if idx is None else idx[keep]
            probs = probs[keep]

        # min_p: drop tokens with prob < min_p * max_prob
        if p.min_p > 0.0:
            threshold = p.min_p * probs.max() * (1.0 - _BOUNDARY_EPS)
            probs = np.where(probs >= threshold, probs, 0.0)

        # renormalize (zero entries stay zero and are never drawn)
        probs /= probs.sum()
        return None, idx, probs

    def probs(self, logits: np.ndarray, prompt_ids: Sequence[int] = (),
              output_ids: Sequence[int] = ()) -> np.ndarray:
        """The final float64 distribution :meth:`sample` draws from, full length.

        Greedy settings give a one-hot vector at the argmax. Consumes no
        randomness.
        """
        logits = self._check_logits(logits)
        out = np.zeros(logits.shape[0], dtype=np.float64)
        token, idx, probs = self._distribution(logits, prompt_ids, output_ids)
        if token is not None:
            out[token] = 1.0
        elif idx is None:
            out[:probs.size] = probs       # rows past vocab_size stay 0
        else:
            out[idx] = probs
        return out

    def sample(self, logits: np.ndarray, prompt_ids: Sequence[int] = (),
               output_ids: Sequence[int] = ()) -> int:
        """Pick the next token id from a 1-D logits vector.

        Greedy settings return the argmax without touching the generator;
        otherwise exactly one uniform number is drawn.
        """
        token, idx, probs = self._distribution(logits, prompt_ids, output_ids)
        if token is not None:
            return token
        cdf = np.cumsum(probs)
        u = self.rng.random() * cdf[-1]
        # side="right": token j is drawn iff cdf[j-1] <= u < cdf[j], so a
        # zero-probability token can never be drawn.
        j = min(int(np.searchsorted(cdf, u, side="right")), cdf.size - 1)
        while probs[j] == 0.0:  # only reachable through float round-off at the top end
            j -= 1
        return j if idx is None else int(idx[j])
