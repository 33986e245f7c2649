"""Train the shipped demo model on scikit-learn's handwritten digits, made varied by augmentation.

    python -m bridge_export.reference_model.train_demo [--steps N] [--out DIR] [--threads 1]

(the shipped checkpoint: the defaults, with --threads 1; about an hour on a busy 2-core machine)

Every batch is a fresh random variant of the training handwriting (bridge_export.reference_model.digit_styles:
position, size, slight rotation, stroke width by dilation/erosion, blur, noise and
contrast), plus, with --fonts pillow, digits typeset in the one font Pillow ships (Aileron).
Augmentation starts weak and reaches full strength over the first --warm-aug of the steps.
Contrastive image-text loss on the InternVL-C and -G embeddings against `summarize:` texts
("the digit seven"), plus a captioning loss through the prefix-LM path with the
`English caption:` prompt. Seeded. Prints accuracy on the handwriting test split and on a
held-out style: digits typeset in the DejaVu fonts (never trained on), which the checkpoint
stores as images so the demo needs no fonts.
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

from bridge_export.runtime.preprocess import preprocess
from bridge_export.runtime.manifest import Preprocessing, SpecialTokens, TextConventions
from bridge_export.runtime.text import TextCodec

from bridge_export.reference_model import DEMO_CHECKPOINT
from bridge_export.reference_model import digit_styles as styles
from bridge_export.reference_model import digits
from bridge_export.reference_model.digits import CAPTION_PROMPT, TEMPLATE, WORDS, build_tokenizer, caption_text, to_uint8
from bridge_export.reference_model.heads import additive_mask
from bridge_export.reference_model.loading import from_preset
from bridge_export.reference_model.model import InternVLModel

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


def training_pool(train_x: np.ndarray, train_y: np.ndarray, fonts: str):
    """What batches are drawn from: handwriting at CANVAS size, and (fonts='pillow') Pillow's own typeface."""
    hand = styles.upsample(train_x)
    if fonts == "none":
        return hand, train_y, None, None
    if fonts != "pillow":
        raise SystemExit(f"--fonts must be 'pillow' or 'none', got {fonts!r}")
    font = styles.pillow_font(48)
    glyphs, labels = [], []
    for width in (0, 1, 2, 3):
        for d in range(10):
            glyphs.append(styles.centered(styles.glyph(font, d, stroke_width=width)))
            labels.append(d)
    return hand, train_y, np.stack(glyphs), np.asarray(labels, np.int64)


def heldout_style(seed: int, log=print):
    """Digits typeset in the DejaVu fonts (never trained on): (images, labels, font names) or None."""
    fonts = styles.dejavu_fonts(48)
    if not fonts:
        log("[train] no DejaVu fonts here (apt install fonts-dejavu-core, or pip install matplotlib): "
            "the checkpoint will have no held-out style set")
        return None
    images, labels, which = styles.render([f for _, f in fonts], per_font=2, seed=seed + 1000)
    return images, labels, np.asarray([fonts[i][0] for i in which])


def train(steps: int = 4000, batch: int = 64, lr: float = 1e-3, seed: int = 0, out: Path = DEMO_CHECKPOINT,
          log=print, fonts: str = "pillow", font_fraction: float = 0.2, warm_aug: float = 0.5,
          eval_limit: int = 0) -> dict:
    """Train with augmentation, evaluate on the test split and the held-out style, write `out` atomically."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_x, train_y, test_x, test_y = load_split(seed)
    hand_x, hand_y, font_x, font_y = training_pool(train_x, train_y, fonts)
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
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if not n.startswith("itm_head")], lr=lr,
                            weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    n_font = int(round(batch * font_fraction)) if font_x is not None else 0
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        i = rng.integers(0, len(hand_y), batch - n_font)
        x, y = hand_x[i], hand_y[i]
        if n_font:
            j = rng.integers(0, len(font_y), n_font)
            x, y = np.concatenate([x, font_x[j]]), np.concatenate([y, font_y[j]])
        strength = min(1.0, step / (warm_aug * steps)) if warm_aug else 1.0  # easy first, then the full range
        pix = torch.from_numpy(preprocess(list(styles.augment(x, rng, strength)), PREPROCESS))
        lc, lg, lcap = losses(model, pix, torch.from_numpy(y), class_ids, caption_ids, caption_start)
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
    sets = {"test": (test_x, test_y),
            "test_moved": (styles.augment(styles.upsample(test_x), np.random.default_rng(seed + 2000)), test_y)}
    held = heldout_style(seed, log)
    if held is not None:
        sets["heldout_fonts"] = held[:2]
    metrics = {}
    for name, (x, y) in sets.items():
        if eval_limit:  # smoke tests: a few digits of each set
            x, y = x[:eval_limit], y[:eval_limit]
        metrics[name] = evaluate(model, x, y, codec)
        m = metrics[name]
        log(f"[train] {SET_TITLES[name]} ({len(y)} digits): zero-shot C {m['zero_shot_C']:.1%}  "
            f"G {m['zero_shot_G']:.1%}  caption {m['caption']:.1%}")
    model.save_pretrained(work)
    # a few augmented training digits ride along for INT8 calibration (never a test image)
    calib = rng.integers(0, len(hand_y), 64)
    arrays = {"images": test_x, "labels": test_y, "calib_images": styles.augment(hand_x[calib], rng),
              "calib_labels": hand_y[calib]}
    if held is not None:
        arrays.update(heldout_images=held[0], heldout_labels=held[1], heldout_fonts=held[2])
    np.savez_compressed(work / "test_digits.npz", **arrays)
    (work / "metrics.json").write_text(json.dumps(
        {**metrics, "steps": steps, "batch": batch, "lr": lr, "seed": seed, "fonts": fonts,
         "font_fraction": font_fraction, "warm_aug": warm_aug}, indent=2))
    # captions are three tokens ("the digit seven"): forcing the original's min_new_tokens=8 runs past EOS
    (work / "generation_config.json").write_text(json.dumps({"num_beams": 5, "max_new_tokens": 8,
                                                             "min_new_tokens": 0}, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    log(f"[train] wrote {out}")
    return metrics


SET_TITLES = {"test": "test split (handwriting, as drawn)",
              "test_moved": "test split moved/scaled/rotated/restroked",
              "heldout_fonts": "held-out style (DejaVu fonts, never trained on)"}


def main(argv=None) -> None:
    """Command-line entry: python -m bridge_export.reference_model.train_demo."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEMO_CHECKPOINT)
    ap.add_argument("--fonts", choices=["pillow", "none"], default="pillow",
                    help="also train on Pillow's own typeface (Aileron), or on handwriting only")
    ap.add_argument("--font-fraction", type=float, default=0.2, help="share of each batch typeset (--fonts pillow)")
    ap.add_argument("--warm-aug", type=float, default=0.5,
                    help="share of the steps over which augmentation ramps up from none to full")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default; 1 is far faster on a busy shared machine)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    train(a.steps, a.batch, a.lr, a.seed, a.out, fonts=a.fonts, font_fraction=a.font_fraction,
          warm_aug=a.warm_aug)


if __name__ == "__main__":
    main()
