"""What every command shares: one-line errors, the options that mean the same everywhere, image input."""
from __future__ import annotations

import errno
import functools
import os
import sys
from pathlib import Path

import click

from bridge_export.runtime.errors import UserError
from bridge_export.runtime.precisions import PRECISIONS, TARGETS, resolve

# Errors a user can cause and fix: shown as one line, no traceback (--debug shows it). Anything else is a
# bug and keeps its traceback. ValueError is how every argument check reports; OSError covers a full
# disk, a missing or unreadable file; MemoryError a request too large for this machine.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, OSError, MemoryError)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}" + (" (free some disk space or choose another --out)"
                                         if e.errno == errno.ENOSPC else "")
    if isinstance(e, MemoryError):
        return _out_of_memory(e)
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx else None
    return bool(root and root.params.get("debug")) or os.environ.get("BRIDGE_EXPORT_DEBUG") == "1"


# Top-level modules of each optional extra: a command that needs a missing one says which extra to install.
EXTRAS = {"torch": "export", "onnx": "export", "onnxscript": "export", "safetensors": "export",
          "transformers": "export", "google": "export",
          "tensorrt": "tensorrt", "polygraphy": "tensorrt", "cuda": "tensorrt", "sklearn": "train",
          "pyarrow": "ray", "ray": "ray", "pytriton": "serve", "tritonclient": "serve"}


