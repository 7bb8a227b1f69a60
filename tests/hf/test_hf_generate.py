"""transformers' ``generate()`` / forward on bytelm models: same bytes as bytelm's generator (greedy and
seeded sampling), padding handled, beam search, pipelines, ``generate_from_folder`` and
lm-evaluation-harness."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from bytelm.data.bytes import BOS_ID
from bytelm.hf.export import export_model, generate_from_folder, wrap_model
from bytelm.models import build_model
from bytelm.models.generate import generate

PROMPT = b"Shall I compare thee "


@pytest.fixture(scope="module")
def models():
    """arch -> (bytelm model, the same module wrapped in its transformers class)."""
    out = {}
    for i, arch in enumerate(("flat", "hierarchical", "mrt5")):
        torch.manual_seed(10 + i)
        cfg = tiny_config(arch, max_seq_len=256, gate={"layer": 1})
        m = build_model(cfg).eval()
        out[arch] = (m, wrap_model(m, cfg))
    return out


def new_bytes(out: torch.Tensor, n_prompt: int) -> bytes:
    return bytes(t for t in out[n_prompt:].tolist() if t < 256)


@pytest.mark.parametrize("arch", ["flat", "hierarchical"])
def test_greedy_and_sampling_match_bytelm(models, arch):
    model, hf = models[arch]
    ids = torch.tensor([list(PROMPT)])
    out = hf.generate(ids, max_new_tokens=16, do_sample=False)
    assert new_bytes(out[0], ids.shape[1]) == generate(model, PROMPT, 16, temperature=0)
    uncached = hf.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False)  # full forward per byte
    assert torch.equal(uncached, out[:, : uncached.shape[1]])
    for seed, kw in ((0, {}), (1, {"top_k": 30, "top_p": 0.9, "temperature": 0.7})):
        t = kw.get("temperature", 1.0)
        torch.manual_seed(seed)
        out = hf.generate(ids, max_new_tokens=16, do_sample=True, **kw)
        ref = generate(
            model, PROMPT, 16, temperature=t, top_k=kw.get("top_k", 0), top_p=kw.get("top_p", 1.0), seed=seed
        )
        assert new_bytes(out[0], ids.shape[1]) == ref, (seed, kw)


@pytest.mark.parametrize("arch", ["flat", "hierarchical"])
def test_left_padded_batch_generates_each_row_as_alone(models, arch):
    model, hf = models[arch]
    prompts = [b"Now is the winter of", b"\xe4\xb8\x96 caf\xc3\xa9"]
    n = max(map(len, prompts))
    ids = torch.tensor([[256] * (n - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for row, p in zip(out, prompts, strict=True):
        assert new_bytes(row, n) == generate(model, p, 8, temperature=0)


@pytest.mark.parametrize("arch", ["flat", "hierarchical"])
def test_beam_search_cache_reorders(models, arch):
    _, hf = models[arch]
    ids = torch.tensor([list(PROMPT)])
    kw = {"max_new_tokens": 6, "num_beams": 2, "do_sample": False}
    assert torch.equal(hf.generate(ids, **kw), hf.generate(ids, use_cache=False, **kw))


@pytest.mark.parametrize("arch", ["flat", "hierarchical"])
def test_padded_forward_is_lm_eval_compatible(models, arch):
    """lm-evaluation-harness right-pads batches (with zeros) and reads ``.logits`` (B, T, V); generation
    batches are left-padded. Either way real positions get the logits of the row alone."""
    model, hf = models[arch]
    rows = [list(b"The quick brown fox"), list(b"jumps"), list(b"over the lazy dog, twice")]
    T = max(map(len, rows))
    with torch.no_grad():
        alone = [model(torch.tensor([r])).logits[0] for r in rows]
        for side in ("right", "left"):
            ids = torch.zeros(len(rows), T, dtype=torch.long)
            mask = torch.zeros(len(rows), T, dtype=torch.long)
            for i, r in enumerate(rows):
                sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
                ids[i, sl], mask[i, sl] = torch.tensor(r), 1
            logits = hf(input_ids=ids, attention_mask=mask).logits
            assert logits.shape == (len(rows), T, model.cfg.vocab_size)
            for i, r in enumerate(rows):
                sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
                torch.testing.assert_close(logits[i, sl], alone[i], atol=1e-5, rtol=0)
        ids = torch.tensor([rows[0]])
        loss = hf(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(loss, F.cross_entropy(alone[0][:-1], ids[0, 1:]))


def test_mrt5_generate_matches_bytelm(models):
    model, hf = models["mrt5"]
    prefix = torch.tensor([list(PROMPT), list(b"0123456789 and then some")[: len(PROMPT)]])
    out = hf.generate(prefix, max_new_tokens=8, do_sample=False)  # hard deletion, as MrT5.generate
    assert out[:, 0].tolist() == [BOS_ID, BOS_ID]
    assert out[:, 1:].tolist() == model.generate(prefix, 8, hard_delete=True).tolist()
    soft = hf.generate(prefix, max_new_tokens=8, do_sample=False, hard_delete=False)
    assert soft[:, 1:].tolist() == model.generate(prefix, 8, hard_delete=False).tolist()
    assert hf.generate(prefix, max_new_tokens=4, do_sample=True, num_return_sequences=2).shape == (4, 5)


@pytest.fixture(scope="module")
def folder(models, tmp_path_factory):
    model, _ = models["hierarchical"]
    return export_model(model, model.cfg, tmp_path_factory.mktemp("gen") / "hier")


def test_pipeline_and_generate_from_folder(models, folder):
    from transformers import pipeline

    model, _ = models["hierarchical"]
    pipe = pipeline("text-generation", model=str(folder), trust_remote_code=True)
    text = pipe("To be", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text == "To be" + generate(model, b"To be", 8, temperature=0).decode("utf-8", errors="replace")
    assert generate_from_folder(folder, "To be", 8) == generate(model, b"To be", 8, temperature=0).decode(
        "utf-8", errors="replace"
    )
    sampled = generate_from_folder(folder, b"", 6, temperature=0.9, top_k=50, seed=3)  # empty prompt: BOS
    assert sampled == generate(model, b"", 6, temperature=0.9, top_k=50, seed=3).decode("utf-8", "replace")


def _manual_loglikelihood(model, context: str, continuation: str) -> float:
    ctx = list(context.encode()) or [BOS_ID]
    cont = list(continuation.encode())
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_lm_eval_harness(models, folder, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, _ = models["hierarchical"]
    lm = HFLM(pretrained=str(folder), trust_remote_code=True, batch_size=2, device="cpu")
    pairs = [("The cat sat on the", " mat"), ("Hi", " there, friend"), ("", "x"), ("世界", "は")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    for (ctx, cont), (ll, _) in zip(pairs, got, strict=True):
        assert ll == pytest.approx(_manual_loglikelihood(model, ctx, cont), abs=1e-3)

    # the same through `simple_evaluate` on a tiny local multiple-choice task (what `lm_eval --model hf` runs)
    data = tmp_path / "data.jsonl"
    data.write_text(
        '{"q": "The cat sat on the", "choices": [" mat", " sky"], "answer": 0}\n'
        '{"q": "Two plus two is", "choices": [" four", " five"], "answer": 0}\n'
    )
    (tmp_path / "task.yaml").write_text(
        textwrap.dedent(f"""
        task: bytelm_tiny
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
          cache_dir: {tmp_path / "cache"}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{q}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        metric_list:
          - metric: acc
        """)
    )
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=["bytelm_tiny"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
    )
    expect = (
        sum(
            _manual_loglikelihood(model, q, a) > _manual_loglikelihood(model, q, b)
            for q, a, b in (("The cat sat on the", " mat", " sky"), ("Two plus two is", " four", " five"))
        )
        / 2
    )
    assert res["results"]["bytelm_tiny"]["acc,none"] == pytest.approx(expect)
