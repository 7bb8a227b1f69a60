"""Cross-tokenizer distillation: subword teachers into byte students
(docs/design.md#cross-tokenizer-distillation, docs/distill.md).

``teacher`` loads a frozen Hugging Face LM and gives byte spans of its tokens; ``align`` cuts chunks common to
both tilings; ``alm`` is the ALM loss; ``byteprobs`` the teacher's next-byte distribution and the byte KL;
``latent`` the word-level latent alignment; ``objective`` turns them into ``ByteLMModule.extra_loss`` from
``cfg.distill``; ``token_ends`` labels the tokenizer's token ends per byte (no teacher forward). Importing
this package does not import transformers.
"""

from __future__ import annotations

from bytelm.distill.align import ChunkAlignment, align_chunks, last_token_in_units
from bytelm.distill.alm import alm_loss
from bytelm.distill.byteprobs import ByteTrie, byte_kl, byte_kl_naive
from bytelm.distill.latent import LatentAlignment
from bytelm.distill.objective import DistillObjective, attach_objective, build_objective, text_segments
from bytelm.distill.teacher import Teacher, TeacherEncoding, TeacherOutput, load_teacher
from bytelm.distill.token_ends import token_end_mask, token_end_masks

__all__ = [
    "ByteTrie",
    "ChunkAlignment",
    "DistillObjective",
    "LatentAlignment",
    "Teacher",
    "TeacherEncoding",
    "TeacherOutput",
    "align_chunks",
    "alm_loss",
    "attach_objective",
    "build_objective",
    "byte_kl",
    "byte_kl_naive",
    "last_token_in_units",
    "load_teacher",
    "text_segments",
    "token_end_mask",
    "token_end_masks",
]
