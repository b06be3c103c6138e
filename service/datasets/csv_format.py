"""CSV datasets: a header row, numeric feature columns, one named label column.

Valid files take numpy's C parser (``np.loadtxt``); when it refuses a file, a second pass with
the ``csv`` module finds the exact line and column to report, so good data is fast and bad data
gets a precise message. Comma-separated, UTF-8 (a BOM is fine), ``"`` quotes, blank lines skipped.
"""

from __future__ import annotations

import csv
import io
import warnings
from collections.abc import Callable, Iterator

import numpy as np

from service.datasets.dataset import (
    Dataset,
    LabelProblem,
    check_classes,
    check_limits,
    encode_labels,
    first_nonfinite,
)
from service.errors import DatasetError, LimitExceededError

_SHOW_COLUMNS = 20  # a missing-label message lists this many header names, then a count


def parse_csv(
    content: bytes,
    *,
    name: str,
    source: str,
    label_column: str,
    label_field: str,
    max_rows: int,
    max_features: int,
    limit_error: type[LimitExceededError] = LimitExceededError,
) -> Dataset:
    """Parse and validate a whole CSV file. ``source`` names the file in messages and fields
    (``"data.csv:line 17"``); ``label_field`` is where the label column name came from."""
    if not content.strip():
        raise DatasetError(f"{source} is empty", field=source)
    text = _decode(content, source)
    header, header_lines = _read_header(text, source)
    if label_column not in header:
        shown = ", ".join(repr(h) for h in header[:_SHOW_COLUMNS])
        more = f", ... ({len(header)} columns)" if len(header) > _SHOW_COLUMNS else ""
        raise DatasetError(
            f"label column {label_column!r} not found in {source}; columns seen: {shown}{more}",
            field=label_field,
        )
    label_idx = header.index(label_column)
    n_features = len(header) - 1
    if n_features < 1:
        raise DatasetError(
            f"{source} has no feature columns besides {label_column!r}", field=source
        )
    check_limits(
        0, n_features, max_rows=max_rows, max_features=max_features, field=source, error=limit_error
    )
    if text.count("\n") - header_lines + 1 > max_rows:  # cheap upper bound; count exactly only then
        try:
            rows = sum(1 for _ in _data_rows(text, header_lines))
        except csv.Error:
            rows = 0  # malformed: the parse below reports where
        check_limits(
            rows, 0, max_rows=max_rows, max_features=max_features, field=source, error=limit_error
        )

    table = _fast_parse(text, header_lines, len(header), label_idx)
    if table is None:
        table = _slow_parse(text, header_lines, header, label_idx, source)
    values, label_codes, label_strings, line_of = table
    if len(values) == 0:
        raise DatasetError(f"{source} has a header but no data rows", field=source)
    check_limits(
        len(values),
        n_features,
        max_rows=max_rows,
        max_features=max_features,
        field=source,
        error=limit_error,
    )

    try:
        class_of_string, class_names = encode_labels(np.asarray(label_strings, dtype=str))
    except LabelProblem as p:
        row = int(np.argmax(label_codes == p.index)) if p.index >= 0 else 0
        line = line_of(row)
        raise DatasetError(
            f"{p.reason} in label column {label_column!r} at line {line} of {source}",
            field=f"{source}:line {line}",
        ) from None
    check_classes(class_names, field=f"{source}:{label_column}")
    y = class_of_string[label_codes]

    feature_cols = [i for i in range(len(header)) if i != label_idx]
    X64 = values[:, feature_cols]
    with np.errstate(over="ignore"):  # overflow becomes inf, reported just below
        X = np.ascontiguousarray(X64, dtype=np.float32)
    found = first_nonfinite(X)
    if found is not None:
        count, flat = found
        row, col = divmod(flat, X.shape[1])
        original = X64[row, col]
        what = (
            repr(float(original))
            if not np.isfinite(original)
            else f"{original!r} (too large for float32)"
        )
        line = line_of(row)
        raise DatasetError(
            f"{count} NaN/inf value(s) in the features of {source}; the first is {what} in "
            f"column {header[feature_cols[col]]!r} at line {line}",
            field=f"{source}:line {line}",
        )
    return Dataset(name=name, X=X, y=y, n_classes=len(class_names), class_names=class_names)


