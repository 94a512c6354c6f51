"""The llama.cpp engine (xllamacpp, in process) on the real testbed model as a GGUF file.

``models/testbed/testbed.gguf`` is the testbed Llama written by :mod:`env.models.testbed.gguf`; its
tokenizer is the Hugging Face one of its own folder. One engine is built for the whole module
(4 slots, 1 thread: the machine may be busy). Greedy decoding must reproduce transformers on the
Hugging Face weights, which catches a wrong rotary permutation or hyperparameter in the export.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from env.generators.backend import CompletionRequest, TipRequest
from env.generators.prompts import TESTBED
from env.models.testbed.model import TESTBED_DIR
from env.types import Question, SamplingConfig, TipConfig
from features.errors import ConfigError, ModelError

pytest.importorskip("xllamacpp", reason="the llama.cpp engine needs: pip install xllamacpp")

GGUF = TESTBED_DIR / "testbed.gguf"
REPO = Path(__file__).resolve().parents[2]
K = 16
Q = Question(qid="t/0", text="Let a = 37. Let b = a + 48. Let c = b * 3. What is c?", gold="255")
PROMPTS = [
    "Let a = 3. Let b = a * 3. What is b?",
    "Let a = 42. Let b = a + 73. Let c = b - 70. What is c?",
    "Let a = 93. Let b = a - 36. Let c = b + 72. Let d = c * 2. Let e = d - 41. What is e?",
]


@pytest.fixture(scope="module")
def gen() -> Iterator[Any]:
    from env.generators.llamacpp import LlamaCppBackend, LlamaCppGenerator

    if not GGUF.is_file():
        pytest.fail(f"no {GGUF}: write it with `python -m env.models.testbed.gguf --out {GGUF}`")
    g = LlamaCppGenerator(
        GGUF,
        template="testbed",
        sampling=SamplingConfig(temperature=0.7, top_logprobs=5, max_chain_tokens=96),
        slots=4,
        context=1024,
        threads=1,
    )
    assert isinstance(g.backend, LlamaCppBackend)
    yield g
    g.backend.close()


def test_the_tokenizer_is_found_in_the_ggufs_own_folder() -> None:
    from env.generators.llamacpp import find_tokenizer_folder

    assert find_tokenizer_folder(GGUF) == TESTBED_DIR


def test_a_gguf_without_a_tokenizer_folder_says_how_to_make_one(tmp_path: Path) -> None:
    # What `ponder model prepare --gguf-only` leaves: the GGUF alone, no converted folder.
    from env.generators.llamacpp import LlamaCppGenerator, find_tokenizer_folder

    lone = tmp_path / "lone.gguf"
    lone.symlink_to(GGUF)
    assert find_tokenizer_folder(lone) is None
    with pytest.raises(ModelError, match="ponder model prepare --name NAME` without --gguf-only"):
        LlamaCppGenerator(lone, template="testbed", sampling=SamplingConfig(), slots=1)


def test_greedy_decoding_matches_transformers(gen: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    n_new = 32
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(TESTBED_DIR), dtype=torch.float32).eval()
        for text in PROMPTS:
            ids = gen.backend.encode(TESTBED.question_prompt(text, "cot", None))
            with torch.no_grad():
                out = model.generate(
                    torch.tensor([ids]),
                    max_new_tokens=n_new,
                    do_sample=False,
                    output_scores=True,
                    return_dict_in_generate=True,
                    pad_token_id=gen.backend.eos_token_id,
                )
            hf = out.sequences[0, len(ids) :].tolist()
            hf_lp = torch.stack([torch.log_softmax(s[0].float(), -1) for s in out.scores])
            (c,) = gen.backend.complete(
                [
                    CompletionRequest(
                        prompt_ids=tuple(ids), max_tokens=n_new, temperature=0.0, top_logprobs=5
                    )
                ]
            )
            got = c.token_ids.tolist()
            # llama.cpp's completion leaves out the EOS that transformers includes.
            assert got == [t for t in hf if t != gen.backend.eos_token_id], text
            assert c.finish_reason == ("stop" if len(got) < n_new else "length")
            rows = np.arange(len(got))
            ref = hf_lp[rows, got].numpy()
            np.testing.assert_allclose(c.logprobs, ref, atol=1e-2)
            # The best alternatives agree too (the top-1 is the greedy token itself).
            np.testing.assert_array_equal(c.top_token_ids[:, 0], got)
            np.testing.assert_allclose(c.top_logprobs[:, 0], ref, atol=1e-2)
    finally:
        torch.set_num_threads(threads)


def test_extend_probe_judge_round_trip(gen: Any) -> None:
    eos = gen.backend.eos_token_id
    suffix = gen.backend.encode(TESTBED.probe_suffix)
    gen.reset(1)
    chains = gen.start(Q, 3)
    assert [c.chain_id for c in chains] == [0, 1, 2]
    n_prompt = len(chains[0].prompt_ids)
    rounds = 0
    while any(not c.finished for c in chains):
        active = [c for c in chains if not c.finished]
        before = {c.chain_id: c.num_tokens for c in active}
        chunks = gen.extend(active, K)
        assert len(chunks) == len(active)
        for c, ch in zip(active, chunks, strict=True):
            n = len(ch)
            assert 0 < n <= K and ch.n_injected == 0
            assert ch.finish_reason in ("length", "stop", "cap")
            assert eos not in ch.token_ids.tolist()
            assert ch.text == gen.backend.decode(ch.token_ids.tolist())
            assert ch.logprobs.shape == (n,) and np.all(ch.logprobs <= 1e-6)
            assert ch.top_logprobs.shape == (n, 5) and np.all(np.diff(ch.top_logprobs, axis=1) <= 0)
            assert ch.usage.generated == n
            # Every prompt token is either computed or served from the slot's KV cache.
            assert ch.usage.prefill + ch.usage.cached == n_prompt + before[c.chain_id]
            if rounds:
                # A continuation is served from a slot's KV cache. Not necessarily all of it: the
                # testbed's standalone judge prompts ("Question: ...\nCheck:\n...") take slots
                # too and may evict a chain (the exact reuse is checked with extend alone below).
                assert ch.usage.cached > 0
            if ch.finish_reason == "length":
                assert n == K and not c.finished
        probes = gen.probe(active, max_tokens=8)
        for c, pr in zip(active, probes, strict=True):
            assert pr.chain_id == c.chain_id and pr.at_tokens == c.num_tokens
            assert 1 <= pr.usage.probe <= 8
            assert pr.usage.prefill + pr.usage.cached == n_prompt + c.num_tokens + len(suffix)
            assert pr.usage.cached >= n_prompt
            if pr.text.endswith("}"):
                assert pr.answer is not None and pr.answer == pr.text[:-1].strip()
        judges = gen.judge(active)
        for c, jd in zip(active, judges, strict=True):
            assert jd.chain_id == c.chain_id and 0.0 <= jd.p_yes <= 1.0
            prompt = gen.backend.encode(TESTBED.judge_prompt(Q.text, c.text, None))
            assert jd.usage.judge == 1 and jd.usage.prefill + jd.usage.cached == len(prompt)
        rounds += 1
        assert rounds <= 96 // K
    assert rounds >= 2
    for c in chains:
        assert c.finish_reason in ("stop", "cap")
        assert c.token_ids == [t for ch in c.chunks for t in ch.token_ids.tolist()]
        if c.finish_reason == "stop":  # the testbed ends its solutions with the boxed answer
            assert "\\boxed{" in c.text
    # The trained model answers an easy question; probing a finished chain reads its answer.
    done = [c for c in chains if c.finish_reason == "stop"]
    assert done
    assert any(p.answer == "255" for p in gen.probe(done))


def test_same_seed_gives_the_same_sampled_tokens(gen: Any) -> None:
    # One chain, so one request at a time: llama.cpp batches the tokens of concurrent slots into
    # one decode whose make-up depends on thread timing, which can change the last bits of the
    # logits and so (rarely) a sampled token. A lone request is computed the same way each time,
    # and its sampler seed comes from reset(seed) and the call's position in the sequence.
    def run(seed: int) -> list[int]:
        gen.reset(seed)
        (c,) = gen.start(Q, 1)
        for i in range(3):
            if c.finished:
                break
            ctx = len(c.prompt_ids) + c.num_tokens
            (ch,) = gen.extend([c], K)
            if i:  # the chain's slot holds its whole context: only the last token is recomputed
                assert (ch.usage.cached, ch.usage.prefill) == (ctx - 1, 1)
        assert c.chain_id == 0
        return list(c.token_ids)

    a = run(5)
    run(6)  # other work in between
    assert run(5) == a and len(a) > K


def test_tip_is_refused(gen: Any) -> None:
    (c,) = gen.start(Q, 1)
    with pytest.raises(ConfigError, match="TIP"):
        gen.extend([c], K, tip=TipConfig(penalty=3.0, window=50))
    tip = TipRequest(token_ids=(1,), penalty=1.0, window=4, since_switch=0)
    with pytest.raises(ConfigError, match="logits processor"):
        gen.backend.complete(
            [CompletionRequest(prompt_ids=(1, 2), max_tokens=2, temperature=0.0, tip=tip)]
        )


def test_a_missing_gguf_is_a_model_error_naming_the_path(tmp_path: Path) -> None:
    from env.generators.llamacpp import LlamaCppBackend

    path = tmp_path / "nowhere" / "missing.gguf"
    with pytest.raises(ModelError, match=r"missing\.gguf") as e:
        LlamaCppBackend(path)
    assert str(path) in str(e.value)


def test_ponder_record_on_the_gguf_end_to_end(tmp_path: Path) -> None:
    from env.bank.store import TraceBank

    out = tmp_path / "bank"
    cmd = [
        sys.executable,
        "-m",
        "controller.cli",
        "record",
        "--model",
        str(GGUF),
        "--template",
        "testbed",
        "--dataset",
        "arith",
        "--n",
        "8",
        "--chains",
        "2",
        "--chunk-tokens",
        "16",
        "--max-tokens",
        "48",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    bank = TraceBank(out)
    m = bank.manifest
    assert m.model["engine"] == "llama.cpp" and m.model["path"] == str(GGUF)
    assert m.template == "testbed" and m.chains == 2
    assert len(bank) == len(m.questions) == 8
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["model"]["sha256"] == m.model["sha256"] and len(m.model["sha256"]) == 64
    answers = 0
    for qt in bank:
        assert qt.k == 2
        for ch in qt.chains:
            assert ch.main_tokens <= 48
            rows = zip(ch.rows["n_tokens"], ch.rows["n_injected"], strict=True)
            assert all(0 < n <= 16 + k for n, k in rows)
            answers += sum(a is not None for a in ch.rows["probe_answer"])
            assert all(np.isfinite(p) for p in ch.rows["judge_p_yes"])
    assert answers > 0


def test_a_stop_string_is_named_as_the_stop_reason(gen: Any) -> None:
    from env.models.testbed.task import prompt_text
    from env.questions import load_testbed

    easy = next(q for q in load_testbed("test", 1) if q.difficulty == 1)
    ids = tuple(gen.backend.encode(prompt_text(easy.text)))
    stop, whole, two = gen.backend.complete(
        [
            CompletionRequest(prompt_ids=ids, max_tokens=64, temperature=0.0, stop=("=",)),
            CompletionRequest(prompt_ids=ids, max_tokens=400, temperature=0.0),
            CompletionRequest(prompt_ids=ids, max_tokens=64, temperature=0.0, stop=("=", "+")),
        ]
    )
    assert stop.finish_reason == "stop" and stop.stop_reason == "=" and "=" not in stop.text
    assert whole.finish_reason == "stop" and whole.stop_reason is None  # EOS ended it
    assert two.stop_reason == ""  # a stop string, but llama.cpp does not say which
