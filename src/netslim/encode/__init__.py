"""Entropy-coded sparse storage of a model (Deep Compression's third step, and better).

``netslim.encode.save(model, "m.nsz", arch="lenet300")`` writes the smallest encoding of every
tensor (see :mod:`netslim.encode.nsz`); ``netslim.encode.load("m.nsz")`` returns the model with
bit-exact weights.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..profile import deployable_copy
from .entropy import CodedStream, decode_stream, encode_stream, shannon_bits
from .nsz import TensorReport, read_nsz, write_nsz


def save(model: nn.Module, path: str | Path, arch: str | None = None, num_classes: int | None = None,
         coders: tuple[str, ...] = ("huffman", "ans"), structure: dict | None = None) -> list[TensorReport]:
    """Encode the deployable form of ``model`` (masks and sharing baked in) into ``path``.

    ``arch`` is the model reference (``"lenet300"``, ``"torchvision:resnet18"``) that :func:`load` rebuilds,
    ``structure`` what became of its modules (:func:`netslim.saving.structure_record`; :func:`netslim.save`
    records it); both go into the header's ``arch`` object. Without ``arch``, :func:`load` needs the model
    passed in.
    """
    tensors = deployable_copy(model).state_dict()
    meta = None
    if arch:
        meta = {"name": arch, "num_classes": num_classes}
        if structure is not None:
            meta["structure"] = structure
    return write_nsz(tensors, path, meta, coders)


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Decode ``path`` into ``model`` (or a model rebuilt from the file's reference and structure), strictly
    (:func:`netslim.saving.load_nsz`; :func:`netslim.load` also sets eval mode)."""
    from ..saving import load_nsz

    return load_nsz(path, model)


def report_table(reports: list[TensorReport], min_elements: int = 1) -> str:
    """Markdown table: per tensor the encoding, bits per non-zero and per index next to their entropy bounds, and
    apart from those coded streams the codebook and active-row/column bitmap bytes; then a line of totals."""
    lines = ["| tensor | encoding | elements | non-zeros | bytes | bits/non-zero | bound | bits/index | bound "
             "| coders | gap bits, order | fillers | codebook bytes | bitmap bytes | active rows x cols |",
             "|" + "---|" * 15]
    for r in reports:
        if r.numel < min_elements:
            continue
        v_bound = r.value_bound_bits / max(r.nonzeros, 1)
        i_bound = r.index_bound_bits / max(r.nonzeros, 1)
        detail = r.detail
        active = "x".join(map(str, detail["active"])) if "active" in detail else "-"
        lines.append(
            f"| {r.name} | {r.encoding}{' (' + detail['stored'] + ')' if 'stored' in detail else ''} "
            f"| {r.numel:,} | {r.nonzeros:,} | {r.total_bytes:,} "
            f"| {r.bits_per_nonzero:.3f} | {v_bound:.3f} | {r.bits_per_index:.3f} | {i_bound:.3f} "
            f"| {r.value_coder or '-'} / {r.index_coder or '-'} | {detail.get('bits', '-')}, {detail.get('layout', '-')} "
            f"| {detail.get('fillers', '-')} | {r.codebook_bits // 8:,} | {r.structure_bits // 8:,} | {active} |")
    lines += ["", stream_summary(reports)]
    return "\n".join(lines)


def stream_summary(reports: list[TensorReport]) -> str:
    """One line: the entropy-coded streams' bytes against their Shannon bound, plus codebooks, bitmaps and raw
    values (which have no such bound)."""
    coded = bound = raw = 0.0
    for r in reports:
        for bits, b in ((r.value_bits, r.value_bound_bits), (r.index_bits, r.index_bound_bits)):
            if b:
                coded, bound = coded + bits, bound + b
            else:
                raw += bits
    over = f"{100 * (coded / bound - 1):.1f} % above their bound" if bound else "no bound"
    codebooks = sum(r.codebook_bits for r in reports) // 8
    bitmaps = sum(r.structure_bits for r in reports) // 8
    return (f"coded streams {coded / 8:,.0f} bytes ({over}, {bound / 8:,.0f}), plus codebooks {codebooks:,} "
            f"bytes, bitmaps {bitmaps:,} bytes and raw values {raw / 8:,.0f} bytes")


__all__ = ["save", "load", "read_nsz", "write_nsz", "report_table", "stream_summary", "TensorReport", "encode_stream",
           "decode_stream", "shannon_bits", "CodedStream"]