def missing_extra(e: ModuleNotFoundError) -> str | None:
    """The one-line advice for a missing optional dependency, or None if it belongs to no extra."""
    top = (e.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    return f'this command needs {top}, which is not installed: pip install "bridge-export[{extra}]"'


# Options that lower a command's peak memory, in the order the advice names them.
MEMORY_OPTIONS = ("--batch-size", "--beams", "--max-new-tokens", "--threads")
# Parameters holding file names, which need not be UTF-8 (POSIX allows any bytes): not checked as text.
FILE_PARAMS = ("bundle", "images")


def _out_of_memory(e: BaseException) -> str:
    """One line for running out of memory, naming only options the current command has."""
    ctx = click.get_current_context(silent=True)
    have = {o for p in (ctx.command.params if ctx else []) for o in p.opts}
    lower = [o for o in MEMORY_OPTIONS if o in have]
    what = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
    advice = f"lower {' or '.join(lower)}" if lower else "close other programs or use a machine with more memory"
    return f"{what}: {advice}"


def _check_text_arguments(kwargs: dict) -> None:
    """ClickException naming an argument whose text is not valid UTF-8 (the shell passed raw bytes, which
    Python keeps as lone surrogates that no tokenizer can encode)."""
    for name, value in kwargs.items():
        values = value if isinstance(value, (tuple, list)) else [value]
        for v in values:
            if name not in FILE_PARAMS and isinstance(v, str):
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    shown = v.encode("utf-8", "backslashreplace").decode()[:40]
                    raise click.ClickException(f"--{name.replace('_', '-')} {shown!r} is not valid UTF-8 text: "
                                               "pass it in UTF-8 (check the terminal's or file's encoding)") from None


def friendly(fn):
    """Turn user errors into one-line messages and Ctrl-C into a clean exit (code 130); --debug: tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _check_text_arguments(kwargs)
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written (partial output removed)", err=True)
            sys.exit(130)
        except click.ClickException:
            raise
        except ModuleNotFoundError as e:
            advice = missing_extra(e)
            if advice is None:
                raise
            raise click.ClickException(advice) from e
        except USER_ERRORS as e:
            if _debug():
                raise
            raise click.ClickException(_one_line(e)) from e

    return wrapper


def deprecated_alias(old: str, new: str):
    """A hidden option `old` that still works for one release, with a warning naming `new`."""

    def note(ctx, param, value):
        if value not in (None, False, ()):
            click.echo(f"warning: {old} is deprecated: use {new}", err=True)
        return value

    return click.option(old, hidden=True, callback=note, expose_value=True,
                        help=f"deprecated spelling of {new}")


class PresetName(click.ParamType):
    """A preset of reference_model.config, read when first needed (no torch: the presets are dataclasses)."""

    name = "preset"

    @staticmethod
    def names() -> list[str]:
        """The preset names, from the registry itself."""
        from bridge_export.reference_model.config import PRESETS

        return list(PRESETS)

    def get_metavar(self, *args, **kwargs) -> str:
        return "[" + "|".join(self.names()) + "]"

    def convert(self, value, param, ctx):
        if value not in self.names():
            self.fail(f"{value!r} is not a preset: choose one of {', '.join(self.names())}", param, ctx)
        return value

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        return [CompletionItem(n) for n in self.names() if n.startswith(incomplete)]


PRESET = PresetName()


def precision_help() -> str:
    """One line per precision, from the registry (runtime.precisions)."""
    return "; ".join(f"{p.name}: {p.description}" for p in PRECISIONS.values())


def target_option(f):
    """--target tensorrt|onnxruntime: the operator target (portable ONNX, or onnxruntime's fused operators)."""
    return click.option("--target", type=click.Choice(TARGETS), default=None,
                        help="operator target: tensorrt = portable ONNX (standard operators; onnxruntime runs it "
                             "too), onnxruntime = onnxruntime's fused contrib operators (default: the precision's: "
                             "int8-cpu/int4-cpu -> onnxruntime, the others -> tensorrt)")(f)


def resolve_precision(name: str, target: str | None) -> str:
    """The operator target for `--precision name --target target`, refused in one line when they clash."""
    return resolve(name, target)[1]


def int4_options(f):
    """--block-size / --symmetric / --accuracy-level (int4-cpu settings), for `onnx` and `precision`."""
    f = click.option("--accuracy-level", default=4, show_default=True, type=click.Choice([0, 1, 2, 3, 4]),
                     help="int4-cpu: MatMulNBits compute type (4 = int8 activations, fastest on CPU; 0 = fp32)")(f)
    f = click.option("--symmetric", is_flag=True, help="int4-cpu: symmetric blocks (no zero points)")(f)
    return click.option("--block-size", default=32, show_default=True,
                        help="int4-cpu: weights per scale (a power of 2 from 16 to 256)")(f)


def int4_settings(block_size: int, symmetric: bool, accuracy_level: int):
    """The Int4Options the int4 options describe."""
    from bridge_export.exporter.quantize.int4 import Int4Options

    return Int4Options(block_size=block_size, symmetric=symmetric, accuracy_level=int(accuracy_level))


def run_options(fn):
    """--backend and --device for the commands that run a bundle (see runtime.load)."""
    fn = click.option("--device", default=None,
                      help="cpu (onnxruntime's default) or cuda / cuda:N (KV cache on the GPU; TensorRT's default)")(fn)
    return click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
                        show_default=True, help="what runs the graphs: onnxruntime, or the TensorRT engines that "
                                                "`bridge-export engine` built")(fn)


def threads_option(f, what: str = "onnxruntime threads"):
    """--threads N: CPU threads (one meaning in every command)."""
    from bridge_export.runtime.sessions import max_threads

    return click.option("--threads", default=None, type=click.IntRange(1, max_threads()),
                        help=f"{what} (default: all cores)")(f)


def load_pipeline(bundle, backend: str, device):
    """runtime.load, closed when the command ends (frees device memory on a GPU)."""
    from bridge_export import runtime

    pipe = runtime.load(bundle, backend=backend, device=device)
    click.get_current_context().call_on_close(pipe.close)
    return pipe


def image_suffixes() -> set[str]:
    """Image file suffixes a folder argument picks up."""
    from bridge_export.exporter.quantize.calibration import IMAGE_SUFFIXES

    return set(IMAGE_SUFFIXES) | {".gif"}


def expand_images(images) -> list[Path]:
    """Image files from files and folders (a folder: its image files, sorted); none at all is refused."""
    suffixes = image_suffixes()
    out = []
    for p in map(Path, images):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix.lower() in suffixes)
        else:
            out.append(p)
    if not out:
        raise click.ClickException("no images found: give image files or folders holding .png/.jpg files")
    return out


class ImageReader:
    """Reads image files a chunk at a time; an unreadable one is reported on stderr and skipped.

    The others are still processed; `finish()` then fails the command (exit status 1) naming how many.
    """

    def __init__(self, files: list[Path], chunk: int):
        self.files, self.chunk, self.failed = files, chunk, []

    def __iter__(self):
        from bridge_export.runtime.preprocess import ImageError, to_pil
        from bridge_export.runtime.progress import progress

        with progress(total=len(self.files), desc="images", unit="img") as bar:
            for i in range(0, len(self.files), self.chunk):
                names, images = [], []
                for f in self.files[i:i + self.chunk]:
                    try:
                        images.append(to_pil(f))
                        names.append(f)
                    except ImageError as e:
                        self.failed.append(f)
                        bar.write(f"skipped: {e}")
                bar.update(len(self.files[i:i + self.chunk]))
                if images:
                    yield names, images

    def finish(self, done: str) -> None:
        """Exit with status 1 if any image was skipped (after the others' results were written)."""
        if self.failed and len(self.failed) == len(self.files):
            raise click.ClickException(f"none of the {len(self.files)} images could be read (see above)")
        if self.failed:
            raise click.ClickException(f"{len(self.failed)} of {len(self.files)} images could not be read (see "
                                       f"above); {done}")
