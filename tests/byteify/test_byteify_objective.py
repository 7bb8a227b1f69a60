"""Byteification objective and training (bytelm.distill.byteify, docs/design.md#byteification): each loss
against a naive computation, the teacher targets (segments, token ends, disk cache), and short stage-1 /
stage-2 runs through ``bytelm.train.run`` with a tiny source: frozen backbone in stage 1, stage 2 starting
from stage 1, exact resume.
"""

from __future__ import annotations

import logging
import math
import random
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from bytelm.config import load_config
from bytelm.data.bytes import BOS_ID, EOS_ID, PAD_ID
from bytelm.distill.alm import STUDENT_SPACE_IDS, binary_ce
from bytelm.distill.byteify import ByteifyObjective, TokenTargets, byte_segments, load_source_once

pytestmark = pytest.mark.usefixtures("one_thread")


def byteify_cfg(tiny_source, *extra: str):
    return load_config(
        [
            "experiment=byteify_smollm2",
            "debug=cpu",
            f"byteify.source={tiny_source}",
            "byteify.encoder_blocks=1",
            "distill.cache_dir=null",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def objective(tiny_source):
    return ByteifyObjective(byteify_cfg(tiny_source))


def random_tokens(rng: random.Random, B: int, T: int, ids: torch.Tensor, D: int = 8) -> TokenTargets:
    """Tokens partitioning each row's byte runs (between specials) into pieces of 1-4 bytes."""
    first, pos = [], []
    for r in range(B):
        t = 0
        while t < T:
            if int(ids[r, t]) >= 256:
                t += 1
                continue
            n = rng.randint(1, 4)
            e = t
            while e + 1 < T and e + 1 < t + n and int(ids[r, e + 1]) < 256:
                e += 1
            first.append(r * T + t)
            pos.append(r * T + e)
            t = e + 1
    N = len(pos)
    g = torch.Generator().manual_seed(rng.randint(0, 10**6))
    return TokenTargets(
        pos=torch.tensor(pos),
        first=torch.tensor(first),
        ctx=torch.randn(N, D, generator=g).half(),
        probe=torch.randn(N, D, generator=g).half(),
        exact=torch.rand(N, generator=g) < 0.8,
        logp=-torch.rand(N, generator=g) * 8,
        space=-torch.rand(N, generator=g) * 3,
        start_ctx=torch.randn(D, generator=g).half(),
        start_probe=torch.randn(D, generator=g).half(),
    )


def random_ids(rng: random.Random, B: int, T: int) -> torch.Tensor:
    ids = torch.tensor([[rng.choice(b"ab c\n") for _ in range(T)] for _ in range(B)])
    ids[0, 0] = BOS_ID
    ids[1, 9] = EOS_ID
    ids[1, 10] = BOS_ID
    return ids


# --------------------------------------------------------------------------------------------- the losses
@pytest.mark.parametrize("debias", [True, False])
def test_alm_equals_naive_loop(objective, debias):
    """ALM between the teacher's token log-prob and the student's joint log-prob of the token's (byte, bit)
    symbols (``target_logprobs``: position i-1 scores byte i), against a naive loop."""
    rng = random.Random(0)
    B, T, V = 3, 24, 320
    ids = random_ids(rng, B, T)
    tt = random_tokens(rng, B, T, ids)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(B, T, 2 * V, generator=g) * 3
    sym = -torch.rand(B, T, generator=g) * 4  # stands for the model's joint log-probs of the target symbols
    out = SimpleNamespace(logits=logits, hidden={"target_logprobs": sym})
    objective.c.alm_debias = debias
    try:
        loss, n = objective.alm(out, ids, tt)
    finally:
        objective.c.alm_debias = False
    tau = objective.c.alm_tau
    lp = torch.log_softmax(logits.double(), -1)
    per = []
    for k in range(len(tt.pos)):
        r, a, e = int(tt.first[k]) // T, int(tt.first[k]) % T, int(tt.pos[k]) % T
        if not bool(tt.exact[k]) or a == 0:
            continue
        s = sum(float(sym[r, i - 1]) for i in range(a, e + 1))  # position i-1 scores byte i
        t = float(tt.logp[k])
        if debias:
            cols = [i + h * V for i in STUDENT_SPACE_IDS for h in (0, 1)]
            s += float(torch.logsumexp(lp[r, e, cols], 0))
            t += float(tt.space[k])
        per.append(float(binary_ce(torch.tensor(min(t, 0.0)), torch.tensor(min(s, 0.0)), tau)))
    assert int(n) == len(per) > 10
    assert float(loss) == pytest.approx(sum(per) / len(per), rel=1e-4)


def test_encoder_and_boundary_losses_equal_naive(objective):
    rng = random.Random(2)
    B, T, D, W = 2, 20, 8, 9
    ids = random_ids(rng, B, T)
    ids[0, -3:] = PAD_ID
    tt = random_tokens(rng, B, T, ids, D)
    g = torch.Generator().manual_seed(3)
    ends = torch.zeros(B * T, dtype=torch.bool)
    ends[tt.pos] = True
    ends = ends.view(B, T)
    # patches: last bytes, some padded slots (start = end = T)
    last = torch.stack([torch.sort(torch.randperm(T, generator=g)[:W]).values for _ in range(B)])
    start = torch.where(torch.arange(W) < W - 2, last, T).long()
    end = torch.where(torch.arange(W) < W - 2, last + 1, T).long()
    hidden = {
        "boundary_logits": torch.randn(B, T, generator=g) * 2,
        "probe": torch.randn(B, W, D, generator=g),
        "patch_last": last,
        "word_end": end,
        "word_start": start,
    }
    out = SimpleNamespace(logits=torch.zeros(B, T, 640), hidden=hidden)
    objective._tt, objective._ends = tt, ends
    objective._patch_targets = tt  # patches = teacher tokens (stage 1, learned boundaries)
    c = objective.c
    saved = (objective.alm_weight, c.encoder_weight, c.boundary_weight)
    objective.alm_weight, c.encoder_weight, c.boundary_weight = 0.0, 1.5, 4.0
    try:
        total, metrics = objective({"input_ids": ids}, out)
    finally:
        objective.alm_weight, c.encoder_weight, c.boundary_weight = saved
        objective._tt = None
    # encoder: ||s - t|| / sqrt(D) over patches whose last byte ends an exact teacher token
    target = {int(p): (tt.probe[k].double(), bool(tt.exact[k])) for k, p in enumerate(tt.pos)}
    dists = []
    for b in range(B):
        for w in range(W):
            if int(end[b, w]) > T or int(start[b, w]) >= T:
                continue
            hit = target.get(b * T + int(last[b, w]))
            if hit is not None and hit[1]:
                dists.append(float((hidden["probe"][b, w].double() - hit[0]).norm()) / math.sqrt(D))
    enc = sum(dists) / len(dists)
    # boundary: BCE over real bytes but each row's last (no
    # next byte to look at), F1 of logit > 0 vs token ends
    bce, tp, fp, fn, n = 0.0, 0, 0, 0, 0
    for b in range(B):
        for t in range(T):
            if int(ids[b, t]) >= 256 or t == T - 1:
                continue
            x, y = float(hidden["boundary_logits"][b, t]), bool(ends[b, t])
            p = 1 / (1 + math.exp(-x))
            bce -= math.log(p) if y else math.log(1 - p)
            n += 1
            tp += (x > 0) and y
            fp += (x > 0) and not y
            fn += (x <= 0) and y
    bce /= n
    prec, rec = tp / (tp + fp), tp / (tp + fn)
    assert float(metrics["encoder_l2"]) == pytest.approx(enc, rel=1e-4)
    assert float(metrics["boundary_bce"]) == pytest.approx(bce, rel=1e-4)
    assert float(metrics["boundary_f1"]) == pytest.approx(2 * prec * rec / (prec + rec), rel=1e-4)
    assert float(total) == pytest.approx(1.5 * enc + 4.0 * bce, rel=1e-4)


# ------------------------------------------------------------------------------------------ teacher targets
def test_byte_segments_on_packed_rows():
    ids = torch.tensor(
        [
            [BOS_ID, 97, 98, EOS_ID, BOS_ID, 99, 100, 101, EOS_ID, PAD_ID],
            [97, 98, 99, 100, EOS_ID, BOS_ID, 97, 97, 97, 97],
        ]
    )
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, -2], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])
    assert byte_segments(ids, doc) == [(0, 1, 3), (0, 5, 8), (1, 0, 4), (1, 6, 10)]
    # documents that change without a special are segments of their own too
    doc2 = torch.tensor([[0] * 10, [0, 0, 1, 1, 1, 2, 2, 2, 2, 2]])
    assert byte_segments(ids, doc2) == [(0, 1, 3), (0, 5, 8), (1, 0, 2), (1, 2, 4), (1, 6, 10)]
    assert byte_segments(ids, None) == [(0, 1, 3), (0, 5, 8), (1, 0, 4), (1, 6, 10)]


