"""Generation: KV-cache decoding equals the full forward, batches equal single prompts, sampling, streaming, taps."""

import pytest
import torch

from conftest import composed, llama3_tokenizer_path
from mm_llama.errors import InputError
from mm_llama.generate import Generator, KVCache, Sampling, attention_mask, generate, sample
from mm_llama.llama import Llama, LlamaConfig
from mm_llama.tokenizer import Tokenizer


def debug_trunk(seed=0, **overrides) -> Llama:
    torch.manual_seed(seed)
    model = Llama(LlamaConfig.preset("debug", **overrides)).eval()
    model.init_weights(std=0.3)  # peaked distributions: greedy choices are far from ties
    return model


def debug_model(seed=0, **overrides):
    """The text-only composed model around a debug trunk: what generation runs."""
    return composed(debug_trunk(seed, **overrides))


def test_incremental_decoding_equals_full_forward():
    model = debug_trunk()
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache.for_model(model, batch_size=2, max_len=64)
        first = torch.zeros(2, dtype=torch.long)
        prefix = torch.arange(10)
        logits = [model(tokens[:, :10], positions=prefix, cache=cache, cache_pos=prefix,
                        mask=attention_mask(prefix, first, 64))]
        for t in range(10, 40):
            pos = torch.tensor([t])
            logits.append(model(tokens[:, t:t + 1], positions=pos, cache=cache, cache_pos=pos,
                                mask=attention_mask(pos, first, 64)))
    incremental = torch.cat(logits, dim=1)
    assert incremental.shape == full.shape
    # fp32 rounding only: the sums run in a different order over a longer (masked) key range.
    assert full.abs().max() > 10
    assert (incremental - full).abs().max().item() <= 1e-6 * full.abs().max().item() * 10


def test_batch_of_different_lengths_equals_each_alone():
    model = debug_model(seed=2)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 17, 9, 1)]
    sampling = Sampling(max_new_tokens=20)
    generator = Generator(model)
    batched = generator.generate(prompts, sampling)
    alone = [generator.generate([p], sampling)[0] for p in prompts]
    assert batched == alone
    assert all(len(tokens) == 20 for tokens in batched)
    # Not a degenerate model: the continuations differ between prompts.
    assert len({tuple(t) for t in batched}) == 4


def test_greedy_matches_argmax_of_full_forward():
    model = debug_model(seed=4)
    prompt = [5, 6, 7, 8]
    new = generate(model, [prompt], Sampling(max_new_tokens=8))[0]
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            sequence.append(model(torch.tensor([sequence]))[0, -1].argmax().item())
    assert new == sequence[len(prompt):]


def test_taps_equal_the_hidden_states_of_a_full_forward():
    # The TTS head reads the hidden state of a trunk layer at every generated token: what generation yields must be
    # what a full forward over the whole sequence computes at that position.
    model = debug_model(seed=9)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    steps = list(Generator(model).stream_steps(prompts, Sampling(max_new_tokens=6), taps=(0, 1, 2)))
    assert len(steps) == 6 and all(len(s.taps) == 3 and s.taps[0].shape == (2, 1, 64) for s in steps)
    for b, prompt in enumerate(prompts):
        sequence = prompt + [s.tokens[b] for s in steps]
        with torch.no_grad():
            full = model.step(torch.tensor([sequence]), taps=(0, 1, 2))
        scale = full.taps[2].abs().max()
        assert scale > 1.0
        for k, emitted in enumerate(steps):  # token k was chosen at position len(prompt) - 1 + k
            at = len(prompt) - 1 + k
            for tap, got in zip(full.taps, emitted.taps, strict=True):
                # fp32 rounding only: the cached path sums over a longer (masked) key range in another order.
                assert (got[b, 0] - tap[0, at]).abs().max() <= 1e-5 * scale, (b, k)
    # Tap 0 is the embedding, tap n_layers the last layer's output before the final norm.
    tokens = torch.tensor([prompts[0]])
    with torch.no_grad():
        out = model.step(tokens, taps=(2, 0))
        assert torch.equal(out.taps[1], model.trunk.embed(tokens))
        assert torch.equal(model.trunk.head(out.taps[0]), out.logits)
    with pytest.raises(InputError, match=r"taps \[3\]"):
        model.step(tokens, taps=(3,))


def test_stop_tokens_end_each_row_independently():
    model = debug_model(seed=5)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    free = Generator(model).generate(prompts, Sampling(max_new_tokens=12))
    stop = free[0][4]  # row 0 stops before its 5th token; row 1 stops wherever that token appears, if anywhere
    stopped = Generator(model).generate(prompts, Sampling(max_new_tokens=12), stop_tokens=[stop])
    for row_free, row_stopped in zip(free, stopped, strict=True):
        expected = row_free[: row_free.index(stop)] if stop in row_free else row_free
        assert row_stopped == expected
    assert len(stopped[0]) == free[0].index(stop) <= 4


