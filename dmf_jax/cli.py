"""What the binaries share: user errors as one short message and exit status 2.

  from dmf_jax import cli
  if __name__ == "__main__":
    cli.run(main)

Bad flags (unknown flags, positional arguments, unknown config fields such as `--config.foo=1`,
a missing config file, unparsable values) and `dmf_jax.core.errors.UserError`s raised by `main`
(invalid configs, bad data files, a workdir that holds another run or is in use, ...) print
`error: <message>` and exit with status 2, without a traceback; `--debug` shows the traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging

from dmf_jax.core import host
from dmf_jax.core.errors import UserError

USER_ERROR_EXIT = 2
_DEBUG = flags.DEFINE_bool("debug", False,
                           "Show the traceback of user errors (bad flags, configs or files).")
_REUSE_FREED_MEMORY = flags.DEFINE_bool(
    "reuse_freed_memory", False,
    "Keep freed host memory for reuse (glibc malloc, one arena; dmf_jax.core.host): XLA:CPU "
    "steps with large temporaries (BST, DIEN) stop page-faulting on fresh pages; a run whose "
    "input threads allocate alongside its steps (DMF's) is slower with it.")
flags.DEFINE_bool(
    "huge_pages", True,
    "Started as `python -m experiments.<name>`, re-execute once with malloc using transparent "
    "huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1; dmf_jax.core.host): XLA:CPU steps with "
    "large temporaries take about 80x fewer page faults. Read from the command line at start-up, "
    "before flags are parsed; --nohuge_pages leaves it out.")


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(USER_ERROR_EXIT)


def refuse_to_replace(flag: str, path: str | None, force: bool) -> None:
  """Stops the binary (`fail`) when the output file `path` given by --`flag` exists and
  --force is not set: earlier figures are never replaced unasked. Call it before the work."""
  if path and os.path.exists(path) and not force:
    fail(f"--{flag}: {path} exists (an earlier run's figures?); give another path or --force "
         "to replace it")


def _short(message: str, lines: int = 4) -> str:
  kept = [line for line in str(message).strip().splitlines() if line.strip()]
  return "\n".join(kept[:lines]) + ("\n..." if len(kept) > lines else "")


def _unknown_field(error: Exception, argv: list[str]) -> str:
  """The message for an override of a field the config does not have."""
  while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError(..))
    error = error.args[0]
  text = str(error.args[0]) if error.args else str(error)
  first, *rest = text.splitlines() or [""]
  name = first.strip("'\" ")
  hint = next((line.strip() for line in rest if line.strip().startswith("Did you mean")), "")
  hint = re.sub(r" instead of .*", "?", hint)
  culprit = next((a for a in argv[1:] if a.startswith("--config.") and
                  re.search(rf"[.]{re.escape(name)}(=|[.]|$)", a)), None)
  return (f"unknown config field {name!r}" + (f" in {culprit}" if culprit else "")
          + (f" ({hint[0].lower()}{hint[1:]})" if hint else "")
          + ": the config has no such field (see dmf_jax/train/config.py default_config)")


def _load_configs() -> None:
  """ml_collections loads a config file (and applies its overrides) on first access: do it
  now, while parsing, so that its errors are parsing errors."""
  for flag in set(flags.FLAGS._flags().values()):  # pylint: disable=protected-access
    if type(flag).__module__.startswith("ml_collections") and flag.present:
      getattr(flag.value, "to_dict", None)  # a config that failed to load raises here


def parse_flags(argv: list[str]) -> list[str]:
  """`flags.FLAGS(argv)` with every parsing error reported as one message (exit status 2)."""
  debug = any(a in ("--debug", "--debug=true", "--debug=True") for a in argv)
  try:
    rest = flags.FLAGS(argv)
    _load_configs()
    return rest
  except (flags.Error, OSError) as e:  # unknown flags, bad values, a config file not found
    if debug:
      raise
    text = str(e)
    if isinstance(e, OSError) or "Failed loading config file" in text:
      path = re.search(r"--config=(\S+)", " ".join(argv))
      fail(f"config file {path.group(1) if path else ''} not found or not loadable: "
           f"{_short(text.splitlines()[-1], 1).strip()}")
    fail(_short(text))
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a missing field
    if debug:
      raise
    fail(_unknown_field(e, argv))
  except (TypeError, ValueError) as e:  # ml_collections: a value of the wrong type
    if debug:
      raise
    fail(f"bad flag value: {_short(str(e))}")
  return []


def run(main) -> None:
  """`app.run(main)` with user errors as one message and exit status 2; positional arguments
  are refused, absl logs at WARNING unless --verbosity is given, and with
  --reuse_freed_memory freed host memory is kept for reuse (`core.host`)."""

  def wrapped(argv):
    if len(argv) > 1:
      fail(f"unexpected arguments {argv[1:]} (every option is a --flag)")
    if _REUSE_FREED_MEMORY.value:
      host.reuse_freed_memory()
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    try:
      return main(argv)
    except UserError as e:
      if _DEBUG.value:
        raise
      fail(str(e))

  app.run(wrapped, flags_parser=parse_flags)