def test_token_ends_match_the_tokenizer(objective):
    from bytelm.distill.tokens import token_bytes_table

    teacher = objective.teacher
    texts = [b"Byteified models read raw bytes, caf\xc3\xa9 and all.", b"  two  spaces\nand a newline"]
    table = token_bytes_table(teacher.tokenizer, teacher.vocab_size)
    T = 64
    ids = torch.full((2, T), PAD_ID)
    want: set[int] = set()
    for r, data in enumerate(texts):
        ids[r, 1 : 1 + len(data)] = torch.tensor(list(data))
        ids[r, 0] = BOS_ID
        ids[r, 1 + len(data)] = EOS_ID
        e = r * T + 1
        for tok in teacher.tokenize_bytes(data):
            e += len(table[tok])
            want.add(e - 1)
    tt = objective.targets(ids, None)
    assert set(tt.pos.tolist()) == want
    assert bool(tt.exact.all()) and tt.ctx.shape == (len(want), teacher.model.config.hidden_size)
    assert bool((tt.first <= tt.pos).all()) and bool((tt.logp <= 0).all())
    # the tokenizer-only labels (stage 2's boundary loss) are the same ends, without a teacher forward
    assert set(objective.token_ends(ids, None).flatten().nonzero().flatten().tolist()) == want


