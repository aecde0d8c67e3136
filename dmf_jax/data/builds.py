"""The dataset registry and builds: TFDS dataset builders (ArrayRecord, no TensorFlow),
registered with TFDS when this module is imported (`dmf_jax.data` imports it on first use).

  generated_ctr      seeded synthetic data (configs: default, content_signal, tiny, large, ...)
  movielens_100k_mm  MovieLens-100K + TMDB text + posters (configs: text_image, text, ids,
                     text_image_tmdb, ids_tmdb)
  byod_ctr           your own files, described by dataset.json in manual_dir; each distinct
                     source gets its own build, named src-<fingerprint of the files>

`prepare(name, config, data_dir, manual_dir)` builds a dataset once and opens it:
- builds are serialized per (dataset, config) by a lock in `<data_dir>/.locks/` (a second
  process waits for the first and then opens its build); incomplete folders of builds that
  died are removed under that lock, so a killed build leaves nothing a later one trips on;
- a build records what it read (`dmf_build.json`); opening a build whose sources changed
  since raises a `DataError` naming the changed files, or, with `replace_stale=True`, moves
  the stale build to `<data_dir>/.replaced/` and builds again. A build is never deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import shutil
import sys
import time

import tensorflow_datasets as tfds
from etils import epath

from dmf_jax.data import format as data_format
from dmf_jax.data import sources
from dmf_jax.data.byod import BUILD_NAME, ByodCtr
from dmf_jax.data.generated import GeneratedCtr
from dmf_jax.data.movielens import Movielens100kMm
from dmf_jax.core.errors import ConfigError, DataError
from dmf_jax.core.locking import FileLock

BUILDERS = {
    "generated_ctr": GeneratedCtr,
    "movielens_100k_mm": Movielens100kMm,
    "byod_ctr": ByodCtr,
}
LOCK_DIR = ".locks"
REPLACED_DIR = ".replaced"


def config_names(name: str) -> tuple[str, ...]:
  """The named configs of a builder (empty for byod_ctr, whose builds are named by source)."""
  return tuple(c.name for c in BUILDERS[name].BUILDER_CONFIGS)


def needs_manual_dir(name: str) -> bool:
  """Whether dataset `name` builds from raw files the user gives (`manual_dir`)."""
  return bool(getattr(BUILDERS[name], "MANUAL_DOWNLOAD_INSTRUCTIONS", None))


def config_problem(name: str, config: str | None) -> str | None:
  """Why `config` is not a config of dataset `name` (None: it is). byod_ctr's builds are named
  by their sources (src-<fingerprint>), to be left empty."""
  if name not in BUILDERS:
    return f"dataset: unknown dataset {name!r}; valid: {', '.join(sorted(BUILDERS))}"
  if BUILDERS[name] is ByodCtr:
    if config in (None, "", "default") or BUILD_NAME.match(str(config)):
      return None
    return (f"dataset_config: byod_ctr has no config {config!r}: its builds are named by "
            f"their sources (src-<fingerprint>); leave it empty")
  if config not in config_names(name):
    return (f"dataset_config: {name} has no config {config!r}; valid: "
            f"{', '.join(config_names(name))}")
  return None


def get_builder(name: str, config: str | None, data_dir: str,
                manual_dir: str | None = None, *, beam: bool = False) -> tfds.core.DatasetBuilder:
  """The builder of dataset `name` / `config` in `data_dir` (byod_ctr: the build of the files
  in `manual_dir`, or the only build in `data_dir`); `beam`: it builds as a Beam pipeline."""
  if name not in BUILDERS:
    raise ConfigError(f"unknown dataset {name!r}; valid: {', '.join(sorted(BUILDERS))}")
  cls = BUILDERS[name]
  if cls is ByodCtr:
    return ByodCtr(config=ByodCtr.resolve_config(config, data_dir, manual_dir), data_dir=data_dir,
                   beam=beam)
  valid = config_names(name)
  if config is not None and config not in valid:
    raise ConfigError(f"dataset {name!r} has no config {config!r}; valid: {', '.join(valid)}")
  return cls(config=config, data_dir=data_dir, beam=beam)


@dataclasses.dataclass(frozen=True)
class BeamSettings:
  """Build as an Apache Beam pipeline (`pip install -e ".[beam]"`): `runner` is a Beam runner
  name (DirectRunner, DataflowRunner, FlinkRunner, SparkRunner; None: Beam's default, the
  DirectRunner) and `options` its pipeline arguments, e.g. ["--project=p", "--region=r",
  "--temp_location=gs://b/tmp"] (README "Scale")."""

  runner: str | None = None
  options: tuple[str, ...] = ()

  def download_config(self, manual_dir: str | None) -> tfds.download.DownloadConfig:
    try:
      import apache_beam as beam  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConfigError('a Beam build needs Apache Beam: pip install -e ".[beam]"') from None
    if self.runner is not None:  # an unknown name fails here, before anything is built
      try:
        beam.runners.create_runner(self.runner)
      except ValueError as e:
        raise ConfigError(f"beam_runner: {e}") from None
    return tfds.download.DownloadConfig(
        manual_dir=manual_dir, beam_runner=self.runner,
        beam_options=beam.options.pipeline_options.PipelineOptions(list(self.options)))


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _quiet_tfds():
  """TFDS warns on every look at a folder that is not built yet ("Variant folder ... has no
  dataset_info.json") and on every byod_ctr build name ("Using custom data configuration"):
  expected here, so kept out of the user's console."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


@contextlib.contextmanager
def _quiet_build(builder: tfds.core.DatasetBuilder):
  """A build announced in two lines of this project's own (start, end) instead of TFDS's
  banner ("Downloading and preparing dataset Unknown size ...", printed to stdout) and its
  tqdm bars (escape sequences in a log file)."""
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top

  where = epath.Path(builder.data_path)
  _log(f"building {builder.name}/{config_name(builder) or ''} into {where} (once: later runs "
       f"reuse it)")
  start, shown = time.time(), tqdm_utils._active  # pylint: disable=protected-access
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()), _quiet_tfds():
      yield
  finally:
    tfds.display_progress_bar(shown)
  _log(f"built {builder.name}/{config_name(builder) or ''} in {time.time() - start:.0f} s")


