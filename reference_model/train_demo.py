"""Train the shipped demo model on scikit-learn's real handwritten digits.

    python -m reference_model.train_demo [--steps N] [--out DIR]

Contrastive image-text loss on the InternVL-C and -G embeddings against `summarize:` texts
("the digit seven"), plus a captioning loss through the prefix-LM path with the
`English caption:` prompt. Seeded; a few minutes on 2 CPU cores; prints test accuracy.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from runtime.preprocess import preprocess
from runtime.manifest import Preprocessing, SpecialTokens, TextConventions
from runtime.text import TextCodec

from . import DEMO_CHECKPOINT
from . import digits
from .digits import CAPTION_PROMPT, TEMPLATE, WORDS, build_tokenizer, caption_text, to_uint8
from .heads import additive_mask
from .loading import from_preset
from .model import InternVLModel

PREPROCESS = Preprocessing(image_size=16)


def load_split(seed: int = 0, test_fraction: float = 0.2):
    """load_digits split by a seeded permutation: (train_x, train_y, test_x, test_y), uint8 images."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("training needs scikit-learn: pip install -e '.[train]'") from e
    d = load_digits()
    images, labels = to_uint8(d.images), d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]


def _codec(tokenizer_json: Path) -> TextCodec:
    return TextCodec(tokenizer_json, TextConventions(SpecialTokens(bos=1, eos=2, pad=0)))


def losses(model: InternVLModel, pix, labels, class_ids, caption_ids, caption_start: int):
    """(contrastive C, contrastive G, caption) losses for one batch."""
    vis = model.vision_features(pix)
    c = model.clip_projector(vis)
    g = model.clip_projector2(model.query_features(vis)[0])
    img_g = F.normalize(c, dim=-1) + F.normalize(g, dim=-1)
    hidden = model.text_features(class_ids)
    txt = hidden[torch.arange(len(class_ids)), (class_ids > 0).sum(1) - 1] @ model.text_projection
    txt = F.normalize(txt, dim=-1)
    scale = model.logit_scale.exp()
    loss_c = F.cross_entropy(scale * F.normalize(c, dim=-1) @ txt.T, labels)
    loss_g = F.cross_entropy(scale * F.normalize(img_g, dim=-1) @ txt.T, labels)
    # captioning: [queries ; BOS English caption: the digit X </s>], prefix-LM mask, cross-attention on
    ids = caption_ids[labels]  # (B, T)
    B, T = ids.shape
    Q = model.num_query_token
    emb = torch.cat([model.query_tokens.expand(B, -1, -1), model.qllama.model.embed_tokens(ids)], 1)
    pos = torch.arange(Q + T)[None].expand(B, -1)
    mask = additive_mask(torch.ones(B, Q + T, dtype=torch.long), Q + T, bidirectional_prefix=Q)
    h, _ = model.qllama.model(emb, pos, mask, vision=vis)
    logits = model.qllama.lm_head(h[:, Q + caption_start - 1: Q + T - 1])  # predict caption words + EOS
    loss_cap = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, caption_start:].reshape(-1))
    return loss_c, loss_g, loss_cap


def evaluate(model: InternVLModel, images: np.ndarray, labels: np.ndarray, codec: TextCodec) -> dict:
    """Zero-shot accuracy (C and G) and caption accuracy on uint8 digit images (what the demo measures)."""
    res = digits.evaluate(digits.ReferenceRunner(model, codec, PREPROCESS), codec, images, labels)
    return {k: res[k] for k in ("zero_shot_C", "zero_shot_G", "caption")}


def train(steps: int = 600, batch: int = 128, lr: float = 3e-3, seed: int = 0, out: Path = DEMO_CHECKPOINT,
          log=print) -> dict:
    """Train, evaluate on the held-out split, and write the checkpoint directory `out` atomically."""
    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = load_split(seed)
    work = Path(str(out) + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    codec = _codec(build_tokenizer(work / "tokenizer.json"))
    model = from_preset("digits", seed=seed).train()
    class_ids = torch.from_numpy(codec.embedding_ids([TEMPLATE.format(w) for w in WORDS]))
    cap = [codec.prompt_ids(CAPTION_PROMPT)[0].tolist() + codec.prompt_ids(caption_text(i))[0, 1:].tolist() + [2]
           for i in range(10)]
    caption_ids = torch.tensor(cap)
    caption_start = len(codec.prompt_ids(CAPTION_PROMPT)[0])
    pix_all = torch.from_numpy(preprocess(list(train_x), PREPROCESS))
    y_all = torch.from_numpy(train_y)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if not n.startswith("itm_head")], lr=lr,
                            weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(y_all), (batch,), generator=g)
        lc, lg, lcap = losses(model, pix_all[idx], y_all[idx], class_ids, caption_ids, caption_start)
        loss = lc + lg + lcap
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps:
            log(f"[train] step {step}/{steps}  loss C {lc.item():.3f}  G {lg.item():.3f}  caption {lcap.item():.3f}"
                f"  ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    metrics = evaluate(model, test_x, test_y, codec)
    log(f"[train] test split ({len(test_y)} digits): zero-shot C {metrics['zero_shot_C']:.1%}  "
        f"G {metrics['zero_shot_G']:.1%}  caption {metrics['caption']:.1%}")
    model.save_pretrained(work)
    # a few training digits ride along for INT8 calibration (never the test split)
    np.savez_compressed(work / "test_digits.npz", images=test_x, labels=test_y, calib_images=train_x[:64],
                        calib_labels=train_y[:64])
    (work / "metrics.json").write_text(json.dumps({**metrics, "steps": steps, "seed": seed}, indent=2))
    # captions are three tokens ("the digit seven"): forcing the original's min_new_tokens=8 runs past EOS
    (work / "generation_config.json").write_text(json.dumps({"num_beams": 5, "max_new_tokens": 8,
                                                             "min_new_tokens": 0}, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    log(f"[train] wrote {out}")
    return metrics


def main(argv=None) -> None:
    """Command-line entry: python -m reference_model.train_demo."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEMO_CHECKPOINT)
    a = ap.parse_args(argv)
    train(a.steps, a.batch, a.lr, a.seed, a.out)


if __name__ == "__main__":
    main()