def test_sampling_rules():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, Sampling(temperature=1.0, top_k=2), g).tolist()) == {0, 1}
    # probs ~ [0.61, 0.22, 0.14, 0.03, 0.004]: top_p 0.5 keeps only the first, 0.7 the first two.
    assert set(sample(logits, Sampling(temperature=1.0, top_p=0.5), g).tolist()) == {0}
    assert set(sample(logits, Sampling(temperature=1.0, top_p=0.7), g).tolist()) == {0, 1}
    counts = torch.bincount(sample(logits, Sampling(temperature=1.0), g), minlength=5).float() / 2000
    assert torch.allclose(counts, logits[0].softmax(-1), atol=0.04)
    assert sample(logits[:1], Sampling()).item() == 0  # greedy


def test_seeded_sampling_is_reproducible():
    model = debug_model(seed=6)
    sampling = Sampling(max_new_tokens=16, temperature=1.0, top_k=50, seed=123)
    a = generate(model, [[1, 2, 3]], sampling)
    assert a == generate(model, [[1, 2, 3]], sampling)
    assert a != generate(model, [[1, 2, 3]], Sampling(max_new_tokens=16, temperature=1.0, top_k=50, seed=7))


def test_stream_text_with_real_tokenizer_equals_decode():
    tok = Tokenizer.from_file(llama3_tokenizer_path())
    model = debug_model(seed=8, vocab_size=tok.n_words)
    prompt = tok.encode_dialog([{"role": "user", "content": "Say something in 中文 😀"}])
    sampling = Sampling(max_new_tokens=40)
    generator = Generator(model)
    pieces = list(generator.stream_text(tok, prompt, sampling))
    ids = generator.generate([prompt], sampling, stop_tokens=tok.stop_tokens)[0]
    assert "".join(pieces) == tok.decode(ids)
    assert len(pieces) > 1


def test_bad_requests_raise_input_errors():
    model = debug_model()
    generator = Generator(model)
    with pytest.raises(InputError, match="256 tokens leaves no room for an answer in the model's context of 256"):
        generator.generate([[1] * 256], Sampling(max_new_tokens=10))
    with pytest.raises(InputError, match="at least one token"):
        generator.generate([[]])
    with pytest.raises(InputError, match=r"outside \[0, 768\)"):
        generator.generate([[1, 800]])
    with pytest.raises(InputError, match="top_p"):
        Sampling(top_p=0)
    with pytest.raises(InputError, match="temperature"):
        Sampling(temperature=-1)
    with pytest.raises(InputError, match="CUDA"):
        Generator(model, compile=True)


def test_an_answer_longer_than_the_context_left_is_cut_to_fit():
    model = debug_model()  # context of 256
    cut = generate(model, [[1] * 250], Sampling(max_new_tokens=10))[0]
    assert len(cut) == 6  # max_new_tokens is a maximum
    assert cut == generate(model, [[1] * 250], Sampling(max_new_tokens=6))[0]
    batch = generate(model, [[1] * 250, [2] * 10], Sampling(max_new_tokens=10))  # the longest prompt bounds the batch
    assert [len(row) for row in batch] == [6, 6]


def test_pad_rows_never_see_nothing():
    mask = attention_mask(torch.arange(6), torch.tensor([0, 4]), 8)
    assert mask.shape == (2, 1, 6, 8)
    assert mask.any(dim=-1).all()  # every query row has a key: no NaN from an empty softmax
    assert not mask[1, 0, 5, :4].any() and mask[1, 0, 5, 4:6].all()  # real tokens never attend to pad slots


def test_compiled_decode_step_gives_the_same_logits_and_taps():
    # What `Generator(compile=True)` compiles (without CUDA graphs, which need a GPU): one decode step of the layer
    # loop, taps included, whole-graph. Inductor's kernels must give eager's numbers.
    from mm_llama.generate import decode_one, prefill

    model = debug_model(seed=10)
    compiled = torch.compile(decode_one, fullgraph=True)
    prompt = torch.tensor([[3, 4, 5, 6, 7]])
    results = []
    for step in (decode_one, compiled):
        cache = KVCache.for_model(model.trunk, 1, 16)
        first = torch.zeros(1, dtype=torch.long)
        with torch.no_grad():
            prefill(model, prompt, torch.arange(5)[None], first, cache, None, ())
            results.append(step(model, torch.tensor([[8]]), torch.tensor([5]), first, cache, None, (1, 2)))
    (eager_logits, eager_taps), (logits, taps) = results
    assert eager_taps[1].abs().max() > 1.0
    assert (logits - eager_logits).abs().max() <= 1e-4 * eager_logits.abs().max()
    for got, want in zip(taps, eager_taps, strict=True):
        assert got.shape == (1, 1, 64) and (got - want).abs().max() <= 1e-4 * want.abs().max()