def _builder(name, config, data_dir, manual_dir,
             beam: bool = False) -> tuple[tfds.core.DatasetBuilder, bool]:
  """(the builder, whether it is built)."""
  with _quiet_tfds():
    builder = get_builder(name, config, data_dir, manual_dir, beam=beam)
    return builder, builder.is_prepared()


def _remove_dead_incomplete_builds(builder: tfds.core.DatasetBuilder) -> None:
  """TFDS's `incomplete.*` folders beside the version folder; only called under the build
  lock, so each belongs to a build that died."""
  parent = epath.Path(builder.data_path).parent
  if not parent.exists():
    return
  for path in parent.iterdir():
    if path.name.startswith("incomplete.") and path.is_dir():
      _log(f"removing {path}: the incomplete folder of a build that did not finish")
      shutil.rmtree(path)


def config_name(builder: tfds.core.DatasetBuilder) -> str | None:
  return builder.builder_config.name if builder.builder_config else None


def _move_aside(data_dir: epath.Path, builder: tfds.core.DatasetBuilder) -> epath.Path:
  target = (data_dir / REPLACED_DIR / f"{builder.name}-{config_name(builder) or 'default'}-"
            f"{builder.version}-{time.strftime('%Y%m%d-%H%M%S')}")
  target.parent.mkdir(parents=True, exist_ok=True)
  epath.Path(builder.data_path).rename(target)
  return target


def check_sources(builder: tfds.core.DatasetBuilder, manual_dir: str | None) -> list[str]:
  """The sources of a prepared build that changed since it was made ([] when unchanged or
  when they cannot be checked: no manual_dir for a dataset that reads one, or an old build)."""
  record = sources.read_build_record(builder.data_path)
  if record is None:
    return []
  needs_manual = bool(getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None))
  if needs_manual and not manual_dir:
    return []
  files = builder.source_files(epath.Path(manual_dir)) if manual_dir else {}
  return sources.changed_sources(record, files, builder.build_parameters())


def prepare(name: str, config: str | None, data_dir: str, manual_dir: str | None = None, *,
            replace_stale: bool = False,
            beam: BeamSettings | None = None) -> data_format.BuiltDataset:
  """Builds the dataset if it is not built yet (one process at a time), then opens it.

  beam: build it as an Apache Beam pipeline (the same records as the local build)."""
  data_dir_path = epath.Path(data_dir).expanduser()
  builder, prepared = _builder(name, config, str(data_dir_path), manual_dir)
  lock_name = f"{builder.name}-{config_name(builder) or ''}"
  lock = FileLock(data_dir_path / LOCK_DIR / f"{lock_name}.lock",
                  purpose=f"building {lock_name}", wait=True, log=_log)
  if prepared:
    changed = check_sources(builder, manual_dir)
    if not changed:
      return _open(builder)
    where = epath.Path(builder.data_path)
    if not replace_stale:
      raise DataError(
          f"the {name} build at {where} was made from other sources: changed "
          f"{', '.join(changed)}.\nRebuild with `python -m data.build --dataset={name} "
          f"--config={config_name(builder) or ''} "
          f"--data_dir={data_dir} --manual_dir={manual_dir} --replace_stale` (moves the old "
          f"build to {data_dir_path / REPLACED_DIR}), or use another data_dir")
    with lock:
      _log(f"moved the stale build {where} to {_move_aside(data_dir_path, builder)}")
  with lock:
    builder, prepared = _builder(name, config, str(data_dir_path), manual_dir, beam is not None)
    if not prepared:  # another process may have built it while this one waited
      _remove_dead_incomplete_builds(builder)
      if beam is not None:
        download_config = beam.download_config(manual_dir)
      else:
        download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
      with _quiet_build(builder), _no_empty_folders_left(data_dir_path, builder):
        builder.download_and_prepare(download_config=download_config)
  return _open(builder)