# A parsed table: float values (label column holds codes), label code per row, the label string
# of each code, and a function from data row index to 1-based line number.
_Table = tuple[np.ndarray, np.ndarray, list[str], Callable[[int], int]]


def _decode(content: bytes, source: str) -> str:
    try:
        return content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = content[: exc.start].count(b"\n") + 1
        raise DatasetError(
            f"{source} is not UTF-8 text: invalid byte at line {line}",
            field=f"{source}:line {line}",
        ) from None


def _reader(text: str) -> Iterator[tuple[int, list[str]]]:
    """(last line number of the row, cells) for every non-blank row."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=",", quotechar='"', strict=False)
    for row in reader:
        if row and any(cell.strip() for cell in row):
            yield reader.line_num, row


def _read_header(text: str, source: str) -> tuple[list[str], int]:
    try:
        line, row = next(_reader(text))
    except StopIteration:
        raise DatasetError(f"{source} is empty", field=source) from None
    except csv.Error as exc:
        raise DatasetError(
            f"{source} header is not valid CSV: {exc}", field=f"{source}:line 1"
        ) from None
    header = [h.strip() for h in row]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DatasetError(
            f"duplicate column name(s) in the header of {source}: {', '.join(map(repr, dupes))}",
            field=f"{source}:line {line}",
        )
    return header, line


def _data_rows(text: str, header_lines: int) -> Iterator[tuple[int, list[str]]]:
    for line, row in _reader(text):
        if line > header_lines:
            yield line, row


def _fast_parse(text: str, header_lines: int, n_cols: int, label_idx: int) -> _Table | None:
    codes: dict[str, int] = {}

    def label_code(cell: str) -> float:
        key = cell.strip()
        code = codes.get(key)
        if code is None:
            code = codes[key] = len(codes)
        return float(code)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data": reported below instead
            values = np.loadtxt(
                io.StringIO(text),
                delimiter=",",
                skiprows=header_lines,
                comments=None,
                quotechar='"',
                dtype=np.float64,
                converters={label_idx: label_code},
                ndmin=2,
            )
    except ValueError:
        return None
    if len(values) and values.shape[1] != n_cols:
        return None  # every row has the same wrong width: the slow pass names the line
    label_codes = values[:, label_idx].astype(np.int64) if len(values) else np.zeros(0, np.int64)

    def line_of(row_index: int) -> int:
        for i, (line, _) in enumerate(_data_rows(text, header_lines)):
            if i == row_index:
                return line
        return header_lines + row_index + 1

    return values, label_codes, list(codes), line_of


def _slow_parse(
    text: str, header_lines: int, header: list[str], label_idx: int, source: str
) -> _Table:
    n_cols = len(header)
    upper = max(0, text.count("\n") + 1 - header_lines)  # >= the number of data rows
    values = np.empty((upper, n_cols), dtype=np.float64)  # no per-cell Python objects kept
    lines = np.empty(upper, dtype=np.int64)
    codes: dict[str, int] = {}
    n = 0
    try:
        for line, row in _data_rows(text, header_lines):
            where = f"{source}:line {line}"
            if len(row) != n_cols:
                raise DatasetError(
                    f"line {line} of {source} has {len(row)} fields; the header has {n_cols}",
                    field=where,
                )
            out = [0.0] * n_cols
            for j, cell in enumerate(row):
                if j == label_idx:
                    out[j] = float(codes.setdefault(cell.strip(), len(codes)))
                    continue
                try:
                    out[j] = float(cell)
                except ValueError:
                    what = (
                        "empty cell" if not cell.strip() else f"non-numeric value {cell.strip()!r}"
                    )
                    raise DatasetError(
                        f"{what} in column {header[j]!r} at line {line} of {source}", field=where
                    ) from None
            values[n] = out
            lines[n] = line
            n += 1
    except csv.Error as exc:
        raise DatasetError(f"{source} is not valid CSV: {exc}", field=source) from None
    values, lines = values[:n], lines[:n]
    label_codes = values[:, label_idx].astype(np.int64)
    return values, label_codes, list(codes), lambda row: int(lines[row])
