"""`aria quantize SRC -o DIR --scheme int4|int8|nf4`: write a quantized copy of a model.

The work is runtime.convert.quantize_checkpoint (streamed, written to a temporary directory and
renamed at the end). This module picks the source and the destination, draws the progress bar on
stderr and prints the bytes per module family before and after.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from quant import DEFAULT_SCHEME, get_scheme, scheme_names
from runtime.checkpoint import open_checkpoint
from runtime.convert import ConvertResult, checked_output, quantize_checkpoint
from runtime.errors import UsageError
from runtime.quant_targets import quantized_families

from . import console
from .models import local_models_dir, parse_model, resolve_model_dir
from .options import HubOptions, with_options
from .settings import format_size

REPORT_COLUMNS = ("FAMILY", "BEFORE", "AFTER", "STATUS")


def output_dir(output: str | None, src: str, scheme: str) -> Path:
    """Where to write: a path as given; a bare name (or nothing) lands in aria's models folder,
    where `-m NAME` finds it (no -o: '<source name>-<scheme>', so `aria` becomes `aria-int4`)."""
    if output is None:
        ref = parse_model(src)
        base = ref.repo_id.split("/")[-1] if ref.repo_id else (ref.path.name if ref.path else src)
        return local_models_dir() / f"{base.lower()}-{scheme}"
    if not output.strip():
        raise UsageError("-o must name a directory; e.g. -o ./aria-int4")
    if "/" in output or "\\" in output or output in (".", "..") or output.startswith("~"):
        return Path(output).expanduser()
    return local_models_dir() / output


def _check_scheme(name: str) -> str:
    if name not in scheme_names():
        raise UsageError(f"--scheme must be one of {', '.join(scheme_names())} (got {name})")
    return name


class _ConvertProgress:
    """Bytes and tensors done with an ETA, on stderr: a bar on a terminal, else a start line (and
    the caller's end line)."""

    def __init__(self, total_tensors: int, start_line: str):
        self.total_tensors = total_tensors
        self.start_line = start_line  # said once the first tensor is done, i.e. once the source was accepted
        self.tensors = 0
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> None:
        from rich.progress import TextColumn

        self._bar = console.byte_progress("quantizing", TextColumn("{task.fields[tensors]}"))
        if self._bar is not None:
            self._task = self._bar.add_task("quantize", total=None, tensors=self._tensors_text())

    def _tensors_text(self) -> str:
        return f"{self.tensors}/{self.total_tensors} tensors"

    def __call__(self, done: int, total: int, name: str) -> None:
        if not self.tensors and self._bar is None:
            console.info(self.start_line)
        self.tensors += 1
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total, tensors=self._tensors_text())

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


@with_options(HubOptions)
def quantize(
    src: Annotated[str, typer.Argument(
        metavar="SRC", show_default=False,
        help="The model to quantize: a Hub repo id, an alias (aria) or a local directory, in any layout.")],
    output: Annotated[str | None, typer.Option(
        "-o", "--output", metavar="DIR|NAME", show_default=False,
        help="Output directory; a bare NAME goes to aria's models folder and works as `-m NAME` "
             "(default: the source's name and the scheme there, e.g. aria-int4).")] = None,
    scheme: Annotated[str, typer.Option(
        "--scheme", metavar="int4|int8|nf4",
        help="int4: group-wise 4-bit (smallest, fast); int8: per-channel 8-bit (closest to bf16); "
             "nf4: bitsandbytes 4-bit NormalFloat.")] = DEFAULT_SCHEME,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace the output directory if it holds a model (or nothing).")] = False,
    quant_lm_head: Annotated[bool, typer.Option(
        "--quant-lm-head", help="Quantize the lm_head too: less to read per token, a small cost in "
                                "accuracy (kept in bf16 by default).")] = False,
    *,
    opts: HubOptions,
) -> None:
    """Quantize a model's decoder weights (every routed expert, shared experts, attention; the
    lm_head with --quant-lm-head) and write a self-describing copy that `aria ask -m` loads.

    Tensors are streamed from the source one by one, so memory stays small whatever the model
    size. The output appears only when complete. Prints the bytes per module family before and
    after (stdout) and the time and throughput (stderr).
    """
    scheme = _check_scheme(scheme)
    out = checked_output(output_dir(output, src, scheme), force)  # checked again by the converter; here before any download
    source = resolve_model_dir(src, offline=opts.offline)
    tensors = len(open_checkpoint(source).names())
    started = time.perf_counter()
    progress = _ConvertProgress(tensors, f"quantizing {src} to {scheme} ({tensors} tensors) into {out}")
    with progress:
        result = quantize_checkpoint(source, out, get_scheme(scheme), force=force, progress=progress,
                                     families=quantized_families(lm_head=quant_lm_head))
    console.detail(f"took {time.perf_counter() - started:.1f} s including the final rename")
    before, after = _totals(result)
    console.info(
        f"wrote {out} in {result.seconds:.1f} s ({result.mb_per_s:.0f} MB/s): "
        f"{format_size(before)} -> {format_size(after)}; use it with `aria ask -m {_model_arg(out)}`"
    )
    if opts.json:
        console.emit_json(report_json(result, src, source, scheme))
    else:
        console.emit_table(REPORT_COLUMNS, report_rows(result))


def _model_arg(out: Path) -> str:
    return out.name if out.parent == local_models_dir().resolve() else str(out)


def _totals(result: ConvertResult) -> tuple[int, int]:
    rows = result.report.rows()
    return sum(r[1] for r in rows), sum(r[2] for r in rows)


def report_rows(result: ConvertResult) -> list[tuple[str, str, str, str]]:
    rows = [(family, format_size(before), format_size(after), status)
            for family, before, after, status in result.report.rows()]
    before, after = _totals(result)
    rows.append(("total", format_size(before), format_size(after), f"{before / max(after, 1):.1f}x smaller"))
    return rows


def report_json(result: ConvertResult, src: str, source: Path, scheme: str) -> dict[str, Any]:
    rows = result.report.rows()
    before, after = _totals(result)
    return {
        "source": src,
        "source_dir": str(source),
        "output": str(result.out_dir),
        "scheme": scheme,
        "seconds": result.seconds,
        "mb_per_s": result.mb_per_s,
        "bytes_before": before,
        "bytes_after": after,
        "families": [
            {"family": family, "bytes_before": before, "bytes_after": after, "status": status}
            for family, before, after, status in rows
        ],
    }
