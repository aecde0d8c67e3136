"""CSV and Parquet tables read in column chunks (pyarrow), with errors that name file and line.

pyarrow parses a chunk of `chunk_bytes` at a time into string columns (CSV: every column read
as text, empty stays "", quoted separators and newlines allowed; Parquet: row groups in
batches, values cast to text where text is asked for). Values are checked per chunk with
array operations; only when a chunk holds an error does a slow path find its exact line:

  * a row pyarrow cannot parse (wrong field count, a field over the limit, invalid UTF-8) is
    found by `csv`'s reader streaming the file, which reports the line as `read_table` did;
  * a bad value at row r: the line is found by streaming `csv` over the file up to row r.

Why pyarrow: it is already installed (a TFDS dependency), it parses CSV in C++ with quoting
rules equal to Python's `csv` for these files, and reads Parquet natively.
"""

from __future__ import annotations

import csv
import dataclasses
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from etils import epath

from dmf_jax.core.errors import DataError

CHUNK_BYTES = 32 << 20  # bytes of CSV per chunk (Parquet: PARQUET_ROWS rows)
PARQUET_ROWS = 1 << 18
CSV_FIELD_LIMIT = 1 << 20  # bytes per CSV field (csv's default is 128 KiB)
_DECIMAL_INT = r"^-?[0-9]+$"
_DECIMAL_FLOAT = r"^-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"


@dataclasses.dataclass
class Chunk:
  """Rows [first_row, first_row + num_rows) of a table (rows count from 0 after the header)."""

  reader: "TableReader"
  batch: pa.RecordBatch
  first_row: int

  @property
  def num_rows(self) -> int:
    return self.batch.num_rows

  def strings(self, column: str) -> pa.Array:
    """The column as text (a missing Parquet value is "")."""
    array = self.batch.column(column)
    if not pa.types.is_string(array.type):
      array = pc.cast(array, pa.string())
    return pc.fill_null(array, "") if array.null_count else array

  def integers(self, column: str, name: str) -> np.ndarray:
    """int64 values (decimal integers that fit in 64 bits); the first bad value raises."""
    array = self.batch.column(column)
    if pa.types.is_integer(array.type) and not array.null_count:
      return array.to_numpy(zero_copy_only=False).astype(np.int64)
    text = self.strings(column)
    if pc.all(pc.match_substring_regex(text, _DECIMAL_INT)).as_py() is not False:
      try:
        return pc.cast(text, pa.int64()).to_numpy(zero_copy_only=False)
      except pa.ArrowInvalid:
        pass  # out of range: found below
    return self._python_values(text, name, integer=True)

  def numbers(self, column: str, name: str) -> np.ndarray:
    """Finite float64 values; the first bad or non-finite value raises."""
    array = self.batch.column(column)
    if (pa.types.is_floating(array.type) or pa.types.is_integer(array.type)) and not array.null_count:
      values = array.to_numpy(zero_copy_only=False).astype(np.float64)
    else:
      text = self.strings(column)
      values = None
      if pc.all(pc.match_substring_regex(text, _DECIMAL_FLOAT)).as_py() is not False:
        values = pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)
      if values is None:
        values = self._python_values(text, name, integer=False)
    bad = ~np.isfinite(values)
    if bad.any():
      row = int(np.argmax(bad))
      shown = self.strings(column)[row].as_py()
      raise self.reader.error(self.first_row + row, f"{name} {shown!r} is not a finite number")
    return values

  def optional_numbers(self, column: str, name: str) -> np.ndarray:
    """float64 values with NaN where the cell is empty (missing); a value that is not a
    number, or is NaN/inf, raises with its line."""
    text = self.strings(column)
    missing = pc.equal(pc.utf8_trim_whitespace(text), "").to_numpy(zero_copy_only=False)
    values = np.full(len(text), np.nan)
    present = np.flatnonzero(~missing)
    if len(present):
      sub = dataclasses.replace(self, batch=pa.record_batch(
          {column: text.take(pa.array(present))}), first_row=0)
      try:
        values[present] = sub.numbers(column, name)
      except DataError:  # report it at its own row of this chunk
        found = ~np.isfinite(np.array([_float_or_nan(v) for v in
                                       text.take(pa.array(present)).to_pylist()]))
        row = int(present[np.argmax(found)])
        raise self.reader.error(self.first_row + row, f"{name} {text[row].as_py()!r} is not a "
                                f"finite number (leave the cell empty for a missing value)"
                                ) from None
    return values

  def _python_values(self, text: pa.Array, name: str, *, integer: bool) -> np.ndarray:
    """Python's int()/float() per value (what they accept, e.g. ' 5', '1_000', 'inf')."""
    out = np.empty(len(text), np.int64 if integer else np.float64)
    expected = "an integer" if integer else "a number"
    for k, value in enumerate(text.to_pylist()):
      try:
        out[k] = int(value) if integer else float(value)
      except ValueError:
        raise self.reader.error(self.first_row + k, f"{name} {value!r} is not {expected}") from None
      except OverflowError:
        raise self.reader.error(self.first_row + k,
                                f"{name} {value!r} does not fit in 64 bits") from None
    return out

  def first(self, mask: np.ndarray | pa.Array, message: str) -> None:
    """Raises `message` at the first row where `mask` holds (no-op when none does)."""
    mask = np.asarray(mask.to_numpy(zero_copy_only=False) if isinstance(mask, pa.Array) else mask)
    if mask.any():
      raise self.reader.error(self.first_row + int(np.argmax(mask)), message)


