"""Metrics, decoding and the audio front end against outside references: sacrebleu's BLEU, brute-force recall@K,
exhaustive enumeration for beam search, librosa's mel filterbank with numpy's FFT for log-mel, and a perplexity
computed here from the model's logits over unevenly padded batches."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmt.config.model import DecoderConfig, ModelConfig
from mmt.model.decoder import CaptionDecoder
from mmt.training.metrics import corpus_bleu, recall_at_k


def test_log_mel_matches_librosa_filterbank_and_numpy_stft():
    """Matched parameters: periodic Hann window, centred frames with reflect padding, power 2, HTK mel scale with
    Slaney area normalisation (librosa.filters.mel(htk=True, norm="slaney")), log10(mel + 1e-6).
    The STFT is numpy's rfft over frames cut here: librosa.stft itself would first compile numba kernels
    (~25 s on a fresh install) for the same arithmetic."""
    import librosa
    import scipy.signal

    from mmt.audio.melspec import LogMelSpectrogram, mel_filterbank

    sr, n_fft, hop, n_mels = 4000, 128, 64, 16
    fb = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, htk=True, norm="slaney")  # (n_mels, freqs)
    np.testing.assert_allclose(mel_filterbank(n_fft, n_mels, sr).numpy().T, fb, rtol=1e-5, atol=1e-8)

    rng = np.random.default_rng(0)
    t = np.arange(2000) / sr
    y = (np.sin(2 * np.pi * 440 * t) + 0.3 * rng.standard_normal(2000)).astype(np.float32)
    padded = np.pad(y.astype(np.float64), n_fft // 2, mode="reflect")
    frames = np.stack([padded[i : i + n_fft] for i in range(0, len(padded) - n_fft + 1, hop)])
    window = scipy.signal.get_window("hann", n_fft, fftbins=True)
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2  # (frames, freqs)
    expected = np.log10(power @ fb.T + 1e-6)
    got = LogMelSpectrogram(sr, n_fft, hop, n_mels)(torch.from_numpy(y))[0].numpy()
    assert got.shape == expected.shape == (2000 // hop + 1, n_mels)
    # fp32 STFT against fp64: log10 agrees to ~1e-5 wherever the band has energy
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def _random_corpus(rng: random.Random, n: int):
    vocab = ["a", "b", "c"]
    hyps, refs = [], []
    for _ in range(n):
        hyps.append([rng.choice(vocab) for _ in range(rng.randint(3, 12))])
        refs.append([[rng.choice(vocab) for _ in range(rng.randint(3, 12))] for _ in range(2)])
    return hyps, refs


def test_corpus_bleu4_matches_sacrebleu():
    """sacrebleu with whitespace tokens, no smoothing, closest reference length: the same definition
    (Papineni et al. 2002), on 30 random corpora over a 3-word vocabulary (plenty of 4-gram matches)."""
    import sacrebleu

    rng = random.Random(0)
    checked = 0
    for _ in range(30):
        hyps, refs = _random_corpus(rng, rng.randint(1, 8))
        ref_streams = [[" ".join(r[i]) for r in refs] for i in range(2)]
        expected = sacrebleu.corpus_bleu(
            [" ".join(h) for h in hyps], ref_streams, tokenize="none", smooth_method="none", force=True
        ).score
        got = corpus_bleu(hyps, refs)
        assert got * 100 == pytest.approx(expected, abs=1e-9), (hyps, refs)
        checked += expected > 0
    assert checked >= 10  # most corpora have a non-zero score, so the precisions are really compared


def _brute_force_recall(sims: torch.Tensor, groups: list[int], k: int) -> float:
    """Sort each query's gallery by score (ties: non-matching items first, i.e. against the query) and look
    at whether a matching item is among the first k."""
    hits = 0
    for i in range(sims.shape[0]):
        order = sorted(range(sims.shape[1]), key=lambda j, i=i: (-float(sims[i, j]), groups[j] == groups[i]))
        hits += any(groups[j] == groups[i] for j in order[:k])
    return hits / sims.shape[0]


@pytest.mark.parametrize("ties", [False, True])
def test_recall_at_k_matches_brute_force(ties):
    g = torch.Generator().manual_seed(0)
    n, d = 40, 6
    q = torch.randn(n, d, generator=g)
    gal = q + torch.randn(n, d, generator=g)  # row i matches query i, noisily
    if ties:  # few distinct scores: ties everywhere
        q, gal = q.sign(), gal.sign()
    groups = torch.randint(0, 25, (n,), generator=g)
    got = recall_at_k(q, gal, ks=(1, 3, 5, 10), groups=groups)
    sims = q @ gal.t()
    for k in (1, 3, 5, 10):
        assert got[k] == pytest.approx(_brute_force_recall(sims, groups.tolist(), k)), k
    assert 0 < got[1] < got[10] < 1  # neither trivial nor perfect


V, BOS, EOS, PAD = 5, 1, 2, 0  # tokens 3 and 4 are words


def _tiny_decoder(seed: int, eos: int = EOS) -> tuple[CaptionDecoder, torch.Tensor]:
    torch.manual_seed(seed)
    spec = ModelConfig(dim=16, depth=1, num_heads=2, ffn="standard", positional="learned")
    emb = nn.Embedding(V, 16)
    nn.init.normal_(emb.weight, std=0.3)  # tied LM head: larger weights make every step near-certain
    dec = CaptionDecoder(DecoderConfig(depth=1, max_len=8), spec, emb, 16, BOS, eos, PAD).eval()
    return dec, torch.randn(1, 3, 16)


def _exhaustive_best(
    dec: CaptionDecoder, memory: torch.Tensor, steps: int, length_penalty: float
) -> list[int]:
    """Score all V**steps outputs in one teacher-forced pass: an output ends at its first eos (only pad may
    follow), score = sum of log p over its tokens (eos included) / their count ** length_penalty."""
    seqs = torch.tensor(list(itertools.product(range(V), repeat=steps)))
    ids = torch.cat([torch.full((len(seqs), 1), BOS), seqs], 1)
    with torch.no_grad():
        logits = dec(ids[:, :-1], None, memory.expand(len(seqs), -1, -1), None)
    logp = F.log_softmax(logits.float(), -1).gather(-1, seqs[..., None])[..., 0]  # (S, steps)
    is_eos = seqs == dec.eos_id
    ended_before = (is_eos.cumsum(1) - is_eos.long()) > 0  # positions after the first eos
    reachable = ~(ended_before & (seqs != PAD)).any(1)
    counted = ~ended_before
    length = counted.sum(1).float()
    score = (logp * counted).sum(1) / length**length_penalty
    score = score.masked_fill(~reachable, -math.inf)
    return ids[int(score.argmax())].tolist()


def _padded(seq: torch.Tensor, steps: int) -> list[int]:
    out = seq[0].tolist()
    return out + [PAD] * (steps + 1 - len(out))


def test_beam_search_finds_the_exhaustive_optimum_that_greedy_misses():
    """With no end token every output has ``steps`` tokens; beams >= V**(steps-1) prune nothing that could still
    win, so beam search returns the best of all V**steps outputs. The seed is chosen so that greedy decoding
    does not: a beam search that fell back to the greedy path fails here."""
    steps, no_eos = 4, 99
    for seed in range(40):
        dec, memory = _tiny_decoder(seed, eos=no_eos)
        best = _exhaustive_best(dec, memory, steps, 0.0)
        greedy = _padded(dec.generate(memory, None, max_new_tokens=steps), steps)
        if greedy != best:
            break
    else:
        raise AssertionError("no seed where greedy misses the optimum: the test would not bite")
    for use_cache in (True, False):
        beam = dec.generate(
            memory, None, max_new_tokens=steps, num_beams=V ** (steps - 1), use_cache=use_cache
        )
        assert _padded(beam, steps) == best, (use_cache, beam, best, greedy)


def test_beam_search_with_end_token_and_length_penalty_equals_exhaustive():
    """Finished hypotheses (eos, then pad at no cost) compete with unfinished ones under the length penalty;
    with V**steps beams nothing is pruned and the winner is the exhaustive optimum. The seed is one where the
    optimum stops at eos without a length penalty, is a longer output with it, and greedy finds neither."""
    steps = 3
    for seed in range(60):
        dec, memory = _tiny_decoder(seed)
        best = {lp: _exhaustive_best(dec, memory, steps, lp) for lp in (0.0, 1.0)}
        greedy = _padded(dec.generate(memory, None, max_new_tokens=steps), steps)
        if EOS in best[0.0] and EOS not in best[1.0] and greedy not in best.values():
            break
    else:
        raise AssertionError("no seed separates the length penalties from greedy: the test would not bite")
    for lp, expected in best.items():
        beam = dec.generate(memory, None, max_new_tokens=steps, num_beams=V**steps, length_penalty=lp)
        assert _padded(beam, steps) == expected, (seed, lp, beam, expected)


def test_eval_perplexity_is_token_weighted_over_uneven_batches():
    """val/loss is the mean NLL per target token over the whole set (not a mean of per-batch or per-sample
    means) and val/perplexity its exp: recomputed here with F.cross_entropy on the model's own logits."""
    from mmt.config.train import TrainConfig
    from mmt.model.factory import create_model
    from mmt.training.evaluate import evaluate
    from mmt.training.tasks import build_task
    from tests.model_helpers import tiny_batch, tiny_config

    cfg = tiny_config()
    torch.manual_seed(0)
    model = create_model(cfg).eval()
    train_cfg = TrainConfig(task="captioning")
    train_cfg.tasks.captioning.max_tokens = 3
    task = build_task(cfg, train_cfg)
    batches = []
    for i, (b, seed) in enumerate([(3, 0), (1, 1), (4, 2)]):
        raw = tiny_batch(b, seed)
        batches.append(
            {
                "keys": [f"s{i}-{j}" for j in range(b)],
                "text_inputs": raw["text_inputs"],
                "text_attention_mask": raw["text_attention_mask"],
                "image_features": raw["image_features"],
                "audio_features": raw["audio_features"],
                "audio_attention_mask": raw["audio_attention_mask"],
            }
        )

    class Engine:  # what evaluate() calls: engine(**inputs) and engine.module
        module = model

        def __call__(self, **kw):
            return model(**kw)

    metrics = evaluate(Engine(), task, batches, torch.device("cpu"), torch.float32)
    nll_sum, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            ids, mask = batch["text_inputs"], batch["text_attention_mask"]
            out = model(
                image_features=batch["image_features"],
                audio_features=batch["audio_features"],
                audio_attention_mask=batch["audio_attention_mask"],
                decoder_input_ids=ids,
                decoder_attention_mask=mask,
            )
            target = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
            nll_sum += float(
                F.cross_entropy(out.lm_logits[:, :-1].flatten(0, 1), target.flatten(), reduction="sum")
            )
            tokens += int(mask[:, 1:].sum())
    assert metrics["val/samples"] == 8
    assert metrics["val/loss"] == pytest.approx(nll_sum / tokens, rel=1e-5)
    assert metrics["val/perplexity"] == pytest.approx(math.exp(nll_sum / tokens), rel=1e-5)