def test_disk_cache_returns_identical_targets_and_recomputes_corrupt_entries(tiny_source, tmp_path, caplog):
    obj = ByteifyObjective(byteify_cfg(tiny_source, f"distill.cache_dir={tmp_path}"))
    ids = torch.tensor([[BOS_ID, *b"hello cached world", EOS_ID, BOS_ID, *b"again"]])
    a = obj.targets(ids, None)
    files = list(tmp_path.rglob("*.pt"))
    assert len(files) == 1
    b = obj.targets(ids, None)
    for k, v in a.__dict__.items():
        assert torch.equal(v, getattr(b, k)), k
    files[0].write_bytes(b"\x00not a torch file")
    with caplog.at_level(logging.WARNING, logger="bytelm.distill.byteify"):
        c = obj.targets(ids, None)
    assert any("recomputing" in r.getMessage() for r in caplog.records)
    for k, v in a.__dict__.items():
        assert torch.equal(v, getattr(c, k)), k
    d = obj.targets(ids, None)  # the recomputed entry was written back and reads again
    assert torch.equal(d.probe, a.probe)
    # another batch (or another k) is another entry
    obj.targets(ids[:, :10], None)
    assert len(list(tmp_path.rglob("*.pt"))) == 2


# ---------------------------------------------------------------------------------------------- training
def test_encoder_loss_decreases_on_a_repeated_batch(tiny_source):
    from bytelm.lit.strategies import build_model_for

    # the encoder loss alone, on pooled patch vectors (with model.patch_token_embed the exact token embedding
    # already puts a token patch at the teacher's input, so the loss starts near 0)
    cfg = byteify_cfg(
        tiny_source, "byteify.alm_weight=0", "byteify.boundary_weight=0", "model.patch_token_embed=false"
    )
    torch.manual_seed(0)
    model = build_model_for(cfg).train()
    obj = ByteifyObjective(cfg).train()
    text = b"To be, or not to be, that is the question: whether tis nobler in the mind to suffer"
    ids = torch.tensor([[BOS_ID, *text[:63]], list(text[10:74])])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    enc = []
    for _ in range(15):
        batch = {"input_ids": ids}
        obj.prepare(batch)
        out = model(
            ids, patch_end=batch["patch_end"], context=batch["context"], probe_blocks=batch["probe_blocks"]
        )
        loss, metrics = obj(batch, out)
        enc.append(float(metrics["encoder_l2"]))
        opt.zero_grad()
        (loss + 0.0 * out.logits.sum()).backward()
        opt.step()
    assert all(math.isfinite(v) for v in enc)
    assert max(enc[-3:]) < 0.5 * enc[0], enc  # a wide margin (about 3x measured): it at least halves


