"""Commands that run a bundle: caption, classify, embed."""
from __future__ import annotations

from pathlib import Path

import click

from bridge_export.runtime.pipeline import MAX_BATCH, MAX_CAPTION_BATCH
from bridge_export.runtime.search import MAX_BEAMS

from bridge_export.exporter.cli.app import main
from bridge_export.exporter.cli.common import ImageReader, expand_images, friendly, load_pipeline, run_options


@main.command(section="run")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("--beams", type=click.IntRange(1, MAX_BEAMS),
              help="beam width (default: the manifest's, 5 as the original)")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096),
              help="most tokens to generate (default: the manifest's, 30)")
@click.option("--min-new-tokens", type=click.IntRange(0, 4096),
              help="at least this many tokens before EOS (default: the manifest's, at most --max-new-tokens)")
@click.option("--prompt", help="text the caption continues (default: the manifest's, 'English caption:')")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1, MAX_CAPTION_BATCH),
              help="images per generate call (bounds the KV cache's memory)")
@click.option("--stream", is_flag=True, help="print tokens as they arrive (greedy)")
@run_options
@friendly
def caption(bundle, images, beams, max_new_tokens, min_new_tokens, prompt, batch_size, stream, backend, device):
    """Caption images (files or folders) with beam search or streamed greedy decoding."""
    if stream and beams not in (None, 1):
        raise click.ClickException("--stream prints tokens as they are chosen, which beam search cannot: drop --beams")
    if min_new_tokens is not None and max_new_tokens is not None and min_new_tokens > max_new_tokens:
        raise click.ClickException(f"--min-new-tokens {min_new_tokens} is above --max-new-tokens {max_new_tokens}")
    pipe = load_pipeline(bundle, backend, device)
    pipe.codec.prompt_ids(pipe.caption_defaults.prompt if prompt is None else prompt)  # refused before any image
    reader = ImageReader(expand_images(images), batch_size)
    n = 0
    for names, ims in reader:
        if stream:
            for f, im in zip(names, ims):
                click.echo(f"{f}\t", nl=False)
                for piece in pipe.caption_stream(im, prompt, max_new_tokens, min_new_tokens):
                    click.echo(piece, nl=False)
                click.echo()
        else:
            caps = pipe.captions(ims, prompt, max_new_tokens, min_new_tokens, num_beams=beams, batch_size=batch_size)
            for f, c in zip(names, caps):
                click.echo(f"{f}\t{c.text}")
        n += len(names)
    reader.finish(f"the other {n} were captioned")


@main.command(section="run")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("--labels", required=True, help="comma-separated class names")
@click.option("--template", default="a photo of a {}.", show_default=True,
              help="text each label is put in; one {} where the label goes")
@click.option("--mode", type=click.Choice(["C", "G"]), default="C", show_default=True,
              help="InternVL-C (contrastive embeddings) or InternVL-G (QLLaMA's embeddings)")
@click.option("--top", default=1, show_default=True, type=click.IntRange(1), help="labels printed per image")
@run_options
@friendly
def classify(bundle, images, labels, template, mode, top, backend, device):
    """Zero-shot classification of images over --labels: the best label(s) and probabilities per image."""
    from bridge_export.runtime.pipeline import check_labels, check_template

    names = check_labels([s.strip() for s in labels.split(",") if s.strip()])
    check_template(template)
    pipe = load_pipeline(bundle, backend, device)
    reader = ImageReader(expand_images(images), 64)
    n = 0
    for files, ims in reader:
        for f, result in zip(files, pipe.classify(ims, names, template=template, mode=mode)):
            best = result.top(top) if hasattr(result, "top") else _top(result, names, top)
            click.echo(f"{f}\t" + "\t".join(f"{label}\t{p:.3f}" for label, p in best))
        n += len(files)
    reader.finish(f"the other {n} were classified")


def _top(probs, names, k):
    import numpy as np

    order = np.argsort(-np.asarray(probs), kind="stable")[:k]
    return [(names[i], float(probs[i])) for i in order]


@main.command(section="run")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1)
@click.option("--texts", multiple=True, help="texts to embed as well (repeatable)")
@click.option("--mode", type=click.Choice(["C", "G"]), default="C", show_default=True,
              help="InternVL-C (contrastive embeddings) or InternVL-G (QLLaMA's embeddings)")
@click.option("--normalize/--no-normalize", default=False, show_default=True,
              help="unit-length embeddings (cosine similarity = dot product)")
@click.option("--out", type=click.Path(path_type=Path),
              help="embeddings file: NAME.npz (embeddings, names, kinds) or NAME.parquet, written atomically")
@click.option("--overwrite", is_flag=True, help="replace an existing --out")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, MAX_BATCH),
              help="images per graph call")
@click.option("--ray", "use_ray", is_flag=True, help="run on Ray Data (images only; --out must be .parquet)")
@click.option("--address", help="--ray: cluster address (default: start a local cluster)")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 4096),
              help="--ray: worker processes (actors), one pipeline each")
@click.option("--gpus-per-worker", default=0.0, show_default=True, type=click.FloatRange(0, 64),
              help="--ray: GPUs per worker")
@run_options
@friendly
def embed(bundle, images, texts, mode, normalize, out, overwrite, batch_size, use_ray, address, workers,
          gpus_per_worker, backend, device):
    """Embed images (files or folders) and texts, printed or written as .npz or .parquet."""
    import numpy as np

    from bridge_export.exporter.embeddings_file import check_embeddings_out, write_embeddings

    if not images and not texts:
        raise click.ClickException("nothing to embed: give image files or folders, and/or --texts")
    if out is not None:  # refused before any work
        out = check_embeddings_out(out, overwrite)
    if use_ray:
        if normalize:
            raise click.ClickException("--normalize is not available with --ray: normalize the Parquet column after")
        from bridge_export.runtime.serve.ray_embed import run_cli

        return run_cli(bundle, expand_images(images), texts, mode, out, batch_size, address, workers,
                       gpus_per_worker)
    pipe = load_pipeline(bundle, backend, device)
    txt = pipe.embed_texts(list(texts)) if texts else None
    reader = ImageReader(expand_images(images), batch_size) if images else None
    files, parts = [], []
    for names, ims in reader or []:
        parts.append(pipe.embed_images(ims, mode, batch_size=batch_size))
        files += names
    rows = parts + ([txt] if txt is not None else [])
    if not rows:
        reader.finish("nothing was embedded")
    emb = np.concatenate(rows)
    if normalize:
        from bridge_export.runtime.numeric import normalize as unit_length

        emb = unit_length(emb)
    names = [str(f) for f in files] + list(texts)
    kinds = ["image"] * len(files) + ["text"] * len(texts)
    if out is None:
        for n, e in zip(names, emb):
            click.echo(f"{n}\t" + " ".join(f"{v:.5f}" for v in e[:8]) + (" ..." if e.shape[0] > 8 else ""))
    else:  # embeddings, names and kinds in one file, renamed into place as a unit
        write_embeddings(out, emb, names, kinds)
    if out:
        click.echo(f"wrote {emb.shape[0]} embeddings of dim {emb.shape[1]} to {out}", err=True)
    if reader:
        reader.finish(f"the other {len(files)} were embedded")