@contextlib.contextmanager
def _no_empty_folders_left(data_dir: epath.Path, builder: tfds.core.DatasetBuilder):
  """A failed build leaves no folder it made (e.g. byod_ctr/src-<fingerprint>/) behind."""
  folders, path = [], epath.Path(builder.data_path)
  while path != data_dir and data_dir in path.parents:
    if not path.exists():
      folders.append(path)  # innermost first
    path = path.parent
  try:
    yield
  except BaseException:
    for folder in folders:
      if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    raise


def open_recorded(full_name: str, fingerprint: str, data_dir: str, *,
                  owner: str = "the run") -> data_format.BuiltDataset:
  """Opens the build `full_name` ('name' or 'name/config', `BuiltDataset.full_name`) in
  `data_dir` as it is, never building or rebuilding it, and checks that its content is still
  `fingerprint`: evaluation must read the data `owner` trained on. Raises `DataError` naming
  the build when it is gone or changed."""
  data_dir_path = epath.Path(data_dir).expanduser()
  name, _, config = full_name.partition("/")
  try:
    with _quiet_tfds():
      builder = get_builder(name, config or None, str(data_dir_path))
      prepared = builder.is_prepared()
  except ConfigError:
    prepared = False  # e.g. a byod_ctr build no longer under data_dir
  if not prepared:
    raise DataError(
        f"the dataset build {full_name} that {owner} trained on is not in {data_dir_path} "
        f"(moved, deleted or replaced?): evaluating on other data would not be its result; "
        f"restore that build or pass its data_dir")
  built = _open(builder)
  if fingerprint and built.fingerprint != fingerprint:
    raise DataError(
        f"the dataset build {full_name} in {data_dir_path} changed since {owner} trained on it "
        f"(fingerprint {built.fingerprint[:12]} now, {fingerprint[:12]} then): evaluating on "
        f"other data would not be its result")
  return built


def check_record_files(built: data_format.BuiltDataset) -> None:
  """Raises `DataError` naming the file when a split's ArrayRecord file is damaged: it cannot
  be opened, or holds another number of records than the build wrote (a truncated copy, a
  partial sync). Reads each file's footer only, not its records."""
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=g-import-not-at-top

  for split, source in built.sources.items():
    paths = getattr(getattr(source, "data_source", None), "_paths", None)
    info = getattr(source, "dataset_info", None)
    if not paths or info is None or split not in info.splits:
      continue  # not an ArrayRecord-backed split: nothing to check here
    for path, expected in zip(paths, info.splits[split].shard_lengths):
      try:
        reader = ArrayRecordReader(str(path), "readahead_buffer_size:0")
        found = reader.num_records()
        reader.close()
      except Exception as e:  # pylint: disable=broad-except  (Riegeli raises RuntimeError)
        raise DataError(f"{path} is damaged ({str(e).splitlines()[0].split(';')[0][:120]}): rebuild "
                        f"{built.full_name} (move its folder {built.directory} away first)"
                        ) from None
      if found != expected:
        raise DataError(f"{path} is damaged: it holds {found} records, the build wrote "
                        f"{expected} (truncated?): rebuild {built.full_name} (move its folder "
                        f"{built.directory} away first)")


def _open(builder: tfds.core.DatasetBuilder) -> data_format.BuiltDataset:
  with _quiet_tfds():  # tfds.data_source makes a builder again: the same warnings
    built = data_format.load_built_dataset(builder)
  check_record_files(built)
  fingerprint = sources.build_fingerprint(
      builder.data_path, (data_format.SCHEMA_FILE, data_format.CATALOG_FILE))
  return dataclasses.replace(built, fingerprint=fingerprint)