def test_word_patch_ablation_trains_on_the_patches_it_is_scored_with(tiny_source):
    """``model.chunker=words``: stage 1 gives the model its own word patches (``segment``, what evaluation
    uses), each word's last byte holding the teacher state of the last token ending in it; not the token ends
    (the bug behind an ablation row that trained to ~2.9 bpb and scored 6.6)."""
    from bytelm.lit.strategies import build_model_for

    cfg = byteify_cfg(tiny_source, "model.chunker=words")
    torch.manual_seed(0)
    model = build_model_for(cfg).train()
    obj = ByteifyObjective(cfg).train()
    text = b"Words, not tokens: caf\xc3\xa9 na\xc3\xafve \xe6\x97\xa5\xe6\x9c\xac and long_words_here"
    ids = torch.tensor([[BOS_ID, *text[:47]], list(text[5:53])])
    batch = {"input_ids": ids}
    obj.prepare(batch)
    own, _ = model.segment(ids)
    real = ids < 256
    assert torch.equal(batch["patch_end"][:, :-1] & real[:, :-1], own[:, :-1] & real[:, :-1])
    token_ends = obj.token_ends(ids, None)
    assert not torch.equal(batch["patch_end"] & real, token_ends & real)  # the text has multi-token words
    # the context sits at word ends: every position holding a teacher state ends a patch (a row's last byte
    # always does)
    tt = obj.targets(ids, None)
    start = tt.start_ctx.float()
    ctx = batch["context"].view(-1, start.shape[0]).float()
    held = (ctx - start).abs().amax(-1) > 0
    closes = batch["patch_end"].clone()
    closes[:, -1] = True
    assert bool(closes.reshape(-1)[held].all())
    assert int(held.sum()) > 8