class TableReader:
  """A CSV (UTF-8, a BOM allowed) or Parquet table with a header, read in chunks."""

  def __init__(self, path: epath.Path, required: list[str], *, chunk_bytes: int | None = None):
    self.path = epath.Path(path)
    self.parquet = self.path.suffix == ".parquet"
    self.chunk_bytes = chunk_bytes or CHUNK_BYTES
    if self.parquet:
      try:
        with self.path.open("rb") as f:
          self.header = list(pq.ParquetFile(f).schema_arrow.names)
      except Exception as e:  # pylint: disable=broad-except  (pyarrow's errors have no common base)
        raise DataError(f"{self.path}: not a readable Parquet file: {e}") from None
    else:
      self.header = self._csv_header()
    missing = [c for c in required if c not in self.header]
    if missing:
      raise DataError(f"{self.path}: missing column(s) {missing}; header is {self.header}")

  # --- reading ---------------------------------------------------------------------------

  def chunks(self) -> Iterator[Chunk]:
    """The rows chunk by chunk (blank CSV lines skipped)."""
    first = 0
    with self.path.open("rb") as f:
      try:
        batches = self._parquet_batches(f) if self.parquet else self._csv_batches(f)
        for batch in batches:
          if batch.num_rows:
            yield Chunk(self, batch, first)
            first += batch.num_rows
      except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise self._diagnose(e) from None

  def read_all(self) -> Chunk:
    """The whole table as one chunk (side tables: one row per user or item)."""
    batches = [c.batch for c in self.chunks()]
    schema = batches[0].schema if batches else pa.schema(
        [(name, pa.string()) for name in self.header])
    table = pa.Table.from_batches(batches, schema=schema).combine_chunks()
    batch = (table.to_batches()[0] if table.num_rows
             else pa.RecordBatch.from_pylist([], schema=schema))
    return Chunk(self, batch, 0)

  def _csv_header(self) -> list[str]:
    for _, header in self._csv_rows():
      return header
    raise DataError(f"{self.path}: empty file (needs a header row)")

  def _csv_batches(self, f):
    reader = pacsv.open_csv(
        f, read_options=pacsv.ReadOptions(block_size=self.chunk_bytes),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in self.header},
            strings_can_be_null=False, quoted_strings_can_be_null=False))
    if reader.schema.names != self.header:
      raise DataError(f"{self.path}: header {reader.schema.names} is read differently by "
                      f"pyarrow than by csv ({self.header}); check its quoting")
    return iter(reader)

  def _parquet_batches(self, f):
    yield from pq.ParquetFile(f).iter_batches(batch_size=PARQUET_ROWS)

  # --- errors: the exact line, found by streaming Python's csv over the file ----------------

  def _csv_rows(self) -> Iterator[tuple[int, list[str]]]:
    """(line number, row) of the header and every non-blank row, streamed; raises the
    first unreadable row's DataError (UTF-8, field limit, field count)."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    with self.path.open("rb") as f:
      reader = csv.reader(_decoded_lines(self.path, f))
      width = None
      try:
        for row in reader:
          if not row:
            continue
          width = len(row) if width is None else width
          if len(row) != width:
            raise DataError(f"{self.path}:{reader.line_num}: malformed row: {len(row)} fields, "
                            f"header has {width}")
          yield reader.line_num, row
      except csv.Error as e:
        raise DataError(f"{self.path}:{reader.line_num}: {e} (fields are limited to "
                        f"{CSV_FIELD_LIMIT} bytes)") from None

  def _diagnose(self, arrow_error: Exception) -> DataError:
    if not self.parquet:
      for _ in self._csv_rows():  # raises at the first unreadable row
        pass
    return DataError(f"{self.path}: {arrow_error}")

  def line(self, row: int) -> int | str:
    """The line of data row `row` (Parquet: its row number, counting from 1)."""
    if self.parquet:
      return row + 1
    for k, (line, _) in enumerate(self._csv_rows()):
      if k == row + 1:  # k = 0 is the header
        return line
    return "?"

  def location(self, row: int) -> str:
    return f"{self.path}:{self.line(row)}"

  def error(self, row: int, message: str) -> DataError:
    return DataError(f"{self.location(row)}: {message}")


def _decoded_lines(path: epath.Path, f) -> Iterator[str]:
  """The file's lines as text (a leading BOM dropped); invalid UTF-8 raises naming the line."""
  for number, raw in enumerate(f, start=1):
    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
      raw = raw[3:]
    try:
      yield raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(f"{path}:{number}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); save the "
                      f"file as UTF-8") from None


def _float_or_nan(value: str) -> float:
  try:
    return float(value)
  except (ValueError, OverflowError):
    return float("nan")


def lookup(values: pa.Array, vocabulary: pa.Array) -> np.ndarray:
  """Index of each value in `vocabulary` (int64; -1 where absent)."""
  index = pc.index_in(values, value_set=vocabulary)
  return pc.fill_null(index, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def sorted_unique(values: pa.Array) -> pa.Array:
  """Distinct values in code-point order (Python's `sorted` of str)."""
  unique = pc.unique(values)
  return unique.take(pc.sort_indices(unique))