class Record(L.Callback):
    """Per-step losses, extra metrics and the model's weights at the start and the end of training."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.metrics: dict[int, dict[str, float]] = {}
        self.start: dict[str, torch.Tensor] = {}
        self.end: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses[trainer.global_step] = float(loss)
        self.metrics[trainer.global_step] = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")
        }

    def on_train_end(self, trainer, pl_module) -> None:
        self.end = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


def is_backbone(name: str) -> bool:
    return name.startswith(("backbone.", "backbone_norm."))


def test_stage1_freezes_the_backbone_and_stage2_starts_from_it(tiny_source, tmp_path, monkeypatch):
    from bytelm.distill.byteify import ByteifyObjective
    from bytelm.train import run

    base = ["trainer.val_every=3", "trainer.ckpt_every=3", "trainer.max_steps=3", "data.val_max_bytes=300"]
    rec1 = Record()
    res = run(byteify_cfg(tiny_source, *base, f"trainer.out_dir={tmp_path / 's1'}"), callbacks=[rec1])
    assert res["global_step"] == 3
    assert all(math.isfinite(v) for v in rec1.losses.values())
    for k in ("train/encoder_l2", "train/alm", "train/boundary_bce", "train/loss"):
        assert all(math.isfinite(m[k]) for m in rec1.metrics.values()), k
    assert math.isfinite(res["metrics"]["val/bpb"])
    changed = {k for k in rec1.start if not torch.equal(rec1.start[k], rec1.end[k])}
    assert changed and not any(is_backbone(k) for k in changed), changed
    assert any(k.startswith("boundary.") for k in changed) and any(k.startswith("encoder.") for k in changed)
    assert not any(k.startswith("source_embed") for k in changed)
    ckpt = tmp_path / "s1" / "checkpoints" / "last.ckpt"
    assert ckpt.exists()

    def no_teacher(*a, **k):
        raise AssertionError("stage 2 without ALM must not run the teacher")

    monkeypatch.setattr(ByteifyObjective, "_compute", no_teacher)
    rec2 = Record()
    cfg2 = byteify_cfg(
        tiny_source,
        *base,
        "trainer.max_steps=2",
        "byteify.stage=2",
        f"byteify.init_from={ckpt}",
        f"trainer.out_dir={tmp_path / 's2'}",
    )
    run(cfg2, callbacks=[rec2])
    for k, v in rec1.end.items():  # stage 2 starts from the stage-1 weights
        assert torch.equal(rec2.start[k], v), k
    assert all(math.isfinite(v) for v in rec2.losses.values())
    moved = {k for k in rec2.start if is_backbone(k) and not torch.equal(rec2.start[k], rec2.end[k])}
    assert moved, "stage 2 trains the backbone"
    # the boundary loss stays in stage 2 (labels from the tokenizer, no teacher forward): the predictor trains
    assert any(not torch.equal(rec2.start[k], rec2.end[k]) for k in rec2.start if k.startswith("boundary."))
    assert all(math.isfinite(m["train/boundary_bce"]) for m in rec2.metrics.values())


def test_stage0_trains_only_the_boundary_path_without_the_teacher(tiny_source, tmp_path, monkeypatch):
    """The boundary phase: token ends from the tokenizer alone (no teacher forward), the model stops after the
    boundary logits, only embed/encoder/expand_proj/boundary move; stage 1 starts from its checkpoint."""
    from bytelm.distill.byteify import ByteifyObjective
    from bytelm.train import run

    def no_teacher(*a, **k):
        raise AssertionError("stage 0 must not run the teacher")

    monkeypatch.setattr(ByteifyObjective, "_compute", no_teacher)
    base = ["trainer.val_every=3", "trainer.ckpt_every=3", "trainer.max_steps=3", "data.val_max_bytes=300"]
    rec = Record()
    res = run(
        byteify_cfg(tiny_source, *base, "byteify.stage=0", f"trainer.out_dir={tmp_path / 's0'}"),
        callbacks=[rec],
    )
    assert res["global_step"] == 3
    for m in rec.metrics.values():
        assert math.isfinite(m["train/boundary_bce"]) and 0 <= m["train/boundary_acc"] <= 1
        assert m["train/loss"] == pytest.approx(
            m["train/boundary_bce"], rel=1e-5
        )  # the model's loss is the BCE
    changed = {k.split(".")[0] for k in rec.start if not torch.equal(rec.start[k], rec.end[k])}
    assert changed == {"embed", "encoder", "expand_proj", "boundary"}, changed
    assert math.isfinite(res["metrics"]["val/bpb"])  # validation runs the whole model (learned segmenter)
    monkeypatch.undo()
    rec1 = Record()
    ckpt = tmp_path / "s0" / "checkpoints" / "last.ckpt"
    run(
        byteify_cfg(
            tiny_source,
            *base,
            "trainer.max_steps=1",
            f"byteify.init_from={ckpt}",
            f"trainer.out_dir={tmp_path / 's1'}",
        ),
        callbacks=[rec1],
    )
    for k, v in rec.end.items():
        if not k.startswith("segmenter"):
            assert torch.equal(rec1.start[k], v), k
    # the segmenter's own encoder is frozen as the boundary phase left the shared one; stage 1 then moves
    # the shared encoder only, so the boundaries stay the boundary phase's
    copies = [k for k in rec.end if k.startswith(("embed.", "expand_proj.", "encoder."))]
    assert copies and float(rec1.start["segmenter_ready"]) == 1.0
    for k in copies:
        assert torch.equal(rec1.start[f"segmenter.{k}"], rec.end[k]), k
    moved = {k for k in rec1.start if not torch.equal(rec1.start[k], rec1.end[k])}
    assert any(k.startswith("encoder.") for k in moved)
    assert not any(k.startswith(("segmenter", "boundary.")) for k in moved), moved


def test_resume_of_a_byteify_run_is_exact(tiny_source, tmp_path):
    from bytelm.train import run

    base = ["trainer.val_every=1000", "trainer.ckpt_every=2", "trainer.max_steps=4"]
    a = Record()
    run(byteify_cfg(tiny_source, *base, f"trainer.out_dir={tmp_path / 'a'}"), callbacks=[a])
    mid = tmp_path / "a" / "checkpoints" / "step0000002.ckpt"
    assert mid.exists()
    b = Record()
    run(
        byteify_cfg(tiny_source, *base, f"trainer.out_dir={tmp_path / 'b'}", f"ckpt_path={mid}"),
        callbacks=[b],
    )
    assert sorted(b.losses) == [3, 4]
    for s, v in b.losses.items():
        assert v == pytest.approx(a.losses[s], abs=1e-6), (s, v, a.losses[s])
    for k, v in a.end.items():
        assert torch.allclose(b.end[k].float(), v.float(), atol=1e-6), k


def test_source_model_is_loaded_once(tiny_source):
    assert load_source_once(str(tiny_source)) is load_source_once(str(tiny_source))
